"""NATS subjects and inbox prefixes: the names NATS permissions are written against.

They are a security contract: `replicator auth` grants an agent's key exactly
its own subjects and its own inbox prefix, so every name is spelled here once.
"""

from __future__ import annotations

#: Every agent's change records (each agent's key may publish only to its own).
CHANGES_SUBJECTS = "agents.*.changes"
#: Rows written through the relay HTTP API on an agent's behalf: only the replicator's key may publish here.
RELAY_SUBJECTS = "agents.*.relay"
#: Where the replicator's replies arrive (its key may subscribe only there).
REPLICATOR_INBOX = "_INBOX_replicator"


def changes_subject(agent_id: str) -> str:
    """Where agent `agent_id` publishes its change records."""
    return f"agents.{agent_id}.changes"


def relay_subject(agent_id: str) -> str:
    """Where the HTPC publishes rows written over HTTP for agent `agent_id` (never the agent's own key)."""
    return f"agents.{agent_id}.relay"


def query_subject(agent_id: str) -> str:
    """Where the live agent answers on_demand queries forwarded by the HTPC."""
    return f"agents.{agent_id}.query"


def agent_inbox_prefix(agent_id: str) -> str:
    """The reply inbox prefix only agent `agent_id` may subscribe to."""
    return f"_INBOX_{agent_id}"


def subject_agent(subject: str) -> str | None:
    """The agent id of a change-record subject (`agents.<id>.changes`), or None for any other subject."""
    parts = subject.split(".")
    if len(parts) == 3 and parts[0] == "agents" and parts[2] == "changes" and parts[1]:
        return parts[1]
    return None


def relay_subject_agent(subject: str) -> str | None:
    """The agent id of a relay subject (`agents.<id>.relay`), or None for any other subject."""
    parts = subject.split(".")
    if len(parts) == 3 and parts[0] == "agents" and parts[2] == "relay" and parts[1]:
        return parts[1]
    return None
