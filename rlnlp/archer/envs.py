"""Environments for ArCHer: a recurve task file or a multi-turn game (``games``), and a factory for N copies."""
from __future__ import annotations

import copy
from pathlib import Path

from ..models import TextEncoder
from .config import ArcherConfig
from .games import GAMES, check_game, is_game, make_game


def resolve_dataset(path: str) -> Path:
    """A task file path as given, else relative to the repository root (notebooks run from notebooks/)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    from ..data import data_dir

    return data_dir().parent / p


def check_dataset(cfg: ArcherConfig):
    """Load and validate ``cfg.dataset`` before anything expensive (a Task, or None for Twenty Questions)."""
    if is_game(cfg.dataset):
        check_game(cfg)
        return None
    from ..envs.recurve import TaskFileError, load_task

    path = resolve_dataset(cfg.dataset)
    if not path.exists():
        raise TaskFileError(f"{cfg.dataset}: no such task file (or use a multi-turn game: {', '.join(GAMES)})")
    return load_task(path)


def make_env(cfg: ArcherConfig, tokenizer=None, encoder: TextEncoder | None = None):
    """A fresh environment for ``cfg.dataset`` (a task file, or a multi-turn game: Twenty Questions, guess_number)."""
    if is_game(cfg.dataset):
        return make_game(cfg, tokenizer, encoder)
    from ..envs.recurve import RecurveEnv

    return RecurveEnv(check_dataset(cfg), tokenizer=tokenizer, max_utterances=cfg.max_turns)


def env_factory(cfg: ArcherConfig, tokenizer, encoder: TextEncoder):
    """make() for N copies that share the (expensive) parts: task, tokenizer, oracle embeddings."""
    proto = make_env(cfg, tokenizer, encoder)
    if is_game(cfg.dataset):
        return proto.clone
    return lambda: copy.copy(proto)  # a RecurveEnv's episode state lives in attributes that reset() rebinds
