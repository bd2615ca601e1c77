"""Zenoh's threads as lasting Python threads: one thread state kept for each (see keep_state).

Zenoh runs our callbacks (indirect=False) on its own threads, which Python does not know. For
each callback the binding (pyo3) asks for the GIL with PyGILState_Ensure: on a thread with no
Python thread state, that makes one (a new PyThreadState, its frame stack mapped with mmap) and
PyGILState_Release frees it again when the callback returns (munmap). Measured on loopback
(zenoh-python 1.10, 2-core VM): ~20 us per callback, and a remote call takes three (the query
at the exporter; the reply and the end of the query at the importer). One more Ensure on each of
Zenoh's threads, never released, keeps its state alive between callbacks: Release then only
gives the GIL back. Per-thread data (threading.local) lasts between callbacks too.
"""

from __future__ import annotations

import ctypes
import threading

_kept: set[int] = set()  # threads whose state is kept (a handful: Zenoh's runtime threads)
_lock = threading.Lock()
_ensure = ctypes.pythonapi.PyGILState_Ensure
_ensure.restype = ctypes.c_int
_ensure.argtypes = []


def keep_state() -> None:
    """Call first in every Zenoh callback: on a thread seen for the first time, its thread state
    is kept from now on (an Ensure never released: the GIL is held here, so it only counts)."""
    tid = threading.get_ident()
    if tid in _kept:
        return
    with _lock:
        if tid not in _kept:
            _ensure()
            _kept.add(tid)
