"""Type URLs of Any-wrapped messages, spelled as containerd's typeurl spells them.

containerd marshals its own messages with the bare proto name as the type URL
(``containerd.events.TaskExit``). betterproto renames some classes (TaskOOM becomes
TaskOom), so the proto names are listed here rather than derived from class names.
"""

from __future__ import annotations

import importlib
from typing import Any

import betterproto
from betterproto.lib.google.protobuf import Any as AnyMsg

from berth.core import protowire

_EVENT_NAMES = (
    "ContainerCreate", "ContainerUpdate", "ContainerDelete", "ContentDelete",
    "NamespaceCreate", "NamespaceUpdate", "NamespaceDelete",
    "SnapshotPrepare", "SnapshotCommit", "SnapshotRemove",
    "TaskCreate", "TaskStart", "TaskDelete", "TaskIO", "TaskExit", "TaskOOM",
    "TaskExecAdded", "TaskExecStarted", "TaskPaused", "TaskResumed", "TaskCheckpointed",
)

# (proto package, generated module, names) of everything berth wraps in an Any.
_PACKAGES: list[tuple[str, str, tuple[str, ...]]] = [
    ("containerd.events", "berth.core.api.containerd.events", _EVENT_NAMES),
    # Image events live in the images service package, as in containerd.
    ("containerd.services.images.v1", "berth.core.api.containerd.services.images.v1",
     ("ImageCreate", "ImageUpdate", "ImageDelete")),
    # berth's own: server-side pull progress (core.transfer.pull).
    ("berth.events.v1", "berth.core.api.berth.events.v1", ("ImagePullProgress",)),
]

_by_name: dict[str, type[betterproto.Message]] = {}
_by_class: dict[type[betterproto.Message], str] = {}


_loaded: list[bool] = []


def _load() -> None:
    # A flag, not "is _by_name empty": plugins may register their types before this runs.
    if _loaded:
        return
    for package, module_name, names in _PACKAGES:
        module = importlib.import_module(module_name)
        classes = {k.lower(): v for k, v in vars(module).items() if isinstance(v, type)}
        for name in names:
            cls = classes.get(name.lower())
            if cls is None:
                continue  # not generated in this build
            register(f"{package}.{name}", cls)
    _loaded.append(True)


def register(name: str, cls: type[betterproto.Message]) -> None:
    """Register a message type under its full proto name (plugins may add their own)."""
    _by_name[name] = cls
    _by_class[cls] = name


def name_of(msg: betterproto.Message) -> str:
    _load()
    try:
        return _by_class[type(msg)]
    except KeyError:
        module = type(msg).__module__.removeprefix("berth.core.api.")
        return f"{module}.{type(msg).__name__}"


def marshal_any(msg: betterproto.Message) -> AnyMsg:
    return AnyMsg(type_url=name_of(msg), value=bytes(msg))


def _strip(type_url: str) -> str:
    # Go's typeurl accepts both the bare name and "types.googleapis.com/<name>".
    return type_url.rsplit("/", 1)[-1]


def unmarshal_any(any_msg: AnyMsg) -> betterproto.Message | None:
    """The decoded message, or None when the type is unknown to this process."""
    return unmarshal(any_msg.type_url, any_msg.value)


def unmarshal(type_url: str, value: bytes) -> betterproto.Message | None:
    """The message an ``Any`` of these fields holds, or None when its type is unknown."""
    _load()
    cls = _by_name.get(_strip(type_url))
    if cls is None:
        return None
    return protowire.parse_flat(cls, value)


def to_dict(any_msg: AnyMsg) -> dict[str, Any] | None:
    return fields_dict(any_msg.type_url, any_msg.value)


def fields_dict(type_url: str, value: bytes) -> dict[str, Any] | None:
    """The fields of the message an ``Any`` of these fields holds (None: unknown type)."""
    msg = unmarshal(type_url, value)
    if msg is None:
        return None
    # betterproto's Casing members are functions, so Enum leaves them plain functions
    # (what to_pydict calls); its annotation says Casing.
    return msg.to_pydict(casing=betterproto.Casing.SNAKE)  # type: ignore[arg-type]
