"""Property: no sequence of restrict, delegate and revoke ever yields a capability with more
rights or looser limits than its ancestor, and after a revoke no descendant works."""

from __future__ import annotations

import threading

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import capbus
from capbus._kernel.captable import CapLimits

RIGHT_SETS = st.sets(st.sampled_from(["send", "share", "receive"]), max_size=3)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("restrict"), st.integers(0, 30), RIGHT_SETS,
                  st.sampled_from([None, 5, 50, 500]), st.sampled_from([None, 64, 4096])),
        st.tuples(st.just("delegate"), st.integers(0, 30)),
        st.tuples(st.just("revoke"), st.integers(0, 30)),
    ),
    min_size=1, max_size=12,
)


def _within(child: capbus.Limits, parent: capbus.Limits) -> bool:
    for c, p in ((child.rate, parent.rate), (child.max_message_size, parent.max_message_size),
                 (child.expires_at, parent.expires_at)):
        if p is not None and (c is None or c > p):
            return False
    return True


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_no_widening_and_revocation_is_total(kernel, ops):
    with capbus.connect(kernel.socket_path) as a, capbus.connect(kernel.socket_path) as b:
        target = a.register("target")
        inbox = b.register("inbox")
        root = a.lookup("target")
        to_inbox = a.lookup("inbox")
        caps = [root]                      # every capability made, in A or in B
        parent: dict[int, int] = {}        # index -> index of what it derives from
        revoked: set[int] = set()

        def alive(i: int) -> bool:
            j = i
            while j is not None:
                if j in revoked:
                    return False
                j = parent.get(j)
            return True

        for op in ops:
            i = op[1] % len(caps)
            cap = caps[i]
            if op[0] == "restrict":
                _, _, rights, rate, size = op
                try:
                    child = cap.restrict(rights=rights, rate_limit=rate, max_message_size=size)
                except capbus.PermissionDenied:
                    lim = cap.limits
                    widens = (not rights <= cap.rights
                              or (rate and lim.rate and rate > lim.rate)
                              or (size and lim.max_message_size and size > lim.max_message_size))
                    assert widens, "refused a restriction that widens nothing"
                    continue
                except capbus.InvalidCapability:
                    assert not alive(i)
                    continue
                assert alive(i)
                assert child.rights <= cap.rights and _within(child.limits, cap.limits)
                parent[len(caps)] = i
                caps.append(child)
            elif op[0] == "delegate":
                if cap._session is not a._session:  # held by A (the objects see its Session)
                    continue  # only A delegates (to B) in this model
                box: dict = {}

                def take(box=box):
                    try:
                        req = inbox.recv(timeout=5)
                        box["caps"] = req.caps
                        req.reply(0)
                    except capbus.IpcError as exc:
                        box["err"] = exc

                t = threading.Thread(target=take)
                t.start()
                try:
                    to_inbox.call(1, caps=[cap], timeout=5)
                    ok = True
                except (capbus.PermissionDenied, capbus.InvalidCapability):
                    ok = False
                    to_inbox.send_async(0)  # release the receiver thread
                t.join(10)
                if ok:
                    assert alive(i) and "share" in cap.rights
                    (got,) = box["caps"]
                    assert got.rights <= cap.rights and _within(got.limits, cap.limits)
                    parent[len(caps)] = i
                    caps.append(got)
                else:
                    assert not alive(i) or "share" not in cap.rights
            else:
                if i == 0 or not alive(i):
                    continue
                cap.revoke()
                revoked.add(i)

        # Whatever happened: every descendant of a revoked capability is dead everywhere.
        for i, cap in enumerate(caps):
            if alive(i):
                continue
            try:
                cap.restrict()
                raise AssertionError(f"capability {i} survived the revocation of an ancestor")
            except capbus.InvalidCapability:
                pass
        target.close()
        inbox.close()


def test_limits_model_never_loosens():
    @given(st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 1000), st.integers(0, 100)),
                    max_size=10))
    def check(steps):
        cur = CapLimits(0, 0, 0, 0.0)
        for rate, size, exp in steps:
            try:
                nxt = cur.tightened(rate=rate, max_message_size=size, expires_at=float(exp))
            except capbus.PermissionDenied:
                continue
            assert nxt.within(cur)
            cur = nxt

    check()
