"""ArCHer (Zhou et al. 2024) as recurve uses it: an utterance-level critic guides a token-level actor.

Each utterance (a line, a question, a turn) is ONE high-level action, so an episode is a handful
of steps instead of hundreds of tokens. An off-policy critic learns Q(s, utterance) and V(s) from
a replay buffer with a target copy; the token-level policy (SmolLM2 + LoRA) is pushed along the
utterance-level advantage of a FRESH utterance a″ ~ π(s), one the critic's V step did not fit.

    critic   h_s = MiniLM(s), h_a = MiniLM(a)   (frozen, cached — only the MLP heads learn)
             Q_i = MLP_i([h_s; h_a]),  V_i = MLP_i(h_s),  i = 1, 2
             L_Q = Σ_i MSE(Q_i(s, a), r + γ(1 − d)·V̄_i(s′))          (s, a, r, s′, d) from the replay buffer
             L_V = Σ_i MSE(V_i(s), min_j Q̄_j(s, a′)),  a′ ~ π(·|s) fresh     V̄, Q̄: the target critic
             target ← (1 − τ)·target + τ·online after every step (ArCHer), or a hard copy every n
    actor    A = min_j Q_j(s, a″) − min_j V_j(s)   online critic, a″ ~ π(·|s) a SECOND fresh sample
             (divided by its batch std with normalize_advantage, the baselines' scale)
             L = −mean(A · Σ_t log π(a″_t | s, a″_<t))   (REINFORCE, ArCHer) or PPO-clip on A (recurve)
             + β·KL(π ‖ π_ref) optional

Baselines, matched to ArCHer on BOTH counts — environment samples and actor gradient steps:
    ppo      token-level PPO-clip with only the episode's return: A = normalise(G) over the round's
             episodes on every token (no critic) — the on-policy baseline of ArCHer's paper
    grpo     the same loss with trajectory-level group credit: group_size episodes from the SAME
             start, A_i = (G_i − mean_group G) / std_group G — what a TRL user reaches for

Environments: a recurve YAML task file (``rlnlp.envs.recurve``) or a multi-turn game (``games``):
Twenty Questions (``rlnlp.envs.twenty_questions``; ``twenty_questions_6`` is the variant within a
135M policy's reach) or guess the number (``rlnlp.envs.guess_number``; ``guess_number``). Command
line (recurve's flags)::

    python -m rlnlp.archer train --dataset data/recurve/capital_choice.yaml [--name NAME] [--algo ppo] [--resume]
    python -m rlnlp.archer eval --exp-path runs/NAME --chkpt-label latest
    python -m rlnlp.archer compare --task guess_number --seeds 0 1 2 [--algos archer ppo grpo]

Task files are code: the loader executes their functions. Run only task files you trust.

The package, by role: ``config`` (ArcherConfig, tasks, presets), ``envs`` (task files and Twenty Questions),
``acting`` (utterances, lockstep environments, the replay buffer), ``critic``, ``actor`` (the policy step and
the baselines' advantages), ``runs`` (Run and checkpoints), ``training`` (the ArCHer and baseline loops),
``analysis`` (evaluation, curves, samples-to-target) and ``cli``. Every name is importable from ``rlnlp.archer``.
"""
from .acting import Collector, ReplayBuffer, Transition, Utterances, act, play
from .actor import actor_step, episode_advantages, policy_step
from .analysis import (
                       candidate_values,
                       ended_episodes,
                       evaluate,
                       plot_returns,
                       return_curve,
                       sample_efficiency,
                       samples_to_return,
                       scripted_play,
)
from .cli import main
from .compare import load_study, plot_study, run_study, save_study, summarize
from .config import (
                       ALGOS,
                       TASKS,
                       TWENTY_QUESTIONS_VARIANTS,
                       ArcherConfig,
                       RunFolderError,
                       UsageError,
                       archer_actor_steps,
                       with_task,
)
from .credit import episode_browser, plot_turn_credit, turn_credit
from .critic import Critic, DoubleCritic, critic_phase, hard_update, mlp, polyak_update, q_targets, v_target
from .envs import check_dataset, env_factory, make_env, resolve_dataset
from .games import GAMES, game_options
from .runs import Run, load_checkpoint, read_run, save_checkpoint
from .training import setup, train, train_archer, train_baseline

__all__ = ["ALGOS", "GAMES", "TASKS", "TWENTY_QUESTIONS_VARIANTS", "ArcherConfig", "Collector", "Critic",
           "DoubleCritic", "ReplayBuffer", "Run", "RunFolderError", "Transition", "UsageError", "Utterances", "act",
           "actor_step", "archer_actor_steps", "candidate_values", "check_dataset", "critic_phase", "ended_episodes",
           "env_factory", "episode_advantages", "episode_browser", "game_options", "load_study", "plot_study",
           "plot_turn_credit", "run_study", "save_study", "summarize", "turn_credit", "evaluate", "hard_update",
           "load_checkpoint", "main", "make_env", "mlp", "play", "plot_returns", "policy_step", "polyak_update",
           "q_targets", "read_run", "resolve_dataset", "return_curve", "sample_efficiency", "samples_to_return",
           "save_checkpoint", "scripted_play", "setup", "train", "train_archer", "train_baseline", "v_target",
           "with_task"]
