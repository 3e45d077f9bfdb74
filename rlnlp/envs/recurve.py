"""recurve task files (YAML) and the environment that plays them, one utterance per step.

A task file, exactly the recurve format::

    main_prompt: "You are a helpful assistant."   # the system message of every episode
    items:                                        # one episode starts from one item
      - prompt: "..."                             # the user message
        answer: Rust                              # the gold answer (kept as the text written)
    score_fn: |                                   # (text, answer) -> bool | float, once at the end
      def score_fn(text: str, answer: str): ...
    done_fn: |                                    # (text) -> bool: does the episode end here
      def done_fn(text: str): ...
    split_fn: |                                   # (output) -> bool: does the current utterance end here
      def split_fn(output: str): ...
    reply_prefix: "The answer is"                 # OPTIONAL (rlnlp's addition): the start of the reply,
                                                  # written for the policy; an item may give its own

**Task files are code.** Loading one executes its three functions with full Python power (each
in its own fresh namespace, but nothing is sandboxed): run only task files you trust.

What ``text`` is. The functions see the episode exactly as the policy sees it: the chat template
rendered with the system message (``main_prompt``) and the user message (the item's ``prompt``),
the assistant turn opened, then everything generated so far. With SmolLM2 (ChatML) that is::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n
    <|im_start|>assistant\\n<generated utterances ...>

(followed by the item's ``reply_prefix``, when the file gives one) so the seed's
``text.split("assistant")[-1]`` is the assistant's reply: the LAST "assistant" is
the header of the turn being written, even when main_prompt says "assistant" too. (It breaks if
the model itself writes the word "assistant" — a quirk of the seed's functions, kept verbatim.)
When the model ends its turn (EOS), the end-of-turn marker (``<|im_end|>``) is appended to the
text and the episode ends.

Semantics (recurve's, made exact):

* an utterance ends when ``split_fn(utterance)`` or ``done_fn(full text)`` holds, at EOS, or at
  the token cap — the sampler's stop function checks ``split_fn``; ``done_fn`` needs the row's
  whole text, so the agent cuts each utterance at the first token where it holds (see
  ``rlnlp.archer.act``);
* an episode ends when ``done_fn(text)`` holds, the model ends its turn, or ``max_utterances``
  utterances have been written;
* reward = ``score_fn(text, answer)`` at the end (bool → 0/1), 0 on every earlier step.

Validation happens on load: a missing key, an item without prompt/answer, a function that does
not parse, has the wrong name or the wrong number of parameters → one ``TaskFileError`` naming the
file, the field and the line. An exception raised inside a function while playing becomes a
``TaskFunctionError`` naming the function, the item and the line where the function is defined.
"""
from __future__ import annotations

import ast
import builtins
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

REQUIRED_KEYS = ("main_prompt", "items", "score_fn", "done_fn", "split_fn")
OPTIONAL_KEYS = ("reply_prefix",)
FUNCTION_ARITY = {"score_fn": 2, "done_fn": 1, "split_fn": 1}


class TaskFileError(ValueError):
    """A task file that cannot be used; the message names the file, the field and the line."""


class TaskFunctionError(RuntimeError):
    """A task function raised or returned the wrong type while playing; names the function and the item."""


@dataclass
class Item:
    prompt: str
    answer: str
    line: int  # 1-based line of the item in its file
    reply_prefix: str = ""  # the start of the assistant's reply, written for the policy (optional key)


@dataclass
class Task:
    """A loaded, validated task file. ``score``/``done``/``split`` call its functions safely."""

    path: str
    main_prompt: str
    items: list[Item]
    functions: dict = field(repr=False)
    lines: dict = field(repr=False)  # function name -> 1-based line where its source starts

    def describe_item(self, item: int | None) -> str:
        if item is None:
            return "an utterance being generated (item not known inside the sampler)"
        it = self.items[item]
        return f"item {item} (line {it.line}, prompt {it.prompt[:60]!r})"

    def _call(self, name: str, item: int | None, *args):
        try:
            return self.functions[name](*args)
        except Exception as err:  # a user function may raise anything; report where, not a deep trace
            raise TaskFunctionError(f"{self.path}: {name} (defined at line {self.lines[name]}) raised "
                                    f"{type(err).__name__}: {err} on {self.describe_item(item)}") from err

    def _check_bool(self, name: str, item: int, value) -> bool:
        if isinstance(value, (bool, np.bool_)):  # numpy bools are fine too
            return bool(value)
        raise TaskFunctionError(f"{self.path}: {name} (line {self.lines[name]}) must return a bool, "
                                f"got {type(value).__name__} {value!r:.40} on {self.describe_item(item)}")

    def score(self, text: str, item: int) -> float:
        """score_fn(text, answer) as a float reward (True → 1.0, False → 0.0)."""
        value = self._call("score_fn", item, text, self.items[item].answer)
        if isinstance(value, (bool, np.bool_)):
            return float(bool(value))
        if isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(value):
            return float(value)
        raise TaskFunctionError(f"{self.path}: score_fn (line {self.lines['score_fn']}) must return a bool or a "
                                f"finite number, got {type(value).__name__} {value!r:.40} on "
                                f"{self.describe_item(item)}")

    def done(self, text: str, item: int | None) -> bool:
        return self._check_bool("done_fn", item, self._call("done_fn", item, text))

    def split(self, output: str, item: int | None) -> bool:
        return self._check_bool("split_fn", item, self._call("split_fn", item, output))


# ---- loading and validation ------------------------------------------------------------------

def _fail(path, line: int, where: str, problem: str) -> TaskFileError:
    return TaskFileError(f"{path}, line {line}, field '{where}': {problem}")


def _mapping(node, path, where: str) -> dict:
    """A YAML mapping node as {key: (key_node, value_node)}."""
    if not isinstance(node, yaml.MappingNode):
        raise _fail(path, node.start_mark.line + 1, where,
                    f"expected a mapping of keys, got {node.tag.rsplit(':', 1)[-1]}")
    return {k.value: (k, v) for k, v in node.value}


def _text(node, path, where: str) -> str:
    """A scalar's text as written (so `answer: yes` stays "yes", not YAML 1.1's True)."""
    if not isinstance(node, yaml.ScalarNode):
        raise _fail(path, node.start_mark.line + 1, where, "expected a single text value")
    return node.value


def _compile_function(name: str, node, path):
    """Parse, check the name and arity, execute in a fresh namespace; return (function, first code line)."""
    source = _text(node, path, name)
    # a block scalar (`|`) starts on the line after its indicator; a flow scalar on its own line
    first_line = node.start_mark.line + (2 if node.style in ("|", ">") else 1)
    try:
        tree = ast.parse(source, filename=f"{path}:{name}")
    except SyntaxError as err:
        line = first_line + (err.lineno or 1) - 1
        raise _fail(path, line, name, f"does not parse: {err.msg} (in: {(err.text or '').strip()!r})") from None
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    if not any(d.name == name for d in defs):
        found = ", ".join(d.name for d in defs) or "no function"
        raise _fail(path, first_line, name, f"must define a function named {name!r}, found {found}")
    fn_node = next(d for d in defs if d.name == name)
    a = fn_node.args
    positional = len(a.posonlyargs) + len(a.args)
    required = positional - len(a.defaults)
    want = FUNCTION_ARITY[name]
    if not (required <= want and (positional >= want or a.vararg is not None)) or any(
            d is None for d in a.kw_defaults):
        raise _fail(path, first_line + fn_node.lineno - 1, name,
                    f"{name} must take {want} positional parameter(s), it takes {positional} ({required} required)")
    namespace = {"__builtins__": builtins, "__name__": f"recurve_task_{name}"}
    try:
        exec(compile(tree, f"{path}:{name}", "exec"), namespace)
    except Exception as err:  # top-level code of the block (e.g. an import) failed
        raise _fail(path, first_line, name, f"running its definition raised {type(err).__name__}: {err}") from None
    return namespace[name], first_line


def load_task(path: str | Path) -> Task:
    """Load and validate one recurve task file; raise ``TaskFileError`` (file, field, line) on any problem."""
    path = Path(path)
    if not path.exists():
        raise TaskFileError(f"{path}: no such task file")
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        raise _fail(path, mark.line + 1 if mark else 1, "(yaml)", f"not valid YAML: {err.problem or err}") from None
    if root is None:
        raise _fail(path, 1, "(file)", "the file is empty")
    top = _mapping(root, path, "(top level)")
    for key in REQUIRED_KEYS:
        if key not in top:
            raise _fail(path, root.start_mark.line + 1, key,
                        f"missing key {key!r} in the top-level mapping (it has: {', '.join(top) or 'nothing'})")
    main_prompt = _text(top["main_prompt"][1], path, "main_prompt")
    default_prefix = _text(top["reply_prefix"][1], path, "reply_prefix") if "reply_prefix" in top else ""
    items_node = top["items"][1]
    if not isinstance(items_node, yaml.SequenceNode) or not items_node.value:
        raise _fail(path, items_node.start_mark.line + 1, "items", "expected a non-empty list of {prompt, answer}")
    items = []
    for i, node in enumerate(items_node.value):
        where = f"items[{i}]"
        fields_ = _mapping(node, path, where)
        for key in ("prompt", "answer"):
            if key not in fields_:
                raise _fail(path, node.start_mark.line + 1, f"{where}.{key}", f"item {i} has no {key!r}")
        prefix = (_text(fields_["reply_prefix"][1], path, f"{where}.reply_prefix") if "reply_prefix" in fields_
                  else default_prefix)
        items.append(Item(prompt=_text(fields_["prompt"][1], path, f"{where}.prompt"),
                          answer=_text(fields_["answer"][1], path, f"{where}.answer"),
                          line=node.start_mark.line + 1, reply_prefix=prefix))
    functions, lines = {}, {}
    for name in FUNCTION_ARITY:
        functions[name], lines[name] = _compile_function(name, top[name][1], path)
    return Task(path=str(path), main_prompt=main_prompt, items=items, functions=functions, lines=lines)


# ---- the environment ---------------------------------------------------------------------------

class RecurveEnv:
    """One task file as a text environment: observation = the rendered chat text so far; action = one utterance.

    ``chat = False``: the observation already carries the chat template, so the policy continues it
    as raw text. ``split(utterance)`` and ``ends_episode(observation, utterance)`` let the agent end
    utterances the way the task file says.
    """

    actions = None
    chat = False

    def __init__(self, task: Task | str | Path, tokenizer=None, max_utterances: int = 8,
                 end_of_turn: str | None = None):
        from ..models import load_tokenizer
        from ..sampling import render_prompts

        self.task = task if isinstance(task, Task) else load_task(task)
        self.tokenizer = tokenizer or load_tokenizer()
        self.end_of_turn = end_of_turn or self.tokenizer.eos_token
        self.max_utterances = max_utterances
        # one rendered prefix per item: system = main_prompt, user = prompt, assistant turn opened
        # (then the item's reply_prefix, if the file gives one)
        rendered = render_prompts(self.tokenizer, [[{"role": "system", "content": self.task.main_prompt},
                                                   {"role": "user", "content": it.prompt}] for it in self.task.items])
        self.prefixes = [r + it.reply_prefix for r, it in zip(rendered, self.task.items)]
        self.item, self.text, self.turn, self.done = 0, "", 0, True

    def reset(self, seed: int | None = None) -> str:
        self.item = random.Random(seed).randrange(len(self.task.items))
        self.text, self.turn, self.done = self.prefixes[self.item], 0, False
        return self.text

    def state(self) -> dict:
        """What a checkpoint needs to continue this episode."""
        return {"item": self.item, "text": self.text, "turn": self.turn, "done": self.done}

    def load_state(self, state: dict) -> None:
        self.item, self.text, self.turn, self.done = state["item"], state["text"], state["turn"], state["done"]

    def item_of(self, observation: str) -> int | None:
        """Which item an observation (possibly from a replay buffer) started from."""
        return next((i for i, p in enumerate(self.prefixes) if observation.startswith(p)), None)

    def split(self, utterance: str) -> bool:
        return self.task.split(utterance, None)

    def ends_episode(self, observation: str, utterance: str) -> bool:
        """done_fn on the full text the utterance would produce (used to cut utterances mid-way)."""
        return self.task.done(observation + utterance, self.item_of(observation))

    def step(self, utterance: str) -> tuple[str, float, bool, dict]:
        if self.done:
            raise RuntimeError("step() after the episode ended: call reset()")
        self.text += utterance
        self.turn += 1
        ended_turn = self.end_of_turn in utterance
        done_fn = self.task.done(self.text, self.item)
        self.done = done_fn or ended_turn or self.turn >= self.max_utterances
        info = {"item": self.item, "turn": self.turn,
                "ended_by": "done_fn" if done_fn else "end_of_turn" if ended_turn else "cap" if self.done else None}
        reward = 0.0
        if self.done:
            reward = self.task.score(self.text, self.item)
            info["score"] = reward
            info["success"] = reward >= 1.0
        return self.text, reward, self.done, info
