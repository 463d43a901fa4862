"""`--self-check`: the self-check study, each run's in-run report set beside the oracle's
figures, written into the report as each run is measured."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from .report import add_self_check, rewrite_report, update_report
from .runs import (MULTI_CONCEPT_ONLY, OUT, SEEDS_IDENTITY_MORE, SEEDS_SCENE_MORE, confidences, one_run, score,
                   self_check_entry)


def self_check_study(toy, oracle_net, chosen: dict, recipes: dict, seeds, seed: int, out: Path, all_runs: dict) -> None:
    """`--self-check`: each recipe x run trained and measured (recipes in the order given),
    and put into `out` at once, so an interrupted study keeps what it measured; a run and
    recipe the study already holds with the oracle's probabilities is not trained again.

    At the full seeds the oracle scores each model on the two halves of them apart (the
    first half is --quick's seeds) and the full figures are their mean: `kept_halves` then
    shows how far the oracle's own kept moves between two draws of samples, which bounds
    how well any in-run signal can rank runs by it (self_check_agreement.oracle_retest)."""
    earlier = json.loads(out.read_text()).get("self_check", {})
    done = {(r["run"], r["recipe"]) for r in earlier.get("runs", []) if "kept_confidence" in r}
    parts = seed_halves(seeds)
    if (earlier.get("seeds_identity"), earlier.get("seeds_scene")) == tuple(seeds) and "base_halves" in earlier:
        base_parts = earlier["base_halves"]  # same seeds: same base figures
    else:
        base_parts = [confidences(toy[0], toy, oracle_net, part) for part in parts]
    base, base_confidence = mean_scores(base_parts)
    plot = plot_of(out)
    for recipe_name, recipe in recipes.items():
        for run_name, lines in chosen.items():
            if (recipe_name in MULTI_CONCEPT_ONLY and len(lines) == 1) or (run_name, recipe_name) in done:
                continue
            forgotten = [line.split("|")[0].strip() for line in lines]
            trained = one_run(toy, lines, recipe, seed, watch_rest=True)
            after_parts = [confidences(trained["patched"], toy, oracle_net, part, clip=trained["clip"]) for part in parts]
            after, after_confidence = mean_scores(after_parts)
            entry = {"run": run_name, "recipe": recipe_name, "settings": recipe,
                     "seconds_per_concept": round(trained["seconds"] / len(forgotten), 2),
                     **score(base, after, forgotten),
                     # score()'s kept read from the probabilities: without the decisions' steps of one sample
                     "kept_confidence": score(base_confidence, after_confidence, forgotten)["kept"],
                     "self_check": self_check_entry(trained["result"].report)}
            if len(parts) == 2:
                entry["kept_halves"] = [score(b[0], a[0], forgotten)["kept"] for b, a in zip(base_parts, after_parts)]
            report = json.loads(out.read_text())
            study = report.setdefault("self_check", {})
            study.update(seeds_identity=seeds[0], seeds_scene=seeds[1], base={k: round(v, 4) for k, v in base.items()},
                         base_confidence={k: round(v, 4) for k, v in base_confidence.items()},
                         base_halves=[[{k: round(v, 6) for k, v in d.items()} for d in part] for part in base_parts])
            study["runs"] = [r for r in study.get("runs", []) if (r["run"], r["recipe"]) != (run_name, recipe_name)] + [entry]
            add_self_check(report, all_runs, plot)
            rewrite_report(report, out)
            print(f"{run_name:22s} {recipe_name:26s} oracle erased {entry['erased_before']:.2f}->{entry['erased_after']:.2f} "
                  f"kept {entry['kept']:.3f} ({entry['kept_confidence']:.4f}) {entry.get('kept_halves', '')} H {entry['H']:.3f}"
                  f" | in-run erasure {entry['self_check']['erasure_mean']:.3f} collateral "
                  f"{entry['self_check']['collateral_relative']:.3f} steps {entry['self_check']['steps']} | spearman "
                  f"{report['self_check']['spearman_erasure']:.2f} / {report['self_check']['spearman_collateral_relative']:.2f}"
                  f" / {report['self_check']['spearman_collateral_relative_confidence']:.2f}", flush=True)


def plot_of(out: Path) -> Path:
    """The study's scatter plot beside its report (the shipped report's is bench/self_check.png)."""
    return OUT / "self_check.png" if out == OUT / "quality.json" else out.with_suffix(".png")


# How far a retrained run's in-run figures may differ from the stored ones (float rounding of
# the batched checks) and still be the same patch: the stop step must match exactly.
SAME_RUN_TOLERANCE = 2e-4


def remeasure_watched(toy, out: Path, all_runs: dict, seed: int, chosen: set[str]) -> None:
    """`--self-check --remeasure-watched`: each run of `chosen` (--runs) the study holds
    without watched figures trained again with the world's other concepts as its watch
    list. A watch list changes nothing in the patch, so the oracle's figures stand; the
    retrained run must reproduce the stored in-run figures (steps, every check's erasure,
    collateral) to prove it, and a run that does not is left as it was and named."""
    for entry in json.loads(out.read_text())["self_check"]["runs"]:
        if "collateral_watched" in entry["self_check"] or entry["run"] not in chosen:
            continue
        trained = retrained(toy, entry, all_runs, seed)
        if trained is None:
            continue
        fresh = self_check_entry(trained["result"].report)

        def put(report: dict, stored: dict, fresh=fresh) -> None:
            stored["self_check"].update(collateral_watched=fresh["collateral_watched"], watched=fresh["watched"])
        report = update_entry(out, entry, all_runs, put)
        print(f"{entry['run']:22s} {entry['recipe']:26s} kept {entry['kept']:.4f} collateral "
              f"{entry['self_check']['collateral_relative']:.4f} watched {fresh['collateral_watched']:.4f} | spearman "
              f"watched {report['self_check'].get('spearman_collateral_watched', float('nan')):.2f}", flush=True)


def more_oracle_seeds(toy, oracle_net, out: Path, all_runs: dict, seed: int, chosen: set[str]) -> None:
    """`--self-check --more-oracle-seeds`: each run of `chosen` (--runs) the study holds
    trained again (it must reproduce its stored in-run figures, as in remeasure_watched) and
    scored by the oracle on as many seeds again (SEEDS_*_MORE, in two halves), so kept and
    erased are read from twice the samples: the study's halves agree on kept with a Spearman
    of about 0.7, which caps how well any in-run signal can rank runs by it. Each run's
    `more_seeds` holds the figures over all the seeds, the new seeds' own and every half's
    kept; processes given different --runs may write into the same --out at once."""
    parts = seed_halves((list(SEEDS_IDENTITY_MORE), list(SEEDS_SCENE_MORE)))
    base_parts = [confidences(toy[0], toy, oracle_net, part) for part in parts]
    study = json.loads(out.read_text())["self_check"]
    for entry in study["runs"]:
        if "more_seeds" in entry or entry["run"] not in chosen:
            continue
        trained = retrained(toy, entry, all_runs, seed)
        if trained is None:
            continue
        after_parts = [confidences(trained["patched"], toy, oracle_net, part, clip=trained["clip"]) for part in parts]
        forgotten = [line.split("|")[0].strip() for line in all_runs[entry["run"]]]
        more = combined_scores(entry, study["base_halves"], base_parts, after_parts, forgotten)

        def put(report: dict, stored: dict, more=more) -> None:
            stored["more_seeds"] = more
            report["self_check"]["more_seeds_base_halves"] = [[{k: round(v, 6) for k, v in d.items()} for d in part]
                                                              for part in base_parts]
        report = update_entry(out, entry, all_runs, put)
        print(f"{entry['run']:22s} {entry['recipe']:26s} kept {entry['kept']:.4f} -> {more['kept']:.4f} (new seeds "
              f"{more['kept_new_seeds']:.4f}) erased after {entry['erased_after']:.4f} -> {more['erased_after']:.4f} | "
              f"spearman watched {report['self_check'].get('more_seeds', {}).get('spearman_collateral_watched', float('nan')):.2f}",
              flush=True)


def retrained(toy, entry: dict, all_runs: dict, seed: int) -> dict | None:
    """A study run trained again with the world's other concepts watched, or None (and
    named) when its in-run figures do not reproduce the stored ones: not the same patch."""
    trained = one_run(toy, all_runs[entry["run"]], entry["settings"], seed, watch_rest=True)
    fresh = self_check_entry(trained["result"].report)
    if same_run(entry["self_check"], fresh):
        return trained
    print(f"{entry['run']:22s} {entry['recipe']:26s} NOT the stored run: steps {entry['self_check']['steps']} vs "
          f"{fresh['steps']}, collateral {entry['self_check']['collateral']} vs {fresh['collateral']}; left as it was",
          flush=True)
    return None


def update_entry(out: Path, entry: dict, all_runs: dict, change: Callable[[dict, dict], None]) -> dict:
    """`change(report, stored)` on the study's stored run `entry` (found again by run and
    recipe in `out` as it is now), under the report's lock, with the agreement recomputed."""
    def put(report: dict) -> None:
        stored = next(r for r in report["self_check"]["runs"] if (r["run"], r["recipe"]) == (entry["run"], entry["recipe"]))
        change(report, stored)
        add_self_check(report, all_runs, plot_of(out))
    return update_report(out, put)


def combined_scores(entry: dict, old_base: list, new_base: list, new_after: list, forgotten: list[str]) -> dict:
    """Kept (from decisions and from probabilities) and erased over the study's seed halves
    and the new ones together, every half weighing the same (each draws as many samples per
    concept). The old halves' sums come back from the stored figures: score() keeps
    kept_before/after and erased_after, and kept_confidence times the base's probabilities."""
    kept_names = [c for c in old_base[0][0] if c not in forgotten]

    def mean(d: dict, names: list[str]) -> float:
        return sum(d[c] for c in names) / len(names)
    n_old = len(old_base)
    old_prob_before = sum(mean(part[1], kept_names) for part in old_base) / n_old
    new_kept_after = sum(mean(a[0], kept_names) for a in new_after)
    new_kept_before = sum(mean(b[0], kept_names) for b in new_base)
    sums = {  # (after, before) summed over every half, old halves as n_old times their mean
        "kept": (n_old * entry["kept_after"] + new_kept_after, n_old * entry["kept_before"] + new_kept_before),
        "kept_confidence": (n_old * entry["kept_confidence"] * old_prob_before + sum(mean(a[1], kept_names) for a in new_after),
                            n_old * old_prob_before + sum(mean(b[1], kept_names) for b in new_base)),
        "erased": (n_old * entry["erased_after"] + sum(mean(a[0], forgotten) for a in new_after),
                   n_old * entry["erased_before"] + sum(mean(b[0], forgotten) for b in new_base)),
    }
    n_all = n_old + len(new_base)
    new_kept = [score(b[0], a[0], forgotten)["kept"] for b, a in zip(new_base, new_after)]
    return {"seeds_identity": [SEEDS_IDENTITY_MORE[0], SEEDS_IDENTITY_MORE[-1]],
            "seeds_scene": [SEEDS_SCENE_MORE[0], SEEDS_SCENE_MORE[-1]],
            "kept": round(sums["kept"][0] / sums["kept"][1], 4),
            "kept_confidence": round(sums["kept_confidence"][0] / sums["kept_confidence"][1], 4),
            "erased_before": round(sums["erased"][1] / n_all, 4), "erased_after": round(sums["erased"][0] / n_all, 4),
            "kept_new_seeds": round(new_kept_after / new_kept_before, 4),
            "kept_halves": [*entry.get("kept_halves", []), *new_kept]}


def same_run(stored: dict, fresh: dict) -> bool:
    """Whether two in-run reports come from the same patch (see SAME_RUN_TOLERANCE)."""
    checks = [(a["step"], b["step"], x, y) for a, b in zip(stored["history"], fresh["history"])
              for x, y in zip(a["erasure"], b["erasure"])]
    return (stored["steps"] == fresh["steps"] and len(stored["history"]) == len(fresh["history"])
            and all(sa == sb and abs(x - y) <= SAME_RUN_TOLERANCE for sa, sb, x, y in checks)
            and abs(stored["collateral"] - fresh["collateral"]) <= SAME_RUN_TOLERANCE)


def seed_halves(seeds: tuple[list[int], list[int]]) -> list[tuple[list[int], list[int]]]:
    """The seeds as two disjoint halves of equal size (the first is --quick's), or whole
    where they do not halve (the quick seeds' 3 scene seeds)."""
    identity, scene = seeds
    if len(identity) % 2 or len(scene) % 2:
        return [(list(identity), list(scene))]
    hi, hs = len(identity) // 2, len(scene) // 2
    return [(list(identity[:hi]), list(scene[:hs])), (list(identity[hi:]), list(scene[hs:]))]


def mean_scores(parts: list) -> tuple[dict, dict]:
    """Detection and probability per concept over equal-sized seed parts: their mean is the
    figure over all of the seeds (each part draws the same number of samples per concept)."""
    return tuple({c: sum(p[i][c] for p in parts) / len(parts) for c in parts[0][i]} for i in range(2))
