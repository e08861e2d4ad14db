"""`colossus import hf`: small random models built and saved by transformers itself (nothing
downloads) must import to our Transformer computing the same logits and greedy continuations,
serve, fine-tune, and survive export -> import unchanged; what cannot be imported faithfully is
refused with a message that names it."""

import dataclasses
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from colossuslm.cli.import_hf import import_hf
from colossuslm.cli.main import main
from colossuslm.config import Config, ModelConfig
from colossuslm.config.schema import ROPE_SCALING_FIELDS
from colossuslm.errors import ColossusError
from colossuslm.models.hf_import import load_hf
from colossuslm.models.transformer import Transformer, rope_frequencies
from colossuslm.serve.engine import LLMEngine
from colossuslm.serve.export import export_hf
from colossuslm.serve.loading import build_model, load_for_inference
from colossuslm.serve.sampling import SamplingParams
from colossuslm.train.checkpoint import load_model_weights, resolve_checkpoint
from tests.serve_helpers import SENTENCES, one_torch_thread  # noqa: F401 (fixture)

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 384  # a byte-level BPE tokenizer needs >= 260 ids (the project's 4 special tokens + 256 bytes)
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # short, so the scaling changes this test's positions
}
# name -> (config class, overrides). Together they cover: untied and tied heads, head_dim !=
# d_model / n_heads, q/k/v biases, q/k norms, Llama 3.1 RoPE, both MoE routings, a dense layer in an MoE.
CASES = {
    "llama": ("LlamaConfig", {}),
    "llama3.1-rope": ("LlamaConfig", {"rope_parameters": LLAMA3_ROPE}),
    "mistral": ("MistralConfig", {"sliding_window": None, "head_dim": 32}),
    "qwen2": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 4}),
    "qwen3-moe": (
        "Qwen3MoeConfig",
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "mlp_only_layers": [0]},
    ),
    "qwen3-moe-renormalized": (
        "Qwen3MoeConfig",
        {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True},
    ),
}
CLASS_NAMES = {
    "LlamaConfig": "LlamaForCausalLM",
    "MistralConfig": "MistralForCausalLM",
    "Qwen2Config": "Qwen2ForCausalLM",
    "Qwen3Config": "Qwen3ForCausalLM",
    "MixtralConfig": "MixtralForCausalLM",
    "Qwen3MoeConfig": "Qwen3MoeForCausalLM",
}


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    from colossuslm.data.tokenizer import train_tokenizer

    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    train_tokenizer(SENTENCES * 4, vocab_size=VOCAB).save(str(path))
    return path


def build_hf_model(case: str):
    """A random transformers model of `case`, weights large enough (and norm gains and biases
    far enough from 1 and 0) that every parameter visibly shapes the logits."""
    class_name, overrides = CASES[case]
    config = getattr(transformers, class_name)(**(COMMON | overrides))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    assert type(model).__name__ == CLASS_NAMES[class_name]
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.1)
            else:
                param.normal_(0.0 if name.endswith("bias") else 1.0, 0.3)
    return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory, tokenizer_json):
    """case -> (saved directory, the transformers model), built on first use."""
    built = {}

    def get(case: str, **save_kwargs):
        key = (case, tuple(sorted(save_kwargs.items())))
        if key not in built:
            model = build_hf_model(case)
            directory = tmp_path_factory.mktemp(case.replace(".", "_"))
            model.save_pretrained(directory, safe_serialization=True, **save_kwargs)
            shutil.copyfile(tokenizer_json, directory / "tokenizer.json")
            built[key] = (directory, model)
        return built[key]

    return get


def ours_from(directory) -> Transformer:
    cfg, state = load_hf(directory)
    return build_model(Config(model=cfg), state, torch.device("cpu"), torch.float32)


def tokens(batch: int = 2, seq: int = 40) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(1))


def greedy(forward, prompt: torch.Tensor, steps: int = 10) -> list[int]:
    """Argmax continuation by re-running the whole sequence each step (no cache on either side)."""
    ids = prompt.clone()
    for _ in range(steps):
        ids = torch.cat([ids, forward(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids[0, prompt.shape[1] :].tolist()


@pytest.mark.parametrize("case", CASES)
def test_logits_and_greedy_continuation_match_transformers(hf_dirs, case):
    directory, hf_model = hf_dirs(case)
    ours = ours_from(directory)
    batch = tokens()
    with torch.no_grad():
        expected = hf_model(batch).logits
        got, _ = ours(batch)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        prompt = batch[:1, :12]
        assert greedy(lambda ids: ours(ids)[0], prompt) == greedy(lambda ids: hf_model(ids).logits, prompt)


def test_sharded_safetensors_import_like_a_single_file(hf_dirs):
    directory, hf_model = hf_dirs("qwen3", max_shard_size="100KB")
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("model-*.safetensors"))) > 1
    with torch.no_grad():
        torch.testing.assert_close(ours_from(directory)(tokens())[0], hf_model(tokens()).logits, atol=1e-5, rtol=0)


def test_llama3_rope_frequencies_match_transformers(hf_dirs):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    directory, hf_model = hf_dirs("llama3.1-rope")
    cfg, _ = load_hf(directory)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_model.config, torch.device("cpu"))
    torch.testing.assert_close(rope_frequencies(cfg).float(), theirs, rtol=1e-6, atol=0)
    # and the scaling is not a no-op at these settings, so the logits test above tests it
    defaults = ModelConfig()
    unscaled = dataclasses.replace(
        cfg, rope_scaling="none", **{name: getattr(defaults, name) for name in ROPE_SCALING_FIELDS}
    )
    assert not torch.allclose(rope_frequencies(unscaled).float(), theirs)


@pytest.mark.parametrize("case", ["qwen2", "qwen3", "llama3.1-rope", "qwen3-moe"])
def test_imported_run_dir_serves_the_same_greedy_tokens(hf_dirs, tmp_path, case):
    """Through the CLI, then the serving engine (paged KV cache, the runner's own attention)."""
    directory, hf_model = hf_dirs(case)
    out = tmp_path / "runs" / "imported"
    assert main(["import", "hf", str(directory), "--out", str(out)]) == 0
    engine = LLMEngine.from_checkpoint(out, device="cpu", dtype="fp32")
    prompts = [tokens()[0, :12].tolist(), tokens()[1, :5].tolist()]  # two lengths batched together
    results = engine.generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True))
    with torch.no_grad():
        for prompt, result in zip(prompts, results):
            expected = greedy(lambda ids: hf_model(ids).logits, torch.tensor([prompt]))
            assert result.token_ids == expected


def test_fine_tuning_the_imported_model_lowers_its_loss(hf_dirs, tmp_path):
    """The trainer's init_from path: weights read from the imported checkpoint into a fresh model."""
    directory, _ = hf_dirs("qwen3")
    out = tmp_path / "run"
    assert main(["import", "hf", str(directory), "--out", str(out)]) == 0
    checkpoint = resolve_checkpoint(out)
    cfg, _ = load_hf(directory)
    model = Transformer(cfg)
    load_model_weights(checkpoint, model)
    expected = ours_from(directory)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), expected.state_dict().values()))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = tokens(4, 33)
    losses = []
    for _ in range(5):
        h, _ = model.hidden_states(batch[:, :-1])
        loss = model.loss(h, batch[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("case", ["llama3.1-rope", "qwen2", "qwen3", "mixtral", "qwen3-moe"])
def test_export_then_import_is_exact(hf_dirs, tmp_path, case):
    directory, hf_model = hf_dirs(case)
    run = tmp_path / "run"
    assert main(["import", "hf", str(directory), "--out", str(run)]) == 0
    exported = export_hf(run, tmp_path / "exported")
    cfg, state = load_hf(directory)
    again_cfg, again_state = load_hf(exported)
    assert again_cfg == cfg
    assert state.keys() == again_state.keys()
    assert all(torch.equal(state[name], again_state[name]) for name in state)
    # and transformers reads the export as the model it came from
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(reloaded) is type(hf_model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens()).logits, hf_model(tokens()).logits, atol=1e-5, rtol=0)


def test_imported_checkpoint_is_a_trainer_style_checkpoint(hf_dirs, tmp_path):
    directory, _ = hf_dirs("qwen2")
    run = tmp_path / "run"
    assert main(["import", "hf", str(directory), "--out", str(run)]) == 0
    assert main(["checkpoint", "verify", str(run)]) == 0
    loaded = load_for_inference(run, device="cpu", dtype="fp32")
    assert loaded.config.model.qkv_bias and loaded.config.model.tie_embeddings
    assert loaded.name == "run"
    stored = load_file(str(loaded.path / "model.safetensors"))
    assert {t.dtype for t in stored.values()} == {torch.float32}


# ------------------------------------------------------------------------------------- refusals
def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.fixture
def llama_copy(hf_dirs, tmp_path):
    source, _ = hf_dirs("llama")
    copy = tmp_path / "llama"
    shutil.copytree(source, copy)
    return copy


@pytest.mark.parametrize(
    "changes, fragment",
    [
        ({"architectures": ["GPT2LMHeadModel"]}, r"GPT2LMHeadModel is not supported; supported: LlamaForCausalLM"),
        ({"architectures": None}, "no 'architectures'"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "RoPE type 'yarn'"),
        ({"rope_parameters": None, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "RoPE type 'dynamic'"),
        ({"sliding_window": 32}, "sliding_window = 32 < max_position_embeddings = 128"),
        ({"attention_bias": True}, "attention_bias = true"),
        ({"mlp_bias": True}, "mlp_bias = true"),
        ({"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
        ({"hidden_size": None}, "lacks 'hidden_size'"),
        ({"num_hidden_layers": 1}, r"unused .*model\.layers\.1\."),
        ({"intermediate_size": 96}, r"layers\.0\.feed_forward\.w1\.weight has shape \(128, 64\).*\(96, 64\)"),
    ],
)
def test_config_features_the_model_would_ignore_are_refused(llama_copy, tmp_path, changes, fragment):
    _edit_config(llama_copy, **changes)
    with pytest.raises(ColossusError, match=fragment):
        load_hf(llama_copy)
    assert main(["import", "hf", str(llama_copy), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_a_qwen_sliding_window_switched_off_is_full_attention(llama_copy):
    _edit_config(llama_copy, architectures=["Qwen2ForCausalLM"], model_type="qwen2", sliding_window=32)
    with pytest.raises(ColossusError, match="lack model.layers.0.self_attn.q_proj.bias"):  # got past the window
        load_hf(llama_copy)
    _edit_config(llama_copy, use_sliding_window=True, layer_types=["full_attention", "sliding_attention"])
    with pytest.raises(ColossusError, match="sliding_window = 32"):
        load_hf(llama_copy)


def test_missing_files_are_named(llama_copy, tmp_path):
    assert main(["import", "hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "a")]) == 2
    (llama_copy / "tokenizer.json").unlink()
    with pytest.raises(ColossusError, match="has no tokenizer.json"):
        import_hf(llama_copy, tmp_path / "b")
    assert not (tmp_path / "b").exists()
    (llama_copy / "model.safetensors").unlink()
    with pytest.raises(ColossusError, match="no model.safetensors or model.safetensors.index.json"):
        load_hf(llama_copy)
    (llama_copy / "config.json").unlink()
    with pytest.raises(ColossusError, match="has no config.json"):
        load_hf(llama_copy)


def test_pickled_weights_are_never_read(llama_copy):
    (llama_copy / "model.safetensors").rename(llama_copy / "pytorch_model.bin")  # never opened, so any bytes do
    with pytest.raises(ColossusError, match="pytorch_model.bin .*convert it to safetensors"):
        load_hf(llama_copy)


def test_a_missing_shard_or_tensor_is_named(hf_dirs, tmp_path):
    source, _ = hf_dirs("qwen3", max_shard_size="100KB")
    copy = tmp_path / "sharded"
    shutil.copytree(source, copy)
    shard = sorted(copy.glob("model-*.safetensors"))[-1]
    weights = load_file(str(shard))
    dropped = sorted(weights)[0]
    save_file({k: v for k, v in weights.items() if k != dropped}, str(shard))
    with pytest.raises(ColossusError, match=f"lack {dropped}"):
        load_hf(copy)
    shard.unlink()
    with pytest.raises(ColossusError, match=f"shards that are missing: {shard.name}"):
        load_hf(copy)


def test_import_refuses_a_non_empty_out_and_keeps_it(hf_dirs, tmp_path, capsys):
    directory, _ = hf_dirs("llama")
    out = tmp_path / "runs" / "taken"
    out.mkdir(parents=True)
    (out / "precious.txt").write_text("keep me")
    assert main(["import", "hf", str(directory), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["precious.txt"]
