"""The one sampler: shapes, grouping, stop handling, log-probs consistent with a re-scoring pass."""
import pytest
import torch

from rlnlp.models import completion_logprobs
from rlnlp.sampling import render_prompts, sample


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
        again = completion_logprobs(model, s.prompt_ids, s.prompt_mask, s.completion_ids, s.completion_mask, temperature=0.7)
    assert torch.allclose(again, s.logprobs, atol=1e-3)


def test_stop_string_ends_at_the_first_token_where_it_appears(policy):
    model, tok = policy
    s = sample(model, tok, ["List three animals, one per line."] * 4, max_new_tokens=40, stop="\n", seed=2)
    for i, text in enumerate(s.texts):
        n = int(s.lengths[i])
        if s.stopped[i] and int(s.completion_ids[i, n - 1]) not in (tok.eos_token_id,):
            assert "\n" in text
            # one token fewer and the stop string had not appeared yet
            assert "\n" not in tok.decode(s.completion_ids[i, : n - 1], skip_special_tokens=True)
        else:
            assert n == 40 or not s.stopped[i] or "\n" not in text


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
