"""Selection only, the cache: every order of a small pool scored once by the reference, and the inputs of the last
layer's q/k projections kept, so an update is a few small matmuls and the expected reward is exact."""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..models import masked_mean, position_ids_from_mask
from .attention import Heads, _device, capture_projection_inputs, entropy, project, reference, selection_scores
from .config import FIXED_QUERY
from .pools import Pool
from .reward import key_only_logprob


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
    prefix_of = torch.tensor([[index[o[:s]] for s in range(n - 1)] for o in orders],
                             dtype=torch.long).view(len(orders), n - 1)
    remaining = torch.tensor([[j not in p for j in range(n)] for p in prefixes],
                             dtype=torch.bool).view(len(prefixes), n)
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
def build_cache(model, tokenizer, pool: Pool, query: str = FIXED_QUERY,
                baseline_cache: dict | None = None) -> PoolCache:
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
    key_only = key_only_logprob(model, tokenizer, pool.keys, pool.values,
                                baseline_cache if baseline_cache is not None else {})
    rewards = mean_logp - key_only[table.orders.to(dev)]  # (O, N)
    query_x = torch.stack([cap["q"][o, t : t + len(q_ids)]
                           for o, t in (query_at[p] for p in table.prefixes)])  # (P, Tq, D)
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


