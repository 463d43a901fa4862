"""`--self-check`: the self-check study, each run's in-run report set beside the oracle's
figures, written into the report as each run is measured."""
from __future__ import annotations

import json
from pathlib import Path

from .report import add_self_check, rewrite_report
from .runs import MULTI_CONCEPT_ONLY, confidences, one_run, score, self_check_entry


def self_check_study(toy, oracle_net, chosen: dict, recipes: dict, seeds, seed: int, out: Path, all_runs: dict) -> None:
    """`--self-check`: each recipe x run trained and measured (recipes in the order given),
    and put into `out` at once, so an interrupted study keeps what it measured; a run and
    recipe the study already holds with the oracle's probabilities is not trained again."""
    earlier = json.loads(out.read_text()).get("self_check", {})
    done = {(r["run"], r["recipe"]) for r in earlier.get("runs", []) if "kept_confidence" in r}
    if (earlier.get("seeds_identity"), earlier.get("seeds_scene")) == tuple(seeds) and "base_confidence" in earlier:
        base, base_confidence = earlier["base"], earlier["base_confidence"]  # same seeds: same base figures
    else:
        base, base_confidence = confidences(toy[0], toy, oracle_net, seeds)
    for recipe_name, recipe in recipes.items():
        for run_name, lines in chosen.items():
            if (recipe_name in MULTI_CONCEPT_ONLY and len(lines) == 1) or (run_name, recipe_name) in done:
                continue
            forgotten = [line.split("|")[0].strip() for line in lines]
            trained = one_run(toy, lines, recipe, seed)
            after, after_confidence = confidences(trained["patched"], toy, oracle_net, seeds, clip=trained["clip"])
            entry = {"run": run_name, "recipe": recipe_name, "settings": recipe,
                     "seconds_per_concept": round(trained["seconds"] / len(forgotten), 2),
                     **score(base, after, forgotten),
                     # score()'s kept read from the probabilities: without the decisions' steps of one sample
                     "kept_confidence": score(base_confidence, after_confidence, forgotten)["kept"],
                     "self_check": self_check_entry(trained["result"].report)}
            report = json.loads(out.read_text())
            study = report.setdefault("self_check", {})
            study.update(seeds_identity=seeds[0], seeds_scene=seeds[1], base={k: round(v, 4) for k, v in base.items()},
                         base_confidence={k: round(v, 4) for k, v in base_confidence.items()})
            study["runs"] = [r for r in study.get("runs", []) if (r["run"], r["recipe"]) != (run_name, recipe_name)] + [entry]
            add_self_check(report, all_runs)
            rewrite_report(report, out)
            print(f"{run_name:22s} {recipe_name:26s} oracle erased {entry['erased_before']:.2f}->{entry['erased_after']:.2f} "
                  f"kept {entry['kept']:.3f} ({entry['kept_confidence']:.4f}) H {entry['H']:.3f} | in-run erasure "
                  f"{entry['self_check']['erasure_mean']:.3f} collateral {entry['self_check']['collateral_relative']:.3f} "
                  f"steps {entry['self_check']['steps']} | spearman {report['self_check']['spearman_erasure']:.2f} / "
                  f"{report['self_check']['spearman_collateral_relative']:.2f} / "
                  f"{report['self_check']['spearman_collateral_relative_confidence']:.2f}", flush=True)
