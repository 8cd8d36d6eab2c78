"""Adaptors: how a filter sees an object's fields (containerd's ``Adaptor.Field``)."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping
from typing import Any

Adaptor = Callable[[tuple[str, ...]], tuple[str, bool]]

_ABSENT = ("", False)


def adapt_mapping(
    obj: Mapping[str, Any], *, string_maps: Collection[str] = ("labels", "annotations")
) -> Adaptor:
    """An adaptor over nested dicts, following the conventions of containerd's adaptors.

    - A string is present when non-empty (proto3 cannot tell unset from empty); path
      components after a string are ignored, as containerd's generated adaptors do.
    - A mapping stored under a name in ``string_maps`` is a label map: the rest of the path
      joined with ``.`` is the key (``labels.a.b`` finds label ``a.b``), an existing key is
      present even with an empty value, and an empty map has nothing present.
    - Any other mapping is a nested message: the path descends into it; the message itself
      is not a value.
    - Other values (numbers, lists, None) are not filterable, like in containerd: turn them
      into strings first if a service wants them to be.
    """

    def field(fieldpath: tuple[str, ...]) -> tuple[str, bool]:
        node: Mapping[str, Any] = obj
        last = len(fieldpath) - 1
        for i, name in enumerate(fieldpath):
            value = node.get(name)
            if isinstance(value, str):
                return value, value != ""
            if not isinstance(value, Mapping):
                return _ABSENT
            if name in string_maps:
                if not value:
                    return _ABSENT
                found = value.get(".".join(fieldpath[i + 1 :]))
                return (found, True) if isinstance(found, str) else _ABSENT
            if i == last:
                return _ABSENT
            node = value
        return _ABSENT

    return field
