"""Fixtures the gateway tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from _gwutil import Hosts


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    """_gwutil.Hosts: two kernels embedded here, gateways and services as child processes, all
    stopped after the test."""
    h = Hosts()
    yield h
    h.close()
