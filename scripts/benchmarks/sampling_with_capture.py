"""Figure 6: a sampling run with the Attention Map Viewer's heatmap capture over the same
run without it."""
from __future__ import annotations

from .common import ratio_figure, timed


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
