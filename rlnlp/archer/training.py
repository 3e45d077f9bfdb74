"""The training loops: ArCHer (``train_archer``) and its matched baselines, token-level PPO and
trajectory-level GRPO (``train_baseline``)."""
from __future__ import annotations

import random
import time
from functools import partial

import torch

from ..distributed import Ranks
from ..envs.base import Episode
from ..models import TextEncoder, attach_lora, load_policy
from ..runtime import seed_everything
from ..tracking import Tracker, progress
from .acting import Collector, ReplayBuffer, _concat, _rows, act, play
from .actor import actor_step, episode_advantages, policy_step
from .config import ALGOS, ArcherConfig, UsageError, archer_actor_steps
from .critic import Critic, critic_phase
from .envs import check_dataset, env_factory
from .runs import Run, _restore, save_checkpoint


def setup(cfg: ArcherConfig, encoder: TextEncoder | None = None):
    """Policy with a fresh LoRA adapter, its optimiser, the encoder and an environment factory."""
    check_dataset(cfg)  # a broken task file fails here, before the models load
    seed_everything(cfg.seed)
    model, tokenizer = load_policy(cfg.policy_model)
    model = attach_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.actor_lr)
    encoder = encoder or TextEncoder(max_length=cfg.critic_max_length)
    return model, tokenizer, opt, encoder, env_factory(cfg, tokenizer, encoder)


def _log_episodes(tracker: Tracker, episodes: list[Episode], ends: list[int], grad_steps: int,
                  starts: list[int] | None = None) -> None:
    """One row per ended episode: when it ended and (``charts/episode_start``) when it began, in env samples."""
    for ep, end, begin in zip(episodes, ends, starts or [None] * len(episodes)):
        tracker.log(end, {"charts/env_steps": end, "charts/grad_steps": grad_steps,
                          **({"charts/episode_start": begin} if begin is not None else {}),
                          "charts/episode_return": ep.total_reward,
                          "charts/success": float(bool(ep.infos[-1].get("success"))),
                          "charts/episode_length": len(ep)})


# ---- ArCHer ----------------------------------------------------------------------------------------------

def train_archer(cfg: ArcherConfig, name: str = "archer", encoder: TextEncoder | None = None,
                 resume: bool = False, accelerator=None) -> Run:
    """ArCHer. Each iteration:

    1. one utterance per environment (num_envs env samples), and for fresh_batch buffer states a fresh
       a′ (for L_V) and — after warm-up — a second fresh a″ (for the actor), all in ONE sampling call;
    2. critic_phase: critic_steps updates of L_Q (replay) + L_V (the a′);
    3. after warm-up, actor_updates actor steps, the first on the a″ with A = min Q − min V from the ONLINE
       critic (after its update): the advantage is computed on utterances the V step did not fit; each later
       step on other buffer states with a″ sampled just before it.

    With an ``accelerate.Accelerator`` of several processes (``torchrun``), each process steps its block of the
    num_envs environments and samples for its block of the fresh_batch states; the transitions of every process go
    into every process's buffer in rank order (so buffers and their samplers stay the same everywhere), the
    advantages are normalised over every process's a″, critic and actor gradients are averaged, and process 0
    writes the run folder (the others log under it, in rank<k>/). One process: as without an accelerator.
    """
    start = time.time()
    ranks = Ranks(accelerator)
    if ranks.world > 1:
        uneven = [f for f in ("num_envs", "fresh_batch", "critic_batch") if getattr(cfg, f) % ranks.world]
        if uneven:
            raise UsageError(f"{', '.join(uneven)} must be multiples of the {ranks.world} processes")
        if resume:
            raise UsageError("--resume runs in one process (each process's environments are not checkpointed)")
    model, tokenizer, opt, encoder, make = setup(cfg, encoder)
    critic = Critic(cfg, encoder, special_tokens=list(tokenizer.all_special_tokens), sync=ranks.average_gradients)
    # several processes: the actor's gradients averaged between the backward passes and the clipping
    update_actor = actor_step if ranks.world == 1 else partial(actor_step, sync=ranks.average_gradients)
    buffer = ReplayBuffer(cfg.buffer_size, seed=cfg.seed)
    tracker = Tracker(name, config=cfg) if ranks.main else Tracker(f"{name}/rank{ranks.rank}")
    run = Run(name, "archer", cfg, tracker, model, tokenizer, make(), critic)
    col = Collector(make, cfg.num_envs // ranks.world, seed=cfg.seed * 100_000, ranks=ranks)
    iterations = max(1, cfg.env_steps // cfg.num_envs)
    first_it = 0
    if resume:
        p = _restore(run, opt, run.tracker.dir)
        buffer.load_state_dict(p["buffer"])
        if p["collector"] is None:
            raise UsageError(f"{name}: written by several processes, whose environments were not saved: no --resume")
        col.load_state_dict(p["collector"])
        first_it = p["iteration"] + 1
    for it in progress(range(first_it, iterations), desc=f"ArCHer {name}", initial=first_it, total=iterations):
        t0 = time.time()
        trains = it >= cfg.warmup_iters
        # 1. act + fresh a′ (+ a″) in one batched call; buffer states are known before acting
        # (several processes: the same states drawn everywhere, each process samples for its block)
        fresh_obs = (ranks.share([t.observation for t in buffer.sample(cfg.fresh_batch)]) if len(buffer)
                     else list(col.obs))
        F_ = len(fresh_obs)
        n = len(col.obs)
        u = act(model, tokenizer, run.env, col.obs + fresh_obs + (fresh_obs if trains else []), cfg,
                seed=cfg.seed * 7919 + it + Ranks.SEED_STRIDE * ranks.rank)
        run.policy_samples += len(u.texts) * ranks.world
        t_act = time.time() - t0
        v_actions = u.texts[n:n + F_]  # a′: L_V's targets
        before = len(col.finished)
        buffer.add(ranks.gather(col.step(u.texts[:n])))  # every process's transitions, in rank order
        done_now = ranks.gather(col.finished[before:])
        run.episodes.extend(done_now)
        run.env_steps = col.env_steps
        _log_episodes(run.tracker, done_now, [col.env_steps] * len(done_now), run.grad_steps,
                      starts=[col.env_steps - cfg.num_envs * len(ep) for ep in done_now])
        # 2. critic
        t1 = time.time()
        stats = critic_phase(critic, buffer, fresh_obs, v_actions, cfg, ranks)
        t_critic, t1 = time.time() - t1, time.time()
        # 3. actor on a″: A = min_j Q_j(s, a″) − min_j V_j(s), online critic, no gradient into it
        if trains:
            for k in range(cfg.actor_updates):
                if k == 0:  # the a″ sampled with this iteration's acting
                    fresh = _rows(u, slice(n + F_, n + 2 * F_))
                else:  # later updates: other buffer states, a″ from the policy as it is now
                    fresh = act(model, tokenizer, run.env,
                                ranks.share([t.observation for t in buffer.sample(cfg.fresh_batch)]),
                                cfg, seed=cfg.seed * 7919 + it * 1009 + k + Ranks.SEED_STRIDE * ranks.rank)
                    run.policy_samples += len(fresh.texts) * ranks.world
                vals = critic.values(fresh.observations, fresh.texts)
                advantage = ranks.gather_tensor(vals["q"] - vals["v"])  # (F,), every process's a″
                stats["stats/advantage_std"] = advantage.std().item() if len(advantage) > 1 else 0.0
                stats["stats/advantage_mean"] = advantage.mean().item()
                if cfg.center_advantage and len(advantage) > 1:
                    advantage = advantage - advantage.mean()
                if cfg.normalize_advantage and len(advantage) > 1:
                    advantage = advantage / (advantage.std() + 1e-8)
                stats |= update_actor(model, opt, fresh, ranks.share(advantage), cfg)
                run.grad_steps += cfg.ppo_epochs if cfg.actor_loss == "ppo" else 1
        # where an iteration's time goes: sampling (acting, a′, a″), the critic's steps, the actor's update
        stats |= {"time/act_s": t_act, "time/critic_s": t_critic, "time/actor_s": time.time() - t1}
        run.wall_s += time.time() - t0
        run.tracker.log(col.env_steps, {"charts/env_steps": col.env_steps, "charts/iteration": it,
                                        "charts/grad_steps": run.grad_steps, "charts/actor_trains": float(trains),
                                        "time/iteration_s": time.time() - t0, **stats})
        last = it == iterations - 1
        if ranks.main and (last or (cfg.checkpoint_every and (it + 1) % cfg.checkpoint_every == 0)):
            save_checkpoint(run, "latest", opt, {"iteration": it, "buffer": buffer.state_dict(),
                                                 "collector": col.state_dict() if ranks.world == 1 else None},
                            complete=last)
    run.wall_s = run.wall_s or time.time() - start
    return run


# ---- baselines: token-level PPO and trajectory-level GRPO ------------------------------------------------

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
        _log_episodes(run.tracker, eps, [base + e for e in ends], run.grad_steps, starts=[base] * len(eps))
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
