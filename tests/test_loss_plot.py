"""The training nodes' loss plot: the curve is where the losses say, whatever they are."""
import math

import pytest
import torch

from fmn_pack.fmn_core.loss_plot import HEIGHT, MARGIN_BOTTOM, MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, SMOOTH, WIDTH, loss_plot, smoothed


def trend_rows(plot: torch.Tensor, column: int) -> list[int]:
    """Rows where the smoothed (orange) line crosses a pixel column."""
    colour = torch.tensor(SMOOTH, dtype=torch.float32) / 255
    hits = (plot[0, :, column] - colour).abs().max(dim=-1).values < 1e-3
    return hits.nonzero().flatten().tolist()


def test_a_falling_loss_is_drawn_from_top_left_to_bottom_right():
    plot = loss_plot([2.0 * 0.97 ** i for i in range(150)], "Forget Train")
    assert plot.shape == (1, HEIGHT, WIDTH, 3) and plot.dtype == torch.float32
    start, end = trend_rows(plot, MARGIN_LEFT + 1), trend_rows(plot, WIDTH - MARGIN_RIGHT - 1)
    assert start and end
    assert min(start) < MARGIN_TOP + 0.1 * (HEIGHT - MARGIN_TOP - MARGIN_BOTTOM)
    assert max(end) > HEIGHT - MARGIN_BOTTOM - 0.2 * (HEIGHT - MARGIN_TOP - MARGIN_BOTTOM)


def test_smoothing_is_a_bias_corrected_moving_average():
    assert smoothed([3.0]) == [3.0]
    assert smoothed([1.0, 1.0, 1.0]) == pytest.approx([1.0, 1.0, 1.0])
    values = smoothed([0.0, 10.0] * 50)
    assert values[-1] == pytest.approx(5.0, abs=0.6) and max(values[10:]) < 10.0


@pytest.mark.parametrize("losses", [[], [0.5], [1.0] * 20, [math.nan, math.inf], [1.0, math.nan, 0.5]])
def test_degenerate_losses_still_give_an_image(losses):
    plot = loss_plot(losses, "Concept Inversion")
    assert plot.shape == (1, HEIGHT, WIDTH, 3) and torch.isfinite(plot).all() and plot.max() > plot.min()
