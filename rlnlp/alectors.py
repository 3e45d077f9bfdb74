"""alectors (spec 01): a PPO agent that reads the state.

The environment describes its state in a sentence; a frozen pretrained encoder (MiniLM by default)
turns the sentence into token embeddings; an ordinary actor–critic learns from them with PPO.
No language model is fine-tuned: the agent learns to act from language.

    sentence ──TextEncoder (frozen, cached per text)──► token embeddings (B, T, 384), [CLS]/[SEP] dropped
        actor:  Linear → 2 transformer blocks → masked attention pooling → LayerNorm → Linear → logits (B, A)
        critic: the same shape, its own weights                                     → value  (B,)

What differs from the original (see the spec's table): the pooling is a real softmax over the
tokens with padding masked (the original's softmax ran over a size-1 axis, so every weight was 1);
the PPO loss has its minus sign; GAE resets at episode ends (shared ``rlnlp.returns.gae``); the
value loss compares (B,) with (B,).

Two tasks speak the shared environment protocol: the instruction maze (``rlnlp.envs.instruction_maze``)
and the text grid world (``rlnlp.envs.gridworld``, one move per step, so the critic can be compared
with the exact V* of value iteration).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torch.distributions import Categorical

from .envs.base import TextEnv, VecEnv
from .envs.gridworld import GridWorld, policy_evaluation, value_iteration
from .envs.instruction_maze import DEFAULT_MOVES, InstructionMaze
from .losses import normalize, ppo_clip_loss, value_loss
from .models import TextEncoder
from .returns import gae
from .runtime import device as default_device
from .tracking import Tracker, progress


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------
@dataclass
class AlectorsConfig:
    """Everything one alectors run needs; ``.smoke()`` for a 2-core CPU, ``.full()`` for one GPU.

    PPO defaults are the original's (γ .99, λ .95, clip .1, entropy .001, 10 epochs, batch 64,
    Adam lr 1e-3). Standard PPO practice it lacked (not ablated here): advantage normalisation per
    minibatch, gradient-norm clipping, and a critic that predicts return / ``Task.value_scale``
    (the grid pays +100; a unit-scale value head moving ~lr per Adam step would take long to get there).
    """

    seed: int = 0
    """Seeds Python, NumPy, torch and the environments."""
    encoder: str | None = None
    """Frozen encoder (HF id or folder); None = the embedded all-MiniLM-L6-v2 (original: bert-base)."""

    # ---- agent (actor and critic have the same shape, separate weights, as in the original)
    d_model: int = 64
    """Width of the agent's transformer blocks (encoder outputs are projected down to it; the original ran at bert's 768)."""
    n_heads: int = 4
    """Attention heads per block."""
    n_layers: int = 2
    """Transformer blocks before the pooling (original: 2)."""
    ff_dim: int = 128
    """Hidden width of each block's feed-forward layer."""
    learned_positions: bool = True
    """Add a learned position embedding after the projection (the original had none). Measured on the
    length-4 maze, seed 0, 40 updates (10,240 steps): greedy success 0.99 with it vs 0.84 without
    (256 episodes each), and training success 0.78 vs 0.03 at update 10 — the agent must find the
    k-th route word, which is easier when positions are explicit."""
    max_tokens: int = 64
    """Longest observation (word pieces) the position table covers."""
    cpu_threads: int = 1
    """torch threads while training on CPU: the agent's matrices are tiny, and on a 2-core machine
    shared with other jobs 8 PPO minibatch steps took 45 s with 2 threads vs 1.1 s with 1 (measured)."""

    # ---- PPO
    gamma: float = 0.99
    """Discount γ (original .99; also the γ of the grid's exact values)."""
    gae_lambda: float = 0.95
    """GAE λ (original .95)."""
    clip: float = 0.1
    """PPO ratio clip ε (original .1)."""
    ent_coef: float = 0.001
    """Entropy bonus coefficient (original .001)."""
    value_clip: float | None = None
    """Clip the value update around the old values (in scaled units); None = plain ½(V − G)²."""
    epochs: int = 10
    """Passes over each rollout (original 10)."""
    target_kl: float | None = None
    """Stop a rollout's epochs early once an epoch's mean approx. KL(π_old‖π) exceeds this; None = never
    (the original). Measured, seed 0: on the grid, 60 updates without it collapsed after solving it
    (training success 1.0 at update 40, greedy eval 0.39 at the end) while 0.02 stayed ≥ 0.95 (greedy
    0.82, sampled 0.96); on the length-4 maze 0.02 cut CPU ~2.7× (2.4 epochs per update instead of 10)
    but slowed learning (smoke notebook: greedy success 0.16 after 36 updates vs 0.90 after 24 without).
    So: off for the short smoke runs, 0.02 for the long full runs."""
    minibatch_size: int = 64
    """Samples per gradient step (original batch 64)."""
    lr: float = 1e-3
    """Adam learning rate for actor and critic (original 1e-3)."""
    max_grad_norm: float = 0.5
    """Clip each network's gradient norm (the original did not clip)."""
    num_envs: int = 16
    """Environments stepped together (one batched encoder call and forward pass per step)."""
    num_steps: int = 16
    """Steps per environment per rollout; a rollout holds num_envs × num_steps samples."""

    # ---- tasks
    maze_length: int = 4
    """Moves in a maze route (random policy escapes with probability 4^−length)."""
    maze_moves: tuple[str, ...] = DEFAULT_MOVES
    """The maze's move vocabulary (also its action set)."""
    maze_updates: int = 60
    """PPO updates on the maze."""
    grid_max_steps: int = 20
    """Grid episode cap (steps = moves here); a capped episode bootstraps from V(last state)."""
    grid_updates: int = 60
    """PPO updates on the grid world."""
    eval_episodes: int = 256
    """Episodes per evaluation (success rate and mean return)."""

    @classmethod
    def smoke(cls) -> "AlectorsConfig":
        """~2–3 CPU minutes per notebook run: length-4 maze and the grid, ~7.7k steps each."""
        return cls(maze_updates=30, grid_updates=30)

    @classmethod
    def full(cls) -> "AlectorsConfig":
        """One GPU, minutes: wider agent, more parallel environments and updates."""
        return cls(d_model=128, ff_dim=256, num_envs=64, num_steps=16, maze_updates=150, grid_updates=150,
                   target_kl=0.02, eval_episodes=1024)


# ---------------------------------------------------------------------------------------------
# Tasks: an environment factory plus what the agent and the plots need to know about it
# ---------------------------------------------------------------------------------------------
@dataclass
class Task:
    """One environment family as the trainer sees it: a factory, the action strings, how to read success."""

    name: str
    make_env: Callable[[], TextEnv]
    actions: list[str]
    success_key: str
    """info key that is True on a successful episode end."""
    value_scale: float
    """The critic predicts return / value_scale (rewards here reach 100)."""
    truncated: Callable[[dict], bool] = field(default=lambda info: False)
    """True when an episode ended by the step cap, not by the task (bootstrap from V(last state))."""
    random_success: float | None = None
    """Exact success probability of the uniform policy when known."""


def maze_task(cfg: AlectorsConfig) -> Task:
    """The instruction maze of cfg.maze_length moves over cfg.maze_moves (value scale = the best return)."""
    maze = InstructionMaze(cfg.maze_length, cfg.maze_moves)
    return Task(name=f"maze-L{cfg.maze_length}", make_env=lambda: InstructionMaze(cfg.maze_length, cfg.maze_moves),
                actions=list(maze.actions), success_key="escaped",
                value_scale=cfg.maze_length * maze.move_reward + maze.escape_bonus,
                random_success=maze.random_policy_success())


def grid_task(cfg: AlectorsConfig) -> Task:
    """The 4×4 text grid world, random starts, three moves, one move per step (value scale = the goal's +100)."""
    grid = make_grid(cfg)
    return Task(name="grid", make_env=lambda: make_grid(cfg), actions=list(grid.actions), success_key="reached_goal",
                value_scale=grid.goal_reward, truncated=lambda info: not info["reached_goal"])


def make_grid(cfg: AlectorsConfig) -> GridWorld:
    """The grid world every alectors run uses (so its exact values match what the agent saw)."""
    return GridWorld(turn_right=True, random_start=True, max_steps=cfg.grid_max_steps)


# ---------------------------------------------------------------------------------------------
# Model: transformer blocks → masked attention pooling → LayerNorm → linear
# ---------------------------------------------------------------------------------------------
class AttentionPooling(nn.Module):
    """w_t = softmax_t(u·h_t) over real tokens only;  pooled = Σ_t w_t h_t.

    The original applied the softmax over a size-1 axis (every weight 1: a plain sum, padding
    included); here padded positions get −∞ scores and therefore weight exactly 0.
    """

    def __init__(self, d_model: int):
        super().__init__()
        self.score = nn.Linear(d_model, 1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.score(h).squeeze(-1).masked_fill(~mask, float("-inf"))  # (B, T)
        weights = torch.softmax(scores, dim=-1)  # (B, T), rows sum to 1 over real tokens
        return torch.einsum("bt,btd->bd", weights, h), weights  # (B, D), (B, T)


class Reader(nn.Module):
    """Token embeddings (B, T, E) + mask (B, T) → outputs (B, out_dim) and pooling weights (B, T)."""

    def __init__(self, in_dim: int, out_dim: int, cfg: AlectorsConfig, head_std: float):
        super().__init__()
        self.proj = nn.Linear(in_dim, cfg.d_model)
        self.positions = nn.Parameter(torch.zeros(cfg.max_tokens, cfg.d_model)) if cfg.learned_positions else None
        block = nn.TransformerEncoderLayer(cfg.d_model, cfg.n_heads, dim_feedforward=cfg.ff_dim, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, cfg.n_layers, enable_nested_tensor=False)
        self.pool = AttentionPooling(cfg.d_model)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, out_dim)
        # CleanRL's init: a near-uniform first policy (std .01), a unit-scale value head (std 1)
        nn.init.orthogonal_(self.head.weight, head_std)
        nn.init.zeros_(self.head.bias)

    def forward(self, emb: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.proj(emb)  # (B, T, d)
        if self.positions is not None:
            if x.shape[1] > self.positions.shape[0]:
                raise ValueError(f"observation has {x.shape[1]} word pieces; raise AlectorsConfig.max_tokens ({self.positions.shape[0]})")
            x = x + self.positions[: x.shape[1]]
        h = self.blocks(x, src_key_padding_mask=~mask)  # (B, T, d); padded keys are ignored
        pooled, weights = self.pool(h, mask)  # (B, d), (B, T)
        return self.head(self.norm(pooled)), weights


class Alector(nn.Module):
    """Separate actor and critic readers over the same frozen token embeddings."""

    def __init__(self, encoder_dim: int, n_actions: int, cfg: AlectorsConfig, value_scale: float = 1.0):
        super().__init__()
        self.actor = Reader(encoder_dim, n_actions, cfg, head_std=0.01)
        self.critic = Reader(encoder_dim, 1, cfg, head_std=1.0)
        self.value_scale = value_scale

    def dist(self, emb: torch.Tensor, mask: torch.Tensor) -> Categorical:
        return Categorical(logits=self.actor(emb, mask)[0])

    def scaled_value(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """V / value_scale, (B,) — what the value loss sees."""
        return self.critic(emb, mask)[0].squeeze(-1)

    def value(self, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """V in reward units, (B,)."""
        return self.scaled_value(emb, mask) * self.value_scale


def observe(encoder: TextEncoder, texts: list[str], dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached frozen-encoder token embeddings on ``dev``: (B, T, E) and mask (B, T)."""
    emb, mask = encoder.tokens(list(texts))
    return emb.to(dev), mask.to(dev)


def make_agent(task: Task, cfg: AlectorsConfig, encoder: TextEncoder, dev: torch.device | None = None) -> Alector:
    """A fresh actor–critic sized for ``task``'s actions and ``encoder``'s width, on ``dev``."""
    dev = dev or default_device()
    return Alector(encoder.dim, len(task.actions), cfg, value_scale=task.value_scale).to(dev)


# ---------------------------------------------------------------------------------------------
# Algorithm: batched rollout, GAE, clipped PPO
# ---------------------------------------------------------------------------------------------
@dataclass
class Rollout:
    """Time-major buffers of one batched rollout; values, rewards and returns in scaled units."""

    texts: list[list[str]]  # (T, N) observations
    actions: torch.Tensor  # (T, N)
    logp: torch.Tensor  # (T, N)
    values: torch.Tensor  # (T, N)
    rewards: torch.Tensor  # (T, N), truncated episodes already bootstrapped
    dones: torch.Tensor  # (T, N)
    next_value: torch.Tensor  # (N,)
    episode_returns: list[float] = field(default_factory=list)  # finished episodes, reward units
    episode_successes: list[bool] = field(default_factory=list)


@torch.no_grad()
def collect(agent: Alector, encoder: TextEncoder, envs: VecEnv, obs: list[str], task: Task,
            cfg: AlectorsConfig, running: np.ndarray) -> tuple[Rollout, list[str]]:
    """Step ``envs`` for cfg.num_steps with the current policy; ``running`` holds each env's return so far."""
    dev = next(agent.parameters()).device
    T, N = cfg.num_steps, len(envs)
    texts, actions, logps, values = [], torch.zeros(T, N, dtype=torch.long), torch.zeros(T, N), torch.zeros(T, N)
    rewards, dones = torch.zeros(T, N), torch.zeros(T, N)
    returns, successes = [], []
    for t in range(T):
        emb, mask = observe(encoder, obs, dev)
        dist = agent.dist(emb, mask)
        action = dist.sample()  # (N,)
        texts.append(list(obs))
        actions[t], logps[t], values[t] = action.cpu(), dist.log_prob(action).cpu(), agent.scaled_value(emb, mask).cpu()
        obs, r, d, infos = envs.step([task.actions[a] for a in action.tolist()])
        rewards[t] = torch.tensor(r) / task.value_scale
        dones[t] = torch.tensor(d, dtype=torch.float32)
        running += np.asarray(r)
        capped = [i for i, info in enumerate(infos) if d[i] and task.truncated(info)]
        if capped:  # the step cap is not a terminal state: r + γ·V(s_last) keeps the critic's target unbiased
            last = [infos[i]["final_observation"] for i in capped]
            rewards[t, capped] += cfg.gamma * agent.scaled_value(*observe(encoder, last, dev)).cpu()
        for i in np.flatnonzero(d):
            returns.append(float(running[i]))
            successes.append(bool(infos[i][task.success_key]))
            running[i] = 0.0
    next_value = agent.scaled_value(*observe(encoder, obs, dev)).cpu()
    return Rollout(texts, actions, logps, values, rewards, dones, next_value, returns, successes), obs


def ppo_update(agent: Alector, optimizer: torch.optim.Optimizer, emb: torch.Tensor, mask: torch.Tensor,
               actions: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, returns: torch.Tensor,
               old_values: torch.Tensor, cfg: AlectorsConfig) -> dict:
    """cfg.epochs passes of clipped PPO over one flattened batch; returns the last minibatch's stats.

    emb (B, T, E), mask (B, T); actions, old_logp, advantages, returns, old_values (B,) — values in scaled units.
    loss = −min(ρA, clip(ρ, 1±ε)A) + ½(V − G)² − c_ent·H[π]   (actor and critic have disjoint weights)
    """
    B = actions.shape[0]
    stats: dict = {}
    for epoch in range(cfg.epochs):
        kls = []
        for idx in torch.randperm(B, device=actions.device).split(cfg.minibatch_size):
            dist = agent.dist(emb[idx], mask[idx])
            logp = dist.log_prob(actions[idx])  # (b,)
            entropy = dist.entropy().mean()
            adv = normalize(advantages[idx])
            policy_loss, p_stats = ppo_clip_loss(logp, old_logp[idx], adv, cfg.clip)
            v_loss, v_stats = value_loss(agent.scaled_value(emb[idx], mask[idx]), returns[idx], old_values[idx], cfg.value_clip)
            loss = policy_loss + v_loss - cfg.ent_coef * entropy
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(agent.actor.parameters(), cfg.max_grad_norm)
            nn.utils.clip_grad_norm_(agent.critic.parameters(), cfg.max_grad_norm)
            optimizer.step()
            stats = {**p_stats, **v_stats, "losses/entropy": entropy.item(), "stats/epochs": epoch + 1}
            kls.append(p_stats["stats/approx_kl"])
        if cfg.target_kl is not None and np.mean(kls) > cfg.target_kl:
            break
    return stats


def train(task: Task, cfg: AlectorsConfig, encoder: TextEncoder, updates: int, agent: Alector | None = None,
          run_name: str | None = None) -> tuple[Alector, Tracker]:
    """PPO on ``task`` for ``updates`` rollouts of cfg.num_envs × cfg.num_steps steps. Returns (agent, tracker)."""
    dev = default_device()
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(cfg.cpu_threads)
    try:
        return _train(task, cfg, encoder, updates, agent, run_name, dev)
    finally:
        torch.set_num_threads(threads)


def _train(task, cfg, encoder, updates, agent, run_name, dev):
    agent = agent or make_agent(task, cfg, encoder, dev)
    optimizer = torch.optim.Adam(agent.parameters(), lr=cfg.lr)
    tracker = Tracker(run_name or f"01_alectors_{task.name}", config=cfg)
    envs = VecEnv(task.make_env, cfg.num_envs, seed=cfg.seed)
    obs = envs.reset()
    running = np.zeros(cfg.num_envs)
    passes_before, steps = encoder.forward_passes, 0
    bar = progress(range(updates), desc=f"PPO on {task.name}")
    for update in bar:
        start = time.time()
        roll, obs = collect(agent, encoder, envs, obs, task, cfg, running)
        steps += roll.actions.numel()
        adv, ret = gae(roll.rewards, roll.values, roll.dones, roll.next_value, cfg.gamma, cfg.gae_lambda)  # (T, N)
        flat = [t for row in roll.texts for t in row]
        emb, mask = observe(encoder, flat, dev)  # all cache hits: these texts were just encoded
        to = lambda x: x.reshape(-1).to(dev)
        stats = ppo_update(agent, optimizer, emb, mask, to(roll.actions), to(roll.logp), to(adv), to(ret),
                           to(roll.values), cfg)
        row = {**stats, "charts/env_steps": steps, "stats/encoder_forward_passes": encoder.forward_passes - passes_before,
               "time/update_s": time.time() - start}
        if roll.episode_returns:
            row["charts/episode_return"] = float(np.mean(roll.episode_returns))
            row["charts/success_rate"] = float(np.mean(roll.episode_successes))
            row["charts/episodes"] = len(roll.episode_returns)
            bar.set_postfix(success=f"{row['charts/success_rate']:.2f}", ret=f"{row['charts/episode_return']:.2f}")
        tracker.log(update, row)
    return agent, tracker


# ---------------------------------------------------------------------------------------------
# Evaluation and the numbers / pictures the notebook shows
# ---------------------------------------------------------------------------------------------
def agent_policy(agent: Alector, encoder: TextEncoder, greedy: bool = True) -> Callable[[list[str]], list[int]]:
    """texts → action indices: argmax (greedy) or sampled from π."""
    dev = next(agent.parameters()).device

    @torch.no_grad()
    def policy(texts: list[str]) -> list[int]:
        dist = agent.dist(*observe(encoder, texts, dev))
        return (dist.probs.argmax(-1) if greedy else dist.sample()).tolist()

    return policy


def uniform_policy(n_actions: int, seed: int = 0) -> Callable[[list[str]], list[int]]:
    """The random baseline: ignores the text."""
    rng = random.Random(seed)
    return lambda texts: [rng.randrange(n_actions) for _ in texts]


def evaluate(policy: Callable[[list[str]], list[int]], task: Task, episodes: int, seed: int = 10_000,
             max_steps: int = 200) -> dict:
    """Run ``episodes`` fresh episodes side by side (one batched policy call per step).

    Returns {"success_rate", "mean_return", "episodes"} (returns undiscounted, reward units).
    """
    envs = [task.make_env() for _ in range(episodes)]
    obs = [env.reset(seed + i) for i, env in enumerate(envs)]
    active = list(range(episodes))
    returns, success = np.zeros(episodes), np.zeros(episodes, dtype=bool)
    for _ in range(max_steps):
        if not active:
            break
        acts = policy([obs[i] for i in active])
        still = []
        for i, a in zip(active, acts):
            obs[i], r, done, info = envs[i].step(task.actions[a])
            returns[i] += r
            if done:
                success[i] = bool(info[task.success_key])
            else:
                still.append(i)
        active = still
    return {"success_rate": float(success.mean()), "mean_return": float(returns.mean()), "episodes": episodes}


@torch.no_grad()
def pooling_weights(agent: Alector, encoder: TextEncoder, text: str, net: str = "actor") -> tuple[list[str], np.ndarray]:
    """The word pieces of ``text`` and the ``net``'s ("actor" or "critic") attention-pooling weight on each."""
    if net not in ("actor", "critic"):
        raise ValueError(f"pooling_weights: net must be 'actor' or 'critic', got {net!r}")
    dev = next(agent.parameters()).device
    _, weights = getattr(agent, net)(*observe(encoder, [text], dev))
    return encoder.token_strings(text), weights[0].cpu().numpy()


def next_move_token(tokens: list[str], moves: list[str], made: int) -> int:
    """Index of the route word the agent must follow next (route words are single word pieces)."""
    vocab = {m.lower() for m in moves}
    positions = [i for i, tok in enumerate(tokens) if tok in vocab]
    if made >= len(positions):
        raise ValueError(f"next_move_token: found {len(positions)} route words in {tokens}; "
                         f"each move word must be one word piece of the encoder (moves: {moves})")
    return positions[made]


def maze_reading(agent: Alector, encoder: TextEncoder, task: Task, states: int = 200, seed: int = 20_000) -> dict:
    """Where the actor's pooling peaks, over random mid-route maze states: on the next move's word, or
    on the move count ("You have made *1* move") — the token whose context can hold the answer.

    Returns {"argmax_on_next_move", "argmax_on_move_count", "mean_weight_on_next_move",
    "mean_weight_on_other_moves", "mean_weight_on_move_count", "states"}.
    """
    env = task.make_env()
    rng = random.Random(seed)
    vocab = {m.lower() for m in env.actions}
    on_next, on_count, w_next, w_other, w_count = [], [], [], [], []
    for s in range(states):
        env.reset(seed + s)
        made = rng.randrange(env.length)
        tokens, w = pooling_weights(agent, encoder, env.describe(made=made))
        target = next_move_token(tokens, env.actions, made)
        count = len(tokens) - 1 - tokens[::-1].index("made") + 1  # the number after the last "made"
        others = [i for i, tok in enumerate(tokens) if tok in vocab and i != target]
        on_next.append(int(w.argmax()) == target)
        on_count.append(int(w.argmax()) == count)
        w_next.append(w[target])
        w_other.append(w[others].mean() if others else np.nan)
        w_count.append(w[count])
    return {"argmax_on_next_move": float(np.mean(on_next)), "argmax_on_move_count": float(np.mean(on_count)),
            "mean_weight_on_next_move": float(np.mean(w_next)), "mean_weight_on_other_moves": float(np.nanmean(w_other)),
            "mean_weight_on_move_count": float(np.mean(w_count)), "states": states}


@torch.no_grad()
def grid_values(agent: Alector, encoder: TextEncoder, cfg: AlectorsConfig) -> dict:
    """Critic values on every grid state next to the exact V* and V^π of the agent's own policy.

    Arrays are (4, size, size) indexed [o, y, x] (the goal's cells are NaN for the critic: terminal).
    V^π approaches V* as the policy becomes optimal; the critic estimates V^π, not V*.
    """
    grid = make_grid(cfg)
    dev = next(agent.parameters()).device
    states = grid.start_states()
    emb, mask = observe(encoder, [grid.describe(s) for s in states], dev)
    critic_v = agent.value(emb, mask).cpu().numpy()
    probs = agent.dist(emb, mask).probs.cpu().numpy()
    pi = {s: dict(zip(grid.actions, map(float, p))) for s, p in zip(states, probs)}
    v_star, _ = value_iteration(grid, gamma=cfg.gamma)
    v_pi = policy_evaluation(grid, lambda s: pi[s], gamma=cfg.gamma)
    critic = np.full_like(v_star, np.nan)
    for (x, y, o), v in zip(states, critic_v):
        critic[o, y, x] = v
    idx = tuple(np.array([(o, y, x) for x, y, o in states]).T)
    return {"critic": critic, "v_star": v_star, "v_pi": v_pi, "states": states,
            "critic_flat": critic[idx], "v_star_flat": v_star[idx], "v_pi_flat": v_pi[idx]}


@torch.no_grad()
def episode_steps(agent: Alector, encoder: TextEncoder, task: Task, seed: int = 0, greedy: bool = True,
                  max_steps: int = 50) -> list[dict]:
    """One episode as step dicts for ``rlnlp.widgets.stepper``: observation, π(·|s), V(s), action, reward."""
    dev = next(agent.parameters()).device
    env = task.make_env()
    obs, steps = env.reset(seed), []
    for t in range(max_steps):
        emb, mask = observe(encoder, [obs], dev)
        probs = agent.dist(emb, mask).probs[0]
        a = int(probs.argmax()) if greedy else int(Categorical(probs=probs).sample())
        value = float(agent.value(emb, mask)[0])
        next_obs, reward, done, info = env.step(task.actions[a])
        steps.append({"step": t, "observation": obs, "action probabilities": dict(zip(task.actions, probs.tolist())),
                      "value V(s)": value, "action": task.actions[a], "reward": reward, "done": done})
        obs = next_obs
        if done:
            break
    return steps

