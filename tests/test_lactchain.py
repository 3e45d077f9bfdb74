"""LactChain (notebook 02): grid dynamics, exact values, the move parser, advantages, Monte-Carlo targets with
bootstrapping, the critic fit, preferences (row → state, V(s) vs V(s′), failures last), episodes, the
evaluation over start states, SimPO's loss, and SimPO on real pairs from the pipeline."""
import dataclasses
import math
import random

import numpy as np
import pytest
import torch

from rlnlp.envs.gridworld import FORWARD, LEFT, RIGHT, GridWorld, policy_evaluation, sample_action, value_iteration
from rlnlp.lactchain import (
    ANSWER_PREFIX,
    DIRECTIONS,
    Actor,
    ChainOutcome,
    Critic,
    LactChainConfig,
    MCSample,
    ParsedChain,
    Proposals,
    best_worst_pairs,
    chain_advantage,
    chain_baselines,
    collect_preferences,
    episode_samples,
    evaluate,
    exact_judge,
    execute_chain,
    first_chain_advantages,
    fit_critic,
    goal_offset,
    grid_values,
    mc_samples,
    menu,
    move_complete,
    parse_move,
    preference_stats,
    rules,
    run_episodes,
    scripted_policy,
    simpo_loss,
    state_text,
    train_simpo,
)
from rlnlp.sampling import Samples

G = 0.99


# ---- grid dynamics ---------------------------------------------------------------------------
def test_shortest_route_from_start_returns_96():
    env = GridWorld()
    env.reset()
    obs, reward, done, info = env.step([LEFT, LEFT, FORWARD, LEFT, FORWARD])
    assert (reward, done, info["state"], info["moves_used"]) == (96.0, True, (1, 1, 1), 5)


def test_chain_stops_at_goal_and_ignores_the_rest():
    env = GridWorld()
    env.reset()
    _, reward, done, info = env.step([LEFT, LEFT, FORWARD, LEFT, FORWARD, FORWARD, FORWARD])
    assert (reward, done, info["moves_used"]) == (96.0, True, 5)


def test_walls_clamp_position():
    env = GridWorld()
    assert env.move((0, 0, 0), FORWARD) == ((0, 0, 0), -1.0, False)  # north wall
    assert env.move((0, 2, 3), FORWARD) == ((0, 2, 3), -1.0, False)  # west wall
    assert env.move((3, 3, 1), FORWARD) == ((3, 3, 1), -1.0, False)  # east wall
    assert env.move((3, 3, 2), FORWARD) == ((3, 3, 2), -1.0, False)  # south wall
    assert env.move((2, 2, 2), FORWARD) == ((2, 3, 2), -1.0, False)  # open cell: y + 1 facing south


def test_turn_semantics():
    env = GridWorld()
    assert [env.move((2, 2, o), LEFT)[0][2] for o in range(4)] == [3, 0, 1, 2]  # (o − 1) mod 4
    with pytest.raises(ValueError, match="unknown move"):
        env.move((2, 2, 0), RIGHT)  # not enabled by default
    env3 = GridWorld(turn_right=True)
    assert [env3.move((2, 2, o), RIGHT)[0][2] for o in range(4)] == [1, 2, 3, 0]


# ---- exact values ------------------------------------------------------------------------------
def test_value_iteration_next_to_goal_by_hand():
    env = GridWorld()
    V, Q = value_iteration(env, G)
    assert V[0, 2, 1] == pytest.approx(100.0)  # (1, 2) facing north: forward reaches the goal
    assert V[0, 1, 2] == pytest.approx(-1 + G * 100)  # (2, 1) facing north: turn left, then forward
    assert Q[(2, 1, 0)][FORWARD] == pytest.approx(-1 + G * V[0, 0, 2])
    assert V[3, 1, 2] == pytest.approx(100.0)  # (2, 1) facing west: forward at once


def test_policy_evaluation_matches_monte_carlo():
    env = GridWorld()
    pi = scripted_policy(env, epsilon=0.3, gamma=G)
    V = policy_evaluation(env, pi, G)
    rng = random.Random(0)
    returns = []
    for _ in range(3000):
        s, g, disc = (3, 3, 1), 0.0, 1.0
        for _ in range(200):
            s, r, done = env.move(s, sample_action(pi(s), rng))
            g += disc * r
            disc *= G
            if done:
                break
        returns.append(g)
    se = np.std(returns) / math.sqrt(len(returns))
    assert abs(np.mean(returns) - V[1, 3, 3]) < 4 * se + 0.05


def test_grid_values_indexing_is_o_y_x():
    V = np.arange(64, dtype=float).reshape(4, 4, 4)  # V[o, y, x] = 16 o + 4 y + x
    states = [(0, 0, 0), (3, 0, 0), (0, 2, 0), (1, 2, 3), (3, 3, 3)]
    assert grid_values(V, states).tolist() == [16 * o + 4 * y + x for x, y, o in states]
    V[:, 1, 1] = np.nan  # the goal's cells: terminal, the judge reads 0
    assert exact_judge(V)([(1, 1, 2), (2, 1, 0)]).tolist() == [0.0, 16 * 0 + 4 * 1 + 2]


# ---- state text and the move menu ---------------------------------------------------------------
def offset_answer(env):
    """The move named first by the state text's offset: the ahead/behind part, else the sideways part."""
    def answer(state, j=0):
        ahead, right = goal_offset(env, state)
        n, d = ((abs(ahead), "ahead" if ahead > 0 else "behind") if ahead
                else (abs(right), "right" if right > 0 else "left"))
        return f"{n} cells {d}"
    return answer


def best_menu_answer(env, V):
    """The menu move with the highest exact V*-advantage from ``state``; among equally good moves the one that
    goes furthest (so following it reaches the goal in two moves: an optimal route here is at most two legs)."""
    names = [f"{n} cells {d}" for d in DIRECTIONS for n in (1, 2, 3)]

    def answer(state, j=0):
        outs = [execute_chain(env, state, parse_move(t).moves, 0.0) for t in names]
        adv = first_chain_advantages(outs, V, G)
        best = [i for i in range(len(names)) if adv[i] >= adv.max() - 1e-9]
        return names[max(best, key=lambda i: (outs[i].done, outs[i].k))]
    return answer


def test_goal_offset_means_what_the_text_says():
    """Following the offset (ahead/behind first, then sideways, re-reading it after each move) reaches the goal
    from all 60 starts in two menu moves; and the menu holds an optimal move (V*-advantage 0) for every state."""
    env = GridWorld()
    V, _ = value_iteration(env, G)
    follow, best = offset_answer(env), best_menu_answer(env, V)
    for s in env.start_states():
        state = s
        ahead, right = goal_offset(env, s)
        text = state_text(env, s)
        assert (f"{abs(ahead)} cell" in text) == (ahead != 0) and (f"{abs(right)} cell" in text) == (right != 0)
        assert ("ahead" in text) == (ahead > 0) and ("behind" in text) == (ahead < 0)
        assert ("your right" in text) == (right > 0) and ("your left" in text) == (right < 0)
        for _ in range(2):
            o = execute_chain(env, state, parse_move(follow(state)).moves, -20)
            state = o.next_state
            if o.done:
                break
        assert o.done, s
        o = execute_chain(env, s, parse_move(best(s)).moves, 0.0)
        assert abs(first_chain_advantages([o], V, G)[0]) < 1e-9


def test_failure_penalty_is_below_every_valid_move():
    env, cfg = GridWorld(), LactChainConfig()
    V, _ = value_iteration(env, G)
    starts = env.start_states()
    valid = first_chain_advantages([execute_chain(env, s, c, 0.0) for s in starts for c in menu(cfg.max_cells)], V, G)
    failed = first_chain_advantages([execute_chain(env, s, [], cfg.empty_chain_penalty) for s in starts], V, G)
    assert failed.max() < valid.min()


# ---- parser ---------------------------------------------------------------------------------------
def test_parser_accepts_moves_of_the_menu():
    assert parse_move("1 cell to the left") == ParsedChain([LEFT, FORWARD], True, "", "1 cell left")
    assert parse_move("2 cells ahead").moves == [FORWARD, FORWARD]
    assert parse_move(" 3 Cells To Your RIGHT. and then some").moves == [LEFT] * 3 + [FORWARD] * 3
    assert parse_move("2 cell behind\n").moves == [LEFT, LEFT, FORWARD, FORWARD]
    assert parse_move("1 cells to left").moves == [LEFT, FORWARD]
    assert len({tuple(parse_move(f"{n} cells {d}").moves) for n in (1, 2, 3) for d in DIRECTIONS}) == 12 == len(menu())


@pytest.mark.parametrize("text", [
    "", "   ", "no move here", "cells left", "1 left", "0 cells ahead", "4 cells ahead", "12 cells left",
    "-1 cells left", "1 cell up", "1 cell north", "1 cell to the lefty", "1 cell aheadward", "one cell ahead",
    "1.5 cells left", "left 1 cell", "\ud800 1 cell left", "1 cell to the", "9" * 5000 + " cells left",
    None, 42, b"1 cell left", ["1 cell left"],
])
def test_parser_never_crashes_on_garbage(text):
    p = parse_move(text)
    assert p.ok is False and p.moves == [] and p.error


def test_parser_fuzz_never_raises():
    rng = random.Random(0)
    alphabet = "0123456789 cellstoheyuraighbndfwk.\n,"
    valid = "2 cells to the right"
    for _ in range(3000):
        if rng.random() < 0.5:
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        else:
            cut = rng.randint(0, len(valid))
            text = valid[:cut] + rng.choice(alphabet) + valid[cut + rng.randint(0, 3):]
        p = parse_move(text)
        assert p.ok == bool(p.moves)
        assert all(m in (LEFT, FORWARD) for m in p.moves)


def test_stop_function_ends_at_the_move_or_at_a_break():
    assert not move_complete("2") and not move_complete("2 cells") and not move_complete("2 cells to the")
    assert move_complete("2 cells to the left") and move_complete("1 cell ahead")
    assert move_complete("I think.") and move_complete("hmm\n")


# ---- chains, returns, advantages ------------------------------------------------------------------
def test_execute_chain_and_advantage_by_hand():
    env = GridWorld()
    o = execute_chain(env, (2, 1, 0), [LEFT, FORWARD, FORWARD], empty_penalty=-5)  # goal after 2 moves
    assert (o.rewards, o.next_state, o.done, o.k) == ([-1.0, 100.0], (1, 1, 3), True, 2)
    assert o.chain_return(G) == pytest.approx(-1 + G * 100)
    assert chain_advantage(o.chain_return(G), o.k, 50.0, 1234.0, o.done, G) == pytest.approx(-1 + G * 100 - 50)
    o2 = execute_chain(env, (2, 1, 0), [FORWARD, FORWARD], empty_penalty=-5)  # bumps the north wall
    assert (o2.next_state, o2.done, o2.k) == ((2, 0, 0), False, 2)
    assert chain_advantage(o2.chain_return(G), o2.k, 90.0, 80.0, o2.done, G) == pytest.approx(-1 - G + G ** 2 * 80 - 90)
    e = execute_chain(env, (2, 1, 0), [], empty_penalty=-5)  # a wasted tick, state unchanged
    assert (e.rewards, e.next_state, e.done, e.k) == ([-5.0], (2, 1, 0), False, 1)


def test_mc_samples_partial_returns_and_tail_discounts():
    a, b, c, d = (0, 0, 0), (0, 0, 3), (2, 2, 1), (3, 3, 0)
    cut = mc_samples([a, b, c], [-1.0, -2.0, -3.0], d, reached=False, gamma=G)
    assert [s.state for s in cut] == [a, b, c] and all(s.tail_state == d for s in cut)
    assert [s.partial for s in cut] == pytest.approx([-1 - 2 * G - 3 * G ** 2, -2 - 3 * G, -3.0])
    assert [s.tail_discount for s in cut] == pytest.approx([G ** 3, G ** 2, G])
    done = mc_samples([a, b], [-1.0, 100.0], (1, 1, 0), reached=True, gamma=G)
    assert [s.tail_discount for s in done] == [0.0, 0.0] and done[0].partial == pytest.approx(-1 + G * 100)


def test_episode_samples_discount_per_move_and_bootstrap_the_cut():
    a = ChainOutcome((0, 0, 0), [LEFT, LEFT], [-1.0, -1.0], (0, 0, 2), False)
    b = ChainOutcome((0, 0, 2), [], [-20.0], (0, 0, 2), False)  # a parse failure: one tick
    c = ChainOutcome((0, 0, 2), [FORWARD], [-1.0], (0, 1, 2), False)
    s = episode_samples([a, b, c], G)
    assert [x.state for x in s] == [(0, 0, 0), (0, 0, 2), (0, 0, 2)]
    assert [x.partial for x in s] == pytest.approx([-1 - G - 20 * G ** 2 - G ** 3, -20 - G, -1.0])
    assert [x.tail_discount for x in s] == pytest.approx([G ** 4, G ** 2, G]) and s[0].tail_state == (0, 1, 2)
    won = episode_samples([a, ChainOutcome((0, 0, 2), [LEFT, FORWARD], [-1.0, 100.0], (1, 1, 1), True)], G)
    assert [x.tail_discount for x in won] == [0.0, 0.0]


class OneHotEncoder:
    """A stand-in for MiniLM: one orthogonal vector per distinct text (so the critic is a lookup table)."""

    dim = 64

    def __init__(self):
        self.index = {}

    def embed(self, texts):
        rows = [self.index.setdefault(t, len(self.index)) for t in texts]
        return torch.eye(self.dim)[rows]


def test_fit_critic_bootstraps_cut_episodes():
    """A → B, cut after one move (reward −1); from B every episode completes with return 10.
    True V(A) = −1 + γ·10; without the bootstrap the fit would learn the cut return −1."""
    env = GridWorld()
    A, B, goal = (3, 3, 0), (3, 2, 0), (1, 1, 0)
    samples = [MCSample(A, -1.0, B, G)] * 4 + [MCSample(B, 10.0, goal, 0.0)] * 4
    cfg = LactChainConfig(critic_steps=400, critic_lr=1e-2, bootstrap_fits=3)
    torch.manual_seed(0)
    critic = Critic(OneHotEncoder(), env, hidden=16)
    fit_critic(critic, samples, cfg)
    vA, vB = critic.values([A, B])
    assert vB == pytest.approx(10.0, abs=0.3)
    assert vA == pytest.approx(-1 + G * 10, abs=0.4)
    no_boot = Critic(OneHotEncoder(), env, hidden=16)
    fit_critic(no_boot, samples, LactChainConfig(critic_steps=400, critic_lr=1e-2, bootstrap_fits=1))
    assert no_boot.values([A])[0] == pytest.approx(-1.0, abs=0.3)
    assert critic.values([goal])[0] == 0.0  # terminal


# ---- a scripted actor: episodes, evaluation, preferences without a language model ----------------------
def fake_samples(prompts: list[str], texts: list[str], n: int) -> Samples:
    R = len(texts)
    return Samples(prompts=prompts, prompt_texts=[p for p in prompts for _ in range(n)],
                   prompt_index=torch.arange(len(prompts)).repeat_interleave(n),
                   prompt_ids=torch.ones(R, 2, dtype=torch.long),
                   prompt_mask=torch.ones(R, 2, dtype=torch.long), completion_ids=torch.ones(R, 1, dtype=torch.long),
                   completion_mask=torch.ones(R, 1, dtype=torch.long), logprobs=torch.zeros(R, 1), texts=texts)


class ScriptedActor:
    """Answers with ``answer(state, sample_index)``; same interface as ``Actor`` for the pipeline."""

    def __init__(self, env, cfg, answer):
        self.env, self.cfg, self.answer, self.calls = env, cfg, answer, []

    def propose(self, states, n=1, temperature=None, seed=None):
        self.calls.append(list(states))
        texts = [self.answer(s, j) for s in states for j in range(n)]
        return Proposals(list(states), fake_samples([str(s) for s in states], texts, n),
                         [parse_move(t, self.cfg.max_cells) for t in texts])


def test_run_episodes_lockstep_budget_and_first_chain():
    env, cfg = GridWorld(), LactChainConfig(max_chains=3)
    starts = [(0, 0, 0), (1, 2, 0), (3, 3, 1)]
    actor = ScriptedActor(env, cfg, lambda s, j: "banana" if s == (3, 3, 1) else offset_answer(env)(s, j))
    eps = run_episodes(actor, starts, cfg.max_chains)
    assert [len(o) for o in eps.outcomes] == [2, 1, 3]  # two legs; one leg; the budget
    assert eps.success().tolist() == [1.0, 1.0, 0.0]
    assert eps.parsed_ok == [[True, True], [True], [False, False, False]]
    assert actor.calls[0] == starts and len(actor.calls[1]) == 2 and len(actor.calls[2]) == 1  # finished ones drop out
    assert eps.first.states == starts and eps.first.parsed[1].moves == [FORWARD]
    samples = eps.samples(G)
    assert len(samples) == 6 and samples[-1].tail_discount == pytest.approx(G)  # the cut episode is bootstrapped


def test_evaluate_per_state_means_over_k_samples():
    env = GridWorld()
    cfg = LactChainConfig(max_chains=2)
    V, _ = value_iteration(env, G)
    states = env.start_states()[:10]
    good = best_menu_answer(env, V)
    actor = ScriptedActor(env, cfg, lambda s, j: good(s, j))
    ev = evaluate(actor, states, V, k=4)
    assert ev.success.shape == (10,) and ev.success.tolist() == [1.0] * 10
    assert np.abs(ev.advantage).max() < 1e-9 and ev.parse_failure.tolist() == [0.0] * 10
    # every second sample (per state, row-major) is garbage: success and failure rates are per-state means
    rows = iter(range(10 ** 6))
    half = ScriptedActor(env, cfg, lambda s, j: good(s, j) if next(rows) % 2 == 0 else "no idea")
    ev = evaluate(half, states, V, k=4)
    assert ev.success.shape == (10,) and 0.0 < ev.success.mean() < 1.0
    assert np.all(ev.advantage < 0) and ev.summary()["episodes"] == 40
    assert np.all(ev.parse_failure > 0) and np.all(ev.parse_failure < 1)


def test_chain_baselines_match_simulation():
    env = GridWorld()
    cfg = LactChainConfig(max_chains=2)
    V, _ = value_iteration(env, G)
    states = env.start_states()
    b = chain_baselines(env, states, V, cfg)
    rng = random.Random(0)
    chains = menu(cfg.max_cells)
    for i in (0, 17, 42):
        hits = 0
        for _ in range(3000):
            s = states[i]
            for _ in range(cfg.max_chains):
                o = execute_chain(env, s, rng.choice(chains), 0.0)
                s = o.next_state
                if o.done:
                    hits += 1
                    break
        assert abs(hits / 3000 - b["random"]["success"][i]) < 4 * math.sqrt(0.25 / 3000) + 1e-9
    best_constant = max(np.mean([run_const(env, s, c, cfg.max_chains) for s in states]) for c in chains)
    assert b["constant"]["success"].mean() == best_constant


def run_const(env, s, c, chains):
    for _ in range(chains):
        o = execute_chain(env, s, c, 0.0)
        if o.done:
            return 1.0
        s = o.next_state
    return 0.0


def test_collect_preferences_rows_values_and_failure_order():
    env = GridWorld()
    cfg = LactChainConfig(samples_per_state=3)
    states = [(3, 3, 0), (0, 0, 1), (3, 0, 2)]

    def judge(ss):  # distinct values, and high where the chains start: V(s) and V(s′) cannot be confused
        return np.array([1000.0 + states.index(s) if s in states else -1000.0 - (16 * s[2] + 4 * s[1] + s[0])
                         for s in ss])

    answers = {(3, 3, 0): ["1 cell ahead", "garbage", "1 cell behind"],   # failure vs two valid moves
               (0, 0, 1): ["nope", "1 cell ahead", "nope"],              # one valid move: it beats both failures
               (3, 0, 2): ["x", "y", "z"]}                               # all failures: a tie, no pair
    actor = ScriptedActor(env, cfg, lambda s, j: answers[s][j])
    pairs = collect_preferences(actor, judge, states, cfg)
    assert [o.state for o in pairs.outcomes] == [s for s in states for _ in range(3)]  # row i answers states[i // n]
    for i, o in enumerate(pairs.outcomes):
        assert pairs.values[i] == judge([o.state])[0] and pairs.next_values[i] == judge([o.next_state])[0]
        assert pairs.advantages[i] == pytest.approx(chain_advantage(o.chain_return(G), o.k, pairs.values[i],
                                                                    pairs.next_values[i], o.done, G))
    # the failure at row 1 has the HIGHEST advantage under this judge (its V(s′) = V(s) is high), yet it is rejected
    assert pairs.advantages[1] > max(pairs.advantages[0], pairs.advantages[2])
    assert pairs.rejected[0] == 1 and pairs.chosen[0] == max((0, 2), key=lambda i: pairs.advantages[i])
    assert pairs.chosen[1] == 4 and pairs.rejected[1] in (3, 5)
    assert len(pairs) == 2 and pairs.ties == 1


def test_best_worst_pairs_ties_and_groups():
    states = ["a", "a", "a", "b", "b", "c"]
    ok = [True, True, True, True, True, True]
    chosen, rejected, ties = best_worst_pairs(states, ok, [1.0, 3.0, 2.0, 0.5, 0.5, 9.0])
    assert (chosen, rejected, ties) == ([1], [0], 1)  # b is a tie; c has one sample: no pair
    chosen, rejected, _ = best_worst_pairs(["a", "a"], [False, True], [100.0, -100.0])
    assert (chosen, rejected) == ([1], [0])


# ---- SimPO loss -------------------------------------------------------------------------------------
def test_simpo_loss_by_hand_and_length_normalised():
    beta, gamma = 2.0, 0.5
    cw = torch.tensor([[-1.0, -1.0, 0.0]])
    mw = torch.tensor([[1, 1, 0]])
    cl = torch.tensor([[-2.0, -2.0, -2.0]])
    ml = torch.tensor([[1, 1, 1]])
    loss, stats = simpo_loss(cw, mw, cl, ml, beta, gamma)
    margin = beta * (-1 - -2) - gamma
    assert loss.item() == pytest.approx(math.log1p(math.exp(-margin)))
    assert stats["stats/margin"] == pytest.approx(margin) and stats["stats/pref_accuracy"] == 1.0
    loss_long, _ = simpo_loss(torch.full((1, 6), -1.0), torch.ones(1, 6), cl, ml, beta, gamma)
    assert loss_long.item() == pytest.approx(loss.item())
    swapped, _ = simpo_loss(cl, ml, cw, mw, beta, gamma)
    assert swapped.item() > loss.item()
    cw_var = cw.clone().requires_grad_(True)
    simpo_loss(cw_var, mw, cl, ml, beta, gamma)[0].backward()
    assert (cw_var.grad[0, :2] < 0).all() and cw_var.grad[0, 2] == 0


# ---- the real actor: prompt, sampling, SimPO on pairs from collect_preferences ----------------------
@pytest.fixture(scope="module")
def lora_actor():
    from rlnlp.models import attach_lora, load_policy

    torch.manual_seed(0)
    model, tok = load_policy(device="cpu", dtype=torch.float32)  # its own copy: LoRA freezes the base weights
    cfg = LactChainConfig.smoke()
    model = attach_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    return Actor(model, tok, GridWorld(), cfg)


@pytest.mark.slow
def test_actor_prompt_and_proposals(lora_actor):
    env, states = lora_actor.env, [(0, 0, 0), (3, 2, 1)]
    prompts = lora_actor.prompts(states)
    assert prompts[0].endswith(ANSWER_PREFIX) and "(3, 2) facing east" in prompts[1]
    assert "goal position is at (1, 1)" in prompts[0]
    system = rules(env)
    # a schema, no example
    assert system in prompts[0] and not any(parse_move(system[i:]).ok for i in range(len(system)))
    assert len(lora_actor.tokenizer(prompts[0])["input_ids"]) <= 100
    props = lora_actor.propose(states, n=3, seed=0)
    assert props.samples.prompt_index.tolist() == [0, 0, 0, 1, 1, 1] and props.row_states()[3] == (3, 2, 1)
    assert all(len(t) < 60 for t in props.samples.texts)  # stopped at the end of the move


@pytest.mark.slow
def test_untrained_actor_reads_the_state(lora_actor):
    """Greedy over all 60 start states, the untrained actor (the base model: the adapter switched off, whatever other
    tests trained) gives ≥ 10 distinct answers, nearly all valid moves (with the old "Move " prefix: 7, 4 of them
    valid)."""
    with lora_actor.model.disable_adapter():
        props = lora_actor.propose(lora_actor.env.start_states(), n=1, temperature=0.0)
    texts = props.samples.texts
    assert len(texts) == 60
    assert len(set(texts)) >= 10, sorted(set(texts))
    assert np.mean([p.ok for p in props.parsed]) >= 0.9
    # several different chains, not one move in many spellings
    assert len({tuple(p.moves) for p in props.parsed if p.ok}) >= 6


@pytest.mark.slow
def test_simpo_raises_margin_on_pairs_from_collect_preferences(lora_actor):
    cfg = dataclasses.replace(lora_actor.cfg, simpo_lr=1e-3, simpo_epochs=4, simpo_batch=4)
    actor = Actor(lora_actor.model, lora_actor.tokenizer, lora_actor.env, cfg)
    env = actor.env
    V, _ = value_iteration(env, G)
    states = env.start_states()[::6]  # 10 states × 4 samples
    pairs = collect_preferences(actor, exact_judge(V), states, cfg, n=4, seed=0)
    assert len(pairs) >= 4, "too few non-tied states to train on"
    for c, r in zip(pairs.chosen, pairs.rejected):  # chosen and rejected answer the same state, chosen ranks higher
        assert pairs.outcomes[c].state == pairs.outcomes[r].state
        assert (pairs.ok[c], pairs.advantages[c]) > (pairs.ok[r], pairs.advantages[r])
    before = preference_stats(actor.model, pairs, cfg)
    history = train_simpo(actor.model, pairs, cfg)
    after = preference_stats(actor.model, pairs, cfg)
    assert len(history) == cfg.simpo_epochs * math.ceil(len(pairs) / cfg.simpo_batch)
    assert after["stats/margin"] > before["stats/margin"] + 0.1
    assert after["losses/simpo"] < before["losses/simpo"]


@pytest.mark.full_dryrun
def test_full_preset_one_round_with_its_shapes(encoder):
    """The full preset's shapes — 16 samples per state, SimPO minibatches of 32 pairs, generation batches of
    256 rows — through evaluation, the critic fit, pairs and one SimPO round, on 32 of the 60 states."""
    from rlnlp.lactchain import simpo_rounds
    from rlnlp.models import attach_lora, load_policy

    cfg = LactChainConfig.full()
    cfg.rounds, cfg.simpo_epochs, cfg.eval_states = 1, 1, 32
    env = GridWorld()
    V, _ = value_iteration(env, cfg.gamma)
    model, tok = load_policy(device="cpu", dtype=torch.float32)
    model = attach_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    actor = Actor(model, tok, env, cfg)
    states = env.start_states()[:cfg.eval_states]
    ev = evaluate(actor, states, V, cfg.samples_per_state, seed=0)
    assert len(ev.episodes.outcomes) == 32 * cfg.samples_per_state
    critic = Critic(encoder, env, cfg.critic_hidden, cfg.value_scale)
    fit_critic(critic, ev.episodes.samples(cfg.gamma), cfg)
    from rlnlp.lactchain import score_proposals

    pairs = score_proposals(ev.episodes.first, [ep[0] for ep in ev.episodes.outcomes], critic.values, cfg)
    history, rounds = simpo_rounds(actor, critic.values, pairs, states, cfg)
    assert rounds[0]["samples"] == 32 * cfg.samples_per_state
    assert len(history) == math.ceil(len(pairs) / cfg.simpo_batch) >= 1
    assert all(np.isfinite(h["losses/simpo"]) for h in history)
