"""A user's program against the whole public API, for the type checker (never run, never
collected by pytest: tests/test_typing.py runs `mypy --strict` on it and expects no error).

Every name and call here is one a user of capbus writes; if a signature in src/capbus (or the
native core's contract, src/capbus/_core.pyi) drifts from what users are told, mypy says so.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Mapping, Sequence

import capbus


def kernel_side(socket_path: str) -> capbus.Kernel:
    limits = capbus.KernelLimits(connections_per_pid=64, caps_per_uid=1024)
    policy = capbus.Policy(limits=limits, uid_packages={1000: "app"})

    def may_register(who: capbus.ProcessInfo, name: str) -> bool:
        return who.uid == 0 or name.startswith(f"{who.package}.")

    capbus.Policy(register=may_register)
    capbus.Policy.coerce(None)
    kernel = capbus.Kernel(socket_path, policy, audit=None, debuggable=True)
    sandbox = capbus.Sandbox(read=["/srv/data"], write=["/tmp/app"], network=False)
    child: capbus.Child = kernel.spawn(
        ["python3", "-m", "app.worker"], name="worker", package="app",
        env={"LANG": "C"}, restart="on-failure", max_restarts=2, sandbox=sandbox,
        grants={"store": "store", "logs": {"service": "logs", "rights": ["send"], "rate_limit": 100}},
        lookup=["store", "package:tools"])
    pid: int = child.pid
    process_id: int = child.process_id
    code: int | None = child.returncode
    child.revoke_grant("logs")
    child.terminate()
    status: int = child.wait(timeout=5.0)
    print(pid, process_id, code, status)
    rows: list[dict[str, object]] = kernel.processes() + kernel.services() + kernel.channels()
    caps = kernel.caps(process_id)
    usage: dict[str, int] = kernel.uid_usage(1000)
    print(rows, caps, usage, kernel.process_stats(process_id))
    return kernel


def serve_store(proc: capbus.Process) -> None:
    svc: capbus.Service = proc.register("store", allow=["uid:1000", 7, "package:app"],
                                        limits={"rate_limit": 1000}, max_caps=4, attach_ttl=30.0)
    proc.register_package(max_regions=2, attach_ttl=5.0)
    svc.allow("uid:1001")
    svc.deny(9)
    req: capbus.Request = svc.recv(timeout=1.0)
    sender: int = req.sender
    opcode: int = req.opcode
    data: tuple[int, int, int, int] = req.data
    payload: bytes | memoryview = req.payload
    print(sender, opcode, data, bytes(payload), req.flags, req.expects_reply, req.zero_copy)
    for region in req.regions:
        view: memoryview = region.buffer
        print(view.nbytes, region.size, region.writable, region.sealed)
    for cap in req.caps:
        cap.send_async(1)
    if req.expects_reply:
        delivered: bool = req.reply(0, (1, 2), b"ok")
        print(delivered)
    other = svc.poll()
    if other is not None:
        other.reply_error(42, "no such key")
    for r in svc.recv_many(16, timeout=0.5):
        r.reply_object({"sum": sum(r.data)})
        r.release()
    dropped: dict[str, int] = svc.drops(sender)
    refused: int = svc.refused(sender)
    print(dropped, refused)

    def handler(r: capbus.Request) -> int | tuple[int, Sequence[int]] | None:
        obj = r.object()
        return (0, (len(str(obj)),)) if r.opcode else None

    svc.serve(handler, poll=0.1)
    svc.close()


def client(proc: capbus.Process) -> None:
    grants: Mapping[str, capbus.Endpoint] = proc.grants
    ep: capbus.Endpoint = grants.get("store") or proc.lookup("store", timeout=2.0)
    proc.lookup_package("tools")
    reply: capbus.Message = ep.call(1, (1, 2, 3, 4), b"payload", timeout=1.0)
    opcode: int = reply.opcode
    data: tuple[int, int, int, int] = reply.data
    payload: bytes = reply.payload
    print(opcode, data, payload, reply.flags, reply[0])
    ep.call(2, [5], bytearray(8), flags=1)
    answer = ep.call_object({"key": "k"}, opcode=3, timeout=1.0).object()
    print(answer)
    ep.send_async(4, (1,), memoryview(b"x"))
    accepted: int = ep.send_many([(5, (1,)), (5, (2,), b"two")])
    print(accepted)
    region: capbus.Region = proc.create_region(1 << 20)
    region.buffer[:4] = b"abcd"
    region.seal_readonly()
    ep.call(6, regions=[region], move=True)
    weaker: capbus.Endpoint = ep.restrict(["send"], rate_limit=10, bandwidth=1 << 20,
                                          max_message_size=4096, expires_in=60.0)
    ep.call(7, caps=[weaker])

    def died(e: capbus.Endpoint) -> None:
        print("gone", e)

    ep.on_death(died)
    limits: capbus.Limits = ep.limits
    print(limits.rate, limits.expires_at)
    with ep.loan(64) as loan:
        loan.buffer[:3] = b"abc"
        loan.send_async(8)
    weaker.revoke()
    sub: capbus.Subscription = proc.subscribe_registrations()
    if sub.wait(timeout=0.1):
        print("a service registered")
    sub.close()
    rows: list[dict[str, object]] = proc.query("processes", timeout=2.0)
    print(rows, proc.id, proc.closed)

    async def main() -> capbus.Message:
        return await ep.acall(9, (1,), b"async", timeout=1.0)

    print(asyncio.run(main()))


async def aserve(svc: capbus.Service) -> None:
    req: capbus.Request = await svc.arecv(timeout=1.0)
    req.reply(0)
    async for r in svc:
        r.reply_error(1, b"bytes are text too")


class KV(capbus.Interface):
    errors = (KeyError,)

    @abc.abstractmethod  # a declaration returning a value: abstract, for mypy's empty-body check
    def get(self, key: str) -> bytes: ...
    def put(self, key: str, value: bytes) -> None: ...
    @abc.abstractmethod
    def keys(self) -> list[str]: ...


class KVImpl(KV):
    def __init__(self) -> None:
        self.store: dict[str, bytes] = {}

    def get(self, key: str) -> bytes:
        return self.store[key]

    def put(self, key: str, value: bytes) -> None:
        self.store[key] = value

    def keys(self) -> list[str]:
        return list(self.store)


def typed(proc: capbus.Process) -> None:
    svc = proc.register("kv")
    svc.serve_interface(KVImpl(), KV, poll=0.5)
    kv: KV = proc.lookup("kv").proxy(KV, timeout=1.0, check_timeout=5.0)
    value: bytes = kv.get("a")
    kv.put("a", value)
    names: list[str] = kv.keys()
    print(names)

    async def main() -> bytes:
        await svc.aserve_interface(KVImpl(), concurrency=8)
        akv = proc.lookup("kv").aproxy(KV, timeout=1.0)
        got: bytes = await akv.get("a")
        return got

    asyncio.run(main())


def errors(ep: capbus.Endpoint) -> None:
    try:
        ep.call(1, timeout=0.1)
    except capbus.RemoteError as exc:
        print(exc.code, exc.text, exc.remote_type)
    except (capbus.Timeout, capbus.PeerDied, capbus.InvalidCapability, capbus.WouldBlock,
            capbus.MessageTooLarge, capbus.ProtocolError, capbus.PermissionDenied,
            capbus.RateLimitExceeded, capbus.NoReply, capbus.Cancelled, capbus.InvalidArgument,
            capbus.InterfaceMismatch) as exc:
        code: int = exc.code
        print(code)
    except (capbus.KernelUnavailable, capbus.NameTaken, capbus.OutOfMemory,
            capbus.ProcessNotFound, capbus.SandboxError, capbus.ServiceNotFound) as exc:
        print(exc)
    except capbus.IpcError as exc:
        print(exc)
    # capbus errors are Python's built-in kinds too.
    try:
        ep.call(1, timeout=0.1)
    except TimeoutError as exc:
        print(exc)
    except ConnectionError as exc:
        print(exc)
    except BlockingIOError as exc:
        print(exc)
    except PermissionError as exc:
        print(exc)
    timeout: TimeoutError = capbus.Timeout("no reply within 0.1 s")
    died: ConnectionError = capbus.PeerDied("gone")
    full: BlockingIOError = capbus.WouldBlock("full")
    denied: PermissionError = capbus.PermissionDenied("no")
    wrong: TypeError = capbus.InvalidArgument("KV.get: Expected `str`")
    print(timeout, died, full, denied, wrong)


def main() -> None:
    kernel = kernel_side("/tmp/capbus-typing.sock")
    proc = capbus.connect(kernel.socket_path, "block", reconnect=True,
                          on_reconnect=lambda p: print(p.id), debuggable=True)
    client(proc)
    proc.close()
    kernel.stop(timeout=5.0)
    assert capbus.INVALID_PROCESS == 0
    print(capbus.SmallMessage, capbus.LargeMessage, capbus.__version__)
