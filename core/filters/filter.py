"""Evaluation: filters decide whether the object seen through an adaptor matches."""

from __future__ import annotations

from collections.abc import Sequence

from berth.core import log
from berth.core.filters.adaptors import Adaptor
from berth.core.filters.regexp import GoRegexp, UnsupportedRegexp

_log = log.get("filters")


class Filter:
    """Decides whether the object seen through an adaptor matches."""

    __slots__ = ()

    def match(self, adaptor: Adaptor) -> bool:
        raise NotImplementedError


class _Always(Filter):
    __slots__ = ()

    def match(self, adaptor: Adaptor) -> bool:
        return True

    def __repr__(self) -> str:
        return "ALWAYS"


ALWAYS: Filter = _Always()


class _Compound(Filter):
    __slots__ = ("filters",)

    def __init__(self, filters: Sequence[Filter]) -> None:
        self.filters = tuple(filters)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({list(self.filters)!r})"


class AnyOf(_Compound):
    """Matches when at least one of its filters matches."""

    __slots__ = ()

    def match(self, adaptor: Adaptor) -> bool:
        return any(f.match(adaptor) for f in self.filters)


class AllOf(_Compound):
    """Matches when every one of its filters matches (an empty one always matches)."""

    __slots__ = ()

    def match(self, adaptor: Adaptor) -> bool:
        return all(f.match(adaptor) for f in self.filters)


class Selector(Filter):
    """One ``<fieldpath>[<operator><value>]`` test. ``operator`` is ``?`` for presence."""

    __slots__ = ("fieldpath", "value")
    operator = "?"

    def __init__(self, fieldpath: tuple[str, ...], value: str = "") -> None:
        self.fieldpath = fieldpath
        self.value = value

    def __repr__(self) -> str:
        return f"Selector({self.fieldpath!r}, {self.operator!r}, {self.value!r})"


class Present(Selector):
    __slots__ = ()

    def match(self, adaptor: Adaptor) -> bool:
        return adaptor(self.fieldpath)[1]


class Equal(Selector):
    __slots__ = ()
    operator = "=="

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.fieldpath)
        return present and value == self.value


class NotEqual(Selector):
    __slots__ = ()
    operator = "!="

    # containerd compares the returned value even for an absent field (usually ""), so
    # an absent field is "not equal" to any non-empty value.
    def match(self, adaptor: Adaptor) -> bool:
        return adaptor(self.fieldpath)[0] != self.value


class Matches(Selector):
    __slots__ = ("_regexp",)
    operator = "~="

    def __init__(self, fieldpath: tuple[str, ...], value: str) -> None:
        super().__init__(fieldpath, value)
        try:
            self._regexp: GoRegexp | None = GoRegexp(value)
        except UnsupportedRegexp as exc:
            # containerd (filters/filter.go) accepts the filter, logs, and lets the
            # selector never match; clients see that outcome, so berth keeps it.
            _log.error("invalid regexp in filter", regexp=value, error=str(exc))
            self._regexp = None

    def match(self, adaptor: Adaptor) -> bool:
        if self._regexp is None:
            return False
        return self._regexp.search(adaptor(self.fieldpath)[0])


SELECTORS: dict[str, type[Selector]] = {"==": Equal, "!=": NotEqual, "~=": Matches}
