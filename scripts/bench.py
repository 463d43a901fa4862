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
10. self_check_share: the in-run checks' seconds over the training steps' seconds in one
   default run run to its whole budget (target 0, so every check runs), on the small
   SD1.5-layout model at 512 px (the issue's bound: at most 0.10).
11. host_speed: figure 1's training and sampling steps measured on both supported ComfyUI
   cores (the newest and the floor, scripts/setup_host.sh builds both), each in a process
   of its own host's venv, the two alternated in one run; per host the train step, the
   sampling step and their ratio, and newest over floor for each.

Machines are noisy (this one is shared), so every timing is the median of several
repetitions after a warm-up, and compared quantities are measured interleaved in one run
and reported as ratios. The pack is imported the way the tests (and ComfyUI) import it:
as the package `fmn_pack` from the repository folder, against the real host tree.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST = Path(os.environ.get("FMN_COMFYUI", REPO / ".host" / "ComfyUI"))
PACK_NAME = "fmn_pack"
RESULTS = REPO / "bench" / "results.json"

# Concepts trained in turn by figure 1; their default-step patches feed figures 2 and 3.
CONCEPT_LINES = ("Van Gogh | style", "Mickey Mouse | identity", "a red fox")
PATCH_SIZE_TARGET_BYTES = 200_000  # "under 200 KB" (issue); 200 KiB = 204,800 is reported too
SECONDS_PER_CONCEPT_TARGET = {"SD1.5": 10.0, "SDXL": 20.0}  # on one H200
SD15_UNET_PARAMS = 859_520_964  # what the host's loader passes to unet_dtype() for an SD1.5 UNet
SDXL_UNET_PARAMS = 2_567_463_684  # the same for the SDXL base UNet
MEMORY_RESOLUTION, MEMORY_STEPS = 512, 1  # figure 7


# --- bootstrap (same as tests/conftest.py) ---------------------------------------------


def bootstrap():
    """Put the host tree on the path, force CPU when there is no CUDA, import the pack."""
    if not (HOST / "comfy").is_dir():
        raise SystemExit(f"ComfyUI tree not found at {HOST}: run `make setup` or set FMN_COMFYUI")
    sys.path.insert(0, str(HOST))
    sys.path.insert(0, str(REPO / "tests"))  # tests/host_models.py: small models from the host's classes
    import torch

    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (after the cpu flag)

    spec = importlib.util.spec_from_file_location(PACK_NAME, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules[PACK_NAME] = pack
    spec.loader.exec_module(pack)
    return pack


# --- timing helpers ---------------------------------------------------------------------


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


# The clock every figure is computed with: wall time (after a device sync) on CUDA; on a
# CPU-only machine the process's CPU time with one torch thread (see main()), which other
# processes on a shared machine barely disturb. Wall time is always recorded beside it.
TIMER = {"name": "wall", "fn": time.perf_counter}


def clock() -> float:
    """The primary clock, after the device has finished its queued work."""
    _sync()
    return TIMER["fn"]()


def timed(fn, *args, **kwargs):
    """(primary seconds, result, wall seconds) of one call."""
    _sync()
    start, wall = TIMER["fn"](), time.perf_counter()
    out = fn(*args, **kwargs)
    _sync()
    return TIMER["fn"]() - start, out, time.perf_counter() - wall


class StepClock:
    """A `progress` object for forget(): timestamps each finished step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def step(self) -> None:
        self.times.append(clock())

    def per_step(self) -> float | None:
        """Mean step time from the first to the last finished step (the first step's own
        time, and everything before it, is excluded)."""
        if len(self.times) < 2:
            return None
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)


def med(values) -> float:
    return float(statistics.median(values))


def spread(values) -> dict:
    return {"median": med(values), "min": float(min(values)), "max": float(max(values)), "n": len(values)}


def r4(x):
    return None if x is None else float(f"{x:.4g}")


def ratio_figure(rows: list[dict], what: str, method: str, spreads: dict[str, str], **extra) -> dict:
    """A timing figure as every one is reported: the median of the per-rep `ratio`, the
    clock, what was timed and how, the spread of each named column (figure key -> row
    key), any extra fields, and the reps themselves."""
    column = lambda key: [r[key] for r in rows]  # noqa: E731
    return {"value": r4(med(column("ratio"))), "clock": TIMER["name"], "what": what, "method": method,
            **{name: spread(column(key)) for name, key in spreads.items()}, **extra, "reps": rows}


# --- models -----------------------------------------------------------------------------


class _ClipTarget:
    def __init__(self, clip, tokenizer):
        self.clip, self.tokenizer, self.params = clip, tokenizer, {}


def full_sd15_patcher(seed: int = 0, initialise: bool = True, dtype=None):
    """A full-size SD1.5-layout UNet (model_channels 320, context 768, 8 heads: ~860 M
    parameters) from the host's own classes, with the dtype the host's checkpoint loader
    would pick on this device. initialise=False leaves the weights unallocated-in-practice
    (torch.empty): enough for shapes and key names, and takes no time."""
    import comfy.supported_models
    import host_models

    config = comfy.supported_models.SD15(dict(host_models.SD15_UNET, model_channels=320))
    return _full_patcher(config, SD15_UNET_PARAMS, seed, initialise, dtype)


def full_sdxl_patcher(seed: int = 0):
    """A full-size SDXL-layout UNet (320 channels, transformer depth 2 and 10, 2048-d
    context, 2816-d vector conditioning: the SDXL base layout, ~2.6 B parameters)."""
    import comfy.supported_models
    import host_models

    config = comfy.supported_models.SDXL(dict(host_models.SDXL_UNET, model_channels=320, transformer_depth=[0, 0, 2, 2, 10, 10],
                                              transformer_depth_middle=10,
                                              transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], num_head_channels=64))
    return _full_patcher(config, SDXL_UNET_PARAMS, seed)


def _full_patcher(config, params: int, seed: int, initialise: bool = True, dtype=None):
    """Build `config`'s model in the dtype the host's loader would pick for `params` parameters."""
    import torch

    import comfy.model_management as mm
    import comfy.model_patcher
    import host_models

    load_device = mm.get_torch_device()
    if dtype is None:
        dtype = mm.unet_dtype(model_params=params, supported_dtypes=list(config.supported_inference_dtypes))
    config.set_inference_dtype(dtype, mm.unet_manual_cast(dtype, load_device, config.supported_inference_dtypes))
    model = config.get_model({})
    if initialise:
        host_models.init_module(model.diffusion_model, seed)
    model.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=torch.device("cpu"))


def full_sd1_clip(seed: int = 1):
    """The host's SD1 CLIP-L at full size (12 layers, 3072 MLP) with the real tokenizer."""
    import comfy.sd1_clip

    return _full_clip(comfy.sd1_clip.SD1ClipModel, comfy.sd1_clip.SD1Tokenizer, seed)


def full_sdxl_clip(seed: int = 1):
    """The host's SDXL pair at full size: CLIP-L (12 layers) and CLIP-G (32 layers, 1280-d)."""
    import comfy.sdxl_clip

    return _full_clip(comfy.sdxl_clip.SDXLClipModel, comfy.sdxl_clip.SDXLTokenizer, seed)


def _full_clip(clip_cls, tokenizer_cls, seed: int):
    import comfy.sd
    import host_models

    clip = comfy.sd.CLIP(_ClipTarget(clip_cls, tokenizer_cls))
    host_models.init_module(clip.cond_stage_model, seed)
    return clip


# --- figure 1: a training step against a sampling step ----------------------------------


def sampling_step_seconds(patcher, x, sigma, cond, uncond, k: int, pooled=(None, None)) -> tuple[float, float, float]:
    """Median over k of one UNet forward: batch 1 (cond), batch 2 (cond + uncond), and batch 1 wall time.
    `pooled`: the two prompts' pooled embeddings, for models with a vector conditioning (SDXL)."""
    import torch

    from fmn_pack.fmn_core import host

    device = host.device()
    forward = host.loaded_forward(patcher)  # (re)load: training unloads its clone
    x, s, c = x.to(device), sigma.to(device), cond.to(device)
    x2, s2, c2 = torch.cat([x, x]), torch.cat([s, s]), torch.cat([c, uncond.to(device)])
    p1, p2 = (None, None) if pooled[0] is None else (pooled[0], torch.cat(pooled))
    one, two, wall = [], [], []
    with torch.inference_mode():
        for _ in range(k):
            seconds, _, wall_seconds = timed(forward, x, s, c, p1)
            one.append(seconds)
            wall.append(wall_seconds)
            two.append(timed(forward, x2, s2, c2, p2)[0])
    return med(one), med(two), med(wall)


LAYOUTS = {"SD1.5": ("sd15_model", "sd1_clip"), "SDXL": ("sdxl_model", "sdxl_clip")}


def bench_train_vs_sample(pack, cfg: dict, layout: str = "SD1.5", reps: int | None = None) -> tuple[dict, list]:
    """Figure 1 (SD1.5 layout) and figure 8 (the same measurement on the SDXL layout)."""
    import torch

    import host_models
    from fmn_pack.fmn_core import host
    from fmn_pack.fmn_core.concepts import parse_concepts
    from fmn_pack.fmn_core.train import ForgetConfig, forget

    model_builder, clip_builder = (getattr(host_models, name) for name in LAYOUTS[layout])
    patcher = model_builder(seed=0)
    clip = clip_builder(seed=1)
    concepts = [parse_concepts(line)[0] for line in CONCEPT_LINES]
    res, n1, n2 = cfg["resolution"], cfg["steps_short"], cfg["steps_long"]
    reps = reps or cfg["reps_train"]
    size = res // 8
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn((1, 4, size, size), generator=g)
    sigma1 = host.model_sampling(patcher).sigma(torch.tensor([500.0]))
    cond, cond_pooled = host.encode_pooled(clip, "a painting in the style of Van Gogh")
    uncond, uncond_pooled = host.encode_pooled(clip, "")

    def sampling_steps(k: int) -> tuple[float, float, float]:
        return sampling_step_seconds(patcher, x1, sigma1, cond, uncond, k, (cond_pooled, uncond_pooled))

    def train(concept, steps):
        stepclock = StepClock()
        config = ForgetConfig(steps=steps, resolution=res)
        seconds, result, wall = timed(forget, patcher, clip, [concept], config, progress=stepclock)
        return seconds, result, stepclock, wall

    # Warm-up: allocator, kernels, first-call caches on both paths.
    sampling_steps(2)
    train(concepts[0], 1)

    rows, patches = [], []
    for rep in range(reps):
        concept = concepts[rep % len(concepts)]
        fwd1, fwd2, fwd_wall = sampling_steps(cfg["forwards_per_rep"])
        order = (n1, n2) if rep % 2 == 0 else (n2, n1)
        runs = {n: train(concept, n) for n in order}
        (t_short, _, _, w_short), (t_long, long_result, long_clock, w_long) = runs[n1], runs[n2]
        per_step = (t_long - t_short) / (n2 - n1)
        step_wall = (w_long - w_short) / (n2 - n1)
        rows.append({
            "concept": concept.text, "sampling_step_s": fwd1, "sampling_step_cfg_batch2_s": fwd2,
            f"forget_{n1}_steps_s": t_short, f"forget_{n2}_steps_s": t_long,
            "train_step_s": per_step, "setup_s": t_short - n1 * per_step,
            "train_step_in_run_s": long_clock.per_step(), "ratio": per_step / fwd1,
            "wall": {"sampling_step_s": fwd_wall, f"forget_{n1}_steps_s": w_short, f"forget_{n2}_steps_s": w_long,
                     "train_step_s": step_wall, "ratio": step_wall / fwd_wall},
        })
        if rep < len(concepts):
            patches.append(long_result)
        print(f"  [{layout}] rep {rep + 1}/{reps} ({concept.text}): step {per_step:.3f}s, sampling step {fwd1:.3f}s, "
              f"ratio {per_step / fwd1:.2f}, setup {rows[-1]['setup_s']:.2f}s", flush=True)

    train_step, fwd = med([r["train_step_s"] for r in rows]), med([r["sampling_step_s"] for r in rows])
    fig = ratio_figure(
        rows,
        what=(f"one Forget Train step (UNet forward with the attn2 hooks + backward + AdamW + grad clip, "
                 f"default settings: mode 'aimed k/v' with its output term, batch 1) over one plain sampling step (one UNet forward via "
                 f"model.apply_model under inference_mode, batch 1, conditional only, no CFG), both on the "
                 f"small {layout}-layout model of tests/host_models.py at {res} px ({size}x{size} latent)"),
        method=(f"per step = (time of forget() with {n2} steps - with {n1} steps) / {n2 - n1}, so prompt "
                f"encoding, the concept basis, model load/unload and patch export cancel; each rep measures "
                f"the sampling step (median of {cfg['forwards_per_rep']} forwards) and both forget() runs "
                f"back to back; value = median over reps of the per-rep ratio"),
        spreads={k: k for k in ("train_step_s", "sampling_step_s", "setup_s")},
        train_step_in_run_s=spread([r["train_step_in_run_s"] for r in rows if r["train_step_in_run_s"] is not None]),
        ratio_of_medians=r4(train_step / fwd),
        wall_clock_ratio=r4(med([r["wall"]["ratio"] for r in rows])),
        wall_clock_ratio_what="the same ratio from wall-clock times (noisy wherever other processes share the CPUs)",
        ratio_vs_cfg_step=r4(med([r["train_step_s"] / r["sampling_step_cfg_batch2_s"] for r in rows])),
        ratio_vs_cfg_step_what="the same train step over one UNet forward at batch 2 (cond + uncond), i.e. one KSampler step at cfg > 1",
    )
    return fig, patches


# --- figure 5: an inversion step against a sampling step -------------------------------


def bench_inversion_vs_sample(pack, cfg: dict) -> dict:
    """Figure 5: one Concept Inversion step over one sampling step, measured like figure 1."""
    import torch

    import host_models
    from fmn_pack.fmn_core import host
    from fmn_pack.fmn_core.inversion import InversionConfig, invert

    patcher, clip = host_models.sd15_model(seed=0), host_models.sd1_clip(seed=1)
    res, n1, n2 = cfg["resolution"], cfg["steps_short"], cfg["inversion_steps_long"]
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn((1, 4, res // 8, res // 8), generator=g)
    latents = torch.randn((4, 4, res // 8, res // 8), generator=g)
    sigma1 = host.model_sampling(patcher).sigma(torch.tensor([500.0]))
    cond, uncond = host.encode(clip, "a photo of Van Gogh"), host.encode(clip, "")

    def run(steps: int) -> float:
        config = InversionConfig(steps=steps, batch_size=1)
        with torch.inference_mode():
            return timed(invert, patcher, clip, latents, "Van Gogh", config)[0]

    run(1)
    rows = []
    for rep in range(cfg["reps_inversion"]):
        fwd = sampling_step_seconds(patcher, x1, sigma1, cond, uncond, cfg["forwards_per_rep"])[0]
        short, long = run(n1), run(n2)
        per_step = (long - short) / (n2 - n1)
        rows.append({"inversion_step_s": per_step, "sampling_step_s": fwd, "ratio": per_step / fwd,
                     "setup_s": short - n1 * per_step})
        print(f"  [5] rep {rep + 1}/{cfg['reps_inversion']}: step {per_step:.3f}s, sampling step {fwd:.3f}s, "
              f"ratio {per_step / fwd:.2f}", flush=True)
    return ratio_figure(
        rows,
        what=(f"one Concept Inversion step (text encoder forward out of place + UNet forward + backward to the "
              f"token rows + AdamW, batch 1, default settings) over one plain sampling step (UNet forward, batch "
              f"1, no CFG), on the small SD1.5-layout model at {res} px"),
        method=f"per step = (time of invert() with {n2} steps - with {n1}) / {n2 - n1}; median over reps of the ratio",
        spreads={k: k for k in ("inversion_step_s", "sampling_step_s", "setup_s")},
    )


# --- figure 6: sampling with the attention-map capture -----------------------------------


def bench_capture_vs_sample(pack, cfg: dict) -> dict:
    """Figure 6: a sampling run with the heatmap capture on over the same run without it."""
    import torch

    import host_models
    from fmn_pack.fmn_core import host
    from fmn_pack.fmn_core.attention_maps import MapSettings, capture, find_words

    patcher, clip = host_models.sd15_model(seed=0), host_models.sd1_clip(seed=1)
    res, steps = cfg["resolution"], cfg["sampler_steps"]
    prompt = "a painting of a fox in a snowy forest"
    settings = MapSettings(steps=steps, cfg=cfg["cfg"], width=res, height=res)
    words = find_words(clip, prompt, "")
    with torch.inference_mode():
        positive, negative = host.conditioning(clip, prompt), host.conditioning(clip, "")
    latent = torch.zeros((1, 4, res // 8, res // 8))

    def plain() -> None:
        with torch.inference_mode():
            host.sample_latent(patcher, positive, negative, [0], latent, steps, cfg["cfg"])

    def captured() -> None:
        with torch.inference_mode():
            capture(patcher, positive, negative, words, settings)

    plain(), captured()
    rows = []
    for rep in range(cfg["reps_sampling"]):
        order = (plain, captured) if rep % 2 == 0 else (captured, plain)
        seconds = {fn.__name__: timed(fn)[0] for fn in order}
        rows.append({**seconds, "ratio": seconds["captured"] / seconds["plain"]})
    return ratio_figure(
        rows,
        what=(f"one {steps}-step {cfg['sampler']} sampling run at CFG {cfg['cfg']} with the Attention Map Viewer's "
              f"capture on ({len(words)} words, every cross-attention layer) over the same run without it, on the "
              f"small SD1.5-layout model at {res} px; target <= 1.5 on CPU"),
        method=f"runs interleaved, alternating order; median over {cfg['reps_sampling']} reps of the per-rep ratio",
        spreads={"plain_s": "plain", "captured_s": "captured"},
    )


# --- figure 2: sampling with stacked patches --------------------------------------------


def bench_sampling_with_patches(pack, cfg: dict, trained: list) -> dict:
    import torch

    import comfy.model_management as mm
    import comfy.sample
    import host_models
    from fmn_pack.fmn_core.patch import ForgetPatch, apply_patch

    patcher = host_models.sd15_model(seed=0)
    clip = host_models.sd1_clip(seed=1)
    patches = [ForgetPatch(r.lora, r.metadata) for r in trained[:3]]
    if len(patches) < 3:
        raise RuntimeError("figure 2 needs three trained patches from figure 1 (use at least 3 reps)")

    def stack(n: int):
        model = patcher
        for p in patches[:n]:
            model = apply_patch(model, p, 1.0)
        return model

    apply_times = {1: [], 3: []}
    for _ in range(5):
        for n in (1, 3):
            apply_times[n].append(timed(stack, n)[0])
    models = {n: stack(n) for n in (0, 1, 3)}

    def conditioning(text: str):
        cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        return [[cond, {"pooled_output": pooled}]]

    positive = conditioning("a photo of a red fox in a forest")
    negative = conditioning("")
    size = cfg["resolution"] // 8
    latent = torch.zeros((1, 4, size, size))
    noise = comfy.sample.prepare_noise(latent, 0)
    steps = cfg["sampler_steps"]

    def sample(model):
        with torch.inference_mode():
            return comfy.sample.sample(model, noise, steps, cfg["cfg"], cfg["sampler"], cfg["scheduler"], positive,
                                       negative, latent, disable_pbar=True, seed=0)

    def load(model):
        with torch.inference_mode():
            mm.load_models_gpu([model])

    # Warm-up, and a check that the patches really change the output.
    outputs = {}
    for n, model in models.items():
        mm.unload_all_models()
        outputs[n] = sample(model)
    differs = {f"{a}_vs_{b}": float((outputs[a] - outputs[b]).abs().max()) for a, b in ((0, 1), (1, 3))}

    load_s = {n: [] for n in models}
    sample_s = {n: [] for n in models}
    first_sample_s = {n: [] for n in models}
    sample_wall = {n: [] for n in models}
    counts = list(models)
    for rep in range(cfg["reps_sampling"]):
        for n in counts[rep % 3:] + counts[:rep % 3]:  # rotate the order: drift hits all counts alike
            mm.unload_all_models()  # restores the base weights, so the next load patches again
            load_s[n].append(timed(load, models[n])[0])
            first_sample_s[n].append(timed(sample, models[n])[0])
            seconds, _, wall = timed(sample, models[n])
            sample_s[n].append(seconds)
            sample_wall[n].append(wall)
    mm.unload_all_models()

    base = med(sample_s[0])
    rel = {str(n): r4(med(sample_s[n]) / base) for n in counts}
    print(f"  [2] sampling relative to 0 patches: {rel}; first load "
          + ", ".join(f"{n}: {med(load_s[n]) * 1000:.1f} ms" for n in counts), flush=True)
    return {
        "value": rel,
        "clock": TIMER["name"],
        "wall_clock_value": {str(n): r4(med(sample_wall[n]) / med(sample_wall[0])) for n in counts},
        "what": (f"host sampler (comfy.sample.sample, as the KSampler node calls it) for {steps} steps, "
                 f"{cfg['sampler']}/{cfg['scheduler']}, cfg {cfg['cfg']} (so each step is one UNet forward at "
                 f"batch 2), {cfg['resolution']} px, small SD1.5-layout model, with 0, 1 and 3 forget patches "
                 f"(three different concepts, default-step patches from figure 1) chained through "
                 f"fmn_core.patch.apply_patch; value = median steady-state sampling time / the same for 0 patches"),
        "method": (f"{cfg['reps_sampling']} reps, order rotated; each: unload all models (restores base weights), "
                   f"time load_models_gpu([model]) = the first-load cost where the host merges the LoRA patches "
                   f"into the weights, then time two samples (the first after load, then steady state)"),
        "sampling_s": {str(n): spread(sample_s[n]) for n in counts},
        "first_load_s": {str(n): spread(load_s[n]) for n in counts},
        "first_sample_after_load_s": {str(n): spread(first_sample_s[n]) for n in counts},
        "first_load_over_sampling": {str(n): r4(med(load_s[n]) / base) for n in counts},
        "apply_patch_chain_s": {str(n): spread(apply_times[n]) for n in (1, 3)},
        "apply_patch_chain_what": "graph-time cost of the Apply Forget Patch node(s): clone + compatibility checks + add_patches; no weights touched",
        "output_max_abs_diff": differs,
    }


# --- figure 3: patch bytes per concept ------------------------------------------------


def bench_patch_bytes(pack, cfg: dict, trained: list) -> dict:
    import torch

    import host_models
    from fmn_pack.fmn_core import host
    from fmn_pack.fmn_core.concepts import parse_concepts
    from fmn_pack.fmn_core.patch import ForgetPatch, compatibility_problems, load_patch, save_patch
    from fmn_pack.fmn_core.train import MODES, ForgetConfig, build_deltas, build_examples, concept_basis, copy_rank, describe, preserved
    from fmn_pack.fmn_core.lora import export_kohya

    defaults = ForgetConfig()
    mode = MODES[defaults.mode]
    reference = trained[0]  # a real default-step run on the small model, concept 0
    concept = parse_concepts(CONCEPT_LINES[0])[0]
    if json.loads(reference.metadata["fmn.concepts"]) != [concept.text] or len(reference.losses) != defaults.steps:
        raise RuntimeError("figure 3 expects figure 1's first long run to be a default-step run of concept 0")

    full = full_sd15_patcher(initialise=False, dtype=torch.float32)  # shapes and names only
    layers = host.attn2_layers(full)
    clip = host_models.sd1_clip(seed=1)  # 768-d context with the real tokenizer, like CLIP-L
    examples = build_examples(clip, [concept], defaults.include_end_token)
    default_directions = defaults.rank + copy_rank(defaults.rank)
    ranks = tuple(sorted({1, 2, 4, default_directions}))  # directions per concept (the patch's rank)
    basis_max, _ = concept_basis(examples, preserved(clip, examples), 1, max(ranks))
    g = torch.Generator().manual_seed(0)

    per_rank = {}
    with tempfile.TemporaryDirectory() as tmp:
        small_path = save_patch(ForgetPatch(reference.lora, reference.metadata), Path(tmp) / "small_engine_run.safetensors")
        small_bytes = small_path.stat().st_size
        for rank in ranks:
            # the size depends only on the number of directions, so the first r columns stand in
            basis = basis_max[:, :rank].contiguous()
            deltas = build_deltas(full, layers, mode, rank, basis, g)
            with torch.no_grad():
                for d in deltas.values():  # trained-like magnitudes; fp16 storage makes the size value-independent
                    d.up.copy_(torch.randn(d.up.shape, generator=g) * 1e-2)
            lora = export_kohya(deltas)
            config = ForgetConfig(rank=rank)
            metadata = describe(full, layers, [concept], config, rank, reference.losses)
            patch = ForgetPatch(lora, metadata)
            path = save_patch(patch, Path(tmp) / f"sd15_rank{rank}.safetensors")
            loaded = load_patch(path)
            problems = compatibility_problems(loaded, full)
            if problems:
                raise RuntimeError(f"the SD1.5-shaped rank-{rank} patch does not fit an SD1.5 UNet: {problems[:3]}")
            size = path.stat().st_size
            tensor_bytes = patch.size_bytes()
            with open(path, "rb") as f:
                header_bytes = 8 + int.from_bytes(f.read(8), "little")
            part = lambda suffix: sum(t.numel() * t.element_size() for k, t in lora.items() if k.endswith(suffix))  # noqa: E731
            per_rank[str(rank)] = {
                "bytes": size, "under_target": size < PATCH_SIZE_TARGET_BYTES, "modules": len(loaded.modules()),
                "tensor_bytes": tensor_bytes, "up_bytes": part(".lora_up.weight"),
                "down_bytes": part(".lora_down.weight"), "alpha_bytes": part(".alpha"),
                "header_bytes": header_bytes, "metadata_json_bytes": len(json.dumps(metadata)),
            }

    inner = sorted({tuple(v.shape) for k, v in lora.items() if k.endswith("lora_up.weight")})
    default = per_rank[str(default_directions)]
    print(f"  [3] patch bytes per concept (SD1.5 shapes): "
          + ", ".join(f"rank {r}: {v['bytes']:,}" for r, v in per_rank.items())
          + f"; target < {PATCH_SIZE_TARGET_BYTES:,}", flush=True)
    return {
        "value": default["bytes"],
        "rank": defaults.rank,
        "directions": default_directions,
        "target_bytes": PATCH_SIZE_TARGET_BYTES,
        "under_target": default["bytes"] < PATCH_SIZE_TARGET_BYTES,
        "under_200_kib": default["bytes"] < 200 * 1024,
        "per_rank": per_rank,
        "route": "engine deltas on full SD1.5 shapes, exported and saved (not a full-size training run)",
        "how": ("fmn_core.train.build_deltas (mode 'aimed k/v') on a full-size SD1.5-layout UNet built from the "
                "host's classes without initialising its weights (shapes and key names only), with the concept "
                "basis from fmn_core.train.concept_basis (real CLIP tokenizer, 768-d context); up factors filled "
                "with random values (fp16 storage, so the size does not depend on them); exported with "
                "fmn_core.lora.export_kohya and written with fmn_core.patch.save_patch with metadata from "
                "fmn_core.train.describe, whose loss history is that of a real default-step engine run "
                "(figure 1); each file is read back with load_patch and checked with compatibility_problems "
                "against the SD1.5 UNet"),
        "layout": {"layers": len(layers), "projections": list(mode.projections), "context_dim": layers[0].context_dim,
                   "up_shapes_rank_4": [list(s) for s in inner], "storage": "fp16 factors, fp32 alpha"},
        "note": ("in the aimed mode every lora_down is the same rank x 768 concept basis, stored once per module "
                 "(32 copies) because the kohya format has no shared factor: down_bytes is about half the tensors; "
                 "the rest of the header is the tensor index (96 long kohya key names)"),
        "small_model_engine_file_bytes": small_bytes,
        "small_model_engine_file_what": "the file save_patch writes for figure 1's real default-step run on the small model (model_channels 32)",
    }


# --- figures 4 and 9: seconds per concept at full size -----------------------------------

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


def self_check_figures(report) -> dict:
    """A run's in-run report as figures: the checks' cost beside the training's, and the result."""
    return {"check_s": report.check_seconds, "train_s": report.train_seconds,
            "share": r4(report.check_seconds / report.train_seconds) if report.train_seconds else None,
            "steps": report.steps, "budget": report.budget, "target": report.target, "met": report.met,
            "erasure": report.erasure, "collateral_relative": report.collateral_relative}


# --- figure 10: the in-run checks' share of a default run -------------------------------


def bench_self_check_share(pack, cfg: dict) -> dict:
    """Figure 10: one default run (512 px, 150 steps) to its whole budget on the small
    SD1.5-layout model; the checks and the training steps are timed inside that one run
    (wall clock, side by side), so the share does not depend on how busy the machine is
    over minutes."""
    import host_models
    from fmn_pack.fmn_core.concepts import parse_concepts
    from fmn_pack.fmn_core.train import ForgetConfig, forget

    patcher, clip = host_models.sd15_model(seed=0), host_models.sd1_clip(seed=1)
    concept = parse_concepts(CONCEPT_LINES[0])
    forget(patcher, clip, concept, ForgetConfig(steps=2, check_every=1))  # warm-up
    whole = forget(patcher, clip, concept, ForgetConfig(target=0.0)).report
    return {
        "value": r4(whole.check_seconds / whole.train_seconds),
        "bound": 0.10,
        "what": ("seconds of the in-run checks (the original predictions before the first step, every check, the "
                 "final collateral and attention measurement) over the seconds of the training steps, in one "
                 f"forget() run of '{CONCEPT_LINES[0]}' with the default ForgetConfig but target 0 "
                 f"({whole.budget} steps, checks every {ForgetConfig().check_every}) at 512 px, the tests' small "
                 "SD1.5-layout model; wall clock inside the run"),
        "run": self_check_figures(whole),
    }


# --- figure 7: training memory per memory option ---------------------------------------

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
        args = [sys.executable, __file__, "--memory-probe", json.dumps(options), "--threads", str(cfg["torch_threads"])]
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


# --- figure 11: the pack's steps on both supported hosts ---------------------------------

HOSTS = {  # what scripts/setup_host.sh builds (FMN_HOST): name -> (ComfyUI tree, the python that runs it)
    "newest": (REPO / ".host" / "ComfyUI-0.30.0", REPO / ".venv-0.30.0" / "bin" / "python"),
    "floor": (REPO / ".host" / "ComfyUI", REPO / ".venv" / "bin" / "python"),
}
HOST_SPEED_ROUNDS, HOST_SPEED_REPS = 2, 2  # per host: rounds (alternating hosts) x figure-1 reps per process


def host_speed_probe(pack, cfg: dict) -> dict:
    """One process's share of figure 11: figure 1's measurement on this process's host."""
    fig, _ = bench_train_vs_sample(pack, cfg, reps=HOST_SPEED_REPS)
    return {"comfyui_version": _host_version(), "reps": fig["reps"]}


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
            args = [str(python), __file__, "--host-probe", "--threads", str(cfg["torch_threads"])]
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
        "comfyui_version": _host_version(),
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
    for path in sorted([REPO / "__init__.py", *(REPO / "fmn_core").glob("*.py"), *(REPO / "nodes").glob("*.py")]):
        digest.update(path.relative_to(REPO).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _host_version() -> str | None:
    try:
        text = (HOST / "comfyui_version.py").read_text()
        return text.split("__version__")[1].split('"')[1]
    except (OSError, IndexError):
        return None


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
    print(f"  10. in-run checks / training steps: {f10['value']}x (bound {f10['bound']})")
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
