"""containerd's filter language: parse an expression once, match it against many objects.

An expression is a comma-separated list of selectors, all of which must hold::

    topic=="/tasks/exit",namespace==default
    labels."io.example/role"==web,image~=^docker.io/
    labels.tier                      (presence test)

A selector is a field path (components joined by ``.``, each a bare word or a ``"``-quoted
string with Go escapes), optionally followed by an operator (``==``, ``!=``, ``~=``) and a
value (a bare word running to the next ``,`` or space, or a quoted string; after ``~=`` the
value may also be quoted with ``/`` or ``|`` so that a regexp needs no double escaping).
A list of expressions (``parse_all``) matches when any of them does. There is no OR operator
inside one expression: ``|`` is a quote character in containerd's grammar.

Matching goes through an *adaptor*: any callable taking the field path as a tuple and
returning ``(value, present)``, the contract of containerd's ``Adaptor.Field``.
``adapt_mapping`` builds one for plain nested dicts.

The package is split as containerd's is: ``scanner`` (the lexer and Go string unquoting),
``parser`` (expressions to filters, with containerd's error messages), ``filter`` (evaluation),
``regexp`` (Go's RE2 syntax on the RE2 engine, linear time) and ``adaptors``.
"""

from berth.core.filters.adaptors import Adaptor, adapt_mapping
from berth.core.filters.filter import ALWAYS, AllOf, AnyOf, Filter, Selector
from berth.core.filters.parser import parse, parse_all
from berth.core.filters.regexp import GoRegexp, UnsupportedRegexp, compile_go_regexp

__all__ = [
    "ALWAYS",
    "Adaptor",
    "AllOf",
    "AnyOf",
    "Filter",
    "GoRegexp",
    "Selector",
    "UnsupportedRegexp",
    "adapt_mapping",
    "compile_go_regexp",
    "parse",
    "parse_all",
]
