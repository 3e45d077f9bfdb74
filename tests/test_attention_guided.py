"""Attention-guided RL (spec 03): the selector's math by hand, the reward by hand, learning mechanics on
the real SmolLM2 + LoRA with tiny budgets, checkpoint / resume."""
import math
import random

import pytest
import torch

import rlnlp
from rlnlp import attention_guided as ag

QUESTIONS = [{"id": f"q{i}", "question": q, "attribute": a} for i, (q, a) in
             enumerate([("Is it alive?", "alive"), ("Can it fly?", "fly"), ("Is it bigger than a car?", "big")])]
OBJECTS = [{"object": name, "category": "x", "answers": dict(zip(["q0", "q1", "q2"], ans))} for name, ans in
           [("dog", (True, False, False)), ("eagle", (True, True, False)), ("plane", (False, True, True)),
            ("rock", (False, False, False)), ("whale", (True, False, True))]]


def tiny_config(**kw):
    base = dict(dataset="twenty_questions", pool_size=2, query_tokens=3, batch_size=2, baseline_rows=0, episodes=2,
                checkpoint_every=1, eval_fraction=0.2, run_name="test_ag")
    return ag.AttentionGuidedConfig(**{**base, **kw})


def tiny_trainer(tmp_path, **kw):
    cfg = tiny_config(**kw)
    return ag.AttentionGuidedTrainer(cfg, pairs=ag.TwentyQuestionsPairs(cfg, table=(QUESTIONS, OBJECTS)), root=tmp_path)


# ---------------------------------------------------------------- selector math
def test_gqa_head_to_group_mapping_by_hand():
    heads = ag.Heads(n_heads=4, n_kv_heads=2, head_dim=2)
    assert heads.group_of_head().tolist() == [0, 0, 1, 1]
    # query heads: h0 = (1, 0), h1 = (0, 1), h2 = (1, 1), h3 = (0, 2)
    q = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 2.0]])
    # key 0: group 0 = (1, 0), group 1 = (0, 0);  key 1: group 0 = (0, 0), group 1 = (1, 1)
    k = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    probs = ag.selection_probs(q, k, torch.ones(1, 2, dtype=torch.bool), heads)

    def softmax2(a, b):  # scores already divided by √d = √2
        ea, eb = math.exp(a / math.sqrt(2)), math.exp(b / math.sqrt(2))
        return [ea / (ea + eb), eb / (ea + eb)]

    # h0·g0: (1, 0) ; h1·g0: (0, 0) ; h2·g1: (0, 2) ; h3·g1: (0, 2)
    per_head = [softmax2(1, 0), softmax2(0, 0), softmax2(0, 2), softmax2(0, 2)]
    expected = torch.tensor([sum(p[j] for p in per_head) / 4 for j in range(2)])
    torch.testing.assert_close(probs[0], expected)


def test_heads_read_from_config():
    from transformers import GPT2Config, LlamaConfig

    assert ag.heads_of(LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64)) == ag.Heads(9, 3, 64)
    assert ag.heads_of(GPT2Config(n_embd=64, n_head=4)) == ag.Heads(4, 4, 16)


def test_probabilities_sum_to_one_over_remaining_keys():
    torch.manual_seed(0)
    heads = ag.Heads(6, 3, 4)
    q, k = torch.randn(5, 24), torch.randn(7, 12)
    remaining = torch.rand(5, 7) < 0.6
    remaining[:, 0] = True
    probs = ag.selection_probs(q, k, remaining, heads, temperature=0.5)
    torch.testing.assert_close(probs.sum(1), torch.ones(5))
    assert (probs[~remaining] == 0).all() and (probs[remaining] > 0).all()


def test_gpt2_fused_c_attn_is_split_in_thirds():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=16, vocab_size=50, n_positions=16)).eval()
    ids = torch.randint(0, 50, (2, 5))
    hidden = {}
    model.transformer.h[-1].ln_1.register_forward_hook(lambda _m, _i, out: hidden.__setitem__("x", out))
    with ag.capture_projections(model) as cap:
        model(input_ids=ids)
    qkv = model.transformer.h[-1].attn.c_attn(hidden["x"])
    torch.testing.assert_close(cap["q"], qkv[..., :16])
    torch.testing.assert_close(cap["k"], qkv[..., 16:32])


# ---------------------------------------------------------------- data
def test_pools_wikipedia_chunks_and_twenty_questions_answers():
    tok = rlnlp.load_tokenizer()
    cfg = ag.AttentionGuidedConfig(pool_size=3, key_tokens=4, value_tokens=5)
    text = "The quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat near the old barn door today, and the farmer counts his sheep twice before the evening rain begins to fall."
    pairs = ag.WikipediaPairs(tok, cfg, summaries={"Fox": text, "Short": "Too short.", "Other": text})
    assert pairs.pool_from("Short") is None
    pool = pairs.pool_from("Fox")
    ids = tok(" ".join(text.split()), add_special_tokens=False)["input_ids"]
    assert pool.keys[1] == tok.decode(ids[9:13]).strip() and pool.values[1] == tok.decode(ids[13:18]).strip()
    assert set(pairs.splits["train"]).isdisjoint(pairs.splits["eval"])

    tq = ag.TwentyQuestionsPairs(tiny_config(pool_size=3), table=(QUESTIONS, OBJECTS))
    p = tq.pool(random.Random(0))
    truth = {o["object"]: o["answers"] for o in OBJECTS}[p.name]
    assert p.values == ["Yes" if truth[q["id"]] else "No" for q in QUESTIONS]
    assert p.name not in tq.splits["eval"]


# ---------------------------------------------------------------- reward by hand
def test_reward_equals_logprob_difference_by_hand():
    model, tok = rlnlp.load_policy(trainable=False)

    def mean_logp(prompt, value):  # one unpadded sequence, plain forward
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        v = tok(" " + value, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + v])).logits[0]
        logp = torch.log_softmax(logits.float(), -1)
        return sum(logp[len(p) - 1 + t, v[t]].item() for t in range(len(v))) / len(v)

    contexts = ["Facts. Query: where Key: Paris is the capital Value: of France", "Facts."]
    queries, keys, values = [" what river", " which"], ["The Seine flows", "Is it alive?"], ["through Paris", "Yes"]
    got = ag.step_rewards(model, tok, contexts, queries, keys, values)
    for i in range(2):
        by_hand = (mean_logp(contexts[i] + f" Query:{queries[i]} Key: {keys[i]} Value:", values[i])
                   - mean_logp(f"Key: {keys[i]} Value:", values[i]))
        assert got[i].item() == pytest.approx(by_hand, abs=2e-4)


# ---------------------------------------------------------------- real model, tiny runs
def test_kl_nonzero_after_one_update_and_keys_never_repeat(tmp_path):
    rlnlp.seed_everything(0)
    trainer = tiny_trainer(tmp_path, pool_size=3, baseline_rows=1)
    df = trainer.train(2)
    assert df["stats/kl"].iloc[0] == pytest.approx(0.0, abs=1e-7)  # adapter starts at zero: π = π_ref
    assert df["stats/kl"].iloc[1] > 1e-8  # after one update the policy has moved away from the reference
    for ro in trainer.history:
        for row in range(len(ro.selectors)):
            assert sorted(ro.chosen[row].tolist()) == [0, 1, 2]  # every pair once, none twice
        torch.testing.assert_close(ro.probs.sum(-1), torch.ones(2, 3))
    assert all(torch.isfinite(torch.tensor(df[c].to_numpy(dtype=float))).all()
               for c in ["charts/episode_reward", "stats/kl", "stats/selection_entropy", "losses/total"])


def test_resume_continues_from_saved_episode(tmp_path):
    rlnlp.seed_everything(0)
    first = tiny_trainer(tmp_path)
    first.train(2)
    saved = {k: v.clone() for k, v in first.model.state_dict().items() if "lora_" in k}
    assert first.checkpoint_path.exists()

    again = tiny_trainer(tmp_path)
    assert again.load() == 2
    for k, v in again.model.state_dict().items():
        if "lora_" in k:
            torch.testing.assert_close(v, saved[k])
    assert again.optimizer.state_dict()["state"], "optimizer state was not restored"
    df = again.train(3)  # resumes at episode 2, runs one more
    assert df["step"].tolist() == [0, 1, 2]
    assert again.episode == 3 and len(again.history) == 1
    assert torch.load(again.checkpoint_path, weights_only=False)["episode"] == 3
