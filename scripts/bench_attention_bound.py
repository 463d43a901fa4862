"""Can any LoRA meet issue 7's attention-level target on the tests' random-weight model?

The target: on the small SD1-layout model and text encoder of the Forget Train tests, the
concept's attention share on held-out templates falls by at least 80 % while every word
of held-out prompts without the concept moves by under 5 % (both measured exactly as
tests/attention_checks.py measures them). The pack's aimed modes miss it. Two reasons
could make any method miss it: the kind of update (a LoRA on the cross-attention keys and
values may be unable to do it at all) and what a method can know (the held-out words are
in none of its training prompts). This script tells them apart.

It fits LoRAs on attn2 to_k (rank 2) and to_k/to_v (rank 8) to the measured quantities
themselves, by gradient descent on the attention shares: the log of the concept's share
ratio (floored at 0.1) plus a penalty on each other word's relative change beyond 2 %, on
random latents and timesteps, not the measurement's, with Adam and a cosine learning-rate
decay. Two training sets:
- `held-out prompts`: the two held-out templates and the three prompts without the concept,
  an oracle that knows the words it will be judged on;
- `own prompts`: the concept's own category templates and the pack's preserve prompts,
  which is all that a method can know.
Beside them, the pack's aimed modes at the tests' paper budget, and aimed k/v with and
without the held-out prompts named in its keep list, on the SD1 layout and (fewer rows) on
the SD2 layout. Every row is measured on the held-out set.

A linear update of the keys moves every word whose embedding it does not annul, and a
method cannot annul words it never saw. The `gated` rows test the way out: the same fit
on own prompts, as a low-rank edit of the key input (rank 2) that acts only where a gate
opens. The gate compares each context vector with the concept's token vectors in its own
templates (cosine): shut at or below the largest similarity of any token of the preserve
prompts (plus a margin), fully open at the concept tokens' leave-one-template-out
similarity. `gated, concept tokens`: the edit acts on the concept's tokens alone; `gated,
whole prompt`: on every token of a prompt where the gate opens anywhere. A prompt without
the concept passes unchanged either way.

    .venv/bin/python scripts/bench_attention_bound.py              # ~13 min on 2 CPU cores
    .venv/bin/python scripts/bench_attention_bound.py --steps 2 --out /tmp/b.json   # smoke

Writes bench/attention_bound.json.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from benchmarks.common import bootstrap  # noqa: E402

CONCEPT = "van gogh"  # the Forget Train tests' concept, in their category
FITS = {"k, rank 2": (("to_k",), 2), "k/v, rank 8": (("to_k", "to_v"), 8)}
GATED = {"gated, concept tokens": False, "gated, whole prompt": True}  # name -> whole prompt
GATED_RANK = 2
TOLERANCE = 0.02   # a word's relative change the fit's penalty lets pass
PENALTY = 100.0
SHARE_FLOOR = 0.1  # the fit stops pushing a concept share below this ratio


def pack_runs(modes: tuple[str, ...], keep_steps: tuple[int, ...]) -> dict[str, dict]:
    """The pack's `modes` at the paper budget, and aimed k/v for each of `keep_steps` at lr
    0.03 with and without the held-out prompts without the concept named in `keep` (which
    makes them training prompts)."""
    from attention_checks import PAPER_BUDGET, PROMPTS_WITHOUT_CONCEPT
    runs = {f"pack, {mode}, paper budget": {"mode": mode, **PAPER_BUDGET} for mode in modes}
    for steps in keep_steps:
        budget = {**PAPER_BUDGET, "mode": "aimed k/v", "steps": steps, "learning_rate": 3e-2}
        runs[f"pack, aimed k/v, {steps} steps, lr 0.03"] = budget
        runs[f"pack, aimed k/v, {steps} steps, lr 0.03, held-out prompts in keep"] = {**budget, "keep": tuple(PROMPTS_WITHOUT_CONCEPT)}
    return runs


def pack_rows(model, clip, runs: dict[str, dict], prefix: str = "") -> dict:
    """Each pack run trained on `model` and measured on the held-out set."""
    from attention_checks import RESOLUTION
    from fmn_pack.fmn_core import host
    from fmn_pack.fmn_core.concepts import parse_concepts
    from fmn_pack.fmn_core.train import ForgetConfig, forget
    rows = {}
    for name, config in runs.items():
        result = forget(model, clip, parse_concepts(f"{CONCEPT} | style"), ForgetConfig(resolution=RESOLUTION, **config))
        rows[prefix + name] = measured(model, clip, host.apply_lora(model, result.lora, 1.0))
        print(f"{prefix + name}: {rows[prefix + name]}", flush=True)
    return rows


def prompt_sets() -> dict[str, tuple[tuple[str, ...], list[str]]]:
    """Name -> (the concept's templates, prompts without it)."""
    import attention_checks as ac
    from fmn_pack.fmn_core.concepts import TEMPLATES, preserve_prompts
    return {"held-out prompts": (tuple(ac.HELD_OUT_TEMPLATES), list(ac.PROMPTS_WITHOUT_CONCEPT)),
            "own prompts": (TEMPLATES["style"], [p for p in preserve_prompts() if p])}


def fit_loss(now, before, batch: list, n_concept: int):
    """The concept prompts' log share ratios plus the penalty on the other words' changes."""
    loss = 0
    for i, (_, positions) in enumerate(batch):
        if i < n_concept:
            loss = loss + (now[i, positions].sum() / before[i, positions].sum()).log().clamp_min(math.log(SHARE_FLOOR))
        else:
            change = (now[i, positions] / before[i, positions] - 1).abs()
            loss = loss + PENALTY * (change - TOLERANCE).clamp_min(0).pow(2).sum()
    return loss


def fit(model, clip, prompt_set: tuple[tuple[str, ...], list[str]], projections: tuple[str, ...], rank: int, steps: int,
        lr: float, seed: int):
    """A LoRA fitted to the attention shares of `prompt_set`; returns the patched model."""
    import torch
    from fmn_pack.fmn_core import host
    from fmn_pack.fmn_core.lora import LowRankDelta, disabled, export_kohya

    generator = torch.Generator().manual_seed(seed)
    deltas = {key: LowRankDelta.free(o, i, rank, layer.dim_head ** -0.5, generator)
              for layer in host.attn2_layers(model)
              for key, (o, i) in host.weight_shapes(model, [layer.weight_key(p) for p in projections]).items()}
    params = [p for d in deltas.values() for p in d.parameters() if p.requires_grad]
    fit_shares(model.clone(), deltas, params, lambda: disabled(deltas), clip, prompt_set, steps, lr, seed, generator)
    return host.apply_lora(model, export_kohya(deltas), 1.0)


def gated_fit(model, clip, prompt_set: tuple[tuple[str, ...], list[str]], whole_prompt: bool, rank: int, steps: int,
              lr: float, seed: int):
    """The fit as a gated edit of the key input (fmn_core/gate.py); returns the patched
    model and its gate."""
    import torch
    import attention_checks as ac
    from fmn_pack.fmn_core import host
    from fmn_pack.fmn_core.lora import disabled
    from fmn_pack.fmn_core.gate import ConceptGate, gated_key_patch, key_input_edits

    templates, others = prompt_set
    concept_rows = [host.encode_pooled(clip, p)[0][0][ac.concept_columns(clip, CONCEPT, p)]
                    for p in (t.format(CONCEPT) for t in templates)]
    gate = ConceptGate.fit(concept_rows, [host.encode_pooled(clip, p)[0][0] for p in others], whole_prompt)
    generator = torch.Generator().manual_seed(seed)
    layers = host.attn2_layers(model)
    edits = key_input_edits(layers, rank, generator)
    params = [p for edit in edits.values() for p in edit.parameters()]
    clone = model.clone()
    clone.set_model_attn2_patch(gated_key_patch(layers, edits, gate))

    fit_shares(clone, {}, params, lambda: disabled(edits), clip, prompt_set, steps, lr, seed, generator)
    for p in params:
        p.requires_grad_(False)
    patched = model.clone()
    patched.set_model_attn2_patch(gated_key_patch(layers, edits, gate))
    return patched, gate


def fit_shares(clone, wrappers: dict, params: list, original, clip, prompt_set: tuple[tuple[str, ...], list[str]],
               steps: int, lr: float, seed: int, generator) -> None:
    """Gradient descent of `params` (an update installed on `clone`, as weight `wrappers`
    or as a patch of its own) on fit_loss; `original()` switches the update off for the
    pass that gives the shares before it."""
    import torch
    import attention_checks as ac
    from fmn_pack.fmn_core import host
    from fmn_pack.fmn_core.attention import TokenShare, make_attn2_replace

    sink = TokenShare(grad=True)
    layers = host.attn2_layers(clone)
    host.register_attn2(clone, layers, lambda layer, previous: make_attn2_replace(layer.module, sink, previous))
    sampling, size = host.model_sampling(clone), ac.RESOLUTION // 8
    templates, prompts = prompt_set
    concepts = [(host.encode_pooled(clip, p)[0], ac.concept_columns(clip, CONCEPT, p)) for p in (t.format(CONCEPT) for t in templates)]
    others = [(host.encode_pooled(clip, p)[0], ac.word_positions(clip, p)) for p in prompts]
    n_concept, n_other = min(2, len(concepts)), min(3, len(others))
    picker = random.Random(seed)
    with torch.inference_mode(False):
        optimizer = torch.optim.Adam(params, lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)  # settles the noisy random-latent steps
        with host.trainable_unet(clone, wrappers) as unet:
            def shares(x, sigma, context):
                sink.reset()
                unet(x, sigma, context, None)
                return sink.shares()

            for _ in range(steps):
                batch = picker.sample(concepts, n_concept) + picker.sample(others, n_other)
                latent = torch.randn((len(batch), 4, size, size), generator=generator)
                noise = torch.randn(latent.shape, generator=generator)
                sigma = sampling.sigma(torch.randint(50, 950, (len(batch),), generator=generator).float())
                x = sampling.noise_scaling(sigma.reshape(-1, 1, 1, 1), noise, latent)
                context = torch.cat([c for c, _ in batch])
                with torch.no_grad(), original():
                    before = shares(x, sigma, context)
                loss = fit_loss(shares(x, sigma, context), before, batch, n_concept)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()


def measured(model, clip, patched, prompt_set: tuple[tuple[str, ...], list[str]] | None = None) -> dict:
    """The held-out measurement of tests/attention_checks.py; with `prompt_set`, the same two
    figures on those prompts too (a fit's own training prompts)."""
    import attention_checks as ac
    out = {"share_after_over_before": round(ac.concept_share_ratio(model, patched, clip, CONCEPT), 3),
           "largest_other_word_change": round(ac.worst_word_change(model, patched, clip), 3)}
    if prompt_set is not None:
        templates, prompts = prompt_set
        out["on_training_prompts"] = {
            "share_after_over_before": round(ac.concept_share_ratio(model, patched, clip, CONCEPT, templates=templates), 3),
            "largest_other_word_change": round(ac.worst_word_change(model, patched, clip, prompts=prompts), 3)}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400, help="steps of each fit")
    ap.add_argument("--gated-steps", type=int, default=200, help="steps of each gated fit")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "bench" / "attention_bound.json"))
    args = ap.parse_args(argv)
    bootstrap()
    import host_models as hm
    from fmn_pack.fmn_core import gate
    from fmn_pack.fmn_core.files import atomic_write

    model, clip = hm.sd15_model(), hm.sd1_clip()
    runs = {"SD1": pack_runs(("aimed k", "aimed k/v"), (150, 275)), "SD2": pack_runs(("aimed k/v",), (150,))}
    rows = pack_rows(model, clip, runs["SD1"])
    for set_name, prompt_set in prompt_sets().items():
        for fit_name, (projections, rank) in FITS.items():
            t0 = time.perf_counter()
            patched = fit(model, clip, prompt_set, projections, rank, args.steps, args.lr, args.seed)
            name = f"fit on {set_name}, {fit_name}"
            rows[name] = {**measured(model, clip, patched, prompt_set), "fit_seconds": round(time.perf_counter() - t0, 1)}
            print(f"{name}: {rows[name]}", flush=True)
    own = prompt_sets()["own prompts"]
    for gated_name, whole_prompt in GATED.items():
        t0 = time.perf_counter()
        patched, concept_gate = gated_fit(model, clip, own, whole_prompt, GATED_RANK, args.gated_steps, args.lr, args.seed)
        name = f"fit on own prompts, {gated_name}, key input rank {GATED_RANK}"
        rows[name] = {**measured(model, clip, patched, own), "fit_seconds": round(time.perf_counter() - t0, 1),
                      "gate": {"shut": round(concept_gate.shut, 3), "open": round(concept_gate.open, 3)}}
        print(f"{name}: {rows[name]}", flush=True)
    rows.update(pack_rows(hm.sd2_model(), hm.sd2_clip(), runs["SD2"], "SD2 layout, "))
    report = {"target": {"share_after_over_before": "<= 0.2", "largest_other_word_change": "< 0.05"},
              "settings": {"concept": CONCEPT, "steps": args.steps, "lr": args.lr, "seed": args.seed,
                           "tolerance": TOLERANCE, "penalty": PENALTY, "share_floor": SHARE_FLOOR,
                           "gated_steps": args.gated_steps, "gate_margin": gate.GATE_MARGIN,
                           "pack_runs": runs},
              "rows": rows,
              "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(text), overwrite=True)


if __name__ == "__main__":
    main()
