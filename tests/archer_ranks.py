"""ArCHer launched as a user would, in one process or several: a plain script, no rlnlp launch code.

    python tests/archer_ranks.py OUT                                          # one process
    torchrun --standalone --nproc_per_node 2 tests/archer_ranks.py OUT        # two CPU processes (gloo)

Both call ``train_archer(cfg, accelerator=Accelerator(cpu=True))`` on capital_choice with the smoke preset's
shapes: 8 environments in all (4 per process in two), 2 iterations (the critic alone, then the critic and one
actor step), fresh batches of 4 buffer states (2 per process), critic minibatches of 32 replay transitions (16 per
process), then ``evaluate`` on 5 episodes (3 and 2). ``act`` samples a batch from one generator, so a row's
utterance depends on the other rows of its batch, which differ between the launches; ``--scripted`` samples each
row on its own, seeded by its observation and the call, so both launches see the same utterances. SGD replaces
Adam, and clipping is off (grad_clip 1e6), so that an update is proportional to its gradient. Environments,
rewards, resets, buffer, critic, advantages and losses are the real code. Every process writes OUT/rank<k>.pt: the
buffer at each iteration's critic phase, the critic and LoRA weights before and after each critic phase and actor
step, the advantages each actor step used, the episodes and the evaluation.
"""
import itertools
import os
import sys
import zlib
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator

import rlnlp.archer.acting as acting
import rlnlp.archer.training as training
from rlnlp.archer import env_factory, evaluate, train_archer
from rlnlp.archer.games import task_preset
from rlnlp.models import TextEncoder


def scripted():
    """Each row of every ``act`` call sampled alone, seeded by its observation and the call's number."""
    real, calls = acting.act, itertools.count()

    def act(model, tokenizer, env, observations, cfg, n=1, seed=None, temperature=None):
        c = next(calls)
        parts = [real(model, tokenizer, env, [o], cfg, n=n, seed=zlib.crc32(o.encode()) + 7919 * c,
                      temperature=temperature) for o in observations]
        return acting._concat(parts, pad_id=tokenizer.pad_token_id)

    training.act = acting.act = act  # acting.act: play's (evaluation)


def recorded(record: dict):
    """Wrap the critic phase and the actor step to keep the weights around them and the buffer."""
    phase, step = training.critic_phase, training.actor_step

    def weights(module):
        return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}

    def critic_phase(critic, buffer, *args, **kw):
        before = weights(critic.net)
        stats = phase(critic, buffer, *args, **kw)
        record["critic"].append((before, weights(critic.net)))
        record["buffers"].append([asdict(t) for t in buffer.items])
        return stats

    def actor_step(model, opt, u, advantages, *args, **kw):
        before = weights(model)
        stats = step(model, opt, u, advantages, *args, **kw)
        record["actor"].append((before, weights(model)))
        record["advantages"].append(advantages.clone())
        return stats

    training.critic_phase, training.actor_step = critic_phase, actor_step


def main(out: Path, script: bool):
    out.mkdir(parents=True, exist_ok=True)
    os.environ["RLNLP_RUNS"] = str(out / "runs")
    os.environ.setdefault("RLNLP_DTYPE", "fp32")
    accelerator = Accelerator(cpu=True)
    real_adam = torch.optim.Adam
    torch.optim.Adam = lambda params, lr: torch.optim.SGD(params, lr=lr)  # the actor's and the critic's optimiser
    cfg = task_preset("smoke", "capital_choice", num_envs=8, env_steps=16, fresh_batch=4, critic_batch=32,
                      critic_steps=4, warmup_iters=1, actor_lr=0.05, critic_lr=0.05, grad_clip=1e6)
    if script:
        scripted()
    record = {"buffers": [], "critic": [], "actor": [], "advantages": []}
    recorded(record)
    encoder = TextEncoder(device="cpu", max_length=cfg.critic_max_length)
    run = train_archer(cfg, "ranks", encoder=encoder, accelerator=accelerator)
    torch.optim.Adam = real_adam
    ev = evaluate(run.model, run.tokenizer, cfg, episodes=5, make=env_factory(cfg, run.tokenizer, encoder),
                  accelerator=accelerator)
    record |= {"world": accelerator.num_processes, "env_steps": run.env_steps, "grad_steps": run.grad_steps,
               "episodes": [(ep.observations, ep.actions, ep.rewards) for ep in run.episodes],
               "eval": {"success": ev["success"].tolist(), "returns": ev["returns"].tolist(), "starts": ev["starts"],
                        "actions": [ep.actions for ep in ev["trajectories"]]}}
    torch.save(record, out / f"rank{accelerator.process_index}.pt")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 1:
        sys.exit("usage: archer_ranks.py OUT [--scripted]")
    main(Path(args[0]), "--scripted" in sys.argv)
