"""Attention-guided RL (notebook 03): the selector's math by hand, the reward by hand, the selection-only
cache against the uncached path, gradients into the last layer's q/k LoRA, a toy problem that must be learned,
the full loop's mechanics, checkpoint / resume, the command line."""
import itertools
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import rlnlp
from rlnlp import attention_guided as ag
from rlnlp import checkpoint
from rlnlp.cli import run

QUESTIONS = [{"id": f"q{i}", "question": q, "attribute": a} for i, (q, a) in
             enumerate([("Is it alive?", "alive"), ("Can it fly?", "fly"), ("Is it bigger than a car?", "big")])]
OBJECTS = [{"object": name, "category": "x", "answers": dict(zip(["q0", "q1", "q2"], ans))} for name, ans in
           [("dog", (True, False, False)), ("eagle", (True, True, False)), ("plane", (False, True, True)),
            ("rock", (False, False, False)), ("whale", (True, False, True))]]
ARTICLE = ("The quick brown fox jumps over the lazy dog while the cat sleeps on a warm mat near the old barn door "
           "today, and the farmer counts his sheep twice before the evening rain begins to fall on the quiet valley.")
OTHER = ("Paris is the capital and largest city of France, on the river Seine, with about two million residents "
         "in the city proper and many more in its metropolitan area, a centre of art and finance.")


def tiny_config(**kw):
    base = dict(dataset="twenty_questions", pool_size=2, query_tokens=3, batch_size=2, baseline_rows=0, episodes=2,
                checkpoint_every=1, eval_fraction=0.2, run_name="test_ag")
    return ag.AttentionGuidedConfig(**{**base, **kw})


def tiny_trainer(tmp_path, **kw):
    cfg = tiny_config(**kw)
    return ag.AttentionGuidedTrainer(cfg, pairs=ag.TwentyQuestionsPairs(cfg, table=(QUESTIONS, OBJECTS)), root=tmp_path)


def tiny_selection_trainer(tmp_path, **kw):
    """Wikipedia-style pools of 3 pairs (5 + 5 tokens) from two short articles."""
    base = dict(pool_size=3, key_tokens=5, value_tokens=5, train_pools=1, eval_pools=1, updates=3, eval_every=1,
                eval_fraction=0.5, run_name="test_ag_selection")
    cfg = ag.SelectionConfig(**{**base, **kw})
    model, tok = rlnlp.load_policy(device="cpu", dtype=torch.float32)
    pairs = ag.WikipediaPairs(tok, cfg, summaries={"Fox": ARTICLE, "Paris": OTHER})
    return ag.SelectionTrainer(cfg, pairs=pairs, root=tmp_path, model=model, tokenizer=tok)


def lora_grads(model, which: str) -> dict[str, torch.Tensor]:
    """Gradients of the LoRA B matrices of the LAST layer's projection ``which`` (q_proj / k_proj)."""
    last = ag.attention._last_projection_names(model)[which[0]]
    return {n: p.grad for n, p in model.named_parameters() if n.startswith(last + ".") and "lora_B" in n}


# ---------------------------------------------------------------- selector math
def test_gqa_head_to_group_mapping_and_head_averaged_scores_by_hand():
    heads = ag.Heads(n_heads=4, n_kv_heads=2, head_dim=2)
    assert heads.group_of_head().tolist() == [0, 0, 1, 1]
    # query heads: h0 = (1, 0), h1 = (0, 1), h2 = (1, 1), h3 = (0, 2)
    q = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 2.0]])
    # key 0: group 0 = (1, 0), group 1 = (0, 0);  key 1: group 0 = (0, 0), group 1 = (1, 1)
    k = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    # key 0: h0·g0 = 1, h1·g0 = 0, h2·g1 = 0, h3·g1 = 0  → mean 1/4;  key 1: 0, 0, 2, 2 → mean 1; then / √2
    expected_scores = torch.tensor([[0.25, 1.0]]) / math.sqrt(2)
    torch.testing.assert_close(ag.selection_scores(q, k, heads), expected_scores)
    probs = ag.selection_probs(q, k, torch.ones(1, 2, dtype=torch.bool), heads, temperature=0.5)
    torch.testing.assert_close(probs, torch.softmax(expected_scores / 0.5, -1))  # ONE softmax, not a mean of 4


def test_heads_read_from_config():
    from transformers import GPT2Config, LlamaConfig

    smollm = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    assert ag.heads_of(smollm) == ag.Heads(9, 3, 64)
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


def test_score_spread_and_uniform_entropy_by_hand():
    scores = torch.tensor([[1.0, 3.0, 100.0], [0.0, 0.0, 6.0]])
    remaining = torch.tensor([[True, True, False], [True, True, True]])
    # row 0: std of (1, 3) = √2; row 1: std of (0, 0, 6) = √12
    assert ag.score_spread(scores, remaining) == pytest.approx((math.sqrt(2) + math.sqrt(12)) / 2)
    assert ag.uniform_entropy(3) == pytest.approx((math.log(3) + math.log(2)) / 2)


def test_order_table_enumerates_every_order_and_prefix():
    t = ag.order_table(4)
    assert sorted(map(tuple, t.orders.tolist())) == sorted(itertools.permutations(range(4)))
    assert t.orders[0].tolist() == [0, 1, 2, 3]  # document order first
    assert len(t.prefixes) == 1 + 4 + 12  # lengths 0, 1, 2 (the last pick is forced)
    for o, order in enumerate(t.orders.tolist()):
        for s in range(3):
            p = t.prefixes[t.prefix_of[o, s]]
            assert p == tuple(order[:s])
            assert t.remaining[t.prefix_of[o, s]].tolist() == [j not in p for j in range(4)]


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
    with ag.capture_projection_inputs(model) as cap_in:
        model(input_ids=ids)
    torch.testing.assert_close(ag.project(model, cap_in["k"], "k"), qkv[..., 16:32])


# ---------------------------------------------------------------- data
def test_pools_wikipedia_chunks_and_twenty_questions_answers():
    tok = rlnlp.load_tokenizer()
    cfg = ag.AttentionGuidedConfig(pool_size=3, key_tokens=4, value_tokens=5)
    pairs = ag.WikipediaPairs(tok, cfg, summaries={"Fox": ARTICLE, "Short": "Too short.", "Other": ARTICLE})
    assert pairs.pool_from("Short") is None
    pool = pairs.pool_from("Fox")
    ids = tok(" ".join(ARTICLE.split()), add_special_tokens=False)["input_ids"]
    assert pool.keys[1] == tok.decode(ids[9:13]).strip() and pool.values[1] == tok.decode(ids[13:18]).strip()
    assert set(pairs.splits["train"]).isdisjoint(pairs.splits["eval"])

    tq = ag.TwentyQuestionsPairs(tiny_config(pool_size=2), table=(QUESTIONS, OBJECTS))
    p = tq.pool(random.Random(0))
    truth = {o["object"]: o["answers"] for o in OBJECTS}[p.name]
    assert p.values == ["Yes" if truth[q["id"]] else "No" for q in QUESTIONS if q["question"] in p.keys]
    assert p.name not in tq.splits["eval"]
    distinct = tq.pools(12, "train", seed=0)  # 4 training objects × 3 question pairs: every one exactly once
    assert len({(x.name, tuple(x.keys)) for x in distinct}) == 12
    with pytest.raises(ValueError, match="distinct"):
        tq.pools(13, "train", seed=0)


# ---------------------------------------------------------------- reward by hand
def test_reward_equals_logprob_difference_by_hand(policy):
    model, tok = policy

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


# ---------------------------------------------------------------- selection only: cache, gradient, toy problem
def test_cached_rewards_and_scores_equal_the_uncached_path(tmp_path):
    rlnlp.seed_everything(0)
    trainer = tiny_selection_trainer(tmp_path)
    trainer.build_caches()
    cache = trainer.caches["train"][0]
    pool, query = cache.pool, trainer.cfg.query
    # rewards: every order, step by step, through step_rewards (its own tokenisation, left padding, reference)
    for o, order in enumerate(trainer.table.orders.tolist()):
        contexts = [ag.context_of(pool, order[:s], [query] * s) for s in range(3)]
        uncached = ag.step_rewards(trainer.model, trainer.tokenizer, contexts, [query] * 3,
                                   [pool.keys[j] for j in order], [pool.values[j] for j in order])
        torch.testing.assert_close(cache.step_rewards[o], uncached, atol=2e-4, rtol=0)
    with torch.no_grad():  # a non-zero adapter on the last q/k: the cached inputs must still give the policy's scores
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
        cached = ag.cached_scores(trainer.model, trainer.batches["train"], trainer.heads)[0]  # (P, N)
        for i, prefix in enumerate(trainer.table.prefixes):
            direct = ag.fixed_query_scores(trainer.model, trainer.tokenizer, pool, prefix, query, trainer.heads)
            torch.testing.assert_close(cached[i], direct, atol=1e-4, rtol=1e-4)


def test_selection_term_carries_gradient_to_last_layer_qk_lora(tmp_path):
    trainer = tiny_selection_trainer(tmp_path)
    trainer.build_caches()
    order_logp, _ = trainer.order_logprobs(trainer.batches["train"])
    order_logp[0, 3].backward()  # Σ_s log p(key chosen at s) of one order, nothing else
    for which in ("q", "k"):
        grads = lora_grads(trainer.model, which)
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), which
    assert trainer.log_inv_temperature.grad is not None and trainer.log_inv_temperature.grad != 0

    # the full loop: a rollout's selection log-prob alone (Σ_s log p(chosen key), no query tokens) reaches the last
    # layer's q/k LoRA (through the query's q_proj and the keys' k_proj) and the temperature
    rlnlp.seed_everything(0)
    loop = tiny_trainer(tmp_path, pool_size=3)
    ro = loop.rollout(loop.pairs.pool(random.Random(0)), ["policy"], grad=True)
    torch.testing.assert_close(ro.selection_logp.detach().cpu(), ro.key_logp.sum(1))
    ro.selection_logp.sum().backward()
    for which in ("q", "k"):
        grads = lora_grads(loop.model, which)
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads.values()), which
    assert loop.log_inv_temperature.grad is not None and loop.log_inv_temperature.grad != 0


def test_toy_one_key_always_rewarded_gains_probability(tmp_path):
    """Reward 1 whenever key 1 is picked first, else 0: a few updates must raise P(key 1 first)."""
    rlnlp.seed_everything(0)
    trainer = tiny_selection_trainer(tmp_path, lr=0.02, orders_per_pool=16)
    trainer.build_caches()
    first = trainer.table.orders[:, 0] == 1
    for split in ("train", "eval"):
        trainer.batches[split].episode_rewards = first.float()[None].expand(len(trainer.batches[split]), -1).clone()
    before = trainer.first_step_probs("train")[0, 1]
    for _ in range(6):
        trainer.update()
    after = trainer.first_step_probs("train")[0, 1]
    assert after > before + 0.2, (before, after)
    # untrained = the start
    assert trainer.first_step_probs("train", untrained=True)[0, 1] == pytest.approx(before, abs=1e-6)


def test_selection_evaluation_is_exact_and_resume_continues(tmp_path):
    rlnlp.seed_everything(0)
    trainer = tiny_selection_trainer(tmp_path)
    df = trainer.train()
    assert df["step"].tolist() == [0, 1, 2, 3]
    ev = trainer.evaluate()
    R = trainer.batches["eval"].episode_rewards[0]
    table = ag.per_pool(ev)
    assert table.loc[0, "random"] == pytest.approx(R.mean().item())
    assert table.loc[0, "document"] == pytest.approx(R[0].item())
    assert table.loc[0, "best"] == pytest.approx(R.max().item())
    # the policy's expected reward, rebuilt without the cache: p(order) = Π_s softmax over the keys left of the
    # uncached scores / T, then Σ_order p(order) · R(order). Mutations seen to fail: expected() weighting every order
    # alike (1 / O); order_logprobs dropping the temperature (inv_temperature → 1).
    pool, T = trainer.caches["eval"][0].pool, trainer.temperature
    with torch.no_grad():
        scores = {p: ag.fixed_query_scores(trainer.model, trainer.tokenizer, pool, p, trainer.cfg.query, trainer.heads)
                  for p in trainer.table.prefixes}
    p_order = torch.ones(len(R))
    for o, order in enumerate(trainer.table.orders.tolist()):
        for s in range(2):  # the third key is forced
            left = torch.tensor([j not in order[:s] for j in range(3)])
            p_order[o] *= torch.softmax((scores[tuple(order[:s])] / T).masked_fill(~left, float("-inf")), -1)[order[s]]
    expected = float((p_order * R).sum())
    assert table.loc[0, "policy"] == pytest.approx(expected, abs=1e-4)
    assert abs(expected - R.mean().item()) > 1e-3  # a uniform selector would fail the check above
    ent = ag.per_pool(ev, "entropy")
    assert 0 < ent.loc[0, "policy"] < ent.loc[0, "random"] == pytest.approx(ag.uniform_entropy(3))

    again = tiny_selection_trainer(tmp_path)
    assert again.load() == 3
    assert again.log_inv_temperature.item() == pytest.approx(trainer.log_inv_temperature.item())
    df = again.train(4)
    assert df["step"].tolist() == [0, 1, 2, 3, 4] and again.update_count == 4


# ---------------------------------------------------------------- the full loop, tiny runs
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
    # the spread-set temperature discriminates
    assert (df["stats/selection_entropy"] < df["stats/uniform_entropy"]).all()


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
    assert again.temperature.item() == pytest.approx(first.temperature.item())
    df = again.train(3)  # resumes at episode 2, runs one more
    assert df["step"].tolist() == [0, 1, 2]
    assert again.episode == 3 and len(again.history) == 1
    assert checkpoint.load(again.checkpoint_path)["completed"] == 3


def test_kill_and_resume_continues_exactly(tmp_path):
    """Kill a command-line training run (SIGKILL) after its first checkpoint, resume it, and compare with a run
    straight through: the same metrics row for row and the same adapter. Mutations seen to fail: the checkpoint
    leaving out the global RNG states (a resumed run samples other queries: rewards differ from episode 1 on);
    load() not restoring the pool sampler's state (another pool at episode 1)."""
    runs = tmp_path / "runs"
    env = {**os.environ, "RLNLP_PROFILE": "smoke", "RLNLP_RUNS": str(runs)}
    argv = ["--dataset", "twenty_questions", "--pool-size", "2", "--batch-size", "2", "--episodes", "4",
            "--eval-pools", "1", "--checkpoint-every", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "rlnlp.attention_guided", *argv, "--run-name", "killed"],
                            cwd=Path(rlnlp.__file__).parents[1], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    saved = runs / "killed" / "checkpoint.pt"
    deadline = time.time() + 240
    while not saved.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.load(saved)["completed"]
    assert 1 <= killed_at < 4, killed_at  # killed part-way, with a checkpoint to resume from
    assert os.environ["RLNLP_RUNS"] == str(runs)  # conftest's folder: the in-process runs below use it too
    ag.main(argv + ["--run-name", "killed", "--resume"])
    ag.main(argv + ["--run-name", "straight"])
    a, b = (pd.read_csv(runs / name / "metrics.csv") for name in ("killed", "straight"))
    keep = [c for c in b.columns if not c.startswith("time/")]
    assert len(a) == len(b) == 4
    pd.testing.assert_frame_equal(a[keep], b[keep], check_exact=False, rtol=0, atol=1e-6)
    adapters = [checkpoint.load(runs / name / "checkpoint.pt")["adapter"] for name in ("killed", "straight")]
    for k in adapters[1]:
        torch.testing.assert_close(adapters[0][k], adapters[1][k], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- command line
@pytest.mark.parametrize("argv, says", [(["--dataset", "imdb"], "invalid choice"),
                                        (["--episodes", "many"], "'many' is not an integer ≥ 1"),
                                        (["--episodes", "0"], "'0' is not an integer ≥ 1"),
                                        (["--checkpoint-every", "-1"], "'-1' is not an integer ≥ 0"),
                                        (["--mode", "selection", "--pool-size", "9"], "pool_size must be in 2..5"),
                                        (["--mode", "selection", "--training-percentile", "50"],
                                         "belongs to --mode loop")])
def test_cli_bad_input_is_one_line(argv, says, capsys):
    # Mutation seen to fail: --episodes parsed with type=int (then the config's own message, not the option's).
    assert run(ag.main, argv, errors=ag.cli.ERRORS, prog=ag.cli.PROG) == 2
    message = capsys.readouterr().err
    assert says in message and message.count("\n") == 1 and message.startswith(ag.cli.PROG), message


def test_cli_selection_mode_runs_and_resumes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RLNLP_RUNS", str(tmp_path))
    argv = ["--mode", "selection", "--dataset", "twenty_questions", "--pool-size", "2", "--train-pools", "2",
            "--eval-pools", "2", "--episodes", "2", "--batch-size", "4", "--run-name", "cli"]
    result = ag.main(argv)
    assert set(result) == {"policy_vs_untrained", "policy_vs_random", "policy_vs_document", "policy_vs_best"}
    assert result["policy_vs_random"].n == 2
    assert (tmp_path / "cli" / "caches.pt").exists()
    ag.main([x if x != "2" or i != argv.index("--episodes") + 1 else "3" for i, x in enumerate(argv)] + ["--resume"])
    out = capsys.readouterr().out
    assert "resumed from" in out and "held-out selection entropy" in out


# ---------------------------------------------------------------- the full presets' shapes, on the CPU
@pytest.mark.full_dryrun
def test_full_preset_one_update_each_mode(tmp_path):
    rlnlp.seed_everything(0)
    cfg = ag.AttentionGuidedConfig.full(run_name="dryrun_loop")
    loop = ag.AttentionGuidedTrainer(cfg, root=tmp_path)
    df = loop.train(1)
    assert len(loop.history[0].selectors) == cfg.batch_size + 2 * cfg.baseline_rows
    assert loop.history[0].chosen.shape == (cfg.batch_size + 2 * cfg.baseline_rows, cfg.pool_size)
    assert torch.isfinite(torch.tensor(df["losses/total"].to_numpy())).all()

    # selection only: caching 800 pools of 24 orders is the GPU's job; cache 2 + 2 and repeat them to the full
    # preset's 800 training pools, so the update runs at its real shape (a random 64 of 800 pools × 24 orders)
    full = ag.SelectionConfig.full()
    sel_cfg = ag.SelectionConfig.full(train_pools=2, eval_pools=2, run_name="dryrun_selection")
    sel = ag.SelectionTrainer(sel_cfg, root=tmp_path)
    sel.build_caches()
    sel.caches["train"] = sel.caches["train"] * (full.train_pools // 2)
    sel.batches["train"] = ag.CacheBatch.stack(sel.caches["train"])
    stats = sel.update()
    assert sel.batches["train"].episode_rewards.shape == (full.train_pools, math.factorial(full.pool_size))
    assert full.pools_per_update < full.train_pools and math.isfinite(stats["losses/total"])
    df = sel.train(2)
    assert torch.isfinite(torch.tensor(df["losses/total"].dropna().to_numpy())).all()
