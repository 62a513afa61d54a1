"""`python -m report_builder.bench` (what `make bench` runs): side-by-side timings, see bench.rows."""
import sys

from report_builder.bench.rows import main

if __name__ == "__main__":  # the forward rows' worker processes are spawned, and import this module again
    sys.exit(main())
