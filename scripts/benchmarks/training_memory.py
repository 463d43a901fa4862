"""Figure 7: peak memory of a Forget Train run above the loaded model, per memory option,
each option in a fresh process (the runner's --memory-probe)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from .common import BENCH_SCRIPT, CONCEPT_LINES, clock, full_sd1_clip, full_sd15_patcher, r4

MEMORY_RESOLUTION, MEMORY_STEPS = 512, 1  # figure 7

MEMORY_OPTIONS = {
    "fp32": {},
    "bf16": {"precision": "bf16"},
    "fp16": {"precision": "fp16"},  # CUDA only
    "fp32 + checkpointing": {"gradient_checkpointing": True},
    "bf16 + checkpointing": {"precision": "bf16", "gradient_checkpointing": True},
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """Peak of a memory reading over a block, sampled every 2 ms on a thread."""

    def __init__(self, read):
        import threading

        self.read, self.peak, self.done = read, read(), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.read())
            self.done.wait(0.002)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, self.read())


def memory_probe(options: dict, resolution: int, steps: int) -> dict:
    """One option set in this (fresh) process: peak bytes of forget() above the loaded model."""
    import dataclasses

    import torch

    from fmn_pack.fmn_core import host
    from fmn_pack.fmn_core.concepts import parse_concepts
    from fmn_pack.fmn_core.train import ForgetConfig, forget

    patcher, clip = full_sd15_patcher(seed=0, dtype=torch.float32), full_sd1_clip(seed=1)
    concept = parse_concepts(CONCEPT_LINES[0])
    config = dataclasses.replace(ForgetConfig(), steps=steps, resolution=resolution, **options)
    host.loaded_forward(patcher)  # the model as sampling leaves it: loaded on the device
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        start = clock()
        forget(patcher, clip, concept, config)
        seconds = clock() - start
        peak, how = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
    else:
        before = _rss_bytes()
        start = clock()
        with PeakSampler(_rss_bytes) as sampler:
            forget(patcher, clip, concept, config)
        seconds, peak, how = clock() - start, sampler.peak, "resident set (/proc/self/statm), sampled every 2 ms"
    return {"peak_above_model_mib": r4((peak - before) / 2**20), "model_mib": r4(before / 2**20), "seconds": r4(seconds),
            "unet_dtype": str(patcher.model.get_dtype()), "measured_as": how}


def bench_training_memory(pack, cfg: dict) -> dict:
    """Figure 7: each option set in a fresh process (a process's allocator keeps what an
    earlier run freed), the same script in --memory-probe mode."""
    import torch

    rows, skipped = {}, {}
    for name, options in MEMORY_OPTIONS.items():
        if options.get("precision") == "fp16" and not torch.cuda.is_available():
            skipped[name] = ("CPUs have no fast fp16 kernels (one step ran over 15 minutes here, against a minute in "
                             "fp32); on a CPU the saved activations in fp16 take what bf16's take")
            continue
        args = [sys.executable, str(BENCH_SCRIPT), "--memory-probe", json.dumps(options), "--threads", str(cfg["torch_threads"])]
        done = subprocess.run(args, capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"memory probe {name} failed:\n{done.stderr[-3000:]}")
        rows[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  memory {name}: {rows[name]['peak_above_model_mib']:.0f} MiB above the model", flush=True)
    base = rows["fp32"]["peak_above_model_mib"]
    return {
        "value": {name: r4(row["peak_above_model_mib"] / base) for name, row in rows.items()},
        "what": (f"peak memory of forget() ({MEMORY_STEPS} training step(s), default config, {MEMORY_RESOLUTION} px, one concept) above "
                 "the loaded model, relative to fp32 without checkpointing; full-size SD1.5-layout UNet and CLIP-L "
                 "with random weights, UNet in fp32"),
        "per_option": rows,
        "not_measured": skipped,
    }
