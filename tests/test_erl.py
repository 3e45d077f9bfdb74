"""ERL (notebook 05): the feedback tasks; the gate, two sampler calls per step and what they are fed;
the memory and internalization rules; the loss is ONE TRL pass over y1 + Δ + y2 (every loss type, entropy
bonus on) plus the internalization term; the rows decode to the prompts they claim; a tiny train() with
num_iterations=2, β > 0, steps_per_generation=2 and PEFT; the seed README's quick start."""
import copy
import functools
import json
import math
import re
from collections import defaultdict

import pytest
import torch
from trl import GRPOTrainer

import rlnlp.erl as erl
import rlnlp.erl.step as erl_step
import rlnlp.erl.trainer as erl_trainer
from rlnlp.envs import feedback_tasks as ft
from rlnlp.erl import (
    ERLConfig,
    ERLTrainer,
    deal_rows,
    erl_advantages,
    internalization_labels,
    internalization_loss,
    pack_rows,
    prefix_tree_pack,
    select_rows,
    should_internalize,
    should_store,
    trim_padding,
)
from rlnlp.models import completion_logprobs, masked_mean

# ---------------------------------------------------------------- feedback tasks (no model)


def test_feedback_tasks_score_and_explain():
    assert ft.score("word_count", "Cats sleep all day long.", {"n": 5}) == (
        1.0,
        "Correct: your sentence had exactly 5 words.",
    )
    r, f = ft.score("word_count", "Cats sleep a lot during the day.", {"n": 5})
    assert r == pytest.approx(1 - 2 / 5) and f == "Your sentence had 7 words; it needs exactly 5."
    assert ft.score("arithmetic", "The answer is 13.", {"answer": 12}) == (0.0, "Your answer 13 is too high.")
    assert ft.score("json_key", '{"color": "blue"}', {"key": "color", "value": "blue"})[0] == 1.0
    r, f = ft.score("json_key", '{"colour": "blue"}', {"key": "color", "value": "blue"})
    assert r == 0.5 and 'no key "color"' in f
    assert ft.score("json_key", "color: blue", {"key": "color", "value": "blue"})[0] == 0.0
    assert ft.score("letters", "S", {"kind": "first", "word": "stone"})[0] == 1.0
    assert ft.score("letters", "6", {"kind": "count", "word": "stone"})[0] == 0.0
    grid = ["SFFF", "FFHF", "FFFF", "FFFG"]
    r, f = ft.score("frozen_lake", "right, down, right", {"grid": grid})
    assert r == 0.0 and f.startswith("You fell into a hole at step 3")
    assert ft.score("frozen_lake", "down, down, down, right, right, right", {"grid": grid})[0] == 1.0
    r, _ = ft.score("frozen_lake", "down, down", {"grid": grid})
    assert 0 < r < 0.5  # partial progress, never mistaken for success


def test_feedback_says_when_an_answer_was_cut_off():
    spec = {"key": "animal", "value": "goat"}
    cut = '{\n  "animal": {\n    "name": "goat",'
    r, f = ft.score("json_key", cut, spec, truncated=True)
    assert r == 0.0 and f.startswith(ft.CUT_OFF) and ft.score("json_key", cut, spec)[1] in f
    assert ft.score("json_key", '{"animal": "goat"}', spec, truncated=True)[1].startswith("Correct")  # right is right
    completions = [[{"role": "assistant", "content": cut}]] * 2
    out = ft.feedback_func(
        None, completions, task=["json_key"] * 2, spec=[json.dumps(spec)] * 2, truncated=[True, False]
    )
    assert out[0].startswith(ft.CUT_OFF) and not out[1].startswith(ft.CUT_OFF)


def test_feedback_task_faces_agree():
    rows = ft.read_rows("eval", "frozen_lake")
    env = ft.FeedbackTaskEnv("frozen_lake", split="eval")
    prompt = env.reset(seed=3)
    row = next(r for r in rows if r["prompt"] == prompt)
    obs, reward, done, info = env.step("down, right")
    assert done and obs == info["feedback"] and 0 <= reward <= 1
    completions = [[{"role": "assistant", "content": "down, right"}]]
    assert ft.reward_func(None, completions, task=[row["task"]], spec=[row["spec"]]) == [reward]
    assert ft.feedback_func(None, completions, task=[row["task"]], spec=[row["spec"]]) == [obs]
    ds = ft.load_splits("arithmetic")
    assert set(ds) == {"train", "eval"} and ds["train"][0]["prompt"][0]["role"] == "user"


def test_feedback_data_is_reproducible_and_eval_splits_are_large(tmp_path):
    ft.write(tmp_path, seed=0)
    for split in ("train", "eval"):
        assert (tmp_path / f"{split}.jsonl").read_text() == (ft.DATA_DIR / f"{split}.jsonl").read_text()
    for task in ft.TASKS:
        train, held = ft.read_rows("train", task), ft.read_rows("eval", task)
        assert len(held) >= 100 and len(train) >= 100, task  # claims need ≥ 100 held-out prompts per task
        assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}, task


# ---------------------------------------------------------------- ERL rules and math (no model)


def test_memory_add_rule_fires_with_tau_one():
    # The original rule (store when r2 > τ) can never fire with τ = 1 and rewards in [0, 1]; ours can.
    assert should_store(0.0, 1.0, None) and should_store(0.4, 0.6, None)
    assert not should_store(0.5, 0.5, None) and not should_store(1.0, 0.0, None)
    assert should_store(0.0, 0.99, 0.99) and not should_store(0.0, 0.5, 0.99)
    mem = erl.ReflectionMemory(size=2)
    for i in range(3):
        mem.add(f"lesson {i}", "task", 0.0, 1.0, i)
    assert len(mem) == 2 and mem.retrieve("task", 3) == ["lesson 2", "lesson 1"]  # FIFO, newest first
    assert erl.ReflectionMemory.format([]) == "None available."


def test_internalization_rules():
    # the default "success" (r2 ≥ τ) does not distil a half-right retry that merely matches y1
    assert should_internalize(0.0, 1.0, "success", 1.0) and not should_internalize(0.5, 0.5, "success", 1.0)
    assert not should_internalize(0.0, 0.5, "success", 1.0) and should_internalize(0.0, 0.5, "success", 0.5)
    assert should_internalize(0.0, 0.5, "improved", 1.0) and not should_internalize(0.5, 0.5, "improved", 1.0)
    assert should_internalize(0.5, 0.5, "positive", 1.0) and not should_internalize(0.5, 0.0, "positive", 1.0)
    assert ERLConfig.__dataclass_fields__["internalization_rule"].default == "success"


def test_similarity_retrieval_prefers_related_prompts(encoder):
    mem = erl.ReflectionMemory(size=10, retrieval="similarity", encoder=encoder)
    mem.add(
        "Output braces and quote the key.",
        'Reply with a JSON object whose key "city" has the value "Rome".',
        0.0,
        1.0,
        0,
    )
    mem.add("Walk down first, the hole is on the right.", "You stand on a frozen lake, a 4x4 grid.", 0.0, 1.0, 1)
    mem.add("Count the words before answering.", "Write one sentence about tea that has exactly 4 words.", 0.0, 1.0, 2)
    assert mem.retrieve('Reply with a JSON object whose key "fruit" has the value "kiwi".', 1) == [
        "Output braces and quote the key."
    ]


def test_advantages_joint_and_split_match_hand_computation():
    r1, r2 = torch.tensor([1.0, 0.0, 0.5, 0.0]), torch.tensor([1.0, 0.0, 0.0])
    a1, ad, ay = erl_advantages(r1, r2, "joint", torch.zeros(4))
    everything = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    expect = (everything - everything.mean()) / (everything.std() + 1e-4)
    assert torch.allclose(torch.cat([a1, ad, ay]), expect)
    group = torch.tensor([0.3, -0.3, 0.1, -0.1])
    a1, ad, ay = erl_advantages(r1, r2, "split", group)
    both = torch.cat([r2, r2])
    assert torch.equal(a1, group) and torch.allclose(torch.cat([ad, ay]), (both - both.mean()) / (both.std() + 1e-4))


def test_config_rejects_bad_values_and_unsupported_generation_options():
    kw = dict(output_dir="/tmp/x", use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match="algorithm"):
        ERLConfig(algorithm="both", **kw)
    with pytest.raises(ValueError, match="reflection_system_prompt"):
        ERLConfig(reflection_system_prompt="{prompt} {oops}", **kw)
    with pytest.raises(ValueError, match="internalization_rule"):
        ERLConfig(internalization_rule="always", **kw)
    with pytest.raises(NotImplementedError, match="adaptive entropy"):
        ERLConfig(algorithm="split", use_adaptive_entropy=True, **kw)
    check = erl_step.sampler_options
    assert check(ERLConfig(temperature=0.7, top_p=0.9, top_k=5, **kw)) == {"temperature": 0.7, "top_p": 0.9, "top_k": 5}
    assert check(ERLConfig(generation_kwargs={"temperature": 0.3}, **kw))["temperature"] == 0.3  # TRL: kwargs win
    assert check(ERLConfig(generation_kwargs={"do_sample": False}, **kw))["temperature"] == 0.0
    for bad in (dict(min_p=0.1), dict(repetition_penalty=1.2), dict(generation_kwargs={"num_beams": 2})):
        with pytest.raises(NotImplementedError):
            check(ERLConfig(**bad, **kw))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rule: a GPU keeps TRL's own")
def test_config_follows_the_workbook_precision_on_a_cpu(monkeypatch):
    """bf16 left unset on a CPU: TRL autocasts to bf16 exactly where rlnlp.runtime.precision() says bf16 (its
    ``RLNLP_DTYPE`` override included), for the bare config and the presets; an explicit value wins. Mutation seen
    to fail: the old fixed ``bf16=False``."""
    for name, want in (("bf16", True), ("fp32", False)):
        monkeypatch.setenv("RLNLP_DTYPE", name)
        assert ERLConfig(output_dir="/tmp/x").bf16 is want and ERLConfig.smoke().bf16 is want
        assert ERLConfig(output_dir="/tmp/x").use_cpu
    monkeypatch.setenv("RLNLP_DTYPE", "bf16")
    assert ERLConfig(output_dir="/tmp/x", bf16=False).bf16 is False


def test_erl_fields_carry_help_and_check_themselves():
    """TRL's HfArgumentParser shows ERL's options with their help and parses them (``--tasks a b`` → a tuple of
    names); a bad value of ERL's own is one ValueError naming the field, also after an in-place change
    (``check``) and through ``train_run``'s overrides, before any model loads. Mutations seen to fail: a field
    without help metadata; ``tasks: tuple[str, ...]`` (the parser split "json_key" into letters); an empty
    ``_RULES``; ``train_run`` without ``cfg.check()``."""
    from dataclasses import fields

    from transformers import HfArgumentParser
    from trl import GRPOConfig

    trl_names = {f.name for f in fields(GRPOConfig)}
    own = [f for f in fields(ERLConfig) if f.name not in trl_names]
    assert len(own) >= 18 and [f.name for f in own if not f.metadata.get("help")] == []
    parser = HfArgumentParser(ERLConfig)
    assert "τ: samples with r1 < τ are reflected on and retried" in " ".join(parser.format_help().split())
    cfg, = parser.parse_args_into_dataclasses(["--output_dir", "/tmp/x", "--use_cpu", "--bf16", "false", "--tasks",
                                               "json_key", "arithmetic", "--internalization_rule", "improved"])
    assert cfg.tasks == ("json_key", "arithmetic") and cfg.internalization_rule == "improved"
    kw = dict(output_dir="/tmp/x", use_cpu=True, bf16=False)
    for bad, words in [(dict(memory_size=-1), "ERLConfig.memory_size must be an integer ≥ 0, got -1"),
                       (dict(memory_retrieval="random"), "ERLConfig.memory_retrieval must be one of 'recency', "),
                       (dict(reward_threshold=float("nan")), "ERLConfig.reward_threshold must be a finite number"),
                       (dict(reflection_max_new_tokens=0),
                        "ERLConfig.reflection_max_new_tokens must be an integer ≥ 1"),
                       (dict(tasks=[]), "ERLConfig.tasks must name at least one feedback task")]:
        with pytest.raises(ValueError, match=re.escape(words)):
            ERLConfig(**bad, **kw)
    cfg = ERLConfig(**kw)
    cfg.memory_top_k = -2
    with pytest.raises(ValueError, match="ERLConfig.memory_top_k must be an integer ≥ 0"):
        cfg.check()
    with pytest.raises(ValueError, match="ERLConfig.internalization_coef must be a finite number ≥ 0"):
        erl.train_run(ERLConfig.smoke(), internalization_coef=-1.0)
    with pytest.raises(TypeError, match="no field"):
        erl.train_run(ERLConfig.smoke(), memory_sise=3)


def test_rows_are_dealt_evenly_and_padding_trimmed():
    part = torch.tensor([0] * 8 + [1] * 3 + [2] * 3 + [3] * 2)
    chunks = deal_rows(part, 2, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(chunks).tolist()) == list(range(16))
    for code, n in ((0, 8), (1, 3), (2, 3), (3, 2)):
        counts = [int((part[c] == code).sum()) for c in chunks]
        assert max(counts) - min(counts) <= 1 and sum(counts) == n
    assert abs(len(chunks[0]) - len(chunks[1])) <= 1
    batch = {"prompt_ids": torch.tensor([[0, 0, 5, 6], [0, 0, 0, 7]]),
             "prompt_mask": torch.tensor([[0, 0, 1, 1], [0, 0, 0, 1]]),
             "completion_ids": torch.tensor([[8, 9, 0], [8, 0, 0]]),
             "completion_mask": torch.tensor([[1, 1, 0], [1, 0, 0]]),
             "old_per_token_logps": torch.ones(2, 3), "advantages": torch.ones(2),
             "num_items_in_batch": torch.tensor(3)}
    t = trim_padding(batch)
    assert t["prompt_ids"].tolist() == [[5, 6], [0, 7]] and t["completion_ids"].tolist() == [[8, 9], [8, 0]]
    assert t["old_per_token_logps"].shape == (2, 2) and t["num_items_in_batch"] == 3


def test_internalization_masks_prompt_matches_hand_computation_and_ignores_layout(policy):
    model, tok = policy
    prompt_ids = torch.tensor([[0, 11, 12, 13], [21, 22, 23, 24]])  # row 0 left-padded
    prompt_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    completion_ids = torch.tensor([[31, 32, 0], [41, 42, 43]])  # row 0 right-padded
    completion_mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    _, _, labels = internalization_labels(prompt_ids, prompt_mask, completion_ids, completion_mask)
    assert (labels[:, :4] == -100).all()  # every prompt token masked
    assert labels[0, 6] == -100 and torch.equal(labels[1, 4:], completion_ids[1])
    with torch.no_grad():
        loss, stats = internalization_loss(model, prompt_ids, prompt_mask, completion_ids, completion_mask)
        hand = -masked_mean(
            completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask), completion_mask
        )
        # with the generation batch's token count as the normaliser, micro-batches of any layout add up to the whole
        parts = [internalization_loss(model, prompt_ids[i : i + 1], prompt_mask[i : i + 1], completion_ids[i : i + 1],
                                      completion_mask[i : i + 1], normalizer=5)[0] for i in range(2)]
    assert stats["stats/internalized_tokens"] == 5
    assert loss.item() == pytest.approx(hand.item(), rel=1e-4)
    assert (parts[0] + parts[1]).item() == pytest.approx(loss.item(), rel=1e-5)


# ---------------------------------------------------------------- the trainer on the real model


class ScriptedReward:
    """y1 rewards follow ``first`` (one per completion); every later call (the retries) scores ``retry``.
    Records the length of every completion_ids list it is given."""

    __name__ = "scripted"

    def __init__(self):
        self.first, self.retry, self.calls, self.lengths = None, 1.0, 0, []

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        self.calls += 1
        self.lengths.append([len(ids) for ids in completion_ids])
        return list(self.first) if self.calls == 1 else [self.retry] * len(completions)


def _config(tmp, **kw):
    base = dict(output_dir=str(tmp), per_device_train_batch_size=4, num_generations=2, max_completion_length=6,
                reflection_max_new_tokens=6, max_steps=1, report_to="none", save_strategy="no", use_cpu=True,
                bf16=False, seed=0, reflection_stop_at_newline=False)
    return ERLConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def base_trainer(tmp_path_factory):
    """Built once per module (loading the model is the slow part); tests get fresh copies of it (``trainer``)."""
    from rlnlp.models import load_policy

    model, tok = load_policy(device="cpu", dtype=torch.float32)
    reward = ScriptedReward()
    t = ERLTrainer(model=model, reward_funcs=reward,
                   args=_config(tmp_path_factory.mktemp("erl"), reflection_temperature=0.3),
                   train_dataset=ft.load_split("train", "arithmetic", limit=8), processing_class=tok,
                   feedback_func=ft.feedback_func)
    t.scripted = reward
    t.model.train()
    t.current_gradient_accumulation_steps = 1  # set by Trainer's loop; the tests call the loss directly
    return t


def _fresh(base):
    """A copy of the module's trainer whose per-run state — memory, examples, metrics, feedback function, chat
    template, scripted rewards — starts empty, so no test sees what another left behind (the model, tokenizer and
    accelerator are shared: no test changes their weights, and those that change the tokenizer restore it)."""
    t = copy.copy(base)
    t.memory = erl.ReflectionMemory(t.args.memory_size, t.args.memory_retrieval)
    t.examples = []
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    t.feedback_func, t.chat_template, t.chat_template_kwargs = ft.feedback_func, None, {}
    t.scripted.first, t.scripted.retry, t.scripted.calls, t.scripted.lengths = None, 1.0, 0, []
    return t


@pytest.fixture
def trainer(base_trainer):
    return _fresh(base_trainer)


def _step(trainer, first, monkeypatch, inputs=None):
    """One ERL generation phase with scripted y1 rewards; returns (batch, sampler calls as (prompts, kwargs))."""
    calls = []
    real = erl_trainer.sample
    # patched where ERLTrainer looks it up: patched on rlnlp.erl instead, no call is seen and the gate test fails
    monkeypatch.setattr(erl_trainer, "sample", lambda *a, **k: calls.append((list(a[2]), k)) or real(*a, **k))
    trainer.scripted.first, trainer.scripted.calls, trainer.scripted.lengths = first, 0, []
    ds = trainer.train_dataset
    inputs = inputs or [ds[0], ds[0], ds[1], ds[1]]
    trainer.examples.clear()
    trainer._metrics["train"].clear()
    return trainer._erl_batch(copy.deepcopy(inputs)), calls


@pytest.fixture(scope="module")
def mixed(base_trainer):
    """One generation batch holding all four parts: y1 rows 1 and 3 gated, both retries score 1 (internalized);
    built by a fresh copy (empty memory), whichever tests ran before."""
    trainer = _fresh(base_trainer)
    trainer.scripted.first, trainer.scripted.calls, trainer.scripted.lengths = [1.0, 0.0, 1.0, 0.0], 0, []
    ds = trainer.train_dataset
    trainer.examples.clear()
    batch = trainer._erl_batch(copy.deepcopy([ds[0], ds[0], ds[1], ds[1]]))
    assert [(batch["erl_part"] == k).sum().item() for k in range(4)] == [4, 2, 2, 2]
    return batch


@pytest.mark.parametrize("first", [[1.0, 0.0, 1.0, 1.0], [0.0, 0.5, 0.0, 0.9]])
def test_gate_and_exactly_two_sampler_calls(trainer, first, monkeypatch):
    batch, calls = _step(trainer, first, monkeypatch)
    gated = sum(r < 1.0 for r in first)
    assert [len(p) for p, _ in calls] == [gated, gated]  # one reflection call, one retry call, each over all gated
    assert calls[0][1]["temperature"] == 0.3 and calls[1][1]["temperature"] == trainer.args.temperature
    assert len(trainer.examples) == gated and all(e["r1"] < 1.0 for e in trainer.examples)
    assert trainer._metrics["train"]["stats/gate_fraction"] == [gated / 4]
    part = batch["erl_part"]
    assert [(part == k).sum().item() for k in range(3)] == [4, gated, gated]


def test_nothing_gated_means_no_extra_calls(trainer, monkeypatch):
    batch, calls = _step(trainer, [1.0] * 4, monkeypatch)
    assert calls == [] and (batch["erl_part"] == 0).all()


def test_without_reflection_one_call_retries_from_the_raw_feedback(trainer, monkeypatch):
    """The ablation: no Δ sampled or trained, the retry prompt holds the first attempt and its feedback, nothing
    enters the memory. Mutation seen to fail: ``_erl_batch`` calling ``_reflect`` regardless → two sampler calls."""
    trainer.args = copy.copy(trainer.args)
    trainer.args.enable_reflection = False
    batch, calls = _step(trainer, [0.0, 1.0, 0.0, 1.0], monkeypatch)  # rows 0 and 2 gated; scripted retries score 1
    assert [len(p) for p, _ in calls] == [2]
    for e, rendered in zip(trainer.examples, calls[0][0]):
        assert e["reflection"] == "" and e["feedback"] and e["feedback"] in rendered and e["y1"].strip() in rendered
        assert "Advice from your last try" not in rendered
    part = batch["erl_part"]
    assert [(part == k).sum().item() for k in range(4)] == [4, 0, 2, 2]  # y1, no Δ, y2, internalized y2
    assert len(trainer.memory) == 0 and not any(e["stored"] for e in trainer.examples)


def test_memory_grows_when_retries_improve(trainer, monkeypatch):
    before = len(trainer.memory)
    _step(trainer, [0.0, 1.0, 0.0, 1.0], monkeypatch)  # both gated retries score 1 > 0
    assert len(trainer.memory) == before + 2
    assert all(e["stored"] for e in trainer.examples)


def test_feedback_func_none_works(trainer, monkeypatch):
    trainer.feedback_func = None
    try:
        _step(trainer, [0.0, 1.0, 1.0, 1.0], monkeypatch)
    finally:
        trainer.feedback_func = ft.feedback_func
    assert trainer.examples[0]["feedback"] == ""


def test_reward_functions_see_unpadded_completion_ids(trainer, monkeypatch):
    real = erl_trainer.sample

    def first_retry_is_short(*a, **k):  # cut the first retry to 2 tokens so the lengths differ from the padded width
        s = real(*a, **k)
        if a[2][0].count("Advice from your last try"):
            s.completion_mask[0, 2:] = 0
        return s

    monkeypatch.setattr(erl_trainer, "sample", first_retry_is_short)
    batch, _ = _step(trainer, [0.0, 0.0, 0.0, 0.0], monkeypatch)
    y1_lengths, retry_lengths = trainer.scripted.lengths
    part, mask = batch["erl_part"], batch["completion_mask"]
    assert y1_lengths == mask[part == 0].sum(1).tolist()
    assert retry_lengths == mask[part == 2].sum(1).tolist()  # true lengths, not the padded width
    assert retry_lengths[0] == 2 and mask.shape[1] > 2


def test_rows_decode_to_the_prompts_they_claim(trainer, monkeypatch):
    tok = trainer.processing_class
    batch, calls = _step(trainer, [1.0, 0.0, 1.0, 0.0], monkeypatch)  # rows 1 and 3 gated; retries score 1
    (reflect_prompts, _), (retry_prompts, _) = calls
    part = batch["erl_part"]
    decode = lambda ids, mask: tok.decode(ids[mask.bool()])
    rows = lambda code: [i for i in range(len(part)) if part[i] == code]
    for k, i in enumerate(rows(1)):  # Δ rows: the reflection prompt, which holds the task, y1 and its feedback
        assert decode(batch["prompt_ids"][i], batch["prompt_mask"][i]) == reflect_prompts[k]
        e = trainer.examples[k]
        assert e["y1"].strip() in reflect_prompts[k] and e["feedback"] in reflect_prompts[k]
        assert decode(batch["completion_ids"][i], batch["completion_mask"][i]) == e["reflection"]
    for k, i in enumerate(rows(2)):  # y2 rows: the retry prompt (task + Δ, never y1)
        assert decode(batch["prompt_ids"][i], batch["prompt_mask"][i]) == retry_prompts[k]
        assert trainer.examples[k]["reflection"].strip() in retry_prompts[k]
    y1_prompts = [decode(batch["prompt_ids"][i], batch["prompt_mask"][i]) for i in rows(0)]
    assert all("Advice from your last try" not in p for p in y1_prompts)
    for k, (i, j) in enumerate(zip(rows(3), rows(2))):  # internalization: the ORIGINAL prompt with y2
        assert decode(batch["prompt_ids"][i], batch["prompt_mask"][i]) == y1_prompts[[1, 3][k]]
        assert torch.equal(batch["completion_ids"][i], batch["completion_ids"][j])


def test_system_prompt_and_earlier_turns_are_kept(trainer, monkeypatch):
    row = dict(trainer.train_dataset[0])
    row["prompt"] = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi."},
                     {"role": "assistant", "content": "Hello."}, row["prompt"][-1]]
    _, calls = _step(trainer, [0.0, 1.0, 1.0, 1.0], monkeypatch, inputs=[row] * 4)
    for prompts, _ in calls:
        text = prompts[0]
        assert "You are terse." in text and "Hi." in text and "Hello." in text
        assert text.index("Hello.") < text.index(row["prompt"][-1]["content"])  # the task stays the last user turn


def test_plain_text_dataset_on_a_model_without_chat_template(trainer, monkeypatch):
    tok = trainer.processing_class
    template, tok.chat_template = tok.chat_template, None
    try:
        rows = [{"prompt": "Q: What is 2 + 3?\nA:", "task": "arithmetic", "spec": json.dumps({"answer": 5})}] * 4
        batch, calls = _step(trainer, [0.0, 1.0, 1.0, 1.0], monkeypatch, inputs=rows)
    finally:
        tok.chat_template = template
    reflect, retry = calls[0][0][0], calls[1][0][0]
    assert (
        "<|im_start|>" not in reflect + retry
        and "Q: What is 2 + 3?" in reflect
        and retry.startswith("Q: What is 2 + 3?")
    )
    assert isinstance(trainer.examples[0]["y2"], str) and (batch["erl_part"] == 2).sum() == 1


def test_chat_template_kwargs_reach_the_reflection_prompts(trainer, monkeypatch):
    trainer.chat_template = "{% for m in messages %}{{ m['content'] }}|{% endfor %}{{ marker }}"
    trainer.chat_template_kwargs = {"marker": "<<M>>"}
    try:
        _, calls = _step(trainer, [0.0, 1.0, 1.0, 1.0], monkeypatch)
    finally:
        trainer.chat_template, trainer.chat_template_kwargs = None, {}
    assert all(p[0].endswith("<<M>>") for p, _ in calls)


LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]


@pytest.fixture(scope="module")
def trl_reference(base_trainer, mixed):
    """TRL's own forward (unchunked, every GRPO row padded together) over the mixed batch's y1 + Δ + y2 rows, and
    the internalization term: computed once, they do not depend on the loss type."""
    part = mixed["erl_part"]
    rows = {k: (v[part <= 2] if isinstance(v, torch.Tensor) and v.ndim else v) for k, v in mixed.items()
            if not k.startswith("erl_")}
    ids = torch.cat([rows["prompt_ids"], rows["completion_ids"]], 1)
    attn = torch.cat([rows["prompt_mask"], rows["completion_mask"]], 1)
    r = part == 3
    with torch.no_grad():
        forward = GRPOTrainer._get_per_token_logps_and_entropies(base_trainer, base_trainer.model, ids, attn,
                                                                 rows["completion_ids"].shape[1], compute_entropy=True)
        l_int, _ = internalization_loss(base_trainer.model, mixed["prompt_ids"][r], mixed["prompt_mask"][r],
                                        mixed["completion_ids"][r], mixed["completion_mask"][r], mixed["erl_items_int"])
    return rows, forward, l_int


@pytest.mark.parametrize("loss_type", LOSS_TYPES + ["gspo"])
def test_mixed_batch_loss_is_one_trl_pass_with_entropy_bonus(trainer, mixed, trl_reference, monkeypatch, loss_type):
    """joint: ERL's loss on y1 + Δ + y2 + internalization rows == ONE TRL pass over the GRPO rows (padded together,
    TRL's own unchunked forward) + λ · L_int. A per-part loss would count the entropy bonus three times."""
    batch, part = mixed, mixed["erl_part"]
    assert {0, 1, 2, 3} <= set(part.tolist())
    packed = []
    real_packed = trainer._packed_logps
    monkeypatch.setattr(trainer, "_packed_logps", lambda *a, **k: packed.append(1) or real_packed(*a, **k))
    gspo = loss_type == "gspo"
    monkeypatch.setattr(trainer, "loss_type", "grpo" if gspo else loss_type)
    monkeypatch.setattr(trainer, "importance_sampling_level", "sequence" if gspo else "token")
    monkeypatch.setattr(trainer, "_entropy_bonus_enabled", True)
    monkeypatch.setattr(trainer, "entropy_coef", 0.1)
    with torch.no_grad():
        ours = trainer._compute_loss(trainer.model, batch)
    grpo_rows, forward, l_int = trl_reference
    monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies", lambda *a, **k: forward)  # TRL's, cached
    one_pass = GRPOTrainer._compute_loss(trainer, trainer.model, grpo_rows)
    monkeypatch.setattr(trainer, "entropy_coef", 0.0)
    without_entropy = GRPOTrainer._compute_loss(trainer, trainer.model, grpo_rows)
    reference = one_pass + trainer.args.internalization_coef * l_int
    assert packed, "ERL's loss did not take the packed forward"
    assert abs(one_pass - without_entropy) > 1e-3  # the entropy bonus is really in the comparison
    assert ours.item() == pytest.approx(reference.item(), abs=2e-5), (ours.item(), reference.item())


def test_split_is_two_trl_calls_with_weight_one(trainer, mixed, monkeypatch):
    batch = mixed
    monkeypatch.setattr(trainer.args, "algorithm", "split")
    monkeypatch.setattr(trainer, "_entropy_bonus_enabled", True)
    monkeypatch.setattr(trainer, "entropy_coef", 0.1)
    part = batch["erl_part"]
    with torch.no_grad():
        ours = trainer._compute_loss(trainer.model, batch)
        monkeypatch.setattr(trainer, "_get_per_token_logps_and_entropies",
                            functools.partial(GRPOTrainer._get_per_token_logps_and_entropies, trainer))
        terms = []
        for rows, items in ((part == 0, batch["erl_items_y1"]), ((part == 1) | (part == 2), batch["erl_items_rest"])):
            sub = {k: (v[rows] if isinstance(v, torch.Tensor) and v.ndim else v) for k, v in batch.items()
                   if not k.startswith("erl_")}
            terms.append(GRPOTrainer._compute_loss(trainer, trainer.model, {**sub, "num_items_in_batch": items}))
        r = part == 3
        l_int, _ = internalization_loss(trainer.model, batch["prompt_ids"][r], batch["prompt_mask"][r],
                                        batch["completion_ids"][r], batch["completion_mask"][r], batch["erl_items_int"])
    assert ours.item() == pytest.approx((terms[0] + terms[1] + l_int).item(), abs=2e-5)


def test_prefix_tree_pack_shares_prefixes_and_keeps_rows_apart():
    """Three rows: two share [1, 2], the last two share their whole prompt. Every shared token appears once, each
    token sees exactly its own row's path, positions are those of the row alone, predictions come from the right
    places; the packer splits by token budget as the layout counts them."""
    prompts, comps = [[1, 2, 3], [1, 2, 4], [1, 2, 4]], [[5, 6], [7], [8, 9]]
    tokens, pos, allowed, pred = prefix_tree_pack(prompts, comps)
    assert tokens == [1, 2, 3, 5, 4, 8] and pos == [0, 1, 2, 3, 2, 3]
    assert pred == [[2, 3], [4], [4, 5]]  # row 2 predicts its first token from the prompt token it shares with row 1
    seen = [set(torch.nonzero(allowed[q]).flatten().tolist()) for q in range(len(tokens))]
    assert seen == [{0}, {0, 1}, {0, 1, 2}, {0, 1, 2, 3}, {0, 1, 4}, {0, 1, 4, 5}]
    assert pack_rows(prompts, comps, 6) == [[0, 1, 2]]  # 4 + 1 + 1 tokens
    assert pack_rows(prompts, comps, 4) == [[0], [1, 2]]  # row 1 would make 5; a new pack restarts its prefix
    assert pack_rows(prompts, comps, 1) == [[0], [1], [2]]  # a row longer than the budget still gets its own pack


def test_packed_forward_equals_trl_forward_and_runs_micro_batches(trainer, mixed, monkeypatch):
    """The packed forward (shared prompt prefixes once, rows in block-masked sequences) gives TRL's per-token
    log-probs and entropies; each pass is one sequence of at most micro-batch size × padded width tokens (what TRL's
    forward holds for that many rows), and the LM head runs once."""
    batch = mixed
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    C, R = batch["completion_ids"].shape[1], ids.shape[0]
    backbone = trainer.model.get_base_model().model if hasattr(trainer.model, "get_base_model") else trainer.model.model
    from trl.kernels import ChunkedLogProbFunction

    heads, real_apply = [], ChunkedLogProbFunction.apply
    monkeypatch.setattr(ChunkedLogProbFunction, "apply", lambda *a: heads.append(1) or real_apply(*a))
    widths = []
    hook = backbone.register_forward_pre_hook(lambda m, a, k: widths.append(k["input_ids"].shape), with_kwargs=True)
    try:
        with torch.no_grad():
            lp, ent, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attn, C, batch_size=3,
                                                                    compute_entropy=True)
    finally:
        hook.remove()
    head_calls = len(heads)
    with torch.no_grad():
        ref_lp, ref_ent, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, attn, C,
                                                                            compute_entropy=True)
    mask = batch["completion_mask"].bool()
    assert all(w[0] == 1 and w[1] <= 3 * ids.shape[1] for w in widths)  # one sequence within the token budget
    assert len(widths) < math.ceil(R / 3)  # fewer passes than packs of 3 rows
    assert head_calls == 1  # the LM head once for all packs
    assert sum(w[1] for w in widths) < int(attn.sum()) - R  # shared prefixes were computed once
    assert torch.allclose(lp[mask], ref_lp[mask], atol=1e-4) and torch.allclose(ent[mask], ref_ent[mask], atol=1e-4)


def test_internalization_weight_does_not_depend_on_micro_batches(trainer, mixed, monkeypatch):
    """Each internalized token weighs 1 / N_int of the generation batch, whichever micro-batch it lands in: two
    micro-batches of one row each add up to one micro-batch holding both (a per-micro-batch mean would not)."""
    batch = mixed
    rows = (batch["erl_part"] == 3).nonzero().flatten()
    assert len(rows) == 2
    monkeypatch.setattr(trainer, "current_gradient_accumulation_steps", 2)  # a window of two micro-batches ...
    monkeypatch.setattr(trainer.args, "steps_per_generation", 2)  # ... that together hold the generation batch
    with torch.no_grad():
        halves = [trainer._compute_loss(trainer.model, select_rows(batch, rows[i : i + 1])) for i in range(2)]
        monkeypatch.setattr(trainer.args, "steps_per_generation", 1)
        monkeypatch.setattr(trainer, "current_gradient_accumulation_steps", 1)
        whole = trainer._compute_loss(trainer.model, select_rows(batch, rows))
    assert (halves[0] + halves[1]).item() == pytest.approx(whole.item(), rel=1e-5)
    assert abs(halves[0] - halves[1]) > 1e-4  # the two retries differ, so a per-micro-batch mean would not add up


def test_gradients_reach_y1_reflection_retry_and_internalization(trainer, mixed):
    batch = mixed
    assert (batch["erl_part"] == 3).sum() == 2  # both retries scored 1 ≥ τ: internalized
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    for code in range(4):  # y1, Δ, y2, internalization
        rows = batch["erl_part"] == code
        sub = {k: (v[rows] if isinstance(v, torch.Tensor) and v.ndim > 0 else v) for k, v in batch.items()}
        trainer.model.zero_grad()
        trainer._compute_loss(trainer.model, sub).backward()
        norm = sum(p.grad.norm() ** 2 for p in params if p.grad is not None) ** 0.5
        assert torch.isfinite(norm) and norm > 0, f"no gradient from part {code}"
    trainer.model.zero_grad()


def test_tiny_train_with_iterations_beta_steps_per_generation_and_peft(tmp_path):
    from peft import LoraConfig

    from rlnlp.models import load_policy

    model, tok = load_policy(device="cpu", dtype=torch.float32)
    cfg = _config(tmp_path, per_device_train_batch_size=2, num_generations=2, num_iterations=2, beta=0.04,
                  steps_per_generation=2, max_steps=3, learning_rate=1e-3, logging_steps=1,
                  internalization_rule="positive")
    seen = []

    def reward(prompts, completions, completion_ids, **kw):  # alternating rewards: every group has variance
        seen.append(len(completions))
        return [float(i % 2) for i in range(len(completions))]

    t = ERLTrainer(model=model, reward_funcs=reward, args=cfg,
                   train_dataset=ft.load_split("train", "arithmetic", limit=8),
                   processing_class=tok, feedback_func=ft.feedback_func,
                   peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    lora = {n: p.detach().clone() for n, p in t.model.named_parameters() if "lora_B" in n}
    t.train()
    logs = [h for h in t.state.log_history if "loss" in h and "train_runtime" not in h]
    assert len(logs) == 3 and seen[:2] == [4, 2]  # one generation (2 × steps_per_generation rows) served 3 steps
    for h in logs:
        for key in ("loss", "kl", "losses/grpo", "entropy"):
            assert math.isfinite(h[key]), (key, h)
    buffered = t._buffered_inputs[0]
    extra = buffered["erl_part"] > 0
    assert extra.any() and {"old_per_token_logps", "ref_per_token_logps"} <= set(buffered)
    assert (buffered["old_per_token_logps"][extra] * buffered["completion_mask"][extra]).abs().sum() > 0
    assert any(not torch.equal(p.detach(), lora[n]) for n, p in t.model.named_parameters() if n in lora)


def test_seed_readme_quick_start_runs(tmp_path):
    """The seed README's quick start, with the embedded model for the hub id and a tiny budget."""
    from peft import LoraConfig

    from rlnlp.erl import ERLConfig, ERLTrainer
    from rlnlp.models import resolve_policy

    dataset = ft.load_split("train", "json_key", limit=4)

    def reward_func(prompts, completions, **kwargs):
        return ft.reward_func(prompts, completions, **kwargs)

    def feedback_func(prompts, completions, **kwargs):
        return ft.feedback_func(prompts, completions, **kwargs)

    config = ERLConfig(
        output_dir=str(tmp_path / "erl-output"),
        num_train_epochs=3,
        learning_rate=1e-6,
        per_device_train_batch_size=4,
        num_generations=4,
        reward_threshold=1.0,
        memory_size=50,
        memory_top_k=3,
        internalization_coef=1.0,
        max_steps=1, max_completion_length=8, reflection_max_new_tokens=8, report_to="none", save_strategy="no",
    )
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    trainer = ERLTrainer(
        model=resolve_policy(),
        args=config,
        train_dataset=dataset,
        reward_funcs=reward_func,
        feedback_func=feedback_func,
        peft_config=lora_config,
    )
    trainer.train()
    logged = trainer.state.log_history[0]  # the default logging_steps: one entry at the end, with TRL's train_loss
    for key in ("charts/r1", "stats/gate_fraction", "stats/memory_size", "stats/rows_y1", "losses/grpo", "train_loss",
                "entropy"):
        assert key in logged and math.isfinite(logged[key]), (key, logged.get(key))
    assert logged["stats/rows_y1"] == 4
    assert json.dumps(trainer.examples[:1])  # example rows are plain data


@pytest.mark.full_dryrun
def test_full_preset_one_erl_step_on_cpu(tmp_path):
    """One ERL step with the full preset's shapes (32 rows × 32 tokens, LoRA) on the CPU."""
    from rlnlp.models import load_policy

    cfg = ERLConfig.full(output_dir=str(tmp_path), max_steps=1, use_cpu=True, bf16=False)
    model, tok = load_policy(device="cpu", dtype=torch.float32)
    t = erl.make_trainer(cfg, "erl", model, tok)
    t.train()
    h = t.state.log_history[0]
    assert h["stats/rows_y1"] == cfg.per_device_train_batch_size and math.isfinite(h["loss"])
