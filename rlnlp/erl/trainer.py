"""The trainers: ``PhaseClock`` (seconds per phase), ``TimedGRPOTrainer`` (the baseline) and ``ERLTrainer``, whose
generation step runs as phases over one ``ERLStep`` record: first attempts, gate, reflect, retry, remember,
assemble, log."""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Callable

import torch
from accelerate.utils import DistributedType, gather
from trl import GRPOTrainer
from trl.data_utils import is_conversational

from ..distributed import (
    GradientsAveragedByHand,
    gather_counts,
    gather_in_rank_order,
    global_sum,
    own_rows,
    process_rows,
    unpad_blocks,
)
from ..models import resolve_policy
from ..sampling import sample
from .config import PARTS, ROW_KEYS, ERLConfig
from .memory import ReflectionMemory, should_internalize, should_store
from .objective import deal_rows, erl_advantages, internalization_loss, select_rows
from .packing import PackedForward
from .step import (
    ERLStep,
    completion_text,
    ends_line,
    internalization_rows,
    last_user_text,
    sampler_options,
    stack_parts,
    step_metrics,
)


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


class TimedGRPOTrainer(PhaseClock, GradientsAveragedByHand, PackedForward, GRPOTrainer):
    """TRL's ``GRPOTrainer`` that records ``phase_seconds`` (the baseline of notebook 05 and the benchmark).

    ``packed_forward=False`` (default): TRL's own forward, i.e. exactly ``GRPOTrainer``. True: the packed forward
    ERL uses (``PackedForward``; the same loss, fewer tokens through the model), so that an equal-wall-clock
    comparison measures the algorithms, not the two forward implementations."""

    def __init__(self, *args, packed_forward: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self._clock_init()
        self.packed_forward = packed_forward


class ScaffoldSampler:
    """Mixin for ``ERLTrainer``: reflection and retry prompts in the dataset's own format, one call of the shared
    sampler per phase, and the sampled rows in the y1 batch's layout (with old / reference log-probs)."""

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
            # TRL tokenizes plain text with special tokens
            adds_bos = bool(bos) and tok("x")["input_ids"][:1] == [tok.bos_token_id]
            return [bos + p if adds_bos else p for p in prompts]
        return [self.processing_class.apply_chat_template(p, chat_template=self.chat_template,
                                                          add_generation_prompt=True, tokenize=False,
                                                          **self.chat_template_kwargs) for p in prompts]

    def _sample(self, prompts: list, max_new_tokens: int, temperature: float | None = None, stop=None):
        """One batched call of the shared sampler on the current policy weights (rendered text in, chat=False)."""
        options = dict(self._sampler_options)
        if temperature is not None:
            options["temperature"] = temperature
        return sample(self.accelerator.unwrap_model(self.model), self._tokenizer, self._render(prompts), n=1,
                      chat=False, max_new_tokens=max_new_tokens, batch_size=max(len(prompts), 1), stop=stop, **options)

    @torch.no_grad()
    def _extra_logps(self, key: str, input_ids, attention_mask, logits_to_keep):
        """old / reference per-token log-probs for Δ and y2 rows, computed the way TRL computes them for y1."""
        size = self.args.per_device_train_batch_size
        if key == "old_per_token_logps":
            return self._get_per_token_logps_and_entropies(self.model, input_ids, attention_mask, logits_to_keep,
                                                           size)[0]
        if self.ref_model is not None:
            return self._get_per_token_logps_and_entropies(self.ref_model, input_ids, attention_mask, logits_to_keep,
                                                           size)[0]
        from trl.trainer.utils import use_adapter

        model = self.accelerator.unwrap_model(self.model)
        with use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None):
            return self._get_per_token_logps_and_entropies(self.model, input_ids, attention_mask, logits_to_keep,
                                                           size)[0]

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



class ERLLoss:
    """Mixin for ``ERLTrainer``: phases 6 and 7 — the mixed batch dealt over micro-batches, then per micro-batch
    one TRL loss call per GRPO term plus the internalization cross-entropy."""

    def _prepare_inputs(self, generation_batch):
        if not self.model.training:  # evaluation is plain GRPO on the policy alone, no reflection
            return super()._prepare_inputs(generation_batch)
        spg = self.args.steps_per_generation
        if self._step % (spg * self.num_iterations) == 0 or self._buffered_inputs is None:
            batch = self._erl_batch(generation_batch)
            with self._clock("assemble"):
                self._buffered_inputs = [select_rows(batch, rows) for rows in deal_rows(batch["erl_part"], spg)]
                self._count_rows_everywhere(self._buffered_inputs)
        return self._buffered_inputs[self._step % spg]

    def _count_rows_everywhere(self, micro_batches: list[dict]) -> None:
        """Each micro-batch's ``erl_rows``: every process's rows per part in it (internalization: rows with a loss
        token). TRL's loss gathers per-row metrics across processes, so for each TRL call every process must take
        part, with as many rows as the others: the loss pads to the most rows any process has."""
        local = torch.tensor([_rows_per_part(mb["erl_part"], mb["completion_mask"]) for mb in micro_batches],
                             device=self.accelerator.device)  # (micro-batches, 4)
        everyone = gather(local.unsqueeze(0))  # (P, micro-batches, 4)
        for m, mb in enumerate(micro_batches):
            mb["erl_rows"] = tuple(tuple(n) for n in everyone[:, m].tolist())

    def _compute_loss(self, model, inputs):
        if "erl_part" not in inputs:
            return super()._compute_loss(model, inputs)
        mode = "train" if self.model.training else "eval"
        part, tokens, acc = inputs["erl_part"], inputs["completion_mask"].sum(1), self.accelerator
        per_process = inputs.get("erl_rows") or [_rows_per_part(part, inputs["completion_mask"])]

        def most(codes) -> int:  # the most rows of these parts any process has in this micro-batch
            return max(sum(n[c] for c in codes) for n in per_process)

        if self.args.algorithm == "joint":
            calls = [("grpo", part <= 2, inputs["num_items_in_batch"], most((0, 1, 2)))]
        else:
            calls = [("grpo_y1", part == 0, inputs["erl_items_y1"], most((0,))),
                     ("grpo_reflection_retry", (part == 1) | (part == 2), inputs["erl_items_rest"], most((1, 2)))]
        total = None
        # phase 6: the GRPO loss, one TRL call per term that has rows on any process; each process passes as many
        # rows (TRL gathers per-row metrics): its own, then copies of its first row with every token masked out
        for name, rows, items, width in calls:
            if not width:
                continue
            own = rows.nonzero().flatten()
            sub = {k: v for k, v in select_rows(inputs, torch.cat([own, own.new_zeros(width - len(own))])).items()
                   if not k.startswith("erl_")}
            sub["completion_mask"][len(own):] = 0
            sub["num_items_in_batch"] = items
            loss = super()._compute_loss(model, sub)
            self._metrics[mode][f"losses/{name}"].append(acc.gather(loss.detach()).mean().item())
            total = loss if total is None else total + loss
        # phase 7: internalization, normalised by the generation batch's internalized tokens over all processes (TRL's
        # dapo convention: ÷ processes, whose gradients are averaged; for micro-batches × accumulation steps /
        # steps_per_generation in training)
        rows = (part == PARTS["internalization"]) & (tokens > 0)  # mask_truncated_completions may empty a row
        if most((3,)):
            normalizer = inputs["erl_items_int"].clamp(min=1).float() / acc.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            ce_tokens = torch.zeros(2, device=part.device)  # (Σ cross-entropy, tokens) over this process's rows
            if rows.any():
                loss, stats = internalization_loss(model, inputs["prompt_ids"][rows], inputs["prompt_mask"][rows],
                                                   inputs["completion_ids"][rows], inputs["completion_mask"][rows],
                                                   normalizer)
                k = stats["stats/internalized_tokens"]
                ce_tokens += torch.tensor([stats["losses/internalization"] * k, k], device=part.device)
                loss = self.args.internalization_coef * loss
                total = loss if total is None else total + loss
            ce, k = global_sum(acc, ce_tokens).tolist()
            self._metrics[mode]["losses/internalization"].append(ce / max(k, 1))
        return total


def _rows_per_part(part: torch.Tensor, completion_mask: torch.Tensor) -> list[int]:
    """Rows of y1, Δ and y2, and internalization rows with ≥ 1 loss token."""
    internalized = (part == PARTS["internalization"]) & (completion_mask.sum(1) > 0)
    return [int((part == code).sum()) for code in range(3)] + [int(internalized.sum())]


class ERLTrainer(ERLLoss, ScaffoldSampler, PhaseClock, GradientsAveragedByHand, PackedForward, GRPOTrainer):
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
        self._sampler_options = sampler_options(args)
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset, **kwargs)
        if self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            raise NotImplementedError("ERLTrainer runs in one process or under DDP (accelerate's multi_gpu, or "
                                      "torchrun): reflections and retries are sampled from the unwrapped policy, which "
                                      "DeepSpeed ZeRO-3 and FSDP shard, and neither was tested with it")
        self._clock_init()
        self.packed_forward = packed_forward
        self.feedback_func = feedback_func
        self.memory = ReflectionMemory(args.memory_size, args.memory_retrieval, encoder)
        self.examples: list[dict] = []
        self._catch_scored = None

    def _erl_batch(self, inputs: list[dict]) -> dict:
        """One generation step, phase by phase around one ``ERLStep``; returns the row-aligned batch of y1, Δ, y2
        and internalization rows (phases 6 and 7 train on it: ``ERLLoss``)."""
        step = self._first_attempts(inputs)
        self._gate(step)
        if step.gated:
            if self.args.enable_reflection:
                self._reflect(step)
            self._retry(step)
        elif max(step.gated_counts):  # other processes retried: join their reward gather and memory update
            self._score_retries(step, [], [], [], [], filler=(step.inputs[0], step.prompts[0], step.completions[0],
                                                              step.y1_ids[0]))
        if max(step.gated_counts):
            self._remember(step)
        with self._clock("assemble"):
            step.batch = self._assemble(step)
        self._log(step)
        return step.batch

    # --- phase 1: first attempts through TRL
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self._catch_scored is not None:
            self._catch_scored.append((inputs, prompts, completions, completion_ids_list, rewards_per_func))
        return rewards_per_func

    def _first_attempts(self, inputs: list[dict]) -> ERLStep:
        """y1, r1 and group advantages from TRL's own generation path; the texts and rewards TRL scored are caught
        on their way through ``_calculate_rewards`` (nothing is generated or scored twice); then f1."""
        scored: list[tuple] = []
        self._catch_scored = scored  # only for the length of TRL's call: r2's scoring later is not caught
        try:
            y1 = super()._generate_and_score_completions(inputs)
        finally:
            self._catch_scored = None
        unknown = set(y1) - set(ROW_KEYS) - {"num_items_in_batch"}
        if unknown:
            raise NotImplementedError(f"ERLTrainer supports text prompts without tools or vLLM importance sampling; "
                                      f"the y1 batch carried {sorted(unknown)}")
        scored_inputs, prompts, completions, y1_ids, rewards_per_func = scored[-1]
        # TRL gathers every process's rewards (a group may span processes); the texts are this process's rows
        r1_all = self._weighted_reward(rewards_per_func).to(y1["advantages"].device)  # (P·B,) in rank order
        r1 = r1_all[process_rows(self.accelerator, len(prompts))]  # (B,) this process's rows
        eos_and_pad = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        with self._clock("scoring"):
            feedback = self._feedback(scored_inputs, prompts, completions, y1_ids,
                                      [bool(ids) and ids[-1] not in eos_and_pad for ids in y1_ids])
        return ERLStep(scored_inputs, prompts, completions, y1_ids, y1, r1, feedback, r1_all=r1_all)

    def _weighted_reward(self, rewards_per_func: torch.Tensor) -> torch.Tensor:
        return (rewards_per_func * self.reward_weights.to(rewards_per_func.device)).nansum(dim=1)  # (N,)

    def _feedback(self, inputs, prompts, completions, completion_ids: list[list[int]],
                  truncated: list[bool]) -> list[str]:
        if self.feedback_func is None:
            return [""] * len(prompts)
        columns = {k: [x[k] for x in inputs] for k in inputs[0] if k not in ("prompt", "completion", "completion_ids")}
        out = self.feedback_func(prompts=prompts, completions=completions, completion_ids=completion_ids,
                                 truncated=truncated, trainer_state=self.state, **columns)
        if not isinstance(out, (list, tuple)) or len(out) != len(prompts) or not all(isinstance(f, str) for f in out):
            raise ValueError(f"feedback_func must return a list of {len(prompts)} strings, got {str(out)[:120]}")
        return list(out)

    # --- phase 2: the gate
    def _gate(self, step: ERLStep) -> None:
        """Samples with r1 < τ go on to reflection and retry; the rest are done."""
        step.gated = (step.r1 < self.args.reward_threshold).nonzero().flatten().tolist()
        step.tasks = [last_user_text(step.prompts[i]) for i in step.gated]
        step.gated_counts = gather_counts(self.accelerator, len(step.gated))

    # --- phases 3 and 4: all reflections in one sampler call, then all retries in one, from the task and Δ only
    def _reflect(self, step: ERLStep) -> None:
        args = self.args
        with self._clock("reflection"):
            memory = [self.memory.format(self.memory.retrieve(t, args.memory_top_k) if args.enable_memory else [])
                      for t in step.tasks]
            prompts = [self._scaffold(step.prompts[i], args.reflection_system_prompt.format(
                prompt=t, attempt=completion_text(step.completions[i]).strip(), feedback=step.feedback[i] or "(none)",
                reward=f"{step.r1[i].item():.3g}", memory=m)) for t, i, m in zip(step.tasks, step.gated, memory)]
            step.reflections = self._sample(prompts, args.reflection_max_new_tokens, args.reflection_temperature,
                                            stop=ends_line if args.reflection_stop_at_newline else None)

    def _retry(self, step: ERLStep) -> None:
        with self._clock("retry"):
            if step.reflections is not None:
                template = self.args.retry_system_prompt
                prompts = [self._scaffold(step.prompts[i], template.format(prompt=t, reflection=d.strip()))
                           for i, t, d in zip(step.gated, step.tasks, step.reflections.texts)]
            else:  # without reflection: the task, the first attempt and its raw feedback
                template = self.args.feedback_retry_prompt
                prompts = [self._scaffold(step.prompts[i], template.format(
                    prompt=t, attempt=completion_text(step.completions[i]).strip(),
                    feedback=step.feedback[i] or "(none)")) for i, t in zip(step.gated, step.tasks)]
            step.retries = retries = self._sample(prompts, self.args.max_completion_length)
        with self._clock("scoring"):
            conversational = is_conversational({"prompt": step.prompts[0]})
            y2 = [[{"role": "assistant", "content": c}] if conversational else c for c in retries.texts]
            y2_ids = [ids[:n].tolist() for ids, n in zip(retries.completion_ids, retries.lengths.tolist())]  # unpadded
            inputs, prompts = [step.inputs[i] for i in step.gated], [step.prompts[i] for i in step.gated]
            self._score_retries(step, inputs, prompts, y2, y2_ids)
            step.feedback2 = self._feedback(inputs, prompts, y2, y2_ids, [not s for s in retries.stopped])

    def _score_retries(self, step: ERLStep, inputs, prompts, y2, y2_ids, filler=None) -> None:
        """r2 of this process's retries (``step.r2``) and of every process's in rank order (``step.r2_all``).

        TRL's reward call gathers across processes, which needs as many rows on every process: each scores
        max(G) rows, its own retries followed by copies of ``filler`` (a scored row), whose rewards are dropped.
        In one process there is no filler and this is the reward call itself."""
        pad = max(step.gated_counts) - len(prompts)
        if pad:
            filler = filler or (inputs[0], prompts[0], y2[0], y2_ids[0])
            inputs, prompts, y2, y2_ids = (list(x) + [f] * pad for x, f in zip((inputs, prompts, y2, y2_ids), filler))
        gathered = self._weighted_reward(self._calculate_rewards(inputs, prompts, y2, y2_ids))  # (P·max G,)
        step.r2_all = unpad_blocks(gathered.to(step.r1.device), step.gated_counts)
        step.r2 = step.r2_all[own_rows(self.accelerator, step.gated_counts)]

    # --- phase 5: memory, and phase 7's choice of retries
    def _remember(self, step: ERLStep) -> None:
        """Each row decides from its own r1 and r2; every process then appends every process's new entries (and
        examples) in rank order, so the memory is the same on all of them."""
        args = self.args
        reflections = step.reflections.texts if step.reflections is not None else [""] * len(step.gated)
        entries, examples = [], []
        for j, i in enumerate(step.gated):
            a, b = step.r1[i].item(), step.r2[j].item()
            ok = args.enable_memory and step.reflections is not None and should_store(a, b, args.memory_add_threshold)
            step.stored.append(ok)
            if ok:
                entries.append((reflections[j].strip(), step.tasks[j], a, b, self.state.global_step))
            step.internalize.append(args.enable_internalization and args.internalization_coef > 0
                                    and should_internalize(a, b, args.internalization_rule, args.reward_threshold))
            examples.append({"step": self.state.global_step, "prompt": step.tasks[j],
                             "y1": completion_text(step.completions[i]), "r1": a, "feedback": step.feedback[i],
                             "reflection": reflections[j], "y2": step.retries.texts[j], "r2": b,
                             "feedback2": step.feedback2[j], "stored": ok, "internalized": step.internalize[-1]})
        for entry in gather_in_rank_order(self.accelerator, entries):
            self.memory.add(*entry)
        self.examples.extend(gather_in_rank_order(self.accelerator, examples))

    # --- assemble: phase 6's advantages and every part's rows in one batch
    def _assemble(self, step: ERLStep) -> dict:
        args, y1, r1, acc = self.args, step.y1, step.r1, self.accelerator
        # over every process's rows (joint: one batch-wide normalisation), then this process's share; whether Δ rows
        # exist is the config's, not this process's (a process without gated rows has none)
        a1, a_reflect, a_retry = erl_advantages(step.r1_all, step.r2_all, args.algorithm, gather(y1["advantages"]),
                                                scale=args.scale_rewards != "none", reflection=args.enable_reflection)
        a1, mine = a1[process_rows(acc, len(r1))], own_rows(acc, step.gated_counts)
        a_reflect, a_retry = a_reflect[mine], a_retry[mine]
        parts = [{**{k: y1[k] for k in ROW_KEYS if k in y1}, "advantages": a1,
                  "erl_part": torch.full((len(r1),), PARTS["y1"], dtype=torch.long, device=r1.device)}]
        if step.gated:
            if step.reflections is not None:
                parts.append(self._rows(y1, step.reflections, a_reflect, "reflection"))
            parts.append(self._rows(y1, step.retries, a_retry, "retry"))
            internalized = internalization_rows(step, parts[-1])
            if internalized is not None:
                parts.append(internalized)
        batch = stack_parts(parts, self._tokenizer.pad_token_id)
        # the loss normalisers count every process's tokens, as TRL's own num_items_in_batch does
        keys = ("num_items_in_batch", "erl_items_y1", "erl_items_rest", "erl_items_int")
        batch.update(zip(keys, global_sum(acc, torch.stack([batch[k] for k in keys]))))
        return batch

    def _log(self, step: ERLStep) -> None:
        metrics = step_metrics(step, len(self.memory), self.args.reward_threshold)
        counts = [k for k in metrics if k == "stats/memory_added" or k.startswith(("stats/rows_", "stats/tokens_",
                                                                                  "stats/prompt_tokens_"))]
        totals = global_sum(self.accelerator, torch.tensor([metrics[k] for k in counts], device=step.r1.device))
        metrics.update(zip(counts, totals.tolist()))  # summed over processes
        for key, value in metrics.items():
            self._metrics["train"][key].append(value)
