"""Request bodies of the relay API (pydantic models; unknown fields are ignored)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ImmediateWrite(BaseModel):
    """`POST /relay/immediate`: one row for one agent's table (no `agent_id`: see relay_writer.attribute)."""

    model_config = ConfigDict(extra="ignore")
    agent_id: str | None = Field(None, max_length=64)
    table: str = Field(max_length=128)
    data: dict[str, Any]
    timestamp: float | None = None


class BatchItem(BaseModel):
    """One row of a batch; `agent_id` defaults to the batch's (or the agent token's)."""

    model_config = ConfigDict(extra="ignore")
    agent_id: str | None = Field(None, max_length=64)
    table: str = Field(max_length=128)
    data: dict[str, Any]


class BatchWrite(BaseModel):
    """`POST /relay/batch`: several rows, possibly of several agents (rows naming none: relay_writer.attribute)."""

    model_config = ConfigDict(extra="ignore")
    agent_id: str | None = Field(None, max_length=64)
    records: list[BatchItem] = Field(min_length=1)


class QueryRequest(BaseModel):
    """`POST /relay/query`: read-only SQL over an agent's central copy."""

    model_config = ConfigDict(extra="ignore")
    agent_id: str = Field(max_length=64)
    query: str = Field(min_length=1, max_length=100_000)
    params: list[Any] | dict[str, Any] | None = None
    min_seq: int | None = Field(None, ge=0)
    epoch: str | None = Field(None, max_length=64)
    timeout_ms: int | None = Field(None, ge=1, le=60_000)
    max_rows: int | None = Field(None, ge=1)


class ResyncRequest(BaseModel):
    """`POST /relay/agents/{agent_id}/resync`: why (optional; the body may be empty)."""

    model_config = ConfigDict(extra="ignore")
    reason: str | None = Field(None, max_length=500)
