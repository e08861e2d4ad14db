"""vLLM's sampling extensions: min_p, min_tokens, stop_token_ids, include_stop_str_in_output and
allowed_token_ids do what vLLM documents, and its options this server does not implement are
refused with a 400 naming the field instead of being ignored."""

import openai
import pytest
import torch

from colossuslm.serve.api import ServerSettings
from colossuslm.serve.detokenizer import StopStringMatcher
from colossuslm.serve.engine import LLMEngine
from colossuslm.serve.errors import InvalidRequestError
from colossuslm.serve.sampling import SamplingParams, sample, sampling_probs
from tests.serve_helpers import checkpoint_fixture, engine_fixture, one_torch_thread, openai_client  # noqa: F401 (fixtures)


def greedy(engine: LLMEngine, prompt: list[int], tokens: int, **fields) -> list[int]:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, **fields).validate()
    return engine.generate([prompt], params)[0].token_ids


def test_min_p_keeps_the_tokens_at_least_that_share_of_the_likeliest():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.12, 0.05, 0.03]]))
    params = SamplingParams(min_p=0.2)  # keeps p >= 0.1: the first three
    expected = torch.tensor([0.5, 0.3, 0.12]) / 0.92
    probs = sampling_probs(logits, params)[0]
    assert probs[:3].tolist() == pytest.approx(expected.tolist(), rel=1e-5) and probs[3:].sum() == 0
    drawn = {sample(logits, [params], [torch.Generator().manual_seed(s)])[0] for s in range(200)}
    assert drawn == {0, 1, 2}
    with pytest.raises(InvalidRequestError):
        SamplingParams(min_p=1.5).validate()


def test_min_tokens_holds_back_stop_tokens_and_stop_strings(engine):
    prompt = engine.tokenizer.encode("The quick brown fox").ids
    first = greedy(engine, prompt, 1)[0]
    assert greedy(engine, prompt, 8, stop_token_ids=[first]) == [first]  # it would stop at once
    held = engine.generate(
        [prompt], SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=[first], min_tokens=5)
    )
    assert len(held[0].token_ids) >= 5 and first not in held[0].token_ids[:5]
    assert held[0].finish_reason in ("stop", "length")
    # a stop string found in the first min_tokens tokens does not end the reply
    plain = greedy(engine, prompt, 6)
    stop = engine.tokenizer.decode(plain[:1]).strip()
    assert stop
    cut = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, stop=[stop]))[0]
    kept = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, stop=[stop], min_tokens=6))[0]
    assert cut.completion_tokens < 6 and kept.completion_tokens == 6
    with pytest.raises(InvalidRequestError):
        SamplingParams(max_tokens=4, min_tokens=5).validate()


def test_include_stop_str_in_output_keeps_the_stop_string(engine):
    matcher = StopStringMatcher(["END"], keep_stop=True)
    for piece in ("so it E", "NDs here"):
        matcher.add(piece)
    assert matcher.stopped and matcher.take(final=True) == "so it END"
    prompt = engine.tokenizer.encode("Hello there, general").ids
    params = dict(max_tokens=12, seed=5, ignore_eos=True)
    text = engine.generate([prompt], SamplingParams(**params))[0].text
    # a stop string that first occurs mid-reply (the same seed gives the same reply up to it)
    stop = next(text[i : i + 2] for i in range(1, len(text) - 1) if text.find(text[i : i + 2]) == i)
    without = engine.generate([prompt], SamplingParams(**params, stop=[stop]))[0].text
    with_stop = engine.generate([prompt], SamplingParams(**params, stop=[stop], include_stop_str_in_output=True))[
        0
    ].text
    assert without == text[: text.find(stop)] and with_stop == without + stop


def test_allowed_token_ids_limit_what_is_sampled(engine):
    prompt = engine.tokenizer.encode("Once upon a time").ids
    allowed = [11, 22, 33]
    params = SamplingParams(max_tokens=12, seed=3, allowed_token_ids=allowed, ignore_eos=True)
    assert set(engine.generate([prompt], params)[0].token_ids) <= set(allowed)
    with pytest.raises(InvalidRequestError, match="allowed_token_ids") as info:
        engine.make_request(prompt, SamplingParams(allowed_token_ids=[10**6]))
    assert info.value.param == "allowed_token_ids"


def test_http_takes_vllm_fields_and_refuses_those_it_would_ignore(checkpoint, engine):
    with openai_client(checkpoint, ServerSettings(model_name="m")) as client:
        first = client.completions.create(model="m", prompt="Hello", max_tokens=1, temperature=0)
        first_id = engine.tokenizer.encode(first.choices[0].text).ids[0]
        stopped = client.completions.create(
            model="m", prompt="Hello", max_tokens=6, temperature=0, extra_body={"stop_token_ids": [first_id]}
        )
        assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens == 1
        held = client.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=5,
            extra_body={"min_tokens": 5, "min_p": 0.1, "allowed_token_ids": [40, 41, 42]},
        )
        assert held.usage.completion_tokens == 5
        harmless = {"skip_special_tokens": True, "use_beam_search": False, "bad_words": []}
        client.completions.create(model="m", prompt="Hello", max_tokens=1, extra_body=harmless)
        for extra in (
            {"use_beam_search": True},
            {"skip_special_tokens": False},
            {"bad_words": ["fox"]},
            {"truncate_prompt_tokens": 4},
            {"stop_token_ids": [10**6]},
            {"min_tokens": 9},
        ):
            with pytest.raises(openai.BadRequestError) as info:
                client.completions.create(model="m", prompt="Hello", max_tokens=2, extra_body=extra)
            assert info.value.body["param"] == next(iter(extra)), extra
        chat = dict(model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
        client.chat.completions.create(**chat, modalities=["text"])
        for extra in ({"chat_template_kwargs": {"x": 1}}, {"modalities": ["text", "audio"]}):
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(**chat, extra_body=extra)
            assert info.value.body["param"] == next(iter(extra))
