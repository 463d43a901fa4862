"""A run's in-run report (`checks.py` measures it): what Forget Train shows on the node,
writes into the patch header and hands on through Merge and Harden."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

# Above this collateral (relative to the concept's own change) the node warns; read off
# ToyBench (bench/quality.json, 'self_check'), see docs/self_check.md.
COLLATERAL_WARNING = 0.5


TIMINGS = ("check_seconds", "train_seconds")  # measured, never written into a patch
WATCHED = ("watched", "collateral_watched")


@dataclass
class CheckReport:
    """A run's self-measurement: what the node shows, the patch header stores, and the
    benchmark compares with the oracle."""

    concepts: list[str]
    anchors: list[str]
    target: float
    budget: int
    steps: int = 0
    met: bool = False
    history: list[dict] = field(default_factory=list)      # {"step": s, "erasure": [per concept]}
    erasure: list[float] = field(default_factory=list)     # per concept, all levels
    erasure_by_level: list[list[float]] = field(default_factory=list)  # per concept, per CHECK_TIMESTEPS
    collateral: float = 0.0            # RMS change on ordinary prompts, noise units
    collateral_relative: float = 0.0  # ... over the concept prompts' own RMS change
    collateral_by_level: list[float] = field(default_factory=list)
    concept_share_before: list[float] = field(default_factory=list)
    concept_share_after: list[float] = field(default_factory=list)
    worst_word_change: float = 0.0     # largest relative change of a word's share in ordinary prompts
    worst_word: str = ""
    held_out_prompts: list[str] = field(default_factory=list)
    ordinary_prompts: list[str] = field(default_factory=list)
    timesteps: list[int] = field(default_factory=list)  # the noise levels, low to high
    check_seed: int = 0
    # With a watch list only (absent from the header without one): per watched concept and
    # over all of them, the RMS change of their prompts relative to the concept prompts' own.
    watched: dict[str, float] | None = None
    collateral_watched: float | None = None
    check_seconds: float = 0.0
    train_seconds: float = 0.0

    @property
    def least_erased(self) -> float:
        return min(self.erasure) if self.erasure else 0.0

    def to_json(self) -> str:
        """The header's copy: without the seconds, so the same seed writes the same file."""
        fields = {k: v for k, v in asdict(self).items() if k not in TIMINGS and not (k in WATCHED and v is None)}
        return json.dumps(fields, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "CheckReport":
        return cls(**json.loads(text))


def _anchor_phrase(anchor: str) -> str:
    return f"'{anchor}'" if anchor.strip() else "the prompt without it"


def verdict(report: CheckReport) -> str:
    """One line for the node and the model card: how far the concept went, what else moved,
    and whether the run stopped on its target."""
    if len(report.erasure) == 1:
        erased = f"erased {report.erasure[0]:.2f} of the way to {_anchor_phrase(report.anchors[0])}"
    else:
        least = report.concepts[report.erasure.index(min(report.erasure))]
        erased = f"erased {min(report.erasure):.2f}-{max(report.erasure):.2f} of the way to the anchors (least: {least})"
    moved = f"other prompts moved {report.collateral_relative:.0%} as far"
    if report.target <= 0:
        ending = f"ran all {report.steps} steps"
    elif report.met:
        ending = f"target {report.target:g} met at step {report.steps} of {report.budget}"
    else:
        ending = f"fell short of target {report.target:g} in {report.steps} steps"
    return f"{erased}; {moved}; {ending}"


def warnings(report: CheckReport) -> list[str]:
    """What the user should change, when the figures say so."""
    out = []
    if report.target > 0 and not report.met:
        out.append(f"the concept's erasure {report.least_erased:.2f} stayed below the target {report.target:g}: raise "
                   "steps or learning_rate, or give images of the concept")
    if report.collateral_relative > COLLATERAL_WARNING:
        out.append(f"other prompts moved {report.collateral_relative:.0%} as far as the concept's "
                   f"(most: '{report.worst_word}'): add what must stay to keep, or lower learning_rate or steps")
    moved = [name for name, v in (report.watched or {}).items() if v > COLLATERAL_WARNING]
    if moved:
        out.append(f"watched {', '.join(moved)} moved over {COLLATERAL_WARNING:.0%} as far as the concept's: add "
                   "them to keep, or lower learning_rate or steps")
    return out


def table(report: CheckReport) -> str:
    """The report as text, for a Show Text node and the console."""
    lines = [verdict(report), ""]
    levels = ", ".join(f"t={t}" for t in report.timesteps)
    for i, concept in enumerate(report.concepts):
        by_level = ", ".join(f"{v:.2f}" for v in report.erasure_by_level[i]) if report.erasure_by_level else ""
        lines.append(f"{concept}: erasure {report.erasure[i]:.3f} ({levels}: {by_level}); attention share "
                     f"{report.concept_share_before[i]:.3f} -> {report.concept_share_after[i]:.3f}")
    lines.append(f"collateral: RMS change {report.collateral:.4f} (per level {', '.join(f'{v:.4f}' for v in report.collateral_by_level)}),"
                 f" {report.collateral_relative:.1%} of the concept's; largest change of a word's attention "
                 f"{report.worst_word_change:.1%} ('{report.worst_word}')")
    if report.watched:
        lines.append(f"watched: {report.collateral_watched:.1%} of the concept's change over all ("
                     + ", ".join(f"{name} {v:.1%}" for name, v in report.watched.items()) + ")")
    lines.append("checks: " + "; ".join(f"step {h['step']}: " + ", ".join(f"{e:.2f}" for e in h["erasure"])
                                         for h in report.history))
    lines.append(f"held out: {len(report.held_out_prompts)} concept prompts, {len(report.ordinary_prompts)} other "
                 f"prompts, seed {report.check_seed}; checks took {report.check_seconds:.1f} s beside {report.train_seconds:.1f} s "
                 "of training")
    lines += [f"warning: {w}" for w in warnings(report)]
    return "\n".join(lines)


# A patch's header: its own run's report, or (a merge's, a hardening's) the reports of the
# forget runs it was made from, carried forward.
REPORT_KEY = "fmn.self_check"
CARRIED_KEY = "fmn.self_check_carried"


def reports_in(metadata: dict[str, str]) -> list[CheckReport]:
    """The in-run reports a patch header holds: its own, else those carried forward."""
    if REPORT_KEY in metadata:
        return [CheckReport.from_json(metadata[REPORT_KEY])]
    return [CheckReport(**r) for r in json.loads(metadata.get(CARRIED_KEY, "[]"))]


def carried(metadata_of_sources: list[dict[str, str]]) -> dict[str, str]:
    """Header fields that carry the sources' reports into a patch made from them."""
    reports = [r for m in metadata_of_sources for r in reports_in(m)]
    return {CARRIED_KEY: json.dumps([json.loads(r.to_json()) for r in reports], allow_nan=False)} if reports else {}


def patch_summary(metadata: dict[str, str]) -> dict:
    """What Load and Apply Forget Patch show on the node: each carried run's verdict."""
    reports = reports_in(metadata)
    if not reports:
        return {"verdict": "no in-run report in this patch (written before the pack measured its runs)", "warnings": []}
    made = "" if REPORT_KEY in metadata else f"made from {len(reports)} measured run(s): "
    return {"verdict": made + " | ".join(verdict(r) for r in reports),
            "warnings": [w for r in reports for w in warnings(r)]}
