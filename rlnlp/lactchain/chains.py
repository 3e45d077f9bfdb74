"""Executing chains on the grid; returns, k-step advantages, Monte-Carlo samples and exact judges."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..envs.gridworld import GridWorld, State, epsilon_greedy, sample_action, value_iteration


@dataclass
class ChainOutcome:
    """One chain executed from ``state``: per-move rewards (k of them), the state after, goal reached."""

    state: State
    moves: list[str]
    rewards: list[float]
    next_state: State
    done: bool

    @property
    def k(self) -> int:
        return len(self.rewards)

    def chain_return(self, gamma: float) -> float:
        """R = Σ_{i<k} γ^i r_i."""
        return float(sum(gamma ** i * r for i, r in enumerate(self.rewards)))


def execute_chain(env: GridWorld, state: State, moves: list[str], empty_penalty: float) -> ChainOutcome:
    """Run ``moves`` from ``state`` until the goal; an empty chain is one wasted tick with ``empty_penalty``."""
    if not moves:
        return ChainOutcome(state, [], [float(empty_penalty)], state, False)
    rewards, s, done = [], state, False
    for m in moves:
        s, r, done = env.move(s, m)
        rewards.append(float(r))
        if done:
            break
    return ChainOutcome(state, list(moves), rewards, s, done)


def chain_advantage(chain_return: float, k: int, value: float, next_value: float, done: bool, gamma: float) -> float:
    """A = R_chain + γ^k · V(s′) · (1 − done) − V(s)  (the k-step TD advantage; see module docstring)."""
    return chain_return + (gamma ** k) * next_value * (1.0 - float(done)) - value


@dataclass(frozen=True)
class MCSample:
    """One Monte-Carlo target: from ``state`` the episode collected ``partial`` (discounted), then was cut
    at ``tail_state`` with ``tail_discount`` = γ^(moves until the cut); 0 when it reached the goal.
    The bootstrapped target is  partial + tail_discount · V(tail_state)."""

    state: State
    partial: float
    tail_state: State
    tail_discount: float


def mc_samples(states: list[State], rewards: list[float], final_state: State, reached: bool,
               gamma: float) -> list[MCSample]:
    """Targets for every visited state of one per-move trajectory (``states[t]`` got ``rewards[t]``)."""
    out, G = [], 0.0
    tail = 0.0 if reached else 1.0  # discount from "now" to the cut
    for s, r in zip(reversed(states), reversed(rewards)):
        G = r + gamma * G
        tail *= gamma
        out.append(MCSample(s, G, final_state, 0.0 if reached else tail))
    return out[::-1]


def episode_samples(outcomes: list[ChainOutcome], gamma: float) -> list[MCSample]:
    """Targets at the start of each chain of one episode (the chains flattened into per-move transitions)."""
    if not outcomes:
        return []
    moves_states, rewards, firsts = [], [], []
    for o in outcomes:
        firsts.append(len(rewards))
        moves_states.extend([o.state] * o.k)  # only the first of each chain is used
        rewards.extend(o.rewards)
    per_move = mc_samples(moves_states, rewards, outcomes[-1].next_state, outcomes[-1].done, gamma)
    return [MCSample(o.state, per_move[i].partial, per_move[i].tail_state, per_move[i].tail_discount)
            for o, i in zip(outcomes, firsts)]


def scripted_samples(env: GridWorld, policy, n_episodes: int, max_moves: int, gamma: float,
                     rng: random.Random) -> list[MCSample]:
    """Targets for every visited state of ``n_episodes`` one-move-per-step episodes of ``policy``, each from
    a uniformly drawn start state and cut after ``max_moves`` (the cut is bootstrapped by ``fit_critic``)."""
    starts = env.start_states()
    out = []
    for _ in range(n_episodes):
        s = rng.choice(starts)
        states, rewards, done = [], [], False
        for _ in range(max_moves):
            s2, r, done = env.move(s, sample_action(policy(s), rng))
            states.append(s)
            rewards.append(r)
            s = s2
            if done:
                break
        out.extend(mc_samples(states, rewards, s, done, gamma))
    return out


def scripted_policy(env: GridWorld, epsilon: float, gamma: float):
    """ε-greedy on Q* (the scripted policy whose exact V^π checks the critic)."""
    _, Q = value_iteration(env, gamma)
    return epsilon_greedy(env, Q, epsilon)


def grid_values(V: np.ndarray, states: list[State]) -> np.ndarray:
    """V[o, y, x] for each (x, y, o): the bridge between (4, size, size) value grids and state lists."""
    return np.array([V[o, y, x] for x, y, o in states], dtype=float)


def exact_judge(V: np.ndarray) -> Callable[[list[State]], np.ndarray]:
    """A judge that reads values from an exact grid (the oracle: V*). Goal states are terminal: 0."""
    def judge(states: list[State]) -> np.ndarray:
        v = grid_values(V, states)
        return np.nan_to_num(v, nan=0.0)

    return judge
