"""The shim's command line parses like Go's flag package, as containerd writes it."""

from __future__ import annotations

import pytest

from berth.core.shim import flags
from berth.core.shim.flags import Flags, UsageError


def test_containerd_start_command_line():
    parsed = flags.parse(["-namespace", "default", "-address", "/run/containerd/containerd.sock",
                          "-publish-binary", "/usr/bin/containerd", "-id", "c1", "-debug",
                          "start"])
    assert parsed == Flags(namespace="default", address="/run/containerd/containerd.sock",
                           publish_binary="/usr/bin/containerd", id="c1", debug=True,
                           action="start")


def test_delete_with_bundle_and_equals_and_double_dashes():
    parsed = flags.parse(["--namespace=ns", "-id=c2", "--bundle", "/b/c2", "-debug=false",
                          "delete"])
    assert (parsed.namespace, parsed.id, parsed.bundle, parsed.debug, parsed.action) == (
        "ns", "c2", "/b/c2", False, "delete")
    assert parsed.publish_binary == "containerd"  # Go's default


def test_parsing_stops_at_the_action():
    parsed = flags.parse(["-namespace", "n", "start", "-id", "x"])
    assert parsed.action == "start"
    assert parsed.id == ""
    assert parsed.args == ("-id", "x")


def test_no_action_means_serve_and_terminator():
    assert flags.parse(["-namespace", "n"]).action == ""
    assert flags.parse(["-namespace", "n", "--", "-start"]).action == "-start"


def test_version_flag():
    assert flags.parse(["-v"]).version is True


@pytest.mark.parametrize(("argv", "message"), [
    (["-nope", "x"], "flag provided but not defined: -nope"),
    (["-namespace"], "flag needs an argument: -namespace"),
    (["-debug=maybe"], 'invalid boolean value "maybe" for -debug'),
    (["---id", "x"], "bad flag syntax: ---id"),
])
def test_errors_like_go(argv, message):
    with pytest.raises(UsageError, match=f"^{message}$"):
        flags.parse(argv)


def test_to_argv_round_trips():
    original = Flags(namespace="n", id="i", address="/a", publish_binary="/p", bundle="/b",
                     debug=True, action="delete")
    assert flags.parse(flags.to_argv(original)) == original


def test_main_reports_usage_errors_and_empty_namespace(capsys):
    from berth.core.shim import main

    assert main(["-bogus"]) == 2
    assert "flag provided but not defined: -bogus" in capsys.readouterr().err
    assert main(["-id", "x", "start"]) == 1
    assert capsys.readouterr().err == "containerd-shim-berth-v1: shim namespace cannot be empty"
    assert main(["-v"]) == 0
    assert "Version:" in capsys.readouterr().out
