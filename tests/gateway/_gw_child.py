"""A gateway in a process of its own (so that a test can kill it): argv[1] is the socket path,
argv[2] a JSON object of Gateway's keywords. Prints "ready" once started, runs until stdin
closes or SIGTERM."""

import json
import signal
import sys
import threading

import capbus

kw = json.loads(sys.argv[2])
gw = capbus.Gateway(sys.argv[1], **kw).start()
print("ready", gw.public_key, flush=True)
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
done.wait()
gw.stop()
