"""Benchmarks: ``python -m rlnlp.bench SUITE [options]``.

    sampler   rlnlp.sample vs transformers' model.generate on the same prompts and budget
    precision the sampler cases and one LoRA training step in fp32 vs bf16, and the log-prob drift of each
    turns     multi-turn rollouts (Twenty Questions-like chat) with vs without carrying each episode's keys
    erl       the ERL trainer's benchmark (rlnlp.erl.bench_main)
    erl-seeds notebook 05's ERL vs GRPO comparison at other seeds (rlnlp.erl.seeds_main)
    erl-compare ERL vs GRPO at equal wall-clock and equal tokens, and ERL's ablations, over seeds
              (rlnlp.erl.compare.compare_main)
    erl-zone  where a feedback task sits for ERL: first attempts, group variance, retries with feedback
              (rlnlp.erl.compare.zone_main)

Run them on an idle machine (nothing else on the cores) and
quote the date, the machine and the thread count with the numbers.
"""
from __future__ import annotations

import argparse
import datetime
import sys
import time

from .cli import Parser, UsageError, describe, positive_int, run

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
        states = [f"You are at ({r}, {c}) and the goal is at ({4 - c}, {r}). Which move?"
                  for r in range(5) for c in range(5)]
        states += [f"You are at ({r}, {r}) and the goal is at (0, 4). Your last move hit a wall. Which move?"
                   for r in range(5)]
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
    parser = Parser(prog="python -m rlnlp.bench sampler", description=sampler_main.__doc__,
                    epilog="\n".join(f"({c}) {d}" for c, d in SAMPLER_CASES.items()),
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", choices=tuple(SAMPLER_CASES), default=[],
                        help="one benchmark case (repeat the option for several; default: all)")
    parser.add_argument("--repeat", type=positive_int, default=2, help="runs of each sampler; the fastest counts")
    args = parser.parse_args(argv)
    cases, repeat = args.case, args.repeat
    loaded = _load_policy_or_exit("sampler")
    if loaded is None:
        return 1
    model, tokenizer = loaded
    _header(model, f"best of {repeat} runs each")
    from .sampling import sample

    sample(model, tokenizer, ["Warm up."], n=2, max_new_tokens=4, seed=0)  # first-call costs out of the timings
    model.generate(**tokenizer(["Warm up."], return_tensors="pt").to(model.device), max_new_tokens=4,
                   pad_token_id=tokenizer.pad_token_id)
    header = (f"{'case':<5}{'rows':>5}{'prompt tok':>11}{'new':>5} | {'sample tok':>10}{'s':>7}{'tok/s':>7} | "
              f"{'generate tok':>12}{'s':>7}{'tok/s':>7} | {'ratio':>6}")
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


def _load_policy_or_exit(suite: str):
    """The policy, or None after one line on stderr (no model files, a bad RLNLP_POLICY or RLNLP_DTYPE, no device)."""
    from .models import load_policy
    from .runtime import precision

    try:
        precision()
        return load_policy(trainable=False)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"python -m rlnlp.bench {suite}: {describe(e)}", file=sys.stderr)
        return None


def _header(model, what: str) -> None:
    import torch
    import transformers

    from .runtime import precision

    threads = torch.get_num_threads()
    print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC · {model.device} · default compute "
          f"{'{} ({})'.format(*precision())} · torch {torch.__version__} · transformers {transformers.__version__} · "
          f"{threads} thread{'s' if threads != 1 else ''} · {what}")


class _Precision:
    """Run a block in one precision (``$RLNLP_DTYPE`` for the block)."""

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        import os

        self.old = os.environ.get("RLNLP_DTYPE")
        os.environ["RLNLP_DTYPE"] = self.name

    def __exit__(self, *exc):
        import os

        if self.old is None:
            os.environ.pop("RLNLP_DTYPE", None)
        else:
            os.environ["RLNLP_DTYPE"] = self.old


def _lora_step_timer(tokenizer, rows: int, completion_tokens: int):
    """One LoRA policy-gradient step on ``rows`` case-(a) prompts (~200 tokens) with ``completion_tokens``-token
    completions: ``completion_logprobs`` forward, a REINFORCE-style loss, backward, AdamW. Returns ``step() -> s``
    and the tokens one step reads."""
    import torch

    from .models import attach_lora, completion_logprobs, load_policy, masked_mean
    from .sampling import _left_pad, render_prompts

    model, _ = load_policy()
    model = attach_lora(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    prompts, _ = _sampler_prompts("a", tokenizer)
    ids = tokenizer(render_prompts(tokenizer, prompts[:rows]), add_special_tokens=False)["input_ids"]
    p_ids, p_mask = _left_pad(ids, tokenizer.pad_token_id, "cpu")
    g = torch.Generator().manual_seed(0)
    c_ids = torch.randint(100, 20000, (len(ids), completion_tokens), generator=g)
    c_mask = torch.ones_like(c_ids)
    advantages = torch.randn(len(ids), 1, generator=g)

    def step() -> float:
        t0 = time.perf_counter()
        model.train()
        logp = completion_logprobs(model, p_ids, p_mask, c_ids, c_mask)
        loss = -masked_mean(logp * advantages, c_mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    return step, int(p_mask.sum()) + int(c_mask.sum())


def _drift(model, tokenizer, rows: int) -> dict:
    """Per-token |log-prob difference| between the sampler (KV cache) and a re-scoring forward over the same
    tokens, in the active precision: sampled completions of 24 tokens for case (a) and (b) prompts."""
    import torch

    from .models import completion_logprobs
    from .sampling import sample

    prompts = (_sampler_prompts("a", tokenizer)[0] + _sampler_prompts("b", tokenizer)[0])[:rows]
    s = sample(model, tokenizer, prompts, n=2, max_new_tokens=24, temperature=1.0, seed=0)
    with torch.no_grad():
        again = completion_logprobs(model, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask)
    d = (again - s.logprobs)[s.completion_mask.bool()].abs()
    return {"tokens": int(d.numel()), "mean": float(d.mean()), "max": float(d.max())}


def precision_main(argv: list[str]) -> int:
    """``python -m rlnlp.bench precision [--repeat N] [--steps N]``: fp32 vs bf16 in one process, runs interleaved."""
    parser = Parser(prog="python -m rlnlp.bench precision", description=precision_main.__doc__)
    parser.add_argument("--repeat", type=positive_int, default=2, help="runs of each sampler case; the fastest counts")
    parser.add_argument("--steps", type=positive_int, default=3, help="LoRA steps per precision; the fastest counts")
    opts = vars(parser.parse_args(argv))
    loaded = _load_policy_or_exit("precision")
    if loaded is None:
        return 1
    model, tokenizer = loaded
    _header(model, f"best of {opts['repeat']} sampler runs and {opts['steps']} training steps per precision")
    from .sampling import sample

    for name in ("fp32", "bf16"):  # first-call costs (and the bf16 weight copies) out of the timings
        with _Precision(name):
            sample(model, tokenizer, ["Warm up."], n=2, max_new_tokens=4, seed=0)
    header = f"{'what':<44}| {'fp32 tok/s':>10} | {'bf16 tok/s':>10} | {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for case in SAMPLER_CASES:
        prompts, kw = _sampler_prompts(case, tokenizer)
        best = {"fp32": 0.0, "bf16": 0.0}
        for r in range(opts["repeat"]):
            for name in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")):
                with _Precision(name):
                    t0 = time.perf_counter()
                    s = sample(model, tokenizer, prompts, temperature=1.0, seed=r, **kw)
                    best[name] = max(best[name], int(s.completion_mask.sum()) / (time.perf_counter() - t0))
        print(f"{'sampler case ' + case:<44}| {best['fp32']:>10.1f} | {best['bf16']:>10.1f} | "
              f"{best['bf16'] / best['fp32']:>5.2f}×", flush=True)
    rows, completion = 8, 32
    step, tokens = _lora_step_timer(tokenizer, rows, completion)
    times = {"fp32": [], "bf16": []}
    for name in ("fp32", "bf16"):
        with _Precision(name):
            step()  # warm-up
    for r in range(opts["steps"]):
        for name in (("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32")):
            with _Precision(name):
                times[name].append(step())
    tf, tb = min(times["fp32"]), min(times["bf16"])
    print(f"{f'LoRA step, {rows} rows, ~{tokens // rows} tokens each':<44}| {tokens / tf:>10.1f} | "
          f"{tokens / tb:>10.1f} | {tf / tb:>5.2f}×", flush=True)
    print("log-prob drift, sampler vs re-scoring forward (per token, nats):")
    for name in ("fp32", "bf16"):
        with _Precision(name):
            d = _drift(model, tokenizer, 16)
        print(f"  {name}: mean |Δ| {d['mean']:.2e}, max |Δ| {d['max']:.2e} over {d['tokens']} tokens", flush=True)
    for case, what in SAMPLER_CASES.items():
        print(f"  ({case}) {what}")
    return 0


TURN_REPLIES = ("Yes.", "No.", "No.", "I don't know.", "Yes.", "No.")


def _twenty_questions_rollouts(model, tokenizer, episodes: int, turns: int, reuse: bool, seed: int = 0) -> dict:
    """``episodes`` chat games of ``turns`` turns: the policy asks a question, a scripted oracle answers (the answer
    depends on the episode and the turn only, so both runs see the same conversations' shape). One ``sample``
    call per turn for every episode; with ``reuse`` each episode's keys are carried between turns."""
    from .envs.twenty_questions import INTRO
    from .sampling import TurnCache, sample

    candidates = ["dog", "apple", "car", "chair", "guitar", "shoe", "tree", "cup", "bicycle", "pencil"]
    conversations = [[{"role": "user", "content": f"{INTRO} It is one of: {', '.join(candidates)}."}]
                     for _ in range(episodes)]
    cache = TurnCache() if reuse else None
    made = prompt_tokens = 0
    t0 = time.perf_counter()
    for t in range(turns):
        ids = list(range(episodes))
        s = sample(model, tokenizer, conversations, max_new_tokens=16, temperature=1.0, seed=seed + t, stop="?",
                   turn_cache=cache, episode_ids=ids if reuse else None)
        made += int(s.completion_mask.sum())
        prompt_tokens += int(s.prompt_mask.sum())
        for e, text in enumerate(s.texts):
            conversations[e] += [{"role": "assistant", "content": text.strip()},
                                 {"role": "user", "content": TURN_REPLIES[(e + 3 * t) % len(TURN_REPLIES)]}]
    took = time.perf_counter() - t0
    out = {"s": took, "new": made, "prompt": prompt_tokens}
    if reuse:
        out["encoded"], out["reused"] = cache.prefilled_tokens, cache.reused_tokens
    return out


def turns_main(argv: list[str]) -> int:
    """``python -m rlnlp.bench turns [--episodes N] [--turns N] [--repeat N]``: multi-turn rollouts with vs without KV
    reuse."""
    parser = Parser(prog="python -m rlnlp.bench turns", description=turns_main.__doc__)
    parser.add_argument("--episodes", type=positive_int, default=64, help="episodes played side by side")
    parser.add_argument("--turns", type=positive_int, default=10, help="turns of every episode")
    parser.add_argument("--repeat", type=positive_int, default=1,
                        help="runs of each, in alternating order; the fastest counts (this CPU's speed drifts by "
                             "10-20%% within minutes)")
    opts = vars(parser.parse_args(argv))
    loaded = _load_policy_or_exit("turns")
    if loaded is None:
        return 1
    model, tokenizer = loaded
    E, T, R = opts["episodes"], opts["turns"], opts["repeat"]
    _header(model, f"{E} Twenty Questions-like chat episodes × {T} turns, ≤ 16 new tokens a turn, best of {R}")
    _twenty_questions_rollouts(model, tokenizer, 2, 2, reuse=True)  # warm-up
    runs: dict = {False: [], True: []}
    for r in range(R):
        for reuse in ((False, True) if r % 2 == 0 else (True, False)):
            runs[reuse].append(_twenty_questions_rollouts(model, tokenizer, E, T, reuse))
    best = {reuse: min(rs, key=lambda run: run["s"]) for reuse, rs in runs.items()}
    for reuse in (False, True):
        b = best[reuse]
        enc = f", {b['encoded']} encoded ({b['reused']} reused)" if reuse else ""
        every = " (runs: " + ", ".join(f"{run['s']:.1f}" for run in runs[reuse]) + " s)" if R > 1 else ""
        print(f"{'with' if reuse else 'without'} KV reuse: {b['s']:.1f} s{every}, {b['prompt']} prompt tokens{enc}, "
              f"{b['new']} new tokens", flush=True)
    print(f"KV reuse: {best[False]['s'] / best[True]['s']:.2f}× faster")
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


SUITES = {"sampler": sampler_main, "precision": precision_main, "turns": turns_main, "erl": erl_main,
          "erl-seeds": erl_seeds_main,
          "erl-compare": erl_compare_main, "erl-zone": erl_zone_main}


USAGE = f"usage: python -m rlnlp.bench {{{'|'.join(SUITES)}}} [options]"


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a suite. A bad suite or a bad option of ``sampler`` is one line and exit status 2; the ERL suites
    parse their own options."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv and argv[0] in ("erl", "erl-seeds"):  # their own command lines, with their own error path
        return SUITES[argv[0]](argv[1:])
    return run(_dispatch, argv, errors=(UsageError,), prog="python -m rlnlp.bench")


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] not in SUITES:
        raise UsageError(f"{f'unknown suite {argv[0]!r}' if argv else 'no suite given'}; {USAGE}")
    return SUITES[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
