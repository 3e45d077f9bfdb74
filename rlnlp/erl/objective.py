"""The math ERL adds to GRPO: advantages over (y1, Δ, y2), the internalization loss, and row selection that
never pays for padding."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import position_ids_from_mask
from .config import COMPLETION_KEYS


def erl_advantages(r1: torch.Tensor, r2: torch.Tensor, algorithm: str, y1_group_advantages: torch.Tensor,
                   scale: bool = True, eps: float = 1e-4,
                   reflection: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Advantages for (y1, Δ, y2). r1: (B,), r2: (G,) for the G gated samples; returns (B,), (G,), (G,).

    joint:  r = [r1; r2; r2],  A = (r − mean r) / (std r + eps)   (one batch-wide normalisation)
    split:  A_y1 = TRL's group-relative advantages; [A_Δ; A_y2] normalised over [r2; r2] alone
    ``reflection=False`` (no Δ rows): joint over [r1; r2], split over r2; A_Δ is returned empty.
    """
    def norm(r):
        centred = r - r.mean()
        return centred / (r.std() + eps) if scale and r.numel() > 1 else centred

    G = r2.numel()
    if not reflection:
        if algorithm == "joint":
            a = norm(torch.cat([r1, r2]))
            return a[: r1.numel()], a[:0], a[r1.numel() :]
        return y1_group_advantages, r2[:0], norm(r2) if G else r2
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
