/* The HTPC console: plain JavaScript over the relay API (no framework, no build step).
 *
 * Everything is read with fetch() from the same endpoints any client uses; the token (when the HTPC has
 * authentication on) is kept in this tab's sessionStorage and sent as an Authorization header, never in a
 * URL. Agent ids, table names and values are hostile input: they are only ever put into the page as
 * textContent or attribute values, never as HTML (the page's Content-Security-Policy also refuses every
 * Trusted Types sink). URLs are relative to the page, so the console works behind a reverse proxy's path
 * prefix. An agent's state (ok, lagging, stuck, blocked, idle) is the HTPC's own word (`state` in
 * /relay/agents), never derived here.
 */
"use strict";

(function () {
  const TOKEN_KEY = "replicator-console-token";
  const POLL_MS = 1000;
  const OPS_POLL_MS = 2000;
  const HISTORY_S = 300; // the lag chart's window
  const LIVE_KEEP = 200; // live changes kept on screen

  const $ = (id) => document.getElementById(id);
  const state = {
    token: sessionStorage.getItem(TOKEN_KEY),
    me: null,
    agents: [],
    history: new Map(), // agent id -> [{t, lag, delay}]
    rows: new Map(), // agent id -> row elements
    tab: "agents",
    browse: { agent: null, table: null, info: null, offset: 0, after: null, keys: [], lastKey: null, seq: 0 },
    live: null,
    startTimer: null,
    startSeq: 0, // the newest start(): an older one's answer is dropped (one start chain at a time)
    pollSeq: 0, // likewise for poll()
    pollTimer: null,
    opsTimer: null,
    noticeTimer: null,
  };

  // ------------------------------------------------------------------ helpers
  function el(tag, props, children) {
    const node = document.createElement(tag);
    if (props) {
      for (const [key, value] of Object.entries(props)) {
        if (key === "text") node.textContent = value;
        else if (key === "cls") node.className = value;
        else if (key === "data") Object.assign(node.dataset, value);
        else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
        else node.setAttribute(key, value);
      }
    }
    for (const child of children || []) if (child) node.appendChild(child);
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function show(node, visible) {
    node.hidden = !visible;
  }

  function quoteIdent(name) {
    return '"' + String(name).replace(/"/g, '""') + '"';
  }

  function ago(seconds) {
    if (seconds === null || seconds === undefined) return "never";
    if (seconds < 1) return "just now";
    if (seconds < 60) return Math.round(seconds) + " s ago";
    if (seconds < 3600) return Math.round(seconds / 60) + " min ago";
    if (seconds < 86400) return (seconds / 3600).toFixed(1) + " h ago";
    return (seconds / 86400).toFixed(1) + " d ago";
  }

  function secs(value) {
    if (value === null || value === undefined) return "–";
    if (value < 1) return Math.round(value * 1000) + " ms";
    if (value < 120) return value.toFixed(1) + " s";
    return Math.round(value / 60) + " min";
  }

  function clock(epochSeconds) {
    if (!epochSeconds) return "–";
    return new Date(epochSeconds * 1000).toLocaleString();
  }

  /** A value as a query answer carries it: null, number, text, {"b": base64}, {"f": "inf"}. */
  function cell(value) {
    const td = document.createElement("td");
    if (value === null || value === undefined) {
      td.textContent = "NULL";
      td.className = "null";
    } else if (typeof value === "object" && value !== null && "b" in value) {
      const bytes = Math.floor((String(value.b).length * 3) / 4);
      td.textContent = "BLOB (" + bytes + " bytes)";
      td.className = "null";
      td.title = String(value.b).slice(0, 200);
    } else if (typeof value === "object" && value !== null && "f" in value) {
      td.textContent = String(value.f);
      td.className = "num";
    } else if (typeof value === "number") {
      td.textContent = String(value);
      td.className = "num";
    } else {
      td.textContent = String(value);
    }
    return td;
  }

  function errorText(answer) {
    const data = answer.data;
    if (data && typeof data === "object" && !Array.isArray(data) && data.error) {
      return "HTTP " + answer.status + " · " + data.error + ": " + (data.message || "") +
        "\n" + JSON.stringify(data, null, 2);
    }
    if (Array.isArray(data) && data.length && data[0].control === "must-refetch") {
      return "HTTP " + answer.status + " · must-refetch: " + data[0].reason;
    }
    return "HTTP " + answer.status + " · " + (answer.text || "no answer");
  }

  function headers(extra) {
    const out = Object.assign({}, extra || {});
    if (state.token) out.Authorization = "Bearer " + state.token;
    return out;
  }

  /** One JSON call: {status, ok, data, text}; a 401 sends the person back to the token form. */
  async function api(path, options) {
    const opts = options || {};
    const init = { method: opts.method || "GET", headers: headers(opts.headers), cache: "no-store" };
    if (opts.body !== undefined) {
      init.body = JSON.stringify(opts.body);
      init.headers["Content-Type"] = "application/json";
    }
    if (opts.signal) init.signal = opts.signal;
    let resp;
    try {
      resp = await fetch(path, init);
    } catch (err) {
      return { status: 0, ok: false, data: null, text: "the HTPC does not answer (" + err + ")" };
    }
    const text = await resp.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (_err) {
      data = null;
    }
    if (resp.status === 401 && !opts.noLogin) needLogin(data && data.message);
    return { status: resp.status, ok: resp.ok, data: data, text: text };
  }

  // ------------------------------------------------------------------ who is here
  function needLogin(message) {
    stopPolling();
    stopLive();
    show($("main"), false);
    show($("tabs"), false);
    show($("login"), true);
    show($("sign-out"), !!state.token);
    const error = $("login-error");
    if (state.token && message) {
      error.textContent = "The token was refused: " + message;
      show(error, true);
    } else {
      show(error, false);
    }
    $("who").textContent = "not signed in";
    $("token").focus();
  }

  async function start() {
    clearTimeout(state.startTimer);
    state.startTimer = null;
    const ticket = ++state.startSeq;
    const answer = await api("relay/whoami", { noLogin: true });
    if (ticket !== state.startSeq) return; // a newer start() took over
    if (answer.status === 401) {
      needLogin(answer.data && answer.data.message);
      return;
    }
    if (!answer.ok) {
      $("who").textContent = errorText(answer).split("\n")[0];
      state.startTimer = setTimeout(start, 2000);
      return;
    }
    state.me = answer.data;
    const me = state.me;
    $("who").textContent = me.auth ? me.kind + " " + me.name : "authentication off";
    show($("sign-out"), me.auth);
    show($("login"), false);
    show($("tabs"), true);
    show($("main"), true);
    show($("tab-ops"), !!me.operator);
    for (const row of state.rows.values()) row.tr.remove();
    state.rows.clear();
    poll();
  }

  function useToken() {
    const value = $("token").value.trim();
    if (!value) return;
    const inUse = state.token !== null || state.me !== null; // the page may show what another token read
    state.token = value;
    sessionStorage.setItem(TOKEN_KEY, value);
    $("token").value = "";
    if (inUse) {
      location.reload(); // start from an empty page: nothing the previous token read stays in it
      return;
    }
    start();
  }

  function signOut() {
    stopPolling();
    stopLive();
    state.token = null;
    state.me = null;
    sessionStorage.removeItem(TOKEN_KEY);
    location.reload(); // nothing read with the token stays in the page
  }

  /** The agent a request acts as: an agent token may only act as its own agent. */
  function askingAgent(agentId) {
    const me = state.me;
    return me && me.auth && me.kind === "agent" ? me.name : agentId;
  }

  // ------------------------------------------------------------------ polling: agents and health
  function stopPolling() {
    state.pollSeq += 1; // a poll in flight draws nothing and sets no timer
    clearTimeout(state.pollTimer);
    clearTimeout(state.opsTimer);
    state.pollTimer = null;
    state.opsTimer = null;
  }

  async function poll() {
    clearTimeout(state.pollTimer);
    const ticket = ++state.pollSeq;
    const [agents, health] = await Promise.all([api("relay/agents"), api("health")]);
    if (ticket !== state.pollSeq || agents.status === 401) return;
    if (agents.ok && agents.data) {
      state.agents = agents.data.agents || [];
      renderAgents();
      fillAgentSelects();
    }
    renderHealth(health);
    state.pollTimer = setTimeout(poll, POLL_MS);
  }

  function renderHealth(answer) {
    const box = $("health");
    const problems = $("problems");
    clear(problems);
    if (!answer.ok && answer.status !== 200) {
      box.dataset.state = "down";
      $("health-text").textContent = answer.status ? "HTTP " + answer.status : "no answer";
      show(problems, false);
      return;
    }
    const h = answer.data || {};
    box.dataset.state = h.status === "ok" ? "ok" : "degraded";
    $("health-text").textContent = (h.status || "?") + " · " + (h.agents || 0) + " agent" +
      (h.agents === 1 ? "" : "s") + (h.nats && h.nats.connected ? " · NATS connected" : " · NATS disconnected");
    const list = h.problems || [];
    for (const p of list) problems.appendChild(el("div", { text: p }));
    show(problems, list.length > 0);
  }

  function stateTitle(a, st) {
    if (st === "blocked") return [a.blocked, a.agent_blocked].filter(Boolean).join("; ");
    if (st === "stuck") {
      return a.lag_changes + " changes behind and not moving for " + secs(a.behind_for_s) + " (see the problems above)";
    }
    if (st === "idle") {
      const since = a.seconds_since_seen === null ? "no record from this agent yet"
        : "no record from this agent for " + ago(a.seconds_since_seen).replace(" ago", "");
      return "nothing to apply and " + since + " (an idle agent sends nothing; the HTPC cannot tell whether it is " +
        "switched off)";
    }
    if (st === "lagging") return a.lag_changes + " changes not applied yet";
    return "caught up";
  }

  function remember(a) {
    const now = Date.now() / 1000;
    let list = state.history.get(a.agent_id);
    if (!list) {
      list = [];
      state.history.set(a.agent_id, list);
    }
    list.push({ t: now, lag: a.lag_changes || 0 });
    while (list.length && list[0].t < now - HISTORY_S) list.shift();
    return list;
  }

  const SVG = "http://www.w3.org/2000/svg";

  function drawChart(svg, points) {
    const w = 160;
    const h = 34;
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const now = Date.now() / 1000;
    const max = Math.max(1, ...points.map((p) => p.lag));
    // the last HISTORY_S seconds; a page open for less than that spreads what it has (at least 5 s)
    const span = points.length ? Math.min(HISTORY_S, Math.max(5, now - points[0].t)) : HISTORY_S;
    const x = (t) => (w * (t - (now - span))) / span;
    const y = (v) => h - 2 - ((h - 6) * v) / max;
    const base = document.createElementNS(SVG, "line");
    base.setAttribute("x1", "0");
    base.setAttribute("x2", String(w));
    base.setAttribute("y1", String(h - 1.5));
    base.setAttribute("y2", String(h - 1.5));
    base.setAttribute("class", "base");
    svg.appendChild(base);
    if (!points.length) return;
    const coords = points.map((p) => x(p.t).toFixed(1) + "," + y(p.lag).toFixed(1));
    const area = document.createElementNS(SVG, "polygon");
    area.setAttribute("points", x(points[0].t).toFixed(1) + "," + (h - 2) + " " + coords.join(" ") + " " +
      x(points[points.length - 1].t).toFixed(1) + "," + (h - 2));
    area.setAttribute("class", "area");
    svg.appendChild(area);
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", coords.join(" "));
    line.setAttribute("class", "line");
    svg.appendChild(line);
    const title = document.createElementNS(SVG, "title");
    title.textContent = "lag in changes over the last " + HISTORY_S / 60 + " min; highest " + max;
    svg.appendChild(title);
  }

  function agentRow(agentId) {
    let row = state.rows.get(agentId);
    if (row) return row;
    const chart = document.createElementNS(SVG, "svg");
    chart.setAttribute("viewBox", "0 0 160 34");
    chart.setAttribute("width", "160");
    chart.setAttribute("height", "34");
    chart.setAttribute("class", "chart");
    row = {
      name: el("td", { cls: "agent-id", text: agentId }),
      state: el("span", { cls: "badge" }),
      note: el("div", { cls: "note" }),
      applied: el("td", { cls: "num applied" }),
      lag: el("td", { cls: "num lag" }),
      delay: el("td", { cls: "num" }),
      seen: el("td"),
      tables: el("td", { cls: "tables" }),
      dead: el("td", { cls: "num dead" }),
      chart: chart,
      actions: el("td", { cls: "actions" }),
    };
    const browse = el("button", { type: "button", text: "browse", onclick: () => openTables(agentId) });
    row.actions.appendChild(browse);
    if (state.me && state.me.operator) { // operator actions are only offered to an operator
      row.actions.appendChild(el("button", {
        type: "button", cls: "danger-outline resync", text: "resync", onclick: () => confirmResync(agentId),
      }));
    }
    const stateTd = el("td", { cls: "state" }, [row.state, row.note]);
    const chartTd = el("td", { cls: "chart-cell" }, [chart]);
    row.tr = el("tr", { data: { agent: agentId } },
      [row.name, stateTd, row.applied, row.lag, row.delay, row.seen, row.tables, row.dead, chartTd, row.actions]);
    state.rows.set(agentId, row);
    return row;
  }

  function renderAgents() {
    const body = $("agents-body");
    const seen = new Set();
    for (const a of state.agents) {
      seen.add(a.agent_id);
      const row = agentRow(a.agent_id);
      const st = a.state || "ok"; // the HTPC's word for it
      row.tr.dataset.state = st;
      row.state.textContent = st;
      row.state.dataset.state = st;
      row.state.title = stateTitle(a, st);
      const notes = [];
      if (st === "blocked") notes.push([a.blocked, a.agent_blocked].filter(Boolean).join("; "));
      if (st === "stuck") notes.push("not moving for " + secs(a.behind_for_s));
      if (a.resync_pending) notes.push("resync pending: " + a.resync_pending);
      if (a.waiting_records) notes.push(a.waiting_records + " records wait for an earlier one");
      row.note.textContent = notes.join(" · ");
      row.applied.textContent = String(a.watermark);
      row.applied.title = "epoch " + (a.epoch || "–") + "; " + a.changes_applied + " changes in " + a.records_applied +
        " records applied";
      row.lag.textContent = String(a.lag_changes);
      row.delay.textContent = secs(a.replication_delay_s);
      row.delay.title = "now minus the commit time of the oldest change not applied (or the last one's delay)";
      row.seen.textContent = ago(a.seconds_since_seen);
      row.seen.title = clock(a.last_seen);
      clear(row.tables);
      const tables = a.tables || {};
      for (const vis of Object.keys(tables)) {
        for (const name of tables[vis]) {
          row.tables.appendChild(el("span", { cls: "chip vis-" + vis, text: name, title: vis }));
        }
      }
      row.dead.textContent = String(a.dead_letters);
      row.dead.classList.toggle("warn", a.dead_letters > 0);
      drawChart(row.chart, remember(a));
      body.appendChild(row.tr); // in id order (the API sorts)
    }
    for (const [agentId, row] of state.rows) {
      if (!seen.has(agentId)) {
        row.tr.remove();
        state.rows.delete(agentId);
      }
    }
    for (const agentId of state.history.keys()) if (!seen.has(agentId)) state.history.delete(agentId);
    show($("agents-empty"), state.agents.length === 0);
  }

  function fillSelect(select, values, keep) {
    const current = keep !== undefined ? keep : select.value;
    const have = Array.from(select.options).map((o) => o.value);
    if (have.length === values.length && have.every((v, i) => v === values[i])) return;
    clear(select);
    for (const v of values) select.appendChild(el("option", { value: v, text: v }));
    if (values.includes(current)) select.value = current;
  }

  function fillAgentSelects() {
    const ids = state.agents.map((a) => a.agent_id);
    const tablesAgent = $("tables-agent");
    const hadNone = !tablesAgent.value;
    fillSelect(tablesAgent, ids);
    if (hadNone && tablesAgent.value && state.tab === "tables") loadTables(tablesAgent.value);
    const me = state.me;
    const queryAgent = $("query-agent");
    if (me && me.auth && me.kind === "agent") {
      fillSelect(queryAgent, [me.name]);
      queryAgent.disabled = true;
    } else {
      fillSelect(queryAgent, ids);
      queryAgent.disabled = false; // an operator (or no authentication) may ask as any agent
    }
    const liveAgent = $("live-agent");
    const before = liveAgent.value;
    fillSelect(liveAgent, ids);
    if (liveAgent.value !== before || !$("live-table").options.length) fillLiveTables();
  }

  // ------------------------------------------------------------------ tabs
  function selectTab(name) {
    state.tab = name;
    for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.tab === name);
    for (const v of document.querySelectorAll(".view")) show(v, v.id === "view-" + name);
    clearTimeout(state.opsTimer);
    if (name === "ops") pollOps();
    if (name === "live") fillLiveTables(); // tables declared since the list was made
    if (name === "tables" && $("tables-agent").value && !state.browse.agent) loadTables($("tables-agent").value);
  }

  // ------------------------------------------------------------------ tables: schema and rows
  function openTables(agentId) {
    $("tables-agent").value = agentId;
    selectTab("tables");
    loadTables(agentId);
  }

  async function loadTables(agentId) {
    const list = $("tables-list");
    clear(list);
    show($("tables-detail"), false);
    state.browse = browseState(agentId, null);
    const answer = await api("relay/agents/" + encodeURIComponent(agentId) + "/tables");
    if (!answer.ok) {
      list.appendChild(el("span", { cls: "error", text: errorText(answer).split("\n")[0] }));
      return;
    }
    const tables = answer.data.tables || [];
    if (!tables.length) list.appendChild(el("span", { cls: "muted", text: "no tables" }));
    for (const t of tables) {
      list.appendChild(el("button", {
        type: "button", cls: "chip vis-" + t.visibility, text: t.name, title: t.visibility + ", " + t.source,
        data: { table: t.name }, onclick: () => openTable(agentId, t),
      }));
    }
    if (tables.length) openTable(agentId, tables[0]);
  }

  /** What the Tables view shows: a table, and where its page starts (`offset` rows in, after key `after`). */
  function browseState(agentId, info) {
    return {
      agent: agentId, table: info ? info.name : null, info: info,
      offset: 0, // rows before this page (shown as "rows 51-100")
      after: null, // keyset paging: the primary key of the previous page's last row (null: from the start)
      keys: [], // {offset, after} of the pages before this one, for "previous"
      lastKey: null, // the primary key of this page's last row (null: none, or not bindable as a parameter)
      seq: 0, // the newest request for a page; an older answer is dropped
    };
  }

  function openTable(agentId, info) {
    state.browse = browseState(agentId, info);
    for (const b of $("tables-list").children) b.classList.toggle("active", b.dataset.table === info.name);
    $("tables-title").textContent = agentId + " · " + info.name + "  (" + info.visibility + ", " + info.source + ")";
    const body = $("schema-body");
    clear(body);
    if (info.columns === null) {
      body.appendChild(el("tr", {}, [el("td", { colspan: "3", cls: "muted", text: "columns not shown (another agent's on_demand table)" })]));
    } else {
      for (const c of info.columns) {
        const key = (info.pk || []).indexOf(c.name);
        body.appendChild(el("tr", {}, [
          el("td", { text: c.name }), el("td", { text: c.type || "" }),
          el("td", { text: key >= 0 ? "primary key" + ((info.pk || []).length > 1 ? " #" + (key + 1) : "") : "" }),
        ]));
      }
    }
    show($("tables-detail"), true);
    loadPage();
  }

  function tableSql(agentId, table, asking) {
    return asking === agentId ? quoteIdent(table) : quoteIdent(agentId) + "." + quoteIdent(table);
  }

  /** The page's SQL: keyset paging on the primary key (`WHERE (pk...) > (?...) ORDER BY pk... LIMIT ?`), stable
   * while rows are written; a table without one (a relay table) in rowid order by LIMIT/OFFSET. */
  function pageQuery(b, size, after, offset) {
    const from = "SELECT * FROM " + tableSql(b.agent, b.table, askingAgent(b.agent));
    const pk = b.info.pk || [];
    if (!pk.length) {
      const order = b.info.source === "relay" ? " ORDER BY _rowid_" : "";
      return { sql: from + order + " LIMIT ? OFFSET ?", params: [size + 1, offset] };
    }
    const cols = pk.map(quoteIdent);
    const order = " ORDER BY " + cols.join(", ");
    if (after !== null) {
      const marks = pk.map(() => "?").join(", ");
      return { sql: from + " WHERE (" + cols.join(", ") + ") > (" + marks + ")" + order + " LIMIT ?", params: [...after, size + 1] };
    }
    // from the start, or after a key that cannot be a parameter (a BLOB, NULL, an infinite REAL): by offset
    return offset ? { sql: from + order + " LIMIT ? OFFSET ?", params: [size + 1, offset] }
      : { sql: from + order + " LIMIT ?", params: [size + 1] };
  }

  /** The primary key of a result row, as query parameters; null when a value cannot be one. */
  function keyOf(pk, columns, row) {
    if (!pk.length || !row) return null;
    const key = [];
    for (const name of pk) {
      const i = columns.indexOf(name);
      const v = i >= 0 ? row[i] : null;
      if (v === null || v === undefined || typeof v === "object") return null;
      if (typeof v === "number" && Number.isInteger(v) && !Number.isSafeInteger(v)) return null; // rounded by JSON
      key.push(v);
    }
    return key;
  }

  async function loadPage() {
    const b = state.browse;
    if (!b.info) return;
    const size = parseInt($("page-size").value, 10);
    const ticket = ++b.seq;
    const offset = b.offset; // this request's page, whatever is clicked meanwhile
    const after = b.after;
    $("page-prev").disabled = true;
    $("page-next").disabled = true;
    const q = pageQuery(b, size, after, offset);
    const answer = await api("relay/query", {
      method: "POST", body: { agent_id: askingAgent(b.agent), query: q.sql, params: q.params },
    });
    if (state.browse !== b || b.seq !== ticket) return; // another table or page was asked for meanwhile
    const error = $("rows-error");
    $("page-prev").disabled = offset === 0;
    if (!answer.ok) {
      error.textContent = errorText(answer).split("\n")[0];
      show(error, true);
      renderResult($("rows-table"), { columns: [], rows: [] });
      return;
    }
    show(error, false);
    const rows = answer.data.rows.slice(0, size);
    b.lastKey = keyOf(b.info.pk || [], answer.data.columns, rows[rows.length - 1]);
    renderResult($("rows-table"), { columns: answer.data.columns, rows: rows });
    $("page-info").textContent = rows.length
      ? "rows " + (offset + 1) + "–" + (offset + rows.length)
      : offset ? "no more rows" : "no rows";
    $("page-next").disabled = answer.data.rows.length <= size;
  }

  function movePage(direction) {
    const b = state.browse;
    if (!b.info) return;
    const size = parseInt($("page-size").value, 10);
    if (direction > 0) {
      b.keys.push({ offset: b.offset, after: b.after });
      b.after = b.lastKey;
      b.offset += size;
    } else {
      const back = b.keys.pop() || { offset: 0, after: null };
      b.offset = back.offset;
      b.after = back.after;
    }
    loadPage();
  }

  function firstPage() {
    const b = state.browse;
    b.offset = 0;
    b.after = null;
    b.keys = [];
    loadPage();
  }

  function renderResult(table, result) {
    const head = table.tHead;
    const body = table.tBodies[0];
    clear(head);
    clear(body);
    const tr = el("tr");
    for (const c of result.columns) tr.appendChild(el("th", { text: c }));
    head.appendChild(tr);
    const frag = document.createDocumentFragment();
    for (const row of result.rows) {
      const r = el("tr");
      for (const v of row) r.appendChild(cell(v));
      frag.appendChild(r);
    }
    body.appendChild(frag);
  }

  // ------------------------------------------------------------------ query
  async function runQuery() {
    const sql = $("query-sql").value.trim();
    const agentId = $("query-agent").value;
    const error = $("query-error");
    if (!sql) return;
    if (!agentId) {
      error.textContent = "No agent to ask as yet: queries run in an agent's name (agent_id).";
      show(error, true);
      return;
    }
    $("query-run").disabled = true;
    $("query-status").textContent = "running…";
    const t0 = performance.now();
    const answer = await api("relay/query", { method: "POST", body: { agent_id: agentId, query: sql } });
    const took = Math.round(performance.now() - t0);
    $("query-run").disabled = false;
    if (!answer.ok) {
      error.textContent = errorText(answer);
      show(error, true);
      $("query-status").textContent = "failed in " + took + " ms";
      renderResult($("query-table"), { columns: [], rows: [] });
      return;
    }
    show(error, false);
    const d = answer.data;
    renderResult($("query-table"), d);
    $("query-status").textContent = d.rows.length + " row" + (d.rows.length === 1 ? "" : "s") +
      (d.truncated ? " (truncated: more rows exist)" : "") + " in " + took + " ms";
  }

  // ------------------------------------------------------------------ live change feed (SSE over fetch)
  async function fillLiveTables() {
    const agentId = $("live-agent").value;
    const select = $("live-table");
    if (!agentId) return;
    const answer = await api("relay/agents/" + encodeURIComponent(agentId) + "/tables");
    if (!answer.ok) return;
    const names = (answer.data.tables || []).filter((t) => t.visibility === "always").map((t) => t.name);
    fillSelect(select, names);
  }

  function stopLive() {
    if (state.live) {
      state.live.stopped = true;
      state.live.abort.abort();
      clearTimeout(state.live.retry);
      state.live = null;
    }
    $("live-start").disabled = false;
    $("live-stop").disabled = true;
  }

  function startLive() {
    stopLive();
    const agentId = $("live-agent").value;
    const table = $("live-table").value;
    if (!agentId || !table) return;
    clear($("live-body"));
    show($("live-error"), false);
    state.live = { agent: agentId, table: table, offset: null, abort: null, stopped: false, retry: null, snapshot: 0 };
    $("live-start").disabled = true;
    $("live-stop").disabled = false;
    liveStream(state.live);
  }

  function liveStatus(live, text) {
    if (state.live === live) $("live-status").textContent = text;
  }

  async function liveStream(live) {
    live.abort = new AbortController();
    live.caughtUp = live.offset !== null;
    live.snapshot = 0;
    let url = "relay/changes?agent=" + encodeURIComponent(live.agent) + "&table=" + encodeURIComponent(live.table) +
      "&live=true";
    if (live.offset) url += "&offset=" + encodeURIComponent(live.offset);
    liveStatus(live, live.offset ? "reconnecting…" : "reading the snapshot…");
    let ended = "the stream ended";
    try {
      const resp = await fetch(url, {
        headers: headers({ Accept: "text/event-stream" }), signal: live.abort.signal, cache: "no-store",
      });
      if (!resp.ok) {
        const text = await resp.text();
        let data = null;
        try { data = JSON.parse(text); } catch (_e) { data = null; }
        if (resp.status === 401) needLogin(data && data.message);
        const message = errorText({ status: resp.status, data: data, text: text });
        $("live-error").textContent = message;
        show($("live-error"), true);
        if (resp.status >= 400 && resp.status < 500) {
          liveStatus(live, "refused");
          stopLive();
          return;
        }
        ended = "HTTP " + resp.status;
      } else {
        await readEvents(resp.body, live);
      }
    } catch (err) {
      if (live.stopped) return;
      ended = String(err);
    }
    if (live.stopped) return;
    liveStatus(live, ended + "; reconnecting in 2 s");
    live.retry = setTimeout(() => liveStream(live), 2000);
  }

  async function readEvents(stream, live) {
    const reader = stream.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (!data.length) continue; // a keep-alive comment
        let message;
        try {
          message = JSON.parse(data.join("\n"));
        } catch (_e) {
          continue;
        }
        onFeedMessage(live, message);
        if (live.stopped) return;
      }
    }
  }

  function onFeedMessage(live, m) {
    if (m.control === "up-to-date") {
      live.offset = m.offset;
      if (!live.caughtUp) {
        live.caughtUp = true;
        liveStatus(live, "watching · snapshot had " + live.snapshot + " row" + (live.snapshot === 1 ? "" : "s"));
      }
      return;
    }
    if (m.control === "must-refetch") {
      live.offset = null;
      addLiveRow({ op: "must-refetch", key: null, row: { reason: m.reason }, offset: "" });
      return;
    }
    if (m.control) return; // schema
    if (!live.caughtUp) {
      live.snapshot += 1;
      return;
    }
    if (m.last) live.offset = m.offset;
    addLiveRow(m);
  }

  function addLiveRow(m) {
    const body = $("live-body");
    const tr = el("tr", { data: { op: m.op } }, [
      el("td", { text: new Date().toLocaleTimeString() }),
      el("td", {}, [el("span", { cls: "op-" + m.op, text: m.op })]),
      el("td", { cls: "mono", text: m.key ? JSON.stringify(m.key) : "" }),
      el("td", { cls: "mono", text: m.row ? JSON.stringify(m.row) : "" }),
      el("td", { cls: "mono muted", text: m.offset || "" }),
    ]);
    body.insertBefore(tr, body.firstChild);
    while (body.children.length > LIVE_KEEP) body.removeChild(body.lastChild);
  }

  // ------------------------------------------------------------------ operations (operators)
  async function pollOps() {
    clearTimeout(state.opsTimer);
    if (state.tab !== "ops" || !state.me || !state.me.operator) return;
    const [letters, resyncs] = await Promise.all([api("relay/dead-letters?limit=100"), api("relay/resyncs")]);
    renderDeadLetters(letters);
    renderResyncs(resyncs);
    state.opsTimer = setTimeout(pollOps, OPS_POLL_MS);
  }

  function renderDeadLetters(answer) {
    const body = $("dl-body");
    const error = $("dl-error");
    clear(body);
    if (!answer.ok) {
      error.textContent = errorText(answer).split("\n")[0];
      show(error, true);
      return;
    }
    show(error, false);
    const list = answer.data.dead_letters || [];
    for (const d of list) {
      body.appendChild(el("tr", { data: { deadLetter: String(d.id) } }, [
        el("td", { cls: "num", text: String(d.id) }),
        el("td", { text: clock(d.at) }),
        el("td", { text: d.agent_id || "–" }),
        el("td", { cls: "reason", text: d.reason || "", title: d.payload_preview || "" }),
        el("td", { cls: "num", text: String(d.payload_bytes === null ? "–" : d.payload_bytes) }),
        el("td", { cls: "actions" }, [
          el("button", { type: "button", cls: "retry", text: "retry", onclick: () => confirmRetry(d) }),
          el("button", { type: "button", cls: "danger-outline discard", text: "discard", onclick: () => confirmDiscard(d) }),
        ]),
      ]));
    }
    show($("dl-empty"), list.length === 0);
  }

  function renderResyncs(answer) {
    const body = $("rs-body");
    clear(body);
    if (!answer.ok) return;
    const list = answer.data.resyncs || [];
    for (const r of list) {
      body.appendChild(el("tr", {}, [
        el("td", { text: r.agent_id }), el("td", { text: r.state }), el("td", { text: clock(r.requested_at) }),
        el("td", { text: r.by || "" }), el("td", { cls: "num", text: String(r.attempts || 0) }),
        el("td", { text: [r.reason, r.last_error].filter(Boolean).join(" · ") }),
      ]));
    }
    show($("rs-empty"), list.length === 0);
  }

  let confirmResolve = null;

  function confirmAction(title, text, okLabel, withReason) {
    $("confirm-title").textContent = title;
    $("confirm-text").textContent = text;
    $("confirm-ok").textContent = okLabel;
    $("confirm-reason").value = "";
    show($("confirm-reason-label"), withReason);
    $("confirm").showModal();
    return new Promise((resolve) => {
      confirmResolve = resolve;
    });
  }

  function closeConfirm(ok) {
    const dialog = $("confirm");
    if (dialog.open) dialog.close();
    if (confirmResolve) {
      const resolve = confirmResolve;
      confirmResolve = null;
      resolve(ok ? { reason: $("confirm-reason").value.trim() } : null);
    }
  }

  function opsResult(text, bad) {
    const box = $("ops-result");
    box.textContent = text;
    box.classList.toggle("error", !!bad);
    show(box, true);
  }

  async function confirmResync(agentId) {
    const answer = await confirmAction(
      "Resync agent " + agentId + "?",
      "The HTPC asks " + agentId + " for a fresh full copy of its replicated tables and replaces its central copy " +
        "with it in one transaction (readers see the old copy until then; tables written over the HTTP relay stay). " +
        "Changes the agent had not had acknowledged are superseded by the copy. Subscribers of its change feed " +
        "start over from a snapshot (must-refetch). If the agent is offline the request waits until it reconnects.",
      "Resync " + agentId, true);
    if (!answer) return;
    const body = answer.reason ? { reason: answer.reason } : { reason: "requested from the console" };
    const result = await api("relay/agents/" + encodeURIComponent(agentId) + "/resync", { method: "POST", body: body });
    if (result.ok) {
      opsResult("Resync of " + agentId + " requested (" + result.data.state + ", request " + result.data.request_id + ").");
    } else {
      opsResult(errorText(result).split("\n")[0], true);
    }
    if (state.tab !== "agents") pollOps();
    if (state.tab === "agents") flash(result);
  }

  function flash(result) {
    const box = $("agents-notice");
    box.textContent = result.ok
      ? "Resync of " + result.data.agent_id + " requested (" + result.data.state + "); the agent's state shows its progress."
      : errorText(result).split("\n")[0];
    box.classList.toggle("error", !result.ok);
    show(box, true);
    clearTimeout(state.noticeTimer);
    state.noticeTimer = setTimeout(() => show(box, false), 15000);
  }

  async function confirmRetry(d) {
    const answer = await confirmAction(
      "Retry dead letter " + d.id + "?",
      "The record is read back from the stream (or from its stored payload) and applied again on the apply " +
        "thread. Applied or already covered: the dead letter is removed. Not its turn yet: it waits for its turn. " +
        "Still failing: it stays, with the new reason.",
      "Retry", false);
    if (!answer) return;
    const result = await api("relay/dead-letters/" + encodeURIComponent(d.id) + "/retry", { method: "POST" });
    opsResult(result.ok ? "Dead letter " + d.id + ": " + result.data.outcome + ". " + JSON.stringify(result.data)
      : errorText(result).split("\n")[0], !result.ok || result.data.outcome === "failed");
    pollOps();
  }

  async function confirmDiscard(d) {
    const answer = await confirmAction(
      "Discard dead letter " + d.id + " for good?",
      "It is deleted and cannot be retried afterwards. A change record still missing from " + (d.agent_id || "its agent") +
        "'s sequence makes the HTPC resync that agent; a relay write's rows are lost for good (the sender was " +
        "answered 202); a record already covered by the central copy, a status report or bytes that were no record: " +
        "nothing more.",
      "Discard", false);
    if (!answer) return;
    const result = await api("relay/dead-letters/" + encodeURIComponent(d.id) + "/discard", { method: "POST" });
    opsResult(result.ok ? "Dead letter " + d.id + " discarded: " + (result.data.consequence || "")
      : errorText(result).split("\n")[0], !result.ok);
    pollOps();
  }

  // ------------------------------------------------------------------ wiring
  function wire() {
    $("token-save").addEventListener("click", useToken);
    $("token").addEventListener("keydown", (e) => {
      if (e.key === "Enter") useToken();
    });
    $("sign-out").addEventListener("click", signOut);
    for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => selectTab(b.dataset.tab));
    $("tables-agent").addEventListener("change", () => loadTables($("tables-agent").value));
    $("page-prev").addEventListener("click", () => movePage(-1));
    $("page-next").addEventListener("click", () => movePage(1));
    $("page-size").addEventListener("change", firstPage);
    $("query-run").addEventListener("click", runQuery);
    $("query-sql").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
        e.preventDefault();
        runQuery();
      }
    });
    $("live-agent").addEventListener("change", fillLiveTables);
    $("live-start").addEventListener("click", startLive);
    $("live-stop").addEventListener("click", () => {
      stopLive();
      $("live-status").textContent = "stopped";
    });
    $("agents-notice").addEventListener("click", () => show($("agents-notice"), false));
    $("confirm-ok").addEventListener("click", () => closeConfirm(true));
    $("confirm-cancel").addEventListener("click", () => closeConfirm(false));
    $("confirm").addEventListener("close", () => closeConfirm(false));
  }

  wire();
  start();
})();
