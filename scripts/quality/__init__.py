"""The parts of `make bench-quality` (scripts/bench_quality.py is its command line):
runs.py (the runs, the recipes, training one patch and scoring it with the oracle),
recovery.py (the recovery attack, hardening, Concept Inversion and M-Score), anchors.py
(redirects and the anchor floor), self_check.py (the self-check study) and report.py
(quality.json, its merges and the tables of bench/QUALITY.md)."""
