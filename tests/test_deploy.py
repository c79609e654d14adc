"""deploy/ is what a user runs past one machine: every file there is checked against the real tools.

* Every NATS config (the three cluster files as shipped and templated onto loopback ports, and the one in
  the Kubernetes ConfigMap) passes `nats-server -t`. tests/test_cluster.py runs the cluster files for real.
* compose.yaml, the Kubernetes manifests and the Dockerfile agree with each other and with the NATS files
  (node names, ports, routes, mounts), and the replicator command/environment they give is accepted by the
  real `replicator` argument parser and settings model.
* The systemd units have the keys that matter and pass `systemd-analyze verify` when it is installed.

YAML parsing needs pyyaml, which is not a dependency of the project: without it the structural checks
skip (the ConfigMap's NATS config is then extracted as text and still validated).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from replicator.cli import build_parser, settings_from_args
from replicator.settings import Settings
from tests.support.nats_cluster import CLUSTER_CONFIGS, SETTINGS_KEYS, NatsCluster, read_settings
from tests.support.nats_server import nats_server_binary

try:
    import yaml
except ImportError:  # pragma: no cover - depends on the environment
    yaml = None

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = DEPLOY / "Dockerfile"
K8S_NATS = DEPLOY / "k8s" / "nats-statefulset.yaml"
K8S_REPLICATOR = DEPLOY / "k8s" / "replicator-deployment.yaml"
SYSTEMD = DEPLOY / "systemd"
REPLICATOR_UNIT = SYSTEMD / "commander-replicator.service"
AGENT_UNIT = SYSTEMD / "commander-agent@.service"
ENV_EXAMPLE = SYSTEMD / "replicator.env.example"

needs_yaml = pytest.mark.skipif(yaml is None, reason="pyyaml is not installed (not a project dependency)")


# ------------------------------------------------------------------------------------------ helpers
def nats_check(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`nats-server -t -c FILE`: parse and validate the config without starting anything."""
    return subprocess.run(
        [nats_server_binary(), "-t", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


def assert_valid(config: Path, env: dict[str, str] | None = None) -> None:
    result = nats_check(config, env)
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0, f"nats-server -t -c {config} failed ({result.returncode}): {output}"
    assert "is valid" in output, output


def configmap_nats_conf_text(manifest: str, key: str = "nats.conf") -> str:
    """The `key: |` block of the ConfigMap, extracted as text (no YAML parser needed)."""
    lines = manifest.splitlines()
    for n, line in enumerate(lines):
        match = re.match(rf"^(\s+){re.escape(key)}:\s*\|-?\s*$", line)
        if match:
            indent = len(match.group(1))
            block: list[str] = []
            for body in lines[n + 1 :]:
                if body.strip() and (len(body) - len(body.lstrip()) <= indent or body.startswith("---")):
                    break
                block.append(body)
            return textwrap.dedent("\n".join(block)).strip() + "\n"
    raise AssertionError(f"no `{key}: |` block in the manifest")


def exec_form(dockerfile: str, instruction: str) -> list[str]:
    """The JSON array of a Dockerfile instruction (line continuations already joined)."""
    found = re.findall(rf"^{instruction}\s+(\[.*\])\s*$", dockerfile, flags=re.MULTILINE)
    assert len(found) == 1, f"expected one exec-form {instruction}"
    parsed = json.loads(found[0])
    assert isinstance(parsed, list)
    return [str(x) for x in parsed]


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    assert yaml is not None
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def nats_conf_routes(conf: str) -> list[str]:
    block = re.search(r"routes:\s*\[(.*?)\]", conf, flags=re.DOTALL)
    assert block, "no routes list"
    return re.findall(r"nats-route://[^\s\"',\]]+", block.group(1))


def serve_settings(argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """What `replicator <argv>` would run with under `env`, through the real parser and settings model."""
    for name in list(os.environ):
        if name.startswith("REPLICATOR_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(argv)  # defaults are read from the environment when the parser is built
    assert args.command == "serve"
    return settings_from_args(args)


def assert_cluster_url(url: str, hosts: list[str], port: int) -> None:
    parsed = [urlparse(u.strip()) for u in url.split(",")]
    assert [p.scheme for p in parsed] == ["nats"] * len(hosts), url
    assert [p.hostname for p in parsed] == hosts, url
    assert {p.port for p in parsed} == {port}, url


def env_file(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        assert re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"{path.name}: bad variable name {key!r}"
        out[key] = value
    return out


def unit_entries(path: Path) -> dict[str, list[tuple[str, str]]]:
    """systemd unit as {section: [(key, value), ...]} (keys may repeat, e.g. EnvironmentFile)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        header = re.fullmatch(r"\[(\w+)\]", line)
        if header:
            current = sections.setdefault(header.group(1), [])
            continue
        assert current is not None, f"{path.name}: entry before any section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not Key=Value: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(section: list[tuple[str, str]], key: str) -> list[str]:
    return [v for k, v in section if k == key]


def cli_env_names() -> set[str]:
    """REPLICATOR_* variables the CLI reads (replicator/cli.py: env("NAME"))."""
    source = (REPO / "replicator" / "cli.py").read_text()
    names = {f"REPLICATOR_{n}" for n in re.findall(r'\benv\("([A-Z_]+)"', source)}
    assert "REPLICATOR_NATS_URL" in names and "REPLICATOR_STREAM_REPLICAS" in names
    return names


def deploy_files() -> Iterator[Path]:
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file():
            yield path


# ------------------------------------------------------------------------------------------ NATS configs
@pytest.mark.parametrize("config", CLUSTER_CONFIGS, ids=lambda p: p.name)
def test_cluster_config_as_shipped_is_valid(config: Path) -> None:
    assert_valid(config)


def test_cluster_configs_templated_onto_loopback_are_valid(tmp_path: Path) -> None:
    """The files as tests/nats_cluster.py runs them: only the settings block changes."""
    cluster = NatsCluster(tmp_path / "cluster")  # renders the configs; starts nothing
    for node in cluster.nodes:
        rendered = node.config_path.read_text()
        settings = read_settings(rendered)
        assert settings["CLIENT_LISTEN"] == f"127.0.0.1:{node.client_port}"
        assert settings["CLUSTER_LISTEN"] == f"127.0.0.1:{node.cluster_port}"
        assert settings["MONITOR_LISTEN"] == f"127.0.0.1:{node.http_port}"
        assert settings["JETSTREAM_DIR"] == str(node.store_dir)
        others = {n.cluster_port for n in cluster.nodes if n is not node}
        assert {urlparse(settings[k]).port for k in ("ROUTE_A", "ROUTE_B")} == others
        assert "0.0.0.0" not in rendered
        ports = {node.client_port, node.cluster_port, node.http_port}
        assert not ports & {4222, 6222, 8222, 8000}
        assert_valid(node.config_path)
        # nothing but the settings lines changed
        original = node.source.read_text().splitlines()
        changed = [a for a, b in zip(original, rendered.splitlines(), strict=True) if a != b]
        assert all(line.split(":", 1)[0] in SETTINGS_KEYS for line in changed), changed


def test_cluster_configs_form_one_cluster() -> None:
    """Three distinct nodes, each routed to the two others, identical below the settings block."""
    texts = [p.read_text() for p in CLUSTER_CONFIGS]
    settings = [read_settings(t) for t in texts]
    names = [s["NODE_NAME"] for s in settings]
    assert names == ["nats-1", "nats-2", "nats-3"]
    for s in settings:
        targets = {urlparse(s[k]).hostname for k in ("ROUTE_A", "ROUTE_B")}
        assert targets == set(names) - {s["NODE_NAME"]}, s
        assert {urlparse(s[k]).port for k in ("ROUTE_A", "ROUTE_B")} == {int(s["CLUSTER_LISTEN"].rsplit(":")[1])}
    bodies = [t.split("# --- end of settings ---", 1) for t in texts]
    assert all(len(b) == 2 for b in bodies), "settings block end marker missing"
    assert bodies[0][1] == bodies[1][1] == bodies[2][1], "the node files differ outside their settings block"
    body = bodies[0][1]
    assert re.search(r"^max_payload:\s*8MB\s*$", body, flags=re.MULTILINE)
    assert re.search(r"^\s*store_dir:\s*\$JETSTREAM_DIR\s*$", body, flags=re.MULTILINE)
    assert re.search(r"^\s*name:\s*\"commander\"\s*$", body, flags=re.MULTILINE)


def test_k8s_configmap_nats_config_is_valid(tmp_path: Path) -> None:
    manifest = K8S_NATS.read_text()
    conf = configmap_nats_conf_text(manifest)
    if yaml is not None:
        parsed = one(yaml_docs(K8S_NATS), "ConfigMap")["data"]["nats.conf"]
        assert conf.strip() == parsed.strip(), "text extraction and YAML disagree about the ConfigMap"
        conf = parsed
    path = tmp_path / "nats.conf"
    path.write_text(conf)
    # server_name comes from the pod name (downward API): without it the config must not load
    env = {k: v for k, v in os.environ.items() if k != "POD_NAME"}
    missing = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(path)], capture_output=True, text=True, timeout=30, env=env
    )
    assert missing.returncode != 0 and "POD_NAME" in missing.stderr + missing.stdout
    for pod in ("nats-0", "nats-1", "nats-2"):
        assert_valid(path, {"POD_NAME": pod})
    assert re.search(r"^max_payload:\s*8MB\s*$", conf, flags=re.MULTILINE)
    assert "jetstream" in conf and "store_dir" in conf
    assert nats_conf_routes(conf) == [f"nats-route://nats-{i}.nats:6222" for i in range(3)]


def test_every_nats_config_in_deploy_is_covered() -> None:
    """A new NATS config dropped into deploy/ must get a test too."""
    configs = {p for p in deploy_files() if p.suffix == ".conf"}
    assert configs == set(CLUSTER_CONFIGS), sorted(map(str, configs))
    embedded = [p for p in deploy_files() if p.suffix in (".yaml", ".yml") and "jetstream {" in p.read_text()]
    assert embedded == [K8S_NATS], embedded


# ------------------------------------------------------------------------------------------ compose
@needs_yaml
def test_compose_runs_the_cluster_files_and_the_replicator(monkeypatch: pytest.MonkeyPatch) -> None:
    assert yaml is not None
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"nats-1", "nats-2", "nats-3", "replicator"}
    declared_volumes = set(compose.get("volumes") or {})
    client_port = None
    for name in ("nats-1", "nats-2", "nats-3"):
        svc = services[name]
        assert str(svc["image"]).startswith("nats:"), "the official nats image"
        command = svc["command"]
        conf_in_container = command[command.index("--config") + 1]
        mounts = [str(v).split(":") for v in svc["volumes"]]
        conf_mounts = [m for m in mounts if m[1] == conf_in_container]
        assert len(conf_mounts) == 1, f"{name}: {conf_in_container} is not mounted"
        source = (COMPOSE.parent / conf_mounts[0][0]).resolve()
        assert source == DEPLOY / "nats" / "cluster" / f"{name}.conf"
        node = read_settings(source.read_text())
        assert node["NODE_NAME"] == name, "the service name is the host name its peers route to"
        data = [m for m in mounts if m[1] == node["JETSTREAM_DIR"]]
        assert len(data) == 1 and data[0][0] in declared_volumes, f"{name}: no named volume on the store"
        client_port = int(node["CLIENT_LISTEN"].rsplit(":", 1)[1])
        assert any(str(p).split(":")[-1] == str(client_port) for p in svc["ports"]), f"{name}: client port"
        assert "healthz" in json.dumps(svc.get("healthcheck"))

    rep = services["replicator"]
    build = rep["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    command = [str(c) for c in rep["command"]]
    env = {str(k): str(v) for k, v in (rep.get("environment") or {}).items()}
    assert set(env) <= cli_env_names(), set(env) - cli_env_names()
    settings = serve_settings(command, env, monkeypatch)
    assert settings.host == "0.0.0.0"
    assert settings.stream_replicas == 3
    assert settings.nats_url is not None
    assert_cluster_url(settings.nats_url, ["nats-1", "nats-2", "nats-3"], client_port or 0)
    data_mounts = [str(v).split(":") for v in rep["volumes"]]
    assert [str(settings.data_dir)] == [m[1] for m in data_mounts if m[0] in declared_volumes]
    assert set(rep["depends_on"]) == {"nats-1", "nats-2", "nats-3"}
    assert declared_volumes == {"nats-1-data", "nats-2-data", "nats-3-data", "replicator-data"}


def test_dockerfile_builds_the_replicator(monkeypatch: pytest.MonkeyPatch) -> None:
    text = DOCKERFILE.read_text()
    joined = re.sub(r"\\\n\s*", " ", text)
    froms = re.findall(r"^FROM\s+(\S+)", joined, flags=re.MULTILINE)
    assert froms == ["${BASE}"], "the base image is a build argument"
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", joined, flags=re.MULTILINE))
    assert args.get("BASE") == "python:3.11-slim", "users get the official Python image by default"
    assert re.search(r"^RUN python3 -m venv (\S+) && \1/bin/pip install \.", joined, flags=re.MULTILINE)
    for source in re.findall(r"^COPY\s+(.+?)\s+\S+\s*$", joined, flags=re.MULTILINE):
        for item in source.split():
            assert (REPO / item).exists(), f"COPY {item}: not in the repository (build context is the repo root)"
    assert exec_form(joined, "ENTRYPOINT") == ["replicator"], "exec form, so SIGTERM reaches replicator"
    cmd = exec_form(joined, "CMD")
    settings = serve_settings(cmd, {"REPLICATOR_DATA_DIR": "/data"}, monkeypatch)
    assert settings.host == "0.0.0.0" and settings.stream_replicas == 3
    assert settings.nats_url is not None
    assert_cluster_url(settings.nats_url, ["nats-1", "nats-2", "nats-3"], 4222)


# ------------------------------------------------------------------------------------------ kubernetes
@needs_yaml
def test_k8s_nats_statefulset() -> None:
    docs = yaml_docs(K8S_NATS)
    sts, svc, cm = one(docs, "StatefulSet"), one(docs, "Service"), one(docs, "ConfigMap")
    spec = sts["spec"]
    assert spec["replicas"] == 3
    assert spec["serviceName"] == svc["metadata"]["name"]
    assert svc["spec"]["clusterIP"] == "None", "the service must be headless for per-pod DNS names"
    assert svc["spec"].get("publishNotReadyAddresses") is True, "pods must find each other before ready"
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    assert {p["port"] for p in svc["spec"]["ports"]} == {4222, 6222, 8222}

    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert str(container["image"]).startswith("nats:")
    conf_dir = container["args"][container["args"].index("--config") + 1].rsplit("/", 1)
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_volume = next(n for n, p in mounts.items() if p == conf_dir[0])
    assert volumes[config_volume]["configMap"]["name"] == cm["metadata"]["name"]
    assert conf_dir[1] in cm["data"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"

    (claim,) = spec["volumeClaimTemplates"]
    assert claim["metadata"]["name"] in mounts, "the PVC must be mounted"
    conf = cm["data"][conf_dir[1]]
    store = re.search(r"store_dir:\s*\"?([^\"\s]+)", conf)
    assert store and mounts[claim["metadata"]["name"]] == store.group(1), "JetStream must store on the PVC"
    assert claim["spec"]["resources"]["requests"]["storage"]

    name, service = sts["metadata"]["name"], svc["metadata"]["name"]
    routes = nats_conf_routes(conf)
    assert routes == [f"nats-route://{name}-{i}.{service}:6222" for i in range(spec["replicas"])]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"].startswith("/healthz")


@needs_yaml
def test_k8s_replicator_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    docs = yaml_docs(K8S_REPLICATOR)
    dep, svc, pvc = one(docs, "Deployment"), one(docs, "Service"), one(docs, "PersistentVolumeClaim")
    nats_docs = yaml_docs(K8S_NATS)
    sts, nats_svc = one(nats_docs, "StatefulSet"), one(nats_docs, "Service")

    spec = dep["spec"]
    assert spec["replicas"] == 1, "a replicator owns its data directory"
    assert spec["strategy"]["type"] == "Recreate", "old and new pod must not share the RWO volume"
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: str(e["value"]) for e in container["env"] if "value" in e}
    assert set(env) <= cli_env_names(), set(env) - cli_env_names()
    settings = serve_settings([str(a) for a in container["args"]], env, monkeypatch)
    assert settings.stream_replicas == 3
    assert settings.host == "0.0.0.0"
    hosts = [f"{sts['metadata']['name']}-{i}.{nats_svc['metadata']['name']}" for i in range(sts["spec"]["replicas"])]
    assert settings.nats_url == env["REPLICATOR_NATS_URL"]
    assert_cluster_url(env["REPLICATOR_NATS_URL"], hosts, 4222)

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == settings.port
    for probe in ("livenessProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and get["port"] in ("http", settings.port)

    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    data_volume = next(n for n, p in mounts.items() if p == str(settings.data_dir))
    assert volumes[data_volume]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]

    labels = spec["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in svc["spec"]["ports"]] in (["http"], [settings.port])


# ------------------------------------------------------------------------------------------ systemd
def test_replicator_unit() -> None:
    unit = unit_entries(REPLICATOR_UNIT)
    service = unit["Service"]
    (exec_start,) = values(service, "ExecStart")
    assert re.search(r"/replicator serve(\s|$)", exec_start), exec_start
    assert values(service, "EnvironmentFile") == ["/etc/commander-replicator/env"]
    assert values(service, "Restart") == ["always"]
    assert values(service, "KillSignal") == ["SIGTERM"]
    (timeout,) = values(service, "TimeoutStopSec")
    assert int(timeout) >= 25, "give the consumer time to finish its batch and drain (HtpcProcess allows 25 s)"
    assert values(unit["Install"], "WantedBy") == ["multi-user.target"]
    state = values(service, "StateDirectory")
    assert state and f"/var/lib/{state[0]}" == env_file(ENV_EXAMPLE)["REPLICATOR_DATA_DIR"]


def test_agent_template_unit() -> None:
    unit = unit_entries(AGENT_UNIT)
    service = unit["Service"]
    (exec_start,) = values(service, "ExecStart")
    assert re.search(r"/python -m \$\{AGENT_MODULE\}$", exec_start), exec_start
    assert "%i" in " ".join(values(service, "EnvironmentFile")), "a per-instance environment file"
    assert "COMMANDER_AGENT_ID=%i" in values(service, "Environment")
    assert values(service, "Restart") == ["always"]
    assert values(service, "KillSignal") == ["SIGTERM"]
    assert values(service, "TimeoutStopSec")
    assert "%i" in unit["Unit"][0][1], "the description names the agent"


def test_env_example_is_what_serve_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    env = env_file(ENV_EXAMPLE)
    assert set(env) <= cli_env_names(), set(env) - cli_env_names()
    settings = serve_settings(["serve"], env, monkeypatch)
    assert settings.stream_replicas == 3
    assert settings.nats_url is not None and len(settings.nats_url.split(",")) == 3
    assert str(settings.data_dir) == "/var/lib/commander-replicator"


def test_every_replicator_variable_in_deploy_exists() -> None:
    known = cli_env_names()
    for path in deploy_files():
        used = set(re.findall(r"\bREPLICATOR_[A-Z_]+\b", path.read_text()))
        assert used <= known, f"{path.relative_to(REPO)} uses unknown variables {sorted(used - known)}"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", [REPLICATOR_UNIT, AGENT_UNIT], ids=lambda p: p.name)
def test_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    """The unit as systemd reads it; the install path of the venv is pointed at this one's executables."""
    name = unit.name.replace("@.", "@test.")
    copy = tmp_path / name
    venv_bin = Path(sys.executable).parent
    text = unit.read_text().replace("/opt/commander-replicator/venv/bin/", f"{venv_bin}/")
    assert (venv_bin / "replicator").exists()
    copy.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, output
