"""Attention-guided RL: the model orders its own curriculum (spec 03, notebooks/03_attention_guided_curriculum).

A document is cut into key → value pairs. At each step the policy LM writes a short query; its OWN
last attention layer scores the remaining keys (query projection of the query tokens against the
key projection of each key); one pair is drawn and appended to the context. The frozen reference
model then says how much easier each value became to predict thanks to everything chosen before:

    r_i = mean_t log p_ref(value_i | context_<i, query_i, key_i) − mean_t log p_ref(value_i | key_i)

and REINFORCE (batch-mean baseline, k3 KL to the reference on the query tokens) raises the
probability of the queries and selections of the better orders.

    python -m rlnlp.attention_guided --dataset {wikipedia,twenty_questions} --batch-size 4 --episodes 1000 [--resume]

Design choices that differ from the original (see the spec):
* selection samples from the averaged attention distribution AS probabilities, per batch row;
* the reward uses the frozen reference and includes the current query and key in the context;
* the query log-probs are scored WITH their context; the KL is to the frozen reference (non-zero);
* the B rollouts of one episode share ONE pool, so the batch-mean baseline compares orders of the
  same material (and key embeddings and reward baselines are computed once per pool);
* no rotary embedding on q/k before the dot product (see ``selection_probs``).
"""
from __future__ import annotations

import argparse
import math
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from . import data as rdata
from . import plots
from .losses import reinforce_loss
from .models import attach_lora, completion_logprobs, kl_k3, load_policy, masked_mean, position_ids_from_mask
from .runtime import pick, profile, seed_everything
from .sampling import sample
from .tracking import Tracker, progress

DATASETS = ("wikipedia", "twenty_questions")
SELECTORS = ("policy", "random", "document")
INSTRUCTIONS = {
    "wikipedia": "Facts from one encyclopedia article, each written as a query, a key and its value.",
    "twenty_questions": "Twenty Questions about one hidden object: each key is a yes/no question, its value the answer.",
}
SPLIT_SEED = 20240  # fixed, so the held-out articles/objects do not move with cfg.seed


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
@dataclass
class AttentionGuidedConfig:
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
    selection_temperature: float = 1.0
    """T in softmax(q·k / √d / T) over the remaining keys."""
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
        """Tiny CPU budget: a pool of 4, 3 updates of 2 rollouts, 4-token queries — mechanics, not learning."""
        base = dict(pool_size=4, query_tokens=4, batch_size=2, baseline_rows=1, episodes=3, checkpoint_every=100,
                    eval_pools=2)
        return cls(**{**base, **kw})

    @classmethod
    def full(cls, **kw) -> "AttentionGuidedConfig":
        """One GPU: 200 updates of 8 rollouts on pools of 8 pairs, then 48 held-out pools."""
        base = dict(pool_size=8, batch_size=8, baseline_rows=2, episodes=200, eval_pools=48)
        return cls(**{**base, **kw})

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"AttentionGuidedConfig.dataset: {self.dataset!r} is not one of {DATASETS}")
        if self.steps is not None and not 1 <= self.steps <= self.pool_size:
            raise ValueError(f"AttentionGuidedConfig.steps must be in 1..pool_size={self.pool_size}, got {self.steps}")
        if not 0 <= self.training_percentile < 100:
            raise ValueError(f"AttentionGuidedConfig.training_percentile must be in [0, 100), got {self.training_percentile}")

    @property
    def n_steps(self) -> int:
        return self.steps or self.pool_size

    @property
    def name(self) -> str:
        return self.run_name or f"attention_guided_{self.dataset}_{profile()}"


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


class WikipediaPairs:
    """Pools of consecutive (key_tokens → value_tokens) chunks from one article, cut with the policy tokenizer."""

    def __init__(self, tokenizer, cfg: AttentionGuidedConfig, summaries: dict[str, str] | None = None):
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


class TwentyQuestionsPairs:
    """Pools of pool_size questions (in question-id order) about one hidden object; values "Yes"/"No"."""

    def __init__(self, cfg: AttentionGuidedConfig, table: tuple[list[dict], list[dict]] | None = None):
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


def make_pairs(cfg: AttentionGuidedConfig, tokenizer):
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


def _last_projections(model) -> dict[str, torch.nn.Module]:
    """The last layer's q/k projection modules (LoRA-wrapped if an adapter is attached), or GPT-2's fused c_attn."""
    named = dict(model.named_modules())
    q = [n for n in named if n.endswith("q_proj")]
    k = [n for n in named if n.endswith("k_proj")]
    if q and k:
        return {"q": named[q[-1]], "k": named[k[-1]]}
    fused = [n for n in named if n.endswith("c_attn")]
    if fused:
        return {"qkv": named[fused[-1]]}
    raise ValueError(f"{type(model).__name__}: found no q_proj/k_proj or c_attn module to read attention projections from")


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


def selection_probs(q: torch.Tensor, k: torch.Tensor, remaining: torch.Tensor, heads: Heads,
                    temperature: float = 1.0) -> torch.Tensor:
    """Probability of choosing each remaining key: per-head attention, averaged over heads.

        p(j) = 1/H Σ_h softmax_{j ∈ remaining}( q_h · k_{j, g(h)} / √d / T ),   g(h) = h // (H / G)

    q: (B, H·d) query embeddings; k: (N, G·d) key embeddings; remaining: (B, N) bool. Returns (B, N),
    each row summing to 1 over its remaining keys and 0 elsewhere.

    No rotary embedding is applied: the keys are embedded context-free, so they have no position
    relative to the query, and rotating tokens at different positions before mean-pooling would
    partly cancel the fast-rotating dimensions. The score is therefore a content match between
    the learned projections, invariant to where the query sits in the growing context.
    """
    B, N = remaining.shape
    H, G, d = heads.n_heads, heads.n_kv_heads, heads.head_dim
    q = q.view(B, H, d)
    k = k.view(N, G, d)[:, heads.group_of_head().to(k.device)]  # (N, H, d): each query head's KV group
    scores = torch.einsum("bhd,nhd->bhn", q, k) / math.sqrt(d) / temperature  # (B, H, N)
    scores = scores.masked_fill(~remaining[:, None, :], float("-inf"))
    return torch.softmax(scores.float(), dim=-1).mean(1)  # (B, N)


# ----------------------------------------------------------------------------------------------
# Reward
# ----------------------------------------------------------------------------------------------
def pair_prompt(query: str, key: str) -> str:
    """What precedes a value in the context; the query text is appended exactly as sampled after " Query:"."""
    return f" Query:{query} Key: {key} Value:"


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


def step_rewards(model, tokenizer, contexts: list[str], queries: list[str], keys: list[str], values: list[str],
                 baseline_cache: dict | None = None) -> torch.Tensor:
    """r_i = mean-token log p_ref(value_i | context_<i, query_i, key_i) − mean-token log p_ref(value_i | key_i): (R,).

    ``model`` is scored with its adapter disabled; the key-only term depends on the pair alone and is
    cached in ``baseline_cache`` (valid forever: the reference never changes)."""
    cache = baseline_cache if baseline_cache is not None else {}
    with reference(model):
        with_context = value_logprob(model, tokenizer, [c + pair_prompt(q, k) for c, q, k in zip(contexts, queries, keys)], values)
        missing = list(dict.fromkeys((k, v) for k, v in zip(keys, values) if (k, v) not in cache))
        if missing:
            alone = value_logprob(model, tokenizer, [f"Key: {k} Value:" for k, _ in missing], [v for _, v in missing])
            cache.update(zip(missing, alone.tolist()))
    key_only = torch.tensor([cache[(k, v)] for k, v in zip(keys, values)], device=with_context.device)
    return with_context - key_only


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
            grad: bool = False, baseline_cache: dict | None = None) -> Rollout:
    """Play one episode per row on ``pool``: query → attention over remaining keys → append the pair."""
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
    probs_log, entropy, key_logp = torch.zeros(B, S, N), torch.zeros(B, S), torch.zeros(B, S)
    reward_args = ([], [], [], [])  # contexts, queries, keys, values, step-major
    seq_logp = torch.zeros(B, device=dev)
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
                probs = selection_probs(q_emb, k_emb, remaining[pol], heads, cfg.selection_temperature)  # (B, N)
            choice[pol] = torch.multinomial(probs.detach(), 1).squeeze(1)
            logp_key = torch.log(probs.gather(1, choice[pol, None]).squeeze(1).clamp_min(1e-30))  # (B,)
            seq_logp = seq_logp + q_logp.sum(1) + logp_key
            probs_log[:, s] = probs.detach().cpu()
            key_logp[:, s] = logp_key.detach().cpu()
            entropy[:, s] = -torch.special.xlogy(probs.detach(), probs.detach()).sum(1).cpu()
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
    out = Rollout(pool, list(selectors), queries, chosen, rewards, probs_log, contexts, entropy, key_logp=key_logp)
    if grad and B:
        out.seq_logp = seq_logp
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
    """Policy (LM + LoRA), pools, optimizer, tracker and checkpoints for one dataset."""

    def __init__(self, cfg: AttentionGuidedConfig, pairs=None, root: str | Path | None = None, model=None, tokenizer=None):
        self.cfg = cfg
        if model is None:
            model, tokenizer = load_policy(cfg.model)
        # LoRA dropout 0: the key is sampled from the very forward pass whose log-prob gets the gradient
        self.model = attach_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=0.0, target_modules=lora_targets(model))
        self.tokenizer = tokenizer
        self.heads = heads_of(model.config)
        self.pairs = pairs if pairs is not None else make_pairs(cfg, tokenizer)
        self.optimizer = torch.optim.Adam([p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr)
        self.tracker = Tracker(cfg.name, root=root, config=cfg)
        self.checkpoint_path = self.tracker.dir / "checkpoint.pt"
        self.rng = random.Random(cfg.seed)
        self.episode = 0
        self.baseline_cache: dict = {}  # (key, value) -> mean log p_ref(value | key)
        self.history: list[Rollout] = []  # detached training rollouts, for the notebook's plots

    @property
    def selectors(self) -> list[str]:
        c = self.cfg
        return ["policy"] * c.batch_size + ["random"] * c.baseline_rows + ["document"] * c.baseline_rows

    def rollout(self, pool: Pool, selectors: list[str] | None = None, grad: bool = False) -> Rollout:
        return rollout(self.model, self.tokenizer, pool, self.cfg, self.heads, selectors or self.selectors, grad=grad,
                       baseline_cache=self.baseline_cache)

    def update(self) -> tuple[Rollout, dict]:
        """One episode on a fresh training pool, then one gradient step."""
        start = time.time()
        self.model.train()
        ro = self.rollout(self.pairs.pool(self.rng, "train"), grad=True)
        loss, stats = attention_guided_loss(ro, self.cfg.kl_coef, self.cfg.training_percentile)
        self.optimizer.zero_grad()
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], self.cfg.max_grad_norm)
        self.optimizer.step()
        reward = ro.episode_reward
        stats.update({"charts/episode_reward": reward[ro.rows("policy")].mean().item(),
                      "stats/selection_entropy": ro.entropy.mean().item(),
                      "stats/uniform_entropy": float(np.mean([math.log(len(ro.pool) - s) for s in range(self.cfg.n_steps)])),
                      "stats/grad_norm": grad_norm.item(), "time/episode_s": time.time() - start})
        for sel in ("random", "document"):
            if ro.rows(sel):
                stats[f"charts/{sel}_reward"] = reward[ro.rows(sel)].mean().item()
        ro.seq_logp = ro.query_logp = ro.ref_query_logp = ro.query_mask = None  # drop the graph
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
        self.episode, self.tracker.rows = ckpt["episode"], list(ckpt["metrics"])
        self.rng.setstate(ckpt["rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        if ckpt.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        print(f"resumed from {self.checkpoint_path} at episode {self.episode}")
        return self.episode

    def eval_pools(self, n: int) -> list[Pool]:
        """The same n held-out pools every time (fixed seed)."""
        rng = random.Random(SPLIT_SEED + 1)
        return [self.pairs.pool(rng, "eval") for _ in range(n)]

    @torch.no_grad()
    def evaluate(self, pools: list[Pool], rows: int | None = None) -> tuple[pd.DataFrame, list[Rollout]]:
        """Episode reward of every selector on each pool: one DataFrame row per (pool, selector, rollout)."""
        rows = rows or self.cfg.batch_size
        selectors = [s for s in SELECTORS for _ in range(rows)]
        records, rollouts = [], []
        self.model.eval()
        for i, pool in enumerate(progress(pools, desc="evaluate")):
            ro = self.rollout(pool, selectors)
            rollouts.append(ro)
            records += [{"pool": i, "name": pool.name, "selector": s, "reward": float(r)}
                        for s, r in zip(selectors, ro.episode_reward)]
        return pd.DataFrame(records), rollouts


def paired_difference(df: pd.DataFrame, a: str = "policy", b: str = "random") -> dict:
    """Mean over pools of (mean reward of ``a`` − mean reward of ``b``) with a 95% t-interval."""
    from scipy import stats

    per_pool = df.groupby(["pool", "selector"])["reward"].mean().unstack()
    diff = (per_pool[a] - per_pool[b]).to_numpy()
    n = len(diff)
    mean = float(diff.mean())
    half = float(stats.t.ppf(0.975, n - 1) * diff.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"a": a, "b": b, "mean_a": float(per_pool[a].mean()), "mean_b": float(per_pool[b].mean()),
            "diff": mean, "ci95": (mean - half, mean + half), "pools": n, "rollouts_per_pool": int((df["pool"] == 0).sum() // df["selector"].nunique())}


def describe_difference(res: dict) -> str:
    lo, hi = res["ci95"]
    return (f"{res['a']} {res['mean_a']:+.4f} vs {res['b']} {res['mean_b']:+.4f} nats/token: "
            f"difference {res['diff']:+.4f}, 95% CI [{lo:+.4f}, {hi:+.4f}] "
            f"({res['pools']} held-out pools × {res['rollouts_per_pool']} rollouts each)")


# ----------------------------------------------------------------------------------------------
# Figures (built on rlnlp.plots)
# ----------------------------------------------------------------------------------------------
def _short(text: str, n: int = 22) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def selection_heatmap(ro: Rollout, policy_row: int = 0, title: str = "", ax=None):
    """Steps × keys: selection probability at each step, the chosen key outlined."""
    row = ro.rows("policy")[policy_row]
    marks = [(s, int(j)) for s, j in enumerate(ro.chosen[row])]
    return plots.heatmap(ro.probs[policy_row].numpy(), marks=marks, ax=ax, vmin=0, vmax=1,
                         title=title or f"{_short(ro.pool.name, 40)}: reward {float(ro.episode_reward[row]):+.3f}",
                         xlabel="key (document order)", ylabel="step", cbar_label="selection probability",
                         xticklabels=[_short(k) for k in ro.pool.keys],
                         yticklabels=[f"{s}: r={float(ro.step_rewards[row, s]):+.2f}" for s in range(ro.chosen.shape[1])])


def selection_heatmaps(rollouts: list[Rollout], titles: list[str], suptitle: str = ""):
    """Several selection heatmaps side by side (e.g. the same held-out pool before and after training)."""
    import matplotlib.pyplot as plt

    n_keys = max(len(ro.pool) for ro in rollouts)
    fig, axes = plt.subplots(1, len(rollouts), figsize=(max(4.5, 0.55 * n_keys + 2.5) * len(rollouts), 0.45 * n_keys + 2.8),
                             layout="constrained", squeeze=False)
    for ax, ro, title in zip(axes[0], rollouts, titles):
        selection_heatmap(ro, title=title, ax=ax)
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


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m rlnlp.attention_guided", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", choices=DATASETS, default="wikipedia")
    parser.add_argument("--batch-size", type=int, default=None, help="policy rollouts per episode")
    parser.add_argument("--episodes", type=int, default=None, help="total training episodes")
    parser.add_argument("--resume", action="store_true", help="continue from runs/<run>/checkpoint.pt")
    parser.add_argument("--profile", choices=("smoke", "full"), default=None)
    parser.add_argument("--pool-size", type=int, default=None)
    parser.add_argument("--eval-pools", type=int, default=None)
    parser.add_argument("--training-percentile", type=float, default=None)
    parser.add_argument("--run-name", default=None)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in dict(dataset=args.dataset, batch_size=args.batch_size, episodes=args.episodes,
                                       pool_size=args.pool_size, eval_pools=args.eval_pools, seed=args.seed,
                                       training_percentile=args.training_percentile, run_name=args.run_name).items()
                 if v is not None}
    cfg = pick(AttentionGuidedConfig, args.profile, **overrides)
    cfg.__post_init__()
    seed_everything(cfg.seed)
    trainer = AttentionGuidedTrainer(cfg)
    df = trainer.train(resume=args.resume)
    print(df.tail(5).to_string())
    evaluation, _ = trainer.evaluate(trainer.eval_pools(cfg.eval_pools))
    evaluation.to_csv(trainer.tracker.dir / "evaluation.csv", index=False)
    result = paired_difference(evaluation, "policy", "random")
    print("held-out:", describe_difference(result))
    print("held-out:", describe_difference(paired_difference(evaluation, "policy", "document")))
    return result


if __name__ == "__main__":
    main()
