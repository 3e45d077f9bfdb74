"""Evaluation over every start state, and the baselines that ignore the state."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..envs.gridworld import GridWorld, State
from .actor import Actor, ActorEpisodes, run_episodes
from .chains import ChainOutcome, chain_advantage, exact_judge, execute_chain
from .config import LactChainConfig
from .text import menu


@dataclass
class Evaluation:
    """``k`` episodes from each of ``states`` (rows state-major): per-state means, paired across evaluations."""

    states: list[State]
    k: int
    episodes: ActorEpisodes
    success: np.ndarray
    """(S,) fraction of the k episodes that reached the goal within the chain budget."""
    advantage: np.ndarray
    """(S,) mean exact V*-advantage of the first chain: 0 for an optimal move, negative otherwise."""
    parse_failure: np.ndarray
    """(S,) fraction of all chains proposed from episodes of this state that did not parse."""

    def summary(self) -> dict:
        first = self.episodes.first
        return {"states": len(self.states), "episodes": len(self.episodes.outcomes),
                "success_rate": float(self.success.mean()), "first_chain_v*_advantage": float(self.advantage.mean()),
                "parse_failure_rate": float(np.mean([not f for ep in self.episodes.parsed_ok for f in ep])),
                "distinct_answers": len(set(first.samples.texts)),
                "distinct_chains": len({tuple(p.moves) for p in first.parsed if p.ok})}


def first_chain_advantages(outcomes: list[ChainOutcome], V_star: np.ndarray, gamma: float) -> np.ndarray:
    """Exact V*-advantage of each chain: R + γ^k V*(s′)(1 − done) − V*(s)."""
    judge = exact_judge(V_star)
    v, vn = judge([o.state for o in outcomes]), judge([o.next_state for o in outcomes])
    return np.array([chain_advantage(o.chain_return(gamma), o.k, a, b, o.done, gamma)
                     for o, a, b in zip(outcomes, v, vn)])


def evaluate(actor: Actor, states: list[State], V_star: np.ndarray, k: int, temperature: float | None = None,
             seed: int | None = None) -> Evaluation:
    """``k`` episodes per state at ``temperature`` (0 = greedy, then use k = 1), budget ``cfg.max_chains``."""
    starts = [s for s in states for _ in range(k)]
    eps = run_episodes(actor, starts, actor.cfg.max_chains, temperature=temperature, seed=seed)
    S = len(states)
    success = eps.success().reshape(S, k).mean(1)
    adv = first_chain_advantages([ep[0] for ep in eps.outcomes], V_star, actor.cfg.gamma).reshape(S, k).mean(1)
    fail = np.array([np.mean([not f for i in range(j * k, (j + 1) * k) for f in eps.parsed_ok[i]]) for j in range(S)])
    return Evaluation(list(states), k, eps, success, adv, fail)


def chain_baselines(env: GridWorld, states: list[State], V_star: np.ndarray, cfg: LactChainConfig) -> dict:
    """Exact per-state success and first-chain V*-advantage of two actors that ignore the state:
    ``random``: a uniformly random move of the menu each chain; ``constant``: the one menu move that,
    repeated every chain, reaches the goal from the most start states (picked with hindsight)."""
    chains = menu(cfg.max_cells)

    def p_success(s: State, left: int) -> float:  # probability a random menu move per chain reaches the goal
        if left == 0:
            return 0.0
        total = 0.0
        for c in chains:
            o = execute_chain(env, s, c, cfg.empty_chain_penalty)
            total += 1.0 if o.done else p_success(o.next_state, left - 1)
        return total / len(chains)

    def constant_success(s: State, c: list[str]) -> float:
        for _ in range(cfg.max_chains):
            o = execute_chain(env, s, c, cfg.empty_chain_penalty)
            if o.done:
                return 1.0
            s = o.next_state
        return 0.0

    per_chain = [np.array([constant_success(s, c) for s in states]) for c in chains]
    best = int(np.argmax([p.mean() for p in per_chain]))
    adv = {i: first_chain_advantages([execute_chain(env, s, chains[i], 0.0) for s in states], V_star, cfg.gamma)
           for i in range(len(chains))}
    return {"random": {"success": np.array([p_success(s, cfg.max_chains) for s in states]),
                       "advantage": np.mean([adv[i] for i in adv], axis=0)},
            "constant": {"success": per_chain[best], "advantage": adv[best], "chain": chains[best]}}
