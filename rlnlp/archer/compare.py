"""ArCHer vs token-level PPO vs trajectory-level GRPO on one task, over seeds, at equal environment samples.

    python -m rlnlp.archer compare --task guess_number --seeds 0 1 2 [--algos archer ppo grpo] [--profile cpu]
    python -m rlnlp.archer compare --task guess_number --seeds 0 1 2 --merge s0.json s1.json s2.json  # run apart

For each seed and method: train with the profile's budget (every method gets the same environment
samples and the same number of actor gradient steps), then play the fixed evaluation episodes — the
same starts and sampling seeds for every method, every seed and the untrained policy. Reported:

* each method's success after training vs the untrained policy, paired over seeds × episodes;
* ArCHer − each baseline, paired over seeds × episodes;
* samples to reach a target success rate, per seed: the first window of environment samples whose
  training episodes reach it on average (target: halfway from the untrained policy's success to the
  best window any method reached, mean over seeds; or ``target_return`` when set), and baseline / ArCHer per seed with a
  bootstrap interval over seeds. A run that never reaches the target counts as the whole budget, so
  a ratio with an unreached baseline is a lower bound (the seed is flagged);
* one figure: training success vs environment samples, the mean over seeds with a band from the
  lowest to the highest seed.

Training curves of a multi-turn task are binned by when an episode STARTED (``episode_starts``): binned by
when it ended, the first windows hold only the episodes short enough to have ended already — the quick
successes — and read ~100% success. Episodes that start within the last ``max_turns × num_envs`` samples
may not have ended by the budget, so the curve stops there.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from .. import plots
from ..models import TextEncoder, load_policy
from ..results import Results
from ..stats import binned_rate, bootstrap, paired_difference
from .analysis import ended_episodes, evaluate
from .config import ALGOS, ArcherConfig, UsageError
from .training import train

LABELS = {"archer": "ArCHer", "ppo": "token-level PPO", "grpo": "trajectory-level GRPO"}


def check_compare_args(seeds, algos, part: bool = False) -> None:
    """A seed list and a method list the study can run (``UsageError`` names the problem). ``part``: a study of
    baselines alone may run when it is written to a file to merge with an ArCHer study later (``--out``)."""
    if not seeds:
        raise UsageError("compare needs at least one seed (--seeds 0 1 2)")
    if any(s < 0 for s in seeds):
        raise UsageError(f"seeds must be ≥ 0, got {list(seeds)}")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"seeds must be distinct, got {list(seeds)}")
    unknown = [a for a in algos if a not in ALGOS]
    if unknown or not algos:
        raise UsageError(f"unknown method(s) {unknown or '(none given)'}: use some of {', '.join(ALGOS)}")
    if "archer" not in algos and not part:
        raise UsageError("compare measures every method against ArCHer: include archer in --algos (or write the "
                         "baselines to --out FILE and merge them with an ArCHer study: --merge)")


def episode_starts(df, num_envs: int) -> np.ndarray:
    """Env samples at which each ended episode of a run's log began: ``charts/episode_start`` where logged; else
    derived — ArCHer's environments step in lockstep (start = end − num_envs × length), a baseline's round
    starts all its episodes at once (start = the env samples before the round's row)."""
    ep = ended_episodes(df)
    if not len(ep):  # a run too short for any episode to end
        return np.zeros(0)
    if "charts/episode_start" in ep and ep["charts/episode_start"].notna().all():
        return ep["charts/episode_start"].to_numpy(float)
    if "charts/actor_trains" in df:
        return (ep["charts/env_steps"] - num_envs * ep["charts/episode_length"]).to_numpy(float)
    starts, base = [], 0.0
    for _, row in df.iterrows():  # a round logs its episodes, then one row with its iteration and env samples
        if row.get("charts/episode_return") == row.get("charts/episode_return"):  # not NaN: an episode row
            starts.append(base)
        elif row.get("charts/iteration") == row.get("charts/iteration"):
            base = float(row["charts/env_steps"])
    return np.asarray(starts, float)


def start_curve(df, cfg: ArcherConfig, bins: int = 8, column: str = "charts/success") -> dict:
    """Mean ``column`` of the episodes that STARTED in each window of environment samples, over the part of the
    budget where every started episode has ended (0 to env_steps − max_turns × num_envs)."""
    ep = ended_episodes(df, "charts/episode_return")
    hi = max(cfg.env_steps - cfg.max_turns * cfg.num_envs, cfg.num_envs)
    values = ep[column].to_numpy(float) if len(ep) else np.zeros(0)
    return binned_rate(episode_starts(df, cfg.num_envs), values, np.linspace(0, hi, bins + 1))


def samples_to_target(curve: dict, target: float, budget: float) -> tuple[float, bool]:
    """(environment samples at the end of the first window whose mean return reaches ``target``, reached?);
    a curve that never reaches it gives (budget, False)."""
    x, mean = np.asarray(curve["x"], float), np.nan_to_num(np.asarray(curve["mean"], float), nan=-np.inf)
    width = (x[1] - x[0]) if len(x) > 1 else budget
    hit = np.nonzero(mean >= target)[0]
    return (float(x[hit[0]] + width / 2), True) if len(hit) else (float(budget), False)


def summarize(curves: dict, untrained: float, budget: float, target: float | None = None) -> dict:
    """Samples-to-target per seed and baseline / ArCHer ratios with a bootstrap interval over seeds.

    curves: {algo: {seed: {"x", "mean"}}} (training success per window of environment samples); untrained: the
    untrained policy's success on the evaluation episodes; target: None = halfway from it to the best window.
    """
    algos = list(curves)
    seeds = sorted(next(iter(curves.values())))
    mean_curve = {a: np.nanmean(np.array([curves[a][s]["mean"] for s in seeds], float), axis=0) for a in algos}
    best = max(float(np.nanmax(m)) for m in mean_curve.values())
    if target is None:
        target = untrained + 0.5 * (best - untrained) if best > untrained else None
    out = {"target": target, "untrained": untrained, "budget": budget, "samples": {},
           "reached": {}, "ratios": {}}
    if target is None:
        out["note"] = "no method's mean training success beat the untrained policy's: no target to reach"
        return out
    for a in algos:
        got = [samples_to_target(curves[a][s], target, budget) for s in seeds]
        out["samples"][a] = {s: g[0] for s, g in zip(seeds, got)}
        out["reached"][a] = {s: g[1] for s, g in zip(seeds, got)}
    for a in algos:
        if a == "archer" or "archer" not in algos:  # a part of baselines alone: ratios once merged with ArCHer
            continue
        r = np.array([out["samples"][a][s] / out["samples"]["archer"][s] for s in seeds])
        iv = bootstrap(np.mean, r) if len(r) > 1 else None
        out["ratios"][a] = {"per_seed": dict(zip(seeds, r.tolist())), "mean": float(r.mean()),
                            "interval": iv.as_dict() if iv else None}
    return out


def plot_study(curves: dict, budget: float, task: str, baselines: dict | None = None):
    """Training success vs environment samples per method: the mean over seeds, a band from min to max seed."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8), layout="constrained")
    for a, per_seed in curves.items():
        seeds = sorted(per_seed)
        x = np.asarray(per_seed[seeds[0]]["x"], float)
        ys = np.array([per_seed[s]["mean"] for s in seeds], float)  # (seeds, windows)
        line, = ax.plot(x, np.nanmean(ys, 0), marker="o", markersize=3,
                        label=f"{LABELS.get(a, a)} (mean of {len(seeds)} seeds)")
        ax.fill_between(x, np.nanmin(ys, 0), np.nanmax(ys, 0), color=line.get_color(), alpha=0.2, linewidth=0)
    plots._baselines(ax, baselines)
    ax.set(title=f"{task}: training success vs environment samples (band: lowest to highest seed)",
           xlabel="environment samples at the episodes' start (utterances)",
           ylabel="success rate of the training episodes")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def run_study(cfg: ArcherConfig, task: str, seeds: list[int], algos: list[str] = ALGOS, bins: int = 3,
              encoder: TextEncoder | None = None, results: Results | None = None, prefix: str = "study",
              log=print, save_to: str | Path | None = None) -> dict:
    """Train every method at every seed with ``cfg``'s budget, evaluate, and summarise (see the module docstring).

    Returns {"untrained", "evaluations": {algo: {seed: {"success", "returns"}}}, "curves", "summary",
    "grad_steps", "env_steps", "wall_s"}; with ``results`` also records the rows. With ``save_to`` the study so
    far is written there after every seed (``"seeds"`` lists the finished ones), so a stopped study keeps them.
    """
    check_compare_args(seeds, algos, part=results is None and save_to is not None)
    start = time.time()
    encoder = encoder or TextEncoder(max_length=cfg.critic_max_length)
    policy, tokenizer = load_policy(cfg.policy_model, trainable=False)
    untrained = evaluate(policy, tokenizer, cfg, encoder=encoder)
    del policy
    log(f"untrained: success {untrained['success_rate']:.3f}, return {untrained['mean_return']:.3f} "
        f"({untrained['episodes']} episodes)")
    evals, curves, grad_steps, env_steps, wall = ({a: {} for a in algos} for _ in range(5))
    for seed in seeds:  # seed by seed: a study stopped part-way has every method at the seeds it finished
        for algo in algos:
            run = train(replace(cfg, seed=seed), algo, f"{prefix}_{task}_{algo}_seed{seed}", encoder=encoder)
            ev = evaluate(run.model, run.tokenizer, replace(cfg, seed=seed), encoder=encoder)
            c = start_curve(run.df, cfg, bins)
            evals[algo][seed] = {"success": ev["success"].tolist(), "returns": ev["returns"].tolist()}
            curves[algo][seed] = {"x": np.asarray(c["x"]).tolist(), "mean": np.asarray(c["mean"]).tolist()}
            grad_steps[algo][seed], env_steps[algo][seed], wall[algo][seed] = run.grad_steps, run.env_steps, run.wall_s
            log(f"{algo} seed {seed}: success {ev['success_rate']:.3f}, return {ev['mean_return']:.3f}, "
                f"{run.env_steps} env samples, {run.grad_steps} actor steps, {run.wall_s:.0f} s of training")
            del run
        done = seeds[: seeds.index(seed) + 1]
        study = {"task": task, "seeds": list(done), "algos": list(algos), "config": asdict(cfg),
                 "untrained": {"success": untrained["success"].tolist(), "returns": untrained["returns"].tolist()},
                 "evaluations": evals, "curves": curves,
                 "summary": summarize(curves, untrained["success_rate"], cfg.env_steps, cfg.target_return),
                 "grad_steps": grad_steps, "env_steps": env_steps, "train_wall_s": wall, "wall_s": time.time() - start}
        if save_to is not None:
            save_study(study, save_to)
    if results is not None:
        record(study, results)
    return study


ARCHER_ONLY = ("normalize_advantage", "center_advantage", "critic_input", "critic_hidden", "critic_lr", "critic_batch",
               "critic_steps", "fresh_batch", "buffer_size", "target_update", "tau", "hard_update_every",
               "warmup_iters", "gamma", "critic_max_length")
"""Config fields only ArCHer reads (the baselines' budget, gradient steps and losses do not depend on them)."""


def select_methods(study: dict, algos: list[str]) -> dict:
    """The study with only some of its methods (e.g. a study's baselines, to merge with ArCHer from another)."""
    missing = [a for a in algos if a not in study["algos"]]
    if missing:
        raise UsageError(f"the study holds {', '.join(study['algos'])}, not {', '.join(missing)}")
    out = dict(study, algos=[a for a in study["algos"] if a in algos])
    for key in ("evaluations", "curves", "grad_steps", "env_steps", "train_wall_s"):
        out[key] = {a: v for a, v in study[key].items() if a in algos}
    return out


def merge_studies(studies: list[dict]) -> dict:
    """One study from several run apart: one process per seed, or the baselines of one study with ArCHer from
    another. The same task and untrained evaluation; configs equal but for the seed (and, for a study without
    ArCHer, the fields in ``ARCHER_ONLY``); each (method, seed) from one study only; every method at every seed.
    The merged config is that of the studies holding ArCHer; the summary is recomputed over all seeds."""
    if not studies:
        raise UsageError("merge needs at least one study")
    first = studies[0]
    with_archer = [st for st in studies if "archer" in st["algos"]]
    if not with_archer:
        raise UsageError("the studies to merge hold no ArCHer runs")
    ref = with_archer[0]

    def differ(st: dict) -> set:
        return {k for k in ref["config"] if k != "seed" and st["config"].get(k) != ref["config"][k]}

    cells: dict[str, dict] = {}
    for st in studies:
        if st["task"] != first["task"]:
            raise UsageError(f"studies to merge must share the task, got {first['task']} and {st['task']}")
        extra = differ(st) - (set(ARCHER_ONLY) if "archer" not in st["algos"] else set())
        if extra:
            raise UsageError(f"studies to merge must share the config (all but the seed): {', '.join(sorted(extra))} "
                             "differ")
        if st["untrained"] != first["untrained"]:
            raise UsageError("studies to merge must share the untrained policy's evaluation (same episodes, same "
                             "precision and thread count)")
        for a in st["algos"]:
            twice = set(st["seeds"]) & set(cells.get(a, {}))
            if twice:
                raise UsageError(f"{a} at seed(s) {sorted(twice)} appears in more than one study")
            cells.setdefault(a, {}).update({x: st for x in st["seeds"]})
    seeds = sorted(cells["archer"])
    gaps = [a for a in cells if sorted(cells[a]) != seeds]
    if gaps:
        raise UsageError(f"every method needs every seed {seeds}: {', '.join(gaps)} "
                         f"{'do' if len(gaps) > 1 else 'does'} not match")
    algos = ["archer"] + [a for a in ALGOS if a in cells and a != "archer"]
    out = {"task": first["task"], "algos": algos, "config": ref["config"], "untrained": first["untrained"],
           "seeds": seeds}
    for key in ("evaluations", "curves", "grad_steps", "env_steps", "train_wall_s"):
        out[key] = {a: {x: cells[a][x][key][a][x] for x in seeds} for a in algos}
    out["summary"] = summarize(out["curves"], float(np.mean(first["untrained"]["success"])),
                               ref["config"]["env_steps"], ref["config"].get("target_return"))
    out["wall_s"] = sum(st["wall_s"] for st in studies)
    return out


def pooled(study: dict, algo: str, key: str = "success", against: str | None = None):
    """Paired difference algo − (untrained | another algo), pooled over seeds × evaluation episodes."""
    seeds = study["seeds"]
    a = np.concatenate([study["evaluations"][algo][s][key] for s in seeds])
    b = (np.concatenate([study["evaluations"][against][s][key] for s in seeds]) if against
         else np.tile(study["untrained"][key], len(seeds)))
    return paired_difference(a, b)


def record(study: dict, results: Results) -> None:
    """The study's results rows: each method vs the untrained policy, ArCHer vs each baseline."""
    task, seeds, s = study["task"], study["seeds"], study["summary"]
    unit = f"evaluation episode × seed ({len(seeds)} seeds; same starts and sampling seeds)"
    base = float(np.mean(study["untrained"]["success"]))
    value = {a: float(np.mean([np.mean(study["evaluations"][a][x]["success"]) for x in seeds])) for a in study["algos"]}
    for a in study["algos"]:
        results.add(system="recurve/ArCHer", task=task, metric="success", method=f"{LABELS[a]} (seeds {seeds})",
                    value=value[a], baseline="untrained policy", baseline_value=base, difference=pooled(study, a),
                    unit=unit, claim="learning", wall_s=study["wall_s"],
                    note=f"{study['env_steps'][a][seeds[0]]} env samples, {study['grad_steps'][a][seeds[0]]} actor "
                         f"gradient steps per seed")
    for a in study["algos"]:
        if a == "archer":
            continue
        r = s.get("ratios", {}).get(a)
        ratio = (f"samples to reach success {s['target']:.2f}: {LABELS[a]} / ArCHer = {r['mean']:.2f}"
                 + (f" [{r['interval']['low']:.2f}, {r['interval']['high']:.2f}] (bootstrap over seeds)"
                    if r and r["interval"] else "") if r else s.get("note", "no samples-to-target ratio"))
        results.add(system="recurve/ArCHer", task=task, metric="success", method=f"ArCHer (seeds {seeds})",
                    value=value["archer"], baseline=f"{LABELS[a]} (same seeds)", baseline_value=value[a],
                    difference=pooled(study, "archer", against=a), unit=unit, claim="comparison",
                    wall_s=study["wall_s"], note=f"equal env samples and actor gradient steps; {ratio}")


def save_study(study: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(study, indent=1) + "\n")
    return path


def load_study(path: str | Path) -> dict:
    """A saved study (JSON keys are strings: seeds are turned back into ints)."""
    study = json.loads(Path(path).read_text())
    for key in ("evaluations", "curves", "grad_steps", "env_steps", "train_wall_s"):
        study[key] = {a: {int(s): v for s, v in per.items()} for a, per in study[key].items()}
    summ = study["summary"]
    for key in ("samples", "reached"):
        summ[key] = {a: {int(s): v for s, v in per.items()} for a, per in summ.get(key, {}).items()}
    for r in summ.get("ratios", {}).values():
        r["per_seed"] = {int(s): v for s, v in r["per_seed"].items()}
    return study


# ---- the command line: python -m rlnlp.archer compare -----------------------------------------------------------

def add_compare_parser(sub) -> None:
    """The ``compare`` sub-command's options (counts are checked as they are parsed: no model loads before)."""
    from ..cli import nonneg_int, positive_int

    cp = sub.add_parser("compare", help="ArCHer vs token-level PPO vs trajectory GRPO over seeds at equal env samples")
    cp.add_argument("--task", required=True, help="a task name (e.g. guess_number, twenty_questions_6, capital_choice)")
    cp.add_argument("--seeds", type=nonneg_int, nargs="+", required=True, help="training seeds, e.g. 0 1 2")
    cp.add_argument("--algos", nargs="+", default=list(ALGOS),
                    help=f"methods among {', '.join(ALGOS)}; without archer only with --out (a part to merge later)")
    cp.add_argument("--profile", choices=("smoke", "cpu", "full"),
                    help="budget preset (default: full on CUDA, else cpu)")
    cp.add_argument("--env-steps", type=positive_int, help="environment-sample budget of every run")
    cp.add_argument("--episodes", type=positive_int, help="evaluation episodes (the same for every run)")
    cp.add_argument("--bins", type=positive_int, default=3, help="windows of environment samples on the curves")
    cp.add_argument("--out", help="where the study's JSON goes (default: visualizations/<profile>/04-study-TASK.json)")
    cp.add_argument("--merge", nargs="+", metavar="STUDY.json[:METHOD,...]",
                    help="train nothing: merge studies run apart (one process per seed; or FILE:ppo,grpo for only "
                         "those methods of a study) into --out, record its rows and draw its figure")


def cli_compare(args) -> int:
    """Run the study, record its rows in visualizations/results/<profile>/04_recurve_archer_study_TASK.json, save the
    study's JSON and its figure, print the per-seed table."""
    from ..runtime import profile
    from .config import TASKS
    from .games import task_preset

    if args.task not in TASKS:
        raise UsageError(f"unknown task {args.task!r}: use one of {', '.join(TASKS)}")
    algos = list(dict.fromkeys(args.algos))
    part = "archer" not in algos and not args.merge  # baselines alone, to merge with an ArCHer study later
    check_compare_args(args.seeds, algos, part=part and args.out is not None)
    algos = ["archer"] * ("archer" in algos) + [a for a in algos if a != "archer"]
    prof = profile(args.profile)
    over = {k: v for k, v in dict(env_steps=args.env_steps, eval_episodes=args.episodes).items() if v is not None}
    cfg = task_preset(prof, args.task, **over)
    from .envs import check_dataset

    check_dataset(cfg)
    res = Results(f"04_recurve_archer_study_{args.task}", prof=prof)
    folder = plots.visualizations_dir() / (prof if prof != "full" else "")
    out = Path(args.out) if args.out else folder / f"04-study-{args.task}.json"
    if args.merge:
        parts = [(p.rsplit(":", 1) if ":" in p and not Path(p).is_file() else (p, "")) for p in args.merge]
        missing = [p for p, _ in parts if not Path(p).is_file()]
        if missing:
            raise UsageError(f"no study file at {', '.join(missing)}")
        study = merge_studies([select_methods(load_study(p), m.split(",")) if m else load_study(p) for p, m in parts])
        if study["task"] != args.task or sorted(args.seeds) != study["seeds"]:
            raise UsageError(f"the merged studies hold task {study['task']} at seeds {study['seeds']}, not "
                             f"{args.task} at {sorted(args.seeds)}")
        save_study(study, out)
        record(study, res)
    elif part:  # no rows and no figure: they compare with ArCHer, which this file lacks until it is merged
        study = run_study(cfg, args.task, args.seeds, algos, bins=args.bins, prefix=f"compare_{prof}", save_to=out)
        print(format_study(study))
        print(f"baselines: {study['wall_s'] / 60:.1f} min -> {out}; merge with an ArCHer study of the same task and "
              f"seeds: python -m rlnlp.archer compare --task {args.task} --seeds ... --merge ARCHER.json {out}")
        return 0
    else:
        study = run_study(cfg, args.task, args.seeds, algos, bins=args.bins, results=res, prefix=f"compare_{prof}",
                          save_to=out)
    fig = plot_study(study["curves"], study["config"]["env_steps"], args.task,
                     baselines={"untrained policy": float(np.mean(study["untrained"]["success"]))})
    plots.save(fig, f"04-study-{args.task}", prof=prof)
    print(format_study(study))
    print(f"study: {study['wall_s'] / 60:.1f} min -> {out}, rows in {res.path}")
    return 0


def format_study(study: dict) -> str:
    """The study as text: per method and seed, success after training, gradient steps, samples to the target."""
    s, seeds = study["summary"], study["seeds"]
    lines = [f"task {study['task']}, seeds {seeds}: untrained success {np.mean(study['untrained']['success']):.3f}, "
             f"return {np.mean(study['untrained']['returns']):.3f}"]
    target = s.get("target")
    lines.append(f"target success {target:.3f}" if target is not None else s.get("note", ""))
    for a in study["algos"]:
        for x in seeds:
            ev = study["evaluations"][a][x]
            reach = ""
            if target is not None:
                reach = (f", samples to target {s['samples'][a][x]:.0f}"
                         + ("" if s["reached"][a][x] else " (not reached: the budget)"))
            lines.append(f"  {LABELS[a]:22} seed {x}: success {np.mean(ev['success']):.3f}, return "
                         f"{np.mean(ev['returns']):.3f}, {study['env_steps'][a][x]} env samples, "
                         f"{study['grad_steps'][a][x]} actor steps{reach}")
        lines.append(f"  {LABELS[a]:22} vs untrained (pooled over seeds × episodes): {pooled(study, a)}")
    for a, r in s.get("ratios", {}).items():
        iv = r["interval"]
        lines.append(f"  samples to target, {LABELS[a]} / ArCHer: per seed "
                     + ", ".join(f"{v:.2f}" for v in r["per_seed"].values()) + f"; mean {r['mean']:.2f}"
                     + (f" [{iv['low']:.2f}, {iv['high']:.2f}] (bootstrap over seeds)" if iv else ""))
        lines.append(f"  ArCHer − {LABELS[a]} success (pooled): {pooled(study, 'archer', against=a)}")
    return "\n".join(lines)
