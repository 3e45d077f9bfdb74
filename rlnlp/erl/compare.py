"""ERL against GRPO on one task over several seeds, at equal wall-clock and at equal generated tokens, with ablations.

Per seed, every arm starts from the same weights and seed and is evaluated greedily, WITHOUT reflection, on the same
held-out prompts:

* ``erl``            ERL for ``seconds`` of training (evaluation excluded), evaluated halfway and at the end; its
                     generated tokens (first attempts, reflections, retries) set the token budget;
* ``grpo``           plain GRPO, same group size, for ERL's training seconds (equal wall-clock; halfway and end);
* ``grpo_tokens``    plain GRPO with ``token_generations`` completions per prompt (the paper's baseline samples 10
                     to ERL's 4) until it has generated as many tokens as ERL (equal generated tokens);
* ``no_reflection``  ERL whose retry reads the first attempt and its raw feedback, no reflection generated;
* ``no_memory``      ERL without the reflection memory;
* ``no_internalization``  ERL without the distillation of successful retries;

the three ablations for ERL's training seconds. ``compare`` returns one dict per (seed, arm) with the evaluations
(step, training seconds, generated tokens, accuracy and per-prompt success); ``compare_rows`` turns them into
paired differences pooled over prompts × seeds.
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import TrainerCallback

from .config import ERLConfig

ARMS = {
    "erl": ("erl", {}),
    "grpo": ("grpo", {}),
    "grpo_tokens": ("grpo", {}),  # num_generations set by compare()
    "no_reflection": ("erl", {"enable_reflection": False}),
    "no_memory": ("erl", {"enable_memory": False}),
    "no_internalization": ("erl", {"enable_internalization": False}),
}


class _Clock(TrainerCallback):
    """Training seconds (evaluation excluded) and generated tokens; evaluates at seconds marks; stops at a budget.

    Generated tokens per step: TRL's mean completion length × the generation batch (the first attempts, all of plain
    GRPO's rollouts) plus, for ERL, the reflection and retry tokens it logs."""

    def __init__(self, trainer_ref: list, eval_fn: Callable, rows_per_step: int, eval_at: Sequence[float] = (),
                 seconds: float | None = None, tokens: float | None = None):
        self.ref, self.eval_fn, self.rows = trainer_ref, eval_fn, rows_per_step
        self.marks, self.seconds, self.tokens = sorted(eval_at), seconds, tokens
        self.start, self.paused, self.generated, self.evals, self.last = None, 0.0, 0.0, [], 0.0

    def train_seconds(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def on_train_begin(self, args, state, control, **kw):
        self.start = time.perf_counter()

    def evaluate(self, step: int, elapsed: float) -> None:
        t = time.perf_counter()
        self.evals.append({"step": step, "train_seconds": elapsed, "tokens": self.generated,
                           **self.eval_fn(self.ref[0].model)})
        self.paused += time.perf_counter() - t

    def on_log(self, args, state, control, logs=None, **kw):
        logs = logs or {}
        if "completions/mean_length" not in logs:  # the end-of-training summary
            return
        self.generated += logs["completions/mean_length"] * self.rows
        self.generated += logs.get("stats/tokens_reflection", 0.0) + logs.get("stats/tokens_retry", 0.0)
        elapsed = self.train_seconds()
        while self.marks and elapsed >= self.marks[0]:
            self.marks.pop(0)
            self.evaluate(state.global_step, elapsed)
        # stop at the step end NEAREST to the time budget (a run never gets a whole step more than another), or
        # once the token budget is spent
        step = elapsed - self.last
        self.last = elapsed
        if (self.seconds is not None and elapsed + step / 2 >= self.seconds) or \
                (self.tokens is not None and self.generated >= self.tokens):
            control.should_training_stop = True


def budget_run(cfg: ERLConfig, method: str, eval_rows: Sequence[dict], *, seconds: float | None = None,
               tokens: float | None = None, eval_at: Sequence[float] = (), max_steps: int = 10_000,
               eval_max_new_tokens: int | None = None, **overrides) -> dict:
    """Train a fresh copy of the embedded policy (``method`` "erl" or "grpo", ``overrides`` on ``cfg``) until
    ``seconds`` of training or ``tokens`` generated tokens, evaluating at the ``eval_at`` seconds marks and at the end.
    Returns steps, train_seconds, tokens and evals (each: step, train_seconds, tokens, accuracy, success, ...)."""
    from ..models import load_policy
    from ..runtime import seed_everything
    from .experiments import evaluate, make_trainer

    cfg = copy.deepcopy(cfg)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg.max_steps, cfg.disable_tqdm = max_steps, True  # the budget, not max_steps, ends the run: no bar to 10 000
    seed_everything(cfg.seed)
    model, tokenizer = load_policy(dtype=torch.float32)
    max_new = eval_max_new_tokens or cfg.max_completion_length
    eval_fn = lambda m: {k: v for k, v in evaluate(m, tokenizer, eval_rows, max_new).items() if k != "answers"}
    ref: list = []
    clock = _Clock(ref, eval_fn, cfg.per_device_train_batch_size * cfg.steps_per_generation, eval_at, seconds, tokens)
    trainer = make_trainer(cfg, method, model, tokenizer, callbacks=[clock])
    ref.append(trainer)
    trainer.train()
    elapsed = clock.train_seconds()
    if not clock.evals or clock.evals[-1]["step"] != trainer.state.global_step:
        clock.evaluate(trainer.state.global_step, elapsed)
    out = {"steps": trainer.state.global_step, "train_seconds": elapsed, "tokens": clock.generated,
           "evals": clock.evals}
    if method == "erl":
        ex = trainer.examples
        out["retry_success"] = sum(e["r2"] >= cfg.reward_threshold for e in ex) / max(len(ex), 1)
        out["gated"], out["memory"] = len(ex), len(trainer.memory)
    del trainer, model
    return out


def compare(cfg: ERLConfig, seeds: Sequence[int], seconds: float, eval_rows: Sequence[dict], *,
            arms: Sequence[str] = tuple(ARMS), token_generations: int = 10, log: Callable[[dict], None] | None = None,
            done: Sequence[dict] = ()) -> list[dict]:
    """One dict per (seed, arm): {"seed", "arm", "steps", "train_seconds", "tokens", "evals", ...}. ``done``: rows of an
    earlier, interrupted call (skipped; the token budget of their seed is read back). ``log`` is called on each new
    row."""
    unknown = set(arms) - set(ARMS)
    if unknown or "erl" not in arms:
        raise ValueError(f"arms must include 'erl' and come from {tuple(ARMS)}; got {sorted(arms)}")
    rows = list(done)
    for k, seed in enumerate(seeds):
        base = copy.deepcopy(cfg)
        base.seed = seed
        base.output_dir = str(Path(cfg.output_dir) / f"compare-seed{seed}")
        have = {r["arm"]: r for r in rows if r["seed"] == seed}
        order = [a for a in arms if a != "erl"]
        order = order if k % 2 == 0 else order[::-1]  # a drift in machine speed does not always hit the same arm
        for arm in ["erl", *order]:
            if arm in have:
                continue
            method, extra = ARMS[arm]
            erl = have.get("erl")
            budget: dict = {"seconds": seconds, "eval_at": [seconds / 2]} if arm == "erl" else \
                {"seconds": erl["train_seconds"], "eval_at": [erl["train_seconds"] / 2] if arm == "grpo" else []}
            if arm == "grpo_tokens":
                g = token_generations
                prompts = max(base.per_device_train_batch_size // base.num_generations, 1)
                budget = {"tokens": erl["tokens"], "seconds": 3 * erl["train_seconds"]}
                extra = {"num_generations": g, "per_device_train_batch_size": g * prompts,
                         "generation_batch_size": g * prompts * base.steps_per_generation}
            t = time.time()
            out = {"seed": seed, "arm": arm, **budget_run(base, method, eval_rows, **budget, **extra),
                   "wall_s": time.time() - t, "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
            rows.append(out)
            have[arm] = out
            if log:
                log(out)
    return rows


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


ARM_LABELS = {"erl": "ERL", "grpo": "GRPO (equal wall-clock)", "grpo_tokens": "GRPO, 10 per prompt (equal tokens)",
              "no_reflection": "ERL, retry from raw feedback (no reflection)", "no_memory": "ERL without memory",
              "no_internalization": "ERL without internalization"}


def pooled(rows: Sequence[dict], arm: str, seeds: Sequence[int]) -> list[float]:
    """Per-prompt success of ``arm``'s last evaluation, concatenated over ``seeds`` (units: prompt × seed)."""
    by = {(r["seed"], r["arm"]): r for r in rows}
    return [x for s in seeds for x in by[(s, arm)]["evals"][-1]["success"]]


def compare_results(rows: Sequence[dict], untrained: dict, task: str, res, note: str = "") -> list[dict]:
    """Record the study's headline rows with ``res`` (an ``rlnlp.Results``): ERL and GRPO vs untrained, ERL − GRPO at
    equal wall-clock and at equal generated tokens, ERL − each ablation. Paired over held-out prompts × seeds (seeds
    with every arm only); per-seed numbers go in the note."""
    from ..stats import paired_difference

    arms = {r["arm"] for r in rows}
    have = {(x["seed"], x["arm"]) for x in rows}
    seeds = sorted({r["seed"] for r in rows if all((r["seed"], a) in have for a in arms)})
    if not seeds:
        raise ValueError("compare_results: no seed has every arm")
    metric = "greedy accuracy without reflection (reward = 1)"
    unit = f"held-out prompt × seed ({len(seeds)} seeds: {', '.join(map(str, seeds))})"
    base = [x for _ in seeds for x in untrained["success"]]
    erl = pooled(rows, "erl", seeds)
    wall = sum(r["wall_s"] for r in rows if r["seed"] in seeds)
    per_seed = lambda arm: ", ".join(
        f"seed {s} {r['evals'][-1]['accuracy']:.3f} ({r['steps']} steps, {r['train_seconds']:.0f} s, "
        f"{r['tokens']:.0f} tokens)" for s in seeds for r in rows if r["seed"] == s and r["arm"] == arm)
    out = []
    mean = lambda xs: sum(xs) / len(xs)
    for arm in ("erl", "grpo"):
        if arm in arms:
            m = pooled(rows, arm, seeds)
            out.append(res.add(system="ERL", task=task, metric=metric, method=ARM_LABELS[arm], value=mean(m),
                               baseline="untrained", baseline_value=mean(base), difference=paired_difference(m, base),
                               unit=unit, wall_s=wall, note=f"{per_seed(arm)}. {note}".strip()))
    for arm in ("grpo", "grpo_tokens", "no_reflection", "no_memory", "no_internalization"):
        if arm in arms:
            b = pooled(rows, arm, seeds)
            out.append(res.add(system="ERL", task=task, metric=metric, method="ERL", value=mean(erl),
                               baseline=ARM_LABELS[arm], baseline_value=mean(b), difference=paired_difference(erl, b),
                               unit=unit, claim="comparison", wall_s=wall, note=f"{ARM_LABELS[arm]}: {per_seed(arm)}"))
    return out


def compare_figure(rows: Sequence[dict], untrained: dict, task: str):
    """Held-out accuracy against training seconds: ERL and GRPO as the mean over seeds with a band (the seeds' range);
    the other arms' last evaluation as a point at their mean seconds with the seeds' range as a bar."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    seeds = sorted({r["seed"] for r in rows})
    for arm in ARMS:
        runs = [r for r in rows if r["arm"] == arm]
        if not runs:
            continue
        if arm in ("erl", "grpo"):
            k = min(len(r["evals"]) for r in runs)
            xs = np.array([[0.0] + [e["train_seconds"] for e in r["evals"][:k]] for r in runs])
            ys = np.array([[untrained["accuracy"]] + [e["accuracy"] for e in r["evals"][:k]] for r in runs])
            line, = ax.plot(xs.mean(0), ys.mean(0), marker="o", label=f"{ARM_LABELS[arm]} (mean over seeds)")
            ax.fill_between(xs.mean(0), ys.min(0), ys.max(0), color=line.get_color(), alpha=0.2)
        else:
            x = np.mean([r["evals"][-1]["train_seconds"] for r in runs])
            y = np.array([r["evals"][-1]["accuracy"] for r in runs])
            ax.errorbar([x], [y.mean()], yerr=[[y.mean() - y.min()], [y.max() - y.mean()]], fmt="s", capsize=3,
                        label=ARM_LABELS[arm])
    ax.axhline(untrained["accuracy"], color="0.5", linestyle=":", label=f"untrained {untrained['accuracy']:.3f}")
    ax.set(xlabel="training seconds (evaluation excluded)", ylabel=f"held-out accuracy (n = {untrained['n']})",
           title=f"{task}: ERL vs GRPO over {len(seeds)} seed{'s' if len(seeds) != 1 else ''} "
                 "(band and bars: the seeds' range)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def compare_main(argv: Sequence[str] | None = None) -> int:
    """``python -m rlnlp.bench erl-compare --task digits --seeds 0 1 2 --seconds 90``: ERL vs GRPO at equal
    wall-clock and at equal generated tokens, and ERL's three ablations, over seeds (see ``compare``). Each finished
    run is appended to ``--runs`` (a JSON-lines file; a rerun with the same file skips what is there, so an interrupted
    study resumes). ``--record`` then writes the results rows (notebook name ``05_erl_seeds``) and the figure
    ``05-erl-seeds-<task>``."""
    import argparse

    from tqdm.auto import tqdm

    from ..cli import Parser
    from ..envs import feedback_tasks as ft
    from ..models import load_policy
    from ..plots import save
    from ..results import Results
    from .experiments import evaluate

    parser = Parser(prog="python -m rlnlp.bench erl-compare", description=compare_main.__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="digits", choices=ft.TASKS, help="feedback task (data/erl)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one or more integer seeds")
    parser.add_argument("--seconds", type=float, default=80.0,
                        help="ERL's training seconds per seed (evaluation excluded)")
    parser.add_argument("--profile", default="cpu", choices=("smoke", "cpu", "full"), help="ERLConfig preset")
    parser.add_argument("--arms", default=",".join(ARMS),
                        help="comma-separated subset of " + ",".join(ARMS) + " (erl required)")
    parser.add_argument("--eval-size", type=int, default=150, help="held-out prompts (the first N of the eval split)")
    parser.add_argument("--max-completion-length", type=int, default=None, help="override the preset's token cap")
    parser.add_argument("--runs", default=None, help="JSON-lines file of finished runs (appended; resumes)")
    parser.add_argument("--record", action="store_true", help="write the results rows and the figure at the end")
    args = parser.parse_args(list(argv) if argv is not None else None)
    arms = [a for a in args.arms.split(",") if a]
    if "erl" not in arms or set(arms) - set(ARMS):
        parser.error(f"--arms: 'erl' plus any of {tuple(ARMS)}")
    if args.seconds <= 0 or args.eval_size < 1:
        parser.error("--seconds and --eval-size must be positive")
    if args.runs and not Path(args.runs).parent.is_dir():
        parser.error(f"--runs: folder {str(Path(args.runs).parent)!r} does not exist")
    overrides = {"tasks": (args.task,), "eval_size": args.eval_size}
    if args.max_completion_length:
        overrides["max_completion_length"] = args.max_completion_length
    cfg = getattr(ERLConfig, args.profile)(**overrides)
    eval_rows = ft.read_rows("eval", args.task)[: args.eval_size]
    old = read_jsonl(args.runs) if args.runs else []
    untrained = next((r for r in old if r["arm"] == "untrained"), None)
    done = [r for r in old if r["arm"] != "untrained" and r["seed"] in args.seeds and r["arm"] in arms]

    def append(row):
        if args.runs:
            with open(args.runs, "a") as f:
                f.write(json.dumps(row) + "\n")

    prompts = cfg.per_device_train_batch_size // cfg.num_generations
    print(f"ERL vs GRPO on {args.task}: {args.profile} preset, {prompts} "
          f"prompts × {cfg.num_generations} completions × {cfg.max_completion_length} tokens, seeds {args.seeds}, "
          f"{args.seconds:.0f} s per run, {len(eval_rows)} held-out prompts; torch threads {torch.get_num_threads()}; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    if untrained is None:
        model, tokenizer = load_policy()
        untrained = {"seed": None, "arm": "untrained",
                     **{k: v for k, v in evaluate(model, tokenizer, eval_rows, cfg.max_completion_length).items()
                        if k != "answers"}}
        del model
        append(untrained)
    print(f"untrained: {untrained['accuracy']:.3f}", flush=True)
    bar = tqdm(total=len(args.seeds) * len(arms), initial=len(done), desc="runs", unit="run")

    def log(row):
        append(row)
        bar.update(1)
        last = row["evals"][-1]
        bar.write(f"seed {row['seed']} {row['arm']:<20} {row['steps']:>4} steps {row['train_seconds']:>6.0f} s "
                  f"{row['tokens']:>8.0f} tokens  accuracy {last['accuracy']:.3f}  (wall {row['wall_s']:.0f} s)")

    rows = compare(cfg, args.seeds, args.seconds, eval_rows, arms=arms, log=log, done=done)
    bar.close()
    if args.record:
        res = Results("05_erl_seeds", prof=args.profile)
        note = f"{args.seconds:.0f} s of ERL training per seed"
        for row in compare_results(rows, untrained, args.task, res, note=note):
            print(f"{row['method']} − {row['baseline']}: {row['difference']:+.3f} "
                  f"[{row['low']:+.3f}, {row['high']:+.3f}] "
                  f"n {row['n']} {row['verdict']}")
        print("figure:", save(compare_figure(rows, untrained, args.task), f"05-erl-seeds-{args.task}", args.profile))
    return 0


# ----------------------------------------------------------------------------------------------
# where a task sits for ERL: first attempts, group variance, and retries with feedback


@torch.no_grad()
def zone(model, tokenizer, task: str, n: int = 150, group: int = 4, temperature: float = 0.7, max_new_tokens: int = 24,
         reflection_max_new_tokens: int = 20, cfg: ERLConfig | None = None, seed: int = 1) -> dict:
    """The untrained policy on the first ``n`` held-out prompts of ``task``: greedy accuracy; ``group`` samples per
    prompt at ``temperature`` (accuracy and the share of groups whose rewards differ: GRPO's signal); and, for each
    prompt whose FIRST sample failed, one retry through ERL's path (reflection on the attempt and its feedback, then
    a retry from the task and the reflection, with ``cfg``'s templates) and one retry straight from the raw feedback
    (``cfg.feedback_retry_prompt``). ``resample`` is the control: the other samples of those prompts, i.e. a retry
    that reads no feedback. Reflections and retries are sampled at ``temperature`` like the first attempts."""
    from ..envs import feedback_tasks as ft
    from ..sampling import sample

    cfg = cfg or ERLConfig.smoke()  # its templates: the defaults
    rows = ft.read_rows("eval", task)[:n]
    n = len(rows)
    prompts = [r["prompt"] for r in rows]
    ok = lambda rs, texts: [ft.score(task, t, r["spec"])[0] == 1.0 for r, t in zip(rs, texts)]
    greedy = sample(model, tokenizer, prompts, n=1, max_new_tokens=max_new_tokens, temperature=0.0)
    first = sample(model, tokenizer, prompts, n=group, max_new_tokens=max_new_tokens, temperature=temperature,
                   seed=seed)
    scored = [ft.score(task, t, rows[i // group]["spec"]) for i, t in enumerate(first.texts)]
    groups = [[r for r, _ in scored[i * group : (i + 1) * group]] for i in range(n)]
    failed = [i for i in range(n) if groups[i][0] < 1.0]
    attempts = [first.texts[i * group].strip() for i in failed]
    feedback = [scored[i * group][1] for i in failed]
    frows = [rows[i] for i in failed]
    raw = sample(model, tokenizer, [cfg.feedback_retry_prompt.format(prompt=rows[i]["prompt"], attempt=a, feedback=f)
                                    for i, a, f in zip(failed, attempts, feedback)] or [""],
                 n=1, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + 1)
    reflect = [cfg.reflection_system_prompt.format(memory="None available.", prompt=rows[i]["prompt"], attempt=a,
                                                   reward=f"{0.0:.3g}", feedback=f)
               for i, a, f in zip(failed, attempts, feedback)]
    reflections = sample(model, tokenizer, reflect or [""], n=1, max_new_tokens=reflection_max_new_tokens,
                         temperature=temperature, seed=seed + 2, stop=lambda text: "\n" in text.lstrip())
    retry = sample(model, tokenizer, [cfg.retry_system_prompt.format(prompt=rows[i]["prompt"], reflection=d.strip())
                                      for i, d in zip(failed, reflections.texts)] or [""],
                   n=1, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + 3)
    k = max(len(failed), 1)
    return {"task": task, "n": n, "group": group, "temperature": temperature, "max_new_tokens": max_new_tokens,
            "greedy": sum(ok(rows, greedy.texts)) / n, "greedy_cut": sum(not s for s in greedy.stopped) / n,
            "sampled": sum(r == 1.0 for g in groups for r in g) / (n * group),
            "groups_with_variance": sum(len(set(g)) > 1 for g in groups) / n,
            "failed_first": len(failed),
            "resample": sum(r == 1.0 for i in failed for r in groups[i][1:]) / max(len(failed) * (group - 1), 1),
            "retry_feedback": sum(ok(frows, raw.texts)) / k if failed else float("nan"),
            "retry_reflection": sum(ok(frows, retry.texts)) / k if failed else float("nan"),
            "examples": [{"attempt": a, "feedback": f, "retry_feedback": r, "reflection": d, "retry_reflection": y}
                         for a, f, r, d, y in zip(attempts[:5], feedback, raw.texts, reflections.texts, retry.texts)],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def zone_main(argv: Sequence[str] | None = None) -> int:
    """``python -m rlnlp.bench erl-zone --tasks digits json_value``: where each task sits for ERL (see ``zone``), one
    line per task; ``--jsonl FILE`` appends the numbers (with a few examples) there."""
    from ..cli import Parser
    from ..envs import feedback_tasks as ft
    from ..models import load_policy

    parser = Parser(prog="python -m rlnlp.bench erl-zone", description=zone_main.__doc__)
    parser.add_argument("--tasks", nargs="+", default=list(ft.SPARSE_TASKS), choices=ft.TASKS, metavar="TASK",
                        help=f"feedback tasks, of {ft.TASKS}")
    parser.add_argument("--n", type=int, default=150, help="held-out prompts per task")
    parser.add_argument("--group", type=int, default=4, help="samples per prompt (the GRPO group size)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--jsonl", default=None, help="append one JSON line per task to this file")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if args.n < 1 or args.group < 2 or args.temperature <= 0 or args.max_new_tokens < 1:
        parser.error("--n ≥ 1, --group ≥ 2, --temperature > 0 and --max-new-tokens ≥ 1")
    if args.jsonl and not Path(args.jsonl).parent.is_dir():
        parser.error(f"--jsonl: folder {str(Path(args.jsonl).parent)!r} does not exist")
    model, tokenizer = load_policy()
    print(f"{'task':<12}{'greedy':>8}{'sampled':>9}{'groups w/ var':>14}{'resample':>10}{'retry←feedback':>16}"
          f"{'retry←reflection':>18}  (n {args.n}, {args.group} per prompt, T {args.temperature}; torch threads "
          f"{torch.get_num_threads()})", flush=True)
    for task in args.tasks:
        z = zone(model, tokenizer, task, args.n, args.group, args.temperature, args.max_new_tokens)
        print(f"{task:<12}{z['greedy']:>8.3f}{z['sampled']:>9.3f}{z['groups_with_variance']:>14.3f}{z['resample']:>10.3f}"
              f"{z['retry_feedback']:>16.3f}{z['retry_reflection']:>18.3f}", flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(json.dumps(z) + "\n")
    return 0
