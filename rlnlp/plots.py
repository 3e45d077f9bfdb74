"""Every figure in the workbook: labelled axes and units, a baseline or reference line where one
exists, a title that says what to notice. ``save(fig, name)`` writes into visualizations/
(smoke-profile figures go to visualizations/smoke/ and carry a label saying so).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np

from .runtime import profile as active_profile

BASELINE_STYLE = dict(color="0.35", linestyle="--", linewidth=1.2)
REFERENCE_STYLE = dict(color="tab:red", linestyle=":", linewidth=1.5)


def visualizations_dir() -> Path:
    return Path(os.environ.get("RLNLP_VIS", Path(__file__).resolve().parent.parent / "visualizations"))


def smooth(y: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average (window 1 = unchanged); NaNs are skipped."""
    y = np.asarray(y, dtype=float)
    if window <= 1 or len(y) == 0:
        return y
    out = np.empty_like(y)
    for i in range(len(y)):
        chunk = y[max(0, i - window + 1) : i + 1]
        chunk = chunk[~np.isnan(chunk)]
        out[i] = chunk.mean() if len(chunk) else np.nan
    return out


def _axes(ax, figsize=(6.4, 3.8)):
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=figsize, layout="constrained")
    return fig, ax


PREFIXES = ("charts/", "stats/", "losses/", "time/")


def human(column: str) -> str:
    """A legend label from a metrics column: ``stats/gate_fraction`` → ``gate fraction``."""
    for prefix in PREFIXES:
        if column.startswith(prefix):
            column = column[len(prefix):]
            break
    return column.replace("_", " ")


def _baseline_label(label: str, value: float) -> str:
    """``label (value)``, unless the label already ends with its value in parentheses ("optimal (0)")."""
    shown = f"({value:.3g})"
    return label if label.endswith(shown) else f"{label} {shown}"


def _baselines(ax, baselines: Mapping[str, float] | None, horizontal: bool = True):
    styles = ["--", ":", "-."]
    for i, (label, value) in enumerate((baselines or {}).items()):
        if value is None or not np.isfinite(value):
            continue
        style = dict(BASELINE_STYLE, linestyle=styles[i % len(styles)])
        (ax.axhline if horizontal else ax.axvline)(value, label=_baseline_label(label, value), **style)


def _breaks(ax, data, x: str, by: str) -> None:
    """A dotted vertical line wherever column ``by`` changes value (e.g. a new round of data), labelled once."""
    xs, groups = np.asarray(data[x], dtype=float), list(data[by])
    first = True
    for i in range(1, len(groups)):
        if groups[i] != groups[i - 1]:
            ax.axvline((xs[i - 1] + xs[i]) / 2, color="0.5", linestyle=":", linewidth=1.2,
                       label=f"new {human(by)}" if first else None)
            first = False


def curves(data, x: str, ys: Sequence[str] | str, *, labels: Sequence[str] | None = None,
           baselines: Mapping[str, float] | None = None, title: str = "", xlabel: str | None = None,
           ylabel: str = "", window: int = 1, ax=None, raw_alpha: float = 0.25, logy: bool = False,
           breaks: str | None = None, markers: bool | None = None):
    """Line plot of one or more columns of a DataFrame (or dict of arrays) against ``x``.

    With ``window`` > 1 the raw series is drawn faintly and its moving average on top.
    ``baselines`` draws labelled horizontal reference lines (e.g. {"random policy": 1/256}).
    Without ``labels`` the legend reads the column names made human (``stats/clip_fraction`` →
    ``clip fraction``). ``logy``: a log y axis (losses that fall by orders of magnitude).
    ``breaks``: a column whose changes are marked by a vertical line (e.g. ``"round"``).
    ``markers``: a marker on every point (default: when there are fewer than 30).
    """
    fig, ax = _axes(ax)
    ys = [ys] if isinstance(ys, str) else list(ys)
    labels = list(labels) if labels else [human(y) for y in ys]
    for y, label in zip(ys, labels):
        if y not in data:
            raise KeyError(f"no column {y!r} to plot (have: {sorted(data.keys())[:20]})")
        xs = np.asarray(data[x], dtype=float)
        vs = np.asarray(data[y], dtype=float)
        keep = ~np.isnan(vs)
        xs, vs = xs[keep], vs[keep]
        if window > 1:
            line, = ax.plot(xs, vs, alpha=raw_alpha, linewidth=0.8)
            ax.plot(xs, smooth(vs, window), color=line.get_color(), label=f"{label} (avg of {window})")
        else:
            # few points (an evaluation every few steps): big markers joined by thin dashed lines — only the
            # points are measured, the segments between them are not
            sparse = len(xs) < 8
            ax.plot(xs, vs, label=label, marker="o" if (markers if markers is not None else len(xs) < 30) else None,
                    markersize=6 if sparse else 3, linestyle="--" if sparse else "-", linewidth=1.0 if sparse else 1.5)
    _baselines(ax, baselines)
    if breaks is not None:
        _breaks(ax, data, x, breaks)
    if logy:
        ax.set_yscale("log")
    ax.set(title=title, xlabel=xlabel or human(x), ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


DIAGNOSTIC_TITLE = "Optimisation diagnostic, not progress"


def diagnostics(data, x: str, ys: Sequence[str] | str, *, labels: Sequence[str] | None = None, title: str = "",
                xlabel: str | None = None, ylabel: str = "loss"):
    """Losses (optimisation diagnostics) one panel each, under a title that says they do not measure progress.

    A policy-gradient surrogate's value is not the return: it can be negative, jump when the advantages change and
    rise while the policy improves. So each series gets its own panel and y scale, never an axis shared with a
    progress curve: a panel whose values cross 0 gets a zero line; one whose values are all positive and span a
    decade or more (a cross-entropy falling by orders of magnitude) a log scale; one with no value a note saying
    so. The figure's title starts with ``DIAGNOSTIC_TITLE``.
    """
    ys = [ys] if isinstance(ys, str) else list(ys)
    labels = list(labels) if labels else [human(y) for y in ys]
    fig, axes = plt.subplots(1, len(ys), figsize=(4.4 * len(ys), 3.4), layout="constrained", squeeze=False)
    for ax, y, label in zip(axes[0], ys, labels):
        curves(data, x, [y], labels=[label], title=label, xlabel=xlabel, ylabel=ylabel, ax=ax)
        values = np.asarray(data[y], dtype=float)
        values = values[np.isfinite(values)]
        if not len(values):
            ax.text(0.5, 0.5, "not logged in this run", transform=ax.transAxes, ha="center", va="center",
                    color="0.4")
            ax.set(xticks=[], yticks=[])  # no data, no scale to read
        elif values.min() < 0 < values.max():
            ax.axhline(0.0, color="0.5", linewidth=0.8)
        elif values.min() > 0 and values.max() / values.min() >= 10:
            ax.set_yscale("log")
        if ax.get_legend() is not None:
            ax.get_legend().remove()  # the panel's title names its one series
    fig.suptitle(f"{DIAGNOSTIC_TITLE}: {title}" if title else DIAGNOSTIC_TITLE, fontsize=10)
    return fig


def heatmap(matrix, *, title: str = "", xlabel: str = "", ylabel: str = "", xticklabels=None, yticklabels=None,
            cbar_label: str = "", annotate: bool | None = None, marks: Sequence[tuple[int, int]] | None = None,
            cmap: str = "viridis", vmin=None, vmax=None, ax=None, fmt: str = ".2g",
            cell_text: Sequence[Sequence[str]] | None = None):
    """A labelled heatmap; ``marks`` outlines cells (row, col), e.g. the key chosen at each step; ``cell_text``
    (rows × columns of strings) is written under each cell's value, e.g. the candidate a value belongs to."""
    m = np.asarray(matrix, dtype=float)
    wide, tall = (1.4, 0.6) if cell_text is not None else (0.5, 0.4)
    fig, ax = _axes(ax, figsize=(max(4.0, wide * m.shape[1] + 2), max(3.0, tall * m.shape[0] + 1.5)))
    im = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(cbar_label)
    if annotate is None:
        annotate = m.size <= 64
    if annotate:
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):
                extra = cell_text[i][j] if cell_text is not None and cell_text[i][j] else ""
                ax.text(j, i, format(v, fmt) + (f"\n{extra}" if extra else ""), ha="center", va="center",
                        fontsize=7 if not extra else 6, color="white" if im.norm(v) < 0.5 else "black")
    for (i, j) in marks or []:
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
    if xticklabels is None and m.shape[1] <= 20:  # integer ticks, not matplotlib's half-integers
        xticklabels = list(range(m.shape[1]))
    if yticklabels is None and m.shape[0] <= 20:
        yticklabels = list(range(m.shape[0]))
    if xticklabels is not None:
        ax.set_xticks(range(len(xticklabels)), xticklabels,
                      rotation=45 if max(map(len, map(str, xticklabels))) > 3 else 0, ha="right", fontsize=8)
    if yticklabels is not None:
        ax.set_yticks(range(len(yticklabels)), yticklabels, fontsize=8)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    return fig


def heatmaps(matrices: Sequence, titles: Sequence[str], *, suptitle: str = "", shared_scale: bool = True, **kw):
    """Several heatmaps side by side on one colour scale (e.g. one 4×4 grid per orientation)."""
    n = len(matrices)
    fig, axes = plt.subplots(1, n, figsize=(3.4 * n, 3.3), layout="constrained", squeeze=False)
    if shared_scale:
        allv = np.concatenate([np.asarray(m, float).ravel() for m in matrices])
        kw.setdefault("vmin", np.nanmin(allv))
        kw.setdefault("vmax", np.nanmax(allv))
    for ax, m, t in zip(axes[0], matrices, titles):
        heatmap(m, title=t, ax=ax, **kw)
    fig.suptitle(suptitle)
    return fig


def versus(reference, predicted, *, title: str = "", xlabel: str = "exact", ylabel: str = "predicted", ax=None,
           labels: Sequence[str] | None = None):
    """Scatter of predictions against exact values with the y = x line and Spearman ρ in the legend."""
    from .stats import spearman

    ref, pred = np.asarray(reference, float), np.asarray(predicted, float)
    fig, ax = _axes(ax, figsize=(4.6, 4.2))
    rho = spearman(ref, pred) if len(ref) > 2 else float("nan")
    ax.scatter(ref, pred, s=14, alpha=0.7, label=f"states (Spearman ρ = {rho:.3f})")
    lo, hi = np.nanmin([ref.min(), pred.min()]), np.nanmax([ref.max(), pred.max()])
    ax.plot([lo, hi], [lo, hi], label="y = x (perfect)", **REFERENCE_STYLE)
    for i, text in enumerate(labels or []):
        ax.annotate(text, (ref[i], pred[i]), fontsize=6)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def bars(labels: Sequence[str], values: Sequence[float], *, errors: Sequence[float] | None = None,
         baselines: Mapping[str, float] | None = None, title: str = "", ylabel: str = "", xlabel: str = "",
         ax=None, horizontal: bool = False, color=None):
    """Bar chart with optional error bars (e.g. 95% intervals) and labelled reference lines."""
    fig, ax = _axes(ax, figsize=(max(4.5, 0.45 * len(labels) + 2), 3.8) if not horizontal
                    else (6, max(3, 0.3 * len(labels) + 1)))
    pos = np.arange(len(labels))
    if horizontal:
        ax.barh(pos, values, xerr=errors, color=color, capsize=3)
        ax.set_yticks(pos, labels, fontsize=8)
        ax.invert_yaxis()
        _baselines(ax, baselines, horizontal=False)
        ax.set(title=title, xlabel=ylabel, ylabel=xlabel)
    else:
        ax.bar(pos, values, yerr=errors, color=color, capsize=3)
        ax.set_xticks(pos, labels, rotation=30 if max(map(len, map(str, labels))) > 6 else 0, ha="right", fontsize=8)
        _baselines(ax, baselines)
        ax.set(title=title, ylabel=ylabel, xlabel=xlabel)
    ax.grid(alpha=0.3, axis="x" if horizontal else "y")
    if baselines:
        ax.legend(fontsize=8)
    return fig


def differences(intervals: Mapping[str, object], *, title: str = "", xlabel: str = "difference",
                reference: str = "no difference", ax=None, higher_is_better: bool = True):
    """Paired differences as points with their 95% intervals, one row each, against a zero line.

    ``intervals`` maps a label ("trained − random order") to an ``rlnlp.stats.Interval``. An interval
    wholly on the good side of zero is green, wholly on the bad side red, straddling grey — the
    picture of the scoreboard's learns? column (unpaired bars of the two means would hide the pairing).
    """
    labels = list(intervals)
    fig, ax = _axes(ax, figsize=(6.4, max(2.2, 0.55 * len(labels) + 1.2)))
    pos = np.arange(len(labels))
    for i, label in enumerate(labels):
        iv = intervals[label]
        color = {"yes": "tab:green", "worse": "tab:red"}.get(iv.verdict(higher_is_better), "0.45")
        ax.errorbar([iv.estimate], [i], xerr=[[iv.estimate - iv.low], [iv.high - iv.estimate]], fmt="o", color=color,
                    capsize=4, markersize=6)
        ax.annotate(f"{iv.estimate:+.3g} [{iv.low:+.3g}, {iv.high:+.3g}]", (iv.estimate, i), xytext=(0, 7),
                    textcoords="offset points", ha="center", fontsize=7, color=color)
    ax.axvline(0.0, label=reference, **BASELINE_STYLE)
    ax.set_yticks(pos, labels, fontsize=8)
    ax.set_ylim(len(labels) - 0.4, -0.6)
    ax.set(title=title, xlabel=xlabel)
    ax.grid(alpha=0.3, axis="x")
    ax.legend(fontsize=8, loc="best")
    return fig


def token_weights(tokens: Sequence[str], weights: Sequence[float], *, title: str = "", highlight: Sequence[int] = (),
                  ax=None):
    """Weights over the tokens of one text (e.g. attention pooling): a bar per token, highlighted ones in red."""
    w = np.asarray(weights, float)
    colors = ["tab:red" if i in set(highlight) else "tab:blue" for i in range(len(tokens))]
    fig = bars(list(tokens), w, title=title, ylabel="weight", ax=ax, color=colors,
               baselines={"uniform": 1.0 / max(1, len(tokens))})
    labels = (ax or fig.axes[0]).get_xticklabels()
    for i in highlight:  # a highlighted token with near-zero weight would otherwise be invisible
        labels[i].set_color("tab:red")
    return fig


PROFILE_LABELS = {"smoke": "smoke profile (tiny CPU budget)", "cpu": "cpu learning profile (2-core CPU)"}


def profile_label(fig, label: str):
    """Write ``label`` below everything already drawn on ``fig`` (axis labels and tick labels included), at
    the right edge, so it can never cover them; ``savefig(bbox_inches="tight")`` grows the image to fit."""
    fig.canvas.draw()  # lay out first: constrained layout moves the axes and their labels
    box = fig.get_tightbbox(fig.canvas.get_renderer())  # inches
    width, height = fig.get_size_inches()
    return fig.text(box.x1 / width, (box.y0 - 0.04) / height, label, ha="right", va="top", fontsize=7, color="0.4")


def save(fig, name: str, prof: str | None = None) -> Path:
    """Write ``fig`` as PNG: visualizations/<name>.png for the full profile, visualizations/<profile>/<name>.png
    otherwise (``cpu`` figures are committed beside the cpu results; ``smoke`` ones are labelled and ignored).
    Returns the path."""
    prof = active_profile(prof)
    folder = visualizations_dir() / ("" if prof == "full" else prof)
    folder.mkdir(parents=True, exist_ok=True)
    label = PROFILE_LABELS.get(prof)
    if label:
        profile_label(fig, label)
    path = folder / f"{name}.png"
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
