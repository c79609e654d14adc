"""How the consumer carries out a verdict in JetStream, and what it recognises as not a record at all."""

from __future__ import annotations

import orjson
import pytest

from replicator.consumer import _Action, _Applied, _Commit, _is_pub_ack, _nats_action
from replicator.sequencer import Verdict


@pytest.mark.parametrize(
    ("verdict", "applied", "commit", "action"),
    [
        (Verdict.DEAD_LETTER, None, None, _Action.TERM),
        (Verdict.DEAD_LETTER, _Applied.FAILED, None, _Action.NAK),  # not stored: it must come back
        (Verdict.DUPLICATE, None, None, _Action.ACK),
        (Verdict.STALE_EPOCH, None, None, _Action.ACK),
        (Verdict.GAP, None, None, _Action.NAK),  # not remembered (no stream sequence)
        (Verdict.GAP, _Applied.FAILED, None, _Action.NAK),
        (Verdict.GAP, _Applied.WRITTEN, _Commit.COMMITTED, _Action.ACK),  # remembered ahead: acked
        (Verdict.BLOCKED, _Applied.WRITTEN, _Commit.FAILED, _Action.NAK),
        (Verdict.APPLY, _Applied.WRITTEN, _Commit.COMMITTED, _Action.ACK),
        (Verdict.APPLY, _Applied.WRITTEN, _Commit.OPEN, _Action.HOLD),
        (Verdict.APPLY, _Applied.WRITTEN, _Commit.FAILED, _Action.NAK),
        (Verdict.NEW_EPOCH, _Applied.FAILED, None, _Action.NAK),
    ],
)
def test_verdicts_become_actions(
    verdict: Verdict, applied: _Applied | None, commit: _Commit | None, action: _Action
) -> None:
    assert _nats_action(verdict, applied, commit) is action


def test_pub_acks_and_api_errors_are_recognised_and_records_are_not() -> None:
    assert _is_pub_ack(b'{"stream":"AGENT_CHANGES","seq":42}')
    assert _is_pub_ack(b'{"stream":"AGENT_CHANGES","seq":42,"duplicate":true}')
    assert _is_pub_ack(b'{"error":{"code":503,"description":"no responders"}}')
    record = orjson.dumps({"v": 1, "kind": "changes", "agent_id": "a", "epoch": "e", "first_seq": 1, "last_seq": 1})
    for data in (record, b"", b"[1]", b"{", b"not json", b'{"stream": 1}'):
        assert not _is_pub_ack(data), data
