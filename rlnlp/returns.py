"""Discounted returns and GAE with episode boundaries — the one returns module every system uses.

Conventions (time-major, as CleanRL):
    rewards, values, dones: (T,) or (T, N)
    dones[t] = 1 when the episode ENDED with transition t (no bootstrapping past it)
    next_value: (N,) or scalar — V of the state after the last transition (ignored where dones[-1] = 1)
"""
from __future__ import annotations

import torch


def _as_2d(*xs):
    one_d = xs[0].dim() == 1
    return one_d, [x.unsqueeze(-1) if x.dim() == 1 else x for x in xs]


def discounted_returns(rewards: torch.Tensor, dones: torch.Tensor, gamma: float,
                       next_value: torch.Tensor | float = 0.0) -> torch.Tensor:
    """G_t = r_t + γ·(1 − d_t)·G_{t+1}, with G_T = next_value. Shape of ``rewards``."""
    rewards, dones = torch.as_tensor(rewards, dtype=torch.float32), torch.as_tensor(dones, dtype=torch.float32)
    one_d, (r, d) = _as_2d(rewards, dones)
    G = torch.zeros_like(r)
    running = torch.as_tensor(next_value, dtype=r.dtype).expand(r.shape[1]).clone()
    for t in reversed(range(r.shape[0])):
        running = r[t] + gamma * (1.0 - d[t]) * running
        G[t] = running
    return G.squeeze(-1) if one_d else G


def gae(rewards: torch.Tensor, values: torch.Tensor, dones: torch.Tensor, next_value: torch.Tensor | float,
        gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016). Returns ``(advantages, returns)``.

    δ_t = r_t + γ·(1 − d_t)·V_{t+1} − V_t
    A_t = δ_t + γλ·(1 − d_t)·A_{t+1}
    returns = A + V (the value-function target)
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float32)
    values = torch.as_tensor(values, dtype=torch.float32)
    dones = torch.as_tensor(dones, dtype=torch.float32)
    one_d, (r, v, d) = _as_2d(rewards, values, dones)
    T, N = r.shape
    v_next = torch.as_tensor(next_value, dtype=r.dtype).expand(N)
    adv = torch.zeros_like(r)
    running = torch.zeros(N, dtype=r.dtype)
    for t in reversed(range(T)):
        nonterminal = 1.0 - d[t]
        delta = r[t] + gamma * nonterminal * v_next - v[t]
        running = delta + gamma * lam * nonterminal * running
        adv[t] = running
        v_next = v[t]
    ret = adv + v
    return (adv.squeeze(-1), ret.squeeze(-1)) if one_d else (adv, ret)
