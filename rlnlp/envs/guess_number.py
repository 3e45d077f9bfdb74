"""Guess the number: the smallest multi-step text environment (used by the tour notebook).

The environment hides an integer in [1, high]; each turn the agent names a number and hears
"too low", "too high" or "correct". Reward −1 per wrong guess, 0 on the correct one (so the
return is minus the number of wrong guesses); at most ``max_turns`` turns. Binary search needs
at most ⌈log2(high + 1)⌉ guesses.
"""
from __future__ import annotations

import random
import re


class GuessNumber:
    actions = None  # free text: the first integer in the action is the guess

    def __init__(self, high: int = 16, max_turns: int = 6):
        if high < 2:
            raise ValueError(f"high must be ≥ 2, got {high}")
        self.high, self.max_turns = high, max_turns
        self.secret, self.turn, self.history = 0, 0, []

    def _observation(self) -> str:
        text = f"I am thinking of a whole number from 1 to {self.high}. Guess it by answering with one number."
        if self.history:
            text += " So far: " + "; ".join(f"{g} is {verdict}" for g, verdict in self.history) + "."
        return text

    def reset(self, seed: int | None = None) -> str:
        self.secret = random.Random(seed).randint(1, self.high)
        self.turn, self.history = 0, []
        return self._observation()

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        self.turn += 1
        match = re.search(r"-?\d+", action)
        guess = int(match.group()) if match else None
        if guess == self.secret:
            self.history.append((guess, "correct"))
            return self._observation(), 0.0, True, {"guess": guess, "verdict": "correct"}
        verdict = "not a number" if guess is None else ("too low" if guess < self.secret else "too high")
        self.history.append((guess if guess is not None else repr(action[:12]), verdict))
        done = self.turn >= self.max_turns
        return self._observation(), -1.0, done, {"guess": guess, "verdict": verdict}


def bisect_policy(observation: str) -> str:
    """The optimal scripted policy: guess the middle of the interval still possible."""
    high = int(re.search(r"from 1 to (\d+)", observation).group(1))
    lo, hi = 1, high
    for g, verdict in re.findall(r"(-?\d+) is (too low|too high)", observation):
        if verdict == "too low":
            lo = max(lo, int(g) + 1)
        else:
            hi = min(hi, int(g) - 1)
    return str((lo + hi) // 2)
