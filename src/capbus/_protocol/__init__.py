"""The control-plane protocol: frames and per-connection state, shared by kernel and runtime.

Nothing in this package touches a socket, a file descriptor or a thread (see STYLE.md, h11).
"""
