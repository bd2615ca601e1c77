"""The C anchors (bench/native/*.c), compiled here on first use and cached: futex and
spin ping-pongs and an SPSC ring, the floor capbus is measured against."""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from bench.results import (
    METRIC_ROUND_TRIP,
    METRIC_THROUGHPUT,
    Result,
)

from .harness import (
    _MAX_SAMPLES,
    _RING_CAP,
    DEFAULT_DURATION,
    DEFAULT_TIMEOUT,
    _default_warmup,
)

# ---- C anchors


class NativeUnavailable(RuntimeError):
    """The C anchors cannot be built here (no compiler, or the build failed)."""


_NATIVE_FILES = ("bench_common.h", "futex_pingpong.c", "spin_pingpong.c", "spsc_ring.c",
                 "clients_pingpong.c")
_NATIVE_DIR = Path(__file__).resolve().parent.parent / "native"  # bench/native
_CFLAGS = ("-O2", "-std=gnu11", "-Wall")
_native_lock = threading.Lock()


def _native_source(name: str) -> str:
    return (_NATIVE_DIR / name).read_text(encoding="utf-8")


def _find_cc() -> str | None:
    cands = [os.environ.get("CC", ""), "cc", "gcc", "clang"]
    for cand in cands:
        if not cand:
            continue
        path = shutil.which(cand.split()[0])
        if path:
            return path
    return None


def _cache_dir() -> Path:
    env = os.environ.get("CAPBUS_BENCH_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "capbus" / "bench"


def compile_native(name: str) -> Path:
    """Build (or reuse from the cache) the C anchor ``name`` (e.g. ``"futex_pingpong"``).

    Sources are in ``bench/native``; binaries go to
    ``$CAPBUS_BENCH_CACHE`` or ``~/.cache/capbus/bench`` (a temp dir if that is
    not writable), keyed by a hash of sources, compiler and flags.
    Raises :class:`NativeUnavailable` when there is no compiler or the build fails.
    """
    cc = _find_cc()
    if cc is None:
        raise NativeUnavailable("no C compiler (cc/gcc/clang) found")
    sources = {f: _native_source(f) for f in _NATIVE_FILES}
    if f"{name}.c" not in sources:
        raise ValueError(f"unknown native anchor {name!r}")
    h = hashlib.sha256()
    for f in sorted(sources):
        h.update(f.encode() + b"\0" + sources[f].encode() + b"\0")
    h.update(cc.encode() + b"\0" + " ".join(_CFLAGS).encode())
    tag = h.hexdigest()[:16]
    with _native_lock:
        for cache in (_cache_dir(), Path(tempfile.gettempdir()) / f"capbus-bench-{os.getuid()}"):
            binary = cache / f"{name}-{tag}"
            if binary.is_file() and os.access(binary, os.X_OK):
                return binary
            try:
                cache.mkdir(parents=True, exist_ok=True)
            except OSError:
                continue
            with tempfile.TemporaryDirectory(prefix="capbus-bench-build-") as build:
                for f, text in sources.items():
                    Path(build, f).write_text(text, encoding="utf-8")
                out = Path(build, name)
                proc = subprocess.run(
                    [cc, *_CFLAGS, "-o", str(out), str(Path(build, f"{name}.c"))],
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                if proc.returncode != 0:
                    raise NativeUnavailable(f"compiling {name}.c failed: {proc.stderr.strip()[-500:]}")
                tmp = cache / f".{name}-{tag}.{os.getpid()}.tmp"
                try:
                    shutil.copy2(out, tmp)
                    os.replace(tmp, binary)
                except OSError:
                    with contextlib.suppress(OSError):
                        tmp.unlink()
                    continue
            return binary
    raise NativeUnavailable("no writable cache directory for the C anchors")


def _run_native(name: str, args: list[Any], timeout: float) -> dict[str, float]:
    binary = compile_native(name)
    proc = subprocess.run(
        [str(binary), *(str(a) for a in args)],
        capture_output=True,
        text=True,
        timeout=timeout + 5,
    )
    if proc.returncode == -signal.SIGALRM:
        raise TimeoutError(f"{name} did not finish within {timeout:g} s")
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    out: dict[str, float] = {}
    for tok in proc.stdout.split():
        key, sep, value = tok.partition("=")
        if sep:
            out[key] = float(value)
    return out


def _alarm_s(timeout: float) -> int:
    """The C programs' alarm() in whole seconds (alarm(0) would disable it)."""
    return max(1, math.ceil(timeout))


def _cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _native_or_skip(name: str, mechanism: str, metric: str) -> Result | None:
    try:
        compile_native(name)
    except NativeUnavailable as exc:
        return Result.skip(mechanism, metric, str(exc))
    return None


def _native_latency(
    prog: str,
    mechanism: str,
    cpus: tuple[int, int],
    iterations: int | None,
    duration: float,
    warmup: int,
    timeout: float,
    note: str,
) -> Result:
    skipped = _native_or_skip(prog, mechanism, METRIC_ROUND_TRIP)
    if skipped:
        return skipped
    if iterations is not None:
        max_iters, dur_ms = iterations, int(timeout * 1000)
    else:
        max_iters, dur_ms = _MAX_SAMPLES, int(duration * 1000)
    args = [max_iters, dur_ms, warmup, cpus[0], cpus[1], _alarm_s(timeout)]
    out = _run_native(prog, args, timeout)
    return Result(
        mechanism,
        METRIC_ROUND_TRIP,
        median_us=out["median_ns"] / 1000.0,
        p99_us=out["p99_ns"] / 1000.0,
        note=f"{note}; measured in C (CLOCK_MONOTONIC), mean {out['mean_ns'] / 1000:.2f} us",
        samples=int(out["iters"]),
    )


def c_futex_round_trip(
    iterations: int | None = None,
    duration: float = DEFAULT_DURATION,
    warmup: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    same_cpu: bool = False,
) -> Result:
    """C futex ping-pong (FUTEX_WAIT/FUTEX_WAKE on a shared word), pinned.

    ``same_cpu=False``: the two processes on different CPUs; ``True``: both on one CPU.
    """
    warmup = _default_warmup(iterations, 2000) if warmup is None else warmup
    cpus = _cpus()
    where = "same CPU" if same_cpu else "cross-CPU"
    mechanism = f"C futex ping-pong ({where})"
    if same_cpu:
        pin = (cpus[0], cpus[0])
    elif len(cpus) < 2:
        return Result.skip(mechanism, METRIC_ROUND_TRIP, "needs two CPUs")
    else:
        pin = (cpus[0], cpus[1])
    return _native_latency(
        "futex_pingpong",
        mechanism,
        pin,
        iterations,
        duration,
        warmup,
        timeout,
        f"pinned to CPUs {pin[0]},{pin[1]}, no spinning before FUTEX_WAIT",
    )


def c_spin_round_trip(
    iterations: int | None = None,
    duration: float = 1.0,
    warmup: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Result:
    """C spinning cache-line ping-pong, cross-CPU: the machine's floor for a round trip."""
    warmup = _default_warmup(iterations, 20000) if warmup is None else warmup
    cpus = _cpus()
    mechanism = "C spin ping-pong (cross-CPU)"
    if len(cpus) < 2:
        return Result.skip(mechanism, METRIC_ROUND_TRIP, "needs two CPUs")
    return _native_latency(
        "spin_pingpong",
        mechanism,
        (cpus[0], cpus[1]),
        iterations,
        duration,
        warmup,
        timeout,
        f"pinned to CPUs {cpus[0]},{cpus[1]}, seq+message in one cache line per direction",
    )


# =========================================================================== throughput

# ---- C SPSC ring


def c_ring_throughput(
    iterations: int | None = None,
    duration: float = 1.0,
    warmup: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    batch: int = 1,
) -> Result:
    """C SPSC ring (child produces, parent consumes), pinned cross-CPU when possible.

    ``batch=1``: unbatched; ``batch>1``: indices published once per ``batch`` messages.
    """
    mechanism = "C SPSC ring (" + ("unbatched" if batch <= 1 else f"batched x{batch}") + ")"
    skipped = _native_or_skip("spsc_ring", mechanism, METRIC_THROUGHPUT)
    if skipped:
        return skipped
    warmup = _default_warmup(iterations, 100_000) if warmup is None else warmup
    cpus = _cpus()
    pin = (cpus[0], cpus[1]) if len(cpus) >= 2 else (-1, -1)
    if iterations is not None:
        max_msgs, dur_ms = max(iterations, 2), int(timeout * 1000)
    else:
        max_msgs, dur_ms = 0, int(duration * 1000)
    args = [max_msgs, dur_ms, warmup, batch, pin[0], pin[1], _alarm_s(timeout)]
    out = _run_native("spsc_ring", args, timeout)
    where = f"pinned to CPUs {pin[0]},{pin[1]}" if pin[0] >= 0 else "unpinned (one CPU)"
    return Result(
        mechanism,
        METRIC_THROUGHPUT,
        msgs_per_s=out["msgs_per_s"],
        note=f"{where}, {_RING_CAP} x 64 B slots; measured in C",
        samples=int(out["msgs"]),
    )


# ---- C many clients, one server


def c_clients(clients: int, duration: float = 1.0, spin_ns: int = 50_000,
              timeout: float = DEFAULT_TIMEOUT) -> dict[str, float]:
    """C reference for the clients section: one server process and ``clients`` client processes,
    unpinned, each calling flat out for ``duration`` s over shared memory; ``spin_ns`` < 0: pure
    spin, else spin that long, then FUTEX_WAIT (both ends). Returns per_s (aggregate round
    trips/s), min_per_s, max_per_s (per client), csw_per_call (context switches of every process
    per round trip). Raises :class:`NativeUnavailable` when it cannot be built."""
    timeout = max(timeout, duration + 10)
    return _run_native("clients_pingpong", [clients, int(duration * 1000), spin_ns,
                                            _alarm_s(timeout)], timeout)
