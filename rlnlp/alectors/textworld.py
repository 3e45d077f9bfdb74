"""alectors on TextWorld: PPO over the frozen encoder's reading of a text game, scoring each admissible command.

In a text game the menu of commands changes with the state ("go east" exists only where there is an
exit to the east), so a fixed-size action head does not fit. Following DRRN (He et al., 2016), the
actor scores every (state, command) pair and the policy is a softmax over the current menu:

    state fields ──TextEncoder tokens (frozen, cached per field)──► (B, T, 384) ──Reader──► s (B, d)
    commands     ──TextEncoder sentence embeddings (cached)──────► (B, K, 384) ──MLP─────► c (B, K, d)
    logits (B, K) = MLP([s, c, s ⊙ c]),  padded menu slots masked;   critic: Reader → V(s) (B,)

The state is read from its fields (``rlnlp.envs.textworld.state_fields``) — the last command, the
game's answer to it, the room description (``look``), the inventory and optionally the objective —
each encoded ONCE per distinct text and cached, then the fields' token embeddings are concatenated
(rooms and inventories repeat across steps and episodes; most states cost no encoder call). The last command is
part of the state because a
memoryless reader cannot otherwise tell the way forward from the way back.

PPO, the critic, GAE, advantage normalisation and the KL target are alectors' own
(:func:`rlnlp.alectors.core.ppo_update`): a :class:`MenuStates` batch is indexed by rows like the
token-embedding tensors of the fixed-menu tasks. The reward is the change in the game's score divided
by its maximum score, so every game's return lies in [0, 1] (its normalised score).
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from torch.distributions import Categorical

from ..envs.textworld import GameFamily, Policy, TextWorldEnv, play_games, split_games, state_fields
from ..losses import normalize
from ..models import TextEncoder
from ..returns import gae
from ..runtime import device as default_device
from ..tracking import Tracker, progress
from .core import AlectorsConfig, Reader, distinct_rows, make_optimizers, ppo_update, set_learning_rate


@dataclass
class TextWorldConfig(AlectorsConfig):
    """alectors on TextWorld games (the PPO fields are :class:`AlectorsConfig`'s; differences noted here).

    ``.smoke()`` (mechanics), ``.cpu()`` (learning on a 2-core CPU), ``.full()`` (one GPU).
    """

    family: str = "tw-coin_collector --level 5"
    """The game family: a tw-make challenge and its settings (any tw-make challenge works). Level 5 is a chain
    of 5 rooms with the coin at the far end; measured: the random-admissible-command policy wins 31% of episodes
    within 20 steps (8 games × 4 episodes), the shortest solution takes 5."""
    train_games: int = 40
    """Training games (seeds 0..train_games−1 of the family)."""
    held_out_games: int = 40
    """HELD-OUT games (seeds from 10,000 on, each checked to differ from every training game); never trained on."""
    select_games: int = 16
    """The first select_games training games make the greedy pass that picks the best policy (never held-out ones)."""
    max_steps: int = 20
    """Step cap per episode (a capped episode bootstraps from V of its last state)."""
    updates: int = 36
    """PPO updates of num_envs × num_steps steps."""
    num_steps: int = 8
    """Steps per game per rollout (notebook 01: 16): 16 × 8 = 128 steps per update, one minibatch, so each update's
    10 epochs are 10 actor steps. Measured (cpu preset, 2026-12-06, one contended thread): 256-step updates of 4
    epochs took 18.7 s each and moved the policy by an approx-KL of only 1e-5 per update."""
    max_tokens: int = 160
    """Longest state (word pieces of all fields together); longer states keep their first max_tokens."""
    include_objective: bool = False
    """Read the game's objective as the last field of every state. Off: it doubles a state's length and with it
    PPO's cost (measured, smoke profile: 7.4 s per update of 64 steps with it and 10 epochs), and in coin collector
    it only repeats the route that the rooms' exits and the last command already give away."""
    eval_every: int = 12
    """Updates between greedy passes over the selection games."""
    eval_samples: int = 2
    """Sampled episodes per game (at seeds 0..eval_samples−1) for the agent and the random baseline."""

    @classmethod
    def smoke(cls) -> "TextWorldConfig":
        """Mechanics: 6 training and 6 held-out games, 16 updates of 8 × 8 steps."""
        return cls(train_games=6, held_out_games=6, select_games=4, updates=16, num_envs=8, minibatch_size=64,
                   eval_every=8)

    @classmethod
    def cpu(cls) -> "TextWorldConfig":
        """Learning on a 2-core CPU (the defaults)."""
        return cls()

    @classmethod
    def full(cls) -> "TextWorldConfig":
        """One GPU (never measured): more games and environments."""
        return cls(d_model=128, ff_dim=256, train_games=100, held_out_games=100, num_envs=32, num_steps=16, updates=100,
                   minibatch_size=256, eval_samples=8)


def textworld_games(cfg: TextWorldConfig) -> tuple[list, list]:
    """(training games, held-out games) of cfg.family, generated into the cache on first use."""
    return split_games(GameFamily.parse(cfg.family), cfg.train_games, cfg.held_out_games)


# ---------------------------------------------------------------------------------------------
# The state and the menu as the agent reads them
# ---------------------------------------------------------------------------------------------
@dataclass
class MenuStates:
    """Distinct decision points, batched: the state's token embeddings and its command menu.

    emb (U, T, E), mask (U, T): concatenated field tokens; commands (U, K, E): sentence embeddings of each
    menu; command_mask (U, K): real commands. Indexed by rows like a tensor, so PPO's minibatches slice it.
    """

    emb: torch.Tensor
    mask: torch.Tensor
    commands: torch.Tensor
    command_mask: torch.Tensor

    def __getitem__(self, rows) -> "MenuStates":
        return MenuStates(self.emb[rows], self.mask[rows], self.commands[rows], self.command_mask[rows])

    def __len__(self) -> int:
        return self.emb.shape[0]


def read_states(encoder: TextEncoder, states: Sequence[tuple[tuple[str, ...], tuple[str, ...]]], max_tokens: int,
                dev: torch.device) -> MenuStates:
    """(fields, menu) pairs → :class:`MenuStates` on ``dev``; every distinct field and command is encoded once
    (and cached by the encoder across calls)."""
    texts = list(dict.fromkeys(f for fields, _ in states for f in fields))
    emb, mask = encoder.tokens(texts)  # (F, L, E), (F, L)
    row = {t: i for i, t in enumerate(texts)}
    pieces = [torch.cat([emb[row[f]][mask[row[f]]] for f in fields])[:max_tokens] for fields, _ in states]
    T = max(p.shape[0] for p in pieces)
    out = torch.zeros(len(states), T, encoder.dim)
    out_mask = torch.zeros(len(states), T, dtype=torch.bool)
    for i, p in enumerate(pieces):
        out[i, : p.shape[0]], out_mask[i, : p.shape[0]] = p, True
    commands = list(dict.fromkeys(c for _, menu in states for c in menu))
    vectors = encoder.embed(commands)  # (C, E)
    index = {c: i for i, c in enumerate(commands)}
    K = max(len(menu) for _, menu in states)
    cmds = torch.zeros(len(states), K, encoder.dim)
    cmd_mask = torch.zeros(len(states), K, dtype=torch.bool)
    for i, (_, menu) in enumerate(states):
        cmds[i, : len(menu)] = vectors[[index[c] for c in menu]]
        cmd_mask[i, : len(menu)] = True
    return MenuStates(out.to(dev), out_mask.to(dev), cmds.to(dev), cmd_mask.to(dev))


# ---------------------------------------------------------------------------------------------
# Model: a reader of the state × an encoder of each command
# ---------------------------------------------------------------------------------------------
class CommandScorer(nn.Module):
    """The actor: logits (U, K) over each state's menu, and the state reader's pooling weights (U, T)."""

    def __init__(self, encoder_dim: int, cfg: TextWorldConfig):
        super().__init__()
        d = cfg.d_model
        self.state = Reader(encoder_dim, d, cfg, head_std=1.0)
        self.command = nn.Sequential(nn.Linear(encoder_dim, d), nn.ReLU(), nn.Linear(d, d))
        self.score = nn.Sequential(nn.Linear(3 * d, d), nn.ReLU(), nn.Linear(d, 1))
        nn.init.orthogonal_(self.score[-1].weight, 0.01)  # a near-uniform first policy, as the fixed-menu actor
        nn.init.zeros_(self.score[-1].bias)

    def forward(self, states: MenuStates, command_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s, weights = self.state(states.emb, states.mask)  # (U, d), (U, T)
        c = self.command(states.commands)  # (U, K, d)
        s = s[:, None, :].expand_as(c)
        logits = self.score(torch.cat([s, c, s * c], dim=-1)).squeeze(-1)  # (U, K)
        return logits.masked_fill(~command_mask, torch.finfo(logits.dtype).min), weights


class MenuAlector(nn.Module):
    """Actor (:class:`CommandScorer`) and critic (a :class:`Reader` of the state) with separate weights; the
    same interface as :class:`rlnlp.alectors.Alector`, so :func:`rlnlp.alectors.ppo_update` trains it."""

    def __init__(self, encoder_dim: int, cfg: TextWorldConfig):
        super().__init__()
        self.actor = CommandScorer(encoder_dim, cfg)
        self.critic = Reader(encoder_dim, 1, cfg, head_std=1.0)
        self.value_scale = 1.0  # rewards are score deltas / max score: returns lie in [0, 1]

    def dist(self, states: MenuStates, command_mask: torch.Tensor | None = None) -> Categorical:
        return Categorical(logits=self.actor(states, states.command_mask if command_mask is None else command_mask)[0])

    def scaled_value(self, states: MenuStates, command_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.critic(states.emb, states.mask)[0].squeeze(-1)

    def value(self, states: MenuStates, command_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.scaled_value(states) * self.value_scale


# ---------------------------------------------------------------------------------------------
# Rollouts over games
# ---------------------------------------------------------------------------------------------
State = tuple[tuple[str, ...], tuple[str, ...]]  # (fields, menu)


def decision(observation: str, info: dict, cfg: TextWorldConfig) -> State:
    return state_fields(observation, info, cfg.include_objective), tuple(info["admissible_commands"])


@dataclass
class MenuRollout:
    """Time-major buffers of one rollout over N games; rewards are normalised score deltas."""

    states: list[list[State]]  # (T, N)
    actions: torch.Tensor  # (T, N) index into each state's menu
    logp: torch.Tensor
    values: torch.Tensor
    rewards: torch.Tensor  # capped episodes already bootstrapped
    dones: torch.Tensor
    next_value: torch.Tensor  # (N,)
    episodes: list[dict] = field(default_factory=list)


@torch.no_grad()
def collect(agent: MenuAlector, encoder: TextEncoder, envs: list[TextWorldEnv], obs: list[str], cfg: TextWorldConfig,
            next_seed: list[int], running: dict) -> tuple[MenuRollout, list[str]]:
    """cfg.num_steps steps in every env with the sampled policy; finished episodes restart on the next seed."""
    dev = next(agent.parameters()).device
    T, N = cfg.num_steps, len(envs)
    states, actions, logps, values = [], torch.zeros(T, N, dtype=torch.long), torch.zeros(T, N), torch.zeros(T, N)
    rewards, dones, episodes = torch.zeros(T, N), torch.zeros(T, N), []
    for t in range(T):
        now = [decision(o, env.info, cfg) for o, env in zip(obs, envs)]
        batch = read_states(encoder, now, cfg.max_tokens, dev)
        dist = agent.dist(batch)
        action = dist.sample()  # (N,)
        states.append(now)
        actions[t], logps[t], values[t] = action.cpu(), dist.log_prob(action).cpu(), agent.scaled_value(batch).cpu()
        capped = []
        for i, (env, a) in enumerate(zip(envs, action.tolist())):
            o, r, d, info = env.step(now[i][1][a])
            rewards[t, i] = r / max(info["max_score"], 1e-9)
            dones[t, i] = float(d)
            running["return"][i] += rewards[t, i].item()
            running["length"][i] += 1
            if d:
                if info["truncated"]:
                    capped.append((i, decision(o, info, cfg)))
                episodes.append({"t": t, "return": float(running["return"][i]), "success": info["won"],
                                 "length": int(running["length"][i]), "game": info["game"]})
                running["return"][i], running["length"][i] = 0.0, 0
                o = env.reset(next_seed[0])
                next_seed[0] += 1
            obs[i] = o
        if capped:  # the step cap is not a terminal state: r + γ·V(s_last)
            last = agent.scaled_value(read_states(encoder, [s for _, s in capped], cfg.max_tokens, dev)).cpu()
            for (i, _), v in zip(capped, last):
                rewards[t, i] += cfg.gamma * v
    now = [decision(o, env.info, cfg) for o, env in zip(obs, envs)]
    next_value = agent.scaled_value(read_states(encoder, now, cfg.max_tokens, dev)).cpu()
    return MenuRollout(states, actions, logps, values, rewards, dones, next_value, episodes), obs


# ---------------------------------------------------------------------------------------------
# Policies and evaluation over games
# ---------------------------------------------------------------------------------------------
def agent_policy(agent: MenuAlector, encoder: TextEncoder, cfg: TextWorldConfig, greedy: bool = True,
                 seed: int = 0) -> Policy:
    """The agent's argmax (greedy) or sampled command; sampling draws from a generator seeded by ``seed``."""
    dev = next(agent.parameters()).device
    gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def policy(observations, infos, sample):
        now = [decision(o, info, cfg) for o, info in zip(observations, infos)]
        probs = agent.dist(read_states(encoder, now, cfg.max_tokens, dev)).probs.cpu()
        picks = probs.argmax(-1) if greedy else torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        return [menu[a] for (_, menu), a in zip(now, picks.tolist())]

    return policy


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
@dataclass
class MenuRun:
    """What :func:`train` returns (as :class:`rlnlp.alectors.Run`, over games)."""

    agent: MenuAlector
    best: MenuAlector
    """The policy of the update with the best greedy pass over the selection games (training games)."""
    best_update: int
    tracker: Tracker
    episodes: pd.DataFrame
    """One row per training episode: update, env_steps, return (normalised score), success, length, game."""
    evals: pd.DataFrame
    """One row per greedy pass over the selection games (update −1 = before training)."""


def make_agent(encoder: TextEncoder, cfg: TextWorldConfig, dev: torch.device | None = None) -> MenuAlector:
    return MenuAlector(encoder.dim, cfg).to(dev or default_device())


def train(cfg: TextWorldConfig, encoder: TextEncoder, games: Sequence, updates: int | None = None,
          agent: MenuAlector | None = None, run_name: str = "06_textworld_alectors") -> MenuRun:
    """PPO over ``games`` (training games only) for ``updates`` rollouts of cfg.num_envs × cfg.num_steps steps."""
    dev = default_device()
    threads = torch.get_num_threads()
    if dev.type == "cpu" and cfg.cpu_threads:
        torch.set_num_threads(cfg.cpu_threads)
    try:
        return _train(cfg, encoder, list(games), updates or cfg.updates, agent, run_name, dev)
    finally:
        torch.set_num_threads(threads)


def _train(cfg, encoder, games, updates, agent, run_name, dev):
    agent = agent or make_agent(encoder, cfg, dev)
    optimizers = make_optimizers(agent, cfg)
    tracker = Tracker(run_name, config=cfg)
    envs = [TextWorldEnv(games, cfg.max_steps) for _ in range(cfg.num_envs)]
    next_seed = [cfg.seed * 100_000]
    obs = []
    for env in envs:
        obs.append(env.reset(next_seed[0]))
        next_seed[0] += 1
    running = {"return": np.zeros(len(envs)), "length": np.zeros(len(envs), dtype=int)}
    select = games[: cfg.select_games]
    steps, episodes, evals = 0, [], []
    best_score, best_state, best_update = None, None, -1

    def greedy_pass(update: int) -> float:
        res = play_games(agent_policy(agent, encoder, cfg), select, cfg.max_steps)
        evals.append({"update": update, "env_steps": steps, "selection/normalized": float(res["normalized"].mean()),
                      "selection/won": float(res["won"].mean())})
        return float(res["normalized"].mean())

    greedy_pass(-1)
    passes_before = encoder.forward_passes
    bar = progress(range(updates), desc="PPO on TextWorld")
    for update in bar:
        start = time.time()
        lr = set_learning_rate(optimizers, cfg, update, updates)
        roll, obs = collect(agent, encoder, envs, obs, cfg, next_seed, running)
        adv, ret = gae(roll.rewards, roll.values, roll.dones, roll.next_value, cfg.gamma, cfg.gae_lambda)  # (T, N)
        flat = [s for row in roll.states for s in row]
        distinct, index = distinct_rows(flat, dev)  # index (B,): sample → its state's row
        batch = read_states(encoder, distinct, cfg.max_tokens, dev)
        to = lambda x: x.reshape(-1).to(dev)
        advantages = normalize(to(adv)) if cfg.normalize_advantages else to(adv)
        stats = ppo_update(agent, optimizers, batch, batch.command_mask, to(roll.actions), to(roll.logp), advantages,
                           to(ret), to(roll.values), cfg, index=index)
        for ep in roll.episodes:
            episodes.append({"update": update, "env_steps": steps + (ep["t"] + 1) * len(envs),
                             **{k: v for k, v in ep.items() if k != "t"}})
        steps += roll.actions.numel()
        row = {**stats, "charts/env_steps": steps, "charts/lr": lr, "charts/episodes": len(roll.episodes),
               "stats/distinct_states": len(distinct),
               "stats/encoder_forward_passes": encoder.forward_passes - passes_before,
               "time/update_s": time.time() - start}
        if roll.episodes:
            row["charts/episode_return"] = float(np.mean([e["return"] for e in roll.episodes]))
            row["charts/success_rate"] = float(np.mean([e["success"] for e in roll.episodes]))
        if (update + 1) % cfg.eval_every == 0 or update == updates - 1:
            score = greedy_pass(update)
            row["eval/greedy_normalized"] = score
            if best_score is None or score >= best_score:
                best_score, best_state, best_update = score, copy.deepcopy(agent.state_dict()), update
            bar.set_postfix(greedy=f"{score:.2f}", kl=f"{stats['stats/approx_kl']:.3f}")
        tracker.log(update, row)
    for env in envs:
        env.close()
    best = make_agent(encoder, cfg, dev)
    best.load_state_dict(best_state if best_state is not None else agent.state_dict())
    return MenuRun(agent=agent, best=best, best_update=best_update, tracker=tracker, episodes=pd.DataFrame(episodes),
                   evals=pd.DataFrame(evals))


# ---------------------------------------------------------------------------------------------
# What the notebook shows
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def transcript(agent: MenuAlector, encoder: TextEncoder, cfg: TextWorldConfig, game, greedy: bool = True,
               seed: int = 0) -> list[dict]:
    """One episode of ``game`` as step dicts for ``rlnlp.widgets.stepper``: observation, the command
    probabilities π(c|s) over the menu, V(s), the command played, reward and score."""
    dev = next(agent.parameters()).device
    env = TextWorldEnv([game], cfg.max_steps)
    obs, steps, done = env.reset(seed), [], False
    gen = torch.Generator().manual_seed(seed)
    while not done:
        state = decision(obs, env.info, cfg)
        batch = read_states(encoder, [state], cfg.max_tokens, dev)
        probs = agent.dist(batch).probs[0].cpu()
        a = int(probs.argmax()) if greedy else int(torch.multinomial(probs, 1, generator=gen))
        value = float(agent.value(batch)[0])
        next_obs, reward, done, info = env.step(state[1][a])
        steps.append({"step": info["moves"], "observation": obs,
                      "command probabilities": dict(zip(state[1], probs.tolist())),
                      "value V(s)": value, "command": state[1][a], "reward": reward,
                      "score": f"{info['score']:g} / {info['max_score']:g}", "done": done})
        obs = next_obs
    env.close()
    return steps
