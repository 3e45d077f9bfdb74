"""ArCHer (Zhou et al. 2024) as recurve uses it: an utterance-level critic guides a token-level actor.

Each utterance (a line, a question, a turn) is ONE high-level action, so an episode is a handful
of steps instead of hundreds of tokens. An off-policy critic learns Q(s, utterance) and V(s) from
a replay buffer with a target copy; the token-level policy (SmolLM2 + LoRA) is pushed along the
utterance-level advantage A = min_j Q_j(s, a′) − min_j V_j(s) on every token of a fresh a′ ~ π(s).

    critic   h_s = MiniLM(s), h_a = MiniLM(a)   (frozen, cached — only the MLP heads learn)
             Q_i = MLP_i([h_s; h_a]),  V_i = MLP_i(h_s),  i = 1, 2
             L_Q = Σ_i MSE(Q_i(s, a), r + γ(1 − d)·V̄_i(s′))          V̄: target critic
             L_V = Σ_i MSE(V_i(s), min_j Q̄_j(s, a′)),  a′ ~ π(·|s) fresh
             target ← (1 − τ)·target + τ·online after every step (ArCHer), or a hard copy every n
    actor    L = −mean(A · Σ_t log π(a′_t | s, a′_<t))   (REINFORCE, ArCHer) or PPO-clip on A (recurve)
             + β·KL(π ‖ π_ref) optional
    baseline token-level REINFORCE with only the episode's return (no critic), same env-sample budget

Environments: a recurve YAML task file (``rlnlp.envs.recurve``) or Twenty Questions
(``rlnlp.envs.twenty_questions``). Command line (recurve's flags)::

    python -m rlnlp.archer train --dataset data/recurve/best_lang.yaml [--name NAME] [--algo baseline]
    python -m rlnlp.archer eval --exp-path runs/NAME --chkpt-label latest

Task files are code: the loader executes their functions. Run only task files you trust.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import plots
from .envs.base import Episode
from .losses import ppo_clip_loss, reinforce_loss
from .models import TextEncoder, attach_lora, completion_logprobs, kl_k3, load_policy, masked_mean
from .runtime import device as default_device
from .runtime import seed_everything
from .sampling import Samples, sample
from .tracking import Tracker, progress

TWENTY_QUESTIONS = "twenty_questions"


@dataclass
class ArcherConfig:
    """One ArCHer (or baseline) run. Defaults are the full (GPU) profile; ``smoke()`` shrinks budgets only."""

    dataset: str = "data/recurve/best_lang.yaml"
    """A recurve YAML task file, or "twenty_questions" for the 20Q environment."""
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
    """Environments stepped together; every iteration adds num_envs transitions (env samples)."""
    env_steps: int = 6400
    """Budget of environment samples (utterances sent to an environment), the same for ArCHer and baseline."""
    max_turns: int = 20
    """Episode cap in utterances (20Q's 20 questions; task files end earlier via done_fn or EOS)."""
    utterance_tokens: int = 48
    """Token cap of one utterance (recurve: the task's split_fn usually ends it first)."""
    temperature: float = 1.0
    """Sampling temperature for acting, fresh a′ and evaluation."""
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
    fresh_batch: int = 64
    """Buffer states that get a fresh a′ ~ π each iteration: L_V's targets and the actor's batch."""
    buffer_size: int = 100_000
    """Replay capacity in transitions (oldest dropped first)."""
    target_update: str = "polyak"
    """"polyak" (ArCHer, τ after every critic step) or "hard" (recurve: copy every hard_update_every steps)."""
    tau: float = 0.1
    """Polyak rate (ArCHer's 0.1)."""
    hard_update_every: int = 50
    """Critic steps between hard target copies when target_update == "hard"."""
    warmup_iters: int = 10
    """Critic-only iterations before the actor trains (ArCHer warms the critic up too)."""
    actor_loss: str = "reinforce"
    """"reinforce" (ArCHer) or "ppo" (recurve's variant: PPO-clip on the same utterance advantage)."""
    actor_lr: float = 1e-4
    """Adam lr of the LoRA weights (ArCHer 1e-5 on full weights; LoRA wants more)."""
    ppo_clip: float = 0.2
    """PPO clip ε (only with actor_loss == "ppo")."""
    ppo_epochs: int = 2
    """Passes over each fresh batch with actor_loss == "ppo" (REINFORCE makes one)."""
    kl_coef: float = 0.0
    """β of the optional k3 KL to the frozen reference (ArCHer: none)."""
    grad_clip: float = 1.0
    """Max grad norm for actor and critic."""
    baseline_episodes: int = 64
    """Completed episodes per baseline update (token-level REINFORCE, mean-return baseline)."""
    train_batch: int = 16
    """Rows per forward/backward of the actor (gradients accumulate over chunks)."""
    eval_episodes: int = 64
    """Episodes per evaluation (untrained, ArCHer, baseline)."""
    target_return: float | None = None
    """Return that 'samples to reach' is measured at; None = halfway from the untrained return to the best."""
    oracle_threshold: float = 0.7
    """20Q: minimum cosine similarity to an attribute question, else "I don't know" (0.6 let "Does it have
    wheels?" match "Does it have legs?" on MiniLM; 0.7 keeps paraphrases like "Is it something you wear?")."""
    critic_max_length: int = 512
    """MiniLM tokens per critic input: long enough for a whole 20Q history (MiniLM has 512 positions)."""

    @classmethod
    def full(cls, **kw) -> "ArcherConfig":
        return cls(**kw)

    @classmethod
    def smoke(cls, **kw) -> "ArcherConfig":
        base = dict(num_envs=6, env_steps=24, max_turns=3, utterance_tokens=12, critic_hidden=128, critic_batch=32,
                    critic_steps=25, fresh_batch=4, warmup_iters=2, baseline_episodes=6, train_batch=8,
                    eval_episodes=4, hard_update_every=10)
        return cls(**{**base, **kw})


# ---- environments ------------------------------------------------------------------------------

def resolve_dataset(path: str) -> Path:
    """A task file path as given, else relative to the repository root (notebooks run from notebooks/)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    from .data import data_dir

    return data_dir().parent / p


def make_env(cfg: ArcherConfig, tokenizer=None, encoder: TextEncoder | None = None):
    """A fresh environment for ``cfg.dataset`` (a task file, or "twenty_questions")."""
    if cfg.dataset == TWENTY_QUESTIONS:
        from .envs.twenty_questions import TwentyQuestions

        return TwentyQuestions(max_turns=cfg.max_turns, encoder=encoder, threshold=cfg.oracle_threshold)
    from .envs.recurve import RecurveEnv, load_task

    return RecurveEnv(load_task(resolve_dataset(cfg.dataset)), tokenizer=tokenizer, max_utterances=cfg.max_turns)


def env_factory(cfg: ArcherConfig, tokenizer, encoder: TextEncoder):
    """make() for N copies that share the (expensive) parts: task, tokenizer, oracle embeddings."""
    proto = make_env(cfg, tokenizer, encoder)
    if cfg.dataset == TWENTY_QUESTIONS:
        return lambda: type(proto)(oracle=proto.oracle, max_turns=cfg.max_turns)
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
    s = sample(model, tokenizer, observations, n=n, max_new_tokens=cfg.utterance_tokens,
               temperature=cfg.temperature if temperature is None else temperature, stop=split, chat=chat,
               batch_size=128, seed=seed)
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

    def state_text(self, observation: str) -> str:
        """What the encoder reads of a state: the text without chat-template markup (it costs MiniLM tokens)."""
        for tok in self.special:
            observation = observation.replace(tok, " ")
        return " ".join(observation.split())

    def embed(self, texts: list[str], states: bool) -> torch.Tensor:
        texts = [self.state_text(t) if states else (self.state_text(t) or "(nothing)") for t in texts]
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


# ---- actor losses ----------------------------------------------------------------------------------

def actor_step(model, opt, u: Utterances, advantages: torch.Tensor, cfg: ArcherConfig) -> dict:
    """One actor update on fresh utterances with one advantage per utterance (B,), broadcast over its tokens.

    reinforce:  L = −mean_b(A_b · Σ_t log π(a′_bt))
    ppo:        L = −mean_bt(min(ρ_bt·A_b, clip(ρ_bt, 1 ± ε)·A_b)),  ρ = π / π_old  (ppo_epochs passes)
    both:       + β · mean_bt(k3(π ‖ π_ref))  when kl_coef > 0
    Rows go through in chunks of train_batch with gradient accumulation.
    """
    s = u.samples
    dev = next(model.parameters()).device
    B = len(u.texts)
    epochs = cfg.ppo_epochs if cfg.actor_loss == "ppo" else 1
    stats: dict = {}
    for _ in range(epochs):
        opt.zero_grad()
        sums: dict[str, float] = {}
        for lo in range(0, B, cfg.train_batch):
            sl = slice(lo, min(B, lo + cfg.train_batch))
            args = [x[sl].to(dev) for x in (s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask)]
            mask = args[3]
            logp = completion_logprobs(model, *args, temperature=cfg.temperature)  # (b, C)
            adv = advantages[sl].to(dev)  # (b,)
            if cfg.actor_loss == "reinforce":
                loss, st = reinforce_loss(logp.sum(1), adv)
            elif cfg.actor_loss == "ppo":
                loss, st = ppo_clip_loss(logp, s.logprobs[sl].to(dev), adv[:, None].expand_as(logp), cfg.ppo_clip, mask)
            else:
                raise ValueError(f"actor_loss must be 'reinforce' or 'ppo', got {cfg.actor_loss!r}")
            if cfg.kl_coef > 0:
                with torch.no_grad(), model.disable_adapter():
                    ref = completion_logprobs(model, *args, temperature=cfg.temperature)
                kl = masked_mean(kl_k3(logp, ref), mask)
                loss = loss + cfg.kl_coef * kl
                st["stats/kl"] = kl.item()
            (loss * (sl.stop - sl.start) / B).backward()
            for k, v in st.items():
                sums[k] = sums.get(k, 0.0) + v * (sl.stop - sl.start) / B
        stats = sums
        stats["stats/grad_norm"] = float(nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                                  cfg.grad_clip))
        opt.step()
    return stats


# ---- the loop shared by ArCHer and the baseline ------------------------------------------------------

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


def _log_episodes(tracker: Tracker, episodes: list[Episode], env_steps: int) -> None:
    for ep in episodes:
        tracker.log(env_steps, {"charts/env_steps": env_steps, "charts/episode_return": ep.total_reward,
                                "charts/success": float(bool(ep.infos[-1].get("success"))),
                                "charts/episode_length": len(ep)})


def setup(cfg: ArcherConfig, encoder: TextEncoder | None = None):
    """Policy with a fresh LoRA adapter, its optimiser, the encoder and an environment factory."""
    seed_everything(cfg.seed)
    model, tokenizer = load_policy(cfg.policy_model)
    model = attach_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.actor_lr)
    encoder = encoder or TextEncoder(max_length=cfg.critic_max_length)
    return model, tokenizer, opt, encoder, env_factory(cfg, tokenizer, encoder)


def train_archer(cfg: ArcherConfig, name: str = "archer", encoder: TextEncoder | None = None) -> Run:
    """ArCHer: every iteration adds num_envs transitions, refits the critic, then (after warm-up) steps the actor."""
    model, tokenizer, opt, encoder, make = setup(cfg, encoder)
    critic = Critic(cfg, encoder, special_tokens=list(tokenizer.all_special_tokens))
    buffer = ReplayBuffer(cfg.buffer_size, seed=cfg.seed)
    run = Run(name, "archer", cfg, Tracker(name, config=cfg), model, tokenizer, make(), critic)
    col = Collector(make, cfg.num_envs, seed=cfg.seed * 100_000)
    iterations = max(1, cfg.env_steps // cfg.num_envs)
    for it in progress(range(iterations), desc=f"ArCHer {name}"):
        # 1. one utterance per environment, plus a fresh a′ ~ π for buffer states, in one batched call
        fresh_obs = [t.observation for t in buffer.sample(cfg.fresh_batch)] if len(buffer) else list(col.obs)
        u = act(model, tokenizer, run.env, col.obs + fresh_obs, cfg, seed=cfg.seed * 7919 + it)
        n = len(col.obs)
        acted_obs = list(col.obs)
        buffer.add(col.step(u.texts[:n]))
        done_now = col.finished[len(run.episodes):]
        run.episodes.extend(done_now)
        _log_episodes(run.tracker, done_now, col.env_steps)
        # 2. critic: L_V's a′ are this iteration's on-policy utterances (executed and fresh)
        v_obs, v_act = acted_obs + fresh_obs, u.texts
        first = None
        for _ in range(cfg.critic_steps):
            stats = critic.update(buffer.sample(cfg.critic_batch), v_obs, v_act)
            first = stats["losses/critic"] if first is None else first
        stats["losses/critic_first"] = first  # this iteration's loss before its critic steps
        # 3. actor on the fresh rows: A = min_j Q_j(s, a′) − min_j V_j(s), no gradient into the critic
        if it >= cfg.warmup_iters:
            fresh = _rows(u, slice(n, len(u.texts)))
            vals = critic.values(fresh.observations, fresh.texts)
            advantage = vals["q"] - vals["v"]  # (F,)
            stats |= actor_step(model, opt, fresh, advantage, cfg)
            stats["stats/advantage_mean"] = advantage.mean().item()
            stats["stats/advantage_std"] = advantage.std().item() if len(advantage) > 1 else 0.0
        run.tracker.log(col.env_steps, {"charts/env_steps": col.env_steps, "charts/iteration": it,
                                        "charts/actor_trains": float(it >= cfg.warmup_iters), **stats})
    run.env_steps = col.env_steps
    save_checkpoint(run, "latest")
    return run


def train_baseline(cfg: ArcherConfig, name: str = "baseline", encoder: TextEncoder | None = None) -> Run:
    """Token-level REINFORCE with only the episode's return: A = G − mean(G) on every token of every utterance."""
    model, tokenizer, opt, encoder, make = setup(cfg, encoder)
    run = Run(name, "baseline", cfg, Tracker(name, config=cfg), model, tokenizer, make())
    col = Collector(make, cfg.num_envs, seed=cfg.seed * 100_000)
    pending: list[tuple[Episode, list[Utterances]]] = []
    episode_rows: dict[int, list] = {i: [] for i in range(cfg.num_envs)}  # env -> its running episode's utterances
    iterations = max(1, cfg.env_steps // cfg.num_envs)
    for it in progress(range(iterations), desc=f"baseline {name}"):
        u = act(model, tokenizer, run.env, list(col.obs), cfg, seed=cfg.seed * 7919 + it)
        before = len(col.finished)
        running = list(col.running)
        col.step(u.texts)
        for i in range(cfg.num_envs):
            episode_rows[i].append(_rows(u, slice(i, i + 1)))
            if col.running[i] is not running[i]:  # episode i just finished
                pending.append((running[i], episode_rows[i]))
                episode_rows[i] = []
        done_now = col.finished[before:]
        run.episodes.extend(done_now)
        _log_episodes(run.tracker, done_now, col.env_steps)
        stats = {}
        if len(pending) >= cfg.baseline_episodes:
            returns = torch.tensor([ep.total_reward for ep, _ in pending])
            # A = G − mean(G): the final return is the only learning signal
            adv = returns - returns.mean()
            rows = _concat([r for _, rs in pending for r in rs], pad_id=tokenizer.pad_token_id)
            per_row = torch.cat([adv[k].repeat(len(rs)) for k, (_, rs) in enumerate(pending)])
            stats = actor_step(model, opt, rows, per_row, cfg)
            stats["stats/advantage_std"] = adv.std().item() if len(adv) > 1 else 0.0
            pending = []
        run.tracker.log(col.env_steps, {"charts/env_steps": col.env_steps, "charts/iteration": it, **stats})
    run.env_steps = col.env_steps
    save_checkpoint(run, "latest")
    return run


def _rows(u: Utterances, sl: slice) -> Utterances:
    """A slice of utterances with their tokens."""
    return Utterances(u.observations[sl], u.texts[sl], u.samples.select(sl))


def _concat(parts: list[Utterances], pad_id: int = 0) -> Utterances:
    """Stack utterance rows from different sampling calls."""
    samples = Samples.concat([p.samples for p in parts], pad_id)
    return Utterances([o for p in parts for o in p.observations], [t for p in parts for t in p.texts], samples)


# ---- evaluation and analysis ---------------------------------------------------------------------------

def evaluate(model, tokenizer, cfg: ArcherConfig, episodes: int | None = None, seed: int = 10_000,
             encoder: TextEncoder | None = None, make=None) -> dict:
    """Play ``episodes`` fresh episodes (batched, sampling at cfg.temperature): success rate and mean return."""
    episodes = episodes or cfg.eval_episodes
    make = make or env_factory(cfg, tokenizer, encoder or TextEncoder(max_length=cfg.critic_max_length))
    envs = [make() for _ in range(episodes)]
    eps = [Episode(observations=[e.reset(seed + i)]) for i, e in enumerate(envs)]
    for turn in range(cfg.max_turns):
        live = [i for i, ep in enumerate(eps) if not ep.done]
        if not live:
            break
        u = act(model, tokenizer, envs[0], [eps[i].observations[-1] for i in live], cfg, seed=seed + 31 * turn)
        for i, a in zip(live, u.texts):
            obs, r, done, info = envs[i].step(a)
            eps[i].actions.append(a)
            eps[i].rewards.append(float(r))
            eps[i].infos.append(info)
            eps[i].observations.append(obs)
            eps[i].done = done
    returns = [ep.total_reward for ep in eps]
    success = [bool(ep.infos[-1].get("success")) if ep.infos else False for ep in eps]
    return {"success_rate": float(np.mean(success)), "mean_return": float(np.mean(returns)), "episodes": len(eps),
            "trajectories": eps}


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


def samples_to_return(df, target: float, window: int = 16) -> float | None:
    """Env samples at which the moving average (over ``window`` episodes) of the return first reaches ``target``."""
    ep = df.dropna(subset=["charts/episode_return"])
    if ep.empty:
        return None
    avg = plots.smooth(ep["charts/episode_return"].to_numpy(), window)
    hit = np.nonzero(avg >= target)[0]
    return float(ep["charts/env_steps"].to_numpy()[hit[0]]) if len(hit) else None


def sample_efficiency(archer_df, baseline_df, untrained_return: float, target: float | None = None,
                      window: int = 16) -> dict:
    """Env samples each method needs to reach ``target`` (default: halfway from the untrained return to the
    best moving-average return either run reached) and the ratio baseline / ArCHer (None where not reached)."""
    best = max(float(np.nanmax(plots.smooth(df.dropna(subset=["charts/episode_return"])["charts/episode_return"], window)))
               for df in (archer_df, baseline_df))
    if target is None:
        if best <= untrained_return:  # nobody improved: any target would be met (or missed) by both at once
            return {"target_return": None, "archer_samples": None, "baseline_samples": None,
                    "ratio_baseline_over_archer": None, "note": "neither run beat the untrained policy's return"}
        target = untrained_return + 0.5 * (best - untrained_return)
    a, b = samples_to_return(archer_df, target, window), samples_to_return(baseline_df, target, window)
    return {"target_return": target, "archer_samples": a, "baseline_samples": b,
            "ratio_baseline_over_archer": (b / a) if a and b else None}


def plot_returns(runs: dict, title: str, window: int = 8, baselines: dict | None = None, ax=None):
    """Episode return vs environment samples, one line per run (``{label: DataFrame}``), on one axis."""
    fig = None
    for label, df in runs.items():
        ep = df.dropna(subset=["charts/episode_return"])
        w = window if len(ep) >= 3 * window else 1  # too few episodes to average: show each one as a marker
        fig = plots.curves(ep, "charts/env_steps", "charts/episode_return", labels=[label], window=w,
                           baselines=baselines if fig is None else None, title=title,
                           xlabel="environment samples (utterances)", ylabel="episode return",
                           ax=ax if fig is None else fig.axes[0])
    lo, hi = fig.axes[0].get_ylim()
    if hi - lo < 1.0:  # flat returns (nothing learned yet): show one return unit, not float noise
        mid = 0.5 * (lo + hi)
        fig.axes[0].set_ylim(mid - 0.5, mid + 0.5)
    return fig


# ---- checkpoints and the command line ------------------------------------------------------------------

def save_checkpoint(run: Run, label: str) -> Path:
    """runs/NAME/checkpoints/LABEL/{actor/ (LoRA adapter), critic.pt}."""
    out = run.tracker.dir / "checkpoints" / label
    run.model.save_pretrained(out / "actor")
    if run.critic is not None:
        torch.save({"net": run.critic.net.state_dict(), "target": run.critic.target.state_dict()}, out / "critic.pt")
    (run.tracker.dir / "run.json").write_text(json.dumps({"algo": run.algo, "env_steps": run.env_steps,
                                                          "config": asdict(run.cfg)}, indent=2))
    return out


def load_checkpoint(exp_path: str | Path, label: str = "latest"):
    """(model with the trained adapter, tokenizer, cfg) from a run folder."""
    from peft import PeftModel

    exp_path = Path(exp_path)
    meta_file = exp_path / "run.json"
    ckpt = exp_path / "checkpoints" / label / "actor"
    if not meta_file.exists() or not ckpt.exists():
        have = sorted(p.name for p in (exp_path / "checkpoints").glob("*")) if (exp_path / "checkpoints").exists() else []
        raise FileNotFoundError(f"{exp_path}: no run.json or checkpoint {label!r} (checkpoints here: {have or 'none'})")
    cfg = ArcherConfig(**json.loads(meta_file.read_text())["config"])
    model, tokenizer = load_policy(cfg.policy_model)
    model = PeftModel.from_pretrained(model, ckpt)
    return model, tokenizer, cfg


def main(argv: list[str] | None = None) -> int:
    from .runtime import profile

    ap = argparse.ArgumentParser(prog="python -m rlnlp.archer", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train ArCHer (or the token-level baseline) and save runs/NAME")
    tr.add_argument("--dataset", required=True, help="a recurve YAML task file, or 'twenty_questions'")
    tr.add_argument("--name", help="run folder under runs/ (default: algo_dataset_time)")
    tr.add_argument("--algo", choices=("archer", "baseline"), default="archer")
    tr.add_argument("--profile", choices=("smoke", "full"), help="budget preset (default: full on CUDA, else smoke)")
    tr.add_argument("--seed", type=int)
    tr.add_argument("--env-steps", type=int, help="environment-sample budget")
    tr.add_argument("--actor-loss", choices=("reinforce", "ppo"))
    tr.add_argument("--target-update", choices=("polyak", "hard"))
    tr.add_argument("--kl-coef", type=float)
    ev = sub.add_parser("eval", help="score a checkpoint: success rate and mean return")
    ev.add_argument("--exp-path", required=True)
    ev.add_argument("--chkpt-label", default="latest")
    ev.add_argument("--dataset", help="evaluate on another task file than the run's")
    ev.add_argument("--episodes", type=int)
    args = ap.parse_args(argv)
    if args.cmd == "train":
        over = {k: v for k, v in dict(dataset=args.dataset, seed=args.seed, env_steps=args.env_steps,
                                      actor_loss=args.actor_loss, target_update=args.target_update,
                                      kl_coef=args.kl_coef).items() if v is not None}
        cfg = getattr(ArcherConfig, profile(args.profile))(**over)
        name = args.name or f"{args.algo}_{Path(cfg.dataset).stem}_{time.strftime('%Y%m%d-%H%M%S')}"
        run = (train_archer if args.algo == "archer" else train_baseline)(cfg, name)
        ep = run.df.dropna(subset=["charts/episode_return"]) if "charts/episode_return" in run.df else run.df.iloc[:0]
        print(f"{name}: {run.env_steps} env samples, {len(ep)} episodes, mean return of the last "
              f"{min(16, len(ep))}: {ep['charts/episode_return'].tail(16).mean():.3f} -> {run.tracker.dir}")
        return 0
    model, tokenizer, cfg = load_checkpoint(args.exp_path, args.chkpt_label)
    if args.dataset:
        cfg.dataset = args.dataset
    res = evaluate(model, tokenizer, cfg, episodes=args.episodes)
    out = {k: v for k, v in res.items() if k != "trajectories"}
    (Path(args.exp_path) / f"eval_{args.chkpt_label}.json").write_text(json.dumps(out, indent=2))
    print(f"{args.exp_path} [{args.chkpt_label}] on {cfg.dataset}: success rate {out['success_rate']:.3f}, "
          f"mean return {out['mean_return']:.3f} over {out['episodes']} episodes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
