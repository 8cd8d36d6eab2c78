"""containerd's filter language: parsing, matching, error messages, Go regexp semantics."""

from __future__ import annotations

import pytest

from berth.core import filters
from berth.core.errdefs import Code, InvalidArgument
from berth.core.filters import (
    ALWAYS,
    UnsupportedRegexp,
    adapt_mapping,
    compile_go_regexp,
    parse,
    parse_all,
)

CORPUS = [
    {
        "id": "web-1",
        "image": "docker.io/library/nginx:latest",
        "labels": {"app": "web", "tier": "front"},
    },
    {
        "id": "web-2",
        "image": "docker.io/library/nginx:1.25",
        "labels": {"app": "web", "io.example/owner": "ops team"},
    },
    {
        "id": "db",
        "image": "docker.io/library/postgres:16",
        "labels": {"app": "db", 'quote " and \\ slash': "odd"},
    },
    {"id": "scratch"},
    {
        "id": "job",
        "image": "registry.local/batch, nightly",
        "labels": {"app": "", "a.b": "dotted"},
        "runtime": {"name": "io.containerd.runc.v2"},
    },
]
EVERYTHING = list(range(len(CORPUS)))


def selected(f: filters.Filter) -> list[int]:
    return [i for i, obj in enumerate(CORPUS) if f.match(adapt_mapping(obj))]


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("", EVERYTHING),
        ("id", EVERYTHING),
        ("image", [0, 1, 2, 4]),
        # An existing label is present even when its value is empty.
        ("labels.app", [0, 1, 2, 4]),
        ("labels.app==web", [0, 1]),
        ("labels.app!=web", [2, 3, 4]),
        ("id==db", [2]),
        ('id=="db"', [2]),
        (" id == db", [2]),
        ("id==db,id==job", []),
        ("labels.app==web,labels.tier", [0]),
        ("labels.app==web,labels.tier==back", []),
        ('labels."io.example/owner"=="ops team"', [1]),
        ('labels."io.example/owner"', [1]),
        # Unquoted dotted paths reach dotted label keys: the rest of the path is the key.
        ("labels.a.b==dotted", [4]),
        ('labels."a.b"==dotted', [4]),
        ('labels."quote \\" and \\\\ slash"==odd', [2]),
        ('image=="registry.local/batch, nightly"', [4]),
        ("image==docker.io/library/nginx:1.25", [1]),
        ("image!=docker.io/library/nginx:latest,labels.app==web", [1]),
        ("image~=nginx", [0, 1]),
        ("image~=:[0-9.]+$", [1, 2]),
        ("image~=/[0-9]{2}$/", [1, 2]),
        ("image~=|batch, nightly|", [4]),
        ("image~=/library\\/n/", [0, 1]),
        # An absent field is matched as "" by ~= and differs from anything by !=.
        ("image~=^$", [3]),
        ("image!=docker.io/library/postgres:16", [0, 1, 3, 4]),
        ("id~=[[:digit:]]$", [0, 1]),
        ("runtime.name==io.containerd.runc.v2", [4]),
        ("runtime.name", [4]),
        # A nested message is not itself a value, nor is a whole label map.
        ("runtime", []),
        ("labels", []),
        ("missing", []),
        ("labels.missing", []),
        # Like containerd's adaptors, path components after a string field are ignored.
        ("id.anything==db", [2]),
        # An invalid regexp is accepted and never matches, even an absent field.
        ("image~=(", []),
        ("image~=a**", []),
    ],
)
def test_match_corpus(expr: str, expected: list[int]) -> None:
    assert selected(parse(expr)) == expected


@pytest.mark.parametrize(
    ("exprs", "expected"),
    [
        ([], EVERYTHING),
        ([""], EVERYTHING),
        (["id==db"], [2]),
        (["id==db", "id==job"], [2, 4]),
        (["labels.app==web,labels.tier", "image~=postgres"], [0, 2]),
        (["id==nothing", ""], EVERYTHING),
    ],
)
def test_parse_all_is_or(exprs: list[str], expected: list[int]) -> None:
    assert selected(parse_all(exprs)) == expected


def test_parse_all_reports_the_bad_expression() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_all(["id==db", "id=="])
    assert str(info.value) == (
        "filters: parse error: [id==]: expected value or quoted: invalid argument"
    )
    assert info.value.code == Code.INVALID_ARGUMENT


def test_parse_all_refuses_a_bare_string() -> None:
    with pytest.raises(TypeError):
        parse_all("id==db")


def test_empty_expression_is_always() -> None:
    assert parse("") is ALWAYS
    assert parse_all([]) is ALWAYS


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("labels.app==", "[labels.app==]: expected value or quoted"),
        ("labels.|app|", "[labels. >|||< app|]: invalid quote encountered"),
        ("id==/db/", "[id== >|/|< db/]: invalid quote encountered"),
        ("labels.ns/key", "[labels.ns >|/|< key]: quoted literal not terminated"),
        (
            "labels.io.example/owner",
            "[labels.io.example >|/|< owner]: quoted literal not terminated",
        ),
        ("id==/db", "[id== >|/|< db]: quoted literal not terminated"),
        ('labels."open', '[labels. >|"|< open]: quoted literal not terminated'),
        ('labels."a\nb"==c', '[labels. >|"|< a\nb"==c]: quoted literal not terminated'),
        # containerd does not allow anything but a separator after a value, spaces included.
        ("id==db ", "[id==db >| |< ]: unexpected input:  "),
        ("id==a b", "[id==a >| |< b]: unexpected input:  "),
        ('id=="a"b', '[id=="a" >|b|< ]: unexpected input: b'),
        ("id ,x", '[id  >|,|< x]: expected an operator ("=="|"!="|"~=")'),
        ("id<db", '[id >|<|< db]: expected an operator ("=="|"!="|"~=")'),
        ('labels."a"b', '[labels."a" >|b|< ]: expected an operator ("=="|"!="|"~=")'),
        ("id=db", '[id >|=|< db]: unsupported operator "="'),
        ("id!==db", '[id >|!|< ==db]: unsupported operator "!=="'),
        ("id~~db", '[id >|~|< ~db]: unsupported operator "~~"'),
        ("id==.5", "[id== >|.|< 5]: expected value or quoted"),
        ("id==,x", "[id== >|,|< x]: expected value or quoted"),
        (",id", "[ >|,|< id]: expected field or quoted"),
        ("id,,x", "[id, >|,|< x]: expected field or quoted"),
        ("id==db,", "[id==db,]: expected field or quoted"),
        ("labels.", "[labels.]: expected field or quoted"),
        ("labels.?x", "[labels. >|?|< x]: expected field or quoted"),
        ("   ", "[   ]: expected field or quoted"),
        ('labels."\\q"', '[labels. >|"|< \\q"]: illegal escape sequence'),
        # The escaped quote has to be the one in use.
        ('id=="a\\/b"', '[id== >|"|< a\\/b"]: illegal escape sequence'),
        ("id~=/a\\\"b/", '[id~= >|/|< a\\"b/]: illegal escape sequence'),
        # Backslash classes cannot appear in a quoted regexp; unquoted they can.
        ("id~=/\\d/", "[id~= >|/|< \\d/]: illegal escape sequence"),
        ('labels."\\x4"', '[labels. >|"|< \\x4"]: illegal numeric escape sequence'),
        ('labels."\\12"', '[labels. >|"|< \\12"]: illegal numeric escape sequence'),
        ('labels."\\777"', '[labels. >|"|< \\777"]: unquoting failed: quote syntax error'),
        (
            'labels."\\U00110000"',
            '[labels. >|"|< \\U00110000"]: unquoting failed: quote syntax error',
        ),
        ("id\x00", "[id >|\x00|< ]: unexpected null"),
        ("id==a\x00", "[id==a >|\x00|< ]: unexpected input: \ufffd"),
        ("id\ufffd", "[id >|\ufffd|< ]: rune error"),
        ("id==\udcff", "[id== >|\udcff|< ]: rune error"),
    ],
)
def test_parse_errors(expr: str, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse(expr)
    assert str(info.value) == f"filters: parse error: {message}: invalid argument"


@pytest.mark.parametrize(
    ("expr", "fieldpath", "operator", "value"),
    [
        ("a", ("a",), "?", ""),
        ("a.b_c.D9", ("a", "b_c", "D9"), "?", ""),
        ('labels."k.with.dots"', ("labels", "k.with.dots"), "?", ""),
        ('"leading quoted".after==v', ("leading quoted", "after"), "==", "v"),
        ("a==punctuated_value.foo-bar/x=y", ("a",), "==", "punctuated_value.foo-bar/x=y"),
        ("a==牛", ("a",), "==", "牛"),
        ('a=="\\x41\\u00e9\\101\\U0001F600"', ("a",), "==", "AéA\U0001f600"),
        ('a=="tab\\there\\n"', ("a",), "==", "tab\there\n"),
        ('a=="say \\"hi\\" \\\\o/"', ("a",), "==", 'say "hi" \\o/'),
        # \x and octal escapes are bytes: valid UTF-8 sequences become characters...
        ('a=="\\xc3\\xa9\\303\\251"', ("a",), "==", "éé"),
        # ...and stray bytes stay bytes (as surrogate escapes).
        ('a=="\\xff"', ("a",), "==", "\udcff"),
        # Go writes a surrogate code point as U+FFFD.
        ('a=="\\ud800"', ("a",), "==", "\ufffd"),
        ("a!=x", ("a",), "!=", "x"),
        ("a~=[abc]\\+", ("a",), "~=", "[abc]\\+"),
        ("a~=/a\\/b/", ("a",), "~=", "a/b"),
        ("a~=|a\\|b|", ("a",), "~=", "a|b"),
        ("a~=|牛/x|", ("a",), "~=", "牛/x"),
        ('a~="x\\\\d"', ("a",), "~=", "x\\d"),
        ("a~=/[abc]{0,1}\"\\//", ("a",), "~=", '[abc]{0,1}"/'),
    ],
)
def test_selector_parts(expr: str, fieldpath: tuple[str, ...], operator: str, value: str) -> None:
    sel = parse(expr)
    assert isinstance(sel, filters.Selector)
    assert (sel.fieldpath, sel.operator, sel.value) == (fieldpath, operator, value)


def test_comma_builds_all_of_in_order() -> None:
    f = parse('a,b==1,c."d"~=/x/')
    assert isinstance(f, filters.AllOf)
    assert [(s.fieldpath, s.operator) for s in f.filters] == [
        (("a",), "?"),
        (("b",), "=="),
        (("c", "d"), "~="),
    ]


def test_any_callable_is_an_adaptor() -> None:
    seen: list[tuple[str, ...]] = []

    def adaptor(fieldpath: tuple[str, ...]) -> tuple[str, bool]:
        seen.append(fieldpath)
        if fieldpath == ("event", "container_id"):
            return "c1", True
        return "", False

    f = parse("event.container_id==c1,missing!=x")
    assert f.match(adaptor)
    assert seen == [("event", "container_id"), ("missing",)]
    assert not parse("event.container_id==c2").match(adaptor)
    # AllOf stops at the first selector that fails.
    seen.clear()
    assert not parse("missing,event.container_id").match(adaptor)
    assert seen == [("missing",)]


def test_event_envelope_filters() -> None:
    envelope = {
        "topic": "/tasks/exit",
        "namespace": "default",
        "event": {"container_id": "c1", "id": "c1", "pid": 42},
    }
    adaptor = adapt_mapping(envelope)
    assert parse('topic=="/tasks/exit"').match(adaptor)
    assert parse("topic~=^/tasks/,namespace==default").match(adaptor)
    assert parse("event.container_id==c1").match(adaptor)
    assert not parse('topic=="/tasks/create"').match(adaptor)
    assert not parse("namespace==k8s.io").match(adaptor)
    # Non-string fields are not exposed, as in containerd's generated adaptors.
    assert not parse("event.pid").match(adaptor)
    assert not parse("event.pid==42").match(adaptor)
    assert parse_all(['topic=="/tasks/create"', "event.id==c1"]).match(adaptor)


def test_adapt_mapping_conventions() -> None:
    obj = {
        "name": "",
        "labels": {"": "empty key", "x": ""},
        "annotations": {},
        "target": {"digest": "sha256:abc", "mediatype": ""},
        "meta": {"labels": {"k.v": "1"}},
        "notes": {"a.b": "nested"},
    }
    field = adapt_mapping(obj)
    assert field(("name",)) == ("", False)
    assert field(("labels", "x")) == ("", True)
    assert field(("labels",)) == ("empty key", True)  # the joined rest is ""
    assert field(("annotations", "any")) == ("", False)
    assert field(("target", "digest")) == ("sha256:abc", True)
    assert field(("target", "mediatype")) == ("", False)
    assert field(("target",)) == ("", False)
    assert field(("meta", "labels", "k", "v")) == ("1", True)
    # Only maps named in string_maps join the remaining path.
    assert field(("notes", "a", "b")) == ("", False)
    assert adapt_mapping(obj, string_maps={"notes"})(("notes", "a", "b")) == ("nested", True)
    assert field(()) == ("", False)


@pytest.mark.parametrize(
    ("pattern", "text", "found"),
    [
        # Perl classes are ASCII-only in Go.
        (r"\d", "3", True),
        (r"\d", "\u0663", False),
        (r"[\d.]+$", "1.25", True),
        (r"^\w+$", "é", False),
        (r"^\W$", "é", True),
        (r"^[^\D]$", "7", True),
        (r"^\s$", "\t", True),
        (r"^\s$", "\v", False),
        (r"^\S+$", "a\u00a0b", True),
        (r"x\b", "xé", True),
        (r"x\B", "xé", False),
        # `$` is the end of the text, unless (?m) is on.
        ("abc$", "abc", True),
        ("abc$", "abc\n", False),
        ("(?m)^abc$", "x\nabc\ny", True),
        ("(?m:abc$)|q$", "abc\n", True),
        ("(?m:abc$)|q$", "q\n", False),
        (r"abc\z", "abc", True),
        (r"abc\z", "abc\n", False),
        (r"\Aabc", "abc", True),
        (r"\Q.*+\E", "a.*+b", True),
        (r"\Q.*+\E", "ab", False),
        (r"^\Qa.b\E*$", "a.", True),
        ("[[:upper:]]", "a", False),
        ("[[:upper:]]", "A", True),
        ("^[[:^alpha:]]+$", "12-3", True),
        ("^[[:word:][:punct:]]+$", "a_b.c!", True),
        ("[[x]", "[", True),
        ("[]a]", "]", True),
        ("a[&&]b", "a&b", True),
        # A brace that does not start a valid repeat is a literal in Go.
        ("^a{,2}$", "a{,2}", True),
        ("^a{,2}$", "a", False),
        ("^a{01}$", "a{01}", True),
        ("^a{2}$", "aa", True),
        ("^a{1,}?$", "aaa", True),
        (r"\x{263a}", "\u263a", True),
        (r"\x41", "A", True),
        (r"^\101\0$", "A\x00", True),
        # Flags set mid-group last until the group ends, across alternatives.
        ("a(?i)b|c", "aB", True),
        ("a(?i)b|c", "C", True),
        ("a(?i)b|c", "AB", False),
        ("(a(?i)b)c", "aBc", True),
        ("(a(?i)b)c", "aBC", False),
        ("(?i)é", "É", True),
        ("(?s)a.b", "a\nb", True),
        ("a.b", "a\nb", False),
        ("(?i:A)(?-i:b)", "ab", True),
        ("(?i:A)(?-i:b)", "aB", False),
        ("(?P<1st>x)y", "xy", True),
        ("", "anything", True),
    ],
)
def test_go_regexp_semantics(pattern: str, text: str, found: bool) -> None:
    assert compile_go_regexp(pattern).search(text) == found


# What the RE2 engine adds over the old translation: pattern -> texts it finds, texts it
# does not.
RE2_CASES: dict[str, tuple[list[str], list[str]]] = {
    # Unicode classes, Go's (?U) and an empty flag group are Go syntax too.
    r"^\pL+$": (["héllo"], ["h3llo"]),
    r"^\p{Greek}+$": (["αβγ"], ["abc"]),
    r"^\PL$": (["1"], ["a"]),
    "(?U)^(a+)": (["aaa"], [""]),
    "(?)a": (["a"], ["b"]),
    # Case folding follows Unicode's simple folds, as Go's: k matches the Kelvin sign.
    "(?i)k": (["\u212a", "K"], ["x"]),
    # Linear time: the classic catastrophic patterns answer at once.
    "^(a+)+$": (["a" * 5000], ["a" * 5000 + "!"]),
    "^(([a-z/]+)+)+X$": (["/tasks/exitX"], ["/tasks/exit" * 500]),
    "^(a|a)*$": (["a" * 5000], ["a" * 5000 + "b"]),
    # Bytes that are not UTF-8 (surrogate escapes) read as U+FFFD, as Go reads them.
    "^a.b$": (["a\udcffb"], ["a\udcff\udcffb"]),
    "x": (["\ud800x"], ["\ud800"]),
    "^a\uFFFD\uFFFDb$": (["a\udcff\udc80b"], ["ab"]),
}


@pytest.mark.parametrize("pattern", list(RE2_CASES))
def test_re2_semantics(pattern: str) -> None:
    found, missed = RE2_CASES[pattern]
    rx = compile_go_regexp(pattern)
    assert [t for t in found if not rx.search(t)] == []
    assert [t for t in missed if rx.search(t)] == []


@pytest.mark.parametrize(
    "pattern",
    [
        r"(a)\1",  # backreferences
        "a(?=b)",  # look-around
        "a(?!b)",
        "(?<=a)b",
        "(?<name>a)",
        "(?#comment)",
        "(?>a)",
        "a**",  # stacked repeats, possessive forms
        "a*+",
        "a+?+",
        "a{2}{3}",
        "a{1001}",
        "a{3,2}",
        "(?x)a",  # a Python flag Go lacks
        "(?i-)a",
        r"\p{Klingon}",
        r"\C",  # RE2's any-byte, refused by Go
        r"[\C]",
        r"\Z",
        r"\e",
        r"\u0041",
        r"[\b]",
        r"\x4",
        r"\x{110000}",
        "trailing\\",
        "(a",
        "a)",
        "[a",
        "[[:alphabet:]]",
        "(?P<a-b>x)",
    ],
)
def test_go_regexp_rejections(pattern: str) -> None:
    with pytest.raises(UnsupportedRegexp):
        compile_go_regexp(pattern)


@pytest.mark.parametrize(
    "pattern", [r"\Q(?<x>\E", r"[(?<]", r"\\C", r"[]\\C]", r"\Q\C\E", r"[[:alpha:](?<]"]
)
def test_go_regexp_checks_skip_literals(pattern: str) -> None:
    # What looks like a refused construct inside a literal or a class is just characters.
    compile_go_regexp(pattern)


def test_go_regexp_program_size_is_bounded() -> None:
    # A filter comes from any client: a pattern whose program would be huge is refused
    # (and its selector never matches) rather than costing every match.
    with pytest.raises(UnsupportedRegexp):
        compile_go_regexp("(" + "|".join(f"x{i:05d}y" for i in range(40000)) + ")")


@pytest.mark.parametrize("pattern", ["(", "a**", r"\pQ", "[z-a]", "(?=a)"])
def test_uncompilable_regexp_selector_never_matches(pattern: str) -> None:
    f = parse(f"name~={pattern}")
    assert not f.match(adapt_mapping({"name": "a"}))
    assert not f.match(adapt_mapping({}))


def test_go_regexp_refuses_a_pattern_that_is_not_utf8() -> None:
    # "\xff" in a quoted value is a raw byte; Go refuses a pattern that is not UTF-8.
    with pytest.raises(UnsupportedRegexp):
        compile_go_regexp("a\udcff")
    assert not parse('name~="a\\xff"').match(adapt_mapping({"name": "a\udcff"}))


def test_re2_is_the_pinned_release() -> None:
    # Filter matching depends closely on the engine's syntax: the installed bindings must be
    # the release pyproject.toml pins.
    import importlib.metadata
    import re
    from pathlib import Path

    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    pin = re.search(r'"google-re2==([^"]+)"', pyproject)
    assert pin is not None
    assert importlib.metadata.version("google-re2") == pin.group(1)


def test_random_patterns_and_filters_fail_only_as_documented() -> None:
    # Seeded and bounded: any pattern compiles or raises UnsupportedRegexp, any compiled
    # one answers a bool for any text (surrogates and NULs included); any expression
    # parses or raises InvalidArgument, and matching a parsed one never raises.
    import random

    rng = random.Random(83)
    alphabet = list("()[]{}|*+?.^$\\-,:=!~\"/'aZ09 _") + [
        "\\p", "\\P", "\\Q", "\\E", "\\C", "(?", "(?P<", "(?<", "[:", ":]", "{2,", "\x00",
        "\udcff", "\ud800", "é", "\u212a", "labels.", "~=", "==", "!=",
    ]
    texts = ["", "a", "aaaa!", "é\n", "\udcff", "x\x00y", "/tasks/exit"]
    for _ in range(5000):
        src = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        try:
            rx = compile_go_regexp(src)
        except UnsupportedRegexp:
            pass
        else:
            for text in texts:
                assert isinstance(rx.search(text), bool)
        try:
            f = parse(src)
        except InvalidArgument:
            continue
        for text in texts:
            assert isinstance(f.match(adapt_mapping({"a": text, "labels": {"a": text}})), bool)
