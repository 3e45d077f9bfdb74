"""Text: the state as the actor reads it, its prompt, and the parser that turns an answer into a chain of moves."""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..envs.gridworld import COMPASS, FORWARD, LEFT, GridWorld, State

DIRECTIONS = {"ahead": 0, "left": 1, "behind": 2, "right": 3}
"""Each direction of the menu → how many times the actor turns left to face it."""
ANSWER_PREFIX = "Go "
"""The assistant turn is opened with this text, so the model's first token is already the move's number.
"Go " rather than "Move ": measured on the untrained actor, greedy over the 60 start states, it gives 10
distinct answers (all valid moves) where "Move " gives 7 (4 valid); see the module docstring."""


def rules(env: GridWorld) -> str:
    """The system turn: the info text, the walls, and the answer as a schema with placeholders (no example)."""
    return (f"{env.info_text}; walls block. Answer with one move: \"<number> cells <ahead, behind, left or right>\". "
            "You turn to face that way, then go that many cells.")


def goal_offset(env: GridWorld, state: State) -> tuple[int, int]:
    """The goal relative to the agent: (cells ahead, cells to the right); negative = behind / to the left."""
    x, y, o = state
    dx, dy = env.goal[0] - x, env.goal[1] - y
    fx, fy = [(0, -1), (1, 0), (0, 1), (-1, 0)][o]  # forward; right is forward turned clockwise: (−fy, fx)
    return dx * fx + dy * fy, -dx * fy + dy * fx


def _cells(n: int) -> str:
    return f"{n} cell" + ("" if n == 1 else "s")


def state_text(env: GridWorld, state: State) -> str:
    """What the actor reads (and the critic, with the info text): position, heading and the goal seen from the agent.

    The lateral offset is named first ("1 cell to your right and 2 cells behind"). Measured on the untrained
    model with the "Go " prefix (greedy, 60 states): lateral first and ahead/behind first both give 10 distinct
    answers; lateral first starts further from optimal (first-chain V*-advantage −2.0 vs −1.1, since the
    sideways half costs turns), which leaves SimPO more to learn.
    """
    x, y, o = state
    ahead, right = goal_offset(env, state)
    parts = []
    if right:
        parts.append(f"{_cells(abs(right))} to your {'right' if right > 0 else 'left'}")
    if ahead:
        parts.append(f"{_cells(abs(ahead))} {'ahead' if ahead > 0 else 'behind'}")
    where = " and ".join(parts) if parts else "here"
    return f"You are at ({x}, {y}) facing {COMPASS[o]}. The goal is {where}."


def actor_prompt(env: GridWorld, state: State) -> list[dict]:
    """Chat messages: the rules (with the info text) as the system turn, the state as the user turn.
    The rules come first so every prompt shares them as a prefix (the sampler prefills it once)."""
    return [{"role": "system", "content": rules(env)}, {"role": "user", "content": state_text(env, state)}]


@dataclass
class ParsedChain:
    """The moves read from one answer; ``ok`` is False on a parse failure (then ``moves`` is empty)."""

    moves: list[str]
    ok: bool
    error: str = ""
    move: str = ""


_MOVE = re.compile(r"\s*(\d{1,3}) cells? (?:to (?:the |your )?)?(ahead|behind|left|right)(?![a-z])", re.IGNORECASE)


def parse_move(text: object, max_cells: int = 3) -> ParsedChain:
    """Read one move of the menu from the start of an answer and expand it into grid moves. Never raises.

    Accepted: optional spaces, an integer n in 1..max_cells, "cell" or "cells", optionally "to the" /
    "to your" / "to", then one of ahead, behind, left, right (any letter case) as a whole word; what
    follows the move is ignored (generation stops there anyway). The chain is "turn left" ×
    DIRECTIONS[direction] (right = three left turns) followed by n × "move forward".
    Anything else — no move at the start, n out of range, an unknown direction, a non-string — is a
    failure: ``ok=False``, no moves, ``error`` says which.
    """
    if not isinstance(text, str):
        return ParsedChain([], False, f"answer is {type(text).__name__}, not text")
    m = _MOVE.match(text)
    if m is None:
        return ParsedChain([], False, "no move \"<n> cells <direction>\" at the start")
    n, direction = int(m.group(1)), m.group(2).lower()
    if not 1 <= n <= max_cells:
        return ParsedChain([], False, f"{n} cells is outside 1..{max_cells}")
    return ParsedChain([LEFT] * DIRECTIONS[direction] + [FORWARD] * n, True, "", f"{n} {_cells(n)[2:]} {direction}")


def move_complete(completion: str) -> bool:
    """Stop function for the sampler: True once the completion starts with a whole move ("2 cells to the
    left"), or once it has a line break or a full stop (then it is not a move, and the cap need not be waited for)."""
    return _MOVE.match(completion) is not None or "\n" in completion or "." in completion


def menu(max_cells: int = 3) -> list[list[str]]:
    """Every chain the menu can express: 4 directions × 1..max_cells cells."""
    return [[LEFT] * t + [FORWARD] * n for t in DIRECTIONS.values() for n in range(1, max_cells + 1)]
