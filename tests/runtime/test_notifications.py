"""Registration notifications (Tock): opt-in, coalesced, no identity, bounded kernel state."""

from __future__ import annotations

import threading

from conftest import wait_for

import capbus


def test_opt_in_nothing_queued_for_non_subscribers(kernel):
    with capbus.connect(kernel.socket_path) as bystander, capbus.connect(kernel.socket_path) as r:
        for i in range(50):
            r.register(f"svc-{i}")
        stats = kernel.process_stats(bystander.id)
        assert stats["notices_sent"] == 0 and stats["outbox"] == 0 and not stats["notice_pending"]


def test_storm_of_10000_coalesces_to_one(kernel):
    with capbus.connect(kernel.socket_path) as sub_proc:
        sub = sub_proc.subscribe_registrations()
        procs = [capbus.connect(kernel.socket_path) for _ in range(4)]

        def storm(p: capbus.Process, base: int) -> None:
            for i in range(2500):
                p.register(f"storm-{base + i}").close()  # close: stay within the cap table

        threads = [threading.Thread(target=storm, args=(p, n * 2500)) for n, p in enumerate(procs)]
        for t in threads:
            t.start()
        max_seen = {"outbox": 0, "parked": 0, "caps": 0}
        while any(t.is_alive() for t in threads):
            st = kernel.process_stats(sub_proc.id)
            for key in max_seen:
                max_seen[key] = max(max_seen[key], st[key])
        for t in threads:
            t.join(60)
        stats = kernel.process_stats(sub_proc.id)
        # 10,000 registrations, and the subscriber that never consumed got exactly one frame.
        assert stats["notices_sent"] == 1 and stats["notice_pending"]
        assert max_seen["outbox"] <= 1 and stats["caps"] == 1
        assert sub.wait(1) is True
        assert sub.wait(0.1) is False  # consumed: nothing more pending
        procs[0].register("after")
        assert sub.wait(2) is True
        assert kernel.process_stats(sub_proc.id)["notices_sent"] == 2
        for p in procs:
            p.close()


def test_notice_carries_no_identity(kernel):
    import dataclasses

    from capbus._protocol import frames

    assert [f.name for f in dataclasses.fields(frames.RegistrationNotice)] == ["handle"]


def test_subscription_close_stops_notices(kernel):
    with capbus.connect(kernel.socket_path) as a, capbus.connect(kernel.socket_path) as b:
        sub = a.subscribe_registrations()
        b.register("one")
        assert sub.wait(2)
        sub.close()
        b.register("two")
        assert not wait_for(lambda: kernel.process_stats(a.id)["notices_sent"] > 1, timeout=0.3)
