"""Network codecs without root: port syntax, conflists, CNI results, plugin stdin."""

from __future__ import annotations

import json
from importlib.metadata import version

import pytest
from hypothesis import given, settings, strategies as st

from berth.core import errdefs
from berth.core.metadata.networks import result_from_json, result_to_json
from berth.core.networks import etcfiles, labels
from berth.core.networks.types import DNS, PortMapping, SetupRequest
from berth.plugins.networks.cni import conflist, invoke, plugin as cni, result


def test_pyroute2_is_the_pinned_version() -> None:
    # berth uses pyroute2's sync IPRoute and netns.setns; their API moved before 0.9.
    assert version("pyroute2") == "0.9.7"


@pytest.mark.parametrize("spec,want", [
    ("8080:80", PortMapping(8080, 80, "tcp", "")),
    ("127.0.0.1:18080:80", PortMapping(18080, 80, "tcp", "127.0.0.1")),
    ("127.0.0.1:53:53/udp", PortMapping(53, 53, "udp", "127.0.0.1")),
    ("[::1]:8080:80/TCP", PortMapping(8080, 80, "tcp", "::1")),
])
def test_parse_port(spec: str, want: PortMapping) -> None:
    got = labels.parse_port(spec)
    assert got == want
    assert labels.parse_port(labels.format_port(got)) == got


@pytest.mark.parametrize("spec,why", [
    ("0:80", "outside 1-65535"), ("70000:80", "outside 1-65535"),
    ("80:65536", "outside 1-65535"), ("80", "want [IP:]HOSTPORT:PORT"),
    ("a:80", "invalid host port"), ("1.2.3:80:80", "invalid host address"),
    ("80:80/icmp", "invalid protocol"), ("1:2:3:4", "want"),
])
def test_parse_port_rejects(spec: str, why: str) -> None:
    with pytest.raises(errdefs.InvalidArgument, match=why.replace("[", r"\[")):
        labels.parse_port(spec)


def test_labels() -> None:
    lbl = {labels.NETWORK_LABEL: "bridge, other,bridge", labels.PORTS_LABEL: "1:2,3:4/udp"}
    assert labels.networks_of(lbl) == ["bridge", "other"]
    assert [p.host_port for p in labels.ports_of(lbl)] == [1, 3]
    assert labels.networks_of({}) == []


def test_conflist_parse_and_single_conf() -> None:
    c = conflist.parse(json.dumps({"cniVersion": "1.0.0", "name": "n", "plugins": [
        {"type": "bridge"}, {"type": "portmap", "capabilities": {"portMappings": True}}]}))
    assert (c.name, c.cni_version, [p["type"] for p in c.plugins]) == \
        ("n", "1.0.0", ["bridge", "portmap"])
    assert c.capabilities() == {"portMappings"}
    single = conflist.parse('{"cniVersion": "0.4.0", "name": "s", "type": "ptp"}')
    assert single.plugins == [{"type": "ptp"}]


@pytest.mark.parametrize("text,why", [
    ("{nope", "invalid JSON"), ("[]", "not a JSON object"),
    ('{"plugins": [{"type": "x"}]}', "no network name"),
    ('{"name": "n", "plugins": []}', "no plugins"),
    ('{"name": "n", "plugins": [{}]}', "has no type"),
    ('{"name": "n", "plugins": [{"type": "../../bin/sh"}]}', "not a plain name"),
    ('{"name": "bad name", "plugins": [{"type": "x"}]}', "network name"),
])
def test_conflist_rejects(text: str, why: str) -> None:
    with pytest.raises(errdefs.InvalidArgument, match=why):
        conflist.parse(text, "f.conflist")


def test_result_versions() -> None:
    new = result.parse({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "b"}, {"name": "eth0", "mac": "aa", "sandbox": "/ns"}],
        "ips": [{"address": "10.0.0.2/24", "gateway": "10.0.0.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0"}], "dns": {"nameservers": ["10.0.0.1"]}})
    assert new.addresses() == ["10.0.0.2/24"] and new.ips[0].interface == 1
    assert new.interfaces[1].sandbox == "/ns" and new.dns.nameservers == ["10.0.0.1"]
    old = result.parse({"cniVersion": "0.2.0", "ip4": {"ip": "10.1.0.2/16", "gateway":
                        "10.1.0.1", "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}]}})
    assert old.addresses() == ["10.1.0.2/16"] and old.routes[0].gw == "10.1.0.1"
    assert result_from_json(result_to_json(new)) == new
    with pytest.raises(errdefs.InvalidArgument, match="out of range"):
        result.parse({"cniVersion": "1.0.0", "ips": [{"address": "x", "interface": 3}]})


def test_stdin_has_prev_result_and_declared_capabilities_only() -> None:
    c = conflist.parse(json.dumps({"cniVersion": "1.0.0", "name": "n", "plugins": [
        {"type": "bridge"}, {"type": "portmap", "capabilities": {"portMappings": True}}]}))
    req = SetupRequest(namespace="ns", id="c", netns="/x", mac="aa:bb:cc:dd:ee:ff",
                       port_mappings=[PortMapping(8080, 80, "tcp", "127.0.0.1")])
    bridge = json.loads(cni.stdin_for(c.plugins[0], c, None, req))
    assert bridge == {"type": "bridge", "name": "n", "cniVersion": "1.0.0"}
    pm = json.loads(cni.stdin_for(c.plugins[1], c, {"cniVersion": "1.0.0"}, req))
    assert pm["prevResult"] == {"cniVersion": "1.0.0"}
    assert pm["runtimeConfig"] == {"portMappings": [
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": "127.0.0.1"}]}


def test_plugin_error_text() -> None:
    out = b'{"code": 11, "msg": "failed to allocate", "details": "range full"}'
    assert invoke.plugin_error("host-local", "ADD", 1, out, b"") == \
        'plugin type="host-local" failed (add): failed to allocate; range full'
    assert invoke.plugin_error("x", "DEL", 2, b"", b"boom\n") == \
        'plugin type="x" failed (del): boom'
    assert "exit status 3" in invoke.plugin_error("x", "ADD", 3, b"", b"")


def test_invocation_env() -> None:
    env = invoke.Invocation("ADD", "c1", "/run/ns", "eth0", path="/usr/lib/cni").env()
    assert {k: env[k] for k in ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME",
                                "CNI_ARGS", "CNI_PATH")} == {
        "CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/ns",
        "CNI_IFNAME": "eth0", "CNI_ARGS": "IgnoreUnknown=1", "CNI_PATH": "/usr/lib/cni"}


def test_resolv_conf_drops_loopback_nameservers() -> None:
    host = "nameserver 127.0.0.53\nnameserver 10.0.0.53\nsearch example.org\n"
    assert etcfiles.resolv_conf(DNS(), host) == "nameserver 10.0.0.53\nsearch example.org\n"
    assert etcfiles.resolv_conf(DNS(nameservers=["1.1.1.1"], search=["a"]), host) == \
        "nameserver 1.1.1.1\nsearch a\n"
    assert "10.2.0.3\tweb" in etcfiles.hosts("web", ["10.2.0.3/16"])


def test_default_conflist_parses() -> None:
    doc = cni.default_conflist("bridge", "berth0", "10.213.0.0/16")
    c = conflist.parse(json.dumps(doc))
    assert [p["type"] for p in c.plugins] == ["bridge", "portmap", "firewall"]
    assert c.plugins[0]["ipMasq"] is True and "portMappings" in c.capabilities()


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
        st.sampled_from(["name", "cniVersion", "plugins", "type", "capabilities", "ips",
                         "interfaces", "routes", "dns", "ip4", "address", "interface",
                         "nameservers", "dst", "gw", "x"]), kids, max_size=5),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(_json)
def test_fuzz_decoders_fail_only_with_invalid_argument(doc: object) -> None:
    for fn in (lambda: conflist.parse(json.dumps(doc)), lambda: result.parse(doc)):
        try:
            fn()
        except errdefs.InvalidArgument:
            pass


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30))
def test_fuzz_ports(text: str) -> None:
    try:
        for p in labels.parse_ports(text):
            assert 1 <= p.host_port <= 65535 and 1 <= p.container_port <= 65535
    except errdefs.InvalidArgument:
        pass
