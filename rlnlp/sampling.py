"""The one batched sampler every system calls.

Chat prompts in; token ids, masks, texts and per-token log-probs out; stop strings or a stop
function; ``n`` samples per prompt. A plain KV-cached decoding loop, written out so its semantics
are exact (which token ended a completion, which log-prob belongs to which token). This is the
seam where a faster engine (static KV cache, CUDA graphs, vLLM) would go.

Precision: the sampler runs under ``rlnlp.runtime.autocast`` — bf16 matmuls on a CPU that has them (linear layers
from bf16 copies of the weights: frozen ones kept between calls, trainable ones cast anew by every call), fp32
elsewhere; log-softmax and the returned log-probs are fp32.
Its log-probs then differ from a re-scoring forward over the same tokens (``completion_logprobs``: the whole sequence
at once rather than one token at a time against a cache, so other roundings). Measured 2026-12-06 on SmolLM2-135M,
32 rows of ~24 sampled tokens: fp32 mean |Δ| 2.8e-6, max 2.1e-5 nats; bf16 mean 3.4e-2, max 0.22. An importance
ratio's π_old must therefore come from the training forward itself, never from these log-probs, in bf16.

Multi-turn rollouts pass a ``TurnCache``: each episode's keys stay cached between turns and a turn encodes only
what is new (``sample(..., turn_cache=cache, episode_ids=ids)``).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Sequence

import torch

from .models import position_ids_from_mask
from .runtime import autocast, precision

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


def _pick(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
          generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose one token per row; return (token (B,), log π_T(token) (B,)) with π_T = softmax(logits / T)."""
    if temperature <= 0:
        token = logits.argmax(-1)
        return token, torch.log_softmax(logits, -1).gather(-1, token[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / temperature if temperature != 1 else logits, dim=-1)  # (B, V)
    filtered = logp.clone() if (top_k > 0 or top_p < 1.0) else logp
    if top_k > 0:
        kth = torch.topk(filtered, min(top_k, filtered.shape[-1]), dim=-1).values[:, -1:]
        filtered[filtered < kth] = -float("inf")
    if top_p < 1.0:
        sorted_lp, order = torch.sort(filtered, descending=True, dim=-1)
        cum = sorted_lp.exp().cumsum(-1)
        drop = cum - sorted_lp.exp() > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_lp[drop] = -float("inf")
        filtered = torch.full_like(filtered, -float("inf")).scatter(-1, order, sorted_lp)
    # Inverse-CDF draw: one uniform per row (torch.multinomial draws an exponential per vocabulary entry:
    # 37 ms vs 4 ms per step at batch 32 on this CPU). The CDF is summed in float64 so that no token's
    # mass is lost to rounding; searchsorted(right=True) never lands on a zero-probability token.
    cdf = filtered.exp().double().cumsum(-1)  # (B, V), unnormalised
    u = torch.rand(cdf.shape[0], 1, generator=generator, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1:]
    token = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[-1] - 1)
    return token, logp.gather(-1, token[:, None]).squeeze(-1)


class _IncrementalText:
    """The decoded text of one growing completion, kept up to date by decoding only a few tokens per step.

    Offsets as in vLLM's detokenizer: ``text`` is the decode of ``ids[:read]``; each step decodes
    ``ids[prefix:]`` and ``ids[prefix:read]`` (a window of a few tokens, so a token that decodes
    differently in context — a leading space, the bytes of one character split across tokens — is
    decoded with its left neighbour) and appends the difference once it is a complete character.
    ``visible()`` is what a full ``decode(ids)`` returns (an unfinished character shows as U+FFFD).
    """

    __slots__ = ("ids", "text", "prefix", "read", "pending", "window")

    def __init__(self):
        self.ids: list[int] = []
        self.text, self.pending, self.window = "", "", ""
        self.prefix = self.read = 0

    def windows(self, token: int) -> tuple[list[int], list[int]]:
        self.ids.append(token)
        return self.ids[self.prefix : self.read], self.ids[self.prefix :]

    def advance(self, old: str, new: str) -> None:
        """Take the decodes of the two ``windows``; afterwards ``window`` is the text that may have changed."""
        if len(new) > len(old) and not new.endswith("\ufffd"):
            self.text += new[len(old) :]
            self.prefix, self.read, self.pending = self.read, len(self.ids), ""
        else:
            self.pending = new[len(old) :]
        self.window = new

    def visible(self) -> str:
        return self.text + self.pending if self.pending else self.text


def _cache_kw(model) -> str:
    """The keyword a model's forward takes its KV cache by: ``cache`` (transformers ≥ 5.2x; ``past_key_values``
    is deprecated there and goes away in 5.40) or ``past_key_values`` (older releases)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # through a peft wrapper
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _forward(model, kw: str, ids, mask, pos, cache):
    """One forward pass that returns (last-position logits (B, V) in fp32, the grown cache)."""
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **{kw: cache})
    return out.logits[:, -1, :].float(), (out.cache if kw == "cache" else out.past_key_values)


def _growing_cache(model, capacity: int):
    """An empty KV cache whose layers write into buffers preallocated for ``capacity`` positions, or None when the
    model has layers that do not keep every past key (sliding window, recurrent state): those keep transformers'
    own cache and the sampler skips the shared-prefix path for them."""
    from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

    layers = DynamicCache(config=model.config).layers
    if not layers or any(type(layer) is not DynamicLayer for layer in layers):
        return None
    layer = _growing_layer_class()
    return Cache(layers=[layer(capacity) for _ in layers])


def _kv_dtype(states: torch.Tensor) -> torch.dtype:
    """The dtype a cache stores keys and values in: under CPU bf16 autocast, bf16 — what attention casts them to at
    every decoding step anyway (RoPE leaves the keys in fp32): stored once in bf16, the cache is half the size and no
    step recasts it (same numbers). Otherwise the states' own dtype."""
    if states.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        return torch.get_autocast_dtype("cpu")
    return states.dtype


@lru_cache(maxsize=1)
def _growing_layer_class():
    """The layer class (built on first use: it subclasses transformers' DynamicLayer, imported lazily)."""
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        """transformers' DynamicLayer appends each step's keys with ``torch.cat``, copying the whole cache every
        step (measured: 36% of a decode step at batch 32 with 230 cached tokens on this CPU). This one writes into a
        buffer sized for prompt + completion and hands attention a view of the filled part."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity, self.length = capacity, 0

        def lazy_initialization(self, key_states, value_states) -> None:
            self.device = key_states.device
            B, H, _, _ = key_states.shape
            dtype = _kv_dtype(key_states)
            self.k_buf = key_states.new_empty(B, H, self.capacity, key_states.shape[-1], dtype=dtype)
            self.v_buf = value_states.new_empty(B, H, self.capacity, value_states.shape[-1], dtype=dtype)
            self.is_initialized = True

        def reserve(self, like: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
            """Fresh buffers shaped like ``like`` (B, H, ·, d) whose first ``n`` positions count as filled, for the
            caller to write in place (uninitialised until it does): returns the whole (B, H, capacity, d) buffers."""
            self.lazy_initialization(like, like)
            self.length = n
            self._views()
            return self.k_buf, self.v_buf

        def _views(self) -> None:
            self.keys, self.values = self.k_buf[:, :, : self.length], self.v_buf[:, :, : self.length]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self.k_buf.shape[2]:  # more than planned (never in the sampler): grow like a dynamic cache
                extra = end - self.k_buf.shape[2]
                grow = self.k_buf.new_empty(*self.k_buf.shape[:2], extra, self.k_buf.shape[3])
                self.k_buf = torch.cat([self.k_buf, grow], 2)
                grow = self.v_buf.new_empty(*self.v_buf.shape[:2], extra, self.v_buf.shape[3])
                self.v_buf = torch.cat([self.v_buf, grow], 2)
            self.k_buf[:, :, self.length : end] = key_states
            self.v_buf[:, :, self.length : end] = value_states
            self.length = end
            self._views()
            return self.keys, self.values

        def batch_select_indices(self, indices) -> None:
            if self.is_initialized:
                self.k_buf, self.v_buf = self.k_buf[indices], self.v_buf[indices]
                self._views()

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.is_initialized:
                self.k_buf = self.k_buf.repeat_interleave(repeats, dim=0)
                self.v_buf = self.v_buf.repeat_interleave(repeats, dim=0)
                self._views()

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError("crop takes a negative number of tokens to remove")
            self.length = max(0, self.length + tokens_to_remove)
            if self.is_initialized:
                self._views()

    return GrowingLayer


SHARED_KV_MODEL_TYPES = {"llama", "qwen2", "qwen3", "mistral", "phi3"}
"""Model types whose attention hands the cache's keys straight to the attention function (checked in their
transformers source): for these, decoding reads each prompt's keys once per distinct prompt (below); any
other model decodes from a per-row copy of the prompt's cache (same results, more memory traffic)."""
_SHARED_ATTENTION = "rlnlp_shared_prompt"


def _flat_rows(rows: torch.Tensor, heads: int, length: int, positions: torch.Tensor) -> torch.Tensor:
    """Indices into a (·, heads, length, d) tensor viewed as (· × heads × length, d): row ``rows``, every head, position
    ``positions`` (``rows`` and ``positions`` broadcast together): shape (heads, *their shape)."""
    h = torch.arange(heads, device=rows.device).view(-1, *([1] * max(rows.dim(), positions.dim())))
    return (rows * heads + h) * length + positions


class _SharedPromptCache:
    """The decode-time cache of one batch, three levels deep, so that nothing shared is stored twice:

        prefix     (1, Hk, L, d)   the shared prefix of every distinct prompt (L may be 0)
        suffix     (D, Hk, S, d)   the rest of each distinct prompt (left-padded: ``suffix_valid`` (D, S))
        generated  (B, Hk, G, d)   each row's own completion so far

    Rows are the samples; ``owner[b]`` is row b's distinct prompt. Attention for a decode step
    (``_shared_prompt_attention``) scores one query per row against all three levels and takes one
    softmax over the concatenation: exactly attention over the row's full key sequence, but the prefix
    and suffix keys are read once per call / per prompt instead of once per row (decoding at batch 32
    with ~200-token prompts is bound by reading the cache: ~30% of a step on this CPU).
    """

    def __init__(self, layers_prefix, layers_suffix, suffix_valid, owner, capacity: int):
        self.prefix = layers_prefix  # [(k, v)] per layer, or None
        self.suffix = layers_suffix  # [(k, v)] per layer
        self.suffix_valid = suffix_valid  # (D, S) bool
        self.capacity = capacity
        self.gen: list = [None] * len(layers_suffix)  # per layer: (keys, values) (B, Hk, capacity, d)
        self.filled = [0] * len(layers_suffix)  # completion tokens stored, per layer
        self.regroup(owner)

    # --- the part of transformers' Cache interface a decoder forward uses ---
    is_compileable = False

    @property
    def is_sliding(self):
        return [False] * len(self.suffix)

    is_linear = is_dummy = is_sliding

    def get_seq_length(self, layer_idx: int = 0) -> int:
        L = 0 if self.prefix is None else self.prefix[0][0].shape[2]
        return L + self.suffix[0][0].shape[2] + self.filled[layer_idx]

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.get_seq_length()

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        """Append one step's keys (B, Hk, 1, d); hand the attention function this cache and the layer index."""
        if self.gen[layer_idx] is None:
            B, H, _, d = key_states.shape
            dtype = _kv_dtype(key_states)
            self.gen[layer_idx] = (key_states.new_empty(B, H, self.capacity, d, dtype=dtype),
                                   value_states.new_empty(B, H, self.capacity, d, dtype=dtype))
        gk, gv = self.gen[layer_idx]
        t = self.filled[layer_idx]
        gk[:, :, t : t + 1] = key_states
        gv[:, :, t : t + 1] = value_states
        self.filled[layer_idx] = t + 1
        return (self, layer_idx), (self, layer_idx)

    # --- bookkeeping ---
    def regroup(self, owner: torch.Tensor) -> None:
        """Row b belongs to distinct prompt owner[b]: build the (D, c) grid that stacks each prompt's rows."""
        D = self.suffix[0][0].shape[0]
        counts = torch.bincount(owner, minlength=D)
        self.c = int(counts.max())
        first = torch.cumsum(counts, 0) - counts
        # rank of each row among its prompt's rows; the rows of a prompt need not be consecutive (a prompt that
        # appears twice in the call, [A, B, A], gives owner [0, 0, 1, 1, 0, 0])
        order = torch.sort(owner, stable=True).indices
        rank = torch.empty_like(owner)
        rank[order] = torch.arange(len(owner), device=owner.device) - first[owner[order]]
        self.owner, self.cell = owner, owner * self.c + rank  # (B,): each row's cell in the (D·c) grid
        self._cells = D * self.c
        # one row per prompt, in order (n = 1, or a turn cache's rows): row b reads suffix b, no grid needed
        self.direct = self.c == 1 and D == len(owner) and bool((owner == torch.arange(D, device=owner.device)).all())

    def batch_select_indices(self, keep: torch.Tensor) -> None:
        """Keep only rows ``keep`` (finished rows leave the batch); prompts left without rows are dropped."""
        owner = self.owner[keep]
        used, owner = torch.unique(owner, return_inverse=True)
        if len(used) < self.suffix[0][0].shape[0]:
            self.suffix = [(k[used], v[used]) for k, v in self.suffix]
            self.suffix_valid = self.suffix_valid[used]
        self.gen = [None if g is None else (g[0][keep], g[1][keep]) for g in self.gen]
        self.regroup(owner)

    def rows_kv(self, lines: list[int], positions: list[torch.Tensor]) -> list:
        """The keys and values of rows ``lines`` at ``positions[j]`` of row ``lines[j]``'s sequence [prefix | suffix |
        completion so far], gathered for all the rows in one call per layer (not one per row and layer): per layer
        ``(K, V)`` of shape (len(lines), Hk, W, d), row j's keys in ``K[j, :, :len(positions[j])]`` (beyond: filler,
        never read)."""
        sel = torch.as_tensor(lines, device=self.owner.device)
        W = max(len(p) for p in positions)
        index = torch.zeros(len(lines), W, dtype=torch.long, device=sel.device)
        for j, p in enumerate(positions):
            index[j, : len(p)] = p
        out = []
        for i, (sk, sv) in enumerate(self.suffix):
            kv = []
            for j, part in enumerate((sk, sv)):
                parts = [part[self.owner[sel]]]
                if self.prefix is not None:
                    pre = self.prefix[i][j]
                    parts.insert(0, pre.expand(len(lines), *pre.shape[1:]))
                if self.gen[i] is not None:
                    parts.append(self.gen[i][j][sel, :, : self.filled[i]])
                full = torch.cat(parts, 2)  # (n, Hk, T, d)
                n, H, T, d = full.shape
                rows = _flat_rows(torch.arange(n, device=sel.device)[:, None], H, T, index).transpose(0, 1)
                kv.append(full.view(n * H * T, d).index_select(0, rows.flatten()).view(n, H, W, d))
            out.append(tuple(kv))
        return out


def _shared_prompt_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of one new token per row over [prefix | its prompt's suffix | its own completion] (see
    ``_SharedPromptCache``); ``key`` is ``(cache, layer_idx)``. Returns (B, 1, H, d) like transformers' sdpa."""
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None or query.shape[2] != 1:
        raise RuntimeError("shared-prompt attention serves one-token decode steps of full-attention layers only")
    cache, i = key
    B, H, _, d = query.shape
    sk, sv = cache.suffix[i]  # (D, Hk, S, d)
    D, Hk, S, _ = sk.shape
    g, c, t = H // Hk, cache.c, cache.filled[i]
    scale = scaling if scaling is not None else d ** -0.5
    q = query.reshape(B, Hk, g, d).to(sk.dtype)  # heads h = j·g … j·g+g−1 share key head j
    if cache.direct:  # row b's suffix is suffix b
        scores = [q @ sk.transpose(-1, -2)]  # (B, Hk, g, S)
        masks = [cache.suffix_valid[:, None, None, :]]
    else:  # the (D, c) grid of rows per prompt, padded with zero queries: (D, Hk, c·g, d)
        grid = q.new_zeros(cache._cells, Hk, g, d).index_copy_(0, cache.cell, q)
        grid = grid.view(D, c, Hk, g, d).transpose(1, 2).reshape(D, Hk, c * g, d)
        scores = [(grid @ sk.transpose(-1, -2)).view(D, Hk, c, g, S).transpose(1, 2).reshape(D * c, Hk, g, S)
                  [cache.cell]]
        masks = [cache.suffix_valid[cache.owner][:, None, None, :]]  # (B, 1, 1, S)
    if cache.prefix is not None:
        pk, pv = cache.prefix[i]  # (1, Hk, L, d)
        L = pk.shape[2]
        flat = q.transpose(0, 1).reshape(1, Hk, B * g, d)
        scores.insert(0, (flat @ pk.transpose(-1, -2)).view(Hk, B, g, L).transpose(0, 1))
        masks.insert(0, None)
    gk, gv = cache.gen[i]
    scores.append(q @ gk[:, :, :t].transpose(-1, -2))  # (B, Hk, g, t)
    masks.append(None)
    logits = torch.cat([s if m is None else s.masked_fill(~m, float("-inf")) for s, m in zip(scores, masks)], -1)
    probs = torch.softmax(logits.float() * scale, -1).to(q.dtype)  # (B, Hk, g, L+S+t)
    parts = list(torch.split(probs, [s.shape[-1] for s in scores], -1))
    out = parts[-1] @ gv[:, :, :t]  # (B, Hk, g, d)
    if cache.direct:
        out = out + parts[-2] @ sv
    else:
        ps = q.new_zeros(cache._cells, Hk, g, S).index_copy_(0, cache.cell, parts[-2])
        ps = ps.view(D, c, Hk, g, S).transpose(1, 2).reshape(D, Hk, c * g, S)
        out = out + (ps @ sv).view(D, Hk, c, g, d).transpose(1, 2).reshape(D * c, Hk, g, d)[cache.cell]
    if cache.prefix is not None:
        pp = parts[0].transpose(0, 1).reshape(1, Hk, B * g, L)
        out = out + (pp @ pv).view(Hk, B, g, d).transpose(0, 1)
    return out.reshape(B, 1, H, d), None


def _grouped_prefill_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention of a turn's new tokens (``_Turns.prefill``) over the keys of their rows: each key head scores the
    queries of its g query heads in one matmul, so keys and values are read once per key head, never copied g times
    (transformers' sdpa path repeats them, ``repeat_kv``, whenever a mask is given), and the scores stay in the
    matmul's dtype (bf16 under autocast; the softmax accumulates in fp32 either way) with the scale folded into the
    queries. ``attention_mask`` is the (B, 1, U, T) bool mask ``_Turns.prefill`` builds. Returns (B, U, H, d) like
    transformers' sdpa. Measured 2026-12-07 (2-core AMD EPYC, bf16, 64 rows × 27 new tokens over 295 keys, best of
    20 calls): 9.6 ms a layer vs 16.9 for transformers' sdpa (13.1 with torch's own grouped-query sdpa); mean |Δ|
    3.2e-4 from the sdpa output, as the bf16 rounding of the scores allows."""
    if kwargs.get("sliding_window") is not None or kwargs.get("softcap") is not None or dropout:
        raise RuntimeError("grouped prefill attention serves full-attention layers without dropout only")
    B, H, U, d = query.shape
    Hk, T = key.shape[1], key.shape[2]
    g = H // Hk
    scale = scaling if scaling is not None else d ** -0.5
    scores = ((query * scale).reshape(B, Hk, g * U, d) @ key.transpose(-1, -2)).view(B, Hk, g, U, T)
    # a finite floor, not -inf: a padding query that sees no key gets finite, never-read outputs instead of NaN
    scores.masked_fill_(~attention_mask[:, :, None], torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, -1).view(B, Hk, g * U, T)
    return (probs @ value).view(B, H, U, d).transpose(1, 2).contiguous(), None


_GROUPED_PREFILL = "rlnlp_grouped_prefill"


LEAN_DECODE = True
"""Decoding steps of Llama-family models go through ``_lean_decode_step``; False: through the model's forward."""
LEAN_DECODE_MODEL_TYPES = {"llama"}
"""Model types whose decoding steps (one token per row, the shared-prompt cache) run through ``_lean_decode_step``:
the same operations as transformers' Llama forward in the same order, without its per-call machinery."""


def _lean_decoder(model):
    """(embedding, rotary embedding, decoder layers, final norm, LM head, transformers' ``apply_rotary_pos_emb`` for
    these layers) of a Llama-family model whose layers all have Llama's layout, or None (then decoding steps go
    through the model's own forward)."""
    import sys

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # through a peft wrapper
    inner = getattr(base, "model", None)
    if getattr(base.config, "model_type", None) not in LEAN_DECODE_MODEL_TYPES or inner is None:
        return None
    layers = list(inner.layers[: base.config.num_hidden_layers])
    rope = getattr(sys.modules.get(type(layers[0].self_attn).__module__), "apply_rotary_pos_emb", None)
    parts = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj", "mlp.act_fn", "input_layernorm", "post_attention_layernorm")
    for layer in layers:
        for path in parts:
            obj = layer
            for name in path.split("."):
                obj = getattr(obj, name, None)
            if obj is None:
                return None
    return (inner.embed_tokens, inner.rotary_emb, layers, inner.norm, base.lm_head, rope) if rope else None


def _lean_decode_step(parts, ids: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
    """One decoding step (``ids``, ``pos``: (B, 1)) of a Llama-family model (``_lean_decoder``) against a
    ``_SharedPromptCache``: last-position logits (B, V) in fp32. The same operations in the same order as the model's
    forward, from its own modules and rotary function (the same numbers), but the modules' forwards are called
    directly: no hooks, keyword plumbing, attention mask (the shared-prompt attention reads its own) or output objects.
    Measured 2026-12-07 (2-core AMD EPYC, bf16, best of three interleaved): the decode-bound sampler case 404 → 430
    tok/s, 8 turns of ``bench turns`` 30.4 → 25.6 s. A transformers release that changes how Llama's layer combines
    them breaks the bit-for-bit test against the model's forward (``tests/test_sampling.py``), not the samples
    silently."""
    embed, rotary, layers, norm, head, rope = parts
    x = embed.forward(ids)
    cos, sin = rotary(x, position_ids=pos)
    B, T, _ = x.shape
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        h = layer.input_layernorm.forward(x)
        shape = (B, T, -1, attn.head_dim)
        q = attn.q_proj.forward(h).view(shape).transpose(1, 2)
        k = attn.k_proj.forward(h).view(shape).transpose(1, 2)
        v = attn.v_proj.forward(h).view(shape).transpose(1, 2)
        q, k = rope(q, k, cos, sin)
        k, v = cache.update(k, v, attn.layer_idx)
        out, _ = _shared_prompt_attention(attn, q, k, v, None, scaling=attn.scaling)
        x = x + attn.o_proj.forward(out.reshape(B, T, -1).contiguous())
        h = layer.post_attention_layernorm.forward(x)
        x = x + mlp.down_proj.forward(mlp.act_fn(mlp.gate_proj.forward(h)) * mlp.up_proj.forward(h))
    return head.forward(norm.forward(x)[:, -1:, :])[:, -1, :].float()


def _uses_shared_kv(model) -> bool:
    cfg = model.config
    if getattr(cfg, "model_type", None) not in SHARED_KV_MODEL_TYPES or cfg.sub_configs:
        return False
    if getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    from transformers import AttentionInterface

    AttentionInterface.register(_SHARED_ATTENTION, _shared_prompt_attention)
    AttentionInterface.register(_GROUPED_PREFILL, _grouped_prefill_attention)
    return True


SMALL_BATCH_ROWS = 64
"""On a CPU in fp32, a linear layer applied to one token in each of at most this many rows (a decoding step, and the LM
head on the prompts' last positions) computes ``(W @ xᵀ)ᵀ`` instead of ``x @ Wᵀ``: MKL's kernel for a few rows
against the transposed weight runs far below the memory bandwidth (measured 2026-12-03 on a 2-core AMD EPYC, fp32,
3 rows: the 49152 × 576 LM head 39 ms vs 17 ms, the 1536 × 576 MLP projection 0.83 vs 0.44 ms; ``(W @ xᵀ)ᵀ`` was as
fast or faster in all but 2 of the 36 shapes × row counts tried from 1 to 64 rows, and those within 0.1 ms).
Same products, summed in another order (≤ 1e-6 apart). 0 turns it off."""


SKIP_PADDING = 0.9
"""A prefill whose real tokens fill at most this fraction of its (rows × positions) runs the linear layers on the real
tokens only (``_real_tokens``): the padding of a batch of prompts of different lengths — a multi-turn rollout's new
tokens, 13 on average in a batch padded to 20–23 — costs no matmuls. 0 turns it off."""
_REAL: list = [None]  # during such a prefill: ((rows, positions), the flat indices of the real tokens)


@contextlib.contextmanager
def _real_tokens(mask: torch.Tensor):
    """For the forward pass inside the block, the linear layers (``_fast_linears``) compute only the positions where
    ``mask`` (rows, positions) is 1 and give 0 at the others. The padding's outputs are never read — its keys are
    masked out and its logits dropped — and a row's product does not depend on the other rows (the same numbers:
    checked bit for bit in bf16 and fp32 at 1280 vs 840 rows)."""
    real = int(mask.sum())
    if real > SKIP_PADDING * mask.numel() or mask.dim() != 2:
        yield
        return
    _REAL[0] = (tuple(mask.shape), mask.reshape(-1).nonzero().flatten())
    try:
        yield
    finally:
        _REAL[0] = None


def _real_rows(x: torch.Tensor) -> torch.Tensor | None:
    """The flat indices of ``x``'s real tokens when ``x`` is a hidden state of the prefill under ``_real_tokens``."""
    real = _REAL[0]
    return real[1] if real is not None and tuple(x.shape[:-1]) == real[0] else None


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The real tokens of a prefill's hidden state ``x`` (rows, positions, features): (real tokens, features)."""
    return x.reshape(-1, x.shape[-1]).index_select(0, index)


def _scatter_rows(y: torch.Tensor, index: torch.Tensor, shape: tuple) -> torch.Tensor:
    """The outputs ``y`` (real tokens, out) of a linear layer laid back out at ``shape + (out,)``, 0 at the padding."""
    out = y.new_zeros(shape[0] * shape[1], y.shape[-1]).index_copy_(0, index, y)
    return out.view(*shape, y.shape[-1])


def _small_batch_linear(self, x):
    index = _real_rows(x)
    if index is not None:  # a prefill with padding: the real tokens only
        y = torch.nn.functional.linear(_gather_rows(x, index), self.weight, self.bias)
        return _scatter_rows(y, index, tuple(x.shape[:-1]))
    rows = x.numel() // x.shape[-1] if x.dim() >= 2 else 0
    if rows == 0 or rows > SMALL_BATCH_ROWS or x.shape[-2] != 1:  # decoding steps only: one new token per row
        return torch.nn.functional.linear(x, self.weight, self.bias)
    out = torch.matmul(self.weight, x.reshape(rows, x.shape[-1]).T).T
    if self.bias is not None:
        out = out + self.bias
    return out.reshape(*x.shape[:-1], self.weight.shape[0])


PACK_WEIGHTS = True
"""Under bf16 on a CPU, the sampler's linear layers read weights packed once for oneDNN (``_pack_weight``) where this
torch build can; False keeps plain bf16 copies and ``F.linear``."""


def _bf16_copy(module: torch.nn.Module, name: str, fresh: dict, packed: bool = False) -> torch.Tensor | None:
    """A bf16 copy of ``module``'s fp32 parameter ``name`` (with ``packed``, in oneDNN's blocked layout:
    ``_pack_weight``). ``torch.autocast`` casts a weight on every call unless it requires grad, and then only within
    one ``with`` block: recasting the 135M-parameter policy for every decoding step cost ~10% of a step here. A weight
    that requires grad is cast once per ``sample`` call (``fresh``, that call's memo): an optimizer may change it in
    place without a trace — fused AdamW (transformers' Trainer's default, so TRL's) does not bump a tensor's version
    counter. A frozen weight's copy is kept on the module until the weight is replaced or written in place (a load
    bumps its version)."""
    weight = getattr(module, name)
    if weight is None:
        return None
    if weight.requires_grad:
        hit = fresh.get((id(weight), packed))
        if hit is None:
            hit = fresh[(id(weight), packed)] = _bf16_weight(weight, packed)
        return hit
    key = (weight.data_ptr(), weight._version)
    slot = f"_bf16_{name}" + ("_packed" if packed else "")
    hit = module.__dict__.get(slot)
    if hit is None or hit[0] != key:
        hit = (key, _bf16_weight(weight, packed))
        module.__dict__[slot] = hit
    return hit[1]


def _bf16_weight(weight: torch.Tensor, packed: bool) -> torch.Tensor:
    return _pack_weight(weight) if packed else weight.detach().to(torch.bfloat16)


def _pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` (out, in) as bf16 in oneDNN's blocked layout. ``F.linear`` on a plain bf16 weight reorders it into
    that layout on every call; packed once, a decoding step's matmuls run faster (measured 2026-12-07 on a 2-core AMD
    EPYC, bf16, 32 rows: the 49152 × 576 LM head 8.9 → 5.4 ms, the 1536 × 576 MLP projection 0.18 → 0.15 ms; at 400
    rows 3–8% faster) with the same numbers (the same kernel after the reorder: bit-identical outputs)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().to(torch.bfloat16), SMALL_BATCH_ROWS)


@lru_cache(maxsize=1)
def _can_pack() -> bool:
    """Whether this torch build packs bf16 linear weights for oneDNN (``_pack_weight``) and computes with them
    exactly as ``F.linear`` does (checked once on a small product)."""
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        # small integers (exact in bf16), not random draws: a check must not move the global random stream
        w, x, b = ((torch.arange(n).reshape(shape) % 7 - 3).to(torch.bfloat16) for n, shape in
                   ((384, (24, 16)), (48, (3, 16)), (24, (24,))))
        out = torch.ops.mkldnn._linear_pointwise(x, _pack_weight(w), b, "none", [], "")
        return bool(torch.equal(out, torch.nn.functional.linear(x, w, b)))
    except (AttributeError, RuntimeError):
        return False


def _bf16_linear(self, fresh: dict, x):
    """``nn.Linear`` as ``torch.autocast`` computes it on a CPU (bf16 input, bf16 weight, bf16 out), from a bf16
    weight (``_bf16_copy``), packed for oneDNN where the build can (``_pack_weight``). In bf16 the ``(W @ xᵀ)ᵀ``
    trick is no faster (measured 2026-12-06, same CPU, 1–64 rows: either way round within noise for the MLP shapes,
    ``F.linear`` faster at ≤ 16 rows for the LM head). An input that several layers read in turn is cast once (the
    query, key and value projections, the gate and up projections, a LoRA adapter and its base layer); under
    ``_real_tokens`` only its real tokens are."""
    index = _real_rows(x)  # a prefill with padding: the real tokens only
    last = fresh.get("input")
    if last is not None and last[0] is x and last[1] == x._version:
        xb = last[2]
    else:
        xb = (x if index is None else _gather_rows(x, index)).to(torch.bfloat16)
        fresh["input"] = (x, x._version, xb)  # holding x keeps its identity from passing to a new tensor
    bias = _bf16_copy(self, "bias", fresh)
    if PACK_WEIGHTS and _can_pack():
        y = torch.ops.mkldnn._linear_pointwise(xb, _bf16_copy(self, "weight", fresh, packed=True), bias, "none", [],
                                               "")
    else:
        y = torch.nn.functional.linear(xb, _bf16_copy(self, "weight", fresh), bias)
    return y if index is None else _scatter_rows(y, index, tuple(x.shape[:-1]))


@contextlib.contextmanager
def _fast_linears(model, bf16: bool):
    """Route the model's fp32 ``nn.Linear`` layers on a CPU through ``_bf16_linear`` (under bf16) or
    ``_small_batch_linear`` (fp32) for a ``with`` block (sampling only; training forwards keep ``F.linear``)."""
    patched = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight.device.type == "cpu"
               and m.weight.dtype == torch.float32 and "forward" not in m.__dict__]
    fresh: dict = {}  # this block's bf16 copies of the weights that require grad
    for m in patched:
        m.forward = functools.partial(_bf16_linear, m, fresh) if bf16 else _small_batch_linear.__get__(m)
    try:
        yield
    finally:
        for m in patched:
            m.__dict__.pop("forward", None)


class _attention_implementation:
    """Switch a model's attention function for the duration of a ``with`` block (decode steps only)."""

    def __init__(self, model, name: str):
        self.config, self.name = model.config, name

    def __enter__(self):
        self.old = self.config._attn_implementation
        self.config._attn_implementation = self.name

    def __exit__(self, *exc):
        self.config._attn_implementation = self.old


def _left_pad(seqs: Sequence[Sequence[int]], pad: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists → left-padded ids (B, T) and mask (B, T)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    mask = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s) :] = torch.as_tensor(s, dtype=torch.long)
            mask[i, T - len(s) :] = 1
    return ids.to(dev), mask.to(dev)


def _prefill(model, kw, prompt_ids, rows, prefix, max_new_tokens, shared_kv, pad, dev):
    """Encode the distinct prompts of a batch (``_sample_batch``): the last position's logits per row, the cache, the
    attention mask and the positions of the suffix tokens per row, and whether decoding uses the shared-KV cache."""
    position = {r: i for i, r in enumerate(dict.fromkeys(rows))}  # the distinct prompts of this batch, in order
    distinct = list(position)
    local = torch.as_tensor([position[r] for r in rows], device=dev)  # row -> distinct prompt
    prefix_kv, L = prefix
    sfx_ids, sfx_mask = _left_pad([prompt_ids[d][L:] for d in distinct], pad, dev)  # (D, S)
    S = sfx_ids.shape[1]
    cache = _growing_cache(model, L + S + (0 if shared_kv else max_new_tokens))  # None: the model's own cache
    shared = shared_kv and cache is not None
    attn = sfx_mask
    if L:  # every distinct prompt starts from a copy of the prefix's keys and values
        for layer, (k, v) in zip(cache.layers, prefix_kv):  # k, v: (1, H, L, d)
            layer.update(k.expand(len(distinct), -1, -1, -1), v.expand(len(distinct), -1, -1, -1))
        attn = torch.cat([torch.ones(len(distinct), L, dtype=attn.dtype, device=dev), attn], dim=1)  # (D, L+S)
    pos = position_ids_from_mask(attn)[:, -S:]  # (D, S): positions of the suffix tokens
    with _real_tokens(sfx_mask):
        logits, cache = _forward(model, kw, sfx_ids, attn, pos, cache)
    if shared:  # decode from [prefix | each prompt's suffix | each row's completion], nothing stored twice
        suffix = [(layer.keys[:, :, L:].contiguous(), layer.values[:, :, L:].contiguous()) for layer in cache.layers]
        cache = _SharedPromptCache(prefix_kv if L else None, suffix, sfx_mask.bool(), local, max_new_tokens)
        logits, attn, pos = logits[local], attn[local], pos[local]
    elif len(distinct) < len(rows) or distinct != rows:  # the n samples of a prompt share its prefill
        cache.batch_select_indices(local)
        logits, attn, pos = logits[local], attn[local], pos[local]
    return logits, cache, attn, pos, shared


@torch.no_grad()
def _sample_batch(model, tokenizer, kw, prompt_ids, rows, prefix, max_new_tokens, temperature, top_p, top_k,
                  stops, stop_fn, eos, generator, shared_kv: bool, turns: _Turns | None = None):
    """Sample one completion per entry of ``rows`` (indices into ``prompt_ids``, the distinct prompts' token ids).

    Prefill: each distinct prompt of the batch once, as ``[shared prefix][left padding][suffix]`` —
    the prefix's keys and values ``prefix = (kv, L)`` (computed once per call, batch 1) are copied to every
    distinct prompt and only the suffixes are encoded, with the padding a hole in the attention mask
    and positions counted over real tokens (``position_ids_from_mask``), so every token sits where a
    plain left-padded pass puts it. The cache is then expanded to the rows (the n samples of a
    prompt share its prefill). Decoding drops finished rows from the batch once a quarter of it
    has finished. With ``turns`` (a turn cache) every row is its own prompt and starts from its episode's
    cached keys instead (``_Turns.prefill``); each row's keys go back to the turn cache when it leaves.
    """
    dev = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    if turns is not None:
        logits, cache, attn, pos, shared = turns.prefill(model, kw, prompt_ids, rows, prefix, max_new_tokens,
                                                         shared_kv, pad, dev)
    else:
        logits, cache, attn, pos, shared = _prefill(model, kw, prompt_ids, rows, prefix, max_new_tokens, shared_kv,
                                                    pad, dev)
    pos = pos[:, -1:]
    decode = _attention_implementation(model, _SHARED_ATTENTION) if shared else contextlib.nullcontext()
    lean = _lean_decoder(model) if shared and LEAN_DECODE else None

    B = len(rows)
    out_tokens = torch.full((B, max_new_tokens), pad, dtype=torch.long, device=dev)
    out_logp = torch.zeros(B, max_new_tokens, device=dev)
    length = torch.full((B,), max_new_tokens, dtype=torch.long)
    stopped = [False] * B
    eos_ids = torch.as_tensor(sorted(eos), dtype=torch.long, device=dev)
    texts = [_IncrementalText() for _ in range(B)] if (stops or stop_fn) else None
    longest_stop = max((len(s) for s in stops), default=0)
    here = torch.arange(B, device=dev)  # the row each line of the compute batch belongs to
    live = torch.ones(B, dtype=torch.bool, device=dev)  # which lines still generate
    for t in range(max_new_tokens):
        token, logp = _pick(logits, temperature, top_p, top_k, generator)  # (B_here,)
        token = torch.where(live, token, torch.full_like(token, pad))
        out_tokens[here[live], t] = token[live]
        out_logp[here[live], t] = logp[live]
        done = live & torch.isin(token, eos_ids)
        if texts is not None:
            lines = (live & ~done).nonzero().flatten().tolist()
            rows_now, toks = here[lines].tolist(), token[lines].tolist()
            wins = [texts[r].windows(k) for r, k in zip(rows_now, toks)]
            decoded = tokenizer.batch_decode([w for pair in wins for w in pair], skip_special_tokens=True)
            for j, (line, r) in enumerate(zip(lines, rows_now)):
                state = texts[r]
                state.advance(decoded[2 * j], decoded[2 * j + 1])
                text = state.visible()
                tail = text[-(len(state.window) + longest_stop) :]  # a new occurrence ends in what just changed
                if any(s in tail for s in stops) or (stop_fn is not None and bool(stop_fn(text))):
                    done[line] = True
        if done.any():
            for line in done.nonzero().flatten().tolist():
                r = int(here[line])
                length[r], stopped[r] = t + 1, True
            live &= ~done
        if t + 1 == max_new_tokens or not live.any():
            break
        if int(live.sum()) <= 0.75 * len(here):  # drop finished rows: one copy of the cache, then cheaper steps
            keep = live.nonzero().flatten()
            if turns is not None:  # their keys go to the turn cache first
                turns.store([(line, int(here[line])) for line in (~live).nonzero().flatten().tolist()], rows,
                            prompt_ids, out_tokens, length, cache, attn)
            cache.batch_select_indices(keep)
            here, live, token, attn, pos = here[keep], live[keep], token[keep], attn[keep], pos[keep]
        attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
        pos = pos + 1
        if lean is not None:
            logits = _lean_decode_step(lean, token[:, None], pos, cache)
        else:
            with decode:
                logits, cache = _forward(model, kw, token[:, None], attn, pos, cache)
    if turns is not None:
        turns.store([(line, int(r)) for line, r in enumerate(here.tolist())], rows, prompt_ids, out_tokens, length,
                    cache, attn)
    C = int(length.max())
    cmask = (torch.arange(C)[None, :] < length[:, None]).long().to(dev)
    ctoks = torch.where(cmask.bool(), out_tokens[:, :C], torch.full_like(out_tokens[:, :C], pad))
    texts_out = tokenizer.batch_decode([ctoks[i, : int(length[i])] for i in range(B)], skip_special_tokens=True)
    p_ids, p_mask = _left_pad([prompt_ids[r] for r in rows], pad, dev)
    return Samples(prompts=[], prompt_texts=[], prompt_index=torch.zeros(B, dtype=torch.long), prompt_ids=p_ids,
                   prompt_mask=p_mask, completion_ids=ctoks, completion_mask=cmask, logprobs=out_logp[:, :C] * cmask,
                   texts=texts_out, stopped=stopped)


@dataclass
class _Episode:
    ids: list[int]  # the tokens whose keys and values are kept: the last prompt and its completion but the last token
    batch: list  # per layer (K, V), (rows, Hk, ≥ len(ids), d): the keys of the rows stored with this one
    row: int  # this episode's row of ``batch``
    base: list | None = None  # per layer (k, v) (1, Hk, P, d): a copy all rows of its batch shared (its first P keys)


class TurnCache:
    """Each episode's keys and values from one turn of a multi-turn rollout to the next.

    Pass one to ``sample(..., turn_cache=cache, episode_ids=[...])``: row i continues episode ``episode_ids[i]``.
    The sampler compares the row's prompt token ids with the episode's cached ids (its previous prompt and
    completion), reuses the keys of the longest common prefix, prefills only the rest (the environment's reply and
    the next turn's opening), and stores the row's keys back after decoding. Matching token ids makes the reuse exact
    whatever the prompt template does; a prompt that shares nothing with the cache is simply prefilled in full.
    ``release(episode_ids)`` frees finished episodes (a long rollout should: each cached token of SmolLM2 holds 46 KB
    of keys and values in fp32, 23 KB in bf16). The rows that leave a decoding batch together are stored in one
    tensor per layer, freed once the last of them is released or has been stored again by its next turn.

    ``reused_tokens`` / ``prefilled_tokens`` count the prompt tokens taken from the cache / encoded, over all calls.
    """

    def __init__(self):
        self.episodes: dict = {}
        self.reused_tokens = self.prefilled_tokens = 0

    def __len__(self) -> int:
        return len(self.episodes)

    def __contains__(self, episode_id) -> bool:
        return episode_id in self.episodes

    def cached_tokens(self, episode_id) -> list[int]:
        """The token ids whose keys the cache holds for ``episode_id`` (empty when none)."""
        entry = self.episodes.get(episode_id)
        return list(entry.ids) if entry is not None else []

    def release(self, episode_ids) -> None:
        """Forget these episodes (ids not in the cache are ignored)."""
        for e in episode_ids:
            self.episodes.pop(e, None)


class _Turns:
    """One ``sample`` call's view of a ``TurnCache``: row r of the call continues episode ``episodes[r]``."""

    def __init__(self, cache: TurnCache, episodes: list, prompt_ids: Sequence[Sequence[int]]):
        self.cache, self.episodes = cache, episodes
        # the cached prefix each row can take: at least one prompt token is left to encode (its logits start decoding)
        self.reuse = []
        for e, ids in zip(episodes, prompt_ids):
            entry = cache.episodes.get(e)
            self.reuse.append(min(shared_prefix_length(entry.ids, ids), len(ids) - 1) if entry is not None else 0)

    def prefill(self, model, kw, prompt_ids, rows, prefix, max_new_tokens, shared_kv, pad, dev):
        """Lay each row out as ``[shared keys][left padding][reused keys][left padding][new tokens]`` and encode the
        new tokens.

        A row's reused keys are its episode's cached prefix, or the call's shared prefix when that is longer (a first
        turn). Positions count real tokens only (``position_ids_from_mask``), so each token sits where a plain pass
        over the whole conversation puts it. Returns what ``_prefill`` returns. With ``shared_kv`` the prompt's keys
        are kept apart from the completion's (a ``_SharedPromptCache`` of one row per prompt): a decoding step then
        reads the long, fixed part as one contiguous block (bf16 matmuls against a view into a larger buffer copy
        it first: 1.25 vs 0.24 ms per layer for the scores at batch 64, 300 positions; 2026-12-07, 2-core AMD
        EPYC), and the leading keys that every row holds bit for bit (``_shared_start``: the chat template's system
        block and a game's rules) are read once per step for all rows instead of once per row."""
        prefix_kv, L = prefix
        # per row: (reused length k, per-layer (K, V) (rows, Hk, ≥ k, d) holding its keys or None, its row of them,
        # the shared copy its first keys came from or None)
        starts = []
        for r in rows:
            k = self.reuse[r]
            entry = self.cache.episodes.get(self.episodes[r])
            if entry is not None and k >= max(L, 1):
                starts.append((k, entry.batch, entry.row, entry.base))
                self.cache.reused_tokens += k
            elif L:
                starts.append((L, prefix_kv, 0, prefix_kv))
            else:
                starts.append((0, None, 0, None))
        P, base = self._shared_start(rows, prompt_ids, starts) if shared_kv and SHARE_TURN_PREFIX else (0, None)
        S0 = max(k for k, *_ in starts) - P
        sfx_ids, sfx_mask = _left_pad([prompt_ids[r][k:] for r, (k, *_) in zip(rows, starts)], pad, dev)  # (B, U)
        self.cache.prefilled_tokens += int(sfx_mask.sum())
        B, U = sfx_ids.shape
        cache = _growing_cache(model, P + S0 + U + (0 if shared_kv else max_new_tokens))
        start_mask = torch.zeros(B, S0, dtype=sfx_mask.dtype, device=dev)
        for b, (k, *_) in enumerate(starts):
            start_mask[b, S0 - (k - P) :] = 1
        if P or S0:  # each layer's buffers: [shared keys][zeros][the row's own reused keys], written in place
            like = base if P else next(keys for k, keys, _, _ in starts if k)
            bufs = [layer.reserve(like[i][0][:1].expand(B, -1, -1, -1), P + S0) for i, layer in enumerate(cache.layers)]
            if P:
                for (kb, vb), (k, v) in zip(bufs, base):
                    kb[:, :, :P], vb[:, :, :P] = k[:, :, :P], v[:, :, :P]
            if S0:
                for kb, vb in bufs:
                    kb[:, :, P : P + S0].zero_(), vb[:, :, P : P + S0].zero_()
                self._copy_reused(bufs, starts, P, S0)
        attn = torch.cat([torch.ones(B, P, dtype=sfx_mask.dtype, device=dev), start_mask, sfx_mask], dim=1)
        pos = position_ids_from_mask(attn)[:, -U:]
        mask, grouped = attn, contextlib.nullcontext()
        if shared_kv and GROUPED_TURN_PREFILL:  # (B, 1, U, T): a new token sees the row's real keys up to itself
            T = attn.shape[1]
            causal = torch.arange(T, device=dev)[None, :] <= torch.arange(T - U, T, device=dev)[:, None]  # (U, T)
            mask = (attn.bool()[:, None, :] & causal[None])[:, None]
            grouped = _attention_implementation(model, _GROUPED_PREFILL)
        with _real_tokens(sfx_mask), grouped:
            logits, cache = _forward(model, kw, sfx_ids, mask, pos, cache)
        if shared_kv:  # the growing buffers hold exactly the prompt
            if P:
                whole = base[0][0].shape[2] == P and base[0][0].is_contiguous()  # else one exact-size copy
                shared = base if whole else [(k[:, :, :P].contiguous(), v[:, :, :P].contiguous()) for k, v in base]
                rest = [(layer.keys[:, :, P:].contiguous(), layer.values[:, :, P:].contiguous())
                        for layer in cache.layers]
            else:  # every layer's keys are one contiguous block
                shared, rest = None, [(layer.keys, layer.values) for layer in cache.layers]
            cache = _SharedPromptCache(shared, rest, attn[:, P:].bool(), torch.arange(B, device=dev),
                                       max_new_tokens)
        return logits, cache, attn, pos, shared_kv

    @staticmethod
    def _copy_reused(bufs, starts, P: int, S0: int) -> None:
        """Write each row's reused keys after the shared ones, ``[P, k)``, right-aligned in positions ``[P, P + S0)`` of
        the layers' buffers ``bufs`` (per layer (K, V) (B, Hk, capacity, d)). The rows stored together by a previous
        turn (one ``batch``) are copied with one indexed copy per layer: a copy per row and layer took ~1.4 s of the
        64-episode × 10-turn benchmark's ~30 s (2026-12-07, 2-core AMD EPYC, bf16)."""
        groups: dict = {}  # id(keys) -> (keys, [(row of this call, row of keys, length)])
        for b, (k, keys, row, _) in enumerate(starts):
            if k > P:
                groups.setdefault(id(keys), (keys, []))[1].append((b, row, k))
        Hk, C, d = bufs[0][0].shape[1:]
        for keys, members in groups.values():
            dst_rows, src_rows, ks = (torch.as_tensor(x) for x in zip(*members))
            n = ks - P  # keys per row
            row = torch.repeat_interleave(torch.arange(len(members)), n)  # one entry per copied position
            w = torch.arange(len(row)) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)  # 0 … n-1 within a row
            dev = bufs[0][0].device
            src = _flat_rows(src_rows[row], Hk, keys[0][0].shape[2], P + w).flatten().to(dev)
            dst = _flat_rows(dst_rows[row], Hk, C, P + S0 - n[row] + w).flatten().to(dev)
            for (kb, vb), (k, v) in zip(bufs, keys):  # (a cache kept from a call in another precision is cast)
                kb.view(-1, d).index_copy_(0, dst, k.reshape(-1, d).index_select(0, src).to(kb.dtype))
                vb.view(-1, d).index_copy_(0, dst, v.reshape(-1, d).index_select(0, src).to(vb.dtype))

    @staticmethod
    def _shared_start(rows, prompt_ids, starts) -> tuple[int, list | None]:
        """``(P, keys)``: the first P reused keys of every row are the same (same tokens, and equal keys bit for
        bit), to be read from ``keys`` (per layer (k, v), (1, Hk, ≥ P, d)) by all rows; (0, None) when they are not
        or P is under ``SHARED_PREFIX_MIN_TOKENS``. Rows whose keys came from one shared copy (the call's shared
        prefix, or a previous turn's ``base``) are known equal; any other row is compared."""
        if len(rows) < 2 or any(keys is None for _, keys, _, _ in starts):
            return 0, None
        first = prompt_ids[rows[0]]
        P = min(k for k, *_ in starts)
        for r in rows[1:]:
            P = min(P, shared_prefix_length(first, prompt_ids[r]))
        if P < SHARED_PREFIX_MIN_TOKENS:
            return 0, None
        source = next((base for *_, base in starts if base is not None and base[0][0].shape[2] >= P), None)
        if source is None:  # the first row's own keys
            _, keys, row, _ = starts[0]
            source = [(k[row : row + 1], v[row : row + 1]) for k, v in keys]
        for _, keys, row, base in starts:
            if base is not source and not all(torch.equal(a[row : row + 1, :, :P], b[:, :, :P])
                                              for layer, ref in zip(keys, source) for a, b in zip(layer, ref)):
                return 0, None
        return P, source

    def store(self, lines, rows, prompt_ids, out_tokens, length, cache, attn) -> None:
        """Keep the keys of rows that leave the compute batch: ``lines`` pairs (line of the batch, row of the call).
        A row's keys are those of its prompt and of every completion token but the last (never fed to the model)."""
        ids, real = [], []
        for line, b in lines:
            new = out_tokens[b, : max(int(length[b]) - 1, 0)].tolist()
            ids.append(list(prompt_ids[rows[b]]) + new)
            real.append(attn[line].nonzero().flatten()[: len(ids[-1])])
        if isinstance(cache, _SharedPromptCache):
            batch, base = cache.rows_kv([line for line, _ in lines], real), cache.prefix
            for j, ((_, b), row_ids) in enumerate(zip(lines, ids)):
                self.cache.episodes[self.episodes[rows[b]]] = _Episode(ids=row_ids, batch=batch, row=j, base=base)
            return
        for (line, b), row_ids, p in zip(lines, ids, real):
            batch = [(layer.keys[line : line + 1, :, p].clone(), layer.values[line : line + 1, :, p].clone())
                     for layer in cache.layers]
            self.cache.episodes[self.episodes[rows[b]]] = _Episode(ids=row_ids, batch=batch, row=0)


SHARED_PREFIX_MIN_TOKENS = 8
"""A common token prefix of the distinct prompts is encoded once (batch 1) when it is at least this long
(the chat template's system block alone is ~30 tokens for SmolLM2); shorter ones ride with the suffixes."""
SHARE_PROMPT_PREFILL = True
"""Encode each distinct prompt once for its n samples. False prefills every row on its own (the plain
reference path the tests compare against)."""
SHARE_TURN_PREFIX = True
"""In a multi-turn rollout (``TurnCache``), the leading keys that all rows of a batch hold bit for bit are read from one
copy by every decoding step (``_Turns._shared_start``); False: each row reads its own copy."""
GROUPED_TURN_PREFILL = True
"""A multi-turn rollout's prefill attention goes through ``_grouped_prefill_attention`` (models with the shared-prompt
cache); False: through the model's own attention function."""


def shared_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    k, n = 0, min(len(a), len(b))
    while k < n and a[k] == b[k]:
        k += 1
    return k


def common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix, leaving at least one token of every sequence as its suffix."""
    first = seqs[0]
    L = min(len(s) for s in seqs) - 1
    for s in seqs[1:]:
        L = min(L, shared_prefix_length(first, s))
    return max(L, 0)


@torch.no_grad()
def _prefix_kv(model, kw, ids: Sequence[int], dev):
    """Keys and values of one token prefix (batch 1): a list of ``(k, v)``, each (1, H, L, d), per layer; None where
    the model's cache cannot be extended from a copy (sliding-window or recurrent layers)."""
    cache = _growing_cache(model, len(ids))
    if cache is None:
        return None
    x = torch.as_tensor([list(ids)], dtype=torch.long, device=dev)
    _, cache = _forward(model, kw, x, torch.ones_like(x), position_ids_from_mask(torch.ones_like(x)), cache)
    return [(layer.keys, layer.values) for layer in cache.layers]


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
           batch_size: int = 64, seed: int | None = None, progress: bool = False,
           turn_cache: TurnCache | None = None, episode_ids: Sequence | None = None) -> Samples:
    """Sample ``n`` completions for each prompt, in batches of ``batch_size`` rows.

    stop: a string, a list of strings, or a function ``f(completion_text) -> bool``; the completion
          ends at the token where it first holds (that token included), or at EOS, or at
          ``max_new_tokens``.
    temperature: 0 means greedy. top_p / top_k filter the sampling distribution; the returned
          ``logprobs`` are under softmax(logits / temperature) before filtering, i.e. what
          ``completion_logprobs(..., temperature=temperature)`` recomputes.
    turn_cache, episode_ids: multi-turn rollouts (``TurnCache``): row i continues episode ``episode_ids[i]`` and
          encodes only the part of its prompt that its episode's cached prompt and completion do not cover (n = 1).
    """
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"n and max_new_tokens must be ≥ 1 (got n={n}, max_new_tokens={max_new_tokens})")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("sample() needs at least one prompt")
    if turn_cache is not None:
        episode_ids = list(episode_ids) if episode_ids is not None else []
        if n != 1 or len(episode_ids) != len(prompts) or len(set(episode_ids)) != len(episode_ids):
            raise ValueError(f"a turn cache continues one episode per prompt: n must be 1 (got {n}) and episode_ids "
                             f"{len(prompts)} distinct ids (got {len(episode_ids)}, {len(set(episode_ids))} distinct)")
    elif episode_ids is not None:
        raise ValueError("episode_ids go with a turn_cache (sample(..., turn_cache=TurnCache(), episode_ids=...))")
    if isinstance(stop, str):
        stops, stop_fn = [stop], None
    elif callable(stop):
        stops, stop_fn = [], stop
    else:
        stops, stop_fn = list(stop or []), None
    rendered = render_prompts(tokenizer, prompts, system=system, chat=chat)
    generator = None
    dev = next(model.parameters()).device
    if seed is not None:
        generator = torch.Generator(device=dev).manual_seed(seed)
    eos = _eos_ids(model, tokenizer)
    if SHARE_PROMPT_PREFILL and turn_cache is None:
        index = {text: i for i, text in enumerate(dict.fromkeys(rendered))}  # distinct rendered prompts, in order
        texts = list(index)
        rows = [index[text] for text in rendered for _ in range(n)]
    else:
        texts = [text for text in rendered for _ in range(n)]
        rows = list(range(len(texts)))
    prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    kw = _cache_kw(model)
    turns = None  # a model whose cache is not kept as full keys (sliding window) prefills every turn in full
    if turn_cache is not None and _growing_cache(model, 1) is not None:
        turns = _Turns(turn_cache, episode_ids, prompt_ids)
    shared_kv = SHARE_PROMPT_PREFILL and _uses_shared_kv(model)
    was_training = model.training
    model.eval()
    chunks = []
    starts = range(0, len(rows), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="sampling", unit="batch")
    bf16 = dev.type == "cpu" and precision(dev)[0] == "bf16"
    try:
        with autocast(dev), _fast_linears(model, bf16):
            prefix = (None, 0)
            L = common_prefix_length(prompt_ids)
            if (SHARE_PROMPT_PREFILL and L >= SHARED_PREFIX_MIN_TOKENS and (len(texts) > 1 or len(rows) > batch_size)
                    and (turns is None or min(turns.reuse) < L)):  # not when every row continues a longer cache
                kv = _prefix_kv(model, kw, prompt_ids[0][:L], dev)
                prefix = (kv, L) if kv is not None else prefix
            for s in starts:
                chunks.append(_sample_batch(model, tokenizer, kw, prompt_ids, rows[s : s + batch_size], prefix,
                                            max_new_tokens, temperature, top_p, top_k, stops, stop_fn, eos, generator,
                                            shared_kv, turns))
    finally:
        model.train(was_training)
    out = Samples.concat(chunks, pad_id=tokenizer.pad_token_id)
    out.prompts = prompts
    out.prompt_texts = [text for text in rendered for _ in range(n)]
    out.prompt_index = torch.arange(len(prompts)).repeat_interleave(n)
    return out
