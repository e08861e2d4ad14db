"""n > 1: several choices for one request, each a sequence of its own (choice i samples with
seed + i), plain and streamed, over HTTP with the official `openai` client."""

import openai
import pytest

from colossuslm.serve.api import ServerSettings
from colossuslm.serve.engine import EngineConfig
from tests.serve_helpers import make_checkpoint, one_torch_thread, openai_client  # noqa: F401 (fixture)

LIMIT = 6
HI = [{"role": "user", "content": "Hello there! How are you?"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("choices"))
    settings = ServerSettings(model_name="m", max_concurrent_requests=LIMIT)
    with openai_client(ckpt, settings, EngineConfig(max_num_seqs=4)) as client:
        yield client


def test_each_choice_is_the_request_with_its_own_seed(client):
    asked = dict(model="m", prompt="The quick brown", max_tokens=6, seed=5, extra_body={"ignore_eos": True})
    reply = client.completions.create(n=3, **asked)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    alone = [client.completions.create(**(asked | {"seed": 5 + i})).choices[0].text for i in range(3)]
    assert [c.text for c in reply.choices] == alone
    assert len(set(alone)) > 1  # different seeds, different samples
    assert reply.usage.completion_tokens == 3 * 6
    assert reply.usage.prompt_tokens == client.completions.create(**asked).usage.prompt_tokens  # counted once


def test_streamed_choices_arrive_interleaved_and_equal_the_plain_ones(client):
    asked = dict(model="m", messages=HI, max_tokens=8, seed=11, n=2)
    plain = client.chat.completions.create(**asked)
    texts, roles, reasons = {0: "", 1: ""}, set(), {}
    stream = client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **asked)
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.role:
                roles.add((choice.index, choice.delta.role))
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    assert roles == {(0, "assistant"), (1, "assistant")}
    assert [texts[0], texts[1]] == [c.message.content for c in plain.choices]
    assert set(reasons) == {0, 1}
    assert usage.completion_tokens == plain.usage.completion_tokens


def test_greedy_choices_are_alike(client):
    reply = client.chat.completions.create(model="m", messages=HI, max_tokens=5, n=2, temperature=0.0)
    assert reply.choices[0].message.content == reply.choices[1].message.content


def test_choices_count_against_the_server_limit(client):
    with pytest.raises(openai.BadRequestError) as info:  # could never fit: not a retry later
        client.chat.completions.create(model="m", messages=HI, max_tokens=2, n=LIMIT + 1)
    assert info.value.body["param"] == "n"
    assert len(client.chat.completions.create(model="m", messages=HI, max_tokens=2, n=LIMIT).choices) == LIMIT
    with client.chat.completions.create(model="m", messages=HI, max_tokens=50, n=LIMIT - 1, stream=True) as busy:
        next(iter(busy))  # LIMIT - 1 sequences admitted and running
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="m", messages=HI, max_tokens=2, n=2)
