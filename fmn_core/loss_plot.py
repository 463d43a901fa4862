"""The training nodes' loss curve as an IMAGE, so a user sees in the graph whether a run
converged (a Preview Image node shows it) instead of reading the console.

Drawn with PIL, which the host already ships: no plotting library to install.
"""
from __future__ import annotations

import math

import torch

WIDTH, HEIGHT = 512, 256
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 56, 16, 28, 30
BACKGROUND, AXES, RAW, SMOOTH, TEXT = (24, 24, 28), (110, 110, 120), (90, 120, 170), (255, 170, 60), (225, 225, 230)
SMOOTHING = 0.9  # exponential moving average, as training dashboards draw it


def smoothed(values: list[float], factor: float = SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average: noisy single-sample steps become a trend."""
    out, average = [], 0.0
    for i, value in enumerate(values):
        average = factor * average + (1 - factor) * value
        out.append(average / (1 - factor ** (i + 1)))
    return out


def _y_range(values: list[float]) -> tuple[float, float]:
    low, high = min(values), max(values)
    if math.isclose(low, high):
        return low - 0.5, high + 0.5
    pad = 0.05 * (high - low)
    return low - pad, high + pad


def _label(value: float) -> str:
    return f"{value:.3g}"


def loss_plot(losses: list[float], title: str) -> torch.Tensor:
    """An IMAGE tensor [1, HEIGHT, WIDTH, 3] in 0..1: the raw loss per step, its smoothed
    trend, axis labels, and the first and last smoothed values in the title."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (WIDTH, HEIGHT), BACKGROUND)
    draw = ImageDraw.Draw(image)
    finite = [v for v in losses if math.isfinite(v)]
    left, right, top, bottom = MARGIN_LEFT, WIDTH - MARGIN_RIGHT, MARGIN_TOP, HEIGHT - MARGIN_BOTTOM
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=AXES)
    if not finite:
        draw.text((left + 8, top + 8), f"{title}: no finite loss to plot", fill=TEXT)
        return _tensor(image)
    trend = smoothed(finite)
    low, high = _y_range(finite)

    def point(i: int, value: float) -> tuple[float, float]:
        x = left + (right - left) * (i / max(len(finite) - 1, 1))
        return x, bottom - (bottom - top) * (value - low) / (high - low)

    for series, colour in ((finite, RAW), (trend, SMOOTH)):
        points = [point(i, v) for i, v in enumerate(series)]
        draw.line(points if len(points) > 1 else points * 2, fill=colour, width=1 if series is finite else 2)
    draw.text((6, top - 4), _label(high), fill=TEXT)
    draw.text((6, bottom - 10), _label(low), fill=TEXT)
    draw.text((left, bottom + 8), "step 1", fill=TEXT)
    draw.text((right - 60, bottom + 8), f"step {len(finite)}", fill=TEXT)
    draw.text((left, 8), f"{title}: loss {_label(trend[0])} -> {_label(trend[-1])} (smoothed)", fill=TEXT)
    return _tensor(image)


def _tensor(image) -> torch.Tensor:
    data = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return data.reshape(1, image.height, image.width, 3).float() / 255
