"""ERL — Experiential Reinforcement Learning on TRL's GRPOTrainer (spec 05; Shi et al., arXiv 2602.13949).

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
step with two terms of weight 1 each (not two optimiser steps): the spec and the erl-trainer README
say all generation happens before the optimiser step and describe Algorithm 2 as calling the loss
twice on the split batch; one step also keeps "equal steps" comparable with plain GRPO and the
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
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import string
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from trl.data_utils import is_conversational
from trl.trainer.utils import pad

from .models import position_ids_from_mask, resolve_policy
from .sampling import sample, shared_prefix_length
from .tracking import runs_dir

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
PARTS = {"y1": 0, "reflection": 1, "retry": 2, "internalization": 3}
# Row-aligned keys TRL's y1 batch may carry that ERL knows how to extend to Δ / y2 rows.
ROW_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages",
            "old_per_token_logps", "ref_per_token_logps")
COMPLETION_KEYS = ("completion_ids", "completion_mask", "old_per_token_logps", "ref_per_token_logps")
INTERNALIZATION_RULES = ("success", "improved", "positive")
SAMPLER_GENERATION_KWARGS = {"temperature", "top_p", "top_k", "do_sample"}


def _template_fields(template: str, allowed: set[str], name: str) -> None:
    used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    unknown = used - allowed
    if unknown or "prompt" not in used:
        raise ValueError(f"ERLConfig.{name}: placeholders {sorted(used)} — must include {{prompt}} and use only "
                         f"{sorted('{' + f + '}' for f in allowed)}")


@dataclass
class ERLConfig(GRPOConfig):
    """Every ``GRPOConfig`` option plus ERL's. Presets: ``.smoke()`` (mechanics), ``.cpu()`` (learning on a
    2-core CPU), ``.full()`` (one GPU).

    On a machine without CUDA, leaving ``bf16`` unset gives fp32 on the CPU (TRL would default to
    bf16 and refuse to start), so the seed README's quick start runs unchanged here. The presets use a
    constant learning rate so that the GRPO baseline, which may run more steps in ERL's wall-clock
    budget, follows the same schedule at equal steps.
    """

    reward_threshold: float = 1.0
    """τ: samples with r1 < τ are reflected on and retried; the rest are done."""
    memory_size: int = 50
    """Capacity of the cross-episode reflection memory (FIFO: the oldest entry leaves first)."""
    memory_top_k: int = 3
    """Reflections retrieved into each reflection prompt."""
    memory_add_threshold: float | None = None
    """Add rule. None (default): store Δ when the retry improved, r2 > r1. A number t: store when r2 ≥ t.
    The original stored Δ only when r2 > τ, which never fires with τ = 1 and rewards in [0, 1]."""
    memory_retrieval: str = "recency"
    """"recency": the newest entries; "similarity": the entries whose task prompt is closest to this one
    (cosine of MiniLM embeddings, rlnlp.models.TextEncoder)."""
    reflection_system_prompt: str = DEFAULT_REFLECTION_PROMPT
    """Reflection prompt template: {prompt} {attempt} {feedback} {reward} {memory}. It replaces the content
    of the task's last user turn (system prompt and earlier turns are kept); the 135M model follows user
    turns far better than system turns. Shorter than the original's multi-section template, which the small
    model mostly paraphrases back and whose every token the loss pays for again."""
    retry_system_prompt: str = DEFAULT_RETRY_PROMPT
    """Retry prompt template: {prompt} {reflection} — y2 sees the task and Δ only, never y1 or f1."""
    reflection_max_new_tokens: int = 48
    """Token budget of a reflection Δ (retries use max_completion_length, like y1). Not in the original,
    which used one budget for everything."""
    reflection_stop_at_newline: bool = True
    """Δ ends at its first line break after some text (a one-sentence lesson, as the template asks): fewer
    decoding steps and loss tokens. The original had no stop (every reflection ran to its token budget)."""
    reflection_temperature: float | None = None
    """Sampling temperature of Δ (None: ``temperature``, as in the original). The GRPO term on Δ still scores
    it under π at ``temperature``, like every row. Lower values keep the 135M model's reflections on topic
    (at 1.0 many open like a letter: "Hi Maja,")."""
    internalization_coef: float = 1.0
    """λ_int: weight of the internalization cross-entropy relative to the GRPO loss."""
    internalization_rule: str = "success"
    """Which retries are distilled into (x → y2): "success" (default) r2 ≥ τ — the retry passed the gate
    its first attempt failed, the paper's "successful second attempts"; "improved": r2 > r1; "positive":
    r2 > 0, the original's rule, which on partial-credit tasks distils retries no better than y1."""
    enable_memory: bool = True
    """Retrieve from and add to the reflection memory (off: every reflection prompt says "None available.")."""
    enable_internalization: bool = True
    """Add the internalization loss (off: pure RL on y1, Δ, y2)."""
    algorithm: str = "joint"
    """"joint" (Algorithm 1: one TRL loss over y1 ∪ Δ ∪ y2, batch-wide advantages) or "split" (Algorithm 2:
    one TRL loss over y1 with group advantages plus one over Δ ∪ y2 with their own; one optimiser step)."""
    tasks: tuple[str, ...] = ("json_key",)
    """Workbook experiments only: the feedback tasks (rlnlp.envs.feedback_tasks) the notebook trains on."""
    eval_size: int | None = None
    """Workbook experiments only: held-out prompts per evaluation (None = the whole eval split)."""
    lora_r: int | None = None
    """Workbook experiments only: LoRA rank of ``train_run``'s adapter (alpha = 2·r, all linear layers);
    None trains every weight."""

    def __post_init__(self):
        if self.bf16 is None and not self.fp16 and not torch.cuda.is_available():
            self.bf16, self.use_cpu = False, True
        super().__post_init__()
        if self.algorithm not in ("joint", "split"):
            raise ValueError(f"ERLConfig.algorithm must be 'joint' or 'split', got {self.algorithm!r}")
        if self.memory_retrieval not in ("recency", "similarity"):
            raise ValueError(f"ERLConfig.memory_retrieval must be 'recency' or 'similarity', got {self.memory_retrieval!r}")
        if self.internalization_rule not in INTERNALIZATION_RULES:
            raise ValueError(f"ERLConfig.internalization_rule must be one of {INTERNALIZATION_RULES}, "
                             f"got {self.internalization_rule!r}")
        if self.memory_size < 0 or self.memory_top_k < 0 or self.internalization_coef < 0:
            raise ValueError("ERLConfig: memory_size, memory_top_k and internalization_coef must be ≥ 0")
        if not math.isfinite(self.reward_threshold):
            raise ValueError(f"ERLConfig.reward_threshold must be finite, got {self.reward_threshold}")
        if self.reflection_temperature is not None and self.reflection_temperature < 0:
            raise ValueError(f"ERLConfig.reflection_temperature must be ≥ 0, got {self.reflection_temperature}")
        if self.algorithm == "split" and self.use_adaptive_entropy:
            raise NotImplementedError("ERLConfig: algorithm='split' calls TRL's loss twice per micro-batch, which "
                                      "would step the adaptive entropy controller twice; use 'joint' or a fixed entropy_coef")
        _template_fields(self.reflection_system_prompt, REFLECTION_FIELDS, "reflection_system_prompt")
        _template_fields(self.retry_system_prompt, RETRY_FIELDS, "retry_system_prompt")
        self.tasks = tuple(self.tasks)

    @classmethod
    def _preset(cls, name: str, **kw) -> "ERLConfig":
        # gradient_checkpointing False (TRL: True): a 135M policy needs no activation-memory saving on a CPU, and
        # recomputing the forward in the backward cost 15% of ERL's loss step (measured 2026-12-02, smoke batch).
        base = dict(output_dir=str(runs_dir() / f"erl-{name}"), lr_scheduler_type="constant", logging_steps=1,
                    save_strategy="no", report_to="none", seed=0, dataloader_num_workers=0, gradient_checkpointing=False)
        if not torch.cuda.is_available():
            base.update(use_cpu=True, bf16=False)
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
            temperature=0.7, reflection_temperature=0.7, max_steps=20, learning_rate=3e-4, lora_r=16, tasks=("json_key",),
            eval_size=None), **overrides})


# ----------------------------------------------------------------------------------------------
# memory


def should_store(r1: float, r2: float, threshold: float | None) -> bool:
    """The memory add rule: r2 > r1 (threshold None) or r2 ≥ threshold."""
    return r2 > r1 if threshold is None else r2 >= threshold


def should_internalize(r1: float, r2: float, rule: str, tau: float) -> bool:
    """The internalization rule: "success" r2 ≥ τ, "improved" r2 > r1, "positive" r2 > 0."""
    if rule == "success":
        return r2 >= tau
    if rule == "improved":
        return r2 > r1
    if rule == "positive":
        return r2 > 0
    raise ValueError(f"unknown internalization rule {rule!r}; use one of {INTERNALIZATION_RULES}")


class ReflectionMemory:
    """FIFO of reflections that worked; retrieval by recency or by prompt similarity."""

    def __init__(self, size: int, retrieval: str = "recency", encoder=None):
        self.entries: deque[dict] = deque(maxlen=size)
        self.retrieval, self.encoder = retrieval, encoder

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, reflection: str, prompt: str, r1: float, r2: float, step: int) -> None:
        if self.entries.maxlen:
            self.entries.append({"reflection": reflection, "prompt": prompt, "r1": r1, "r2": r2, "step": step})

    def retrieve(self, prompt: str, k: int) -> list[str]:
        entries = list(self.entries)
        if k <= 0 or not entries:
            return []
        if self.retrieval == "recency":
            return [e["reflection"] for e in entries[-k:][::-1]]
        if self.encoder is None:
            from .models import TextEncoder

            self.encoder = TextEncoder()
        sims = self.encoder.embed([e["prompt"] for e in entries]) @ self.encoder.embed([prompt])[0]  # (M,)
        return [entries[i]["reflection"] for i in sims.topk(min(k, len(entries))).indices.tolist()]

    @staticmethod
    def format(reflections: Sequence[str]) -> str:
        return " ".join(f"({i + 1}) {r.strip()}" for i, r in enumerate(reflections)) or "None available."


# ----------------------------------------------------------------------------------------------
# the math ERL adds to GRPO, and the padding it never pays for


def erl_advantages(r1: torch.Tensor, r2: torch.Tensor, algorithm: str, y1_group_advantages: torch.Tensor,
                   scale: bool = True, eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Advantages for (y1, Δ, y2). r1: (B,), r2: (G,) for the G gated samples; returns (B,), (G,), (G,).

    joint:  r = [r1; r2; r2],  A = (r − mean r) / (std r + eps)   (one batch-wide normalisation)
    split:  A_y1 = TRL's group-relative advantages; [A_Δ; A_y2] normalised over [r2; r2] alone
    """
    def norm(r):
        centred = r - r.mean()
        return centred / (r.std() + eps) if scale and r.numel() > 1 else centred

    G = r2.numel()
    if algorithm == "joint":
        a = norm(torch.cat([r1, r2, r2]))
        return a[: r1.numel()], a[r1.numel() : r1.numel() + G], a[r1.numel() + G :]
    a = norm(torch.cat([r2, r2])) if G else r2
    return y1_group_advantages, a[:G], a[G:]


def trim_padding(batch: dict) -> dict:
    """Drop the columns that are padding in every row: prompts' left, completions' right (≥ 1 column kept).

    ``prompt_*`` (R, P) left-padded; ``completion_*``, ``old/ref_per_token_logps`` (R, C) right-padded."""
    p_keep = int(batch["prompt_mask"].sum(1).max().clamp(min=1))
    c_keep = int(batch["completion_mask"].sum(1).max().clamp(min=1))
    out = dict(batch)
    for key in ("prompt_ids", "prompt_mask"):
        out[key] = batch[key][:, batch[key].shape[1] - p_keep :]
    for key in COMPLETION_KEYS:
        if key in batch and isinstance(batch[key], torch.Tensor):
            out[key] = batch[key][:, :c_keep]
    return out


def select_rows(batch: dict, rows: torch.Tensor, trim: bool = True) -> dict:
    """The rows ``rows`` (bool mask or indices) of a row-aligned batch; 0-d tensors and other values are kept."""
    out = {k: (v[rows] if isinstance(v, torch.Tensor) and v.ndim > 0 else v) for k, v in batch.items()}
    return trim_padding(out) if trim else out


def deal_rows(part: torch.Tensor, chunks: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Row indices of ``chunks`` micro-batches: each part's rows shuffled and dealt round-robin, so every
    micro-batch holds its share of y1, Δ, y2 and internalization rows (sizes differ by at most one)."""
    order = torch.cat([idx[torch.randperm(idx.numel(), generator=generator)]
                       for code in sorted(set(part.tolist())) for idx in [(part == code).nonzero().flatten().cpu()]])
    return [order[i::chunks].to(part.device) for i in range(chunks)]


def internalization_labels(prompt_ids, prompt_mask, completion_ids, completion_mask):
    """Inputs and labels for (x → y2): labels are −100 on prompt tokens and padding, the token id elsewhere.

    prompt_*: (B, P) left-padded; completion_*: (B, C) right-padded; returns three (B, P+C) tensors.
    """
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)  # (B, P+C)
    attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
    labels = input_ids.clone()
    labels[:, : prompt_ids.shape[1]] = -100
    labels[attention_mask == 0] = -100
    return input_ids, attention_mask, labels


def internalization_loss(model, prompt_ids, prompt_mask, completion_ids, completion_mask,
                         normalizer: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """L_int = −(1/N) Σ_{labelled tokens} log π(y2_t | x, y2_<t): cross-entropy on the retry conditioned on the
    ORIGINAL prompt. N = ``normalizer`` (the trainer passes the generation batch's internalized-token count,
    so a token's weight does not depend on which micro-batch it falls in); None: these rows' token count."""
    rows = trim_padding({"prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
                         "completion_mask": completion_mask})
    input_ids, attention_mask, labels = internalization_labels(rows["prompt_ids"], rows["prompt_mask"],
                                                               rows["completion_ids"], rows["completion_mask"])
    C = rows["completion_ids"].shape[1]
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                logits_to_keep=C + 1, use_cache=False)
    logits = out.logits[:, :-1, :].float()  # (B, C, V): position P−1+t predicts retry token t
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, -C:].reshape(-1), ignore_index=-100,
                         reduction="sum")
    tokens = int((labels != -100).sum())
    loss = ce / (max(tokens, 1) if normalizer is None else normalizer)
    return loss, {"losses/internalization": ce.item() / max(tokens, 1), "stats/internalized_tokens": tokens}


def _last_user_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    content = prompt[-1]["content"] if prompt and prompt[-1].get("role") == "user" else None
    if not isinstance(content, str):
        raise ValueError("ERLTrainer: a conversational prompt must end with a user turn whose content is text; got "
                         f"{str(prompt[-1:])[:120]}")
    return content


def _ends_line(text: str) -> bool:
    """Stop rule for Δ: a line break after some text."""
    return "\n" in text.lstrip()


def _completion_text(completion) -> str:
    return completion if isinstance(completion, str) else str(completion[-1]["content"])


def pack_rows(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], budget: int) -> list[list[int]]:
    """Consecutive rows (prompts sorted, completions non-empty) grouped into packs of at most ``budget`` tokens each,
    counted as ``prefix_tree_pack`` lays them out: a row adds the prompt tokens it does not share with the row before
    it, plus its completion but the last token. A row longer than the budget gets a pack of its own."""
    packs: list[list[int]] = []
    cost = 0
    for k, (p, c) in enumerate(zip(prompts, completions)):
        add = len(p) - (shared_prefix_length(prompts[k - 1], p) if packs else 0) + len(c) - 1
        if packs and cost + add > budget:  # a new pack shares nothing with the previous one
            packs.append([])
            cost, add = 0, len(p) + len(c) - 1
        elif not packs:
            packs.append([])
        packs[-1].append(k)
        cost += add
    return packs


def prefix_tree_pack(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]):
    """Rows laid out as ONE sequence in which every prompt prefix that rows share appears once (a prefix tree).

    ``prompts`` sorted (then each row's prefix shared with any earlier row is shared with the row just before it),
    ``completions`` non-empty. Each row adds the prompt tokens it does not share with the previous row, then its
    completion without the last token (whose output predicts nothing). Returns ``tokens`` (S,), ``position_ids`` (S,)
    — a token's position in its own row —, ``allowed`` (S, S) bool — token q sees token k iff k is on q's row path
    at or before q: its shared prefixes and itself —, and per row the sequence indices whose outputs predict its
    completion tokens (the last prompt token, then each completion token but the last). Each row's outputs are those
    of the row alone: RoPE depends on position differences only, and no row sees another row's tokens.
    """
    tokens: list[int] = []
    pos: list[int] = []
    paths, emitted, pred = [], [], []
    prev_prompt: Sequence[int] = ()
    prev_idx: list[int] = []
    for p, c in zip(prompts, completions):
        shared = shared_prefix_length(prev_prompt, p)
        idx = prev_idx[:shared]
        for k in range(shared, len(p)):
            idx.append(len(tokens))
            tokens.append(p[k])
            pos.append(k)
        path = list(idx)
        for t, tok in enumerate(c[:-1]):
            path.append(len(tokens))
            tokens.append(tok)
            pos.append(len(p) + t)
        pred.append(path[len(p) - 1 : len(p) - 1 + len(c)])
        paths.append(path)
        emitted.append(shared)
        prev_prompt, prev_idx = p, idx
    S = len(tokens)
    allowed = torch.zeros(S, S, dtype=torch.bool)
    for path, shared in zip(paths, emitted):
        if len(path) > shared:
            path_t = torch.tensor(path)
            allowed[path_t[shared:, None], path_t[None, :]] = torch.ones(len(path), len(path), dtype=torch.bool).tril()[shared:]
    return tokens, pos, allowed, pred


# ----------------------------------------------------------------------------------------------
# the trainers


class PackedForward:
    """Mixin for a ``GRPOTrainer``: the per-token log-probs (and entropies) of every forward pass — the loss and the
    old / reference log-probs — computed without padding and with each shared prompt prefix computed once.

    Rows are sorted by their prompt tokens and laid out as a prefix tree (``prefix_tree_pack``): each row adds only
    the prompt tokens it does not share with the row before it (a group's y1 rows share the whole prompt, its retries
    the task; the reflections of one prompt share the template, the memory and the task), then its completion but
    the last token, with an attention mask under which each token sees its own row's path only and each row's own
    position ids, so every row's log-probs are those of the row alone (RoPE depends on position differences only).
    ``pack_rows`` cuts the sorted rows into sequences of at most ``per_device_train_batch_size`` × padded width
    tokens — what TRL's forward holds for that many padded rows of the same batch. The LM head (TRL's
    ``ChunkedLogProbFunction``, the kernel of its fused head, same temperature) runs ONCE over the completion
    positions of all sequences: its fixed cost (a vocabulary-sized gradient buffer) is paid once per forward, not
    once per pack. Exact to float rounding against TRL's padded forward (tests/test_erl.py); the gradient is the
    same, with fewer tokens through the model: at the smoke config a y1 group's 4 × (56 + 24) tokens become
    56 + 4 × 23.

    Models the packing cannot serve exactly fall back to TRL's forward, chunked to the micro-batch size with
    all-padding columns dropped per chunk: MoE auxiliary loss, multimodal inputs, attention other than sdpa / eager,
    sliding-window layers, logit soft-capping or scaling, PEFT other than LoRA. ``packed_forward = False`` turns it
    off (TRL's own forward, unchunked, exactly as ``GRPOTrainer``)."""

    packed_forward: bool = True

    def _packable_backbone(self, model):
        """(backbone, lm_head) of ``model`` when the packed path is exact for it, else None."""
        from accelerate.utils import is_peft_model

        m = self.accelerator.unwrap_model(model)
        if is_peft_model(m):
            if any(str(getattr(c, "peft_type", "")).split(".")[-1] != "LORA" for c in m.peft_config.values()):
                return None
            m = m.get_base_model()
        cfg = m.config.get_text_config()
        scaled = any(getattr(cfg, k, None) is not None for k in ("final_logit_softcapping", "logit_scale",
                                                                   "output_multiplier", "lm_head_multiplier", "logits_scaling"))
        sliding = any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or []))
        head = m.get_output_embeddings()
        if (scaled or sliding or getattr(cfg, "output_router_logits", False) or getattr(self.args, "cast_lm_head_to_fp32", False)
                or m.config._attn_implementation not in ("sdpa", "eager") or type(head) is not torch.nn.Linear):
            return None
        return getattr(m, "base_model"), head

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        if any(v is not None for v in multimodal.values()):  # images: TRL's own path
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, batch_size,
                                                              compute_entropy, compute_aux_loss, **multimodal)
        if not self.packed_forward:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, batch_size,
                                                              compute_entropy, compute_aux_loss)
        size = batch_size or self.args.per_device_train_batch_size
        parts = None if compute_aux_loss else self._packable_backbone(model)
        if parts is not None:
            out = self._packed_logps(*parts, input_ids, attention_mask, logits_to_keep, size, compute_entropy)
            if out is not None:
                return out
        return self._chunked_logps(model, input_ids, attention_mask, logits_to_keep, size, compute_entropy, compute_aux_loss)

    def _packed_logps(self, backbone, head, input_ids, attention_mask, logits_to_keep, size, compute_entropy):
        from trl.kernels import ChunkedLogProbFunction

        R, C = input_ids.shape[0], logits_to_keep
        P = input_ids.shape[1] - C
        dev = input_ids.device
        p_mask, c_mask = attention_mask[:, :P].bool(), attention_mask[:, P:]
        c_len = c_mask.sum(1)
        if not bool((c_mask.cumprod(1).sum(1) == c_len).all()):  # a completion mask with holes: not a packable row
            return None
        prompts = [input_ids[i, :P][p_mask[i]].tolist() for i in range(R)]
        if min(len(p) for p in prompts) == 0 or int(c_len.sum()) == 0:
            return None
        comps = [input_ids[i, P : P + int(c_len[i])].tolist() for i in range(R)]
        order = sorted((i for i in range(R) if comps[i]), key=lambda i: prompts[i])  # shared prefixes side by side
        outputs = ("log_probs", "entropy") if compute_entropy else ("log_probs",)
        hidden_out, targets, rows_out, cols_out = [], [], [], []
        for rows in pack_rows([prompts[i] for i in order], [comps[i] for i in order], size * input_ids.shape[1]):
            rows = [order[k] for k in rows]
            tokens, pos, allowed, pred = prefix_tree_pack([prompts[i] for i in rows], [comps[i] for i in rows])
            allowed = allowed.to(dev)
            if backbone.config._attn_implementation == "eager":
                dtype = head.weight.dtype
                allowed = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(~allowed, torch.finfo(dtype).min)
            with self.accelerator.autocast():
                hidden = backbone(input_ids=torch.tensor([tokens], device=dev), attention_mask=allowed[None, None],
                                  position_ids=torch.tensor([pos], device=dev), use_cache=False).last_hidden_state[0]
            hidden_out.append(hidden[torch.tensor([q for p in pred for q in p], device=dev)])
            for i, p in zip(rows, pred):
                targets += comps[i]
                rows_out += [i] * len(p)
                cols_out += range(len(p))
        with self.accelerator.autocast():  # ONE LM-head call for the whole batch: its fixed cost is paid once
            hidden = torch.cat(hidden_out).to(head.weight.device)
            out = ChunkedLogProbFunction.apply(hidden, head.weight, head.bias, torch.tensor(targets, device=hidden.device),
                                               self.temperature, 32768, None, 1.0, outputs)
        index = (torch.tensor(rows_out, device=dev), torch.tensor(cols_out, device=dev))
        logps = out[0].new_zeros(R, C).index_put(index, out[0])
        entropies = out[1].new_zeros(R, C).index_put(index, out[1]) if compute_entropy else None
        return logps, entropies, None

    def _chunked_logps(self, model, input_ids, attention_mask, logits_to_keep, size, compute_entropy, compute_aux_loss):
        """TRL's forward on chunks of ≤ ``size`` rows grouped by length, all-padding columns dropped per chunk."""
        P, C = input_ids.shape[1] - logits_to_keep, logits_to_keep
        p_len, c_len = attention_mask[:, :P].sum(1), attention_mask[:, P:].sum(1)
        order = sorted(range(input_ids.shape[0]), key=lambda i: (int(p_len[i]), int(c_len[i])))
        logps, entropies, aux = [], [], []
        for start in range(0, len(order), size):
            rows = torch.tensor(order[start : start + size], device=input_ids.device)
            p_keep, c_keep = int(p_len[rows].max().clamp(min=1)), int(c_len[rows].max().clamp(min=1))
            cols = slice(P - p_keep, P + c_keep)
            lp, ent, a = super()._get_per_token_logps_and_entropies(
                model, input_ids[rows][:, cols], attention_mask[rows][:, cols], c_keep, batch_size=None,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss)
            logps.append(F.pad(lp, (0, C - c_keep)))
            if compute_entropy:
                entropies.append(F.pad(ent, (0, C - c_keep)))
            if compute_aux_loss:
                aux.append(a)
        inverse = torch.empty(len(order), dtype=torch.long, device=input_ids.device)
        inverse[torch.tensor(order, device=input_ids.device)] = torch.arange(len(order), device=input_ids.device)
        return (torch.cat(logps)[inverse], torch.cat(entropies)[inverse] if compute_entropy else None,
                torch.stack(aux).mean() if compute_aux_loss else None)


class PhaseClock:
    """Mixin for a ``GRPOTrainer``: seconds spent per phase of training in ``phase_seconds``.

    "y1" is TRL's generation and scoring of the first attempts (the whole rollout for plain GRPO); ERL adds
    its own phases; "loss" is the rest of each training step — the loss forward and backward."""

    def _clock_init(self):
        self.phase_seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def _clock(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[name] += time.perf_counter() - start

    def _generate_and_score_completions(self, inputs):
        with self._clock("y1"):
            return super()._generate_and_score_completions(inputs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        start, before = time.perf_counter(), sum(v for k, v in self.phase_seconds.items() if k != "loss")
        out = super().training_step(model, inputs, num_items_in_batch)
        after = sum(v for k, v in self.phase_seconds.items() if k != "loss")
        self.phase_seconds["loss"] += time.perf_counter() - start - (after - before)
        return out


class TimedGRPOTrainer(PhaseClock, PackedForward, GRPOTrainer):
    """TRL's ``GRPOTrainer`` that records ``phase_seconds`` (the baseline of notebook 05 and the benchmark).

    ``packed_forward=False`` (default): TRL's own forward, i.e. exactly ``GRPOTrainer``. True: the packed forward
    ERL uses (``PackedForward``; the same loss, fewer tokens through the model), so that an equal-wall-clock
    comparison measures the algorithms, not the two forward implementations."""

    def __init__(self, *args, packed_forward: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._clock_init()
        self.packed_forward = packed_forward


class ERLTrainer(PhaseClock, PackedForward, GRPOTrainer):
    """``GRPOTrainer`` plus reflection, retry, memory and internalization. ``feedback_func`` may be None.

    ``model``: a model id, a local path or a model object; None = the embedded SmolLM2 folder.
    ``feedback_func(prompts, completions, completion_ids, truncated, **dataset_columns) -> list[str]``:
    the same keyword arguments as a TRL reward function, plus ``truncated`` (the completion hit the token cap).
    ``encoder``: an ``rlnlp.models.TextEncoder`` for ``memory_retrieval="similarity"`` (loaded on first use).
    ``packed_forward``: every forward pass packs rows that share a prompt prefix (``PackedForward``); False: TRL's
    forward on chunks of ``per_device_train_batch_size`` rows with all-padding columns dropped per chunk.
    After training: ``memory`` (the stored reflections), ``examples`` (one dict per gated sample: step,
    prompt, y1, r1, feedback, reflection, y2, r2, stored, internalized) and ``phase_seconds``.

    Chat or plain text follows the dataset, as in TRL: conversational prompts give conversational reflection
    and retry prompts (system prompt and earlier turns kept, the last user turn replaced by the filled
    template, rendered with the trainer's chat template and ``chat_template_kwargs``); plain-text prompts
    give plain-text ones (a base model without a chat template works). Δ and y2 are sampled with TRL's
    ``temperature`` / ``top_p`` / ``top_k`` (``generation_kwargs`` overriding them, as in TRL); options the
    shared sampler cannot honour (``min_p``, ``repetition_penalty`` ≠ 1, other ``generation_kwargs``) are refused.
    """

    def __init__(self, model=None, reward_funcs=None, args: ERLConfig | None = None, train_dataset=None, *,
                 feedback_func: Callable | None = None, encoder=None, packed_forward: bool = True, **kwargs):
        model = resolve_policy() if model is None else model
        if args is None:
            args = ERLConfig(output_dir="erl-output")
        if not isinstance(args, ERLConfig):
            raise TypeError(f"ERLTrainer needs args=ERLConfig(...), got {type(args).__name__}")
        if reward_funcs is None:
            raise ValueError("ERLTrainer needs reward_funcs (r1 and r2 are both scored with them)")
        for name in ("tools", "rollout_func", "environment_factory"):
            if kwargs.get(name):
                raise NotImplementedError(f"ERLTrainer supports single-turn prompts; {name}= is not supported")
        self._sampler_options = self._check_generation_options(args)
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset, **kwargs)
        if self.accelerator.num_processes > 1:
            raise NotImplementedError("ERLTrainer runs in a single process (r2 and the memory are not gathered)")
        self._clock_init()
        self.packed_forward = packed_forward
        self.feedback_func = feedback_func
        self.memory = ReflectionMemory(args.memory_size, args.memory_retrieval, encoder)
        self.examples: list[dict] = []
        self._scored = None

    @staticmethod
    def _check_generation_options(args: ERLConfig) -> dict:
        """TRL's generation options as the shared sampler's keywords, or a clear error."""
        if args.min_p is not None:
            raise NotImplementedError("ERLConfig.min_p: the shared sampler (rlnlp.sampling.sample) has no min-p filter, "
                                      "so reflections and retries could not honour it; leave min_p=None")
        if args.repetition_penalty != 1.0:
            raise NotImplementedError("ERLConfig.repetition_penalty: the shared sampler has no repetition penalty, "
                                      "so reflections and retries could not honour it; leave it at 1.0")
        extra = dict(args.generation_kwargs or {})
        unknown = set(extra) - SAMPLER_GENERATION_KWARGS
        if unknown:
            raise NotImplementedError(f"ERLConfig.generation_kwargs {sorted(unknown)}: the shared sampler supports only "
                                      f"{sorted(SAMPLER_GENERATION_KWARGS)}")
        options = {"temperature": extra.get("temperature", args.temperature), "top_p": extra.get("top_p", args.top_p),
                   "top_k": extra.get("top_k", args.top_k) or 0}
        if extra.get("do_sample") is False:
            options["temperature"] = 0.0
        return options

    # --- phase 1 plumbing: remember what TRL scored so r1 and the y1 texts need no recomputation
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._scored = (inputs, prompts, completions, completion_ids_list, rewards_per_func)
        return rewards_per_func

    def _weighted_reward(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        return (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)  # (N,)

    def _feedback(self, inputs, prompts, completions, completion_ids: list[list[int]], truncated: list[bool]) -> list[str]:
        if self.feedback_func is None:
            return [""] * len(prompts)
        columns = {k: [x[k] for x in inputs] for k in inputs[0] if k not in ("prompt", "completion", "completion_ids")}
        out = self.feedback_func(prompts=prompts, completions=completions, completion_ids=completion_ids,
                                 truncated=truncated, trainer_state=self.state, **columns)
        if not isinstance(out, (list, tuple)) or len(out) != len(prompts) or not all(isinstance(f, str) for f in out):
            raise ValueError(f"feedback_func must return a list of {len(prompts)} strings, got {str(out)[:120]}")
        return list(out)

    # --- phases 3 and 4: prompts in the dataset's own format, one sampler call each
    def _scaffold(self, prompt, content: str):
        """The task prompt with its last user turn (or its whole text) replaced by ``content``."""
        if isinstance(prompt, str):
            return content
        return [*prompt[:-1], {**prompt[-1], "content": content}]

    def _render(self, prompts: list) -> list[str]:
        """The exact text the model sees, as TRL would render it for y1."""
        tok = self._tokenizer
        if not is_conversational({"prompt": prompts[0]}):
            bos = tok.bos_token or ""
            adds_bos = bool(bos) and tok("x")["input_ids"][:1] == [tok.bos_token_id]  # TRL tokenizes plain text with special tokens
            return [bos + p if adds_bos else p for p in prompts]
        return [self.processing_class.apply_chat_template(p, chat_template=self.chat_template, add_generation_prompt=True,
                                                          tokenize=False, **self.chat_template_kwargs) for p in prompts]

    def _sample(self, prompts: list, max_new_tokens: int, temperature: float | None = None, stop=None):
        """One batched call of the shared sampler on the current policy weights (rendered text in, chat=False)."""
        options = dict(self._sampler_options)
        if temperature is not None:
            options["temperature"] = temperature
        return sample(self.accelerator.unwrap_model(self.model), self._tokenizer, self._render(prompts), n=1, chat=False,
                      max_new_tokens=max_new_tokens, batch_size=max(len(prompts), 1), stop=stop, **options)

    @torch.no_grad()
    def _extra_logps(self, key: str, input_ids, attention_mask, logits_to_keep):
        """old / reference per-token log-probs for Δ and y2 rows, computed the way TRL computes them for y1."""
        size = self.args.per_device_train_batch_size
        if key == "old_per_token_logps":
            return self._get_per_token_logps_and_entropies(self.model, input_ids, attention_mask, logits_to_keep, size)[0]
        if self.ref_model is not None:
            return self._get_per_token_logps_and_entropies(self.ref_model, input_ids, attention_mask, logits_to_keep, size)[0]
        from trl.trainer.utils import use_adapter

        model = self.accelerator.unwrap_model(self.model)
        with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
            return self._get_per_token_logps_and_entropies(self.model, input_ids, attention_mask, logits_to_keep, size)[0]

    def _rows(self, y1: dict, samples, advantages: torch.Tensor, part: str) -> dict:
        """Δ or y2 rows in the y1 batch's layout (same optional keys)."""
        dev = y1["prompt_ids"].device
        s = samples.to(dev)
        mask = s.completion_mask
        if self.mask_truncated_completions:
            mask = mask * torch.tensor(s.stopped, device=dev, dtype=mask.dtype)[:, None]
        rows = {"prompt_ids": s.prompt_ids, "prompt_mask": s.prompt_mask, "completion_ids": s.completion_ids,
                "completion_mask": mask, "advantages": advantages.to(dev)}
        ids, attn = torch.cat([s.prompt_ids, s.completion_ids], 1), torch.cat([s.prompt_mask, mask], 1)
        with self._clock("old_ref_logps"):
            for key in ("old_per_token_logps", "ref_per_token_logps"):
                if key in y1:
                    rows[key] = self._extra_logps(key, ids, attn, s.completion_ids.shape[1])
        rows["erl_part"] = torch.full((len(s),), PARTS[part], dtype=torch.long, device=dev)
        return rows

    def _erl_batch(self, inputs: list[dict]) -> dict:
        """Phases 1–5 and 7's data: one row-aligned batch of y1, Δ, y2 and internalization rows."""
        args, mode = self.args, "train"
        y1 = super()._generate_and_score_completions(inputs)  # phase 1 through TRL: y1, r1, group advantages
        unknown = set(y1) - set(ROW_KEYS) - {"num_items_in_batch"}
        if unknown:
            raise NotImplementedError(f"ERLTrainer supports text prompts without tools or vLLM importance sampling; "
                                      f"the y1 batch carried {sorted(unknown)}")
        scored_inputs, prompts, completions, y1_ids, rewards_per_func = self._scored
        r1 = self._weighted_reward(rewards_per_func).to(y1["advantages"].device)  # (B,)
        eos_and_pad = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        with self._clock("scoring"):
            feedback = self._feedback(scored_inputs, prompts, completions, y1_ids,
                                      [bool(ids) and ids[-1] not in eos_and_pad for ids in y1_ids])

        # phase 2: the gate
        gated = (r1 < args.reward_threshold).nonzero().flatten().tolist()
        G = len(gated)
        r2 = torch.zeros(0, device=r1.device)
        stored, internalize = [], []
        if G:
            texts = [_last_user_text(prompts[i]) for i in gated]
            # phase 3: all reflections in one sampler call
            with self._clock("reflection"):
                memory = [self.memory.format(self.memory.retrieve(t, args.memory_top_k) if args.enable_memory else [])
                          for t in texts]
                reflect_prompts = [self._scaffold(prompts[i], args.reflection_system_prompt.format(
                    prompt=t, attempt=_completion_text(completions[i]).strip(), feedback=feedback[i] or "(none)",
                    reward=f"{r1[i].item():.3g}", memory=m)) for t, i, m in zip(texts, gated, memory)]
                reflections = self._sample(reflect_prompts, args.reflection_max_new_tokens, args.reflection_temperature,
                                           stop=_ends_line if args.reflection_stop_at_newline else None)
            # phase 4: all retries in one sampler call, from the task and Δ only
            with self._clock("retry"):
                retry_prompts = [self._scaffold(prompts[i], args.retry_system_prompt.format(prompt=t, reflection=d.strip()))
                                 for i, t, d in zip(gated, texts, reflections.texts)]
                retries = self._sample(retry_prompts, args.max_completion_length)
            with self._clock("scoring"):
                conversational = is_conversational({"prompt": prompts[0]})
                y2 = [[{"role": "assistant", "content": c}] if conversational else c for c in retries.texts]
                y2_ids = [ids[:n].tolist() for ids, n in zip(retries.completion_ids, retries.lengths.tolist())]  # unpadded
                gated_inputs, gated_prompts = [scored_inputs[i] for i in gated], [prompts[i] for i in gated]
                r2 = self._weighted_reward(self._calculate_rewards(gated_inputs, gated_prompts, y2, y2_ids)).to(r1.device)
                feedback2 = self._feedback(gated_inputs, gated_prompts, y2, y2_ids, [not s for s in retries.stopped])
            # phase 5: memory; phase 7's choice of retries
            for j, i in enumerate(gated):
                a, b = r1[i].item(), r2[j].item()
                ok = args.enable_memory and should_store(a, b, args.memory_add_threshold)
                stored.append(ok)
                if ok:
                    self.memory.add(reflections.texts[j].strip(), texts[j], a, b, self.state.global_step)
                internalize.append(args.enable_internalization and args.internalization_coef > 0
                                   and should_internalize(a, b, args.internalization_rule, args.reward_threshold))
                self.examples.append({"step": self.state.global_step, "prompt": texts[j],
                                      "y1": _completion_text(completions[i]), "r1": a, "feedback": feedback[i],
                                      "reflection": reflections.texts[j], "y2": retries.texts[j], "r2": b,
                                      "feedback2": feedback2[j], "stored": ok, "internalized": internalize[-1]})

        with self._clock("assemble"):
            # phase 6's advantages
            a1, a_reflect, a_retry = erl_advantages(r1, r2, args.algorithm, y1["advantages"],
                                                    scale=args.scale_rewards != "none")
            parts = [{**{k: y1[k] for k in ROW_KEYS if k in y1}, "advantages": a1,
                      "erl_part": torch.full((len(r1),), PARTS["y1"], dtype=torch.long, device=r1.device)}]
            if G:
                parts.append(self._rows(y1, reflections, a_reflect, "reflection"))
                parts.append(self._rows(y1, retries, a_retry, "retry"))
                keep = torch.tensor([j for j in range(G) if internalize[j]], dtype=torch.long, device=r1.device)
                if keep.numel():  # phase 7's data: (original prompt → y2)
                    src = torch.tensor(gated, device=r1.device)[keep]
                    rows = {k: v[keep] for k, v in parts[-1].items()}  # the chosen retry rows ...
                    rows["prompt_ids"], rows["prompt_mask"] = y1["prompt_ids"][src], y1["prompt_mask"][src]  # ... under x
                    rows["advantages"] = torch.zeros_like(rows["advantages"])
                    rows["erl_part"] = torch.full_like(rows["erl_part"], PARTS["internalization"])
                    parts.append(rows)
            batch = {}
            pad_id = self._tokenizer.pad_token_id
            for key in parts[0]:
                if parts[0][key].ndim == 1:
                    batch[key] = torch.cat([p[key] for p in parts])
                    continue
                value = pad_id if key in ("prompt_ids", "completion_ids") else 0
                side = "left" if key.startswith("prompt") else "right"
                batch[key] = pad([row for p in parts for row in p[key]], value, side)  # (R, max width)
            # the token counts each TRL call normalises by (num_items_in_batch: the dapo / cispo / vespo losses)
            tokens, part = batch["completion_mask"].sum(1), batch["erl_part"]
            batch["num_items_in_batch"] = tokens[part <= 2].sum()
            batch["erl_items_y1"] = tokens[part == 0].sum()
            batch["erl_items_rest"] = tokens[(part == 1) | (part == 2)].sum()
            batch["erl_items_int"] = tokens[part == 3].sum()

        m = self._metrics[mode]
        m["charts/r1"].append(r1.mean().item())
        m["charts/r2"].append(r2.mean().item() if G else float("nan"))
        m["charts/r1_gated"].append(r1[gated].mean().item() if G else float("nan"))
        m["stats/gate_fraction"].append(G / len(r1))
        m["stats/memory_size"].append(float(len(self.memory)))
        m["stats/memory_added"].append(float(sum(stored)))
        m["stats/retry_improved"].append(float((r2 > r1[gated]).float().mean()) if G else float("nan"))
        prompt_tokens = batch["prompt_mask"].sum(1)
        for name, code in PARTS.items():  # what is trained: rows with ≥ 1 loss token, their loss tokens and prompts
            trained = (part == code) & (tokens > 0)
            m[f"stats/rows_{name}"].append(float(trained.sum()))
            m[f"stats/tokens_{name}"].append(float(tokens[trained].sum()))
            m[f"stats/prompt_tokens_{name}"].append(float(prompt_tokens[trained].sum()))
        return batch

    def _prepare_inputs(self, generation_batch):
        if not self.model.training:  # evaluation is plain GRPO on the policy alone, no reflection
            return super()._prepare_inputs(generation_batch)
        spg = self.args.steps_per_generation
        if self._step % (spg * self.num_iterations) == 0 or self._buffered_inputs is None:
            batch = self._erl_batch(generation_batch)
            with self._clock("assemble"):
                self._buffered_inputs = [select_rows(batch, rows) for rows in deal_rows(batch["erl_part"], spg)]
        return self._buffered_inputs[self._step % spg]

    def _compute_loss(self, model, inputs):
        if "erl_part" not in inputs:
            return super()._compute_loss(model, inputs)
        mode = "train" if self.model.training else "eval"
        part, tokens = inputs["erl_part"], inputs["completion_mask"].sum(1)
        if self.args.algorithm == "joint":
            calls = [("grpo", part <= 2, inputs["num_items_in_batch"])]
        else:
            calls = [("grpo_y1", part == 0, inputs["erl_items_y1"]),
                     ("grpo_reflection_retry", (part == 1) | (part == 2), inputs["erl_items_rest"])]
        total = None
        # phase 6: the GRPO loss, one TRL call per term
        for name, rows, items in calls:
            if not rows.any():
                continue
            sub = {k: v for k, v in select_rows(inputs, rows).items() if not k.startswith("erl_")}
            sub["num_items_in_batch"] = items
            loss = super()._compute_loss(model, sub)
            self._metrics[mode][f"losses/{name}"].append(loss.item())
            total = loss if total is None else total + loss
        # phase 7: internalization, normalised by the generation batch's internalized tokens (TRL's dapo convention
        # for micro-batches: × accumulation steps / steps_per_generation in training)
        rows = (part == PARTS["internalization"]) & (tokens > 0)  # mask_truncated_completions may empty a row
        if rows.any():
            normalizer = inputs["erl_items_int"].clamp(min=1).float()
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            loss, stats = internalization_loss(model, inputs["prompt_ids"][rows], inputs["prompt_mask"][rows],
                                               inputs["completion_ids"][rows], inputs["completion_mask"][rows], normalizer)
            self._metrics[mode]["losses/internalization"].append(stats["losses/internalization"])
            loss = self.args.internalization_coef * loss
            total = loss if total is None else total + loss
        return total


# ----------------------------------------------------------------------------------------------
# workbook experiments: evaluation without reflection, ERL vs GRPO at equal steps and equal time


@torch.no_grad()
def evaluate(model, tokenizer, rows: Sequence[dict], max_new_tokens: int = 24, batch_size: int = 64,
             temperature: float = 0.0, samples: int = 1, seed: int | None = 0) -> dict:
    """Answers to held-out prompts from the policy ALONE (no reflection, no memory); greedy by default.

    rows: dicts with task, prompt (text), spec (data/erl/eval.jsonl). ``samples`` > 1 (with temperature > 0)
    scores several answers per prompt. Returns accuracy (share of answers with reward 1), mean_reward, n
    (prompts), and per prompt ``success`` / ``rewards`` (means over its samples) for paired intervals.
    """
    from .envs.feedback_tasks import score

    if not rows:
        raise ValueError("evaluate() got no eval rows")
    s = sample(model, tokenizer, [r["prompt"] for r in rows], n=samples, max_new_tokens=max_new_tokens,
               temperature=temperature, batch_size=batch_size, seed=seed)
    scored = [score(rows[i // samples]["task"], text, rows[i // samples]["spec"])[0] for i, text in enumerate(s.texts)]
    rewards = [sum(scored[i * samples : (i + 1) * samples]) / samples for i in range(len(rows))]
    success = [sum(r == 1.0 for r in scored[i * samples : (i + 1) * samples]) / samples for i in range(len(rows))]
    return {"accuracy": sum(success) / len(rows), "mean_reward": sum(rewards) / len(rows), "n": len(rows),
            "success": success, "rewards": rewards, "answers": s.texts}


class _Budget(TrainerCallback):
    """Evaluates at chosen steps (clock paused) and stops training once the training time reaches ``seconds``."""

    def __init__(self, trainer_ref: list, eval_fn, eval_steps=(), seconds: float | None = None):
        self.trainer_ref, self.eval_fn, self.eval_steps, self.seconds = trainer_ref, eval_fn, set(eval_steps), seconds
        self.start, self.paused, self.evals = None, 0.0, []

    def train_seconds(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def on_train_begin(self, args, state, control, **kw):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        elapsed = self.train_seconds()
        if state.global_step in self.eval_steps:
            t = time.perf_counter()
            result = self.eval_fn(self.trainer_ref[0].model)
            self.evals.append({"step": state.global_step, "train_seconds": elapsed, **result})
            self.paused += time.perf_counter() - t
        # never stop before the last evaluation step: the equal-steps comparison needs it even on a noisy clock
        if self.seconds is not None and elapsed >= self.seconds and state.global_step >= max(self.eval_steps, default=0):
            control.should_training_stop = True


@dataclass
class RunResult:
    """One training run: the trainer, TRL's per-step log, training seconds (evaluation excluded), evaluations."""

    method: str
    trainer: GRPOTrainer
    history: "pd.DataFrame"  # noqa: F821 (pandas is imported lazily)
    train_seconds: float
    evals: list[dict] = field(default_factory=list)


METHODS = ("erl", "grpo", "grpo-trl")


def make_trainer(cfg: ERLConfig, method: str, model, tokenizer, callbacks=()) -> GRPOTrainer:
    """A fresh trainer on ``cfg.tasks`` with the feedback tasks' reward (and feedback), LoRA when ``cfg.lora_r`` is set.

    method: "erl" (``ERLTrainer``), "grpo" (``TimedGRPOTrainer`` with ERL's packed forward: the notebook's baseline,
    so that equal wall-clock compares the algorithms) or "grpo-trl" (TRL's own forward, exactly ``GRPOTrainer``)."""
    from .envs import feedback_tasks as ft

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    peft_config = None
    if cfg.lora_r:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=2 * cfg.lora_r, lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    common = dict(model=model, reward_funcs=ft.reward_func, args=cfg, train_dataset=ft.load_split("train", cfg.tasks),
                  processing_class=tokenizer, callbacks=list(callbacks), peft_config=peft_config)
    if method == "erl":
        return ERLTrainer(feedback_func=ft.feedback_func, **common)
    return TimedGRPOTrainer(packed_forward=method == "grpo", **common)


def train_run(cfg: ERLConfig, method: str = "erl", *, eval_rows: Sequence[dict] = (), eval_steps: Sequence[int] = (),
              max_steps: int | None = None, seconds: float | None = None, eval_max_new_tokens: int | None = None,
              **overrides) -> RunResult:
    """Train a fresh copy of the embedded policy with ERL (``method="erl"``) or plain GRPO (``"grpo"``) on
    ``cfg.tasks``; same data, rewards, seed and budget. Evaluates (no reflection, greedy) at ``eval_steps``
    and at the end; stops at ``max_steps`` or after ``seconds`` of training time, whichever comes first."""
    import pandas as pd

    from .models import load_policy
    from .runtime import seed_everything

    cfg = copy.deepcopy(cfg)
    cfg.output_dir = str(Path(cfg.output_dir) / method)
    cfg.max_steps = max_steps or cfg.max_steps
    for key, value in overrides.items():
        setattr(cfg, key, value)
    seed_everything(cfg.seed)
    model, tokenizer = load_policy(dtype=torch.float32)  # fp32 master weights; bf16 autocast on a GPU via cfg
    max_new = eval_max_new_tokens or cfg.max_completion_length
    eval_fn = lambda m: {k: v for k, v in evaluate(m, tokenizer, eval_rows, max_new).items() if k != "answers"}
    ref: list = []
    budget = _Budget(ref, eval_fn, eval_steps, seconds)
    trainer = make_trainer(cfg, method, model, tokenizer, callbacks=[budget])
    ref.append(trainer)
    trainer.train()
    seconds_trained = budget.train_seconds()
    evals = budget.evals
    if eval_rows and (not evals or evals[-1]["step"] != trainer.state.global_step):
        evals.append({"step": trainer.state.global_step, "train_seconds": seconds_trained, **eval_fn(trainer.model)})
    history = pd.DataFrame([h for h in trainer.state.log_history if "step" in h and "train_runtime" not in h])
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    history.to_csv(Path(cfg.output_dir) / "metrics.csv", index=False)
    return RunResult(method, trainer, history, seconds_trained, evals)


def grpo_at_erl_budget(cfg: ERLConfig, erl: RunResult, eval_rows: Sequence[dict]) -> tuple[RunResult, dict, dict]:
    """Notebook 05's baseline for an ERL run: plain GRPO from the same start for ERL's training seconds (at most 6×
    its steps), evaluated at half and all of ERL's steps. Returns (the GRPO run, its evaluation at ERL's step count
    = equal steps, its last evaluation = equal time)."""
    n = erl.trainer.state.global_step
    grpo = train_run(cfg, "grpo", eval_rows=eval_rows, eval_steps=[n // 2, n], max_steps=6 * cfg.max_steps,
                     seconds=erl.train_seconds)
    return grpo, next(e for e in grpo.evals if e["step"] == n), grpo.evals[-1]


# ----------------------------------------------------------------------------------------------
# the benchmark: one ERL step vs one GRPO step at the same config, in one process


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
    from .models import load_policy
    from .runtime import seed_everything

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


class _OneLineErrors(argparse.ArgumentParser):
    """argparse with a one-line error (exit status 2) instead of the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (usage: {self.prog} --help)\n")


def bench_main(argv: Sequence[str] | None = None) -> int:
    """``python -m rlnlp.bench erl``: time ERL and plain GRPO steps at the same config in one process and print
    the ratios and the per-phase breakdown. All start from the same weights and seed, so their first attempts (y1)
    are identical. "grpo-trl" is TRL's GRPOTrainer as it ships; "grpo" the same with ERL's packed forward (the
    notebook's baseline). A warm-up step of each runs first unless ``--no-warmup``; with ``--rounds`` the methods run
    in reverse order every other round (the first trainer of a process ran up to 1.6× slower in earlier runs)."""
    parser = _OneLineErrors(prog="python -m rlnlp.bench erl", description=bench_main.__doc__)
    parser.add_argument("--profile", default="smoke", choices=("smoke", "cpu", "full"), help="ERLConfig preset")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per method (after the warm-up)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up step of each method")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every method this many times, interleaved; the ratio is printed per round and over all")
    parser.add_argument("--algorithm", choices=("joint", "split"), default=None)
    parser.add_argument("--lora-r", type=int, default=None, help="override the preset's LoRA rank (0 = full fine-tuning)")
    parser.add_argument("--methods", default="grpo-trl,grpo,erl", help="comma-separated subset of " + ",".join(METHODS))
    args = parser.parse_args(list(argv) if argv is not None else None)
    methods = [m for m in args.methods.split(",") if m]
    if not methods or set(methods) - set(METHODS):
        parser.error(f"--methods: choose from {METHODS}")
    if args.steps < 1 or args.rounds < 1:
        parser.error("--steps and --rounds must be ≥ 1")
    overrides = {}
    if args.algorithm:
        overrides["algorithm"] = args.algorithm
    if args.lora_r is not None:
        overrides["lora_r"] = args.lora_r or None
    cfg = getattr(ERLConfig, args.profile)(**overrides)
    print(f"ERL vs GRPO, {args.profile} preset: {cfg.per_device_train_batch_size // cfg.num_generations} prompt(s) × "
          f"{cfg.num_generations} completions × {cfg.max_completion_length} tokens, tasks {cfg.tasks}, "
          f"lora_r {cfg.lora_r}, algorithm {cfg.algorithm}, loss {cfg.loss_type}; torch threads {torch.get_num_threads()}; "
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
                    print(f"round {r + 1}, {method} timed step {i + 1}: {s['seconds']:.2f} s (loss {s.get('loss', 0.0):.2f} s); "
                          f"trained rows {s['rows']}; tokens {s['tokens']}", flush=True)
        if "erl" in means:
            for base in (m for m in means if m != "erl"):
                round_ratios[base].append(means["erl"] / means[base])
            print(f"round {r + 1}: " + ", ".join(f"ERL / {b} {v[-1]:.2f}" for b, v in round_ratios.items()), flush=True)
    results = {m: {k: sum(s.get(k, 0.0) for s in st) / len(st) for k in ("seconds", *BENCH_PHASES)} for m, st in steps_of.items()}
    header = f"{'phase (s per step)':<22}" + "".join(f"{m:>10}" for m in results)
    print(header)
    for key in ("seconds", *BENCH_PHASES):
        print(f"{'step total' if key == 'seconds' else key:<22}" + "".join(f"{results[m][key]:>10.2f}" for m in results))
    for base, ratios in round_ratios.items():
        ratio = results["erl"]["seconds"] / results[base]["seconds"]
        spread = f"; per round {min(ratios):.2f}–{max(ratios):.2f}" if len(ratios) > 1 else ""
        print(f"ERL step / {base} step = {ratio:.2f} (mean of {args.rounds} round(s) × {args.steps} timed step(s) each, "
              f"one process{spread})")
    return 0


def seeds_main(argv: Sequence[str] | None = None) -> int:
    """``python -m rlnlp.bench erl-seeds --seeds 1 2 3``: notebook 05's comparison at other seeds. Per seed: ERL for
    the preset's steps, then GRPO for at most 6× as many steps or ERL's training seconds, whichever ends first (the
    notebook's protocol, same evaluation steps); greedy accuracy on the same held-out prompts, paired 95% intervals
    of GRPO − untrained, ERL − untrained and ERL − GRPO at equal steps and at equal time. Prints one table row per
    seed as it ends; ``--jsonl FILE`` also appends each row there. The untrained policy is evaluated once."""
    import json

    from .envs import feedback_tasks as ft
    from .models import load_policy
    from .stats import paired_difference

    parser = _OneLineErrors(prog="python -m rlnlp.bench erl-seeds", description=seeds_main.__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="one or more integer seeds")
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
