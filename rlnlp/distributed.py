"""Running rlnlp's trainers in several processes (``torchrun`` / ``accelerate launch``): whose rows are whose,
results of uneven size gathered in rank order, and gradients averaged by hand.

Each process holds its own rows of a global batch; process k's rows are the k-th contiguous block (the order
TRL's sampler and accelerate's data loader give). In one process every helper here is the identity, so code
written with them runs unchanged on one machine.
"""
from __future__ import annotations

from typing import Iterable

import torch
from accelerate.utils import gather, gather_object


def process_rows(accelerator, n_local: int) -> slice:
    """This process's rows in a batch gathered from every process, each holding ``n_local`` rows."""
    k = accelerator.process_index
    return slice(k * n_local, (k + 1) * n_local)


def gather_counts(accelerator, n: int) -> list[int]:
    """Every process's ``n``, in rank order (one small collective; ``[n]`` in one process)."""
    if accelerator.num_processes == 1:
        return [n]
    return gather(torch.tensor([n], device=accelerator.device)).tolist()


def own_rows(accelerator, counts: list[int]) -> slice:
    """This process's rows in the rank-ordered concatenation of blocks of sizes ``counts``."""
    k = accelerator.process_index
    start = sum(counts[:k])
    return slice(start, start + counts[k])


def unpad_blocks(gathered: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """(P·M, …) gathered blocks of M = max(counts) rows each, padding dropped: (Σ counts, …) in rank order."""
    width = max(counts)
    return torch.cat([gathered[k * width : k * width + n] for k, n in enumerate(counts)])


def global_sum(accelerator, x: torch.Tensor) -> torch.Tensor:
    """Σ over processes of ``x`` (same shape on every process); ``x`` itself in one process."""
    if accelerator.num_processes == 1:
        return x
    return gather(x.unsqueeze(0)).sum(0)


def gather_in_rank_order(accelerator, items: list) -> list:
    """Every process's list of picklable items, concatenated in rank order (``items`` in one process)."""
    if accelerator.num_processes == 1:
        return list(items)
    return gather_object(list(items))  # accelerate concatenates the processes' lists


def average_gradients(parameters: Iterable[torch.nn.Parameter]) -> None:
    """g ← (1/P) Σ_k g_k for every trainable parameter: the gradient DistributedDataParallel would have produced.
    A parameter without a gradient on this process takes part with zeros, so every process reduces the same list."""
    import torch.distributed as dist

    params = [p for p in parameters if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    world = dist.get_world_size()
    works = [dist.all_reduce(p.grad, async_op=True) for p in params]
    for w in works:
        w.wait()
    for p in params:
        p.grad.div_(world)


class GradientsAveragedByHand:
    """Mixin for a ``Trainer``: under DistributedDataParallel, each micro-batch's loss runs on the unwrapped model and
    the gradients are averaged across processes by hand at the end of each accumulation window.

    DDP averages gradients only for forward passes that go through its wrapper, and each such pass also broadcasts
    the model's buffers — a collective that needs the same number of passes on every process. A trainer whose
    processes hold different numbers of rows (ERL: different numbers of reflections and retries), or whose forward
    calls the backbone directly (the packed forward), makes neither true; averaging by hand needs neither. One
    process, DeepSpeed and FSDP: untouched."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        if not isinstance(model, torch.nn.parallel.DistributedDataParallel):
            return super().training_step(model, inputs, num_items_in_batch)
        loss = super().training_step(model.module, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:  # the last micro-batch of the window: before clipping and the step
            average_gradients(model.module.parameters())
        return loss


class Ranks:
    """This process's place among ``accelerator``'s processes, for loops that split their own work (ArCHer): its
    block of a list, every process's items gathered in rank order, gradients averaged. Without an accelerator, or
    in one process, it is rank 0 of 1 and every method is the identity."""

    SEED_STRIDE = 1_000_003
    """Added once per rank to a sampling seed, so that processes draw different random numbers (0 on rank 0)."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world = accelerator.num_processes if accelerator is not None else 1
        self.main = self.rank == 0
        # what a gradient step calls between backward and clipping (None in one process)
        self.average_gradients = average_gradients if self.world > 1 else None

    def share(self, items):
        """This process's contiguous block of ``items`` (a list or tensor); blocks differ by at most one item, the
        longer ones first, so the blocks gathered in rank order are ``items`` again."""
        if self.world == 1:
            return items
        base, extra = divmod(len(items), self.world)
        start = self.rank * base + min(self.rank, extra)
        return items[start : start + base + (self.rank < extra)]

    def gather(self, items: list) -> list:
        """Every process's list, concatenated in rank order."""
        return gather_in_rank_order(self.accelerator, items) if self.world > 1 else list(items)

    def gather_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Every process's rows of ``x`` (the same number on every process), concatenated in rank order."""
        return gather(x.to(self.accelerator.device)).to(x.device) if self.world > 1 else x

    def counts(self, n: int) -> list[int]:
        """Every process's ``n``, in rank order."""
        return gather_counts(self.accelerator, n) if self.world > 1 else [n]
