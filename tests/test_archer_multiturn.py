"""Multi-turn ArCHer: the games' reference policies, the seed study's arithmetic, turn-level credit, option checks."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from rlnlp.cli import UsageError
from rlnlp.envs.guess_number import GuessNumber, bisect_policy


def play(env, policy, seed):
    env.reset(seed)
    done, total, info = False, 0.0, {}
    while not done:
        _, r, done, info = env.step(policy(env))
        total += r
    return total, info


# ---- guess the number ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("low, high", [(1, 16), (5, 36), (-3, 3)])
def test_bisection_wins_every_secret_within_the_bound(low, high):
    """Mutation: bisect over (1, high) instead of the env's own (low, high) loses secrets when low != 1."""
    bound = math.ceil(math.log2(high - low + 2))
    env = GuessNumber(low=low, high=high, max_turns=bound)
    secrets = set()
    for seed in range(200):
        total, info = play(env, lambda e: e.bisect(), seed)
        secrets.add(env.secret)
        assert info["success"] and total >= -(bound - 1)
        assert bisect_policy(env.text()) == env.bisect() or env.done  # the text says the same as the state
    assert secrets == set(range(low, high + 1))


def test_random_policies_keep_their_promises():
    """random_new never repeats a guess; random_consistent never names a number the answers ruled out.
    Mutation: drop the ``tried`` filter (repeats) or the possible() interval (inconsistent guesses)."""
    env = GuessNumber(high=16, max_turns=16)
    rng = random.Random(0)
    for seed in range(50):
        env.reset(seed)
        done = False
        while not done:
            lo, hi = env.possible()
            a = env.random_consistent(rng)
            assert lo <= int(a) <= hi
            _, _, done, info = env.step(a)
            assert not info["repeated"] and info["consistent"]
        env.reset(seed)
        for _ in range(16):  # 16 new numbers cover the range: the secret is always found
            _, _, done, info = env.step(env.random_new(rng))
            assert not info["repeated"]
            if done:
                break
        assert info["success"]


def test_guess_number_verdicts_history_and_checkpoint_state():
    env = GuessNumber(high=16, max_turns=3)
    env.reset(1)
    s = env.secret
    obs, r, done, info = env.step(str(s - 1) if s > 1 else str(s + 1))
    assert r == -1 and not done and info["verdict"] == ("too low" if s > 1 else "too high")
    assert f"So far: {s - 1 if s > 1 else s + 1} is {info['verdict']}." in obs
    saved = env.state()
    twin = env.clone()
    twin.load_state(saved)
    assert twin.text() == env.text() and twin.possible() == env.possible()
    _, r, done, info = twin.step(f"It is {s}!")
    assert r == 0 and done and info["success"]
    _, _, done, info = env.step("no idea")
    _, _, done, info = env.step("none")
    assert done and info["success"] is False and info["verdict"] == "not a number"


def test_guess_number_prefill_and_split():
    from rlnlp.models import load_tokenizer

    tok = load_tokenizer()
    env = GuessNumber(high=16, max_turns=5, prefill="My guess is", tokenizer=tok)
    obs = env.reset(0)
    assert not env.chat and obs.endswith("<|im_start|>assistant\nMy guess is") and "from 1 to 16" in obs
    obs, *_ = env.step(" 8" + tok.eos_token)  # an utterance ended by EOS carries it
    assert env.history[0][0] == 8 and "So far: 8 is" in obs and obs.endswith("My guess is")
    assert GuessNumber.split(" 12.") and GuessNumber.split(" 3 ") and not GuessNumber.split(" 12")
    assert not GuessNumber.split(" maybe") and GuessNumber.split(" hm\n")
    with pytest.raises(ValueError, match="tokenizer"):
        GuessNumber(prefill="My guess is")
    with pytest.raises(ValueError, match="two numbers"):
        GuessNumber(low=4, high=4)
    with pytest.raises(ValueError, match="max_turns"):
        GuessNumber(max_turns=0)


# ---- Twenty Questions: elimination and the random moves -------------------------------------------------------------

@pytest.fixture(scope="module")
def six(encoder):
    from rlnlp.envs.twenty_questions import TwentyQuestions

    return TwentyQuestions(max_turns=5, encoder=encoder, candidates=["dog", "cat", "car", "apple", "chair", "ball"])


def test_elimination_wins_the_six_candidate_game(six):
    """The scripted optimum wins every episode within 5 turns and never guesses a ruled-out candidate.
    Mutation: eliminate() without the remaining() filter (it guesses the first candidate) loses most episodes."""
    for seed in range(24):
        six.reset(seed)
        done, infos = False, []
        while not done:
            _, _, done, info = six.step(six.eliminate())
            infos.append(info)
        assert info["success"], six.history
        assert not any(i["ruled_out_guess"] or i["repeated"] or i["kind"] == "unknown" for i in infos), six.history
        assert len(six.history) <= 4  # 2 splitting questions suffice for {dog, cat} vs the rest, then ≤ 2 guesses


def test_remaining_candidates_follow_the_answers(six):
    six.reset(3)
    secret = six.secret["object"]
    six.step("Is it made by people?")
    left = six.remaining()
    assert secret in left and 0 < len(left) < 6
    made = secret in ("car", "chair", "ball")
    assert set(left) == ({"car", "chair", "ball"} if made else {"dog", "cat", "apple"})
    wrong = next(c for c in ["dog", "cat", "car", "apple", "chair", "ball"] if c != secret and c not in left)
    _, _, _, info = six.step(f"Is it a {wrong}?")
    assert info["ruled_out_guess"] and not info["repeated"]
    other = next(c for c in left if c != secret)
    six.step(f"Is it a {other}?")
    assert other not in six.remaining() and secret in six.remaining()
    _, _, _, info = six.step(f"Is it a {other}?")
    assert info["ruled_out_guess"] and info["repeated"]


def test_random_valid_moves_are_understood_and_fresh(six):
    rng = random.Random(0)
    six.reset(0)
    for _ in range(5):
        if six.done:
            break
        move = six.random_valid(rng)
        _, _, _, info = six.step(move)
        assert info["kind"] != "unknown" and not info["repeated"], (move, info)


# ---- the seed study's arithmetic and its command line --------------------------------------------------------------

def test_samples_to_target_and_ratios_by_hand():
    """Windows of 64 samples: a run reaches the target at the END of its first window whose mean reaches it; a run
    that never does counts as the budget (flagged). Mutation: the window's start instead of its end, or the ratio
    ArCHer / baseline, changes the numbers below."""
    from rlnlp.archer.compare import samples_to_target, summarize

    x = [32.0, 96.0, 160.0, 224.0]
    curves = {"archer": {0: {"x": x, "mean": [0.1, 0.5, 0.6, 0.7]}, 1: {"x": x, "mean": [0.1, 0.2, 0.5, 0.6]}},
              "ppo": {0: {"x": x, "mean": [0.1, 0.2, 0.3, 0.5]}, 1: {"x": x, "mean": [0.1, 0.1, 0.2, 0.2]}}}
    assert samples_to_target(curves["archer"][0], 0.4, 256) == (128.0, True)
    assert samples_to_target(curves["ppo"][1], 0.4, 256) == (256.0, False)
    s = summarize(curves, untrained=0.1, budget=256)
    assert s["target"] == pytest.approx(0.1 + 0.5 * (0.65 - 0.1))  # halfway to the best mean-over-seeds window (0.65)
    assert s["samples"]["archer"] == {0: 128.0, 1: 192.0} and s["samples"]["ppo"] == {0: 256.0, 1: 256.0}
    assert s["reached"]["ppo"] == {0: True, 1: False}
    assert s["ratios"]["ppo"]["per_seed"] == {0: 2.0, 1: pytest.approx(256 / 192)}
    iv = s["ratios"]["ppo"]["interval"]
    assert iv["low"] <= s["ratios"]["ppo"]["mean"] <= iv["high"]
    flat = summarize({"archer": {0: {"x": x, "mean": [0.1] * 4}}}, untrained=0.2, budget=256)
    assert flat["target"] is None and "no method" in flat["note"]


def _one_seed_study(seed: int, means: dict, untrained=(0.0, 1.0, 0.0, 0.0), env_steps=256) -> dict:
    x = [32.0, 96.0, 160.0, 224.0]
    algos = list(means)
    return {"task": "guess_number", "seeds": [seed], "algos": algos, "config": {"seed": seed, "env_steps": env_steps},
            "untrained": {"success": list(untrained), "returns": [-4.0] * 4},
            "evaluations": {a: {seed: {"success": [float(seed == 1)] * 4, "returns": [-3.0] * 4}} for a in algos},
            "curves": {a: {seed: {"x": x, "mean": m}} for a, m in means.items()},
            "grad_steps": {a: {seed: 10} for a in algos}, "env_steps": {a: {seed: env_steps} for a in algos},
            "train_wall_s": {a: {seed: 5.0} for a in algos}, "wall_s": 60.0, "summary": {}}


def test_studies_run_apart_merge_into_the_study_of_all_seeds(tmp_path, capsys):
    """One process per seed, then --merge: the merged summary equals summarize() over both seeds' curves, every
    seed's evaluations survive, and studies that do not belong together are refused in one line. Mutation: keeping
    the first study's summary, or dropping the untrained check, fails here."""
    from rlnlp.archer import main
    from rlnlp.archer.compare import load_study, merge_studies, save_study, summarize

    a = _one_seed_study(0, {"archer": [0.1, 0.5, 0.6, 0.7], "ppo": [0.1, 0.2, 0.3, 0.5]})
    b = _one_seed_study(1, {"archer": [0.1, 0.2, 0.5, 0.6], "ppo": [0.1, 0.1, 0.2, 0.2]})
    m = merge_studies([b, a])
    assert m["seeds"] == [0, 1] and m["wall_s"] == 120.0
    assert m["evaluations"]["ppo"][1]["success"] == [1.0] * 4 and m["evaluations"]["ppo"][0]["success"] == [0.0] * 4
    joint = summarize({k: {0: a["curves"][k][0], 1: b["curves"][k][1]} for k in ("archer", "ppo")}, 0.25, 256)
    assert m["summary"]["samples"] == joint["samples"] and m["summary"]["target"] == pytest.approx(joint["target"])
    assert m["summary"]["ratios"]["ppo"]["per_seed"] == joint["ratios"]["ppo"]["per_seed"]
    for bad, words in ((_one_seed_study(1, {"archer": [0.1] * 4, "ppo": [0.1] * 4}, untrained=(1, 1, 1, 1)),
                        "untrained"),
                       (_one_seed_study(1, {"archer": [0.1] * 4, "ppo": [0.1] * 4}, env_steps=512), "config"),
                       (_one_seed_study(0, {"archer": [0.1] * 4, "ppo": [0.1] * 4}), "more than one study")):
        with pytest.raises(UsageError, match=words):
            merge_studies([a, bad])
    # the baselines of one study with ArCHer from another: only ArCHer's own knobs may differ
    arch = _one_seed_study(0, {"archer": [0.1, 0.3, 0.5, 0.6]})
    arch["config"]["normalize_advantage"] = False
    base = _one_seed_study(0, {"ppo": [0.1, 0.2, 0.3, 0.5]})
    base["config"]["normalize_advantage"] = True
    both = merge_studies([base, arch])
    assert both["algos"] == ["archer", "ppo"] and both["config"]["normalize_advantage"] is False
    assert both["curves"]["ppo"][0]["mean"] == [0.1, 0.2, 0.3, 0.5] and both["summary"]["samples"]["archer"][0] == 192.0
    base["config"]["env_steps"] = 512
    with pytest.raises(UsageError, match="env_steps differ"):
        merge_studies([base, arch])
    with pytest.raises(UsageError, match="ppo does not match"):
        merge_studies([arch, _one_seed_study(1, {"archer": [0.1] * 4}) | {"config": arch["config"] | {"seed": 1}},
                       _one_seed_study(0, {"ppo": [0.1] * 4}) | {"config": arch["config"]}])
    paths = [save_study(st, tmp_path / f"s{st['seeds'][0]}.json") for st in (a, b)]
    out = tmp_path / "merged.json"
    assert main(["compare", "--task", "guess_number", "--seeds", "0", "1", "--merge", *map(str, paths),
                 "--out", str(out), "--profile", "smoke"]) == 0
    assert load_study(out)["summary"]["samples"] == joint["samples"]
    # FILE:METHODS takes only those methods of a study: a's baselines with ArCHer from another study
    other = save_study(_one_seed_study(0, {"archer": [0.1, 0.1, 0.5, 0.6]}), tmp_path / "archer0.json")
    assert main(["compare", "--task", "guess_number", "--seeds", "0", "--merge", f"{paths[0]}:ppo", str(other),
                 "--out", str(out), "--profile", "smoke"]) == 0
    got = load_study(out)
    assert got["curves"]["archer"][0]["mean"] == [0.1, 0.1, 0.5, 0.6] and got["curves"]["ppo"] == a["curves"]["ppo"]
    assert main(["compare", "--task", "guess_number", "--seeds", "0", "--merge", f"{paths[0]}:grpo", str(other),
                 "--out", str(out), "--profile", "smoke"]) == 2
    assert "not grpo" in capsys.readouterr().err
    assert main(["compare", "--task", "guess_number", "--seeds", "0", "2", "--merge", *map(str, paths),
                 "--out", str(out), "--profile", "smoke"]) == 2
    assert "not guess_number at [0, 2]" in capsys.readouterr().err


def test_baselines_run_apart_are_written_for_a_later_merge(tmp_path, capsys, monkeypatch):
    """--algos without archer and with --out: the baselines are trained and saved, no rows are recorded (they compare
    with ArCHer) and no ratio is computed; merged with an ArCHer study they give its ratios. Mutation: recording
    the rows (results passed) or computing ratios without ArCHer fails here."""
    import rlnlp.archer.compare as compare
    from rlnlp.archer import main
    from rlnlp.archer.compare import load_study, save_study, summarize

    calls = []

    def fake_study(cfg, task, seeds, algos, results=None, save_to=None, **kw):
        calls.append((algos, results))
        study = _one_seed_study(seeds[0], {"grpo": [0.1, 0.1, 0.2, 0.4]})
        study["summary"] = summarize(study["curves"], 0.1, 256)
        save_study(study, save_to)
        return study

    monkeypatch.setattr(compare, "run_study", fake_study)
    part = tmp_path / "grpo0.json"
    assert main(["compare", "--task", "guess_number", "--seeds", "0", "--algos", "grpo", "--out", str(part),
                 "--profile", "smoke"]) == 0
    assert calls == [(["grpo"], None)] and "--merge" in capsys.readouterr().out
    assert load_study(part)["summary"]["ratios"] == {}
    arch = save_study(_one_seed_study(0, {"archer": [0.1, 0.3, 0.5, 0.6]}), tmp_path / "archer0.json")
    out = tmp_path / "merged.json"
    assert main(["compare", "--task", "guess_number", "--seeds", "0", "--merge", str(arch), str(part),
                 "--out", str(out), "--profile", "smoke"]) == 0
    merged = load_study(out)
    assert merged["algos"] == ["archer", "grpo"] and merged["summary"]["ratios"]["grpo"]["per_seed"][0] > 1


@pytest.mark.parametrize("argv, words", [
    (["--task", "guess_number", "--seeds", "0", "0"], "seeds must be distinct"),
    (["--task", "guess_number", "--seeds", "-1"], "'-1' is not an integer ≥ 0"),
    (["--task", "guess_number", "--seeds"], "expected at least one argument"),
    (["--task", "guess_number", "--seeds", "0", "--algos", "ppo", "grpo"], "include archer"),
    (["--task", "guess_number", "--seeds", "0", "--algos", "archer", "dqn"], "unknown method(s) ['dqn']"),
    (["--task", "nope", "--seeds", "0"], "unknown task 'nope'"),
    (["--task", "guess_number", "--seeds", "0", "--env-steps", "0"], "'0' is not an integer ≥ 1"),
])
def test_compare_rejects_bad_arguments_in_one_line(argv, words, capsys, monkeypatch):
    """Mutation: without check_compare_args (or the parser's types) these reach run_study and load a model."""
    import rlnlp.archer.compare as compare
    from rlnlp.archer import main

    monkeypatch.setattr(compare, "run_study", lambda *a, **k: pytest.fail("the study started"))
    assert main(["compare", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv, words", [
    (["--dataset", "guess_number", "--range", "5", "5"], "number_range must be two whole numbers LOW < HIGH"),
    (["--dataset", "guess_number", "--candidates", "dog", "cat"], "candidates is a Twenty Questions option"),
    (["--dataset", "twenty_questions_6", "--candidates", "dog", "unicorn"], "not in the table: unicorn"),
    (["--dataset", "twenty_questions_6", "--range", "1", "9"], "number_range is a guess_number option"),
])
def test_game_options_are_checked_before_any_model_loads(argv, words, capsys, monkeypatch):
    import rlnlp.archer.training as training
    from rlnlp.archer import main

    monkeypatch.setattr(training, "load_policy", lambda *a, **k: pytest.fail("a model loaded"))
    assert main(["train", "--profile", "smoke", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err and "Traceback" not in err, err


def test_game_options_make_a_new_variant():
    """A new range and turn cap, or new candidates, without code: the environment gets them."""
    from dataclasses import replace

    from rlnlp.archer.games import make_game, task_preset
    from rlnlp.models import load_tokenizer

    cfg = replace(task_preset("smoke", "guess_number"), number_range=(10, 41), max_turns=6, prefill="")
    env = make_game(cfg, load_tokenizer())
    assert (env.low, env.high, env.max_turns, env.prefill, env.chat) == (10, 41, 6, "", True)
    assert "from 10 to 41" in env.reset(0) and 10 <= env.secret <= 41


# ---- ArCHer on the game: a short run, its time split, and turn-level credit --------------------------------------

def test_archer_plays_guess_number_and_logs_where_the_time_goes(encoder, monkeypatch):
    """Mutation: dropping the time/act_s, time/critic_s, time/actor_s columns (or timing the wrong span) fails here;
    so does an actor that gets uncentred advantages although the game's preset centres them."""
    import rlnlp.archer.training as training
    from rlnlp.archer import train_archer
    from rlnlp.archer.games import task_preset

    seen, step = [], training.actor_step
    monkeypatch.setattr(training, "actor_step",
                        lambda m, o, u, adv, c: seen.append(adv.clone()) or step(m, o, u, adv, c))
    cfg = task_preset("smoke", "guess_number", num_envs=8, env_steps=24, warmup_iters=1, fresh_batch=4)
    assert cfg.center_advantage
    run = train_archer(cfg, "gn_smoke", encoder=encoder)
    assert len(seen) == 2 and all(abs(float(a.mean())) < 1e-5 and float(a.std()) > 0 for a in seen)
    rows = run.df.dropna(subset=["time/act_s"])
    assert len(rows) == 3 and run.grad_steps == 2
    parts = rows[["time/act_s", "time/critic_s", "time/actor_s"]].sum(axis=1)
    assert (parts <= rows["time/iteration_s"] + 1e-6).all() and (parts >= 0.5 * rows["time/iteration_s"]).all()
    assert (rows.loc[rows["charts/actor_trains"] == 1, "time/actor_s"] > 0).all()
    assert np.isfinite(rows["losses/critic"]).all()
    assert run.env.prefill == "The number is" and not run.env.chat


@pytest.fixture(scope="module")
def credit_run(policy, encoder):
    from rlnlp.archer import Critic, Run
    from rlnlp.archer.games import make_game, task_preset
    from rlnlp.tracking import Tracker

    model, tok = policy
    cfg = task_preset("smoke", "guess_number")
    env = make_game(cfg, tok)
    return Run("credit", "archer", cfg, Tracker("credit", config=cfg), model, tok, env,
               Critic(cfg, encoder, special_tokens=list(tok.all_special_tokens)))


def test_turn_credit_scores_every_turn_with_candidates(credit_run):
    """Mutation: an advantage of V − Q, or candidates of another turn's state, fails here."""
    from rlnlp.archer import plot_turn_credit, turn_credit
    from rlnlp.envs.base import rollout

    env = credit_run.env.clone()
    ep = rollout(env, lambda obs: " " + env.bisect(), seed=5)
    c = turn_credit(credit_run, ep, k=3, seed=0)
    T = len(ep)
    assert T >= 2 and c["q_candidates"].shape == (T, 3) and len(c["candidates"]) == T
    assert np.allclose(c["advantage"], c["q_taken"] - c["v"])
    assert c["replies"] == [i["verdict"] for i in ep.infos] and c["actions"][0].startswith("The number is ")
    direct = credit_run.critic.values([ep.observations[1]] * 3, [t[len("The number is"):] for t in c["candidates"][1]])
    assert np.allclose(direct["q"].numpy(), c["q_candidates"][1], atol=1e-5)
    fig = plot_turn_credit(c)
    assert "critic value" in fig.axes[1].get_ylabel() and len(fig.axes[0].texts) == T * (2 + 3)


def test_episode_browser_follows_its_sliders(credit_run):
    from rlnlp.archer import episode_browser
    from rlnlp.envs.base import rollout

    env = credit_run.env.clone()
    eps = [rollout(env, lambda obs: " " + env.bisect(), seed=s) for s in (1, 2)]
    w = episode_browser(credit_run, eps, k=2)
    ep_slider, turn_slider, head, body = w.children
    assert f"secret {eps[0].infos[-1]['secret']}" in head.value and "advantage Q − V" in body.value
    first = body.value
    turn_slider.value = 1
    assert body.value != first and eps[0].actions[1].strip() in body.value
    ep_slider.value = 1
    assert f"secret {eps[1].infos[-1]['secret']}" in head.value


# ---- the full preset's shapes for the 20-turn game --------------------------------------------------------------

@pytest.mark.full_dryrun
def test_full_preset_for_the_twenty_turn_game_runs_one_iteration(encoder):
    from dataclasses import replace

    from rlnlp.archer import train_archer
    from rlnlp.archer.games import task_preset

    cfg = task_preset("full", "twenty_questions")
    assert (cfg.max_turns, cfg.num_envs, cfg.warmup_iters) == (20, 128, 20)
    run = train_archer(replace(cfg, env_steps=cfg.num_envs, warmup_iters=0), "full_20q", encoder=encoder)
    row = run.df.dropna(subset=["charts/iteration"]).iloc[-1]
    assert row["charts/env_steps"] == cfg.num_envs and row["charts/grad_steps"] == 1
    assert run.policy_samples == cfg.num_envs + 2 * cfg.num_envs  # the first iteration's fresh states are the starts
    assert np.isfinite([row["losses/critic"], row["stats/advantage_std"], row["stats/grad_norm"]]).all()


def test_training_curves_bin_episodes_by_their_start():
    """Binned by when episodes END, the first window holds only quick successes (success 1.0 with a 5-turn game);
    binned by START, it holds every episode that began there. Mutation: episode_starts returning the end times
    (or an ArCHer start of end − length) fails here."""
    import pandas as pd

    from rlnlp.archer.compare import episode_starts, start_curve
    from rlnlp.archer.games import task_preset

    cfg = task_preset("smoke", "guess_number", num_envs=2, env_steps=20, max_turns=3)
    # ArCHer's lockstep log: two environments; episode A (1 turn, success) ends at 2, B (3 turns, fail) at 6
    archer = pd.DataFrame({"charts/env_steps": [2.0, 2.0, 6.0, 6.0], "charts/actor_trains": [0.0, np.nan, 0.0, np.nan],
                           "charts/episode_return": [np.nan, 0.0, np.nan, -3.0],
                           "charts/success": [np.nan, 1.0, np.nan, 0.0],
                           "charts/episode_length": [np.nan, 1.0, np.nan, 3.0]})
    assert list(episode_starts(archer, 2)) == [0.0, 0.0]
    c = start_curve(archer, cfg, bins=2)  # windows [0, 7) and [7, 14): both episodes started in the first
    assert c["mean"][0] == 0.5 and c["n"][0] == 2
    # a baseline's log: a round's episodes, then the round's row; the next round starts where it ended
    base = pd.DataFrame({"charts/env_steps": [1.0, 4.0, 4.0, 6.0, 9.0, 9.0],
                         "charts/iteration": [np.nan, np.nan, 0.0, np.nan, np.nan, 1.0],
                         "charts/episode_return": [0.0, -3.0, np.nan, 0.0, -2.0, np.nan],
                         "charts/success": [1.0, 0.0, np.nan, 1.0, 0.0, np.nan],
                         "charts/episode_length": [1.0, 3.0, np.nan, 1.0, 2.0, np.nan]})
    assert list(episode_starts(base, 2)) == [0.0, 0.0, 4.0, 4.0]
    logged = archer.assign(**{"charts/episode_start": [np.nan, 0.0, np.nan, 0.0]})
    assert list(episode_starts(logged, 2)) == [0.0, 0.0]


def test_training_curve_of_a_run_too_short_for_any_episode_to_end():
    """A budget shorter than one episode (possible with 4-turn games): an empty curve, not a KeyError."""
    import pandas as pd

    from rlnlp.archer import ArcherConfig
    from rlnlp.archer.compare import start_curve

    df = pd.DataFrame({"charts/env_steps": [8.0, 16.0], "charts/iteration": [0, 1], "charts/actor_trains": [0.0, 1.0]})
    c = start_curve(df, ArcherConfig.smoke(max_turns=4, env_steps=16), bins=2)
    assert len(c["x"]) == 2 and np.isnan(c["mean"]).all() and (np.asarray(c["n"]) == 0).all()
