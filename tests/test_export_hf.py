"""`colossus export --format hf`: transformers must load the output and compute our logits."""

import os

import pytest
import torch

from colossuslm.cli.main import main
from colossuslm.data.chat import encode_chat
from colossuslm.errors import ColossusError
from colossuslm.serve.export import export_hf
from colossuslm.serve.loading import load_for_inference
from tests.serve_helpers import make_checkpoint, one_torch_thread  # noqa: F401 (fixture)

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is loaded from local directories


@pytest.mark.parametrize(
    "overrides, architecture",
    [
        ({}, "LlamaForCausalLM"),
        ({"tie_embeddings": False, "n_kv_heads": 4, "head_dim": 24}, "LlamaForCausalLM"),
        ({"n_experts": 4, "top_k": 2, "moe_ffn_hidden": 96}, "MixtralForCausalLM"),
    ],
)
def test_transformers_logits_match_ours(tmp_path, overrides, architecture):
    ckpt = make_checkpoint(tmp_path, **overrides)
    out = export_hf(ckpt, tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf_model).__name__ == architecture
    ours = load_for_inference(ckpt, device="cpu", dtype="fp32").model
    tokens = torch.randint(0, 380, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, _ = ours(tokens)
        got = hf_model(tokens).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_exported_tokenizer_and_chat_template_match_ours(tmp_path):
    ckpt = make_checkpoint(tmp_path)
    out = tmp_path / "hf"
    assert main(["export", str(ckpt.parents[1]), "--format", "hf", str(out)]) == 0  # a run dir works too
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = load_for_inference(ckpt, device="cpu").tokenizer
    text = "Hello there! café 日本語"
    assert hf_tok.encode(text) == ours.encode(text).ids
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is two plus two?"}]
    hf_ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert hf_ids == encode_chat(ours, messages)
    config = transformers.AutoConfig.from_pretrained(out)
    assert ours.token_to_id("<|im_end|>") in config.eos_token_id


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"attn_logit_softcap": 30.0}, "softcap"),
        ({"n_experts": 4, "n_shared_experts": 1}, "shared experts"),
        ({"n_experts": 4, "first_dense_layers": 1}, "first_dense_layers"),
    ],
)
def test_unexpressible_models_are_refused(tmp_path, overrides, fragment):
    ckpt = make_checkpoint(tmp_path, **overrides)
    with pytest.raises(ColossusError, match=fragment):
        export_hf(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_will_not_overwrite_without_force(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "precious.txt").write_text("keep me")
    assert main(["export", str(ckpt), str(tmp_path / "hf")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["export", str(ckpt), str(tmp_path / "hf"), "--force", "--dtype", "bf16"]) == 0
