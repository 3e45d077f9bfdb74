"""One ERL step as data: the record its phases fill in (``ERLStep``), the prompts they build, and the pure
functions that turn it into the row-aligned training batch and its metrics."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl.trainer.utils import pad

from ..sampling import Samples
from .config import PARTS, SAMPLER_GENERATION_KWARGS, ERLConfig


@dataclass
class ERLStep:
    """One generation step of ``ERLTrainer``, filled in phase by phase (B first attempts, G of them gated).

    first attempts: inputs … feedback; gate: gated, tasks; reflect: reflections; retry: retries, r2, feedback2;
    remember: stored, internalize; assemble: batch (then logged)."""

    inputs: list[dict]
    """The dataset rows TRL scored, one per first attempt."""
    prompts: list
    """Their prompts, text or conversation, as the reward functions saw them."""
    completions: list
    """y1 as the reward functions saw them (text, or a one-message conversation)."""
    y1_ids: list[list[int]]
    """y1's token ids, unpadded."""
    y1: dict
    """TRL's batch for y1: row-aligned tensors (``ROW_KEYS``) with TRL's group-relative advantages."""
    r1: torch.Tensor
    """(B,) weighted reward of each first attempt."""
    feedback: list[str]
    """f1, one per first attempt ("" without a feedback function)."""
    gated: list[int] = field(default_factory=list)
    """Indices of the first attempts with r1 < τ: they are reflected on and retried."""
    tasks: list[str] = field(default_factory=list)
    """Each gated row's task text (its last user turn): what reflection and retry prompts quote."""
    reflections: Samples | None = None
    """Δ, one per gated row."""
    retries: Samples | None = None
    """y2, one per gated row."""
    r2: torch.Tensor | None = None
    """(G,) weighted reward of each retry (empty when nothing is gated)."""
    feedback2: list[str] = field(default_factory=list)
    """Feedback on each retry (recorded in ``examples`` only)."""
    stored: list[bool] = field(default_factory=list)
    """Per gated row: Δ went into the memory."""
    internalize: list[bool] = field(default_factory=list)
    """Per gated row: (x → y2) is distilled by the internalization loss."""
    batch: dict | None = None
    """The row-aligned batch of y1, Δ, y2 and internalization rows the loss trains on."""
    r1_all: torch.Tensor | None = None
    """In several processes: (P·B,) r1 of every process's rows in rank order (``r1`` is this process's slice).
    In one process: ``r1``."""
    gated_counts: list[int] = field(default_factory=list)
    """G of every process, in rank order."""
    r2_all: torch.Tensor | None = None
    """(Σ G,) r2 of every process's retries, in rank order (one process: ``r2``)."""

    def __post_init__(self):
        if self.r2 is None:
            self.r2 = torch.zeros(0, device=self.r1.device)
        if self.r1_all is None:
            self.r1_all = self.r1
        if self.r2_all is None:
            self.r2_all = self.r2


def last_user_text(prompt) -> str:
    """A prompt's task text: the whole text, or the content of a conversation's final user turn."""
    if isinstance(prompt, str):
        return prompt
    content = prompt[-1]["content"] if prompt and prompt[-1].get("role") == "user" else None
    if not isinstance(content, str):
        raise ValueError("ERLTrainer: a conversational prompt must end with a user turn whose content is text; got "
                         f"{str(prompt[-1:])[:120]}")
    return content


def ends_line(text: str) -> bool:
    """Stop rule for Δ: a line break after some text."""
    return "\n" in text.lstrip()


def completion_text(completion) -> str:
    return completion if isinstance(completion, str) else str(completion[-1]["content"])


def sampler_options(args: ERLConfig) -> dict:
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


def internalization_rows(step: ERLStep, retry_rows: dict) -> dict | None:
    """Phase 7's data: the retry rows the internalization rule chose, under the ORIGINAL prompt x (advantage 0);
    None when it chose none."""
    dev = step.r1.device
    keep = torch.tensor([j for j in range(len(step.gated)) if step.internalize[j]], dtype=torch.long, device=dev)
    if not keep.numel():
        return None
    src = torch.tensor(step.gated, device=dev)[keep]
    rows = {k: v[keep] for k, v in retry_rows.items()}  # the chosen retry rows ...
    rows["prompt_ids"], rows["prompt_mask"] = step.y1["prompt_ids"][src], step.y1["prompt_mask"][src]  # ... under x
    rows["advantages"] = torch.zeros_like(rows["advantages"])
    rows["erl_part"] = torch.full_like(rows["erl_part"], PARTS["internalization"])
    return rows


def stack_parts(parts: list[dict], pad_id: int) -> dict:
    """Row-aligned parts as one batch: prompts left-padded, completions right-padded to the widest row, plus the
    token counts each TRL loss call normalises by (``num_items_in_batch``: the dapo / cispo / vespo losses)."""
    batch = {}
    for key in parts[0]:
        if parts[0][key].ndim == 1:
            batch[key] = torch.cat([p[key] for p in parts])
            continue
        value = pad_id if key in ("prompt_ids", "completion_ids") else 0
        side = "left" if key.startswith("prompt") else "right"
        batch[key] = pad([row for p in parts for row in p[key]], value, side)  # (R, max width)
    tokens, part = batch["completion_mask"].sum(1), batch["erl_part"]
    batch["num_items_in_batch"] = tokens[part <= 2].sum()
    batch["erl_items_y1"] = tokens[part == 0].sum()
    batch["erl_items_rest"] = tokens[(part == 1) | (part == 2)].sum()
    batch["erl_items_int"] = tokens[part == 3].sum()
    return batch


def step_metrics(step: ERLStep, memory_size: int, tau: float) -> dict[str, float]:
    """What one step logs: rewards before and after the retry and the gate over every process's rows, the memory,
    and this process's counts (which the trainer sums over processes): entries it added and per part what is
    trained (rows with ≥ 1 loss token, their loss tokens and their prompt tokens)."""
    r1, r2, batch = step.r1_all, step.r2_all, step.batch
    r1_gated, G = r1[r1 < tau], len(r2)  # (Σ G,) in r2's order: both in rank order, then row order
    out = {"charts/r1": r1.mean().item(), "charts/r2": r2.mean().item() if G else float("nan"),
           "charts/r1_gated": r1_gated.mean().item() if G else float("nan"), "stats/gate_fraction": G / len(r1),
           "stats/memory_size": float(memory_size), "stats/memory_added": float(sum(step.stored)),
           "stats/retry_improved": float((r2 > r1_gated).float().mean()) if G else float("nan")}
    tokens, part, prompt_tokens = batch["completion_mask"].sum(1), batch["erl_part"], batch["prompt_mask"].sum(1)
    for name, code in PARTS.items():
        trained = (part == code) & (tokens > 0)
        out[f"stats/rows_{name}"] = float(trained.sum())
        out[f"stats/tokens_{name}"] = float(tokens[trained].sum())
        out[f"stats/prompt_tokens_{name}"] = float(prompt_tokens[trained].sum())
    return out
