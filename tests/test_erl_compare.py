"""ERL's study helpers (rlnlp.erl.compare): the "no reflection" ablation's advantages and config, the study's paired
rows, and one seed giving one run."""
import torch


def test_advantages_without_reflection_normalise_over_first_attempts_and_retries():
    from rlnlp.erl import erl_advantages

    r1, r2 = torch.tensor([1.0, 0.0, 0.0, 1.0]), torch.tensor([1.0, 0.0])
    a1, ad, a2 = erl_advantages(r1, r2, "joint", torch.zeros(4), reflection=False)
    r = torch.cat([r1, r2])
    want = (r - r.mean()) / (r.std() + 1e-4)
    # mutation: normalising over [r1; r2; r2] as with reflections → the mean moves and these differ
    assert ad.numel() == 0 and torch.allclose(torch.cat([a1, a2]), want)
    g = torch.tensor([0.5, -0.5, -0.5, 0.5])
    a1, ad, a2 = erl_advantages(r1, r2, "split", g, reflection=False)
    assert torch.equal(a1, g) and ad.numel() == 0 and torch.allclose(a2, (r2 - r2.mean()) / (r2.std() + 1e-4))


def test_config_checks_the_feedback_retry_template():
    import pytest

    from rlnlp.erl import ERLConfig

    cfg = ERLConfig.smoke(enable_reflection=False)
    assert not cfg.enable_reflection and {"{prompt}", "{attempt}", "{feedback}"} <= set(
        f"{{{f}}}" for f in ("prompt", "attempt", "feedback") if f"{{{f}}}" in cfg.feedback_retry_prompt)
    with pytest.raises(ValueError, match="feedback_retry_prompt"):  # a reflection it will never have
        ERLConfig.smoke(feedback_retry_prompt="{prompt} {reflection}")
    with pytest.raises(ValueError, match="enable_reflection"):
        ERLConfig.smoke(enable_reflection="no")


def _run(seed, arm, success, seconds=10.0, tokens=100.0):
    return {"seed": seed, "arm": arm, "steps": 2, "train_seconds": seconds, "tokens": tokens, "wall_s": 1.0,
            "evals": [{"step": 1, "train_seconds": seconds / 2, "tokens": tokens / 2, "accuracy": 0.0,
                       "success": [0.0] * len(success)},
                      {"step": 2, "train_seconds": seconds, "tokens": tokens, "accuracy": sum(success) / len(success),
                       "success": success}]}


def test_compare_rows_pair_prompts_within_each_seed(tmp_path, monkeypatch):
    from rlnlp.erl.compare import compare_figure, compare_results
    from rlnlp.results import Results

    monkeypatch.setenv("RLNLP_VIS", str(tmp_path))
    rows = [_run(0, "erl", [1, 0, 1]), _run(0, "grpo", [0, 0, 1]), _run(1, "grpo", [1, 1, 0]),
            _run(1, "erl", [1, 1, 1]), _run(2, "erl", [1, 1, 1])]  # seed 2 lacks GRPO: left out of every row
    untrained = {"accuracy": 1 / 3, "n": 3, "success": [0, 0, 1]}
    out = compare_results(rows, untrained, "json_value", Results("05_erl_seeds", prof="smoke"))
    by = {(r["method"], r["baseline"]): r for r in out}
    erl_grpo = by[("ERL", "GRPO (equal wall-clock)")]
    # per unit (prompt, seed): ERL − GRPO = [1, 0, 0] for seed 0 and [0, 0, 1] for seed 1; mutation: pairing ERL's
    # seed-0 answers with GRPO's seed-1 answers (rows in file order) gives [0, -1, 1, 1, 0, 0] and a different interval
    assert erl_grpo["n"] == 6 and abs(erl_grpo["difference"] - 2 / 6) < 1e-9
    assert by[("ERL", "untrained")]["n"] == 6 and abs(by[("ERL", "untrained")]["difference"] - (5 / 6 - 1 / 3)) < 1e-9
    assert "seeds: 0, 1" in erl_grpo["unit"]
    assert compare_figure(rows, untrained, "json_value").axes[0].get_lines()


def test_two_erl_runs_at_one_seed_are_identical(tmp_path):
    """Same seed, same thread count, one process: ERL's runs repeat bit for bit (reflections and retries included).
    Mutation seen to fail: the sampler's generator seeded from the clock for reflections (``seed=time.time_ns()``)
    → the examples and the weights differ."""
    from rlnlp.erl import ERLConfig, train_run

    # word_count's dense reward (1 − |k − n| / n) differs within almost every group, and "positive" distils every
    # retry with r2 > 0: the weights move at each step (json_key answers cut at 8 tokens all scored 0: no gradient)
    cfg = ERLConfig.smoke(max_steps=2, max_completion_length=8, reflection_max_new_tokens=8, lora_r=4,
                          learning_rate=1e-3, internalization_rule="positive", tasks=("word_count",),
                          output_dir=str(tmp_path))
    a, b = train_run(cfg, "erl"), train_run(cfg, "erl")
    assert a.trainer.examples, "no first attempt was gated: nothing after the gate was sampled"
    assert a.trainer.examples == b.trainer.examples
    pa = {n: p.detach() for n, p in a.trainer.model.named_parameters() if p.requires_grad}
    pb = {n: p.detach() for n, p in b.trainer.model.named_parameters() if p.requires_grad}
    assert any(p.abs().sum() > 0 for n, p in pa.items() if "lora_B" in n)  # it trained (LoRA B starts at 0)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)


def test_study_figure_draws_the_mean_over_seeds_with_the_seeds_range_as_a_band():
    # fails if the curve is one seed's (or the sum of seeds) instead of their mean, or the band is not the seeds'
    # min..max at each evaluation
    import numpy as np

    from rlnlp.erl.compare import compare_figure

    rows = [_run(0, "erl", [1, 0, 0]), _run(1, "erl", [1, 1, 1]), _run(2, "erl", [0, 0, 0]),
            _run(0, "grpo", [1, 1, 0]), _run(1, "grpo", [1, 1, 0]), _run(2, "grpo", [0, 1, 0])]
    untrained = {"accuracy": 0.0, "n": 3, "success": [0, 0, 0]}
    ax = compare_figure(rows, untrained, "digits").axes[0]
    erl_line = next(ln for ln in ax.get_lines() if ln.get_label().startswith("ERL (mean"))
    assert np.allclose(erl_line.get_xdata(), [0.0, 5.0, 10.0])
    assert np.allclose(erl_line.get_ydata(), [0.0, 0.0, (1 / 3 + 1 + 0) / 3])
    bands = [c for c in ax.collections if type(c).__name__ in ("PolyCollection", "FillBetweenPolyCollection")]
    assert len(bands) == 2  # ERL's and GRPO's
    erl_band = bands[0].get_paths()[0].vertices
    at_end = erl_band[np.isclose(erl_band[:, 0], 10.0), 1]
    assert np.isclose(at_end.min(), 0.0) and np.isclose(at_end.max(), 1.0)
    assert "3 seeds" in ax.get_title()
