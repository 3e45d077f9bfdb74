"""The instruction maze (notebook 01): the original alectors demo sentence made into a task.

Each episode draws a random route of ``length`` moves over a vocabulary (default Up/Down/Left/Right)
and says it in words:

    "You are inside a maze. To escape you must go: Up, Up, Left, Down. You have made 1 move."

The agent must read which move comes next. A correct move pays ``move_reward``; the last correct
move also pays ``escape_bonus`` and ends the episode (escaped); a wrong move ends it with
``wrong_reward``. A policy that ignores the text escapes with probability |vocabulary|^−length
(1/256 for four moves over four words), and :func:`random_policy_success` enumerates every
action sequence to confirm it.

Generalisation: :func:`split_routes` holds out a fixed, seeded share of all |vocabulary|^length
routes; ``InstructionMaze(routes=train)`` then draws its episodes from the training routes only,
while ``reset(route=...)`` can still start any route (a held-out one for evaluation).
"""
from __future__ import annotations

import itertools
import random
from typing import Sequence

DEFAULT_MOVES = ("Up", "Down", "Left", "Right")


class InstructionMaze:
    """A text environment: ``reset(seed) -> sentence``; ``step(move word) -> (sentence, reward, done, info)``."""

    def __init__(self, length: int = 4, moves: Sequence[str] = DEFAULT_MOVES, move_reward: float = 1.0,
                 escape_bonus: float = 5.0, wrong_reward: float = 0.0, routes: Sequence[Sequence[str]] | None = None):
        """``routes``: the routes ``reset(seed)`` draws from (uniformly); None = any route of ``length`` moves."""
        moves = list(moves)
        if length < 1:
            raise ValueError(f"InstructionMaze: route length must be ≥ 1, got {length}")
        if len(moves) < 2 or len(set(moves)) != len(moves):
            raise ValueError(f"InstructionMaze: the move vocabulary needs ≥ 2 distinct words, got {moves}")
        self.length, self.actions = length, moves
        self.move_reward, self.escape_bonus, self.wrong_reward = move_reward, escape_bonus, wrong_reward
        self.routes = None if routes is None else [self._checked(r) for r in routes]
        if self.routes is not None and not self.routes:
            raise ValueError("InstructionMaze: routes is empty; pass None to draw any route")
        self.route: list[str] = []
        self.made = 0
        self.done = True

    def describe(self, route: Sequence[str] | None = None, made: int | None = None) -> str:
        route = self.route if route is None else route
        made = self.made if made is None else made
        return (f"You are inside a maze. To escape you must go: {', '.join(route)}. "
                f"You have made {made} move{'' if made == 1 else 's'}.")

    def _checked(self, route: Sequence[str]) -> list[str]:
        unknown = [m for m in route if m not in self.actions]
        if len(route) != self.length or unknown:
            raise ValueError(f"InstructionMaze: route {list(route)} must have {self.length} moves from {self.actions}")
        return list(route)

    def reset(self, seed: int | None = None, route: Sequence[str] | None = None) -> str:
        rng = random.Random(seed)
        if route is not None:
            self.route = self._checked(route)
        elif self.routes is not None:
            self.route = list(rng.choice(self.routes))
        else:
            self.route = [rng.choice(self.actions) for _ in range(self.length)]
        self.made, self.done = 0, False
        return self.describe()

    @property
    def next_move(self) -> str:
        return self.route[self.made]

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        if self.done:
            raise RuntimeError("InstructionMaze.step() after the episode ended: call reset()")
        if action not in self.actions:
            raise ValueError(f"InstructionMaze.step: unknown move {action!r}; this maze accepts {self.actions}")
        expected = self.next_move
        correct = action == expected
        if correct:
            self.made += 1
        escaped = self.made == self.length
        reward = (self.move_reward + (self.escape_bonus if escaped else 0.0)) if correct else self.wrong_reward
        self.done = escaped or not correct
        info = {"expected": expected, "correct": correct, "escaped": escaped, "moves_made": self.made}
        return self.describe(), reward, self.done, info

    # ---- baselines ------------------------------------------------------------------------
    def random_policy_success(self) -> float:
        """|vocabulary|^−length: a policy that ignores the text must guess every move."""
        return len(self.actions) ** -self.length

    def random_policy_return(self) -> float:
        """Expected undiscounted return of the uniform policy:
        Σ_k p^k·move_reward + p^L·bonus + Σ_k p^(k−1)(1−p)·wrong."""
        p = 1.0 / len(self.actions)
        moves = sum(p ** k for k in range(1, self.length + 1)) * self.move_reward
        wrong = sum(p ** k * (1 - p) for k in range(self.length)) * self.wrong_reward
        return moves + p ** self.length * self.escape_bonus + wrong


def all_routes(length: int, moves: Sequence[str] = DEFAULT_MOVES) -> list[tuple[str, ...]]:
    """Every route of ``length`` moves over ``moves`` (|moves|^length of them), in a fixed order."""
    return list(itertools.product(moves, repeat=length))


def split_routes(length: int, moves: Sequence[str] = DEFAULT_MOVES, held_out: float = 0.25,
                 seed: int = 0) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """(training routes, held-out routes): a seeded shuffle of :func:`all_routes`, round(held_out · count) held out.

    The same (length, moves, held_out, seed) always gives the same split, so every run and every
    evaluation agrees on which routes the agent never trained on.
    """
    if not 0 <= held_out < 1:
        raise ValueError(f"split_routes: held_out must be in [0, 1), got {held_out}")
    routes = all_routes(length, moves)
    random.Random(seed).shuffle(routes)
    k = round(held_out * len(routes))
    return sorted(routes[k:]), sorted(routes[:k])


def random_policy_success(maze: InstructionMaze, route: Sequence[str]) -> float:
    """Exact escape probability of the uniform policy on ``route``, by enumerating every action sequence."""
    escaped = 0
    sequences = list(itertools.product(maze.actions, repeat=maze.length))
    for actions in sequences:
        maze.reset(route=route)
        done, info = False, {}
        for a in actions:
            _, _, done, info = maze.step(a)
            if done:
                break
        escaped += bool(info.get("escaped"))
    return escaped / len(sequences)
