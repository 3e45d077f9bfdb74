"""LactChain (notebook 02): an LM actor proposes chains of moves, an embedding critic learns state values by
Monte-Carlo, then a judge (the critic, or exact V* as an oracle) ranks the actor's proposals and SimPO
trains the actor on best-vs-worst pairs, round after round (collect → SimPO → collect).

Pipeline (notebook 02 runs it top to bottom):

    actor   SmolLM2-135M-Instruct + LoRA (r 8, α 32, q/k/v/o, dropout 0.05). The system turn holds the
            info text and the rules; the user turn the state; the assistant turn is opened with "Go "
            and the model writes one move from a small menu, "<n> cells <ahead|behind|left|right>",
            which ``parse_move`` turns into a chain of the grid's two moves (turn left 0–3 times to face
            that way, then n × move forward). Generation stops at the end of the move.
    critic  frozen MiniLM sentence embedding (cached per text) of ``state text + "\\n" + info``
            → a small MLP → V(s). MiniLM is bidirectional and mean-pooled, unlike the original's
            token-0 hidden state of a causal decoder (which sees only itself: a constant).
    stage 1 Monte-Carlo: discounted returns (γ 0.99 per move) of frozen-policy episodes, fitted with
            smooth-L1 on G / value_scale. Episodes cut by the chain budget are bootstrapped: the target
            of a visited state is G_partial + γ^m · V(s_last), refitted a few times, so V is the same
            infinite-horizon value that stage 2 evaluates at V(s′).
    stage 2 n chains per start state, each executed once and scored by the k-step advantage
            A = R_chain + γ^k · V(s′) · (1 − done) − V(s); per state the best chain is chosen and the
            worst rejected (a parse failure ranks below every valid chain); SimPO on the pairs.

Why this prompt (measured on the 60 start states, SmolLM2-135M, before any training):
    the original prompt carried an example answer, and the model copied it in all 60 states (one
    distinct greedy answer). Free JSON lists of "move forward" / "turn left" either copy the order in
    which the schema names the moves (again one greedy answer) or invent moves ("move left", "move
    back"): 3–60 % of samples parse at temperature 0.7, and almost none reach the goal. Absolute
    coordinates give a 135M model nothing to act on. So the state is ALSO told egocentrically ("the
    goal is 1 cell behind and 2 cells to your left": a fact about the state, not an answer), and the
    answer is one move from a menu of 12 (1–3 cells × 4 directions), each a chain of up to 6 grid
    moves. Two such moves reach the goal from every start (an L-shaped route), so an episode has a
    budget of ``max_chains`` = 3 chains. See the notebook for the measured rates.
    The assistant turn is opened with "Go ", not "Move ": with "Move " the greedy answers were only
    "1|2 cells to the left|right" (7 distinct over the 60 states, 4 of them valid, greedy success 0.57):
    the model ignored the ahead/behind half of the state. With "Go " it copies either half of the
    state (10 distinct greedy answers, all valid, 8 distinct chains). Measured alternatives (greedy,
    60 states): "I move " 4 distinct, "I go " 7, "Walk " 4, "Step " and no prefix 0 valid; other
    direction words (forward/back) 7 with "Move ", 9 with "Go "; compass answers ("2 cells north",
    the chain turns from the heading to face that way) 6–7 with "Go ", mostly malformed with "Move ".
    Copying either half always progresses, so the untrained greedy actor succeeds from (almost) every
    start, but it mostly names the sideways half first, whose turns cost moves ("right" = three left
    turns): its first-chain V*-advantage is −2.0 and sampled at T 0.7 (8 per state) success is 0.80,
    V*-advantage −5.3, parse failures 0.14. What SimPO can learn is which half to go first and to
    stop producing malformed answers.

What k is. A chain is a macro-action of several per-move transitions, so the discount follows the
moves: k = the number of moves actually executed (a chain that reaches the goal stops there), and
R_chain = Σ_{i<k} γ^i r_i. A is then exactly the k-step TD advantage on the per-move MDP whose exact
values (``value_iteration``) are the ground truth. An unparsable answer is a wasted step: state
unchanged, one tick (k = 1), reward ``cfg.empty_chain_penalty`` — chosen below every valid chain's
outcome (tests/test_lactchain.py checks it against all 12 moves from all 60 states).

SimPO (Meng et al. 2024):  L = −log σ( β·(mean log π(y_w|x) − mean log π(y_l|x)) − γ ), per-token
MEAN log-probs over the completion — which here is the move and nothing else (no explanation, no
JSON boilerplate) — and no reference model. β 2.0, γ 0.5 follow the SimPO paper's range; the
original's β 0.1 is the DPO default, which with length-normalised log-probs leaves the loss flat.
Our own loss instead of TRL's CPOTrainer(loss_type="simpo"): the pairs are built on the fly from
token ids we already hold, the loss is three lines over ``completion_logprobs``, and owning it keeps
the quantities this notebook plots (margin, accuracy, log-prob gap per step) in view.

The package, by role: ``config``, ``text`` (state, prompt, parser), ``chains`` (executing chains, returns,
judges), ``critic``, ``actor``, ``evaluation``, ``simpo`` (stage 2), ``explore`` (notebook helpers). Every
public name is importable from ``rlnlp.lactchain``.
"""
from __future__ import annotations

from ..stats import spearman
from .actor import Actor, ActorEpisodes, Proposals, run_episodes
from .chains import (
    ChainOutcome,
    MCSample,
    chain_advantage,
    episode_samples,
    exact_judge,
    execute_chain,
    grid_values,
    mc_samples,
    scripted_policy,
    scripted_samples,
)
from .config import LactChainConfig
from .critic import Critic, fit_critic, split_states
from .evaluation import Evaluation, chain_baselines, evaluate, first_chain_advantages
from .explore import explorer_steps, greedy_agreement, mean_return_by_state, q_grid
from .simpo import (
    PreferencePairs,
    adapter_state,
    best_worst_pairs,
    collect_preferences,
    load_adapter_state,
    preference_stats,
    rank_key,
    round_summary,
    score_proposals,
    simpo_loss,
    simpo_rounds,
    train_simpo,
)
from .text import (
    ANSWER_PREFIX,
    DIRECTIONS,
    ParsedChain,
    actor_prompt,
    goal_offset,
    menu,
    move_complete,
    parse_move,
    rules,
    state_text,
)

__all__ = [
    "LactChainConfig", "DIRECTIONS", "ANSWER_PREFIX", "rules", "goal_offset", "state_text", "actor_prompt",
    "ParsedChain", "parse_move", "move_complete", "menu", "ChainOutcome", "execute_chain", "chain_advantage",
    "MCSample", "mc_samples", "episode_samples", "scripted_samples", "scripted_policy", "grid_values", "exact_judge",
    "Critic", "fit_critic", "split_states", "spearman", "Proposals", "Actor", "ActorEpisodes", "run_episodes",
    "Evaluation", "first_chain_advantages", "evaluate", "chain_baselines", "PreferencePairs", "rank_key",
    "best_worst_pairs", "score_proposals", "collect_preferences", "simpo_loss", "preference_stats", "train_simpo",
    "round_summary", "simpo_rounds", "adapter_state", "load_adapter_state", "explorer_steps", "greedy_agreement",
    "q_grid", "mean_return_by_state",
]
