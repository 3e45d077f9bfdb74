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
    tested = {"stepper", "scrubber", "erl_browser"}
    assert used <= tested, used - tested


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


def _erl_examples():
    """``ERLTrainer.examples`` as the trainer itself writes them: its memory phase (``_remember``) run on one step's
    record of four first attempts, three of them gated (r1 < τ = 1): the first retry succeeds (its reflection is
    stored and the retry internalized), the second gets worse (neither), the third improves without reaching τ
    (stored, not internalized)."""
    from types import SimpleNamespace

    import torch

    from rlnlp.erl import ERLStep, ERLTrainer, ReflectionMemory

    tasks = ['Reply with a JSON object whose key "tree" has the value "spruce".',
             'Reply with a JSON object whose key "animal" has the value "goat".',
             'Reply with a JSON object whose key "city" has the value "Oslo".']
    step = ERLStep(inputs=[{}] * 4, prompts=[tasks[0], "done", tasks[1], tasks[2]], y1_ids=[[1]] * 4, y1={},
                   completions=['{"key": "tree", "value": "spruce"}', '{"x": 1}', '{"animal": {"name": "goat"',
                                "Oslo"],
                   r1=torch.tensor([0.0, 1.0, 0.5, 0.0]),
                   feedback=["the key must be tree, not key", "", "the answer was cut off before the object closed",
                             "not a JSON object"])
    step.gated, step.tasks = [0, 2, 3], tasks
    step.reflections = SimpleNamespace(texts=["Use the word itself as the key.", "Keep it short and close it.",
                                              "Answer with braces."])
    step.retries = SimpleNamespace(texts=['{"tree": "spruce"}', '{"goat": "animal"}', '{"Oslo": "city"}'])
    step.r2 = torch.tensor([1.0, 0.0, 0.5])
    step.feedback2 = ["", "the key must be animal, not goat", "the key must be city, not Oslo"]
    args = SimpleNamespace(enable_memory=True, memory_add_threshold=None, enable_internalization=True,
                           internalization_coef=1.0, internalization_rule="success", reward_threshold=1.0)
    trainer = SimpleNamespace(args=args, state=SimpleNamespace(global_step=3), memory=ReflectionMemory(8),
                              accelerator=SimpleNamespace(num_processes=1), examples=[])
    ERLTrainer._remember(trainer, step)
    return trainer


def test_erl_browser_shows_each_episode_in_order_and_what_went_into_memory():
    # fails if the slider does not re-render (episode 0 would stay), if the stages are shown out of ERL's order, or
    # if "went into memory" / "internalized" are not read from the trainer's own flags (episode 2 is stored but not
    # internalized, so swapping the two shows)
    trainer = _erl_examples()
    examples = trainer.examples
    # the data the browser reads, as the trainer made it
    assert [(e["stored"], e["internalized"]) for e in examples] == [(True, True), (False, False), (True, False)]
    view = widgets.erl_browser(examples)
    header, body = _html_children(view)
    slider = next(c for c in view.children if type(c).__name__ == "IntSlider")
    assert (slider.max, slider.value, slider.description) == (2, 0, "episode")
    assert "improved in 2 of 3" in header.value and "memory: 2" in header.value and "(3 episodes)" in header.value
    first = body.value
    order = [first.index(text) for text in ("{&quot;key&quot;: &quot;tree&quot;", "the key must be tree",
                                            "Use the word itself", "{&quot;tree&quot;: &quot;spruce&quot;}")]
    assert order == sorted(order), order  # first attempt → feedback → reflection → retry
    assert "+1 vs r1: improved" in first and "yes — later reflections read it" in first
    slider.value = 1
    second = body.value
    assert "Keep it short and close it." in second and "Use the word itself" not in second
    assert "-0.5 vs r1: not improved" in second and "no — not stored" in second and "no — not distilled" in second
    assert "the key must be animal, not goat" in second  # the retry's own feedback
    slider.value = 2
    third = body.value
    assert "Answer with braces." in third and "yes — later reflections read it" in third
    assert "no — not distilled" in third
    # what the browser says went into memory is what the memory holds
    shown = []
    for i, e in enumerate(examples):
        slider.value = i
        if "yes — later reflections read it" in body.value:
            shown.append(e["reflection"])
    assert shown == [e["reflection"] for e in trainer.memory.entries] == ["Use the word itself as the key.",
                                                                          "Answer with braces."]
    with pytest.raises(ValueError, match="at least one episode"):
        widgets.erl_browser([])
