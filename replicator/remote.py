"""`replicator status` and `replicator dead-letters`: a running HTPC's status, read over its relay API.

They print what `/health`, `/relay/agents` and `/relay/dead-letters` serve
(the status view of status.py), so they work against a remote HTPC too.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import httpx


def _fmt_age(ts: float | None) -> str:
    if not ts:
        return "-"
    age = time.time() - ts
    return f"{age:.0f}s ago" if age < 120 else f"{age / 60:.0f}m ago"


def _client(token: str | None) -> httpx.Client:
    return httpx.Client(timeout=5.0, headers={"Authorization": f"Bearer {token}"} if token else {})


def status(url: str, token: str | None = None) -> int:
    try:
        with _client(token) as client:
            health = client.get(f"{url}/health").json()
            resp = client.get(f"{url}/relay/agents")
            if resp.status_code in (401, 403):
                print(
                    f"replicator status: {url} needs a token (--token / REPLICATOR_TOKEN): "
                    f"{resp.json().get('message')}",
                    file=sys.stderr,
                )
                return 2
            agents = resp.json()["agents"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        print(f"replicator status: cannot reach {url}: {exc}", file=sys.stderr)
        return 2
    print(
        f"HTPC {url}: {health['status']}; NATS {'connected' if health['nats']['connected'] else 'DISCONNECTED'}"
        f" ({health['nats']['url']}); dead letters {health['dead_letters']}"
    )
    header = ("AGENT", "EPOCH", "APPLIED", "LAG", "LAST SEEN", "TABLES", "DEAD", "BLOCKED")
    rows = [_agent_row(a) for a in agents]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if not rows:
        print("(no agents yet)")
    return 0


def _agent_row(a: dict[str, Any]) -> tuple[str, ...]:
    tables = a["tables"].get("always", []) + [f"{t}(on_demand)" for t in a["tables"].get("on_demand", [])]
    return (
        a["agent_id"],
        (a["epoch"] or "-")[:8],
        str(a["watermark"]),
        str(a["lag_changes"]),
        _fmt_age(a["last_seen"]),
        ",".join(tables) or "-",
        str(a["dead_letters"]),
        a["blocked"] or "",
    )


def dead_letters(url: str, agent: str | None, limit: int, token: str | None = None) -> int:
    params: dict[str, Any] = {"limit": limit}
    if agent:
        params["agent_id"] = agent
    try:
        with _client(token) as client:
            resp = client.get(f"{url}/relay/dead-letters", params=params)
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
