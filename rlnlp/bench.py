"""Benchmarks: ``python -m rlnlp.bench SUITE [options]``.

    sampler   rlnlp.sample vs transformers' model.generate on the same prompts and budget
    erl       the ERL trainer's benchmark (rlnlp.erl.bench_main)
    erl-seeds notebook 05's ERL vs GRPO comparison at other seeds (rlnlp.erl.seeds_main)
    erl-compare ERL vs GRPO at equal wall-clock and equal tokens, and ERL's ablations, over seeds
              (rlnlp.erl.compare.compare_main)
    erl-zone  where a feedback task sits for ERL: first attempts, group variance, retries with feedback
              (rlnlp.erl.compare.zone_main)

Run them on an idle machine (``/work/bin/cpuslot --both python -m rlnlp.bench sampler`` here) and
quote the date, the machine and the thread count with the numbers.
"""
from __future__ import annotations

import datetime
import sys
import time

SAMPLER_CASES = {
    "a": "n=4 samples of 8 ~200-token chat prompts, 16 new tokens (prefill-bound: one prefill per prompt)",
    "b": "n=1, 32 prompts sharing a ~150-token prefix, 16 new tokens (one prefill of the prefix)",
    "c": "n=1, 32 short distinct prompts, 64 new tokens (decode-bound: no regression)",
}

GRID_RULES = (
    "You are playing a grid-world game on a 5 by 5 board; rows are numbered 0 to 4 from top to bottom and columns "
    "0 to 4 from left to right. Each turn you choose one move: up, down, left or right. A move into a wall or off "
    "the board leaves you where you are. Walls stand between (1, 1) and (1, 2) and between (2, 3) and (3, 3). You "
    "win on the goal cell and lose after twelve turns. Answer with a single word: your move."
)
TOPICS = ["the sea", "a mountain village", "a lost key", "the first snow", "a talking cat", "an old clock",
          "a night train", "the desert", "a secret garden", "a robot chef", "a lighthouse", "the moon landing",
          "a jazz band", "a library at midnight", "a broken bridge", "the last dragon", "a city in the clouds",
          "a paper boat", "the north wind", "a chess match", "a market day", "a forgotten song", "a storm at sea",
          "an ant colony", "a winter fox", "a glass house", "the river's source", "a map with no names",
          "a lonely astronaut", "a baker's dawn", "a museum of sounds", "the longest day"]


def _sampler_prompts(case: str, tokenizer) -> tuple[list, dict]:
    """The prompts of one benchmark case and the ``sample`` keywords that go with them."""
    if case == "a":
        from .data import wikipedia_summaries

        wiki = wikipedia_summaries()
        long = [text for _, text in sorted(wiki.items()) if len(tokenizer(text)["input_ids"]) >= 170][:8]
        passages = [tokenizer.decode(tokenizer(text)["input_ids"][:160]) for text in long]
        return [f"Read the passage and explain it to a child.\n\n{p}" for p in passages], dict(n=4, max_new_tokens=16)
    if case == "b":
        states = [f"You are at ({r}, {c}) and the goal is at ({4 - c}, {r}). Which move?" for r in range(5) for c in range(5)]
        states += [f"You are at ({r}, {r}) and the goal is at (0, 4). Your last move hit a wall. Which move?" for r in range(5)]
        states += ["You are at (2, 2) and the goal is at (2, 2)? Which move?", "You are lost. Which move?"]
        return [f"{GRID_RULES}\n\n{s}" for s in states[:32]], dict(n=1, max_new_tokens=16)
    return [f"Write a long story about {t}." for t in TOPICS], dict(n=1, max_new_tokens=64)


def _time_sampler_case(model, tokenizer, case: str, repeat: int) -> dict:
    import torch

    from .sampling import render_prompts, sample

    prompts, kw = _sampler_prompts(case, tokenizer)
    n, new = kw["n"], kw["max_new_tokens"]
    enc = tokenizer(render_prompts(tokenizer, prompts), return_tensors="pt", padding=True, padding_side="left",
                    add_special_tokens=False).to(model.device)
    prompt_tokens = int(enc["attention_mask"].sum()) * n
    # generate: the same distribution (T = 1, no top-k / top-p filtering) and min_new_tokens = max_new_tokens, so it
    # never stops early and every row makes `new` tokens; rlnlp.sample stops a row at EOS, and only the tokens it
    # made are counted for it (its rows that end early also stop costing compute).
    gen_kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=new, min_new_tokens=new,
                  num_return_sequences=n, pad_token_id=tokenizer.pad_token_id)
    runs = {"rlnlp.sample": [], "model.generate": []}  # (seconds, tokens made) per run
    with torch.no_grad():
        for r in range(repeat):
            t0 = time.perf_counter()
            s = sample(model, tokenizer, prompts, n=n, max_new_tokens=new, temperature=1.0, seed=r, batch_size=64)
            took = time.perf_counter() - t0
            runs["rlnlp.sample"].append((took, int(s.completion_mask.sum())))
            torch.manual_seed(r)
            t0 = time.perf_counter()
            out = model.generate(**enc, **gen_kw)
            took = time.perf_counter() - t0
            made = (out.shape[1] - enc["input_ids"].shape[1]) * out.shape[0]
            runs["model.generate"].append((took, made))
    best = {name: max(rs, key=lambda run: run[1] / run[0]) for name, rs in runs.items()}  # the fastest run's tokens/s
    return {"rows": len(prompts) * n, "prompt_tokens": prompt_tokens, "new": new, **best}


def sampler_main(argv: list[str]) -> int:
    """``python -m rlnlp.bench sampler [--case a|b|c ...] [--repeat N]``: tokens/s of both samplers and their ratio."""
    usage = "usage: python -m rlnlp.bench sampler [--case a|b|c ...] [--repeat N≥1]"
    cases, repeat = [], 2
    args = list(argv)
    while args:
        a = args.pop(0)
        if a in ("-h", "--help"):
            print(f"{usage}\n" + "\n".join(f"  ({c}) {d}" for c, d in SAMPLER_CASES.items()))
            return 0
        if a not in ("--case", "--repeat"):
            print(f"rlnlp.bench sampler: unknown argument {a!r}; {usage}", file=sys.stderr)
            return 2
        if not args:
            print(f"rlnlp.bench sampler: {a} needs a value; {usage}", file=sys.stderr)
            return 2
        v = args.pop(0)
        if a == "--case" and v in SAMPLER_CASES:
            cases.append(v)
        elif a == "--repeat" and v.isdigit() and int(v) >= 1:
            repeat = int(v)
        else:
            want = "one of a, b, c" if a == "--case" else "an integer ≥ 1"
            print(f"rlnlp.bench sampler: bad value {v!r} for {a} (want {want}); {usage}", file=sys.stderr)
            return 2
    import torch

    import transformers

    from .models import load_policy

    try:
        model, tokenizer = load_policy(trainable=False)
    except (OSError, ValueError, RuntimeError) as e:  # no model files, a bad RLNLP_POLICY, no device
        print(f"rlnlp.bench sampler: could not load the policy model: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
              file=sys.stderr)
        return 1
    print(f"{datetime.date.today()} · {model.device} · {model.dtype} · torch {torch.__version__} · "
          f"transformers {transformers.__version__} · {torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''} · best of {repeat} runs each")
    from .sampling import sample

    sample(model, tokenizer, ["Warm up."], n=2, max_new_tokens=4, seed=0)  # first-call costs out of the timings
    model.generate(**tokenizer(["Warm up."], return_tensors="pt").to(model.device), max_new_tokens=4,
                   pad_token_id=tokenizer.pad_token_id)
    header = f"{'case':<5}{'rows':>5}{'prompt tok':>11}{'new':>5} | {'sample tok':>10}{'s':>7}{'tok/s':>7} | {'generate tok':>12}{'s':>7}{'tok/s':>7} | {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for case in cases or list(SAMPLER_CASES):
        r = _time_sampler_case(model, tokenizer, case, repeat)
        (ts, ks), (tg, kg) = r["rlnlp.sample"], r["model.generate"]
        print(f"{case:<5}{r['rows']:>5}{r['prompt_tokens']:>11}{r['new']:>5} | {ks:>10}{ts:>7.1f}{ks / ts:>7.1f} | "
              f"{kg:>12}{tg:>7.1f}{kg / tg:>7.1f} | {(ks / ts) / (kg / tg):>5.2f}×", flush=True)
    for case in cases or list(SAMPLER_CASES):
        print(f"  ({case}) {SAMPLER_CASES[case]}")
    return 0


def erl_main(argv: list[str]) -> int:
    from . import erl

    main = getattr(erl, "bench_main", None)
    if main is None:
        print("rlnlp.bench erl: rlnlp.erl has no bench_main(argv) yet", file=sys.stderr)
        return 1
    return int(main(argv) or 0)


def erl_seeds_main(argv: list[str]) -> int:
    from .erl import seeds_main

    return int(seeds_main(argv) or 0)


def erl_compare_main(argv: list[str]) -> int:
    from .erl.compare import compare_main

    return int(compare_main(argv) or 0)


def erl_zone_main(argv: list[str]) -> int:
    from .erl.compare import zone_main

    return int(zone_main(argv) or 0)


SUITES = {"sampler": sampler_main, "erl": erl_main, "erl-seeds": erl_seeds_main,
          "erl-compare": erl_compare_main, "erl-zone": erl_zone_main}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if not argv or argv[0] not in SUITES:
        got = f"unknown suite {argv[0]!r}" if argv else "no suite given"
        print(f"rlnlp.bench: {got}; usage: python -m rlnlp.bench {{{'|'.join(SUITES)}}} [options]", file=sys.stderr)
        return 2
    return SUITES[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
