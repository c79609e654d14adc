"""The console (`GET /`) in a real headless Chromium, against a real `replicator serve` and real agents.

Chromium and chromedriver are Debian's (`apt-get install chromium chromium-driver`), driven by selenium
through that chromedriver (selenium-manager never asked). The page is used as a person would: it must show
the agent and follow its writes without a reload, browse a table, answer a query (and show an error
plainly), follow a table's change feed live, show a blocked agent as blocked and heal it with a resync
confirmed in the page; with authentication on it asks for a token, offers the operator actions only to an
operator, keeps the token in sessionStorage only (never localStorage, gone after sign-out), and no request URL
ever carries the token (Chromium's performance log). Each test opens the page itself and makes the agents it
looks for. The agents run on this test's event loop, so every blocking selenium wait runs in a thread (`until`).

The screenshot test writes its picture to tmp_path, or to the path in the environment variable
CONSOLE_SCREENSHOT (`CONSOLE_SCREENSHOT=docs/console.png` refreshes the README's).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast

import httpx
import pytest
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver import Chrome as WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from agent_client import AgentStorage, Migration
from replicator.data_dir import DataDir
from tests.support.browser import find_chromium, network_requests, save_screenshot, start_chromium
from tests.support.credentials import make_credentials
from tests.support.htpc import HtpcProcess, agent_session, apoll, settle_agent
from tests.support.nats_server import NatsServer

T = TypeVar("T")

TOKEN_KEY = "replicator-console-token"  # console.js keeps the token under this sessionStorage key

REQUISITIONS = Migration(
    1, "CREATE TABLE requisitions (id INTEGER PRIMARY KEY, title TEXT NOT NULL, team TEXT, status TEXT, salary REAL)"
)
NOTES = Migration(1, "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
INTERVIEWS = Migration(
    1,
    "CREATE TABLE interviews (id INTEGER PRIMARY KEY, candidate TEXT, stage TEXT);\n"
    "CREATE TABLE feedback (id INTEGER PRIMARY KEY, interview_id INTEGER, score INTEGER)",
)
TITLES = ["Backend engineer", "Data analyst", "SRE", "Product designer", "QA lead", "Recruiter", "ML engineer"]
TEAMS = ["platform", "growth", "infra", "design", "quality", "people", "research"]


def requisition(i: int, status: str = "open") -> dict[str, Any]:
    return {
        "id": i,
        "title": f"{TITLES[i % len(TITLES)]} #{i}",
        "team": TEAMS[i % len(TEAMS)],
        "status": status,
        "salary": 60000 + 2500 * i,
    }


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    if find_chromium() is None:
        pytest.skip("no Chromium/chromedriver found (apt-get install chromium chromium-driver)")
    with start_chromium() as driver:
        yield driver


@pytest.fixture(scope="module")
def console_htpc(module_nats: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HtpcProcess]:
    """Authentication off; a 1 MiB quota per agent so that one agent can be blocked on purpose."""
    proc = HtpcProcess(
        tmp_path_factory.mktemp("console-htpc") / "htpc",
        module_nats.url,
        extra_args=["--max-agent-bytes", str(1024 * 1024), "--resync-after", "1s"],
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.close()


# ---------------------------------------------------------------------------------------------- helpers
async def until(driver: WebDriver, condition: Callable[[WebDriver], T | None], what: str, timeout: float = 20.0) -> T:
    """WebDriverWait in a thread (the agents run on this event loop), bounded by `timeout`."""
    wait: WebDriverWait[WebDriver] = WebDriverWait(
        driver,
        timeout,
        poll_frequency=0.1,
        ignored_exceptions=(NoSuchElementException, StaleElementReferenceException),  # the page re-renders
    )

    def wait_for() -> T:
        return cast(T, wait.until(condition, f"timed out waiting for {what}"))

    return await asyncio.to_thread(wait_for)


def agent_row(driver: WebDriver, agent_id: str) -> WebElement | None:
    for row in driver.find_elements(By.CSS_SELECTOR, "#agents-body tr"):
        if row.get_attribute("data-agent") == agent_id:
            return row
    return None


def row_cells(driver: WebDriver, agent_id: str) -> dict[str, str] | None:
    """The agent's row as shown: state, applied seq, lag (None while it is not shown)."""
    row = agent_row(driver, agent_id)
    if row is None:
        return None
    return {
        "state": row.get_attribute("data-state") or "",
        "applied": row.find_element(By.CSS_SELECTOR, "td.applied").text,
        "lag": row.find_element(By.CSS_SELECTOR, "td.lag").text,
    }


def shows(driver: WebDriver, agent_id: str, **expected: str) -> Callable[[WebDriver], bool]:
    def check(_d: WebDriver) -> bool:
        cells = row_cells(driver, agent_id)
        return cells is not None and all(cells[k] == v for k, v in expected.items())

    return check


def displayed(element_id: str) -> Callable[[WebDriver], WebElement | None]:
    def check(d: WebDriver) -> WebElement | None:
        found = d.find_element(By.ID, element_id)
        return found if found.is_displayed() else None

    return check


def table_texts(driver: WebDriver, selector: str) -> list[list[str]]:
    return [
        [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
        for tr in driver.find_elements(By.CSS_SELECTOR, f"{selector} tbody tr")
    ]


def policy_violations(driver: WebDriver) -> list[str]:
    """What the browser's console said about the Content-Security-Policy or Trusted Types since the last call."""
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    words = ("Content Security Policy", "Content-Security-Policy", "Trusted Type", "TrustedHTML", "TrustedScript")
    return [str(e.get("message")) for e in entries if any(w in str(e.get("message")) for w in words)]


def charts_full(driver: WebDriver) -> bool:
    """Every agent's lag chart starts at its left edge (it spreads what the page saw over at least 5 s)."""
    lines = driver.find_elements(By.CSS_SELECTOR, "#agents-body .chart polyline")
    starts = [(line.get_attribute("points") or "").split(",", 1)[0] for line in lines]
    return bool(starts) and all(x and float(x) < 2.0 for x in starts)


def tab(driver: WebDriver, name: str) -> None:
    driver.find_element(By.CSS_SELECTOR, f'#tabs button[data-tab="{name}"]').click()


def run_query(driver: WebDriver, sql: str) -> None:
    tab(driver, "query")
    box = driver.find_element(By.ID, "query-sql")
    box.clear()
    box.send_keys(sql)
    driver.find_element(By.ID, "query-run").click()


async def write_and_settle(client: httpx.AsyncClient, storage: AgentStorage, rows: list[dict[str, Any]]) -> int:
    await storage.batch_write([{"table": "requisitions", "data": r} for r in rows])
    return await settle_agent(client, storage)


# ---------------------------------------------------------------------------------------------- tests
def test_the_page_and_its_assets_carry_security_headers_and_no_data(console_htpc: HtpcProcess) -> None:
    for path, kind in (("/", "text/html"), ("/console/console.js", "javascript"), ("/console/console.css", "css")):
        resp = console_htpc.get(path)
        assert resp.status_code == 200 and kind in resp.headers["content-type"], (path, resp.headers)
        csp = resp.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp
        assert "require-trusted-types-for 'script'" in csp and "trusted-types 'none'" in csp
        assert resp.headers["x-content-type-options"] == "nosniff"
        assert resp.headers["x-frame-options"] == "DENY"
    page = console_htpc.get("/").text
    assert "<script>" not in page and " style=" not in page and "on" + "click=" not in page  # nothing inline
    # relative URLs only: the console works behind a reverse proxy's path prefix
    assert 'src="console/console.js"' in page and 'href="console/console.css"' in page
    assert not re.search(r'(src|href)="/', page), page
    script = console_htpc.get("/console/console.js").text
    assert '"/relay' not in script and '"/health' not in script and 'api("relay/agents")' in script


async def test_agents_lag_tables_query_and_live_feed(
    console_htpc: HtpcProcess, browser: WebDriver, tmp_path: Path
) -> None:
    driver = browser
    async with (
        httpx.AsyncClient(base_url=console_htpc.url, timeout=10) as client,
        agent_session(
            "recruiter-1",
            tmp_path / "r1",
            htpc_url=console_htpc.url,
            migrations=[REQUISITIONS],
            visibility={"requisitions": "always"},
        ) as storage,
        agent_session(
            "sourcer-2", tmp_path / "s2", htpc_url=console_htpc.url, migrations=[NOTES], visibility={"notes": "always"}
        ) as other,
    ):
        seq = await write_and_settle(client, storage, [requisition(i) for i in range(1, 31)])
        await other.write_data("notes", {"id": 1, "body": "call back on Monday"})
        await settle_agent(client, other)

        driver.get(console_htpc.url + "/")
        await until(driver, shows(driver, "recruiter-1", state="ok", applied=str(seq), lag="0"), "the agent, caught up")
        await until(driver, shows(driver, "sourcer-2", state="ok", lag="0"), "the second agent")

        # A write: the page follows it without a reload (applied seq moves, lag back to 0).
        await storage.write_data("requisitions", requisition(31))
        seq = await settle_agent(client, storage)
        await until(driver, shows(driver, "recruiter-1", state="ok", applied=str(seq), lag="0"), "the new seq, lag 0")

        # Tables: schema and rows, page by page.
        agent_row(driver, "recruiter-1").find_element(By.XPATH, ".//button[text()='browse']").click()  # type: ignore[union-attr]
        await until(driver, lambda d: len(table_texts(d, "#rows-table")) == 31, "the first page of rows")
        schema = table_texts(driver, "table.schema")
        assert [c[0] for c in schema] == ["id", "title", "team", "status", "salary"]
        assert schema[0][2] == "primary key"
        assert table_texts(driver, "#rows-table")[0][:2] == ["1", "Data analyst #1"]
        Select(driver.find_element(By.ID, "page-size")).select_by_visible_text("25")
        await until(driver, lambda d: len(table_texts(d, "#rows-table")) == 25, "a page of 25")
        # A row written ahead of the page does not shift the next one (keyset paging on the primary key).
        await storage.write_data("requisitions", requisition(0))
        await settle_agent(client, storage)
        driver.find_element(By.ID, "page-next").click()
        await until(
            driver,
            lambda d: [r[0] for r in table_texts(d, "#rows-table")] == [str(i) for i in range(26, 32)],
            "the second page",
        )
        assert driver.find_element(By.ID, "page-info").text == "rows 26–31"
        driver.find_element(By.ID, "page-prev").click()
        await until(
            driver,
            lambda d: [r[0] for r in table_texts(d, "#rows-table")] == [str(i) for i in range(25)],
            "the first page again, from the start",
        )
        assert not driver.find_element(By.ID, "page-prev").is_enabled()

        # Query: the new row, a "*" query across agents, and an error shown plainly.
        run_query(driver, "SELECT id, title FROM requisitions WHERE id = 31")
        await until(driver, lambda d: table_texts(d, "#query-table") == [["31", requisition(31)["title"]]], "the row")
        run_query(driver, 'SELECT agent_id, count(*) AS n FROM "*".requisitions GROUP BY agent_id')
        await until(driver, lambda d: table_texts(d, "#query-table") == [["recruiter-1", "32"]], "the * query")
        run_query(driver, "DELETE FROM requisitions")
        error = await until(driver, displayed("query-error"), "the error")
        assert error.text.startswith("HTTP 4") and '"error"' in error.text, error.text

        # Live: the change feed of the table, a new change shown as it happens.
        tab(driver, "live")
        Select(driver.find_element(By.ID, "live-agent")).select_by_value("recruiter-1")
        await until(driver, lambda d: "requisitions" in d.find_element(By.ID, "live-table").text, "the table list")
        Select(driver.find_element(By.ID, "live-table")).select_by_value("requisitions")
        driver.find_element(By.ID, "live-start").click()
        await until(driver, lambda d: "snapshot had 32 rows" in d.find_element(By.ID, "live-status").text, "caught up")
        await storage.write_data("requisitions", requisition(32))
        await storage.write_data("requisitions", {**requisition(5), "status": "filled"})
        await until(
            driver,
            lambda d: [r[1] for r in table_texts(d, "table.live")] == ["update", "insert"],
            "two live changes",
        )
        assert json.loads(table_texts(driver, "table.live")[1][3]) == requisition(32)
        driver.find_element(By.ID, "live-stop").click()
        tab(driver, "agents")
        assert policy_violations(driver) == []


def resync_requests(htpc: HtpcProcess, agent_id: str) -> list[tuple[str, str, str, str]]:
    """(request id, reason, by, state) of every resync of the agent, oldest first, from the HTPC's own
    recovery database (read-only)."""
    path = DataDir(htpc.data_dir).recovery_db
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute(
            "SELECT request_id, reason, by, state FROM resync_requests WHERE agent_id = ? ORDER BY id", (agent_id,)
        ).fetchall()
    finally:
        conn.close()
    return [(str(a), str(b), str(c), str(d)) for a, b, c, d in rows]


async def test_a_blocked_agent_is_shown_and_a_resync_from_the_page_heals_it(
    console_htpc: HtpcProcess, browser: WebDriver, tmp_path: Path
) -> None:
    """Over its 1 MiB quota the agent's automatic resyncs fail (3 attempts) and it is blocked; once it keeps
    less, the operator's resync (confirmed in the page) heals it: the request the page made is the one that
    finished (the HTPC's recovery database says so)."""
    driver = browser
    async with (
        httpx.AsyncClient(base_url=console_htpc.url, timeout=10) as client,
        agent_session(
            "huge-agent",
            tmp_path / "huge",
            htpc_url=console_htpc.url,
            migrations=[NOTES],
            visibility={"notes": "always"},
        ) as storage,
    ):
        for i in range(30):
            await storage.write_data("notes", {"id": i, "body": f"note {i} " + "x" * 50_000})

        async def blocked() -> dict[str, Any] | None:
            resp = await client.get("/relay/agents/huge-agent")
            state: dict[str, Any] | None = resp.json() if resp.status_code == 200 else None
            return state if state and "resync failed" in (state["blocked"] or "") else None

        assert (await apoll(blocked, 30, "huge-agent blocked"))["state"] == "blocked"
        automatic = resync_requests(console_htpc, "huge-agent")
        assert automatic and all(r[3] == "failed" for r in automatic), automatic
        driver.get(console_htpc.url + "/")
        await until(driver, shows(driver, "huge-agent", state="blocked"), "the agent shown as blocked")
        note = agent_row(driver, "huge-agent").find_element(By.CSS_SELECTOR, ".note").text  # type: ignore[union-attr]
        assert "resync failed" in note

        async with storage.transaction() as tx:  # the fix: the agent keeps less
            await tx.execute("DELETE FROM notes WHERE id >= 8")
        agent_row(driver, "huge-agent").find_element(By.CSS_SELECTOR, "button.resync").click()  # type: ignore[union-attr]
        dialog = await until(driver, displayed("confirm"), "the confirmation")
        assert "fresh full copy" in dialog.text and "replaces its central copy" in dialog.text
        driver.find_element(By.ID, "confirm-ok").click()

        def page_request(d: WebDriver) -> re.Match[str] | None:
            return re.search(
                r"request ([0-9a-f]{32})", d.find_element(By.ID, "ops-result").get_attribute("textContent") or ""
            )

        request_id = (await until(driver, page_request, "the request the page made")).group(1)
        await storage.flush(timeout=15)
        seq = await storage.last_committed_seq()
        await until(driver, shows(driver, "huge-agent", state="ok", lag="0"), "the agent healed", timeout=30)
        state = (await client.get("/relay/agents/huge-agent")).json()
        assert state["blocked"] is None and state["resyncs"] >= 1 and state["watermark"] >= seq
        assert state["state"] == "ok"
        count = {"agent_id": "huge-agent", "query": "SELECT count(*) FROM notes"}
        assert (await client.post("/relay/query", json=count)).json()["rows"] == [[8]]

        # The page's request healed it: the one resync that finished is the one asked from the console.
        async def finished() -> list[tuple[str, str, str, str]] | None:
            return [r for r in resync_requests(console_htpc, "huge-agent") if r[3] == "finished"] or None

        assert await apoll(finished, 15, "the resync finished") == [
            (request_id, "requested from the console", "operator", "finished")
        ]

        # The operations tab lists the dead letters the failed resyncs left, with retry and discard.
        tab(driver, "ops")
        await until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#dl-body button.retry"), "dead letters")
        assert driver.find_elements(By.CSS_SELECTOR, "#dl-body button.discard")
        tab(driver, "agents")
        await until(driver, shows(driver, "huge-agent", state="ok"), "still ok")


async def test_a_screenshot_of_the_agents_view(console_htpc: HtpcProcess, browser: WebDriver, tmp_path: Path) -> None:
    """The agents view with the agents caught up: the picture in the README (see the module docstring)."""
    driver = browser
    target = Path(os.environ.get("CONSOLE_SCREENSHOT") or tmp_path / "console.png")
    async with (
        httpx.AsyncClient(base_url=console_htpc.url, timeout=10) as client,
        agent_session(
            "interviewer-3",
            tmp_path / "i3",
            htpc_url=console_htpc.url,
            migrations=[INTERVIEWS],
            visibility={"interviews": "always", "feedback": "on_demand"},
        ) as interviewer,
    ):
        driver.get(console_htpc.url + "/")
        for i in range(1, 13):
            await interviewer.write_data("interviews", {"id": i, "candidate": f"Candidate {i}", "stage": "onsite"})
            await interviewer.write_data("feedback", {"id": i, "interview_id": i, "score": 1 + i % 4})
        seq = await settle_agent(client, interviewer)
        await until(driver, shows(driver, "interviewer-3", state="ok", applied=str(seq), lag="0"), "the agent")
        await until(driver, lambda d: d.find_element(By.ID, "health").get_attribute("data-state") == "ok", "health")
        await until(driver, charts_full, "the lag charts drawn across their width (the page open for 5 s)")
        height = int(
            driver.execute_script(
                "return document.getElementById('main').getBoundingClientRect().bottom"
                " + window.outerHeight - window.innerHeight"
            )
        )
        size = driver.get_window_size()
        driver.set_window_size(1280, max(360, height + 24))
        try:
            save_screenshot(driver, target)
        finally:
            driver.set_window_size(size["width"], size["height"])
    assert target.read_bytes().startswith(b"\x89PNG") and target.stat().st_size > 10_000


async def test_docs_render_with_no_network(console_htpc: HtpcProcess, browser: WebDriver) -> None:
    driver = browser
    network_requests(driver)  # forget earlier requests
    driver.get(console_htpc.url + "/docs")
    await until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock"), "Swagger UI")
    urls = [r["url"] for r in network_requests(driver) if r["url"]]
    assert urls and all(u.startswith(console_htpc.url) or u.startswith("data:") for u in urls), urls


# ---------------------------------------------------------------------------------------------- auth on
@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HtpcProcess, dict[str, str]]]:
    """`--auth on` (embedded NATS) with agent `agent-a` and operator `ops`; agent-a has a relay table."""
    data = tmp_path_factory.mktemp("console-secured") / "htpc"
    tokens, _seeds = make_credentials(data, ["agent-a"])
    proc = HtpcProcess(data, None, extra_args=["--auth", "on"])
    proc.start()
    try:
        write = {"agent_id": "agent-a", "table": "notes", "data": {"id": 1, "body": "first note"}}
        resp = proc.post("/relay/immediate", json=write, headers={"Authorization": f"Bearer {tokens['agent-a']}"})
        assert resp.status_code == 202, resp.text
        yield proc, tokens
    finally:
        proc.close()


def test_whoami_and_the_tables_endpoint_with_auth_on(secured: tuple[HtpcProcess, dict[str, str]]) -> None:
    """The two endpoints the console added: who a token is, and an agent's tables with their columns."""
    htpc, tokens = secured

    def get(path: str, token: str | None) -> httpx.Response:
        return htpc.get(path, headers={"Authorization": f"Bearer {token}"} if token else {})

    assert get("/relay/whoami", None).status_code == 401
    assert get("/relay/whoami", "wrong-token").json()["error"] == "unauthorized"
    assert get("/relay/whoami", tokens["agent-a"]).json() == {
        "auth": True,
        "kind": "agent",
        "name": "agent-a",
        "operator": False,
    }
    assert get("/relay/whoami", tokens["ops"]).json()["operator"] is True
    assert get("/relay/agents/agent-a/tables", None).status_code == 401
    for who in ("agent-a", "ops"):
        tables = get("/relay/agents/agent-a/tables", tokens[who]).json()["tables"]
        notes = next(t for t in tables if t["name"] == "notes")
        assert notes["visibility"] == "always" and notes["source"] == "relay" and notes["pk"] == ["id"]
        assert [c["name"] for c in notes["columns"]] == ["id", "body"]
    assert get("/relay/agents/nobody/tables", tokens["ops"]).json()["error"] == "unknown_agent"
    assert get("/relay/agents/bad%20id/tables", tokens["ops"]).status_code == 400


def stored(driver: WebDriver) -> tuple[str | None, int]:
    """(the token in this tab's sessionStorage, how many localStorage entries the page has)."""
    found = driver.execute_script("return [sessionStorage.getItem(arguments[0]), localStorage.length]", TOKEN_KEY)
    return found[0], int(found[1])


def sign_in(driver: WebDriver, token: str) -> None:
    box = driver.find_element(By.ID, "token")
    box.clear()
    box.send_keys(token)
    driver.find_element(By.ID, "token-save").click()


async def test_with_auth_the_page_asks_for_a_token_and_offers_operator_actions_only_to_operators(
    secured: tuple[HtpcProcess, dict[str, str]], browser: WebDriver
) -> None:
    htpc, tokens = secured
    driver = browser
    agent_token, ops_token, wrong = tokens["agent-a"], tokens["ops"], "not-a-token-" + "x" * 30
    driver.get(htpc.url + "/")
    network_requests(driver)  # from here on
    await until(driver, lambda d: d.find_element(By.ID, "login").is_displayed(), "the token form")
    assert not driver.find_element(By.ID, "main").is_displayed()

    # An agent's token: its data, no operator action anywhere.
    sign_in(driver, agent_token)
    await until(driver, lambda d: d.find_element(By.ID, "who").text == "agent agent-a", "signed in as agent-a")
    await until(driver, shows(driver, "agent-a", lag="0"), "agent-a's row")
    assert not driver.find_element(By.ID, "tab-ops").is_displayed()
    assert driver.find_elements(By.CSS_SELECTOR, "button.resync") == []
    run_query(driver, "SELECT id, body FROM notes")
    await until(driver, lambda d: table_texts(d, "#query-table") == [["1", "first note"]], "the agent's query")
    assert not driver.find_element(By.ID, "query-agent").is_enabled()  # an agent token asks as its own agent

    # The live feed read with the token in a header (fetch), a relay write seen as it happens.
    tab(driver, "live")
    await until(driver, lambda d: "notes" in d.find_element(By.ID, "live-table").text, "the table list")
    driver.find_element(By.ID, "live-start").click()
    await until(driver, lambda d: "snapshot had 1 row" in d.find_element(By.ID, "live-status").text, "caught up")
    write = {"agent_id": "agent-a", "table": "notes", "data": {"id": 2, "body": "second note"}}
    async with httpx.AsyncClient(base_url=htpc.url, timeout=10) as client:
        resp = await client.post("/relay/immediate", json=write, headers={"Authorization": f"Bearer {agent_token}"})
        assert resp.status_code == 202, resp.text
    await until(driver, lambda d: [r[1] for r in table_texts(d, "table.live")] == ["insert"], "the live change")
    assert json.loads(table_texts(driver, "table.live")[0][3]) == {"id": 2, "body": "second note"}
    driver.find_element(By.ID, "live-stop").click()

    # Kept for the session (sessionStorage, never localStorage): a reload stays signed in.
    assert stored(driver) == (agent_token, 0)
    driver.refresh()
    await until(driver, lambda d: d.find_element(By.ID, "who").text == "agent agent-a", "still signed in")
    await until(driver, shows(driver, "agent-a", lag="0"), "agent-a's row again")

    # Signing out forgets the token and everything read with it (the page starts over).
    driver.find_element(By.ID, "sign-out").click()
    await until(driver, lambda d: d.find_element(By.ID, "login").is_displayed(), "the token form again")
    assert stored(driver) == (None, 0)
    assert driver.find_elements(By.CSS_SELECTOR, "#agents-body tr") == []
    assert driver.find_element(By.ID, "who").text == "not signed in"

    # A wrong token is refused plainly; an operator's token offers the operator actions.
    sign_in(driver, wrong)
    await until(driver, lambda d: "refused" in d.find_element(By.ID, "login-error").text, "the refusal")
    sign_in(driver, ops_token)
    await until(driver, lambda d: d.find_element(By.ID, "who").text == "operator ops", "signed in as ops")
    await until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#agents-body button.resync"), "a resync button")
    assert driver.find_element(By.ID, "tab-ops").is_displayed()
    assert stored(driver) == (ops_token, 0)
    tab(driver, "query")
    await until(driver, lambda d: "agent-a" in d.find_element(By.ID, "query-agent").text, "the agents to ask as")
    assert driver.find_element(By.ID, "query-agent").is_enabled()  # an operator asks as any agent
    tab(driver, "ops")
    await until(driver, lambda d: d.find_element(By.ID, "dl-empty").is_displayed(), "the (empty) dead letters")
    assert not driver.find_element(By.ID, "dl-error").is_displayed()

    sent = network_requests(driver)
    urls = [r["url"] for r in sent if r["url"]]
    assert any("/relay/changes" in u for u in urls) and any("/relay/query" in u for u in urls), urls
    for secret in (agent_token, ops_token, wrong):
        assert not [u for u in urls if secret in u], "a token in a request URL"
    bearers = {str(v) for r in sent for k, v in r["headers"].items() if k.lower() == "authorization"}
    assert f"Bearer {agent_token}" in bearers and f"Bearer {ops_token}" in bearers, "the log sees the headers"
    driver.find_element(By.ID, "sign-out").click()
    await until(driver, lambda d: d.find_element(By.ID, "login").is_displayed(), "signed out")
    assert stored(driver) == (None, 0)
    assert policy_violations(driver) == []
