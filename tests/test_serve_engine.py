"""The inference engine against the training forward: KV-cache runner, continuous batching,
preemption, sampling controls, stop conditions, request validation."""

import pytest
import torch

from colossuslm.config import ModelConfig
from colossuslm.models.transformer import Transformer
from colossuslm.serve.detokenizer import IncrementalDetokenizer, StopStringMatcher, token_bytes_table
from colossuslm.serve.engine import EngineConfig, LLMEngine
from colossuslm.serve.errors import InvalidRequestError
from colossuslm.serve.kv_cache import PagedKVCache
from colossuslm.serve.loading import load_for_inference
from colossuslm.serve.model_runner import ModelRunner, StepItem
from colossuslm.serve.sampling import SamplingParams
from tests.serve_helpers import make_checkpoint, one_torch_thread  # noqa: F401 (fixture)

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def dense_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("dense"))


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("moe"), n_experts=4, top_k=2, moe_ffn_hidden=64)


def reference_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """The obvious implementation: full forward over the whole sequence for every new token."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0][0, -1].argmax()))
    return ids[len(prompt) :]


def check_runner_against_forward(cfg: ModelConfig, block_size: int, blocks_a: list[int], blocks_b: list[int]) -> None:
    """Two prefills, then decodes in mixed order; every step's logits must match a full forward."""
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    runner = ModelRunner(
        model, PagedKVCache(cfg, num_blocks=16, block_size=block_size, device=torch.device("cpu"), dtype=torch.float32)
    )
    a, b = torch.randint(0, 97, (14,)).tolist(), torch.randint(0, 97, (9,)).tolist()

    def expected(ids):
        return model(torch.tensor([ids]))[0][0, -1]

    logits = runner.execute([StepItem(a[:10], 0, blocks_a), StepItem(b[:3], 0, blocks_b)])  # two prefills
    torch.testing.assert_close(logits, torch.stack([expected(a[:10]), expected(b[:3])]), atol=1e-5, rtol=1e-5)
    for step in range(4):  # decodes, in mixed order
        logits = runner.execute(
            [StepItem([b[3 + step]], 3 + step, blocks_b), StepItem([a[10 + step]], 10 + step, blocks_a)]
        )
        want = torch.stack([expected(b[: 4 + step]), expected(a[: 11 + step])])
        torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)


BASE = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=64)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"n_experts": 4, "top_k": 2},
        {"attn_logit_softcap": 5.0},
        {"tie_embeddings": False, "n_kv_heads": 4},
        {"n_experts": 4, "n_shared_experts": 1, "first_dense_layers": 1},
    ],
)
def test_runner_matches_training_forward(overrides):
    """Paged: block size 4, so histories span blocks (and decodes cross block boundaries)."""
    check_runner_against_forward(ModelConfig(**(BASE | overrides)), 4, [5, 0, 9, 2], [7, 1, 3])


@pytest.mark.parametrize(
    "blocks_a, blocks_b",
    [
        ([1], [0]),  # a range in order: attended in place
        ([3], [1]),  # a range with a filler row, out of order
        ([15], [2]),
    ],
)  # sparse: the two blocks are picked out
@pytest.mark.parametrize("overrides", [{}, {"attn_logit_softcap": 5.0}])
def test_runner_single_block_layouts_match_training_forward(blocks_a, blocks_b, overrides):
    """Blocks as long as the context: each history is one block, read without a gather copy."""
    check_runner_against_forward(ModelConfig(**(BASE | overrides)), 64, blocks_a, blocks_b)


def test_engine_uses_whole_context_blocks_when_memory_allows(dense_ckpt):
    loaded = load_for_inference(dense_ckpt, device="cpu")
    roomy = LLMEngine.from_loaded(loaded, EngineConfig(max_num_seqs=4, max_model_len=64))
    assert roomy.runner.cache.block_size == 64 and roomy.runner.cache.num_blocks == 4
    assert roomy.scheduler.watermark_blocks == 0  # a whole-context block never grows
    tight = LLMEngine.from_loaded(loaded, EngineConfig(max_num_seqs=4, max_model_len=64, kv_cache_tokens=128))
    assert tight.runner.cache.block_size == 16 and tight.runner.cache.num_blocks == 8
    prompts = [loaded.tokenizer.encode(t).ids for t in ["Hello there", "The quick", "Python is"]]
    for engine in (roomy, tight):
        results = engine.generate(prompts, SamplingParams(max_tokens=20, **GREEDY))
        for prompt, result in zip(prompts, results):
            assert result.token_ids == reference_greedy(loaded.model, prompt, 20)


@pytest.mark.parametrize("which", ["dense_ckpt", "moe_ckpt"])
def test_continuous_batching_matches_one_at_a_time(which, request):
    """Requests join a running batch at different steps and leave at different lengths; each must
    produce exactly what it produces alone."""
    loaded = load_for_inference(request.getfixturevalue(which), device="cpu")
    engine = LLMEngine.from_loaded(loaded, EngineConfig(max_num_seqs=3, block_size=8))
    tok = loaded.tokenizer
    prompts = [
        tok.encode(t).ids
        for t in ["Hello there", "The quick brown fox", "What is two plus", "Python is a", "café naïve 日本"]
    ]
    lengths = [12, 5, 20, 9, 15]
    arrivals = {0: [0, 1], 2: [2], 3: [3, 4]}  # step -> prompts that arrive then
    results: dict[str, list[int]] = {}
    names = {}
    step = 0
    batch_sizes = []
    while step < 200 and (engine.has_unfinished_requests() or step <= max(arrivals)):
        for i in arrivals.get(step, []):
            names[engine.add_request(prompts[i], SamplingParams(max_tokens=lengths[i], **GREEDY))] = i
        outputs = engine.step()
        batch_sizes.append(len(outputs))
        for out in outputs:
            results.setdefault(out.request_id, []).extend(out.token_ids)
        step += 1
    assert max(batch_sizes) == 3  # the batch really was shared (and capped by max_num_seqs)
    for request_id, tokens in results.items():
        i = names[request_id]
        assert tokens == reference_greedy(loaded.model, prompts[i], lengths[i]), f"prompt {i}"
    assert engine.stats().kv_cache_usage == 0.0  # everyone left and gave their blocks back


def test_preemption_when_the_cache_is_full_keeps_outputs_exact(dense_ckpt):
    loaded = load_for_inference(dense_ckpt, device="cpu")
    # Room for one full context (64 tokens) only: four requests growing to ~45 tokens cannot all fit.
    engine = LLMEngine.from_loaded(
        loaded, EngineConfig(max_num_seqs=4, max_model_len=64, kv_cache_tokens=64, block_size=8)
    )
    prompts = [loaded.tokenizer.encode(t).ids for t in ["Hello there", "The quick", "Python is", "What is"]]
    results = engine.generate(prompts, SamplingParams(max_tokens=40, **GREEDY))
    assert engine.stats().preemptions > 0
    for prompt, result in zip(prompts, results):
        assert result.token_ids == reference_greedy(loaded.model, prompt, 40)
        assert result.finish_reason == "length" and result.completion_tokens == 40


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(dense_ckpt):
    engine = LLMEngine.from_checkpoint(dense_ckpt, device="cpu")
    prompt = engine.tokenizer.encode("Hello there").ids
    sampled = dict(max_tokens=24, temperature=1.0, top_p=0.9, top_k=50, ignore_eos=True)
    first = engine.generate([prompt], SamplingParams(seed=7, **sampled))[0]
    # Same seed, now sharing the batch with other requests: same tokens.
    again = engine.generate(
        [prompt, prompt[:2]], [SamplingParams(seed=7, **sampled), SamplingParams(seed=1, **sampled)]
    )[0]
    other = engine.generate([prompt], SamplingParams(seed=8, **sampled))[0]
    assert first.token_ids == again.token_ids and first.token_ids != other.token_ids
    greedy = engine.generate([prompt], SamplingParams(max_tokens=24, **GREEDY))[0]
    top1 = engine.generate([prompt], SamplingParams(max_tokens=24, temperature=1.5, top_k=1, ignore_eos=True))[0]
    assert top1.token_ids == greedy.token_ids


def test_stop_strings_stop_tokens_and_max_tokens(dense_ckpt):
    engine = LLMEngine.from_checkpoint(dense_ckpt, device="cpu")
    prompt = engine.tokenizer.encode("The quick brown fox").ids
    full = engine.generate([prompt], SamplingParams(max_tokens=30, **GREEDY))[0]
    assert full.finish_reason == "length" and full.completion_tokens == 30
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = engine.generate([prompt], SamplingParams(max_tokens=30, stop=[stop, "never"], **GREEDY))[0]
    assert cut.finish_reason == "stop" and cut.text == text[: text.index(stop)]
    stop_id = full.token_ids[4]
    by_token = engine.generate([prompt], SamplingParams(max_tokens=30, stop_token_ids=[stop_id], **GREEDY))[0]
    assert (
        by_token.finish_reason == "stop" and by_token.token_ids == full.token_ids[: full.token_ids.index(stop_id) + 1]
    )


def test_streamed_deltas_add_up_and_never_show_part_of_a_stop_string(dense_ckpt):
    engine = LLMEngine.from_checkpoint(dense_ckpt, device="cpu")
    prompt = engine.tokenizer.encode("Hello there").ids
    text = engine.generate([prompt], SamplingParams(max_tokens=30, **GREEDY))[0].text
    stop = text[10:14]
    deltas = [o.text for o in engine.stream(prompt, SamplingParams(max_tokens=30, stop=[stop], **GREEDY))]
    assert "".join(deltas) == text[: text.index(stop)]
    assert all(stop[:2] not in d for d in deltas[:-1]) or stop[:2] in text[: text.index(stop)]


def test_abort_and_early_exit_free_the_cache(dense_ckpt):
    engine = LLMEngine.from_checkpoint(dense_ckpt, device="cpu")
    prompt = engine.tokenizer.encode("Hello there").ids
    request_id = engine.add_request(prompt, SamplingParams(max_tokens=50, **GREEDY))
    engine.step()
    assert engine.stats().kv_cache_usage > 0
    assert engine.abort_request(request_id) and not engine.abort_request(request_id)
    assert engine.stats().kv_cache_usage == 0 and not engine.has_unfinished_requests()
    stream = engine.stream(prompt, SamplingParams(max_tokens=50, **GREEDY))
    next(stream)
    stream.close()  # the caller stopped reading (Ctrl-C in the chat)
    assert engine.stats().kv_cache_usage == 0 and not engine.has_unfinished_requests()


@pytest.mark.parametrize(
    "prompt, params, param",
    [
        ([], SamplingParams(), "prompt"),
        ([1] * 120, SamplingParams(max_tokens=20), "max_tokens"),
        ([1] * 128, SamplingParams(max_tokens=None), "messages"),
        ([5000], SamplingParams(), "prompt"),
        ([1], SamplingParams(temperature=2.5), "temperature"),
        ([1], SamplingParams(top_p=0.0), "top_p"),
        ([1], SamplingParams(max_tokens=0), "max_tokens"),
        ([1], SamplingParams(stop=["a", "b", "c", "d", "e"]), "stop"),
    ],
)
def test_invalid_requests_are_rejected_with_the_parameter_named(dense_ckpt, prompt, params, param):
    engine = LLMEngine.from_checkpoint(dense_ckpt, device="cpu")
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request(prompt, params)
    assert info.value.param == param
    assert not engine.has_unfinished_requests()


def test_detokenizer_reassembles_characters_split_across_tokens(dense_ckpt):
    tokenizer = load_for_inference(dense_ckpt, device="cpu").tokenizer
    text = "naïve café — 日本語 🙂 done<|im_end|>"  # its tokens straddle character boundaries
    for detok in (
        IncrementalDetokenizer(tokenizer, token_bytes_table(tokenizer)),
        IncrementalDetokenizer(tokenizer, None),
    ):
        pieces = [detok.push(t) for t in tokenizer.encode(text).ids] + [detok.flush()]
        assert "".join(pieces) == text.replace("<|im_end|>", "") and not any("\ufffd" in p for p in pieces)
    truncated = IncrementalDetokenizer(tokenizer, token_bytes_table(tokenizer))
    assert [truncated.push(t) for t in tokenizer.encode("日").ids[:1]] == [""]
    assert truncated.flush() == "\ufffd"  # an output cut inside a character still ends visibly


def test_stop_matcher_holds_back_a_possible_stop_prefix():
    matcher = StopStringMatcher(["STOP"])
    released = []
    for piece in ["Hello S", "T", "O", "nly STO", "P and more"]:
        matcher.add(piece)
        released.append(matcher.take(final=False))
        if matcher.stopped:
            break
    assert "".join(released) == "Hello STOnly " and matcher.stopped
    assert all("STO" not in r for r in released[-1:])
