"""Tests for spec 04 (recurve / ArCHer): task files, utterance splitting, critic math, target updates, the 20Q oracle."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from rlnlp.archer import (ArcherConfig, Critic, DoubleCritic, Transition, act, actor_step, hard_update, polyak_update,
                          q_targets, v_target)
from rlnlp.envs.recurve import RecurveEnv, TaskFileError, TaskFunctionError, load_task
from rlnlp.envs.twenty_questions import Oracle, TwentyQuestions

ROOT = Path(__file__).resolve().parent.parent
SEED_FILE = ROOT / "data" / "recurve" / "best_lang.yaml"

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
    for text in u.texts:
        full = primed + text
        if env.task.done(full, 0):
            cut = text.removesuffix(tok.eos_token)
            assert not env.task.done(primed + cut[:-1], 0)  # one character earlier it was not done yet


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


def test_critic_loss_matches_a_hand_computation():
    cfg = ArcherConfig.smoke(critic_hidden=8, gamma=0.5)
    torch.manual_seed(0)
    critic = Critic(cfg, _FakeEncoder(), device="cpu")
    batch = [Transition("s", "aa", -1.0, "s2", False), Transition("ss", "b", 0.0, "end", True)]
    loss, stats = critic.loss(batch, ["s"], ["aaa"])
    enc = _FakeEncoder()
    hs, ha, hs2 = enc.embed(["s", "ss"]), enc.embed(["aa", "b"]), enc.embed(["s2", "end"])
    tv1, tv2 = critic.target.v1(hs2).squeeze(-1), critic.target.v2(hs2).squeeze(-1)
    y1 = torch.tensor([-1.0, 0.0]) + 0.5 * torch.tensor([1.0, 0.0]) * tv1
    y2 = torch.tensor([-1.0, 0.0]) + 0.5 * torch.tensor([1.0, 0.0]) * tv2
    x = torch.cat([hs, ha], -1)
    lq = ((critic.net.q1(x).squeeze(-1) - y1) ** 2).mean() + ((critic.net.q2(x).squeeze(-1) - y2) ** 2).mean()
    xf = torch.cat([enc.embed(["s"]), enc.embed(["aaa"])], -1)
    yv = torch.minimum(critic.target.q1(xf), critic.target.q2(xf)).squeeze(-1)
    hf = enc.embed(["s"])
    lv = ((critic.net.v1(hf).squeeze(-1) - yv) ** 2).mean() + ((critic.net.v2(hf).squeeze(-1) - yv) ** 2).mean()
    assert torch.allclose(loss, lq + lv, atol=1e-6)


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
def oracle():
    return Oracle(QUESTIONS, OBJECTS, threshold=0.7)


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


def test_oracle_on_the_shipped_table():
    from rlnlp.data import twenty_questions

    questions, objects = twenty_questions()
    oracle = Oracle(questions, objects)
    by_name = {o["object"]: o for o in objects}
    dog = by_name["dog"]
    assert oracle.answer("Does it fly?", dog)[0] == ("Yes." if dog["answers"]["q05"] else "No.")
    assert oracle.answer("Does it have wheels?", dog)[1]["kind"] == "unknown"  # closest is "legs", below 0.7
    assert oracle.answer("Is it a dog?", dog)[1]["correct"]


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
