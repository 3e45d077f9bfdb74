"""The model's own last attention layer as a selector: the q/k projections it reads, the head-averaged scores over
the remaining keys, the selection probabilities and their entropy."""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch

from ..models import completion_logprobs, masked_mean, position_ids_from_mask
from .pools import Pool, context_of


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
    raise ValueError(f"{type(model).__name__}: found no q_proj/k_proj or c_attn module to read attention projections "
                     "from")


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
            keep = lambda _m, _i, out, name=name: captured.__setitem__(name, out)
            handles.append(modules[name].register_forward_hook(keep))
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
    enc = tokenizer([f" {k}" for k in keys], padding=True, add_special_tokens=False,
                    return_tensors="pt").to(_device(model))
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
    # (..., G·d): the heads of a group are contiguous. In fp32: under bf16 autocast the query comes out of a bf16 pass
    # and the keys out of an fp32 one, and scores a few hundredths apart would move the softmax
    q_grouped = q.float().reshape(*q.shape[:-1], G, H // G, d).sum(-2).flatten(-2) / H
    return (k.float() @ q_grouped.unsqueeze(-1)).squeeze(-1) / math.sqrt(d)  # (..., N)


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
    N = scores.shape[-1]
    s, m = scores.detach().float().reshape(-1, N), remaining.expand_as(scores).reshape(-1, N)
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


def lora_targets(model) -> tuple[str, ...]:
    """q/k/v for Llama-style models, the fused c_attn for GPT-2-style ones."""
    return ("c_attn",) if "qkv" in _last_projections(model) else ("q_proj", "k_proj", "v_proj")


def last_layer_qk(model) -> tuple[str, ...]:
    """Full names of the last layer's q_proj and k_proj (or its fused c_attn): the selection-only LoRA targets."""
    return tuple(_last_projection_names(model).values())


def fixed_query_scores(model, tokenizer, pool: Pool, prefix, query: str, heads: Heads) -> torch.Tensor:
    """(N,) the same scores WITHOUT the cache: one forward over the context after ``prefix`` (placed with the fixed
    query) + " Query:" + query, and one over the keys alone. The cache must reproduce this (a test checks)."""
    dev = _device(model)
    p = tokenizer([context_of(pool, prefix, [query] * len(prefix)) + " Query:"], add_special_tokens=False,
                  return_tensors="pt").to(dev)
    c = tokenizer([query], add_special_tokens=False, return_tensors="pt").to(dev)
    _, q = query_pass(model, p["input_ids"], p["attention_mask"], c["input_ids"], c["attention_mask"])
    return selection_scores(q, key_embeddings(model, tokenizer, pool.keys), heads)[0]


