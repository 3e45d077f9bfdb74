"""The trainers: ``PhaseClock`` (seconds per phase), ``TimedGRPOTrainer`` (the baseline) and ``ERLTrainer``."""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Callable

import torch
from trl import GRPOTrainer
from trl.data_utils import is_conversational
from trl.trainer.utils import pad

from ..models import resolve_policy
from ..sampling import sample
from .config import PARTS, ROW_KEYS, SAMPLER_GENERATION_KWARGS, ERLConfig
from .memory import ReflectionMemory, should_internalize, should_store
from .objective import deal_rows, erl_advantages, internalization_loss, select_rows
from .packing import PackedForward


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
