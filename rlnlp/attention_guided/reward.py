"""The reward: how much easier each value became to predict for the frozen reference, thanks to the context.

    r_i = mean_t log p_ref(value_i | context_<i, query_i, key_i) − mean_t log p_ref(value_i | key_i)
"""
from __future__ import annotations

import torch

from ..models import completion_logprobs, masked_mean
from .attention import _device, reference
from .pools import pair_prompt


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
    """mean-token log p_ref(value | "Key: k Value:") per pair (R,), memoised in ``cache`` (the reference never
    changes)."""
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
        prompts = [c + pair_prompt(q, k) for c, q, k in zip(contexts, queries, keys)]
        with_context = value_logprob(model, tokenizer, prompts, values)
    return with_context - key_only_logprob(model, tokenizer, keys, values, cache)

