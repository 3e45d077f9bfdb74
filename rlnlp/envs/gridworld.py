"""The 4×4 grid world of LactChain (notebook 02), fixed, with exact values; alectors (notebook 01) renders it in words.

State (x, y, o): position and orientation, o = 0 up (y−1), 1 right (x+1), 2 down (y+1), 3 left (x−1).
Moves: "move forward", "turn left" (o−1 mod 4) and, when enabled, "turn right" (o+1 mod 4).
Positions clamp at the walls. Each move costs −1, except the move that reaches the goal, which
pays +100 and ends the episode (the rest of a chain is then ignored). ``step`` takes one move or a
whole chain of moves; an episode also ends after ``max_steps`` steps.

The original compared the scalar x with the goal tuple, so the goal was never reached; here the
shortest route from the start (turn left, turn left, move forward, turn left, move forward)
returns +96 — a test pins it.

Exact values are computed on the per-move MDP (64 states, the goal's 4 states terminal):
``value_iteration`` gives V* and Q*, ``policy_evaluation`` gives V^π of any stochastic policy.
Arrays are indexed ``[o, y, x]`` so ``V[o]`` is a 4×4 picture of the grid for one orientation.
"""
from __future__ import annotations

import itertools
import random
from typing import Callable, Sequence

import numpy as np

FORWARD, LEFT, RIGHT = "move forward", "turn left", "turn right"
HEADINGS = ("up", "right", "down", "left")  # index = orientation
COMPASS = ("north", "east", "south", "west")
_DELTA = ((0, -1), (1, 0), (0, 1), (-1, 0))

State = tuple[int, int, int]


class GridWorld:
    """The grid as a text environment: observations are sentences, actions are move strings or chains."""

    def __init__(self, size: int = 4, goal: tuple[int, int] = (1, 1), start: State = (0, 0, 0),
                 max_steps: int = 20, turn_right: bool = False, step_reward: float = -1.0,
                 goal_reward: float = 100.0, random_start: bool = False):
        if not (0 <= goal[0] < size and 0 <= goal[1] < size):
            raise ValueError(f"goal {goal} lies outside a {size}×{size} grid")
        self.size, self.goal, self.start = size, tuple(goal), tuple(start)
        self.max_steps, self.random_start = max_steps, random_start
        self.step_reward, self.goal_reward = step_reward, goal_reward
        self.actions = [FORWARD, LEFT] + ([RIGHT] if turn_right else [])
        self.state: State = self.start
        self.steps = 0
        self.done = False

    # ---- dynamics -------------------------------------------------------------------------
    def is_goal(self, state: State) -> bool:
        return (state[0], state[1]) == self.goal

    def move(self, state: State, action: str) -> tuple[State, float, bool]:
        """One move from ``state``: (next state, reward, reached goal)."""
        x, y, o = state
        if action == FORWARD:
            dx, dy = _DELTA[o]
            x = min(max(x + dx, 0), self.size - 1)
            y = min(max(y + dy, 0), self.size - 1)
        elif action == LEFT:
            o = (o - 1) % 4
        elif action == RIGHT and RIGHT in self.actions:
            o = (o + 1) % 4
        else:
            raise ValueError(f"unknown move {action!r}; this grid accepts {self.actions}")
        nxt = (x, y, o)
        if self.is_goal(nxt):
            return nxt, self.goal_reward, True
        return nxt, self.step_reward, False

    def run_chain(self, state: State, moves: Sequence[str]) -> tuple[State, float, bool, int]:
        """Apply moves in order until the goal: (final state, summed reward, reached goal, moves used)."""
        total, used = 0.0, 0
        for m in moves:
            state, r, reached = self.move(state, m)
            total += r
            used += 1
            if reached:
                return state, total, True, used
        return state, total, False, used

    # ---- text environment protocol ---------------------------------------------------------
    @property
    def info_text(self) -> str:
        return f"Grid is size {self.size}, goal position is at {self.goal}"

    def describe(self, state: State | None = None) -> str:
        x, y, o = state if state is not None else self.state
        return f"You are at ({x}, {y}) facing {COMPASS[o]}. The goal is at ({self.goal[0]}, {self.goal[1]})."

    def start_states(self) -> list[State]:
        """Every non-terminal state (60 on the default grid)."""
        return [s for s in all_states(self.size) if not self.is_goal(s)]

    def reset(self, seed: int | None = None, state: State | None = None) -> str:
        if state is not None:
            if self.is_goal(state):
                raise ValueError(f"{state} is a goal state (terminal); start elsewhere")
            self.state = tuple(state)
        elif self.random_start:
            self.state = random.Random(seed).choice(self.start_states())
        else:
            self.state = self.start
        self.steps, self.done = 0, False
        return self.describe()

    def step(self, action: str | Sequence[str]) -> tuple[str, float, bool, dict]:
        if self.done:
            raise RuntimeError("step() after the episode ended: call reset()")
        moves = [action] if isinstance(action, str) else list(action)
        before = self.state
        self.state, reward, reached, used = self.run_chain(self.state, moves)
        self.steps += 1
        self.done = reached or self.steps >= self.max_steps
        info = {"state": self.state, "previous_state": before, "moves_used": used, "reached_goal": reached,
                "truncated": self.done and not reached, "info_text": self.info_text}
        return self.describe(), reward, self.done, info


def all_states(size: int = 4) -> list[State]:
    return [(x, y, o) for o, y, x in itertools.product(range(4), range(size), range(size))]


def policy_evaluation(env: GridWorld, policy: Callable[[State], dict[str, float]], gamma: float = 0.99,
                      tol: float = 1e-10, max_iter: int = 100_000) -> np.ndarray:
    """Exact V^π on the per-move MDP for a stochastic ``policy(state) -> {move: probability}``.

    V(s) = Σ_a π(a|s) [ r(s,a) + γ (1 − goal(s')) V(s') ];  goal states have V = 0.
    Returns ``(4, size, size)`` indexed [o, y, x].
    """
    V = np.zeros((4, env.size, env.size))
    states = env.start_states()
    for _ in range(max_iter):
        delta = 0.0
        for s in states:
            v = 0.0
            for a, p in policy(s).items():
                if p == 0:
                    continue
                (x2, y2, o2), r, reached = env.move(s, a)
                v += p * (r + (0.0 if reached else gamma * V[o2, y2, x2]))
            x, y, o = s
            delta = max(delta, abs(v - V[o, y, x]))
            V[o, y, x] = v
        if delta < tol:
            return V
    raise RuntimeError(f"policy evaluation did not converge in {max_iter} sweeps (a policy that never reaches the "
                       "goal with γ=1?)")


def q_from_v(env: GridWorld, V: np.ndarray, gamma: float = 0.99) -> dict[State, dict[str, float]]:
    """Q(s, a) = r(s, a) + γ (1 − goal(s')) V(s') for every non-terminal state and move."""
    Q = {}
    for s in env.start_states():
        Q[s] = {}
        for a in env.actions:
            (x2, y2, o2), r, reached = env.move(s, a)
            Q[s][a] = r + (0.0 if reached else gamma * V[o2, y2, x2])
    return Q


def value_iteration(env: GridWorld, gamma: float = 0.99, tol: float = 1e-10) -> tuple[np.ndarray, dict]:
    """V* and Q* on the per-move MDP: V(s) = max_a [ r(s,a) + γ (1 − goal(s')) V(s') ]."""
    V = np.zeros((4, env.size, env.size))
    while True:
        Q = q_from_v(env, V, gamma)
        delta = 0.0
        for (x, y, o), qs in Q.items():
            best = max(qs.values())
            delta = max(delta, abs(best - V[o, y, x]))
            V[o, y, x] = best
        if delta < tol:
            return V, q_from_v(env, V, gamma)


def epsilon_greedy(env: GridWorld, Q: dict, epsilon: float) -> Callable[[State], dict[str, float]]:
    """The scripted stochastic policy: greedy on Q with probability 1 − ε, uniform otherwise."""
    def policy(state: State) -> dict[str, float]:
        qs = Q[state]
        best = max(qs, key=qs.get)
        probs = {a: epsilon / len(qs) for a in qs}
        probs[best] += 1.0 - epsilon
        return probs

    return policy


def sample_action(policy_probs: dict[str, float], rng: random.Random) -> str:
    moves, probs = zip(*policy_probs.items())
    return rng.choices(moves, weights=probs)[0]


def success_probability(env: GridWorld, policy: Callable[[State], dict[str, float]],
                        horizon: int | None = None) -> np.ndarray:
    """Exact probability that ``policy`` reaches the goal within ``horizon`` moves (default ``env.max_steps``)
    from each state, one move per step:  P_h(s) = Σ_a π(a|s) [ goal(s') + (1 − goal(s')) P_{h−1}(s') ],  P_0 = 0.

    Returns ``(4, size, size)`` indexed [o, y, x]; the goal's cells are NaN (terminal, never a start).
    """
    horizon = env.max_steps if horizon is None else horizon
    states = env.start_states()
    steps = {s: [(p, env.move(s, a)) for a, p in policy(s).items() if p > 0] for s in states}
    P = np.zeros((4, env.size, env.size))
    for _ in range(horizon):
        new = np.zeros_like(P)
        for (x, y, o), moves in steps.items():
            new[o, y, x] = sum(p * (1.0 if reached else P[o2, y2, x2]) for p, ((x2, y2, o2), _, reached) in moves)
        P = new
    for o in range(4):
        P[o, env.goal[1], env.goal[0]] = np.nan
    return P
