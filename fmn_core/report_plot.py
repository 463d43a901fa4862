"""Forget Train's report as an IMAGE: the in-run erasure over the run's checks, the target,
and the final table, readable at a glance in a Preview Image node."""
from __future__ import annotations

import textwrap

import torch

from .check_report import CheckReport, table
from .loss_plot import AXES, BACKGROUND, TEXT, _tensor

WIDTH, PLOT_HEIGHT, LINE_HEIGHT, WRAP = 640, 220, 14, 100
LEGEND = 3  # concepts named above the plot; the rest are counted
LEFT, RIGHT, TOP = 48, 16, 28
SERIES = ((255, 170, 60), (90, 160, 230), (120, 200, 120), (220, 110, 200), (230, 90, 90), (90, 220, 210))
TARGET, WARNING = (160, 160, 170), (255, 120, 90)


def report_image(report: CheckReport) -> torch.Tensor:
    """[1, H, WIDTH, 3] in 0..1: erasure per concept at each check (0 = unchanged, 1 = the
    anchor's prediction), the target as a grey line, then the report's text."""
    from PIL import Image, ImageDraw

    lines = [wrapped for line in table(report).splitlines() for wrapped in (textwrap.wrap(line, WRAP) or [""])]
    height = TOP + PLOT_HEIGHT + 24 + LINE_HEIGHT * len(lines) + 8
    image = Image.new("RGB", (WIDTH, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = LEFT, WIDTH - RIGHT, TOP, TOP + PLOT_HEIGHT
    values = [e for h in report.history for e in h["erasure"]] + [report.target, 1.0]
    high, low = max(values) * 1.05, min(0.0, min(values))

    def point(step: int, value: float) -> tuple[float, float]:
        x = left + (right - left) * step / max(report.budget, 1)
        return x, bottom - (bottom - top) * (value - low) / (high - low)

    draw.line([(left, top), (left, bottom), (right, bottom)], fill=AXES)
    if report.target > 0:
        draw.line([point(0, report.target), point(report.budget, report.target)], fill=TARGET)
        draw.text((right - 90, point(0, report.target)[1] - 12), f"target {report.target:g}", fill=TARGET)
    for c, name in enumerate(report.concepts):
        colour = SERIES[c % len(SERIES)]
        points = [point(0, 0.0)] + [point(h["step"], h["erasure"][c]) for h in report.history]
        draw.line(points, fill=colour, width=2)
        for x, y in points[1:]:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        if c < LEGEND:
            draw.text((left + 6 + 140 * c, top - 18), name[:20], fill=colour)
    if len(report.concepts) > LEGEND:
        draw.text((left + 6 + 140 * LEGEND, top - 18), f"+{len(report.concepts) - LEGEND} more", fill=TEXT)
    draw.text((4, top - 4), f"{high:.2f}", fill=TEXT)
    draw.text((4, bottom - 10), f"{low:.2f}", fill=TEXT)
    draw.text((left, bottom + 4), "step 0", fill=TEXT)
    draw.text((right - 70, bottom + 4), f"step {report.budget}", fill=TEXT)
    for i, line in enumerate(lines):
        colour = WARNING if line.startswith("warning") else TEXT
        draw.text((8, bottom + 24 + i * LINE_HEIGHT), line, fill=colour)
    return _tensor(image)
