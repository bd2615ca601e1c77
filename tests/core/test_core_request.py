"""The fast-path objects of capbus._core: Request (what recv/poll/recv_many return, answered
with .reply) and the Message type of call results."""

from __future__ import annotations

import gc
import threading

import pytest

from capbus import _core  # noqa: E402
from capbus._errors import IpcError, MessageTooLarge  # noqa: E402

SEC = 1_000_000_000




@pytest.fixture
def pair(db, chans):
    ch = chans(1)
    s = _core.ServerSet(db)
    s.add(1, ch.chan, ch.ctrl, ch.nslots, ch.arena, 42)
    ln = _core.Lane(ch.chan, ch.ctrl, db, 1, ch.nslots, ch.arena)
    return ch, s, ln


def start(ln, data=(), payload=None, flags=0):
    return ln.call_start(0, 10, flags, data, payload)


def test_request_fields_and_defaults(pair):
    ch, s, ln = pair
    tag = start(ln, (1, 2), b"abc", 0x30000 | _core.FLAG_CHECKSUM)
    r = s.poll()
    assert isinstance(r, _core.Request)
    assert (r.sender, r.opcode, r.flags, r.data, r.payload) == (42, 10, 0x30000, (1, 2, 0, 0), b"abc")
    assert (r.expects_reply, r.index, r.tag, r.capability, r.replied) == (True, 1, tag, 0, False)
    assert r.data is r.data  # built once
    assert r.regions == () and r.caps == ()
    r.regions = ("region",)
    r.caps = [1, 2]
    assert r.regions == ("region",) and r.caps == [1, 2]
    del r.regions
    assert r.regions == ()
    for name in ("sender", "opcode", "flags", "data", "payload", "expects_reply", "index", "tag"):
        with pytest.raises(AttributeError):
            setattr(r, name, 1)
    with pytest.raises(AttributeError):
        r.anything_else = 1  # no __dict__
    assert repr(r) == "<capbus.Request from 42 opcode=10 data=(1, 2, 0, 0) payload=3 bytes (call)>"
    r.reply()  # all defaults
    assert repr(r).endswith("(replied)>") and r.replied
    assert ln.call_poll(tag) == (0, 0, 0, 0, 0, 0, None)
    with pytest.raises(TypeError):
        _core.Request()


def test_reply_arguments(pair):
    ch, s, ln = pair
    tag = start(ln)
    r = s.poll()
    for bad in [dict(data=(1, 2, 3, 4, 5)), dict(data=(-1,)), dict(data=(2**64,)),
                dict(opcode=2**32), dict(opcode=-1), dict(flags=_core.FLAG_ERROR),
                dict(flags=_core.FLAG_REPLY_EXPECTED), dict(flags=0x100)]:
        with pytest.raises(ValueError):
            r.reply(**bad)
    for bad in [dict(data=(1.5,)), dict(data=5), dict(data="ab"), dict(opcode="1"),
                dict(payload="text"), dict(payload=5), dict(bogus=1)]:
        with pytest.raises(TypeError):
            r.reply(**bad)
    with pytest.raises(TypeError):
        r.reply(1, (), b"", 0, 5)  # too many
    with pytest.raises(TypeError):
        r.reply(1, opcode=2)  # twice
    with pytest.raises(MessageTooLarge):
        r.reply(1, (), bytes(ch.arena))
    assert not r.replied  # none of that sent anything
    r.reply(7, [1, 2, 3, 4], bytearray(b"x" * 100), 0x10000 | _core.FLAG_CHECKSUM)
    m = ln.call_poll(tag)
    assert m == (7, 0x10000 | _core.FLAG_CHECKSUM | _core.FLAG_LARGE, 1, 2, 3, 4, b"x" * 100)
    tag = start(ln)
    s.poll().reply(opcode=8, payload=memoryview(b"mv"), data=(9,))
    assert ln.call_poll(tag) == (8, 0, 9, 0, 0, 0, b"mv")
    tag = start(ln)
    s.poll().reply(8, (), b"")  # an empty payload is no payload
    assert ln.call_poll(tag)[6] is None


def test_reply_once_and_no_reply_for_sends(pair):
    ch, s, ln = pair
    start(ln)
    r = s.poll()
    r.reply(1)
    with pytest.raises(IpcError, match="already been replied to"):
        r.reply(1)
    ln.send(0, 1, 0, ())
    one_way = s.poll()
    assert not one_way.expects_reply
    with pytest.raises(IpcError, match="send_async.*takes no reply"):
        one_way.reply()
    assert one_way.reply_error(5, "ignored") is False  # nothing to answer: a no-op
    assert r.reply_error(5, "ignored too") is False


def test_reply_error(pair):
    ch, s, ln = pair
    tag = start(ln)
    assert s.poll().reply_error(13, "the peer died") is True  # the application's code 13 ...
    assert ln.call_poll(tag) == (0, _core.FLAG_ERROR, 13, 0, 0, 0, b"the peer died")  # not PeerDied
    tag = start(ln)
    assert s.poll()._reply_ipc_error(13, "capbus's own") is True
    assert ln.call_poll(tag) == (0, _core.FLAG_ERROR | _core.FLAG_IPC_ERROR, 13, 0, 0, 0, b"capbus's own")
    tag = start(ln)
    s.poll().reply_error(2, b"bytes \xff too")
    assert ln.call_poll(tag)[6] == b"bytes \xff too"
    tag = start(ln)
    r = s.poll()
    r.reply_error(code=1, text="\u00e9" * 5000)  # UTF-8, cut to 4096 bytes
    msg = ln.call_poll(tag)
    assert len(msg[6]) == 4096 and msg[6].decode(errors="replace").startswith("\u00e9" * 100)
    with pytest.raises(IpcError):
        r.reply()
    tag = start(ln)
    r = s.poll()
    with pytest.raises(TypeError):
        r.reply_error(1, 5)
    with pytest.raises(ValueError):
        r.reply_error(-1, "x")
    assert not r.replied


def test_reply_to_a_full_response_ring_is_dropped_and_counted(db, chans):
    ch = chans(1, nslots=2)
    s = _core.ServerSet(db)
    s.add(1, ch.chan, ch.ctrl, ch.nslots, ch.arena)
    ln = _core.Lane(ch.chan, ch.ctrl, db, 1, ch.nslots, ch.arena)
    # Two replies the client never reads fill the 2-slot response ring.
    for _ in range(2):
        start(ln)
        assert s.poll().reply(1) is True
    tag = start(ln)
    r = s.poll()
    assert r.reply(2) is False  # a client that does not read its replies loses them
    assert r.replied
    assert _core.channel_stats(ch.map())["reply_failed"] == 1
    assert ln.call_poll(tag) is None  # reads (and drops) the two late replies; ours is gone
    tag = start(ln)
    assert s.poll().reply(3) is True  # room again
    assert ln.call_poll(tag)[0] == 3


def test_reply_to_a_gone_client_returns_false(db, chans):
    ch = chans(1)
    s = _core.ServerSet(db)
    s.add(1, ch.chan, ch.ctrl, ch.nslots, ch.arena)
    ln = _core.Lane(ch.chan, ch.ctrl, db, 1, ch.nslots, ch.arena)
    start(ln)
    r = s.poll()
    ch.set_state(_core.STATE_PEER_DEAD)
    assert r.reply(1) is False
    assert r.replied
    ch.set_state(_core.STATE_OPEN)
    start(ln)
    r = s.poll()
    ch.set_state(_core.STATE_CLOSED)
    assert r.reply_error(1, "nobody to tell") is False
    assert r.replied
    ch.set_state(_core.STATE_OPEN)
    start(ln)
    r = s.poll()
    s.remove(1)
    assert r.reply(1) is False
    # Re-added at the same index (the kernel reuses indices): an old request's reply must not
    # reach the new channel.
    new = chans(1)
    s.add(1, ch.chan, ch.ctrl, ch.nslots, ch.arena)
    start(ln)
    old = s.poll()
    s.remove(1)
    s.add(1, new.chan, new.ctrl, new.nslots, new.arena)
    assert old.reply(1) is False
    assert _core.atomic_load_u64(new.map(), new.layout()["resp_tail"]) == 0
    # A closed set: dropped too.
    nl = _core.Lane(new.chan, new.ctrl, db, 1, new.nslots, new.arena)
    start(nl)
    r = s.poll()
    s.close()
    assert r.reply(1) is False


def test_request_keeps_its_server_set_alive(db, chans):
    ch = chans(1)
    s = _core.ServerSet(db)
    s.add(1, ch.chan, ch.ctrl, ch.nslots, ch.arena)
    ln = _core.Lane(ch.chan, ch.ctrl, db, 1, ch.nslots, ch.arena)
    tag = start(ln)
    r = s.poll()
    del s
    gc.collect()
    r.reply(3)
    assert ln.call_poll(tag)[0] == 3


def test_request_cycles_are_collected(pair):
    ch, s, ln = pair
    ln.send(0, 1, 0, ())
    r = s.poll()
    r.caps = [r]  # a cycle through a settable attribute
    del r
    gc.collect()
    assert not any(isinstance(o, _core.Request) for o in gc.get_objects())


def test_reply_from_another_thread_while_recv_waits(pair):
    ch, s, ln = pair
    start(ln)
    r = s.poll()
    got = []
    t = threading.Thread(target=lambda: got.append(s.recv_many(10, SEC)))
    t.start()
    r.reply(5)
    ln.send(0, 1, 0, (9,))
    t.join(10)
    assert [x.data[0] for x in got[0]] == [9]


# ---- result types ----------------------------------------------------------------------------------


def test_results_are_the_native_types(pair):
    """Call results are _core.Message and received requests _core.Request: the types themselves
    (no Python subclass to build per message; nothing can swap them)."""
    ch, s, ln = pair
    tag = start(ln, (4,))
    r = s.poll()
    assert type(r) is _core.Request
    r.reply(r.opcode, r.data)
    m = ln.call_poll(tag)
    assert type(m) is _core.Message and m == (10, 0, 4, 0, 0, 0, None)
    with pytest.raises(TypeError):
        _core.Request()  # only the core makes them
    assert not hasattr(_core, "set_types")


def test_cancelled_reads_the_callers_cancel_mark(db, chans):
    ch = chans(1)
    s = _core.ServerSet(db)
    s.add(1, ch.chan, ch.ctrl, ch.nslots, ch.arena)
    ln = _core.Lane(ch.chan, ch.ctrl, db, 1, ch.nslots, ch.arena)
    t1 = start(ln)
    r1 = s.poll()
    assert r1.cancelled is False
    t2 = start(ln)
    r2 = s.poll()
    ln.cancel(t1)  # the caller gave up on the first call only
    assert (r1.cancelled, r2.cancelled) == (True, False)
    assert r2.reply(1) is True
    assert ln.call_poll(t2) is not None
    # a caller scribbling its cancel mark (a client-written word) can only cancel its own calls
    start(ln)
    r3 = s.poll()
    m = ch.map()
    off = _core.CHAN_CANCEL_BELOW_OFF
    was = _core.atomic_load_u64(m, off)
    assert _core.atomic_cas_u64(m, off, was, 1 << 63)
    assert r3.cancelled is True
    assert _core.atomic_cas_u64(m, off, 1 << 63, 0)
    assert r3.cancelled is False  # a hint: read each time, never latched
    # one-way messages are never "cancelled"
    ln.send(0, 5, 0, (), None)
    r4 = s.poll()
    assert (r4.expects_reply, r4.cancelled) == (False, False)
    # a gone channel cancels every call of it
    ch.set_state(_core.STATE_PEER_DEAD)
    assert r3.cancelled is True
    ch.set_state(_core.STATE_OPEN)
    assert r3.cancelled is False
    s.remove(1)
    assert r3.cancelled is True
