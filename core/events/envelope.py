"""Building and validating envelopes as containerd's exchange does."""

from __future__ import annotations

from datetime import UTC, datetime

import betterproto

from berth.core import errdefs, identifiers
from berth.core.api.containerd.services.events.v1 import Envelope
from berth.core.events import typeurl


def validate_topic(topic: str) -> None:
    def bad(why: str) -> errdefs.InvalidArgument:
        return errdefs.InvalidArgument(f'envelope topic "{topic}": {why}', raw=True)

    if topic == "":
        raise bad("must not be empty: invalid argument")
    if topic[0] != "/":
        raise bad("must start with '/': invalid argument")
    if len(topic) == 1:
        raise bad("must have at least one component: invalid argument")
    for component in topic[1:].split("/"):
        try:
            identifiers.validate(component)
        except errdefs.InvalidArgument as e:
            raise bad(f'failed validation on component "{component}": {e}') from None


def validate_envelope(env: Envelope) -> None:
    try:
        identifiers.validate(env.namespace)
    except errdefs.InvalidArgument as e:
        raise errdefs.InvalidArgument(
            f"event envelope has invalid namespace: {e}", raw=True
        ) from None
    validate_topic(env.topic)
    ts = env.timestamp
    if ts is None or ts.timestamp() <= 0:
        raise errdefs.InvalidArgument("timestamp must be set on forwarded event")


def make(namespace: str, topic: str, event: betterproto.Message) -> Envelope:
    validate_topic(topic)
    return Envelope(
        timestamp=datetime.now(UTC),
        namespace=namespace,
        topic=topic,
        event=typeurl.marshal_any(event),
    )


def adaptor(env: Envelope):  # noqa: ANN201 - a filters adaptor callable
    """Fields a filter can test: topic, namespace and event.<field> of the payload."""
    decoded: list[dict | None] = []

    def field(path: tuple[str, ...] | list[str]) -> tuple[str, bool]:
        if not path:
            return "", False
        head = path[0]
        if head == "topic":
            return env.topic, len(env.topic) > 0
        if head == "namespace":
            return env.namespace, len(env.namespace) > 0
        if head == "event" and len(path) > 1:
            if not decoded:
                decoded.append(typeurl.to_dict(env.event) if env.event else None)
            value: object = decoded[0]
            for key in path[1:]:
                if not isinstance(value, dict) or key not in value:
                    return "", False
                value = value[key]
            if isinstance(value, (dict, list)):
                return "", False
            return str(value), True
        return "", False

    return field
