"""The prelude of a test child that speaks the control protocol by hand, as a hostile process
would: conn() to $CAPBUS_SOCKET, send(), recv() (closing any fds that come with an answer),
hello(), out()."""

RAW = """
import array, os, socket, sys, time
from capbus._protocol import frames
ANC = socket.CMSG_SPACE(frames.MAX_FDS * 4)
PATH = os.environ["CAPBUS_SOCKET"]

def conn():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    s.settimeout(10)
    s.connect(PATH)
    return s

def send(s, msg, rid):
    s.send(frames.encode(msg, rid))

def recv(s):
    data, anc, _, _ = s.recvmsg(frames.MAX_FRAME + 1, ANC)
    n = 0
    for level, kind, payload in anc:
        if kind == socket.SCM_RIGHTS:
            fds = array.array("i")
            fds.frombytes(payload[: len(payload) - len(payload) % 4])
            for fd in fds:
                os.close(fd)
            n += len(fds)
    if not data:
        return None
    return frames.decode(data, n)[0]

def hello(s):
    send(s, frames.Hello(frames.VERSION, "block"), 1)
    return recv(s)

def out(*a):
    print(*a, flush=True)
"""
