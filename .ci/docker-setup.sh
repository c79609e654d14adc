#!/usr/bin/env bash
# Best-effort Docker setup for the NATS test harness (tests/nats_server.py).
#
# CI machines are Debian 12, root, no Docker engine, no registry: we install docker.io from the Debian
# mirror, start dockerd without bridge/iptables (containers use host networking), and build the image
# commander-replicator/nats-server:test with `docker import` from the static nats-server binary of the
# venv. Any failure only means the tests use the binary backend, so this script ALWAYS exits 0.
# It also installs docker-compose and debootstrap when missing, for tests/test_deploy_compose.py (which
# builds its own images: tests/support/docker_images.py).
#
# Usage: bash .ci/docker-setup.sh [path/to/nats-server]   (default: .venv/bin/nats-server)
# Env:   DOCKER_SETUP_STORAGE_DRIVER=<driver> forces a storage driver (default: dockerd's choice, then vfs).

set -u -o pipefail

IMAGE="commander-replicator/nats-server:test"
HARNESS_LABEL="commander-replicator.nats-harness"
NATS_BIN="${1:-.venv/bin/nats-server}"
DOCKERD_LOG="/tmp/dockerd.log"
DOCKERD_PIDFILE="/var/run/docker.pid"
CONTAINERD_PIDFILE="/var/run/docker/containerd/containerd.pid"
WAIT_SECONDS=60

unavailable() {
    echo "docker unavailable: $*; tests will use the nats-server binary"
    exit 0
}

log() { echo "docker-setup: $*"; }

engine_up() { timeout 10 docker info >/dev/null 2>&1; }

# Poll `docker info` until the engine answers, the daemon dies, or WAIT_SECONDS pass.
wait_engine() {
    local pid="$1" deadline=$((SECONDS + WAIT_SECONDS))
    while ((SECONDS < deadline)); do
        engine_up && return 0
        live_dockerd "$pid" || return 1
        sleep 1
    done
    return 1
}

# live_proc PID NAME: the pid exists, is not a zombie, and runs NAME (pids get reused).
live_proc() {
    local pid="$1" name="$2"
    [[ "$pid" =~ ^[0-9]+$ && -r "/proc/$pid/stat" ]] || return 1
    [[ "$(cut -d' ' -f3 "/proc/$pid/stat")" != "Z" && "$(cat "/proc/$pid/comm")" == "$name" ]]
}
live_dockerd() { live_proc "$1" dockerd; }

# A daemon killed with SIGKILL leaves pidfiles behind: dockerd refuses to start on its own, and waits
# (then times out) for the containerd named in its containerd pidfile.
clean_stale_pidfiles() {
    if [[ -f "$DOCKERD_PIDFILE" ]] && ! live_dockerd "$(cat "$DOCKERD_PIDFILE" 2>/dev/null)"; then
        rm -f "$DOCKERD_PIDFILE"
    fi
    if [[ -f "$CONTAINERD_PIDFILE" ]] && ! live_proc "$(cat "$CONTAINERD_PIDFILE" 2>/dev/null)" containerd; then
        rm -f "$CONTAINERD_PIDFILE"
    fi
}

# Start dockerd detached (own session, so it outlives this script); extra args are passed through.
start_dockerd() {
    local pid
    clean_stale_pidfiles
    log "starting dockerd${*:+ $*} (log: $DOCKERD_LOG)"
    setsid dockerd --bridge=none --iptables=false --ip6tables=false "$@" </dev/null >>"$DOCKERD_LOG" 2>&1 &
    pid=$!
    if wait_engine "$pid"; then
        DOCKERD_PID="$pid"
        return 0
    fi
    log "dockerd${*:+ $*} did not come up; last log lines:"
    tail -n 5 "$DOCKERD_LOG" 2>/dev/null | sed 's/^/    /'
    stop_dockerd "$pid"
    return 1
}

stop_dockerd() {
    local pid="$1" i
    kill "$pid" 2>/dev/null || return 0
    for i in $(seq 1 20); do
        live_dockerd "$pid" || return 0
        sleep 0.5
    done
    kill -9 "$pid" 2>/dev/null
    return 0
}

# Import the image from a tarball holding only the static binary at /nats-server; label it with the
# binary's checksum so a changed binary triggers a rebuild and an unchanged one is skipped.
build_image() {
    local sum="$1" tmp
    tmp="$(mktemp -d)" || return 1
    cp "$NATS_BIN" "$tmp/nats-server" && chmod 0755 "$tmp/nats-server" \
        && tar -C "$tmp" -c nats-server \
        | docker import \
            --change 'ENTRYPOINT ["/nats-server"]' \
            --change "LABEL org.commander-replicator.nats-sha256=$sum" \
            - "$IMAGE" >/dev/null
    local rc=$?
    rm -rf "$tmp"
    return $rc
}

# Prove that a container really runs (namespaces, mounts, storage driver) with host networking.
smoke_test() {
    timeout 60 docker run --rm --network host --label "$HARNESS_LABEL=smoke" "$IMAGE" --version 2>&1
}

# --- 0. inputs ---------------------------------------------------------------------------------------
[[ -f "$NATS_BIN" ]] || unavailable "nats-server binary not found at $NATS_BIN"
if command -v file >/dev/null 2>&1 && ! file -L "$NATS_BIN" | grep -q 'statically linked'; then
    unavailable "$NATS_BIN is not a statically linked binary"
fi
NATS_SUM="$(sha256sum "$NATS_BIN" | cut -d' ' -f1)" || unavailable "cannot checksum $NATS_BIN"

# --- 1. install dockerd ------------------------------------------------------------------------------
if ! command -v dockerd >/dev/null 2>&1; then
    [[ "$(id -u)" == 0 ]] || unavailable "dockerd missing and not root to install docker.io"
    log "installing docker.io from the Debian mirror"
    export DEBIAN_FRONTEND=noninteractive
    timeout 300 apt-get update -qq >/dev/null 2>&1 || unavailable "apt-get update failed"
    timeout 600 apt-get install -y -qq --no-install-recommends docker.io >/tmp/docker-setup-apt.log 2>&1 \
        || unavailable "apt-get install docker.io failed (see /tmp/docker-setup-apt.log)"
    command -v dockerd >/dev/null 2>&1 || unavailable "docker.io installed but dockerd not on PATH"
fi
command -v docker >/dev/null 2>&1 || unavailable "docker CLI not on PATH"

# --- 1b. tools of tests/test_deploy_compose.py (it skips without them; never fatal here) --------------
missing_pkgs=()
command -v docker-compose >/dev/null 2>&1 || missing_pkgs+=(docker-compose)
command -v debootstrap >/dev/null 2>&1 || missing_pkgs+=(debootstrap)
if ((${#missing_pkgs[@]})) && [[ "$(id -u)" == 0 ]]; then
    log "installing ${missing_pkgs[*]} from the Debian mirror (for the compose test)"
    export DEBIAN_FRONTEND=noninteractive
    { timeout 300 apt-get update -qq \
        && timeout 600 apt-get install -y -qq --no-install-recommends "${missing_pkgs[@]}"; } \
        >/tmp/docker-setup-apt-compose.log 2>&1 \
        || log "installing ${missing_pkgs[*]} failed (see /tmp/docker-setup-apt-compose.log); the compose test will skip"
fi

# --- 2. start the engine -----------------------------------------------------------------------------
DOCKERD_PID=""
if engine_up; then
    log "docker engine already running"
else
    if [[ -n "${DOCKER_SETUP_STORAGE_DRIVER:-}" ]]; then
        start_dockerd --storage-driver="$DOCKER_SETUP_STORAGE_DRIVER" \
            || unavailable "dockerd failed to start with storage driver $DOCKER_SETUP_STORAGE_DRIVER (see $DOCKERD_LOG)"
    elif ! start_dockerd; then
        start_dockerd --storage-driver=vfs || unavailable "dockerd failed to start (see $DOCKERD_LOG)"
    fi
fi
DRIVER="$(docker info --format '{{.Driver}}' 2>/dev/null)"
log "engine up (storage driver: ${DRIVER:-unknown})"

# --- 3. image ----------------------------------------------------------------------------------------
have_sum="$(docker image inspect --format '{{index .Config.Labels "org.commander-replicator.nats-sha256"}}' \
    "$IMAGE" 2>/dev/null)"
if [[ "$have_sum" == "$NATS_SUM" ]]; then
    log "image $IMAGE already up to date"
else
    log "building image $IMAGE from $NATS_BIN"
    build_image "$NATS_SUM" || unavailable "docker import of $IMAGE failed"
fi

# --- 4. smoke test (retry once on vfs when we started the daemon ourselves) --------------------------
if ! out="$(smoke_test)"; then
    log "container smoke test failed on driver ${DRIVER:-unknown}: $(echo "$out" | tail -n 1)"
    if [[ -n "$DOCKERD_PID" && "$DRIVER" != "vfs" && -z "${DOCKER_SETUP_STORAGE_DRIVER:-}" ]]; then
        stop_dockerd "$DOCKERD_PID"
        start_dockerd --storage-driver=vfs || unavailable "dockerd failed to start with vfs (see $DOCKERD_LOG)"
        DRIVER=vfs
        build_image "$NATS_SUM" || unavailable "docker import of $IMAGE failed on vfs"
        out="$(smoke_test)" || unavailable "cannot run containers: $(echo "$out" | tail -n 1)"
    else
        docker image rm -f "$IMAGE" >/dev/null 2>&1  # a broken image would make the tests pick docker
        unavailable "cannot run containers: $(echo "$out" | tail -n 1)"
    fi
fi
log "smoke test ok: $(echo "$out" | head -n 1)"

# Leftover stopped harness containers from crashed runs (running ones are left alone).
stale="$(docker ps -aq --filter "label=$HARNESS_LABEL" --filter status=exited --filter status=created)"
[[ -n "$stale" ]] && docker rm -f $stale >/dev/null 2>&1

echo "docker ready: image $IMAGE, storage driver ${DRIVER:-unknown}"
exit 0
