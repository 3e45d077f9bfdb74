"""ERL's cross-episode reflection memory and the rules that decide what is stored and what is internalized."""
from __future__ import annotations

from collections import deque
from typing import Sequence

from .config import INTERNALIZATION_RULES


def should_store(r1: float, r2: float, threshold: float | None) -> bool:
    """The memory add rule: r2 > r1 (threshold None) or r2 ≥ threshold."""
    return r2 > r1 if threshold is None else r2 >= threshold


def should_internalize(r1: float, r2: float, rule: str, tau: float) -> bool:
    """The internalization rule: "success" r2 ≥ τ, "improved" r2 > r1, "positive" r2 > 0."""
    if rule == "success":
        return r2 >= tau
    if rule == "improved":
        return r2 > r1
    if rule == "positive":
        return r2 > 0
    raise ValueError(f"unknown internalization rule {rule!r}; use one of {INTERNALIZATION_RULES}")


class ReflectionMemory:
    """FIFO of reflections that worked; retrieval by recency or by prompt similarity."""

    def __init__(self, size: int, retrieval: str = "recency", encoder=None):
        self.entries: deque[dict] = deque(maxlen=size)
        self.retrieval, self.encoder = retrieval, encoder

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, reflection: str, prompt: str, r1: float, r2: float, step: int) -> None:
        if self.entries.maxlen:
            self.entries.append({"reflection": reflection, "prompt": prompt, "r1": r1, "r2": r2, "step": step})

    def retrieve(self, prompt: str, k: int) -> list[str]:
        entries = list(self.entries)
        if k <= 0 or not entries:
            return []
        if self.retrieval == "recency":
            return [e["reflection"] for e in entries[-k:][::-1]]
        if self.encoder is None:
            from ..models import TextEncoder

            self.encoder = TextEncoder()
        sims = self.encoder.embed([e["prompt"] for e in entries]) @ self.encoder.embed([prompt])[0]  # (M,)
        return [entries[i]["reflection"] for i in sims.topk(min(k, len(entries))).indices.tolist()]

    @staticmethod
    def format(reflections: Sequence[str]) -> str:
        return " ".join(f"({i + 1}) {r.strip()}" for i, r in enumerate(reflections)) or "None available."
