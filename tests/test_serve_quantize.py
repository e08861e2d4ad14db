"""--quantization int8 (serve/quantize.py): which weights become int8, what that costs in logits,
and that the engine, `colossus sample` / `eval` and the HTTP API all run the quantized model."""

import json

import pytest
import torch
from torch import nn

from colossuslm.cli.main import main
from colossuslm.errors import ColossusError
from colossuslm.serve.api import ServerSettings, create_app
from colossuslm.serve.async_engine import AsyncEngine
from colossuslm.serve.engine import EngineConfig, LLMEngine
from colossuslm.serve.loading import load_for_inference
from colossuslm.serve.quantize import is_quantized, quantize_for_serving, tensor_bytes, weight_bytes
from colossuslm.serve.sampling import SamplingParams
from tests.serve_helpers import SENTENCES, ServerThread, make_checkpoint, one_torch_thread  # noqa: F401 (fixture)

GREEDY = dict(temperature=0.0, ignore_eos=True)
MOE = dict(n_experts=4, top_k=2, moe_ffn_hidden=64, n_shared_experts=1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("quant"))  # tied embedding/head


@pytest.fixture(scope="module")
def untied_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("quant_untied"), tie_embeddings=False)


@pytest.fixture(scope="module")
def moe_ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("quant_moe"), **MOE)


def load(path, quantization: str = "none", dtype: str = "fp32"):
    return load_for_inference(path, device="cpu", dtype=dtype, quantization=quantization)


def logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(tokens)[0].float()


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.startswith("layers.")}


def test_block_linears_hold_int8_and_a_quarter_of_the_bytes(untied_ckpt):
    full, quant = load(untied_ckpt), load(untied_ckpt, "int8")
    linears = block_linears(quant.model)
    assert linears and set(quant.quantization.quantized) == set(linears)
    for name, module in linears.items():
        weight = module.weight
        assert is_quantized(weight) and weight.qdata.dtype == torch.int8
        assert weight.scale.numel() == module.out_features  # one scale per output channel
        before = tensor_bytes(block_linears(full.model)[name].weight)
        # int8 data (1/4 of fp32) plus an fp32 scale per row: 0.27 of the bytes at d_model 64.
        assert tensor_bytes(weight) / before < 0.3
    # The embedding and the untied head stay fp32 tensors (see serve/quantize.py for why).
    assert not is_quantized(quant.model.tok_embeddings.weight) and not is_quantized(quant.model.output.weight)
    assert quant.model.output.weight.dtype == torch.float32
    assert quant.quantization.weight_bytes_after < quant.quantization.weight_bytes_before == weight_bytes(full.model)


def test_tied_embedding_head_stays_one_fp32_tensor(ckpt):
    quant = load(ckpt, "int8")
    assert quant.model.output is None and quant.model.tok_embeddings.weight.dtype == torch.float32
    assert "tied embedding/head" in quant.quantization.describe()


# int8 per-row rounding moves each weight by at most 1/254 of its row's largest weight; through
# two blocks of these random-weight models that comes out at ~1% of the logits' standard
# deviation on average and ~7% at worst (measured). The bounds leave ~4x room for other seeds,
# and still fail for a broken scale (which is off by the scale itself, 100% or more).
MEAN_ERROR_OF_STD, MAX_ERROR_OF_STD = 0.05, 0.3


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("which", ["ckpt", "untied_ckpt", "moe_ckpt"])
def test_logits_stay_close_to_the_unquantized_model(which, dtype, request):
    """Against the unquantized model in the same activation dtype, so only the int8 error is measured."""
    path = request.getfixturevalue(which)
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    want, got = logits(load(path, dtype=dtype).model, tokens), logits(load(path, "int8", dtype).model, tokens)
    error, spread = (got - want).abs(), want.std()
    assert error.mean() < MEAN_ERROR_OF_STD * spread
    if which != "moe_ckpt":  # a routed token can flip to another expert: one large error, not noise
        assert error.max() < MAX_ERROR_OF_STD * spread


def test_moe_experts_and_router_stay_in_the_serving_dtype(moe_ckpt):
    quant = load(moe_ckpt, "int8")
    moe = quant.model.layers["0"].moe
    assert not any(is_quantized(p) for p in (moe.experts.w1, moe.experts.w2, moe.experts.w3))
    assert not is_quantized(moe.router.gate.weight)
    assert is_quantized(moe.shared_experts.w1.weight) and is_quantized(quant.model.layers["0"].attention.wq.weight)
    assert "routed MoE experts" in quant.quantization.describe()  # said so, not silently claimed


@pytest.mark.parametrize("which", ["ckpt", "moe_ckpt"])
def test_engine_greedy_generation_matches_the_quantized_forward(which, request):
    """The paged runner calls the same quantized Linears as the training forward."""
    loaded = load(request.getfixturevalue(which), "int8")
    prompt = loaded.tokenizer.encode("The quick brown fox").ids
    result = LLMEngine.from_loaded(loaded, EngineConfig(max_num_seqs=2, block_size=8)).generate(
        [prompt], SamplingParams(max_tokens=12, **GREEDY)
    )[0]
    ids = list(prompt)
    for _ in range(12):
        ids.append(int(logits(loaded.model, torch.tensor([ids]))[0, -1].argmax()))
    assert result.token_ids == ids[len(prompt) :]


def test_bad_methods_name_the_fix(ckpt, capsys):
    with pytest.raises(ColossusError, match="int4 is not supported.*use --quantization int8"):
        load(ckpt, "int4")
    with pytest.raises(ColossusError, match="use one of none, int8"):
        quantize_for_serving(nn.Linear(4, 4), "fp8")
    assert main(["sample", str(ckpt), "--prompt", "x", "--quantization", "int4"]) == 2
    assert "torchao" in capsys.readouterr().err


def test_quantizing_twice_changes_nothing(ckpt):
    loaded = load(ckpt, "int8")
    again = quantize_for_serving(loaded.model, "int8")
    assert again.quantized == [] and again.weight_bytes_after == loaded.quantization.weight_bytes_after


def test_sample_cli_runs_int8_and_says_so(ckpt, capsys):
    args = ["sample", str(ckpt), "--prompt", "Hello there", "--max-tokens", "6", "--temperature", "0"]
    assert main([*args, "--device", "cpu", "--quantization", "int8"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() and "quantization: int8 weight-only" in captured.err


def test_eval_cli_measures_the_perplexity_delta(ckpt, tmp_path, capsys):
    data = tmp_path / "text.txt"
    data.write_text(" ".join(SENTENCES))

    def bits_per_byte(method: str) -> float:
        argv = ["eval", str(ckpt), "--data", str(data), "--device", "cpu", "--json", "--quantization", method]
        assert main(argv) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["quantization"] == method
        return report["data"]["all"]["bits_per_byte"]

    full, quant = bits_per_byte("none"), bits_per_byte("int8")
    assert full != quant and quant == pytest.approx(full, rel=0.02)


def test_http_api_serves_the_quantized_model(ckpt):
    import httpx

    loaded = load(ckpt, "int8")
    engine = AsyncEngine(LLMEngine.from_loaded(loaded, EngineConfig(max_num_seqs=2))).start()
    try:
        with ServerThread(create_app(engine, ServerSettings(model_name="q"))) as srv:
            body = {"model": "q", "prompt": "Hello there", "max_tokens": 5, "temperature": 0}
            reply = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=30)
    finally:
        engine.shutdown()
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] >= 1
