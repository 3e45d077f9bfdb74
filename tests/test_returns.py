"""Discounted returns and GAE against naive loops written straight from the definitions."""
import torch

from rlnlp.returns import discounted_returns, gae


def naive_returns(rewards, dones, gamma):
    T = len(rewards)
    out = []
    for t in range(T):
        g, discount = 0.0, 1.0
        for k in range(t, T):
            g += discount * rewards[k]
            if dones[k]:
                break
            discount *= gamma
        out.append(g)
    return out


def naive_gae(rewards, values, dones, next_value, gamma, lam):
    """A_t = Σ_l (γλ)^l δ_{t+l}, summing until the episode ends."""
    T = len(rewards)
    v_next = list(values[1:]) + [next_value]
    deltas = [rewards[t] + gamma * (0.0 if dones[t] else v_next[t]) - values[t] for t in range(T)]
    adv = []
    for t in range(T):
        a, w = 0.0, 1.0
        for k in range(t, T):
            a += w * deltas[k]
            if dones[k]:
                break
            w *= gamma * lam
        adv.append(a)
    return adv


def test_discounted_returns_match_naive_loop_across_episode_boundaries():
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(12, generator=g)
    dones = torch.tensor([0, 0, 1, 0, 0, 0, 1, 0, 1, 0, 0, 1], dtype=torch.float32)
    got = discounted_returns(rewards, dones, gamma=0.9)
    want = naive_returns(rewards.tolist(), dones.tolist(), 0.9)
    assert torch.allclose(got, torch.tensor(want), atol=1e-5)


def test_gae_matches_naive_loop_and_resets_at_episode_ends():
    g = torch.Generator().manual_seed(1)
    T, N = 10, 3
    rewards, values = torch.randn(T, N, generator=g), torch.randn(T, N, generator=g)
    dones = (torch.rand(T, N, generator=g) < 0.3).float()
    next_value = torch.randn(N, generator=g)
    adv, ret = gae(rewards, values, dones, next_value, gamma=0.97, lam=0.9)
    for n in range(N):
        want = naive_gae(rewards[:, n].tolist(), values[:, n].tolist(), dones[:, n].tolist(), next_value[n].item(),
                         0.97, 0.9)
        assert torch.allclose(adv[:, n], torch.tensor(want), atol=1e-5)
    assert torch.allclose(ret, adv + values)


def test_gae_does_not_leak_reward_across_a_boundary():
    # a large reward in the second episode must not change the first episode's advantages
    rewards = torch.tensor([0.0, 0.0, 0.0, 100.0])
    values = torch.zeros(4)
    dones = torch.tensor([0.0, 1.0, 0.0, 1.0])
    adv, _ = gae(rewards, values, dones, next_value=0.0, gamma=0.99, lam=0.95)
    assert adv[0].item() == 0.0 and adv[1].item() == 0.0
    assert adv[2].item() > 90


def test_gae_with_lambda_one_equals_returns_minus_values():
    g = torch.Generator().manual_seed(2)
    rewards, values = torch.randn(8, generator=g), torch.randn(8, generator=g)
    dones = torch.tensor([0, 0, 0, 1, 0, 0, 0, 0], dtype=torch.float32)
    adv, _ = gae(rewards, values, dones, next_value=0.5, gamma=0.9, lam=1.0)
    G = discounted_returns(rewards, dones, 0.9, next_value=0.5)
    assert torch.allclose(adv, G - values, atol=1e-5)
