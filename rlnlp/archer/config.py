"""ArCHer's run configuration: tasks, algorithms, ``ArcherConfig`` and its presets."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from ..checks import INT_AT_LEAST_0, INT_AT_LEAST_1, NON_NEGATIVE, POSITIVE, between, check_choices, check_fields
from ..cli import UsageError

TWENTY_QUESTIONS_VARIANTS = {
    # name: TwentyQuestions settings. The full game is out of a 135M policy's reach (it rarely asks
    # a question the table answers, and 20 turns of history cost ~600 prompt tokens per turn);
    # twenty_questions_6 names six candidates and pre-fills "Is it", measured at ~35-40% success.
    "twenty_questions": {},
    "twenty_questions_6": {"candidates": ("dog", "cat", "car", "apple", "chair", "ball"), "prefill": "Is it"},
}
GUESS_NUMBER_VARIANTS = {
    # name: GuessNumber settings (rlnlp.envs.guess_number). With 5 turns for 16 numbers only bisection,
    # which reads the history, wins every time; the reply begun with "The number is" keeps a 135M policy
    # naming numbers (zone measured in data/recurve/README.md).
    "guess_number": {"low": 1, "high": 16, "prefill": "The number is",
                     "intro": "Guess my secret number from {low} to {high}."},
}
TASKS = {
    # a task = a dataset with the caps it is meant to be played at
    "best_lang": {"dataset": "data/recurve/best_lang.yaml", "max_turns": 8, "utterance_tokens": 48},
    "capital_choice": {"dataset": "data/recurve/capital_choice.yaml", "max_turns": 1, "utterance_tokens": 8},
    "twenty_questions": {"dataset": "twenty_questions", "max_turns": 20, "utterance_tokens": 32},
    "twenty_questions_6": {"dataset": "twenty_questions_6", "max_turns": 5, "utterance_tokens": 10},
    "guess_number": {"dataset": "guess_number", "max_turns": 5, "utterance_tokens": 4},
    # 1..8 in 4 turns: bisection still needs every turn, a random new number wins half the games, and a policy
    # that names a number every turn and never repeats one already has most of the room to learn
    "guess_number_8": {"dataset": "guess_number", "number_range": (1, 8), "max_turns": 4, "utterance_tokens": 4},
}
ALGOS = ("archer", "ppo", "grpo")


class RunFolderError(FileNotFoundError):
    """A run folder or checkpoint that is not there; the message names what and where."""


@dataclass
class ArcherConfig:
    """One ArCHer (or baseline) run. Defaults are the full (GPU) profile; ``cpu()`` and ``smoke()`` shrink budgets."""

    dataset: str = "data/recurve/capital_choice.yaml"
    """A recurve YAML task file, or a Twenty Questions variant ("twenty_questions", "twenty_questions_6").
    The seed's best_lang.yaml is kept verbatim but is out of reach: the untrained policy solved it 2 times in 36
    (8 lines of ≤ 48 tokens, temperature 1.0, measured 2026-12-02)."""
    seed: int = 0
    """Seeds Python, NumPy, torch, environment resets and sampling."""
    policy_model: str | None = None
    """Policy LM (hub id or folder); None = embedded SmolLM2-135M-Instruct (ArCHer: GPT-2 / Mistral-7B)."""
    lora_r: int = 16
    """LoRA rank of the actor (ArCHer fine-tunes all weights; LoRA keeps the reference model free)."""
    lora_alpha: int = 32
    """LoRA scaling numerator."""
    lora_dropout: float = 0.0
    """0 (LactChain uses 0.05) so the PPO ratio is exactly 1 before the first update."""
    num_envs: int = 64
    """Environments stepped together; every ArCHer iteration adds num_envs transitions (env samples).
    A baseline round plays num_envs complete episodes."""
    env_steps: int = 2048
    """Budget of environment samples (utterances sent to an environment), the same for ArCHer and baselines."""
    max_turns: int = 1
    """Episode cap in utterances (capital_choice: one reply; 20Q variants set their own, see TASKS)."""
    utterance_tokens: int = 8
    """Token cap of one utterance (recurve: the task's split_fn / done_fn usually end it first)."""
    temperature: float = 1.0
    """Sampling temperature for acting, fresh a′/a″ and evaluation (log-probs are taken at the same T)."""
    gamma: float = 0.95
    """Discount (ArCHer's 0.95)."""
    critic_hidden: int = 512
    """Width of each Q/V MLP (two hidden layers) over 384-d MiniLM embeddings (ArCHer: RoBERTa-base + MLP)."""
    critic_input: Literal["separate", "joint"] = "separate"
    """What Q reads besides h_s: "separate" embeds the utterance alone (h_a); "joint" embeds the state's text and
    the utterance together (one MiniLM pass over both, as ArCHer's critic reads observation and action as one
    text), so attention can relate the utterance to the history — whether a guess repeats an earlier one."""
    critic_lr: float = 1e-3
    """Adam lr of the critic heads (ArCHer 2e-5 fine-tunes RoBERTa; ours trains only MLPs on frozen features)."""
    critic_batch: int = 128
    """Replay transitions per critic step for L_Q."""
    critic_steps: int = 20
    """Critic gradient steps per iteration (cheap: embeddings are cached)."""
    fresh_batch: int = 32
    """Buffer states per iteration that get a fresh a′ (L_V's targets) and, after warm-up, a second fresh
    a″ (the actor's batch: its advantage is computed on an utterance the V step never saw)."""
    buffer_size: int = 100_000
    """Replay capacity in transitions (oldest dropped first)."""
    target_update: Literal["polyak", "hard"] = "polyak"
    """"polyak" (ArCHer, τ after every critic step) or "hard" (recurve: copy every hard_update_every steps)."""
    tau: float = 0.1
    """Polyak rate (ArCHer's 0.1)."""
    hard_update_every: int = 50
    """Critic steps between hard target copies when target_update == "hard"."""
    warmup_iters: int = 4
    """Critic-only iterations before the actor trains (ArCHer warms the critic up too; 10 before, 4 here:
    on capital_choice the critic's loss flattens after ~3 iterations of 32 transitions)."""
    actor_updates: int = 1
    """Actor updates per post-warm-up iteration, each on fresh_batch buffer states with a fresh a″ sampled
    just before it (on-policy for the actor, off-policy in the states). The buffer and the critic let ArCHer
    take several actor steps per environment sample; the baselines are matched to the same gradient steps."""
    normalize_advantage: bool = True
    """Divide ArCHer's advantages by their batch std (not centred: V already is the baseline), so the actor's
    step has the scale of the baselines', whose returns are normalised (ArCHer's code: raw A; measured on
    capital_choice: raw A has std ~0.3, a third of the baselines' step at the same lr)."""
    center_advantage: bool = False
    """Subtract the batch mean from ArCHer's advantages before the actor step. With a critic still fitting,
    min Q − min V carries a shared offset; uncentred, a negative offset pushes every sampled utterance down and
    moves probability to utterances never sampled (measured on guess_number: replies without a number rose from
    22% to 83% in 20 actor steps). Centred, only the ranking of the fresh utterances at their states counts (on
    guess_number centring alone did not make ArCHer learn: 0.055 → 0.023 success at 256 env samples, one seed)."""
    actor_loss: Literal["reinforce", "ppo"] = "reinforce"
    """"reinforce" (ArCHer) or "ppo" (recurve's variant: PPO-clip on the same utterance advantage)."""
    actor_lr: float = 3e-4
    """Adam lr of the LoRA weights, for ArCHer and the baselines alike (ArCHer 1e-5 on full weights; LoRA
    on a 135M model needs 1e-4..5e-4 to move within a CPU budget; 1e-4 before)."""
    ppo_clip: float = 0.2
    """PPO clip ε (baselines, and ArCHer with actor_loss == "ppo")."""
    ppo_epochs: int = 2
    """ArCHer with actor_loss == "ppo": passes over each fresh batch (REINFORCE makes one)."""
    group_size: int = 4
    """grpo baseline: episodes per start in a group (num_envs // group_size starts per round)."""
    kl_coef: float = 0.0
    """β of the optional k3 KL to the frozen reference (ArCHer: none)."""
    grad_clip: float = 1.0
    """Max grad norm for actor and critic."""
    train_batch: int = 16
    """Rows per forward/backward of the actor (gradients accumulate over chunks)."""
    eval_episodes: int = 64
    """Fixed, seeded evaluation episodes (the same starts and sampling seeds before and after training)."""
    target_return: float | None = None
    """Return that 'samples to reach' is measured at; None = halfway from the untrained return to the best."""
    oracle_threshold: float = 0.7
    """20Q: minimum cosine similarity of the best phrasing (chosen by leave-one-out on the oracle's own
    phrasing bank, not on the paraphrase test set)."""
    oracle_margin: float = 0.02
    """20Q: the best meaning must beat every other meaning's best phrasing by this much, else "I don't know"."""
    critic_max_length: int = 512
    """MiniLM tokens per critic input: long enough for a whole 20Q history (MiniLM has 512 positions)."""
    checkpoint_every: int = 0
    """Save runs/NAME/checkpoints/latest every this many iterations / rounds (0 = only at the end)."""
    candidates: tuple[str, ...] | None = None
    """Twenty Questions: the objects the secret is drawn from (None = the variant's own; ≥ 2 objects of the table)."""
    number_range: tuple[int, int] | None = None
    """guess_number: the lowest and highest secret (None = the variant's own, 1 to 16)."""
    prefill: str | None = None
    """Multi-turn games: the text each turn starts with ("Is it", "The number is"); None = the variant's, "" = none."""

    def __post_init__(self):
        check_choices(self)
        check_fields(self, _RULES)
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(f"ArcherConfig.dataset must name a task file or a Twenty Questions variant, got "
                             f"{self.dataset!r}")

    @classmethod
    def full(cls, **kw) -> "ArcherConfig":
        """One GPU: 2048 env samples (32 iterations of 64) per method on capital_choice (an estimate, not run:
        ~0.5 s per iteration on an H100, ~15 s per method; with twenty_questions_6 ~70 s of training)."""
        return cls(**kw)

    @classmethod
    def cpu(cls, **kw) -> "ArcherConfig":
        """2-core CPU, ≤ 10 min for the notebook: 512 env samples (16 iterations, 12 actor steps) per method on
        capital_choice (measured at 768: ArCHer 0.19 → 0.96 success, 237 s of training at 1 thread)."""
        base = dict(num_envs=32, env_steps=512, critic_hidden=256, critic_batch=64, critic_steps=20, fresh_batch=32,
                    warmup_iters=4, eval_episodes=256, train_batch=16)
        return cls(**{**base, **kw})

    @classmethod
    def smoke(cls, **kw) -> "ArcherConfig":
        base = dict(num_envs=8, env_steps=24, critic_hidden=64, critic_batch=32, critic_steps=10, fresh_batch=4,
                    warmup_iters=1, eval_episodes=16, train_batch=8, hard_update_every=10)
        return cls(**{**base, **kw})


_RULES = {
    **dict.fromkeys(("seed", "warmup_iters", "checkpoint_every"), INT_AT_LEAST_0),
    **dict.fromkeys(("lora_r", "num_envs", "env_steps", "max_turns", "utterance_tokens", "critic_hidden",
                     "critic_batch", "critic_steps", "fresh_batch", "actor_updates", "buffer_size", "hard_update_every",
                     "ppo_epochs",
                     "group_size", "train_batch", "eval_episodes", "critic_max_length"), INT_AT_LEAST_1),
    **dict.fromkeys(("lora_alpha", "temperature", "critic_lr", "actor_lr", "ppo_clip", "grad_clip"), POSITIVE),
    **dict.fromkeys(("kl_coef", "oracle_margin"), NON_NEGATIVE),
    "lora_dropout": between(0, 1, high_open=True),
    "gamma": between(0, 1),
    "tau": between(0, 1, low_open=True),
    "oracle_threshold": between(-1, 1),
}
"""What each field allows (``__post_init__``): a bad value is one ValueError naming the field, before any model
loads."""


def with_task(cfg: ArcherConfig, task: str, **kw) -> ArcherConfig:
    """``cfg`` with a task's dataset and caps (TASKS), then ``kw``."""
    if task not in TASKS:
        raise UsageError(f"unknown task {task!r}: use one of {', '.join(TASKS)}")
    return replace(cfg, **{**TASKS[task], **kw})


def archer_actor_steps(cfg: ArcherConfig) -> int:
    """Actor gradient steps an ArCHer run with ``cfg`` makes: actor_updates per post-warm-up iteration (ppo:
    ppo_epochs each)."""
    iterations = max(1, cfg.env_steps // cfg.num_envs)
    per_update = cfg.ppo_epochs if cfg.actor_loss == "ppo" else 1
    return max(0, iterations - cfg.warmup_iters) * cfg.actor_updates * per_update
