"""LactChain (spec 02): grid dynamics, exact values, parser, advantages and pairs, SimPO loss, one real SimPO step."""
import math
import random

import numpy as np
import pytest
import torch

from rlnlp.envs.gridworld import FORWARD, LEFT, RIGHT, GridWorld, policy_evaluation, sample_action, value_iteration
from rlnlp.lactchain import (ANSWER_PREFIX, Actor, ChainOutcome, LactChainConfig, PreferencePairs, Proposals,
                             chain_advantage, episode_returns, execute_chain, make_pairs, parse_chain,
                             preference_stats, scripted_policy, simpo_loss, train_simpo)

ACTIONS = [FORWARD, LEFT]
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
    # (1, 2) facing north: one step forward reaches the goal → +100.
    assert V[0, 2, 1] == pytest.approx(100.0)
    # (2, 1) facing north: turn left (now west, −1), then forward into the goal (+100).
    assert V[0, 1, 2] == pytest.approx(-1 + G * 100)
    assert Q[(2, 1, 0)][FORWARD] == pytest.approx(-1 + G * V[0, 0, 2])
    # (2, 1) facing west: forward at once.
    assert V[3, 1, 2] == pytest.approx(100.0)


def test_policy_evaluation_matches_monte_carlo():
    env = GridWorld()
    pi = scripted_policy(env, epsilon=0.3, gamma=G)
    V = policy_evaluation(env, pi, G)
    rng = random.Random(0)
    start = (3, 3, 1)
    returns = []
    for _ in range(3000):
        s, g, disc = start, 0.0, 1.0
        for _ in range(200):
            s, r, done = env.move(s, sample_action(pi(s), rng))
            g += disc * r
            disc *= G
            if done:
                break
        returns.append(g)
    se = np.std(returns) / math.sqrt(len(returns))
    assert abs(np.mean(returns) - V[1, 3, 3]) < 4 * se + 0.05


# ---- parser ---------------------------------------------------------------------------------------
def test_parser_accepts_valid_fenced_and_case_variants():
    p = parse_chain('{"explain": "go", "moves": ["turn left", "move forward"]}', ACTIONS)
    assert (p.ok, p.moves, p.explain) == (True, [LEFT, FORWARD], "go")
    p = parse_chain('Sure!\n```json\n{"Moves": ["Turn  Left"]}\n```\nbye {', ACTIONS)
    assert (p.ok, p.moves) == (True, [LEFT])
    p = parse_chain('{"explain": "x", "moves": ["move forward"]} trailing } text {', ACTIONS)
    assert (p.ok, p.moves) == (True, [FORWARD])
    p = parse_chain('{"moves": ["turn left", "move forward"], "explain": "cut by the token ca', ACTIONS)  # salvaged
    assert (p.ok, p.moves) == (True, [LEFT, FORWARD])
    p = parse_chain('{"explain": "stay", "moves": []}', ACTIONS)
    assert (p.ok, p.moves) == (True, [])


@pytest.mark.parametrize("text", [
    "", "   ", "no json here", "{", "}", "}{", '{"explain": "truncated', '{"moves": ["turn left"',
    '["turn left"]', '"moves"', "null", "123", '{"moves": "turn left"}', '{"moves": [1, 2]}',
    '{"moves": ["left"]}', '{"moves": ["turn right"]}', '{"moves": ["turn left", null]}', '{"move": ["turn left"]}',
    '{"moves": {"a": 1}}', "{" * 50_000, '{"moves": ' + "[" * 50_000, '{"moves": ["turn left", "move forward", ...]}',
    '{"moves": ["turn left", "jump"], "explain": "cut', '{"moves": [', '{"moves": ["turn left"}, "x": 1}', "```json\n```", "```json\n{bad}\n```",
    '{"moves": ["move forward\u0000"]}', "\ud800 {", None, 42, b'{"moves": []}', ["turn left"],
])
def test_parser_never_crashes_on_garbage(text):
    p = parse_chain(text, ACTIONS)
    assert p.ok is False and p.moves == [] and p.error


def test_parser_fuzz_never_raises():
    rng = random.Random(0)
    alphabet = '{}[]",: \n`moveturnleftforwardjson\\0123'
    valid = '{"explain": "a", "moves": ["turn left", "move forward"]}'
    for _ in range(2000):
        if rng.random() < 0.5:
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        else:  # corrupt a valid answer: cut it and splice in a character
            cut = rng.randint(0, len(valid))
            text = valid[:cut] + rng.choice(alphabet) + valid[cut + rng.randint(0, 3):]
        p = parse_chain(text, ACTIONS)
        assert p.ok or p.moves == []
        assert all(m in ACTIONS for m in p.moves)


# ---- chains, returns, advantages, pairs ---------------------------------------------------------
def test_execute_chain_and_advantage_by_hand():
    env = GridWorld()
    # (2, 1) facing north: turn left, forward → goal after k = 2 moves, the third move is never run.
    o = execute_chain(env, (2, 1, 0), [LEFT, FORWARD, FORWARD], empty_penalty=-5)
    assert (o.rewards, o.next_state, o.done, o.k) == ([-1.0, 100.0], (1, 1, 3), True, 2)
    assert o.chain_return(G) == pytest.approx(-1 + G * 100)
    # done: V(s′) is not used. A = R − V(s)
    assert chain_advantage(o.chain_return(G), o.k, 50.0, 1234.0, o.done, G) == pytest.approx(-1 + G * 100 - 50)
    # not done: A = R + γ^k V(s′) − V(s); (2, 1) facing north, forward twice → wall at y = 0: (2, 0, 0)
    o2 = execute_chain(env, (2, 1, 0), [FORWARD, FORWARD], empty_penalty=-5)
    assert (o2.next_state, o2.done, o2.k) == ((2, 0, 0), False, 2)
    assert chain_advantage(o2.chain_return(G), o2.k, 90.0, 80.0, o2.done, G) == pytest.approx(-1 - G + G ** 2 * 80 - 90)
    # empty chain: a wasted tick, state unchanged
    e = execute_chain(env, (2, 1, 0), [], empty_penalty=-5)
    assert (e.rewards, e.next_state, e.done, e.k) == ([-5.0], (2, 1, 0), False, 1)
    assert chain_advantage(e.chain_return(G), e.k, 90.0, 90.0, e.done, G) == pytest.approx(-5 + G * 90 - 90)


def test_episode_returns_discount_per_move():
    a = ChainOutcome((0, 0, 0), [LEFT, LEFT], [-1.0, -1.0], (0, 0, 2), False)
    b = ChainOutcome((0, 0, 2), [FORWARD], [-1.0], (0, 1, 2), False)
    c = ChainOutcome((0, 1, 2), [LEFT, FORWARD], [-1.0, 100.0], (1, 1, 1), True)
    G_c = -1 + G * 100
    G_b = -1 + G * G_c
    G_a = -1 - G + G ** 2 * G_b
    assert episode_returns([a, b, c], G) == pytest.approx([G_a, G_b, G_c])


def test_make_pairs_prefers_higher_advantage_and_drops_ties():
    chosen, rejected, ties = make_pairs([1.0, 3.0, 2.0, -4.0, 0.5, 0.5], tie_tolerance=1e-6)
    assert (chosen, rejected, ties) == ([1, 2], [0, 3], 1)
    with pytest.raises(ValueError, match="two advantages per state"):
        make_pairs([1.0, 2.0, 3.0])


# ---- SimPO loss -------------------------------------------------------------------------------------
def test_simpo_loss_by_hand_and_length_normalised():
    beta, gamma = 2.0, 0.5
    cw = torch.tensor([[-1.0, -1.0, 0.0]])  # mean over 2 real tokens: −1
    mw = torch.tensor([[1, 1, 0]])
    cl = torch.tensor([[-2.0, -2.0, -2.0]])  # mean −2
    ml = torch.tensor([[1, 1, 1]])
    loss, stats = simpo_loss(cw, mw, cl, ml, beta, gamma)
    margin = beta * (-1 - -2) - gamma
    assert loss.item() == pytest.approx(math.log1p(math.exp(-margin)))
    assert stats["stats/margin"] == pytest.approx(margin)
    # length normalisation: the same per-token log-prob over a longer chosen answer gives the same loss
    loss_long, _ = simpo_loss(torch.full((1, 6), -1.0), torch.ones(1, 6), cl, ml, beta, gamma)
    assert loss_long.item() == pytest.approx(loss.item())
    # sign: swapping chosen and rejected makes the loss larger, and the gradient raises the chosen log-prob
    swapped, _ = simpo_loss(cl, ml, cw, mw, beta, gamma)
    assert swapped.item() > loss.item()
    cw_var = cw.clone().requires_grad_(True)
    simpo_loss(cw_var, mw, cl, ml, beta, gamma)[0].backward()
    assert (cw_var.grad[0, :2] < 0).all() and cw_var.grad[0, 2] == 0  # minimising raises chosen; padding inert


# ---- the real actor: prompt, sampling, one SimPO run ------------------------------------------------
@pytest.mark.slow
def test_actor_proposes_and_simpo_moves_margin():
    from rlnlp.models import attach_lora, load_policy
    from rlnlp.sampling import Samples

    model, tok = load_policy(device="cpu", dtype=torch.float32)  # its own copy: LoRA freezes the base weights
    cfg = LactChainConfig.smoke()
    cfg.max_new_tokens, cfg.simpo_lr, cfg.simpo_epochs, cfg.simpo_batch = 6, 2e-3, 3, 2
    model = attach_lora(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)
    env = GridWorld()
    actor = Actor(model, tok, env, cfg)
    states = [(0, 0, 0), (3, 2, 1)]
    props = actor.propose(states, n=2, seed=0)
    assert len(props.parsed) == 4 and props.samples.prompt_index.tolist() == [0, 0, 1, 1]
    assert all(t.startswith(ANSWER_PREFIX) for t in props.texts)
    assert "(3, 2) facing east" in actor.prompts(states)[1] and actor.prompts(states)[0].endswith(ANSWER_PREFIX)

    # hand-made pairs: a valid answer is preferred to garbage, for two states
    good = 'go", "moves": ["turn left"]}'
    bad = 'banana banana banana'
    prompts = actor.prompts(states)
    enc_p = tok([prompts[0], prompts[0], prompts[1], prompts[1]], return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = "right"
    enc_c = tok([good, bad, good, bad], return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = "left"
    samples = Samples(prompts=prompts, prompt_texts=prompts, prompt_index=torch.tensor([0, 0, 1, 1]),
                      prompt_ids=enc_p["input_ids"], prompt_mask=enc_p["attention_mask"],
                      completion_ids=enc_c["input_ids"], completion_mask=enc_c["attention_mask"],
                      logprobs=torch.zeros(enc_c["input_ids"].shape), texts=[good, bad, good, bad])
    pairs = PreferencePairs(Proposals(states, samples, []), [], [1.0, 0.0, 1.0, 0.0], [0.0] * 4,
                            chosen=[0, 2], rejected=[1, 3])
    before = preference_stats(model, pairs, cfg)
    history = train_simpo(model, pairs, cfg)
    after = preference_stats(model, pairs, cfg)
    assert len(history) == cfg.simpo_epochs
    assert after["stats/margin"] > before["stats/margin"]
    assert after["losses/simpo"] < before["losses/simpo"]
