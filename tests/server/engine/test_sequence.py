"""Sequence state and sampling: finish reasons, stop strings, per-request generators, top-p."""

import pytest
import torch

from server.engine.requests import InvalidRequest, Request, SamplingParams
from server.engine.sampling import make_generator, next_tokens
from server.engine.sequence import Sequence, prefill_groups


def seq(params=None, slot=1):
    params = params or SamplingParams()
    return Sequence(Request([1, 2], "t", params), slot, "t", make_generator(params, "cpu"))


def test_params_are_validated_all_at_once():
    with pytest.raises(InvalidRequest, match="max_new_tokens.*temperature.*top_p.*logprobs.*prompt_logprobs"):
        SamplingParams(max_new_tokens=-1, temperature=-1, top_p=0, logprobs=21, prompt_logprobs=-1)
    SamplingParams(max_new_tokens=0, logprobs=0, prompt_logprobs=20)  # a prompt scored, nothing generated


def test_finish_reasons():
    s = seq(SamplingParams(max_new_tokens=3))
    s.append(5, frozenset({9}), None)
    assert s.finish_reason is None
    s.append(9, frozenset({9}), None)
    assert s.finish_reason == "eos"
    s = seq(SamplingParams(max_new_tokens=2, ignore_eos=True))
    s.append(9, frozenset({9}), None), s.append(9, frozenset({9}), None)
    assert s.finish_reason == "length"


def test_results_time_the_tokens_after_the_first():
    s = seq(SamplingParams(max_new_tokens=3))
    s.append(5, frozenset(), None)
    assert s.result().after_first_token_seconds is None           # one token: no time between tokens
    s.append(6, frozenset(), None), s.append(7, frozenset(), None)
    result = s.result()
    assert result.after_first_token_seconds == s.last_token_at - s.first_token_at >= 0
    assert s.request.arrived <= s.first_token_at <= s.last_token_at


def test_time_per_output_token_is_observed_per_request():
    from server.engine.outputs import Result
    from server.http.metrics import ServerMetrics

    metrics = ServerMetrics(lambda: None)
    metrics.finished("t", Result("a", "t", [1, 2, 3, 4, 5], after_first_token_seconds=0.4), 1.0)
    metrics.finished("t", Result("b", "t", [1]), 1.0)              # one token: not observed
    assert metrics.registry.get_sample_value("mhr_time_per_output_token_seconds_count") == 1
    assert metrics.registry.get_sample_value("mhr_time_per_output_token_seconds_sum") == pytest.approx(0.1)


def test_stop_string_cuts_the_text_even_across_tokens():
    pieces = {1: "hel", 2: "lo wo", 3: "rld"}
    s = seq(SamplingParams(max_new_tokens=10, stop=("o w",)))
    decode = lambda toks: "".join(pieces[t] for t in toks)  # noqa: E731
    assert s.append(1, frozenset(), decode) == "hel"
    assert s.append(2, frozenset(), decode) == "l"
    assert s.text == "hell" and s.finish_reason == "stop"


def test_partial_characters_are_held_back():
    s = seq()
    decode = lambda toks: "ab\ufffd" if len(toks) == 1 else "abé"  # noqa: E731
    assert s.append(1, frozenset(), decode) == ""
    assert s.append(2, frozenset(), decode) == "abé"


def test_sampling_depends_on_the_request_only():
    logits = torch.randn(3, 50)
    params = SamplingParams(temperature=1.0, seed=7)
    alone = [next_tokens(logits[1:2], [seq(params)])[0] for _ in range(2)]
    mixed = next_tokens(logits, [seq(SamplingParams(temperature=0.8, seed=1)), seq(params), seq()])
    assert alone[0] == alone[1] == mixed[1]
    assert mixed[2] == int(logits[2].argmax())  # greedy rows take the argmax


def test_tiny_top_p_keeps_only_the_best_token():
    logits = torch.randn(1, 50)
    params = SamplingParams(temperature=2.0, top_p=1e-6, seed=3)
    assert next_tokens(logits, [seq(params)]) == [int(logits[0].argmax())]


def test_prefill_groups_bound_the_padding():
    lengths = [16, 64, 60, 20, 33, 62, 17]
    groups = prefill_groups(lengths, 0.25)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert max(lengths[i] for i in g) * len(g) <= 1.25 * sum(lengths[i] for i in g)
    assert groups[0][:3] == [1, 5, 2] and len(groups) < len(lengths)  # longest first
    assert prefill_groups([8, 8, 8], 0.25) == [[0, 1, 2]]
    assert prefill_groups([8, 5, 8, 5, 9], 0.0) == [[4], [0, 2], [1, 3]]  # no padding: one length a group


def test_incremental_text_equals_decoding_every_token(tiny_tokenizer):
    """Text built from short decoded windows equals decoding the whole output, multi-byte characters included."""
    ids = tiny_tokenizer("Größe: 12 € — the quiet river; 東京 and the old house", add_special_tokens=False)["input_ids"]
    ids += torch.randint(4, tiny_tokenizer.vocab_size, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    s = seq(SamplingParams(max_new_tokens=len(ids)))
    decode = lambda toks: tiny_tokenizer.decode(toks, skip_special_tokens=True)  # noqa: E731
    streamed = "".join(s.append(t, frozenset(), decode) for t in ids)
    assert streamed == s.text == decode(ids).removesuffix("\ufffd")
