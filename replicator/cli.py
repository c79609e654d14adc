"""`replicator` command line: serve, status, rebuild, dead-letters."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from .settings import Settings, env

log = logging.getLogger("replicator")


class _LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage().replace('"', "'")
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = f'ts={ts}Z level={record.levelname.lower()} logger={record.name} msg="{msg}"'
        if record.exc_info:
            line += f' exc="{self.formatException(record.exc_info)!r}"'
        return line


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.WARNING))


@contextlib.contextmanager
def data_dir_lock(data_dir: Path) -> Iterator[None]:
    """One process owns a data directory: serve and rebuild both write the central store."""
    data_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(data_dir / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise SystemExit(f"replicator: {data_dir} is in use by another replicator process") from None
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _settings(args: argparse.Namespace) -> Settings:
    values: dict[str, Any] = {
        "data_dir": Path(args.data_dir),
        "nats_url": args.nats_url or None,
        "log_level": args.log_level,
    }
    for name in (
        "host",
        "port",
        "nats_host",
        "nats_port",
        "nats_advertise",
        "durable",
        "stream_replicas",
        "auth",
        "nats_seed_file",
        "tls_cert",
        "tls_key",
        "nats_tls_cert",
        "nats_tls_key",
        "nats_tls_ca",
    ):
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    return Settings(**values)


# ------------------------------------------------------------------------------ serve
async def serve(settings: Settings) -> None:
    import uvicorn

    from .relay_api import create_app
    from .service import ReplicatorService

    class _Server(uvicorn.Server):
        # We handle SIGTERM/SIGINT ourselves so that the service drains after uvicorn stops.
        def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
            return contextlib.nullcontext()

    service = ReplicatorService(settings)
    await service.start()
    try:
        config = uvicorn.Config(
            create_app(service),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            access_log=False,
            lifespan="off",
            ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
            ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
        )
        server = _Server(config)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        scheme = "https" if settings.tls_cert else "http"
        print(
            f"replicator: serving {scheme}://{settings.host}:{settings.port} "
            f"(NATS {service.nats_url}{', embedded' if service.embedded else ''}; data {settings.data_dir}; "
            f"auth {'on' if service.auth else 'off'})",
            flush=True,
        )
        await server.serve()
    finally:
        await service.stop()
    print("replicator: stopped", flush=True)


# ------------------------------------------------------------------------------ rebuild
async def rebuild(settings: Settings) -> int:
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    from agent_client import STREAM_NAME, STREAM_SUBJECTS, ensure_stream

    from .central_store import CentralStore
    from .consumer import Consumer
    from .data_dir import DataDir
    from .dead_letters import DeadLetterStore
    from .embedded_nats import EmbeddedNats
    from .service import connect_nats

    embedded = None
    url = settings.nats_url
    if not url:
        embedded = EmbeddedNats(settings.data_dir / "nats", host=settings.nats_host, port=settings.nats_port)
        await embedded.start()
        url = embedded.url
    nc = await connect_nats(url, name="replicator-rebuild")
    try:
        js = nc.jetstream()
        await ensure_stream(js, replicas=settings.stream_replicas)
        info = await js.stream_info(STREAM_NAME)
        total = info.state.messages
        backup = settings.data_dir / f"rebuild-backup-{time.strftime('%Y%m%d-%H%M%S')}"
        backup.mkdir()
        for name in ("agents", "dead_letters.db", "dead_letters.db-wal", "dead_letters.db-shm"):
            if (settings.data_dir / name).exists():
                shutil.move(str(settings.data_dir / name), backup / name)
        print(f"rebuild: previous central store moved to {backup}", file=sys.stderr)
        store = CentralStore(DataDir(settings.data_dir))
        dead = DeadLetterStore(settings.data_dir / "dead_letters.db")
        durable = f"rebuild-{int(time.time())}"
        consumer = Consumer(js, store, dead, durable=durable, batch=512)
        done = 0
        started = time.monotonic()
        last_print = 0.0

        def progress(n: int) -> None:
            nonlocal done, last_print
            done += n
            now = time.monotonic()
            if now - last_print >= 0.5:
                last_print = now
                pct = 100.0 * done / total if total else 100.0
                rate = done / max(now - started, 1e-9)
                print(
                    f"\rrebuild: {done}/{total} messages ({pct:5.1f}%), {rate:,.0f} msg/s",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )

        consumer.on_batch = progress
        await consumer.run(until_idle=True)
        last_seq = consumer.max_stream_seq
        await consumer.stop()
        with contextlib.suppress(Exception):
            await js.delete_consumer(STREAM_NAME, durable)
        with contextlib.suppress(Exception):
            await js.delete_consumer(STREAM_NAME, settings.durable)
        await js.add_consumer(
            STREAM_NAME,
            ConsumerConfig(
                durable_name=settings.durable,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=last_seq + 1,
                ack_wait=5,
                max_deliver=-1,
                max_ack_pending=20_000,
                filter_subject=STREAM_SUBJECTS[0],
            ),
        )
        elapsed = time.monotonic() - started
        print(
            f"\rrebuild: {done}/{total} messages in {elapsed:.1f}s; {len(store.replicas)} agents; "
            f"{dead.total()} dead letters; consumer {settings.durable!r} resumes at stream seq {last_seq + 1}",
            file=sys.stderr,
        )
        store.close()
        dead.close()
        return 0
    finally:
        await nc.close()
        if embedded is not None:
            await embedded.stop()


# ------------------------------------------------------------------------------ status
def _fmt_age(ts: float | None) -> str:
    if not ts:
        return "-"
    age = time.time() - ts
    return f"{age:.0f}s ago" if age < 120 else f"{age / 60:.0f}m ago"


def _client(token: str | None) -> httpx.Client:
    return httpx.Client(timeout=5.0, headers={"Authorization": f"Bearer {token}"} if token else {})


def auth_command(args: argparse.Namespace) -> int:
    from .auth import AuthError, AuthStore

    store = AuthStore(Path(args.data_dir) / "auth")
    try:
        if args.auth_command == "init":
            print(f"replicator NATS key: {store.init()}")
        elif args.auth_command == "add-agent":
            readers = [r for r in args.share_on_demand_with.split(",") if r]
            seed, token = store.add_agent(args.agent_id, on_demand_readers=readers)
            print(f"agent {args.agent_id}:")
            print(f"  NATS nkey seed file: {store.root / 'agents' / (args.agent_id + '.nk')}")
            print("    (give it to the agent as COMMANDER_NATS_SEED_FILE, or its content as COMMANDER_NATS_SEED)")
            print(f"  API token (shown once; COMMANDER_HTPC_TOKEN): {token}")
            del seed
        elif args.auth_command == "share":
            store.set_on_demand_readers(args.agent_id, [r for r in args.readers.split(",") if r])
            print(f"{args.agent_id}: on_demand tables shared with {args.readers or 'nobody'}")
        elif args.auth_command == "add-operator":
            print(f"operator {args.name} API token (shown once): {store.add_operator(args.name)}")
        elif args.auth_command == "revoke":
            if not store.revoke(args.name):
                print(f"replicator auth: nobody named {args.name!r}", file=sys.stderr)
                return 1
            print(f"revoked {args.name}")
        elif args.auth_command == "list":
            for agent_id, entry in sorted(store.data["agents"].items()):
                shared = ",".join(entry.get("on_demand_readers", [])) or "-"
                print(f"agent     {agent_id:<40} nkey {entry['nkey'][:12]}…  on_demand shared with: {shared}")
            for name in sorted(store.data["operators"]):
                print(f"operator  {name}")
        elif args.auth_command == "nats-config":
            print(store.nats_authorization_conf(), end="")
    except (AuthError, ValueError) as exc:
        print(f"replicator auth: {exc}", file=sys.stderr)
        return 2
    return 0


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
    rows = [
        (
            a["agent_id"],
            (a["epoch"] or "-")[:8],
            str(a["watermark"]),
            str(a["lag_changes"]),
            _fmt_age(a["last_seen"]),
            ",".join(a["tables"].get("always", []) + [f"{t}(on_demand)" for t in a["tables"].get("on_demand", [])])
            or "-",
            str(a["dead_letters"]),
            a["blocked"] or "",
        )
        for a in agents
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    if not rows:
        print("(no agents yet)")
    return 0


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


# ------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="replicator", description="Commander OS agent storage: the HTPC service")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data-dir", default=env("DATA_DIR", "data"), help="data directory [REPLICATOR_DATA_DIR]")
        p.add_argument(
            "--nats-url",
            default=env("NATS_URL"),
            help="existing NATS server/cluster "
            "(comma-separated); default: run an embedded nats-server [REPLICATOR_NATS_URL]",
        )
        p.add_argument("--nats-host", default=env("NATS_HOST"), help="embedded server listen address")
        p.add_argument("--nats-port", type=int, default=env("NATS_PORT"), help="embedded server port")
        p.add_argument("--durable", default=env("DURABLE"), help="durable consumer name [REPLICATOR_DURABLE]")
        p.add_argument(
            "--stream-replicas",
            type=int,
            default=env("STREAM_REPLICAS"),
            help="replicas when creating AGENT_CHANGES (3 on a cluster)",
        )
        p.add_argument(
            "--log-level", default=env("LOG_LEVEL", "warning"), choices=["debug", "info", "warning", "error"]
        )
        p.add_argument(
            "--nats-seed-file",
            default=env("NATS_SEED_FILE"),
            help="the replicator's nkey seed for a secured external NATS [REPLICATOR_NATS_SEED_FILE]",
        )
        p.add_argument("--nats-tls-ca", default=env("NATS_TLS_CA"), help="CA of the NATS server's certificate")

    p_serve = sub.add_parser("serve", help="run the HTPC: consumer, central store, relay API")
    common(p_serve)
    p_serve.add_argument("--host", default=env("HOST", "127.0.0.1"), help="HTTP listen address [REPLICATOR_HOST]")
    p_serve.add_argument("--port", type=int, default=env("PORT", "8000"), help="HTTP port [REPLICATOR_PORT]")
    p_serve.add_argument("--nats-advertise", default=env("NATS_ADVERTISE"), help="NATS URL given to agents")
    p_serve.add_argument(
        "--auth",
        default=env("AUTH", "auto"),
        choices=["auto", "on", "off"],
        help="NATS credentials + API tokens; auto = on unless --host is loopback [REPLICATOR_AUTH]",
    )
    p_serve.add_argument("--tls-cert", default=env("TLS_CERT"), help="serve the API over HTTPS with this certificate")
    p_serve.add_argument("--tls-key", default=env("TLS_KEY"), help="private key of --tls-cert")
    p_serve.add_argument("--nats-tls-cert", default=env("NATS_TLS_CERT"), help="TLS certificate for embedded NATS")
    p_serve.add_argument("--nats-tls-key", default=env("NATS_TLS_KEY"), help="private key of --nats-tls-cert")

    p_rebuild = sub.add_parser("rebuild", help="rebuild the central store from the stream (serve must be stopped)")
    common(p_rebuild)

    p_auth = sub.add_parser("auth", help="per-agent NATS credentials and API tokens (in DATA_DIR/auth)")
    p_auth.add_argument("--data-dir", default=env("DATA_DIR", "data"), help="data directory [REPLICATOR_DATA_DIR]")
    auth_sub = p_auth.add_subparsers(dest="auth_command", required=True)
    auth_sub.add_parser("init", help="create the replicator's own NATS key")
    p_add = auth_sub.add_parser("add-agent", help="new NATS key + API token for an agent (prints them once)")
    p_add.add_argument("agent_id")
    p_add.add_argument(
        "--share-on-demand-with", default="", help="comma-separated agents that may query its on_demand tables"
    )
    p_op = auth_sub.add_parser("add-operator", help="new operator API token (prints it once)")
    p_op.add_argument("name")
    p_share = auth_sub.add_parser("share", help="let other agents query this agent's on_demand tables")
    p_share.add_argument("agent_id")
    p_share.add_argument("--with", dest="readers", default="", help="comma-separated agent ids (empty: nobody)")
    p_rev = auth_sub.add_parser("revoke", help="remove an agent's or operator's credentials")
    p_rev.add_argument("name")
    auth_sub.add_parser("list", help="who has credentials")
    auth_sub.add_parser("nats-config", help="print the nats-server authorization block (for an external server)")

    for name, help_text in (("status", "agents, lag, backlog, dead letters"), ("dead-letters", "list dead letters")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--url", default=env("URL", "http://127.0.0.1:8000"), help="HTPC URL [REPLICATOR_URL]")
        p.add_argument("--token", default=env("TOKEN"), help="operator token when auth is on [REPLICATOR_TOKEN]")
        if name == "dead-letters":
            p.add_argument("--agent")
            p.add_argument("--limit", type=int, default=50)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "status":
        return status(args.url.rstrip("/"), args.token)
    if args.command == "dead-letters":
        return dead_letters(args.url.rstrip("/"), args.agent, args.limit, args.token)
    if args.command == "auth":
        return auth_command(args)
    try:
        settings = _settings(args)
    except ValueError as exc:
        print(f"replicator: invalid settings: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    with data_dir_lock(settings.data_dir):
        try:
            if args.command == "serve":
                asyncio.run(serve(settings))
                return 0
            return asyncio.run(rebuild(settings))
        except KeyboardInterrupt:
            return 130
        except Exception as exc:
            from .errors import ReplicatorError

            if isinstance(exc, ReplicatorError):
                print(f"replicator: {exc}", file=sys.stderr)
                return 1
            raise


if __name__ == "__main__":
    sys.exit(main())
