"""The ttrpc and shim fuzz properties (tests/fuzz/ttrpc_server.py), bounded for the suite."""

from __future__ import annotations

import hypothesis
import pytest

from tests.fuzz import ttrpc_server


@pytest.mark.parametrize("prop", ttrpc_server.PROPERTIES, ids=lambda p: p.__name__)
def test_ttrpc_and_shim_servers_survive(prop: object) -> None:
    hypothesis.settings.get_profile("suite")(prop)()  # type: ignore[operator]
