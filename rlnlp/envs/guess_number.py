"""Guess the number: the smallest multi-step text environment (the tour notebook's, and a multi-turn ArCHer task).

The environment hides an integer in [low, high]; each turn the agent names a number and hears
"too low", "too high" or "correct". Reward −1 per wrong guess, 0 on the correct one (so the
return is minus the number of wrong guesses); at most ``max_turns`` turns. Binary search needs
at most ⌈log2(high − low + 2)⌉ guesses.

The observation states the range and every earlier guess with its verdict ("So far: 8 is too
high; 4 is too low."): good play needs that history, since the interval still possible is only
written there. Options that put the game within a small policy's reach, all general:

* ``low``, ``high``, ``max_turns`` — the range and the turn cap (with ``max_turns`` equal to the
  bisection bound, only play that reads the history wins every time);
* ``prefill`` (e.g. "My guess:") — the agent's turn starts with this text: the observation is then
  the rendered chat with the assistant turn opened and ``prefill`` written (``chat`` False, which
  needs ``tokenizer``), and the utterance only has to name the number;
* ``turns_left`` — end the observation with "N guesses left";
* ``forfeit`` — an utterance that names no number loses the game at once, with −1 for every turn left
  (the return it would get if every remaining guess were wrong): the answer's format then carries a
  per-turn penalty worse than any guess, rather than the −1 of a wrong guess;
* ``intro`` — the rules' wording, a template with ``{low}`` and ``{high}`` (it must say "from {low} to
  {high}" for ``bisect_policy`` to read the range from the text).

Three reference policies play the SAME episodes as a learner (``reset(seed)`` fixes the secret):
``bisect`` (the scripted optimum), ``random_consistent`` (a uniform number the answers have not
ruled out) and ``random_new`` (a uniform number in the range not guessed before).

The untrained policy, these three and bisection on the same episodes (the game's learnable zone) are
measured in data/recurve/README.md.
"""
from __future__ import annotations

import random
import re

GUESS = re.compile(r"-?\d+")
INTRO = "I am thinking of a whole number from {low} to {high}. Guess it by answering with one number."


class GuessNumber:
    actions = None  # free text: the first integer in the action is the guess

    def __init__(self, high: int = 16, max_turns: int = 6, low: int = 1, prefill: str = "", tokenizer=None,
                 turns_left: bool = False, intro: str = INTRO, forfeit: bool = False):
        if high - low < 1:
            raise ValueError(f"the range needs at least two numbers, got low={low}, high={high}")
        if max_turns < 1:
            raise ValueError(f"max_turns must be ≥ 1, got {max_turns}")
        if prefill and tokenizer is None:
            raise ValueError("prefill needs the policy's tokenizer (the observation carries the chat template)")
        self.low, self.high, self.max_turns = low, high, max_turns
        self.prefill, self.tokenizer, self.turns_left, self.intro = prefill, tokenizer, turns_left, intro
        self.forfeit = forfeit
        self.chat = not prefill
        self.secret, self.turn, self.history, self.done = 0, 0, [], True

    def clone(self) -> "GuessNumber":
        """A fresh environment with the same settings."""
        return GuessNumber(high=self.high, max_turns=self.max_turns, low=self.low, prefill=self.prefill,
                           tokenizer=self.tokenizer, turns_left=self.turns_left, intro=self.intro, forfeit=self.forfeit)

    def text(self) -> str:
        """The game so far as plain text (the user message when ``prefill`` is set)."""
        text = self.intro.format(low=self.low, high=self.high)
        if self.history:
            text += " So far: " + "; ".join(f"{g} is {verdict}" for g, verdict in self.history) + "."
        if self.turns_left:
            left = self.max_turns - self.turn
            text += f" {left} guess{'es' if left != 1 else ''} left."
        return text

    def _observation(self) -> str:
        if not self.prefill:
            return self.text()
        from ..sampling import render_prompts

        return render_prompts(self.tokenizer, [self.text()])[0] + self.prefill

    def reset(self, seed: int | None = None) -> str:
        self.secret = random.Random(seed).randint(self.low, self.high)
        self.turn, self.history, self.done = 0, [], False
        return self._observation()

    def state(self) -> dict:
        """What a checkpoint needs to continue this episode."""
        return {"secret": self.secret, "turn": self.turn, "history": [list(h) for h in self.history], "done": self.done}

    def load_state(self, state: dict) -> None:
        self.secret, self.turn, self.done = state["secret"], state["turn"], state["done"]
        self.history = [tuple(h) for h in state["history"]]

    @staticmethod
    def split(utterance: str) -> bool:
        """An utterance ends after its first number (a digit followed by anything else) or at a newline."""
        return bool(re.search(r"\d\D", utterance)) or "\n" in utterance

    def possible(self) -> tuple[int, int]:
        """(lo, hi): the numbers the answers so far have not ruled out."""
        lo, hi = self.low, self.high
        for g, verdict in self.history:
            if verdict == "too low":
                lo = max(lo, int(g) + 1)
            elif verdict == "too high":
                hi = min(hi, int(g) - 1)
        return lo, hi

    def bisect(self) -> str:
        """The scripted optimum: the middle of the interval still possible."""
        lo, hi = self.possible()
        return str((lo + hi) // 2)

    def random_consistent(self, rng: random.Random) -> str:
        """A uniform number that the answers so far have not ruled out (reads the history, does not bisect)."""
        lo, hi = self.possible()
        tried = {g for g, _ in self.history}
        left = [n for n in range(lo, hi + 1) if n not in tried] or [lo]
        return str(rng.choice(left))

    def random_new(self, rng: random.Random) -> str:
        """A uniform valid move that ignores the verdicts: a number in the range not guessed before."""
        tried = {g for g, _ in self.history}
        left = [n for n in range(self.low, self.high + 1) if n not in tried] or [self.low]
        return str(rng.choice(left))

    def step(self, action: str) -> tuple[str, float, bool, dict]:
        if self.done and self.turn:
            raise RuntimeError("step() after the episode ended: call reset()")
        if self.tokenizer is not None and self.tokenizer.eos_token:  # a raw-text utterance ended by EOS carries it
            action = action.replace(self.tokenizer.eos_token, " ")
        self.turn += 1
        match = GUESS.search(action)
        guess = int(match.group()) if match else None
        repeated = guess is not None and any(g == guess for g, _ in self.history)
        lo, hi = self.possible()
        consistent = guess is not None and lo <= guess <= hi
        info = {"guess": guess, "repeated": repeated, "consistent": consistent, "turn": self.turn,
                "secret": self.secret}
        if guess == self.secret:
            self.history.append((guess, "correct"))
            self.done = True
            return self._observation(), 0.0, True, {**info, "verdict": "correct", "reply": "correct", "success": True}
        verdict = "not a number" if guess is None else ("too low" if guess < self.secret else "too high")
        self.history.append((guess if guess is not None else repr(action.strip()[:12]), verdict))
        self.done = self.turn >= self.max_turns
        reward = -1.0
        if guess is None and self.forfeit:  # an utterance without a number loses the game: −1 for every turn left
            reward, self.done = -float(self.max_turns - self.turn + 1), True
        info.update(verdict=verdict, reply=verdict)
        if self.done:
            info["success"] = False
        return self._observation(), reward, self.done, info


def bisect_policy(observation: str) -> str:
    """The optimal scripted policy from the observation text: guess the middle of the interval still possible."""
    m = re.search(r"from (-?\d+) to (-?\d+)", observation)
    lo, hi = int(m.group(1)), int(m.group(2))
    for g, verdict in re.findall(r"(-?\d+) is (too low|too high)", observation):
        if verdict == "too low":
            lo = max(lo, int(g) + 1)
        else:
            hi = min(hi, int(g) - 1)
    return str((lo + hi) // 2)
