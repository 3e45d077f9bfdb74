"""LactChain (spec 02): an LM actor proposes chains of moves, an embedding critic learns state
values by Monte-Carlo, then the critic judges pairs of the actor's proposals and SimPO trains the actor.

Pipeline (notebook 02 runs it top to bottom):

    actor   SmolLM2-135M-Instruct + LoRA (r 8, α 32, q/k/v/o, dropout 0.05). The prompt gives the
            rules, the state text and the info text; the answer is JSON
            {"moves": ["turn left", ...], "explain": "..."} (the spec's object; moves first so a
            token cap that cuts the explanation keeps them) and ``parse_chain`` turns it into moves.
    critic  frozen MiniLM sentence embedding (cached per text) of ``state text + "\\n" + info``
            → a small MLP → V(s). MiniLM is bidirectional and mean-pooled, unlike the original's
            token-0 hidden state of a causal decoder (which sees only itself: a constant).
    stage 1 Monte-Carlo: discounted returns G_t (γ 0.99) of frozen-policy episodes, fit V with
            smooth-L1 on globally scaled returns G / value_scale (the original z-scored returns
            inside each episode, which erases the scale the advantages of stage 2 need).
    stage 2 two chains per uniformly sampled start state, both executed; each scored by the
            k-step advantage  A = R_chain + γ^k · V(s′) · (1 − done) − V(s); higher = chosen,
            ties dropped; SimPO on the pairs.

What k is. A chain is a macro-action of several per-move transitions, so the discount follows the
moves: k = the number of moves actually executed (a chain that reaches the goal stops there), and
R_chain = Σ_{i<k} γ^i r_i is discounted inside the chain. A is then exactly the k-step TD advantage
on the per-move MDP whose exact values (``value_iteration``) are the critic's ground truth. An
empty chain (nothing parsed, an unknown move, or an explicit ``"moves": []``) is a wasted step:
state unchanged, one tick (k = 1), reward ``cfg.empty_chain_penalty``.

Why our own SimPO loss instead of TRL's CPOTrainer(loss_type="simpo"): the preference pairs are
built on the fly from sampled token ids we already hold (prompt ids, completion ids, masks from
``rlnlp.sampling.sample``); the loss is three lines over ``completion_logprobs``; a trainer would
re-tokenise text, add its own batching/logging, and hide the quantity this notebook plots (the
margin β·Δ − γ on the training pairs). Owning it also makes it unit-testable against a hand sum.

SimPO (Meng et al. 2024):  L = −log σ( β·(mean log π(y_w|x) − mean log π(y_l|x)) − γ )
with per-token MEAN log-probs (length-normalised) and no reference model. β 2.0, γ 0.5 follow
the SimPO paper's range; the original's β 0.1 is the DPO default, which with length-normalised
log-probs (differences ≈ 0.1–1 nat) makes the loss flat and the gradient tiny.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .envs.gridworld import COMPASS, GridWorld, State, epsilon_greedy, sample_action, value_iteration
from .models import completion_logprobs, masked_mean
from .returns import discounted_returns
from .sampling import Samples, render_prompts, sample
from .tracking import progress


@dataclass
class LactChainConfig:
    """Every knob of notebook 02. ``.smoke()`` = CPU minutes, ``.full()`` = one GPU, minutes."""

    seed: int = 0
    """Seed for Python / NumPy / torch and the start-state draws."""
    gamma: float = 0.99
    """Per-MOVE discount (a chain of k moves discounts by γ^k), as the original."""
    # ---- actor -----------------------------------------------------------------------------
    lora_r: int = 8
    """LoRA rank (original: 8)."""
    lora_alpha: int = 32
    """LoRA α (original: 32)."""
    lora_dropout: float = 0.05
    """LoRA dropout (original: 0.05)."""
    max_new_tokens: int = 48
    """Token cap of one JSON answer. Short, because SmolLM2 on CPU samples ~90 tokens/s."""
    temperature: float = 1.0
    """Sampling temperature for rollouts and preference pairs (two different chains need diversity)."""
    eval_temperature: float = 0.0
    """Temperature for the before/after evaluation; 0 = greedy (smoke: few episodes, so no sampling noise)."""
    batch_size: int = 64
    """Rows per generation batch."""
    empty_chain_penalty: float = -5.0
    """Reward of a step whose answer yields no moves (unparsable, unknown move or empty list). The
    original had no parser failure path; −5 ≈ five wasted moves, so a broken answer loses to any
    short valid chain that does not walk far from the goal."""
    # ---- critic ----------------------------------------------------------------------------
    critic_hidden: int = 128
    """Width of the MLP value head on the 384-d MiniLM embedding (original: a linear Q-head on 4096-d)."""
    critic_lr: float = 3e-3
    """Adam learning rate of the value head."""
    critic_steps: int = 600
    """Full-batch gradient steps per critic fit (embeddings are cached, so steps are cheap)."""
    value_scale: float = 100.0
    """Returns are fitted as G / value_scale (the goal reward): one global scale, not per-episode z-scores."""
    huber_delta: float = 1.0
    """Smooth-L1 β in scaled units (1.0 = 100 reward points): quadratic for ordinary errors, so V fits the
    MEAN return (a small β fits the median, which for bimodal reached/not-reached returns is not V)."""
    scripted_epsilon: float = 0.3
    """ε of the scripted ε-greedy policy whose exact V^π checks the critic (check (a))."""
    scripted_episodes: int = 200
    """Episodes of the scripted policy (one move per step) for check (a)."""
    scripted_max_moves: int = 100
    """Move cap of a scripted episode; γ^100 ≈ 0.37 but ε-greedy reaches the goal long before."""
    heldout_fraction: float = 0.25
    """Fraction of the 60 start states never used as critic targets in check (a)."""
    actor_episodes: int = 64
    """LM-actor episodes for the critic used in stage 2 (check (b))."""
    max_chains: int = 4
    """Chains per LM episode (the original's max steps); returns are truncated there."""
    # ---- stage 2: preferences and SimPO ----------------------------------------------------
    pref_states: int = 128
    """Start states (uniform over the 60 non-terminal ones, with replacement) for preference pairs."""
    simpo_beta: float = 2.0
    """SimPO β (original 0.1, a DPO leftover: too flat for length-normalised log-probs)."""
    simpo_gamma: float = 0.5
    """SimPO target margin γ (nats of mean log-prob × β)."""
    simpo_lr: float = 1e-4
    """AdamW learning rate of the LoRA weights. Adam's first steps move EVERY adapter weight by ≈ lr, so
    5e-4 on a handful of pairs already rewrites the greedy answers of a 135M model (seen in smoke runs)."""
    simpo_epochs: int = 2
    """Passes over the preference pairs."""
    simpo_batch: int = 8
    """Pairs per gradient step (each step runs 2 × this many sequences)."""
    tie_tolerance: float = 1e-6
    """|A_a − A_b| at or below this is a tie and the pair is dropped."""
    eval_states: int = 120
    """Episodes of the before/after evaluation, cycling over the 60 start states (full: 240 = each state 4×,
    sampled at ``eval_temperature`` 0.7 so repeats are not copies; smoke: 6 greedy episodes)."""

    @classmethod
    def smoke(cls) -> "LactChainConfig":
        """A few minutes on a 2-core CPU: a handful of generations and SimPO steps."""
        return cls(scripted_episodes=150, critic_steps=300, actor_episodes=6, max_chains=2, pref_states=8,
                   simpo_epochs=1, simpo_batch=4, eval_states=6, batch_size=16, max_new_tokens=32)

    @classmethod
    def full(cls) -> "LactChainConfig":
        """One GPU, minutes."""
        return cls(scripted_episodes=1000, critic_steps=2000, actor_episodes=256, max_chains=4, pref_states=512,
                   simpo_epochs=3, simpo_batch=16, eval_states=240, eval_temperature=0.7, batch_size=128)


# ============================================================================================
# Text: state, prompt, parser
# ============================================================================================
RULES = ("You move an agent in a 4x4 grid. Positions are (x, y): x grows to the east, y grows to the south. "
         'The only moves are "move forward" (one cell the way you face; walls block) and "turn left" '
         "(rotate 90 degrees counter-clockwise: north -> west -> south -> east -> north). "
         "Reach the goal with as few moves as possible.")
ANSWER_FORMAT = ('Answer with JSON only, for example {"moves": ["turn left", "move forward"], "explain": "face west, go"}. '
                 'Use only the two moves, as many as needed.')
ANSWER_PREFIX = '{"moves": ["'
"""The assistant turn is opened with this text, so a 135M model starts inside the JSON answer. The moves
come before the explanation so a token cap that cuts a rambling explanation leaves the moves intact."""


def state_text(env: GridWorld, state: State) -> str:
    """What both actor and critic read: ``describe(state) + "\\n" + info``."""
    return env.describe(state) + "\n" + env.info_text


def actor_prompt(env: GridWorld, state: State) -> list[dict]:
    """Chat messages: the rules as the system turn, state, info and answer format as the user turn."""
    user = f"State: {env.describe(state)}\nInfo: {env.info_text}\n{ANSWER_FORMAT}"
    return [{"role": "system", "content": RULES}, {"role": "user", "content": user}]


@dataclass
class ParsedChain:
    """The moves read from one answer; ``ok`` is False on a parse failure (then ``moves`` is empty)."""

    moves: list[str]
    ok: bool
    error: str = ""
    explain: str = ""


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)


def parse_chain(text: object, actions: list[str]) -> ParsedChain:
    """Read a chain of moves from a model answer. Never raises.

    Accepted, exactly:
      * the first JSON object in the text (``json.raw_decode`` from the first "{"; text before it
        and after it is ignored), or, if the text has a ``` / ```json fence, the first object inside it;
      * if that object is broken (e.g. the token cap cut the explanation), a complete JSON list right
        after the first ``"moves":`` in it — the moves come first in our format, so they survive;
      * a key "moves" (any letter case) whose value is a list of strings;
      * each move equal to one of ``actions`` after lower-casing and collapsing whitespace
        ("Turn  Left" → "turn left"); nothing else (no "left", no "forward").
    Anything else — no object, broken or truncated JSON, no "moves", a non-list, a non-string
    or unknown move — is a failure: ``ok=False``, no moves, ``error`` says which. An explicit
    empty list parses fine (``ok=True``) and yields an empty chain.
    """
    if not isinstance(text, str):
        return ParsedChain([], False, f"answer is {type(text).__name__}, not text")
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced else text
    start = body.find("{")
    if start < 0:
        return ParsedChain([], False, "no JSON object")
    try:
        obj, _ = json.JSONDecoder().raw_decode(body[start:])
    except (ValueError, RecursionError) as err:
        obj = _salvage_moves(body[start:])
        if obj is None:
            return ParsedChain([], False, f"invalid JSON ({err.__class__.__name__})")
    if not isinstance(obj, dict):
        return ParsedChain([], False, "JSON is not an object")
    keys = {str(k).lower(): v for k, v in obj.items()}
    explain = keys.get("explain")
    explain = explain if isinstance(explain, str) else ""
    if "moves" not in keys:
        return ParsedChain([], False, 'no "moves" key', explain)
    raw = keys["moves"]
    if not isinstance(raw, list):
        return ParsedChain([], False, '"moves" is not a list', explain)
    moves = []
    for m in raw:
        norm = " ".join(m.lower().split()) if isinstance(m, str) else None
        if norm not in actions:
            return ParsedChain([], False, f"unknown move {m!r:.40}", explain)
        moves.append(norm)
    return ParsedChain(moves, True, "", explain)


_MOVES_KEY = re.compile(r'"moves"\s*:\s*(?=\[)', re.IGNORECASE)


def _salvage_moves(body: str) -> dict | None:
    """``{"moves": <list>}`` from a broken object whose "moves" list itself is complete, else None."""
    key = _MOVES_KEY.search(body)
    if key is None:
        return None
    try:
        moves, _ = json.JSONDecoder().raw_decode(body[key.end():])
    except (ValueError, RecursionError):
        return None
    return {"moves": moves}


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


def episode_returns(outcomes: list[ChainOutcome], gamma: float) -> list[float]:
    """Monte-Carlo return from the start state of each chain of one episode (truncated at its end).

    The chains are flattened into per-move transitions so ``discounted_returns`` discounts per
    move; the return of chain t is G at its first move.
    """
    rewards = [r for o in outcomes for r in o.rewards]
    dones = [0.0] * len(rewards)
    if outcomes and outcomes[-1].done:
        dones[-1] = 1.0
    G = discounted_returns(torch.tensor(rewards), torch.tensor(dones), gamma).tolist()
    first, out = 0, []
    for o in outcomes:
        out.append(G[first])
        first += o.k
    return out


def scripted_samples(env: GridWorld, policy, n_episodes: int, max_moves: int, gamma: float,
                     rng: random.Random) -> list[tuple[State, float]]:
    """(state, G) for every visited state of ``n_episodes`` one-move-per-step episodes of ``policy``,
    each from a uniformly drawn start state. Unbiased for V^π(s) up to the (negligible) truncation."""
    starts = env.start_states()
    out = []
    for _ in range(n_episodes):
        s = rng.choice(starts)
        states, rewards, dones = [], [], []
        for _ in range(max_moves):
            a = sample_action(policy(s), rng)
            s2, r, done = env.move(s, a)
            states.append(s)
            rewards.append(r)
            dones.append(float(done))
            s = s2
            if done:
                break
        G = discounted_returns(torch.tensor(rewards), torch.tensor(dones), gamma)
        out.extend(zip(states, G.tolist()))
    return out


def scripted_policy(env: GridWorld, epsilon: float, gamma: float):
    """ε-greedy on Q* (the scripted policy of check (a))."""
    _, Q = value_iteration(env, gamma)
    return epsilon_greedy(env, Q, epsilon)


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
        emb = self.encoder.embed([state_text(self.env, s) for s in states])  # (B, D)
        return emb.to(next(self.head.parameters()).device)

    def scaled(self, states: list[State]) -> torch.Tensor:
        """V(s) / value_scale, (B,)."""
        return self.head(self.embed(states)).squeeze(-1)

    def forward(self, states: list[State]) -> torch.Tensor:
        """V(s) in reward units, (B,)."""
        return self.scaled(states) * self.value_scale

    @torch.no_grad()
    def grid(self) -> np.ndarray:
        """V over all 64 states as ``(4, size, size)`` [o, y, x]; goal cells NaN (terminal)."""
        V = np.full((4, self.env.size, self.env.size), np.nan)
        states = self.env.start_states()
        for (x, y, o), v in zip(states, self(states).cpu().tolist()):
            V[o, y, x] = v
        return V

    @torch.no_grad()
    def q_grid(self, gamma: float) -> dict[str, np.ndarray]:
        """The critic's value of each move: Q(s, a) = r(s, a) + γ (1 − goal) V(s′), per move as (4, size, size)."""
        states = self.env.start_states()
        out = {}
        for a in self.env.actions:
            nxt = [self.env.move(s, a) for s in states]
            v_next = self([s2 for s2, _, _ in nxt]).cpu().tolist()
            Q = np.full((4, self.env.size, self.env.size), np.nan)
            for (x, y, o), (_, r, done), v in zip(states, nxt, v_next):
                Q[o, y, x] = r + (0.0 if done else gamma * v)
            out[a] = Q
        return out


def fit_critic(critic: Critic, samples: list[tuple[State, float]], cfg: LactChainConfig, tracker=None,
               prefix: str = "critic") -> list[float]:
    """Fit V to Monte-Carlo returns with smooth-L1 on G / value_scale (full batch, Adam). Returns the losses."""
    if not samples:
        raise ValueError("fit_critic got no (state, return) samples")
    unique = list(dict.fromkeys(s for s, _ in samples))
    row = {s: i for i, s in enumerate(unique)}
    emb = critic.embed(unique)  # (S, D): each distinct state is embedded once
    index = torch.tensor([row[s] for s, _ in samples], device=emb.device)  # (N,)
    target = torch.tensor([g for _, g in samples], dtype=torch.float32, device=emb.device) / critic.value_scale  # (N,)
    opt = torch.optim.Adam(critic.head.parameters(), lr=cfg.critic_lr)
    losses = []
    for step in progress(range(cfg.critic_steps), desc=f"fit {prefix}", leave=False):
        # L = mean_i smooth_L1(V(s_i)/scale, G_i/scale)
        loss = F.smooth_l1_loss(critic.head(emb).squeeze(-1)[index], target, beta=cfg.huber_delta)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if tracker is not None and (step % 10 == 0 or step == cfg.critic_steps - 1):
            tracker.log(step, {f"losses/{prefix}": loss.item()})
    return losses


def split_states(env: GridWorld, heldout_fraction: float, rng: random.Random) -> tuple[list[State], list[State]]:
    """(train, held-out) partition of the non-terminal states."""
    states = env.start_states()
    rng.shuffle(states)
    n_held = max(1, round(heldout_fraction * len(states)))
    return states[n_held:], states[:n_held]


def value_report(predicted: np.ndarray, exact: np.ndarray, states: list[State], constant: float) -> dict:
    """Spearman ρ and MAE of predicted vs exact values on ``states``, and the MAE of a constant predictor."""
    from scipy.stats import spearmanr

    p = np.array([predicted[o, y, x] for x, y, o in states])
    e = np.array([exact[o, y, x] for x, y, o in states])
    return {"n_states": len(states), "spearman": float(spearmanr(p, e).statistic), "mae": float(np.abs(p - e).mean()),
            "mae_constant": float(np.abs(constant - e).mean())}


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


class Actor:
    """The LM actor: renders prompts (assistant turn opened with ``ANSWER_PREFIX``), samples, parses."""

    def __init__(self, model, tokenizer, env: GridWorld, cfg: LactChainConfig):
        self.model, self.tokenizer, self.env, self.cfg = model, tokenizer, env, cfg

    def prompts(self, states: list[State]) -> list[str]:
        chats = render_prompts(self.tokenizer, [actor_prompt(self.env, s) for s in states])
        return [c + ANSWER_PREFIX for c in chats]

    def propose(self, states: list[State], n: int = 1, temperature: float | None = None, seed: int | None = None) -> Proposals:
        """``n`` chains per state, one batched ``sample`` call; stops when the JSON object closes."""
        samples = sample(self.model, self.tokenizer, self.prompts(states), n=n, chat=False,
                         max_new_tokens=self.cfg.max_new_tokens,
                         temperature=self.cfg.temperature if temperature is None else temperature,
                         stop=_json_closed, batch_size=self.cfg.batch_size, seed=seed)
        parsed = [parse_chain(ANSWER_PREFIX + t, self.env.actions) for t in samples.texts]
        return Proposals(list(states), samples, parsed)


def _json_closed(completion: str) -> bool:
    """True once the answer's braces balance (the prefix opened one)."""
    return completion.count("}") > completion.count("{")


@dataclass
class ActorEpisodes:
    """LM-actor episodes run in lockstep: per episode, its chain outcomes and parse flags."""

    outcomes: list[list[ChainOutcome]]
    parsed_ok: list[list[bool]]

    def returns(self, gamma: float) -> list[list[float]]:
        return [episode_returns(o, gamma) for o in self.outcomes]

    def samples(self, gamma: float) -> list[tuple[State, float]]:
        """(state, Monte-Carlo return) for every chain start."""
        return [(o.state, g) for ep, gs in zip(self.outcomes, self.returns(gamma)) for o, g in zip(ep, gs)]

    def summary(self, gamma: float) -> dict:
        flags = [f for ep in self.parsed_ok for f in ep]
        starts = [g[0] for g in self.returns(gamma)]
        return {"episodes": len(self.outcomes), "chains": len(flags),
                "success_rate": float(np.mean([ep[-1].done for ep in self.outcomes])),
                "mean_return": float(np.mean(starts)), "parse_failure_rate": 1.0 - float(np.mean(flags))}


def run_episodes(actor: Actor, starts: list[State], max_chains: int, temperature: float | None = None,
                 seed: int | None = None) -> ActorEpisodes:
    """One episode per start state, ≤ ``max_chains`` chains each; every chain step is ONE batched generation."""
    outcomes = [[] for _ in starts]
    ok = [[] for _ in starts]
    current = list(starts)
    running = list(range(len(starts)))
    for t in progress(range(max_chains), desc="actor episodes", leave=False):
        if not running:
            break
        props = actor.propose([current[i] for i in running], temperature=temperature,
                              seed=None if seed is None else seed + t)
        still = []
        for i, p in zip(running, props.parsed):
            o = execute_chain(actor.env, current[i], p.moves, actor.cfg.empty_chain_penalty)
            outcomes[i].append(o)
            ok[i].append(p.ok)
            current[i] = o.next_state
            if not o.done:
                still.append(i)
        running = still
    return ActorEpisodes(outcomes, ok)


# ============================================================================================
# Stage 2: preference pairs and SimPO
# ============================================================================================
@dataclass
class PreferencePairs:
    """Two proposals per state; ``chosen[j]`` / ``rejected[j]`` index rows of ``proposals.samples``."""

    proposals: Proposals
    outcomes: list[ChainOutcome]
    advantages: list[float]
    values: list[float]
    chosen: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    ties: int = 0

    def __len__(self) -> int:
        return len(self.chosen)


def make_pairs(advantages: list[float], tie_tolerance: float = 1e-6) -> tuple[list[int], list[int], int]:
    """Rows (2i, 2i+1) answer the same state: the higher advantage is chosen; ties dropped.
    Returns (chosen rows, rejected rows, number of ties)."""
    if len(advantages) % 2:
        raise ValueError(f"make_pairs needs two advantages per state, got {len(advantages)} values")
    chosen, rejected, ties = [], [], 0
    for i in range(0, len(advantages), 2):
        a, b = advantages[i], advantages[i + 1]
        if abs(a - b) <= tie_tolerance:
            ties += 1
        elif a > b:
            chosen.append(i)
            rejected.append(i + 1)
        else:
            chosen.append(i + 1)
            rejected.append(i)
    return chosen, rejected, ties


@torch.no_grad()
def collect_preferences(actor: Actor, critic: Critic, states: list[State], cfg: LactChainConfig,
                        seed: int | None = None) -> PreferencePairs:
    """Two chains per state, each executed once and scored by A = R + γ^k V(s′)(1 − done) − V(s)."""
    props = actor.propose(states, n=2, seed=seed)
    outcomes = [execute_chain(actor.env, states[int(i)], p.moves, cfg.empty_chain_penalty)
                for i, p in zip(props.samples.prompt_index, props.parsed)]
    v = critic([o.state for o in outcomes]).cpu().tolist()
    v_next = critic([o.next_state for o in outcomes]).cpu().tolist()
    adv = [chain_advantage(o.chain_return(cfg.gamma), o.k, vs, vn, o.done, cfg.gamma)
           for o, vs, vn in zip(outcomes, v, v_next)]
    chosen, rejected, ties = make_pairs(adv, cfg.tie_tolerance)
    return PreferencePairs(props, outcomes, adv, v, chosen, rejected, ties)


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
    logp = completion_logprobs(model, s.prompt_ids[rows].to(dev), s.prompt_mask[rows].to(dev),
                               s.completion_ids[rows].to(dev), s.completion_mask[rows].to(dev))  # (2B, C)
    mask = s.completion_mask[rows].to(dev)
    B = len(chosen)
    return logp[:B], mask[:B], logp[B:], mask[B:]


@torch.no_grad()
def preference_stats(model, pairs: PreferencePairs, cfg: LactChainConfig) -> dict:
    """SimPO loss and margin over ALL pairs, in eval mode (no dropout) — the before/after yardstick."""
    if not len(pairs):
        raise ValueError("no preference pairs (every pair was a tie): sample more states")
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


def train_simpo(model, pairs: PreferencePairs, cfg: LactChainConfig, tracker=None, optimizer=None) -> list[dict]:
    """``cfg.simpo_epochs`` passes of SimPO over the pairs (shuffled minibatches); returns per-step stats."""
    if not len(pairs):
        raise ValueError("no preference pairs (every pair was a tie): sample more states")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the actor has no trainable parameters: attach LoRA first (rlnlp.attach_lora)")
    opt = optimizer or torch.optim.AdamW(params, lr=cfg.simpo_lr)
    model.train()
    history, step = [], 0
    gen = torch.Generator().manual_seed(cfg.seed)
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
            history.append(stats)
            if tracker is not None:
                tracker.log(step, stats)
            step += 1
    return history


# ============================================================================================
# Helpers for the notebook: evaluation and the explorer
# ============================================================================================
def evaluation_starts(env: GridWorld, n: int, rng: random.Random) -> list[State]:
    """``n`` start states: every non-terminal state in turn (shuffled), repeated as needed."""
    states = env.start_states()
    rng.shuffle(states)
    return [states[i % len(states)] for i in range(n)]


def explorer_steps(pairs: PreferencePairs, V_star: np.ndarray, gamma: float) -> list[dict]:
    """One dict per state of the preference data: both proposals, their returns and the critic's scores."""
    steps = []
    s = pairs.proposals.samples
    chosen = set(pairs.chosen)
    for i in range(0, len(s), 2):
        state = pairs.outcomes[i].state
        x, y, o = state
        row = {"state": f"({x}, {y}) facing {COMPASS[o]}", "V*(s)": float(V_star[o, y, x]),
               "critic V(s)": pairs.values[i]}
        for tag, j in (("A", i), ("B", i + 1)):
            out, parsed = pairs.outcomes[j], pairs.proposals.parsed[j]
            verdict = "chosen" if j in chosen else ("tie" if (j ^ 1) not in chosen else "rejected")
            row[f"proposal {tag}"] = pairs.proposals.texts[j]
            row[f"{tag}: moves"] = ", ".join(parsed.moves) or f"(none: {parsed.error or 'empty list'})"
            row[f"{tag}: return, k, reached goal"] = (round(out.chain_return(gamma), 2), out.k, out.done)
            row[f"{tag}: advantage"] = f"{pairs.advantages[j]:.2f} ({verdict})"
        steps.append(row)
    return steps


def random_chain_baseline(env: GridWorld, starts: list[State], max_chains: int, gamma: float, rng: random.Random,
                          max_moves: int = 4) -> dict:
    """Success rate and mean return of chains of 1..max_moves uniformly random moves (no LM)."""
    eps = []
    for s in starts:
        outs = []
        for _ in range(max_chains):
            moves = [rng.choice(env.actions) for _ in range(rng.randint(1, max_moves))]
            outs.append(execute_chain(env, s, moves, 0.0))
            s = outs[-1].next_state
            if outs[-1].done:
                break
        eps.append(outs)
    return {"episodes": len(eps), "success_rate": float(np.mean([e[-1].done for e in eps])),
            "mean_return": float(np.mean([episode_returns(e, gamma)[0] for e in eps]))}


def greedy_agreement(q_grid: dict[str, np.ndarray], Q_star: dict, states: list[State]) -> float:
    """Fraction of ``states`` where the critic's greedy move (argmax of ``q_grid``) is optimal under ``Q_star``."""
    hits = []
    for x, y, o in states:
        pick = max(q_grid, key=lambda a: q_grid[a][o, y, x])
        best = max(Q_star[(x, y, o)].values())
        hits.append(Q_star[(x, y, o)][pick] >= best - 1e-9)
    return float(np.mean(hits))


def mean_return_by_state(samples: list[tuple[State, float]]) -> tuple[list[State], list[float]]:
    """Visited states (sorted) and the mean Monte-Carlo return observed from each."""
    by_state: dict[State, list[float]] = {}
    for s, g in samples:
        by_state.setdefault(s, []).append(g)
    states = sorted(by_state)
    return states, [float(np.mean(by_state[s])) for s in states]


def values_on(V: np.ndarray, states: list[State]) -> np.ndarray:
    """V[o, y, x] for each (x, y, o)."""
    return np.array([V[o, y, x] for x, y, o in states])


__all__ = [
    "LactChainConfig", "RULES", "ANSWER_PREFIX", "state_text", "actor_prompt", "ParsedChain", "parse_chain",
    "ChainOutcome", "execute_chain", "chain_advantage", "episode_returns", "scripted_samples", "scripted_policy",
    "Critic", "fit_critic", "split_states", "value_report", "Proposals", "Actor", "ActorEpisodes", "run_episodes",
    "PreferencePairs", "make_pairs", "collect_preferences", "simpo_loss", "preference_stats", "train_simpo",
    "evaluation_starts", "explorer_steps", "random_chain_baseline", "greedy_agreement", "mean_return_by_state", "values_on",
]
