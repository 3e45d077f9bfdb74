"""Multi-turn games ArCHer plays: Twenty Questions and guess-the-number variants, with options a run may override.

A variant names a game and its settings; ``ArcherConfig`` can override the options that make a new
task of the same game — ``candidates`` (Twenty Questions: the objects the secret is drawn from),
``number_range`` (guess the number: the lowest and highest secret) and ``prefill`` (the text each
turn starts with) — together with ``max_turns``, so a new variant needs no code.
"""
from __future__ import annotations

from ..models import TextEncoder
from .config import GUESS_NUMBER_VARIANTS, TWENTY_QUESTIONS_VARIANTS, ArcherConfig, UsageError

GAMES = (*TWENTY_QUESTIONS_VARIANTS, *GUESS_NUMBER_VARIANTS)


def is_game(dataset: str) -> bool:
    return dataset in TWENTY_QUESTIONS_VARIANTS or dataset in GUESS_NUMBER_VARIANTS


def game_options(cfg: ArcherConfig) -> dict:
    """The variant's settings with the run's overrides (``candidates``, ``number_range``, ``prefill``) applied."""
    if cfg.dataset in GUESS_NUMBER_VARIANTS:
        v = dict(GUESS_NUMBER_VARIANTS[cfg.dataset])
        if cfg.number_range is not None:
            v["low"], v["high"] = cfg.number_range
    else:
        v = dict(TWENTY_QUESTIONS_VARIANTS[cfg.dataset])
        if cfg.candidates is not None:
            v["candidates"] = tuple(cfg.candidates)
    if cfg.prefill is not None:
        v["prefill"] = cfg.prefill
    return v


def check_game(cfg: ArcherConfig) -> None:
    """Options that fit the game (``UsageError`` names the option): a range of at least two numbers, known
    candidates, no option that belongs to the other game."""
    if cfg.dataset in GUESS_NUMBER_VARIANTS:
        if cfg.candidates is not None:
            raise UsageError(f"candidates is a Twenty Questions option; {cfg.dataset} takes number_range")
        opts = game_options(cfg)
        low, high = opts.get("low", 1), opts.get("high", 16)
        if not (isinstance(low, int) and isinstance(high, int)) or high - low < 1:
            raise UsageError(f"number_range must be two whole numbers LOW < HIGH, got {cfg.number_range!r}")
        return
    if cfg.number_range is not None:
        raise UsageError(f"number_range is a guess_number option; {cfg.dataset} takes candidates")
    if cfg.candidates is not None:
        from ..data import twenty_questions

        names = {o["object"] for o in twenty_questions()[1]}
        missing = [c for c in cfg.candidates if c not in names]
        if len(cfg.candidates) < 2 or missing or len(set(cfg.candidates)) != len(cfg.candidates):
            raise UsageError(f"candidates must be at least two distinct objects of the Twenty Questions table, got "
                             f"{list(cfg.candidates)}"
                             + (f" (not in the table: {', '.join(missing)})" if missing else ""))


def make_game(cfg: ArcherConfig, tokenizer=None, encoder: TextEncoder | None = None):
    """A fresh game environment for ``cfg`` (its ``clone()`` makes copies that share the expensive parts)."""
    check_game(cfg)
    v = game_options(cfg)
    if cfg.dataset in GUESS_NUMBER_VARIANTS:
        from ..envs.guess_number import GuessNumber

        return GuessNumber(max_turns=cfg.max_turns, tokenizer=tokenizer, **v)
    from ..envs.twenty_questions import TwentyQuestions

    return TwentyQuestions(max_turns=cfg.max_turns, encoder=encoder, threshold=cfg.oracle_threshold,
                           margin=cfg.oracle_margin, candidates=list(v.get("candidates") or []) or None,
                           prefill=v.get("prefill", ""), tokenizer=tokenizer)


TASK_BUDGETS = {
    # (profile, task): budget fields that differ from the profile's preset for that task.
    # The 5-turn games on the CPU: 16 environments (16 iterations, 256 env samples, 10 actor steps), a longer
    # critic-only warm-up and more critic steps (the critic must have seen whole episodes before the actor follows
    # it), centred advantages (see ArcherConfig.center_advantage); 128 evaluation episodes.
    ("cpu", "guess_number"): dict(num_envs=16, env_steps=256, fresh_batch=16, warmup_iters=6, critic_steps=40,
                                  center_advantage=True, eval_episodes=128),
    ("cpu", "twenty_questions_6"): dict(num_envs=16, env_steps=256, fresh_batch=16, warmup_iters=6, critic_steps=40,
                                        center_advantage=True, eval_episodes=128),
    # 1..8 in 4 turns on the CPU: 512 env samples, four actor steps per iteration on buffer states (the critic and
    # the buffer make these free in environment samples), a critic that reads state and guess together (it can
    # see a repeated guess), a KL to the untrained policy, and RAW advantages: divided by their batch std, the
    # critic's small and noisy differences became full-size steps and the actor collapsed onto out-of-range guesses
    # the critic overrated (three seeds, success 0); raw, the step shrinks when the critic has little to say
    ("cpu", "guess_number_8"): dict(num_envs=16, env_steps=512, fresh_batch=16, warmup_iters=6, critic_steps=40,
                                    center_advantage=True, normalize_advantage=False, eval_episodes=128,
                                    actor_updates=4, critic_input="joint", kl_coef=0.1),
    ("smoke", "guess_number"): dict(center_advantage=True),
    # smoke: 5 iterations of 8 environments, so that 4-turn episodes end within the budget
    ("smoke", "guess_number_8"): dict(center_advantage=True, normalize_advantage=False, critic_input="joint",
                                      kl_coef=0.1, env_steps=40, actor_updates=2),
    ("smoke", "twenty_questions_6"): dict(center_advantage=True),
    # The 20-turn game on one GPU: whole episodes need 20 turns and a ~600-token history per turn; 128
    # environments and 20 critic-only iterations as in ArCHer's reference.
    ("full", "guess_number"): dict(center_advantage=True),
    ("full", "twenty_questions_6"): dict(center_advantage=True),
    ("full", "twenty_questions"): dict(num_envs=128, env_steps=128 * 160, fresh_batch=64, warmup_iters=20,
                                       critic_steps=50, critic_batch=256, eval_episodes=256, train_batch=32,
                                       center_advantage=True),
}
"""Per-task budgets of a profile (``task_preset``)."""


def task_preset(prof: str, task: str, **kw) -> ArcherConfig:
    """The profile's preset (``ArcherConfig.full/cpu/smoke``) with the task's dataset and caps, the task's own
    budget for that profile (``TASK_BUDGETS``), then ``kw``."""
    from .config import with_task

    if prof not in ("full", "cpu", "smoke"):
        raise UsageError(f"unknown profile {prof!r}: use full, cpu or smoke")
    return with_task(getattr(ArcherConfig, prof)(), task, **{**TASK_BUDGETS.get((prof, task), {}), **kw})
