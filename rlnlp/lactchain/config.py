"""The config: every knob of notebook 02, with the presets."""
from __future__ import annotations

from dataclasses import dataclass

from ..checks import INT_AT_LEAST_1, NON_NEGATIVE, POSITIVE, between, check_fields


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
    untrained actor over 60 states × 8 episodes: at 0.7, 86 % of the chains parse (greedy: 100 %); the original
    sampled at 1.0."""
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
    """Smooth-L1 β in scaled units (1.0 = 100 reward points): quadratic for ordinary errors, so V fits the MEAN
    return."""
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
    """AdamW learning rate of the LoRA weights (original 1e-4 for one step, which moved nothing from LoRA's zero
    init)."""
    tie_tolerance: float = 1e-6
    """|A_best − A_worst| at or below this is a tie and the state gives no pair."""
    oracle: bool = True
    """Also run SimPO judged by exact V* (from the same LoRA init), to show what the learned critic costs."""
    eval_states: int = 60
    """Start states of the evaluation: the first ``eval_states`` of the 60 (all of them except in smoke)."""

    def __post_init__(self):
        check_fields(self, {
            "gamma": between(0, 1), "lora_r": INT_AT_LEAST_1, "lora_alpha": POSITIVE,
            "lora_dropout": between(0, 1, high_open=True), "max_new_tokens": INT_AT_LEAST_1, "temperature": POSITIVE,
            "batch_size": INT_AT_LEAST_1,
            "max_cells": INT_AT_LEAST_1, "max_chains": INT_AT_LEAST_1, "critic_hidden": INT_AT_LEAST_1,
            "critic_lr": POSITIVE, "critic_steps": INT_AT_LEAST_1, "bootstrap_fits": INT_AT_LEAST_1,
            "value_scale": POSITIVE, "huber_delta": POSITIVE, "scripted_epsilon": between(0, 1),
            "scripted_episodes": INT_AT_LEAST_1, "scripted_max_moves": INT_AT_LEAST_1,
            "heldout_fraction": between(0, 1, low_open=True, high_open=True), "samples_per_state": INT_AT_LEAST_1,
            "rounds": INT_AT_LEAST_1, "simpo_epochs": INT_AT_LEAST_1, "simpo_batch": INT_AT_LEAST_1,
            "simpo_beta": POSITIVE, "simpo_gamma": NON_NEGATIVE, "simpo_lr": POSITIVE, "tie_tolerance": NON_NEGATIVE,
            "eval_states": INT_AT_LEAST_1})
        if not self.empty_chain_penalty < 0:
            raise ValueError(f"LactChainConfig.empty_chain_penalty must be a negative number (an unparsable answer "
                             f"must never look good), got {self.empty_chain_penalty!r}")

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
