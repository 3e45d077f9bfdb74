"""The one sampler: shapes, grouping, stop handling, log-probs consistent with a re-scoring pass."""
import pytest
import torch

from rlnlp.models import completion_logprobs
from rlnlp.sampling import Samples, render_prompts, sample


def test_shapes_grouping_and_masks(policy):
    model, tok = policy
    s = sample(model, tok, ["Say hi.", "Name a fruit.", "Count to three."], n=2, max_new_tokens=6, seed=0)
    assert len(s) == 6 and s.prompt_index.tolist() == [0, 0, 1, 1, 2, 2]
    assert s.prompt_ids.shape[0] == s.completion_ids.shape[0] == 6
    assert s.completion_ids.shape == s.completion_mask.shape == s.logprobs.shape
    assert s.completion_ids.shape[1] <= 6
    assert torch.all(s.logprobs[s.completion_mask == 0] == 0) and torch.all(s.logprobs[s.completion_mask == 1] <= 0)
    assert s.prompt_texts[0] == s.prompt_texts[1] != s.prompt_texts[2]


def test_logprobs_equal_a_rescoring_pass(policy):
    model, tok = policy
    s = sample(model, tok, ["Write a short poem about rain.", "Hi"], n=2, max_new_tokens=12, temperature=0.7, seed=1)
    with torch.no_grad():
        again = completion_logprobs(model, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask,
                                    temperature=0.7)
    assert torch.allclose(again, s.logprobs, atol=1e-3)


def test_stop_string_ends_at_the_first_token_where_it_appears(policy):
    model, tok = policy
    # Mutations seen to fail (a wrapper around sample): the stop string ignored (no row stops on it: the
    # precondition fails); a stopped row cut one token later than the stop (the shorter prefix already holds "\n").
    s = sample(model, tok, ["List three animals, one per line."] * 4, max_new_tokens=40, stop="\n", seed=2)
    on_stop = [i for i in range(4)
               if s.stopped[i] and int(s.completion_ids[i, int(s.lengths[i]) - 1]) != tok.eos_token_id]
    assert on_stop, f"no row stopped on the stop string, nothing to check: {s.texts}"
    for i, text in enumerate(s.texts):
        n = int(s.lengths[i])
        if i in on_stop:
            assert "\n" in text
            # one token fewer and the stop string had not appeared yet
            assert "\n" not in tok.decode(s.completion_ids[i, : n - 1], skip_special_tokens=True)
        else:  # ended by EOS or the token budget: the stop string never appeared
            assert "\n" not in text


def test_stop_function_and_greedy_determinism(policy):
    model, tok = policy
    stop_at_two_words = lambda text: len(text.split()) >= 2  # noqa: E731
    a = sample(model, tok, ["Tell me about the moon."], max_new_tokens=20, temperature=0, stop=stop_at_two_words)
    b = sample(model, tok, ["Tell me about the moon."], max_new_tokens=20, temperature=0, stop=stop_at_two_words)
    assert a.texts == b.texts and a.stopped[0]
    assert len(a.texts[0].split()) >= 2 and a.lengths[0] < 20


def test_batching_does_not_change_greedy_results(policy):
    model, tok = policy
    prompts = ["What is 2+2?", "Name a color.", "Say yes."]
    one = sample(model, tok, prompts, max_new_tokens=8, temperature=0, batch_size=1)
    all_ = sample(model, tok, prompts, max_new_tokens=8, temperature=0, batch_size=8)
    assert one.texts == all_.texts


def test_bad_prompts_are_clear_errors(policy):
    model, tok = policy
    with pytest.raises(TypeError, match="prompt 1"):
        render_prompts(tok, ["ok", 42])
    with pytest.raises(ValueError, match="at least one prompt"):
        sample(model, tok, [])
    with pytest.raises(TypeError, match="plain strings"):
        render_prompts(tok, [[{"role": "user", "content": "x"}]], chat=False)


def test_select_and_concat_round_trip_through_rescoring(policy):
    model, tok = policy
    a = sample(model, tok, ["Say hi.", "Write a long sentence about the sea."], max_new_tokens=10, seed=3)
    b = sample(model, tok, ["Hello, how are you today, my friend?"], max_new_tokens=4, seed=4)
    both = type(a).concat([a.select([1]), b, a.select(slice(0, 1))], pad_id=tok.pad_token_id)
    assert both.texts == [a.texts[1], b.texts[0], a.texts[0]]
    with torch.no_grad():
        again = completion_logprobs(model, both.prompt_ids, both.prompt_mask, both.completion_ids, both.completion_mask)
    assert torch.allclose(again, both.logprobs, atol=1e-3)  # re-padding kept every token aligned
    assert both.select([0]).prompt_mask.all()  # one row alone keeps no left-padding column


# --- one prefill per distinct prompt, shared-prefix reuse, incremental stops ------------------------------

def _rescored(model, s, temperature=1.0):
    with torch.no_grad():
        return completion_logprobs(model, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask,
                                   temperature=temperature)


def _plain(monkeypatch, fn):
    """Run ``fn()`` on the reference path: every row prefilled on its own, no shared prefix, no shared KV."""
    import rlnlp.sampling as sampling

    with monkeypatch.context() as m:
        m.setattr(sampling, "SHARE_PROMPT_PREFILL", False)
        return fn()


@pytest.mark.parametrize("shared_kv", [True, False], ids=["shared-kv-attention", "expanded-cache"])
def test_shared_prompt_kv_equals_independent_rows(policy, monkeypatch, shared_kv):
    """The n samples of a prompt share its prefill (decoded either by the shared-KV attention or from the prompt's
    cache copied to each row); prompts repeat non-adjacently ([A, B, A]), which groups rows out of order."""
    import rlnlp.sampling as sampling

    model, tok = policy
    if not shared_kv:
        monkeypatch.setattr(sampling, "SHARED_KV_MODEL_TYPES", set())
    prompts = ["Say hi.", "Write a short poem about the rain in the city.", "Say hi."]
    # top_k: the two paths' logits differ by ~1e-6, which moves every boundary of the inverse-CDF draw by about as
    # much; over the whole vocabulary a draw that falls in the tail (tokens of p ~1e-6) then now and then picks a
    # neighbouring tail token (2026-12-04, this CPU: row 4 drew token 4655, p 2.4e-6, instead of 4642, p 1.8e-6;
    # the distributions equal to 5e-6). Among the 50 likeliest tokens a draw is that close to a boundary ~50e-6.
    run = lambda: sample(model, tok, prompts, n=3, max_new_tokens=10, temperature=0.8, top_k=50, seed=11)  # noqa: E731
    s, ref = run(), _plain(monkeypatch, run)
    assert s.completion_ids.shape == ref.completion_ids.shape and torch.equal(s.completion_ids, ref.completion_ids)
    assert torch.equal(s.prompt_ids, ref.prompt_ids) and torch.equal(s.completion_mask, ref.completion_mask)
    assert (s.logprobs - ref.logprobs).abs().max() < 1e-4
    assert (s.logprobs - _rescored(model, s, 0.8)).abs().max() < 1e-4


def test_shared_prefix_rows_equal_a_rescoring_pass(policy, monkeypatch):
    """Raw prompts with a long common token prefix and suffixes of different lengths (padding sits between the prefix
    and the suffix): the prefix is encoded once, in one place, and reused by every batch of the call."""
    import rlnlp.sampling as sampling

    model, tok = policy
    calls = []
    real = sampling._prefix_kv
    monkeypatch.setattr(sampling, "_prefix_kv", lambda m, kw, ids, dev: calls.append(len(ids)) or real(m, kw, ids, dev))
    rules = ("You are playing a game on a five by five board. Each turn you choose one move: up, down, left or right. "
             "A move into a wall leaves you where you are.")
    prompts = [f"{rules}\nState: {s}\nMove:"
               for s in ["start", "you hit a wall twice in a row, near the corner", "(2, 3)",
                         "the goal is one step to the left of you", "lost"]]
    run = lambda: sample(model, tok, prompts, n=2, max_new_tokens=8, chat=False, batch_size=4, seed=5)  # noqa: E731
    s = run()
    assert len(calls) == 1 and calls[0] >= 25  # one prefill of the shared prefix for the three batches
    ref = _plain(monkeypatch, run)
    assert len(calls) == 1  # the reference path never shares
    assert torch.equal(s.completion_ids, ref.completion_ids) and torch.equal(s.prompt_ids, ref.prompt_ids)
    assert (s.logprobs - ref.logprobs).abs().max() < 1e-4
    assert (s.logprobs - _rescored(model, s)).abs().max() < 1e-4


def test_incremental_text_is_the_full_decode(policy):
    """The stop check's running text equals decode(completion so far) at every token, multi-byte characters split
    across tokens included (an unfinished character shows as U+FFFD in both)."""
    from rlnlp.sampling import _IncrementalText

    _, tok = policy
    text = "naïve café — 日本語のテキスト 🙂🚀 x² ≠ y\n  two  spaces\tand a tab."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    state = _IncrementalText()
    for k, token in enumerate(ids):
        old, new = tok.batch_decode(list(state.windows(token)), skip_special_tokens=True)
        state.advance(old, new)
        assert state.visible() == tok.decode(ids[: k + 1], skip_special_tokens=True)
        assert state.visible().endswith(state.window)  # what may have changed is the end of the text


def test_stop_string_spanning_a_token_boundary(policy):
    """A stop string made of the end of one token and the start of the next ends the completion at the second token."""
    model, tok = policy
    prompt = ["Tell me a story about a dragon."]
    free = sample(model, tok, prompt, max_new_tokens=24, temperature=0)
    ids = free.completion_ids[0, : int(free.lengths[0])].tolist()
    pieces = [tok.decode(ids[: k + 1], skip_special_tokens=True) for k in range(len(ids))]
    # the first boundary k | k+1 after a few tokens where both sides have at least 2 characters of new text
    k = next(k for k in range(3, len(ids) - 1) if len(pieces[k]) - len(pieces[k - 1]) >= 2
             and len(pieces[k + 1]) - len(pieces[k]) >= 2)
    stop = pieces[k + 1][len(pieces[k]) - 2 : len(pieces[k]) + 2]  # 2 characters each side of the boundary
    assert stop not in pieces[k] and stop in pieces[k + 1]
    s = sample(model, tok, prompt, max_new_tokens=24, temperature=0, stop=["<never>", stop])
    assert s.stopped[0] and int(s.lengths[0]) == k + 2
    assert s.completion_ids[0, : k + 2].tolist() == ids[: k + 2] and s.texts[0] == pieces[k + 1]


def test_rows_that_finish_at_different_steps(policy, monkeypatch):
    """Rows end at different steps (stop strings, and EOS — here a common token counted as one): each row's tokens,
    mask and log-probs are what it gets alone, after finished rows have left the compute batch."""
    import rlnlp.sampling as sampling

    model, tok = policy
    period = tok(".", add_special_tokens=False)["input_ids"][0]
    real_eos = sampling._eos_ids
    monkeypatch.setattr(sampling, "_eos_ids", lambda m, t: real_eos(m, t) | {period})
    prompts = ["Name a fruit.", "Write a long sentence about the sea and the sky.", "Count from one to ten.",
               "Say hi.", "List three colors, separated by commas.", "Describe a cat in detail.",
               "What is two plus two?", "Tell me a joke."]
    kw = dict(max_new_tokens=20, temperature=0, stop=[",", "\n"])
    together = sample(model, tok, prompts, **kw)
    lengths = together.lengths.tolist()
    assert len(set(lengths)) >= 3 and sum(together.stopped) >= 4, lengths  # finished at different steps
    alone = Samples.concat([sample(model, tok, [p], **kw) for p in prompts], pad_id=tok.pad_token_id)
    assert together.texts == alone.texts and torch.equal(together.completion_ids, alone.completion_ids)
    assert torch.equal(together.completion_mask, alone.completion_mask) and together.stopped == alone.stopped
    assert (together.logprobs - alone.logprobs).abs().max() < 1e-4
    assert (together.logprobs - _rescored(model, together)).abs().max() < 1e-4
    for i, n in enumerate(lengths):
        last = int(together.completion_ids[i, n - 1])
        assert together.stopped[i] == (last == period or any(x in together.texts[i] for x in kw["stop"]) or
                                       last == tok.eos_token_id)
        assert torch.all(together.completion_ids[i, n:] == tok.pad_token_id)
        assert torch.all(together.logprobs[i, n:] == 0)


def test_n_samples_with_a_seed_are_reproducible(policy):
    model, tok = policy
    prompts = ["Write a short poem about rain.", "Name an animal."]
    run = lambda seed: sample(model, tok, prompts, n=4, max_new_tokens=8, seed=seed)  # noqa: E731
    a = run(7)
    torch.manual_seed(123)  # the global generator does not matter when a seed is given
    b = run(7)
    assert a.texts == b.texts and torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.logprobs, b.logprobs)
    assert len(set(a.texts[:4])) > 1  # the n samples of a prompt are different draws, not copies
    assert run(8).texts != a.texts


def test_small_batch_linear_is_the_same_layer(policy, monkeypatch):
    """Decoding steps on a CPU go through ``(W @ xᵀ)ᵀ``: the same products as ``F.linear`` (bias included), used
    for one-token-per-row inputs only, and removed from the model after the call."""
    import rlnlp.sampling as sampling

    layer = torch.nn.Linear(16, 5)
    for shape in [(3, 1, 16), (2, 7, 16), (1, 16)]:
        x = torch.randn(*shape)
        assert torch.allclose(sampling._small_batch_linear(layer, x), layer(x), atol=1e-6)
    model, tok = policy
    calls = []
    original = sampling._small_batch_linear
    monkeypatch.setattr(sampling, "_small_batch_linear",
                        lambda self, x: calls.append(tuple(x.shape[:-1])) or original(self, x))
    prompts = ["Say hi.", "Write a short poem about the rain in the city."]
    s = sample(model, tok, prompts, n=2, max_new_tokens=8, temperature=0.0)
    tokens_per_row = {c[-1] for c in calls}
    assert 1 in tokens_per_row and max(tokens_per_row) > 1  # every linear of prefill and decode steps is routed
    assert not any("forward" in m.__dict__ for m in model.modules())  # the patch does not outlive the call
    monkeypatch.setattr(sampling, "SMALL_BATCH_ROWS", 0)  # F.linear everywhere: the reference
    ref = sample(model, tok, prompts, n=2, max_new_tokens=8, temperature=0.0)
    assert torch.equal(s.completion_ids, ref.completion_ids)
    assert (s.logprobs - ref.logprobs).abs().max() < 1e-4


def test_bench_command_line_errors_are_one_line(capsys, monkeypatch):
    import rlnlp.models
    from rlnlp.bench import main

    def no_run(*a, **k):
        raise AssertionError("a bad argument reached the run")

    monkeypatch.setattr(rlnlp.models, "load_policy", no_run)  # an erl-seeds argument error must stop before any work

    for argv in (["sampler", "--case", "z"], ["sampler", "--repeat", "0"], ["sampler", "--case"], ["nope"], []):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "usage" in err and "Traceback" not in err
    for argv in (["erl", "--steps", "x"], ["erl", "--rounds", "0"], ["erl", "--methods", "nope"], ["erl", "--profile"],
                 ["erl-seeds"], ["erl-seeds", "--seeds", "one"], ["erl-seeds", "--seeds", "1", "--profile", "gpu"],
                 ["erl-seeds", "--seeds", "1", "--jsonl", "/no/such/folder/x.jsonl"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.count("\n") == 1 and "usage" in err and "Traceback" not in err, err


# --- multi-turn rollouts: each episode's keys carried from one turn to the next ------------------------------------

OPENINGS = ["Let's play a game. I am thinking of an animal. Ask me one yes/no question.",
            "Let's play a game. I am thinking of a fruit. Ask me one yes/no question, then guess.",
            "We play twenty questions about a city. Ask your first question."]
REPLIES = ["No.", "Yes, it is.", "I don't know."]


def _turns(model, tok, conversations, episodes, cache, seed):
    """One turn of every listed episode: sample with the turn cache, append the reply to each conversation."""
    s = sample(model, tok, [conversations[e] for e in episodes], max_new_tokens=8, temperature=1.0, seed=seed,
               stop="\n", turn_cache=cache, episode_ids=episodes)
    for i, e in enumerate(episodes):
        conversations[e] = conversations[e] + [{"role": "assistant", "content": s.texts[i]},
                                               {"role": "user", "content": REPLIES[(e + seed) % len(REPLIES)]}]
    return s


def test_turn_cache_log_probs_equal_rescoring_the_whole_conversation(policy):
    """Three episodes over three turns: each turn encodes only what its episode's cache does not hold, and its
    log-probs equal a re-scoring pass over the whole conversation so far. Given another row's keys (same ids), the
    log-probs move by far more than the tolerance: the test sees a row reading the wrong cache."""
    from rlnlp.sampling import TurnCache, shared_prefix_length

    model, tok = policy
    conversations = {e: [{"role": "user", "content": OPENINGS[e]}] for e in range(3)}
    cache = TurnCache()
    for turn in range(3):
        before = (cache.reused_tokens, cache.prefilled_tokens)
        cached = [cache.cached_tokens(e) for e in range(3)]
        s = _turns(model, tok, conversations, [0, 1, 2], cache, seed=turn)
        assert (s.logprobs - _rescored(model, s)).abs().max() < 1e-4
        prompts = [s.prompt_ids[i][s.prompt_mask[i].bool()].tolist() for i in range(3)]
        reused, encoded = cache.reused_tokens - before[0], cache.prefilled_tokens - before[1]
        if turn:  # each row encodes exactly what its cache does not cover: the reply and the next opening
            common = [min(shared_prefix_length(c, p), len(p) - 1) for c, p in zip(cached, prompts)]
            assert reused == sum(common) > 0 and encoded == sum(len(p) for p in prompts) - reused
            assert encoded < 0.5 * reused, (reused, encoded)
        else:  # the first turn: nothing cached yet (the openings' common prefix is encoded once, for all rows)
            assert reused == 0 and 0 < encoded < sum(len(p) for p in prompts)
        for i in range(3):  # what the cache holds: this prompt and the completion but its last token
            n = int(s.lengths[i])
            ids = s.prompt_ids[i][s.prompt_mask[i].bool()].tolist() + s.completion_ids[i, : n - 1].tolist()
            assert cache.cached_tokens(i) == ids
    # a row given another row's keys (its own ids kept): episodes 0 and 1 swap their cached keys before a turn, and
    # the comparison with the re-scoring pass must see it
    conversations = {e: [{"role": "user", "content": OPENINGS[e]}] for e in range(3)}
    cache = TurnCache()
    _turns(model, tok, conversations, [0, 1, 2], cache, seed=0)
    a, b = cache.episodes[0], cache.episodes[1]
    m = min(len(a.ids), len(b.ids))
    (a.batch, a.row), (b.batch, b.row) = (b.batch, b.row), (a.batch, a.row)
    a.ids, b.ids = a.ids[:m], b.ids[:m]
    s = _turns(model, tok, conversations, [0, 1, 2], cache, seed=1)
    assert (s.logprobs - _rescored(model, s)).abs().max() > 0.05


def test_turn_rows_read_the_leading_keys_they_all_hold_from_one_copy(policy, monkeypatch):
    """The keys every row holds bit for bit (the chat template's system block) are read from one copy, for as many
    tokens as all prompts share; a row whose copy of them differs (here: one key changed) is not given another row's.
    Mutations seen to fail: no comparison of rows from different copies (the changed row reads the others' keys);
    sharing switched off (no shared copy)."""
    import copy

    import rlnlp.sampling as sampling
    from rlnlp.sampling import TurnCache, shared_prefix_length

    model, tok = policy
    made = []
    real_init = sampling._SharedPromptCache.__init__
    monkeypatch.setattr(sampling._SharedPromptCache, "__init__",
                        lambda self, *a, **k: made.append(self) or real_init(self, *a, **k))
    conversations = {e: [{"role": "user", "content": OPENINGS[e]}] for e in range(3)}
    cache = TurnCache()
    _turns(model, tok, conversations, [0, 1, 2], cache, seed=0)
    made.clear()
    s = _turns(model, tok, conversations, [0, 1, 2], cache, seed=1)
    prompts = [s.prompt_ids[i][s.prompt_mask[i].bool()].tolist() for i in range(3)]
    common = min(shared_prefix_length(prompts[0], p) for p in prompts[1:])
    assert common >= sampling.SHARED_PREFIX_MIN_TOKENS and made[0].prefix is not None
    assert made[0].prefix[0][0].shape[2] == common
    assert (s.logprobs - _rescored(model, s)).abs().max() < 1e-4
    assert all(cache.episodes[e].base is made[0].prefix for e in range(3))  # the next turn knows they are equal

    def next_turn(cache, share):  # the same turn from copies of the same cache, with and without sharing
        monkeypatch.setattr(sampling, "SHARE_TURN_PREFIX", share)
        made.clear()
        out = _turns(model, tok, copy.deepcopy(conversations), [0, 1, 2], copy.deepcopy(cache), seed=2)
        return out, made[0]

    for e in range(3):  # forget that the copies are one: the rows are compared (equal: still shared)
        cache.episodes[e].base = None
    shared, seen = next_turn(cache, True)
    plain, _ = next_turn(cache, False)
    assert seen.prefix is not None and not torch.equal(shared.logprobs, plain.logprobs)
    entry = cache.episodes[1]  # one of row 1's leading keys changed: its rows read their own keys
    entry.batch = [(k.clone(), v.clone()) for k, v in entry.batch]
    entry.batch[0][0][entry.row, :, 0] += 1.0
    shared, seen = next_turn(cache, True)
    plain, _ = next_turn(cache, False)
    assert seen.prefix is None and torch.equal(shared.logprobs, plain.logprobs)


def test_grouped_prefill_attention_is_attention(monkeypatch):
    """The multi-turn prefill's attention (key heads shared by groups of query heads, a boolean mask) equals torch's
    attention over keys repeated per query head wherever a query sees a key, and stays finite for a padding query that
    sees none. Mutations seen to fail: the mask not applied; the scale applied twice."""
    from rlnlp.sampling import _grouped_prefill_attention

    torch.manual_seed(0)
    B, Hk, g, U, T, d = 3, 2, 3, 4, 9, 8
    q, k, v = torch.randn(B, Hk * g, U, d), torch.randn(B, Hk, T, d), torch.randn(B, Hk, T, d)
    mask = torch.arange(T)[None, :] <= torch.arange(T - U, T)[:, None]  # causal over the last U positions
    mask = mask[None, None].repeat(B, 1, 1, 1)
    mask[1, :, :, :3] = False  # row 1: left padding
    mask[2, :, 0, :] = False  # row 2: a padding query that sees nothing
    out, _ = _grouped_prefill_attention(None, q, k, v, mask, scaling=0.3)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1),
                                                           attn_mask=mask, scale=0.3).transpose(1, 2)
    seen = mask[:, 0].any(-1)  # (B, U)
    assert out.shape == (B, U, Hk * g, d) and torch.isfinite(out).all()
    assert torch.allclose(out[seen], ref[seen], atol=1e-5) and not seen.all()


def test_turn_cache_rows_end_at_different_turns(policy):
    """Episodes end at different turns and new ones start mid-rollout: each row reuses its own episode's keys only,
    a released episode is gone, and every turn's log-probs equal a re-scoring pass."""
    from rlnlp.sampling import TurnCache

    model, tok = policy
    conversations = {e: [{"role": "user", "content": OPENINGS[e % 3]}] for e in range(4)}
    cache = TurnCache()
    plan = [[0, 1, 2], [2, 0, 3], [3, 0]]  # 1 ends after turn 0, 2 after turn 1; 3 starts at turn 1; order changes
    for turn, episodes in enumerate(plan):
        s = _turns(model, tok, conversations, episodes, cache, seed=10 + turn)
        assert (s.logprobs - _rescored(model, s)).abs().max() < 1e-4
        finished = {0: [1], 1: [2], 2: [0, 3]}[turn]
        cache.release(finished)
        assert sorted(cache.episodes) == sorted(set(episodes) - set(finished))
    assert len(cache) == 0


def test_turn_cache_arguments_are_checked(policy):
    from rlnlp.sampling import TurnCache

    model, tok = policy
    with pytest.raises(ValueError, match="n must be 1"):
        sample(model, tok, ["a", "b"], n=2, turn_cache=TurnCache(), episode_ids=[0, 1])
    with pytest.raises(ValueError, match="distinct"):
        sample(model, tok, ["a", "b"], turn_cache=TurnCache(), episode_ids=[0, 0])
    with pytest.raises(ValueError, match="go with a turn_cache"):
        sample(model, tok, ["a"], episode_ids=[0])


def test_rollout_many_with_an_lm_policy_carries_each_episodes_keys(policy):
    """``rollout_many`` tells an ``LMPolicy`` which episode each observation belongs to: greedy episodes are the same
    with and without the turn cache, later turns reuse cached keys, and ended episodes are released. Mutations seen
    to fail: rollout_many not passing episode ids (nothing reused); not releasing ended episodes (cache not empty)."""
    from rlnlp.envs import GuessNumber, LMPolicy, rollout_many

    model, tok = policy
    kw = dict(max_new_tokens=4, temperature=0)
    prompt = lambda observation: f"{observation} Reply with a single number and nothing else."  # noqa: E731
    reuse = LMPolicy(model, tok, prompt, **kw)
    seen = []
    real_release = reuse.turn_cache.release
    reuse.turn_cache.release = lambda ids: seen.append(len(reuse.turn_cache)) or real_release(ids)
    with_cache = rollout_many([GuessNumber(16, 4) for _ in range(3)], reuse, seeds=[0, 1, 2])
    plain = rollout_many([GuessNumber(16, 4) for _ in range(3)], LMPolicy(model, tok, prompt, reuse_kv=False, **kw),
                         seeds=[0, 1, 2])
    assert [e.actions for e in with_cache] == [e.actions for e in plain] and max(len(e) for e in plain) >= 2
    assert reuse.turn_cache.reused_tokens > 0 and max(seen) > 0 and len(reuse.turn_cache) == 0


def test_sampler_precision_follows_the_runtime(policy, monkeypatch):
    """A CPU without native bf16 samples in fp32 (the same numbers as RLNLP_DTYPE=fp32); under bf16 the log-probs
    move, and stay within the bf16 drift of a re-scoring pass in bf16 (measured 2026-12-06 over 735 tokens: mean
    3.4e-2, max 0.22 nats). Mutation seen to fail: the sampler ignoring the precision (bf16 equal to fp32)."""
    from rlnlp import runtime

    model, tok = policy
    prompts = ["Write a short poem about rain.", "Name three animals that live in the sea."]
    run = lambda: sample(model, tok, prompts, n=2, max_new_tokens=12, temperature=1.0, seed=3)  # noqa: E731
    monkeypatch.setattr(runtime, "_NATIVE_BF16", None)
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: {"avx2", "avx512f"})
    monkeypatch.delenv("RLNLP_DTYPE")
    off = run()
    monkeypatch.setenv("RLNLP_DTYPE", "fp32")
    fp32 = run()
    assert torch.equal(off.completion_ids, fp32.completion_ids) and torch.equal(off.logprobs, fp32.logprobs)
    monkeypatch.setenv("RLNLP_DTYPE", "bf16")
    bf16 = run()
    mask = bf16.completion_mask.bool()
    drift = (bf16.logprobs - _rescored(model, bf16))[mask].abs()
    assert drift.mean() < 0.1 and drift.max() < 0.6, (drift.mean(), drift.max())
    with torch.no_grad():
        monkeypatch.setenv("RLNLP_DTYPE", "fp32")
        exact = _rescored(model, bf16)
    assert (bf16.logprobs - exact)[mask].abs().max() > 1e-3  # bf16 really ran


def test_packed_bf16_weights_sample_what_plain_bf16_copies_do(policy, monkeypatch):
    """Under bf16 the sampler's linear layers read weights packed once for oneDNN: the same products as ``F.linear``
    on plain bf16 copies, bit for bit (prefill and decoding, several prompts and samples), and the packed copies
    really are what the layers read. Mutations seen to fail: the packed product leaving out the bias; the sampler
    keeping plain copies (nothing packed)."""
    import rlnlp.sampling as sampling

    if not sampling._can_pack():
        pytest.skip("this torch build does not pack bf16 weights for oneDNN")
    layer = torch.nn.Linear(16, 5)
    for shape in [(3, 1, 16), (2, 7, 16), (1, 16)]:
        x = torch.randn(*shape)
        reference = torch.nn.functional.linear(x.bfloat16(), layer.weight.bfloat16(), layer.bias.bfloat16())
        assert torch.equal(sampling._bf16_linear(layer, {}, x), reference)
    model, tok = policy
    monkeypatch.setenv("RLNLP_DTYPE", "bf16")
    prompts = ["Write a short poem about rain.", "Name three animals that live in the sea, and say why."]
    run = lambda: sample(model, tok, prompts, n=3, max_new_tokens=10, temperature=1.0, seed=5)  # noqa: E731
    made = []
    pack = sampling._pack_weight
    monkeypatch.setattr(sampling, "_pack_weight", lambda w: made.append(w.shape) or pack(w))
    packed = run()
    shapes = [m.weight.shape for m in model.modules() if type(m) is torch.nn.Linear]
    assert shapes and sorted(made) == sorted(shapes)  # every linear layer's weight, packed once for the call
    monkeypatch.setattr(sampling, "PACK_WEIGHTS", False)
    plain = run()
    assert torch.equal(packed.completion_ids, plain.completion_ids)
    assert torch.equal(packed.logprobs, plain.logprobs)


def test_sampling_leaves_the_global_random_stream_alone(policy, monkeypatch):
    """A seeded ``sample`` call, the first one of a process included (it checks once whether bf16 weights can be
    packed), draws nothing from torch's global generator: a notebook that seeds, samples, then initialises a critic
    gets the same critic as without the sampling. Mutation seen to fail: that one-time check on random tensors."""
    import rlnlp.sampling as sampling

    model, tok = policy
    for dtype in ("fp32", "bf16"):
        monkeypatch.setenv("RLNLP_DTYPE", dtype)
        sampling._can_pack.cache_clear()
        torch.manual_seed(11)
        sample(model, tok, ["Say hi.", "Name a sea animal, please."], n=2, max_new_tokens=4, temperature=1.0, seed=1)
        after = torch.rand(3)
        torch.manual_seed(11)
        assert torch.equal(after, torch.rand(3)), dtype


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_prefill_skipping_the_padding_changes_nothing(policy, monkeypatch, dtype):
    """A prefill of prompts of very different lengths runs its linear layers on the real tokens only; samples and
    log-probs are those of the padded prefill, bit for bit, in both precisions — through the plain prefill and a turn
    cache's. Mutations seen to fail: laying the outputs back out one position off; the turn cache's prefill skipping
    positions one off from its new tokens."""
    import rlnlp.sampling as sampling
    from rlnlp.sampling import TurnCache

    model, tok = policy
    monkeypatch.setenv("RLNLP_DTYPE", dtype)
    prompts = ["Hi.", "Name three animals that live in the sea and say for each one what it eats and where it sleeps.",
               "Why is the sky blue?"]
    scattered = []
    scatter = sampling._scatter_rows
    monkeypatch.setattr(sampling, "_scatter_rows", lambda y, i, shape: scattered.append(shape) or scatter(y, i, shape))

    def run():
        out = [sample(model, tok, prompts, n=2, max_new_tokens=8, temperature=1.0, seed=7)]
        cache = TurnCache()
        for turn in range(2):
            texts = [f"{p} (turn {turn}: " + "go on " * (3 * i * turn) + ")" for i, p in enumerate(prompts)]
            out.append(sample(model, tok, texts, max_new_tokens=6, temperature=1.0, seed=turn, turn_cache=cache,
                              episode_ids=[0, 1, 2]))
        return out

    skipped = run()
    assert scattered  # the padding really was skipped
    monkeypatch.setattr(sampling, "SKIP_PADDING", 0.0)
    padded = run()
    for a, b in zip(skipped, padded):
        assert torch.equal(a.completion_ids, b.completion_ids) and torch.equal(a.logprobs, b.logprobs)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_lean_decoding_steps_equal_the_model_forward(policy, monkeypatch, dtype):
    """Decoding steps of a Llama-family model skip transformers' per-call machinery: samples and log-probs are those of
    the model's own forward, bit for bit, in both precisions, for the plain policy and through a LoRA wrapper.
    Mutations seen to fail: the lean layer adding the attention output without the residual; its query projection
    skipping the LoRA adapter."""
    import rlnlp.sampling as sampling
    from rlnlp.models import attach_lora

    monkeypatch.setenv("RLNLP_DTYPE", dtype)
    steps = []
    step = sampling._lean_decode_step
    monkeypatch.setattr(sampling, "_lean_decode_step", lambda *a: steps.append(1) or step(*a))
    model, tok = policy
    prompts = ["Write a short poem about rain.", "Name three animals that live in the sea."]
    for policy_model in (model, None):
        if policy_model is None:  # a LoRA-wrapped copy whose adapters are not zero
            from rlnlp.models import load_policy

            policy_model = attach_lora(load_policy()[0], dropout=0.0)
            with torch.no_grad():
                for name, p in policy_model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(0, 0.02)
        monkeypatch.setattr(sampling, "LEAN_DECODE", True)
        steps.clear()
        lean = sample(policy_model, tok, prompts, n=2, max_new_tokens=10, temperature=1.0, seed=2)
        assert len(steps) >= 9  # every step after the first token
        monkeypatch.setattr(sampling, "LEAN_DECODE", False)
        full = sample(policy_model, tok, prompts, n=2, max_new_tokens=10, temperature=1.0, seed=2)
        assert torch.equal(lean.completion_ids, full.completion_ids) and torch.equal(lean.logprobs, full.logprobs)


def test_bf16_sampler_sees_weights_a_fused_optimizer_changed(monkeypatch):
    """Under bf16 the sampler samples from bf16 copies of the linear weights. Fused AdamW (the default optimizer of
    transformers' Trainer, so of TRL's GRPO and ERL) writes the weights without bumping their version counter: a copy
    kept while the weight's version is unchanged would sample the policy as it was before training. After one fused
    step that moves the LoRA weights far, the sampler's log-probs must stay within bf16 drift of a re-scoring pass.
    Mutation seen to fail: keeping the copies of trainable weights between calls (keyed on the version only)."""
    from rlnlp.models import attach_lora, load_policy

    monkeypatch.setenv("RLNLP_DTYPE", "bf16")
    model, tok = load_policy()
    model = attach_lora(model, dropout=0.0)
    prompts = ["Write a short poem about rain.", "Name three animals that live in the sea."]
    run = lambda: sample(model, tok, prompts, n=2, max_new_tokens=12, temperature=1.0, seed=3)  # noqa: E731
    before = run()  # the sampler's bf16 copies are made here
    params = [p for p in model.parameters() if p.requires_grad]
    versions = [p._version for p in params]
    opt = torch.optim.AdamW(params, lr=0.05, fused=True)
    logp = completion_logprobs(model, before.prompt_ids, before.prompt_mask, before.completion_ids,
                               before.completion_mask)
    loss = -(logp * before.completion_mask).sum()
    loss.backward()
    opt.step()
    assert [p._version for p in params] == versions  # the trap: nothing marks the weights as changed
    after = run()
    mask = after.completion_mask.bool()
    drift = (after.logprobs - _rescored(model, after))[mask].abs()
    assert drift.mean() < 0.1 and drift.max() < 0.6, (drift.mean(), drift.max())
    moved = (_rescored(model, before) - before.logprobs)[before.completion_mask.bool()].abs().mean()
    assert moved > 0.5, moved  # the step did move the policy far beyond bf16 drift


def test_precision_and_turns_benchmarks_reject_bad_options_in_one_line(capsys, monkeypatch):
    import rlnlp.models
    from rlnlp.bench import main

    def no_run(*a, **k):
        raise AssertionError("a bad argument reached the run")

    monkeypatch.setattr(rlnlp.models, "load_policy", no_run)
    for argv in (["precision", "--repeat", "0"], ["precision", "--steps", "x"], ["turns", "--episodes", "x"],
                 ["turns", "--turns", "0"], ["turns", "--repeat", "0"], ["turns", "--nope", "1"]):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse exits with status 2
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "usage" in err and "Traceback" not in err, (argv, err)
    monkeypatch.setenv("RLNLP_DTYPE", "fp16")
    assert main(["turns"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fp32, bf16" in err
