"""Figures 4 and 9: Forget Train wall time for one concept on a full-size SD1.5-layout
UNet at 512 px (figure 4) and a full-size SDXL-layout UNet at 1024 px (figure 9); CUDA
only, else null with the reason."""
from __future__ import annotations

from .common import (CONCEPT_LINES, LAYOUTS, TIMER, StepClock, clock, full_sd1_clip, full_sd15_patcher, full_sdxl_clip,
                     full_sdxl_patcher, med, r4, self_check_figures, spread, timed)

SECONDS_PER_CONCEPT_TARGET = {"SD1.5": 10.0, "SDXL": 20.0}  # on one H200

FULL_SIZE = {  # layout: (UNet builder, CLIP builder, resolution in px)
    "SD1.5": (lambda: full_sd15_patcher(seed=0), lambda: full_sd1_clip(seed=1), 512),
    "SDXL": (lambda: full_sdxl_patcher(seed=0), lambda: full_sdxl_clip(seed=1), 1024),
}


def bench_full_size(pack, cfg: dict, layout: str = "SD1.5", smoke: bool = False) -> dict:
    """Forget Train wall time for one concept, default config, full-size UNet and text
    encoder(s) of `layout` at its native resolution. With smoke=True the same code runs on
    the small models of the tests, short (for checking the path on a machine without CUDA);
    the numbers then mean nothing."""
    import torch

    import host_models
    from fmn_pack.fmn_core.concepts import parse_concepts
    from fmn_pack.fmn_core.train import ForgetConfig, forget

    build_unet, build_clip, resolution = FULL_SIZE[layout]
    if smoke:
        model_builder, clip_builder = (getattr(host_models, name) for name in LAYOUTS[layout])
        patcher, clip = model_builder(seed=0), clip_builder(seed=1)
        config = ForgetConfig(steps=3, resolution=64)
        reps = 1
    else:
        start = clock()
        patcher, clip = build_unet(), build_clip()
        build_s = clock() - start
        config = ForgetConfig(resolution=resolution)  # the defaults at the layout's native size
        reps = cfg["reps_full"]
    concept = parse_concepts(CONCEPT_LINES[0])[0]
    forget(patcher, clip, [concept], ForgetConfig(steps=2, resolution=config.resolution))  # warm-up
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    totals, steps = [], []
    for _ in range(reps):
        stepclock = StepClock()
        seconds, result, _ = timed(forget, patcher, clip, [concept], config, progress=stepclock)
        totals.append(seconds)
        steps.append(stepclock.per_step())
    per_concept = med(totals)
    out = {
        "value": r4(per_concept),
        "clock": TIMER["name"],
        "target_s": SECONDS_PER_CONCEPT_TARGET[layout],
        "under_target": per_concept < SECONDS_PER_CONCEPT_TARGET[layout],
        "what": ("wall time of one fmn_core.train.forget() call for one concept with the default ForgetConfig "
                 f"({config.steps} steps, {config.resolution} px pure-noise latents, rank {config.rank}, "
                 f"mode '{config.mode}'), including prompt encoding, the concept basis, load/unload and patch "
                 f"export, on a randomly initialised full-size {layout}-layout UNet and its text encoder(s), in "
                 "the dtype the host's loader picks; median after one warm-up run"),
        "seconds": spread(totals),
        "per_step_in_run_s": spread(steps) if all(s is not None for s in steps) else None,
        "unet_dtype": str(patcher.model.get_dtype()),
        "final_loss": r4(result.losses[-1]),
        "self_check": self_check_figures(result.report),
    }
    if smoke:
        out["smoke"] = "the tests' small model, 3 steps at 64 px: a check of this code path; the numbers mean nothing"
    else:
        out["model_build_s"] = r4(build_s)
    if torch.cuda.is_available():
        out["peak_gpu_memory_gib"] = r4(torch.cuda.max_memory_allocated() / 2**30)
    return out


def full_size_figure(pack, cfg: dict, layout: str) -> dict:
    """Figure 4 or 9: measured on CUDA; elsewhere null with the reason (a full-size run on
    a CPU takes hours and says nothing about the target)."""
    import torch

    if torch.cuda.is_available():
        return bench_full_size(pack, cfg, layout)
    return {
        "value": None,
        "reason": (f"CUDA is not available on this machine; the figure is defined for one GPU (target < "
                   f"{SECONDS_PER_CONCEPT_TARGET[layout]:g} s on one H200) and is measured only when "
                   "torch.cuda.is_available()"),
        "target_s": SECONDS_PER_CONCEPT_TARGET[layout],
    }
