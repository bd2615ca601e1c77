"""Micro-benchmarks of capbus._core (not a test; run by hand, one at a time, on an idle machine).

    PYTHONPATH=src python tests/core/_core_bench.py rt [--n 200000] [--limits none|rate] [--runs 1]
        [--size BYTES [--loan]]   a payload of BYTES with each call: copied in (call), or
        written in place (loan + call_loan, the loan's bytes left as they are); the server
        replies without touching it (zero-copy receive from ZC_THRESHOLD on, or with --loan)
    PYTHONPATH=src python tests/core/_core_bench.py ab [--n 200000] [--runs 3]
        alternating runs of rt with limits none and rate (CTRL_F_ENFORCE set, rate 10**12/s)
    PYTHONPATH=src python tests/core/_core_bench.py many [--n 2000000] [--batch 0|64|...] [--no-verify]
        recv_many(256) throughput: a producer process sends with send() (batch 0) or
        send_many(batch); the receiver checks every sequence number (or only counts)
    PYTHONPATH=src python tests/core/_core_bench.py inproc [--n 1000000] [--limits none|rate]
        the CPU cost of one whole call in one thread, with no waiting and no cache-line
        ping-pong: call_start, poll, reply, call_poll (isolates the cost of the checks)

Round trips: Python on both ends, spin mode, server and client pinned to different CPUs; the
server runs `req = S.recv(); req.reply(req.opcode, req.data)` and the client `lane.call(...)`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/: _core_util

from _core_util import make_chan  # noqa: E402

from capbus import _core  # noqa: E402
from capbus._kernel.shm import make_doorbell  # noqa: E402

SERVER = r"""
import json, os, sys
from capbus import _core
a = json.loads(sys.argv[1])
if a["cpu"] >= 0:
    os.sched_setaffinity(0, {a["cpu"]})
S = _core.ServerSet(a["db"], a["mode"])
S.add(1, a["chan"], a["ctrl"], a["nslots"], a["arena"], 5)
print("ready", flush=True)
recv = S.recv
if a["role"] == "echo":
    while True:
        req = recv()
        if req.opcode == 2:
            req.reply(0)
            break
        req.reply(req.opcode, req.data)
"""

PRODUCER = r"""
import json, os, sys, time
from capbus import _core
from capbus._errors import WouldBlock
a = json.loads(sys.argv[1])
if a["cpu"] >= 0:
    os.sched_setaffinity(0, {a["cpu"]})
L = _core.Lane(a["chan"], a["ctrl"], a["db"], 1, a["nslots"], a["arena"], a["mode"])
n, batch = a["n"], a["batch"]
print("ready", flush=True)
sys.stdin.readline()
t0 = time.perf_counter()
seq = 0
if batch:
    send_many = L.send_many
    while seq < n:
        k = min(batch, n - seq)
        seq += send_many(0, 0, [(5, (s,)) for s in range(seq, seq + k)])
else:
    send = L.send
    while seq < n:
        try:
            send(0, 5, 0, (seq,))
            seq += 1
        except WouldBlock:
            pass
print(json.dumps({"seconds": time.perf_counter() - t0, "refused": L.refused}), flush=True)
"""


def _cpus() -> tuple[int, int]:
    cpus = sorted(os.sched_getaffinity(0))
    return (cpus[0], cpus[1]) if len(cpus) > 1 else (-1, -1)


def _set_limits(ch, limits: str) -> None:
    m = ch.ctrl_map
    if limits in ("rate", "rights"):
        _core.atomic_store_u32(m, _core.CTRL_RIGHTS_OFF, _core.RIGHT_SEND)
        _core.atomic_store_u64(m, _core.CTRL_RATE_LIMIT_OFF, 10**12 if limits == "rate" else 0)
        _core.atomic_store_u32(m, _core.CTRL_FLAGS_OFF, _core.CTRL_F_ENFORCE)
    else:
        _core.atomic_store_u32(m, _core.CTRL_FLAGS_OFF, 0)


def round_trip(n: int, limits: str, mode: int = 0, size: int = 0, loan: bool = False) -> dict:
    scpu, ccpu = _cpus()
    db = make_doorbell()
    arena = 1 << 20
    while arena < 2 * (size + 4096):
        arena *= 2
    ch = make_chan(1, arena=arena)
    _set_limits(ch, limits)
    args = {"db": db, "chan": ch.chan, "ctrl": ch.ctrl, "nslots": ch.nslots, "arena": ch.arena,
            "mode": mode, "cpu": scpu, "role": "echo"}
    p = subprocess.Popen([sys.executable, "-c", SERVER, json.dumps(args)],
                         pass_fds=(db, ch.chan, ch.ctrl), stdout=subprocess.PIPE, text=True)
    old = os.sched_getaffinity(0)
    try:
        assert p.stdout.readline().strip() == "ready"
        if ccpu >= 0:
            os.sched_setaffinity(0, {ccpu})
        lane = _core.Lane(ch.chan, ch.ctrl, db, 1, ch.nslots, ch.arena, mode)
        data = (1, 2, 3, 4)
        if loan:
            take, call_loan = lane.loan, lane.call_loan
            take(size)[:] = bytes(size)  # fault the pages in once
            lane.cancel_loan()

            def call(cap, op, flags, data):
                take(size)
                return call_loan(cap, op, flags, data)
        elif size:
            payload = bytes(size)
            call_ = lane.call

            def call(cap, op, flags, data):
                return call_(cap, op, flags, data, payload)
        else:
            call = lane.call
            call(7, 1, 0, data)
        for _ in range(min(20_000, n // 10 + 1)):
            call(7, 1, 0, data)
        clock = time.perf_counter_ns
        samples = []
        append = samples.append
        for _ in range(n):
            t0 = clock()
            call(7, 1, 0, data)
            append(clock() - t0)
        t0 = time.perf_counter()
        for _ in range(n):
            call(7, 1, 0, data)
        loop = time.perf_counter() - t0
        call(7, 2, 0, ())
        p.wait(30)
    finally:
        os.sched_setaffinity(0, old)
        if p.poll() is None:
            p.kill()
            p.wait()
        ch.close()
        os.close(db)
    samples.sort()
    return {"limits": limits, "size": size, "loan": loan, "n": n,
            "median_us": samples[n // 2] / 1000,
            "p99_us": samples[int(n * 0.99)] / 1000, "loop_mean_us": loop / n * 1e6}


def many(n: int, batch: int, max_n: int = 256, verify: bool = True) -> dict:
    scpu, ccpu = _cpus()
    db = make_doorbell()
    ch = make_chan(1, nslots=1024, arena=1 << 20)
    args = {"db": db, "chan": ch.chan, "ctrl": ch.ctrl, "nslots": ch.nslots, "arena": ch.arena,
            "mode": 1, "cpu": ccpu, "n": n, "batch": batch}
    p = subprocess.Popen([sys.executable, "-c", PRODUCER, json.dumps(args)],
                         pass_fds=(db, ch.chan, ch.ctrl), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    old = os.sched_getaffinity(0)
    try:
        assert p.stdout.readline().strip() == "ready"
        if scpu >= 0:
            os.sched_setaffinity(0, {scpu})
        S = _core.ServerSet(db, 1)
        S.add(1, ch.chan, ch.ctrl, ch.nslots, ch.arena, 5)
        recv_many = S.recv_many
        p.stdin.write("go\n")
        p.stdin.flush()
        got = 0
        expect = 0
        t0 = time.perf_counter()
        while got < n:
            reqs = recv_many(max_n, 5_000_000_000)
            if verify:
                for r in reqs:
                    if r.data[0] != expect:
                        raise AssertionError(f"got {r.data[0]}, expected {expect}")
                    expect += 1
                got = expect
            else:
                got += len(reqs)
        dt = time.perf_counter() - t0
        prod = json.loads(p.stdout.readline())
        p.wait(30)
    finally:
        os.sched_setaffinity(0, old)
        if p.poll() is None:
            p.kill()
            p.wait()
        ch.close()
        os.close(db)
    return {"batch": batch, "n": n, "verify": verify, "msgs_per_s": n / dt,
            "producer_s": prod["seconds"], "refused": prod["refused"]}


def inproc(n: int, limits: str) -> dict:
    cpus = sorted(os.sched_getaffinity(0))
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpus[-1]})
    db = make_doorbell()
    ch = make_chan(1)
    _set_limits(ch, limits)
    try:
        S = _core.ServerSet(db, 0)
        S.add(1, ch.chan, ch.ctrl, ch.nslots, ch.arena, 5)
        lane = _core.Lane(ch.chan, ch.ctrl, db, 1, ch.nslots, ch.arena, 0)
        start, cpoll, poll = lane.call_start, lane.call_poll, S.poll
        data = (1, 2, 3, 4)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n // 5):
                tag = start(7, 1, 0, data)
                req = poll()
                req.reply(req.opcode, req.data)
                cpoll(tag)
            best = min(best, (time.perf_counter() - t0) / (n // 5))
    finally:
        os.sched_setaffinity(0, old)
        ch.close()
        os.close(db)
    return {"limits": limits, "n": n, "best_of_5_us_per_call": best * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["rt", "ab", "many", "inproc"])
    ap.add_argument("--n", type=int, default=0)
    ap.add_argument("--limits", default="none", choices=["none", "rate", "rights"])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=0)
    ap.add_argument("--mode", type=int, default=0)
    ap.add_argument("--no-verify", action="store_true", help="many: only count, do not check")
    ap.add_argument("--size", type=int, default=0, help="rt: payload bytes per call")
    ap.add_argument("--loan", action="store_true", help="rt: loan + call_loan (no copy)")
    a = ap.parse_args()
    if a.what == "rt":
        for _ in range(a.runs):
            print(json.dumps(round_trip(a.n or 200_000, a.limits, a.mode, a.size, a.loan)),
                  flush=True)
    elif a.what == "ab":
        for _ in range(a.runs):
            for lim in ("none", "rate"):
                print(json.dumps(round_trip(a.n or 200_000, lim, a.mode)), flush=True)
    elif a.what == "inproc":
        for _ in range(a.runs):
            print(json.dumps(inproc(a.n or 1_000_000, a.limits)), flush=True)
    else:
        print(json.dumps(many(a.n or 2_000_000, a.batch, verify=not a.no_verify)), flush=True)


if __name__ == "__main__":
    main()
