"""Does a run's self-measurement agree with the ToyBench oracle?

Every trained run of `make bench-quality` records its in-run report (fmn_core/checks.py).
Across runs, the rank correlation (Spearman) of
- in-run erasure (the mean over the run's concepts) with the oracle's erased share,
  1 - erased_after / erased_before;
- in-run collateral (relative to the concept's own change, and absolute) with the oracle's
  loss on the other concepts, 1 - kept, and with the same loss read from the oracle's
  probabilities instead of its decisions, 1 - kept_confidence (uncapped): at a few seeds
  per prompt `kept` moves in steps of one sample, far coarser than a patch that changes
  other prompts' predictions by a fraction of a percent;
and a scatter plot of both (bench/self_check.png). Early stopping: single-concept H,
steps and seconds of the stopping recipe beside the same runs at the full budget.
"""
from __future__ import annotations

from pathlib import Path

import torch

STOPPING = "pack defaults"                  # the node's defaults: stop on the target
FULL_BUDGET = "pack defaults, full budget"  # the same with target 0: every step of the budget


def ranks(values: list[float]) -> torch.Tensor:
    """Ranks 1..n, ties sharing their mean rank."""
    x = torch.tensor(values, dtype=torch.float64)
    order = x.argsort()
    r = torch.empty_like(x)
    r[order] = torch.arange(1, len(x) + 1, dtype=torch.float64)
    for value in x.unique():
        tied = x == value
        r[tied] = r[tied].mean()
    return r


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation: Pearson's on the ranks."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float((ra.pow(2).sum() * rb.pow(2).sum()).sqrt())
    return float((ra * rb).sum()) / denominator if denominator else 0.0


def oracle_erased(entry: dict) -> float:
    """The oracle's share of the concepts' detection that the run removed."""
    before = entry["erased_before"]
    return 1 - entry["erased_after"] / before if before else 0.0


def measured_runs(results: list[dict]) -> list[dict]:
    return [r for r in results if "self_check" in r]


def agreement(results: list[dict]) -> dict:
    """The correlations over every run with an in-run report."""
    runs = measured_runs(results)
    erasure = [r["self_check"]["erasure_mean"] for r in runs]
    oracle = [oracle_erased(r) for r in runs]
    lost = [1 - min(1.0, r["kept"]) for r in runs]
    return {
        "runs_measured": len(runs),
        "spearman_erasure": round(spearman(erasure, oracle), 4),
        "spearman_collateral_relative": round(spearman([r["self_check"]["collateral_relative"] for r in runs], lost), 4),
        "spearman_collateral": round(spearman([r["self_check"]["collateral"] for r in runs], lost), 4),
        **confidence_agreement(runs),
        **watched_agreement(runs),
        **oracle_retest(runs),
        **more_seeds_agreement(runs),
        "targets": {"erasure": 0.8, "collateral": 0.7},
        "oracle_by_erasure": by_band(runs, lambda r: min(r["self_check"]["erasure"]), ERASURE_BANDS,
                                     lambda r: r["erased_after"]),
        "kept_by_collateral": by_band(runs, lambda r: r["self_check"]["collateral_relative"], COLLATERAL_BANDS,
                                      lambda r: r["kept"]),
    }


def confidence_agreement(runs: list[dict]) -> dict:
    """Collateral against the oracle's probabilities, over the runs that recorded them."""
    runs = [r for r in runs if "kept_confidence" in r]
    if not runs:
        return {}
    lost = [1 - r["kept_confidence"] for r in runs]
    return {"runs_with_confidence": len(runs),
            "spearman_collateral_relative_confidence":
                round(spearman([r["self_check"]["collateral_relative"] for r in runs], lost), 4),
            "spearman_collateral_confidence": round(spearman([r["self_check"]["collateral"] for r in runs], lost), 4)}


def watched_agreement(runs: list[dict]) -> dict:
    """Collateral on the watched concepts (the world's others: what the oracle's kept counts)
    against 1 - kept and 1 - kept_confidence, over the runs that watched them."""
    runs = [r for r in runs if "collateral_watched" in r["self_check"]]
    if not runs:
        return {}
    watched = [r["self_check"]["collateral_watched"] for r in runs]
    out = {"runs_watched": len(runs),
           "spearman_collateral_watched": round(spearman(watched, [1 - min(1.0, r["kept"]) for r in runs]), 4),
           "kept_by_collateral_watched": by_band(runs, lambda r: r["self_check"]["collateral_watched"], COLLATERAL_BANDS,
                                                 lambda r: r["kept"])}
    confident = [r for r in runs if "kept_confidence" in r]
    if confident:
        out["spearman_collateral_watched_confidence"] = round(spearman(
            [r["self_check"]["collateral_watched"] for r in confident], [1 - r["kept_confidence"] for r in confident]), 4)
    return out


def more_seeds_agreement(runs: list[dict]) -> dict:
    """The same agreement over the runs also scored on as many seeds again (`more_seeds`,
    `--more-oracle-seeds`), beside the study's own seeds over the same runs, and the
    oracle's retest between the two sets of seeds (each the study's full count)."""
    runs = [r for r in runs if "more_seeds" in r and "collateral_watched" in r["self_check"]]
    if len(runs) < 3:
        return {}
    watched = [r["self_check"]["collateral_watched"] for r in runs]
    generic = [r["self_check"]["collateral_relative"] for r in runs]
    erasure = [r["self_check"]["erasure_mean"] for r in runs]
    kept = [1 - min(1.0, r["more_seeds"]["kept"]) for r in runs]
    rho = spearman([r["kept"] for r in runs], [r["more_seeds"]["kept_new_seeds"] for r in runs])
    reliability, ceiling = retest_bounds(rho)
    return {"more_seeds": {
        "runs": len(runs),
        "spearman_erasure": round(spearman(erasure, [oracle_erased(r["more_seeds"]) for r in runs]), 4),
        "spearman_collateral_watched": round(spearman(watched, kept), 4),
        "spearman_collateral_watched_confidence": round(spearman(
            watched, [1 - r["more_seeds"]["kept_confidence"] for r in runs]), 4),
        "spearman_collateral_relative": round(spearman(generic, kept), 4),
        "study_seeds_same_runs": {
            "spearman_erasure": round(spearman(erasure, [oracle_erased(r) for r in runs]), 4),
            "spearman_collateral_watched": round(spearman(watched, [1 - min(1.0, r["kept"]) for r in runs]), 4)},
        "oracle_retest": {"spearman_seed_sets": round(rho, 4), "reliability_all": reliability, "ceiling": ceiling}}}


def oracle_retest(runs: list[dict]) -> dict:
    """How well the oracle's kept ranks runs against itself: the Spearman between its two
    halves of the seeds (`kept_halves`), across runs. Its full-seed reliability follows by
    Spearman-Brown, 2r / (1 + r); an in-run signal that ranked runs by their true kept could
    still agree with the full-seed kept only about as well as sqrt(that) (the attenuation
    bound), so this is the ceiling the collateral target is read against."""
    runs = [run for run in runs if "kept_halves" in run]
    if len(runs) < 3:
        return {}
    rho = spearman([run["kept_halves"][0] for run in runs], [run["kept_halves"][1] for run in runs])
    reliability, ceiling = retest_bounds(rho)
    return {"oracle_retest": {"runs": len(runs), "spearman_halves": round(rho, 4), "reliability_full": reliability,
                              "ceiling": ceiling}}


def retest_bounds(rho: float) -> tuple[float, float]:
    """From two equal scorings' agreement `rho`: the reliability of both together
    (Spearman-Brown, 2r / (1 + r)) and the most a signal can agree with them (its root)."""
    reliability = 2 * rho / (1 + rho) if rho > 0 else 0.0
    return round(reliability, 4), round(reliability ** 0.5, 4)


# Where the node's default target (1.0) and collateral warning (0.5) sit among the runs;
# the erasure band is the run's least erased concept's, as the target is checked.
ERASURE_BANDS = (0.0, 0.8, 1.0, 1.1)
COLLATERAL_BANDS = (0.0, 0.1, 0.5)


def by_band(runs: list[dict], signal, bands: tuple[float, ...], oracle) -> list[dict]:
    """The oracle's figure over the runs whose in-run `signal` falls in each band (mean, worst
    and count): what a threshold on the signal buys, read off the benchmark."""
    out = []
    for low, high in zip(bands, bands[1:] + (None,)):
        values = [oracle(r) for r in runs if low <= signal(r) and (high is None or signal(r) < high)]
        if values:
            out.append({"from": low, "below": high, "runs": len(values), "mean": round(sum(values) / len(values), 4),
                        "min": min(values), "max": max(values)})
    return out


def early_stopping(results: list[dict], singles: list[str]) -> dict:
    """Single-concept H with stopping on the target beside the full budget, same concepts."""
    by = {(r["run"], r["recipe"]): r for r in results}
    pairs = [(by[c, STOPPING], by[c, FULL_BUDGET]) for c in singles if (c, STOPPING) in by and (c, FULL_BUDGET) in by]
    if not pairs:
        return {}

    def summary(rows: list[dict]) -> dict:
        return {"H_mean": round(sum(r["H"] for r in rows) / len(rows), 4), "H_worst": min(r["H"] for r in rows),
                "steps_mean": round(sum(r["self_check"]["steps"] for r in rows) / len(rows), 1),
                "seconds_mean": round(sum(r["seconds_per_concept"] for r in rows) / len(rows), 2)}
    return {"concepts": len(pairs), STOPPING: summary([s for s, _ in pairs]), FULL_BUDGET: summary([f for _, f in pairs]),
            "rows": [{"concept": s["run"], "H": s["H"], "steps": s["self_check"]["steps"], "H_full_budget": f["H"],
                      "steps_full_budget": f["self_check"]["steps"]} for s, f in pairs]}


def scatter(results: list[dict], path: Path) -> None:
    """Panels: in-run erasure against the oracle's erased share, in-run relative collateral
    against the oracle's 1 - kept, and (over the runs that watched the world's other
    concepts) the watched collateral against 1 - kept; one dot per run, coloured by recipe."""
    from PIL import Image, ImageDraw

    runs = measured_runs(results)
    recipes = sorted({r["recipe"] for r in runs})
    palette = [(230, 120, 60), (90, 160, 230), (120, 200, 120), (220, 200, 80), (200, 110, 200), (160, 160, 160),
               (90, 220, 210), (240, 90, 120), (150, 120, 240)]
    panels = [("in-run erasure", "oracle: erased share", lambda r: r["self_check"]["erasure_mean"], oracle_erased),
              ("in-run collateral (relative)", "oracle: 1 - kept",
               lambda r: r["self_check"]["collateral_relative"], lambda r: 1 - min(1.0, r["kept"]))]
    if any("collateral_watched" in r["self_check"] for r in runs):
        panels.append(("in-run collateral, watched", "oracle: 1 - kept",
                       lambda r: r["self_check"].get("collateral_watched"), lambda r: 1 - min(1.0, r["kept"])))
    width, height, pad = 450 * len(panels), 470, 60
    image = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(image)
    side = (width - (len(panels) + 1) * pad) // len(panels)
    for p, (x_label, y_label, fx, fy) in enumerate(panels):
        left, top = pad + p * (side + pad), pad // 2
        shown = [r for r in runs if fx(r) is not None]
        xs, ys = [fx(r) for r in shown], [fy(r) for r in shown]
        x0, x1 = min(xs + [0.0]), max(xs + [1e-9])
        y0, y1 = min(ys + [0.0]), max(ys + [1e-9])
        size = height - pad - top - 30
        draw.rectangle([left, top, left + side, top + size], outline=(110, 110, 120))
        draw.text((left, top + size + 6), f"{x_label}: {x0:.2f} .. {x1:.2f}", fill=(225, 225, 230))
        draw.text((left, top + size + 20), f"{y_label}: {y0:.2f} .. {y1:.2f} (up)", fill=(225, 225, 230))
        for r, x, y in zip(shown, xs, ys):
            cx = left + (x - x0) / (x1 - x0) * side
            cy = top + size - (y - y0) / (y1 - y0) * size
            colour = palette[recipes.index(r["recipe"]) % len(palette)]
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
    legend_y = height - 40
    for i, recipe in enumerate(recipes):
        x, y = pad + (i % 4) * 200, legend_y + (i // 4) * 14
        draw.ellipse([x, y + 3, x + 6, y + 9], fill=palette[i % len(palette)])
        draw.text((x + 10, y), recipe, fill=(225, 225, 230))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
