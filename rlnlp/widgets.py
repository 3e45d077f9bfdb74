"""ipywidgets explorers: step through an episode, scrub through training steps, browse ERL's reflect-and-retry
episodes (``erl_browser``).

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


def stepper(steps: Sequence[dict], title: str = "", render: Callable[[dict], str] = step_table,
            description: str = "step"):
    """A slider over ``steps`` (e.g. ``episode.steps()``, or dicts with observation, action
    probabilities, value); each position renders one step as HTML. ``description`` names what the
    slider moves over ("step", "episode")."""
    import ipywidgets as w

    steps = list(steps)
    if not steps:
        raise ValueError(f"stepper needs at least one {description}")
    slider = w.IntSlider(min=0, max=len(steps) - 1, value=0, description=description, continuous_update=True)
    body = w.HTML(render(steps[0]))
    slider.observe(lambda change: setattr(body, "value", render(steps[change["new"]])), names="value")
    count = f"{len(steps)} {description}{'' if len(steps) == 1 else 's'}"
    header = w.HTML(f"<b>{html.escape(title)}</b> ({count})") if title else w.HTML("")
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


def _yes_no(flag: bool, yes: str, no: str) -> str:
    return f"yes — {yes}" if flag else f"no — {no}"


def erl_steps(examples: Sequence[dict]) -> list[dict]:
    """ERL episodes as ``stepper`` steps, each in the order ERL runs them: first attempt → feedback →
    reflection → retry, then the rewards and what was kept.

    ``examples``: ``ERLTrainer.examples`` (one dict per gated first attempt: step, prompt, y1, r1, feedback,
    reflection, y2, r2, feedback2, stored, internalized)."""
    steps = []
    for e in examples:
        gain = e["r2"] - e["r1"]
        steps.append({
            "training step": e["step"],
            "task x": e["prompt"],
            "1 · first attempt y1": e["y1"],
            "reward r1": f"{e['r1']:.3g} (below τ: sent to reflection)",
            "2 · feedback f1": e["feedback"] or "(no feedback function)",
            "3 · reflection Δ": e["reflection"] or "(none: the retry read y1 and f1 directly)",
            "4 · retry y2": e["y2"],
            "reward r2": f"{e['r2']:.3g} ({'+' if gain > 0 else ''}{gain:.3g} vs r1: "
                         f"{'improved' if gain > 0 else 'not improved'})",
            "feedback on y2": e.get("feedback2", "") or "—",
            "Δ went into memory": _yes_no(e["stored"], "later reflections read it", "not stored"),
            "y2 internalized": _yes_no(e["internalized"], "distilled under x alone, without Δ", "not distilled"),
        })
    return steps


def erl_browser(examples: Sequence[dict], title: str = "ERL episodes"):
    """A slider over ERL's reflect-and-retry episodes (``ERLTrainer.examples``): each shows the first attempt,
    its feedback, the reflection, the retry, both rewards, and whether the reflection went into memory and the
    retry was internalized. The header counts how many retries improved and how many reflections were stored."""
    examples = list(examples)
    if not examples:
        raise ValueError("erl_browser needs at least one episode (no first attempt was gated)")
    improved = sum(e["r2"] > e["r1"] for e in examples)
    stored = sum(bool(e["stored"]) for e in examples)
    summary = f"{title}: the retry improved in {improved} of {len(examples)}; reflections stored in memory: {stored}"
    return stepper(erl_steps(examples), title=summary, description="episode")
