"""The operator commands that talk to a running HTPC over its relay API.

`replicator status` and `replicator dead-letters` print what `/health`,
`/relay/agents` and `/relay/dead-letters` serve (the status view of
status.py); `replicator resync` and `replicator dead-letters retry|discard`
post to the operator routes and print the consequence. They work against a
remote HTPC too. Exit codes: 0 done, 1 refused by the HTPC (unknown dead
letter, not retryable, bad agent id), 2 not reached or not authorised.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import httpx

from agent_client import AGENT_ID_PATTERN, is_valid_agent_id


def _fmt_age(ts: float | None) -> str:
    if not ts:
        return "-"
    age = time.time() - ts
    return f"{age:.0f}s ago" if age < 120 else f"{age / 60:.0f}m ago"


def _client(token: str | None, timeout: float = 5.0) -> httpx.Client:
    return httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {token}"} if token else {})


def _unauthorised(command: str, url: str, needs: str, message: Any) -> int:
    """Say that the HTPC refused for want of a token (401/403): exit code 2."""
    print(f"replicator {command}: {url} needs {needs} (--token / REPLICATOR_TOKEN): {message}", file=sys.stderr)
    return 2


def _post(command: str, url: str, path: str, token: str | None, body: dict[str, Any] | None = None) -> Any:
    """POST to an operator route: the JSON answer, or an exit code after saying why on stderr."""
    try:
        with _client(token, timeout=30.0) as client:
            resp = client.post(f"{url}{path}", json=body)
            answer = resp.json()
    except (httpx.HTTPError, ValueError) as exc:
        print(f"replicator {command}: cannot reach {url}: {exc}", file=sys.stderr)
        return 2
    if resp.status_code in (401, 403):
        return _unauthorised(command, url, "an operator token", answer.get("message"))
    if resp.status_code >= 400:
        print(f"replicator {command}: {answer.get('message')} ({answer.get('error')})", file=sys.stderr)
        return 1
    return answer


def status(url: str, token: str | None = None) -> int:
    try:
        with _client(token) as client:
            health = client.get(f"{url}/health").json()
            resp = client.get(f"{url}/relay/agents")
            if resp.status_code in (401, 403):
                return _unauthorised("status", url, "a token", resp.json().get("message"))
            agents = resp.json()["agents"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        print(f"replicator status: cannot reach {url}: {exc}", file=sys.stderr)
        return 2
    print(
        f"HTPC {url}: {health['status']}; NATS {'connected' if health['nats']['connected'] else 'DISCONNECTED'}"
        f" ({health['nats']['url']}); dead letters {health['dead_letters']}"
    )
    for problem in health.get("problems", []):
        print(f"  problem: {problem}")
    header = ("AGENT", "EPOCH", "APPLIED", "LAG", "LAST SEEN", "TABLES", "DEAD", "RESYNC", "BLOCKED")
    rows = [_agent_row(a) for a in agents]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if not rows:
        print("(no agents yet)")
    return 0


def _agent_row(a: dict[str, Any]) -> tuple[str, ...]:
    tables = a["tables"].get("always", []) + [f"{t}(on_demand)" for t in a["tables"].get("on_demand", [])]
    blocked = [why for why in (a.get("blocked"), a.get("agent_blocked")) if why]
    return (
        a["agent_id"],
        (a["epoch"] or "-")[:8],
        str(a["watermark"]),
        str(a["lag_changes"]),
        _fmt_age(a["last_seen"]),
        ",".join(tables) or "-",
        str(a["dead_letters"]),
        _resync_cell(a),
        "; ".join(blocked),
    )


def _resync_cell(a: dict[str, Any]) -> str:
    """`pending (why, since)` while a resync of the agent waits, else `-`."""
    why = a.get("resync_pending")
    if not why:
        return "-"
    since = a.get("resync_requested_at")
    return f"pending ({why}, {_fmt_age(since)})" if since else f"pending ({why})"


def resync(url: str, agent_id: str, reason: str | None, token: str | None = None) -> int:
    """`replicator resync AGENT_ID`: request it and say what happens next."""
    if not is_valid_agent_id(agent_id):
        print(f"replicator resync: invalid agent id {agent_id!r}: must match {AGENT_ID_PATTERN}", file=sys.stderr)
        return 1
    answer = _post("resync", url, f"/relay/agents/{agent_id}/resync", token, {"reason": reason} if reason else None)
    if isinstance(answer, int):
        return answer
    print(
        f"resync of {agent_id} requested (request {answer.get('request_id')}, {answer.get('state')}): "
        "the agent sends a fresh full copy of its replicated tables, which replaces its central copy at once; "
        "an offline agent is served when it reconnects. Follow it with `replicator status` (RESYNC column)."
    )
    return 0


def dead_letter_action(url: str, action: str, dead_letter_id: int, token: str | None = None) -> int:
    """`replicator dead-letters retry|discard ID`: do it and print the consequence the HTPC states.

    A retry whose record fails again exits 1 (the dead letter stays, with the new reason).
    """
    answer = _post(f"dead-letters {action}", url, f"/relay/dead-letters/{dead_letter_id}/{action}", token)
    if isinstance(answer, int):
        return answer
    if action == "discard":
        print(f"dead letter #{dead_letter_id} discarded: {answer.get('consequence') or 'removed'}")
        resync = answer.get("resync")
        if resync:
            print(f"resync of {resync.get('agent_id')} requested (request {resync.get('request_id')})")
        return 0
    outcome = answer.get("outcome") or "done"
    said = answer.get("message") or answer.get("reason") or ""
    print(f"dead letter #{dead_letter_id} retried: {outcome}" + (f": {said}" if said else ""))
    return 1 if outcome == "failed" else 0


def dead_letters(url: str, agent: str | None, limit: int, token: str | None = None) -> int:
    params: dict[str, Any] = {"limit": limit}
    if agent:
        params["agent_id"] = agent
    try:
        with _client(token) as client:
            resp = client.get(f"{url}/relay/dead-letters", params=params)
            if resp.status_code in (401, 403):
                return _unauthorised("dead-letters", url, "an operator token", resp.json().get("message"))
            resp.raise_for_status()
            items = resp.json()["dead_letters"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        print(f"replicator dead-letters: cannot read from {url}: {exc}", file=sys.stderr)
        return 2
    for d in items:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d["at"]))
        print(f"#{d['id']} {when} agent={d['agent_id']} stream_seq={d['stream_seq']}: {d['reason']}")
    if not items:
        print("(no dead letters)")
    return 0
