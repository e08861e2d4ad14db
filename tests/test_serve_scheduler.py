"""The scheduler's contract (serve/scheduler.py): requests enter with `add_request`, leave with
`finish_requests(ids, reason)`, which frees their KV blocks and marks them finished with the
reason, whether they were waiting or running; `has_unfinished` says whether any are left. The
engine and the async engine go through these and never edit the queues themselves."""

import asyncio

import pytest

from colossuslm.serve.async_engine import AsyncEngine
from colossuslm.serve.engine import EngineConfig, LLMEngine
from colossuslm.serve.errors import InvalidRequestError
from colossuslm.serve.loading import load_for_inference
from colossuslm.serve.request import FINISH_REASONS, Status
from colossuslm.serve.sampling import SamplingParams
from tests.serve_helpers import make_checkpoint, one_torch_thread  # noqa: F401 (fixture)

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_for_inference(make_checkpoint(tmp_path_factory.mktemp("sched")), device="cpu")


def engine_for(loaded, **config) -> LLMEngine:
    return LLMEngine.from_loaded(loaded, EngineConfig(**({"max_num_seqs": 4, "block_size": 8} | config)))


def prompt(loaded, text: str = "Hello there! How are you today?") -> list[int]:
    return loaded.tokenizer.encode(text).ids


def used_blocks(engine: LLMEngine) -> int:
    allocator = engine.scheduler.allocator
    return allocator.num_blocks - allocator.num_free


@pytest.mark.parametrize("reason", FINISH_REASONS)
def test_finish_requests_frees_the_blocks_and_reports_the_reason(loaded, reason):
    engine = engine_for(loaded, enable_prefix_caching=False)
    keep = engine.add_request(prompt(loaded), SamplingParams(max_tokens=20, **GREEDY))
    drop = engine.add_request(prompt(loaded, "The quick brown fox"), SamplingParams(max_tokens=20, **GREEDY))
    engine.step()
    engine.step()
    scheduler = engine.scheduler
    request = scheduler.requests[drop]
    held, before = len(request.block_table), used_blocks(engine)
    assert request.status is Status.RUNNING and held > 0
    assert scheduler.finish_requests([drop], reason) == [request]
    assert (request.status, request.finish_reason, request.block_table) == (Status.FINISHED, reason, [])
    assert used_blocks(engine) == before - held
    assert scheduler.num_running == 1 and scheduler.has_unfinished()
    assert scheduler.finish_requests(drop, reason) == []  # finished already: skipped
    assert scheduler.finish_requests("no-such-request", reason) == []
    while engine.has_unfinished_requests():
        assert all(out.request_id == keep for out in engine.step())
    assert used_blocks(engine) == 0 and not scheduler.has_unfinished()


def test_an_unknown_finish_reason_is_refused(loaded):
    engine = engine_for(loaded)
    request_id = engine.add_request(prompt(loaded), SamplingParams(max_tokens=4, **GREEDY))
    with pytest.raises(ValueError, match="finish reason"):
        engine.scheduler.finish_requests(request_id, "done")
    assert engine.has_unfinished_requests()


def test_has_unfinished_follows_requests_in_and_out(loaded):
    engine = engine_for(loaded)
    scheduler = engine.scheduler
    assert not scheduler.has_unfinished()
    engine.add_request(prompt(loaded), SamplingParams(max_tokens=3, **GREEDY))
    assert scheduler.has_unfinished() and (scheduler.num_waiting, scheduler.num_running) == (1, 0)
    engine.step()
    assert scheduler.has_unfinished() and (scheduler.num_waiting, scheduler.num_running) == (0, 1)
    outputs = [out for _ in range(3) for out in engine.step()]
    assert outputs[-1].finished and outputs[-1].finish_reason == "length"
    assert not scheduler.has_unfinished() and not scheduler.requests


def test_aborting_a_waiting_and_a_running_request(loaded):
    """One batch slot: the first request runs, the next two wait. Aborting the running one and a
    waiting one leaves the third to run alone, with the tokens it gets when it runs alone."""
    params = SamplingParams(max_tokens=8, **GREEDY)
    texts = ["Hello there!", "The quick brown fox", "What is two plus two?"]
    alone = engine_for(loaded, max_num_seqs=1).generate([prompt(loaded, texts[2])], params)[0].token_ids
    engine = engine_for(loaded, max_num_seqs=1)
    running, waiting, last = (engine.add_request(prompt(loaded, t), params) for t in texts)
    engine.step()
    scheduler = engine.scheduler
    assert scheduler.requests[running].status is Status.RUNNING
    assert scheduler.requests[waiting].status is Status.WAITING and scheduler.num_waiting == 2
    assert engine.abort_request(waiting) and engine.abort_request(running)
    assert not engine.abort_request(waiting)
    assert (scheduler.num_running, scheduler.num_waiting) == (0, 1) and used_blocks(engine) == 0
    tokens = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id == last
            tokens += out.token_ids
    assert tokens == alone and used_blocks(engine) == 0


def test_abort_all_empties_the_scheduler(loaded):
    engine = engine_for(loaded, max_num_seqs=1)
    for text in ["Hello there!", "The quick brown fox"]:
        engine.add_request(prompt(loaded, text), SamplingParams(max_tokens=8, **GREEDY))
    engine.step()
    engine.abort_all()
    assert not engine.has_unfinished_requests() and used_blocks(engine) == 0
    assert engine.stats().running == engine.stats().waiting == 0


def test_a_request_id_in_use_is_refused(loaded):
    params = SamplingParams(max_tokens=4, **GREEDY)
    engine = engine_for(loaded)
    engine.add_request(prompt(loaded), params, request_id="same")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(prompt(loaded), params, request_id="same")

    async def twice() -> list:
        server = AsyncEngine(engine_for(loaded)).start()
        try:
            stream = server.add_request(prompt(loaded), params, "same")
            with pytest.raises(InvalidRequestError, match="already in use"):
                server.add_request(prompt(loaded), params, "same")
            return [out async for out in stream]  # the first one is served, the engine thread alive
        finally:
            server.shutdown()

    outputs = asyncio.run(twice())
    assert outputs[-1].finished and outputs[-1].completion_tokens == 4
