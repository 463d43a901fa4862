"""Figures 1 and 8: one Forget Train step over one plain sampling step, on the small
SD1.5-layout model (figure 1) and the small SDXL-layout model (figure 8)."""
from __future__ import annotations

from .common import CONCEPT_LINES, LAYOUTS, StepClock, med, r4, ratio_figure, sampling_step_seconds, spread, timed


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
