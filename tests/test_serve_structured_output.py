"""Structured output: a JSON schema, a regex, a choice or a grammar holds whatever the model would
rather say, in the engine and over HTTP with the official `openai` client."""

import json
import re

import openai
import pytest
import torch

from colossuslm.serve.api import ServerSettings
from colossuslm.serve.engine import EngineConfig, LLMEngine
from colossuslm.serve.errors import InvalidRequestError
from colossuslm.serve.sampling import SamplingParams
from colossuslm.serve.structured_output import allowed_tokens, constraint_from_request
from tests.serve_helpers import checkpoint_fixture, engine_fixture, one_torch_thread, openai_client  # noqa: F401 (fixtures)

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
        "animal": {"enum": ["fox", "dog"]},
    },
    "required": ["ok", "n", "animal"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-z]{2}"
CHOICES = ["fox", "lazy dog", "blue sky"]
GRAMMAR = 'start: "(" digit ("+" digit)* ")"\ndigit: /[0-9]/'


def matches_schema(text: str) -> bool:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return False
    return (
        isinstance(value, dict)
        and list(value) == ["ok", "n", "animal"]  # in the schema's order
        and isinstance(value["ok"], bool)
        and type(value["n"]) is int
        and 0 <= value["n"] <= 9
        and value["animal"] in ("fox", "dog")
    )


CASES = {
    "json_schema": (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}},
        matches_schema,
    ),
    "regex": ({"guided_regex": REGEX}, lambda text: re.fullmatch(REGEX, text) is not None),
    "choice": ({"guided_choice": CHOICES}, lambda text: text in CHOICES),
    "grammar": ({"structured_outputs": {"grammar": GRAMMAR}}, lambda text: re.fullmatch(r"\([0-9](\+[0-9])*\)", text)),
}


def prompt_of(engine: LLMEngine) -> list[int]:
    return engine.tokenizer.encode("Hello there! What is two plus two?").ids


@pytest.mark.parametrize("case", list(CASES))
def test_sampled_outputs_stay_in_the_language_and_end_when_it_is_complete(engine, case):
    fields, valid = CASES[case]
    constraint = constraint_from_request(fields)
    seeds = range(4)
    free = engine.generate([prompt_of(engine)] * 4, [SamplingParams(max_tokens=24, seed=s) for s in seeds])
    assert not any(valid(r.text) for r in free)  # the model left alone says something else
    held = engine.generate(
        [prompt_of(engine)] * 4, [SamplingParams(max_tokens=40, seed=s, constraint=constraint) for s in seeds]
    )
    for result in held:
        assert valid(result.text), result.text
        assert result.finish_reason == "stop"


def test_greedy_picks_the_models_best_token_among_those_allowed(engine):
    prompt = prompt_of(engine)
    constraint = constraint_from_request({"guided_regex": "[0-9]+"})
    with torch.no_grad():
        logits = engine.model(torch.tensor([prompt]))[0][0, -1].float()
    allowed = allowed_tokens([engine.grammars.matcher(constraint)], engine.vocab_size)[0]
    best = int(logits.masked_fill(~allowed, float("-inf")).argmax())
    assert int(logits.argmax()) != best  # the unconstrained choice is not a digit
    result = engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0, constraint=constraint))[0]
    assert result.token_ids == [best]
    assert result.finish_reason == "length"  # a digit string may go on: only max_tokens ended it


def test_allowed_tokens_agree_with_llguidances_own_mask(engine):
    constraint = constraint_from_request({"guided_json": SCHEMA})
    matcher = engine.grammars.matcher(constraint)
    for token in engine.tokenizer.encode('{"ok": tr').ids:
        assert matcher.consume_token(token)
    mask = allowed_tokens([matcher], engine.vocab_size)[0]
    bias = torch.frombuffer(bytearray(matcher.compute_logit_bias()), dtype=torch.uint8)[: engine.vocab_size]
    assert torch.equal(mask, bias > 0)
    assert 0 < int(mask.sum()) < engine.vocab_size // 4


def test_constrained_requests_run_beside_speculative_decoding(checkpoint):
    engine = LLMEngine.from_checkpoint(
        checkpoint, device="cpu", config=EngineConfig(max_num_seqs=4, speculative="ngram", num_speculative_tokens=3)
    )
    fields, valid = CASES["json_schema"]
    params = [SamplingParams(max_tokens=40, seed=s, constraint=constraint_from_request(fields)) for s in range(2)]
    results = engine.generate([prompt_of(engine)] * 3, [*params, SamplingParams(max_tokens=30, temperature=0.0)])
    assert all(valid(r.text) for r in results[:2])
    assert engine.stats().spec_draft_tokens > 0  # the unconstrained request still speculated


@pytest.mark.parametrize(
    ("fields", "param", "fragment"),
    [
        ({"guided_regex": "a(b"}, "guided_regex", "is invalid"),
        ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
        ({"guided_choice": []}, "guided_choice", "non-empty list"),
        ({"guided_grammar": "start: undefined_rule"}, "guided_grammar", "is invalid"),
        ({"structured_outputs": {"yaml": "a: 1"}}, "structured_outputs", "unsupported keys"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "not several"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ],
)
def test_bad_constraints_are_refused_naming_the_field(engine, fields, param, fragment):
    with pytest.raises(InvalidRequestError, match=fragment) as info:
        constraint = constraint_from_request(fields)
        engine.make_request(prompt_of(engine), SamplingParams(constraint=constraint))
    assert info.value.param == param


@pytest.fixture(scope="module")
def client(checkpoint):
    with openai_client(checkpoint, ServerSettings(model_name="tiny"), EngineConfig(max_num_seqs=4)) as client:
        yield client


def test_openai_client_gets_json_matching_its_schema(client):
    fields, valid = CASES["json_schema"]
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello!"}], max_tokens=40, seed=1, **fields
    )
    assert valid(reply.choices[0].message.content)
    assert reply.choices[0].finish_reason == "stop"
    plain_json = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hello!"}],
        max_tokens=60,
        temperature=0.0,
        response_format={"type": "json_object"},
    )
    assert plain_json.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(plain_json.choices[0].message.content), dict)


def test_vllm_extensions_on_completions_streamed_and_not(client):
    _, valid = CASES["choice"]
    text = client.completions.create(
        model="tiny", prompt="The quick brown", max_tokens=10, extra_body={"guided_choice": CHOICES}
    )
    assert valid(text.choices[0].text)
    stream = client.completions.create(
        model="tiny", prompt="The quick brown", max_tokens=10, stream=True, extra_body={"guided_regex": REGEX}
    )
    streamed = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
    assert re.fullmatch(REGEX, streamed)


def test_an_invalid_constraint_is_a_400_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt="x", max_tokens=4, extra_body={"guided_regex": "a(b"})
    assert info.value.body["param"] == "guided_regex"
