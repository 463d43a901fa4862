"""bench/quality.json and bench/QUALITY.md: writing a report, merging new runs into one,
the self-check agreement section, and the markdown tables docs/quality.md carries."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Callable

import self_check_agreement as agreement

from .runs import FUSED, OUT, RECIPES


def add_self_check(report: dict, all_runs: dict, plot: Path = OUT / "self_check.png") -> None:
    """The agreement of the runs' in-run reports with the oracle, and early stopping's
    cost or gain on the single concepts (scripts/self_check_agreement.py), plus its plot,
    over the study's runs (`--self-check`), or the report's own results without one."""
    study = report.get("self_check", {})
    runs = study.get("runs") or report["results"]
    singles = [name for name, lines in all_runs.items() if len(lines) == 1]
    report["self_check"] = {**study, **agreement.agreement(runs), "early_stopping": agreement.early_stopping(runs, singles)}
    agreement.scatter(runs, plot)


def write_report(report: dict, out: Path, table: bool) -> None:
    """The JSON report, and with `table` the tables of bench/QUALITY.md (copied into docs/quality.md)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".tmp")  # replaced in one step: an interrupted write leaves the old report whole
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(out)
    if table:
        (OUT / "QUALITY.md").write_text(markdown(report))


def rewrite_report(report: dict, out: Path) -> None:
    """An existing report after a partial re-measurement; docs/quality.md's tables follow the shipped one."""
    write_report(report, out, table=out == OUT / "quality.json")


def update_report(out: Path, change: Callable[[dict], None]) -> dict:
    """Read `out`, `change` it and rewrite it under a lock, so that processes measuring
    different runs into the same report (one per core) never lose each other's entries."""
    lock = Path(tempfile.gettempdir()) / f"fmn-report-{hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]}.lock"
    with open(lock, "w") as handle, contextlib.ExitStack() as unlock:
        fcntl.flock(handle, fcntl.LOCK_EX)
        unlock.callback(fcntl.flock, handle, fcntl.LOCK_UN)
        report = json.loads(out.read_text())
        change(report)
        rewrite_report(report, out)
        return report


def merge_results(out: Path, new: dict, all_runs: dict) -> None:
    """`--merge`: the new runs' results put into an existing report (same seeds and base)."""
    report = json.loads(out.read_text())
    if (report["seeds_identity"], report["seeds_scene"], report["base"]) != (new["seeds_identity"], new["seeds_scene"], new["base"]):
        raise SystemExit(f"{out} was measured on other seeds or another base model: run the whole benchmark instead")
    fresh = {(r["run"], r["recipe"]) for r in new["results"]}
    results = [r for r in report["results"] if (r["run"], r["recipe"]) not in fresh] + new["results"]
    order = list(all_runs)
    recipes = {**report["recipes"], **new["recipes"]}  # a recipe of an earlier merge keeps its place too
    recipe_order = list(RECIPES) + [n for n in recipes if n not in RECIPES] + list(FUSED)

    def place(recipe: str) -> int:
        """A recipe no longer in the code (a relabelled earlier default) goes last."""
        return recipe_order.index(recipe) if recipe in recipe_order else len(recipe_order)

    results.sort(key=lambda r: (order.index(r["run"]), place(r["recipe"])))
    report.update(results=results, recipes=recipes,
                  merged=sorted({*report.get("merged", []), new["measured"]}))
    add_self_check(report, all_runs)
    rewrite_report(report, out)
    print(f"merged {len(new['results'])} results into {out}")


def markdown(report: dict) -> str:
    rows = ["| run | recipe | erased before -> after | kept (after/before) | H | s/concept | patch bytes |",
            "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        rows.append(f"| {r['run']} | {r['recipe']} | {r['erased_before']:.2f} -> {r['erased_after']:.2f} | "
                    f"{r['kept']:.3f} | **{r['H']:.3f}** | {r['seconds_per_concept']:.1f} | {r['patch_bytes']:,} |")
    precise = [r for r in report["results"] if "precise" in r]
    if precise:
        first, last = precise[0]["precise"]["seeds"]
        rows += ["", f"| run | recipe | erased before -> after, {last - first + 1} seeds per prompt ({first}-{last}) | "
                 "kept (as above) | H |", "|---|---|---|---|---|"]
        rows += [f"| {r['run']} | {r['recipe']} | {r['precise']['erased_before']:.3f} -> {r['precise']['erased_after']:.3f} | "
                 f"{r['kept']:.3f} | **{r['precise']['H']:.3f}** |" for r in precise]
    inv = report.get("inversion")
    if inv:
        rows += ["", "| concept | recovery: generic word -> learned tokens | M-Score before | after forgetting it alone "
                 "(drop) | largest drop of a kept neighbour in that run | after the three-concept run |",
                 "|---|---|---|---|---|---|"]
        before, after = inv["m_score_before"], inv["m_score_after"]
        three = after.get("three concepts", {})
        for concept, rec in inv["recovery"].items():
            run = after.get(concept, {})
            kept = {c: before[c] - v for c, v in run.items() if c != concept}
            cells = [f"{run[concept]:.3f} ({before[concept] - run[concept]:+.3f})" if concept in run else "-",
                     f"{max(kept.values()):+.3f} ({max(kept, key=kept.get)})" if kept else "-",
                     f"{three[concept]:.3f}" if concept in three else "-"]
            rows.append(f"| {concept} | {rec['detection_initial']:.2f} -> {rec['detection_learned']:.2f} | "
                        f"{before[concept]:.3f} | " + " | ".join(cells) + " |")
    attack = report.get("recovery_attack")
    if attack:
        recipes = list(next(iter(attack.values())))
        original = (inv or {}).get("recovery", {})
        rows += ["", "| recovery attack: inversion through the patched model (detection of the recovered tokens' images) | "
                 "original model | " + " | ".join(recipes) + " |", "|---|---|" + "---|" * len(recipes)]
        rows += [f"| {concept} | " + (f"{original[concept]['detection_learned']:.2f}" if concept in original else "-") + " | "
                 + " | ".join(f"{by_recipe[r]:.2f}" for r in recipes) + " |" for concept, by_recipe in attack.items()]
    hardened = report.get("hardened")
    if hardened:
        rows += ["", "| hardened (Harden Forget Patch on the single-concept patch) | recipe | detection on its prompts | "
                 "kept (after/before) | s (forget + harden) |", "|---|---|---|---|---|"]
        rows += [f"| {concept} | {recipe} | {e['detection']:.2f} | {e['kept']:.3f} | {e['seconds']:.0f} |"
                 for concept, by_recipe in hardened.items() for recipe, e in by_recipe.items()]
    redirects = report.get("redirect")
    if redirects:
        rows += ["", "| redirect (the replacement's images) | recipe | replacement seen | concept still seen | others kept | s |",
                 "|---|---|---|---|---|---|"]
        rows += [f"| `{line.replace('|', chr(92) + '|')}` | {name} | {r['replacement_detected']:.2f} | "
                 f"{r['concept_detected']:.2f} | {r['kept']:.3f} | {r['seconds']:.0f} |"
                 for name, by_line in redirects.items() for line, r in by_line.items()]
    floor = report.get("anchor_floor")
    if floor:
        objects = list(next(iter(floor.values())))
        rows += ["", "| the original model's samples of the object anchor | " + " | ".join(objects) + " |",
                 "|---|" + "---|" * len(objects)]
        rows += [f"| \"{prompt}\" | " + " | ".join(f"{rates[o]:.2f}" for o in objects) + " |" for prompt, rates in floor.items()]
    return "\n".join(rows) + "\n"
