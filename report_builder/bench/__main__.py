"""`python -m report_builder.bench` (what `make bench` runs): side-by-side timings, see bench.rows."""
import sys

from report_builder.bench.rows import main

sys.exit(main())
