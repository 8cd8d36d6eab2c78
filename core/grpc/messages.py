"""Cheaper attribute access for betterproto messages, with the same behaviour.

betterproto 2.0.0b7 routes every attribute read of a message through a Python
``__getattribute__`` that first looks up ``_group_current`` with an exception-raising
``super().__getattribute__`` (messages still in their dataclass ``__init__`` have
none), and its ``__setattr__`` asks ``hasattr(self, "_group_current")``, which goes
through that ``__getattribute__`` again: two raised AttributeErrors for every field a
constructor sets. On ``ctr run``'s path building and reading messages was ~9% of
berthd's CPU, most of it those exceptions.

The replacements below read the instance ``__dict__`` instead and otherwise do what
betterproto's do, step for step: oneof fields not selected still raise
AttributeError, unset fields get their default lazily, setting a field marks the
message as serialized on the wire, setting a oneof member clears its siblings.
``install()`` is idempotent; ``tests/unit/test_grpc_messages.py`` checks the two
versions side by side.
"""

from __future__ import annotations

from typing import Any

import betterproto
from betterproto import PLACEHOLDER, Message

_object_getattribute = object.__getattribute__
_object_setattr = object.__setattr__
SUPPORTED = "2.0.0b7"
_SKIP_ONEOF_CHECK = frozenset({"__class__", "_betterproto"})

ORIGINAL_GETATTRIBUTE = Message.__getattribute__
ORIGINAL_SETATTR = Message.__setattr__


def _not_selected(self: Message, group: str, current: str | None, name: str
                  ) -> AttributeError:
    return AttributeError(f"{group!r} is set to {current!r}, not {name!r}",
                          name=name, obj=self)


def _getattribute(self: Message, name: str) -> Any:
    group_current = _object_getattribute(self, "__dict__").get("_group_current")
    # An empty dict means a message without oneofs: nothing to check.
    if group_current and name not in _SKIP_ONEOF_CHECK:
        group = type(self)._betterproto.oneof_group_by_field.get(name)
        if group is not None and group_current[group] != name:
            raise _not_selected(self, group, group_current[group], name)
    value = _object_getattribute(self, name)
    if value is not PLACEHOLDER:
        return value
    value = self._get_field_default(name)
    _object_setattr(self, name, value)
    return value


def _setattr(self: Message, attr: str, value: Any) -> None:
    if isinstance(value, Message) and not type(value)._betterproto.meta_by_field_name:
        value._serialized_on_wire = True  # a set empty message (Empty, ...) is present
    d = _object_getattribute(self, "__dict__")
    if attr != "_serialized_on_wire":
        d["_serialized_on_wire"] = True
    group_current = d.get("_group_current")
    if group_current is not None:  # __post_init__ has run
        meta = type(self)._betterproto
        group = meta.oneof_group_by_field.get(attr)
        if group is not None:
            for f in meta.oneof_field_by_group[group]:
                if f.name == attr:
                    group_current[group] = f.name
                else:
                    _object_setattr(self, f.name, PLACEHOLDER)
    _object_setattr(self, attr, value)


def install() -> None:
    """Swap in the cheaper methods (for every betterproto message in the process)."""
    if getattr(betterproto, "__version__", None) != SUPPORTED:
        return  # written against these internals: another version keeps its own
    Message.__getattribute__ = _getattribute  # type: ignore[method-assign]
    Message.__setattr__ = _setattr  # type: ignore[method-assign]


def uninstall() -> None:
    """betterproto's own methods back (for tests comparing the two)."""
    Message.__getattribute__ = ORIGINAL_GETATTRIBUTE  # type: ignore[method-assign]
    Message.__setattr__ = ORIGINAL_SETATTR  # type: ignore[method-assign]
