"""deploy/prometheus and deploy/grafana against the real tools and the real metrics.

promtool checks the rule file and the scrape config and runs the alerts' unit tests (alerts_test.yml: every
alert fires when it should, and not before its `for`). Then a real `replicator serve` and a real agent write,
and every metric an alert or a dashboard panel names must be one that the HTPC's `/metrics` or the agent's own
metrics (agent_client.render_agent_metrics) really expose, read back with prometheus_client's parser.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent_client import Migration, render_agent_metrics
from tests.support.htpc import HtpcProcess, agent_session, apoll, wait_agent_applied

try:
    import yaml
except ImportError:  # pragma: no cover - depends on the environment
    yaml = None

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS = REPO / "deploy" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ALERTS_TEST = PROMETHEUS / "alerts_test.yml"
SCRAPE_CONFIG = PROMETHEUS / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "commander-replicator.json"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not found: apt-get install -y --no-install-recommends prometheus (Debian) provides it",
)
needs_yaml = pytest.mark.skipif(yaml is None, reason="pyyaml is not installed (not a project dependency)")

#: What Prometheus makes itself rather than scrapes.
PROMETHEUS_OWN = {"up"}

# ------------------------------------------------------------------------------------------ PromQL names
_KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "inf",
    "nan",
}
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.:$])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers that are not functions, keywords, label names
    (inside `{...}` or a grouping clause), strings, durations or Grafana variables."""
    text = _STRINGS.sub('""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers (and their variables)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\$\{?\w+\}?", " ", text)  # Grafana variables outside matchers
    names = set()
    for match in _IDENTIFIER.finditer(text):
        name, call = match.group(1), match.group(2)
        if call is None and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def test_the_extractor_finds_metrics_and_nothing_else() -> None:
    assert promql_metric_names(
        "histogram_quantile(0.99, sum by (instance, le) "
        '(rate(replicator_apply_delay_seconds_bucket{instance=~"$instance"}[$__rate_interval])))'
    ) == {"replicator_apply_delay_seconds_bucket"}
    assert promql_metric_names(
        "replicator_agent_replication_delay_seconds > 300 and replicator_agent_lag_changes > 0"
    ) == {
        "replicator_agent_replication_delay_seconds",
        "replicator_agent_lag_changes",
    }
    assert promql_metric_names(
        'sum(rate(foo_total{a="b(c) d", e!~"f"}[5m] offset 1h)) without (x) / on(y) group_left(z) bar:ratio'
    ) == {"foo_total", "bar:ratio"}
    assert promql_metric_names('up{job="commander-replicator"} == 0') == {"up"}
    assert promql_metric_names("1e3 * NaN + Inf > bool 2.5e-3") == set()
    assert promql_metric_names("increase(replicator_records_dead_letters_total[15m]) > 0") == {
        "replicator_records_dead_letters_total"
    }


def _alert_exprs() -> dict[str, str]:
    assert yaml is not None
    doc = yaml.safe_load(ALERTS.read_text())
    return {rule["alert"]: rule["expr"] for group in doc["groups"] for rule in group["rules"]}


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _dashboard_exprs() -> dict[str, str]:
    """Panel title (and ref id) -> expression, plus the metric of every `label_values(metric, label)` variable."""
    dash = json.loads(DASHBOARD.read_text())
    out = {
        f"{panel['title']}/{target['refId']}": target["expr"]
        for panel in _panels(dash["panels"])
        for target in panel.get("targets", [])
    }
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            found = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            assert found, f"variable {var['name']}: {query}"
            out[f"variable {var['name']}"] = found.group(1)
    return out


def test_the_dashboard_has_a_prometheus_datasource_variable_used_by_every_panel() -> None:
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in _panels(dash["panels"]):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]
    ids = [p["id"] for p in _panels(dash["panels"])]
    assert len(ids) == len(set(ids))


# ------------------------------------------------------------------------------------------ promtool
def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=PROMETHEUS)


@needs_promtool
def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"SUCCESS: \d+ rules found", result.stdout), result.stdout


@needs_promtool
def test_promtool_check_config() -> None:
    result = _promtool("check", "config", str(SCRAPE_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
@needs_yaml
def test_promtool_alert_unit_tests_fire_every_alert() -> None:
    assert yaml is not None
    result = _promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr
    tested = {
        check["alertname"]
        for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
        for check in case["alert_rule_test"]
        if check.get("exp_alerts")
    }
    assert tested == set(_alert_exprs()), "every alert needs a unit test that makes it fire"


@needs_promtool
def test_a_broken_alert_fails_its_unit_test(tmp_path: Path) -> None:
    """The unit tests can fail: with a threshold moved, the lag alert no longer fires when expected."""
    (tmp_path / "alerts.yml").write_text(ALERTS.read_text().replace("delay_seconds > 300", "delay_seconds > 3000"))
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yml")
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts_test.yml"], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert result.returncode != 0 and "ReplicatorAgentLagging" in result.stdout + result.stderr


# ------------------------------------------------------------------------------------------ real metrics
def _sample_names(text: str) -> dict[str, dict[str, float]]:
    """Sample name -> {label text: value} of a Prometheus text exposition."""
    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[json.dumps(sample.labels, sort_keys=True)] = sample.value
    return out


@needs_yaml
async def test_every_metric_an_alert_or_panel_names_is_exposed(htpc: HtpcProcess, tmp_path: Path) -> None:
    async with (
        agent_session(
            "monitored-agent",
            tmp_path / "agent",
            htpc_url=htpc.url,
            migrations=[Migration(1, "CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)", "notes")],
            visibility={"notes": "always"},
        ) as storage,
        httpx.AsyncClient(base_url=htpc.url, timeout=10) as client,
    ):
        for i in range(25):
            await storage.write_data("notes", {"id": i, "body": f"note {i}"})
        await storage.flush(timeout=10)
        last = await storage.last_committed_seq()
        await wait_agent_applied(client, "monitored-agent", last, epoch=storage.epoch)

        async def stream_read_after_apply() -> dict[str, Any] | None:
            """The stream watch's read (every few seconds) that sees everything acknowledged."""
            stream: dict[str, Any] = (await client.get("/health")).json()["stream"]
            done = stream["updated_at"] and stream["last_seq"] and stream["ack_floor"] == stream["last_seq"]
            return stream if done else None

        stream = await apoll(stream_read_after_apply, 30, "the stream watch to read the stream after the apply")
        resp = await client.get("/metrics")
        assert resp.status_code == 200, resp.text
        htpc_samples = _sample_names(resp.text)
        agent_text = (await render_agent_metrics(storage)).decode()
        health = await storage.health_check(integrity=False)
    agent_samples = _sample_names(agent_text)

    # The agent's own figures are the truth of this run.
    me = json.dumps({"agent": "monitored-agent"})
    assert agent_samples["agent_client_acked_seq"][me] == last
    assert agent_samples["agent_client_last_committed_seq"][me] == last
    assert agent_samples["agent_client_backlog_changes"][me] == 0.0
    assert agent_samples["agent_client_blocked"][me] == 0.0
    assert agent_samples["agent_client_publisher_running"][me] == 1.0
    published = agent_samples["agent_client_records_published_total"][me]
    assert published >= 1 and published == health["records_published"]
    assert agent_samples["agent_client_publish_latency_seconds_count"][me] == published
    assert health["publish_latency_s"]["count"] == published
    inf = json.dumps({"agent": "monitored-agent", "le": "+Inf"}, sort_keys=True)
    assert agent_samples["agent_client_publish_latency_seconds_bucket"][inf] == published
    # ... and the HTPC's, measured against what exists.
    assert htpc_samples["replicator_agent_watermark"][me] == last
    assert htpc_samples["replicator_agent_lag_changes"][me] == 0.0
    assert htpc_samples["replicator_agents"]["{}"] == 1.0
    assert htpc_samples["replicator_agent_dead_letters"][me] == 0.0
    assert htpc_samples["replicator_healthy"]["{}"] == 1.0
    assert htpc_samples["replicator_consumer_pending"]["{}"] == stream["consumer_pending"] == 0
    assert htpc_samples["replicator_stream_last_seq"]["{}"] == htpc_samples["replicator_consumer_ack_floor"]["{}"]

    exposed = set(htpc_samples) | set(agent_samples) | PROMETHEUS_OWN
    missing: list[str] = []
    for where, exprs in (("alerts.yml", _alert_exprs()), ("dashboard", _dashboard_exprs())):
        for name, expr in exprs.items():
            names = promql_metric_names(expr)
            assert names, f"{where} {name}: no metric found in {expr!r}"
            missing += [f"{where} {name}: {metric}" for metric in sorted(names - exposed)]
    assert missing == []
