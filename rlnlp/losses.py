"""Policy-gradient losses shared by the systems. Each returns ``(loss, stats)``; shapes in docstrings.

One sign convention everywhere: the loss is MINIMISED, so a positive advantage raises the
log-probability of its action (the original alectors loss lacked this minus sign).
"""
from __future__ import annotations

import torch

from .models import masked_mean


def normalize(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / (std + eps); a single element is returned centred (std undefined)."""
    if x.numel() < 2:
        return x - x.mean()
    return (x - x.mean()) / (x.std() + eps)


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip: float = 0.2,
                  mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate: L = −E[ min(ρ·A, clip(ρ, 1 − ε, 1 + ε)·A) ],  ρ = exp(log π − log π_old).

    logp, old_logp: (B,) per action, or (B, T) per token with ``mask`` (B, T)
    advantages:     same shape as logp (broadcast a (B, 1) utterance advantage over tokens)
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip, 1.0 + clip) * advantages
    per = -torch.min(unclipped, clipped)
    if mask is None:
        mask = torch.ones_like(per)
    loss = masked_mean(per, mask)
    with torch.no_grad():
        log_ratio = logp - old_logp
        stats = {
            "losses/policy": loss.item(),
            "stats/clip_fraction": masked_mean(((ratio - 1.0).abs() > clip).float(), mask).item(),
            "stats/approx_kl": masked_mean((ratio - 1) - log_ratio, mask).item(),  # k3 of π_old‖π
        }
    return loss, stats


def value_loss(values: torch.Tensor, returns: torch.Tensor, old_values: torch.Tensor | None = None,
               clip: float | None = None) -> tuple[torch.Tensor, dict]:
    """½·(V − G)², optionally PPO-clipped around the old values: ½·max((V − G)², (V_clip − G)²).

    values, returns, old_values: (B,)
    """
    if values.shape != returns.shape:
        raise ValueError(f"value_loss: values {tuple(values.shape)} vs returns {tuple(returns.shape)} — "
                         "squeeze the value head's last dim first (the original broadcast (B,1) against (B,))")
    per = (values - returns) ** 2
    if clip is not None and old_values is not None:
        v_clipped = old_values + torch.clamp(values - old_values, -clip, clip)
        per = torch.max(per, (v_clipped - returns) ** 2)
    loss = 0.5 * per.mean()
    return loss, {"losses/value": loss.item()}


def reinforce_loss(seq_logp: torch.Tensor, advantages: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """L = −mean(A · log π(sequence)). seq_logp, advantages: (B,); advantages carry no gradient."""
    loss = -(advantages.detach() * seq_logp).mean()
    return loss, {"losses/policy": loss.item()}
