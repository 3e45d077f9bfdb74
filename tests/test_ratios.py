"""Importance ratios stay honest under bf16: π_old comes from the training forward itself, so every ratio is exactly 1
before the first update (the sampler's KV-cached log-probs differ from that forward by ~3e-2 nats per token in bf16)."""
import pytest
import torch

from rlnlp.archer import ArcherConfig, act, actor_step
from rlnlp.envs.twenty_questions import TwentyQuestions


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_ppo_ratio_is_exactly_one_before_the_first_update(monkeypatch, dtype):
    """ArCHer's PPO actor (and the token-level PPO baseline, through the same policy_step) takes π_old from the
    training forward, so every token's ratio is exactly 1 on the first step. Mutation seen to fail: π_old = the
    sampler's log-probs (``s.logprobs`` from act) — in bf16 they differ from the training forward by ~3e-2 nats."""
    import rlnlp.archer.actor as actor
    from rlnlp import attach_lora, load_policy

    monkeypatch.setenv("RLNLP_DTYPE", dtype)
    torch.manual_seed(0)
    model, tok = load_policy()
    model = attach_lora(model, r=4, alpha=8, dropout=0.0)
    cfg = ArcherConfig.smoke(actor_loss="ppo", kl_coef=0.0, ppo_epochs=1, train_batch=2)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    class Rules:
        chat, split = True, staticmethod(TwentyQuestions.split)

    u = act(model, tok, Rules(), ["Ask me a yes/no question about animals.", "Ask about fruit."] * 2, cfg, seed=0)
    seen = []
    real = actor.ppo_clip_loss
    monkeypatch.setattr(actor, "ppo_clip_loss", lambda logp, old, *a: seen.append((logp.detach(), old, a[-1])) or
                        real(logp, old, *a))
    actor_step(model, opt, u, torch.tensor([1.0, -1.0, 0.5, -0.5]), cfg)
    assert len(seen) == 2  # two chunks of train_batch rows, one optimiser step
    for logp, old, mask in seen:
        ratio = torch.exp(logp - old)[mask.bool()]
        assert ratio.numel() > 0 and torch.equal(ratio, torch.ones_like(ratio))
    sampler = u.samples.logprobs[u.samples.completion_mask.bool()]
    assert not torch.equal(sampler, u.old_logprobs[u.samples.completion_mask.bool()])  # the sampler's differ
