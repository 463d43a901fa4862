"""What every figure of `make bench` shares: the bootstrap that imports the pack as the
tests do, the clock and the timing helpers, the figure format, the models built from the
host's classes, and one plain sampling step (what the step figures divide by)."""
from __future__ import annotations

import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HOST = Path(os.environ.get("FMN_COMFYUI", REPO / ".host" / "ComfyUI"))
PACK_NAME = "fmn_pack"
BENCH_SCRIPT = REPO / "scripts" / "bench.py"  # the runner: figures 7 and 11 start it again as their probe processes

# Concepts trained in turn by figure 1; their default-step patches feed figures 2 and 3.
CONCEPT_LINES = ("Van Gogh | style", "Mickey Mouse | identity", "a red fox")
SD15_UNET_PARAMS = 859_520_964  # what the host's loader passes to unet_dtype() for an SD1.5 UNet
SDXL_UNET_PARAMS = 2_567_463_684  # the same for the SDXL base UNet


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


# --- one plain sampling step (figures 1, 5 and 8 divide by it) --------------------------


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


# --- what several figures report ---------------------------------------------------------


def self_check_figures(report) -> dict:
    """A run's in-run report as figures: the checks' cost beside the training steps' (the
    report times them apart), as a share of the run and over the steps alone, and the result."""
    run_s = report.check_seconds + report.train_seconds
    return {"check_s": report.check_seconds, "train_s": report.train_seconds,
            "share_of_run": r4(report.check_seconds / run_s) if run_s else None,
            "over_training": r4(report.check_seconds / report.train_seconds) if report.train_seconds else None,
            "steps": report.steps, "budget": report.budget, "target": report.target, "met": report.met,
            "erasure": report.erasure, "collateral_relative": report.collateral_relative}


def host_version() -> str | None:
    try:
        text = (HOST / "comfyui_version.py").read_text()
        return text.split("__version__")[1].split('"')[1]
    except (OSError, IndexError):
        return None
