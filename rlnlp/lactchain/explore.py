"""Helpers for the notebook: the pair explorer and the critic checks."""
from __future__ import annotations

import numpy as np

from ..envs.gridworld import COMPASS, GridWorld, State
from .chains import MCSample
from .critic import Critic
from .simpo import PreferencePairs


def explorer_steps(pairs: PreferencePairs, V_star: np.ndarray, gamma: float, limit: int = 60) -> list[dict]:
    """One dict per state of the preference data: its proposals, their returns and the judge's scores."""
    by_state: dict[State, list[int]] = {}
    for i, o in enumerate(pairs.outcomes):
        by_state.setdefault(o.state, []).append(i)
    chosen, rejected = set(pairs.chosen), set(pairs.rejected)
    steps = []
    for state, rows in list(by_state.items())[:limit]:
        x, y, o = state
        row = {"state": f"({x}, {y}) facing {COMPASS[o]}", "V*(s)": round(float(V_star[o, y, x]), 2),
               "judge V(s)": round(pairs.values[rows[0]], 2)}
        for j in rows:
            out, parsed = pairs.outcomes[j], pairs.proposals.parsed[j]
            tag = "chosen" if j in chosen else "rejected" if j in rejected else ""
            row[f"#{j}: {pairs.proposals.texts[j]!r}"] = (
                f"{parsed.move or 'parse failure'} | return {out.chain_return(gamma):+.1f}, k {out.k}, "
                f"goal {out.done} | A {pairs.advantages[j]:+.2f} {tag}")
        steps.append(row)
    return steps


def greedy_agreement(q_grid: dict[str, np.ndarray], Q_star: dict, states: list[State]) -> float:
    """Fraction of ``states`` where the greedy move of ``q_grid`` is optimal under ``Q_star``."""
    hits = []
    for x, y, o in states:
        pick = max(q_grid, key=lambda a: q_grid[a][o, y, x])
        best = max(Q_star[(x, y, o)].values())
        hits.append(Q_star[(x, y, o)][pick] >= best - 1e-9)
    return float(np.mean(hits))


def q_grid(env: GridWorld, V: np.ndarray, gamma: float) -> dict[str, np.ndarray]:
    """Q(s, a) = r(s, a) + γ (1 − goal) V(s′) for each grid move, as (4, size, size) grids."""
    out = {}
    for a in env.actions:
        Q = np.full((4, env.size, env.size), np.nan)
        for s in env.start_states():
            (x2, y2, o2), r, done = env.move(s, a)
            x, y, o = s
            Q[o, y, x] = r + (0.0 if done else gamma * V[o2, y2, x2])
        out[a] = Q
    return out


def mean_return_by_state(samples: list[MCSample], critic: Critic | None = None) -> tuple[list[State], list[float]]:
    """Visited states (sorted) and the mean Monte-Carlo target from each (bootstrapped by ``critic`` if given)."""
    by_state: dict[State, list[float]] = {}
    tails = critic.values([s.tail_state for s in samples]) if critic is not None else np.zeros(len(samples))
    for s, v in zip(samples, tails):
        by_state.setdefault(s.state, []).append(s.partial + s.tail_discount * float(v))
    states = sorted(by_state)
    return states, [float(np.mean(by_state[s])) for s in states]
