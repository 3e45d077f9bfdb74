"""Attention-guided RL: the model orders its own curriculum (spec 03, notebooks/03_attention_guided_curriculum).

A document is cut into key → value pairs. At each step the policy LM writes a short query; its OWN
last attention layer scores the remaining keys (query projection of the query tokens against the
key projection of each key); one pair is drawn and appended to the context. The frozen reference
model then says how much easier each value became to predict thanks to everything chosen before:

    r_i = mean_t log p_ref(value_i | context_<i, query_i, key_i) − mean_t log p_ref(value_i | key_i)

Two ways to train it, one selector:

* **the full loop** (``AttentionGuidedConfig``, ``AttentionGuidedTrainer``; the full profile's method):
  the policy samples its queries, LoRA on q/k/v of every layer, REINFORCE on the query tokens and
  the selections, k3 KL to the reference on the query tokens. Every rollout samples text and runs
  the reference, so an update costs seconds on a GPU and minutes on a CPU.
* **selection only** (``SelectionConfig``, ``SelectionTrainer``; the smoke and cpu profiles): a
  FIXED query, LoRA on the last layer's q/k only. Then nothing below the last layer's q/k
  projections depends on the adapter, so per pool we cache once the inputs of those projections
  (query tokens after every prefix of every order, each key alone) and the reference's reward of
  EVERY order (pools of 3–4 pairs: 6 or 24 orders, enumerable — the best order, the ceiling, is
  known). After the cache an update is a few small matmuls, and the expected reward of a selector
  on a pool is exact (a sum over orders), not sampled.

    python -m rlnlp.attention_guided --dataset {wikipedia,twenty_questions} --batch-size 4 --episodes 1000 [--resume] [--mode selection]

Design choices that differ from the original (see the spec and issue 14):
* the selector averages the head scores, then takes ONE softmax with a temperature set from the
  measured score spread (and learnable); the original averaged one softmax per head, which at the
  measured spread (~0.4 across keys) was nearly uniform (entropy 2.046 vs 2.079 at 8 keys);
* selection samples from that distribution AS probabilities, per batch row;
* the reward uses the frozen reference and includes the current query and key in the context;
* the query log-probs are scored WITH their context; the KL is to the frozen reference (non-zero);
* the B rollouts of one episode share ONE pool, so the batch-mean baseline compares orders of the
  same material (and key embeddings and reward baselines are computed once per pool);
* no rotary embedding on q/k before the dot product (see ``selection_scores``).
"""
from __future__ import annotations

import argparse
import itertools
import math
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import data as rdata
from . import plots
from . import stats as rstats
from .losses import reinforce_loss
from .models import (EmbeddedModelMissing, attach_lora, completion_logprobs, kl_k3, load_policy, masked_mean,
                     position_ids_from_mask)
from .runtime import pick, profile, seed_everything
from .sampling import sample
from .tracking import Tracker, progress

DATASETS = ("wikipedia", "twenty_questions")
SELECTORS = ("policy", "random", "document")
MODES = ("loop", "selection")
INSTRUCTIONS = {
    "wikipedia": "Facts from one encyclopedia article, each written as a query, a key and its value.",
    "twenty_questions": "Twenty Questions about one hidden object: each key is a yes/no question, its value the answer.",
}
FIXED_QUERY = " What comes next?"
"""The query of the selection-only mode (and of the loop's temperature measurement)."""
SPLIT_SEED = 20240  # fixed, so the held-out articles/objects do not move with cfg.seed


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------
@dataclass
class AttentionGuidedConfig:
    """The full loop: sampled queries + selection, LoRA on q/k/v of every layer."""

    dataset: str = "wikipedia"
    """`wikipedia` (vital-article summaries, key/value = token chunks) or `twenty_questions` (question → Yes/No)."""
    model: str | None = None
    """Policy LM (hub id or folder); None = the embedded SmolLM2-135M-Instruct. Original: Llama-3.2-3B / GPT-2."""
    pool_size: int = 8
    """Key-value pairs per episode."""
    steps: int | None = None
    """Selections per episode; None = pool_size (every pair is placed once)."""
    key_tokens: int = 10
    """Wikipedia: tokens per key chunk."""
    value_tokens: int = 10
    """Wikipedia: tokens per value chunk (the pair is key_tokens + value_tokens consecutive tokens)."""
    query_tokens: int = 10
    """Tokens the policy samples for each query."""
    query_temperature: float = 1.0
    """Sampling temperature of the query."""
    top_p: float = 0.9
    """Nucleus filter of the query sampling."""
    selection_temperature: float | None = None
    """T in softmax(s / T), s = head-averaged q·k/√d. None = the mean spread (std over keys) of the untrained
    scores on a few training pools, so the untrained selector is not uniform. Original: 1 with one softmax per
    head, nearly uniform at the measured spread (issue 14)."""
    learn_temperature: bool = True
    """Train log(1/T) with the policy (else T stays fixed)."""
    batch_size: int = 4
    """Policy rollouts per episode (all on the same pool; the REINFORCE baseline is their mean)."""
    baseline_rows: int = 1
    """Random-order and document-order rollouts per episode (each), scored by the same reward. 0 = none."""
    episodes: int = 1000
    """Total training episodes (= optimizer updates); --resume continues up to this number."""
    lr: float = 2e-4
    """Adam learning rate."""
    kl_coef: float = 0.1
    """Weight of the k3 KL(π‖π_ref) on the query tokens."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    training_percentile: float = 0.0
    """Train only on rollouts whose episode reward is ≥ this percentile of the batch (0 = all), as the original's flag."""
    lora_r: int = 8
    """LoRA rank (on q/k/v, or GPT-2's fused c_attn)."""
    lora_alpha: int = 32
    """LoRA alpha."""
    checkpoint_every: int = 100
    """Save adapter + optimizer + episode + metrics every this many episodes (and at the end)."""
    eval_fraction: float = 0.1
    """Share of articles / objects held out for evaluation."""
    eval_pools: int = 48
    """Held-out pools in the final evaluation (policy vs random order, paired per pool)."""
    seed: int = 0
    """Seed for pools, sampling and selection."""
    run_name: str | None = None
    """Folder under runs/ for metrics and checkpoints; None = attention_guided_<dataset>_<profile>."""

    @classmethod
    def smoke(cls, **kw) -> "AttentionGuidedConfig":
        """Mechanics only: a pool of 3, 2 updates of 2 rollouts, 4-token queries, 2 held-out pools."""
        base = dict(pool_size=3, query_tokens=4, batch_size=2, baseline_rows=1, episodes=2, checkpoint_every=100,
                    eval_pools=2)
        return cls(**{**base, **kw})

    @classmethod
    def cpu(cls, **kw) -> "AttentionGuidedConfig":
        """The full loop cannot learn in minutes on a CPU (measured: 82–108 s per rollout of 8 rows at pool 8), so
        the cpu profile runs it at the smoke size as a demonstration; its learning run is SelectionConfig.cpu()."""
        return cls.smoke(**kw)

    @classmethod
    def full(cls, **kw) -> "AttentionGuidedConfig":
        """One GPU, ≤ 90 s of training: 60 updates of 8 rollouts (+ 2 random- and 2 document-order rows) on pools of
        8 pairs (ESTIMATE, not measured: ~1.5 s per update on one H100: 8 sampling calls of 10 tokens, 8 query passes
        with their backward, one batched reward pass), then 48 held-out pools. The original trained 1000 episodes:
        `--episodes 1000` from the command line."""
        base = dict(pool_size=8, batch_size=8, baseline_rows=2, episodes=60, eval_pools=48)
        return cls(**{**base, **kw})

    def __post_init__(self):
        _check_common(self)
        if self.steps is not None and not 1 <= self.steps <= self.pool_size:
            raise ValueError(f"AttentionGuidedConfig.steps must be in 1..pool_size={self.pool_size}, got {self.steps}")
        if not 0 <= self.training_percentile < 100:
            raise ValueError(f"AttentionGuidedConfig.training_percentile must be in [0, 100), got {self.training_percentile}")
        for name in ("batch_size", "episodes", "query_tokens", "eval_pools"):
            if getattr(self, name) < 1:
                raise ValueError(f"AttentionGuidedConfig.{name} must be ≥ 1, got {getattr(self, name)}")

    @property
    def n_steps(self) -> int:
        return self.steps or self.pool_size

    @property
    def name(self) -> str:
        return self.run_name or f"attention_guided_{self.dataset}_{profile()}"


@dataclass
class SelectionConfig:
    """Selection only: a fixed query, LoRA on the last layer's q/k, cached pools with every order's reward."""

    dataset: str = "wikipedia"
    """`wikipedia` or `twenty_questions` (as AttentionGuidedConfig)."""
    model: str | None = None
    """Policy LM; None = the embedded SmolLM2-135M-Instruct."""
    pool_size: int = 3
    """Pairs per pool: 3 → 6 orders, 4 → 24, every one scored once by the reference. Original: 8 (40320 orders,
    not enumerable). Measured (cpu profile, Wikipedia, 100 held-out pools of 3): document − random order
    +0.121 [+0.090, +0.151] nats/token, best order − random +0.206 [+0.187, +0.226]."""
    key_tokens: int = 10
    """Wikipedia: tokens per key chunk."""
    value_tokens: int = 10
    """Wikipedia: tokens per value chunk."""
    query: str = FIXED_QUERY
    """The fixed query text written after " Query:" at every step (the loop samples it instead)."""
    train_pools: int = 100
    """Distinct training pools (cached once)."""
    eval_pools: int = 100
    """Distinct held-out pools (cached once), the units of every paired interval."""
    updates: int = 80
    """Optimizer updates."""
    pools_per_update: int | None = None
    """Training pools per update (a random subset); None = all of them."""
    orders_per_pool: int = 8
    """Orders sampled per pool per update; their mean reward is the REINFORCE baseline of that pool."""
    lr: float = 3e-4
    """Adam learning rate. Measured (Wikipedia, 120 training pools): 1e-3 peaks after ~25 updates, then overfits the training
    pools; 3e-4 plateaus from ~60 updates on; 1e-4 is still climbing at 100."""
    lora_r: int = 8
    """LoRA rank on the last layer's q_proj and k_proj."""
    lora_alpha: int = 16
    """LoRA alpha."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    selection_temperature: float | None = None
    """T in softmax(s / T); None = the mean spread (std over remaining keys) of the untrained scores on the
    training pools, so the untrained logits have unit spread."""
    learn_temperature: bool = True
    """Train log(1/T) with the adapter."""
    eval_every: int = 10
    """Log the exact expected reward on training and held-out pools every this many updates."""
    checkpoint_every: int = 100
    """Save adapter + optimizer + update + metrics every this many updates (and at the end)."""
    eval_fraction: float = 0.1
    """Share of articles / objects held out for evaluation."""
    seed: int = 0
    """Seed for the training pools and the sampled orders."""
    run_name: str | None = None
    """Folder under runs/; None = attention_guided_selection_<dataset>_<profile>."""

    @classmethod
    def smoke(cls, **kw) -> "SelectionConfig":
        """Mechanics + one real check: 16 training and 16 held-out pools of 3, 40 updates at lr 1e-3."""
        base = dict(train_pools=16, eval_pools=16, updates=40, lr=1e-3, eval_every=5)
        return cls(**{**base, **kw})

    @classmethod
    def cpu(cls, **kw) -> "SelectionConfig":
        """The learning profile: 100 + 100 pools of 3 (≈ 3 min of caching per dataset on 2 cores), 80 updates (seconds)."""
        return cls(**kw)

    @classmethod
    def full(cls, **kw) -> "SelectionConfig":
        """One GPU: pools of 4 (24 orders), 800 training and 300 held-out pools, 300 updates of 64 pools
        (ESTIMATE: caching ~30 s, updates a few seconds on one H100)."""
        base = dict(pool_size=4, train_pools=800, eval_pools=300, updates=300, pools_per_update=64, eval_every=20)
        return cls(**{**base, **kw})

    def __post_init__(self):
        _check_common(self)
        if not 2 <= self.pool_size <= 5:
            raise ValueError(f"SelectionConfig.pool_size must be in 2..5 (every order is enumerated: 5! = 120), "
                             f"got {self.pool_size}")
        for name in ("train_pools", "eval_pools", "orders_per_pool"):
            if getattr(self, name) < 1:
                raise ValueError(f"SelectionConfig.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.updates < 0:
            raise ValueError(f"SelectionConfig.updates must be ≥ 0, got {self.updates}")
        if not self.query.strip():
            raise ValueError("SelectionConfig.query must contain at least one word (its tokens are the query embedding)")

    @property
    def name(self) -> str:
        return self.run_name or f"attention_guided_selection_{self.dataset}_{profile()}"


def _check_common(cfg) -> None:
    kind = type(cfg).__name__
    if cfg.dataset not in DATASETS:
        raise ValueError(f"{kind}.dataset: {cfg.dataset!r} is not one of {DATASETS}")
    if cfg.pool_size < 1:
        raise ValueError(f"{kind}.pool_size must be ≥ 1, got {cfg.pool_size}")
    if cfg.selection_temperature is not None and cfg.selection_temperature <= 0:
        raise ValueError(f"{kind}.selection_temperature must be > 0 (or None), got {cfg.selection_temperature}")
    if not 0 < cfg.eval_fraction < 1:
        raise ValueError(f"{kind}.eval_fraction must be in (0, 1), got {cfg.eval_fraction}")


# ----------------------------------------------------------------------------------------------
# Pair pools
# ----------------------------------------------------------------------------------------------
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
        raise ValueError(f"no {split} article has the {need} tokens a pool of {self.cfg.pool_size} pairs needs: lower pool_size")

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
            raise ValueError(f"pool_size {cfg.pool_size} > the {len(self.questions)} questions in the Twenty Questions table")
        self.objects = {o["object"]: o for o in objects}
        self.splits = _split(list(self.objects), cfg.eval_fraction)

    def pool(self, rng: random.Random, split: str = "train") -> Pool:
        obj = self.objects[rng.choice(self.splits[split])]
        chosen = sorted(rng.sample(range(len(self.questions)), self.cfg.pool_size))
        qs = [self.questions[i] for i in chosen]
        return Pool(obj["object"], [q["question"] for q in qs], ["Yes" if obj["answers"][q["id"]] else "No" for q in qs],
                    INSTRUCTIONS["twenty_questions"])

    def pools(self, n: int, split: str, seed: int) -> list[Pool]:
        """n distinct (object, questions) pools of the split (seeded)."""
        rng = random.Random(seed)
        return _distinct(lambda: self.pool(rng, split), n, f"Twenty Questions {split}")


def make_pairs(cfg, tokenizer):
    return WikipediaPairs(tokenizer, cfg) if cfg.dataset == "wikipedia" else TwentyQuestionsPairs(cfg)


# ----------------------------------------------------------------------------------------------
# The model's own attention as a selector
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Heads:
    """Attention geometry: H query heads, G key/value heads (GQA when G < H), head size d."""

    n_heads: int
    n_kv_heads: int
    head_dim: int

    def group_of_head(self) -> torch.Tensor:
        """(H,) the KV group each query head reads: g(h) = h // (H / G)."""
        return torch.arange(self.n_heads) // (self.n_heads // self.n_kv_heads)


def heads_of(config) -> Heads:
    """Read H, G, d from a transformers config (Llama/Qwen-style or GPT-2-style)."""
    H = config.num_attention_heads
    G = getattr(config, "num_key_value_heads", None) or H
    d = getattr(config, "head_dim", None) or config.hidden_size // H
    if H % G:
        raise ValueError(f"num_attention_heads {H} is not a multiple of num_key_value_heads {G}")
    return Heads(H, G, d)


def _last_projection_names(model) -> dict[str, str]:
    names = [n for n, _ in model.named_modules()]
    q = [n for n in names if n.endswith("q_proj")]
    k = [n for n in names if n.endswith("k_proj")]
    if q and k:
        return {"q": q[-1], "k": k[-1]}
    fused = [n for n in names if n.endswith("c_attn")]
    if fused:
        return {"qkv": fused[-1]}
    raise ValueError(f"{type(model).__name__}: found no q_proj/k_proj or c_attn module to read attention projections from")


def _last_projections(model) -> dict[str, torch.nn.Module]:
    """The last layer's q/k projection modules (LoRA-wrapped if an adapter is attached), or GPT-2's fused c_attn."""
    named = dict(model.named_modules())
    return {kind: named[name] for kind, name in _last_projection_names(model).items()}


@contextmanager
def capture_projections(model):
    """Forward hooks on the last attention layer; after a forward, the yielded dict holds
    'q' (B, T, H·d) and 'k' (B, T, G·d): the projection outputs BEFORE rotary embeddings."""
    captured: dict[str, torch.Tensor] = {}
    modules = _last_projections(model)
    handles = []
    if "qkv" in modules:  # GPT-2: one fused projection, [q | k | v] along the last dim
        def split(_module, _inputs, out):
            captured["q"], captured["k"], _ = out.chunk(3, dim=-1)
        handles.append(modules["qkv"].register_forward_hook(split))
    else:
        for name in ("q", "k"):
            handles.append(modules[name].register_forward_hook(lambda _m, _i, out, name=name: captured.__setitem__(name, out)))
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_projection_inputs(model):
    """Forward pre-hooks: after a forward, 'q' and 'k' hold the INPUTS (B, T, D) of the last layer's q/k
    projections (the normalised hidden states). The selection-only mode caches these: with an adapter on
    the last q/k alone, they are the same for the policy and the reference."""
    captured: dict[str, torch.Tensor] = {}
    modules = _last_projections(model)
    pairs = [("qkv", "q"), ("qkv", "k")] if "qkv" in modules else [("q", "q"), ("k", "k")]
    handles = [modules[m].register_forward_pre_hook(lambda _m, args, name=name: captured.__setitem__(name, args[0]))
               for m, name in pairs]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


def project(model, x: torch.Tensor, which: str) -> torch.Tensor:
    """Apply the last layer's (LoRA'd) q or k projection to cached inputs x (..., D) → (..., H·d) or (..., G·d)."""
    modules = _last_projections(model)
    if "qkv" in modules:
        return modules["qkv"](x).chunk(3, dim=-1)[0 if which == "q" else 1]
    return modules[which](x)


def reference(model):
    """The frozen reference: the base model with the LoRA adapter switched off (a plain model is its own reference)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()


def _device(model) -> torch.device:
    return next(model.parameters()).device


def key_embeddings(model, tokenizer, keys: list[str]) -> torch.Tensor:
    """Context-free key embeddings (N, G·d): the last layer's k_proj over each key's tokens alone, mean-pooled.

    Gradients flow when grad mode is on (the LoRA'd k_proj is part of the policy)."""
    enc = tokenizer([f" {k}" for k in keys], padding=True, add_special_tokens=False, return_tensors="pt").to(_device(model))
    with capture_projections(model) as cap:
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
              position_ids=position_ids_from_mask(enc["attention_mask"]), logits_to_keep=1, use_cache=False)
    return masked_mean(cap["k"], enc["attention_mask"][..., None], dim=1)  # (N, G·d)


def query_pass(model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over context + query: per-token query log-probs (B, C) and the query embedding (B, H·d),
    the last layer's q_proj output over the query tokens (which attend to their context), mean-pooled."""
    with capture_projections(model) as cap:
        logp = completion_logprobs(model, prompt_ids, prompt_mask, completion_ids, completion_mask)  # (B, C)
    C = completion_ids.shape[1]
    q = masked_mean(cap["q"][:, -C:], completion_mask[..., None], dim=1)  # (B, H·d)
    return logp, q


def selection_scores(q: torch.Tensor, k: torch.Tensor, heads: Heads) -> torch.Tensor:
    """Head-averaged attention scores of each key:

        s_j = 1/H Σ_h q_h · k_{j, g(h)} / √d  =  q̃ · k_j / √d,   q̃_g = 1/H Σ_{h: g(h)=g} q_h,   g(h) = h // (H/G)

    q: (..., H·d) query embeddings; k: (..., N, G·d) key embeddings (leading dims broadcast). Returns (..., N).

    No rotary embedding is applied: the keys are embedded context-free, so they have no position
    relative to the query, and rotating tokens at different positions before mean-pooling would
    partly cancel the fast-rotating dimensions. The score is a content match between the learned
    projections, invariant to where the query sits in the growing context.
    """
    H, G, d = heads.n_heads, heads.n_kv_heads, heads.head_dim
    q_grouped = q.reshape(*q.shape[:-1], G, H // G, d).sum(-2).flatten(-2) / H  # (..., G·d): heads of a group are contiguous
    return (k @ q_grouped.unsqueeze(-1)).squeeze(-1) / math.sqrt(d)  # (..., N)


def selection_probs(q: torch.Tensor, k: torch.Tensor, remaining: torch.Tensor, heads: Heads,
                    temperature: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Probability of choosing each remaining key: ONE softmax over the head-averaged scores,

        p(j) = softmax_{j ∈ remaining}( s_j / T )

    q: (B, H·d); k: (N, G·d); remaining: (B, N) bool. Returns (B, N), each row summing to 1 over its
    remaining keys and 0 elsewhere. (Averaging H softmaxes instead, as the original did, flattens the
    distribution whenever the heads disagree.)"""
    scores = selection_scores(q, k, heads) / temperature  # (B, N)
    return torch.softmax(scores.float().masked_fill(~remaining, float("-inf")), dim=-1)


def score_spread(scores: torch.Tensor, remaining: torch.Tensor) -> float:
    """Mean over rows of the standard deviation of the scores over the remaining keys (rows with ≥ 2 keys)."""
    s, m = scores.detach().float().reshape(-1, scores.shape[-1]), remaining.expand_as(scores).reshape(-1, scores.shape[-1])
    rows = m.sum(1) >= 2
    s, m = s[rows], m[rows].float()
    mean = (s * m).sum(1) / m.sum(1)
    var = (((s - mean[:, None]) ** 2) * m).sum(1) / (m.sum(1) - 1)
    return float(var.sqrt().mean())


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats along the last dim (0·log 0 = 0)."""
    return -torch.special.xlogy(probs, probs).sum(-1)


def uniform_entropy(pool_size: int, steps: int | None = None) -> float:
    """Mean over the steps with a choice of log(keys left): the selection entropy of a uniform choice."""
    steps = steps or pool_size
    left = [pool_size - s for s in range(steps) if pool_size - s >= 2]
    return float(np.mean([math.log(n) for n in left])) if left else 0.0


# ----------------------------------------------------------------------------------------------
# Reward
# ----------------------------------------------------------------------------------------------
def pair_prompt(query: str, key: str) -> str:
    """What precedes a value in the context; the query text is appended exactly as sampled after " Query:"."""
    return f" Query:{query} Key: {key} Value:"


def context_of(pool: Pool, order, queries) -> str:
    """The context after placing the pairs ``order`` (with their queries): instruction + " Query:… Key:… Value: …"."""
    return pool.instruction + "".join(pair_prompt(q, pool.keys[j]) + f" {pool.values[j]}" for j, q in zip(order, queries))


@torch.no_grad()
def value_logprob(model, tokenizer, prompts: list[str], values: list[str], batch_size: int = 32) -> torch.Tensor:
    """mean_t log p(value_t | prompt, value_<t) for each (prompt, value) pair: (R,)."""
    dev = _device(model)
    out = []
    for s in range(0, len(prompts), batch_size):
        p = tokenizer(prompts[s : s + batch_size], padding=True, padding_side="left", add_special_tokens=False,
                      return_tensors="pt").to(dev)
        c = tokenizer([f" {v}" for v in values[s : s + batch_size]], padding=True, padding_side="right",
                      add_special_tokens=False, return_tensors="pt").to(dev)
        logp = completion_logprobs(model, p["input_ids"], p["attention_mask"], c["input_ids"], c["attention_mask"])
        out.append(masked_mean(logp, c["attention_mask"], dim=1).float())
    return torch.cat(out)


def key_only_logprob(model, tokenizer, keys: list[str], values: list[str], cache: dict) -> torch.Tensor:
    """mean-token log p_ref(value | "Key: k Value:") per pair (R,), memoised in ``cache`` (the reference never changes)."""
    missing = list(dict.fromkeys((k, v) for k, v in zip(keys, values) if (k, v) not in cache))
    if missing:
        with reference(model):
            alone = value_logprob(model, tokenizer, [f"Key: {k} Value:" for k, _ in missing], [v for _, v in missing])
        cache.update(zip(missing, alone.tolist()))
    return torch.tensor([cache[(k, v)] for k, v in zip(keys, values)], device=_device(model))


def step_rewards(model, tokenizer, contexts: list[str], queries: list[str], keys: list[str], values: list[str],
                 baseline_cache: dict | None = None) -> torch.Tensor:
    """r_i = mean-token log p_ref(value_i | context_<i, query_i, key_i) − mean-token log p_ref(value_i | key_i): (R,).

    ``model`` is scored with its adapter disabled; the key-only term depends on the pair alone and is
    cached in ``baseline_cache`` (valid forever: the reference never changes)."""
    cache = baseline_cache if baseline_cache is not None else {}
    with reference(model):
        with_context = value_logprob(model, tokenizer, [c + pair_prompt(q, k) for c, q, k in zip(contexts, queries, keys)], values)
    return with_context - key_only_logprob(model, tokenizer, keys, values, cache)


# ----------------------------------------------------------------------------------------------
# One episode
# ----------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """Rows of one episode on one pool; each row has a selector ("policy", "random", "document").

    chosen: (rows, S) key index per step;  step_rewards: (rows, S);  probs: (B, S, N) selection
    probabilities of the policy rows (0 for keys already used). The remaining fields feed the loss
    (policy rows only; they carry gradients when the rollout was made with grad=True)."""

    pool: Pool
    selectors: list[str]
    queries: list[list[str]]
    chosen: torch.Tensor
    step_rewards: torch.Tensor
    probs: torch.Tensor
    contexts: list[str]
    entropy: torch.Tensor  # (B, S) selection entropy in nats
    seq_logp: torch.Tensor | None = None  # (B,) Σ_steps [Σ_t log π(query_t) + log p(chosen key)]
    selection_logp: torch.Tensor | None = None  # (B,) Σ_steps log p(chosen key): the selection term of seq_logp
    query_logp: torch.Tensor | None = None  # (B, S·C) per query token
    ref_query_logp: torch.Tensor | None = None  # (B, S·C)
    query_mask: torch.Tensor | None = None  # (B, S·C)
    key_logp: torch.Tensor | None = None  # (B, S) log p(chosen key), detached

    @property
    def episode_reward(self) -> torch.Tensor:
        """(rows,) mean step reward."""
        return self.step_rewards.mean(1)

    def rows(self, selector: str) -> list[int]:
        return [i for i, s in enumerate(self.selectors) if s == selector]

    def steps(self, row: int = 0) -> list[dict]:
        """One dict per step of a row, for rlnlp.widgets.stepper and tables."""
        out = []
        for s in range(self.chosen.shape[1]):
            j = int(self.chosen[row, s])
            step = {"query": self.queries[row][s], "key": self.pool.keys[j], "value": self.pool.values[j],
                    "reward": float(self.step_rewards[row, s])}
            if self.selectors[row] == "policy":
                p = self.probs[self.rows("policy").index(row), s]
                step["selection probabilities"] = {self.pool.keys[i][:40]: float(p[i]) for i in range(len(p)) if p[i] > 0}
            out.append(step)
        return out


def rollout(model, tokenizer, pool: Pool, cfg: AttentionGuidedConfig, heads: Heads, selectors: list[str],
            grad: bool = False, baseline_cache: dict | None = None,
            temperature: float | torch.Tensor | None = None) -> Rollout:
    """Play one episode per row on ``pool``: query → attention over remaining keys → append the pair.

    ``temperature``: the selection temperature (a tensor carries the gradient of a learnable one);
    None = cfg.selection_temperature, or 1 when that is unset."""
    if temperature is None:
        temperature = cfg.selection_temperature or 1.0
    unknown = set(selectors) - set(SELECTORS)
    if unknown:
        raise ValueError(f"rollout: unknown selector(s) {sorted(unknown)}; use {SELECTORS}")
    dev = _device(model)
    R, N, S = len(selectors), len(pool), cfg.n_steps
    policy = [i for i, s in enumerate(selectors) if s == "policy"]
    pol = torch.tensor(policy, dtype=torch.long, device=dev)
    B = len(policy)
    remaining = torch.ones(R, N, dtype=torch.bool, device=dev)
    contexts = [pool.instruction] * R
    queries: list[list[str]] = [[] for _ in range(R)]
    chosen = torch.zeros(R, S, dtype=torch.long)
    probs_log, sel_entropy, key_logp = torch.zeros(B, S, N), torch.zeros(B, S), torch.zeros(B, S)
    reward_args = ([], [], [], [])  # contexts, queries, keys, values, step-major
    seq_logp = torch.zeros(B, device=dev)
    selection_logp = torch.zeros(B, device=dev)
    q_logps, ref_logps, q_masks = [], [], []
    with torch.set_grad_enabled(grad):
        k_emb = key_embeddings(model, tokenizer, pool.keys) if B else None  # (N, G·d), once per episode
    for s in range(S):
        smp = sample(model, tokenizer, [c + " Query:" for c in contexts], max_new_tokens=cfg.query_tokens,
                     temperature=cfg.query_temperature, top_p=cfg.top_p, chat=False)
        choice = torch.zeros(R, dtype=torch.long, device=dev)
        if B:
            batch = [x[pol] for x in (smp.prompt_ids, smp.prompt_mask, smp.completion_ids, smp.completion_mask)]
            with torch.set_grad_enabled(grad):
                q_logp, q_emb = query_pass(model, *batch)  # (B, C), (B, H·d)
                probs = selection_probs(q_emb, k_emb, remaining[pol], heads, temperature)  # (B, N)
            choice[pol] = torch.multinomial(probs.detach(), 1).squeeze(1)
            logp_key = torch.log(probs.gather(1, choice[pol, None]).squeeze(1).clamp_min(1e-30))  # (B,)
            seq_logp = seq_logp + q_logp.sum(1) + logp_key
            selection_logp = selection_logp + logp_key
            probs_log[:, s] = probs.detach().cpu()
            key_logp[:, s] = logp_key.detach().cpu()
            sel_entropy[:, s] = entropy(probs.detach()).cpu()
            if grad:
                with torch.no_grad(), reference(model):
                    ref_logps.append(completion_logprobs(model, *batch))
                q_logps.append(q_logp)
                q_masks.append(batch[3])
        for r, sel in enumerate(selectors):
            if sel == "random":
                choice[r] = torch.multinomial(remaining[r].float(), 1).squeeze()
            elif sel == "document":
                choice[r] = remaining[r].float().argmax()  # the first remaining pair
        for r in range(R):
            j = int(choice[r])
            query, key, value = smp.texts[r], pool.keys[j], pool.values[j]
            for lst, item in zip(reward_args, (contexts[r], query, key, value)):
                lst.append(item)
            contexts[r] = contexts[r] + pair_prompt(query, key) + f" {value}"
            queries[r].append(query)
            remaining[r, j] = False
            chosen[r, s] = j
    rewards = step_rewards(model, tokenizer, *reward_args, baseline_cache=baseline_cache).view(S, R).T.cpu()  # (R, S)
    out = Rollout(pool, list(selectors), queries, chosen, rewards, probs_log, contexts, sel_entropy, key_logp=key_logp)
    if grad and B:
        out.seq_logp, out.selection_logp = seq_logp, selection_logp
        out.query_logp, out.ref_query_logp, out.query_mask = (torch.cat(x, 1) for x in (q_logps, ref_logps, q_masks))
    return out


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------
def attention_guided_loss(ro: Rollout, kl_coef: float, training_percentile: float = 0.0) -> tuple[torch.Tensor, dict]:
    """REINFORCE with a batch-mean baseline on queries + selections, plus the k3 KL on the query tokens.

        A_b = R_b − mean_b' R_b'                      (R_b: episode reward of policy row b)
        L_pg = −mean_{b kept} A_b · Σ_steps [log π(query) + log p(chosen key)]
        L = L_pg + β · mean_tokens k3(π, π_ref)
    """
    if ro.seq_logp is None:
        raise ValueError("attention_guided_loss needs a rollout made with grad=True and at least one policy row")
    dev = ro.seq_logp.device
    R = ro.episode_reward[ro.rows("policy")].to(dev)  # (B,)
    adv = R - R.mean()
    keep = R >= torch.quantile(R, training_percentile / 100) if training_percentile > 0 else torch.ones_like(R, dtype=torch.bool)
    pg, stats = reinforce_loss(ro.seq_logp[keep], adv[keep])
    kl = masked_mean(kl_k3(ro.query_logp, ro.ref_query_logp), ro.query_mask)
    loss = pg + kl_coef * kl
    stats.update({"losses/kl": (kl_coef * kl).item(), "losses/total": loss.item(), "stats/kl": kl.item(),
                  "stats/query_logp": masked_mean(ro.query_logp.detach(), ro.query_mask).item(),
                  "stats/kept_rows": int(keep.sum())})
    return loss, stats


# ----------------------------------------------------------------------------------------------
# Trainer
# ----------------------------------------------------------------------------------------------
def lora_targets(model) -> tuple[str, ...]:
    """q/k/v for Llama-style models, the fused c_attn for GPT-2-style ones."""
    return ("c_attn",) if "qkv" in _last_projections(model) else ("q_proj", "k_proj", "v_proj")


class AttentionGuidedTrainer:
    """The full loop: policy (LM + LoRA on q/k/v), pools, optimizer, tracker and checkpoints for one dataset."""

    def __init__(self, cfg: AttentionGuidedConfig, pairs=None, root: str | Path | None = None, model=None, tokenizer=None):
        self.cfg = cfg
        if model is None:
            model, tokenizer = load_policy(cfg.model)
        # LoRA dropout 0: the key is sampled from the very forward pass whose log-prob gets the gradient
        self.model = attach_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=0.0, target_modules=lora_targets(model))
        self.tokenizer = tokenizer
        self.heads = heads_of(model.config)
        self.pairs = pairs if pairs is not None else make_pairs(cfg, tokenizer)
        self.rng = random.Random(cfg.seed)
        spread_rng = random.Random(cfg.seed + 1)
        T = cfg.selection_temperature or self.measure_spread([self.pairs.pool(spread_rng, "train") for _ in range(4)])
        self.initial_log_inv_temperature = -math.log(T)
        self.log_inv_temperature = torch.nn.Parameter(torch.tensor(self.initial_log_inv_temperature, device=_device(self.model)),
                                                      requires_grad=cfg.learn_temperature)
        self.params = [p for p in self.model.parameters() if p.requires_grad] + ([self.log_inv_temperature] if cfg.learn_temperature else [])
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr)
        self.tracker = Tracker(cfg.name, root=root, config=cfg)
        self.checkpoint_path = self.tracker.dir / "checkpoint.pt"
        self.episode = 0
        self.baseline_cache: dict = {}  # (key, value) -> mean log p_ref(value | key)
        self.history: list[Rollout] = []  # detached training rollouts, for the notebook's plots

    @torch.no_grad()
    def measure_spread(self, pools: list[Pool]) -> float:
        """Mean spread (std over keys) of the untrained scores with the fixed query at the first step."""
        with reference(self.model):
            scores = torch.stack([fixed_query_scores(self.model, self.tokenizer, p, (), FIXED_QUERY, self.heads) for p in pools])
        return score_spread(scores, torch.ones_like(scores, dtype=torch.bool))

    @property
    def temperature(self) -> torch.Tensor:
        return torch.exp(-self.log_inv_temperature)

    @property
    def selectors(self) -> list[str]:
        c = self.cfg
        return ["policy"] * c.batch_size + ["random"] * c.baseline_rows + ["document"] * c.baseline_rows

    def rollout(self, pool: Pool, selectors: list[str] | None = None, grad: bool = False, untrained: bool = False) -> Rollout:
        """One episode; ``untrained=True`` plays it with the adapter off and the initial temperature (queries too)."""
        if untrained:
            with reference(self.model):
                return rollout(self.model, self.tokenizer, pool, self.cfg, self.heads, selectors or self.selectors,
                               baseline_cache=self.baseline_cache, temperature=math.exp(-self.initial_log_inv_temperature))
        return rollout(self.model, self.tokenizer, pool, self.cfg, self.heads, selectors or self.selectors, grad=grad,
                       baseline_cache=self.baseline_cache, temperature=self.temperature if grad else self.temperature.item())

    def update(self) -> tuple[Rollout, dict]:
        """One episode on a fresh training pool, then one gradient step."""
        start = time.time()
        self.model.train()
        ro = self.rollout(self.pairs.pool(self.rng, "train"), grad=True)
        loss, stats = attention_guided_loss(ro, self.cfg.kl_coef, self.cfg.training_percentile)
        self.optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        reward = ro.episode_reward
        stats.update({"charts/episode_reward": reward[ro.rows("policy")].mean().item(),
                      "stats/selection_entropy": ro.entropy[:, [s for s in range(self.cfg.n_steps) if len(ro.pool) - s >= 2]].mean().item(),
                      "stats/uniform_entropy": uniform_entropy(len(ro.pool), self.cfg.n_steps),
                      "stats/temperature": self.temperature.item(),
                      "stats/grad_norm": grad_norm.item(), "time/episode_s": time.time() - start})
        for sel in ("random", "document"):
            if ro.rows(sel):
                stats[f"charts/{sel}_reward"] = reward[ro.rows(sel)].mean().item()
        ro.seq_logp = ro.selection_logp = ro.query_logp = ro.ref_query_logp = ro.query_mask = None  # drop the graph
        return ro, stats

    def train(self, episodes: int | None = None, resume: bool = False) -> pd.DataFrame:
        """Train until ``episodes`` (default cfg.episodes) episodes in total; checkpoint on the way."""
        total = episodes if episodes is not None else self.cfg.episodes
        if resume:
            self.load()
        for _ in progress(range(self.episode, total), desc=f"attention-guided {self.cfg.dataset}"):
            ro, stats = self.update()
            self.history.append(ro)
            self.tracker.log(self.episode, stats)
            self.episode += 1
            if self.episode % self.cfg.checkpoint_every == 0 or self.episode == total:
                self.save()
        return self.tracker.df

    def save(self) -> Path:
        from peft import get_peft_model_state_dict

        torch.save({"adapter": get_peft_model_state_dict(self.model), "optimizer": self.optimizer.state_dict(),
                    "log_inv_temperature": self.log_inv_temperature.detach().cpu(),
                    "initial_log_inv_temperature": self.initial_log_inv_temperature,
                    "episode": self.episode, "metrics": self.tracker.rows, "rng": self.rng.getstate(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}, self.checkpoint_path)
        return self.checkpoint_path

    def load(self) -> int:
        """Restore the last checkpoint (if any); return the episode training continues from."""
        from peft import set_peft_model_state_dict

        if not self.checkpoint_path.exists():
            print(f"--resume: no checkpoint at {self.checkpoint_path}; starting from episode 0")
            return 0
        ckpt = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)  # RNG states must stay on CPU
        set_peft_model_state_dict(self.model, ckpt["adapter"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        with torch.no_grad():
            self.log_inv_temperature.copy_(ckpt["log_inv_temperature"])
        self.initial_log_inv_temperature = ckpt["initial_log_inv_temperature"]
        self.episode, self.tracker.rows = ckpt["episode"], list(ckpt["metrics"])
        self.rng.setstate(ckpt["rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        if ckpt.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        print(f"resumed from {self.checkpoint_path} at episode {self.episode}")
        return self.episode

    def eval_pools(self, n: int) -> list[Pool]:
        """The same n distinct held-out pools every time (fixed seed)."""
        return self.pairs.pools(n, "eval", SPLIT_SEED + 1)

    @torch.no_grad()
    def evaluate(self, pools: list[Pool], rows: int | None = None) -> tuple[pd.DataFrame, list[Rollout]]:
        """Episode reward of every selector on each pool: one DataFrame row per (pool, selector, rollout).

        Selectors: the trained ``policy``, ``random`` and ``document`` order (both with the trained policy's
        queries: they isolate SELECTION), and ``untrained`` (adapter off, initial temperature: untrained queries
        AND selection, so the gain of the queries shows in policy − untrained)."""
        rows = rows or self.cfg.batch_size
        selectors = [s for s in SELECTORS for _ in range(rows)]
        records, rollouts = [], []
        self.model.eval()
        for i, pool in enumerate(progress(pools, desc="evaluate")):
            ro = self.rollout(pool, selectors)
            before = self.rollout(pool, ["policy"] * rows, untrained=True)
            rollouts.append(ro)
            records += [{"pool": i, "name": pool.name, "selector": s, "reward": float(r)}
                        for s, r in zip(selectors + ["untrained"] * rows, torch.cat([ro.episode_reward, before.episode_reward]))]
        return pd.DataFrame(records), rollouts



# ----------------------------------------------------------------------------------------------
# Selection only: a fixed query, every order of a small pool scored once and cached
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OrderTable:
    """Every order of N pairs and every prefix that still has a choice to make.

    orders: (O, N) key per step, orders[0] = document order; prefixes: the ordered tuples of length
    0..N−2 (P of them; after N−1 pairs the last one is forced); prefix_of: (O, N−1) index of the prefix
    orders[o, :s] before step s; remaining: (P, N) bool, the keys not yet placed after each prefix."""

    orders: torch.Tensor
    prefixes: tuple
    prefix_of: torch.Tensor
    remaining: torch.Tensor

    def prefix_index(self, prefix) -> int:
        return self.prefixes.index(tuple(prefix))


@lru_cache(maxsize=None)
def order_table(n: int) -> OrderTable:
    orders = list(itertools.permutations(range(n)))
    prefixes = tuple(p for length in range(n - 1) for p in itertools.permutations(range(n), length))
    index = {p: i for i, p in enumerate(prefixes)}
    prefix_of = torch.tensor([[index[o[:s]] for s in range(n - 1)] for o in orders], dtype=torch.long).view(len(orders), n - 1)
    remaining = torch.tensor([[j not in p for j in range(n)] for p in prefixes], dtype=torch.bool).view(len(prefixes), n)
    return OrderTable(torch.tensor(orders), prefixes, prefix_of, remaining)


@dataclass
class PoolCache:
    """What the selection-only mode needs of one pool, computed once.

    step_rewards: (O, N) the reference's reward of step s of order o (orders of ``order_table(N)``);
    query_x: (P, Tq, D) inputs of the last layer's q_proj over the fixed query's tokens after each prefix;
    key_x: (N, Tk, D) inputs of the last layer's k_proj over each key alone; key_mask: (N, Tk)."""

    pool: Pool
    step_rewards: torch.Tensor
    query_x: torch.Tensor
    key_x: torch.Tensor
    key_mask: torch.Tensor

    @property
    def episode_rewards(self) -> torch.Tensor:
        """(O,) mean step reward of every order."""
        return self.step_rewards.mean(1)


@torch.no_grad()
def build_cache(model, tokenizer, pool: Pool, query: str = FIXED_QUERY, baseline_cache: dict | None = None) -> PoolCache:
    """Score EVERY order of ``pool`` with the reference and keep the selector's inputs.

    One forward per order over  instruction + [" Query:" query " Key: k Value:" " v"] × N  gives every
    step's value log-probs at once (teacher forcing; all orders have the same length, so no padding);
    only the value positions' logits are computed. Pre-hooks keep the inputs of the last layer's q_proj
    over the query tokens (once per prefix: a causal model's query never sees what follows it) and, from
    one pass over the keys alone, of its k_proj. Valid while only the last layer's q/k carry an adapter:
    then these inputs are the same for the policy and the reference. Tokens are cut per segment, which
    for this tokenizer equals tokenising the whole context (tests check the rewards against ``step_rewards``)."""
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]
    dev = _device(model)
    N, table = len(pool), order_table(len(pool))
    head, q_ids = ids(" Query:"), ids(query)
    prompts = [head + q_ids + ids(f" Key: {k} Value:") for k in pool.keys]  # pair_prompt(query, k), tokenised
    values = [ids(f" {v}") for v in pool.values]
    seqs, targets, steps, query_at = [], [], [], {}
    for o, order in enumerate(table.orders.tolist()):
        seq, tgt, stp = ids(pool.instruction), [], []
        for s, j in enumerate(order):
            query_at.setdefault(tuple(order[:s]), (o, len(seq) + len(head)))
            seq += prompts[j]
            tgt += range(len(seq) - 1, len(seq) - 1 + len(values[j]))  # positions whose logits predict value j
            stp += [s] * len(values[j])
            seq += values[j]
        seqs.append(seq)
        targets.append(tgt)
        steps.append(stp)
    x = torch.tensor(seqs, device=dev)  # (O, T)
    keep = torch.tensor(targets, device=dev)  # (O, V) every value token of every order
    with reference(model), capture_projection_inputs(model) as cap:
        logits = model(input_ids=x, logits_to_keep=keep, use_cache=False).logits  # (O, V, vocab)
    logp = torch.log_softmax(logits.float(), -1).gather(-1, x.gather(1, keep + 1)[..., None]).squeeze(-1)  # (O, V)
    del logits
    step = torch.tensor(steps, device=dev)
    mean_logp = torch.zeros(len(seqs), N, device=dev).scatter_add_(1, step, logp) / torch.zeros(
        len(seqs), N, device=dev).scatter_add_(1, step, torch.ones_like(logp))  # (O, N) mean over each value's tokens
    key_only = key_only_logprob(model, tokenizer, pool.keys, pool.values, baseline_cache if baseline_cache is not None else {})
    rewards = mean_logp - key_only[table.orders.to(dev)]  # (O, N)
    query_x = torch.stack([cap["q"][o, t : t + len(q_ids)] for o, t in (query_at[p] for p in table.prefixes)])  # (P, Tq, D)
    enc = tokenizer([f" {k}" for k in pool.keys], padding=True, add_special_tokens=False, return_tensors="pt").to(dev)
    with capture_projection_inputs(model) as cap:
        model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
              position_ids=position_ids_from_mask(enc["attention_mask"]), logits_to_keep=1, use_cache=False)
    return PoolCache(pool, rewards.float(), query_x.float(), cap["k"].float(), enc["attention_mask"].bool())


@dataclass
class CacheBatch:
    """PoolCaches of one pool size stacked (keys right-padded to the longest): query_x (B, P, Tq, D),
    key_x (B, N, Tk, D), key_mask (B, N, Tk), episode_rewards (B, O)."""

    query_x: torch.Tensor
    key_x: torch.Tensor
    key_mask: torch.Tensor
    episode_rewards: torch.Tensor

    @classmethod
    def stack(cls, caches: list[PoolCache]) -> "CacheBatch":
        if len({c.query_x.shape for c in caches}) != 1:
            raise ValueError("CacheBatch.stack: the pools differ in size or query length; cache them with one config")
        Tk = max(c.key_x.shape[1] for c in caches)
        pad = lambda t: torch.nn.functional.pad(t, (0, 0, 0, Tk - t.shape[1]))
        return cls(torch.stack([c.query_x for c in caches]), torch.stack([pad(c.key_x) for c in caches]),
                   torch.stack([torch.nn.functional.pad(c.key_mask, (0, Tk - c.key_mask.shape[1])) for c in caches]),
                   torch.stack([c.episode_rewards for c in caches]))

    def __len__(self) -> int:
        return self.query_x.shape[0]

    def select(self, idx) -> "CacheBatch":
        return CacheBatch(self.query_x[idx], self.key_x[idx], self.key_mask[idx], self.episode_rewards[idx])


def cached_scores(model, batch: CacheBatch, heads: Heads) -> torch.Tensor:
    """(B, P, N) head-averaged scores of every key after every prefix, from cached projection inputs through the
    (LoRA'd) last-layer q/k projections: the only part of the forward pass the adapter changes."""
    q = project(model, batch.query_x, "q").mean(2)  # (B, P, H·d): mean over the query tokens
    k = masked_mean(project(model, batch.key_x, "k"), batch.key_mask[..., None], dim=2)  # (B, N, G·d)
    return selection_scores(q, k[:, None], heads)  # (B, P, N)


def order_logprobs(scores: torch.Tensor, inv_temperature, table: OrderTable) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(order) = Σ_s log p(key chosen at s | prefix): (B, O), and the per-prefix log-probs (B, P, N).

        p(j | prefix) = softmax_{j ∈ remaining(prefix)}( s_j(prefix) / T )"""
    dev = scores.device
    logits = (scores * inv_temperature).float().masked_fill(~table.remaining.to(dev), float("-inf"))
    step_logp = torch.log_softmax(logits, dim=-1)  # (B, P, N)
    chosen = step_logp[:, table.prefix_of.to(dev), table.orders[:, :-1].to(dev)]  # (B, O, N−1); the last key is forced
    return chosen.sum(-1), step_logp


def expected_entropy(order_logp: torch.Tensor, step_logp: torch.Tensor, table: OrderTable) -> torch.Tensor:
    """(B,) E_order[mean over the steps with a choice of the selection entropy], exact (a sum over orders)."""
    per_prefix = entropy(step_logp.exp())  # (B, P)
    per_order = per_prefix[:, table.prefix_of.to(per_prefix.device)].mean(-1)  # (B, O)
    return (order_logp.exp() * per_order).sum(-1)


def selection_loss(chosen_logp: torch.Tensor, rewards: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """REINFORCE on the selections alone, a per-pool batch-mean baseline:

        A_{b,k} = R_{b,k} − 1/K Σ_k' R_{b,k'}        (K orders sampled on pool b)
        L = −mean_{b,k} A_{b,k} · Σ_s log p(key chosen at step s)

    chosen_logp: (B, K) log p of each sampled order (carries the gradient); rewards: (B, K) its episode reward."""
    adv = rewards - rewards.mean(1, keepdim=True)
    loss, stats = reinforce_loss(chosen_logp.flatten(), adv.flatten())
    stats.update({"losses/total": loss.item(), "stats/advantage_std": adv.std().item()})
    return loss, stats


def fixed_query_scores(model, tokenizer, pool: Pool, prefix, query: str, heads: Heads) -> torch.Tensor:
    """(N,) the same scores WITHOUT the cache: one forward over the context after ``prefix`` (placed with the fixed
    query) + " Query:" + query, and one over the keys alone. The cache must reproduce this (a test checks)."""
    dev = _device(model)
    p = tokenizer([context_of(pool, prefix, [query] * len(prefix)) + " Query:"], add_special_tokens=False,
                  return_tensors="pt").to(dev)
    c = tokenizer([query], add_special_tokens=False, return_tensors="pt").to(dev)
    _, q = query_pass(model, p["input_ids"], p["attention_mask"], c["input_ids"], c["attention_mask"])
    return selection_scores(q, key_embeddings(model, tokenizer, pool.keys), heads)[0]


def last_layer_qk(model) -> tuple[str, ...]:
    """Full names of the last layer's q_proj and k_proj (or its fused c_attn): the selection-only LoRA targets."""
    return tuple(_last_projection_names(model).values())


class SelectionTrainer:
    """Selection only: LoRA on the last layer's q/k, a learnable temperature, cached pools, exact evaluation."""

    def __init__(self, cfg: SelectionConfig, pairs=None, root: str | Path | None = None, model=None, tokenizer=None):
        self.cfg = cfg
        if model is None:
            model, tokenizer = load_policy(cfg.model)
        self.model = attach_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=0.0, target_modules=last_layer_qk(model))
        self.tokenizer = tokenizer
        self.heads = heads_of(model.config)
        self.pairs = pairs if pairs is not None else make_pairs(cfg, tokenizer)
        self.table = order_table(cfg.pool_size)
        self.device = _device(self.model)
        self.log_inv_temperature = torch.nn.Parameter(torch.zeros((), device=self.device), requires_grad=cfg.learn_temperature)
        self.initial_log_inv_temperature: float | None = None  # set from the score spread once the pools are cached
        self.params = [p for p in self.model.parameters() if p.requires_grad] + ([self.log_inv_temperature] if cfg.learn_temperature else [])
        self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr)
        self.tracker = Tracker(cfg.name, root=root, config=cfg)
        self.checkpoint_path = self.tracker.dir / "checkpoint.pt"
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.update_count = 0
        self.baseline_cache: dict = {}
        self.caches: dict[str, list[PoolCache]] = {}
        self.batches: dict[str, CacheBatch] = {}
        self.cache_seconds = 0.0

    # -------------------------------------------------------------- cache
    def build_caches(self, path: str | Path | None = None) -> None:
        """Cache the training and held-out pools once (``path``: load them from / save them to a file)."""
        if self.batches:
            return
        start = time.time()
        signature = {f.name: getattr(self.cfg, f.name) for f in fields(self.cfg)
                     if f.name in ("dataset", "model", "pool_size", "key_tokens", "value_tokens", "query", "train_pools",
                                   "eval_pools", "eval_fraction", "seed")}
        if path is not None and Path(path).exists():
            saved = torch.load(path, map_location=self.device, weights_only=False)
            if saved.get("signature") == signature:
                self.caches = saved["caches"]
        if not self.caches:
            for split, n, seed in (("train", self.cfg.train_pools, self.cfg.seed), ("eval", self.cfg.eval_pools, SPLIT_SEED + 1)):
                pools = self.pairs.pools(n, split, seed)
                self.caches[split] = [build_cache(self.model, self.tokenizer, p, self.cfg.query, self.baseline_cache)
                                      for p in progress(pools, desc=f"score every order of {n} {split} pools")]
            if path is not None:
                torch.save({"signature": signature, "caches": self.caches}, path)
        self.batches = {split: CacheBatch.stack(c) for split, c in self.caches.items()}
        self.cache_seconds = time.time() - start
        if self.initial_log_inv_temperature is None:
            with torch.no_grad(), reference(self.model):
                spread = score_spread(cached_scores(self.model, self.batches["train"], self.heads), self.table.remaining.to(self.device))
            self.initial_log_inv_temperature = -math.log(self.cfg.selection_temperature or spread)
            with torch.no_grad():
                self.log_inv_temperature.fill_(self.initial_log_inv_temperature)

    @property
    def temperature(self) -> float:
        return math.exp(-self.log_inv_temperature.item())

    def order_logprobs(self, batch: CacheBatch, untrained: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, O) log p of every order and (B, P, N) per-prefix log-probs; ``untrained``: adapter off, initial T."""
        if untrained:
            with reference(self.model):
                return order_logprobs(cached_scores(self.model, batch, self.heads), math.exp(self.initial_log_inv_temperature), self.table)
        return order_logprobs(cached_scores(self.model, batch, self.heads), self.log_inv_temperature.exp(), self.table)

    # -------------------------------------------------------------- training
    def update(self) -> dict:
        """Sample K orders per training pool from the selector, look their rewards up, one REINFORCE step."""
        start = time.time()
        batch = self.batches["train"]
        if self.cfg.pools_per_update and self.cfg.pools_per_update < len(batch):
            batch = batch.select(torch.randperm(len(batch), generator=self.generator)[: self.cfg.pools_per_update].to(self.device))
        order_logp, step_logp = self.order_logprobs(batch)  # (B, O), (B, P, N)
        chosen = torch.multinomial(order_logp.detach().exp().cpu(), self.cfg.orders_per_pool, replacement=True,
                                   generator=self.generator).to(self.device)  # (B, K): whole orders, = sampling step by step
        rewards = batch.episode_rewards.gather(1, chosen)
        loss, stats = selection_loss(order_logp.gather(1, chosen), rewards)
        self.optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        stats.update({"charts/sampled_reward": rewards.mean().item(),
                      "stats/selection_entropy": expected_entropy(order_logp.detach(), step_logp.detach(), self.table).mean().item(),
                      "stats/uniform_entropy": uniform_entropy(self.cfg.pool_size), "stats/temperature": self.temperature,
                      "stats/grad_norm": grad_norm.item(), "time/update_s": time.time() - start})
        return stats

    @torch.no_grad()
    def expected(self, split: str = "eval", untrained: bool = False) -> dict[str, torch.Tensor]:
        """Exact per-pool expected episode reward (B,) and selection entropy (B,) of the selector."""
        batch = self.batches[split]
        order_logp, step_logp = self.order_logprobs(batch, untrained)
        return {"reward": (order_logp.exp() * batch.episode_rewards).sum(-1).cpu(),
                "entropy": expected_entropy(order_logp, step_logp, self.table).cpu()}

    def curve_point(self) -> dict:
        out = {}
        for split in ("train", "eval"):
            e = self.expected(split)
            out[f"charts/{split}_expected_reward"] = e["reward"].mean().item()
            out[f"stats/{split}_selection_entropy"] = e["entropy"].mean().item()
        return out

    def train(self, updates: int | None = None, resume: bool = False, cache_path: str | Path | None = None) -> pd.DataFrame:
        """Cache the pools (if not yet), then train until ``updates`` (default cfg.updates) updates in total."""
        total = updates if updates is not None else self.cfg.updates
        if resume:
            self.load()
        self.build_caches(cache_path)
        if not self.tracker.rows:
            self.tracker.log(0, {**self.curve_point(), "stats/uniform_entropy": uniform_entropy(self.cfg.pool_size),
                                 "stats/temperature": self.temperature})
        for _ in progress(range(self.update_count, total), desc=f"selection {self.cfg.dataset}"):
            stats = self.update()
            self.update_count += 1
            if self.update_count % self.cfg.eval_every == 0 or self.update_count == total:
                stats.update(self.curve_point())
            self.tracker.log(self.update_count, stats)
            if self.update_count % self.cfg.checkpoint_every == 0 or self.update_count == total:
                self.save()
        return self.tracker.df

    # -------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, split: str = "eval") -> pd.DataFrame:
        """One row per (pool, selector), all exact: ``policy`` (trained) and ``untrained`` selectors (expected reward
        over every order), ``random`` order (the mean over orders), ``document`` order, ``best`` order (the ceiling).
        ``entropy``: the selection entropy (random: uniform; document and best: 0)."""
        self.build_caches()
        R = self.batches[split].episode_rewards.cpu()  # (B, O)
        trained, untrained = self.expected(split), self.expected(split, untrained=True)
        columns = {"policy": (trained["reward"], trained["entropy"]), "untrained": (untrained["reward"], untrained["entropy"]),
                   "random": (R.mean(1), torch.full((len(R),), uniform_entropy(self.cfg.pool_size))),
                   "document": (R[:, 0], torch.zeros(len(R))), "best": (R.max(1).values, torch.zeros(len(R)))}
        names = [c.pool.name for c in self.caches[split]]
        return pd.DataFrame([{"pool": i, "name": names[i], "selector": sel, "reward": float(r[i]), "entropy": float(h[i])}
                             for sel, (r, h) in columns.items() for i in range(len(R))])

    @torch.no_grad()
    def path_probs(self, split: str, pool: int, order=None, untrained: bool = False) -> np.ndarray:
        """(N−1, N) selection probabilities at each step after the prefix order[:s] (default: document order)."""
        order = list(range(self.cfg.pool_size)) if order is None else list(order)
        _, step_logp = self.order_logprobs(self.batches[split].select([pool]), untrained)
        rows = [self.table.prefix_index(order[:s]) for s in range(self.cfg.pool_size - 1)]
        return step_logp[0, rows].exp().cpu().numpy()

    @torch.no_grad()
    def first_step_probs(self, split: str = "eval", untrained: bool = False) -> np.ndarray:
        """(B, N) probability of each key (document position) at the first step, for every pool of the split."""
        _, step_logp = self.order_logprobs(self.batches[split], untrained)
        return step_logp[:, self.table.prefix_index(())].exp().cpu().numpy()

    # -------------------------------------------------------------- checkpoints
    def save(self) -> Path:
        from peft import get_peft_model_state_dict

        torch.save({"adapter": get_peft_model_state_dict(self.model), "optimizer": self.optimizer.state_dict(),
                    "log_inv_temperature": self.log_inv_temperature.detach().cpu(),
                    "initial_log_inv_temperature": self.initial_log_inv_temperature, "update": self.update_count,
                    "metrics": self.tracker.rows, "generator": self.generator.get_state()}, self.checkpoint_path)
        return self.checkpoint_path

    def load(self) -> int:
        """Restore the last checkpoint (if any); return the update training continues from."""
        from peft import set_peft_model_state_dict

        if not self.checkpoint_path.exists():
            print(f"--resume: no checkpoint at {self.checkpoint_path}; starting from update 0")
            return 0
        ckpt = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        set_peft_model_state_dict(self.model, ckpt["adapter"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        with torch.no_grad():
            self.log_inv_temperature.copy_(ckpt["log_inv_temperature"])
        self.initial_log_inv_temperature = ckpt["initial_log_inv_temperature"]
        self.update_count, self.tracker.rows = ckpt["update"], list(ckpt["metrics"])
        self.generator.set_state(ckpt["generator"])
        print(f"resumed from {self.checkpoint_path} at update {self.update_count}")
        return self.update_count


# ----------------------------------------------------------------------------------------------
# Paired comparisons (both modes): per-pool means, then rlnlp.stats
# ----------------------------------------------------------------------------------------------
def per_pool(df: pd.DataFrame, value: str = "reward") -> pd.DataFrame:
    """Pools × selectors: the mean of ``value`` over each pool's rollouts."""
    return df.groupby(["pool", "selector"])[value].mean().unstack()


def paired(df: pd.DataFrame, a: str = "policy", b: str = "random", value: str = "reward") -> rstats.Interval:
    """Mean over pools of (a − b) with its paired 95% t-interval (``rlnlp.stats.paired_difference``); unit = one pool."""
    table = per_pool(df, value)
    return rstats.paired_difference(table[a].to_numpy(), table[b].to_numpy())


def gap_share(df: pd.DataFrame, a: str = "policy", low: str = "random", high: str = "document") -> rstats.Interval:
    """Share of the ``low`` → ``high`` gap that ``a`` closes, (ā − low̄) / (high̄ − low̄) (``rlnlp.stats.share_of_gap``),
    with a bootstrap 95% interval over pools (the three columns resampled together)."""
    table = per_pool(df)
    share = lambda x, lo, hi: rstats.share_of_gap(x.mean(), lo.mean(), hi.mean())
    return rstats.bootstrap(share, table[a].to_numpy(), table[low].to_numpy(), table[high].to_numpy(), n_resamples=2000)


def describe_difference(df: pd.DataFrame, a: str = "policy", b: str = "random", value: str = "reward",
                        unit: str = "nats/token") -> str:
    table = per_pool(df, value)
    rollouts = int(len(df[df["selector"] == a]) // max(1, len(table)))
    return (f"{a} {table[a].mean():+.4f} vs {b} {table[b].mean():+.4f} {unit}: difference {paired(df, a, b, value)} "
            f"(95% CI; {len(table)} held-out pools × {rollouts} rollout{'s' if rollouts != 1 else ''} each)")


# ----------------------------------------------------------------------------------------------
# Figures (built on rlnlp.plots)
# ----------------------------------------------------------------------------------------------
def _short(text: str, n: int = 22) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def selection_heatmap(ro: Rollout, policy_row: int = 0, title: str = "", ax=None, vmax: float | None = None):
    """Steps × keys: selection probability at each step, the chosen key outlined (colour scale 0..vmax)."""
    row = ro.rows("policy")[policy_row]
    marks = [(s, int(j)) for s, j in enumerate(ro.chosen[row])]
    return plots.heatmap(ro.probs[policy_row].numpy(), marks=marks, ax=ax, vmin=0, vmax=vmax,
                         title=title or f"{_short(ro.pool.name, 40)}: reward {float(ro.episode_reward[row]):+.3f}",
                         xlabel="key (document order)", ylabel="step", cbar_label="selection probability",
                         xticklabels=[_short(k) for k in ro.pool.keys],
                         yticklabels=[f"{s}: r={float(ro.step_rewards[row, s]):+.2f}" for s in range(ro.chosen.shape[1])])


def selection_heatmaps(rollouts: list[Rollout], titles: list[str], suptitle: str = ""):
    """Several selection heatmaps side by side (e.g. the same held-out pool before and after training), on ONE
    colour scale from 0 to the largest probability shown, so a shift away from uniform is visible."""
    import matplotlib.pyplot as plt

    n_keys = max(len(ro.pool) for ro in rollouts)
    fig, axes = plt.subplots(1, len(rollouts), figsize=(max(4.5, 0.55 * n_keys + 2.5) * len(rollouts), 0.45 * n_keys + 2.8),
                             layout="constrained", squeeze=False)
    vmax = max(float(ro.probs[0].max()) for ro in rollouts)
    for ax, ro, title in zip(axes[0], rollouts, titles):
        selection_heatmap(ro, title=title, ax=ax, vmax=vmax)
    fig.suptitle(suptitle)
    return fig


def step_figure(ro: Rollout, step: int, policy_row: int = 0):
    """One step of a policy row: the query, the probability of each key, the chosen one in red."""
    row = ro.rows("policy")[policy_row]
    p = ro.probs[policy_row, step].numpy()
    j = int(ro.chosen[row, step])
    left = int((p > 0).sum())
    fig = plots.token_weights([_short(k) for k in ro.pool.keys], p, highlight=[j],
                              title=f"step {step}: query {ro.queries[row][step]!r}\n→ {_short(ro.pool.keys[j], 40)!r} "
                                    f"= {_short(ro.pool.values[j], 30)!r}, reward {float(ro.step_rewards[row, step]):+.3f}")
    fig.axes[0].set_ylabel(f"selection probability ({left} keys left)")
    return fig


def first_pick_rates(rollouts: list[Rollout]) -> pd.Series:
    """For each key text: how often the policy picked it first, per time it was in the pool (sorted)."""
    firsts, seen = {}, {}
    for ro in rollouts:
        for row in ro.rows("policy"):
            for k in ro.pool.keys:
                seen[k] = seen.get(k, 0) + 1
            first = ro.pool.keys[int(ro.chosen[row, 0])]
            firsts[first] = firsts.get(first, 0) + 1
    return pd.Series({k: firsts.get(k, 0) / n for k, n in seen.items()}).sort_values(ascending=False)


def first_pick_figure(rates: pd.Series, pool_size: int, title: str = ""):
    """Bar per key: share of the policy's episodes that opened with it, against the uniform rate 1/pool_size."""
    return plots.bars([_short(k, 40) for k in rates.index], rates.to_numpy(), horizontal=True,
                      baselines={"uniform choice": 1 / pool_size}, ylabel="picked first / times in the pool",
                      title=title or "Which key does the policy pick first?")


def first_pick_heatmaps(trainer: SelectionTrainer, split: str = "eval", n: int = 12):
    """The first pick on n held-out pools, before and after training, on one colour scale:
    P(key j first) with j the key's position in the document (the untrained selector is near 1/N)."""
    names = [_short(c.pool.name, 28) for c in trainer.caches[split][:n]]
    before, after = trainer.first_step_probs(split, untrained=True)[:n], trainer.first_step_probs(split)[:n]
    N = trainer.cfg.pool_size
    return plots.heatmaps([before, after], ["untrained selector", "trained selector"], annotate=True, fmt=".2f",
                          suptitle=f"First pick on {n} held-out pools (uniform = 1/{N} = {1 / N:.2f})",
                          xlabel="key (position in the document)", yticklabels=names, cbar_label="P(picked first)")


def path_heatmaps(trainer: SelectionTrainer, pools: list[int], split: str = "eval"):
    """For each pool: steps × keys along the DOCUMENT-order path (after s pairs in document order, the probability
    of each remaining key), untrained above, trained below, on one colour scale. Document order = the diagonal."""
    import matplotlib.pyplot as plt

    N = trainer.cfg.pool_size
    mats = [[trainer.path_probs(split, i, untrained=u) for i in pools] for u in (True, False)]
    vmax = max(float(m.max()) for row in mats for m in row)
    fig, axes = plt.subplots(2, len(pools), figsize=(3.3 * len(pools), 5.2), layout="constrained", squeeze=False)
    for r, (label, row) in enumerate(zip(("untrained", "trained"), mats)):
        for c, (i, m) in enumerate(zip(pools, row)):
            pool = trainer.caches[split][i].pool
            plots.heatmap(m, ax=axes[r, c], vmin=0, vmax=vmax, annotate=True, fmt=".2f",
                          marks=[(s, s) for s in range(N - 1)], cbar_label="selection probability",
                          title=f"{label}: {_short(pool.name, 24)}", xlabel="key (document position)",
                          ylabel="after s pairs in document order")
    fig.suptitle("Selection along the document-order path (outlined: the next pair in the document)")
    return fig


def order_rewards_figure(cache: PoolCache, title: str = ""):
    """Episode reward of every order of one pool, document order in red, the random-order mean as a line."""
    R = cache.episode_rewards.cpu().numpy()
    labels = ["→".join(map(str, o)) for o in order_table(len(cache.pool)).orders.tolist()]
    colors = ["tab:red" if i == 0 else "tab:blue" for i in range(len(R))]
    return plots.bars(labels, R, color=colors, baselines={"random order (mean over orders)": float(R.mean())},
                      ylabel="episode reward (nats/token)", xlabel="order (key positions; red = document order)",
                      title=title or f"{_short(cache.pool.name, 40)}: reward of every order")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        self.exit(2, f"error: {self.prog}: {message} (see --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m rlnlp.attention_guided", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=MODES, default="loop",
                        help="loop: sampled queries + selection (the full profile's method); selection: fixed query, "
                             "last-layer q/k LoRA, cached pools (the cpu profile's method)")
    parser.add_argument("--dataset", choices=DATASETS, default="wikipedia")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="loop: policy rollouts per episode; selection: orders sampled per pool per update")
    parser.add_argument("--episodes", type=int, default=None, help="loop: training episodes; selection: updates")
    parser.add_argument("--resume", action="store_true", help="continue from runs/<run>/checkpoint.pt")
    parser.add_argument("--profile", choices=("smoke", "cpu", "full"), default=None)
    parser.add_argument("--pool-size", type=int, default=None)
    parser.add_argument("--train-pools", type=int, default=None, help="selection: distinct training pools")
    parser.add_argument("--eval-pools", type=int, default=None)
    parser.add_argument("--training-percentile", type=float, default=None, help="loop only")
    parser.add_argument("--run-name", default=None)
    parser.add_argument("--seed", type=int, default=None)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    selection = args.mode == "selection"
    if selection and args.training_percentile is not None:
        _Parser(prog="python -m rlnlp.attention_guided").error("--training-percentile belongs to --mode loop")
    if not selection and args.train_pools is not None:
        _Parser(prog="python -m rlnlp.attention_guided").error("--train-pools belongs to --mode selection")
    named = dict(dataset=args.dataset, pool_size=args.pool_size, eval_pools=args.eval_pools, seed=args.seed,
                 run_name=args.run_name)
    if selection:
        named.update(orders_per_pool=args.batch_size, updates=args.episodes, train_pools=args.train_pools)
    else:
        named.update(batch_size=args.batch_size, episodes=args.episodes, training_percentile=args.training_percentile)
    overrides = {k: v for k, v in named.items() if v is not None}
    try:
        cfg = pick(SelectionConfig if selection else AttentionGuidedConfig, args.profile, **overrides)
        cfg.__post_init__()
        seed_everything(cfg.seed)
        if selection:
            trainer = SelectionTrainer(cfg)
            df = trainer.train(resume=args.resume, cache_path=trainer.tracker.dir / "caches.pt")
            evaluation = trainer.evaluate()
        else:
            trainer = AttentionGuidedTrainer(cfg)
            df = trainer.train(resume=args.resume)
            evaluation, _ = trainer.evaluate(trainer.eval_pools(cfg.eval_pools))
    except (ValueError, EmbeddedModelMissing, FileNotFoundError) as err:  # bad input: one line a person can act on
        raise SystemExit(f"error: {err}") from None
    print(df.tail(5).to_string())
    evaluation.to_csv(trainer.tracker.dir / "evaluation.csv", index=False)
    others = ("untrained", "random", "document", "best") if selection else ("untrained", "random", "document")
    result = {}
    for other in others:
        result[f"policy_vs_{other}"] = paired(evaluation, "policy", other)
        print("held-out:", describe_difference(evaluation, "policy", other))
    if selection:
        ent = per_pool(evaluation, "entropy")
        print(f"held-out selection entropy {ent['policy'].mean():.3f} nats vs uniform {ent['random'].mean():.3f} "
              f"(untrained {ent['untrained'].mean():.3f})")
    return result


if __name__ == "__main__":
    main()
