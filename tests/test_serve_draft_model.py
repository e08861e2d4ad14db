"""Speculative decoding with a draft model (`speculative = "draft"`): greedy outputs identical to
plain decoding (prefix caching, chunked prefill, whole-context blocks, preemption); sampled
outputs from the target's distribution (a chi-square test against the exact distribution, over
fixed seeds so it cannot flake, and the same test catching a wrong rule); the draft's own KV cache
rolled back and freed; a draft with another vocabulary or tokenizer refused."""

import copy

import pytest
import torch

from colossuslm.data.tokenizer import train_tokenizer
from colossuslm.errors import ColossusError
from colossuslm.models.transformer import Transformer
from colossuslm.serve import speculative
from colossuslm.serve.draft_model import check_draft_tokenizer
from colossuslm.serve.engine import EngineConfig, LLMEngine
from colossuslm.serve.loading import load_for_inference
from colossuslm.serve.metrics import ServerMetrics
from colossuslm.serve.sampling import SamplingParams, sampling_probs
from tests.serve_helpers import make_checkpoint, one_torch_thread, tiny_model_config  # noqa: F401 (fixture)

GREEDY = dict(temperature=0.0, ignore_eos=True)
DRAFT = dict(speculative="draft", num_speculative_tokens=3)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("draft"))


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_for_inference(ckpt, device="cpu")


@pytest.fixture(scope="module")
def draft(loaded):
    """The target with noise on its weights: close to it, not equal, so drafts are accepted and
    rejected both (a real draft is a smaller model of the same family)."""
    model = copy.deepcopy(loaded.model)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.3 * p.std())
    return model


def engine_for(loaded, draft_model=None, **config) -> LLMEngine:
    return LLMEngine.from_loaded(loaded, EngineConfig(**({"max_num_seqs": 8, "block_size": 8} | config)), draft_model)


def prompts_for(loaded) -> list[list[int]]:
    texts = ["Hello there! How are", "The quick brown fox jumps over", "What is two plus two?", "café naïve"]
    return [loaded.tokenizer.encode(t).ids for t in texts]


def draft_blocks_in_use(engine: LLMEngine) -> int:
    allocator = engine.proposer.cache.allocator
    return allocator.num_blocks - allocator.num_free


@pytest.mark.parametrize(
    "config",
    [
        dict(enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=16),
        dict(enable_prefix_caching=False, enable_chunked_prefill=False, block_size=None),  # whole-context blocks
        dict(max_num_seqs=4, kv_cache_tokens=128),  # preemption
    ],
)
def test_greedy_outputs_are_identical_to_plain_decoding(loaded, draft, config):
    prompts = prompts_for(loaded) * 2
    params = [SamplingParams(max_tokens=n, **GREEDY) for n in (30, 25, 20, 12, 30, 9, 28, 30)]
    plain = engine_for(loaded, **config).generate(prompts, params)
    engine = engine_for(loaded, draft, **config, **DRAFT)
    spec = engine.generate(prompts, params)
    for i, (a, b) in enumerate(zip(plain, spec)):
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason), f"prompt {i}"
    stats = engine.stats()
    assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens  # accepted and rejected drafts both
    assert stats.kv_cache_usage == 0.0 and draft_blocks_in_use(engine) == 0  # both caches given back
    assert stats.preemptions > 0 or "kv_cache_tokens" not in config


def test_the_target_as_its_own_draft_is_always_accepted(loaded):
    """A draft equal to the target proposes exactly the target's greedy tokens, if and only if its
    own KV cache (catch-up, drafts fed back, rollback) is right."""
    engine = engine_for(loaded, loaded.model, **DRAFT)
    engine.generate(prompts_for(loaded), SamplingParams(max_tokens=24, **GREEDY))
    stats = engine.stats()
    assert stats.spec_draft_tokens > 0 and stats.spec_accepted_tokens == stats.spec_draft_tokens


def test_a_draft_checkpoint_is_loaded_by_path(loaded, ckpt):
    prompt = prompts_for(loaded)[:1]
    params = SamplingParams(max_tokens=16, **GREEDY)
    engine = LLMEngine.from_loaded(loaded, EngineConfig(max_num_seqs=2, draft_model=str(ckpt), **DRAFT))
    assert engine.generate(prompt, params)[0].token_ids == engine_for(loaded).generate(prompt, params)[0].token_ids
    assert engine.stats().spec_accepted_tokens == engine.stats().spec_draft_tokens > 0  # the same weights


def test_metrics_report_acceptance_and_the_drafting_cost(loaded, draft):
    engine = engine_for(loaded, draft, **DRAFT)
    engine.generate(prompts_for(loaded)[:2], SamplingParams(max_tokens=20, **GREEDY))
    values = {
        line.split()[0]: float(line.split()[1])
        for line in ServerMetrics(engine.stats).render().splitlines()
        if line.startswith("colossus_spec_decode")
    }
    stats = engine.stats()
    assert values["colossus_spec_decode_acceptance_rate"] == pytest.approx(
        stats.spec_accepted_tokens / stats.spec_draft_tokens, rel=1e-5
    )
    propose_seconds = values["colossus_spec_decode_propose_seconds_total"]
    assert propose_seconds == pytest.approx(stats.spec_propose_seconds) and propose_seconds > 0


# ----------------------------------------------------------------------------- distribution

SAMPLED = dict(max_tokens=3, temperature=1.0, top_k=3, ignore_eos=True)
N_SAMPLES = 1200
# Seeds are fixed, so the test is deterministic; a correct rule gives p-values spread over (0, 1),
# so 1e-3 leaves room. Measured (27 outcomes, 1,200 seeds): this rule chi-square 26.8 (p = 0.42),
# plain sampling 32.4 (p = 0.18), resampling from p after a rejection 340 (p < 1e-30).
P_VALUE_FLOOR = 1e-3


def exact_distribution(loaded, prompt: list[int], params: SamplingParams, depth: int) -> dict[tuple, float]:
    """P(first `depth` sampled tokens), from the training forward."""
    table: dict[tuple, float] = {(): 1.0}
    with torch.no_grad():
        for _ in range(depth):
            grown = {}
            for prefix, mass in table.items():
                logits = loaded.model(torch.tensor([prompt + list(prefix)]))[0][0, -1:].float()
                probs = sampling_probs(logits, params)[0]
                for token in torch.nonzero(probs).flatten().tolist():
                    grown[prefix + (token,)] = mass * float(probs[token])
            table = grown
    return table


def chi_square_p_value(counts: dict[tuple, int], exact: dict[tuple, float], n: int) -> tuple[float, float]:
    """Pearson's chi-square of `counts` against `exact`, outcomes expected fewer than 5 times
    pooled into one cell; (statistic, p-value)."""
    cells, pooled_expected, pooled_seen = [], 0.0, 0
    for outcome, p in exact.items():
        if n * p >= 5:
            cells.append((counts.get(outcome, 0), n * p))
        else:
            pooled_expected, pooled_seen = pooled_expected + n * p, pooled_seen + counts.get(outcome, 0)
    pooled_seen += sum(c for o, c in counts.items() if o not in exact)  # impossible outcomes
    if pooled_expected > 0 or pooled_seen:
        cells.append((pooled_seen, max(pooled_expected, 1e-9)))
    statistic = sum((seen - expected) ** 2 / expected for seen, expected in cells)
    dof = len(cells) - 1
    return statistic, float(torch.special.gammaincc(torch.tensor(dof / 2), torch.tensor(statistic / 2)))


def sampled_counts(engine: LLMEngine, prompt: list[int]) -> dict[tuple, int]:
    params = [SamplingParams(seed=seed, **SAMPLED) for seed in range(N_SAMPLES)]
    counts: dict[tuple, int] = {}
    for result in engine.generate([prompt] * N_SAMPLES, params):
        counts[tuple(result.token_ids)] = counts.get(tuple(result.token_ids), 0) + 1
    return counts


def sampling_case(loaded, draft):
    prompt = loaded.tokenizer.encode("The quick brown").ids
    exact = exact_distribution(loaded, prompt, SamplingParams(**SAMPLED), depth=3)
    engine = engine_for(loaded, draft, max_num_seqs=64, **DRAFT)
    return prompt, exact, engine


def test_sampled_outputs_follow_the_targets_distribution(loaded, draft):
    """Tokens 2 and 3 come from one verification span (token 1 is the prompt's own sample): the
    acceptance min(1, p/q), the residual and the bonus token all decide them."""
    prompt, exact, engine = sampling_case(loaded, draft)
    statistic, p_value = chi_square_p_value(sampled_counts(engine, prompt), exact, N_SAMPLES)
    stats = engine.stats()
    assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens  # both branches of the rule ran
    assert p_value > P_VALUE_FLOOR, f"chi-square {statistic:.1f}, p = {p_value:.2g}"
    assert draft_blocks_in_use(engine) == 0


def test_the_chi_square_test_catches_a_wrong_rule(loaded, draft, monkeypatch):
    """Resampling from p itself after a rejection (instead of from max(0, p - q)) gives
    min(p, q) + P(reject) p, not p: the test above must see it."""

    def wrong(probs, drafts, generator, draft_probs=None):
        uniforms = torch.rand(len(drafts), generator=generator).tolist()
        for i, (token, u) in enumerate(zip(drafts, uniforms)):
            if u * float(draft_probs[i, token]) >= float(probs[i, token]):
                return drafts[:i] + [speculative.draw(probs[i], generator)], i
        return drafts + [speculative.draw(probs[len(drafts)], generator)], len(drafts)

    monkeypatch.setattr(speculative, "_verify_sampled", wrong)
    prompt, exact, engine = sampling_case(loaded, draft)
    statistic, p_value = chi_square_p_value(sampled_counts(engine, prompt), exact, N_SAMPLES)
    assert p_value < P_VALUE_FLOOR, f"chi-square {statistic:.1f}, p = {p_value:.2g}"


# ----------------------------------------------------------------------------- refusals, options


def test_a_draft_with_another_vocabulary_is_refused(loaded):
    other = Transformer(tiny_model_config(vocab_size=256)).eval()
    with pytest.raises(ColossusError, match="vocabulary has 256 tokens and the target's 384"):
        engine_for(loaded, other, **DRAFT)


def test_a_draft_with_another_tokenizer_is_refused(loaded):
    other = train_tokenizer(["completely different text, other merges"] * 8, vocab_size=384)
    with pytest.raises(ColossusError, match="tokenizer differs"):
        check_draft_tokenizer(other, loaded.tokenizer)
    check_draft_tokenizer(loaded.tokenizer, loaded.tokenizer)


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(speculative="draft"), "--draft"),
        (dict(draft_model="somewhere"), "--speculative draft"),
    ],
)
def test_draft_options_without_each_other_are_refused(loaded, config, message):
    with pytest.raises(ColossusError, match=message):
        engine_for(loaded, **config)


def test_cli_flags_reach_the_engine_config():
    from colossuslm.cli._serve_args import engine_options
    from colossuslm.cli.main import build_parser

    def options(*flags):
        return engine_options(build_parser().parse_args(["serve", "ckpt", *flags]))

    got = options("--speculative", "draft", "--draft", "small", "--num-speculative-tokens", "3")
    assert (got["speculative"], got["draft_model"], got["num_speculative_tokens"]) == ("draft", "small", 3)
    with pytest.raises(ColossusError, match="--draft"):
        options("--speculative", "draft")
    with pytest.raises(ColossusError, match="--speculative draft"):
        options("--draft", "small")
    with pytest.raises(ColossusError, match="--prompt-lookup-max"):
        options("--speculative", "draft", "--draft", "small", "--prompt-lookup-max", "2")
