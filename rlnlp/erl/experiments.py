"""Workbook experiments: evaluation without reflection, ERL vs GRPO at equal steps and equal time."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Sequence

import torch
from transformers import TrainerCallback
from trl import GRPOTrainer

from ..sampling import sample
from .config import ERLConfig
from .trainer import ERLTrainer, TimedGRPOTrainer


@torch.no_grad()
def evaluate(model, tokenizer, rows: Sequence[dict], max_new_tokens: int = 24, batch_size: int = 64,
             temperature: float = 0.0, samples: int = 1, seed: int | None = 0) -> dict:
    """Answers to held-out prompts from the policy ALONE (no reflection, no memory); greedy by default.

    rows: dicts with task, prompt (text), spec (data/erl/eval.jsonl). ``samples`` > 1 (with temperature > 0)
    scores several answers per prompt. Returns accuracy (share of answers with reward 1), mean_reward, n
    (prompts), and per prompt ``success`` / ``rewards`` (means over its samples) for paired intervals.
    """
    from ..envs.feedback_tasks import score

    if not rows:
        raise ValueError("evaluate() got no eval rows")
    s = sample(model, tokenizer, [r["prompt"] for r in rows], n=samples, max_new_tokens=max_new_tokens,
               temperature=temperature, batch_size=batch_size, seed=seed)
    scored = [score(rows[i // samples]["task"], text, rows[i // samples]["spec"])[0] for i, text in enumerate(s.texts)]
    rewards = [sum(scored[i * samples : (i + 1) * samples]) / samples for i in range(len(rows))]
    success = [sum(r == 1.0 for r in scored[i * samples : (i + 1) * samples]) / samples for i in range(len(rows))]
    return {"accuracy": sum(success) / len(rows), "mean_reward": sum(rewards) / len(rows), "n": len(rows),
            "success": success, "rewards": rewards, "answers": s.texts}


class _Budget(TrainerCallback):
    """Evaluates at chosen steps (clock paused) and stops training once the training time reaches ``seconds``."""

    def __init__(self, trainer_ref: list, eval_fn, eval_steps=(), seconds: float | None = None):
        self.trainer_ref, self.eval_fn, self.eval_steps, self.seconds = trainer_ref, eval_fn, set(eval_steps), seconds
        self.start, self.paused, self.evals = None, 0.0, []

    def train_seconds(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def on_train_begin(self, args, state, control, **kw):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        elapsed = self.train_seconds()
        if state.global_step in self.eval_steps:
            t = time.perf_counter()
            result = self.eval_fn(self.trainer_ref[0].model)
            self.evals.append({"step": state.global_step, "train_seconds": elapsed, **result})
            self.paused += time.perf_counter() - t
        # never stop before the last evaluation step: the equal-steps comparison needs it even on a noisy clock
        if (self.seconds is not None and elapsed >= self.seconds
                and state.global_step >= max(self.eval_steps, default=0)):
            control.should_training_stop = True


@dataclass
class RunResult:
    """One training run: the trainer, TRL's per-step log, training seconds (evaluation excluded), evaluations."""

    method: str
    trainer: GRPOTrainer
    history: "pd.DataFrame"  # noqa: F821 (pandas is imported lazily)
    train_seconds: float
    evals: list[dict] = field(default_factory=list)


METHODS = ("erl", "grpo", "grpo-trl")


def make_trainer(cfg: ERLConfig, method: str, model, tokenizer, callbacks=()) -> GRPOTrainer:
    """A fresh trainer on ``cfg.tasks`` with the feedback tasks' reward (and feedback), LoRA when ``cfg.lora_r`` is set.

    method: "erl" (``ERLTrainer``), "grpo" (``TimedGRPOTrainer`` with ERL's packed forward: the notebook's baseline,
    so that equal wall-clock compares the algorithms) or "grpo-trl" (TRL's own forward, exactly ``GRPOTrainer``)."""
    from ..envs import feedback_tasks as ft

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    peft_config = None
    if cfg.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    common = dict(model=model, reward_funcs=ft.reward_func, args=cfg, train_dataset=ft.load_split("train", cfg.tasks),
                  processing_class=tokenizer, callbacks=list(callbacks), peft_config=peft_config)
    if method == "erl":
        return ERLTrainer(feedback_func=ft.feedback_func, **common)
    return TimedGRPOTrainer(packed_forward=method == "grpo", **common)


def train_run(cfg: ERLConfig, method: str = "erl", *, eval_rows: Sequence[dict] = (), eval_steps: Sequence[int] = (),
              max_steps: int | None = None, seconds: float | None = None, eval_max_new_tokens: int | None = None,
              **overrides) -> RunResult:
    """Train a fresh copy of the embedded policy with ERL (``method="erl"``) or plain GRPO (``"grpo"``) on
    ``cfg.tasks``; same data, rewards, seed and budget. Evaluates (no reflection, greedy) at ``eval_steps``
    and at the end; stops at ``max_steps`` or after ``seconds`` of training time, whichever comes first."""
    import pandas as pd

    from ..models import load_policy
    from ..runtime import seed_everything

    cfg = copy.deepcopy(cfg)
    cfg.output_dir = str(Path(cfg.output_dir) / method)
    cfg.max_steps = max_steps or cfg.max_steps
    unknown = set(overrides) - {f.name for f in fields(cfg)}
    if unknown:
        raise TypeError(f"train_run: ERLConfig has no field(s) {sorted(unknown)}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg.check()  # setattr skips __post_init__: a bad override fails here, not mid-run
    seed_everything(cfg.seed)
    model, tokenizer = load_policy(dtype=torch.float32)  # fp32 master weights; bf16 autocast via cfg.bf16
    max_new = eval_max_new_tokens or cfg.max_completion_length
    eval_fn = lambda m: {k: v for k, v in evaluate(m, tokenizer, eval_rows, max_new).items() if k != "answers"}
    ref: list = []
    budget = _Budget(ref, eval_fn, eval_steps, seconds)
    trainer = make_trainer(cfg, method, model, tokenizer, callbacks=[budget])
    ref.append(trainer)
    trainer.train()
    seconds_trained = budget.train_seconds()
    evals = budget.evals
    if eval_rows and (not evals or evals[-1]["step"] != trainer.state.global_step):
        evals.append({"step": trainer.state.global_step, "train_seconds": seconds_trained, **eval_fn(trainer.model)})
    history = pd.DataFrame([h for h in trainer.state.log_history if "step" in h and "train_runtime" not in h])
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    history.to_csv(Path(cfg.output_dir) / "metrics.csv", index=False)
    return RunResult(method, trainer, history, seconds_trained, evals)


def grpo_at_erl_budget(cfg: ERLConfig, erl: RunResult, eval_rows: Sequence[dict]) -> tuple[RunResult, dict, dict]:
    """Notebook 05's baseline for an ERL run: plain GRPO from the same start for ERL's training seconds (at most 6×
    its steps), evaluated at half and all of ERL's steps. Returns (the GRPO run, its evaluation at ERL's step count
    = equal steps, its last evaluation = equal time)."""
    n = erl.trainer.state.global_step
    grpo = train_run(cfg, "grpo", eval_rows=eval_rows, eval_steps=[n // 2, n], max_steps=6 * cfg.max_steps,
                     seconds=erl.train_seconds)
    return grpo, next(e for e in grpo.evals if e["step"] == n), grpo.evals[-1]
