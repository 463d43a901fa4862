"""The figures of `make bench`, one module per figure (two for figures 1 and 8, and 4 and
9, which share their measurement), behind the runner scripts/bench.py; common.py holds
what they share (the bootstrap, the clock, the figure format, the full-size models)."""
