"""`replicator` command line: the argument parser and the dispatch to each command's module.

serve (serve.py), rebuild (rebuild.py), restore (backup.py), auth (auth_cli.py),
stream (stream_admin.py: the AGENT_CHANGES stream on NATS, no `nats` tool needed);
status, dead-letters, resync and backup talk to a running HTPC over its relay
API (remote.py, backup.py); log lines are formatted by log_format.py. An
unknown argument is reported with the usage of the command it was given to.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path
from typing import Any

from ._version import __version__
from .data_dir import DataDirInUse
from .errors import ReplicatorError
from .log_format import setup_logging
from .settings import Settings, env


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The Settings of `serve` or `rebuild` from parsed arguments (whose defaults come from REPLICATOR_*)."""
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
        *(name for name, _type, _help in LIMIT_FLAGS),
        *(name for name, _flag, _type, _help in RECOVERY_FLAGS),
    ):
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    return Settings(**values)


#: `serve` flags that bound what one agent, token or query may take: (Settings field, type, help).
LIMIT_FLAGS: list[tuple[str, type, str]] = [
    ("max_record_bytes", int, "largest message the stream accepts (bytes)"),
    ("max_agent_bytes", int, "largest central copy of one agent (bytes)"),
    ("max_held_per_agent", int, "records of one agent that may wait for a missing one before it is blocked"),
    ("dead_letter_payload_bytes", int, "bytes of each dead letter's payload kept"),
    ("dead_letters_per_agent", int, "dead letters kept per agent (oldest pruned)"),
    ("query_max_rows", int, "rows in one /relay/query answer"),
    ("query_timeout_ms", int, "timeout of a query that names none (a request may ask up to 30 s)"),
    ("query_max_result_bytes", int, "bytes of one /relay/query answer"),
    ("query_max_value_bytes", int, "bytes of a value a query's functions may produce"),
    ("query_max_concurrent", int, "queries one token (or, without auth, one client) may run at once"),
    ("query_pool_size", int, "idle pooled query connections (each holds 3 files per database it reads)"),
    ("http_request_timeout_s", float, "seconds a client has to send its request headers and body"),
    ("http_max_header_bytes", int, "bytes of a request's line and headers"),
    ("http_max_connections", int, "open HTTP connections at once"),
    ("feed_max_subscribers", int, "live /relay/changes subscribers at once (SSE streams and long-polls)"),
]


def duration(text: str) -> float:
    """Seconds from `90`, `90s`, `15m`, `12h` or `7d` (an argparse type)."""
    units = {"s": 1.0, "m": 60.0, "h": 3_600.0, "d": 86_400.0}
    text = text.strip().lower()
    scale = units.get(text[-1:], 0.0)
    try:
        value = float(text[:-1] if scale else text) * (scale or 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 90, 15m, 12h, 7d)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration cannot be negative")
    return value


#: `serve` flags of recovery and bounded disk: (Settings field, flag, type, help).
RECOVERY_FLAGS: list[tuple[str, str, Any, str]] = [
    ("stream_max_age_s", "stream-max-age", duration, "how long AGENT_CHANGES keeps a message (0: for ever)"),
    ("stream_max_bytes", "stream-max-bytes", int, "bytes AGENT_CHANGES may hold (-1: no bound)"),
    ("snapshot_interval_s", "snapshot-interval", duration, "time between snapshots of the central store (0: never)"),
    ("snapshots_keep", "snapshots-keep", int, "snapshots kept (the oldest pruned)"),
    ("rebuild_backups_keep", "rebuild-backups-keep", int, "rebuild-backup-* directories kept"),
    (
        "stuck_after_s",
        "stuck-after",
        duration,
        "how long the central store may be behind the stream without moving before /health and /ready say degraded",
    ),
    ("resync_after_s", "resync-after", duration, "how long a missing change is awaited before the agent is resynced"),
    ("default_agent_id", "default-agent-id", str, "agent id of relay writes that name none (the guide's batch_write)"),
]


# ------------------------------------------------------------------------------ main
def _leaf(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Mark `p` as the parser whose usage an unknown argument is reported with (see main)."""
    p.set_defaults(_parser=p)
    return p


def _remote(p: argparse.ArgumentParser) -> None:
    """--url and --token of the commands that talk to a running HTPC."""
    p.add_argument("--url", default=env("URL", "http://127.0.0.1:8000"), help="HTPC URL [REPLICATOR_URL]")
    p.add_argument("--token", default=env("TOKEN"), help="operator token when auth is on [REPLICATOR_TOKEN]")


def _replicas(text: str) -> int:
    """A stream replica count, 1..5 (an argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of replicas") from None
    if not 1 <= value <= 5:
        raise argparse.ArgumentTypeError(f"{value}: JetStream keeps 1 to 5 replicas of a stream")
    return value


def _stream_parsers(sub: Any) -> None:
    """`replicator stream info|create|set-replicas`: the AGENT_CHANGES stream, on the NATS `serve` uses."""
    p_stream = _leaf(
        sub.add_parser(
            "stream",
            help="the AGENT_CHANGES stream: info, create, set-replicas (no `nats` tool needed)",
            description="Look at and manage the AGENT_CHANGES stream on the NATS server or cluster the "
            "replicator uses (--nats-url; without it, the embedded server of --data-dir's running serve). "
            "Exit status: 0 done, 1 a named error (NATS unreachable, no stream, a change JetStream refused), "
            "2 bad arguments.",
        )
    )
    stream_sub = p_stream.add_subparsers(dest="stream_command", required=True)

    def connection(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--nats-url",
            default=env("NATS_URL"),
            help="the NATS server/cluster holding the stream (comma-separated) [REPLICATOR_NATS_URL]",
        )
        p.add_argument(
            "--data-dir",
            default=env("DATA_DIR", "data"),
            help="without --nats-url: use this data directory's embedded server; its `replicator auth` key "
            "is used when there is no --nats-seed-file [REPLICATOR_DATA_DIR]",
        )
        p.add_argument(
            "--nats-seed-file",
            default=env("NATS_SEED_FILE"),
            help="the replicator's nkey seed for a secured NATS [REPLICATOR_NATS_SEED_FILE]",
        )
        p.add_argument("--nats-tls-ca", default=env("NATS_TLS_CA"), help="CA of the NATS server's certificate")
        p.add_argument("--timeout", type=duration, default=10.0, help="seconds to keep trying to reach NATS")
        p.add_argument("--json", action="store_true", help="JSON instead of a table")
        p.add_argument("--log-level", default=env("LOG_LEVEL", "error"), choices=["debug", "info", "warning", "error"])

    def wait(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--wait",
            type=duration,
            default=60.0,
            help="how long to wait for every replica to be caught up before reporting (default 60s)",
        )

    p_info = _leaf(stream_sub.add_parser("info", help="the stream's configuration, state, leader and replicas"))
    connection(p_info)
    p_create = _leaf(
        stream_sub.add_parser(
            "create",
            help="create the stream as `replicator serve` would (before the first agent connects)",
            description="Do to AGENT_CHANGES what `replicator serve` does when it starts: create it if it is "
            "missing, with --replicas; then give it at least that many replicas, both subjects, a bound on one "
            "message and the HTPC's retention. Other settings of an existing stream are left alone.",
        )
    )
    connection(p_create)
    wait(p_create)
    p_create.add_argument(
        "--replicas",
        dest="stream_replicas",
        type=_replicas,
        default=env("STREAM_REPLICAS"),
        help="replicas (3 on a 3-node cluster) [default 1; REPLICATOR_STREAM_REPLICAS]",
    )
    for name, flag, kind, help_text in RECOVERY_FLAGS:
        if name in ("stream_max_age_s", "stream_max_bytes"):
            _settings_flag(p_create, name, flag, kind, help_text)
    p_create.add_argument(
        "--max-record-bytes",
        type=int,
        default=env("MAX_RECORD_BYTES"),
        help=f"largest message the stream accepts [default {Settings.model_fields['max_record_bytes'].default}; "
        "REPLICATOR_MAX_RECORD_BYTES]",
    )
    p_set = _leaf(
        stream_sub.add_parser(
            "set-replicas",
            help="raise or lower the replicas of the existing stream (data is kept and copied)",
            description="Set the replicas of the existing AGENT_CHANGES (JetStream copies the messages to new "
            "replicas), wait until every replica is caught up (--wait), and show the stream.",
        )
    )
    p_set.add_argument("replicas", type=_replicas, help="1 to 5 (at most the number of JetStream servers)")
    connection(p_set)
    wait(p_set)


def _stream(args: argparse.Namespace) -> int:
    from agent_client import CredentialsError

    from .stream_admin import stream_command

    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"replicator: invalid settings: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    try:
        return stream_command(
            args.stream_command,
            settings,
            replicas=getattr(args, "replicas", None),
            as_json=args.json,
            wait_s=getattr(args, "wait", 0.0),
            timeout_s=args.timeout,
        )
    except KeyboardInterrupt:
        return 130
    except (ReplicatorError, CredentialsError) as exc:
        print(f"replicator: {exc}", file=sys.stderr)
        return 1


def _settings_flag(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup, name: str, flag: str, kind: type, help_text: str
) -> None:
    """`--flag` for the Settings field `name`, defaulting to its REPLICATOR_* variable; the help names both."""
    variable = flag.replace("-", "_").upper()
    parser.add_argument(
        f"--{flag}",
        dest=name,
        type=kind,
        default=env(variable),
        help=f"{help_text} [default {Settings.model_fields[name].default}; REPLICATOR_{variable}]",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="replicator", description="Commander OS agent storage: the HTPC service")
    parser.add_argument("--version", action="version", version=f"replicator {__version__}")
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

    p_serve = _leaf(sub.add_parser("serve", help="run the HTPC: consumer, central store, relay API"))
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
    limits = p_serve.add_argument_group("limits", "what one agent, token or query may take (README: Security)")
    for name, kind, help_text in LIMIT_FLAGS:
        flag = name.replace("_", "-")
        default = Settings.model_fields[name].default
        limits.add_argument(
            f"--{flag}",
            type=kind,
            default=env(name.upper()),
            help=f"{help_text} [default {default}; REPLICATOR_{name.upper()}]",
        )

    recovery = p_serve.add_argument_group("recovery", "retention, snapshots, resync (README: Operations)")
    for name, flag, kind, help_text in RECOVERY_FLAGS:
        _settings_flag(recovery, name, flag, kind, help_text)

    p_rebuild = _leaf(
        sub.add_parser("rebuild", help="rebuild the central store from the stream (serve must be stopped)")
    )
    common(p_rebuild)
    p_rebuild.add_argument("--full", action="store_true", help="ignore snapshots: replay the whole stream")

    p_restore = _leaf(
        sub.add_parser("restore", help="restore the central store from a `replicator backup` (serve must be stopped)")
    )
    common(p_restore)
    p_restore.add_argument("--from", dest="source", required=True, help="the backup directory")
    for p in (p_rebuild, p_restore):
        p.add_argument(
            "--rebuild-backups-keep",
            dest="rebuild_backups_keep",
            type=int,
            default=env("REBUILD_BACKUPS_KEEP"),
            help="rebuild-backup-* directories kept [default 2; REPLICATOR_REBUILD_BACKUPS_KEEP]",
        )

    p_auth = _leaf(sub.add_parser("auth", help="per-agent NATS credentials and API tokens (in DATA_DIR/auth)"))
    p_auth.add_argument("--data-dir", default=env("DATA_DIR", "data"), help="data directory [REPLICATOR_DATA_DIR]")
    auth_sub = p_auth.add_subparsers(dest="auth_command", required=True)
    _leaf(auth_sub.add_parser("init", help="create the replicator's own NATS key"))
    p_add = _leaf(auth_sub.add_parser("add-agent", help="new NATS key + API token for an agent (prints them once)"))
    p_add.add_argument("agent_id")
    p_add.add_argument(
        "--share-on-demand-with", default="", help="comma-separated agents that may query its on_demand tables"
    )
    p_op = _leaf(auth_sub.add_parser("add-operator", help="new operator API token (prints it once)"))
    p_op.add_argument("name")
    p_share = _leaf(auth_sub.add_parser("share", help="let other agents query this agent's on_demand tables"))
    p_share.add_argument("agent_id")
    p_share.add_argument("--with", dest="readers", default="", help="comma-separated agent ids (empty: nobody)")
    p_rev = _leaf(auth_sub.add_parser("revoke", help="remove an agent's or operator's credentials"))
    p_rev.add_argument("name")
    _leaf(auth_sub.add_parser("list", help="who has credentials"))
    _leaf(auth_sub.add_parser("nats-config", help="print the nats-server authorization block (for an external server)"))

    p_status = _leaf(sub.add_parser("status", help="agents, lag, blocked, resyncs, dead letters"))
    _remote(p_status)

    p_dead = _leaf(
        sub.add_parser(
            "dead-letters",
            help="list dead letters, or retry / discard one",
            description="Without an action: list dead letters (newest first). `retry ID` applies one again "
            "(after its cause was fixed); `discard ID` drops it for good (one in an agent's sequence "
            "requests a resync of that agent). Each prints the consequence.",
        )
    )
    _remote(p_dead)
    p_dead.add_argument("action", nargs="?", choices=["list", "retry", "discard"], default="list")
    p_dead.add_argument("id", nargs="?", type=int, help="the dead letter's id (#N in the listing)")
    p_dead.add_argument("--agent", help="list: only this agent's")
    p_dead.add_argument("--limit", type=int, default=50, help="list: at most this many")

    p_resync = _leaf(
        sub.add_parser(
            "resync",
            help="replace an agent's central copy with a fresh full copy from the agent",
            description="Ask AGENT_ID for a fresh full copy of its replicated tables; its central copy is "
            "replaced atomically. Waits (on the HTPC) while the agent is offline.",
        )
    )
    _remote(p_resync)
    p_resync.add_argument("agent_id")
    p_resync.add_argument("--reason", default=None, help="why (shown in `replicator status` and the log)")

    p_backup = _leaf(sub.add_parser("backup", help="an online, consistent backup of a running HTPC's central store"))
    _remote(p_backup)
    p_backup.add_argument("--to", dest="dest", required=True, help="directory to write the backup into")
    _stream_parsers(sub)
    return parser


def _remote_command(args: argparse.Namespace) -> int:
    from . import remote

    url = args.url.rstrip("/")
    if args.command == "status":
        return remote.status(url, args.token)
    if args.command == "resync":
        return remote.resync(url, args.agent_id, args.reason, args.token)
    if args.command == "backup":
        from .backup import backup

        return backup(url, args.token, Path(args.dest))
    if args.action == "list":
        return remote.dead_letters(url, args.agent, args.limit, args.token)
    return remote.dead_letter_action(url, args.action, args.id, args.token)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parsed arguments; an unknown one is reported with its own command's usage (exit 2)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    owner: argparse.ArgumentParser = getattr(args, "_parser", parser)
    if unknown:
        owner.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "dead-letters":
        if args.action != "list" and args.id is None:
            owner.error(f"dead-letters {args.action} needs the dead letter's ID")
        if args.action == "list" and args.id is not None:
            owner.error("an ID goes with `retry` or `discard`")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command in ("status", "dead-letters", "resync", "backup"):
        return _remote_command(args)
    if args.command == "auth":
        from .auth_cli import auth_command

        return auth_command(args)
    if args.command == "stream":
        return _stream(args)
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"replicator: invalid settings: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    with contextlib.ExitStack() as owned:
        try:
            owned.enter_context(settings.data.lock())
        except DataDirInUse as exc:
            raise SystemExit(f"replicator: {exc}") from None
        try:
            if args.command == "serve":
                from .serve import run_serve

                run_serve(settings)
                return 0
            if args.command == "restore":
                from .backup import restore

                return asyncio.run(restore(settings, Path(args.source)))
            from .rebuild import rebuild

            return asyncio.run(rebuild(settings, full=args.full))
        except KeyboardInterrupt:
            return 130
        except ReplicatorError as exc:
            print(f"replicator: {exc}", file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
