"""Stage 2: preference pairs ranked by a judge, and SimPO on them, round after round."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..envs.gridworld import State
from ..models import completion_logprobs, masked_mean
from ..sampling import Samples
from ..tracking import progress
from .actor import Actor, Proposals
from .chains import ChainOutcome, chain_advantage, execute_chain
from .config import LactChainConfig


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
    adv = [chain_advantage(o.chain_return(cfg.gamma), o.k, a, b, o.done, cfg.gamma)
           for o, a, b in zip(outcomes, v, v_next)]
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
            steps = train_simpo(actor.model, pairs, cfg, tracker, opt, step0=len(history))
            history += [{"round": r, **h} for h in steps]
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
