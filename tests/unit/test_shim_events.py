"""Task events: topics, envelopes and the Any type URLs containerd expects."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from berth.core.api.containerd import events as ev
from berth.core.events import typeurl
from berth.core.shim import publisher


@pytest.mark.parametrize(("event", "topic", "type_url"), [
    (ev.TaskCreate(container_id="c"), "/tasks/create", "containerd.events.TaskCreate"),
    (ev.TaskStart(container_id="c"), "/tasks/start", "containerd.events.TaskStart"),
    (ev.TaskOom(container_id="c"), "/tasks/oom", "containerd.events.TaskOOM"),
    (ev.TaskExit(container_id="c"), "/tasks/exit", "containerd.events.TaskExit"),
    (ev.TaskDelete(container_id="c"), "/tasks/delete", "containerd.events.TaskDelete"),
    (ev.TaskExecAdded(container_id="c"), "/tasks/exec-added",
     "containerd.events.TaskExecAdded"),
    (ev.TaskExecStarted(container_id="c"), "/tasks/exec-started",
     "containerd.events.TaskExecStarted"),
    (ev.TaskPaused(container_id="c"), "/tasks/paused", "containerd.events.TaskPaused"),
    (ev.TaskResumed(container_id="c"), "/tasks/resumed", "containerd.events.TaskResumed"),
    (ev.TaskCheckpointed(container_id="c"), "/tasks/checkpointed",
     "containerd.events.TaskCheckpointed"),
])
def test_topics_and_type_urls(event, topic, type_url):
    assert publisher.topic_of(event) == topic
    at = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    env = publisher.envelope("ns1", event, at)
    assert (env.namespace, env.topic, env.timestamp) == ("ns1", topic, at)
    assert env.event.type_url == type_url
    assert typeurl.unmarshal_any(env.event) == event


def test_unknown_events_get_containerds_unknown_topic():
    assert publisher.topic_of(ev.ContainerCreate()) == "/runtime/task/unknown"


def test_exit_event_payload_round_trips():
    at = datetime(2024, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)
    event = ev.TaskExit(container_id="c", id="e1", pid=42, exit_status=137, exited_at=at)
    env = publisher.envelope("n", event)
    decoded = ev.TaskExit().parse(env.event.value)
    assert (decoded.container_id, decoded.id, decoded.pid, decoded.exit_status,
            decoded.exited_at) == ("c", "e1", 42, 137, at)


async def test_publish_after_close_is_dropped_not_raised():
    p = publisher.Publisher("", "ns")
    p.close()
    p.publish(ev.TaskStart(container_id="c"))  # logged, not raised
    await p.run()  # nothing queued: returns at once
    assert p.finished.is_set() and p.forwarded == 0
