"""The trusted side: the kernel and its parts. It never imports the runtime's API layer."""
