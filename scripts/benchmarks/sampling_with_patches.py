"""Figure 2: host sampler time with 0, 1 and 3 stacked forget patches, relative to 0
patches, plus the first-load (weight patching) time on its own."""
from __future__ import annotations

from .common import TIMER, med, r4, spread, timed


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
