"""What every gateway test leaves behind: nothing in /dev/shm (Zenoh's shared-memory transport
is off in every config a gateway, the bench or a test makes: a Zenoh process killed with a
segment open would leave <pid>.zenoh there)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(autouse=True)
def no_zenoh_segments_left():
    before = {n for n in os.listdir("/dev/shm") if n.endswith(".zenoh")}
    yield
    left = {n for n in os.listdir("/dev/shm") if n.endswith(".zenoh")} - before
    assert not left, f"Zenoh segments left in /dev/shm: {sorted(left)}"
