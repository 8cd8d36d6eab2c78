"""The shim's command line, parsed the way Go's ``flag`` package parses it.

containerd runs every v2 shim as ``<shim> -namespace N -address A -publish-binary B
-id ID [-debug] [-bundle D] start|delete`` (runtime/v2/shim/shim.go). Go flags take
one or two dashes, ``-name value`` or ``-name=value``; booleans take no value (or
``-name=true``); parsing stops at the first argument that is not a flag, which is
the action. Pure functions: no I/O, tested in tests/unit/test_shim_flags.py.
"""

from __future__ import annotations

ACTIONS = ("start", "delete", "")


class UsageError(Exception):
    """A command line Go's flag package would reject (it exits with status 2)."""


class Flags:
    """The parsed command line (a plain class: ``dataclasses`` costs ms to import)."""

    __slots__ = ("namespace", "id", "address", "publish_binary", "bundle", "socket", "debug",
                 "version", "action", "args")

    def __init__(self, namespace: str = "", id: str = "", address: str = "",
                 publish_binary: str = "containerd", bundle: str = "", socket: str = "",
                 debug: bool = False, version: bool = False, action: str = "",
                 args: tuple[str, ...] = ()) -> None:
        self.namespace = namespace
        self.id = id
        self.address = address
        self.publish_binary = publish_binary
        self.bundle = bundle
        self.socket = socket
        self.debug = debug
        self.version = version
        self.action = action
        self.args = args

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Flags):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"Flags({fields})"


# flag name -> (attribute, is boolean)
_FLAGS: dict[str, tuple[str, bool]] = {
    "namespace": ("namespace", False),
    "id": ("id", False),
    "address": ("address", False),
    "publish-binary": ("publish_binary", False),
    "bundle": ("bundle", False),
    "socket": ("socket", False),
    "debug": ("debug", True),
    "v": ("version", True),
}

_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def parse(argv: list[str]) -> Flags:
    """Parse the arguments after the program name."""
    flags = Flags()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if len(arg) < 2 or arg[0] != "-":
            break
        if arg == "--":
            i += 1
            break
        name = arg[2:] if arg.startswith("--") else arg[1:]
        if not name or name[0] in "-=":
            raise UsageError(f"bad flag syntax: {arg}")
        value: str | None = None
        if "=" in name:
            name, value = name.split("=", 1)
        known = _FLAGS.get(name)
        if known is None:
            raise UsageError(f"flag provided but not defined: -{name}")
        attr, boolean = known
        if boolean:
            if value is None:
                setattr(flags, attr, True)
            elif value in _TRUE:
                setattr(flags, attr, True)
            elif value in _FALSE:
                setattr(flags, attr, False)
            else:
                raise UsageError(f'invalid boolean value "{value}" for -{name}')
        else:
            if value is None:
                if i + 1 >= len(argv):
                    raise UsageError(f"flag needs an argument: -{name}")
                i += 1
                value = argv[i]
            setattr(flags, attr, value)
        i += 1
    rest = tuple(argv[i:])
    flags.action = rest[0] if rest else ""
    flags.args = rest[1:]
    return flags


def to_argv(flags: Flags) -> list[str]:
    """The arguments that reproduce ``flags`` (action last), for re-executing the shim."""
    out = ["-namespace", flags.namespace, "-id", flags.id, "-address", flags.address,
           "-publish-binary", flags.publish_binary]
    if flags.bundle:
        out += ["-bundle", flags.bundle]
    if flags.socket:
        out += ["-socket", flags.socket]
    if flags.debug:
        out.append("-debug")
    if flags.action:
        out.append(flags.action)
    return out
