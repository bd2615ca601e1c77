"""The benchmarks of capbus (not part of the installed package): `make bench`, `python -m bench`.

main (the sections and their targets) -> capbus_calls, sandbox, scale (capbus measured), peers
(what capbus is measured against, one module per peer; native/ holds the C anchors, compiled
on first use) -> results (the Result rows, tables and JSON); plot draws a results file.
"""
