"""Twenty Questions with a local oracle (no LM): the multi-turn environment of ArCHer's paper, on our table.

The environment picks a secret object from data/twenty_questions/ (~150 everyday objects × 20
yes/no attribute questions, see ``rlnlp.data.twenty_questions``). Each turn the agent asks one
free-text question. The oracle:

1. detects a guess — the question names an object of the table after a guessing phrase ("Is it a
   dog?", "My guess is a dog"; not "Is it bigger than a dog?"); naming the secret ends the
   episode, naming one other object is answered "No.", naming several is refused;
2. otherwise matches the question to the closest attribute question by MiniLM cosine similarity
   (``TextEncoder.embed``, the 20 attribute questions embedded once and cached); at or above
   ``threshold`` it answers "Yes."/"No." from the secret's row, below it "I don't know."

Reward −1 per turn, 0 and done on a correct guess, at most ``max_turns`` turns, so returns lie in
[−max_turns, 0] (ArCHer's scheme). The observation is the game so far as one user message
(``chat = True``); an utterance (one question) ends at "?" or a newline.
"""
from __future__ import annotations

import random
import re

GUESS_LEAD = (r"\b(?:is it|it is|it's|is this|are you thinking of|could it be|would it be|my guess is|i guess|"
              r"or)\s+(?:(?:a|an|the|some|one)\s+)?")
INTRO = ("Let's play Twenty Questions. I am thinking of an everyday object. Ask me one yes/no question "
         "at a time to find out what it is, and guess it by asking \"Is it a <object>?\".")


class Oracle:
    """Answers free-text questions about a secret object from the attribute table."""

    def __init__(self, questions: list[dict], objects: list[dict], encoder=None, threshold: float = 0.7):
        from ..models import TextEncoder

        if not questions or not objects:
            raise ValueError("the oracle needs at least one question and one object")
        self.questions, self.objects, self.threshold = questions, objects, threshold
        self.encoder = encoder or TextEncoder()
        self.question_texts = [q["question"] for q in questions]
        self.question_emb = self.encoder.embed(self.question_texts)  # (Q, D), normalised
        # longest names first, so "tennis ball" wins over "ball"; an optional plural s/es. A name
        # counts only right after a guessing phrase: "Is it a car?" guesses, "Is it bigger than a
        # car?" does not.
        names = sorted({o["object"].lower() for o in objects}, key=len, reverse=True)
        self._name_patterns = [(n, re.compile(GUESS_LEAD + re.escape(n) + r"(?:e?s)?\b")) for n in names]

    def named_objects(self, question: str) -> list[str]:
        """Objects the question guesses (non-overlapping, longest match first)."""
        text, found = question.lower(), []
        for name, pattern in self._name_patterns:
            match = pattern.search(text)
            if match:
                found.append(name)
                text = text[: match.start()] + " " * (match.end() - match.start()) + text[match.end():]
        return found

    def closest_question(self, question: str) -> tuple[int, float]:
        """Index of the most similar attribute question and its cosine similarity."""
        sims = self.encoder.embed([question])[0] @ self.question_emb.T  # (Q,)
        best = int(sims.argmax())
        return best, float(sims[best])

    def answer(self, question: str, secret: dict) -> tuple[str, dict]:
        """The oracle's reply and what it decided: {"kind": guess|attribute|unknown, "correct", ...}."""
        named = self.named_objects(question)
        if len(named) == 1:
            correct = named[0] == secret["object"].lower()
            return ("Yes! You got it." if correct else "No."), {"kind": "guess", "guess": named[0], "correct": correct}
        if len(named) > 1:
            return "Please guess one object at a time.", {"kind": "guess", "guess": named, "correct": False}
        best, sim = self.closest_question(question)
        info = {"kind": "attribute", "matched": self.question_texts[best], "similarity": round(sim, 3), "correct": False}
        if sim < self.threshold:
            info["kind"] = "unknown"
            return "I don't know.", info
        return ("Yes." if secret["answers"][self.questions[best]["id"]] else "No."), info


class TwentyQuestions:
    """The game as a text environment (``reset(seed) -> observation``, ``step(question)``)."""

    actions = None
    chat = True

    def __init__(self, oracle: Oracle | None = None, max_turns: int = 20, objects: list[dict] | None = None,
                 questions: list[dict] | None = None, encoder=None, threshold: float = 0.7):
        if oracle is None:
            if objects is None or questions is None:
                from ..data import twenty_questions

                questions, objects = twenty_questions()
            oracle = Oracle(questions, objects, encoder=encoder, threshold=threshold)
        self.oracle, self.max_turns = oracle, max_turns
        self.secret: dict = {}
        self.history: list[tuple[str, str]] = []
        self.done = True

    def observation(self) -> str:
        lines = [INTRO]
        if self.history:
            lines.append("So far:")
            lines += [f"{i + 1}. {q} {a}" for i, (q, a) in enumerate(self.history)]
        lines.append(f"You have {self.max_turns - len(self.history)} questions left. "
                     "Reply with your next yes/no question only.")
        return "\n".join(lines)

    def reset(self, seed: int | None = None) -> str:
        self.secret = random.Random(seed).choice(self.oracle.objects)
        self.history, self.done = [], False
        return self.observation()

    @staticmethod
    def split(utterance: str) -> bool:
        return "?" in utterance or "\n" in utterance

    def step(self, question: str) -> tuple[str, float, bool, dict]:
        if self.done:
            raise RuntimeError("step() after the episode ended: call reset()")
        question = " ".join(question.split()) or "(nothing)"
        reply, info = self.oracle.answer(question, self.secret)
        self.history.append((question, reply))
        correct = info["correct"]
        self.done = correct or len(self.history) >= self.max_turns
        info.update(secret=self.secret["object"], turn=len(self.history), reply=reply)
        if self.done:
            info["success"] = correct
        return self.observation(), 0.0 if correct else -1.0, self.done, info
