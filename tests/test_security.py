"""Security of the HTPC with authentication on: tokens, scopes, per-agent NATS keys end to end, and fuzzing.

`replicator serve --auth on` runs as a real process with its embedded
nats-server secured by the generated nkey config; agents replicate with their
own seed files and query with their own tokens.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_client import AgentStorage, Migration, RecordDecodeError, decode_record
from tests.support.credentials import make_credentials
from tests.support.htpc import HtpcProcess, poll, run_cli

SCHEMA = [
    Migration(
        1,
        "CREATE TABLE jobs (id TEXT PRIMARY KEY, title TEXT, secret_rank INTEGER);"
        "CREATE TABLE interviews (id TEXT PRIMARY KEY, notes TEXT)",
    )
]


class Secured:
    def __init__(self, htpc: HtpcProcess, tokens: dict[str, str], seeds: dict[str, Path]) -> None:
        self.htpc, self.tokens, self.seeds = htpc, tokens, seeds

    def client(self, who: str | None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        return httpx.Client(base_url=self.htpc.url, headers=headers, timeout=10)

    def aclient(self, who: str) -> httpx.AsyncClient:
        """For async tests: the agents answering on_demand queries live on the test's own event loop."""
        headers = {"Authorization": f"Bearer {self.tokens[who]}"}
        return httpx.AsyncClient(base_url=self.htpc.url, headers=headers, timeout=10)


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    base = tmp_path_factory.mktemp("secured")
    data = base / "htpc"
    tokens, seeds = make_credentials(data, ("agent-a", "agent-b", "agent-c"))
    assert run_cli("auth", "--data-dir", str(data), "share", "agent-a", "--with", "agent-c").returncode == 0
    htpc = HtpcProcess(data, None, extra_args=["--auth", "on"])
    htpc.start()
    try:
        yield Secured(htpc, tokens, seeds)
    finally:
        htpc.close()


def _nats_url(secured: Secured) -> str:
    return str(secured.htpc.get("/relay/info").json()["nats_url"])


def test_tokens_are_stored_hashed(secured: Secured) -> None:
    text = (secured.htpc.data_dir / "auth" / "auth.json").read_text()
    for token in secured.tokens.values():
        assert token not in text
    assert (secured.htpc.data_dir / "auth" / "auth.json").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("header", [None, "Bearer", "Bearer nope", "Basic abc", "bearer " + "x" * 43])
def test_missing_or_wrong_token_gets_401(secured: Secured, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    with httpx.Client(base_url=secured.htpc.url, headers=headers, timeout=10) as c:
        for method, path, body in (
            ("POST", "/relay/query", {"agent_id": "agent-a", "query": "SELECT 1"}),
            ("POST", "/relay/immediate", {"agent_id": "agent-a", "table": "t", "data": {"id": 1}}),
            ("GET", "/relay/agents", None),
            ("GET", "/metrics", None),
        ):
            resp = c.request(method, path, json=body)
            assert resp.status_code == 401, (path, resp.text)
            assert resp.json()["error"] == "unauthorized"
        for path in ("/health", "/ready", "/relay/info", "/docs", "/openapi.json"):  # liveness and discovery stay open
            assert c.get(path).status_code == 200, path


def test_token_outside_its_scope_gets_403(secured: Secured) -> None:
    with secured.client("agent-a") as a:
        resp = a.post("/relay/immediate", json={"agent_id": "agent-b", "table": "t", "data": {"id": 1}})
        assert resp.status_code == 403 and resp.json()["error"] == "forbidden"
        resp = a.post("/relay/query", json={"agent_id": "agent-b", "query": "SELECT 1"})
        assert resp.status_code == 403
        resp = a.post("/relay/batch", json={"records": [{"agent_id": "agent-b", "table": "t", "data": {"id": 1}}]})
        assert resp.status_code == 403
        assert a.get("/relay/dead-letters").status_code == 403
        assert a.get("/metrics").status_code == 403
        assert a.get("/relay/agents").status_code == 200
    with secured.client("ops") as ops:
        assert ops.get("/relay/dead-letters").status_code == 200
        assert ops.get("/metrics").status_code == 200
    assert "agent-b" not in {a["agent_id"] for a in secured.htpc.agents_with(secured.tokens["ops"])}


def test_guide_batch_without_agent_id_uses_the_token(secured: Secured) -> None:
    with secured.client("agent-b") as b:
        resp = b.post("/relay/batch", json={"records": [{"table": "notes", "data": {"id": "n1", "text": "hi"}}]})
        assert resp.status_code == 202, resp.text
        assert resp.json()["published"][0]["agent_id"] == "agent-b"
        rows = poll(
            lambda: (
                b.post("/relay/query", json={"agent_id": "agent-b", "query": "SELECT id, text FROM notes"})
                .json()
                .get("rows")
            ),
            15,
            "relay batch applied",
        )
        assert rows == [["n1", "hi"]]


async def test_agents_replicate_and_query_with_their_own_credentials(secured: Secured, tmp_path: Path) -> None:
    url = _nats_url(secured)
    async with AgentStorage(
        "agent-a",
        tmp_path / "a",
        htpc_url=secured.htpc.url,
        nats_seed_file=secured.seeds["agent-a"],
        htpc_token=secured.tokens["agent-a"],
    ) as a:
        assert a.nats_url is None  # learned from /relay/info, like any agent
        await a.migrate(SCHEMA)
        await a.set_visibility("jobs", "always")
        await a.set_visibility("interviews", "on_demand")
        await a.write_data("jobs", {"id": "j1", "title": "storage engineer", "secret_rank": 3})
        await a.write_data("interviews", {"id": "i1", "notes": "strong"})
        mine = await a.query_network("SELECT id, title FROM jobs")
        assert mine["rows"] == [["j1", "storage engineer"]]
        # B may read A's `always` tables, not A's on_demand ones; C was granted them.
        async with secured.aclient("agent-b") as b:
            resp = await b.post(
                "/relay/query", json={"agent_id": "agent-b", "query": 'SELECT title FROM "agent-a".jobs'}
            )
            assert resp.status_code == 200 and resp.json()["rows"] == [["storage engineer"]], resp.text
            resp = await b.post(
                "/relay/query", json={"agent_id": "agent-b", "query": 'SELECT notes FROM "agent-a".interviews'}
            )
            assert resp.status_code == 403, resp.text
        async with secured.aclient("agent-c") as c:
            resp = await c.post(
                "/relay/query", json={"agent_id": "agent-c", "query": 'SELECT notes FROM "agent-a".interviews'}
            )
            assert resp.status_code == 200 and resp.json()["rows"] == [["strong"]], resp.text
    assert url.startswith("nats://")


async def test_agent_with_another_agents_key_publishes_nothing(secured: Secured, tmp_path: Path) -> None:
    async with AgentStorage(
        "agent-a", tmp_path / "spoof", nats_url=_nats_url(secured), nats_seed_file=secured.seeds["agent-b"]
    ) as spoof:
        await spoof.migrate(SCHEMA)
        await spoof.set_visibility("jobs", "always")
        await spoof.write_data("jobs", {"id": "evil", "title": "spoofed", "secret_rank": 0})
        with pytest.raises(Exception, match=r"(?i)acknowledged"):
            await spoof.flush(timeout=3)
    with secured.client("ops") as ops:
        resp = ops.post(
            "/relay/query", json={"agent_id": "agent-a", "query": "SELECT count(*) FROM jobs WHERE id = 'evil'"}
        )
        assert resp.status_code in (200, 400)
        if resp.status_code == 200:
            assert resp.json()["rows"] == [[0]]


def test_injection_through_names_and_params_changes_nothing(secured: Secured) -> None:
    with secured.client("agent-c") as c:
        assert (
            c.post(
                "/relay/immediate", json={"agent_id": "agent-c", "table": "safe", "data": {"id": "s1", "v": "ok"}}
            ).status_code
            == 202
        )
        poll(
            lambda: (
                c.post("/relay/query", json={"agent_id": "agent-c", "query": "SELECT v FROM safe"}).json().get("rows")
            ),
            15,
            "safe row applied",
        )
        for table, data in (
            ('safe"; DROP TABLE safe; --', {"id": "x"}),
            ("safe", {'v" TEXT); DROP TABLE safe; --': 1}),
            ("sqlite_master", {"id": 1}),
            ("_cr_state", {"key": "watermark", "value": 0}),
        ):
            resp = c.post("/relay/immediate", json={"agent_id": "agent-c", "table": table, "data": data})
            assert 400 <= resp.status_code < 500, resp.text
        for params in (["'; DROP TABLE safe; --"], {"x": "1 OR 1=1"}, ["s1' OR '1'='1"]):
            q = "SELECT v FROM safe WHERE id = ?" if isinstance(params, list) else "SELECT v FROM safe WHERE id = :x"
            resp = c.post("/relay/query", json={"agent_id": "agent-c", "query": q, "params": params})
            assert resp.status_code == 200 and resp.json()["rows"] == [], resp.text
        resp = c.post("/relay/query", json={"agent_id": "agent-c", "query": "SELECT id, v FROM safe"})
        assert resp.json()["rows"] == [["s1", "ok"]]


def _json_of(integers: st.SearchStrategy[int]) -> st.SearchStrategy[Any]:
    scalars = (
        st.none() | st.booleans() | integers | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )


_json = _json_of(st.integers())  # for HTTP bodies: any JSON, huge integers included
_json64 = _json_of(st.integers(min_value=-(2**63), max_value=2**64 - 1))  # what orjson can encode


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=200),
        _json64.map(orjson.dumps),
        st.fixed_dictionaries(
            {"v": st.just(1), "kind": st.sampled_from(["changes", "relay"])},
            optional={
                "agent_id": _json64,
                "epoch": _json64,
                "first_seq": _json64,
                "last_seq": _json64,
                "layouts": _json64,
                "changes": _json64,
                "rows": _json64,
            },
        ).map(orjson.dumps),
    )
)
def test_record_decoder_fuzz_raises_only_record_decode_error(data: bytes) -> None:
    with contextlib.suppress(RecordDecodeError):
        decode_record(data)


def test_query_params_fuzz_never_5xx(secured: Secured) -> None:
    with secured.client("agent-c") as c:
        seen: set[int] = set()

        @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
        @given(
            params=st.one_of(
                st.lists(_json, max_size=4), st.dictionaries(st.text(max_size=6), _json, max_size=3), _json
            )
        )
        def check(params: Any) -> None:
            resp = c.post(
                "/relay/query", json={"agent_id": "agent-c", "query": "SELECT ? AS a, typeof(?) AS b", "params": params}
            )
            seen.add(resp.status_code)
            assert resp.status_code < 500, resp.text
            assert "error" in resp.json() or resp.status_code == 200

        check()
        assert any(400 <= s < 500 for s in seen), seen  # the fuzzer did reach the refusals
        ok = c.post(
            "/relay/query", json={"agent_id": "agent-c", "query": "SELECT ? AS a, typeof(?) AS b", "params": [1, "x"]}
        )
        assert ok.status_code == 200 and ok.json()["rows"] == [[1, "text"]], ok.text  # and still answers


@pytest.mark.skipif(shutil.which("st", path=str(Path(sys.executable).parent)) is None, reason="schemathesis missing")
def test_schemathesis_openapi_no_5xx(tmp_path: Path, secured: Secured) -> None:
    """Property-based requests generated from /openapi.json (bounded) with an agent token: no 5xx."""
    st_bin = str(Path(sys.executable).parent / "st")
    report = tmp_path / "st.txt"
    cmd = [
        st_bin,
        "run",
        f"{secured.htpc.url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        "25",
        "--request-timeout",
        "10",
        "--workers",
        "1",
        "-H",
        f"Authorization: Bearer {secured.tokens['agent-c']}",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    report.write_text(done.stdout + done.stderr)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = [line for line in done.stdout.splitlines() if "passed" in line or "failed" in line]
    print("schemathesis:", json.dumps(summary[-3:]))
