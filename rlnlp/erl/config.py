"""ERL's configuration: ``ERLConfig`` (every ``GRPOConfig`` option plus ERL's), its presets and the prompt templates."""
from __future__ import annotations

import os
import string
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from trl import GRPOConfig

from ..checks import FINITE, INT_AT_LEAST_0, INT_AT_LEAST_1, NON_NEGATIVE, check_choices, check_fields, optional
from ..tracking import runs_dir

# Fixed text first (the instruction too), then what all gated samples of a step share (the memory, under recency
# retrieval), then what a group shares (the task), then the sample's own attempt, score and feedback: the longest
# common prefix for the sampler's shared prefill and the packed loss's prefix tree. Short, because every token from
# the attempt on is paid again per row in the loss: this wording has ~20 fewer such tokens per row than the
# instruction-last "Feedback: … Score: 0.00.\nIn one sentence, say what to change in your next answer.".
DEFAULT_REFLECTION_PROMPT = (
    "In one sentence, say what to change in the answer below.\n"
    "Lessons from earlier tasks: {memory}\n"
    "Task: {prompt}\n"
    "Answer: {attempt}\n"
    "Score {reward}: {feedback}"
)
DEFAULT_RETRY_PROMPT = "{prompt}\nAdvice from your last try: {reflection}"
REFLECTION_FIELDS = {"prompt", "attempt", "feedback", "reward", "memory"}
RETRY_FIELDS = {"prompt", "reflection"}
# The retry without a reflection (``enable_reflection=False``): the task, the first attempt and its raw feedback.
DEFAULT_FEEDBACK_RETRY_PROMPT = "{prompt}\nYour last answer: {attempt}\nFeedback: {feedback}"
FEEDBACK_RETRY_FIELDS = {"prompt", "attempt", "feedback"}
PARTS = {"y1": 0, "reflection": 1, "retry": 2, "internalization": 3}
# Row-aligned keys TRL's y1 batch may carry that ERL knows how to extend to Δ / y2 rows.
ROW_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages",
            "old_per_token_logps", "ref_per_token_logps")
COMPLETION_KEYS = ("completion_ids", "completion_mask", "old_per_token_logps", "ref_per_token_logps")
InternalizationRule = Literal["success", "improved", "positive"]
INTERNALIZATION_RULES = get_args(InternalizationRule)
SAMPLER_GENERATION_KWARGS = {"temperature", "top_p", "top_k", "do_sample"}


def _template_fields(template: str, allowed: set[str], name: str) -> None:
    used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    unknown = used - allowed
    if unknown or "prompt" not in used:
        raise ValueError(f"ERLConfig.{name}: placeholders {sorted(used)} — must include {{prompt}} and use only "
                         f"{sorted('{' + f + '}' for f in allowed)}")


_RULES = {
    "reward_threshold": FINITE, "memory_add_threshold": optional(FINITE),
    "memory_size": INT_AT_LEAST_0, "memory_top_k": INT_AT_LEAST_0, "reflection_max_new_tokens": INT_AT_LEAST_1,
    "reflection_temperature": optional(NON_NEGATIVE), "internalization_coef": NON_NEGATIVE,
    "eval_size": optional(INT_AT_LEAST_1), "lora_r": optional(INT_AT_LEAST_1),
}
"""What each of ERL's own fields allows (TRL checks its own); a bad value is one ValueError naming the field."""


def _cpu_bf16() -> bool:
    """Whether TRL should autocast to bf16 on this CPU (``RLNLP_DTYPE`` or the CPU's native bf16)."""
    from ..runtime import precision

    return precision(torch.device("cpu"))[0] == "bf16"


@dataclass
class ERLConfig(GRPOConfig):
    """Every ``GRPOConfig`` option plus ERL's. Presets: ``.smoke()`` (mechanics), ``.cpu()`` (learning on a
    2-core CPU), ``.full()`` (one GPU).

    On a machine without CUDA, leaving ``bf16`` unset runs on the CPU in the workbook's precision
    (``rlnlp.runtime.precision``): bf16 where the CPU has it natively, else fp32. TRL passes ``bf16`` to
    accelerate as mixed precision, which on a CPU is ``torch.autocast("cpu", bfloat16)``: fp32 master weights
    and optimizer state, bf16 matmuls — the same rule as the rest of the workbook. The presets use a
    constant learning rate so that the GRPO baseline, which may run more steps in ERL's wall-clock
    budget, follows the same schedule at equal steps.
    """

    reward_threshold: float = field(default=1.0, metadata={"help": (
        "τ: samples with r1 < τ are reflected on and retried; the rest are done."
    )})
    memory_size: int = field(default=50, metadata={"help": (
        "Capacity of the cross-episode reflection memory (FIFO: the oldest entry leaves first)."
    )})
    memory_top_k: int = field(default=3, metadata={"help": "Reflections retrieved into each reflection prompt."})
    memory_add_threshold: float | None = field(default=None, metadata={"help": (
        "Add rule. None (default): store Δ when the retry improved, r2 > r1. A number t: store when r2 ≥ t. The "
        "original stored Δ only when r2 > τ, which never fires with τ = 1 and rewards in [0, 1]."
    )})
    memory_retrieval: Literal["recency", "similarity"] = field(default="recency", metadata={"help": (
        '"recency": the newest entries; "similarity": the entries whose task prompt is closest to this one (cosine '
        "of MiniLM embeddings, rlnlp.models.TextEncoder)."
    )})
    reflection_system_prompt: str = field(default=DEFAULT_REFLECTION_PROMPT, metadata={"help": (
        "Reflection prompt template: {prompt} {attempt} {feedback} {reward} {memory}. It replaces the content of "
        "the task's last user turn (system prompt and earlier turns are kept); the 135M model follows user turns "
        "far better than system turns. Shorter than the original's multi-section template, which the small model "
        "mostly paraphrases back and whose every token the loss pays for again."
    )})
    retry_system_prompt: str = field(default=DEFAULT_RETRY_PROMPT, metadata={"help": (
        "Retry prompt template: {prompt} {reflection} — y2 sees the task and Δ only, never y1 or f1."
    )})
    reflection_max_new_tokens: int = field(default=48, metadata={"help": (
        "Token budget of a reflection Δ (retries use max_completion_length, like y1). Not in the original, which "
        "used one budget for everything."
    )})
    reflection_stop_at_newline: bool = field(default=True, metadata={"help": (
        "Δ ends at its first line break after some text (a one-sentence lesson, as the template asks): fewer "
        "decoding steps and loss tokens. The original had no stop (every reflection ran to its token budget)."
    )})
    reflection_temperature: float | None = field(default=None, metadata={"help": (
        "Sampling temperature of Δ (None: ``temperature``, as in the original). The GRPO term on Δ still scores it "
        "under π at ``temperature``, like every row. Lower values keep the 135M model's reflections on topic (at "
        '1.0 many open like a letter: "Hi Maja,").'
    )})
    internalization_coef: float = field(default=1.0, metadata={"help": (
        "λ_int: weight of the internalization cross-entropy relative to the GRPO loss."
    )})
    internalization_rule: InternalizationRule = field(default="success", metadata={"help": (
        'Which retries are distilled into (x → y2): "success" (default) r2 ≥ τ — the retry passed the gate its '
        'first attempt failed, the paper\'s "successful second attempts"; "improved": r2 > r1; "positive": r2 > 0, '
        "the original's rule, which on partial-credit tasks distils retries no better than y1."
    )})
    enable_memory: bool = field(default=True, metadata={"help": (
        'Retrieve from and add to the reflection memory (off: every reflection prompt says "None available.").'
    )})
    enable_internalization: bool = field(default=True, metadata={"help": (
        "Add the internalization loss (off: pure RL on y1, Δ, y2)."
    )})
    enable_reflection: bool = field(default=True, metadata={"help": (
        "Generate a reflection Δ before each retry. Off (the ablation without reflection): the retry reads the first "
        "attempt and its raw feedback through ``feedback_retry_prompt``; no Δ is generated or trained, the memory "
        "(which holds reflections) stays empty, and the joint advantages are normalised over [r1; r2]."
    )})
    feedback_retry_prompt: str = field(default=DEFAULT_FEEDBACK_RETRY_PROMPT, metadata={"help": (
        "Retry prompt template when ``enable_reflection`` is off: {prompt} {attempt} {feedback}."
    )})
    algorithm: Literal["joint", "split"] = field(default="joint", metadata={"help": (
        '"joint" (Algorithm 1: one TRL loss over y1 ∪ Δ ∪ y2, batch-wide advantages) or "split" (Algorithm 2: one '
        "TRL loss over y1 with group advantages plus one over Δ ∪ y2 with their own; one optimiser step)."
    )})
    tasks: list[str] = field(default_factory=lambda: ["json_key"], metadata={"help": (
        "Workbook experiments only: the feedback tasks (rlnlp.envs.feedback_tasks) the notebook trains on "
        "(held as a tuple once the config is built)."
    )})
    eval_size: int | None = field(default=None, metadata={"help": (
        "Workbook experiments only: held-out prompts per evaluation (None = the whole eval split)."
    )})
    lora_r: int | None = field(default=None, metadata={"help": (
        "Workbook experiments only: LoRA rank of ``train_run``'s adapter (alpha = 2·r, all linear layers); None "
        "trains every weight."
    )})

    def __post_init__(self):
        if self.bf16 is None and not self.fp16 and not torch.cuda.is_available():
            self.bf16, self.use_cpu = _cpu_bf16(), True
        if self.ddp_backend is not None and "LOCAL_RANK" not in os.environ and os.environ.get("WORLD_SIZE", "1") == "1":
            self.ddp_backend = None  # a plain `python script.py`: no process group to join (accelerate would fail)
        super().__post_init__()
        self.check()

    def check(self) -> None:
        """ERL's own field checks: ``__post_init__`` runs them; call again after changing fields in place."""
        check_choices(self, ("memory_retrieval", "internalization_rule", "algorithm"))
        check_fields(self, _RULES)
        if not self.tasks or not all(isinstance(t, str) and t for t in self.tasks):
            raise ValueError(f"ERLConfig.tasks must name at least one feedback task, got {self.tasks!r}")
        if self.algorithm == "split" and self.use_adaptive_entropy:
            raise NotImplementedError("ERLConfig: algorithm='split' calls TRL's loss twice per micro-batch, which "
                                      "would step the adaptive entropy controller twice; use 'joint' or a fixed "
                                      "entropy_coef")
        _template_fields(self.reflection_system_prompt, REFLECTION_FIELDS, "reflection_system_prompt")
        _template_fields(self.retry_system_prompt, RETRY_FIELDS, "retry_system_prompt")
        _template_fields(self.feedback_retry_prompt, FEEDBACK_RETRY_FIELDS, "feedback_retry_prompt")
        if not isinstance(self.enable_reflection, bool):
            raise ValueError(f"ERLConfig.enable_reflection must be True or False, got {self.enable_reflection!r}")
        self.tasks = tuple(self.tasks)

    @classmethod
    def _preset(cls, name: str, **kw) -> "ERLConfig":
        # gradient_checkpointing False (TRL: True): a 135M policy needs no activation-memory saving on a CPU, and
        # recomputing the forward in the backward cost 15% of ERL's loss step (measured 2026-12-02, smoke batch).
        base = dict(output_dir=str(runs_dir() / f"erl-{name}"), lr_scheduler_type="constant", logging_steps=1,
                    save_strategy="no", report_to="none", seed=0, dataloader_num_workers=0,
                    gradient_checkpointing=False)
        if not torch.cuda.is_available():
            base.update(use_cpu=True, bf16=_cpu_bf16())
        return cls(**{**base, **kw})

    @classmethod
    def smoke(cls, **overrides) -> "ERLConfig":
        """Two steps of 1 prompt × 4 completions × 24 tokens on the CPU: checks the mechanics, not learning."""
        return cls._preset("smoke", **{**dict(
            per_device_train_batch_size=4, num_generations=4, max_completion_length=24, reflection_max_new_tokens=16,
            reflection_temperature=0.7, memory_top_k=2, max_steps=2, learning_rate=1e-5, tasks=("json_key",),
            eval_size=32), **overrides})

    @classmethod
    def cpu(cls, **overrides) -> "ERLConfig":
        """The learning profile (2 CPU cores, ≤ 10 min for the notebook): 2 prompts × 4 completions × 20 tokens,
        LoRA r 16 at lr 3e-4 (the original's 1e-6 full fine-tuning does not move a 135M policy in minutes) and
        temperature 0.7 (TRL: 1.0; at 1.0 45% of json_key's 4-sample groups have reward variance, at 0.7 83%)."""
        return cls._preset("cpu", **{**dict(
            per_device_train_batch_size=8, num_generations=4, max_completion_length=20, reflection_max_new_tokens=20,
            temperature=0.7, reflection_temperature=0.7, memory_top_k=2, max_steps=8, learning_rate=3e-4, lora_r=16,
            tasks=("json_key",), eval_size=150), **overrides})

    @classmethod
    def full(cls, **overrides) -> "ERLConfig":
        """One H100/H200: 4 prompts × 8 completions × 32 tokens, LoRA, 20 ERL steps. Estimated (never run: no GPU
        was lent) at ~2 s per ERL step — three decoding loops of 32 steps at ~12 ms each plus a loss over ~100 rows —
        so ~40 s of ERL and ~40 s of GRPO at equal time: ≤ 90 s of training."""
        return cls._preset("full", **{**dict(
            per_device_train_batch_size=32, num_generations=8, max_completion_length=32, reflection_max_new_tokens=32,
            temperature=0.7, reflection_temperature=0.7, max_steps=20, learning_rate=3e-4, lora_r=16,
            tasks=("json_key",), eval_size=None), **overrides})
