"""A service registry (Tock): first come, first served, keyed by a string.

The kernel keeps two: one by service name and one by verified package name. An entry belongs
to a live process; the kernel drops it the moment that process is gone.
"""

from __future__ import annotations

from collections.abc import ItemsView
from typing import Generic, TypeVar

from .._errors import NameTaken

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, T] = {}

    def claim(self, key: str, value: T) -> None:
        if key in self._entries:
            raise NameTaken(f"{self.what} {key!r} is already registered by a live process")
        self._entries[key] = value

    def release(self, key: str, value: T) -> None:
        if self._entries.get(key) is value:
            del self._entries[key]

    def get(self, key: str) -> T | None:
        return self._entries.get(key)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> ItemsView[str, T]:
        return self._entries.items()

