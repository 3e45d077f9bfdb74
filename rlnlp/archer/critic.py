"""ArCHer's utterance-level critic: double Q and V heads over frozen MiniLM embeddings, their targets and updates."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import TextEncoder
from ..runtime import device as default_device
from .acting import ReplayBuffer, Transition
from .config import ArcherConfig


def mlp(d_in: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))


class DoubleCritic(nn.Module):
    """Q1, Q2 over [h_s; h_a] and V1, V2 over h_s; embeddings come from a frozen encoder (see ``Critic``)."""

    def __init__(self, dim: int = 384, hidden: int = 512):
        super().__init__()
        self.q1, self.q2 = mlp(2 * dim, hidden), mlp(2 * dim, hidden)
        self.v1, self.v2 = mlp(dim, hidden), mlp(dim, hidden)

    def q(self, h_s: torch.Tensor, h_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h_s, h_a: (B, D) -> Q1, Q2: (B,)"""
        x = torch.cat([h_s, h_a], dim=-1)  # (B, 2D)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)

    def v(self, h_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h_s: (B, D) -> V1, V2: (B,)"""
        return self.v1(h_s).squeeze(-1), self.v2(h_s).squeeze(-1)


def q_targets(rewards: torch.Tensor, dones: torch.Tensor, next_v1: torch.Tensor, next_v2: torch.Tensor,
              gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """y_i = r + γ(1 − d)·V̄_i(s′) for i = 1, 2; all (B,)."""
    not_done = 1.0 - dones.float()
    return rewards + gamma * not_done * next_v1, rewards + gamma * not_done * next_v2


def v_target(target_q1: torch.Tensor, target_q2: torch.Tensor) -> torch.Tensor:
    """y_V = min_j Q̄_j(s, a′), a′ fresh from π; (B,)."""
    return torch.minimum(target_q1, target_q2)


@torch.no_grad()
def polyak_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """θ̄ ← (1 − τ)·θ̄ + τ·θ."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.mul_(1.0 - tau).add_(o, alpha=tau)


@torch.no_grad()
def hard_update(target: nn.Module, online: nn.Module) -> None:
    """θ̄ ← θ."""
    target.load_state_dict(online.state_dict())


class Critic:
    """The frozen MiniLM encoder + online and target ``DoubleCritic`` + its optimiser and target schedule."""

    def __init__(self, cfg: ArcherConfig, encoder: TextEncoder, special_tokens: list[str] = (), device=None,
                 sync=None):
        self.cfg, self.encoder = cfg, encoder
        self.sync = sync  # sync(parameters) between backward and clipping: several processes average gradients there
        self.device = torch.device(device) if device is not None else default_device()
        self.net = DoubleCritic(encoder.dim, cfg.critic_hidden).to(self.device)
        self.target = copy.deepcopy(self.net).requires_grad_(False)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=cfg.critic_lr)
        self.special = [t for t in special_tokens if t]
        self.steps = 0
        self._embedded: set[str] = set()

    def state_text(self, observation: str) -> str:
        """What the encoder reads of a state: the text without chat-template markup (it costs MiniLM tokens)."""
        for tok in self.special:
            observation = observation.replace(tok, " ")
        return " ".join(observation.split())

    def embed(self, texts: list[str], states: bool) -> torch.Tensor:
        texts = [self.state_text(t) if states else (self.state_text(t) or "(nothing)") for t in texts]
        # each new text through the encoder on its own: a batched embedding changes in the last bits with its
        # batch's padding, Adam turns such noise in near-zero gradients into full-size steps, and a resumed run
        # (an empty cache) would then drift from the run it continues
        for t in dict.fromkeys(texts):
            if t not in self._embedded:
                self.encoder.embed([t])
                self._embedded.add(t)
        return self.encoder.embed(texts).to(self.device)  # (B, D)

    def embed_actions(self, observations: list[str], actions: list[str]) -> torch.Tensor:
        """What Q reads of the utterance: its own embedding, or (``critic_input == "joint"``) one embedding of the
        state's text followed by the utterance."""
        if self.cfg.critic_input == "joint":
            return self.embed([f"{o} → {a}" for o, a in zip(observations, actions)], True)
        return self.embed(actions, False)

    @torch.no_grad()
    def values(self, observations: list[str], actions: list[str], target: bool = False) -> dict[str, torch.Tensor]:
        """min_j Q_j(s, a) and min_j V_j(s) (online or target), each (B,) on the CPU."""
        net = self.target if target else self.net
        h_s, h_a = self.embed(observations, True), self.embed_actions(observations, actions)
        q1, q2 = net.q(h_s, h_a)
        v1, v2 = net.v(h_s)
        return {"q": torch.minimum(q1, q2).cpu(), "v": torch.minimum(v1, v2).cpu(),
                "q1": q1.cpu(), "q2": q2.cpu(), "v1": v1.cpu(), "v2": v2.cpu()}

    def loss(self, batch: list[Transition], fresh_obs: list[str],
             fresh_actions: list[str]) -> tuple[torch.Tensor, dict]:
        """L_Q on replay transitions + L_V on (s, a′) pairs with a′ fresh from the current policy."""
        h_s = self.embed([t.observation for t in batch], True)  # (B, D)
        h_a = self.embed_actions([t.observation for t in batch], [t.action for t in batch])  # (B, D)
        h_s2 = self.embed([t.next_observation for t in batch], True)  # (B, D)
        r = torch.tensor([t.reward for t in batch], device=self.device)
        d = torch.tensor([float(t.done) for t in batch], device=self.device)
        with torch.no_grad():
            y1, y2 = q_targets(r, d, *self.target.v(h_s2), self.cfg.gamma)
            h_f = self.embed(fresh_obs, True)  # (F, D)
            y_v = v_target(*self.target.q(h_f, self.embed_actions(fresh_obs, fresh_actions)))
        q1, q2 = self.net.q(h_s, h_a)
        # L_Q = Σ_i MSE(Q_i(s, a), r + γ(1 − d)·V̄_i(s′))
        loss_q = F.mse_loss(q1, y1) + F.mse_loss(q2, y2)
        v1, v2 = self.net.v(h_f)
        # L_V = Σ_i MSE(V_i(s), min_j Q̄_j(s, a′))
        loss_v = F.mse_loss(v1, y_v) + F.mse_loss(v2, y_v)
        loss = loss_q + loss_v
        return loss, {"losses/critic": loss.item(), "losses/q": loss_q.item(), "losses/v": loss_v.item(),
                      "stats/q_mean": q1.mean().item(), "stats/v_mean": v1.mean().item(),
                      "stats/q_target_mean": y1.mean().item()}

    def update(self, batch: list[Transition], fresh_obs: list[str], fresh_actions: list[str]) -> dict:
        """One gradient step (gradients through ``sync`` first, if given), then the target update the config asks
        for."""
        loss, stats = self.loss(batch, fresh_obs, fresh_actions)
        self.opt.zero_grad()
        loss.backward()
        if self.sync is not None:
            self.sync(self.net.parameters())
        nn.utils.clip_grad_norm_(self.net.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.steps += 1
        if self.cfg.target_update == "polyak":
            polyak_update(self.target, self.net, self.cfg.tau)
        elif self.cfg.target_update == "hard":
            if self.steps % self.cfg.hard_update_every == 0:
                hard_update(self.target, self.net)
        else:
            raise ValueError(f"target_update must be 'polyak' or 'hard', got {self.cfg.target_update!r}")
        return stats

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "target": self.target.state_dict(), "opt": self.opt.state_dict(),
                "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.net.load_state_dict(state["net"])
        self.target.load_state_dict(state["target"])
        self.opt.load_state_dict(state["opt"])
        self.steps = state["steps"]


def critic_phase(critic: Critic, buffer: ReplayBuffer, fresh_obs: list[str], fresh_actions: list[str],
                 cfg: ArcherConfig, ranks=None) -> dict:
    """ArCHer's critic step of one iteration: critic_steps updates, each on a fresh replay batch (L_Q)
    and on this iteration's (s, a′) pairs (L_V). ``losses/critic_first``: the loss before the first step.

    Several processes (``ranks``): the buffer and its sampler are the same on every process, so each draws the same
    replay batch and trains on its block of it, with its own block of the (s, a′) pairs, and the gradients are
    averaged (the critic's ``sync``): one process's step on the whole batch. The losses reported are this process's."""
    first, stats = None, {}
    share = ranks.share if ranks is not None else (lambda items: items)
    for _ in range(cfg.critic_steps):
        stats = critic.update(share(buffer.sample(cfg.critic_batch)), fresh_obs, fresh_actions)
        first = stats["losses/critic"] if first is None else first
    stats["losses/critic_first"] = first
    return stats
