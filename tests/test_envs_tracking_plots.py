import math

import pandas as pd
import pytest

from rlnlp import plots
from rlnlp.envs import GuessNumber, VecEnv, bisect_policy, rollout
from rlnlp.tracking import Tracker


def test_bisect_policy_always_finds_the_number_within_log2_guesses():
    env = GuessNumber(high=16, max_turns=10)
    lengths = []
    for seed in range(40):
        ep = rollout(env, bisect_policy, seed=seed)
        assert ep.done and ep.infos[-1]["verdict"] == "correct"
        lengths.append(len(ep))
    assert max(lengths) <= math.ceil(math.log2(17))
    totals = [rollout(env, bisect_policy, seed=s).total_reward for s in range(40)]
    assert all(ep_r == -(n - 1) for ep_r, n in zip(totals, lengths))


def test_guess_number_handles_text_without_a_number():
    env = GuessNumber(high=4, max_turns=2)
    env.reset(seed=0)
    obs, r, done, info = env.step("I don't know")
    assert r == -1 and not done and info["verdict"] == "not a number"


def test_vecenv_auto_resets_and_reports_the_final_observation():
    venv = VecEnv(lambda: GuessNumber(high=4, max_turns=1), n=3, seed=0)
    obs = venv.reset()
    assert len(obs) == 3
    nxt, rewards, dones, infos = venv.step(["99"] * 3)  # every guess wrong, max_turns=1 ends each episode
    assert all(dones) and all("final_observation" in i for i in infos)
    assert all("So far" not in o for o in nxt)  # the returned observations are fresh episodes
    with pytest.raises(ValueError, match="3 environments"):
        venv.step(["1"])


def test_tracker_writes_metrics_csv(tmp_path):
    tr = Tracker("unit", root=tmp_path)
    for step in range(3):
        tr.log(step, {"charts/return": step * 2.0}, **{"losses/policy": -step})
    df = pd.read_csv(tmp_path / "unit" / "metrics.csv")
    assert list(df["charts/return"]) == [0.0, 2.0, 4.0] and tr.last("losses/policy") == -2


def test_plots_save_labels_smoke_figures(tmp_path, monkeypatch):
    monkeypatch.setenv("RLNLP_VIS", str(tmp_path))
    df = pd.DataFrame({"step": [0, 1, 2], "charts/return": [1.0, 2.0, 3.0]})
    fig = plots.curves(df, "step", "charts/return", baselines={"random": 0.5}, title="t", ylabel="return")
    path = plots.save(fig, "unit-curve", prof="smoke")
    assert path == tmp_path / "smoke" / "unit-curve.png" and path.stat().st_size > 1000
    assert any("smoke profile" in t.get_text() for t in fig.texts)
    assert plots.save(fig, "unit-curve", prof="full") == tmp_path / "unit-curve.png"


def test_curves_names_a_missing_column():
    with pytest.raises(KeyError, match="charts/nope"):
        plots.curves(pd.DataFrame({"step": [0]}), "step", "charts/nope")


def test_rollout_many_calls_the_policy_once_per_step_for_running_episodes():
    from rlnlp.envs import rollout_many

    calls = []

    def policy(observations):
        calls.append(len(observations))
        return [bisect_policy(o) for o in observations]

    envs = [GuessNumber(high=16, max_turns=10) for _ in range(5)]
    eps = rollout_many(envs, policy, seeds=list(range(5)))
    singles = [rollout(GuessNumber(high=16, max_turns=10), bisect_policy, seed=s) for s in range(5)]
    assert [e.actions for e in eps] == [e.actions for e in singles]
    assert len(calls) == max(len(e) for e in eps) and calls[0] == 5 and calls == sorted(calls, reverse=True)
