"""Packed forward passes: rows that share a prompt prefix laid out as one prefix tree, no padding, one LM-head call."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..sampling import shared_prefix_length


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
            allowed[path_t[shared:, None], path_t[None, :]] = torch.ones(len(path), len(path),
                                                                         dtype=torch.bool).tril()[shared:]
    return tokens, pos, allowed, pred


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
        scaled = any(getattr(cfg, k, None) is not None
                     for k in ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
                               "logits_scaling"))
        sliding = any(t != "full_attention" for t in (getattr(cfg, "layer_types", None) or []))
        head = m.get_output_embeddings()
        if (scaled or sliding or getattr(cfg, "output_router_logits", False)
                or getattr(self.args, "cast_lm_head_to_fp32", False)
                or m.config._attn_implementation not in ("sdpa", "eager") or type(head) is not torch.nn.Linear):
            return None
        return m.base_model, head

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        if any(v is not None for v in multimodal.values()):  # images: TRL's own path
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              batch_size, compute_entropy, compute_aux_loss,
                                                              **multimodal)
        if not self.packed_forward:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              batch_size, compute_entropy, compute_aux_loss)
        size = batch_size or self.args.per_device_train_batch_size
        parts = None if compute_aux_loss else self._packable_backbone(model)
        if parts is not None:
            out = self._packed_logps(*parts, input_ids, attention_mask, logits_to_keep, size, compute_entropy)
            if out is not None:
                return out
        return self._chunked_logps(model, input_ids, attention_mask, logits_to_keep, size, compute_entropy,
                                   compute_aux_loss)

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
                allowed = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill(~allowed,
                                                                                          torch.finfo(dtype).min)
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
            out = ChunkedLogProbFunction.apply(hidden, head.weight, head.bias,
                                               torch.tensor(targets, device=hidden.device), self.temperature, 32768,
                                               None, 1.0, outputs)
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
