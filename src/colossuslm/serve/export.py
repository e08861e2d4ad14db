"""Export a checkpoint as a Hugging Face model directory: LlamaForCausalLM (dense) or
MixtralForCausalLM (MoE), loadable by `transformers` and vLLM.

No weight permutation is needed: our RoPE already uses Hugging Face's rotate-half layout, and our
router (top-k logits, softmax over those k) equals Mixtral's (softmax over all, top-k, renormalise).
What Llama/Mixtral configs cannot express is refused with a clear error rather than exported wrong.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from colossuslm.config import ModelConfig, load_config
from colossuslm.data.chat import HF_CHAT_TEMPLATE
from colossuslm.data.tokenizer import EOS_TOKEN, IM_END, IM_START, PAD_TOKEN, load_tokenizer
from colossuslm.errors import ColossusError
from colossuslm.serve.loading import DTYPES
from colossuslm.train.checkpoint import resolve_checkpoint

FORMATS = ("hf",)

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def check_exportable(cfg: ModelConfig) -> None:
    if cfg.attn_logit_softcap > 0:
        raise ColossusError(
            f"this model caps attention logits (model.attn_logit_softcap = {cfg.attn_logit_softcap}, Grok-style); "
            f"Llama and Mixtral have no such option, so transformers/vLLM would compute different outputs. "
            f"Serve it with `colossus serve` instead, or train with attn_logit_softcap = 0 to export"
        )
    if cfg.is_moe and cfg.n_shared_experts:
        raise ColossusError(
            f"model.n_shared_experts = {cfg.n_shared_experts}: Mixtral has no shared experts; "
            f"only MoE models with n_shared_experts = 0 can be exported"
        )
    if cfg.is_moe and cfg.first_dense_layers:
        raise ColossusError(
            f"model.first_dense_layers = {cfg.first_dense_layers}: Mixtral makes every layer "
            f"MoE; only MoE models with first_dense_layers = 0 can be exported"
        )


def hf_config(cfg: ModelConfig, special: dict[str, int], dtype: torch.dtype) -> dict:
    config = {
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        # Older readers (vLLM, transformers 4.x) take rope_theta; transformers 5 takes rope_parameters.
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "silu",
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        # No BOS token in this project: documents are separated by EOS, as in GPT-2.
        "bos_token_id": special[EOS_TOKEN],
        "eos_token_id": [special[EOS_TOKEN], special[IM_END]],
        "pad_token_id": special[PAD_TOKEN],
        "torch_dtype": _DTYPE_NAMES[dtype],
        "use_cache": True,
    }
    if cfg.is_moe:
        config.update(
            {
                "architectures": ["MixtralForCausalLM"],
                "model_type": "mixtral",
                "intermediate_size": cfg.expert_hidden,
                "num_local_experts": cfg.n_experts,
                "num_experts_per_tok": cfg.top_k,
                "router_aux_loss_coef": cfg.aux_loss_coef,
                "router_jitter_noise": 0.0,
                "output_router_logits": False,
                "sliding_window": None,
                # Written untied (lm_head stored) even for tied models: not every Mixtral loader ties.
                "tie_word_embeddings": False,
            }
        )
    else:
        config.update(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "intermediate_size": cfg.ffn_hidden,
                "attention_bias": False,
                "mlp_bias": False,
                "pretraining_tp": 1,
                "tie_word_embeddings": cfg.tie_embeddings,
            }
        )
    return config


def hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our parameter names and layouts -> Llama/Mixtral's (legacy per-expert layout, which both
    transformers 5 and vLLM read)."""
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"], "model.norm.weight": state["norm.weight"]}
    if "output.weight" in state:
        out["lm_head.weight"] = state["output.weight"]
    elif cfg.is_moe:
        out["lm_head.weight"] = state["tok_embeddings.weight"].clone()
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        for a, b in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            out[f"{theirs}self_attn.{b}.weight"] = state[f"{ours}attention.{a}.weight"]
        out[f"{theirs}input_layernorm.weight"] = state[f"{ours}attention_norm.weight"]
        out[f"{theirs}post_attention_layernorm.weight"] = state[f"{ours}ffn_norm.weight"]
        if cfg.is_moe:
            moe = f"{theirs}block_sparse_moe."
            out[f"{moe}gate.weight"] = state[f"{ours}moe.router.gate.weight"]
            # Ours are [E, in, out] for x @ W; nn.Linear weights are [out, in].
            w1, w3, w2 = (state[f"{ours}moe.experts.{n}"] for n in ("w1", "w3", "w2"))
            for e in range(cfg.n_experts):
                out[f"{moe}experts.{e}.w1.weight"] = w1[e].t()
                out[f"{moe}experts.{e}.w3.weight"] = w3[e].t()
                out[f"{moe}experts.{e}.w2.weight"] = w2[e].t()
        else:
            for a, b in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                out[f"{theirs}mlp.{b}.weight"] = state[f"{ours}feed_forward.{a}.weight"]
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

    state = hf_state_dict(load_file(str(ckpt_dir / "model.safetensors")), cfg)
    state = {name: t.to(torch_dtype).contiguous() for name, t in state.items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out_dir / "config.json", hf_config(cfg, special, torch_dtype))
    _write_json(
        out_dir / "generation_config.json",
        {
            "bos_token_id": special[EOS_TOKEN],
            "eos_token_id": [special[EOS_TOKEN], special[IM_END]],
            "pad_token_id": special[PAD_TOKEN],
        },
    )
    shutil.copyfile(ckpt_dir / "tokenizer.json", out_dir / "tokenizer.json")
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config(special, cfg.max_seq_len))
    _write_json(
        out_dir / "special_tokens_map.json",
        {"eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN, "additional_special_tokens": [IM_START, IM_END]},
    )
    return out_dir


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


__all__ = ["FORMATS", "check_exportable", "export_hf", "hf_config", "hf_state_dict"]
