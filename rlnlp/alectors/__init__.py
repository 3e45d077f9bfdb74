"""alectors: a PPO agent that reads the state through a frozen encoder (notebooks 01 and 06).

* :mod:`rlnlp.alectors.core` — the agent (a reader of token embeddings with a fixed action head), PPO with a
  KL target, training, exact evaluation, on the instruction maze and the text grid world (notebook 01).
* :mod:`rlnlp.alectors.textworld` — the same PPO over TextWorld games, where the menu of admissible commands
  changes with the state: the actor scores each (state, command) pair, DRRN-style (notebook 06).

Every public name of ``core`` is importable from ``rlnlp.alectors``; the TextWorld names with a distinct
meaning are re-exported too (its ``train``, ``collect`` … are reached as ``rlnlp.alectors.textworld.train``).
"""
from . import core as core
from . import textworld as textworld
from .core import *  # noqa: F401,F403 — the fixed-menu agent's public names, as before the package split
from .textworld import (  # noqa: F401
    CommandScorer,
    MenuAlector,
    MenuRun,
    MenuStates,
    TextWorldConfig,
    read_states,
    textworld_games,
    transcript,
)
