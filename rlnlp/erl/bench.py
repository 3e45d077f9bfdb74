"""The benchmark: one ERL step vs one GRPO step at the same config, in one process (``python -m rlnlp.bench erl``),
and notebook 05's comparison at other seeds (``python -m rlnlp.bench erl-seeds``)."""
from __future__ import annotations

import copy
import time
from collections import defaultdict
from pathlib import Path
from typing import Sequence

import torch
from transformers import TrainerCallback

from ..cli import Parser, nonneg_int, positive_int
from .config import ERLConfig
from .experiments import METHODS, evaluate, grpo_at_erl_budget, make_trainer, train_run


class _StepClock(TrainerCallback):
    """Wall seconds of each optimizer step and the trainer's phase seconds spent in it."""

    def __init__(self, trainer_ref: list):
        self.trainer_ref, self.steps, self._start, self._phases = trainer_ref, [], None, {}

    def on_step_begin(self, args, state, control, **kw):
        self._start, self._phases = time.perf_counter(), dict(self.trainer_ref[0].phase_seconds)

    def on_step_end(self, args, state, control, **kw):
        now = dict(self.trainer_ref[0].phase_seconds)
        phases = {k: v - self._phases.get(k, 0.0) for k, v in now.items()}
        self.steps.append({"seconds": time.perf_counter() - self._start, **phases})


BENCH_PHASES = ("y1", "scoring", "reflection", "retry", "old_ref_logps", "assemble", "loss")


def bench_step(cfg: ERLConfig, method: str, steps: int = 1) -> list[dict]:
    """Per-step seconds and phase seconds of ``steps`` training steps of a fresh trainer (same seed each time)."""
    from ..models import load_policy
    from ..runtime import seed_everything

    cfg = copy.deepcopy(cfg)
    cfg.max_steps, cfg.output_dir, cfg.logging_steps = steps, str(Path(cfg.output_dir) / f"bench-{method}"), 1
    seed_everything(cfg.seed)
    model, tokenizer = load_policy(dtype=torch.float32)
    ref: list = []
    clock = _StepClock(ref)
    trainer = make_trainer(cfg, method, model, tokenizer, callbacks=[clock])
    ref.append(trainer)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "train_runtime" not in h]
    for step, log in zip(clock.steps, logs):
        step["rows"] = {k[len("stats/rows_"):]: log.get(k, 0.0) for k in log if k.startswith("stats/rows_")}
        step["tokens"] = {k[len("stats/"):]: log.get(k, 0.0) for k in log if "tokens_" in k}
    return clock.steps


def bench_main(argv: Sequence[str] | None = None) -> int:
    """``python -m rlnlp.bench erl``: time ERL and plain GRPO steps at the same config in one process and print
    the ratios and the per-phase breakdown. All start from the same weights and seed, so their first attempts (y1)
    are identical. "grpo-trl" is TRL's GRPOTrainer as it ships; "grpo" the same with ERL's packed forward (the
    notebook's baseline). A warm-up step of each runs first unless ``--no-warmup``; with ``--rounds`` the methods run
    in reverse order every other round (the first trainer of a process ran up to 1.6× slower in earlier runs)."""
    parser = Parser(prog="python -m rlnlp.bench erl", description=bench_main.__doc__)
    parser.add_argument("--profile", default="smoke", choices=("smoke", "cpu", "full"), help="ERLConfig preset")
    parser.add_argument("--steps", type=positive_int, default=1, help="timed steps per method (after the warm-up)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up step of each method")
    parser.add_argument("--rounds", type=positive_int, default=1,
                        help="run every method this many times, interleaved; "
                             "the ratio is printed per round and over all")
    parser.add_argument("--algorithm", choices=("joint", "split"), default=None)
    parser.add_argument("--lora-r", type=nonneg_int, default=None,
                        help="override the preset's LoRA rank (0 = full fine-tuning)")
    parser.add_argument("--methods", default="grpo-trl,grpo,erl", help="comma-separated subset of " + ",".join(METHODS))
    args = parser.parse_args(list(argv) if argv is not None else None)
    methods = [m for m in args.methods.split(",") if m]
    if not methods or set(methods) - set(METHODS):
        parser.error(f"--methods: choose from {METHODS}")
    overrides = {}
    if args.algorithm:
        overrides["algorithm"] = args.algorithm
    if args.lora_r is not None:
        overrides["lora_r"] = args.lora_r or None
    cfg = getattr(ERLConfig, args.profile)(**overrides)
    print(f"ERL vs GRPO, {args.profile} preset: {cfg.per_device_train_batch_size // cfg.num_generations} prompt(s) × "
          f"{cfg.num_generations} completions × {cfg.max_completion_length} tokens, tasks {cfg.tasks}, "
          f"lora_r {cfg.lora_r}, algorithm {cfg.algorithm}, loss {cfg.loss_type}; "
          f"torch threads {torch.get_num_threads()}; "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    warm = 0 if args.no_warmup else 1
    steps_of: dict[str, list[dict]] = defaultdict(list)
    round_ratios: dict[str, list[float]] = defaultdict(list)
    for r in range(args.rounds):  # rounds interleave the methods: a drift in machine speed hits each of them alike
        means = {}
        for method in methods if r % 2 == 0 else methods[::-1]:  # every other round in reverse: no method always first
            steps = bench_step(cfg, method, warm + args.steps)[warm:]
            steps_of[method] += steps
            means[method] = sum(s["seconds"] for s in steps) / len(steps)
            for i, s in enumerate(steps):
                if s.get("rows"):
                    print(f"round {r + 1}, {method} timed step {i + 1}: {s['seconds']:.2f} s "
                          f"(loss {s.get('loss', 0.0):.2f} s); "
                          f"trained rows {s['rows']}; tokens {s['tokens']}", flush=True)
        if "erl" in means:
            for base in (m for m in means if m != "erl"):
                round_ratios[base].append(means["erl"] / means[base])
            print(f"round {r + 1}: " + ", ".join(f"ERL / {b} {v[-1]:.2f}" for b, v in round_ratios.items()), flush=True)
    results = {m: {k: sum(s.get(k, 0.0) for s in st) / len(st) for k in ("seconds", *BENCH_PHASES)}
               for m, st in steps_of.items()}
    header = f"{'phase (s per step)':<22}" + "".join(f"{m:>10}" for m in results)
    print(header)
    for key in ("seconds", *BENCH_PHASES):
        print(f"{'step total' if key == 'seconds' else key:<22}"
              + "".join(f"{results[m][key]:>10.2f}" for m in results))
    for base, ratios in round_ratios.items():
        ratio = results["erl"]["seconds"] / results[base]["seconds"]
        spread = f"; per round {min(ratios):.2f}–{max(ratios):.2f}" if len(ratios) > 1 else ""
        print(f"ERL step / {base} step = {ratio:.2f} "
              f"(mean of {args.rounds} round(s) × {args.steps} timed step(s) each, "
              f"one process{spread})")
    return 0


def seeds_main(argv: Sequence[str] | None = None) -> int:
    """``python -m rlnlp.bench erl-seeds --seeds 1 2 3``: notebook 05's comparison at other seeds. Per seed: ERL for
    the preset's steps, then GRPO for at most 6× as many steps or ERL's training seconds, whichever ends first (the
    notebook's protocol, same evaluation steps); greedy accuracy on the same held-out prompts, paired 95% intervals
    of GRPO − untrained, ERL − untrained and ERL − GRPO at equal steps and at equal time. Prints one table row per
    seed as it ends; ``--jsonl FILE`` also appends each row there. The untrained policy is evaluated once."""
    import json

    from ..envs import feedback_tasks as ft
    from ..models import load_policy
    from ..stats import paired_difference

    parser = Parser(prog="python -m rlnlp.bench erl-seeds", description=seeds_main.__doc__)
    parser.add_argument("--seeds", type=nonneg_int, nargs="+", required=True, help="one or more seeds (integers ≥ 0)")
    parser.add_argument("--profile", default="cpu", choices=("smoke", "cpu", "full"), help="ERLConfig preset")
    parser.add_argument("--jsonl", default=None, help="append one JSON line per seed to this file")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.jsonl and not Path(args.jsonl).parent.is_dir():
        parser.error(f"--jsonl: folder {str(Path(args.jsonl).parent)!r} does not exist")
    untrained = None
    cols = ("GRPO − untrained", "ERL − untrained", "ERL − GRPO (equal steps)", "ERL − GRPO (equal time)")
    print(f"{'seed':>4} {'ERL s':>6} {'GRPO steps':>10} | " + " | ".join(f"{c:<24}" for c in cols), flush=True)
    for seed in args.seeds:
        cfg = getattr(ERLConfig, args.profile)(seed=seed)
        cfg.output_dir = str(Path(cfg.output_dir) / f"seed{seed}")
        eval_rows = ft.read_rows("eval", cfg.tasks)[: cfg.eval_size]
        if untrained is None:
            model, tokenizer = load_policy()
            untrained = evaluate(model, tokenizer, eval_rows, max_new_tokens=cfg.max_completion_length)
            del model
        erl = train_run(cfg, "erl", eval_rows=eval_rows, eval_steps=[cfg.max_steps // 2])
        _, equal_steps, equal_time = grpo_at_erl_budget(cfg, erl, eval_rows)
        erl_final, n = erl.evals[-1], erl.trainer.state.global_step
        diffs = [paired_difference(a["success"], b["success"]) for a, b in
                 ((equal_time, untrained), (erl_final, untrained), (erl_final, equal_steps), (erl_final, equal_time))]
        print(f"{seed:>4} {erl.train_seconds:>6.0f} {equal_time['step']:>10} | "
              + " | ".join(f"{str(d) + ' ' + d.verdict():<24}" for d in diffs), flush=True)
        if args.jsonl:
            row = {"seed": seed, "profile": args.profile, "task": cfg.tasks[0], "n": erl_final["n"], "erl_steps": n,
                   "erl_train_seconds": erl.train_seconds, "grpo_steps_equal_time": equal_time["step"],
                   "accuracy": {"untrained": untrained["accuracy"], "erl": erl_final["accuracy"],
                                "grpo_equal_steps": equal_steps["accuracy"], "grpo_equal_time": equal_time["accuracy"]},
                   "differences": {c: [d.estimate, d.low, d.high, d.verdict()] for c, d in zip(cols, diffs)},
                   "date": time.strftime("%Y-%m-%d %H:%M")}
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")
    return 0
