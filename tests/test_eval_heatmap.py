"""The NIAH heatmap's title lies inside the figure (issue 18.8: it was cut off - a 230 px wide
figure under a 505 px title for a DeltaKV run), checked with matplotlib's renderer."""

from __future__ import annotations

import pytest

from benchmark.niah import heatmap_figure, heatmap_title

LONG = {"method": "deltakv", "knobs": {"deltakv_path": "runs/smoke/compressor", "num_top_tokens": 128},
        "backend": "engine", "query_mode": "aware", "label": "engine-deltakv-deltakv_path=runssmokecompressor-aware",
        "result": {"average": 83.33}}


@pytest.mark.parametrize("lengths", [["192"], ["256", "512", "1024", "2048"]])
def test_heatmap_title_inside_figure(lengths):
    import matplotlib.pyplot as plt

    grid = {d: {L: 50.0 for L in lengths} for d in ("0", "50", "100")}
    title = heatmap_title(LONG)
    assert "runs/smoke/compressor" in title and LONG["label"] in title
    fig = heatmap_figure(grid, title)
    try:
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        ax = fig.axes[0]
        box = ax.title.get_window_extent(r)
        W, H = fig.bbox.width, fig.bbox.height
        assert 0 <= box.x0 < box.x1 <= W and 0 <= box.y0 < box.y1 <= H, (box, W, H)
        assert box.y0 >= ax.get_window_extent(r).y1  # above the heatmap, not over it
        # nothing of the title was dropped: the wrapped lines are its characters
        assert "".join(ax.get_title().split()) == "".join(title.split())  # (long words may be broken)
    finally:
        plt.close(fig)
