"""OpenAI's presence/frequency penalties and logit_bias, and vLLM's repetition_penalty: what they
do to the logits, that greedy decoding follows them step by step, and the HTTP fields."""

import openai
import pytest
import torch

from colossuslm.serve.api import ServerSettings
from colossuslm.serve.engine import EngineConfig, LLMEngine
from colossuslm.serve.errors import InvalidRequestError
from colossuslm.serve.sampling import LogitsAdjuster, SamplingParams
from tests.serve_helpers import checkpoint_fixture, engine_fixture, one_torch_thread, openai_client  # noqa: F401 (fixtures)


def reference_adjust(logits: list[float], params: SamplingParams, prompt: list[int], output: list[int]) -> list[float]:
    """The rules written out token by token, independently of adjust_logits' tensor code."""
    out = list(logits)
    for token in range(len(out)):
        count = output.count(token)
        out[token] -= params.frequency_penalty * count + (params.presence_penalty if count else 0.0)
        if params.repetition_penalty != 1.0 and token in prompt + output:
            out[token] = (
                out[token] / params.repetition_penalty if out[token] > 0 else out[token] * params.repetition_penalty
            )
        out[token] += params.logit_bias.get(token, 0.0)
    return out


def adjusted_row(
    logits: torch.Tensor, params: SamplingParams, prompt: list[int], outputs: list[list[int]]
) -> torch.Tensor:
    """`logits` after an adjuster has seen the output grow through each list of `outputs` in turn."""
    adjuster = LogitsAdjuster(params, prompt, logits.shape[-1], logits.device)
    for output in outputs:
        adjuster.observe(output)
    row = logits.clone()
    adjuster.apply_(row)
    return row


def test_each_adjustment_matches_its_rule():
    torch.manual_seed(0)
    logits = torch.randn(3, 8)
    cases = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.75),
        SamplingParams(repetition_penalty=1.3, logit_bias={2: -100.0, 5: 3.5}),
        SamplingParams(frequency_penalty=-1.0, repetition_penalty=0.8),
    ]
    histories = [([1, 2], [3, 3, 4]), ([0, 6], [6, 7]), ([5], [1, 1, 1, 2])]
    for row, (params, (prompt, output)) in enumerate(zip(cases, histories)):
        expected = reference_adjust(logits[row].tolist(), params, prompt, output)
        assert adjusted_row(logits[row], params, prompt, [output]).tolist() == pytest.approx(
            expected, rel=1e-6, abs=1e-6
        )
        # the history kept on the device and grown a token at a time (as the engine feeds it) is the same
        grown = [output[:n] for n in range(len(output) + 1)]
        assert torch.equal(
            adjusted_row(logits[row], params, prompt, grown), adjusted_row(logits[row], params, prompt, [output])
        )


def greedy_by_hand(engine: LLMEngine, prompt: list[int], params: SamplingParams, steps: int) -> list[int]:
    output: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = engine.model(torch.tensor([prompt + output]))[0][0, -1].float().tolist()
            adjusted = reference_adjust(logits, params, prompt, output)
            output.append(max(range(len(adjusted)), key=adjusted.__getitem__))
    return output


@pytest.mark.parametrize(
    "knobs",
    [
        dict(frequency_penalty=2.0),
        dict(presence_penalty=1.5, repetition_penalty=1.5),
        dict(repetition_penalty=0.7),
    ],
)
def test_greedy_decoding_follows_the_penalties_step_by_step(engine, knobs):
    prompt = engine.tokenizer.encode("The quick brown fox").ids
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, **knobs)
    plain = engine.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    penalised = engine.generate([prompt], params)[0]
    assert penalised.token_ids == greedy_by_hand(engine, prompt, params, 12)
    assert penalised.token_ids != plain.token_ids  # the knobs changed the reply


def test_logit_bias_forces_or_bans_a_token(engine):
    prompt = engine.tokenizer.encode("Hello there!").ids
    plain = engine.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0].token_ids
    forced = engine.generate([prompt], SamplingParams(max_tokens=4, seed=1, logit_bias={7: 100.0}, ignore_eos=True))
    assert forced[0].token_ids == [7] * 4
    banned = SamplingParams(max_tokens=4, temperature=0.0, logit_bias={plain[0]: -100.0}, ignore_eos=True)
    assert engine.generate([prompt], banned)[0].token_ids[0] != plain[0]
    with pytest.raises(InvalidRequestError, match="logit_bias token ids") as info:
        engine.make_request(prompt, SamplingParams(logit_bias={10**6: 1.0}))
    assert info.value.param == "logit_bias"


def test_penalised_requests_are_not_speculated_and_decode_the_same(checkpoint, engine):
    speculative = LLMEngine.from_checkpoint(
        checkpoint, device="cpu", config=EngineConfig(speculative="ngram", num_speculative_tokens=3)
    )
    prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog. The quick brown").ids
    params = SamplingParams(max_tokens=16, temperature=0.0, frequency_penalty=0.5, ignore_eos=True)
    assert speculative.generate([prompt], params)[0].token_ids == engine.generate([prompt], params)[0].token_ids
    assert speculative.stats().spec_draft_tokens == 0


def test_http_fields(checkpoint, engine):
    with openai_client(checkpoint, ServerSettings(model_name="m")) as client:
        reply = client.completions.create(
            model="m", prompt="Hello", max_tokens=3, logit_bias={"7": 100}, frequency_penalty=1.0
        )
        assert reply.choices[0].text == engine.tokenizer.decode([7, 7, 7])  # +100 outweighs -1 a time
        for extra, param in [
            ({"presence_penalty": 3}, "presence_penalty"),
            ({"logit_bias": {"seven": 1}}, "logit_bias"),
            ({"logit_bias": {"7": 500}}, "logit_bias"),
            ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
        ]:
            with pytest.raises(openai.BadRequestError) as info:
                client.completions.create(model="m", prompt="Hello", max_tokens=2, **extra)
            assert info.value.body["param"] == param
