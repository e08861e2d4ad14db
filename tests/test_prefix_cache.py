"""Automatic prefix caching: content-addressed, reference-counted KV blocks shared by requests whose
prompts start alike. Outputs must not change, only the work: checked against engines without the
cache, through eviction and preemption, and on the counters of prompt tokens actually computed."""

import time

import httpx
import openai
import pytest

from colossuslm.cli._serve_args import PREFIX_CACHING_BLOCK_SIZE, engine_options
from colossuslm.cli.main import build_parser
from colossuslm.serve.api import ServerSettings, create_app
from colossuslm.serve.async_engine import AsyncEngine
from colossuslm.serve.engine import EngineConfig, LLMEngine
from colossuslm.serve.kv_cache import BlockAllocator, block_hash
from colossuslm.serve.loading import load_for_inference
from colossuslm.serve.sampling import SamplingParams
from tests.serve_helpers import ServerThread, make_checkpoint, one_torch_thread  # noqa: F401 (fixture)

GREEDY = dict(temperature=0.0, ignore_eos=True)
SYSTEM = "system user assistant: a conversation has turns. Python is a programming language."


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_for_inference(make_checkpoint(tmp_path_factory.mktemp("prefix")), device="cpu")


def engine_for(loaded, **config) -> LLMEngine:
    return LLMEngine.from_loaded(loaded, EngineConfig(**({"max_num_seqs": 4} | config)))


def run_with_arrivals(engine: LLMEngine, prompts, lengths, arrivals) -> list[list[int]]:
    """Add prompt i at step arrivals[i]; step until all finish; tokens per prompt, in order."""
    tokens: dict[str, list[int]] = {}
    ids: list[str | None] = [None] * len(prompts)
    step = 0
    while step <= max(arrivals) or engine.has_unfinished_requests():
        for i, arrival in enumerate(arrivals):
            if arrival == step:
                ids[i] = engine.add_request(prompts[i], SamplingParams(max_tokens=lengths[i], **GREEDY))
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.token_ids)
        step += 1
        assert step < 1000
    return [tokens[i] for i in ids]


def shared_prefix_prompts(tokenizer) -> list[list[int]]:
    system = tokenizer.encode(SYSTEM).ids
    questions = ["Hello there!", "The quick brown fox", "What is two plus two?", "café naïve 日本語", "Hi"]
    return [system + tokenizer.encode(q).ids for q in questions] + [system, system[:7]]


# ----------------------------------------------------------------------------- block bookkeeping


def test_allocator_counts_references_and_evicts_least_recently_released_first():
    allocator = BlockAllocator(4, enable_caching=True)
    a = allocator.allocate(2)
    hashes = [block_hash(None, [1, 2]), block_hash(block_hash(None, [1, 2]), [3, 4])]
    for block, digest in zip(a, hashes):
        allocator.register(block, digest)
    assert allocator.lookup(hashes) == a
    allocator.take(a)  # a second sequence shares both blocks
    allocator.free(a)
    assert allocator.num_free == 2  # still referenced by the first
    allocator.free(a)
    assert allocator.num_free == 4 and allocator.lookup(hashes) == a  # released, still cached
    fresh = allocator.allocate(2)  # never-used blocks go first
    assert set(fresh).isdisjoint(a) and allocator.lookup(hashes) == a
    evicted = allocator.allocate(1)  # then the last block of the prefix (released first) is evicted
    assert evicted == [a[1]] and allocator.lookup(hashes) == [a[0]]
    # A different parent gives a different name to the same tokens: hashes name whole prefixes.
    assert block_hash(None, [3, 4]) != hashes[1]


def test_allocator_without_caching_forgets_contents():
    allocator = BlockAllocator(2)
    blocks = allocator.allocate(1)
    allocator.register(blocks[0], block_hash(None, [1]))
    allocator.free(blocks)
    assert allocator.lookup([block_hash(None, [1])]) == [] and allocator.num_free == 2


# ----------------------------------------------------------------------------- engine outputs


@pytest.mark.parametrize("block_size", [5, 8, 16])  # 5 and 8 split the prompts mid-block
@pytest.mark.parametrize("chunked", [False, True])
def test_greedy_tokens_are_identical_with_and_without_the_cache(loaded, block_size, chunked):
    prompts = shared_prefix_prompts(loaded.tokenizer)
    lengths = [9, 4, 12, 6, 3, 7, 5]
    arrivals = [0, 0, 2, 3, 3, 6, 9]  # later ones find the system prompt cached by earlier ones
    reference = run_with_arrivals(
        engine_for(loaded, block_size=block_size, enable_prefix_caching=False, enable_chunked_prefill=False),
        prompts,
        lengths,
        arrivals,
    )
    engine = engine_for(loaded, block_size=block_size, enable_chunked_prefill=chunked, max_num_batched_tokens=24)
    assert run_with_arrivals(engine, prompts, lengths, arrivals) == reference
    stats = engine.stats()
    assert stats.prefix_cache_hits > 0
    assert stats.prompt_tokens_computed == sum(map(len, prompts)) - stats.prefix_cache_hits
    assert stats.kv_cache_usage == 0.0  # cached blocks are free to evict


def test_a_second_chat_turn_computes_only_its_new_tokens(loaded):
    engine = engine_for(loaded, block_size=8)
    tokenizer = loaded.tokenizer
    turn1 = tokenizer.encode(f"{SYSTEM} user: Hello there! How are you today? assistant:").ids
    reply = engine.generate([turn1], SamplingParams(max_tokens=11, **GREEDY))[0].token_ids
    assert engine.stats().prefix_cache_hits == 0
    assert engine.stats().prompt_tokens_computed == len(turn1)
    turn2 = turn1 + reply + tokenizer.encode(" user: And the weather? assistant:").ids
    engine.generate([turn2], SamplingParams(max_tokens=5, **GREEDY))
    stats = engine.stats()
    # Everything the first turn computed (its prompt and all but the last reply token, whose key
    # was never needed) is cached, in whole blocks.
    expected_hit = (len(turn1) + len(reply) - 1) // 8 * 8
    assert stats.prefix_cache_hits == expected_hit > len(turn1) - 8
    assert stats.prompt_tokens_computed == len(turn1) + len(turn2) - expected_hit
    assert stats.prefix_cache_queries == len(turn1) + len(turn2)


def test_the_last_prompt_token_is_always_computed(loaded):
    """A prompt of whole cached blocks still computes its last block, so logits exist."""
    engine = engine_for(loaded, block_size=4)
    prompt = loaded.tokenizer.encode(SYSTEM).ids[:16]
    first = engine.generate([prompt], SamplingParams(max_tokens=6, **GREEDY))[0].token_ids
    again = engine.generate([prompt], SamplingParams(max_tokens=6, **GREEDY))[0].token_ids
    assert first == again and engine.stats().prefix_cache_hits == 12  # 3 of the 4 blocks


def test_prompt_logprobs_requests_compute_their_whole_prompt(loaded):
    engine = engine_for(loaded, block_size=4)
    prompt = loaded.tokenizer.encode(SYSTEM).ids
    engine.generate([prompt], SamplingParams(max_tokens=2, **GREEDY))  # the whole prompt is cached now
    hits = engine.stats().prefix_cache_hits
    scoring = SamplingParams(max_tokens=0, prompt_logprobs=1, logprobs=0, temperature=0.0)
    request_id = engine.add_request(prompt, scoring)
    outputs = [o for _ in range(5) for o in engine.step() if o.request_id == request_id]
    assert engine.stats().prefix_cache_hits == hits  # no lookup: every position's hidden state is needed
    uncached = engine_for(loaded, block_size=4, enable_prefix_caching=False)
    expected = [o for _ in range(5) for o in uncached.step()] if uncached.add_request(prompt, scoring) else None
    got, want = outputs[0].prompt_logprobs, expected[0].prompt_logprobs
    assert len(got) == len(prompt) and got[0] is None
    for a, b in zip(got[1:], want[1:]):
        assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-5)
    # After scoring, a plain request over the same prompt does hit the cache again.
    engine.generate([prompt], SamplingParams(max_tokens=2, **GREEDY))
    assert engine.stats().prefix_cache_hits > hits


def test_eviction_under_a_small_cache_keeps_outputs_exact(loaded):
    tokenizer = loaded.tokenizer
    prompts = [tokenizer.encode(f"{SYSTEM} {q}").ids for q in ["Hello there!", "The quick brown fox", "Two plus"]]
    prompts += [tokenizer.encode(t).ids for t in ["Colossus serves language models.", "The weather is lovely"]]
    params = SamplingParams(max_tokens=8, **GREEDY)
    # 64 tokens of cache = 8 blocks of 8: one prompt's blocks crowd out the previous ones.
    engine = engine_for(loaded, max_model_len=64, kv_cache_tokens=64, block_size=8, max_num_seqs=1)
    reference = engine_for(loaded, max_model_len=64, block_size=8, enable_prefix_caching=False)
    for prompt in prompts + prompts[::-1]:
        assert engine.generate([prompt], params)[0].token_ids == reference.generate([prompt], params)[0].token_ids
    stats = engine.stats()
    assert 0 < stats.prefix_cache_hits < stats.prefix_cache_queries
    assert stats.kv_cache_usage == 0.0


def test_preemption_with_shared_blocks_releases_references_and_keeps_outputs_exact(loaded):
    prompts = shared_prefix_prompts(loaded.tokenizer)[:4]
    params = SamplingParams(max_tokens=18, **GREEDY)
    # 96 tokens of cache for four ~55-token sequences: they cannot all grow, so some are preempted
    # while sharing the system prompt's blocks with the others.
    engine = engine_for(loaded, max_model_len=64, kv_cache_tokens=96, block_size=4)
    reference = engine_for(loaded, max_model_len=64, block_size=4, enable_prefix_caching=False)
    results = engine.generate(prompts, params)
    assert [r.token_ids for r in results] == [r.token_ids for r in reference.generate(prompts, params)]
    stats = engine.stats()
    assert stats.preemptions > 0 and stats.prefix_cache_hits > 0
    allocator = engine.runner.cache.allocator
    assert allocator.num_free == allocator.num_blocks and not any(allocator._ref_counts)


# ----------------------------------------------------------------------------- serving


def test_serve_flags_map_to_the_engine_config(tmp_path):
    parser = build_parser()
    defaults = engine_options(parser.parse_args(["serve", "ckpt"]))
    assert defaults == dict(
        enable_prefix_caching=True,
        enable_chunked_prefill=True,
        max_num_batched_tokens=None,
        block_size=PREFIX_CACHING_BLOCK_SIZE,
    )
    off = engine_options(
        parser.parse_args(
            ["serve", "ckpt", "--no-prefix-caching", "--no-chunked-prefill", "--max-num-batched-tokens", "64"]
        )
    )
    assert off == dict(
        enable_prefix_caching=False, enable_chunked_prefill=False, max_num_batched_tokens=64, block_size=None
    )


def metric(text: str, name: str) -> float:
    return float(next(line for line in text.splitlines() if line.startswith(name + " ")).split()[1])


def test_metrics_show_the_prefix_cache_hit_rate_over_http(loaded):
    engine = AsyncEngine(engine_for(loaded, block_size=8)).start()
    settings = ServerSettings(model_name="m", api_key=None, max_concurrent_requests=8, max_body_bytes=1 << 16)
    try:
        with ServerThread(create_app(engine, settings)) as server:
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=30)
            messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello there!"}]
            first = client.chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=0)
            messages += [
                {"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "And the weather?"},
            ]
            client.chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=0)
            deadline = time.monotonic() + 5
            while engine.stats().running and time.monotonic() < deadline:
                time.sleep(0.02)  # the stats snapshot follows the engine's last step
            text = httpx.get(f"{server.url}/metrics").text
    finally:
        engine.shutdown()
    queries, hits = (
        metric(text, "colossus_prefix_cache_queries_total"),
        metric(text, "colossus_prefix_cache_hits_total"),
    )
    assert queries > hits > 0
    assert metric(text, "colossus_prefix_cache_hit_rate") == pytest.approx(hits / queries, rel=1e-4)
    assert "# TYPE colossus_prefix_cache_hits_total counter" in text
    assert metric(text, "colossus_prompt_tokens_computed_total") == queries - hits
