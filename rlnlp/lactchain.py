"""LactChain (notebook 02): an LM actor proposes chains of moves, an embedding critic learns state values by
Monte-Carlo, then a judge (the critic, or exact V* as an oracle) ranks the actor's proposals and SimPO
trains the actor on best-vs-worst pairs, round after round (collect → SimPO → collect).

Pipeline (notebook 02 runs it top to bottom):

    actor   SmolLM2-135M-Instruct + LoRA (r 8, α 32, q/k/v/o, dropout 0.05). The system turn holds the
            info text and the rules; the user turn the state; the assistant turn is opened with "Go "
            and the model writes one move from a small menu, "<n> cells <ahead|behind|left|right>",
            which ``parse_move`` turns into a chain of the grid's two moves (turn left 0–3 times to face
            that way, then n × move forward). Generation stops at the end of the move.
    critic  frozen MiniLM sentence embedding (cached per text) of ``state text + "\\n" + info``
            → a small MLP → V(s). MiniLM is bidirectional and mean-pooled, unlike the original's
            token-0 hidden state of a causal decoder (which sees only itself: a constant).
    stage 1 Monte-Carlo: discounted returns (γ 0.99 per move) of frozen-policy episodes, fitted with
            smooth-L1 on G / value_scale. Episodes cut by the chain budget are bootstrapped: the target
            of a visited state is G_partial + γ^m · V(s_last), refitted a few times, so V is the same
            infinite-horizon value that stage 2 evaluates at V(s′).
    stage 2 n chains per start state, each executed once and scored by the k-step advantage
            A = R_chain + γ^k · V(s′) · (1 − done) − V(s); per state the best chain is chosen and the
            worst rejected (a parse failure ranks below every valid chain); SimPO on the pairs.

Why this prompt (measured on the 60 start states, SmolLM2-135M, before any training):
    the original prompt carried an example answer, and the model copied it in all 60 states (one
    distinct greedy answer). Free JSON lists of "move forward" / "turn left" either copy the order in
    which the schema names the moves (again one greedy answer) or invent moves ("move left", "move
    back"): 3–60 % of samples parse at temperature 0.7, and almost none reach the goal. Absolute
    coordinates give a 135M model nothing to act on. So the state is ALSO told egocentrically ("the
    goal is 1 cell behind and 2 cells to your left": a fact about the state, not an answer), and the
    answer is one move from a menu of 12 (1–3 cells × 4 directions), each a chain of up to 6 grid
    moves. Two such moves reach the goal from every start (an L-shaped route), so an episode has a
    budget of ``max_chains`` = 3 chains. See the notebook for the measured rates.
    The assistant turn is opened with "Go ", not "Move ": with "Move " the greedy answers were only
    "1|2 cells to the left|right" (7 distinct over the 60 states, 4 of them valid, greedy success 0.57):
    the model ignored the ahead/behind half of the state. With "Go " it copies either half of the
    state (10 distinct greedy answers, all valid, 8 distinct chains). Measured alternatives (greedy,
    60 states): "I move " 4 distinct, "I go " 7, "Walk " 4, "Step " and no prefix 0 valid; other
    direction words (forward/back) 7 with "Move ", 9 with "Go "; compass answers ("2 cells north",
    the chain turns from the heading to face that way) 6–7 with "Go ", mostly malformed with "Move ".
    Copying either half always progresses, so the untrained greedy actor succeeds from (almost) every
    start, but it mostly names the sideways half first, whose turns cost moves ("right" = three left
    turns): its first-chain V*-advantage is −2.0 and sampled at T 0.7 (8 per state) success is 0.80,
    V*-advantage −5.3, parse failures 0.14. What SimPO can learn is which half to go first and to
    stop producing malformed answers.

What k is. A chain is a macro-action of several per-move transitions, so the discount follows the
moves: k = the number of moves actually executed (a chain that reaches the goal stops there), and
R_chain = Σ_{i<k} γ^i r_i. A is then exactly the k-step TD advantage on the per-move MDP whose exact
values (``value_iteration``) are the ground truth. An unparsable answer is a wasted step: state
unchanged, one tick (k = 1), reward ``cfg.empty_chain_penalty`` — chosen below every valid chain's
outcome (tests/test_lactchain.py checks it against all 12 moves from all 60 states).

SimPO (Meng et al. 2024):  L = −log σ( β·(mean log π(y_w|x) − mean log π(y_l|x)) − γ ), per-token
MEAN log-probs over the completion — which here is the move and nothing else (no explanation, no
JSON boilerplate) — and no reference model. β 2.0, γ 0.5 follow the SimPO paper's range; the
original's β 0.1 is the DPO default, which with length-normalised log-probs leaves the loss flat.
Our own loss instead of TRL's CPOTrainer(loss_type="simpo"): the pairs are built on the fly from
token ids we already hold, the loss is three lines over ``completion_logprobs``, and owning it keeps
the quantities this notebook plots (margin, accuracy, log-prob gap per step) in view.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .envs.gridworld import COMPASS, FORWARD, LEFT, GridWorld, State, epsilon_greedy, sample_action, value_iteration
from .models import completion_logprobs, masked_mean
from .sampling import Samples, render_prompts, sample
from .stats import spearman
from .tracking import progress


@dataclass
class LactChainConfig:
    """Every knob of notebook 02: ``.smoke()`` CI minutes, ``.cpu()`` learning on 2 cores, ``.full()`` one GPU."""

    seed: int = 0
    """Seed for Python / NumPy / torch, the state splits and the samplers."""
    gamma: float = 0.99
    """Per-MOVE discount (a chain of k moves discounts by γ^k), as the original."""
    # ---- actor -----------------------------------------------------------------------------
    lora_r: int = 8
    """LoRA rank (original: 8)."""
    lora_alpha: int = 32
    """LoRA α (original: 32)."""
    lora_dropout: float = 0.05
    """LoRA dropout (original: 0.05)."""
    max_new_tokens: int = 8
    """Token cap of one answer. A move is ≤ 6 tokens ("2 cells to the right"); generation stops at its end."""
    temperature: float = 0.7
    """Sampling temperature for rollouts, preference data and the sampled evaluation. Measured on the
    untrained actor over 60 states × 8 episodes: at 0.7, 86 % of the chains parse (greedy: 100 %); the original sampled at 1.0."""
    batch_size: int = 64
    """Rows per generation batch."""
    max_cells: int = 3
    """Largest n in "<n> cells <direction>" (the 4×4 grid never needs more)."""
    max_chains: int = 3
    """Chains per episode (original: max steps 4). Two moves of the menu reach the goal from any start."""
    empty_chain_penalty: float = -20.0
    """Reward of a step whose answer does not parse (state unchanged, one tick). The original had no
    failure path; −20 lies below the exact V*-advantage of every valid move from every state (the worst
    is ≈ −16: six moves away from a goal one move off), so no judge can prefer garbage (tested)."""
    # ---- critic ----------------------------------------------------------------------------
    critic_hidden: int = 128
    """Width of the MLP value head on the 384-d MiniLM embedding (original: a linear Q-head on 4096-d)."""
    critic_lr: float = 3e-3
    """Adam learning rate of the value head."""
    critic_steps: int = 1600
    """Full-batch gradient steps per critic fit (embeddings are cached, so steps are cheap: ~2 s per 1000).
    Measured on the scripted-policy check (held-out Spearman vs exact V^π, seeds 0–3): 400 steps on 400
    episodes 0.92–0.94; 1600 steps on 3200 episodes 0.96–0.98."""
    bootstrap_fits: int = 3
    """Fits of the critic when some episodes were cut by the budget: fit 0 on the partial returns, each
    later fit on G_partial + γ^m · V_previous(s_last). 1 = no bootstrap (the original)."""
    value_scale: float = 100.0
    """Returns are fitted as G / value_scale (the goal reward): one global scale, not per-episode z-scores."""
    huber_delta: float = 1.0
    """Smooth-L1 β in scaled units (1.0 = 100 reward points): quadratic for ordinary errors, so V fits the MEAN return."""
    scripted_epsilon: float = 0.3
    """ε of the scripted ε-greedy policy whose exact V^π checks the critic."""
    scripted_episodes: int = 3200
    """Episodes of the scripted policy (one move per step) for the critic check (no LM: ~1 s per 1000)."""
    scripted_max_moves: int = 30
    """Move cap of a scripted episode (the tail is bootstrapped, so the cap costs no bias)."""
    heldout_fraction: float = 0.5
    """Fraction of the 60 start states never used as critic targets in the check against V^π."""
    # ---- stage 2: preferences and SimPO ----------------------------------------------------
    samples_per_state: int = 8
    """Samples per start state at ``temperature``, for the sampled evaluation and each round's preferences."""
    rounds: int = 2
    """Collect → SimPO rounds. Round 0 reuses the before-evaluation's first chains; later rounds sample anew.
    2 fits the cpu budget with the oracle run (a SimPO step of 8 pairs costs ~7 s on one core)."""
    simpo_epochs: int = 2
    """Passes over each round's pairs."""
    simpo_batch: int = 8
    """Pairs per gradient step (each step runs 2 × this many sequences)."""
    simpo_beta: float = 2.0
    """SimPO β (original 0.1, a DPO leftover: too flat for length-normalised log-probs)."""
    simpo_gamma: float = 0.5
    """SimPO target margin γ (in units of β × nats of mean log-prob)."""
    simpo_lr: float = 3e-4
    """AdamW learning rate of the LoRA weights (original 1e-4 for one step, which moved nothing from LoRA's zero init)."""
    tie_tolerance: float = 1e-6
    """|A_best − A_worst| at or below this is a tie and the state gives no pair."""
    oracle: bool = True
    """Also run SimPO judged by exact V* (from the same LoRA init), to show what the learned critic costs."""
    eval_states: int = 60
    """Start states of the evaluation: the first ``eval_states`` of the 60 (all of them except in smoke)."""

    @classmethod
    def smoke(cls) -> "LactChainConfig":
        """CI minutes: 12 start states, 2 samples each, one round of SimPO, no oracle run."""
        return cls(scripted_episodes=200, critic_steps=200, bootstrap_fits=2, samples_per_state=4, rounds=1,
                   simpo_epochs=3, simpo_batch=4, max_chains=2, eval_states=12, oracle=False)

    @classmethod
    def cpu(cls) -> "LactChainConfig":
        """The learning profile: all 60 start states, 8 samples each, 2 rounds, critic and oracle judges."""
        return cls()

    @classmethod
    def full(cls) -> "LactChainConfig":
        """One GPU: 16 samples per state, 5 rounds, larger SimPO batches."""
        return cls(samples_per_state=16, rounds=5, simpo_epochs=2,
                   simpo_batch=32, batch_size=256)


# ============================================================================================
# Text: state, prompt, parser
# ============================================================================================
DIRECTIONS = {"ahead": 0, "left": 1, "behind": 2, "right": 3}
"""Each direction of the menu → how many times the actor turns left to face it."""
ANSWER_PREFIX = "Go "
"""The assistant turn is opened with this text, so the model's first token is already the move's number.
"Go " rather than "Move ": measured on the untrained actor, greedy over the 60 start states, it gives 10
distinct answers (all valid moves) where "Move " gives 7 (4 valid); see the module docstring."""


def rules(env: GridWorld) -> str:
    """The system turn: the info text, the walls, and the answer as a schema with placeholders (no example)."""
    return (f"{env.info_text}; walls block. Answer with one move: \"<number> cells <ahead, behind, left or right>\". "
            "You turn to face that way, then go that many cells.")


def goal_offset(env: GridWorld, state: State) -> tuple[int, int]:
    """The goal relative to the agent: (cells ahead, cells to the right); negative = behind / to the left."""
    x, y, o = state
    dx, dy = env.goal[0] - x, env.goal[1] - y
    fx, fy = [(0, -1), (1, 0), (0, 1), (-1, 0)][o]  # forward; right is forward turned clockwise: (−fy, fx)
    return dx * fx + dy * fy, -dx * fy + dy * fx


def _cells(n: int) -> str:
    return f"{n} cell" + ("" if n == 1 else "s")


def state_text(env: GridWorld, state: State) -> str:
    """What the actor reads (and the critic, with the info text): position, heading and the goal seen from the agent.

    The lateral offset is named first ("1 cell to your right and 2 cells behind"). Measured on the untrained
    model with the "Go " prefix (greedy, 60 states): lateral first and ahead/behind first both give 10 distinct
    answers; lateral first starts further from optimal (first-chain V*-advantage −2.0 vs −1.1, since the
    sideways half costs turns), which leaves SimPO more to learn.
    """
    x, y, o = state
    ahead, right = goal_offset(env, state)
    parts = []
    if right:
        parts.append(f"{_cells(abs(right))} to your {'right' if right > 0 else 'left'}")
    if ahead:
        parts.append(f"{_cells(abs(ahead))} {'ahead' if ahead > 0 else 'behind'}")
    where = " and ".join(parts) if parts else "here"
    return f"You are at ({x}, {y}) facing {COMPASS[o]}. The goal is {where}."


def actor_prompt(env: GridWorld, state: State) -> list[dict]:
    """Chat messages: the rules (with the info text) as the system turn, the state as the user turn.
    The rules come first so every prompt shares them as a prefix (the sampler prefills it once)."""
    return [{"role": "system", "content": rules(env)}, {"role": "user", "content": state_text(env, state)}]


@dataclass
class ParsedChain:
    """The moves read from one answer; ``ok`` is False on a parse failure (then ``moves`` is empty)."""

    moves: list[str]
    ok: bool
    error: str = ""
    move: str = ""


_MOVE = re.compile(r"\s*(\d{1,3}) cells? (?:to (?:the |your )?)?(ahead|behind|left|right)(?![a-z])", re.IGNORECASE)


def parse_move(text: object, max_cells: int = 3) -> ParsedChain:
    """Read one move of the menu from the start of an answer and expand it into grid moves. Never raises.

    Accepted: optional spaces, an integer n in 1..max_cells, "cell" or "cells", optionally "to the" /
    "to your" / "to", then one of ahead, behind, left, right (any letter case) as a whole word; what
    follows the move is ignored (generation stops there anyway). The chain is "turn left" ×
    DIRECTIONS[direction] (right = three left turns) followed by n × "move forward".
    Anything else — no move at the start, n out of range, an unknown direction, a non-string — is a
    failure: ``ok=False``, no moves, ``error`` says which.
    """
    if not isinstance(text, str):
        return ParsedChain([], False, f"answer is {type(text).__name__}, not text")
    m = _MOVE.match(text)
    if m is None:
        return ParsedChain([], False, "no move \"<n> cells <direction>\" at the start")
    n, direction = int(m.group(1)), m.group(2).lower()
    if not 1 <= n <= max_cells:
        return ParsedChain([], False, f"{n} cells is outside 1..{max_cells}")
    return ParsedChain([LEFT] * DIRECTIONS[direction] + [FORWARD] * n, True, "", f"{n} {_cells(n)[2:]} {direction}")


def move_complete(completion: str) -> bool:
    """Stop function for the sampler: True once the completion starts with a whole move ("2 cells to the
    left"), or once it has a line break or a full stop (then it is not a move, and the cap need not be waited for)."""
    return _MOVE.match(completion) is not None or "\n" in completion or "." in completion


def menu(max_cells: int = 3) -> list[list[str]]:
    """Every chain the menu can express: 4 directions × 1..max_cells cells."""
    return [[LEFT] * t + [FORWARD] * n for t in DIRECTIONS.values() for n in range(1, max_cells + 1)]


# ============================================================================================
# Executing chains; returns
# ============================================================================================
@dataclass
class ChainOutcome:
    """One chain executed from ``state``: per-move rewards (k of them), the state after, goal reached."""

    state: State
    moves: list[str]
    rewards: list[float]
    next_state: State
    done: bool

    @property
    def k(self) -> int:
        return len(self.rewards)

    def chain_return(self, gamma: float) -> float:
        """R = Σ_{i<k} γ^i r_i."""
        return float(sum(gamma ** i * r for i, r in enumerate(self.rewards)))


def execute_chain(env: GridWorld, state: State, moves: list[str], empty_penalty: float) -> ChainOutcome:
    """Run ``moves`` from ``state`` until the goal; an empty chain is one wasted tick with ``empty_penalty``."""
    if not moves:
        return ChainOutcome(state, [], [float(empty_penalty)], state, False)
    rewards, s, done = [], state, False
    for m in moves:
        s, r, done = env.move(s, m)
        rewards.append(float(r))
        if done:
            break
    return ChainOutcome(state, list(moves), rewards, s, done)


def chain_advantage(chain_return: float, k: int, value: float, next_value: float, done: bool, gamma: float) -> float:
    """A = R_chain + γ^k · V(s′) · (1 − done) − V(s)  (the k-step TD advantage; see module docstring)."""
    return chain_return + (gamma ** k) * next_value * (1.0 - float(done)) - value


@dataclass(frozen=True)
class MCSample:
    """One Monte-Carlo target: from ``state`` the episode collected ``partial`` (discounted), then was cut
    at ``tail_state`` with ``tail_discount`` = γ^(moves until the cut); 0 when it reached the goal.
    The bootstrapped target is  partial + tail_discount · V(tail_state)."""

    state: State
    partial: float
    tail_state: State
    tail_discount: float


def mc_samples(states: list[State], rewards: list[float], final_state: State, reached: bool,
               gamma: float) -> list[MCSample]:
    """Targets for every visited state of one per-move trajectory (``states[t]`` got ``rewards[t]``)."""
    out, G = [], 0.0
    tail = 0.0 if reached else 1.0  # discount from "now" to the cut
    for s, r in zip(reversed(states), reversed(rewards)):
        G = r + gamma * G
        tail *= gamma
        out.append(MCSample(s, G, final_state, 0.0 if reached else tail))
    return out[::-1]


def episode_samples(outcomes: list[ChainOutcome], gamma: float) -> list[MCSample]:
    """Targets at the start of each chain of one episode (the chains flattened into per-move transitions)."""
    if not outcomes:
        return []
    moves_states, rewards, firsts = [], [], []
    for o in outcomes:
        firsts.append(len(rewards))
        moves_states.extend([o.state] * o.k)  # only the first of each chain is used
        rewards.extend(o.rewards)
    per_move = mc_samples(moves_states, rewards, outcomes[-1].next_state, outcomes[-1].done, gamma)
    return [MCSample(o.state, per_move[i].partial, per_move[i].tail_state, per_move[i].tail_discount)
            for o, i in zip(outcomes, firsts)]


def scripted_samples(env: GridWorld, policy, n_episodes: int, max_moves: int, gamma: float,
                     rng: random.Random) -> list[MCSample]:
    """Targets for every visited state of ``n_episodes`` one-move-per-step episodes of ``policy``, each from
    a uniformly drawn start state and cut after ``max_moves`` (the cut is bootstrapped by ``fit_critic``)."""
    starts = env.start_states()
    out = []
    for _ in range(n_episodes):
        s = rng.choice(starts)
        states, rewards, done = [], [], False
        for _ in range(max_moves):
            s2, r, done = env.move(s, sample_action(policy(s), rng))
            states.append(s)
            rewards.append(r)
            s = s2
            if done:
                break
        out.extend(mc_samples(states, rewards, s, done, gamma))
    return out


def scripted_policy(env: GridWorld, epsilon: float, gamma: float):
    """ε-greedy on Q* (the scripted policy whose exact V^π checks the critic)."""
    _, Q = value_iteration(env, gamma)
    return epsilon_greedy(env, Q, epsilon)


def grid_values(V: np.ndarray, states: list[State]) -> np.ndarray:
    """V[o, y, x] for each (x, y, o): the bridge between (4, size, size) value grids and state lists."""
    return np.array([V[o, y, x] for x, y, o in states], dtype=float)


def exact_judge(V: np.ndarray) -> Callable[[list[State]], np.ndarray]:
    """A judge that reads values from an exact grid (the oracle: V*). Goal states are terminal: 0."""
    def judge(states: list[State]) -> np.ndarray:
        v = grid_values(V, states)
        return np.nan_to_num(v, nan=0.0)

    return judge


# ============================================================================================
# Critic
# ============================================================================================
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
            v_all = torch.where(terminal, 0.0, critic.head(emb).squeeze(-1)) if fit else torch.zeros(len(unique), device=dev)
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


# ============================================================================================
# Actor
# ============================================================================================
@dataclass
class Proposals:
    """Chains proposed for ``states`` (row i answers states[prompt_index[i]]), with the sampled tokens."""

    states: list[State]
    samples: Samples
    parsed: list[ParsedChain]

    @property
    def texts(self) -> list[str]:
        return [ANSWER_PREFIX + t for t in self.samples.texts]

    def row_states(self) -> list[State]:
        """The state each row answers."""
        return [self.states[int(i)] for i in self.samples.prompt_index]


class Actor:
    """The LM actor: renders prompts (assistant turn opened with ``ANSWER_PREFIX``), samples, parses."""

    def __init__(self, model, tokenizer, env: GridWorld, cfg: LactChainConfig):
        self.model, self.tokenizer, self.env, self.cfg = model, tokenizer, env, cfg

    def prompts(self, states: list[State]) -> list[str]:
        chats = render_prompts(self.tokenizer, [actor_prompt(self.env, s) for s in states])
        return [c + ANSWER_PREFIX for c in chats]

    def propose(self, states: list[State], n: int = 1, temperature: float | None = None,
                seed: int | None = None) -> Proposals:
        """``n`` chains per state, one batched ``sample`` call; each answer stops at the end of its move."""
        samples = sample(self.model, self.tokenizer, self.prompts(states), n=n, chat=False,
                         max_new_tokens=self.cfg.max_new_tokens,
                         temperature=self.cfg.temperature if temperature is None else temperature,
                         stop=move_complete, batch_size=self.cfg.batch_size, seed=seed)
        parsed = [parse_move(t, self.cfg.max_cells) for t in samples.texts]
        return Proposals(list(states), samples, parsed)


@dataclass
class ActorEpisodes:
    """LM-actor episodes run in lockstep: per episode its chain outcomes and parse flags; ``first`` holds the
    proposals of the first chain (row i = episode i), which the preference stage reuses."""

    starts: list[State]
    outcomes: list[list[ChainOutcome]]
    parsed_ok: list[list[bool]]
    first: Proposals

    def samples(self, gamma: float) -> list[MCSample]:
        """Monte-Carlo targets at every chain start (bootstrapped by ``fit_critic`` where the budget cut)."""
        return [s for ep in self.outcomes for s in episode_samples(ep, gamma)]

    def success(self) -> np.ndarray:
        return np.array([ep[-1].done for ep in self.outcomes], dtype=float)


def run_episodes(actor: Actor, starts: list[State], max_chains: int, temperature: float | None = None,
                 seed: int | None = None) -> ActorEpisodes:
    """One episode per entry of ``starts``, ≤ ``max_chains`` chains each; each chain step is ONE batched
    generation over the running episodes (repeated states share their prompt's prefill)."""
    outcomes = [[] for _ in starts]
    ok = [[] for _ in starts]
    current = list(starts)
    running = list(range(len(starts)))
    first = None
    for t in range(max_chains):
        if not running:
            break
        props = actor.propose([current[i] for i in running], temperature=temperature,
                              seed=None if seed is None else seed + t)
        if t == 0:
            first = props
        still = []
        for i, p in zip(running, props.parsed):
            o = execute_chain(actor.env, current[i], p.moves, actor.cfg.empty_chain_penalty)
            outcomes[i].append(o)
            ok[i].append(p.ok)
            current[i] = o.next_state
            if not o.done:
                still.append(i)
        running = still
    return ActorEpisodes(list(starts), outcomes, ok, first)


# ============================================================================================
# Evaluation over every start state
# ============================================================================================
@dataclass
class Evaluation:
    """``k`` episodes from each of ``states`` (rows state-major): per-state means, paired across evaluations."""

    states: list[State]
    k: int
    episodes: ActorEpisodes
    success: np.ndarray
    """(S,) fraction of the k episodes that reached the goal within the chain budget."""
    advantage: np.ndarray
    """(S,) mean exact V*-advantage of the first chain: 0 for an optimal move, negative otherwise."""
    parse_failure: np.ndarray
    """(S,) fraction of all chains proposed from episodes of this state that did not parse."""

    def summary(self) -> dict:
        first = self.episodes.first
        return {"states": len(self.states), "episodes": len(self.episodes.outcomes),
                "success_rate": float(self.success.mean()), "first_chain_v*_advantage": float(self.advantage.mean()),
                "parse_failure_rate": float(np.mean([not f for ep in self.episodes.parsed_ok for f in ep])),
                "distinct_answers": len(set(first.samples.texts)),
                "distinct_chains": len({tuple(p.moves) for p in first.parsed if p.ok})}


def first_chain_advantages(outcomes: list[ChainOutcome], V_star: np.ndarray, gamma: float) -> np.ndarray:
    """Exact V*-advantage of each chain: R + γ^k V*(s′)(1 − done) − V*(s)."""
    judge = exact_judge(V_star)
    v, vn = judge([o.state for o in outcomes]), judge([o.next_state for o in outcomes])
    return np.array([chain_advantage(o.chain_return(gamma), o.k, a, b, o.done, gamma)
                     for o, a, b in zip(outcomes, v, vn)])


def evaluate(actor: Actor, states: list[State], V_star: np.ndarray, k: int, temperature: float | None = None,
             seed: int | None = None) -> Evaluation:
    """``k`` episodes per state at ``temperature`` (0 = greedy, then use k = 1), budget ``cfg.max_chains``."""
    starts = [s for s in states for _ in range(k)]
    eps = run_episodes(actor, starts, actor.cfg.max_chains, temperature=temperature, seed=seed)
    S = len(states)
    success = eps.success().reshape(S, k).mean(1)
    adv = first_chain_advantages([ep[0] for ep in eps.outcomes], V_star, actor.cfg.gamma).reshape(S, k).mean(1)
    fail = np.array([np.mean([not f for i in range(j * k, (j + 1) * k) for f in eps.parsed_ok[i]]) for j in range(S)])
    return Evaluation(list(states), k, eps, success, adv, fail)


def chain_baselines(env: GridWorld, states: list[State], V_star: np.ndarray, cfg: LactChainConfig) -> dict:
    """Exact per-state success and first-chain V*-advantage of two actors that ignore the state:
    ``random``: a uniformly random move of the menu each chain; ``constant``: the one menu move that,
    repeated every chain, reaches the goal from the most start states (picked with hindsight)."""
    chains = menu(cfg.max_cells)

    def p_success(s: State, left: int) -> float:  # probability a random menu move per chain reaches the goal
        if left == 0:
            return 0.0
        total = 0.0
        for c in chains:
            o = execute_chain(env, s, c, cfg.empty_chain_penalty)
            total += 1.0 if o.done else p_success(o.next_state, left - 1)
        return total / len(chains)

    def constant_success(s: State, c: list[str]) -> float:
        for _ in range(cfg.max_chains):
            o = execute_chain(env, s, c, cfg.empty_chain_penalty)
            if o.done:
                return 1.0
            s = o.next_state
        return 0.0

    per_chain = [np.array([constant_success(s, c) for s in states]) for c in chains]
    best = int(np.argmax([p.mean() for p in per_chain]))
    adv = {i: first_chain_advantages([execute_chain(env, s, chains[i], 0.0) for s in states], V_star, cfg.gamma)
           for i in range(len(chains))}
    return {"random": {"success": np.array([p_success(s, cfg.max_chains) for s in states]),
                       "advantage": np.mean([adv[i] for i in adv], axis=0)},
            "constant": {"success": per_chain[best], "advantage": adv[best], "chain": chains[best]}}


# ============================================================================================
# Stage 2: preference pairs and SimPO
# ============================================================================================
@dataclass
class PreferencePairs:
    """Scored proposals and their best-vs-worst pairs; ``chosen[j]`` / ``rejected[j]`` index rows of
    ``proposals.samples`` that answer the same state."""

    proposals: Proposals
    outcomes: list[ChainOutcome]
    advantages: list[float]
    values: list[float]
    next_values: list[float]
    chosen: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    ties: int = 0

    def __len__(self) -> int:
        return len(self.chosen)

    @property
    def ok(self) -> list[bool]:
        return [p.ok for p in self.proposals.parsed]


def rank_key(ok: bool, advantage: float) -> tuple[int, float]:
    """The judge's order: every parse failure below every valid chain, then by advantage."""
    return (1 if ok else 0, float(advantage))


def best_worst_pairs(row_states: list[State], ok: list[bool], advantages: list[float],
                     tie_tolerance: float = 1e-6) -> tuple[list[int], list[int], int]:
    """Per state: its best row (by ``rank_key``) is chosen, its worst rejected; a state whose best and
    worst are equal (both failures, or advantages within ``tie_tolerance``) is a tie and gives no pair.
    Returns (chosen rows, rejected rows, number of ties)."""
    groups: dict[State, list[int]] = {}
    for i, s in enumerate(row_states):
        groups.setdefault(s, []).append(i)
    chosen, rejected, ties = [], [], 0
    for rows in groups.values():
        if len(rows) < 2:
            continue
        keys = {i: rank_key(ok[i], advantages[i]) for i in rows}
        best, worst = max(rows, key=keys.get), min(rows, key=keys.get)
        kb, kw = keys[best], keys[worst]
        if kb[0] == kw[0] and (kb[0] == 0 or kb[1] - kw[1] <= tie_tolerance):
            ties += 1
            continue
        chosen.append(best)
        rejected.append(worst)
    return chosen, rejected, ties


def score_proposals(proposals: Proposals, outcomes: list[ChainOutcome], judge: Callable[[list[State]], np.ndarray],
                    cfg: LactChainConfig) -> PreferencePairs:
    """Score executed proposals with ``judge`` (state values: the critic or exact V*) and pair them."""
    v = [float(x) for x in judge([o.state for o in outcomes])]
    v_next = [float(x) for x in judge([o.next_state for o in outcomes])]
    adv = [chain_advantage(o.chain_return(cfg.gamma), o.k, a, b, o.done, cfg.gamma) for o, a, b in zip(outcomes, v, v_next)]
    ok = [p.ok for p in proposals.parsed]
    chosen, rejected, ties = best_worst_pairs([o.state for o in outcomes], ok, adv, cfg.tie_tolerance)
    return PreferencePairs(proposals, outcomes, adv, v, v_next, chosen, rejected, ties)


@torch.no_grad()
def collect_preferences(actor: Actor, judge, states: list[State], cfg: LactChainConfig, n: int | None = None,
                        seed: int | None = None) -> PreferencePairs:
    """``n`` chains per state (one batched call), each executed once, scored by ``judge``, paired best vs worst."""
    props = actor.propose(states, n=n or cfg.samples_per_state, seed=seed)
    outcomes = [execute_chain(actor.env, s, p.moves, cfg.empty_chain_penalty)
                for s, p in zip(props.row_states(), props.parsed)]
    return score_proposals(props, outcomes, judge, cfg)


def simpo_loss(chosen_logp: torch.Tensor, chosen_mask: torch.Tensor, rejected_logp: torch.Tensor,
               rejected_mask: torch.Tensor, beta: float = 2.0, gamma: float = 0.5) -> tuple[torch.Tensor, dict]:
    """SimPO: L = −log σ( β·(mean_t log π(y_w) − mean_t log π(y_l)) − γ ), averaged over pairs.

    chosen_logp, rejected_logp: (B, C) per-token log-probs (0 on padding); masks (B, C).
    """
    chosen = masked_mean(chosen_logp, chosen_mask, dim=1)  # (B,) length-normalised
    rejected = masked_mean(rejected_logp, rejected_mask, dim=1)  # (B,)
    margin = beta * (chosen - rejected) - gamma  # (B,)
    loss = -F.logsigmoid(margin).mean()
    with torch.no_grad():
        stats = {"losses/simpo": loss.item(), "stats/margin": margin.mean().item(),
                 "stats/logp_chosen": chosen.mean().item(), "stats/logp_rejected": rejected.mean().item(),
                 "stats/logp_gap": (chosen - rejected).mean().item(),
                 "stats/pref_accuracy": (chosen > rejected).float().mean().item()}
    return loss, stats


def _pair_logps(model, s: Samples, chosen: list[int], rejected: list[int]):
    """Per-token log-probs of chosen and rejected rows in ONE forward pass: (B, C) each, with masks."""
    rows = torch.tensor(chosen + rejected)
    dev = next(model.parameters()).device
    sub = s.select(rows.tolist())  # drops padding columns no row of this batch needs
    mask = sub.completion_mask.to(dev)
    logp = completion_logprobs(model, sub.prompt_ids.to(dev), sub.prompt_mask.to(dev), sub.completion_ids.to(dev), mask)
    B = len(chosen)
    return logp[:B], mask[:B], logp[B:], mask[B:]


@torch.no_grad()
def preference_stats(model, pairs: PreferencePairs, cfg: LactChainConfig) -> dict:
    """SimPO loss, margin, accuracy and log-prob gap over ALL pairs, in eval mode (no dropout)."""
    if not len(pairs):
        raise ValueError("no preference pairs (every state was a tie): sample more per state")
    was = model.training
    model.eval()
    parts = [_pair_logps(model, pairs.proposals.samples, pairs.chosen[i:i + cfg.simpo_batch],
                         pairs.rejected[i:i + cfg.simpo_batch]) for i in range(0, len(pairs), cfg.simpo_batch)]
    model.train(was)
    C = max(p[0].shape[1] for p in parts)
    pad = lambda x: F.pad(x, (0, C - x.shape[1]))
    cat = [torch.cat([pad(p[j]) for p in parts]) for j in range(4)]
    _, stats = simpo_loss(*cat, beta=cfg.simpo_beta, gamma=cfg.simpo_gamma)
    return stats


def train_simpo(model, pairs: PreferencePairs, cfg: LactChainConfig, tracker=None, optimizer=None,
                step0: int = 0) -> list[dict]:
    """``cfg.simpo_epochs`` passes of SimPO over the pairs (shuffled minibatches); returns per-step stats
    (measured on each minibatch before its update)."""
    if not len(pairs):
        raise ValueError("no preference pairs (every state was a tie): sample more per state")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the actor has no trainable parameters: attach LoRA first (rlnlp.attach_lora)")
    opt = optimizer or torch.optim.AdamW(params, lr=cfg.simpo_lr)
    model.train()
    history, step = [], step0
    gen = torch.Generator().manual_seed(cfg.seed + step0)
    for epoch in range(cfg.simpo_epochs):
        order = torch.randperm(len(pairs), generator=gen).tolist()
        for start in progress(range(0, len(order), cfg.simpo_batch), desc=f"SimPO epoch {epoch}", leave=False):
            idx = order[start:start + cfg.simpo_batch]
            cw, mw, cl, ml = _pair_logps(model, pairs.proposals.samples, [pairs.chosen[i] for i in idx],
                                         [pairs.rejected[i] for i in idx])
            loss, stats = simpo_loss(cw, mw, cl, ml, beta=cfg.simpo_beta, gamma=cfg.simpo_gamma)
            opt.zero_grad()
            loss.backward()
            opt.step()
            stats["epoch"] = epoch
            history.append({"step": step, **stats})
            if tracker is not None:
                tracker.log(step, stats)
            step += 1
    return history


def round_summary(pairs: PreferencePairs) -> dict:
    """What one round's samples looked like: pairs, ties, parse failures and 1-chain success of the samples."""
    return {"pairs": len(pairs), "ties": pairs.ties, "samples": len(pairs.outcomes),
            "parse_failure_rate": 1.0 - float(np.mean(pairs.ok)),
            "one_chain_success": float(np.mean([o.done for o in pairs.outcomes]))}


def simpo_rounds(actor: Actor, judge, first_pairs: PreferencePairs, states: list[State], cfg: LactChainConfig,
                 tracker=None, name: str = "") -> tuple[list[dict], list[dict]]:
    """``cfg.rounds`` rounds of (pairs → SimPO); round 0 trains on ``first_pairs`` (e.g. the before-evaluation's
    samples), every later round first collects ``cfg.samples_per_state`` fresh chains per state with the
    current actor. One AdamW optimizer throughout. Returns (per-step history, per-round summaries)."""
    params = [p for p in actor.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.simpo_lr)
    history, rounds, pairs = [], [], first_pairs
    for r in range(cfg.rounds):
        if r:
            pairs = collect_preferences(actor, judge, states, cfg, seed=cfg.seed + 100 * r)
        summary = {"round": r, **round_summary(pairs)}
        rounds.append(summary)
        if len(pairs):
            history += [{"round": r, **h} for h in train_simpo(actor.model, pairs, cfg, tracker, opt, step0=len(history))]
        if name:
            print(f"[{name}] round {r}: {summary}")
    return history, rounds


def adapter_state(model) -> dict[str, torch.Tensor]:
    """A copy of the LoRA weights (to restart another run from the same init)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def load_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    missing = model.load_state_dict(state, strict=False)
    if any("lora_" in k for k in missing.missing_keys):
        raise ValueError("the saved adapter state does not cover every LoRA weight of this model")


# ============================================================================================
# Helpers for the notebook: the explorer and critic checks
# ============================================================================================
def explorer_steps(pairs: PreferencePairs, V_star: np.ndarray, gamma: float, limit: int = 60) -> list[dict]:
    """One dict per state of the preference data: its proposals, their returns and the judge's scores."""
    by_state: dict[State, list[int]] = {}
    for i, o in enumerate(pairs.outcomes):
        by_state.setdefault(o.state, []).append(i)
    chosen, rejected = set(pairs.chosen), set(pairs.rejected)
    steps = []
    for state, rows in list(by_state.items())[:limit]:
        x, y, o = state
        row = {"state": f"({x}, {y}) facing {COMPASS[o]}", "V*(s)": round(float(V_star[o, y, x]), 2),
               "judge V(s)": round(pairs.values[rows[0]], 2)}
        for j in rows:
            out, parsed = pairs.outcomes[j], pairs.proposals.parsed[j]
            tag = "chosen" if j in chosen else "rejected" if j in rejected else ""
            row[f"#{j}: {pairs.proposals.texts[j]!r}"] = (
                f"{parsed.move or 'parse failure'} | return {out.chain_return(gamma):+.1f}, k {out.k}, "
                f"goal {out.done} | A {pairs.advantages[j]:+.2f} {tag}")
        steps.append(row)
    return steps


def greedy_agreement(q_grid: dict[str, np.ndarray], Q_star: dict, states: list[State]) -> float:
    """Fraction of ``states`` where the greedy move of ``q_grid`` is optimal under ``Q_star``."""
    hits = []
    for x, y, o in states:
        pick = max(q_grid, key=lambda a: q_grid[a][o, y, x])
        best = max(Q_star[(x, y, o)].values())
        hits.append(Q_star[(x, y, o)][pick] >= best - 1e-9)
    return float(np.mean(hits))


def q_grid(env: GridWorld, V: np.ndarray, gamma: float) -> dict[str, np.ndarray]:
    """Q(s, a) = r(s, a) + γ (1 − goal) V(s′) for each grid move, as (4, size, size) grids."""
    out = {}
    for a in env.actions:
        Q = np.full((4, env.size, env.size), np.nan)
        for s in env.start_states():
            (x2, y2, o2), r, done = env.move(s, a)
            x, y, o = s
            Q[o, y, x] = r + (0.0 if done else gamma * V[o2, y2, x2])
        out[a] = Q
    return out


def mean_return_by_state(samples: list[MCSample], critic: Critic | None = None) -> tuple[list[State], list[float]]:
    """Visited states (sorted) and the mean Monte-Carlo target from each (bootstrapped by ``critic`` if given)."""
    by_state: dict[State, list[float]] = {}
    tails = critic.values([s.tail_state for s in samples]) if critic is not None else np.zeros(len(samples))
    for s, v in zip(samples, tails):
        by_state.setdefault(s.state, []).append(s.partial + s.tail_discount * float(v))
    states = sorted(by_state)
    return states, [float(np.mean(by_state[s])) for s in states]


__all__ = [
    "LactChainConfig", "DIRECTIONS", "ANSWER_PREFIX", "rules", "goal_offset", "state_text", "actor_prompt",
    "ParsedChain", "parse_move", "move_complete", "menu", "ChainOutcome", "execute_chain", "chain_advantage",
    "MCSample", "mc_samples", "episode_samples", "scripted_samples", "scripted_policy", "grid_values", "exact_judge",
    "Critic", "fit_critic", "split_states", "spearman", "Proposals", "Actor", "ActorEpisodes", "run_episodes",
    "Evaluation", "first_chain_advantages", "evaluate", "chain_baselines", "PreferencePairs", "rank_key",
    "best_worst_pairs", "score_proposals", "collect_preferences", "simpo_loss", "preference_stats", "train_simpo",
    "round_summary", "simpo_rounds", "adapter_state", "load_adapter_state", "explorer_steps", "greedy_agreement",
    "q_grid", "mean_return_by_state",
]
