"""The recovery attack on single-concept patches (and on hardened ones), and Concept
Inversion and M-Score through the original and the patched models."""
from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

from .report import rewrite_report
from .runs import RECIPES, one_run, rates, score


HARDENED = "hardened"
HARDEN_IMAGES = {"count": 32, "seed": 500}  # the defender's pictures: not the attack's (probes: 8 from seed 100)


def harden_settings() -> dict:
    """What `hardened` sets beyond HardenConfig's defaults, and those defaults, for the report."""
    import dataclasses
    from fmn_pack.fmn_core.harden import HardenConfig
    defaults = {k: v for k, v in dataclasses.asdict(HardenConfig()).items() if k not in ("keep", "templates", "seed")}
    return {**defaults, "images": HARDEN_IMAGES, "templates": "the world's phrasing of the category (probes.TEMPLATES)",
            "keep": "every scene prompt of the world without the concept"}


def hardened(toy, run: dict, concept: str, seed: int) -> dict:
    """`run` (one_run's) with its patch hardened by Harden Forget Patch's defaults: the
    concept's own pictures (HARDEN_IMAGES), the world's phrasing of its category as the
    template, and every scene prompt of the world without it in the keep list."""
    import torch
    from fmn_pack.fmn_core import patch as fmn_patch
    from fmn_pack.fmn_core.harden import HardenConfig, harden
    from fmn_pack.toybench import probes, world
    mp, clip, vae = toy
    forget_patch = fmn_patch.ForgetPatch(run["result"].lora, run["result"].metadata)
    with torch.inference_mode():
        images = probes.concept_latents(mp, vae, concept, **HARDEN_IMAGES)
    config = HardenConfig(seed=seed, templates=(probes.TEMPLATES[probes.category(concept)],),
                          keep=tuple(s.prompt for s in world.all_scenes() if concept not in s.concepts))
    started = time.perf_counter()
    result = harden(mp, clip, forget_patch, images, config)
    seconds = time.perf_counter() - started
    patched = fmn_patch.apply_patch(run["patched"], result.patch, 1.0)
    return {**run, "patched": patched, "seconds": run["seconds"] + seconds}


def recovery_attack(toy, oracle_net, trained: dict, seeds: list[int]) -> dict[str, dict[str, float]]:
    """FMN_RecoveryAttack's measurement for every single-concept patch of each recipe: the
    concept's images inverted from a generic word through the patched model, and the
    oracle's detection rate in samples of its template with the recovered tokens."""
    from fmn_pack.toybench import world
    out: dict[str, dict[str, float]] = {}
    for (run_name, recipe), run in trained.items():
        if run_name not in world.CONCEPTS:
            continue
        rate = attack_rate(run["patched"], run["clip"], toy[2], oracle_net, run_name, seeds)
        out.setdefault(run_name, {})[recipe] = rate
        print(f"recovery attack {run_name:14s} {recipe:14s} {rate:.2f}", flush=True)
    return out


def attack_rate(mp, clip, vae, oracle_net, concept: str, seeds: list[int]) -> float:
    """One recovery attack (probes.RECOVERY: the concept's images inverted from a generic
    word through `mp`), judged by the oracle on samples of the recovered tokens."""
    import torch
    from fmn_pack.toybench import probes
    with torch.inference_mode():
        rate, _ = probes.recovery_rate(mp, clip, vae, oracle_net, concept, seeds, **probes.RECOVERY)
    return round(rate, 3)


def remeasure_recovery(toy, oracle_net, chosen: dict, recipes: dict, seeds: list[int], seed: int, out: Path,
                       harden: bool = False) -> None:
    """`--only-recovery`: the recovery attack on these recipes' single-concept patches, put
    into an existing report beside the other recipes' figures. With `harden`, each patch is
    hardened first (entries '<recipe> + hardened'), and the hardened model's detection of the
    concept and of the others (kept) go into the report's `hardened` section."""
    from fmn_pack.toybench import world
    report = json.loads(out.read_text())
    trained = {}
    for name, lines in chosen.items():
        if name not in world.CONCEPTS:
            continue
        for recipe in recipes:
            run = one_run(toy, lines, recipes[recipe], seed)
            if harden:
                run = hardened(toy, run, name, seed)
                report.setdefault("hardened", {}).setdefault(name, {})[recipe] = hardened_entry(
                    toy, oracle_net, run, name, report)
            trained[name, f"{recipe} + {HARDENED}" if harden else recipe] = run
    for concept, by_recipe in recovery_attack(toy, oracle_net, trained, seeds).items():
        report.setdefault("recovery_attack", {}).setdefault(concept, {}).update(by_recipe)
    if harden:
        report["harden_settings"] = harden_settings()
    rewrite_report(report, out)


def hardened_entry(toy, oracle_net, run: dict, concept: str, report: dict) -> dict:
    """A hardened single-concept patch's figures beside its recovery: the concept's detection
    on its own prompts, the others kept (after / before) and the seconds of both stages.
    Measured on the report's own seeds (not --quick's), those of the base it is divided by."""
    after = rates(run["patched"], toy, oracle_net, (report["seeds_identity"], report["seeds_scene"]), clip=run["clip"])
    entry = {"detection": round(after[concept], 3), "kept": score(report["base"], after, [concept])["kept"],
             "seconds": round(run["seconds"], 1)}
    print(f"hardened {concept}: {entry}", flush=True)
    return entry


def remeasure_inversion(toy, oracle_net, all_runs: dict, seeds: list[int], seed: int, out: Path) -> None:
    """`--only-inversion`: the inversion section of an existing report, measured again."""
    report = json.loads(out.read_text())
    patched = {name: one_run(toy, lines, RECIPES["pack defaults"], seed)["patched"] for name, lines in all_runs.items()}
    report["inversion"] = inversion_report(toy, oracle_net, patched, all_runs, seeds)
    report["inversion"]["measured"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    rewrite_report(report, out)
    print(f"rewrote the inversion section of {out}")


def neighbours(forgotten: list[str]) -> list[str]:
    """The forgotten concepts and the kept members of their categories: the kept concepts
    most like them, whose M-Score a forget patch is likeliest to drag down with them."""
    from fmn_pack.toybench import probes, world
    return [c for c in world.CONCEPTS if c in forgotten or probes.category(c) in {probes.category(f) for f in forgotten}]


def inversion_report(toy, oracle_net, patched_models: dict, all_runs: dict, seeds: list[int]) -> dict:
    """Recovery from a generic word, and M-Score before/after the pack-defaults runs."""
    import torch
    from fmn_pack.fmn_core.mscore import m_scores
    from fmn_pack.toybench import probes, world
    mp, clip, vae = toy
    recovery, before = {}, {}
    with torch.inference_mode():
        for concept in world.CONCEPTS:
            t = time.perf_counter()
            rate, result = probes.recovery_rate(mp, clip, vae, oracle_net, concept, seeds, **probes.RECOVERY)
            start = probes.sample_rate(mp, clip, vae, oracle_net, concept, result.initial, seeds)
            recovery[concept] = {"from": probes.GENERIC_INIT[probes.category(concept)], "detection_initial": round(start, 3),
                                 "detection_learned": round(rate, 3), "seconds": round(time.perf_counter() - t, 1)}
            print(f"recovery {concept:14s} {start:.2f} -> {rate:.2f}", flush=True)

        def score(model, concept: str) -> float:
            config = probes.config_for(concept, **probes.M_SCORE)
            latents = probes.concept_latents(mp, vae, concept)
            return m_scores([("model", model)], clip, latents, concept, config, probes.M_SCORE_INIT)[0].score

        before = {c: round(score(mp, c), 4) for c in world.CONCEPTS}
        print(f"M-Score before: {json.dumps(before)}", flush=True)
        after = {}
        for run_name, model in patched_models.items():
            forgotten = [line.split("|")[0].strip() for line in all_runs[run_name]]
            measured = world.CONCEPTS if run_name == "three concepts" else neighbours(forgotten)
            after[run_name] = {c: round(score(model, c), 4) for c in measured}
            print(f"M-Score after {run_name}: {json.dumps(after[run_name])}", flush=True)
    return {"recovery_settings": probes.RECOVERY, "m_score_settings": {**probes.M_SCORE, "init_text": probes.M_SCORE_INIT},
            "templates": probes.TEMPLATES,
            "recovery_seeds": seeds, "recovery": recovery, "m_score_before": before, "m_score_after": after}
