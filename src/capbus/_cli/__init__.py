"""The `capbus` command (pyproject: capbus = "capbus._cli.main:main"), one module per verb family.

main (argparse and dispatch only) -> admin (kernel, run, ps, services, caps, sandbox-check),
top (stats, top), metrics, audit, demo -> query (reading the kernel, over Process.query()),
stats (pure aggregation of the kernel's counters) -> fmt (the one table formatter). Arrows run
down only; tests/tools/test_layout.py keeps it so.
"""
