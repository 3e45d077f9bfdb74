"""Turn-level credit you can see: V(s_t), Q of the utterance taken and Q of fresh candidates, turn by turn.

``turn_credit(run, episode, k)`` scores one episode with the trained critic; ``plot_turn_credit``
draws it as a heatmap (one row per turn: V, Q of the utterance asked, Q of k candidates, each cell
labelled with its text); ``episode_browser(run, episodes)`` is an ipywidgets browser over episodes
(per turn: the utterance, the environment's reply, V, Q, the advantage Q − V and the candidates).
"""
from __future__ import annotations

import html

import numpy as np

from ..envs.base import Episode
from .analysis import candidate_values
from .runs import Run

VALUE_LABEL = "critic value: predicted discounted return (−1 per turn, 0 on success)"


def turn_credit(run: Run, episode: Episode, k: int = 4, seed: int = 0) -> dict:
    """``candidate_values`` plus what the environment answered and the advantage of the utterance taken.

    Returns {"v", "q_taken", "advantage", "q_candidates" (T, k), "candidates", "actions", "replies", "rewards"}.
    """
    if not episode.actions:
        raise ValueError("the episode has no turns to score")
    if k < 1:
        raise ValueError(f"k (candidates per turn) must be ≥ 1, got {k}")
    c = candidate_values(run, episode, k=k, seed=seed)
    prefill = getattr(run.env, "prefill", "")
    c.update(advantage=c["q_taken"] - c["v"], actions=[prefill + a for a in episode.actions],
             candidates=[[prefill + t for t in row] for row in c["candidates"]],
             replies=[str(i.get("reply", i.get("verdict", ""))) for i in episode.infos], rewards=list(episode.rewards))
    return c


def _short(text: str, n: int = 22) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


def plot_turn_credit(credit: dict, title: str = ""):
    """Heatmap: rows = turns, columns = V(s_t), Q(s_t, asked), Q(s_t, candidate j); every cell shows its value and,
    for Q cells, the utterance; the row label carries the environment's reply."""
    import matplotlib.pyplot as plt

    T, k = np.asarray(credit["q_candidates"]).shape
    M = np.column_stack([credit["v"], credit["q_taken"], credit["q_candidates"]])  # (T, 2 + k)
    fig, ax = plt.subplots(figsize=(2.2 * (2 + k) + 1.5, 0.75 * T + 1.6), layout="constrained")
    im = ax.imshow(M, cmap="viridis", aspect="auto")
    cb = fig.colorbar(im, ax=ax)
    cb.set_label(VALUE_LABEL, fontsize=8)
    lo, hi = np.nanmin(M), np.nanmax(M)
    for t in range(T):
        texts = ["V(s)", credit["actions"][t]] + list(credit["candidates"][t])
        for j in range(2 + k):
            light = (M[t, j] - lo) / (hi - lo + 1e-9) < 0.5
            label = f"{M[t, j]:.2f}" if j == 0 else f"{_short(texts[j])}\n{M[t, j]:.2f}"
            ax.text(j, t, label, ha="center", va="center", fontsize=7, color="white" if light else "black")
    ax.set_xticks(range(2 + k), ["V(s_t)", "Q(s_t, asked)"] + [f"Q(s_t, candidate {j + 1})" for j in range(k)],
                  fontsize=8)
    ax.set_yticks(range(T), [f"turn {t + 1}: {_short(r, 18)}" for t, r in enumerate(credit["replies"])], fontsize=8)
    ax.set_title(title or "turn-level credit: V, Q of the utterance asked and of fresh candidates", fontsize=9)
    return fig


def _turn_html(credit: dict, t: int) -> str:
    rows = [("utterance", credit["actions"][t]), ("reply", credit["replies"][t]),
            ("reward", f"{credit['rewards'][t]:+.0f}"),
            ("V(s_t)", f"{credit['v'][t]:.3f}"), ("Q(s_t, utterance)", f"{credit['q_taken'][t]:.3f}"),
            ("advantage Q − V", f"{credit['advantage'][t]:+.3f}")]
    cands = "<br>".join(f"{q:.3f} &nbsp; {html.escape(c)}"
                        for q, c in sorted(zip(credit["q_candidates"][t], credit["candidates"][t]),
                                           key=lambda x: -x[0]))
    rows.append(("fresh candidates (Q)", cands))
    body = "".join(f"<tr><th style='text-align:left;vertical-align:top;padding-right:1em'>{html.escape(k)}</th>"
                   f"<td style='text-align:left'>{v if k == 'fresh candidates (Q)' else html.escape(str(v))}</td></tr>"
                   for k, v in rows)
    return f"<table>{body}</table>"


def episode_browser(run: Run, episodes: list[Episode], k: int = 4, seed: int = 0):
    """An ipywidgets browser: an episode slider and a turn slider; each turn shows the utterance, the reply,
    V, Q, the advantage and k fresh candidates with their Q. Scores are computed once per episode, when shown."""
    import ipywidgets as w

    episodes = [ep for ep in episodes if ep.actions]
    if not episodes:
        raise ValueError("episode_browser needs at least one episode with a turn")
    cache: dict[int, dict] = {}

    def credit(i: int) -> dict:
        if i not in cache:
            cache[i] = turn_credit(run, episodes[i], k=k, seed=seed + i)
        return cache[i]

    ep_slider = w.IntSlider(min=0, max=len(episodes) - 1, value=0, description="episode")
    turn_slider = w.IntSlider(min=0, max=len(episodes[0]) - 1, value=0, description="turn")
    head, body = w.HTML(), w.HTML()

    def show(*_):
        i, ep = ep_slider.value, episodes[ep_slider.value]
        turn_slider.max = len(ep) - 1
        c = credit(i)
        secret = ep.infos[-1].get("secret", "")
        head.value = (f"<b>episode {i}</b>: secret {html.escape(str(secret))}, return {ep.total_reward:+.0f}, "
                      f"{len(ep)} turns, success {bool(ep.infos[-1].get('success'))}")
        body.value = _turn_html(c, min(turn_slider.value, len(ep) - 1))

    ep_slider.observe(show, names="value")
    turn_slider.observe(show, names="value")
    show()
    return w.VBox([ep_slider, turn_slider, head, body])
