"""`replicator auth ...`: issue, share, list and revoke credentials in the data directory's auth store."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .auth import AuthError, AuthStore
from .data_dir import DataDir


def auth_command(args: argparse.Namespace) -> int:
    store = AuthStore(DataDir(Path(args.data_dir)).auth)
    try:
        if args.auth_command == "init":
            print(f"replicator NATS key: {store.init()}")
        elif args.auth_command == "add-agent":
            readers = [r for r in args.share_on_demand_with.split(",") if r]
            _seed, token = store.add_agent(args.agent_id, on_demand_readers=readers)
            print(f"agent {args.agent_id}:")
            print(f"  NATS nkey seed file: {store.agent_seed_file(args.agent_id)}")
            print("    (give it to the agent as COMMANDER_NATS_SEED_FILE, or its content as COMMANDER_NATS_SEED)")
            print(f"  API token (shown once; COMMANDER_HTPC_TOKEN): {token}")
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
