"""The HTTP API for real: uvicorn on a free 127.0.0.1 port, driven by the official `openai` client
(and raw httpx where the client would hide what is on the wire)."""

import contextlib
import json
import threading
import time

import httpx
import openai
import pytest

from colossuslm.serve.api import ServerSettings, create_app
from colossuslm.serve.async_engine import AsyncEngine
from colossuslm.serve.engine import EngineConfig, LLMEngine
from tests.serve_helpers import ServerThread, make_checkpoint, one_torch_thread  # noqa: F401 (fixture)

KEY = "test-key-123"
MODEL = "tiny-test"
MAX_CONCURRENT = 6
HI = [{"role": "user", "content": "Hello there! How are you?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = make_checkpoint(tmp_path_factory.mktemp("api"))
    engine = AsyncEngine(LLMEngine.from_checkpoint(ckpt, device="cpu", config=EngineConfig(max_num_seqs=4))).start()
    settings = ServerSettings(
        model_name=MODEL, api_key=KEY, max_concurrent_requests=MAX_CONCURRENT, max_body_bytes=32 * 1024
    )
    with ServerThread(create_app(engine, settings)) as srv:
        srv.engine = engine
        yield srv
    engine.shutdown()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=30)


def post(server, path: str, body, key: str | None = KEY, timeout: float = 30) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        f"{server.url}{path}", content=content, headers=headers | {"Content-Type": "application/json"}, timeout=timeout
    )


def wait_until_idle(server, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = server.engine.stats()
        if stats.running == stats.waiting == 0 and stats.kv_cache_usage == 0:
            return
        time.sleep(0.02)
    raise AssertionError(f"engine still busy: {server.engine.stats()}")


@contextlib.contextmanager
def slow_engine(server, seconds_per_step: float = 0.03):
    """Make each engine step take a while, so requests are surely still running when we act."""
    engine = server.engine.engine
    real_step = engine.step

    def slow_step():
        time.sleep(seconds_per_step)
        return real_step()

    engine.step = slow_step
    try:
        yield
    finally:
        del engine.step


def test_models_health_and_completion(server, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    reply = client.completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=7, temperature=0, extra_body={"ignore_eos": True}
    )
    tokenizer = server.engine.tokenizer
    assert reply.object == "text_completion" and reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens == len(tokenizer.encode("The quick brown fox").ids)
    assert reply.usage.completion_tokens == 7 and reply.usage.total_tokens == reply.usage.prompt_tokens + 7


def test_prompt_given_as_token_ids(server, client):
    ids = server.engine.tokenizer.encode("The quick brown fox").ids
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    by_text = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text and by_ids.usage.prompt_tokens == len(ids)


def test_chat_plain_and_streamed_agree(client):
    plain = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=12, temperature=0)
    choice = plain.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    stream = client.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump()["total_tokens"] == plain.usage.total_tokens


def test_sse_wire_format_ends_with_done(server):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 5, "stream": True, "temperature": 0}
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    last = json.loads(events[-2][len("data: ") :])
    assert last["choices"][0]["finish_reason"] in ("stop", "length")


def test_seed_makes_sampling_reproducible(client):
    def ask(seed):
        return (
            client.chat.completions.create(
                model=MODEL, messages=HI, max_tokens=16, temperature=1.0, top_p=0.95, seed=seed
            )
            .choices[0]
            .message.content
        )

    assert ask(11) == ask(11)


def test_concurrent_requests_are_all_served(server, client):
    results, errors = {}, []

    def worker(i):
        try:
            reply = client.completions.create(
                model=MODEL,
                prompt=f"Request number {i}",
                max_tokens=10 + i,
                temperature=0.8,
                seed=i,
                extra_body={"ignore_eos": True},
            )
            results[i] = reply.usage.completion_tokens
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(MAX_CONCURRENT)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == {i: 10 + i for i in range(MAX_CONCURRENT)}
    wait_until_idle(server)


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        (b'{"model": "tiny-test", "prompt": ', 400, "not valid JSON"),
        ({"model": "gpt-4", "prompt": "x"}, 404, "does not exist"),
        ({"model": MODEL, "prompt": "x", "temperature": 3}, 400, "temperature"),
        ({"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
        ({"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ({"model": MODEL, "prompt": "x", "n": 129}, 400, "between 1 and 128"),
        ({"model": MODEL, "prompt": "word " * 200}, 400, "maximum context length is 128"),
        ({"model": MODEL}, 400, "prompt"),
    ],
)
def test_bad_completion_requests(server, body, status, fragment):
    response = post(server, "/v1/completions", body)
    assert response.status_code == status
    error = response.json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "messages, fragment",
    [
        ([{"role": "wizard", "content": "hi"}], "role"),
        ([{"role": "user", "content": "word " * 200}], "maximum context length"),
        ([], "messages"),
    ],
)
def test_bad_chat_requests(client, messages, fragment):
    with pytest.raises(openai.BadRequestError, match=fragment):
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)


def test_unknown_model_and_route_use_the_openai_error_shape(server, client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=HI)
    assert info.value.body["code"] == "model_not_found"
    response = httpx.get(f"{server.url}/v2/everything", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 404 and "/v1/chat/completions" in response.json()["error"]["message"]


def test_api_key_is_enforced(server):
    for key in (None, "wrong-key"):
        response = post(server, "/v1/completions", {"model": MODEL, "prompt": "x"}, key=key)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).models.list()
    assert httpx.get(f"{server.url}/health").status_code == 200  # probes need no key


def test_body_size_limit(server):
    response = post(server, "/v1/completions", {"model": MODEL, "prompt": "x" * 40_000})
    assert response.status_code == 413 and "limit" in response.json()["error"]["message"]


def test_client_disconnect_mid_stream_frees_its_slot(server):
    body = {"model": MODEL, "messages": HI, "max_tokens": 100, "stream": True, "ignore_eos": True}
    with slow_engine(server):
        with httpx.stream(
            "POST",
            f"{server.url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=30,
        ) as response:
            events = (line for line in response.iter_lines() if line)
            for _ in range(3):  # the role chunk, then generated text
                assert next(events).startswith("data: ")
            assert server.engine.stats().running == 1
        # Leaving the `with` closed the connection after one chunk, ~3 s before the reply would end.
        wait_until_idle(server, timeout=2.0)


def test_client_disconnect_while_waiting_for_a_plain_reply_frees_its_slot(server):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 100, "ignore_eos": True}
    with slow_engine(server):
        with pytest.raises(httpx.ReadTimeout):
            post(server, "/v1/completions", body, timeout=0.3)
        wait_until_idle(server, timeout=2.0)


def test_concurrency_limit_answers_429(server, client):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 100, "stream": True, "ignore_eos": True}
    with slow_engine(server), contextlib.ExitStack() as stack:
        http = stack.enter_context(httpx.Client(headers={"Authorization": f"Bearer {KEY}"}, timeout=30))
        for _ in range(MAX_CONCURRENT):
            response = stack.enter_context(http.stream("POST", f"{server.url}/v1/completions", json=body))
            assert response.status_code == 200
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model=MODEL, prompt="one too many", max_tokens=2)
    wait_until_idle(server, timeout=3.0)


def test_metrics_are_prometheus_text(server, client):
    client.completions.create(model=MODEL, prompt="count me", max_tokens=3)
    text = httpx.get(f"{server.url}/metrics").text
    assert 'colossus_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'colossus_requests_total{endpoint="/v1/completions",status="400"}' in text
    for name in (
        "colossus_time_to_first_token_seconds_count",
        "colossus_request_latency_seconds_bucket",
        "colossus_generation_tokens_total",
        "colossus_prompt_tokens_total",
        "colossus_requests_running",
        "colossus_kv_cache_usage_ratio",
    ):
        assert name in text
    generated = next(line for line in text.splitlines() if line.startswith("colossus_generation_tokens_total "))
    assert float(generated.split()[1]) > 0


def test_metric_values_keep_their_precision():
    from colossuslm.serve.metrics import Counter, Gauge

    tokens = Counter("colossus_tokens_total", "tokens")
    tokens.inc(1234567)
    assert tokens.render()[-1] == "colossus_tokens_total 1234567"  # not 1.23457e+06
    tokens.inc(0.25)
    assert tokens.render()[-1] == "colossus_tokens_total 1234567.25"
    assert (
        Gauge("colossus_seconds", "s", lambda: 0.12215656400439912).render()[-1]
        == "colossus_seconds 0.12215656400439912"
    )
