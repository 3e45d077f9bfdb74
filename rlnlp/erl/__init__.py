"""ERL — Experiential Reinforcement Learning on TRL's GRPOTrainer (notebook 05; Shi et al., arXiv 2602.13949).

Each training step, for a batch of prompts x:

1. first attempt  y1 ~ π(·|x) (TRL's own generation path), reward r1, textual feedback f1;
2. gate           samples with r1 < τ go on, the rest are done;
3. reflection     Δ ~ π(·| reflect(x, y1, f1, r1, memory))  — ONE batched sampler call for all gated;
4. retry          y2 ~ π(·| retry(x, Δ))                     — ONE batched sampler call; r2 = R(x, y2);
5. memory         Δ is stored (FIFO of ``memory_size``) when the add rule fires;
6. GRPO           over y1 (r1), Δ (r2) and y2 (r2), see ``algorithm`` below;
7. internalize    L_int = −(1/N_int) Σ log π(y2_t | x, y2_<t) over the retries the internalization rule
                  picks (prompt tokens masked; N_int = their tokens in the generation batch), so the
                  policy answers well WITHOUT the scaffold.

    joint (Algorithm 1):  L = L_TRL(y1 ∪ Δ ∪ y2)                      + λ_int · L_int
    split (Algorithm 2):  L = L_TRL(y1) + L_TRL(Δ ∪ y2)               + λ_int · L_int

``L_TRL(rows)`` is ONE call of ``GRPOTrainer._compute_loss`` over those rows, so whatever TRL's
configured loss does — every ``loss_type``, β·KL, the entropy bonus, the MoE auxiliary loss, clipping,
importance-sampling level — is applied exactly once per call, by construction. In ``joint`` the
advantages are normalised over the whole batch [r1; r2; r2]; in ``split`` y1 keeps TRL's
group-relative advantages and Δ + y2 are normalised among themselves. ``split`` is ONE optimiser
step with two terms of weight 1 each (not two optimiser steps): in the original all generation
happens before the optimiser step and Algorithm 2 calls the loss twice on the split batch; one step also
keeps "equal steps" comparable with plain GRPO and the
learning-rate schedule unchanged. Each term is its own TRL objective (its own token normaliser for
the dapo-style losses, its own entropy mean), i.e. the gradient is the sum of the two updates'.

How it sits on TRL 1.16 (``trl>=1.16,<1.17``; these internals change between minor versions):
``_prepare_inputs`` (train mode) calls ``GRPOTrainer._generate_and_score_completions`` for y1 —
so y1, r1 and the baseline's rollouts go through the identical TRL code — then appends the Δ, y2
and internalization rows to the same row-aligned batch (a per-row ``erl_part`` tag) and deals each
part evenly over the ``steps_per_generation`` micro-batches. Reflections and retries use the
workbook's one sampler, ``rlnlp.sampling.sample``, on the unwrapped policy (the same weights as y1;
no vLLM, no ZeRO-3 gathering; single process). Cost: every forward pass (the loss and the old /
reference log-probs) lays rows out as a prefix tree — each prompt prefix that rows share appears
once, no padding at all (``PackedForward``: a group's y1 and y2 rows share the task, a prompt's
reflections share template, memory, task) — in sequences of at most ``per_device_train_batch_size``
× the padded width tokens (what TRL's forward holds for that many rows), and the LM head runs once,
on completion positions only; models it cannot serve exactly use TRL's forward on chunks of
that many rows with all-padding columns dropped per chunk. ``python -m rlnlp.bench erl`` times an
ERL step against TRL's GRPO step and a packed GRPO step at the same config, phase by phase.
Evaluation (``evaluate``) answers held-out prompts greedily with NO reflection.

The package, by role: ``config`` (ERLConfig and its presets), ``memory`` (the reflection memory and its
rules), ``objective`` (advantages, the internalization loss, row selection), ``packing`` (the packed
forward), ``step`` (one step's record, ``ERLStep``, and the batch it becomes), ``trainer`` (ERLTrainer,
TimedGRPOTrainer), ``experiments`` (evaluation, ERL vs GRPO runs) and ``bench`` (``python -m rlnlp.bench erl``
/ ``erl-seeds``). Every name is importable from ``rlnlp.erl``.
"""
from .bench import BENCH_PHASES, bench_main, bench_step, seeds_main
from .config import (
    COMPLETION_KEYS,
    DEFAULT_REFLECTION_PROMPT,
    DEFAULT_RETRY_PROMPT,
    INTERNALIZATION_RULES,
    PARTS,
    REFLECTION_FIELDS,
    RETRY_FIELDS,
    ROW_KEYS,
    SAMPLER_GENERATION_KWARGS,
    ERLConfig,
)
from .experiments import METHODS, RunResult, evaluate, grpo_at_erl_budget, make_trainer, train_run
from .memory import ReflectionMemory, should_internalize, should_store
from .objective import (
    deal_rows,
    erl_advantages,
    internalization_labels,
    internalization_loss,
    select_rows,
    trim_padding,
)
from .packing import PackedForward, pack_rows, prefix_tree_pack
from .step import ERLStep
from .trainer import ERLLoss, ERLTrainer, PhaseClock, ScaffoldSampler, TimedGRPOTrainer

__all__ = ["BENCH_PHASES", "COMPLETION_KEYS", "DEFAULT_REFLECTION_PROMPT", "DEFAULT_RETRY_PROMPT", "ERLConfig",
           "ERLLoss", "ERLStep", "ERLTrainer", "INTERNALIZATION_RULES", "METHODS", "PARTS", "PackedForward",
           "PhaseClock", "REFLECTION_FIELDS", "RETRY_FIELDS", "ROW_KEYS", "ReflectionMemory", "RunResult",
           "SAMPLER_GENERATION_KWARGS", "ScaffoldSampler", "TimedGRPOTrainer",
           "bench_main", "bench_step", "deal_rows", "erl_advantages", "evaluate", "grpo_at_erl_budget",
           "internalization_labels", "internalization_loss", "make_trainer", "pack_rows", "prefix_tree_pack",
           "seeds_main", "select_rows", "should_internalize", "should_store", "train_run", "trim_padding"]
