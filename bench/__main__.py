"""`python -m bench` from the top of a clone (what `make bench` runs)."""

import sys

from .main import main

try:
    sys.exit(main())
except ValueError as exc:  # a bad --only: said as `capbus bench` says it
    print(f"bench: {exc}", file=sys.stderr)
    sys.exit(1)
