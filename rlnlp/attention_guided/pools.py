"""Pair pools: one episode's material, keys → values in document order, from Wikipedia or Twenty Questions, and the
text a placed pair adds to the context."""
from __future__ import annotations

import random
from dataclasses import dataclass

from .. import data as rdata
from .config import SPLIT_SEED

INSTRUCTIONS = {
    "wikipedia": "Facts from one encyclopedia article, each written as a query, a key and its value.",
    "twenty_questions": "Twenty Questions about one hidden object: each key is a yes/no question, its value the "
                        "answer.",
}


@dataclass
class Pool:
    """One episode's material: keys[j] → values[j], j in document order."""

    name: str
    keys: list[str]
    values: list[str]
    instruction: str

    def __len__(self) -> int:
        return len(self.keys)


def _split(names: list[str], eval_fraction: float) -> dict[str, list[str]]:
    names = sorted(names)
    random.Random(SPLIT_SEED).shuffle(names)
    n_eval = max(1, int(round(eval_fraction * len(names))))
    return {"eval": sorted(names[:n_eval]), "train": sorted(names[n_eval:])}


def _distinct(draw, n: int, what: str) -> list[Pool]:
    """n pools with distinct (name, keys) from repeated ``draw()`` calls."""
    seen, out = set(), []
    for _ in range(50 * n + 100):
        pool = draw()
        ident = (pool.name, tuple(pool.keys))
        if ident not in seen:
            seen.add(ident)
            out.append(pool)
            if len(out) == n:
                return out
    raise ValueError(f"found only {len(out)} distinct {what} pools, {n} asked: ask for fewer")


class WikipediaPairs:
    """Pools of consecutive (key_tokens → value_tokens) chunks from one article, cut with the policy tokenizer."""

    def __init__(self, tokenizer, cfg, summaries: dict[str, str] | None = None):
        self.tokenizer, self.cfg = tokenizer, cfg
        self.summaries = summaries if summaries is not None else rdata.wikipedia_summaries()
        self.splits = _split(list(self.summaries), cfg.eval_fraction)

    def pool_from(self, title: str) -> Pool | None:
        """The first pool_size pairs of the article, or None if it is too short."""
        k, v, n = self.cfg.key_tokens, self.cfg.value_tokens, self.cfg.pool_size
        text = " ".join(self.summaries[title].split())
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < n * (k + v):
            return None
        decode = lambda chunk: self.tokenizer.decode(chunk).strip()
        starts = [j * (k + v) for j in range(n)]
        return Pool(title, [decode(ids[s : s + k]) for s in starts], [decode(ids[s + k : s + k + v]) for s in starts],
                    INSTRUCTIONS["wikipedia"])

    def pool(self, rng: random.Random, split: str = "train") -> Pool:
        titles = self.splits[split]
        for _ in range(10_000):
            found = self.pool_from(rng.choice(titles))
            if found is not None:
                return found
        need = self.cfg.pool_size * (self.cfg.key_tokens + self.cfg.value_tokens)
        raise ValueError(f"no {split} article has the {need} tokens a pool of {self.cfg.pool_size} pairs needs: "
                         "lower pool_size")

    def pools(self, n: int, split: str, seed: int) -> list[Pool]:
        """n pools from n different articles of the split (seeded)."""
        titles = list(self.splits[split])
        random.Random(seed).shuffle(titles)
        out = []
        for title in titles:
            found = self.pool_from(title)
            if found is not None:
                out.append(found)
                if len(out) == n:
                    return out
        raise ValueError(f"only {len(out)} {split} articles are long enough for a pool of {self.cfg.pool_size} pairs; "
                         f"{n} asked")


class TwentyQuestionsPairs:
    """Pools of pool_size questions (in question-id order) about one hidden object; values "Yes"/"No"."""

    def __init__(self, cfg, table: tuple[list[dict], list[dict]] | None = None):
        self.cfg = cfg
        self.questions, objects = table if table is not None else rdata.twenty_questions()
        if cfg.pool_size > len(self.questions):
            raise ValueError(f"pool_size {cfg.pool_size} > the {len(self.questions)} questions in the Twenty "
                             "Questions table")
        self.objects = {o["object"]: o for o in objects}
        self.splits = _split(list(self.objects), cfg.eval_fraction)

    def pool(self, rng: random.Random, split: str = "train") -> Pool:
        obj = self.objects[rng.choice(self.splits[split])]
        chosen = sorted(rng.sample(range(len(self.questions)), self.cfg.pool_size))
        qs = [self.questions[i] for i in chosen]
        answers = ["Yes" if obj["answers"][q["id"]] else "No" for q in qs]
        return Pool(obj["object"], [q["question"] for q in qs], answers, INSTRUCTIONS["twenty_questions"])

    def pools(self, n: int, split: str, seed: int) -> list[Pool]:
        """n distinct (object, questions) pools of the split (seeded)."""
        rng = random.Random(seed)
        return _distinct(lambda: self.pool(rng, split), n, f"Twenty Questions {split}")


def make_pairs(cfg, tokenizer):
    return WikipediaPairs(tokenizer, cfg) if cfg.dataset == "wikipedia" else TwentyQuestionsPairs(cfg)


def pair_prompt(query: str, key: str) -> str:
    """What precedes a value in the context; the query text is appended exactly as sampled after " Query:"."""
    return f" Query:{query} Key: {key} Value:"


def context_of(pool: Pool, order, queries) -> str:
    """The context after placing the pairs ``order`` (with their queries): instruction + " Query:… Key:… Value: …"."""
    return pool.instruction + "".join(pair_prompt(q, pool.keys[j]) + f" {pool.values[j]}"
                                      for j, q in zip(order, queries))


