"""ipywidgets explorers: step through an episode, scrub through training steps.

Both degrade gracefully outside Jupyter (nbmake, scripts): the widget is built, and showing it
prints a plain-text summary instead.
"""
from __future__ import annotations

import html
from typing import Callable, Sequence


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        numeric = all(isinstance(v, (int, float)) for v in value.values())
        items = sorted(value.items(), key=lambda kv: -kv[1]) if numeric else value.items()
        return "<br>".join(f"{html.escape(str(k))}: {_cell(v)}" for k, v in items)
    if isinstance(value, (list, tuple)) and len(value) > 12:
        value = list(value[:12]) + ["…"]
    return html.escape(str(value)).replace("\n", "<br>")


def step_table(step: dict) -> str:
    """One step (a dict of named values) as an HTML table."""
    rows = "".join(f"<tr><th style='text-align:left;vertical-align:top;padding-right:1em'>{html.escape(str(k))}</th>"
                   f"<td style='text-align:left'>{_cell(v)}</td></tr>" for k, v in step.items())
    return f"<table>{rows}</table>"


def stepper(steps: Sequence[dict], title: str = "", render: Callable[[dict], str] = step_table):
    """A slider over ``steps`` (e.g. ``episode.steps()``, or dicts with observation, action
    probabilities, value); each position renders one step as HTML."""
    import ipywidgets as w

    steps = list(steps)
    if not steps:
        raise ValueError("stepper needs at least one step")
    slider = w.IntSlider(min=0, max=len(steps) - 1, value=0, description="step", continuous_update=True)
    body = w.HTML(render(steps[0]))
    slider.observe(lambda change: setattr(body, "value", render(steps[change["new"]])), names="value")
    header = w.HTML(f"<b>{html.escape(title)}</b> ({len(steps)} steps)") if title else w.HTML("")
    return w.VBox([header, slider, body])


def scrubber(n: int, draw: Callable[[int], object], description: str = "index", start: int = 0):
    """A slider over ``range(n)`` that calls ``draw(i)`` into an output area (figures or printed text).

    ``draw`` may return a matplotlib figure (shown and closed) or print.
    """
    import ipywidgets as w
    import matplotlib.pyplot as plt
    from IPython.display import display

    if n < 1:
        raise ValueError("scrubber needs n ≥ 1")
    slider = w.IntSlider(min=0, max=n - 1, value=min(start, n - 1), description=description)
    out = w.Output()

    def show(i: int) -> None:
        out.clear_output(wait=True)
        with out:
            fig = draw(i)
            if fig is not None and hasattr(fig, "savefig"):
                display(fig)
                plt.close(fig)

    slider.observe(lambda change: show(change["new"]), names="value")
    show(slider.value)
    return w.VBox([slider, out])
