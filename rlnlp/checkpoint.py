"""Checkpoints that resume exactly and survive a kill: every RNG, written atomically.

A run that resumes must draw the same random numbers it would have drawn without the interruption, so a
checkpoint carries the state of every generator the training touches — Python's ``random``, NumPy's global
generator, torch's CPU generator and the generator of every CUDA device — next to the weights, the optimizer
and whatever the loop needs (counters, buffers, metrics)::

    from rlnlp import checkpoint
    checkpoint.save(path, adapter=..., optimizer=opt.state_dict(), step=step, rng=checkpoint.rng_state())
    state = checkpoint.load(path)            # a dict of the same names
    checkpoint.set_rng_state(state["rng"])

``save`` writes to a temporary file in the same folder and renames it over the old one (``os.replace`` is atomic
on one file system), so a kill mid-write leaves the previous checkpoint whole. A generator you own
(``random.Random(seed)``, ``torch.Generator``) is not global: save its ``getstate()`` / ``get_state()`` yourself.
"""
from __future__ import annotations

import contextlib
import os
import random
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read (truncated, not a checkpoint); the message names the file."""


def rng_state() -> dict:
    """The state of every global generator: ``{"python", "numpy", "torch", "cuda"}`` (``cuda`` is one state per
    device, or None without CUDA)."""
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` returned. CUDA states are restored only where CUDA is present (a checkpoint
    written on a GPU resumes on a CPU with the CPU generators exact)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block ends without an error, move it onto ``path`` in one
    step. A kill inside the block leaves ``path`` as it was (and at worst a hidden ``.NAME.*.tmp`` file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:  # the bytes reach the disk before the name points at them
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save(path: str | Path, **objects) -> Path:
    """Write ``objects`` (tensors, state dicts, counters, :func:`rng_state`) to ``path`` atomically; return ``path``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(objects, tmp)
    return path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The dict :func:`save` wrote. Tensors land on ``map_location`` (default CPU, where RNG states must be).

    Raises FileNotFoundError (missing) or :class:`CheckpointError` (truncated or not a checkpoint), each with a
    one-line message naming the file. Loading unpickles Python objects: load only checkpoints you wrote.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint there")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # zip, pickle and EOF errors all mean the same to the user: this file is broken
        detail = " ".join(str(err).split()) or type(err).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({detail[:200]})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint written by rlnlp.checkpoint.save (holds a "
                              f"{type(state).__name__})")
    return state
