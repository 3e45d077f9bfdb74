"""The command line: ``python -m rlnlp.attention_guided [--mode loop|selection] ...`` trains, checkpoints, evaluates on
held-out pools and prints the paired differences. A user's mistake is one line and exit status 2 (``rlnlp.cli``)."""
from __future__ import annotations

from ..cli import EXPECTED_ERRORS, Parser, UsageError, nonneg_int, positive_int
from ..models import EmbeddedModelMissing
from ..runtime import pick, seed_everything
from .analysis import describe_difference, paired, per_pool
from .config import DATASETS, MODES, AttentionGuidedConfig, SelectionConfig
from .loop import AttentionGuidedTrainer
from .selection import SelectionTrainer

PROG = "python -m rlnlp.attention_guided"
ERRORS = (*EXPECTED_ERRORS, EmbeddedModelMissing)
"""What the command turns into one line: a bad option or config value, a missing file, no embedded model."""


def parser() -> Parser:
    p = Parser(prog=PROG, description="Attention-guided RL: the model orders its own curriculum.")
    p.add_argument("--mode", choices=MODES, default="loop",
                   help="loop: sampled queries + selection (the full profile's method); selection: fixed query, "
                        "last-layer q/k LoRA, cached pools (the cpu profile's method)")
    p.add_argument("--dataset", choices=DATASETS, default="wikipedia")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="loop: policy rollouts per episode; selection: orders sampled per pool per update")
    p.add_argument("--episodes", type=positive_int, default=None, help="loop: training episodes; selection: updates")
    p.add_argument("--checkpoint-every", type=nonneg_int, default=None,
                   help="save a checkpoint every N episodes (loop) or updates (selection); 0 = only at the end")
    p.add_argument("--resume", action="store_true", help="continue from runs/<run>/checkpoint.pt")
    p.add_argument("--profile", choices=("smoke", "cpu", "full"), default=None)
    p.add_argument("--pool-size", type=int, default=None)
    p.add_argument("--train-pools", type=positive_int, default=None, help="selection: distinct training pools")
    p.add_argument("--eval-pools", type=positive_int, default=None)
    p.add_argument("--training-percentile", type=float, default=None, help="loop only")
    p.add_argument("--run-name", default=None)
    p.add_argument("--seed", type=int, default=None)
    return p


def config_from(args):
    """The config the options ask for (a preset, then the options given), validated."""
    selection = args.mode == "selection"
    if selection and args.training_percentile is not None:
        raise UsageError("--training-percentile belongs to --mode loop")
    if not selection and args.train_pools is not None:
        raise UsageError("--train-pools belongs to --mode selection")
    named = dict(dataset=args.dataset, pool_size=args.pool_size, eval_pools=args.eval_pools, seed=args.seed,
                 run_name=args.run_name, checkpoint_every=args.checkpoint_every)
    if selection:
        named.update(orders_per_pool=args.batch_size, updates=args.episodes, train_pools=args.train_pools)
    else:
        named.update(batch_size=args.batch_size, episodes=args.episodes, training_percentile=args.training_percentile)
    return pick(SelectionConfig if selection else AttentionGuidedConfig, args.profile,  # validates the overrides
                **{k: v for k, v in named.items() if v is not None})


def main(argv: list[str] | None = None) -> dict:
    """Train, evaluate on held-out pools, print the paired differences; return them (``policy_vs_<other>``)."""
    args = parser().parse_args(argv)
    cfg = config_from(args)
    selection = isinstance(cfg, SelectionConfig)
    seed_everything(cfg.seed)
    if selection:
        trainer = SelectionTrainer(cfg)
        df = trainer.train(resume=args.resume, cache_path=trainer.tracker.dir / "caches.pt")
        evaluation = trainer.evaluate()
    else:
        trainer = AttentionGuidedTrainer(cfg)
        df = trainer.train(resume=args.resume)
        evaluation, _ = trainer.evaluate(trainer.eval_pools(cfg.eval_pools))
    print(df.tail(5).to_string())
    evaluation.to_csv(trainer.tracker.dir / "evaluation.csv", index=False)
    others = ("untrained", "random", "document", "best") if selection else ("untrained", "random", "document")
    result = {}
    for other in others:
        result[f"policy_vs_{other}"] = paired(evaluation, "policy", other)
        print("held-out:", describe_difference(evaluation, "policy", other))
    if selection:
        ent = per_pool(evaluation, "entropy")
        print(f"held-out selection entropy {ent['policy'].mean():.3f} nats vs uniform {ent['random'].mean():.3f} "
              f"(untrained {ent['untrained'].mean():.3f})")
    return result
