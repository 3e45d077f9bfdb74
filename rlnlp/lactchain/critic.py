"""The critic: a small MLP over frozen MiniLM embeddings, fitted by Monte-Carlo with bootstrapped tails."""
from __future__ import annotations

import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..envs.gridworld import GridWorld, State
from ..tracking import progress
from .chains import MCSample
from .config import LactChainConfig
from .text import state_text


class Critic(nn.Module):
    """V(s) = value_scale · MLP(MiniLM(state text + "\\n" + info)). Only the MLP trains."""

    def __init__(self, encoder, env: GridWorld, hidden: int = 128, value_scale: float = 100.0):
        super().__init__()
        self.encoder, self.env, self.value_scale = encoder, env, value_scale
        self.head = nn.Sequential(nn.Linear(encoder.dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                  nn.Linear(hidden, 1))

    def embed(self, states: list[State]) -> torch.Tensor:
        """Frozen, cached MiniLM embeddings (B, D) on the head's device."""
        emb = self.encoder.embed([state_text(self.env, s) + "\n" + self.env.info_text for s in states])  # (B, D)
        return emb.to(next(self.head.parameters()).device)

    def forward(self, states: list[State]) -> torch.Tensor:
        """V(s) in reward units, (B,)."""
        return self.head(self.embed(states)).squeeze(-1) * self.value_scale

    @torch.no_grad()
    def values(self, states: list[State]) -> np.ndarray:
        """V(s) as a NumPy array; goal states (terminal) are 0. This makes a Critic a judge."""
        v = self(list(states)).cpu().numpy().astype(float) if states else np.zeros(0)
        return np.where([self.env.is_goal(s) for s in states], 0.0, v)

    @torch.no_grad()
    def grid(self) -> np.ndarray:
        """V over all 64 states as ``(4, size, size)`` [o, y, x]; goal cells NaN (terminal)."""
        V = np.full((4, self.env.size, self.env.size), np.nan)
        states = self.env.start_states()
        for (x, y, o), v in zip(states, self.values(states)):
            V[o, y, x] = v
        return V


def fit_critic(critic: Critic, samples: list[MCSample], cfg: LactChainConfig, tracker=None,
               prefix: str = "critic") -> list[float]:
    """Fit V to Monte-Carlo targets with smooth-L1 on target / value_scale (full batch, Adam). Returns the losses.

    Fit 0 uses the partial returns; when some samples were cut (tail_discount > 0), each of the next
    ``cfg.bootstrap_fits − 1`` fits uses  partial + tail_discount · V_previous(tail_state)  as target.
    """
    if not samples:
        raise ValueError("fit_critic got no Monte-Carlo samples")
    unique = list(dict.fromkeys([s.state for s in samples] + [s.tail_state for s in samples]))
    row = {s: i for i, s in enumerate(unique)}
    emb = critic.embed(unique)  # (S, D): each distinct state is embedded once
    dev = emb.device
    index = torch.tensor([row[s.state] for s in samples], device=dev)  # (N,)
    tail = torch.tensor([row[s.tail_state] for s in samples], device=dev)  # (N,)
    partial = torch.tensor([s.partial for s in samples], dtype=torch.float32, device=dev) / critic.value_scale
    disc = torch.tensor([s.tail_discount for s in samples], dtype=torch.float32, device=dev)
    terminal = torch.tensor([critic.env.is_goal(s) for s in unique], device=dev)
    fits = cfg.bootstrap_fits if bool((disc > 0).any()) else 1
    opt = torch.optim.Adam(critic.head.parameters(), lr=cfg.critic_lr)
    losses, step = [], 0
    for fit in range(fits):
        with torch.no_grad():
            v_all = (torch.where(terminal, 0.0, critic.head(emb).squeeze(-1)) if fit
                     else torch.zeros(len(unique), device=dev))
            target = partial + disc * v_all[tail]  # (N,) scaled
        for _ in progress(range(cfg.critic_steps), desc=f"fit {prefix} ({fit + 1}/{fits})", leave=False):
            # L = mean_i smooth_L1(V(s_i)/scale, target_i/scale)
            loss = F.smooth_l1_loss(critic.head(emb).squeeze(-1)[index], target, beta=cfg.huber_delta)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if tracker is not None and (step % 10 == 0):
                tracker.log(step, {f"losses/{prefix}": loss.item(), f"stats/{prefix}_fit": fit})
            step += 1
    return losses


def split_states(env: GridWorld, heldout_fraction: float, rng: random.Random) -> tuple[list[State], list[State]]:
    """(train, held-out) partition of the non-terminal states."""
    states = env.start_states()
    rng.shuffle(states)
    n_held = max(1, round(heldout_fraction * len(states)))
    return states[n_held:], states[:n_held]
