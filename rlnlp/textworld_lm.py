"""An LM policy on TextWorld: the policy LM chooses one of the admissible commands (notebook 06).

The state is written as a short prompt (last command, the game's answer, the room, the inventory); each
admissible command c is scored by the LM's log-probability of its tokens after the prompt, and the
policy is a softmax over the menu:

    π(c | s) = softmax_c( log p_LM(c | prompt(s)) / τ )          (a choice from the menu: never a parse failure)

Training is REINFORCE with a batch baseline (the shared ``rlnlp.losses.reinforce_loss`` and
``rlnlp.returns.discounted_returns``) on a LoRA adapter (``rlnlp.models.attach_lora``):

    L = −mean_t [ A_t · log π(c_t | s_t) ],   A_t = normalise(G_t) over the batch,  G_t = Σ_k γ^k r_{t+k}

Each prompt is prefilled once and its KV cache shared by the commands of its menu (a decision costs one
prompt plus a few command tokens). The prompt is kept short all the same: prefill dominates a decision
on a CPU, so the objective is left out (in the coin-collector games it only repeats the route the
rooms' exits already show).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .envs.textworld import GameFamily, Policy, TextWorldEnv, split_games, state_fields
from .losses import normalize, reinforce_loss
from .models import attach_lora, position_ids_from_mask
from .returns import discounted_returns
from .tracking import Tracker, progress

INSTRUCTION = "You are playing a text adventure. Find the coin and take it. Reply with the next command."


@dataclass
class LMPolicyConfig:
    """The LM menu policy on TextWorld: ``.smoke()``, ``.cpu()`` (2-core CPU), ``.full()`` (one GPU)."""

    seed: int = 0
    """Seeds torch and the policy's draws."""
    family: str = "tw-coin_collector --level 5"
    """The game family (the same as the encoder agent's, so the two share held-out games)."""
    train_games: int = 40
    """Training games (seeds 0..train_games−1 of the family)."""
    held_out_games: int = 6
    """Held-out games evaluated before and after training (the first of the encoder agent's held-out games)."""
    max_steps: int = 20
    """Step cap per episode."""
    temperature: float = 1.0
    """τ of the softmax over the menu's log-probs."""
    gamma: float = 0.95
    """Discount of the returns G_t (rewards are normalised score deltas: 1 for taking the coin)."""
    lr: float = 3e-4
    """Adam learning rate of the LoRA adapter."""
    lora_r: int = 8
    """LoRA rank (attention projections)."""
    updates: int = 2
    """Policy-gradient updates. Measured (2026-12-06, one contended CPU thread): a decision costs ~0.5 s to sample
    (menus of ~4 commands, 4 prompts per batch) and an update of 3 episodes ≤ 10 steps took 18 s; all 3 were lost
    at that cap (the untrained LM won 0 of 4 held-out games in 10 steps), so the cap stays at the family's 20."""
    episodes_per_update: int = 4
    """Episodes (one per training game, played side by side) in each update."""
    state_batch: int = 8
    """Prompts prefilled together (each with its menu's commands)."""

    @classmethod
    def smoke(cls) -> "LMPolicyConfig":
        """Mechanics: 2 updates of 2 episodes ≤ 4 steps, 2 held-out games."""
        return cls(train_games=6, held_out_games=2, max_steps=4, updates=2, episodes_per_update=2)

    @classmethod
    def cpu(cls) -> "LMPolicyConfig":
        """The defaults: a small budget (2 updates of 4 episodes, 6 held-out games); ~4 minutes on a shared 2-core
        CPU estimated from the measured 0.5 s per decision, not run end to end."""
        return cls()

    @classmethod
    def full(cls) -> "LMPolicyConfig":
        """One GPU (never measured)."""
        return cls(held_out_games=40, updates=40, episodes_per_update=16, state_batch=64)


def lm_games(cfg: LMPolicyConfig) -> tuple[list, list]:
    """(training games, held-out games) of cfg.family: the held-out ones are the first of the family's split."""
    train, held = split_games(GameFamily.parse(cfg.family), cfg.train_games, cfg.held_out_games)
    return train, held


def prompt_text(observation: str, info: dict) -> str:
    """The state as the LM reads it (no objective: see the module docstring)."""
    return INSTRUCTION + "\n\n" + "\n".join(state_fields(observation, info, include_objective=False)) + "\n\n>"


def _left_pad(seqs: Sequence[Sequence[int]], pad: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(map(len, seqs))
    ids = torch.tensor([[pad] * (L - len(x)) + list(x) for x in seqs], device=dev)
    mask = torch.tensor([[0] * (L - len(x)) + [1] * len(x) for x in seqs], device=dev)
    return ids, mask


def menu_logprobs(model, tokenizer, prompts: Sequence[str], menus: Sequence[Sequence[str]], state_batch: int = 8,
                  temperature: float = 1.0) -> list[torch.Tensor]:
    """log π(c | s) over each menu: [(K_i,) per state], from the summed token log-probs of " c" after the prompt.

    Each prompt is prefilled ONCE; its KV cache is then repeated for the commands of its menu, which run as
    short continuations (a decision costs one prompt plus K short commands, not K prompts):

        log p(c | s) = log p(c_1 | s) + Σ_{t>1} log p(c_t | s, c_<t)       (c_1 from the prompt's last position)

    Gradients flow when called outside ``no_grad`` (training). ``state_batch`` prompts go through together.
    """
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    out = []
    for start in range(0, len(prompts), state_batch):
        chunk_prompts, chunk_menus = prompts[start : start + state_batch], menus[start : start + state_batch]
        prompt_ids, prompt_mask = _left_pad(
            [tokenizer(p, add_special_tokens=False)["input_ids"] for p in chunk_prompts], pad, dev)
        first = model(input_ids=prompt_ids, attention_mask=prompt_mask,
                      position_ids=position_ids_from_mask(prompt_mask), use_cache=True, logits_to_keep=1)
        next_token = torch.log_softmax(first.logits[:, -1].float(), dim=-1)  # (S, V)
        rows = [(i, tokenizer(" " + c, add_special_tokens=False)["input_ids"])
                for i, menu in enumerate(chunk_menus) for c in menu]
        owner = torch.tensor([i for i, _ in rows], device=dev)  # (R,) row → its state
        C = max(len(ids) for _, ids in rows)
        cmd = torch.tensor([ids + [pad] * (C - len(ids)) for _, ids in rows], device=dev)  # (R, C) right-padded
        cmd_mask = torch.tensor([[1] * len(ids) + [0] * (C - len(ids)) for _, ids in rows], device=dev)
        cache = first.past_key_values
        cache.batch_select_indices(owner)  # each row continues its own prompt
        token_logp = next_token[owner].gather(-1, cmd[:, :1])  # (R, 1): the first command token
        if C > 1:
            mask = torch.cat([prompt_mask[owner], cmd_mask], dim=1)  # (R, P + C)
            positions = prompt_mask[owner].sum(1, keepdim=True) + torch.arange(C, device=dev)  # after each prompt
            rest = model(input_ids=cmd, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=False)
            rest_logp = torch.log_softmax(rest.logits[:, :-1].float(), dim=-1).gather(-1, cmd[:, 1:, None]).squeeze(-1)
            token_logp = torch.cat([token_logp, rest_logp], dim=1)  # (R, C)
        scores = (token_logp * cmd_mask).sum(-1)  # (R,) log p(c | s)
        at = 0
        for menu in chunk_menus:
            out.append(torch.log_softmax(scores[at : at + len(menu)] / temperature, dim=-1))
            at += len(menu)
    return out


def lm_policy(model, tokenizer, cfg: LMPolicyConfig, greedy: bool = False, seed: int = 0) -> Policy:
    """The LM's sampled (or argmax) command for every game still playing, one batched scoring call per step."""
    gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def policy(observations, infos, episode):
        logps = menu_logprobs(model, tokenizer, [prompt_text(o, i) for o, i in zip(observations, infos)],
                              [i["admissible_commands"] for i in infos], cfg.state_batch, cfg.temperature)
        picks = [int(lp.argmax()) if greedy else int(torch.multinomial(lp.exp().cpu(), 1, generator=gen))
                 for lp in logps]
        return [i["admissible_commands"][a] for i, a in zip(infos, picks)]

    return policy


@dataclass
class LMRun:
    model: object
    tracker: Tracker
    episodes: pd.DataFrame
    """One row per training episode: update, return (normalised score), success, length."""


def train(model, tokenizer, cfg: LMPolicyConfig, games: Sequence, run_name: str = "06_textworld_lm") -> LMRun:
    """REINFORCE on a LoRA adapter: each update plays cfg.episodes_per_update training games side by side with
    the sampled policy, then takes one gradient step on −mean(A · log π(c_t|s_t)) over all their decisions."""
    torch.manual_seed(cfg.seed)
    if not hasattr(model, "peft_config"):
        model = attach_lora(model, r=cfg.lora_r)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    tracker = Tracker(run_name, config=cfg)
    rng = np.random.default_rng(cfg.seed)
    episodes = []
    for update in progress(range(cfg.updates), desc="REINFORCE on TextWorld (LM)"):
        start = time.time()
        picked = [games[i] for i in rng.choice(len(games), cfg.episodes_per_update, replace=False)]
        envs = [TextWorldEnv([g], cfg.max_steps) for g in picked]
        obs = [env.reset(update) for env in envs]
        trace = [[] for _ in envs]  # per episode: (prompt, menu, chosen index, reward)
        active = list(range(len(envs)))
        model.eval()
        policy = lm_policy(model, tokenizer, cfg, seed=cfg.seed * 1000 + update)
        while active:
            commands = policy([obs[i] for i in active], [envs[i].info for i in active], update)
            still = []
            for i, c in zip(active, commands):
                info = envs[i].info
                prompt, menu = prompt_text(obs[i], info), info["admissible_commands"]
                obs[i], r, done, after = envs[i].step(c)
                trace[i].append((prompt, menu, menu.index(c), r / max(after["max_score"], 1e-9)))
                if done:
                    episodes.append({"update": update, "return": after["score"] / max(after["max_score"], 1e-9),
                                     "success": after["won"], "length": after["moves"]})
                else:
                    still.append(i)
            active = still
        for env in envs:
            env.close()
        # returns G_t per episode (no bootstrap at the cap), advantages normalised over the whole batch
        G = torch.cat([discounted_returns(torch.tensor([s[3] for s in ep]), torch.zeros(len(ep)), cfg.gamma)
                       for ep in trace])
        steps = [s for ep in trace for s in ep]
        advantages = normalize(G) if G.std() > 0 else torch.zeros_like(G)
        stats = {"losses/policy": 0.0}
        if G.std() > 0:  # all returns equal: no advantage, no step
            model.train()
            opt.zero_grad()
            per_chunk = cfg.state_batch  # decisions per backward: bounded memory
            for at in range(0, len(steps), per_chunk):
                part = steps[at : at + per_chunk]
                logps = menu_logprobs(model, tokenizer, [s[0] for s in part], [s[1] for s in part], cfg.state_batch,
                                      cfg.temperature)
                chosen = torch.stack([lp[s[2]] for lp, s in zip(logps, part)])
                loss, part_stats = reinforce_loss(chosen, advantages[at : at + per_chunk].to(chosen.device))
                (loss * len(part) / len(steps)).backward()  # the batch mean, accumulated chunk by chunk
                stats["losses/policy"] += part_stats["losses/policy"] * len(part) / len(steps)
            opt.step()
        done_now = [e for e in episodes if e["update"] == update]
        tracker.log(update, {**stats, "charts/episode_return": float(np.mean([e["return"] for e in done_now])),
                             "charts/success_rate": float(np.mean([e["success"] for e in done_now])),
                             "stats/decisions": len(steps), "stats/zero_variance": float(G.std() == 0),
                             "time/update_s": time.time() - start})
    model.eval()
    return LMRun(model=model, tracker=tracker, episodes=pd.DataFrame(episodes))
