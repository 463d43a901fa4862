"""What the recovery attack finds in a model that never saw the concept.

Unlearning's gold standard is a model retrained without the data to forget. This script
trains two ToyBench UNets from the same seeded init, for the same number of steps, with
the shipped VAE, text encoder and oracle: a *control* on every scene of the world and a
*retrain* on every scene except those naming the excluded concepts. It then measures, on
both, the detection rate of every concept on its own prompts (held-out seeds 9000+) and
`FMN_RecoveryAttack`'s measurement for each excluded concept (its eight images inverted
from the generic word, probes.RECOVERY, and the oracle on samples of its template with
the recovered tokens). A retrain's recovery figure is the floor no forgetting method can
be asked to beat: whatever the attack finds there is textual inversion teaching the model
something new, not something left behind. Then each excluded concept is forgotten from
the control with each of `--recipes` (bench_quality's single-concept runs) and the same
measurements are taken through the patch, so a patch stands beside the retrain it
imitates, on the same base.

    .venv/bin/python scripts/bench_retrain_floor.py     # ~50 min on 2 CPU cores (15 per UNet)
    .venv/bin/python scripts/bench_retrain_floor.py --steps 3 --exclude star --kept /tmp/k --out /tmp/f.json  # smoke
    .venv/bin/python scripts/bench_retrain_floor.py --merge --recipes --recipe 'NAME={"mode": "k/v"}'
        # one more recipe on the kept control, added to the existing report
    .venv/bin/python scripts/bench_retrain_floor.py --merge --recipes "pack defaults" --harden  # ~25 min
        # the defaults' patches hardened (Harden Forget Patch), added as 'pack defaults + hardened'

Writes bench/retrain_floor.json; the trained UNets are kept under out/retrain_floor/
(`--kept`), with their settings, so that `--reuse` and `--merge` need not train again.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from benchmarks.common import bootstrap  # noqa: E402
from quality.recovery import HARDENED, attack_rate, harden_settings, hardened  # noqa: E402
from quality.runs import OUT, RECIPES, SEEDS_IDENTITY, SEEDS_SCENE, one_run, rates, score  # noqa: E402

KEPT = REPO / "out" / "retrain_floor"
EXCLUDED = ("Captain Zorb", "moon", "zebra", "checkers")  # each category; the attack recovers them well
SEEDS = (list(SEEDS_IDENTITY), list(SEEDS_SCENE))


def training_data(toy, per_scene: int, seed: int):
    """Every scene's rendered images through the shipped VAE, in the model's input space,
    each image's scene index, and the scenes' contexts and the empty prompt's through the
    shipped text encoder: the same data for both models."""
    from fmn_pack.toybench import train as toy_train, world
    mp, clip, vae = toy
    images, scene_idx = toy_train.render_scenes(world.all_scenes(), per_scene, seed)
    latents = mp.model.latent_format.process_in(toy_train.encode_images(vae, images))
    return (latents, scene_idx, *toy_train.scene_contexts(clip, world.all_scenes()))


def train_model(name: str, toy, data: Callable[[], tuple], scenes_kept: list[int], args) -> tuple[object, float]:
    """A fresh seeded toy UNet trained `args.steps` steps on the images of `scenes_kept` (of
    `data()`), and its training seconds; with --reuse, the one kept in --kept by the same
    settings; with --merge, that one or, where none is kept (a new checkout), the same seeded
    training again."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from fmn_pack.fmn_core.files import atomic_write
    from fmn_pack.toybench import model as M, train as toy_train
    mp = M.unet()
    net = mp.model.diffusion_model
    path = Path(args.kept) / f"{name}.safetensors"
    settings = {"steps": str(args.steps), "lr": str(args.lr), "seed": str(args.seed), "per_scene": str(args.per_scene),
                "scenes": json.dumps(scenes_kept)}
    if args.reuse and not path.is_file() and not args.merge:
        raise SystemExit(f"no kept UNet at {path}: run without --reuse to train it (or pass its --kept)")
    if args.reuse and path.is_file():
        with safe_open(str(path), "pt") as f:
            stored = f.metadata() or {}
        if any(stored.get(k) != v for k, v in settings.items()):
            raise SystemExit(f"{path} was trained with other settings ({stored}); run without --reuse to train it again")
        net.load_state_dict(load_file(str(path)))
        return mp, float(stored["train_seconds"])
    latents, scene_idx, contexts, empty = data()
    mask = torch.isin(scene_idx, torch.tensor(scenes_kept))
    _, seconds = toy_train.train_unet(mp, latents[mask], scene_idx[mask], contexts, empty, minutes=1e6,
                                      max_steps=args.steps, seed=args.seed, lr=args.lr,
                                      log=lambda msg: print(f"{name}: {msg}", flush=True))
    atomic_write(path, lambda tmp: save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp,
                                             metadata={**settings, "train_seconds": f"{seconds:.1f}"}), overwrite=True)
    return mp, round(seconds, 1)


def recovery(mp, clip, vae, oracle_net, concept: str) -> float:
    """FMN_RecoveryAttack's measurement, judged by the oracle (bench_quality's settings)."""
    rate = attack_rate(mp, clip, vae, oracle_net, concept, list(SEEDS_IDENTITY))
    print(f"  recovery {concept:14s} {rate:.2f}", flush=True)
    return rate


def measure(mp, toy, oracle_net, excluded: list[str]) -> dict:
    """Detection of every concept on its prompts, and the recovery attack on `excluded`."""
    detection = rates(mp, toy, oracle_net, SEEDS)
    return {"detection": {k: round(v, 3) for k, v in detection.items()},
            "recovery": {c: recovery(mp, toy[1], toy[2], oracle_net, c) for c in excluded}}


def forgotten_from_control(control_mp, toy, oracle_net, report: dict, recipes: dict[str, dict], seed: int,
                           concepts: list[str], harden: bool = False) -> dict:
    """Recipe name -> excluded concept -> its detection, the other concepts kept (after /
    before) and the recovery attack, with that concept forgotten from the control by the
    recipe (ForgetConfig fields), for each of `concepts`; with `harden`, its patch hardened (`hardened`) and the
    entry named '<recipe> + hardened'."""
    from fmn_pack.toybench import probes
    control_toy = (control_mp, toy[1], toy[2])
    base = report["models"]["control"]["detection"]
    out: dict[str, dict] = {}
    for recipe, fields in recipes.items():
        name = f"{recipe} + {HARDENED}" if harden else recipe
        for concept in concepts:
            run = one_run(control_toy, [f"{concept} | {probes.category(concept)}"], fields, seed)
            if harden:
                run = hardened(control_toy, run, concept, seed)
            after = rates(run["patched"], control_toy, oracle_net, SEEDS, clip=run["clip"])
            out.setdefault(name, {})[concept] = {
                "detection": round(after[concept], 3), "kept": score(base, after, [concept])["kept"],
                "recovery": recovery(run["patched"], run["clip"], toy[2], oracle_net, concept),
                "seconds": round(run["seconds"], 1)}
            print(f"{name} on the control, {concept}: {out[name][concept]}", flush=True)
    return out


def table(report: dict) -> str:
    """Markdown: each excluded concept's detection on its own prompts and the recovery
    attack's, on the control, through each recipe's patch on it, and on the retrain."""
    control, retrain = report["models"]["control"], report["models"]["retrain"]
    patched = report["patched_control"]
    heads = ["control", *(f"control + {r}" for r in patched), "retrain"]
    rows = ["| concept: detection on its prompts / recovery attack | " + " | ".join(heads) + " |",
            "|---|" + "---|" * len(heads)]
    for c in report["excluded"]:
        cells = [(control["detection"][c], control["recovery"][c]),
                 *((by_concept[c]["detection"], by_concept[c]["recovery"]) for by_concept in patched.values()),
                 (retrain["detection"][c], retrain["recovery"][c])]
        rows.append(f"| {c} | " + " | ".join(f"{d:.2f} / {r:.2f}" for d, r in cells) + " |")
    others = [c for c in control["detection"] if c not in report["excluded"]]
    kept = [1.0, *(sum(v["kept"] for v in by_concept.values()) / len(by_concept) for by_concept in patched.values()),
            sum(retrain["detection"][c] for c in others) / sum(control["detection"][c] for c in others)]
    rows.append("| other concepts kept (after / before) | " + " | ".join(f"{k:.3f}" for k in kept) + " |")
    return "\n".join(rows)


def fresh_report(args, recovery_settings: dict) -> dict:
    return {"about": __doc__.split("\n\n")[0], "excluded": args.exclude,
            "settings": {"steps": args.steps, "lr": args.lr, "batch": 64, "per_scene": args.per_scene,
                         "seed": args.seed, "recovery": recovery_settings, "recipes": {}},
            "models": {}, "patched_control": {}}


def merged_report(args, recovery_settings: dict) -> dict:
    """--merge: the existing --out, which must describe the same two models."""
    if not Path(args.out).is_file():
        raise SystemExit(f"--merge adds to an existing report, and {args.out} is not there: run without --merge first")
    report = json.loads(Path(args.out).read_text())
    wanted = fresh_report(args, recovery_settings)
    if report["excluded"] != wanted["excluded"] or any(report["settings"][k] != v for k, v in wanted["settings"].items()
                                                       if k != "recipes"):
        raise SystemExit(f"{args.out} measured other models ({report['excluded']}, {report['settings']}): "
                         "pass the same --exclude/--steps/--lr/--per-scene/--seed, or run without --merge")
    return report


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--exclude", nargs="*", default=list(EXCLUDED), help="concepts the retrain never sees")
    ap.add_argument("--steps", type=int, default=2000, help="training steps of each model (batch 64)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--per-scene", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipes", nargs="*", default=["pack defaults", "reference"],
                    help=f"bench_quality recipes that forget each excluded concept from the control ({list(RECIPES)})")
    ap.add_argument("--recipe", action="append", default=[], help="NAME=JSON of ForgetConfig fields: one more recipe")
    ap.add_argument("--harden", action="store_true",
                    help="harden each recipe's patch (Harden Forget Patch) before measuring; entries '<recipe> + hardened'")
    ap.add_argument("--only", nargs="*", help="forget only these excluded concepts with the recipes (default: all); "
                                              "with --merge, their entries replace those in the report")
    ap.add_argument("--kept", default=str(KEPT), help="folder for the trained UNets")
    ap.add_argument("--reuse", action="store_true", help="measure the UNets kept in --kept again, without training")
    ap.add_argument("--merge", action="store_true",
                    help="with the kept UNets (the control trained again if none is kept), add these recipes to the "
                         "existing --out (its model figures are kept)")
    ap.add_argument("--out", default=str(OUT / "retrain_floor.json"))
    args = ap.parse_args(argv)
    args.reuse = args.reuse or args.merge

    bootstrap()
    from fmn_pack.fmn_core.files import atomic_write
    from fmn_pack.toybench import loader, probes, world
    unknown = [c for c in args.exclude if c not in world.CONCEPTS]
    if unknown or not args.exclude:
        raise SystemExit(f"--exclude needs concepts of the world {list(world.CONCEPTS)}; got {args.exclude}")
    if set(args.recipes) - set(RECIPES):
        raise SystemExit(f"unknown recipe(s) {sorted(set(args.recipes) - set(RECIPES))}: choose from {list(RECIPES)}")
    recipes = {r: RECIPES[r] for r in args.recipes}
    for item in args.recipe:
        name, _, spec = item.partition("=")
        recipes[name] = json.loads(spec)
    report = (merged_report if args.merge else fresh_report)(args, probes.RECOVERY)
    toy = loader.load()
    oracle_net = loader.load_oracle()
    data = functools.cache(lambda: training_data(toy, args.per_scene, args.seed))
    scenes = world.all_scenes()
    kept = {"control": list(range(len(scenes))),
            "retrain": [i for i, s in enumerate(scenes) if not set(s.concepts) & set(args.exclude)]}
    trained = {}
    for name, scene_ids in kept.items():
        measured = name in report["models"]
        if measured and name != "control":  # of the measured models only the control is needed, to forget from
            continue
        t0 = time.perf_counter()
        trained[name], seconds = train_model(name, toy, data, scene_ids, args)
        if not measured:
            print(f"{name}: trained on {len(scene_ids)} scenes", flush=True)
            report["models"][name] = {"scenes": len(scene_ids), "train_seconds": seconds,
                                      **measure(trained[name], toy, oracle_net, args.exclude),
                                      "seconds": round(time.perf_counter() - t0, 1)}
    report["settings"]["recipes"].update(recipes if not args.harden else {
        f"{r} + {HARDENED}": {**fields, "harden": harden_settings()} for r, fields in recipes.items()})
    only = args.only or args.exclude
    if set(only) - set(args.exclude):
        raise SystemExit(f"--only names concepts outside --exclude {args.exclude}: {sorted(set(only) - set(args.exclude))}")
    found = forgotten_from_control(trained["control"], toy, oracle_net, report, recipes, args.seed, only, args.harden)
    for name, by_concept in found.items():
        report["patched_control"].setdefault(name, {}).update(by_concept)
    report["written"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    text = json.dumps(report, indent=2) + "\n"
    atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(text), overwrite=True)
    print(table(report))


if __name__ == "__main__":
    main()
