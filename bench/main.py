"""`make bench` (`python -m bench`, or `capbus bench` in a clone): capbus next to its peers,
in one run, on this machine, as tables.

Each section measures capbus first, then the peers (bench.peers) one at a time (never
two at once: a spinning pair uses both cores of a 2-core machine), then states capbus's targets
against the anchors measured in the same run.
"""

from __future__ import annotations

import argparse
import os

from . import capbus_calls, peers
from .results import Result, machine_info, machine_line, print_table, to_json

SECTIONS = ("call", "caps", "async", "large", "typed", "scale", "sandbox", "topics", "timed", "sched",
            "clients", "gateway")


def _find(rows: list[Result], mechanism: str, note_part: str = "") -> Result | None:
    for r in rows:
        if r.mechanism == mechanism and note_part in r.note and not r.skipped:
            return r
    return None


def _ratio(a: Result | None, b: Result | None) -> str:
    if a is None or b is None or not a.median_us or not b.median_us:
        return "n/a"
    return f"{a.median_us / b.median_us:.2f}x"


def call_section(quick: bool) -> list[Result]:
    ours = capbus_calls.run_calls(quick)
    rows = ours[:-1] + peers.run_peers("call", quick, given={"c_futex_same": ours[-1]})
    print_table("Round trip, 48-byte message, two processes", rows, machine_line())
    spin = _find(rows, "capbus spin")
    block_x = _find(rows, "capbus block", "cross-CPU")
    block_s = _find(rows, "capbus block", "same CPU")
    py_spin = next((r for r in rows if "Python" in r.mechanism and not r.skipped), None)
    futex_x = next((r for r in rows if "futex" in r.mechanism and "cross" in r.note.lower()
                    + r.mechanism.lower() and not r.skipped), None)
    futex_s = next((r for r in rows if "futex" in r.mechanism and "same" in r.note.lower()
                    + r.mechanism.lower() and not r.skipped), None)
    print()
    print("Targets:")
    print(f"  spin round trip, median: {spin.median_us if spin else float('nan'):.2f} us "
          f"(target about 1 us; {_ratio(spin, py_spin)} of the pure-Python spin, target <= 4x)")
    print(f"  block, cross-CPU: {_ratio(block_x, futex_x)} of the C futex ping-pong (target <= 1.2x)")
    print(f"  block, same CPU:  {_ratio(block_s, futex_s)} of the C futex ping-pong (target <= 1.2x)")
    return rows


def caps_section(quick: bool) -> list[Result]:
    rows = capbus_calls.capability_check_cost(20_000 if quick else 400_000)
    print_table("Cost of capability checks on the call path", rows, machine_line())
    print()
    print(f"Target: limits checked within 5% of none: {_ratio(rows[1], rows[0])}")
    return rows


def async_section(quick: bool) -> list[Result]:
    rows = capbus_calls.run_async(quick) + peers.run_peers("async", quick)
    print_table("One-way throughput, 48-byte messages (sender -> receiver)", rows, machine_line())
    unbatched = _find(rows, "capbus send_async")
    batched = max((r for r in rows if r.mechanism.startswith("capbus send_many") and r.msgs_per_s),
                  key=lambda r: r.msgs_per_s or 0, default=None)
    zmq = next((r for r in rows if "PUSH" in r.mechanism and r.msgs_per_s), None)
    print()
    print("Targets:")
    if unbatched and unbatched.msgs_per_s:
        vs = f"{unbatched.msgs_per_s / zmq.msgs_per_s:.1f}x pyzmq" if zmq and zmq.msgs_per_s else "n/a"
        print(f"  unbatched: {unbatched.msgs_per_s / 1e6:.2f} M/s (target >= 3 M/s, >= 3x pyzmq: {vs})")
    if batched and batched.msgs_per_s:
        print(f"  batched:   {batched.msgs_per_s / 1e6:.2f} M/s (target >= 10 M/s)")
    return rows


def large_section(quick: bool) -> list[Result]:
    rows = capbus_calls.run_large(quick) + peers.run_peers("large", quick)
    print_table("Large message round trip (two processes)", rows, machine_line())
    small = _find(rows, "capbus small call")
    loans = {r.size_bytes: r for r in rows if r.mechanism == "capbus loan"}
    mib = loans.get(1 << 20)
    print()
    if mib and mib.median_us:
        print(f"Target: a 1 MiB loaned call {mib.median_us:.2f} us (<= 10 us), "
              f"{_ratio(mib, small)} of a small call (<= 3x); 64 KiB / 64 MiB loans: "
              + " / ".join(f"{loans[s].median_us:.2f} us" for s in (64 << 10, 64 << 20) if s in loans))
    return rows


def typed_section(quick: bool) -> list[Result]:
    from . import typed

    rows = typed.run_typed(quick)
    print_table("Typed call (capbus.Interface proxy) next to a plain call and grpcio unary, small "
                "arguments (a + b)", rows, machine_line())
    grpc = _find(rows, "grpcio unary")
    print()
    print("Targets:")
    for mode in ("spin", "adaptive", "block"):
        plain, typed_row = _find(rows, f"capbus {mode} plain call"), _find(rows, f"capbus {mode} typed call")
        print(f"  {mode}: typed call {_ratio(typed_row, plain)} of a plain call (target <= 3x); "
              f"grpcio unary {_ratio(grpc, typed_row)} of the typed call (target >= 10x)")
    return rows


def scale_section(quick: bool) -> list[Result]:
    from . import scale

    # 1000 processes and 10,000 live channels (quick: 50 and 500); every bench process has one
    # uid, so run_mesh raises its services' max_channels_per_uid (only theirs) as it needs.
    n, channels, services, fresh = (50, 500, 20, 20) if quick else (1000, 10_000, 100, 100)
    scale.print_table(scale.run_mesh(n, channels, services, fresh), n, None,
                      scale.mesh_title(n, channels, services))
    return []


def sandbox_section(quick: bool) -> list[Result]:
    from . import sandbox

    rows = sandbox.run_spawn(quick)
    print_table("Launch: kernel.spawn() until the child's first call is answered (alternating runs)",
                rows, machine_line())
    print()
    print(f"Target: sandboxed spawn <= 1.2x plain: {_ratio(rows[1], rows[0])}; Popen with a "
          f"preexec_fn (fork) {_ratio(rows[3], rows[2])} of one without (vfork)")
    print()
    calls = sandbox.run_calls(quick)
    print_table("Hot path: small call round trip from a launched child, plain or sandboxed "
                "(alternating children)", calls, machine_line())
    print()
    for mode in ("spin", "block"):
        plain = _find(calls, f"capbus {mode} call from a plain child")
        boxed = _find(calls, f"capbus {mode} call from a sandboxed child")
        print(f"Target: no cost on the hot path: sandboxed/plain {mode} {_ratio(boxed, plain)}")
    return rows + calls


def topics_section(quick: bool) -> list[Result]:
    from . import topics

    return topics.run(quick)


def timed_section(quick: bool) -> list[Result]:
    from . import sched

    rows = sched.run_timed(quick)
    print_table("Timeouts: round trip with and without one, per wait mode (alternating rounds)",
                rows, machine_line())
    print()
    print("Targets: a timeout costs <= 5% in every mode; block with a timeout <= 1.2x the C futex "
          "ping-pong; spin with a timeout <= 2.5x the pure-Python spin (ratios in the notes)")
    return rows


def sched_section(quick: bool) -> list[Result]:
    from . import sched

    rows = sched.run_priority(quick)
    print_table("Priority propagation: a foreground caller under background load (one CPU)",
                rows, machine_line())
    return rows


def clients_section(quick: bool) -> list[Result]:
    from . import sched

    rows = sched.run_clients(quick)
    print_table("Many clients, one service (default wait mode), and the C reference of the same"
                " shape", rows, machine_line())
    print()
    print(sched.clients_target(rows))
    return rows


def gateway_section(quick: bool) -> list[Result]:
    try:
        from . import gateway
        rows = gateway.run(quick)
    except ImportError as exc:
        print(f"gateway: skipped ({exc}; pip install 'capbus[gateway]')")
        return []
    print_table("Across hosts: capbus through two gateways (Eclipse Zenoh, loopback TCP) beside raw "
                "zenoh-python", rows, machine_line())
    print()
    rt = _find(rows, "capbus remote call via 2 gateways")
    raw = _find(rows, "raw zenoh-python get/queryable")
    send = _find(rows, "capbus remote send_async via 2 gateways")
    put = _find(rows, "raw zenoh-python put/subscriber")
    one_way = (f"{send.msgs_per_s / put.msgs_per_s:.2f}x" if send and put and send.msgs_per_s
               and put.msgs_per_s else "n/a")
    print(f"Target: remote round trip <= 1.5x raw Zenoh: {_ratio(rt, raw)}; one-way >= 0.7x raw "
          f"Zenoh: {one_way}")
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    p.add_argument("--only", default=None, help="comma-separated: " + ",".join(SECTIONS))
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="also draw the tables as a chart")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    sections = args.only.split(",") if args.only else list(SECTIONS)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown bench sections {sorted(unknown)}: choose from {SECTIONS}")
    print(f"capbus bench on {machine_line()}")
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"WARNING: load average {load:.2f}: other work competes for the CPUs, and a spinning "
              "pair that loses its CPU waits a whole scheduler slice (milliseconds). Figures from "
              "a busy machine are not comparable.")
    print()
    everything: list[Result] = []
    for section in sections:
        everything += {"call": call_section, "caps": caps_section, "async": async_section,
                       "large": large_section, "typed": typed_section, "scale": scale_section,
                       "sandbox": sandbox_section, "topics": topics_section, "timed": timed_section,
                       "sched": sched_section, "clients": clients_section,
                       "gateway": gateway_section}[section](args.quick)
        print()
    if args.json:
        with open(args.json, "w") as f:
            f.write(to_json(everything, machine_info()))
    if args.plot:
        from . import plot

        plot.plot(everything, machine_info(), args.plot)
        print(f"chart written to {args.plot}")
    return 0
