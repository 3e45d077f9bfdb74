"""rlnlp — reinforcement learning on language models, one coherent workbook package.

The shared core (every system builds on these; systems never import each other):

    runtime   profile(), device(), dtype(), seed_everything(), pick(), banner()
    models    load_policy(), load_encoder(), TextEncoder, attach_lora(), completion_logprobs(), kl_k3()
    sampling  sample() — the one batched sampler
    returns   discounted_returns(), gae()
    envs      the text-environment protocol (reset/step), Episode, rollout(), VecEnv
    tracking  Tracker (metrics -> DataFrame / runs/<name>/metrics.csv), progress()
    plots     every figure; save() into visualizations/
    widgets   stepper(), scrubber(), erl_browser()
    data      wikipedia_summaries(), twenty_questions(), data_dir()
    stats     paired_difference(), mean_interval(), wilson(), bootstrap(), binned_rate() -> Interval
    results   Results(notebook).add(...) — headline rows; ``python -m rlnlp.scoreboard`` prints them
    checks    rules a config's __post_init__ applies (Literal choices, ranges): one ValueError per bad field
    checkpoint save() (atomic) / load(), rng_state() / set_rng_state() — long runs resume exactly
    cli       Parser, run(main), UsageError — every command line's one-line error path (exit status 2)
"""
from .models import (
    EmbeddedModelMissing,
    TextEncoder,
    attach_lora,
    completion_logprobs,
    kl_k3,
    load_encoder,
    load_policy,
    load_tokenizer,
    masked_mean,
)
from .results import Results
from .returns import discounted_returns, gae
from .runtime import banner, device, dtype, pick, profile, seed_everything
from .sampling import Samples, sample
from .tracking import Tracker, progress

__all__ = [
    "EmbeddedModelMissing", "TextEncoder", "attach_lora", "completion_logprobs", "kl_k3", "load_encoder",
    "load_policy", "load_tokenizer", "masked_mean", "discounted_returns", "gae", "banner", "device", "dtype",
    "pick", "profile", "seed_everything", "Samples", "sample", "Tracker", "progress", "Results",
]
