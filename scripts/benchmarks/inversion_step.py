"""Figure 5: one Concept Inversion step over one plain sampling step."""
from __future__ import annotations

from .common import ratio_figure, sampling_step_seconds, timed


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
