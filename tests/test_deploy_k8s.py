"""deploy/k8s/*.yaml checked by a real Kubernetes validator, offline: kubernetes-validate.

`kubectl apply --dry-run=client` is no offline check (it downloads the OpenAPI schema from an API
server, and refuses without one), so the manifests are validated with the `kubernetes-validate`
package (PyPI), which ships the JSON schemas of every Kubernetes release it knows. Validation is
strict: a field the schema does not know (a typo) is an error, like kubectl's own validation.

Each manifest is checked against the oldest Kubernetes version we support (`OLDEST`) and the newest
the package knows. The validator is proven to reject what it must: copies of the manifests with a
wrong field type, a misspelt field, a missing required field, an unknown apiVersion each fail.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

REPO = Path(__file__).resolve().parents[1]
K8S_DIR = REPO / "deploy" / "k8s"
MANIFESTS = sorted(K8S_DIR.glob("*.yaml"))
#: The oldest Kubernetes the manifests are meant for (policy/v1 PodDisruptionBudget is GA since 1.21).
OLDEST = "1.30.0"
VERSIONS = (OLDEST, kubernetes_validate.latest_version())


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def validate(doc: dict[str, Any], version: str) -> None:
    """Raise unless `doc` is a valid resource of `version` (strict: unknown fields are errors too).

    The package's command line only warns about a kind or apiVersion it has no schema for; here that
    is a failure, like kubectl's `no matches for kind`.
    """
    kubernetes_validate.validate(doc, version, strict=True)


def name_of(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def test_there_are_manifests() -> None:
    assert [p.name for p in MANIFESTS] == ["nats-statefulset.yaml", "replicator-deployment.yaml"]
    kinds = sorted(d["kind"] for p in MANIFESTS for d in documents(p))
    assert kinds == [
        "ConfigMap",
        "Deployment",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "Service",
        "Service",
        "StatefulSet",
    ]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid(path: Path, version: str) -> None:
    for doc in documents(path):
        try:
            validate(doc, version)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{path.name} {name_of(doc)} (Kubernetes {version}): {where}: {exc.message}")


def test_command_line_passes_the_manifests() -> None:
    """The validator's own command line, as an operator would run it (exit 0, every resource passed)."""
    proc = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", OLDEST, *map(str, MANIFESTS)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    passed = [line for line in proc.stdout.splitlines() if line.startswith("INFO ") and " passed " in line]
    assert len(passed) == sum(len(documents(p)) for p in MANIFESTS), proc.stdout
    assert "WARN" not in proc.stdout and "ERROR" not in proc.stdout, proc.stdout


# ---------------------------------------------------------------------------------- the validator bites
def _statefulset() -> dict[str, Any]:
    docs = documents(K8S_DIR / "nats-statefulset.yaml")
    return copy.deepcopy(next(d for d in docs if d["kind"] == "StatefulSet"))


def _deployment() -> dict[str, Any]:
    docs = documents(K8S_DIR / "replicator-deployment.yaml")
    return copy.deepcopy(next(d for d in docs if d["kind"] == "Deployment"))


def _wrong_type(doc: dict[str, Any]) -> None:
    doc["spec"]["replicas"] = "three"


def _port_as_list(doc: dict[str, Any]) -> None:
    doc["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = [4222]


def _misspelt_field(doc: dict[str, Any]) -> None:
    pod = doc["spec"]["template"]["spec"]
    pod["contianers"] = pod.pop("containers")


def _missing_required(doc: dict[str, Any]) -> None:
    del doc["spec"]["template"]["spec"]["containers"][0]["name"]


def _env_without_name(doc: dict[str, Any]) -> None:
    doc["spec"]["template"]["spec"]["containers"][0]["env"].append({"value": "x"})


def _bad_probe(doc: dict[str, Any]) -> None:
    doc["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["periodSeconds"] = "often"


BREAKAGES = {
    "replicas is a string": (_statefulset, _wrong_type),
    "containerPort is a list": (_statefulset, _port_as_list),
    "containers misspelt": (_deployment, _misspelt_field),
    "container without name": (_deployment, _missing_required),
    "env var without name": (_deployment, _env_without_name),
    "probe period is a string": (_deployment, _bad_probe),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_validator_rejects_a_broken_copy(breakage: str) -> None:
    load, mutate = BREAKAGES[breakage]
    doc = load()
    validate(doc, OLDEST)  # the original passes ...
    mutate(doc)
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(doc, OLDEST)  # ... the broken copy does not


def test_validator_rejects_an_unknown_api_version() -> None:
    doc = _deployment()
    doc["apiVersion"] = "apps/v1beta9"
    with pytest.raises(SchemaNotFoundError):
        validate(doc, OLDEST)


def test_command_line_fails_on_a_broken_file(tmp_path: Path) -> None:
    """A broken copy of a manifest file makes the command line exit non-zero, naming the field."""
    docs = documents(K8S_DIR / "nats-statefulset.yaml")
    for doc in docs:
        if doc["kind"] == "StatefulSet":
            _wrong_type(doc)
    broken = tmp_path / "nats-statefulset.yaml"
    broken.write_text(yaml.safe_dump_all(docs))
    proc = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", OLDEST, str(broken)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0, proc.stdout
    assert "statefulset/nats" in proc.stdout and "replicas" in proc.stdout, proc.stdout
