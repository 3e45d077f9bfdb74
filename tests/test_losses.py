"""rlnlp.losses against numbers computed by hand (in the comments), values and gradients, every branch."""
import math

import pytest
import torch

from rlnlp.losses import normalize, ppo_clip_loss, reinforce_loss, value_loss


def test_ppo_clip_takes_the_pessimistic_branch_for_each_sign_of_the_advantage():
    # Mutations seen to fail: torch.max instead of torch.min (the optimistic branch); clamp(ratio, 1 − ε, 1 + ε)
    # replaced by clamp(ratio, 1 − ε, 1 + 2ε) (the clipped rows' values move).
    #   row  ρ    A    ρ·A    clip(ρ)·A   −min        branch      d(−min)/d log π = −ρ·A if unclipped else 0
    #   0   1.5   +2   3.0    1.2·2 = 2.4  −2.4       clipped     0
    #   1   0.5   +2   1.0    0.8·2 = 1.6  −1.0       unclipped   −1.0
    #   2   1.5   −1  −1.5    1.2·−1 = −1.2  +1.5     unclipped   +1.5
    #   3   0.5   −1  −0.5    0.8·−1 = −0.8  +0.8     clipped     0
    #   4   1.1   +1   1.1    1.1          −1.1       inside      −1.1
    ratio = torch.tensor([1.5, 0.5, 1.5, 0.5, 1.1])
    adv = torch.tensor([2.0, 2.0, -1.0, -1.0, 1.0])
    old = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.5])
    logp = (old + ratio.log()).requires_grad_()
    loss, stats = ppo_clip_loss(logp, old, adv, clip=0.2)
    assert loss.item() == pytest.approx((-2.4 - 1.0 + 1.5 + 0.8 - 1.1) / 5, abs=1e-6)  # −0.44
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([0.0, -1.0, 1.5, 0.0, -1.1]) / 5)
    assert stats["stats/clip_fraction"] == pytest.approx(4 / 5)  # |ρ − 1| > 0.2 on rows 0–3
    k3 = lambda r: (r - 1) - math.log(r)  # noqa: E731  k3(1.5) = 0.094535, k3(0.5) = 0.193147, k3(1.1) = 0.004690
    assert stats["stats/approx_kl"] == pytest.approx((2 * k3(1.5) + 2 * k3(0.5) + k3(1.1)) / 5, abs=1e-6)


def test_ppo_clip_mask_averages_over_kept_tokens_only():
    # Mutation seen to fail: per.mean() instead of masked_mean(per, mask) (the masked token's −3.0 counts).
    # tokens (ρ = 1 everywhere, so −min = −A): A = [[1, 2], [3, 4]], mask [[1, 1], [1, 0]] → −(1 + 2 + 3) / 3 = −2
    logp = torch.zeros(2, 2, requires_grad=True)
    loss, _ = ppo_clip_loss(logp, torch.zeros(2, 2), torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
                            mask=torch.tensor([[1.0, 1.0], [1.0, 0.0]]))
    assert loss.item() == pytest.approx(-2.0)
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-1.0, -2.0], [-3.0, 0.0]]) / 3)


def test_value_loss_clipped_branch_by_hand():
    # Mutation seen to fail: torch.min instead of torch.max in the clipped branch (row 0 would give 1.0, not 3.24).
    #   row  V    G    V_old  (V − G)²   V_clip = V_old + clamp(V − V_old, ±0.2)   (V_clip − G)²   max
    #   0   1.0  0.0   2.0    1.00       2.0 − 0.2 = 1.8                           3.24            3.24 (clipped)
    #   1   0.1  1.0   0.0    0.81       0.1 (inside the clip)                     0.81            0.81
    # L = ½ · mean(3.24, 0.81) = 1.0125; dL/dV = [0 (V_clip is constant there), ½ · ½ · 2 · (0.1 − 1.0) = −0.45]
    values = torch.tensor([1.0, 0.1], requires_grad=True)
    returns, old = torch.tensor([0.0, 1.0]), torch.tensor([2.0, 0.0])
    loss, stats = value_loss(values, returns, old_values=old, clip=0.2)
    assert loss.item() == pytest.approx(1.0125) and stats["losses/value"] == pytest.approx(1.0125)
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([0.0, -0.45]))
    unclipped, _ = value_loss(values.detach(), returns)  # no clip: ½ · mean(1.00, 0.81) = 0.905 / 2
    assert unclipped.item() == pytest.approx(0.4525)
    with pytest.raises(ValueError, match=r"values \(2, 1\) vs returns \(2,\)"):
        value_loss(values.detach()[:, None], returns)


def test_reinforce_loss_by_hand_and_no_gradient_into_the_advantage():
    # Mutation seen to fail: dropping .detach() on the advantages (adv.grad becomes −log π / 2).
    # L = −mean(A · log π) = −mean(2 · −1, 1 · −2) = 2.0;  dL/dlog π = −A / 2 = [−1.0, −0.5]
    seq_logp = torch.tensor([-1.0, -2.0], requires_grad=True)
    adv = torch.tensor([2.0, 1.0], requires_grad=True)
    loss, stats = reinforce_loss(seq_logp, adv)
    assert loss.item() == pytest.approx(2.0) and stats["losses/policy"] == pytest.approx(2.0)
    loss.backward()
    torch.testing.assert_close(seq_logp.grad, torch.tensor([-1.0, -0.5]))
    assert adv.grad is None


def test_normalize_by_hand():
    # [1, 2, 3]: mean 2, sample std 1 → [−1, 0, 1]; one element: centred to 0 (its std is undefined)
    torch.testing.assert_close(normalize(torch.tensor([1.0, 2.0, 3.0])), torch.tensor([-1.0, 0.0, 1.0]))
    assert normalize(torch.tensor([5.0])).tolist() == [0.0]
