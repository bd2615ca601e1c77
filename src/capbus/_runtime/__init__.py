"""The untrusted side: the capbus runtime inside each process. It never imports the kernel."""
