"""Figures of both modes, built on rlnlp.plots."""
from __future__ import annotations

import pandas as pd

from .. import plots
from .cache import PoolCache, order_table
from .loop import Rollout
from .selection import SelectionTrainer


def _short(text: str, n: int = 22) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def selection_heatmap(ro: Rollout, policy_row: int = 0, title: str = "", ax=None, vmax: float | None = None):
    """Steps × keys: selection probability at each step, the chosen key outlined (colour scale 0..vmax)."""
    row = ro.rows("policy")[policy_row]
    marks = [(s, int(j)) for s, j in enumerate(ro.chosen[row])]
    return plots.heatmap(ro.probs[policy_row].numpy(), marks=marks, ax=ax, vmin=0, vmax=vmax,
                         title=title or f"{_short(ro.pool.name, 40)}: reward {float(ro.episode_reward[row]):+.3f}",
                         xlabel="key (document order)", ylabel="step", cbar_label="selection probability",
                         xticklabels=[_short(k) for k in ro.pool.keys],
                         yticklabels=[f"{s}: r={float(ro.step_rewards[row, s]):+.2f}"
                                      for s in range(ro.chosen.shape[1])])


def selection_heatmaps(rollouts: list[Rollout], titles: list[str], suptitle: str = ""):
    """Several selection heatmaps side by side (e.g. the same held-out pool before and after training), on ONE
    colour scale from 0 to the largest probability shown, so a shift away from uniform is visible."""
    import matplotlib.pyplot as plt

    n_keys = max(len(ro.pool) for ro in rollouts)
    width = max(4.5, 0.55 * n_keys + 2.5) * len(rollouts)
    fig, axes = plt.subplots(1, len(rollouts), figsize=(width, 0.45 * n_keys + 2.8),
                             layout="constrained", squeeze=False)
    vmax = max(float(ro.probs[0].max()) for ro in rollouts)
    for ax, ro, title in zip(axes[0], rollouts, titles):
        selection_heatmap(ro, title=title, ax=ax, vmax=vmax)
    fig.suptitle(suptitle)
    return fig


def step_figure(ro: Rollout, step: int, policy_row: int = 0):
    """One step of a policy row: the query, the probability of each key, the chosen one in red."""
    row = ro.rows("policy")[policy_row]
    p = ro.probs[policy_row, step].numpy()
    j = int(ro.chosen[row, step])
    left = int((p > 0).sum())
    fig = plots.token_weights([_short(k) for k in ro.pool.keys], p, highlight=[j],
                              title=f"step {step}: query {ro.queries[row][step]!r}\n→ {_short(ro.pool.keys[j], 40)!r} "
                                    f"= {_short(ro.pool.values[j], 30)!r}, "
                                    f"reward {float(ro.step_rewards[row, step]):+.3f}")
    fig.axes[0].set_ylabel(f"selection probability ({left} keys left)")
    return fig


def first_pick_rates(rollouts: list[Rollout]) -> pd.Series:
    """For each key text: how often the policy picked it first, per time it was in the pool (sorted)."""
    firsts, seen = {}, {}
    for ro in rollouts:
        for row in ro.rows("policy"):
            for k in ro.pool.keys:
                seen[k] = seen.get(k, 0) + 1
            first = ro.pool.keys[int(ro.chosen[row, 0])]
            firsts[first] = firsts.get(first, 0) + 1
    return pd.Series({k: firsts.get(k, 0) / n for k, n in seen.items()}).sort_values(ascending=False)


def first_pick_figure(rates: pd.Series, pool_size: int, title: str = ""):
    """Bar per key: share of the policy's episodes that opened with it, against the uniform rate 1/pool_size."""
    return plots.bars([_short(k, 40) for k in rates.index], rates.to_numpy(), horizontal=True,
                      baselines={"uniform choice": 1 / pool_size}, ylabel="picked first / times in the pool",
                      title=title or "Which key does the policy pick first?")


def first_pick_heatmaps(trainer: SelectionTrainer, split: str = "eval", n: int = 12):
    """The first pick on n held-out pools, before and after training, on one colour scale:
    P(key j first) with j the key's position in the document (the untrained selector is near 1/N)."""
    names = [_short(c.pool.name, 28) for c in trainer.caches[split][:n]]
    before, after = trainer.first_step_probs(split, untrained=True)[:n], trainer.first_step_probs(split)[:n]
    N = trainer.cfg.pool_size
    return plots.heatmaps([before, after], ["untrained selector", "trained selector"], annotate=True, fmt=".2f",
                          suptitle=f"First pick on {n} held-out pools (uniform = 1/{N} = {1 / N:.2f})",
                          xlabel="key (position in the document)", yticklabels=names, cbar_label="P(picked first)")


def path_heatmaps(trainer: SelectionTrainer, pools: list[int], split: str = "eval"):
    """For each pool: steps × keys along the DOCUMENT-order path (after s pairs in document order, the probability
    of each remaining key), untrained above, trained below, on one colour scale. Document order = the diagonal."""
    import matplotlib.pyplot as plt

    N = trainer.cfg.pool_size
    mats = [[trainer.path_probs(split, i, untrained=u) for i in pools] for u in (True, False)]
    vmax = max(float(m.max()) for row in mats for m in row)
    fig, axes = plt.subplots(2, len(pools), figsize=(3.3 * len(pools), 5.2), layout="constrained", squeeze=False)
    for r, (label, row) in enumerate(zip(("untrained", "trained"), mats)):
        for c, (i, m) in enumerate(zip(pools, row)):
            pool = trainer.caches[split][i].pool
            plots.heatmap(m, ax=axes[r, c], vmin=0, vmax=vmax, annotate=True, fmt=".2f",
                          marks=[(s, s) for s in range(N - 1)], cbar_label="selection probability",
                          title=f"{label}: {_short(pool.name, 24)}", xlabel="key (document position)",
                          ylabel="after s pairs in document order")
    fig.suptitle("Selection along the document-order path (outlined: the next pair in the document)")
    return fig


def order_rewards_figure(cache: PoolCache, title: str = ""):
    """Episode reward of every order of one pool, document order in red, the random-order mean as a line."""
    R = cache.episode_rewards.cpu().numpy()
    labels = ["→".join(map(str, o)) for o in order_table(len(cache.pool)).orders.tolist()]
    colors = ["tab:red" if i == 0 else "tab:blue" for i in range(len(R))]
    return plots.bars(labels, R, color=colors, baselines={"random order (mean over orders)": float(R.mean())},
                      ylabel="episode reward (nats/token)", xlabel="order (key positions; red = document order)",
                      title=title or f"{_short(cache.pool.name, 40)}: reward of every order")

