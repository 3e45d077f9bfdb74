"""The command line: ``python -m rlnlp.archer train|eval|compare``."""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from ..cli import EXPECTED_ERRORS, Parser, nonneg_int, positive_int, run
from ..tracking import runs_dir
from .analysis import ended_episodes, evaluate
from .compare import add_compare_parser, cli_compare
from .config import ALGOS, TASKS, TWENTY_QUESTIONS_VARIANTS, ArcherConfig, RunFolderError, UsageError, with_task
from .envs import check_dataset
from .runs import _checkpoint_dir, load_checkpoint, read_run
from .training import train


def _cli_train(args) -> int:
    from ..runtime import profile

    if args.resume:
        if not args.name:
            raise UsageError("--resume needs --name NAME of the run folder to continue (under runs/)")
        exp = runs_dir() / args.name
        algo, cfg, meta = read_run(exp)
        _checkpoint_dir(exp, "latest")
        if meta.get("complete"):
            print(f"{exp}: already complete ({meta['env_steps']} env samples); nothing to resume")
            return 0
        name = args.name
    else:
        over = {k: v for k, v in dict(dataset=args.dataset, seed=args.seed, env_steps=args.env_steps,
                                      actor_loss=args.actor_loss, target_update=args.target_update,
                                      kl_coef=args.kl_coef, checkpoint_every=args.checkpoint_every,
                                      actor_updates=args.actor_updates, critic_input=args.critic_input,
                                      number_range=tuple(args.range) if args.range else None,
                                      candidates=tuple(args.candidates) if args.candidates else None,
                                      prefill=args.prefill).items()
                if v is not None}
        if "dataset" not in over:
            raise UsageError("train needs --dataset (a task file or a Twenty Questions variant), "
                             "or --resume --name NAME")
        task = next((t for t, v in TASKS.items() if v["dataset"] == over["dataset"]
                     or Path(v["dataset"]).name == Path(over["dataset"]).name), None)
        cfg = getattr(ArcherConfig, profile(args.profile))()
        # a known task brings its caps; any other task file gets best_lang's (8 lines of ≤ 48 tokens)
        cfg = with_task(cfg, task) if task else replace(cfg, max_turns=8, utterance_tokens=48)
        cfg = replace(cfg, **over, **{k: v for k, v in dict(max_turns=args.max_turns,
                                                             utterance_tokens=args.utterance_tokens).items()
                                      if v is not None})
        algo = {"baseline": "ppo"}.get(args.algo, args.algo)
        name = args.name or f"{algo}_{Path(cfg.dataset).stem}_{time.strftime('%Y%m%d-%H%M%S')}"
        if (runs_dir() / name / "run.json").exists():
            raise RunFolderError(f"{runs_dir() / name}: a run of this name exists; pass --resume to continue it "
                                 "or choose another --name")
    check_dataset(cfg)
    run = train(cfg, algo, name, resume=args.resume)
    ep = ended_episodes(run.df)
    print(f"{name}: {run.env_steps} env samples, {run.grad_steps} actor gradient steps, {len(ep)} episodes, "
          f"mean return of the last {min(16, len(ep))}: {ep['charts/episode_return'].tail(16).mean():.3f} "
          f"-> {run.tracker.dir}")
    return 0


def _cli_eval(args) -> int:
    exp = Path(args.exp_path)
    _checkpoint_dir(exp, args.chkpt_label)
    _, cfg, _ = read_run(exp)
    if args.dataset:
        cfg = replace(cfg, dataset=args.dataset)
    check_dataset(cfg)
    model, tokenizer, _ = load_checkpoint(exp, args.chkpt_label)
    res = evaluate(model, tokenizer, cfg, episodes=args.episodes)
    out = {k: res[k] for k in ("success_rate", "mean_return", "episodes")}
    (exp / f"eval_{args.chkpt_label}.json").write_text(json.dumps(out, indent=2))
    print(f"{exp} [{args.chkpt_label}] on {cfg.dataset}: success rate {out['success_rate']:.3f}, "
          f"mean return {out['mean_return']:.3f} over {out['episodes']} episodes")
    return 0


PROG = "python -m rlnlp.archer"


def build_parser() -> Parser:
    """The options of ``train`` and ``eval``; counts are checked as they are parsed (``--env-steps -5`` stops here,
    before any model loads), the rest when the config is built (``ArcherConfig.__post_init__``)."""
    ap = Parser(prog=PROG, description="ArCHer: an utterance-level critic guides a token-level actor.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    tr = sub.add_parser("train", help="train ArCHer (or a baseline) and save runs/NAME")
    tr.add_argument("--dataset", help="a recurve YAML task file, or a Twenty Questions variant "
                                      f"({', '.join(TWENTY_QUESTIONS_VARIANTS)})")
    tr.add_argument("--name", help="run folder under runs/ (default: algo_dataset_time)")
    tr.add_argument("--algo", choices=ALGOS + ("baseline",), default="archer", help="baseline = ppo")
    tr.add_argument("--profile", choices=("smoke", "cpu", "full"),
                    help="budget preset (default: full on CUDA, else cpu)")
    tr.add_argument("--resume", action="store_true", help="continue runs/NAME from its latest checkpoint")
    tr.add_argument("--seed", type=nonneg_int)
    tr.add_argument("--env-steps", type=positive_int, help="environment-sample budget")
    tr.add_argument("--checkpoint-every", type=nonneg_int,
                    help="save a checkpoint every N iterations / rounds (0 = only at the end)")
    tr.add_argument("--max-turns", type=positive_int, help="episode cap in utterances")
    tr.add_argument("--utterance-tokens", type=positive_int, help="token cap of one utterance")
    tr.add_argument("--actor-loss", choices=("reinforce", "ppo"))
    tr.add_argument("--target-update", choices=("polyak", "hard"))
    tr.add_argument("--kl-coef", type=float)
    tr.add_argument("--actor-updates", type=positive_int, help="actor steps per iteration after the critic's warm-up")
    tr.add_argument("--critic-input", choices=("separate", "joint"),
                    help="Q reads the utterance alone, or the state and the utterance as one text")
    tr.add_argument("--range", type=int, nargs=2, metavar=("LOW", "HIGH"), help="guess_number: the secret's range")
    tr.add_argument("--candidates", nargs="+", help="Twenty Questions: the objects the secret is drawn from")
    tr.add_argument("--prefill", help="multi-turn games: the text each turn starts with ('' for none)")
    ev = sub.add_parser("eval", help="score a checkpoint: success rate and mean return")
    ev.add_argument("--exp-path", required=True)
    ev.add_argument("--chkpt-label", default="latest")
    ev.add_argument("--dataset", help="evaluate on another task file than the run's")
    ev.add_argument("--episodes", type=positive_int)
    add_compare_parser(sub)
    return ap


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return {"train": _cli_train, "eval": _cli_eval, "compare": cli_compare}[args.cmd](args)


def main(argv: list[str] | None = None) -> int:
    """The command line. A user's mistake (a bad option or value, a broken task file, a missing run folder or
    checkpoint) prints ONE line naming what and where, and exits with status 2 — no traceback."""
    from ..envs.recurve import TaskFunctionError

    return run(_main, argv, errors=EXPECTED_ERRORS + (TaskFunctionError,), prog=PROG)
