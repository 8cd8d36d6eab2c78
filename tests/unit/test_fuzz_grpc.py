"""The gRPC server's fuzz properties (tests/fuzz/grpc_server.py), bounded for the suite."""

from __future__ import annotations

import hypothesis
import pytest

from tests.fuzz import grpc_server


@pytest.mark.parametrize("prop", grpc_server.PROPERTIES, ids=lambda p: p.__name__)
def test_grpc_server_survives(prop: object) -> None:
    hypothesis.settings.get_profile("suite")(prop)()  # type: ignore[operator]
