"""A service for the gateway tests, in a process of its own: argv[1] socket, argv[2] name.
Opcodes: 1 echo (opcode+1, data, payload reversed); 2 sleep data[0] ms then echo; 3 exit at
once without replying (dies mid-call); 4 reply_error(data[0], "app"); 5 stop reading (block);
6 how many one-way messages it has seen; 8 how many opcode-2 calls it has served; 9 a reply
of data[0] bytes; object calls answered with the object doubled."""

import os
import sys
import time

import capbus

proc = capbus.connect(sys.argv[1])
svc = proc.register(sys.argv[2])
print("ready", proc.id, flush=True)
seen = 0
slept = 0
while True:
    req = svc.recv()
    if not req.expects_reply:
        seen += 1
        continue
    op = req.opcode
    if op == 100:
        req.reply_object({"twice": req.object()["n"] * 2})
    elif op == 1:
        req.reply(2, req.data, bytes(req.payload)[::-1])
    elif op == 2:
        slept += 1
        time.sleep(req.data[0] / 1000)
        req.reply(3, req.data, b"slept")
    elif op == 3:
        os._exit(0)
    elif op == 4:
        req.reply_error(req.data[0], "app")
    elif op == 5:
        req.reply(0)
        time.sleep(3600)
    elif op == 6:
        req.reply(0, (seen,))
    elif op == 8:
        req.reply(0, (slept,))
    elif op == 7:
        req.reply(0, (req.sender,))
    elif op == 9:
        req.reply(0, (), b"r" * req.data[0])
