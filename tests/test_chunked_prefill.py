"""Chunked prefill: a step computes at most its token budget, decodes first, and a long prompt is
split across steps while the running streams keep getting a token every step. Outputs (greedy,
seeded, prompt log-probabilities) must be exactly those of whole-prompt prefill."""

import pytest

from colossuslm.serve.engine import EngineConfig, LLMEngine
from colossuslm.serve.loading import load_for_inference
from colossuslm.serve.sampling import SamplingParams
from tests.serve_helpers import make_checkpoint, one_torch_thread  # noqa: F401 (fixture)

GREEDY = dict(temperature=0.0, ignore_eos=True)
LONG_TEXT = (
    "The quick brown fox jumps over the lazy dog. Python is a programming language; tokens are bytes "
    "merged by BPE. Colossus serves language models with continuous batching."
)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_for_inference(make_checkpoint(tmp_path_factory.mktemp("chunked")), device="cpu")


def engine_for(loaded, **config) -> LLMEngine:
    return LLMEngine.from_loaded(loaded, EngineConfig(**({"max_num_seqs": 4} | config)))


def whole_prompt_engine(loaded, **config) -> LLMEngine:
    return engine_for(loaded, enable_chunked_prefill=False, enable_prefix_caching=False, **config)


def record_step_tokens(engine: LLMEngine) -> list[int]:
    """Tokens the scheduler hands the model at each step, recorded as the engine runs."""
    per_step: list[int] = []
    schedule = engine.scheduler.schedule

    def recording():
        scheduled = schedule()
        per_step.append(sum(s.num_new_tokens for s in scheduled))
        return scheduled

    engine.scheduler.schedule = recording
    return per_step


def test_a_long_prompt_is_chunked_while_running_streams_decode_every_step(loaded):
    tokenizer = loaded.tokenizer
    short = [tokenizer.encode(t).ids for t in ["Hello there", "The quick", "What is two"]]
    long_prompt = tokenizer.encode(LONG_TEXT).ids
    assert len(long_prompt) > 40
    engine = engine_for(loaded, block_size=8, max_num_batched_tokens=12, enable_prefix_caching=False)
    per_step = record_step_tokens(engine)
    ids = [engine.add_request(p, SamplingParams(max_tokens=30, **GREEDY)) for p in short]
    tokens = {i: [] for i in ids}
    while not all(tokens.values()):  # until every short stream is decoding
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
    long_id = engine.add_request(long_prompt, SamplingParams(max_tokens=5, **GREEDY))
    tokens[long_id] = []
    steps_without_long_output = 0
    while engine.has_unfinished_requests():
        outputs = {out.request_id: out for out in engine.step()}
        for request_id, out in outputs.items():
            tokens[request_id] += out.token_ids
        if not tokens[long_id]:
            steps_without_long_output += 1
            # every running stream got its token in every step the long prompt was being computed
            assert set(outputs) == set(ids)
    assert max(per_step) <= 12  # the budget holds, decodes included
    chunks_needed = -(-len(long_prompt) // (12 - len(ids)))  # what the three decodes leave per step
    assert steps_without_long_output == chunks_needed - 1  # the last chunk's step samples its first token
    reference = whole_prompt_engine(loaded).generate(
        short + [long_prompt], [SamplingParams(max_tokens=30, **GREEDY)] * 3 + [SamplingParams(max_tokens=5, **GREEDY)]
    )
    assert [tokens[i] for i in ids + [long_id]] == [r.token_ids for r in reference]


@pytest.mark.parametrize("block_size, budget", [(5, 7), (16, 16), (None, 9)])  # None: whole-context blocks
@pytest.mark.parametrize("prefix_caching", [False, True])
def test_greedy_tokens_are_identical_with_and_without_chunking(loaded, block_size, budget, prefix_caching):
    tokenizer = loaded.tokenizer
    texts = [LONG_TEXT, "Hello there!", LONG_TEXT[:60], "café naïve 日本語", LONG_TEXT + " And more.", "Hi"]
    prompts = [tokenizer.encode(t).ids for t in texts]
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in (7, 15, 4, 11, 6, 9)]
    reference = whole_prompt_engine(loaded, block_size=block_size).generate(prompts, params)
    engine = engine_for(
        loaded, block_size=block_size, max_num_batched_tokens=budget, enable_prefix_caching=prefix_caching
    )
    per_step = record_step_tokens(engine)
    assert [r.token_ids for r in engine.generate(prompts, params)] == [r.token_ids for r in reference]
    assert max(per_step) <= budget and engine.stats().kv_cache_usage == 0.0


def test_seeded_sampling_is_unchanged_by_chunking(loaded):
    prompts = [loaded.tokenizer.encode(t).ids for t in [LONG_TEXT, "Hello there"]]
    params = [SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=s, ignore_eos=True) for s in (3, 4)]
    reference = whole_prompt_engine(loaded).generate(prompts, params)
    chunked = engine_for(loaded, max_num_batched_tokens=8).generate(prompts, params)
    assert [r.token_ids for r in chunked] == [r.token_ids for r in reference]


def test_prompt_logprobs_of_a_chunked_prompt_match_whole_prompt_scoring(loaded):
    prompt = loaded.tokenizer.encode(LONG_TEXT).ids
    params = SamplingParams(max_tokens=3, prompt_logprobs=2, temperature=0.0, ignore_eos=True)

    def score(engine):
        first = next(iter(engine.stream(prompt, params)))
        return first.prompt_logprobs, first.token_ids

    want, want_tokens = score(whole_prompt_engine(loaded))
    got, got_tokens = score(engine_for(loaded, max_num_batched_tokens=10, block_size=8))
    assert got_tokens == want_tokens and len(got) == len(want) == len(prompt) and got[0] is None
    for a, b in zip(got[1:], want[1:]):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]


def test_without_chunking_a_prompt_longer_than_the_budget_runs_in_one_step(loaded):
    prompt = loaded.tokenizer.encode(LONG_TEXT).ids
    engine = whole_prompt_engine(loaded, max_num_batched_tokens=8)
    per_step = record_step_tokens(engine)
    engine.generate([prompt], SamplingParams(max_tokens=3, **GREEDY))
    assert per_step == [len(prompt), 1, 1]


def test_aborting_a_partly_computed_prompt_frees_its_blocks(loaded):
    engine = engine_for(loaded, block_size=8, max_num_batched_tokens=8)
    request_id = engine.add_request(loaded.tokenizer.encode(LONG_TEXT).ids, SamplingParams(max_tokens=5, **GREEDY))
    assert engine.step() == [] and engine.step() == []  # two chunks computed, no token yet
    assert engine.scheduler.running[0].num_cached == 16 and engine.stats().kv_cache_usage > 0
    assert engine.abort_request(request_id)
    assert engine.stats().kv_cache_usage == 0.0 and not engine.has_unfinished_requests()
