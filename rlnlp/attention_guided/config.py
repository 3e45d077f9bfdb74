"""The two configs: the full loop (``AttentionGuidedConfig``) and selection only (``SelectionConfig``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from ..checks import (
    INT_AT_LEAST_0,
    INT_AT_LEAST_1,
    NON_NEGATIVE,
    POSITIVE,
    between,
    check_choices,
    check_fields,
    optional,
)
from ..runtime import profile

Dataset = Literal["wikipedia", "twenty_questions"]
DATASETS = get_args(Dataset)
SELECTORS = ("policy", "random", "document")
MODES = ("loop", "selection")
FIXED_QUERY = " What comes next?"
"""The query of the selection-only mode (and of the loop's temperature measurement)."""
SPLIT_SEED = 20240  # fixed, so the held-out articles/objects do not move with cfg.seed


@dataclass
class AttentionGuidedConfig:
    """The full loop: sampled queries + selection, LoRA on q/k/v of every layer."""

    dataset: Dataset = "wikipedia"
    """`wikipedia` (vital-article summaries, key/value = token chunks) or `twenty_questions` (question → Yes/No)."""
    model: str | None = None
    """Policy LM (hub id or folder); None = the embedded SmolLM2-135M-Instruct. Original: Llama-3.2-3B / GPT-2."""
    pool_size: int = 8
    """Key-value pairs per episode."""
    steps: int | None = None
    """Selections per episode; None = pool_size (every pair is placed once)."""
    key_tokens: int = 10
    """Wikipedia: tokens per key chunk."""
    value_tokens: int = 10
    """Wikipedia: tokens per value chunk (the pair is key_tokens + value_tokens consecutive tokens)."""
    query_tokens: int = 10
    """Tokens the policy samples for each query."""
    query_temperature: float = 1.0
    """Sampling temperature of the query."""
    top_p: float = 0.9
    """Nucleus filter of the query sampling."""
    selection_temperature: float | None = None
    """T in softmax(s / T), s = head-averaged q·k/√d. None = the mean spread (std over keys) of the untrained
    scores on a few training pools, so the untrained selector is not uniform. Original: 1 with one softmax per
    head, nearly uniform at the measured spread (entropy 2.046 vs 2.079 for a uniform choice at 8 keys)."""
    learn_temperature: bool = True
    """Train log(1/T) with the policy (else T stays fixed)."""
    batch_size: int = 4
    """Policy rollouts per episode (all on the same pool; the REINFORCE baseline is their mean)."""
    baseline_rows: int = 1
    """Random-order and document-order rollouts per episode (each), scored by the same reward. 0 = none."""
    episodes: int = 1000
    """Total training episodes (= optimizer updates); --resume continues up to this number."""
    lr: float = 2e-4
    """Adam learning rate."""
    kl_coef: float = 0.1
    """Weight of the k3 KL(π‖π_ref) on the query tokens."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    training_percentile: float = 0.0
    """Train only on rollouts whose episode reward is ≥ this percentile of the batch (0 = all), as the original's
    flag."""
    lora_r: int = 8
    """LoRA rank (on q/k/v, or GPT-2's fused c_attn)."""
    lora_alpha: int = 32
    """LoRA alpha."""
    checkpoint_every: int = 100
    """Save adapter + optimizer + episode + metrics every this many episodes (and at the end)."""
    eval_fraction: float = 0.1
    """Share of articles / objects held out for evaluation."""
    eval_pools: int = 48
    """Held-out pools in the final evaluation (policy vs random order, paired per pool)."""
    seed: int = 0
    """Seed for pools, sampling and selection."""
    run_name: str | None = None
    """Folder under runs/ for metrics and checkpoints; None = attention_guided_<dataset>_<profile>."""

    @classmethod
    def smoke(cls, **kw) -> "AttentionGuidedConfig":
        """Mechanics only: a pool of 3, 2 updates of 2 rollouts, 4-token queries, 2 held-out pools."""
        base = dict(pool_size=3, query_tokens=4, batch_size=2, baseline_rows=1, episodes=2, checkpoint_every=100,
                    eval_pools=2)
        return cls(**{**base, **kw})

    @classmethod
    def cpu(cls, **kw) -> "AttentionGuidedConfig":
        """The full loop cannot learn in minutes on a CPU (measured: 82–108 s per rollout of 8 rows at pool 8), so
        the cpu profile runs it at the smoke size as a demonstration; its learning run is SelectionConfig.cpu()."""
        return cls.smoke(**kw)

    @classmethod
    def full(cls, **kw) -> "AttentionGuidedConfig":
        """One GPU, ≤ 90 s of training: 60 updates of 8 rollouts (+ 2 random- and 2 document-order rows) on pools of
        8 pairs (ESTIMATE, not measured: ~1.5 s per update on one H100: 8 sampling calls of 10 tokens, 8 query passes
        with their backward, one batched reward pass), then 48 held-out pools. The original trained 1000 episodes:
        `--episodes 1000` from the command line."""
        base = dict(pool_size=8, batch_size=8, baseline_rows=2, episodes=60, eval_pools=48)
        return cls(**{**base, **kw})

    def __post_init__(self):
        _check_common(self)
        check_fields(self, {"query_tokens": INT_AT_LEAST_1, "query_temperature": POSITIVE,
                            "top_p": between(0, 1, low_open=True), "batch_size": INT_AT_LEAST_1,
                            "baseline_rows": INT_AT_LEAST_0, "episodes": INT_AT_LEAST_1, "kl_coef": NON_NEGATIVE,
                            "training_percentile": between(0, 100, high_open=True), "eval_pools": INT_AT_LEAST_1})
        if self.steps is not None and not (isinstance(self.steps, int) and 1 <= self.steps <= self.pool_size):
            raise ValueError(f"AttentionGuidedConfig.steps must be None or an integer in 1..pool_size="
                             f"{self.pool_size}, got {self.steps!r}")

    @property
    def n_steps(self) -> int:
        return self.steps or self.pool_size

    @property
    def name(self) -> str:
        return self.run_name or f"attention_guided_{self.dataset}_{profile()}"


@dataclass
class SelectionConfig:
    """Selection only: a fixed query, LoRA on the last layer's q/k, cached pools with every order's reward."""

    dataset: Dataset = "wikipedia"
    """`wikipedia` or `twenty_questions` (as AttentionGuidedConfig)."""
    model: str | None = None
    """Policy LM; None = the embedded SmolLM2-135M-Instruct."""
    pool_size: int = 3
    """Pairs per pool: 3 → 6 orders, 4 → 24, every one scored once by the reference. Original: 8 (40320 orders,
    not enumerable). Measured (cpu profile, Wikipedia, 100 held-out pools of 3): document − random order
    +0.121 [+0.090, +0.151] nats/token, best order − random +0.206 [+0.187, +0.226]."""
    key_tokens: int = 10
    """Wikipedia: tokens per key chunk."""
    value_tokens: int = 10
    """Wikipedia: tokens per value chunk."""
    query: str = FIXED_QUERY
    """The fixed query text written after " Query:" at every step (the loop samples it instead)."""
    train_pools: int = 100
    """Distinct training pools (cached once)."""
    eval_pools: int = 100
    """Distinct held-out pools (cached once), the units of every paired interval."""
    updates: int = 80
    """Optimizer updates."""
    pools_per_update: int | None = None
    """Training pools per update (a random subset); None = all of them."""
    orders_per_pool: int = 8
    """Orders sampled per pool per update; their mean reward is the REINFORCE baseline of that pool."""
    lr: float = 3e-4
    """Adam learning rate. Measured (Wikipedia, 120 training pools): 1e-3 peaks after ~25 updates, then overfits the
    training pools; 3e-4 plateaus from ~60 updates on; 1e-4 is still climbing at 100."""
    lora_r: int = 8
    """LoRA rank on the last layer's q_proj and k_proj."""
    lora_alpha: int = 16
    """LoRA alpha."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    selection_temperature: float | None = None
    """T in softmax(s / T); None = the mean spread (std over remaining keys) of the untrained scores on the
    training pools, so the untrained logits have unit spread."""
    learn_temperature: bool = True
    """Train log(1/T) with the adapter."""
    eval_every: int = 10
    """Log the exact expected reward on training and held-out pools every this many updates."""
    checkpoint_every: int = 100
    """Save adapter + optimizer + update + metrics every this many updates (and at the end)."""
    eval_fraction: float = 0.1
    """Share of articles / objects held out for evaluation."""
    seed: int = 0
    """Seed for the training pools and the sampled orders."""
    run_name: str | None = None
    """Folder under runs/; None = attention_guided_selection_<dataset>_<profile>."""

    @classmethod
    def smoke(cls, **kw) -> "SelectionConfig":
        """Mechanics + one real check: 16 training and 16 held-out pools of 3, 40 updates at lr 1e-3."""
        base = dict(train_pools=16, eval_pools=16, updates=40, lr=1e-3, eval_every=5)
        return cls(**{**base, **kw})

    @classmethod
    def cpu(cls, **kw) -> "SelectionConfig":
        """The learning profile: 100 + 100 pools of 3 (≈ 3 min of caching per dataset on 2 cores), 80 updates
        (seconds)."""
        return cls(**kw)

    @classmethod
    def full(cls, **kw) -> "SelectionConfig":
        """One GPU: pools of 4 (24 orders), 800 training and 300 held-out pools, 300 updates of 64 pools
        (ESTIMATE: caching ~30 s, updates a few seconds on one H100)."""
        base = dict(pool_size=4, train_pools=800, eval_pools=300, updates=300, pools_per_update=64, eval_every=20)
        return cls(**{**base, **kw})

    def __post_init__(self):
        _check_common(self)
        if not 2 <= self.pool_size <= 5:
            raise ValueError(f"SelectionConfig.pool_size must be in 2..5 (every order is enumerated: 5! = 120), "
                             f"got {self.pool_size}")
        check_fields(self, {"train_pools": INT_AT_LEAST_1, "eval_pools": INT_AT_LEAST_1, "updates": INT_AT_LEAST_0,
                            "pools_per_update": optional(INT_AT_LEAST_1), "orders_per_pool": INT_AT_LEAST_1,
                            "eval_every": INT_AT_LEAST_1})
        if not isinstance(self.query, str) or not self.query.strip():
            raise ValueError("SelectionConfig.query must contain at least one word (its tokens are the query "
                             "embedding)")

    @property
    def name(self) -> str:
        return self.run_name or f"attention_guided_selection_{self.dataset}_{profile()}"


def _check_common(cfg) -> None:
    """The fields both configs share: one ValueError naming the class, the field, what is allowed and what was given."""
    check_choices(cfg)
    check_fields(cfg, {"pool_size": INT_AT_LEAST_1, "key_tokens": INT_AT_LEAST_1, "value_tokens": INT_AT_LEAST_1,
                       "selection_temperature": optional(POSITIVE), "lr": POSITIVE, "max_grad_norm": POSITIVE,
                       "lora_r": INT_AT_LEAST_1, "lora_alpha": POSITIVE, "checkpoint_every": INT_AT_LEAST_0,
                       "eval_fraction": between(0, 1, low_open=True, high_open=True)})
