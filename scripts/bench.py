#!/usr/bin/env python
"""Forget-Me-Not benchmarks: `make bench` writes bench/results.json.

Figures (bench/README.md explains each one and how to read it):

1. train_step_over_sampling_step: one Forget Train step (forward + backward + AdamW
   through the engine, default mode) over one plain sampling step (one UNet forward,
   batch 1, conditional only), same small SD1.5-layout model, same 16x16 latent.
2. sampling_with_patches: host sampler time with 0, 1 and 3 stacked forget patches,
   relative to 0 patches, plus the first-load (weight patching) time on its own.
3. patch_bytes_per_concept: bytes of a saved one-concept patch on SD1.5 shapes, per rank.
4. seconds_per_concept_sd15_512: Forget Train wall time for one concept on a full-size
   SD1.5-layout UNet at 512 px with the default config; CUDA only, else null + reason.
5. inversion_step_over_sampling_step: one Concept Inversion step (out-of-place text
   encoder + UNet forward + backward to the token rows) over one plain sampling step.
6. sampling_with_capture: a sampling run with the Attention Map Viewer's heatmap capture
   over the same run without it.
7. training_memory: peak memory of a Forget Train run (one step, default config) above
   the loaded model, per memory option (precision, gradient checkpointing), on a
   full-size SD1.5-layout UNet in fp32 at 512 px, each option in a fresh process. On CUDA
   the allocator's peak; on a CPU the peak resident set sampled every 2 ms.
8. sdxl_train_step_over_sampling_step: figure 1's measurement on a small SDXL-layout
   model (two-deep transformer blocks, 2048-d context, vector conditioning) with the
   host's SDXL CLIP pair; 3 repetitions.
9. seconds_per_concept_sdxl_1024: figure 4 on a full-size SDXL-layout UNet (~2.6 B
   parameters) and the full CLIP-L + CLIP-G pair at 1024 px; CUDA only, else null + reason.
   Figures 4 and 9 also carry the run's in-run report (its checks' seconds beside the
   training's, the steps it took of its budget, its erasure).
10. self_check_share: the in-run checks' share of one default run run to its whole budget
   (target 0, so every check runs): their seconds over the run's, checks and training steps
   timed apart (the issue's bound: at most 0.10), and over the steps alone beside it; the
   small SD1.5-layout model at 512 px on a GPU, 256 px on a CPU.
11. host_speed: figure 1's training and sampling steps measured on both supported ComfyUI
   cores (the newest and the floor, scripts/setup_host.sh builds both), each in a process
   of its own host's venv, the two alternated in one run; per host the train step, the
   sampling step and their ratio, and newest over floor for each.

Each figure's measurement is a module of scripts/benchmarks/, named after what it measures:
train_step.py (figures 1 and 8), sampling_with_patches.py (2), patch_bytes.py (3),
full_size.py (4 and 9), inversion_step.py (5), sampling_with_capture.py (6),
training_memory.py (7), self_check_cost.py (10), host_speed.py (11); common.py holds what
they share (bootstrap, clock, figure format, models). This runner picks the figures, runs
them and writes the results.

Machines are noisy (this one is shared), so every timing is the median of several
repetitions after a warm-up, and compared quantities are measured interleaved in one run
and reported as ratios. The pack is imported the way the tests (and ComfyUI) import it:
as the package `fmn_pack` from the repository folder, against the real host tree.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import CONCEPT_LINES, REPO, TIMER, bootstrap, host_version
from benchmarks.full_size import FULL_SIZE, bench_full_size, full_size_figure
from benchmarks.host_speed import bench_host_speed, host_speed_probe
from benchmarks.inversion_step import bench_inversion_vs_sample
from benchmarks.patch_bytes import bench_patch_bytes
from benchmarks.sampling_with_capture import bench_capture_vs_sample
from benchmarks.sampling_with_patches import bench_sampling_with_patches
from benchmarks.self_check_cost import bench_self_check_share
from benchmarks.train_step import bench_train_vs_sample
from benchmarks.training_memory import MEMORY_RESOLUTION, MEMORY_STEPS, bench_training_memory, memory_probe

RESULTS = REPO / "bench" / "results.json"


ONLY = {  # figures 4, 7, 8 and 9, also measurable alone with --only NAME: (results key, measure(pack, cfg))
    "sd15-512": ("seconds_per_concept_sd15_512", lambda pack, cfg: full_size_figure(pack, cfg, "SD1.5")),
    "memory": ("training_memory", bench_training_memory),
    "sdxl": ("sdxl_train_step_over_sampling_step", lambda pack, cfg: bench_train_vs_sample(pack, cfg, "SDXL", reps=3)[0]),
    "sdxl-1024": ("seconds_per_concept_sdxl_1024", lambda pack, cfg: full_size_figure(pack, cfg, "SDXL")),
    "self-check": ("self_check_share", bench_self_check_share),
    "hosts": ("host_speed", bench_host_speed),
}


# --- main -------------------------------------------------------------------------------


def environment(pack) -> dict:
    import torch

    from fmn_pack.fmn_core import __version__
    from fmn_pack.fmn_core import host

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(host.device()),
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or platform.machine(),
        "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "pack_version": __version__,
        "comfyui_version": host_version(),
        "engine_source_sha256": _engine_hash(),
    }
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                           check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fmn_core", "nodes", "__init__.py"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout
        env["engine_uncommitted_files"] = sorted(line[3:] for line in dirty.splitlines() if line.strip())
        env["engine_uncommitted_changes"] = bool(env["engine_uncommitted_files"])
    except (OSError, subprocess.CalledProcessError):
        env["git_commit"] = None
    return env


def _engine_hash() -> str:
    """sha256 over the pack's Python sources as measured (the tree may hold uncommitted edits)."""
    digest = hashlib.sha256()
    for path in sorted([REPO / "__init__.py", *(REPO / "fmn_core").rglob("*.py"), *(REPO / "nodes").glob("*.py")]):
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]




def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="where to write the JSON (default: bench/results.json)")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of figure 1 (at least 3)")
    parser.add_argument("--quick", action="store_true", help="fewest repetitions: checks the script, numbers are rough")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on a CPU-only machine (default 1: timings use process CPU time)")
    parser.add_argument("--wall", action="store_true", help="use wall-clock time on a CPU-only machine too")
    parser.add_argument("--memory-probe", metavar="JSON", help=argparse.SUPPRESS)  # figure 7's child process
    parser.add_argument("--host-probe", action="store_true", help=argparse.SUPPRESS)  # figure 11's child process
    parser.add_argument("--only", choices=sorted(ONLY),
                        help="measure one figure alone (4: sd15-512, 7: memory, 8: sdxl, 9: sdxl-1024, 10: self-check, "
                             "11: hosts) "
                             "and put it into the existing --out")
    parser.add_argument("--smoke-full-size", choices=sorted(FULL_SIZE),
                        help="run figure 4's (SD1.5) or 9's (SDXL) code small and short even without CUDA "
                             "(a path check; nothing is written)")
    args = parser.parse_args()

    started = time.perf_counter()
    pack = bootstrap()
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(args.threads)
        if not args.wall:
            TIMER.update(name=f"process CPU time, {args.threads} torch thread(s)", fn=time.process_time)
    if TIMER["name"] == "wall" and torch.cuda.is_available():
        TIMER["name"] = "wall (after torch.cuda.synchronize)"

    if args.memory_probe is not None:
        print(json.dumps(memory_probe(json.loads(args.memory_probe), MEMORY_RESOLUTION, MEMORY_STEPS)))
        return 0
    if args.smoke_full_size:
        print(json.dumps(bench_full_size(pack, {}, args.smoke_full_size, smoke=True), indent=2))
        return 0

    from fmn_pack.fmn_core.train import ForgetConfig

    cfg = {
        "resolution": 128,
        "steps_short": 5,
        "steps_long": ForgetConfig().steps,
        "reps_train": max(3, 3 if args.quick else args.reps),
        "forwards_per_rep": 3 if args.quick else 5,
        "reps_sampling": 3 if args.quick else 7,
        "sampler_steps": 4,
        "sampler": "euler",
        "scheduler": "normal",
        "cfg": 7.0,
        "reps_full": 3,
        "inversion_steps_long": 40,
        "reps_inversion": 3,
        "clock": TIMER["name"],
        "clock_why": ("on a CPU-only machine the CPUs are usually shared (here with other engineers' jobs), and "
                      "wall time then varies several-fold within minutes; the CPU time of a single-threaded "
                      "process barely depends on other processes and equals its wall time on an idle core. "
                      "Wall-clock values are kept beside it. On CUDA: wall time after a device sync"),
        "torch_threads": torch.get_num_threads(),
        "concepts": list(CONCEPT_LINES),
        "forget_config": {k: v for k, v in vars(ForgetConfig()).items()},
        "small_model": "tests/host_models.sd15_model(seed=0) (SD1.5 layout, model_channels 32, context 768, ~10 M params) + sd1_clip(seed=1, 2 layers)",
        "warm_up": "one sampling pass and one 1-step forget() before figure 1; one sample per patch count before figure 2",
    }
    if args.host_probe:
        print(json.dumps(host_speed_probe(pack, cfg)))
        return 0
    if args.only:
        key, measure = ONLY[args.only]
        results = json.loads(args.out.read_text())
        results[key] = measure(pack, cfg)
        results[key]["environment"] = environment(pack)
        write_results(results, args.out)
        print(f"wrote {key} into {args.out}")
        return 0
    results = {"schema": "fmn-bench/1", "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "environment": environment(pack), "config": cfg}
    print(f"Forget-Me-Not bench on {results['environment']['device']} ({results['environment']['device_name']}), "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs", flush=True)

    seconds = {}
    t = time.perf_counter()
    results["train_step_over_sampling_step"], trained = bench_train_vs_sample(pack, cfg)
    seconds["train_step_over_sampling_step"] = time.perf_counter() - t
    t = time.perf_counter()
    results["sampling_with_patches"] = bench_sampling_with_patches(pack, cfg, trained)
    seconds["sampling_with_patches"] = time.perf_counter() - t
    t = time.perf_counter()
    results["patch_bytes_per_concept"] = bench_patch_bytes(pack, cfg, trained)
    seconds["patch_bytes_per_concept"] = time.perf_counter() - t
    t = time.perf_counter()
    results["inversion_step_over_sampling_step"] = bench_inversion_vs_sample(pack, cfg)
    seconds["inversion_step_over_sampling_step"] = time.perf_counter() - t
    t = time.perf_counter()
    results["sampling_with_capture"] = bench_capture_vs_sample(pack, cfg)
    seconds["sampling_with_capture"] = time.perf_counter() - t
    for key, measure in ONLY.values():  # figures 4, 7, 8, 9, 10 and 11
        t = time.perf_counter()
        results[key] = measure(pack, cfg)
        seconds[key] = time.perf_counter() - t
    results["bench_seconds"] = {k: round(v, 1) for k, v in seconds.items()}
    results["bench_seconds"]["total"] = round(time.perf_counter() - started, 1)

    write_results(results, args.out)
    print_summary(results)
    print(f"wrote {args.out} in {results['bench_seconds']['total']:.0f} s")
    return 0


def write_results(results: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out)


def print_summary(results: dict) -> None:
    f1 = results["train_step_over_sampling_step"]
    f2 = results["sampling_with_patches"]
    f3 = results["patch_bytes_per_concept"]
    f4 = results["seconds_per_concept_sd15_512"]
    f5 = results["inversion_step_over_sampling_step"]
    f6 = results["sampling_with_capture"]
    print(f"\nSummary (clock: {results['config']['clock']})")
    print(f"  1. train step / sampling step: {f1['value']}x  (train step {f1['train_step_s']['median'] * 1000:.0f} ms, "
          f"sampling step {f1['sampling_step_s']['median'] * 1000:.0f} ms, set-up {f1['setup_s']['median']:.1f} s; "
          f"vs a cfg step: {f1['ratio_vs_cfg_step']}x)")
    loads = ", ".join(f"{n}: {v['median'] * 1000:.1f} ms" for n, v in f2["first_load_s"].items())
    print(f"  2. sampling time with 0/1/3 patches (relative): {f2['value']}  first load: {loads}")
    ranks = ", ".join(f"r{r} {v['bytes']:,} B" for r, v in f3["per_rank"].items())
    verdict = "under" if f3["under_target"] else "OVER"
    print(f"  3. patch bytes per concept (SD1.5, rank {f3['rank']}): {f3['value']:,} B, {verdict} the "
          f"{f3['target_bytes']:,} B target  ({ranks})")
    print_full_size(4, "SD1.5 512 px", f4)
    print(f"  5. inversion step / sampling step: {f5['value']}x  (inversion step "
          f"{f5['inversion_step_s']['median'] * 1000:.0f} ms, set-up {f5['setup_s']['median']:.1f} s)")
    print(f"  6. sampling with attention capture / without: {f6['value']}x (target <= 1.5 on CPU)")
    f7 = results["training_memory"]["per_option"]
    print("  7. training memory above the model: " + ", ".join(f"{n} {v['peak_above_model_mib']:.0f} MiB" for n, v in f7.items()))
    f8 = results["sdxl_train_step_over_sampling_step"]
    print(f"  8. SDXL layout: train step / sampling step: {f8['value']}x (vs a cfg step: {f8['ratio_vs_cfg_step']}x)")
    print_full_size(9, "SDXL 1024 px", results["seconds_per_concept_sdxl_1024"])
    f10 = results["self_check_share"]
    print(f"  10. in-run checks' share of the run: {f10['value']} (bound {f10['bound']}; over the training steps "
          f"alone: {f10['over_training']}x)")
    f11 = results["host_speed"]
    print(f"  11. train step / sampling step per host: newest {f11['value']['newest_ratio']}x, floor "
          f"{f11['value']['floor_ratio']}x (newest over floor: {f11['newest_over_floor']})")


def print_full_size(number: int, what: str, figure: dict) -> None:
    if figure["value"] is None:
        print(f"  {number}. seconds per concept, {what}: null ({figure['reason'].split(';')[0]})")
    else:
        print(f"  {number}. seconds per concept, {what}: {figure['value']} s (target < {figure['target_s']} s)")


if __name__ == "__main__":
    sys.exit(main())
