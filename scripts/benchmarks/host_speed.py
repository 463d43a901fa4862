"""Figure 11: figure 1's training and sampling steps on both supported ComfyUI cores, each
in a process of its own host's venv (the runner's --host-probe), the two alternated."""
from __future__ import annotations

import json
import os
import subprocess

from .common import BENCH_SCRIPT, REPO, TIMER, host_version, med, r4, spread
from .train_step import bench_train_vs_sample

HOSTS = {  # what scripts/setup_host.sh builds (FMN_HOST): name -> (ComfyUI tree, the python that runs it)
    "newest": (REPO / ".host" / "ComfyUI-0.30.0", REPO / ".venv-0.30.0" / "bin" / "python"),
    "floor": (REPO / ".host" / "ComfyUI", REPO / ".venv" / "bin" / "python"),
}
HOST_SPEED_ROUNDS, HOST_SPEED_REPS = 2, 2  # per host: rounds (alternating hosts) x figure-1 reps per process


def host_speed_probe(pack, cfg: dict) -> dict:
    """One process's share of figure 11: figure 1's measurement on this process's host."""
    fig, _ = bench_train_vs_sample(pack, cfg, reps=HOST_SPEED_REPS)
    return {"comfyui_version": host_version(), "reps": fig["reps"]}


def bench_host_speed(pack, cfg: dict) -> dict:
    """Figure 11: each host in a fresh process with its own venv, alternated, so both see the
    same machine load; the ratios are built from all reps per host."""
    missing = [f"{name} ({tree}, {python})" for name, (tree, python) in HOSTS.items()
               if not (tree / "main.py").is_file() or not python.is_file()]
    if missing:
        raise RuntimeError(f"figure 11 needs both hosts; set up {', '.join(missing)} with "
                           "`make HOST=floor setup` and `make HOST=newest setup`")
    reps: dict[str, list] = {name: [] for name in HOSTS}
    versions = {}
    for round_ in range(HOST_SPEED_ROUNDS):
        for name in (list(HOSTS) if round_ % 2 == 0 else list(reversed(HOSTS))):
            tree, python = HOSTS[name]
            args = [str(python), str(BENCH_SCRIPT), "--host-probe", "--threads", str(cfg["torch_threads"])]
            done = subprocess.run(args, capture_output=True, text=True, check=False,
                                  env={**os.environ, "FMN_COMFYUI": str(tree)})
            if done.returncode:
                raise RuntimeError(f"host probe on {name} failed:\n{done.stderr[-3000:]}")
            probe = json.loads(done.stdout.strip().splitlines()[-1])
            versions[name] = probe["comfyui_version"]
            reps[name].extend(probe["reps"])
            print(f"  host {name} (ComfyUI {versions[name]}) round {round_ + 1}: ratio "
                  f"{med([r['ratio'] for r in probe['reps']]):.2f}", flush=True)
    per_host = {}
    for name, rows in reps.items():
        per_host[name] = {
            "comfyui_version": versions[name],
            "ratio": r4(med([r["ratio"] for r in rows])),
            "train_step_s": spread([r["train_step_s"] for r in rows]),
            "sampling_step_s": spread([r["sampling_step_s"] for r in rows]),
            "setup_s": spread([r["setup_s"] for r in rows]),
            "reps": rows,
        }
    newest, floor = per_host["newest"], per_host["floor"]
    return {
        "value": {"newest_ratio": newest["ratio"], "floor_ratio": floor["ratio"],
                  "newest_over_floor_ratio": r4(newest["ratio"] / floor["ratio"])},
        "clock": TIMER["name"],
        "what": ("figure 1 (one Forget Train step over one plain sampling step, small SD1.5-layout model, "
                 f"{cfg['resolution']} px, default settings) on each supported ComfyUI core, and newest over floor "
                 "for the train step, the sampling step and their ratio (bound: the newest's ratio no worse "
                 "than the floor's)"),
        "method": (f"{HOST_SPEED_ROUNDS} rounds; each round runs one fresh process per host (its venv's python, "
                   f"FMN_COMFYUI at its tree, alternating which goes first), each measuring figure 1 with "
                   f"{HOST_SPEED_REPS} reps after figure 1's warm-up; medians over all reps of a host"),
        "newest_over_floor": {
            "train_step": r4(newest["train_step_s"]["median"] / floor["train_step_s"]["median"]),
            "sampling_step": r4(newest["sampling_step_s"]["median"] / floor["sampling_step_s"]["median"]),
            "ratio": r4(newest["ratio"] / floor["ratio"]),
        },
        "per_host": per_host,
    }
