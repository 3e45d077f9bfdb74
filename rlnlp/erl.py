"""ERL — Experiential Reinforcement Learning on TRL's GRPOTrainer (spec 05; Shi et al., arXiv 2602.13949).

Each training step, for a batch of prompts x:

1. first attempt  y1 ~ π(·|x) (TRL's own generation path), reward r1, textual feedback f1;
2. gate           samples with r1 < τ go on, the rest are done;
3. reflection     Δ ~ π(·| reflect(x, y1, f1, r1, memory))  — ONE batched sampler call for all gated;
4. retry          y2 ~ π(·| retry(x, Δ))                     — ONE batched sampler call; r2 = R(x, y2);
5. memory         Δ is stored (FIFO of ``memory_size``) when the add rule fires;
6. GRPO           over y1 (r1), Δ (r2) and y2 (r2): ``joint`` = one update, advantages normalised
                  over the whole batch (Algorithm 1); ``split`` = y1 with TRL's group advantages, then
                  Δ + y2 with their own normalisation (Algorithm 2);
7. internalize    L_int = −mean_t log π(y2_t | x, y2_<t) over retries with r2 > 0 (prompt tokens
                  masked), so the policy answers well WITHOUT the scaffold.

    L = L_GRPO(y1, Δ, y2) + internalization_coef · L_int

How it sits on TRL 1.16 (``trl>=1.16,<1.17``; these internals change between minor versions):
``_prepare_inputs`` (train mode) calls ``GRPOTrainer._generate_and_score_completions`` for y1 —
so y1, r1 and the baseline's rollouts go through the identical TRL code — then appends the Δ, y2
and internalization rows to the same row-aligned batch (a per-row ``erl_part`` tag), which TRL's
shuffling and splitting carry along. ``_compute_loss`` calls ``GRPOTrainer._compute_loss`` once
per part (y1, Δ, y2) with weights that make the sum equal one pass over the combined batch for
the configured ``loss_type`` (so every GRPO loss option keeps working), then adds L_int.
Reflections and retries use the workbook's one sampler, ``rlnlp.sampling.sample``, on the
unwrapped policy (the same weights as y1; no vLLM, no ZeRO-3 gathering). Single process only.
Evaluation (``evaluate``) answers held-out prompts greedily with NO reflection.
"""
from __future__ import annotations

import copy
import math
import string
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer
from trl.data_utils import is_conversational
from trl.trainer.utils import shuffle_sequence_dict

from .models import position_ids_from_mask, resolve_policy
from .sampling import pad_cat, sample
from .tracking import runs_dir

DEFAULT_REFLECTION_PROMPT = (
    "You tried a task and did not fully succeed.\n"
    "Task: {prompt}\n"
    "Your answer: {attempt}\n"
    "Feedback: {feedback}\n"
    "Score: {reward}\n"
    "Lessons from earlier tasks: {memory}\n"
    "In one or two sentences, say what went wrong and exactly what to do differently next time."
)
DEFAULT_RETRY_PROMPT = "{prompt}\nAdvice from your last try: {reflection}"
REFLECTION_FIELDS = {"prompt", "attempt", "feedback", "reward", "memory"}
RETRY_FIELDS = {"prompt", "reflection"}
PARTS = {"y1": 0, "reflection": 1, "retry": 2, "internalization": 3}
# Row-aligned keys TRL's y1 batch may carry that ERL knows how to extend to Δ / y2 rows.
ROW_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "advantages",
            "old_per_token_logps", "ref_per_token_logps", "sampling_per_token_logps")


def _template_fields(template: str, allowed: set[str], name: str) -> None:
    used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    unknown = used - allowed
    if unknown or "prompt" not in used:
        raise ValueError(f"ERLConfig.{name}: placeholders {sorted(used)} — must include {{prompt}} and use only "
                         f"{sorted('{' + f + '}' for f in allowed)}")


@dataclass
class ERLConfig(GRPOConfig):
    """Every ``GRPOConfig`` option plus ERL's. Presets: ``ERLConfig.smoke()`` (CPU, minutes) and ``.full()`` (one GPU).

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
    """Reflection prompt template: {prompt} {attempt} {feedback} {reward} {memory}. Sent as the user turn
    (the 135M model follows user turns far better than system turns). Ours is shorter than the original's
    multi-section template, which the small model mostly paraphrases back."""
    retry_system_prompt: str = DEFAULT_RETRY_PROMPT
    """Retry prompt template: {prompt} {reflection} — y2 sees the task and Δ only, never y1 or f1."""
    reflection_max_new_tokens: int = 48
    """Token budget of a reflection Δ (retries use max_completion_length, like y1). Not in the original,
    which used one budget for everything."""
    internalization_coef: float = 1.0
    """Weight of the internalization cross-entropy relative to the GRPO loss."""
    enable_memory: bool = True
    """Retrieve from and add to the reflection memory (off: every reflection prompt says "None available.")."""
    enable_internalization: bool = True
    """Add the internalization loss (off: pure RL on y1, Δ, y2)."""
    algorithm: str = "joint"
    """"joint" (Algorithm 1: one update, batch-wide advantage normalisation) or "split" (Algorithm 2)."""
    tasks: tuple[str, ...] = ("json_key",)
    """Workbook experiments only: the feedback tasks (rlnlp.envs.feedback_tasks) the notebook trains on."""
    eval_size: int | None = 32
    """Workbook experiments only: held-out prompts per evaluation (None = the whole eval split)."""

    def __post_init__(self):
        if self.bf16 is None and not self.fp16 and not torch.cuda.is_available():
            self.bf16, self.use_cpu = False, True
        super().__post_init__()
        if self.algorithm not in ("joint", "split"):
            raise ValueError(f"ERLConfig.algorithm must be 'joint' or 'split', got {self.algorithm!r}")
        if self.memory_retrieval not in ("recency", "similarity"):
            raise ValueError(f"ERLConfig.memory_retrieval must be 'recency' or 'similarity', got {self.memory_retrieval!r}")
        if self.memory_size < 0 or self.memory_top_k < 0 or self.internalization_coef < 0:
            raise ValueError("ERLConfig: memory_size, memory_top_k and internalization_coef must be ≥ 0")
        if not math.isfinite(self.reward_threshold):
            raise ValueError(f"ERLConfig.reward_threshold must be finite, got {self.reward_threshold}")
        _template_fields(self.reflection_system_prompt, REFLECTION_FIELDS, "reflection_system_prompt")
        _template_fields(self.retry_system_prompt, RETRY_FIELDS, "retry_system_prompt")
        self.tasks = tuple(self.tasks)

    @classmethod
    def smoke(cls, **overrides) -> "ERLConfig":
        """Two steps of 1 prompt × 4 completions × 24 tokens on CPU: checks the mechanics, not learning."""
        kw = dict(output_dir=str(runs_dir() / "erl-smoke"), per_device_train_batch_size=4, num_generations=4,
                  max_completion_length=24, reflection_max_new_tokens=24, max_steps=2, learning_rate=1e-5,
                  lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", seed=0, eval_size=None,
                  tasks=("json_key",), dataloader_num_workers=0)
        if not torch.cuda.is_available():
            kw.update(use_cpu=True, bf16=False)
        return cls(**{**kw, **overrides})

    @classmethod
    def full(cls, **overrides) -> "ERLConfig":
        """One H100: 150 steps of 4 prompts × 8 completions on all five feedback tasks (never run here)."""
        kw = dict(output_dir=str(runs_dir() / "erl-full"), per_device_train_batch_size=32, num_generations=8,
                  max_completion_length=64, reflection_max_new_tokens=64, max_steps=150, learning_rate=3e-6,
                  lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", seed=0, eval_size=None,
                  tasks=("arithmetic", "word_count", "json_key", "letters", "frozen_lake"),
                  bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        return cls(**{**kw, **overrides})


# ----------------------------------------------------------------------------------------------
# memory


def should_store(r1: float, r2: float, threshold: float | None) -> bool:
    """The memory add rule: r2 > r1 (threshold None) or r2 ≥ threshold."""
    return r2 > r1 if threshold is None else r2 >= threshold


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
# the two pieces of math ERL adds to GRPO


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


def internalization_loss(model, prompt_ids, prompt_mask, completion_ids, completion_mask) -> tuple[torch.Tensor, dict]:
    """L_int = −(1/N) Σ_{labelled tokens} log π(y2_t | x, y2_<t): token-mean cross-entropy on the retry,
    conditioned on the ORIGINAL prompt; N = number of non-masked retry tokens."""
    input_ids, attention_mask, labels = internalization_labels(prompt_ids, prompt_mask, completion_ids, completion_mask)
    C = completion_ids.shape[1]
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask),
                logits_to_keep=C + 1, use_cache=False)
    logits = out.logits[:, :-1, :].float()  # (B, C, V): position P−1+t predicts retry token t
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, -C:].reshape(-1), ignore_index=-100)
    return loss, {"losses/internalization": loss.item(), "stats/internalized_tokens": int((labels != -100).sum())}


def _split_rows(batch: dict, chunks: int) -> list[dict]:
    """Like TRL's split_tensor_dict, but never drops rows when the row count is not a multiple of ``chunks``."""
    rows = batch["erl_part"].shape[0]
    bounds = torch.linspace(0, rows, chunks + 1).round().long().tolist()
    return [{k: (v[a:b] if isinstance(v, torch.Tensor) and v.ndim > 0 else v) for k, v in batch.items()}
            for a, b in zip(bounds[:-1], bounds[1:])]


def _prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return next(m["content"] for m in reversed(prompt) if m["role"] == "user")


def _completion_text(completion) -> str:
    return completion if isinstance(completion, str) else str(completion[-1]["content"])


# ----------------------------------------------------------------------------------------------
# the trainer


class ERLTrainer(GRPOTrainer):
    """``GRPOTrainer`` plus reflection, retry, memory and internalization. ``feedback_func`` may be None.

    ``model``: a model id, a local path or a model object; None = the embedded SmolLM2 folder.
    ``encoder``: an ``rlnlp.models.TextEncoder`` for ``memory_retrieval="similarity"`` (loaded on first use).
    After training: ``memory`` (the stored reflections) and ``examples`` (one dict per gated sample:
    step, prompt, y1, r1, feedback, reflection, y2, r2, stored).
    """

    def __init__(self, model=None, reward_funcs=None, args: ERLConfig | None = None, train_dataset=None, *,
                 feedback_func: Callable | None = None, encoder=None, **kwargs):
        model = resolve_policy() if model is None else model
        if args is None:
            args = ERLConfig(output_dir="erl-output")
        if not isinstance(args, ERLConfig):
            raise TypeError(f"ERLTrainer needs args=ERLConfig(...), got {type(args).__name__}")
        if reward_funcs is None:
            raise ValueError("ERLTrainer needs reward_funcs (r1 and r2 are both scored with them)")
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset, **kwargs)
        if self.accelerator.num_processes > 1:
            raise NotImplementedError("ERLTrainer runs in a single process (r2 and the memory are not gathered)")
        self.feedback_func = feedback_func
        self.memory = ReflectionMemory(args.memory_size, args.memory_retrieval, encoder)
        self.examples: list[dict] = []
        self._scored = None

    # --- phase 1 plumbing: remember what TRL scored so r1 and the y1 texts need no recomputation
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._scored = (inputs, prompts, completions, rewards_per_func)
        return rewards_per_func

    def _weighted_reward(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        return (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)  # (N,)

    def _feedback(self, inputs, prompts, completions) -> list[str]:
        if self.feedback_func is None:
            return [""] * len(prompts)
        columns = {k: [x[k] for x in inputs] for k in inputs[0] if k not in ("prompt", "completion", "completion_ids")}
        out = self.feedback_func(prompts=prompts, completions=completions, **columns)
        if not isinstance(out, (list, tuple)) or len(out) != len(prompts) or not all(isinstance(f, str) for f in out):
            raise ValueError(f"feedback_func must return a list of {len(prompts)} strings, got {str(out)[:120]}")
        return list(out)

    def _sample(self, prompts: list, max_new_tokens: int):
        """One batched call of the shared sampler on the current policy weights."""
        tokenizer = self._tokenizer
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            return sample(self.accelerator.unwrap_model(self.model), tokenizer, prompts, n=1,
                          max_new_tokens=max_new_tokens, temperature=self.args.temperature, top_p=self.args.top_p,
                          top_k=self.args.top_k or 0, batch_size=max(len(prompts), 1))
        finally:
            tokenizer.padding_side = side

    @torch.no_grad()
    def _extra_logps(self, key: str, input_ids, attention_mask, logits_to_keep):
        """old / reference per-token log-probs for Δ and y2 rows, computed the way TRL computes them for y1."""
        if key == "old_per_token_logps":
            return self._get_per_token_logps_and_entropies(self.model, input_ids, attention_mask, logits_to_keep,
                                                           batch_size=self.args.per_device_train_batch_size)[0]
        if self.ref_model is not None:
            return self._get_per_token_logps_and_entropies(self.ref_model, input_ids, attention_mask, logits_to_keep,
                                                           batch_size=self.args.per_device_train_batch_size)[0]
        from trl.trainer.utils import use_adapter

        model = self.accelerator.unwrap_model(self.model)
        with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
            return self._get_per_token_logps_and_entropies(self.model, input_ids, attention_mask, logits_to_keep,
                                                           batch_size=self.args.per_device_train_batch_size)[0]

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
        for key in ("old_per_token_logps", "ref_per_token_logps"):
            if key in y1:
                rows[key] = self._extra_logps(key, ids, attn, s.completion_ids.shape[1])
        if "sampling_per_token_logps" in y1:
            rows["sampling_per_token_logps"] = s.logprobs
        rows["erl_part"] = torch.full((len(s),), PARTS[part], dtype=torch.long, device=dev)
        return rows

    def _erl_batch(self, inputs: list[dict]) -> dict:
        """Phases 1–5 and 7's data: returns one row-aligned batch of y1, Δ, y2 and internalization rows."""
        args, mode = self.args, "train"
        y1 = super()._generate_and_score_completions(inputs)  # phase 1 through TRL: y1, r1, group advantages
        unknown = set(y1) - set(ROW_KEYS) - {"num_items_in_batch"}
        if unknown:
            raise NotImplementedError(f"ERLTrainer supports text prompts without tools or vLLM IS correction; "
                                      f"the y1 batch carried {sorted(unknown)}")
        scored_inputs, prompts, completions, rewards_per_func = self._scored
        r1 = self._weighted_reward(rewards_per_func).to(y1["advantages"].device)  # (B,)
        feedback = self._feedback(scored_inputs, prompts, completions)

        # phase 2: the gate
        gated = (r1 < args.reward_threshold).nonzero().flatten().tolist()
        G = len(gated)
        r2 = torch.zeros(0, device=r1.device)
        stored = []
        if G:
            # phase 3: all reflections in one sampler call
            texts = [_prompt_text(prompts[i]) for i in gated]
            memory = [self.memory.format(self.memory.retrieve(t, args.memory_top_k) if args.enable_memory else [])
                      for t in texts]
            reflect_prompts = [args.reflection_system_prompt.format(
                prompt=t, attempt=_completion_text(completions[i]).strip(), feedback=feedback[i] or "(none)",
                reward=f"{r1[i].item():.2f}", memory=m) for t, i, m in zip(texts, gated, memory)]
            reflections = self._sample(reflect_prompts, args.reflection_max_new_tokens)
            # phase 4: all retries in one sampler call, from the task and Δ only
            retry_prompts = [args.retry_system_prompt.format(prompt=t, reflection=d.strip())
                             for t, d in zip(texts, reflections.texts)]
            retries = self._sample(retry_prompts, args.max_completion_length)
            conversational = is_conversational({"prompt": prompts[0]})
            y2 = [[{"role": "assistant", "content": c}] if conversational else c for c in retries.texts]
            gated_inputs = [scored_inputs[i] for i in gated]
            r2 = self._weighted_reward(self._calculate_rewards(
                gated_inputs, [prompts[i] for i in gated], y2, retries.completion_ids.tolist())).to(r1.device)  # (G,)
            feedback2 = self._feedback(gated_inputs, [prompts[i] for i in gated], y2)
            # phase 5: memory
            for j, i in enumerate(gated):
                ok = args.enable_memory and should_store(r1[i].item(), r2[j].item(), args.memory_add_threshold)
                stored.append(ok)
                if ok:
                    self.memory.add(reflections.texts[j].strip(), texts[j], r1[i].item(), r2[j].item(),
                                    self.state.global_step)
                self.examples.append({"step": self.state.global_step, "prompt": texts[j],
                                      "y1": _completion_text(completions[i]), "r1": r1[i].item(),
                                      "feedback": feedback[i], "reflection": reflections.texts[j],
                                      "y2": retries.texts[j], "r2": r2[j].item(), "feedback2": feedback2[j],
                                      "stored": ok})

        # phase 6's advantages
        a1, a_reflect, a_retry = erl_advantages(r1, r2, args.algorithm, y1["advantages"],
                                                scale=args.scale_rewards != "none")
        parts = [{**{k: y1[k] for k in ROW_KEYS if k in y1}, "advantages": a1,
                  "erl_part": torch.full((len(r1),), PARTS["y1"], dtype=torch.long, device=r1.device)}]
        if G:
            parts.append(self._rows(y1, reflections, a_reflect, "reflection"))
            parts.append(self._rows(y1, retries, a_retry, "retry"))
            # phase 7's data: (original prompt → y2) for retries that scored
            good = [j for j in range(G) if r2[j] > 0]
            if args.enable_internalization and args.internalization_coef > 0 and good:
                keep = torch.tensor(good, device=r1.device)
                src = torch.tensor([gated[j] for j in good], device=r1.device)
                rows = {k: v[keep] for k, v in parts[-1].items()}  # the retry rows that scored ...
                rows["prompt_ids"], rows["prompt_mask"] = y1["prompt_ids"][src], y1["prompt_mask"][src]  # ... under x
                rows["advantages"] = torch.zeros_like(rows["advantages"])
                rows["erl_part"] = torch.full_like(rows["erl_part"], PARTS["internalization"])
                parts.append(rows)

        batch = {}
        pad = self._tokenizer.pad_token_id
        for key in parts[0]:
            if key == "prompt_ids":
                batch[key] = pad_cat([p[key] for p in parts], pad, left=True)
            elif key == "prompt_mask":
                batch[key] = pad_cat([p[key] for p in parts], 0, left=True)
            elif key == "completion_ids":
                batch[key] = pad_cat([p[key] for p in parts], pad, left=False)
            elif parts[0][key].ndim == 2:
                batch[key] = pad_cat([p[key] for p in parts], 0, left=False)
            else:
                batch[key] = torch.cat([p[key] for p in parts])
        # token counts each update normalises by (TRL's num_items_in_batch, for the dapo-style losses)
        tokens = batch["completion_mask"].sum(1)
        part = batch["erl_part"]
        if args.algorithm == "joint":
            batch["erl_items_0"] = tokens[part <= 2].sum()
            batch["erl_items_1"] = batch["erl_items_0"]
        else:
            batch["erl_items_0"] = tokens[part == 0].sum()
            batch["erl_items_1"] = tokens[(part == 1) | (part == 2)].sum()

        m = self._metrics[mode]
        m["charts/r1"].append(r1.mean().item())
        m["charts/r2"].append(r2.mean().item() if G else float("nan"))
        m["charts/r1_gated"].append(r1[gated].mean().item() if G else float("nan"))
        m["stats/gate_fraction"].append(G / len(r1))
        m["stats/memory_size"].append(float(len(self.memory)))
        m["stats/memory_added"].append(float(sum(stored)))
        m["stats/retry_improved"].append(float((r2 > r1[gated]).float().mean()) if G else float("nan"))
        m["stats/internalized"].append(float((part == PARTS["internalization"]).sum()))
        return batch

    def _prepare_inputs(self, generation_batch):
        if not self.model.training:  # evaluation is plain GRPO on the policy alone, no reflection
            return super()._prepare_inputs(generation_batch)
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = shuffle_sequence_dict(self._erl_batch(generation_batch))
            self._buffered_inputs = _split_rows(batch, self.args.steps_per_generation)
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    def _part_weight(self, part: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor, group: torch.Tensor) -> float:
        """Weight of one part's loss so the parts of an update sum to one pass over the update's rows."""
        if self.loss_type in ("dapo", "cispo", "vespo"):
            return 1.0  # already normalised by the update's token count (erl_items_*)
        if self.loss_type == "bnpo":
            return (tokens[rows].sum() / tokens[group].sum().clamp(min=1)).item()
        return rows.sum().item() / max(group.sum().item(), 1)  # grpo, sapo, dr_grpo, luspo: a mean over rows

    def _compute_loss(self, model, inputs):
        if "erl_part" not in inputs:
            return super()._compute_loss(model, inputs)
        mode = "train" if self.model.training else "eval"
        part, tokens = inputs["erl_part"], inputs["completion_mask"].sum(1)
        groups = ({0: part <= 2, 1: part <= 2, 2: part <= 2} if self.args.algorithm == "joint"
                  else {0: part == 0, 1: (part == 1) | (part == 2), 2: (part == 1) | (part == 2)})
        total = 0.0
        # phase 6: the GRPO loss, one TRL call per part
        for name in ("y1", "reflection", "retry"):
            code = PARTS[name]
            rows = part == code
            if not rows.any():
                continue
            sub = {k: (v[rows] if isinstance(v, torch.Tensor) and v.ndim > 0 else v) for k, v in inputs.items()
                   if not k.startswith("erl_")}
            sub["num_items_in_batch"] = inputs["erl_items_0" if code == 0 else "erl_items_1"]
            loss = super()._compute_loss(model, sub) * self._part_weight(part, tokens, rows, groups[code])
            self._metrics[mode][f"losses/grpo_{name}"].append(loss.item())
            total = total + loss
        # phase 7: internalization
        rows = (part == PARTS["internalization"]) & (tokens > 0)  # mask_truncated_completions may empty a row
        if rows.any():
            loss, _ = internalization_loss(model, inputs["prompt_ids"][rows], inputs["prompt_mask"][rows],
                                           inputs["completion_ids"][rows], inputs["completion_mask"][rows])
            self._metrics[mode]["losses/internalization"].append(loss.item())
            normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
            total = total + self.args.internalization_coef * loss / normalizer
        return total


# ----------------------------------------------------------------------------------------------
# workbook experiments: evaluation without reflection, ERL vs GRPO at equal steps and equal time


@torch.no_grad()
def evaluate(model, tokenizer, rows: Sequence[dict], max_new_tokens: int = 24, batch_size: int = 64) -> dict:
    """Greedy answers to held-out prompts, the policy ALONE (no reflection, no memory).

    rows: dicts with task, prompt (text), spec (data/erl/eval.jsonl). Returns accuracy (reward = 1),
    mean_reward and n (the number of prompts).
    """
    from .envs.feedback_tasks import score

    if not rows:
        raise ValueError("evaluate() got no eval rows")
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        s = sample(model, tokenizer, [r["prompt"] for r in rows], n=1, max_new_tokens=max_new_tokens, temperature=0,
                   batch_size=batch_size)
    finally:
        tokenizer.padding_side = side
    rewards = [score(r["task"], text, r["spec"])[0] for r, text in zip(rows, s.texts)]
    return {"accuracy": sum(r == 1.0 for r in rewards) / len(rewards), "mean_reward": sum(rewards) / len(rewards),
            "n": len(rewards), "answers": s.texts}


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


def train_run(cfg: ERLConfig, method: str = "erl", *, eval_rows: Sequence[dict] = (), eval_steps: Sequence[int] = (),
              max_steps: int | None = None, seconds: float | None = None, eval_max_new_tokens: int | None = None,
              **overrides) -> RunResult:
    """Train a fresh copy of the embedded policy with ERL (``method="erl"``) or plain GRPO (``"grpo"``) on
    ``cfg.tasks``; same data, rewards, seed and budget. Evaluates (no reflection) at ``eval_steps`` and at
    the end; stops at ``max_steps`` or after ``seconds`` of training time, whichever comes first."""
    import pandas as pd

    from .envs import feedback_tasks as ft
    from .models import load_policy
    from .runtime import seed_everything

    if method not in ("erl", "grpo"):
        raise ValueError(f"method must be 'erl' or 'grpo', got {method!r}")
    cfg = copy.deepcopy(cfg)
    cfg.output_dir = str(Path(cfg.output_dir) / method)
    cfg.max_steps = max_steps or cfg.max_steps
    for key, value in overrides.items():
        setattr(cfg, key, value)
    seed_everything(cfg.seed)
    model, tokenizer = load_policy(dtype=torch.float32)  # fp32 master weights; bf16 autocast on a GPU via cfg
    train = ft.load_split("train", cfg.tasks)
    max_new = eval_max_new_tokens or cfg.max_completion_length
    eval_fn = lambda m: {k: v for k, v in evaluate(m, tokenizer, eval_rows, max_new).items() if k != "answers"}
    ref: list = []
    budget = _Budget(ref, eval_fn, eval_steps, seconds)
    common = dict(model=model, reward_funcs=ft.reward_func, args=cfg, train_dataset=train, processing_class=tokenizer,
                  callbacks=[budget])
    trainer = ERLTrainer(feedback_func=ft.feedback_func, **common) if method == "erl" else GRPOTrainer(**common)
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
