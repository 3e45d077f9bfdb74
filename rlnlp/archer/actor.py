"""The token-level actor's update: REINFORCE or PPO-clip on one advantage per utterance (ArCHer), and the
baselines' per-episode advantages from returns alone."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..losses import normalize, ppo_clip_loss, reinforce_loss
from ..models import completion_logprobs, kl_k3, masked_mean
from ..sampling import Samples
from .acting import Utterances
from .config import ArcherConfig


def _policy_loss(model, s: Samples, sl: slice, advantages: torch.Tensor, loss_kind: str, cfg: ArcherConfig):
    """Loss of rows ``sl`` (one chunk), with per-utterance advantages (b,) broadcast over tokens."""
    dev = next(model.parameters()).device
    args = [x[sl].to(dev) for x in (s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask)]
    mask = args[3]
    logp = completion_logprobs(model, *args, temperature=cfg.temperature)  # (b, C)
    adv = advantages.to(dev)  # (b,)
    if loss_kind == "reinforce":
        loss, st = reinforce_loss(logp.sum(1), adv)
    elif loss_kind == "ppo":
        loss, st = ppo_clip_loss(logp, s.logprobs[sl].to(dev), adv[:, None].expand_as(logp), cfg.ppo_clip, mask)
    else:
        raise ValueError(f"actor_loss must be 'reinforce' or 'ppo', got {loss_kind!r}")
    if cfg.kl_coef > 0:
        with torch.no_grad(), model.disable_adapter():
            ref = completion_logprobs(model, *args, temperature=cfg.temperature)
        kl = masked_mean(kl_k3(logp, ref), mask)
        loss = loss + cfg.kl_coef * kl
        st["stats/kl"] = kl.item()
    return loss, st


@torch.no_grad()
def old_logprobs(model, u: Utterances, cfg: ArcherConfig) -> torch.Tensor:
    """PPO's π_old: the log-probs of every row of ``u`` under the training forward itself, in the chunks
    ``policy_step`` uses on all rows, so that ρ = π / π_old is exactly 1 before the first update. The sampler's own
    log-probs come from a KV-cached forward that differs from the training forward by ~3e-6 nats per token in fp32
    and ~3e-2 (up to ~0.2) in bf16: used as π_old, that noise would move every ratio before any learning."""
    s = u.samples.select(list(range(len(u.texts))))
    dev = next(model.parameters()).device
    out = []
    for lo in range(0, len(u.texts), cfg.train_batch):
        sl = slice(lo, min(len(u.texts), lo + cfg.train_batch))
        args = [x[sl].to(dev) for x in (s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask)]
        out.append(completion_logprobs(model, *args, temperature=cfg.temperature))
    return torch.cat(out).to(s.logprobs.device)


def policy_step(model, opt, u: Utterances, advantages: torch.Tensor, cfg: ArcherConfig, loss_kind: str,
                rows: list[int] | None = None, sync=None) -> dict:
    """ONE optimiser step on ``rows`` of ``u`` (all by default), in chunks of train_batch with gradient accumulation.

    reinforce:  L = −mean_b(A_b · Σ_t log π(a_bt))
    ppo:        L = −mean_bt(min(ρ_bt·A_b, clip(ρ_bt, 1 ± ε)·A_b)),  ρ = π / π_old (π_old: ``old_logprobs``, taken
                on the first step over ``u``, before any update)
    both:       + β · mean_bt(k3(π ‖ π_ref))  when kl_coef > 0

    ``sync(parameters)`` runs between the backward passes and the clipping (several processes: the gradient average).
    """
    rows = list(range(len(u.texts))) if rows is None else rows
    if loss_kind == "ppo" and u.old_logprobs is None:
        u.old_logprobs = old_logprobs(model, u, cfg)
    s = u.samples.select(rows)
    if loss_kind == "ppo":
        s.logprobs = u.old_logprobs[torch.as_tensor(rows, dtype=torch.long)][:, : s.logprobs.shape[1]]
    adv = advantages[torch.as_tensor(rows, dtype=torch.long)]
    B = len(rows)
    opt.zero_grad()
    sums: dict[str, float] = {}
    for lo in range(0, B, cfg.train_batch):
        sl = slice(lo, min(B, lo + cfg.train_batch))
        loss, st = _policy_loss(model, s, sl, adv[sl], loss_kind, cfg)
        (loss * (sl.stop - sl.start) / B).backward()
        for k, v in st.items():
            sums[k] = sums.get(k, 0.0) + v * (sl.stop - sl.start) / B
    if sync is not None:
        sync(model.parameters())
    sums["stats/grad_norm"] = float(nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                             cfg.grad_clip))
    opt.step()
    return sums


def actor_step(model, opt, u: Utterances, advantages: torch.Tensor, cfg: ArcherConfig, sync=None) -> dict:
    """ArCHer's actor update on fresh utterances with one advantage per utterance (B,): one REINFORCE step,
    or ppo_epochs PPO-clip steps over the whole batch (actor_loss == "ppo"); ``sync``: see ``policy_step``."""
    steps = cfg.ppo_epochs if cfg.actor_loss == "ppo" else 1
    stats = {}
    for _ in range(steps):
        stats = policy_step(model, opt, u, advantages, cfg, cfg.actor_loss, sync=sync)
    return stats


def episode_advantages(returns: torch.Tensor, kind: str, group_size: int = 1) -> torch.Tensor:
    """One advantage per episode, from returns only (no critic).

    ppo:  A = (G − mean G) / std G over the whole round (whole-rollout normalisation)
    grpo: A_i = (G_i − mean_g G) / std_g G within each group of ``group_size`` episodes from the same start
          (consecutive rows); a group whose returns are all equal gets A = 0
    """
    if kind == "ppo":
        return normalize(returns)
    if kind == "grpo":
        g = returns.view(-1, group_size)  # (groups, G)
        return ((g - g.mean(1, keepdim=True)) / (g.std(1, keepdim=True) + 1e-8)).flatten()
    raise ValueError(f"baseline kind must be 'ppo' or 'grpo', got {kind!r}")
