"""Event values: immutable, tagged, versioned; unknown types are loud."""

from __future__ import annotations

import datetime as dt
import uuid

import msgspec
import pytest

from ciretry.common import events as ev
from ciretry.common.ids import uuid7


def job(**kw: object) -> ev.JobFinished:
    fields: dict[str, object] = dict(
        source="gitlab",
        project="42",
        pipeline_id="7",
        job_id="1001",
        job_name="build",
        status="failed",
    )
    fields.update(kw)
    return ev.JobFinished(**fields)  # type: ignore[arg-type]


def test_body_carries_type_tag_and_round_trips() -> None:
    e = job(exit_code=137, labels=("a",), finished_at=dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    body = ev.encode(e)
    assert msgspec.json.decode(body)["type"] == "JobFinished"
    assert ev.decode_event("JobFinished", 1, body) == e


def test_events_are_immutable() -> None:
    with pytest.raises(AttributeError):
        job().status = "success"  # type: ignore[misc]


def test_unknown_type_or_version_is_an_error_not_a_drop() -> None:
    body = ev.encode(job())
    with pytest.raises(ev.UnknownEventType, match="NoSuchEvent"):
        ev.decode_event("NoSuchEvent", 1, body)
    with pytest.raises(ev.UnknownEventType, match="schema version 99"):
        ev.decode_event("JobFinished", 99, body)


def test_body_not_matching_schema_is_a_decode_error() -> None:
    with pytest.raises(ev.EventDecodeError, match="JobFinished"):
        ev.decode_event("JobFinished", 1, b'{"type":"JobFinished","source":"gitlab"}')
    with pytest.raises(ev.EventDecodeError):
        ev.decode_event("JobFinished", 1, b"not json")


def test_every_registered_type_has_a_topic_and_unique_key() -> None:
    types = ev.registered_types()
    assert ("JobFinished", 1) in types and ("VerdictReached", 1) in types
    assert all(cls.topic != "misc" for cls in types.values())


def test_wire_round_trip_keeps_envelope_and_metadata() -> None:
    rec = ev.RecordedEvent(
        event_id=uuid7(),
        stream="pipeline-gitlab-42-7",
        stream_version=3,
        position=99,
        recorded_at=dt.datetime.now(dt.UTC),
        data=job(),
        metadata=ev.Metadata(
            idempotency_key="k", traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01"
        ),
    )
    assert ev.from_wire(ev.to_wire(rec)) == rec


def test_wire_with_unknown_type_fails_loudly() -> None:
    payload = msgspec.json.encode(
        {
            "event_id": str(uuid.uuid4()),
            "stream": "s",
            "stream_version": 1,
            "position": 1,
            "recorded_at": "2026-01-01T00:00:00Z",
            "type": "Mystery",
            "schema_version": 1,
            "metadata": {},
            "data": {"type": "Mystery"},
        }
    )
    with pytest.raises(ev.UnknownEventType):
        ev.from_wire(payload)
    with pytest.raises(ev.EventDecodeError):
        ev.from_wire(b'{"event_id": 1}')


def test_uuid7_is_time_ordered_and_version_7() -> None:
    ids = [uuid7() for _ in range(5000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(i.version == 7 for i in ids)


def test_uuid7_random_bits_differ_in_a_forked_child() -> None:
    import os

    uuid7()  # the parent's pool of random bits is filled
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, uuid7().bytes)
        os._exit(0)
    os.close(write)
    child = os.read(read, 16)
    os.close(read)
    os.waitpid(pid, 0)
    # Same millisecond and counter are possible; the last 8 bytes (random) must differ.
    assert child[8:] != uuid7().bytes[8:]


def test_stream_names_and_subjects() -> None:
    assert ev.pipeline_stream("gitlab", "42", "7") == "pipeline-gitlab-42-7"
    assert ev.job_stream("gitlab", "42", "1001") == "job-gitlab-42-1001"
    assert ev.subject_for("ciretry", job()) == "ciretry.job.JobFinished"
