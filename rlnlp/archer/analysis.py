"""Evaluation and analysis: the fixed evaluation episodes, the critic's values along an episode, return
curves over environment samples and samples-to-target."""
from __future__ import annotations

import random

import numpy as np

from .. import plots
from ..distributed import Ranks
from ..envs.base import Episode
from ..models import TextEncoder
from ..stats import binned_rate
from .acting import act, play
from .config import ArcherConfig
from .envs import env_factory
from .runs import Run


def evaluate(model, tokenizer, cfg: ArcherConfig, episodes: int | None = None, seed: int = 10_000,
             encoder: TextEncoder | None = None, make=None, temperature: float | None = None,
             accelerator=None) -> dict:
    """Play the fixed evaluation episodes: start i is ``reset(seed + i)`` and turn t samples with seed
    ``seed + 31 t`` — the SAME episodes for every policy, so scores pair up episode by episode.

    Returns per-episode arrays ``success`` (0/1) and ``returns``, their means, the starts and the trajectories.
    With an ``accelerate.Accelerator`` of several processes, each plays its block of the starts (its sampling seed
    offset by its rank) and every process returns all of them, in the order of the starts.
    """
    episodes = episodes or cfg.eval_episodes
    make = make or env_factory(cfg, tokenizer, encoder or TextEncoder(max_length=cfg.critic_max_length))
    starts = [seed + i for i in range(episodes)]
    ranks = Ranks(accelerator)
    mine = ranks.share(starts)
    eps = play(model, tokenizer, cfg, make, mine, seed=seed + Ranks.SEED_STRIDE * ranks.rank,
               temperature=temperature)[0] if mine else []
    eps = ranks.gather(eps)
    returns = np.array([ep.total_reward for ep in eps])
    success = np.array([float(bool(ep.infos[-1].get("success"))) if ep.infos else 0.0 for ep in eps])
    return {"success": success, "returns": returns, "success_rate": float(success.mean()),
            "mean_return": float(returns.mean()), "episodes": len(eps), "starts": starts, "trajectories": eps}


def scripted_play(make, policy_name: str, episodes: int, seed: int = 10_000) -> tuple[np.ndarray, np.ndarray]:
    """Success and return of one of a game's scripted policies (``env.bisect()``, ``env.eliminate()``, or a random
    one that takes an ``rng``: ``random_new``, ``random_valid``, ``random_consistent``) on the evaluation
    episodes ``reset(seed + i)`` — the same secrets every policy meets. Returns (success, return) per episode."""
    success, returns = [], []
    for i in range(episodes):
        env, rng = make(), random.Random(i)
        env.reset(seed + i)
        done, total, info = False, 0.0, {}
        while not done:
            move = getattr(env, policy_name)
            _, r, done, info = env.step(move() if policy_name in ("bisect", "eliminate") else move(rng))
            total += r
        success.append(float(info["success"]))
        returns.append(total)
    return np.array(success), np.array(returns)


def candidate_values(run: Run, episode: Episode, k: int = 4, seed: int = 0) -> dict:
    """Along one episode: V(s_t), Q(s_t, a_t) of the action taken and Q of k fresh candidate utterances.

    Returns {"v": (T,), "q_taken": (T,), "q_candidates": (T, k), "candidates": [[str]*k]*T}.
    """
    obs = episode.observations[: len(episode.actions)]
    u = act(run.model, run.tokenizer, run.env, obs, run.cfg, n=k, seed=seed)
    taken = run.critic.values(obs, episode.actions)
    cand = run.critic.values(u.observations, u.texts)
    T = len(obs)
    return {"v": taken["v"].numpy(), "q_taken": taken["q"].numpy(), "q_candidates": cand["q"].view(T, k).numpy(),
            "candidates": [u.texts[t * k:(t + 1) * k] for t in range(T)]}


def ended_episodes(df, column: str = "charts/episode_return"):
    """The rows of a run's log that record an ended episode (none yet: an empty frame with the episode columns;
    a short multi-turn run may end before its first episode does)."""
    if column not in df:
        import pandas as pd
        return pd.DataFrame({c: pd.Series(dtype=float) for c in ("charts/env_steps", column)})
    return df.dropna(subset=[column])


def return_curve(df, bins: int = 12, column: str = "charts/episode_return", budget: float | None = None) -> dict:
    """Mean of ``column`` over the episodes that ENDED in each window of environment samples (no length bias)."""
    ep = ended_episodes(df, column)
    hi = budget or (float(ep["charts/env_steps"].max()) if len(ep) else 1.0)
    edges = np.linspace(0, hi + 1e-9, bins + 1)
    return binned_rate(ep["charts/env_steps"].to_numpy(), ep[column].to_numpy(), edges)


def samples_to_return(df, target: float, bins: int = 12, budget: float | None = None) -> float | None:
    """Env samples at the end of the first window whose mean episode return reaches ``target`` (None: never)."""
    c = return_curve(df, bins, budget=budget)
    width = (c["x"][1] - c["x"][0]) if len(c["x"]) > 1 else 0.0
    hit = np.nonzero(np.nan_to_num(c["mean"], nan=-np.inf) >= target)[0]
    return float(c["x"][hit[0]] + width / 2) if len(hit) else None


def sample_efficiency(runs: dict, untrained_return: float, target: float | None = None, bins: int = 12,
                      budget: float | None = None) -> dict:
    """Env samples each run ({label: DataFrame}) needs to reach ``target`` (default: halfway from the untrained
    return to the best window any run reached) and each ratio other / first label (None where not reached)."""
    best = max(float(np.nanmax(return_curve(df, bins, budget=budget)["mean"])) for df in runs.values())
    if target is None:
        if best <= untrained_return:
            return {"target_return": None, "samples": {k: None for k in runs}, "ratios": {},
                    "note": "no run beat the untrained policy's return"}
        target = untrained_return + 0.5 * (best - untrained_return)
    samples = {k: samples_to_return(df, target, bins, budget) for k, df in runs.items()}
    first = next(iter(runs))
    ratios = {k: (samples[k] / samples[first]) if samples[k] and samples[first] else None
              for k in runs if k != first}
    return {"target_return": target, "samples": samples, "ratios": ratios}


def plot_returns(runs: dict, title: str, bins: int = 12, baselines: dict | None = None, budget: float | None = None,
                 column: str = "charts/episode_return", ylabel: str = "episode return"):
    """Mean episode return vs environment samples, one line per run (``{label: DataFrame}``), on one axis.
    Each point averages every episode that ended in its window of samples."""
    fig, ax = None, None
    for label, df in runs.items():
        c = return_curve(df, bins, column=column, budget=budget)
        fig = plots.curves({"x": c["x"], "y": c["mean"]}, "x", "y", labels=[label], ax=ax, title=title,
                           xlabel="environment samples (utterances)", ylabel=ylabel,
                           baselines=baselines if ax is None else None)
        ax = fig.axes[0]
    return fig
