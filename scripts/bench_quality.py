"""`make bench-quality`: how well forgetting works, measured on ToyBench.

For each run (one concept, three concepts, a whole category, all but two) and each recipe (the pack's
defaults, earlier defaults, the paper's reference recipe and mode `token rows`, whose
patch edits the text encoder and is sampled through the patched CLIP), train a patch on the shipped toy model,
sample every prompt of the world on held-out seeds through the host's sampler, and let
the oracle say what the images show:

- erased: detection rate of the forgotten concepts on their own prompts, before -> after;
- kept: mean detection rate of every other concept on its prompts, after / before;
- H: harmonic mean of (1 - erased after) and kept (capped at 1), the field's
  many-concept erasure score.

Training sees the pack's category templates ("a photo of {}", ...) and eight rendered
images of each concept; evaluation uses the world's own prompts ("a portrait of ...",
"a {object} in the style of {style}") and seeds 9000+, so both are held out.

Concept Inversion and M-Score (`--no-inversion` skips them), and the anchor floor: how often
the original model already draws each object for the object anchor's prompts.

- recovery: each concept's eight images inverted from a generic word ("person",
  "object", "style") through the original model; the oracle's detection rate in samples
  of the concept's template with the learned tokens (seeds 9000+), before which the
  generic word alone draws the concept in (nearly) none;
- M-Score (fmn_core/mscore.py; every inversion starts from the neutral word "thing") of
  every concept through the original model; after each single-concept pack-defaults run,
  of the forgotten concept and the other members of its category (the kept concepts most
  like it); after the three-concept run, of all twelve (so a forgotten concept's drop can
  be set beside the kept ones').

Redirect (the paper's concept correction): a concept forgotten with `| anchor=<another
concept>` and the other concept's images, with each of REDIRECT_RECIPES; the share of the
forgotten concept's prompts (all of them, held-out seeds) in which the oracle sees the
replacement, and in which it still sees the concept.

Precise erasure (`--precise-erasure`): each run's forgotten concepts on their own prompts
again, 48 seeds per prompt (SEEDS_PRECISE), so that a single concept's erasure is read to
about 0.02 rather than 0.05; H is recomputed with it and the same kept figure.

Fused: every multi-concept run again as one patch merged (Merge Forget Patches) from its
concepts' single-concept patches. Recovery attack: every single-concept patch of each
recipe attacked by inversion from the generic word through the patched model, the oracle
judging the recovered tokens' samples.

Writes bench/quality.json and bench/QUALITY.md (the tables docs/quality.md carries). About an hour and
three quarters on 2 CPU cores (95 min for the last full run, on a shared machine, before the all-but-two run and
the token-rows recipe were added; the token-rows runs alone take 14 min). `--runs` picks runs by name,
`--recipe NAME=JSON` adds or overrides a recipe (ForgetConfig fields), to compare settings
quickly.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from benchmarks.common import bootstrap  # noqa: E402
from quality.anchors import REDIRECT_RECIPES, anchor_floor, redirect_report  # noqa: E402
from quality.recovery import inversion_report, recovery_attack, remeasure_inversion, remeasure_recovery  # noqa: E402
from quality.report import add_self_check, merge_results, rewrite_report, write_report  # noqa: E402
from quality.runs import (IMAGES_PER_CONCEPT, MULTI_CONCEPT_ONLY, OUT, RECIPES, SEEDS_IDENTITY, SEEDS_SCENE,  # noqa: E402
                          fused_results, one_run, precise_entry, rates, runs, score, self_check_entry)
from quality.self_check import more_oracle_seeds, remeasure_watched, self_check_study  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", nargs="*", help="run names (default: all)")
    ap.add_argument("--recipe", action="append", default=[], help="NAME=JSON of ForgetConfig fields")
    ap.add_argument("--only-recipes", action="store_true", help="use only the --recipe ones")
    ap.add_argument("--recipes", nargs="*", help="names from RECIPES to run (default: all)")
    ap.add_argument("--merge", action="store_true",
                    help="put these runs' results into the existing --out (replacing the same run and recipe) "
                         "instead of writing a new report")
    ap.add_argument("--out", default=str(OUT / "quality.json"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="half the evaluation seeds (for comparing settings)")
    ap.add_argument("--precise-erasure", action="store_true",
                    help="also measure each run's erasure on SEEDS_PRECISE (48 seeds per prompt of the forgotten "
                         "concepts); about 20 s more per single-concept run")
    ap.add_argument("--weights", default=None, help="a ToyBench weights folder other than the shipped one")
    ap.add_argument("--no-inversion", action="store_true", help="skip the Concept Inversion and M-Score measurements")
    ap.add_argument("--only-inversion", action="store_true",
                    help="re-measure only Concept Inversion and M-Score into the existing --out (the pack-defaults "
                         "patches of --runs are retrained with the same seed; the forgetting results are kept)")
    ap.add_argument("--only-recovery", action="store_true",
                    help="re-measure only the recovery attack on the single-concept patches of --runs and --recipes "
                         "(retrained with the same seed) into the existing --out")
    ap.add_argument("--harden", action="store_true",
                    help="with --only-recovery: harden each single-concept patch (Harden Forget Patch) before the "
                         "attack; entries '<recipe> + hardened', about 7 min per concept with the attack")
    ap.add_argument("--only-redirect", action="store_true",
                    help="measure only the redirects (REDIRECTS) into the existing --out")
    ap.add_argument("--self-check", action="store_true",
                    help="the self-check study: train --runs x --recipes (recipes in the order --recipes names "
                         "them), measure each with the oracle on the chosen seeds (--quick: half), and put each run's "
                         "in-run report and oracle figures into the existing --out's 'self_check' section as soon as "
                         "it is measured, with the agreement (rank correlations) and early stopping's rows "
                         "recomputed; pairs it already holds are skipped, so an interrupted study continues")
    ap.add_argument("--remeasure-watched", action="store_true",
                    help="with --self-check: the runs of --runs that --out's study holds without watched figures, trained again "
                         "with the world's other concepts watched (the patch is the same, so the oracle's figures "
                         "stand; a run whose in-run figures do not reproduce is left as it was)")
    ap.add_argument("--more-oracle-seeds", action="store_true",
                    help="with --self-check: the runs of --runs that --out's study holds, trained again (they must "
                         "reproduce their in-run figures) and scored by the oracle on as many seeds again, so kept "
                         "is read from twice the samples; several processes may share one --out")
    ap.add_argument("--only-anchor-floor", action="store_true",
                    help="measure only how often the original model draws each object for the object anchor's prompts, "
                         "into the existing --out")
    args = ap.parse_args(argv)
    keep = 2 if args.quick else 1
    seeds = (list(SEEDS_IDENTITY[:len(SEEDS_IDENTITY) // keep]), list(SEEDS_SCENE[:len(SEEDS_SCENE) // keep]))

    bootstrap()
    from fmn_pack.fmn_core.concepts import parse_concepts
    from fmn_pack.toybench import loader, world

    if unknown := [k for k in args.recipes or () if k not in RECIPES]:
        raise SystemExit(f"unknown recipe(s) {unknown}: choose from {list(RECIPES)}")
    recipes = {} if args.only_recipes else {k: RECIPES[k] for k in args.recipes or RECIPES}
    for item in args.recipe:
        name, _, spec = item.partition("=")
        recipes[name] = json.loads(spec)
    if not recipes and not (args.only_inversion or args.only_anchor_floor):
        raise SystemExit("no recipe chosen: --only-recipes runs only the --recipe NAME=JSON ones; "
                         f"--recipes names from {list(RECIPES)}")
    all_runs = runs(world)
    chosen = args.runs or list(all_runs)
    unknown = [r for r in chosen if r not in all_runs]
    if unknown:
        raise SystemExit(f"unknown run(s) {unknown}: choose from {list(all_runs)}")

    folder = args.weights or loader.WEIGHTS
    toy = loader.load(folder)
    oracle_net = loader.load_oracle(folder)
    if args.only_inversion:
        measured = {r: all_runs[r] for r in chosen}
        return remeasure_inversion(toy, oracle_net, measured, seeds[0], args.seed, Path(args.out))
    if args.only_recovery:
        return remeasure_recovery(toy, oracle_net, {r: all_runs[r] for r in chosen}, recipes, seeds[0], args.seed,
                                  Path(args.out), args.harden)
    if args.only_redirect:
        report = json.loads(Path(args.out).read_text())
        report.setdefault("redirect", {}).update(redirect_report(toy, oracle_net, seeds, args.seed, report["base"],
                                                                 recipes if args.only_recipes else REDIRECT_RECIPES))
        return rewrite_report(report, Path(args.out))
    if args.only_anchor_floor:
        report = json.loads(Path(args.out).read_text())
        report["anchor_floor"] = anchor_floor(toy, oracle_net, seeds[0])
        return rewrite_report(report, Path(args.out))
    if args.self_check and args.more_oracle_seeds:
        return more_oracle_seeds(toy, oracle_net, Path(args.out), all_runs, args.seed, set(chosen))
    if args.self_check and args.remeasure_watched:
        return remeasure_watched(toy, Path(args.out), all_runs, args.seed, set(chosen))
    if args.self_check:
        return self_check_study(toy, oracle_net, {r: all_runs[r] for r in chosen}, recipes, seeds, args.seed,
                                Path(args.out), all_runs)
    t0 = time.perf_counter()
    base = rates(toy[0], toy, oracle_net, seeds)
    print(f"base detection ({time.perf_counter() - t0:.0f}s): {json.dumps({k: round(v, 3) for k, v in base.items()})}", flush=True)
    results, trained, precise_base = [], {}, {}
    for run_name in chosen:
        lines = all_runs[run_name]
        forgotten = [c.text for c in parse_concepts("\n".join(lines))]
        for recipe_name, recipe in recipes.items():
            if recipe_name in MULTI_CONCEPT_ONLY and len(forgotten) == 1:
                continue
            out = one_run(toy, lines, recipe, args.seed)
            after = rates(out["patched"], toy, oracle_net, seeds, clip=out["clip"])
            entry = {"run": run_name, "recipe": recipe_name, "settings": recipe, "concepts": forgotten,
                     "seconds_per_concept": round(out["seconds"] / len(forgotten), 2), "patch_bytes": out["bytes"],
                     "loss_first_last": [round(out["result"].losses[0], 4), round(out["result"].losses[-1], 4)],
                     **score(base, after, forgotten), "after": {k: round(v, 3) for k, v in after.items()},
                     "self_check": self_check_entry(out["result"].report)}
            if args.precise_erasure:
                entry["precise"] = precise_entry(toy, oracle_net, forgotten, out, entry["kept"], precise_base)
            results.append(entry)
            trained[run_name, recipe_name] = out
            print(f"{run_name:22s} {recipe_name:14s} erased {entry['erased_before']:.2f}->{entry['erased_after']:.2f} "
                  f"kept {entry['kept']:.3f} H {entry['H']:.3f} ({entry['seconds_per_concept']:.1f} s/concept, "
                  f"{entry['patch_bytes']:,} B, worst kept: {entry['worst_kept']})", flush=True)
    report = {"measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "seeds_identity": seeds[0], "seeds_scene": seeds[1], "images_per_concept": IMAGES_PER_CONCEPT,
              "recipes": recipes, "base": {k: round(v, 4) for k, v in base.items()}, "results": results}
    results += fused_results(toy, oracle_net, trained, all_runs, base, seeds)
    if args.merge:
        return merge_results(Path(args.out), report, all_runs)
    if not args.no_inversion:
        patched_models = {run: out["patched"] for (run, recipe), out in trained.items() if recipe == "pack defaults"}
        report["inversion"] = inversion_report(toy, oracle_net, patched_models, all_runs, seeds[0])
        report["recovery_attack"] = recovery_attack(toy, oracle_net, trained, seeds[0])
    report["anchor_floor"] = anchor_floor(toy, oracle_net, seeds[0])
    report["redirect"] = redirect_report(toy, oracle_net, seeds, args.seed, report["base"], REDIRECT_RECIPES)
    add_self_check(report, all_runs)
    write_report(report, Path(args.out), table=not args.runs and not args.only_recipes)
    print(f"wrote {args.out} ({time.perf_counter() - t0:.0f}s)")



if __name__ == "__main__":
    main()
