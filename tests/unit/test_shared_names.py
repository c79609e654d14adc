"""Names and policies both ends share, defined once: subjects, inboxes, consumer config, backoff, seeds."""

from __future__ import annotations

from pathlib import Path

import pytest
from nats.js.api import AckPolicy, DeliverPolicy

from agent_client import (
    CHANGES_SUBJECTS,
    RELAY_SUBJECTS,
    REPLICATOR_INBOX,
    STREAM_SUBJECTS,
    Backoff,
    CredentialsError,
    agent_inbox_prefix,
    changes_subject,
    consumer_config,
    query_subject,
    read_seed,
    relay_subject,
    relay_subject_agent,
    subject_agent,
)
from agent_client.stream import CONSUMER_ACK_WAIT_S, CONSUMER_MAX_ACK_PENDING
from replicator.auth import AuthStore


def test_subjects_round_trip_and_foreign_subjects_name_no_agent() -> None:
    assert changes_subject("a-1") == "agents.a-1.changes"
    assert query_subject("a-1") == "agents.a-1.query"
    assert relay_subject("a-1") == "agents.a-1.relay"
    assert subject_agent(changes_subject("a-1")) == "a-1" == relay_subject_agent(relay_subject("a-1"))
    assert subject_agent(relay_subject("a-1")) is None and relay_subject_agent(changes_subject("a-1")) is None
    for subject in (
        "agents.a-1.query",
        "agents..changes",
        "agents.a.b.changes",
        "other.a.changes",
        "agents..relay",
        "",
    ):
        assert subject_agent(subject) is None
        assert relay_subject_agent(subject) is None
    assert STREAM_SUBJECTS == [CHANGES_SUBJECTS, RELAY_SUBJECTS] == ["agents.*.changes", "agents.*.relay"]
    assert agent_inbox_prefix("a-1") == "_INBOX_a-1" != REPLICATOR_INBOX


def test_nats_permissions_are_written_with_the_same_names(tmp_path: Path) -> None:
    store = AuthStore(tmp_path / "auth")
    store.add_agent("a-1")
    conf = store.nats_authorization_conf()
    for name in (
        changes_subject("a-1"),
        query_subject("a-1"),
        agent_inbox_prefix("a-1") + ".>",
        CHANGES_SUBJECTS,
        RELAY_SUBJECTS,
    ):
        assert f'"{name}"' in conf
    assert f'"{relay_subject("a-1")}"' not in conf  # only the replicator's key may publish relay writes
    assert f'"{REPLICATOR_INBOX}.>"' in conf


def test_one_consumer_config_for_serve_and_rebuild() -> None:
    serve = consumer_config("replicator")
    rebuild = consumer_config("replicator", deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=42)
    for cfg in (serve, rebuild):
        assert cfg.ack_policy is AckPolicy.EXPLICIT
        assert (cfg.ack_wait, cfg.max_ack_pending, cfg.max_deliver) == (
            CONSUMER_ACK_WAIT_S,
            CONSUMER_MAX_ACK_PENDING,
            -1,
        )
        assert cfg.filter_subject is None and not cfg.filter_subjects  # every subject of the stream
    assert (serve.deliver_policy, serve.opt_start_seq) == (DeliverPolicy.ALL, None)
    assert (rebuild.deliver_policy, rebuild.opt_start_seq) == (DeliverPolicy.BY_START_SEQUENCE, 42)


def test_backoff_doubles_to_its_cap_and_resets() -> None:
    backoff = Backoff(0.25, 2.0, jitter=0.0)
    assert [backoff.next() for _ in range(6)] == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    backoff.reset()
    assert backoff.next() == 0.25
    jittered = Backoff(1.0, 1.0, jitter=0.5)
    assert all(0.5 <= jittered.next() < 1.5 for _ in range(200))
    with pytest.raises(ValueError):
        Backoff(0.0, 1.0)


def test_seed_from_value_or_first_line_of_file(tmp_path: Path) -> None:
    seed_file = tmp_path / "agent.nk"
    seed_file.write_text("\n  SUAEXAMPLE  \nSECOND\n")
    assert read_seed(" SUVALUE \n") == "SUVALUE"
    assert read_seed(None, seed_file) == "SUAEXAMPLE"
    assert read_seed(None, None) is None
    with pytest.raises(CredentialsError, match=r"missing\.nk") as info:
        read_seed(None, tmp_path / "missing.nk")
    assert isinstance(info.value.__cause__, FileNotFoundError)
