"""The widget factories the notebooks use build real ipywidgets views and react to a slider change (no
browser: the widget models are driven from Python, as the front end would drive them)."""
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest

from rlnlp import widgets

ROOT = Path(__file__).resolve().parent.parent


def _html_children(view):
    return [c for c in view.children if type(c).__name__ == "HTML"]


def test_every_factory_the_notebooks_call_is_tested_here():
    # fails when a notebook starts using a widget factory that no test below builds
    used = set()
    for path in (ROOT / "notebooks").glob("*.ipynb"):
        used |= set(re.findall(r"widgets\.(\w+)\(", path.read_text()))
    assert used <= {"stepper", "scrubber"}, used - {"stepper", "scrubber"}


def test_stepper_renders_each_step_when_the_slider_moves():
    # fails if the slider's observer is not attached (the body would keep showing step 0) or renders the wrong step
    steps = [{"observation": f"state {i}", "action": ["left", "right"][i % 2], "value": 0.5 * i,
              "probs": {"left": 0.3, "right": 0.7}} for i in range(3)]
    view = widgets.stepper(steps, title="an <episode>")
    header, body = _html_children(view)
    slider = next(c for c in view.children if type(c).__name__ == "IntSlider")
    assert (slider.min, slider.max, slider.value) == (0, 2, 0)
    assert "an &lt;episode&gt;" in header.value and "(3 steps)" in header.value
    assert "state 0" in body.value and "right: 0.7<br>left: 0.3" in body.value  # probabilities sorted, highest first
    slider.value = 2
    assert "state 2" in body.value and "state 0" not in body.value and ">1<" in body.value  # value 1.0 → "1"
    state = view.get_state()  # the model the front end receives: a VBox of three child views
    assert len(state["children"]) == 3
    with pytest.raises(ValueError, match="at least one step"):
        widgets.stepper([])


def test_scrubber_redraws_on_each_slider_change():
    # fails if show() is not called on a change (calls would stay [1]) or is called with the old index
    calls = []

    def draw(i):
        calls.append(i)
        fig, ax = plt.subplots()
        ax.plot([0, i])
        return fig

    view = widgets.scrubber(4, draw, description="step", start=1)
    slider, out = view.children
    assert calls == [1] and (slider.max, slider.value, slider.description) == (3, 1, "step")
    slider.value = 3
    slider.value = 0
    assert calls == [1, 3, 0]
    assert type(out).__name__ == "Output"
    with pytest.raises(ValueError, match="n ≥ 1"):
        widgets.scrubber(0, draw)
