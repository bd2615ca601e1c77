"""The README example's service: an implementation of KV, launched by examples/hello.py."""

import capbus
from kv_api import KV


class Store(KV):
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def get(self, key: str) -> bytes:
        return self.data[key]  # KeyError: declared, so the caller gets a KeyError

    def put(self, key: str, value: bytes) -> None:
        self.data[key] = bytes(value)

    def keys(self) -> list[str]:
        return sorted(self.data)


# Its package is the one it was launched with; serve until the kernel or the service goes.
capbus.connect().register_package().serve_interface(Store())
