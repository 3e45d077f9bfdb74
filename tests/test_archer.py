"""Tests for recurve / ArCHer (notebook 04): task files, utterance splitting, critic math, target updates, the 20Q
oracle and its paraphrase test, the fresh-action advantage, bootstrapping, matched baselines, the command line
(one-line errors, kill-and-resume) and the full preset's shapes."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import rlnlp.archer as archer
import rlnlp.archer.training as archer_training
from rlnlp.archer import (
    ArcherConfig,
    Critic,
    DoubleCritic,
    ReplayBuffer,
    Transition,
    act,
    actor_step,
    archer_actor_steps,
    critic_phase,
    episode_advantages,
    evaluate,
    hard_update,
    main,
    polyak_update,
    q_targets,
    train_archer,
    train_baseline,
    v_target,
    with_task,
)
from rlnlp.envs.recurve import RecurveEnv, TaskFileError, TaskFunctionError, load_task
from rlnlp.envs.twenty_questions import Oracle, TwentyQuestions, score_paraphrases, strip_negation

ROOT = Path(__file__).resolve().parent.parent
SEED_FILE = ROOT / "data" / "recurve" / "best_lang.yaml"
CAPITALS = ROOT / "data" / "recurve" / "capital_choice.yaml"

GOOD = """\
main_prompt: "You are a helpful assistant."
items:
  - prompt: Say hi.
    answer: hi
score_fn: |
  def score_fn(text: str, answer: str):
    return answer in text.split("assistant")[-1]
done_fn: |
  def done_fn(text: str):
    return text.endswith("!")
split_fn: |
  def split_fn(output: str):
    return "\\n" in output
"""


def write(tmp_path, text: str, name: str = "task.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# ---- task files ------------------------------------------------------------------------------------

def test_seed_file_loads_with_its_exact_functions():
    task = load_task(SEED_FILE)
    assert task.main_prompt == "You are a helpful assistant."
    assert [it.answer for it in task.items] == ["Rust"]
    assert task.lines == {"score_fn": 6, "done_fn": 11, "split_fn": 18}  # where each `def` sits in the file
    reply = "<|im_start|>assistant\n1. C\n2. Go\nThe best programming language is Rust."
    assert task.score(reply, 0) == 1.0 and task.done(reply, 0)
    assert task.score(reply.replace("Rust", "Go!"), 0) == 0.0
    assert not task.done("<|im_start|>assistant\nThe best programming language is Rust", 0)


@pytest.mark.parametrize("path", sorted((ROOT / "data" / "recurve").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_task_file_loads(path):
    assert load_task(path).items


@pytest.mark.parametrize("mutate, field, line, words", [
    (lambda s: s.replace('main_prompt: "You are a helpful assistant."\n', ""), "main_prompt", 1, "missing key"),
    (lambda s: s.replace("    answer: hi\n", ""), "items[0].answer", 3, "no 'answer'"),
    (lambda s: s.replace("return text.endswith", "return text.endswith(("), "done_fn", 10, "does not parse"),
    (lambda s: s.replace("def split_fn(output", "def splitter(output"), "split_fn", 12, "named 'split_fn'"),
    (lambda s: s.replace("def score_fn(text: str, answer: str)", "def score_fn(text: str)"), "score_fn", 6,
     "2 positional parameter"),
])
def test_broken_task_files_name_file_field_and_line(tmp_path, mutate, field, line, words):
    path = write(tmp_path, mutate(GOOD), "broken.yaml")
    with pytest.raises(TaskFileError) as err:
        load_task(path)
    msg = str(err.value)
    assert str(path) in msg and f"field '{field}'" in msg and f"line {line}," in msg and words in msg, msg


def test_function_that_raises_names_function_and_item(tmp_path):
    path = write(tmp_path, GOOD.replace("return answer in", "return 1 / 0 or answer in"))
    task = load_task(path)
    with pytest.raises(TaskFunctionError) as err:
        task.score("assistant hi", 0)
    msg = str(err.value)
    assert "score_fn" in msg and "ZeroDivisionError" in msg and "item 0" in msg and "line 6" in msg, msg


def test_function_with_wrong_return_type_is_reported(tmp_path):
    task = load_task(write(tmp_path, GOOD.replace('return text.endswith("!")', 'return "yes"')))
    with pytest.raises(TaskFunctionError, match="done_fn .*must return a bool"):
        task.done("x", 0)


def test_answers_keep_their_written_text(tmp_path):
    task = load_task(write(tmp_path, GOOD.replace("answer: hi", "answer: yes")))
    assert task.items[0].answer == "yes"  # YAML 1.1 would have made it True


# ---- the recurve environment and utterance splitting ------------------------------------------------------

@pytest.fixture(scope="module")
def policy():
    from rlnlp import load_policy

    return load_policy(trainable=False)


def test_env_renders_chat_so_the_seed_split_finds_the_reply(policy):
    _, tok = policy
    env = RecurveEnv(SEED_FILE, tokenizer=tok, max_utterances=5)
    obs = env.reset(0)
    assert obs.startswith("<|im_start|>system\nYou are a helpful assistant.") and obs.endswith("assistant\n")
    assert obs.split("assistant")[-1] == "\n"  # the last "assistant" is the open turn's header
    obs, r, done, info = env.step("1. C: fast.\n")
    assert (r, done) == (0.0, False)
    obs, r, done, info = env.step("The best programming language is Rust.")
    assert done and r == 1.0 and info["ended_by"] == "done_fn" and info["success"]
    env.reset(0)
    _, r, done, info = env.step("I will not answer." + tok.eos_token)
    assert done and r == 0.0 and info["ended_by"] == "end_of_turn"


def test_act_keeps_rows_aligned_when_prompts_repeat(policy):
    """Rows of one observation that repeats out of order (acting states + fresh a′ + fresh a″ in one call) keep
    their own prompt, and the sampling log-probs are those of the policy on that prompt."""
    from rlnlp import completion_logprobs

    model, tok = policy
    env = RecurveEnv(CAPITALS, tokenizer=tok, max_utterances=1)
    a, b, c = (env.reset(s) for s in (0, 1, 2))
    assert len({a, b, c}) == 3
    obs = [a, b, a, c, b, a]
    u = act(model, tok, env, obs, ArcherConfig.smoke(utterance_tokens=5), seed=0)
    s = u.samples
    assert [tok.decode(s.prompt_ids[i][s.prompt_mask[i].bool()]) for i in range(6)] == obs and u.observations == obs
    with torch.no_grad():
        lp = completion_logprobs(model, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask)
    assert torch.allclose(lp, s.logprobs, atol=1e-4)


def test_act_cuts_utterances_at_split_and_done(policy):
    model, tok = policy
    env = RecurveEnv(SEED_FILE, tokenizer=tok)
    obs = env.reset(0)
    cfg = ArcherConfig.smoke(utterance_tokens=24)
    u = act(model, tok, env, [obs] * 4, cfg, seed=0)
    for text, mask in zip(u.texts, u.samples.completion_mask):
        body = text.removesuffix(tok.eos_token)
        # the only newline, if any, is the token that ended the utterance
        assert "\n" not in body.rstrip("\n")
        assert int(mask.sum()) <= 24
    # done_fn mid-utterance: a reply that reaches "best programming language is X." is cut right there
    primed = obs + "The best programming language is"
    u = act(model, tok, env, [primed] * 4, cfg, seed=1)
    s = u.samples
    done = [i for i, text in enumerate(u.texts) if env.task.done(primed + text, 0)]
    assert done, u.texts  # precondition: some reply reached "… is X." (else the loop below checks nothing)
    for i in done:  # one token earlier it was not done yet (a token may be ".\n")
        n = int(s.completion_mask[i].sum())
        before = tok.decode(s.completion_ids[i, : n - 1], skip_special_tokens=True)
        assert not env.task.done(primed + before, 0) and s.stopped[i]
    # Mutation seen to fail: without act's done_fn cut (``if cut < length`` never taken) replies run past the "."


# ---- critic math ------------------------------------------------------------------------------------

def test_q_and_v_targets_by_hand():
    r = torch.tensor([-1.0, 0.0, 1.0])
    d = torch.tensor([0.0, 1.0, 0.0])
    v1 = torch.tensor([-2.0, 5.0, 0.5])
    v2 = torch.tensor([-3.0, 5.0, 1.0])
    y1, y2 = q_targets(r, d, v1, v2, gamma=0.9)
    assert torch.allclose(y1, torch.tensor([-1 + 0.9 * -2.0, 0.0, 1 + 0.9 * 0.5]))
    assert torch.allclose(y2, torch.tensor([-1 + 0.9 * -3.0, 0.0, 1 + 0.9 * 1.0]))
    assert torch.equal(v_target(torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])), torch.tensor([0.5, -2.0]))


class _FakeEncoder:
    """Deterministic 4-d 'embeddings' so the critic loss can be computed by hand."""

    dim = 4

    def embed(self, texts):
        return torch.tensor([[len(t), t.count("a"), 1.0, 0.0] for t in texts], dtype=torch.float32)


def _set_mlp(mlp: torch.nn.Sequential, first: list[float], scale: float) -> None:
    """A hidden-width-1 MLP that computes scale · relu(first · x): layer 2 passes its input through."""
    with torch.no_grad():
        for layer, w in zip((mlp[0], mlp[2], mlp[4]), ([first], [[1.0]], [[scale]])):
            layer.weight.copy_(torch.tensor(w))
            layer.bias.zero_()


def test_critic_loss_matches_a_hand_computation():
    """L_Q and L_V on numbers worked out by hand. Embeddings h(t) = [len t, count of "a", 1, 0]; each head is
    scale · relu(w · x) with hand-set weights (online and target differ, so using the wrong one shows).

    online  Q1 = len s + #a(a)  Q2 = 2        V1 = len s   V2 = 2
    target  Q̄1 = len a          Q̄2 = len s   V̄1 = 4       V̄2 = 3
    batch   (s, aa, r −1, s2, not done), (ss, b, r 0, end, done);  fresh (s, aaa);  γ = 0.5
    y1 = r + γ(1 − d)V̄1(s′) = [−1 + 0.5·4, 0] = [1, 0];   Q1 = [1 + 2, 2 + 0] = [3, 2]   → MSE (4 + 4)/2 = 4
    y2 = [−1 + 0.5·3, 0] = [0.5, 0];                     Q2 = [2, 2]                 → MSE (2.25 + 4)/2 = 3.125
    y_V = min(Q̄1, Q̄2)(s, aaa) = min(3, 1) = 1;          V1(s) = 1, V2(s) = 2       → L_V = 0 + 1 = 1
    L = 4 + 3.125 + 1 = 8.125

    Mutations seen to fail: max instead of min in v_target (L_V = 4 + 1); the online V in the Q target
    (y1 = [0, 0]); dropping (1 − d) (y1 = [1, 2])."""
    cfg = ArcherConfig.smoke(critic_hidden=1, gamma=0.5)
    critic = Critic(cfg, _FakeEncoder(), device="cpu")
    #        h_s: len  #a  1  0 | h_a: len  #a  1  0
    _set_mlp(critic.net.q1, [1, 0, 0, 0, 0, 1, 0, 0], 1.0)
    _set_mlp(critic.net.q2, [0, 0, 1, 0, 0, 0, 1, 0], 1.0)
    _set_mlp(critic.net.v1, [1, 0, 0, 0], 1.0)
    _set_mlp(critic.net.v2, [0, 0, 1, 0], 2.0)
    _set_mlp(critic.target.q1, [0, 0, 0, 0, 1, 0, 0, 0], 1.0)
    _set_mlp(critic.target.q2, [1, 0, 0, 0, 0, 0, 0, 0], 1.0)
    _set_mlp(critic.target.v1, [0, 0, 1, 0], 4.0)
    _set_mlp(critic.target.v2, [0, 0, 1, 0], 3.0)
    batch = [Transition("s", "aa", -1.0, "s2", False), Transition("ss", "b", 0.0, "end", True)]
    loss, stats = critic.loss(batch, ["s"], ["aaa"])
    assert loss.item() == pytest.approx(8.125)
    assert stats["losses/q"] == pytest.approx(7.125) and stats["losses/v"] == pytest.approx(1.0)
    assert stats["stats/q_target_mean"] == pytest.approx(0.5) and stats["stats/q_mean"] == pytest.approx(2.5)


def test_critic_fits_a_tiny_problem():
    cfg = ArcherConfig.smoke(critic_hidden=32, critic_lr=1e-2, gamma=0.5)
    torch.manual_seed(0)
    critic = Critic(cfg, _FakeEncoder(), device="cpu")
    # one-step episodes: reward 1 for action "aa", 0 for "b"
    batch = [Transition("s", "aa", 1.0, "end", True), Transition("s", "b", 0.0, "end", True)]
    first = critic.update(batch, ["s"], ["aa"])["losses/q"]
    for _ in range(300):
        last = critic.update(batch, ["s", "s"], ["aa", "b"])
    q = critic.values(["s", "s"], ["aa", "b"])["q"]
    assert last["losses/q"] < 0.05 * first and abs(q[0] - 1) < 0.1 and abs(q[1]) < 0.1


@pytest.mark.parametrize("mode", ["separate", "joint"])
def test_critic_input_joint_reads_state_and_utterance_together(mode, monkeypatch):
    """Q's second input: the utterance alone ("separate"), or ONE embedding of the state's text with the utterance
    ("joint"), in values(), in L_Q's replay batch and in L_V's target on fresh utterances. Mutation seen to fail:
    embed_actions ignoring critic_input."""
    cfg = ArcherConfig.smoke(critic_hidden=8, critic_input=mode)
    critic = Critic(cfg, _FakeEncoder(), device="cpu")
    seen = []
    q = critic.net.q
    monkeypatch.setattr(critic.net, "q", lambda h_s, h_a: (seen.append(h_a.clone()), q(h_s, h_a))[1])
    monkeypatch.setattr(critic.target, "q", lambda h_s, h_a: (seen.append(h_a.clone()), q(h_s, h_a))[1])
    critic.values(["aaa", "b"], ["ab", "ab"])
    critic.update([Transition("aaa", "ab", 0.0, "end", True)], ["b"], ["ab"])
    want = {"separate": [["ab", "ab"], ["ab"], ["ab"]], "joint": [["aaa → ab", "b → ab"], ["b → ab"], ["aaa → ab"]]}
    expect = [_FakeEncoder().embed(t) for t in want[mode]]
    assert len(seen) == 3 and all(torch.equal(a, b) for a, b in zip(seen, expect))
    assert torch.equal(seen[0][0], seen[0][1]) == (mode == "separate")  # one utterance, two states


def test_polyak_and_hard_target_updates():
    torch.manual_seed(0)
    online, target = DoubleCritic(4, 8), DoubleCritic(4, 8)
    before = [p.clone() for p in target.parameters()]
    polyak_update(target, online, tau=0.1)
    for b, t, o in zip(before, target.parameters(), online.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * o)
    hard_update(target, online)
    assert all(torch.equal(t, o) for t, o in zip(target.parameters(), online.parameters()))


def test_hard_schedule_copies_every_n_steps():
    cfg = ArcherConfig.smoke(critic_hidden=8, target_update="hard", hard_update_every=3)
    critic = Critic(cfg, _FakeEncoder(), device="cpu")
    batch = [Transition("s", "a", 1.0, "t", True)]
    snapshot = [p.clone() for p in critic.target.parameters()]
    for step in range(1, 4):
        critic.update(batch, ["s"], ["a"])
        same_as_start = all(torch.equal(a, b) for a, b in zip(snapshot, critic.target.parameters()))
        same_as_online = all(torch.equal(a, b) for a, b in zip(critic.net.parameters(), critic.target.parameters()))
        assert same_as_start == (step < 3) and same_as_online == (step == 3)


# ---- Twenty Questions oracle (real MiniLM) -------------------------------------------------------------------

QUESTIONS = [
    {"id": "q01", "question": "Is it alive?", "attribute": "alive"},
    {"id": "q02", "question": "Is it bigger than a bread box?", "attribute": "big"},
    {"id": "q03", "question": "Is it made of metal?", "attribute": "metal"},
    {"id": "q04", "question": "Can you eat it?", "attribute": "edible"},
]
OBJECTS = [
    {"object": "dog", "category": "animal", "answers": {"q01": True, "q02": False, "q03": False, "q04": False}},
    {"object": "tennis ball", "category": "toy", "answers": {"q01": False, "q02": False, "q03": False, "q04": False}},
    {"object": "ball", "category": "toy", "answers": {"q01": False, "q02": False, "q03": False, "q04": False}},
    {"object": "car", "category": "vehicle", "answers": {"q01": False, "q02": True, "q03": True, "q04": False}},
]


@pytest.fixture(scope="module")
def oracle(encoder):
    return Oracle(QUESTIONS, OBJECTS, encoder=encoder, threshold=0.7)


def test_oracle_answers_paraphrased_questions(oracle):
    car = OBJECTS[3]
    assert oracle.answer("Is it alive and breathing?", car)[0] == "No."
    assert oracle.answer("Is it made out of metal?", car)[0] == "Yes."
    assert oracle.answer("Can it be eaten?", OBJECTS[0])[0] == "No."
    assert oracle.answer("Is it larger than a breadbox?", car)[0] == "Yes."
    reply, info = oracle.answer("What is your favourite film?", car)
    assert reply == "I don't know." and info["kind"] == "unknown"


def test_oracle_detects_guesses(oracle):
    dog, tennis = OBJECTS[0], OBJECTS[1]
    assert oracle.answer("Is it a dog?", dog)[1] == {"kind": "guess", "guess": "dog", "correct": True}
    assert oracle.answer("Is it a car?", dog)[0] == "No."
    assert oracle.answer("Is it a tennis ball?", tennis)[1]["guess"] == "tennis ball"  # longest name wins
    assert not oracle.answer("Is it a dog or a car?", dog)[1]["correct"]  # one guess per turn
    reply, info = oracle.answer("Is it bigger than a car?", dog)  # names an object without guessing it
    assert info["kind"] != "guess"


@pytest.fixture(scope="module")
def table_oracle(encoder):
    from rlnlp.data import twenty_questions

    questions, objects = twenty_questions()
    return Oracle(questions, objects, encoder=encoder)


def test_oracle_on_the_shipped_table(table_oracle):
    by_name = {o["object"]: o for o in table_oracle.objects}
    dog, car, tree = by_name["dog"], by_name["car"], by_name["tree"]
    assert table_oracle.answer("Does it fly?", dog)[0] == ("Yes." if dog["answers"]["q05"] else "No.")
    assert table_oracle.answer("Does it have wheels?", dog)[1]["kind"] == "unknown"
    assert table_oracle.answer("Is it a dog?", dog)[1]["correct"]
    # category questions come from the table's categories
    assert (
        table_oracle.answer("Is it an animal?", dog)[0] == "Yes."
        and table_oracle.answer("Is it an animal?", car)[0] == "No."
    )
    assert (
        table_oracle.answer("Is it alive?", tree)[0] == "Yes."
        and table_oracle.answer("Is it alive?", car)[0] == "No."
    )
    assert table_oracle.answer("Is it a vehicle?", car)[1]["kind"] == "category"
    # negations: "not" flips the answer; "isn't it ..." asks the positive question
    assert table_oracle.answer("Is it not made by people?", dog)[0] == "Yes."
    assert table_oracle.answer("Is it not made by people?", car)[0] == "No."
    assert table_oracle.answer("Isn't it alive?", dog)[0] == "Yes."
    # two meanings that fit about equally well: no confident answer
    assert table_oracle.answer("Is it an animal or a plant?", car)[0] == "I don't know."


def test_strip_negation():
    assert strip_negation("Is it not alive?") == ("is it alive?", True)
    assert strip_negation("Isn't it alive?") == ("is it alive?", False)
    assert strip_negation("Doesn't it fly?") == ("does it fly?", False)
    assert strip_negation("It can't fly, can it?") == ("it can fly, can it?", True)
    assert strip_negation("Does it never fly?") == ("does it fly?", True)
    assert strip_negation("Is it a knot?") == ("is it a knot?", False)


def test_oracle_scores_on_the_hand_written_paraphrases(table_oracle):
    """The bar the oracle must clear: accuracy ≥ 0.9, wrong answers ≤ 0.02,
    off-table questions confidently answered ≤ 0.1, every category question of the test set answered;
    on paraphrases written apart from the oracle's bank."""
    from rlnlp.envs.twenty_questions import load_paraphrases

    rows = load_paraphrases()
    bank = {t.lower() for t, _ in table_oracle.bank}
    assert len(rows) >= 150 and sum(r["means"] is None for r in rows) >= 25
    assert sum(r["question"].lower() in bank for r in rows) < 0.5 * len(rows)  # mostly not the bank's own phrasings
    score = score_paraphrases(table_oracle, rows)
    assert score["accuracy"] >= 0.9 and score["wrong"] <= 0.02 and score["off_table_confident"] <= 0.1, \
        {k: v for k, v in score.items() if k != "details"}
    category_rows = [d for d in score["details"] if (d["means"] or "").startswith("cat:")]
    answered = [d for d in category_rows if d["read_as"] is not None]
    assert len(answered) >= 0.85 * len(category_rows)


def test_twenty_questions_rewards_and_cap(oracle):
    env = TwentyQuestions(oracle=oracle, max_turns=3)
    env.reset(0)
    env.secret = OBJECTS[0]
    obs, r, done, _ = env.step("Is it alive?")
    assert (r, done) == (-1.0, False) and "1. Is it alive? Yes." in obs
    obs, r, done, info = env.step("Is it a dog?")
    assert (r, done, info["success"]) == (0.0, True, True)
    env.reset(1)
    results = [env.step("Is it alive?") for _ in range(3)]
    assert [x[1] for x in results] == [-1.0] * 3 and results[-1][2] and not results[-1][3]["success"]


# ---- actor update (real SmolLM2 + LoRA) -------------------------------------------------------------------

@pytest.mark.parametrize("loss", ["reinforce", "ppo"])
def test_actor_step_follows_the_utterance_advantage(loss):
    from rlnlp import attach_lora, completion_logprobs, load_policy

    torch.manual_seed(0)
    model, tok = load_policy()
    model = attach_lora(model, r=4, alpha=8, dropout=0.0)
    cfg = ArcherConfig.smoke(actor_loss=loss, actor_lr=5e-3, kl_coef=0.1 if loss == "ppo" else 0.0, ppo_epochs=1)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.actor_lr)
    class Rules:  # Twenty Questions' utterance rules without building its oracle
        chat, split = True, staticmethod(TwentyQuestions.split)

    u = act(model, tok, Rules(), ["Ask me a yes/no question about animals."] * 2, cfg, seed=0)
    s = u.samples

    def seq_logp():
        with torch.no_grad():
            return completion_logprobs(model, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask).sum(1)

    before = seq_logp()
    stats = actor_step(model, opt, u, torch.tensor([1.0, -1.0]), cfg)
    after = seq_logp()
    assert after[0] > before[0] and after[1] < before[1], (before, after)
    assert all(np.isfinite(v) for v in stats.values()) and (("stats/kl" in stats) == (loss == "ppo"))


# ---- the short-answer task, reply_prefix and fixed evaluation episodes --------------------------------------------

def test_reply_prefix_starts_the_reply(policy, tmp_path):
    _, tok = policy
    task = load_task(CAPITALS)
    assert task.items[0].reply_prefix == "The capital of Australia is"
    env = RecurveEnv(task, tokenizer=tok, max_utterances=1)
    obs = env.reset(0)
    item = task.items[env.item]
    assert obs.endswith("assistant\n" + item.reply_prefix)
    _, r, done, info = env.step(f" {item.answer}, not the biggest city.")
    assert done and r == 1.0 and info["ended_by"] == "done_fn"
    env.reset(0)
    wrong = next(c for c in ("Sydney", "Toronto") if c != item.answer)
    assert env.step(f" {wrong}, not {item.answer}.")[1] == 0.0  # the first city named counts
    # a file-level reply_prefix applies to items without their own
    path = write(tmp_path, GOOD.replace('main_prompt: "You are a helpful assistant."',
                                        'main_prompt: "You are a helpful assistant."\nreply_prefix: "Well,"'))
    assert load_task(path).items[0].reply_prefix == "Well,"
    assert load_task(SEED_FILE).items[0].reply_prefix == ""


def test_evaluation_replays_the_same_episodes(policy, encoder):
    model, tok = policy
    cfg = with_task(ArcherConfig.smoke(), "capital_choice", eval_episodes=8)
    a = evaluate(model, tok, cfg, encoder=encoder)
    b = evaluate(model, tok, cfg, encoder=encoder)
    c = evaluate(model, tok, cfg, encoder=encoder, seed=123)
    assert (
        a["starts"] == b["starts"]
        and [e.actions for e in a["trajectories"]] == [e.actions for e in b["trajectories"]]
    )
    assert a["starts"] != c["starts"]
    import random

    assert [e.infos[-1]["item"] for e in a["trajectories"]] == [random.Random(s).randrange(8) for s in a["starts"]]


# ---- bootstrapping and the fresh-action advantage, through train_archer's own steps ------------------------------

class _OneHot:
    """A different unit vector per text (so states that look alike to _FakeEncoder stay apart)."""

    dim = 8

    def __init__(self):
        self.ids = {}

    def embed(self, texts):
        out = torch.zeros(len(texts), self.dim)
        for i, t in enumerate(texts):
            out[i, self.ids.setdefault(t, len(self.ids) % self.dim)] = 1.0
        return out


def test_critic_phase_bootstraps_through_non_terminal_transitions():
    """A two-step chain s0 -go-> s1 -stop-> end with the reward only at the end: Q(s0, go) must reach γ·1,
    which only happens if done = False transitions take r + γ·V̄(s′) (a critic treating every transition as
    terminal leaves it at 0)."""
    cfg = ArcherConfig.smoke(critic_hidden=32, critic_lr=1e-2, gamma=0.5, critic_steps=50, critic_batch=8)
    torch.manual_seed(0)
    critic = Critic(cfg, _OneHot(), device="cpu")
    buffer = ReplayBuffer(100, seed=0)
    buffer.add([Transition("s0", "go", 0.0, "s1", False), Transition("s1", "stop", 1.0, "end", True)])
    for _ in range(12):
        stats = critic_phase(critic, buffer, ["s0", "s1"], ["go", "stop"], cfg)
    q = critic.values(["s0", "s1"], ["go", "stop"])
    v = critic.values(["s0", "s1"], ["go", "stop"])["v"]
    assert abs(q["q"][1] - 1.0) < 0.1 and abs(q["q"][0] - 0.5) < 0.1, q
    assert abs(v[0] - 0.5) < 0.1 and stats["losses/critic"] < stats["losses/critic_first"] + 1e-9


def tiny(**kw) -> ArcherConfig:
    base = dict(num_envs=2, env_steps=4, fresh_batch=2, critic_steps=2, critic_batch=4, warmup_iters=0,
                eval_episodes=2, critic_hidden=16, checkpoint_every=0)
    return with_task(ArcherConfig.smoke(), "capital_choice", **{**base, **kw})


def test_v_step_uses_fresh_actions_and_the_actor_a_second_fresh_sample(monkeypatch, encoder):
    """Inside train_archer: L_V's a′ are this iteration's freshly sampled utterances (not replay actions), the
    actor trains on a SECOND fresh sample a″ that no critic step saw, and A = min Q − min V of a″ comes from the
    ONLINE critic after its update."""
    log = []
    real_act, real_update, real_values, real_actor = archer.act, Critic.update, Critic.values, archer.actor_step

    def spy_act(*a, **k):
        u = real_act(*a, **k)
        call = sum(1 for e in log if e[0] == "act")
        u.texts = [f"{t} #{call}.{i}" for i, t in enumerate(u.texts)]  # every sampled row is recognisable
        log.append(("act", u))
        return u

    def spy_update(self, batch, fresh_obs, fresh_actions):
        log.append(("update", list(fresh_obs), list(fresh_actions), [t.action for t in batch]))
        return real_update(self, batch, fresh_obs, fresh_actions)

    def spy_values(self, obs, actions, target=False):
        out = real_values(self, obs, actions, target)
        log.append(("values", list(obs), list(actions), target, out))
        return out

    def spy_actor(model, opt, u, advantages, cfg):
        log.append(("actor", list(u.texts), advantages.clone()))
        return real_actor(model, opt, u, advantages, cfg)

    # patched where train_archer looks them up (rlnlp.archer.training), or the spies see nothing: with the
    # patch on the package instead, this test fails at its first assert (no "act" logged)
    monkeypatch.setattr(archer_training, "act", spy_act)
    monkeypatch.setattr(Critic, "update", spy_update)
    monkeypatch.setattr(Critic, "values", spy_values)
    monkeypatch.setattr(archer_training, "actor_step", spy_actor)
    cfg = tiny()
    train_archer(cfg, "spy", encoder=encoder)
    acts = [i for i, e in enumerate(log) if e[0] == "act"]
    assert len(acts) == 2 and sum(e[0] == "actor" for e in log) == 2
    for k, start in enumerate(acts):
        end = acts[k + 1] if k + 1 < len(acts) else len(log)
        u = log[start][1]
        n, F_ = cfg.num_envs, (len(u.texts) - cfg.num_envs) // 2
        executed, a1, a2 = u.texts[:n], u.texts[n:n + F_], u.texts[n + F_:]
        events = log[start + 1:end]
        updates = [e for e in events if e[0] == "update"]
        assert len(updates) == cfg.critic_steps
        for _, fresh_obs, fresh_actions, replay_actions in updates:
            assert fresh_actions == a1 and fresh_obs == u.observations[n:n + F_]
            assert not set(fresh_actions) & set(replay_actions)  # a′ are not replay actions
        actor = next(i for i, e in enumerate(events) if e[0] == "actor")
        assert events[actor][1] == a2 and not set(a2) & set(a1) and not set(a2) & set(executed)
        vals = [e for e in events[:actor] if e[0] == "values"]
        assert vals and vals[-1][2] == a2 and vals[-1][3] is False  # online critic, on a″
        assert all(e[0] != "update" for e in events[actor - 1:])  # after every critic step of the iteration
        a_raw = vals[-1][4]["q"] - vals[-1][4]["v"]
        assert torch.allclose(events[actor][2], a_raw / (a_raw.std() + 1e-8))  # normalize_advantage: scale only


# ---- baselines: matched on environment samples AND gradient steps ------------------------------------------------

def test_episode_advantages_by_hand():
    g = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    grpo = episode_advantages(g, "grpo", group_size=4)
    first = (g[:4] - g[:4].mean()) / g[:4].std()
    assert torch.allclose(grpo[:4], first, atol=1e-6) and torch.equal(grpo[4:], torch.zeros(4))  # no variance: A = 0
    ppo = episode_advantages(g, "ppo")
    assert torch.allclose(ppo, (g - g.mean()) / g.std(), atol=1e-6)


@pytest.mark.parametrize("kind", ["ppo", "grpo"])
def test_baseline_matches_archer_on_samples_and_gradient_steps(kind, encoder):
    cfg = tiny(env_steps=8, warmup_iters=1, group_size=2)
    run = train_baseline(cfg, f"match_{kind}", encoder=encoder, kind=kind)
    assert run.env_steps == cfg.env_steps and run.grad_steps == archer_actor_steps(cfg) == 3
    starts = [ep.observations[0] for ep in run.episodes]
    if kind == "grpo":  # groups of episodes from the same start
        assert all(starts[i] == starts[i + 1] for i in range(0, len(starts), 2))
    row = run.df.dropna(subset=["charts/iteration"]).iloc[-1]
    assert row["charts/grad_steps"] == 3 and row["charts/env_steps"] == 8


# ---- the command line ------------------------------------------------------------------------------------------------

BROKEN = [
    ("missing key", lambda s: s.replace('main_prompt: "You are a helpful assistant."\n', ""), "main_prompt"),
    ("item without answer", lambda s: s.replace("    answer: hi\n", ""), "items[0].answer"),
    ("does not parse", lambda s: s.replace("return text.endswith", "return text.endswith(("), "done_fn"),
    ("wrong name", lambda s: s.replace("def split_fn(output", "def splitter(output"), "split_fn"),
    ("wrong arity", lambda s: s.replace("def score_fn(text: str, answer: str)", "def score_fn(text: str)"), "score_fn"),
    ("not yaml", lambda s: s.replace("items:", "items: [unclosed"), "(yaml)"),
]


@pytest.mark.parametrize("what, mutate, field", BROKEN, ids=[b[0] for b in BROKEN])
def test_cli_broken_task_file_is_one_line(what, mutate, field, tmp_path, capsys):
    path = write(tmp_path, mutate(GOOD), "broken.yaml")
    assert main(["train", "--dataset", str(path), "--profile", "smoke"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(path) in err and field in err and "Traceback" not in err, err


def test_cli_user_mistakes_are_one_line(tmp_path, capsys):
    cases = [
        (["train", "--dataset", str(tmp_path / "nope.yaml")], "no such task file"),
        (["eval", "--exp-path", str(tmp_path / "missing_run")], "no such run folder"),
        (["train", "--resume"], "--resume needs --name"),
    ]
    run = tmp_path / "a_run"
    (run / "checkpoints" / "latest" / "actor").mkdir(parents=True)
    (run / "run.json").write_text('{"algo": "archer", "config": {}}')
    cases.append(
        (["eval", "--exp-path", str(run), "--chkpt-label", "best"], "no checkpoint 'best' (checkpoints here: latest)")
    )
    for argv, words in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and words in err and "Traceback" not in err, (argv, err)


def test_cli_entry_point_prints_no_traceback(tmp_path):
    path = write(tmp_path, BROKEN[2][1](GOOD), "broken.yaml")
    out = subprocess.run([sys.executable, "-m", "rlnlp.archer", "train", "--dataset", str(path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert [line for line in out.stderr.splitlines() if line.startswith("python -m rlnlp.archer:")] == [
        out.stderr.strip()
    ], out.stderr


@pytest.mark.parametrize("argv, words", [
    (["--env-steps", "-5"], "--env-steps: '-5' is not an integer ≥ 1"),
    (["--max-turns", "0"], "--max-turns: '0' is not an integer ≥ 1"),
    (["--seed", "-1"], "--seed: '-1' is not an integer ≥ 0"),
    (["--kl-coef", "-0.5"], "ArcherConfig.kl_coef must be a finite number ≥ 0, got -0.5"),
])
def test_cli_bad_numbers_stop_before_any_model_loads(argv, words, capsys, monkeypatch):
    """Without the parser's types (``type=int``) and the config's checks, ``--env-steps -5`` trained and exited 0."""
    monkeypatch.setattr(archer_training, "load_policy", lambda *a, **k: pytest.fail("a model loaded"))
    assert main(["train", "--dataset", str(CAPITALS), "--profile", "smoke", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err and "Traceback" not in err, err


@pytest.mark.parametrize("field, value, words", [
    ("actor_loss", "ppo2", "ArcherConfig.actor_loss must be one of 'reinforce', 'ppo', got 'ppo2'"),
    ("target_update", "soft", "ArcherConfig.target_update must be one of 'polyak', 'hard', got 'soft'"),
    ("env_steps", 0, "ArcherConfig.env_steps must be an integer ≥ 1, got 0"),
    ("num_envs", -8, "ArcherConfig.num_envs must be an integer ≥ 1"),
    ("max_turns", 0, "ArcherConfig.max_turns must be an integer ≥ 1"),
    ("seed", -1, "ArcherConfig.seed must be an integer ≥ 0"),
    ("tau", 0.0, "ArcherConfig.tau must be a number in (0, 1]"),
    ("gamma", 1.5, "ArcherConfig.gamma must be a number in [0, 1]"),
])
def test_config_rejects_bad_values_naming_the_field(field, value, words):
    """Every path that builds a config — the presets, ``replace``, with_task — runs the checks (a bad target_update
    used to fail deep in the critic, a bad actor_loss only after warm-up). Mutation: an empty ``_RULES`` (or no
    ``check_choices``) lets these through."""
    with pytest.raises(ValueError, match=re.escape(words)):
        replace(ArcherConfig.smoke(), **{field: value})
    with pytest.raises(ValueError, match=re.escape(words)):
        with_task(ArcherConfig.smoke(), "capital_choice", **{field: value})
    assert getattr(ArcherConfig.smoke(), field) != value  # the preset itself is valid


def test_kill_and_resume_continues_exactly(tmp_path, encoder):
    """Kill a CLI training run after its first checkpoint, resume it, and compare with a run straight through:
    the same metrics row for row (actor, critic, target, optimisers, buffer, environments and RNG restored)."""
    runs = tmp_path / "runs"
    assert os.environ["RLNLP_RUNS"] == str(runs)  # conftest's folder: the in-process runs below use it too
    env = {**os.environ, "RLNLP_PROFILE": "smoke"}
    argv = ["train", "--dataset", str(CAPITALS), "--name", "killed", "--env-steps", "32", "--checkpoint-every", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "rlnlp.archer", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state, meta_file = runs / "killed" / "checkpoints" / "latest" / "state.pt", runs / "killed" / "run.json"
    deadline = time.time() + 240
    while not (state.exists() and meta_file.exists()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    import json

    meta = json.loads((runs / "killed" / "run.json").read_text())
    assert not meta["complete"] and meta["env_steps"] < 32, meta  # killed part-way
    assert main(["train", "--resume", "--name", "killed"]) == 0
    resumed = json.loads((runs / "killed" / "run.json").read_text())
    assert resumed["complete"] and resumed["env_steps"] == 32
    _, cfg, _ = archer.read_run(runs / "killed")
    straight = train_archer(cfg, "straight")  # its own encoder, as the CLI runs have
    import pandas as pd

    a = pd.read_csv(runs / "killed" / "metrics.csv")
    b = straight.df
    keep = [c for c in b.columns if not c.startswith("time/")]
    assert len(a) == len(b)
    differ = [c for c in keep if not np.allclose(a[c].to_numpy(float), b[c].to_numpy(float), atol=1e-5, equal_nan=True)]
    assert not differ, {
        c: [
            (i, x, y) for i, (x, y) in enumerate(zip(a[c], b[c])) if not np.isclose(x, y, atol=1e-5, equal_nan=True)
        ][:3]
        for c in differ
    }


# ---- the full preset's shapes ----------------------------------------------------------------------------------------

@pytest.mark.full_dryrun
def test_full_preset_runs_one_iteration_with_its_shapes(encoder):
    """ArCHer and both baselines, one iteration / round each, with the full preset's batch sizes and caps,
    on the CPU."""
    for task in ("capital_choice", "twenty_questions_6"):
        cfg = with_task(ArcherConfig.full(), task)
        one = dict(env_steps=cfg.num_envs, warmup_iters=0)
        run = train_archer(replace_cfg(cfg, **one), f"full_{task}", encoder=encoder)
        row = run.df.dropna(subset=["charts/iteration"]).iloc[-1]
        assert row["charts/env_steps"] == cfg.num_envs and row["charts/grad_steps"] == 1
        assert run.policy_samples == 3 * cfg.num_envs  # acting, a′ and a″ (the first iteration's states: the starts)
        assert np.isfinite([row["losses/critic"], row["stats/advantage_std"], row["stats/grad_norm"]]).all()
        for kind in ("ppo", "grpo") if task == "capital_choice" else ():  # the notebook runs baselines there only
            b = train_baseline(replace_cfg(cfg, **one), f"full_{task}_{kind}", encoder=encoder, kind=kind, grad_steps=1)
            assert b.env_steps >= cfg.num_envs and b.grad_steps == 1


def replace_cfg(cfg, **kw):
    from dataclasses import replace

    return replace(cfg, **kw)


def test_return_curve_of_a_run_whose_episodes_have_not_ended():
    """A short multi-turn run can stop before any episode ends: its log has no return column at all."""
    import pandas as pd

    running = pd.DataFrame({"charts/env_steps": [8.0, 16.0], "losses/critic": [0.5, 0.4]})
    assert len(archer.ended_episodes(running)) == 0
    assert np.isnan(archer.return_curve(running, bins=4, budget=24)["mean"]).all()
    ended = pd.DataFrame({"charts/env_steps": [8.0, 16.0, 16.0], "charts/episode_return": [np.nan, 1.0, 0.0]})
    c = archer.return_curve(ended, bins=2, budget=16)
    assert list(archer.ended_episodes(ended)["charts/episode_return"]) == [1.0, 0.0]
    assert np.isnan(c["mean"][0]) and c["mean"][1] == 0.5
