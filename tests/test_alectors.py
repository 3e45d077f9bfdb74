"""alectors (spec 01): PPO direction, padding-blind pooling, GAE resets through the rollout path, maze baseline."""
import itertools
import random

import numpy as np
import pytest
import torch

from rlnlp import alectors as A
from rlnlp.envs.base import VecEnv
from rlnlp.envs.instruction_maze import InstructionMaze, random_policy_success
from rlnlp.returns import gae

E = 16  # a tiny fake encoder width keeps these tests fast


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: extra torch threads only add contention (see AlectorsConfig.cpu_threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FakeEncoder:
    """Stands in for TextEncoder: a fixed random embedding per word, cached per text like the real one."""

    def __init__(self, dim: int = E, seed: int = 0):
        self.dim, self.forward_passes, self._cache = dim, 0, {}
        self.gen = torch.Generator().manual_seed(seed)
        self.words: dict[str, torch.Tensor] = {}

    def token_strings(self, text):
        return text.lower().replace(".", " .").replace(",", " ,").replace(":", " :").split()

    def tokens(self, texts):
        rows = []
        for text in texts:
            if text not in self._cache:
                self.forward_passes += 1
                vecs = []
                for w in self.token_strings(text):
                    if w not in self.words:
                        self.words[w] = torch.randn(self.dim, generator=self.gen)
                    vecs.append(self.words[w])
                self._cache[text] = torch.stack(vecs)
            rows.append(self._cache[text])
        T = max(r.shape[0] for r in rows)
        emb, mask = torch.zeros(len(rows), T, self.dim), torch.zeros(len(rows), T, dtype=torch.bool)
        for i, r in enumerate(rows):
            emb[i, : len(r)], mask[i, : len(r)] = r, True
        return emb, mask


def small_cfg(**kw):
    return A.AlectorsConfig(d_model=16, n_heads=2, ff_dim=32, **kw)


def test_ppo_update_moves_probabilities_with_the_advantage_sign():
    torch.manual_seed(0)
    cfg = small_cfg(epochs=5)
    enc = FakeEncoder()
    agent = A.Alector(E, 4, cfg)
    opt = torch.optim.Adam(agent.parameters(), lr=cfg.lr)
    emb, mask = enc.tokens(["go up now", "go left now please"])  # different lengths: padding in row 0
    actions = torch.tensor([0, 2])
    with torch.no_grad():
        before = agent.dist(emb, mask).probs[torch.arange(2), actions]
        old_logp = agent.dist(emb, mask).log_prob(actions)
    A.ppo_update(agent, opt, emb, mask, actions, old_logp, advantages=torch.tensor([1.0, -1.0]),
                 returns=torch.zeros(2), old_values=torch.zeros(2), cfg=cfg)
    with torch.no_grad():
        after = agent.dist(emb, mask).probs[torch.arange(2), actions]
    assert after[0] > before[0] + 1e-3, (before, after)  # positive advantage: more likely
    assert after[1] < before[1] - 1e-3, (before, after)  # negative advantage: less likely


def test_pooling_ignores_padding():
    torch.manual_seed(0)
    agent = A.Alector(E, 3, small_cfg()).eval()
    emb = torch.randn(2, 7, E)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 4:] = False  # row 0 has 4 real tokens, 3 padded
    logits, weights = agent.actor(emb, mask)
    value = agent.value(emb, mask)
    garbage = emb.clone()
    garbage[0, 4:] = 100 * torch.randn(3, E)
    logits2, weights2 = agent.actor(garbage, mask)
    torch.testing.assert_close(logits2, logits)
    torch.testing.assert_close(agent.value(garbage, mask), value)
    assert torch.all(weights[0, 4:] == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    # and the pooling is a real softmax over tokens, not the original's all-ones weights
    assert weights[1].std() > 0
    # the same row without the padding columns gives the same output
    torch.testing.assert_close(agent.actor(emb[:1, :4], mask[:1, :4])[0], logits[:1])


def test_gae_resets_at_episode_ends_through_the_rollout_path():
    """A length-1 maze ends every episode after one step; the rollout's advantages must then be one-step:
    A_t = r_t − V(s_t), with nothing leaking from the next episode."""
    torch.manual_seed(0)
    cfg = small_cfg(maze_length=1, num_envs=3, num_steps=5)
    task = A.maze_task(cfg)
    enc = FakeEncoder()
    agent = A.make_agent(task, cfg, enc, torch.device("cpu"))
    envs = VecEnv(task.make_env, cfg.num_envs, seed=0)
    roll, _ = A.collect(agent, enc, envs, envs.reset(), task, cfg, np.zeros(cfg.num_envs))
    assert roll.dones.all()
    adv, ret = gae(roll.rewards, roll.values, roll.dones, roll.next_value, cfg.gamma, cfg.gae_lambda)
    torch.testing.assert_close(adv, roll.rewards - roll.values)
    torch.testing.assert_close(ret, roll.rewards)
    # rewards are scaled: an escape pays (1 + 5) / 6 = 1, a wrong move 0
    assert set(roll.rewards.unique().tolist()) <= {0.0, 1.0}
    assert len(roll.episode_returns) == cfg.num_envs * cfg.num_steps


def test_gae_chains_within_and_cuts_between_episodes_in_a_real_rollout():
    """Length-2 maze, random agent: episodes end after 1 or 2 steps. Raising the reward at t+1 must change
    A_t exactly when step t did not end its episode."""
    torch.manual_seed(0)
    cfg = small_cfg(maze_length=2, num_envs=4, num_steps=8)
    task = A.maze_task(cfg)
    enc = FakeEncoder()
    agent = A.make_agent(task, cfg, enc, torch.device("cpu"))
    envs = VecEnv(task.make_env, cfg.num_envs, seed=0)
    roll, _ = A.collect(agent, enc, envs, envs.reset(), task, cfg, np.zeros(cfg.num_envs))
    assert 0 < roll.dones[:-1].sum() < roll.dones[:-1].numel()  # both cases occur
    adv, _ = gae(roll.rewards, roll.values, roll.dones, roll.next_value, cfg.gamma, cfg.gae_lambda)
    for t in range(cfg.num_steps - 1):
        bumped = roll.rewards.clone()
        bumped[t + 1] += 1.0
        adv2, _ = gae(bumped, roll.values, roll.dones, roll.next_value, cfg.gamma, cfg.gae_lambda)
        changed = (adv2[t] - adv[t]).abs() > 1e-6
        assert torch.equal(changed, roll.dones[t] == 0), t


@pytest.mark.parametrize("length,moves", [(2, ("Up", "Down", "Left", "Right")), (3, ("Up", "Down", "Left")),
                                          (4, ("Up", "Down", "Left", "Right"))])
def test_maze_random_policy_success_is_vocab_to_the_minus_length(length, moves):
    maze = InstructionMaze(length, moves)
    route = [random.Random(length).choice(moves) for _ in range(length)]
    assert random_policy_success(maze, route) == pytest.approx(len(moves) ** -length)  # exact enumeration
    assert maze.random_policy_success() == pytest.approx(len(moves) ** -length)


def test_maze_random_policy_monte_carlo_and_expected_return():
    cfg = small_cfg(maze_length=2)
    task = A.maze_task(cfg)
    result = A.evaluate(A.uniform_policy(len(task.actions), seed=1), task, episodes=4000)
    p = 4 ** -2
    assert abs(result["success_rate"] - p) < 4 * np.sqrt(p * (1 - p) / 4000)
    expected = InstructionMaze(2).random_policy_return()
    assert abs(result["mean_return"] - expected) < 0.1


def test_maze_dynamics_and_text():
    maze = InstructionMaze(3)
    text = maze.reset(route=["Up", "Left", "Up"])
    assert text == "You are inside a maze. To escape you must go: Up, Left, Up. You have made 0 moves."
    obs, r, done, info = maze.step("Up")
    assert (r, done, info["correct"]) == (1.0, False, True) and "made 1 move." in obs
    obs, r, done, info = maze.step("Up")  # wrong: expected Left
    assert (r, done, info["escaped"], info["expected"]) == (0.0, True, False, "Left")
    maze.reset(route=["Up", "Left", "Up"])
    total = sum(maze.step(m)[1] for m in ["Up", "Left", "Up"])
    assert total == 3 + 5 and maze.done
    with pytest.raises(ValueError, match="unknown move"):
        maze.reset(seed=0)
        maze.step("Sideways")


def test_next_move_token_finds_the_route_word():
    tokens = FakeEncoder().token_strings("You are inside a maze. To escape you must go: Up, Left, Up. You have made 1 move.")
    assert tokens[A.next_move_token(tokens, ["Up", "Down", "Left", "Right"], 1)] == "left"
    assert A.next_move_token(tokens, ["Up", "Down", "Left", "Right"], 2) == tokens.index("up", tokens.index("left"))


def test_training_learns_a_length_one_maze():
    """Behaviour: a few PPO updates on a length-1 maze (random success 1/4) read the single move word."""
    torch.manual_seed(0)
    cfg = small_cfg(maze_length=1, num_envs=16, num_steps=4, lr=3e-3)
    task = A.maze_task(cfg)
    enc = FakeEncoder()
    agent, tracker = A.train(task, cfg, enc, updates=25, run_name="test_alectors_maze1")
    result = A.evaluate(A.agent_policy(agent, enc), task, episodes=200)
    assert result["success_rate"] > 0.9, result
    assert enc.forward_passes <= 4 * 2  # 4 routes × (start text, end text): the cache did its job


def test_capped_grid_episodes_bootstrap_from_the_last_state():
    """An episode cut by the step cap is not terminal: its last reward becomes r + γ·V(s_last); a goal is not bootstrapped."""
    torch.manual_seed(0)
    cfg = small_cfg(grid_max_steps=1, num_envs=8, num_steps=3)
    task = A.grid_task(cfg)
    enc = FakeEncoder()
    agent = A.make_agent(task, cfg, enc, torch.device("cpu"))
    envs = VecEnv(task.make_env, cfg.num_envs, seed=0)
    obs = envs.reset()
    roll, _ = A.collect(agent, enc, envs, obs, task, cfg, np.zeros(cfg.num_envs))
    assert roll.dones.all()  # every episode lasts one step
    grid = task.make_env()
    for t in range(cfg.num_steps):
        for i, text in enumerate(roll.texts[t]):
            state = next(s for s in grid.start_states() if grid.describe(s) == text)
            nxt, reward, reached = grid.move(state, task.actions[int(roll.actions[t, i])])
            expected = reward / task.value_scale
            if not reached:
                with torch.no_grad():
                    expected += cfg.gamma * float(agent.scaled_value(*enc.tokens([grid.describe(nxt)])))
            assert float(roll.rewards[t, i]) == pytest.approx(expected, abs=1e-5)
