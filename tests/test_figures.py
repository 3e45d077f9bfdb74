"""Figures that do not mislead: the profile label never covers an axis or tick label, legends read as
words, new rounds are marked, paired differences are drawn as differences."""
import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd

from rlnlp import plots
from rlnlp.stats import Interval


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _label_clear_of_axes(fig, text) -> None:
    renderer = fig.canvas.get_renderer()
    box = text.get_window_extent(renderer)
    for ax in fig.axes:
        pieces = [ax.xaxis.label, ax.yaxis.label, ax.title, *ax.get_xticklabels(), *ax.get_yticklabels()]
        for piece in pieces:
            if piece.get_text():
                assert not _overlaps(box, piece.get_window_extent(renderer)), (text.get_text(), piece.get_text())
        assert not _overlaps(box, ax.get_window_extent(renderer)), "label inside the plotting area"


def test_profile_label_never_covers_axis_or_tick_labels(tmp_path, monkeypatch):
    # fails with the old placement, fig.text(0.99, 0.005): it sat on the x label of a wide bar chart with
    # right-aligned rotated ticks (01's pooling plots, 03's order rewards)
    monkeypatch.setenv("RLNLP_VIS", str(tmp_path))
    figs = [
        plots.bars([f"{i}→{j}→{k}" for i, j, k in ((0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0))],
                   np.linspace(0.3, 1.0, 6), ylabel="episode reward",
                   xlabel="order (key positions; red = document order)", baselines={"random order": 0.69}),
        plots.bars([f"token {i}" for i in range(26)], np.linspace(0, 0.06, 26), ylabel="weight",
                   baselines={"uniform": 1 / 26}),
        plots.curves(pd.DataFrame({"step": range(5), "charts/return": range(5)}), "step", "charts/return",
                     xlabel="environment steps"),
        plots.heatmaps([np.eye(4), np.eye(4)], ["a", "b"], suptitle="two panels", xlabel="x", ylabel="y"),
    ]
    for i, fig in enumerate(figs):
        plots.save(fig, f"label-{i}", prof="cpu")
        text = next(t for t in fig.texts if "cpu learning profile" in t.get_text())
        fig.canvas.draw()
        _label_clear_of_axes(fig, text)


def test_legends_read_as_words_not_column_names():
    # fails if curves() falls back to the raw column name, or a baseline that already shows its value gets it twice
    df = pd.DataFrame({"step": [0, 1, 2], "stats/gate_fraction": [0.1, 0.5, 0.9]})
    fig = plots.curves(df, "step", ["stats/gate_fraction"], baselines={"optimal (0)": 0.0, "chance": 0.5})
    texts = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert texts == ["gate fraction", "optimal (0)", "chance (0.5)"], texts
    assert fig.axes[0].get_xlabel() == "step"


def test_breaks_mark_each_new_round_and_logy_is_log():
    # fails if _breaks draws nothing or draws a line per row (3 rounds -> exactly 2 changes)
    df = pd.DataFrame(
        {"step": range(9), "round": [0, 0, 0, 1, 1, 1, 2, 2, 2], "losses/critic": np.geomspace(1, 1e-3, 9)}
    )
    fig = plots.curves(df, "step", "losses/critic", breaks="round", logy=True)
    ax = fig.axes[0]
    vertical = [ln for ln in ax.get_lines() if len(set(ln.get_xdata())) == 1]
    assert sorted(float(ln.get_xdata()[0]) for ln in vertical) == [2.5, 5.5]
    assert ax.get_yscale() == "log"
    assert "new round" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_differences_draws_each_interval_coloured_by_its_verdict():
    # fails if the interval's ends are not the error bar's ends, or a straddling interval is coloured as a win
    ivs = {"trained − random": Interval(0.09, 0.07, 0.12, 100),
           "trained − document": Interval(-0.03, -0.05, -0.006, 100),
           "untrained − random": Interval(0.01, -0.02, 0.04, 100)}
    fig = plots.differences(ivs, xlabel="nats/token")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(ivs)
    colours = [c.lines[0].get_color() for c in ax.containers]
    assert colours == ["tab:green", "tab:red", "0.45"]
    for container, iv in zip(ax.containers, ivs.values()):
        segment = container.lines[2][0].get_segments()[0]
        assert np.allclose(sorted(segment[:, 0]), [iv.low, iv.high])


def test_a_few_points_are_drawn_as_points_not_as_a_curve():
    # fails if 3 evaluation points are joined by solid lines without markers (05's eval curves)
    df = pd.DataFrame({"step": [0, 4, 8], "accuracy": [0.2, 0.15, 0.85]})
    line = plots.curves(df, "step", "accuracy").axes[0].get_lines()[0]
    assert line.get_marker() == "o" and line.get_linestyle() == "--" and line.get_markersize() >= 6
    dense = plots.curves(pd.DataFrame({"step": range(50), "accuracy": np.linspace(0, 1, 50)}), "step", "accuracy")
    assert dense.axes[0].get_lines()[0].get_linestyle() == "-"


def test_losses_are_drawn_as_diagnostics_one_panel_each_with_the_scale_their_values_need():
    # fails if the losses share one axis, if a cross-entropy that falls by two decades is not log-scaled, if a
    # surrogate that crosses 0 gets no zero line (or a log axis it cannot have), or the title does not say
    # "not progress"
    df = pd.DataFrame({"step": range(1, 7), "losses/grpo": [-0.01, 0.18, -0.1, 0.02, 0.07, 0.02],
                       "losses/internalization": [np.nan, 2.0, 0.5, 0.1, 0.03, 0.02],
                       "losses/kl": [0.5, 0.6, 0.4, 0.5, 0.7, 0.6], "losses/never": [np.nan] * 6})
    fig = plots.diagnostics(df, "step", ["losses/grpo", "losses/internalization", "losses/kl", "losses/never"],
                            labels=["GRPO surrogate", "internalization CE", "KL", "never"], title="ERL's loss terms")
    grpo, ce, kl, never = fig.axes
    assert fig.get_suptitle().startswith(plots.DIAGNOSTIC_TITLE) and "ERL's loss terms" in fig.get_suptitle()
    assert "not progress" in plots.DIAGNOSTIC_TITLE
    assert [ax.get_title() for ax in fig.axes] == ["GRPO surrogate", "internalization CE", "KL", "never"]
    assert [ax.get_yscale() for ax in fig.axes] == ["linear", "log", "linear", "linear"]
    zero_lines = lambda ax: [ln for ln in ax.get_lines() if list(ln.get_ydata()) == [0.0, 0.0]]
    assert len(zero_lines(grpo)) == 1 and not zero_lines(kl) and not zero_lines(ce)
    assert len(grpo.get_lines()[0].get_xdata()) == 6 and len(ce.get_lines()[0].get_xdata()) == 5  # NaN skipped
    assert "not logged" in " ".join(t.get_text() for t in never.texts)


def test_heatmap_cell_text_names_what_each_value_belongs_to():
    """A value cell carries its text under the number (the candidate a Q belongs to); cells without text show the
    number alone. Mutation seen to fail: cell_text ignored."""
    fig = plots.heatmap([[0.95, 1.02], [0.4, -0.06]], fmt=".2f", cell_text=[["", "Canberra"], ["", "Sydney, not"]])
    texts = sorted(t.get_text() for t in fig.axes[0].texts)
    assert texts == ["-0.06\nSydney, not", "0.40", "0.95", "1.02\nCanberra"]
