"""A topic publisher for the gateway tests, in a process of its own (so that a test can kill
it): argv[1] socket, argv[2] topic, argv[3] max_size. Prints "ready"; then each stdin line
"N" publishes one sample of N bytes (opcode 1, data (its number,)), and says "sent"."""

import sys

import capbus

proc = capbus.connect(sys.argv[1])
pub = proc.publish(sys.argv[2], max_size=int(sys.argv[3]))
print("ready", proc.id, flush=True)
for n, line in enumerate(sys.stdin, 1):
    pub.publish(1, (n,), bytes([n % 251]) * int(line))
    print("sent", n, flush=True)
