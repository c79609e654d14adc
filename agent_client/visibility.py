"""The guide's three visibility levels for an agent's tables."""

from __future__ import annotations

from enum import StrEnum

from .errors import InvalidVisibility


class Visibility(StrEnum):
    ALWAYS = "always"  # replicated as it commits
    ON_DEMAND = "on_demand"  # stays local; the HTPC forwards queries to the live agent
    PRIVATE = "private"  # never leaves the agent


def parse_visibility(value: object) -> Visibility:
    if isinstance(value, str) and value in Visibility._value2member_map_:
        return Visibility(value)
    raise InvalidVisibility(f"invalid visibility {value!r}: expected one of {', '.join(v.value for v in Visibility)}")
