"""The one batched sampler every system calls.

Chat prompts in; token ids, masks, texts and per-token log-probs out; stop strings or a stop
function; ``n`` samples per prompt. A plain KV-cached decoding loop, written out so its semantics
are exact (which token ended a completion, which log-prob belongs to which token). This is the
seam where a faster engine (static KV cache, CUDA graphs, vLLM) would go.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .models import position_ids_from_mask

Prompt = str | list[dict]
StopFn = Callable[[str], bool]


@dataclass
class Samples:
    """R = len(prompts) × n rows, grouped by prompt (rows i·n … i·n+n−1 come from prompt i).

    prompt_ids, prompt_mask:          (R, P) left-padded
    completion_ids, completion_mask:  (R, C) right-padded; the mask covers every generated token
                                      up to and including the one that ended the completion
    logprobs:                         (R, C) log π(token) at the sampling temperature, 0 on padding
    """

    prompts: list[Prompt]
    prompt_texts: list[str]
    prompt_index: torch.Tensor
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    texts: list[str]
    stopped: list[bool] = field(default_factory=list)  # ended by EOS or a stop, not by the token cap

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(1)

    def select(self, rows) -> "Samples":
        """The rows ``rows`` (a slice or a list of indices), with padding columns no longer needed trimmed."""
        idx = torch.arange(len(self))[rows] if isinstance(rows, slice) else torch.as_tensor(rows, dtype=torch.long)
        il = idx.tolist()
        pm = self.prompt_mask[idx]
        keep = pm.sum(0) > 0  # drop all-padding (left) columns
        cm = self.completion_mask[idx]
        C = max(1, int(cm.sum(1).max())) if il else 1
        return Samples(prompts=self.prompts, prompt_texts=[self.prompt_texts[i] for i in il],
                       prompt_index=self.prompt_index[idx], prompt_ids=self.prompt_ids[idx][:, keep],
                       prompt_mask=pm[:, keep], completion_ids=self.completion_ids[idx][:, :C],
                       completion_mask=cm[:, :C], logprobs=self.logprobs[idx][:, :C],
                       texts=[self.texts[i] for i in il], stopped=[self.stopped[i] for i in il] if self.stopped else [])

    @staticmethod
    def concat(parts: Sequence["Samples"], pad_id: int) -> "Samples":
        """Stack samples from different calls: prompts re-padded on the left, completions on the right."""
        if not parts:
            raise ValueError("Samples.concat needs at least one part")
        return Samples(
            prompts=[q for p in parts for q in p.prompts],
            prompt_texts=[t for p in parts for t in p.prompt_texts],
            prompt_index=torch.cat([p.prompt_index for p in parts]),
            prompt_ids=pad_cat([p.prompt_ids for p in parts], pad_id, left=True),
            prompt_mask=pad_cat([p.prompt_mask for p in parts], 0, left=True),
            completion_ids=pad_cat([p.completion_ids for p in parts], pad_id, left=False),
            completion_mask=pad_cat([p.completion_mask for p in parts], 0, left=False),
            logprobs=pad_cat([p.logprobs for p in parts], 0.0, left=False),
            texts=[t for p in parts for t in p.texts],
            stopped=[b for p in parts for b in p.stopped],
        )

    def to(self, device) -> "Samples":
        for name in ("prompt_index", "prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "logprobs"):
            setattr(self, name, getattr(self, name).to(device))
        return self


def render_prompts(tokenizer, prompts: Sequence[Prompt], system: str | None = None, chat: bool = True) -> list[str]:
    """Turn prompts into the exact text the model sees.

    A prompt is a user message (str) or a list of ``{"role", "content"}`` messages. With
    ``chat=True`` the tokenizer's chat template is applied with the assistant turn opened;
    with ``chat=False`` string prompts are used as raw text (for base models / continuations).
    """
    out = []
    for i, p in enumerate(prompts):
        if not chat:
            if not isinstance(p, str):
                raise TypeError(f"prompt {i}: chat=False needs plain strings, got {type(p).__name__}")
            out.append(p)
            continue
        if isinstance(p, str):
            messages = [{"role": "user", "content": p}]
        elif isinstance(p, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in p):
            messages = list(p)
        else:
            raise TypeError(f"prompt {i}: expected a string or a list of {{'role', 'content'}} dicts, got {p!r:.80}")
        if system is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}] + messages
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat template: pass chat=False and plain-text prompts")
        out.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return out


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), tokenizer):
        eos = getattr(src, "eos_token_id", None)
        if eos is None:
            continue
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return ids


def _pick(logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose one token per row; return (token (B,), log π_T(token) (B,)) with π_T = softmax(logits / T)."""
    if temperature <= 0:
        token = logits.argmax(-1)
        return token, torch.log_softmax(logits, -1).gather(-1, token[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / temperature, dim=-1)  # (B, V)
    filtered = logp.clone()
    if top_k > 0:
        kth = torch.topk(filtered, min(top_k, filtered.shape[-1]), dim=-1).values[:, -1:]
        filtered[filtered < kth] = -float("inf")
    if top_p < 1.0:
        sorted_lp, order = torch.sort(filtered, descending=True, dim=-1)
        cum = sorted_lp.exp().cumsum(-1)
        drop = cum - sorted_lp.exp() > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_lp[drop] = -float("inf")
        filtered = torch.full_like(filtered, -float("inf")).scatter(-1, order, sorted_lp)
    token = torch.multinomial(torch.softmax(filtered, -1), 1, generator=generator).squeeze(-1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


@torch.no_grad()
def _sample_batch(model, tokenizer, texts, max_new_tokens, temperature, top_p, top_k, stops, stop_fn, eos, generator):
    dev = next(model.parameters()).device
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False).to(dev)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    B = ids.shape[0]
    pad = tokenizer.pad_token_id
    out_tokens = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=dev)
    out_logp = torch.zeros(B, max_new_tokens, device=dev)
    length = torch.full((B,), max_new_tokens, dtype=torch.long)
    stopped = [False] * B
    active = torch.ones(B, dtype=torch.bool, device=dev)
    past, step_ids, step_pos, full_mask = None, ids, position_ids_from_mask(mask), mask
    for t in range(max_new_tokens):
        out = model(input_ids=step_ids, attention_mask=full_mask, position_ids=step_pos,
                    past_key_values=past, use_cache=True)
        past = out.past_key_values
        token, logp = _pick(out.logits[:, -1, :].float(), temperature, top_p, top_k, generator)
        token = torch.where(active, token, torch.full_like(token, pad))
        out_tokens[:, t] = token
        out_logp[:, t] = torch.where(active, logp, torch.zeros_like(logp))
        for i in active.nonzero().flatten().tolist():
            tok = int(token[i])
            done = tok in eos
            if not done and (stops or stop_fn):
                text = tokenizer.decode(out_tokens[i, : t + 1], skip_special_tokens=True)
                done = any(s in text for s in stops) or (stop_fn is not None and bool(stop_fn(text)))
            if done:
                active[i] = False
                length[i] = t + 1
                stopped[i] = True
        if not active.any():
            break
        step_ids = token[:, None]
        step_pos = step_pos[:, -1:] + 1
        full_mask = torch.cat([full_mask, torch.ones_like(full_mask[:, :1])], dim=1)  # finished rows run on; their tokens are masked
    C = int(length.max())
    cmask = (torch.arange(C)[None, :] < length[:, None]).long().to(dev)
    ctoks = torch.where(cmask.bool(), out_tokens[:, :C], torch.full_like(out_tokens[:, :C], pad))
    texts_out = [tokenizer.decode(ctoks[i, : int(length[i])], skip_special_tokens=True) for i in range(B)]
    return Samples(prompts=[], prompt_texts=list(texts), prompt_index=torch.zeros(B, dtype=torch.long), prompt_ids=ids,
                   prompt_mask=mask, completion_ids=ctoks, completion_mask=cmask, logprobs=out_logp[:, :C] * cmask,
                   texts=texts_out, stopped=stopped)


def pad_cat(tensors: Sequence[torch.Tensor], value, left: bool) -> torch.Tensor:
    """Stack (B_i, T_i) tensors into (ΣB_i, max T_i), padding each with ``value`` on the left or the right."""
    width = max(t.shape[1] for t in tensors)
    out = []
    for t in tensors:
        fill = torch.full((t.shape[0], width - t.shape[1]), value, dtype=t.dtype, device=t.device)
        out.append(torch.cat([fill, t] if left else [t, fill], dim=1))
    return torch.cat(out)


def sample(model, tokenizer, prompts: Sequence[Prompt], *, n: int = 1, max_new_tokens: int = 64,
           temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
           stop: str | Sequence[str] | StopFn | None = None, system: str | None = None, chat: bool = True,
           batch_size: int = 64, seed: int | None = None, progress: bool = False) -> Samples:
    """Sample ``n`` completions for each prompt, in batches of ``batch_size`` rows.

    stop: a string, a list of strings, or a function ``f(completion_text) -> bool``; the completion
          ends at the token where it first holds (that token included), or at EOS, or at
          ``max_new_tokens``.
    temperature: 0 means greedy. top_p / top_k filter the sampling distribution; the returned
          ``logprobs`` are under softmax(logits / temperature) before filtering, i.e. what
          ``completion_logprobs(..., temperature=temperature)`` recomputes.
    """
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"n and max_new_tokens must be ≥ 1 (got n={n}, max_new_tokens={max_new_tokens})")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("sample() needs at least one prompt")
    if isinstance(stop, str):
        stops, stop_fn = [stop], None
    elif callable(stop):
        stops, stop_fn = [], stop
    else:
        stops, stop_fn = list(stop or []), None
    rendered = render_prompts(tokenizer, prompts, system=system, chat=chat)
    rows = [text for text in rendered for _ in range(n)]
    generator = None
    dev = next(model.parameters()).device
    if seed is not None:
        generator = torch.Generator(device=dev).manual_seed(seed)
    eos = _eos_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    chunks = []
    starts = range(0, len(rows), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="sampling", unit="batch")
    try:
        for s in starts:
            chunks.append(_sample_batch(model, tokenizer, rows[s : s + batch_size], max_new_tokens, temperature,
                                        top_p, top_k, stops, stop_fn, eos, generator))
    finally:
        model.train(was_training)
    out = Samples.concat(chunks, pad_id=tokenizer.pad_token_id)
    out.prompts = prompts
    out.prompt_index = torch.arange(len(prompts)).repeat_interleave(n)
    return out
