"""Export a checkpoint as a Hugging Face model directory, loadable by `transformers` and vLLM:
LlamaForCausalLM (dense), Qwen2ForCausalLM (q/k/v biases), Qwen3ForCausalLM (q/k norms),
MixtralForCausalLM (MoE) or Qwen3MoeForCausalLM (MoE with q/k norms).

No weight permutation is needed: our RoPE already uses Hugging Face's rotate-half layout, and our
router (top-k logits, softmax over those k) equals Mixtral's (softmax over all, top-k, renormalise).
Tensor names come from `models/hf_import.py`, the inverse of this file, so export and import
cannot drift apart. What no supported class can express is refused with a clear error rather
than exported wrong.

Tokenizer files: a model trained here gets ChatML's tokenizer_config.json (its special tokens
and a Jinja template rendering what `data/chat.py` renders); an imported model gets its own
tokenizer files back unchanged (tokenizer.json, tokenizer_config.json, chat_template.jinja, ...,
kept with every checkpoint since the import), and config.json its own bos/eos/pad ids.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from colossuslm.config import ModelConfig, load_config
from colossuslm.data.chat import HF_CHAT_TEMPLATE
from colossuslm.data.tokenizer import (
    EOS_TOKEN,
    GENERATION_CONFIG,
    IM_END,
    IM_START,
    PAD_TOKEN,
    TOKENIZER_FILE,
    TOKENIZER_SIDE_FILES,
    has_hf_tokenizer_files,
    load_tokenizer,
    read_json,
    read_special_tokens,
)
from colossuslm.errors import ColossusError
from colossuslm.models.hf_import import ARCHITECTURES, Architecture, expert_tensor_names, hf_tensor_names, moe_layers
from colossuslm.serve.loading import DTYPES
from colossuslm.train.checkpoint import resolve_checkpoint

FORMATS = ("hf",)

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def check_exportable(cfg: ModelConfig) -> None:
    if cfg.attn_logit_softcap > 0:
        raise ColossusError(
            f"this model caps attention logits (model.attn_logit_softcap = {cfg.attn_logit_softcap}, Grok-style); "
            f"no Hugging Face class it could be exported as has such an option, so transformers/vLLM would "
            f"compute different outputs. Serve it with `colossus serve` instead, or train with "
            f"attn_logit_softcap = 0 to export"
        )
    if cfg.qkv_bias and (cfg.qk_norm or cfg.is_moe):
        raise ColossusError(
            "model.qkv_bias = true goes only with a dense model without q/k norms (Qwen2); Qwen3 and "
            "Qwen3-MoE put a bias on the output projection too, so such a model cannot be exported"
        )
    if cfg.is_moe and cfg.n_shared_experts:
        raise ColossusError(
            f"model.n_shared_experts = {cfg.n_shared_experts}: Mixtral and Qwen3-MoE have no shared experts; "
            f"only MoE models with n_shared_experts = 0 can be exported"
        )
    if cfg.is_moe and not cfg.qk_norm and cfg.first_dense_layers:
        raise ColossusError(
            f"model.first_dense_layers = {cfg.first_dense_layers}: Mixtral makes every layer "
            f"MoE; only MoE models with first_dense_layers = 0 (or with q/k norms, as Qwen3-MoE) can be exported"
        )
    if cfg.is_moe and not cfg.qk_norm and not cfg.router_renormalize:
        raise ColossusError(
            "model.router_renormalize = false: Mixtral always renormalises its top-k gates; only Qwen3-MoE "
            "(a model with q/k norms) can be exported with unnormalised gates"
        )


def export_architecture(cfg: ModelConfig) -> Architecture:
    """The Hugging Face class that computes what `cfg` does (after `check_exportable`)."""
    if cfg.is_moe:
        return ARCHITECTURES["Qwen3MoeForCausalLM" if cfg.qk_norm else "MixtralForCausalLM"]
    if cfg.qkv_bias:
        return ARCHITECTURES["Qwen2ForCausalLM"]
    return ARCHITECTURES["Qwen3ForCausalLM" if cfg.qk_norm else "LlamaForCausalLM"]


def _rope_config(cfg: ModelConfig) -> dict:
    if cfg.rope_scaling == "none":
        params = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        # Older readers (vLLM, transformers 4.x) take rope_theta; transformers 5 takes rope_parameters.
        return {"rope_theta": cfg.rope_theta, "rope_parameters": params}
    params = {
        "rope_type": cfg.rope_scaling,
        "rope_theta": cfg.rope_theta,
        "factor": cfg.rope_scaling_factor,
        "low_freq_factor": cfg.rope_low_freq_factor,
        "high_freq_factor": cfg.rope_high_freq_factor,
        "original_max_position_embeddings": cfg.rope_original_max_seq_len,
    }
    return {"rope_theta": cfg.rope_theta, "rope_parameters": params, "rope_scaling": params}


def _architecture_config(cfg: ModelConfig, arch: Architecture) -> dict:
    """The keys that differ between the classes `export_architecture` picks."""
    config = {"architectures": [arch.name], "model_type": arch.model_type, "intermediate_size": cfg.ffn_hidden}
    if arch.model_type.startswith("qwen"):  # full attention in every layer
        config |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": cfg.n_layers}
    if arch.model_type in ("llama", "qwen3", "qwen3_moe"):
        config["attention_bias"] = False
    if arch.model_type == "llama":
        config |= {"mlp_bias": False, "pretraining_tp": 1}
    if cfg.is_moe:
        config |= {
            "num_experts_per_tok": cfg.top_k,
            "router_aux_loss_coef": cfg.aux_loss_coef,
            "output_router_logits": False,
        }
    if arch.model_type == "mixtral":
        config |= {
            "intermediate_size": cfg.expert_hidden,
            "num_local_experts": cfg.n_experts,
            "router_jitter_noise": 0.0,
            "sliding_window": None,
            # Written untied (lm_head stored) even for tied models: not every Mixtral loader ties.
            "tie_word_embeddings": False,
        }
    if arch.model_type == "qwen3_moe":
        config |= {
            "moe_intermediate_size": cfg.expert_hidden,
            "num_experts": cfg.n_experts,
            "norm_topk_prob": cfg.router_renormalize,
            "decoder_sparse_step": 1,
            "mlp_only_layers": list(range(cfg.first_dense_layers)),
        }
    return config


def hf_config(cfg: ModelConfig, token_ids: dict[str, int | list[int] | None], dtype: torch.dtype) -> dict:
    """config.json; `token_ids` holds bos_token_id, eos_token_id and pad_token_id."""
    config = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        **_rope_config(cfg),
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        **token_ids,
        "torch_dtype": _DTYPE_NAMES[dtype],
        "use_cache": True,
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    return config | _architecture_config(cfg, export_architecture(cfg))


def hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our parameter names and layouts -> the exported class's (per-expert MoE layout, which both
    transformers 5 and vLLM read)."""
    arch = export_architecture(cfg)
    out = {theirs: state[ours] for ours, theirs in hf_tensor_names(cfg, arch.moe_layout).items()}
    if arch.model_type == "mixtral" and cfg.tie_embeddings:
        out["lm_head.weight"] = state["tok_embeddings.weight"].clone()  # written untied: see above
    for layer in moe_layers(cfg):
        for ours, per_expert in expert_tensor_names(cfg, arch.moe_layout, layer).items():
            # Ours are [E, in, out] for x @ W; nn.Linear weights are [out, in].
            for name, weight in zip(per_expert, state[ours]):
                out[name] = weight.t()
    return out


def tokenizer_config(special: dict[str, int], max_len: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "chat_template": HF_CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(i): {
                "content": tok,
                "special": True,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            }
            for tok, i in sorted(special.items(), key=lambda kv: kv[1])
        },
    }


def export_hf(checkpoint: str | Path, out_dir: str | Path, dtype: str = "fp32", force: bool = False) -> Path:
    """Write config.json, model.safetensors, tokenizer files and generation_config.json to `out_dir`."""
    ckpt_dir = resolve_checkpoint(checkpoint)
    cfg = load_config([ckpt_dir / "config.toml"]).model
    check_exportable(cfg)
    if dtype not in DTYPES:
        raise ColossusError(f"--dtype {dtype!r} is not supported; use one of: {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise ColossusError(f"{out_dir} exists and is not empty; choose a new directory or pass --force")
    imported = has_hf_tokenizer_files(ckpt_dir)  # its tokenizer files came with `colossus import hf`
    project_special = None if imported else _project_special_ids(ckpt_dir)
    token_ids = _imported_token_ids(ckpt_dir) if imported else _project_token_ids(project_special)

    state = hf_state_dict(load_file(str(ckpt_dir / "model.safetensors")), cfg)
    state = {name: t.to(torch_dtype).contiguous() for name, t in state.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out_dir / "config.json", hf_config(cfg, token_ids, torch_dtype))
    if imported:
        _copy_imported_tokenizer(ckpt_dir, out_dir, token_ids)
        return out_dir
    _write_json(out_dir / GENERATION_CONFIG, token_ids)
    shutil.copyfile(ckpt_dir / TOKENIZER_FILE, out_dir / TOKENIZER_FILE)
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(project_special, cfg.max_seq_len))
    _write_json(
        out_dir / "special_tokens_map.json",
        {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "additional_special_tokens": [IM_START, IM_END]},
    )
    return out_dir


def _project_special_ids(ckpt_dir: Path) -> dict[str, int]:
    tokenizer = load_tokenizer(ckpt_dir)
    special = {}
    for token in (EOS_TOKEN, PAD_TOKEN, IM_START, IM_END):
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise ColossusError(
                f"the checkpoint's tokenizer has no {token} token; it was not made by "
                f"`colossus data prepare`, so the export would lack its special tokens"
            )
        special[token] = token_id
    return special


def _project_token_ids(special: dict[str, int]) -> dict[str, int | list[int]]:
    return {
        # No BOS token in this project: documents are separated by EOS, as in GPT-2.
        "bos_token_id": special[EOS_TOKEN],
        "eos_token_id": [special[EOS_TOKEN], special[IM_END]],
        "pad_token_id": special[PAD_TOKEN],
    }


def _imported_token_ids(ckpt_dir: Path) -> dict[str, int | list[int] | None]:
    """The imported model's own ids: as its generation_config.json (from the source directory)
    gives them, else as its tokenizer files name the tokens."""
    special = read_special_tokens(ckpt_dir, load_tokenizer(ckpt_dir))
    eos: int | list[int] | None = list(special.eos_ids)
    if len(eos) <= 1:  # one id is written as a number, as transformers writes it
        eos = eos[0] if eos else None
    ids = {"bos_token_id": special.bos_id, "eos_token_id": eos, "pad_token_id": special.pad_id}
    generation = read_json(ckpt_dir / GENERATION_CONFIG) or {}
    return ids | {key: generation[key] for key in ids if generation.get(key) is not None}


def _copy_imported_tokenizer(ckpt_dir: Path, out_dir: Path, token_ids: dict[str, int | list[int] | None]) -> None:
    for name in (TOKENIZER_FILE, *TOKENIZER_SIDE_FILES):
        if (ckpt_dir / name).is_file():
            shutil.copyfile(ckpt_dir / name, out_dir / name)
    if not (ckpt_dir / GENERATION_CONFIG).is_file():
        _write_json(out_dir / GENERATION_CONFIG, {key: value for key, value in token_ids.items() if value is not None})


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


__all__ = ["FORMATS", "check_exportable", "export_hf", "hf_config", "hf_state_dict"]
