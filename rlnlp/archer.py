"""ArCHer (Zhou et al. 2024) as recurve uses it: an utterance-level critic guides a token-level actor.

Each utterance (a line, a question, a turn) is ONE high-level action, so an episode is a handful
of steps instead of hundreds of tokens. An off-policy critic learns Q(s, utterance) and V(s) from
a replay buffer with a target copy; the token-level policy (SmolLM2 + LoRA) is pushed along the
utterance-level advantage of a FRESH utterance a″ ~ π(s), one the critic's V step did not fit.

    critic   h_s = MiniLM(s), h_a = MiniLM(a)   (frozen, cached — only the MLP heads learn)
             Q_i = MLP_i([h_s; h_a]),  V_i = MLP_i(h_s),  i = 1, 2
             L_Q = Σ_i MSE(Q_i(s, a), r + γ(1 − d)·V̄_i(s′))          (s, a, r, s′, d) from the replay buffer
             L_V = Σ_i MSE(V_i(s), min_j Q̄_j(s, a′)),  a′ ~ π(·|s) fresh     V̄, Q̄: the target critic
             target ← (1 − τ)·target + τ·online after every step (ArCHer), or a hard copy every n
    actor    A = min_j Q_j(s, a″) − min_j V_j(s)   online critic, a″ ~ π(·|s) a SECOND fresh sample
             (divided by its batch std with normalize_advantage, the baselines' scale)
             L = −mean(A · Σ_t log π(a″_t | s, a″_<t))   (REINFORCE, ArCHer) or PPO-clip on A (recurve)
             + β·KL(π ‖ π_ref) optional

Baselines, matched to ArCHer on BOTH counts — environment samples and actor gradient steps:
    ppo      token-level PPO-clip with only the episode's return: A = normalise(G) over the round's
             episodes on every token (no critic) — the on-policy baseline of ArCHer's paper
    grpo     the same loss with trajectory-level group credit: group_size episodes from the SAME
             start, A_i = (G_i − mean_group G) / std_group G — what a TRL user reaches for

Environments: a recurve YAML task file (``rlnlp.envs.recurve``) or Twenty Questions
(``rlnlp.envs.twenty_questions``; ``twenty_questions_6`` is the variant within a 135M policy's
reach). Command line (recurve's flags)::

    python -m rlnlp.archer train --dataset data/recurve/capital_choice.yaml [--name NAME] [--algo ppo] [--resume]
    python -m rlnlp.archer eval --exp-path runs/NAME --chkpt-label latest

Task files are code: the loader executes their functions. Run only task files you trust.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import plots
from .envs.base import Episode
from .losses import normalize, ppo_clip_loss, reinforce_loss
from .models import TextEncoder, attach_lora, completion_logprobs, kl_k3, load_policy, masked_mean
from .runtime import device as default_device
from .runtime import seed_everything
from .sampling import Samples, sample
from .stats import binned_rate
from .tracking import Tracker, progress, runs_dir

TWENTY_QUESTIONS_VARIANTS = {
    # name: TwentyQuestions settings. The full game is out of a 135M policy's reach (it rarely asks
    # a question the table answers, and 20 turns of history cost ~600 prompt tokens per turn);
    # twenty_questions_6 names six candidates and pre-fills "Is it", measured at ~35-40% success.
    "twenty_questions": {},
    "twenty_questions_6": {"candidates": ("dog", "cat", "car", "apple", "chair", "ball"), "prefill": "Is it"},
}
TASKS = {
    # a task = a dataset with the caps it is meant to be played at
    "best_lang": {"dataset": "data/recurve/best_lang.yaml", "max_turns": 8, "utterance_tokens": 48},
    "capital_choice": {"dataset": "data/recurve/capital_choice.yaml", "max_turns": 1, "utterance_tokens": 8},
    "twenty_questions": {"dataset": "twenty_questions", "max_turns": 20, "utterance_tokens": 32},
    "twenty_questions_6": {"dataset": "twenty_questions_6", "max_turns": 5, "utterance_tokens": 10},
}
ALGOS = ("archer", "ppo", "grpo")


class RunFolderError(FileNotFoundError):
    """A run folder or checkpoint that is not there; the message names what and where."""


class UsageError(ValueError):
    """A command-line request that cannot be carried out (a missing option, an unknown name)."""


@dataclass
class ArcherConfig:
    """One ArCHer (or baseline) run. Defaults are the full (GPU) profile; ``cpu()`` and ``smoke()`` shrink budgets."""

    dataset: str = "data/recurve/capital_choice.yaml"
    """A recurve YAML task file, or a Twenty Questions variant ("twenty_questions", "twenty_questions_6").
    The seed's best_lang.yaml is kept verbatim but is out of reach: the untrained policy solved it 2 times in 36
    (8 lines of ≤ 48 tokens, temperature 1.0, measured 2026-12-02)."""
    seed: int = 0
    """Seeds Python, NumPy, torch, environment resets and sampling."""
    policy_model: str | None = None
    """Policy LM (hub id or folder); None = embedded SmolLM2-135M-Instruct (ArCHer: GPT-2 / Mistral-7B)."""
    lora_r: int = 16
    """LoRA rank of the actor (ArCHer fine-tunes all weights; LoRA keeps the reference model free)."""
    lora_alpha: int = 32
    """LoRA scaling numerator."""
    lora_dropout: float = 0.0
    """0 (LactChain uses 0.05) so the PPO ratio is exactly 1 before the first update."""
    num_envs: int = 64
    """Environments stepped together; every ArCHer iteration adds num_envs transitions (env samples).
    A baseline round plays num_envs complete episodes."""
    env_steps: int = 2048
    """Budget of environment samples (utterances sent to an environment), the same for ArCHer and baselines."""
    max_turns: int = 1
    """Episode cap in utterances (capital_choice: one reply; 20Q variants set their own, see TASKS)."""
    utterance_tokens: int = 8
    """Token cap of one utterance (recurve: the task's split_fn / done_fn usually end it first)."""
    temperature: float = 1.0
    """Sampling temperature for acting, fresh a′/a″ and evaluation (log-probs are taken at the same T)."""
    gamma: float = 0.95
    """Discount (ArCHer's 0.95)."""
    critic_hidden: int = 512
    """Width of each Q/V MLP (two hidden layers) over 384-d MiniLM embeddings (ArCHer: RoBERTa-base + MLP)."""
    critic_lr: float = 1e-3
    """Adam lr of the critic heads (ArCHer 2e-5 fine-tunes RoBERTa; ours trains only MLPs on frozen features)."""
    critic_batch: int = 128
    """Replay transitions per critic step for L_Q."""
    critic_steps: int = 20
    """Critic gradient steps per iteration (cheap: embeddings are cached)."""
    fresh_batch: int = 32
    """Buffer states per iteration that get a fresh a′ (L_V's targets) and, after warm-up, a second fresh
    a″ (the actor's batch: its advantage is computed on an utterance the V step never saw)."""
    buffer_size: int = 100_000
    """Replay capacity in transitions (oldest dropped first)."""
    target_update: str = "polyak"
    """"polyak" (ArCHer, τ after every critic step) or "hard" (recurve: copy every hard_update_every steps)."""
    tau: float = 0.1
    """Polyak rate (ArCHer's 0.1)."""
    hard_update_every: int = 50
    """Critic steps between hard target copies when target_update == "hard"."""
    warmup_iters: int = 4
    """Critic-only iterations before the actor trains (ArCHer warms the critic up too; 10 before, 4 here:
    on capital_choice the critic's loss flattens after ~3 iterations of 32 transitions)."""
    normalize_advantage: bool = True
    """Divide ArCHer's advantages by their batch std (not centred: V already is the baseline), so the actor's
    step has the scale of the baselines', whose returns are normalised (ArCHer's code: raw A; measured on
    capital_choice: raw A has std ~0.3, a third of the baselines' step at the same lr)."""
    actor_loss: str = "reinforce"
    """"reinforce" (ArCHer) or "ppo" (recurve's variant: PPO-clip on the same utterance advantage)."""
    actor_lr: float = 3e-4
    """Adam lr of the LoRA weights, for ArCHer and the baselines alike (ArCHer 1e-5 on full weights; LoRA
    on a 135M model needs 1e-4..5e-4 to move within a CPU budget, see LEARNING.md; 1e-4 before)."""
    ppo_clip: float = 0.2
    """PPO clip ε (baselines, and ArCHer with actor_loss == "ppo")."""
    ppo_epochs: int = 2
    """ArCHer with actor_loss == "ppo": passes over each fresh batch (REINFORCE makes one)."""
    group_size: int = 4
    """grpo baseline: episodes per start in a group (num_envs // group_size starts per round)."""
    kl_coef: float = 0.0
    """β of the optional k3 KL to the frozen reference (ArCHer: none)."""
    grad_clip: float = 1.0
    """Max grad norm for actor and critic."""
    train_batch: int = 16
    """Rows per forward/backward of the actor (gradients accumulate over chunks)."""
    eval_episodes: int = 64
    """Fixed, seeded evaluation episodes (the same starts and sampling seeds before and after training)."""
    target_return: float | None = None
    """Return that 'samples to reach' is measured at; None = halfway from the untrained return to the best."""
    oracle_threshold: float = 0.7
    """20Q: minimum cosine similarity of the best phrasing (chosen by leave-one-out on the oracle's own
    phrasing bank, not on the paraphrase test set)."""
    oracle_margin: float = 0.02
    """20Q: the best meaning must beat every other meaning's best phrasing by this much, else "I don't know"."""
    critic_max_length: int = 512
    """MiniLM tokens per critic input: long enough for a whole 20Q history (MiniLM has 512 positions)."""
    checkpoint_every: int = 0
    """Save runs/NAME/checkpoints/latest every this many iterations / rounds (0 = only at the end)."""

    @classmethod
    def full(cls, **kw) -> "ArcherConfig":
        """One GPU: 2048 env samples (32 iterations of 64) per method on capital_choice (an estimate, not run:
        ~0.5 s per iteration on an H100, ~15 s per method; with twenty_questions_6 ~70 s of training)."""
        return cls(**kw)

    @classmethod
    def cpu(cls, **kw) -> "ArcherConfig":
        """2-core CPU, ≤ 10 min for the notebook: 512 env samples (16 iterations, 12 actor steps) per method on
        capital_choice (measured at 768: ArCHer 0.19 → 0.96 success, 237 s of training at 1 thread)."""
        base = dict(num_envs=32, env_steps=512, critic_hidden=256, critic_batch=64, critic_steps=20, fresh_batch=32,
                    warmup_iters=4, eval_episodes=256, train_batch=16)
        return cls(**{**base, **kw})

    @classmethod
    def smoke(cls, **kw) -> "ArcherConfig":
        base = dict(num_envs=8, env_steps=24, critic_hidden=64, critic_batch=32, critic_steps=10, fresh_batch=4,
                    warmup_iters=1, eval_episodes=16, train_batch=8, hard_update_every=10)
        return cls(**{**base, **kw})


def with_task(cfg: ArcherConfig, task: str, **kw) -> ArcherConfig:
    """``cfg`` with a task's dataset and caps (TASKS), then ``kw``."""
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    return replace(cfg, **{**TASKS[task], **kw})


def archer_actor_steps(cfg: ArcherConfig) -> int:
    """Actor gradient steps an ArCHer run with ``cfg`` makes: one per post-warm-up iteration (ppo: ppo_epochs)."""
    iterations = max(1, cfg.env_steps // cfg.num_envs)
    return max(0, iterations - cfg.warmup_iters) * (cfg.ppo_epochs if cfg.actor_loss == "ppo" else 1)


# ---- environments ------------------------------------------------------------------------------

def resolve_dataset(path: str) -> Path:
    """A task file path as given, else relative to the repository root (notebooks run from notebooks/)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    from .data import data_dir

    return data_dir().parent / p


def check_dataset(cfg: ArcherConfig):
    """Load and validate ``cfg.dataset`` before anything expensive (a Task, or None for Twenty Questions)."""
    if cfg.dataset in TWENTY_QUESTIONS_VARIANTS:
        return None
    from .envs.recurve import TaskFileError, load_task

    path = resolve_dataset(cfg.dataset)
    if not path.exists():
        raise TaskFileError(f"{cfg.dataset}: no such task file (or use a Twenty Questions variant: "
                            f"{', '.join(TWENTY_QUESTIONS_VARIANTS)})")
    return load_task(path)


def make_env(cfg: ArcherConfig, tokenizer=None, encoder: TextEncoder | None = None):
    """A fresh environment for ``cfg.dataset`` (a task file, or a Twenty Questions variant)."""
    if cfg.dataset in TWENTY_QUESTIONS_VARIANTS:
        from .envs.twenty_questions import TwentyQuestions

        v = TWENTY_QUESTIONS_VARIANTS[cfg.dataset]
        return TwentyQuestions(max_turns=cfg.max_turns, encoder=encoder, threshold=cfg.oracle_threshold,
                               margin=cfg.oracle_margin, candidates=list(v.get("candidates") or []) or None,
                               prefill=v.get("prefill", ""), tokenizer=tokenizer)
    from .envs.recurve import RecurveEnv

    return RecurveEnv(check_dataset(cfg), tokenizer=tokenizer, max_utterances=cfg.max_turns)


def env_factory(cfg: ArcherConfig, tokenizer, encoder: TextEncoder):
    """make() for N copies that share the (expensive) parts: task, tokenizer, oracle embeddings."""
    proto = make_env(cfg, tokenizer, encoder)
    if cfg.dataset in TWENTY_QUESTIONS_VARIANTS:
        return proto.clone
    return lambda: copy.copy(proto)  # a RecurveEnv's episode state lives in attributes that reset() rebinds


# ---- acting: one utterance per row --------------------------------------------------------------

@dataclass
class Utterances:
    """Utterances for a batch of observations; ``samples`` holds the tokens and log-probs the actor trains on."""

    observations: list[str]
    texts: list[str]
    samples: Samples


def act(model, tokenizer, env, observations: list[str], cfg: ArcherConfig, n: int = 1, seed: int | None = None,
        temperature: float | None = None) -> Utterances:
    """Sample ``n`` utterances per observation with the rules of ``env``.

    The sampler stops a row at ``env.split(utterance)``, EOS or the token cap. recurve also ends an
    utterance where ``done_fn(observation + utterance)`` first holds; that needs each row's own
    observation, which the sampler's stop function does not see, so the row is cut here at that
    token (exact: tokens before the cut were sampled exactly as they would have been). In raw-text
    environments (``env.chat`` False) an utterance ended by EOS carries the end-of-turn marker.
    """
    chat = getattr(env, "chat", True)
    split = getattr(env, "split", lambda u: "\n" in u)
    ends = getattr(env, "ends_episode", None)
    # identical observations go to the sampler side by side (then back in order): they share one prefill,
    # and the working-tree sampler (2026-12-02) mismatched rows of a prompt repeated non-contiguously
    first = {}
    order = sorted(range(len(observations)), key=lambda i: (first.setdefault(observations[i], i), i))
    s = sample(model, tokenizer, [observations[i] for i in order], n=n, max_new_tokens=cfg.utterance_tokens,
               temperature=cfg.temperature if temperature is None else temperature, stop=split, chat=chat,
               batch_size=128, seed=seed)
    if order != sorted(order):
        back = [0] * len(order)
        for pos, i in enumerate(order):
            back[i] = pos
        s = s.select([back[i] * n + j for i in range(len(observations)) for j in range(n)])
    rows = [o for o in observations for _ in range(n)]
    eos = {tokenizer.eos_token_id}
    texts = []
    for i, obs in enumerate(rows):
        length = int(s.completion_mask[i].sum())
        ids = s.completion_ids[i, :length].tolist()
        if ends is not None:
            cut = next((t for t in range(1, length + 1)
                        if ends(obs, tokenizer.decode(ids[:t], skip_special_tokens=True))), length)
            if cut < length:
                s.completion_mask[i, cut:] = 0
                s.logprobs[i, cut:] = 0.0
                s.completion_ids[i, cut:] = tokenizer.pad_token_id
                s.stopped[i] = True
                length, ids = cut, ids[:cut]
        text = tokenizer.decode(ids, skip_special_tokens=True)
        if not chat and ids and ids[-1] in eos:
            text += tokenizer.eos_token
        texts.append(text)
    s.texts = texts
    return Utterances(observations=rows, texts=texts, samples=s)


def _rows(u: Utterances, sl) -> Utterances:
    """Some utterance rows (a slice or a list of indices) with their tokens."""
    idx = list(range(len(u.texts)))[sl] if isinstance(sl, slice) else list(sl)
    return Utterances([u.observations[i] for i in idx], [u.texts[i] for i in idx], u.samples.select(idx))


def _concat(parts: list[Utterances], pad_id: int = 0) -> Utterances:
    """Stack utterance rows from different sampling calls."""
    samples = Samples.concat([p.samples for p in parts], pad_id)
    return Utterances([o for p in parts for o in p.observations], [t for p in parts for t in p.texts], samples)


# ---- replay buffer and critic ---------------------------------------------------------------------

@dataclass
class Transition:
    observation: str
    action: str
    reward: float
    next_observation: str
    done: bool


class ReplayBuffer:
    """A FIFO list of transitions with uniform sampling."""

    def __init__(self, capacity: int, seed: int = 0):
        self.capacity, self.items, self.rng = capacity, [], random.Random(seed)

    def __len__(self) -> int:
        return len(self.items)

    def add(self, transitions: list[Transition]) -> None:
        self.items.extend(transitions)
        del self.items[: max(0, len(self.items) - self.capacity)]

    def sample(self, k: int) -> list[Transition]:
        return [self.items[self.rng.randrange(len(self.items))] for _ in range(k)]

    def state_dict(self) -> dict:
        return {"items": [asdict(t) for t in self.items], "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.items = [Transition(**t) for t in state["items"]]
        self.rng.setstate(state["rng"])


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

    def __init__(self, cfg: ArcherConfig, encoder: TextEncoder, special_tokens: list[str] = (), device=None):
        self.cfg, self.encoder = cfg, encoder
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

    @torch.no_grad()
    def values(self, observations: list[str], actions: list[str], target: bool = False) -> dict[str, torch.Tensor]:
        """min_j Q_j(s, a) and min_j V_j(s) (online or target), each (B,) on the CPU."""
        net = self.target if target else self.net
        h_s, h_a = self.embed(observations, True), self.embed(actions, False)
        q1, q2 = net.q(h_s, h_a)
        v1, v2 = net.v(h_s)
        return {"q": torch.minimum(q1, q2).cpu(), "v": torch.minimum(v1, v2).cpu(),
                "q1": q1.cpu(), "q2": q2.cpu(), "v1": v1.cpu(), "v2": v2.cpu()}

    def loss(self, batch: list[Transition], fresh_obs: list[str], fresh_actions: list[str]) -> tuple[torch.Tensor, dict]:
        """L_Q on replay transitions + L_V on (s, a′) pairs with a′ fresh from the current policy."""
        h_s = self.embed([t.observation for t in batch], True)  # (B, D)
        h_a = self.embed([t.action for t in batch], False)  # (B, D)
        h_s2 = self.embed([t.next_observation for t in batch], True)  # (B, D)
        r = torch.tensor([t.reward for t in batch], device=self.device)
        d = torch.tensor([float(t.done) for t in batch], device=self.device)
        with torch.no_grad():
            y1, y2 = q_targets(r, d, *self.target.v(h_s2), self.cfg.gamma)
            h_f = self.embed(fresh_obs, True)  # (F, D)
            y_v = v_target(*self.target.q(h_f, self.embed(fresh_actions, False)))
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
        """One gradient step, then the target update the config asks for."""
        loss, stats = self.loss(batch, fresh_obs, fresh_actions)
        self.opt.zero_grad()
        loss.backward()
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
                 cfg: ArcherConfig) -> dict:
    """ArCHer's critic step of one iteration: critic_steps updates, each on a fresh replay batch (L_Q)
    and on this iteration's (s, a′) pairs (L_V). ``losses/critic_first``: the loss before the first step."""
    first, stats = None, {}
    for _ in range(cfg.critic_steps):
        stats = critic.update(buffer.sample(cfg.critic_batch), fresh_obs, fresh_actions)
        first = stats["losses/critic"] if first is None else first
    stats["losses/critic_first"] = first
    return stats


# ---- actor losses ----------------------------------------------------------------------------------

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


def policy_step(model, opt, u: Utterances, advantages: torch.Tensor, cfg: ArcherConfig, loss_kind: str,
                rows: list[int] | None = None) -> dict:
    """ONE optimiser step on ``rows`` of ``u`` (all by default), in chunks of train_batch with gradient accumulation.

    reinforce:  L = −mean_b(A_b · Σ_t log π(a_bt))
    ppo:        L = −mean_bt(min(ρ_bt·A_b, clip(ρ_bt, 1 ± ε)·A_b)),  ρ = π / π_old (π_old: the sampling log-probs)
    both:       + β · mean_bt(k3(π ‖ π_ref))  when kl_coef > 0
    """
    rows = list(range(len(u.texts))) if rows is None else rows
    s = u.samples.select(rows)
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
    sums["stats/grad_norm"] = float(nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                             cfg.grad_clip))
    opt.step()
    return sums


def actor_step(model, opt, u: Utterances, advantages: torch.Tensor, cfg: ArcherConfig) -> dict:
    """ArCHer's actor update on fresh utterances with one advantage per utterance (B,): one REINFORCE step,
    or ppo_epochs PPO-clip steps over the whole batch (actor_loss == "ppo")."""
    steps = cfg.ppo_epochs if cfg.actor_loss == "ppo" else 1
    stats = {}
    for _ in range(steps):
        stats = policy_step(model, opt, u, advantages, cfg, cfg.actor_loss)
    return stats


# ---- runs, checkpoints ------------------------------------------------------------------------------------

@dataclass
class Run:
    """What a training run leaves behind (the notebook reads these)."""

    name: str
    algo: str
    cfg: ArcherConfig
    tracker: Tracker
    model: object
    tokenizer: object
    env: object
    critic: Critic | None = None
    episodes: list[Episode] = field(default_factory=list)
    env_steps: int = 0
    grad_steps: int = 0
    policy_samples: int = 0  # utterances sampled in all (ArCHer also samples fresh a′, a″ that no env sees)
    wall_s: float = 0.0

    @property
    def df(self):
        return self.tracker.df


class Collector:
    """N environments stepped together with auto-reset; keeps each running episode and every finished one."""

    def __init__(self, make, n: int, seed: int):
        self.envs = [make() for _ in range(n)]
        self.next_seed = seed
        self.obs = [self._reset(e) for e in self.envs]
        self.running = [Episode(observations=[o]) for o in self.obs]
        self.finished: list[Episode] = []
        self.env_steps = 0

    def _reset(self, env) -> str:
        self.next_seed += 1
        return env.reset(self.next_seed - 1)

    def step(self, actions: list[str]) -> list[Transition]:
        out = []
        for i, (env, a) in enumerate(zip(self.envs, actions)):
            obs2, r, done, info = env.step(a)
            ep = self.running[i]
            ep.actions.append(a)
            ep.rewards.append(float(r))
            ep.infos.append(info)
            ep.observations.append(obs2)
            out.append(Transition(self.obs[i], a, float(r), obs2, bool(done)))
            if done:
                ep.done = True
                self.finished.append(ep)
                obs2 = self._reset(env)
                self.running[i] = Episode(observations=[obs2])
            self.obs[i] = obs2
        self.env_steps += len(actions)
        return out

    def state_dict(self) -> dict:
        return {"envs": [e.state() for e in self.envs], "next_seed": self.next_seed, "obs": list(self.obs),
                "running": self.running, "finished": self.finished, "env_steps": self.env_steps}

    def load_state_dict(self, state: dict) -> None:
        for env, s in zip(self.envs, state["envs"]):
            env.load_state(s)
        self.next_seed, self.obs, self.env_steps = state["next_seed"], state["obs"], state["env_steps"]
        self.running, self.finished = state["running"], state["finished"]


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def save_checkpoint(run: Run, label: str, opt, progress_state: dict, complete: bool = False) -> Path:
    """runs/NAME/checkpoints/LABEL/{actor/ (LoRA adapter), state.pt} and runs/NAME/run.json.

    state.pt holds what ``--resume`` needs to continue exactly: the actor's optimiser, the critic
    (online, target, optimiser), the replay buffer, the environments mid-episode, the loop's
    counters and every RNG. Written to a temporary folder and renamed, so a kill mid-save leaves
    the previous checkpoint intact.
    """
    root = run.tracker.dir / "checkpoints"
    out, tmp = root / label, root / f".{label}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    run.model.save_pretrained(tmp / "actor")
    state = {"opt": opt.state_dict(), "rng": _rng_state(), "progress": progress_state,
             "critic": run.critic.state_dict() if run.critic is not None else None,
             "tracker_rows": run.tracker.rows, "env_steps": run.env_steps, "grad_steps": run.grad_steps,
             "policy_samples": run.policy_samples, "episodes": run.episodes, "wall_s": run.wall_s}
    torch.save(state, tmp / "state.pt")
    old = root / f".{label}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    (run.tracker.dir / "run.json").write_text(json.dumps(
        {"algo": run.algo, "env_steps": run.env_steps, "grad_steps": run.grad_steps, "complete": complete,
         "config": asdict(run.cfg)}, indent=2))
    return out


def _checkpoint_dir(exp_path: Path, label: str) -> Path:
    read_run(exp_path)
    ckpt = exp_path / "checkpoints" / label
    if not (ckpt / "actor").exists():
        have = sorted(p.name for p in (exp_path / "checkpoints").glob("[!.]*")) if (exp_path / "checkpoints").exists() else []
        raise RunFolderError(f"{exp_path}: no checkpoint {label!r} (checkpoints here: {', '.join(have) or 'none'})")
    return ckpt


def read_run(exp_path: str | Path) -> tuple[str, ArcherConfig, dict]:
    """(algo, config, run.json) of a run folder."""
    exp_path = Path(exp_path)
    if not exp_path.is_dir():
        raise RunFolderError(f"{exp_path}: no such run folder")
    if not (exp_path / "run.json").exists():
        raise RunFolderError(f"{exp_path}: not a run folder (no run.json; train writes one)")
    meta = json.loads((exp_path / "run.json").read_text())
    known = {f.name for f in fields(ArcherConfig)}
    return meta["algo"], ArcherConfig(**{k: v for k, v in meta["config"].items() if k in known}), meta


def load_checkpoint(exp_path: str | Path, label: str = "latest"):
    """(model with the trained adapter, tokenizer, cfg) from a run folder."""
    from peft import PeftModel

    exp_path = Path(exp_path)
    ckpt = _checkpoint_dir(exp_path, label)
    _, cfg, _ = read_run(exp_path)
    model, tokenizer = load_policy(cfg.policy_model)
    model = PeftModel.from_pretrained(model, ckpt / "actor", is_trainable=True)
    return model, tokenizer, cfg


def _restore(run: Run, opt, exp_dir: Path) -> dict:
    """Load the latest checkpoint of ``exp_dir`` into a freshly set-up run; return the loop's progress state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    ckpt = _checkpoint_dir(exp_dir, "latest")
    weights = ckpt / "actor" / "adapter_model.safetensors"
    set_peft_model_state_dict(run.model, load_file(str(weights)))
    state = torch.load(ckpt / "state.pt", weights_only=False)
    opt.load_state_dict(state["opt"])
    if run.critic is not None:
        run.critic.load_state_dict(state["critic"])
    run.tracker.rows = state["tracker_rows"]
    run.env_steps, run.grad_steps = state["env_steps"], state["grad_steps"]
    run.policy_samples, run.episodes, run.wall_s = state["policy_samples"], state["episodes"], state["wall_s"]
    _set_rng_state(state["rng"])
    return state["progress"]


def setup(cfg: ArcherConfig, encoder: TextEncoder | None = None):
    """Policy with a fresh LoRA adapter, its optimiser, the encoder and an environment factory."""
    check_dataset(cfg)  # a broken task file fails here, before the models load
    seed_everything(cfg.seed)
    model, tokenizer = load_policy(cfg.policy_model)
    model = attach_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.actor_lr)
    encoder = encoder or TextEncoder(max_length=cfg.critic_max_length)
    return model, tokenizer, opt, encoder, env_factory(cfg, tokenizer, encoder)


def _log_episodes(tracker: Tracker, episodes: list[Episode], ends: list[int], grad_steps: int) -> None:
    for ep, end in zip(episodes, ends):
        tracker.log(end, {"charts/env_steps": end, "charts/grad_steps": grad_steps,
                          "charts/episode_return": ep.total_reward,
                          "charts/success": float(bool(ep.infos[-1].get("success"))),
                          "charts/episode_length": len(ep)})


# ---- ArCHer ----------------------------------------------------------------------------------------------

def train_archer(cfg: ArcherConfig, name: str = "archer", encoder: TextEncoder | None = None,
                 resume: bool = False) -> Run:
    """ArCHer. Each iteration:

    1. one utterance per environment (num_envs env samples), and for fresh_batch buffer states a fresh
       a′ (for L_V) and — after warm-up — a second fresh a″ (for the actor), all in ONE sampling call;
    2. critic_phase: critic_steps updates of L_Q (replay) + L_V (the a′);
    3. after warm-up, one actor step on the a″ with A = min Q − min V from the ONLINE critic (after its
       update): the advantage is computed on utterances the V step did not fit.
    """
    start = time.time()
    model, tokenizer, opt, encoder, make = setup(cfg, encoder)
    critic = Critic(cfg, encoder, special_tokens=list(tokenizer.all_special_tokens))
    buffer = ReplayBuffer(cfg.buffer_size, seed=cfg.seed)
    run = Run(name, "archer", cfg, Tracker(name, config=cfg), model, tokenizer, make(), critic)
    col = Collector(make, cfg.num_envs, seed=cfg.seed * 100_000)
    iterations = max(1, cfg.env_steps // cfg.num_envs)
    first_it = 0
    if resume:
        p = _restore(run, opt, run.tracker.dir)
        buffer.load_state_dict(p["buffer"])
        col.load_state_dict(p["collector"])
        first_it = p["iteration"] + 1
    for it in progress(range(first_it, iterations), desc=f"ArCHer {name}", initial=first_it, total=iterations):
        t0 = time.time()
        trains = it >= cfg.warmup_iters
        # 1. act + fresh a′ (+ a″) in one batched call; buffer states are known before acting
        fresh_obs = [t.observation for t in buffer.sample(cfg.fresh_batch)] if len(buffer) else list(col.obs)
        F_ = len(fresh_obs)
        n = len(col.obs)
        u = act(model, tokenizer, run.env, col.obs + fresh_obs + (fresh_obs if trains else []), cfg,
                seed=cfg.seed * 7919 + it)
        run.policy_samples += len(u.texts)
        v_actions = u.texts[n:n + F_]  # a′: L_V's targets
        before = len(col.finished)
        buffer.add(col.step(u.texts[:n]))
        done_now = col.finished[before:]
        run.episodes.extend(done_now)
        run.env_steps = col.env_steps
        _log_episodes(run.tracker, done_now, [col.env_steps] * len(done_now), run.grad_steps)
        # 2. critic
        stats = critic_phase(critic, buffer, fresh_obs, v_actions, cfg)
        # 3. actor on a″: A = min_j Q_j(s, a″) − min_j V_j(s), online critic, no gradient into it
        if trains:
            fresh = _rows(u, slice(n + F_, n + 2 * F_))
            vals = critic.values(fresh.observations, fresh.texts)
            advantage = vals["q"] - vals["v"]  # (F,)
            stats["stats/advantage_std"] = advantage.std().item() if len(advantage) > 1 else 0.0
            stats["stats/advantage_mean"] = advantage.mean().item()
            if cfg.normalize_advantage and len(advantage) > 1:
                advantage = advantage / (advantage.std() + 1e-8)
            stats |= actor_step(model, opt, fresh, advantage, cfg)
            run.grad_steps += cfg.ppo_epochs if cfg.actor_loss == "ppo" else 1
        run.wall_s += time.time() - t0
        run.tracker.log(col.env_steps, {"charts/env_steps": col.env_steps, "charts/iteration": it,
                                        "charts/grad_steps": run.grad_steps, "charts/actor_trains": float(trains),
                                        "time/iteration_s": time.time() - t0, **stats})
        last = it == iterations - 1
        if last or (cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0):
            save_checkpoint(run, "latest", opt, {"iteration": it, "buffer": buffer.state_dict(),
                                                 "collector": col.state_dict()}, complete=last)
    run.wall_s = run.wall_s or time.time() - start
    return run


# ---- baselines: token-level PPO and trajectory-level GRPO ------------------------------------------------

def play(model, tokenizer, cfg: ArcherConfig, make, starts: list[int], seed: int, temperature: float | None = None,
         keep_rows: bool = False) -> tuple[list[Episode], list[int], list[list[Utterances]]]:
    """Play one episode from each start (``env.reset(start)``) in lockstep, batched per turn.

    Returns the episodes, each episode's end in environment samples counted from this call's
    first step (the lockstep order: every live episode steps once per turn), and with
    ``keep_rows`` each episode's utterance rows (tokens and sampling log-probs, for training).
    """
    envs = [make() for _ in starts]
    eps = [Episode(observations=[e.reset(s)]) for e, s in zip(envs, starts)]
    rows: list[list[Utterances]] = [[] for _ in starts]
    ends, used = [0] * len(starts), 0
    for turn in range(cfg.max_turns):
        live = [i for i, ep in enumerate(eps) if not ep.done]
        if not live:
            break
        u = act(model, tokenizer, envs[0], [eps[i].observations[-1] for i in live], cfg, seed=seed + 31 * turn,
                temperature=temperature)
        for k, (i, a) in enumerate(zip(live, u.texts)):
            obs, r, done, info = envs[i].step(a)
            used += 1
            ep = eps[i]
            ep.actions.append(a)
            ep.rewards.append(float(r))
            ep.infos.append(info)
            ep.observations.append(obs)
            ep.done = done
            ends[i] = used
            if keep_rows:
                rows[i].append(_rows(u, [k]))
    return eps, ends, rows


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


def train_baseline(cfg: ArcherConfig, name: str = "baseline", encoder: TextEncoder | None = None, kind: str = "ppo",
                   grad_steps: int | None = None, resume: bool = False) -> Run:
    """A baseline with ArCHer's budget on both counts: ``cfg.env_steps`` environment samples and
    ``grad_steps`` actor gradient steps (default: as many as ArCHer makes with ``cfg``).

    Each round plays num_envs complete episodes (grpo: num_envs // group_size starts × group_size
    episodes each), turns returns into per-episode advantages (``episode_advantages``) on every
    token of every utterance, and takes the gradient steps due so far — round(grad_steps × samples
    used / budget) in all — as PPO-clip minibatch steps over the round's utterances (several
    passes when more steps are due than there are rows).
    """
    if kind not in ("ppo", "grpo"):
        raise ValueError(f"baseline kind must be 'ppo' or 'grpo', got {kind!r}")
    start = time.time()
    grad_steps = archer_actor_steps(cfg) if grad_steps is None else grad_steps
    model, tokenizer, opt, encoder, make = setup(cfg, encoder)
    run = Run(name, kind, cfg, Tracker(name, config=cfg), model, tokenizer, make())
    G = cfg.group_size if kind == "grpo" else 1
    if cfg.num_envs % G:
        raise ValueError(f"num_envs ({cfg.num_envs}) must be a multiple of group_size ({G}) for grpo")
    rng = random.Random(cfg.seed)
    rnd, next_start = 0, cfg.seed * 100_000
    if resume:
        p = _restore(run, opt, run.tracker.dir)
        rnd, next_start = p["round"] + 1, p["next_start"]
        rng.setstate(p["rng"])
    bar = progress(total=cfg.env_steps, desc=f"{kind} {name}", initial=min(run.env_steps, cfg.env_steps))
    while run.env_steps < cfg.env_steps:
        t0 = time.time()
        distinct = list(range(next_start, next_start + cfg.num_envs // G))
        next_start += len(distinct)
        starts = [s for s in distinct for _ in range(G)]
        eps, ends, rows = play(model, tokenizer, cfg, make, starts, seed=cfg.seed * 7919 + rnd, keep_rows=True)
        used = max(ends)
        run.policy_samples += used
        returns = torch.tensor([ep.total_reward for ep in eps])
        adv = episode_advantages(returns, kind, G)
        flat = _concat([r for rs in rows for r in rs], pad_id=tokenizer.pad_token_id)
        per_row = torch.cat([adv[k].repeat(len(rs)) for k, rs in enumerate(rows)])
        base = run.env_steps
        run.env_steps += used
        run.episodes.extend(eps)
        _log_episodes(run.tracker, eps, [base + e for e in ends], run.grad_steps)
        due = round(grad_steps * min(1.0, run.env_steps / cfg.env_steps)) - run.grad_steps
        stats: dict = {"stats/advantage_std": adv.std().item() if len(adv) > 1 else 0.0,
                       "stats/share_of_informative_groups": float((returns.view(-1, G).std(1) > 0).float().mean())
                       if G > 1 else float(returns.std() > 0)}
        R = len(flat.texts)
        if due > 0 and R:
            m = min(due, R)  # minibatches per pass
            for k in range(due):
                if k % m == 0:
                    perm = list(range(R))
                    rng.shuffle(perm)
                    chunks = [perm[j::m] for j in range(m)]
                st = policy_step(model, opt, flat, per_row, cfg, "ppo", rows=chunks[k % m])
            run.grad_steps += due
            stats |= st
        run.wall_s += time.time() - t0
        run.tracker.log(run.env_steps, {"charts/env_steps": run.env_steps, "charts/iteration": rnd,
                                        "charts/grad_steps": run.grad_steps, "time/iteration_s": time.time() - t0,
                                        **stats})
        bar.update(min(used, cfg.env_steps - base))
        last = run.env_steps >= cfg.env_steps
        if last or (cfg.checkpoint_every and (rnd + 1) % cfg.checkpoint_every == 0):
            save_checkpoint(run, "latest", opt, {"round": rnd, "next_start": next_start, "rng": rng.getstate()},
                            complete=last)
        rnd += 1
    bar.close()
    run.wall_s = run.wall_s or time.time() - start
    return run


def train(cfg: ArcherConfig, algo: str, name: str, encoder: TextEncoder | None = None, resume: bool = False,
          grad_steps: int | None = None) -> Run:
    """ArCHer or a baseline by name ("archer", "ppo", "grpo")."""
    if algo == "archer":
        return train_archer(cfg, name, encoder=encoder, resume=resume)
    if algo in ("ppo", "grpo"):
        return train_baseline(cfg, name, encoder=encoder, kind=algo, grad_steps=grad_steps, resume=resume)
    raise UsageError(f"unknown algorithm {algo!r}: use one of {', '.join(ALGOS)}")


# ---- evaluation and analysis ---------------------------------------------------------------------------

def evaluate(model, tokenizer, cfg: ArcherConfig, episodes: int | None = None, seed: int = 10_000,
             encoder: TextEncoder | None = None, make=None, temperature: float | None = None) -> dict:
    """Play the fixed evaluation episodes: start i is ``reset(seed + i)`` and turn t samples with seed
    ``seed + 31 t`` — the SAME episodes for every policy, so scores pair up episode by episode.

    Returns per-episode arrays ``success`` (0/1) and ``returns``, their means, the starts and the trajectories.
    """
    episodes = episodes or cfg.eval_episodes
    make = make or env_factory(cfg, tokenizer, encoder or TextEncoder(max_length=cfg.critic_max_length))
    starts = [seed + i for i in range(episodes)]
    eps, _, _ = play(model, tokenizer, cfg, make, starts, seed=seed, temperature=temperature)
    returns = np.array([ep.total_reward for ep in eps])
    success = np.array([float(bool(ep.infos[-1].get("success"))) if ep.infos else 0.0 for ep in eps])
    return {"success": success, "returns": returns, "success_rate": float(success.mean()),
            "mean_return": float(returns.mean()), "episodes": len(eps), "starts": starts, "trajectories": eps}


def candidate_values(run: Run, episode: Episode, k: int = 4, seed: int = 0) -> dict:
    """Along one episode: V(s_t), Q(s_t, a_t) of the action taken and Q of k fresh candidate utterances.

    Returns {"v": (T,), "q_taken": (T,), "q_candidates": (T, k), "candidates": [[str]*k]*T}.
    """
    obs = episode.observations[: len(episode.actions)]
    u = act(run.model, run.tokenizer, run.env, obs, run.cfg, n=k, seed=seed)
    taken = run.critic.values(obs, episode.actions)
    cand = run.critic.values(u.observations, u.texts)
    T = len(obs)
    return {"v": taken["v"].numpy(), "q_taken": taken["q"].numpy(), "q_candidates": cand["q"].view(T, k).numpy(),
            "candidates": [u.texts[t * k:(t + 1) * k] for t in range(T)]}


def ended_episodes(df, column: str = "charts/episode_return"):
    """The rows of a run's log that record an ended episode (none yet: an empty frame with the episode columns;
    a short multi-turn run may end before its first episode does)."""
    if column not in df:
        import pandas as pd
        return pd.DataFrame({c: pd.Series(dtype=float) for c in ("charts/env_steps", column)})
    return df.dropna(subset=[column])


def return_curve(df, bins: int = 12, column: str = "charts/episode_return", budget: float | None = None) -> dict:
    """Mean of ``column`` over the episodes that ENDED in each window of environment samples (no length bias)."""
    ep = ended_episodes(df, column)
    hi = budget or (float(ep["charts/env_steps"].max()) if len(ep) else 1.0)
    edges = np.linspace(0, hi + 1e-9, bins + 1)
    return binned_rate(ep["charts/env_steps"].to_numpy(), ep[column].to_numpy(), edges)


def samples_to_return(df, target: float, bins: int = 12, budget: float | None = None) -> float | None:
    """Env samples at the end of the first window whose mean episode return reaches ``target`` (None: never)."""
    c = return_curve(df, bins, budget=budget)
    width = (c["x"][1] - c["x"][0]) if len(c["x"]) > 1 else 0.0
    hit = np.nonzero(np.nan_to_num(c["mean"], nan=-np.inf) >= target)[0]
    return float(c["x"][hit[0]] + width / 2) if len(hit) else None


def sample_efficiency(runs: dict, untrained_return: float, target: float | None = None, bins: int = 12,
                      budget: float | None = None) -> dict:
    """Env samples each run ({label: DataFrame}) needs to reach ``target`` (default: halfway from the untrained
    return to the best window any run reached) and each ratio other / first label (None where not reached)."""
    best = max(float(np.nanmax(return_curve(df, bins, budget=budget)["mean"])) for df in runs.values())
    if target is None:
        if best <= untrained_return:
            return {"target_return": None, "samples": {k: None for k in runs}, "ratios": {},
                    "note": "no run beat the untrained policy's return"}
        target = untrained_return + 0.5 * (best - untrained_return)
    samples = {k: samples_to_return(df, target, bins, budget) for k, df in runs.items()}
    first = next(iter(runs))
    ratios = {k: (samples[k] / samples[first]) if samples[k] and samples[first] else None
              for k in runs if k != first}
    return {"target_return": target, "samples": samples, "ratios": ratios}


def plot_returns(runs: dict, title: str, bins: int = 12, baselines: dict | None = None, budget: float | None = None,
                 column: str = "charts/episode_return", ylabel: str = "episode return"):
    """Mean episode return vs environment samples, one line per run (``{label: DataFrame}``), on one axis.
    Each point averages every episode that ended in its window of samples."""
    fig, ax = None, None
    for label, df in runs.items():
        c = return_curve(df, bins, column=column, budget=budget)
        fig = plots.curves({"x": c["x"], "y": c["mean"]}, "x", "y", labels=[label], ax=ax, title=title,
                           xlabel="environment samples (utterances)", ylabel=ylabel,
                           baselines=baselines if ax is None else None)
        ax = fig.axes[0]
    return fig


# ---- the command line ------------------------------------------------------------------------------------

def _cli_train(args) -> int:
    from .runtime import profile

    if args.resume:
        if not args.name:
            raise UsageError("--resume needs --name NAME of the run folder to continue (under runs/)")
        exp = runs_dir() / args.name
        algo, cfg, meta = read_run(exp)
        _checkpoint_dir(exp, "latest")
        if meta.get("complete"):
            print(f"{exp}: already complete ({meta['env_steps']} env samples); nothing to resume")
            return 0
        name = args.name
    else:
        over = {k: v for k, v in dict(dataset=args.dataset, seed=args.seed, env_steps=args.env_steps,
                                      actor_loss=args.actor_loss, target_update=args.target_update,
                                      kl_coef=args.kl_coef, checkpoint_every=args.checkpoint_every).items()
                if v is not None}
        if "dataset" not in over:
            raise UsageError("train needs --dataset (a task file or a Twenty Questions variant), or --resume --name NAME")
        task = next((t for t, v in TASKS.items() if v["dataset"] == over["dataset"]
                     or Path(v["dataset"]).name == Path(over["dataset"]).name), None)
        cfg = getattr(ArcherConfig, profile(args.profile))()
        # a known task brings its caps; any other task file gets best_lang's (8 lines of ≤ 48 tokens)
        cfg = with_task(cfg, task) if task else replace(cfg, max_turns=8, utterance_tokens=48)
        cfg = replace(cfg, **over, **{k: v for k, v in dict(max_turns=args.max_turns,
                                                             utterance_tokens=args.utterance_tokens).items()
                                      if v is not None})
        algo = {"baseline": "ppo"}.get(args.algo, args.algo)
        name = args.name or f"{algo}_{Path(cfg.dataset).stem}_{time.strftime('%Y%m%d-%H%M%S')}"
        if (runs_dir() / name / "run.json").exists():
            raise RunFolderError(f"{runs_dir() / name}: a run of this name exists; pass --resume to continue it "
                                 "or choose another --name")
    check_dataset(cfg)
    run = train(cfg, algo, name, resume=args.resume)
    ep = ended_episodes(run.df)
    print(f"{name}: {run.env_steps} env samples, {run.grad_steps} actor gradient steps, {len(ep)} episodes, "
          f"mean return of the last {min(16, len(ep))}: {ep['charts/episode_return'].tail(16).mean():.3f} "
          f"-> {run.tracker.dir}")
    return 0


def _cli_eval(args) -> int:
    exp = Path(args.exp_path)
    _checkpoint_dir(exp, args.chkpt_label)
    _, cfg, _ = read_run(exp)
    if args.dataset:
        cfg = replace(cfg, dataset=args.dataset)
    check_dataset(cfg)
    model, tokenizer, _ = load_checkpoint(exp, args.chkpt_label)
    res = evaluate(model, tokenizer, cfg, episodes=args.episodes)
    out = {k: res[k] for k in ("success_rate", "mean_return", "episodes")}
    (exp / f"eval_{args.chkpt_label}.json").write_text(json.dumps(out, indent=2))
    print(f"{exp} [{args.chkpt_label}] on {cfg.dataset}: success rate {out['success_rate']:.3f}, "
          f"mean return {out['mean_return']:.3f} over {out['episodes']} episodes")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line. A user's mistake (a broken task file, a missing run folder or checkpoint, a bad
    option) prints ONE line naming what and where, and exits with status 2 — no traceback."""
    from .envs.recurve import TaskFileError, TaskFunctionError

    ap = argparse.ArgumentParser(prog="python -m rlnlp.archer", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train ArCHer (or a baseline) and save runs/NAME")
    tr.add_argument("--dataset", help="a recurve YAML task file, or a Twenty Questions variant "
                                      f"({', '.join(TWENTY_QUESTIONS_VARIANTS)})")
    tr.add_argument("--name", help="run folder under runs/ (default: algo_dataset_time)")
    tr.add_argument("--algo", choices=ALGOS + ("baseline",), default="archer", help="baseline = ppo")
    tr.add_argument("--profile", choices=("smoke", "cpu", "full"), help="budget preset (default: full on CUDA, else cpu)")
    tr.add_argument("--resume", action="store_true", help="continue runs/NAME from its latest checkpoint")
    tr.add_argument("--seed", type=int)
    tr.add_argument("--env-steps", type=int, help="environment-sample budget")
    tr.add_argument("--checkpoint-every", type=int, help="save a checkpoint every N iterations (0 = at the end)")
    tr.add_argument("--max-turns", type=int, help="episode cap in utterances")
    tr.add_argument("--utterance-tokens", type=int, help="token cap of one utterance")
    tr.add_argument("--actor-loss", choices=("reinforce", "ppo"))
    tr.add_argument("--target-update", choices=("polyak", "hard"))
    tr.add_argument("--kl-coef", type=float)
    ev = sub.add_parser("eval", help="score a checkpoint: success rate and mean return")
    ev.add_argument("--exp-path", required=True)
    ev.add_argument("--chkpt-label", default="latest")
    ev.add_argument("--dataset", help="evaluate on another task file than the run's")
    ev.add_argument("--episodes", type=int)
    args = ap.parse_args(argv)
    try:
        return _cli_train(args) if args.cmd == "train" else _cli_eval(args)
    except (TaskFileError, TaskFunctionError, RunFolderError, UsageError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
