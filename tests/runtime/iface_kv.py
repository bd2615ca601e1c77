"""Interfaces and implementations that tests/runtime/test_interfaces.py serves from child
processes (imported by both sides: not a test module)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import msgspec
import numpy as np
import numpy.typing as npt

import capbus


class Point(msgspec.Struct):
    x: int
    y: int


@dataclasses.dataclass
class Box:
    label: str
    corners: list[Point]


class Full(Exception):
    """A declared error of its own kind."""


class KV(capbus.Interface):
    errors = (KeyError, Full)

    def get(self, key: str) -> bytes: ...
    def put(self, key: str, value: bytes) -> None: ...
    def keys(self) -> list[str]: ...
    def scale(self, p: Point, factor: int = 2) -> Point: ...
    def boxed(self, box: Box) -> Box: ...
    def divide(self, a: float, b: float) -> float: ...
    def kind(self, data: bytes) -> str: ...
    def blob(self, n: int) -> bytes: ...
    def total(self, a: npt.NDArray[np.float64]) -> float: ...
    def view_of(self, a: npt.NDArray[np.float64]) -> list[bool]: ...
    def double(self, a: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]: ...
    def liar(self) -> int: ...
    def whoami(self) -> str: ...
    def depth(self, v: list[Any]) -> int: ...


class KVImpl(KV):
    def __init__(self) -> None:
        self.store: dict[str, bytes] = {}

    def get(self, key: str) -> bytes:
        return self.store[key]

    def put(self, key: str, value: bytes) -> None:
        if len(self.store) >= 100:
            raise Full(f"{len(self.store)} keys, the most this store holds")
        self.store[key] = bytes(value)

    def keys(self) -> list[str]:
        return sorted(self.store)

    def scale(self, p: Point, factor: int = 2) -> Point:
        return Point(p.x * factor, p.y * factor)

    def boxed(self, box: Box) -> Box:
        return Box(box.label.upper(), box.corners[::-1])

    def divide(self, a: float, b: float) -> float:
        return a / b  # b == 0: ZeroDivisionError, undeclared

    def kind(self, data: bytes) -> str:
        return f"{type(data).__name__} {len(data)} {bytes(data[:4])!r}"

    def blob(self, n: int) -> bytes:
        return bytes(range(256)) * (n // 256)

    def total(self, a: npt.NDArray[np.float64]) -> float:
        return float(a.sum())

    def view_of(self, a: npt.NDArray[np.float64]) -> list[bool]:
        return [a.flags.writeable, a.flags.owndata, isinstance(a.base, memoryview)
                or a.base is not None]

    def double(self, a: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        return a * 2

    def liar(self) -> int:
        return "not an int"  # type: ignore[return-value]

    def whoami(self) -> str:
        return "sync"

    def depth(self, v: list[Any]) -> int:
        n = 0
        while isinstance(v, list) and v:
            v, n = v[0], n + 1
        return n


class AsyncKVImpl(KVImpl):
    """The same service with coroutine methods (some of them)."""

    async def get(self, key: str) -> bytes:  # type: ignore[override]
        await asyncio.sleep(0)
        return self.store[key]

    async def divide(self, a: float, b: float) -> float:  # type: ignore[override]
        await asyncio.sleep(0.001)
        return a / b

    async def whoami(self) -> str:  # type: ignore[override]
        return "async"


class KVNext(capbus.Interface):
    """Another version of KV: the same name on the wire, get takes an int."""

    interface_name = "KV"
    errors = (KeyError, Full)

    def get(self, key: int) -> bytes: ...
    def put(self, key: str, value: bytes) -> None: ...


SERVER = """
import sys, asyncio
sys.path.insert(0, sys.argv[1])
import capbus, iface_kv
mode = sys.argv[2]
if mode == "deep":  # an application that raised the recursion limit: msgspec's bound with it
    sys.setrecursionlimit(1_000_000)
    mode = "sync"
svc = capbus.connect().register(sys.argv[3])
print("ready", flush=True)
if mode == "sync":
    svc.serve_interface(iface_kv.KVImpl())
elif mode == "async-in-sync":
    svc.serve_interface(iface_kv.AsyncKVImpl())
else:
    asyncio.run(svc.aserve_interface(iface_kv.AsyncKVImpl()))
"""
