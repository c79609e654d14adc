"""Agent ids: the one name an agent has on the wire, on disk and in SQL.

They become NATS subject tokens (see subjects.py), file names and SQL schema
names, so the alphabet is deliberately narrow.
"""

from __future__ import annotations

import re

from .errors import InvalidAgentId

AGENT_ID_PATTERN = r"[a-z0-9][a-z0-9_-]{0,63}"
_AGENT_ID_RE = re.compile(AGENT_ID_PATTERN)


def is_valid_agent_id(value: object) -> bool:
    return isinstance(value, str) and _AGENT_ID_RE.fullmatch(value) is not None


def validate_agent_id(value: object) -> str:
    """Return `value` if it is a valid agent id, else raise InvalidAgentId."""
    if not is_valid_agent_id(value):
        raise InvalidAgentId(
            f"invalid agent id {value!r}: must match {AGENT_ID_PATTERN} "
            "(lowercase letters, digits, '_' and '-', at most 64 characters)"
        )
    assert isinstance(value, str)
    return value
