"""Read a Hugging Face model directory as a `ModelConfig` and a `Transformer` state dict.

Supported: LlamaForCausalLM (with Llama 3.1 RoPE scaling), MistralForCausalLM, Qwen2ForCausalLM
(q/k/v biases), Qwen3ForCausalLM (q/k norms), MixtralForCausalLM and Qwen3MoeForCausalLM. Weights
come from safetensors only (one file or a sharded index), never from pickles. No permutation is
needed: our RoPE uses Hugging Face's rotate-half layout, and our router's softmax over the chosen
k logits equals their softmax over all experts renormalised (tests check logits against
transformers). Whatever in config.json this model would not compute the same way (sliding
windows, other RoPE types, biases where we have none, other activations) is refused, not ignored.

Plain data in, plain data out: no transformers import, no files written (`colossus import hf`
writes the run directory). The tensor-name table here is also what `serve/export.py` writes.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from colossuslm.config.schema import Config, ModelConfig
from colossuslm.errors import ColossusError

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class Architecture:
    """What one `architectures` entry of config.json means for our model."""

    name: str
    model_type: str
    # "" (dense), "mixtral" (block_sparse_moe.experts.E.w1) or "qwen3_moe" (mlp.experts.E.gate_proj)
    moe_layout: str = ""
    qkv_bias: bool = False  # always on (Qwen2); elsewhere `attention_bias` would put a bias on o_proj too
    qk_norm: bool = False
    # config.json keys its transformers class reads that add biases we have no tensors for.
    bias_keys: tuple[str, ...] = ()
    # transformers' defaults for keys a config.json may leave out (its config classes, 5.x).
    defaults: dict[str, Any] = field(default_factory=dict)


_COMMON_DEFAULTS = {
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "initializer_range": 0.02,
}
_MOE_DEFAULTS = {"num_experts_per_tok": 2, "router_aux_loss_coef": 0.001}
_QWEN_DEFAULTS = {"max_position_embeddings": 32768, "use_sliding_window": False}

ARCHITECTURES = {
    arch.name: arch
    for arch in (
        Architecture(
            "LlamaForCausalLM",
            "llama",
            bias_keys=("attention_bias", "mlp_bias"),
            defaults={"max_position_embeddings": 2048},
        ),
        Architecture(
            "MistralForCausalLM", "mistral", defaults={"max_position_embeddings": 131072, "sliding_window": 4096}
        ),
        Architecture("Qwen2ForCausalLM", "qwen2", qkv_bias=True, defaults=_QWEN_DEFAULTS),
        Architecture(
            "Qwen3ForCausalLM",
            "qwen3",
            qk_norm=True,
            bias_keys=("attention_bias",),
            defaults=_QWEN_DEFAULTS | {"head_dim": 128},
        ),
        Architecture(
            "MixtralForCausalLM",
            "mixtral",
            moe_layout="mixtral",
            defaults=_MOE_DEFAULTS
            | {"max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "num_local_experts": 8},
        ),
        Architecture(
            "Qwen3MoeForCausalLM",
            "qwen3_moe",
            moe_layout="qwen3_moe",
            qk_norm=True,
            bias_keys=("attention_bias",),
            defaults=_MOE_DEFAULTS
            | _QWEN_DEFAULTS
            | {
                "num_experts_per_tok": 8,
                "num_local_experts": 128,
                "moe_intermediate_size": 768,
                "norm_topk_prob": False,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
            },
        ),
    )
}

# Per-layer tensors named the same way in every supported architecture: (ours, Hugging Face's).
_LAYER_NAMES = (
    ("attention.wq.weight", "self_attn.q_proj.weight"),
    ("attention.wk.weight", "self_attn.k_proj.weight"),
    ("attention.wv.weight", "self_attn.v_proj.weight"),
    ("attention.wo.weight", "self_attn.o_proj.weight"),
    ("attention_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
)
_BIAS_NAMES = tuple(
    (f"attention.{a}.bias", f"self_attn.{b}.bias") for a, b in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"))
)
_QK_NORM_NAMES = (
    ("attention.q_norm.weight", "self_attn.q_norm.weight"),
    ("attention.k_norm.weight", "self_attn.k_norm.weight"),
)
_DENSE_MLP_NAMES = (
    ("feed_forward.w1.weight", "mlp.gate_proj.weight"),
    ("feed_forward.w3.weight", "mlp.up_proj.weight"),
    ("feed_forward.w2.weight", "mlp.down_proj.weight"),
)
# MoE: (router name, per-expert names of our w1 (gate), w3 (up), w2 (down)) under model.layers.N.
_MOE_NAMES = {
    "mixtral": ("block_sparse_moe.gate.weight", "block_sparse_moe.experts.{e}.", ("w1", "w3", "w2")),
    "qwen3_moe": ("mlp.gate.weight", "mlp.experts.{e}.", ("gate_proj", "up_proj", "down_proj")),
}
# Buffers some older checkpoints stored: recomputed from config.json, so they carry no weights.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def architecture_of(hf_config: dict[str, Any]) -> Architecture:
    names = hf_config.get("architectures") or []
    supported = ", ".join(ARCHITECTURES)
    if len(names) != 1 or names[0] not in ARCHITECTURES:
        shown = ", ".join(names) if names else "none (config.json has no 'architectures')"
        raise ColossusError(f"config.json: architecture {shown} is not supported; supported: {supported}")
    return ARCHITECTURES[names[0]]


def is_hf_model_dir(path: str | Path) -> bool:
    """A directory transformers saved (config.json beside its weights), not one of our run or
    checkpoint directories (which hold config.toml, manifest.json, checkpoints/)."""
    path = Path(path)
    return (
        (path / "config.json").is_file()
        and not (path / "manifest.json").is_file()
        and not (path / "checkpoints").is_dir()
    )


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not Path(directory).is_dir():
        raise ColossusError(f"{directory} is not a directory; give a Hugging Face model directory")
    if not path.is_file():
        raise ColossusError(f"{directory} has no config.json; it is not a Hugging Face model directory")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ColossusError(f"{path} is not valid JSON ({exc})") from None


class _Keys:
    """config.json values with transformers' defaults for omitted keys, and errors that name them."""

    def __init__(self, hf_config: dict[str, Any], arch: Architecture):
        self.raw, self.arch = hf_config, arch
        self.defaults = _COMMON_DEFAULTS | arch.defaults

    def get(self, key: str, default: Any = None) -> Any:
        value = self.raw.get(key)
        if value is None:
            return self.defaults.get(key, default)
        return value

    def required(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ColossusError(f"config.json ({self.arch.name}) lacks {key!r}, which the model needs")
        return value

    def refuse(self, what: str, why: str) -> None:
        raise ColossusError(f"config.json ({self.arch.name}): {what}; {why}, so it cannot be imported")


def model_config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
    """config.json (as a dict) -> a validated ModelConfig computing what transformers computes."""
    arch = architecture_of(hf_config)
    keys = _Keys(hf_config, arch)
    _check_supported(keys)
    d_model, n_heads = keys.required("hidden_size"), keys.required("num_attention_heads")
    head_dim = keys.get("head_dim", 0)
    cfg = ModelConfig(
        vocab_size=keys.required("vocab_size"),
        d_model=d_model,
        n_layers=keys.required("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=keys.get("num_key_value_heads", n_heads),
        head_dim=0 if head_dim * n_heads == d_model else head_dim,  # 0: the usual d_model / n_heads
        ffn_hidden=keys.required("intermediate_size"),
        max_seq_len=keys.required("max_position_embeddings"),
        norm_eps=float(keys.get("rms_norm_eps")),
        tie_embeddings=bool(keys.get("tie_word_embeddings")),
        qkv_bias=arch.qkv_bias,
        qk_norm=arch.qk_norm,
        init_std=float(keys.get("initializer_range")),
        **_rope_fields(keys),
        **_moe_fields(keys),
    )
    cfg.validate()
    return cfg


def _check_supported(keys: _Keys) -> None:
    if keys.get("hidden_act") != "silu":
        keys.refuse(f"hidden_act = {keys.get('hidden_act')!r}", "the feed-forward here is SwiGLU (silu) only")
    for key in keys.arch.bias_keys:
        if keys.get(key, False):
            keys.refuse(f"{key} = true", "biases are supported only on the q/k/v projections, as Qwen2 has them")
    if keys.get("partial_rotary_factor", 1.0) != 1.0 or _rope_parameters(keys).get("partial_rotary_factor", 1.0) != 1.0:
        keys.refuse("partial_rotary_factor < 1", "RoPE here rotates every head dimension")
    _check_full_attention(keys)


def _check_full_attention(keys: _Keys) -> None:
    """Every layer must attend to the whole context: a sliding window shorter than the context
    changes outputs beyond it, which our attention (always causal over everything) would not."""
    max_positions = keys.required("max_position_embeddings")
    window = keys.get("sliding_window")
    if not keys.get("use_sliding_window", True):  # Qwen's switch (off by default); Mistral has none
        window = None
    if window is None or window >= max_positions:
        return
    # Without layer_types, count every layer as windowed (Mistral's, and the safe reading).
    layer_types = keys.raw.get("layer_types") or ["sliding_attention"]
    if any(kind != "full_attention" for kind in layer_types):
        keys.refuse(
            f"sliding_window = {window} < max_position_embeddings = {max_positions}",
            "sliding-window attention is not implemented here",
        )


def _rope_parameters(keys: _Keys) -> dict[str, Any]:
    """transformers 5 writes `rope_parameters` (with rope_theta inside); 4.x wrote a top-level
    rope_theta and an optional `rope_scaling` dict."""
    params = dict(keys.raw.get("rope_scaling") or {})
    params.update(keys.raw.get("rope_parameters") or {})
    return params


def _rope_fields(keys: _Keys) -> dict[str, Any]:
    params = _rope_parameters(keys)
    theta = float(params.get("rope_theta", keys.get("rope_theta")))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return {"rope_theta": theta}
    if rope_type != "llama3":
        keys.refuse(f"RoPE type {rope_type!r}", "only 'default' and 'llama3' RoPE are implemented here")
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in params]
    if missing:
        keys.refuse(f"llama3 RoPE without {', '.join(missing)}", "these parameters define its frequencies")
    return {
        "rope_theta": theta,
        "rope_scaling": "llama3",
        "rope_scaling_factor": float(params["factor"]),
        "rope_low_freq_factor": float(params["low_freq_factor"]),
        "rope_high_freq_factor": float(params["high_freq_factor"]),
        # transformers falls back to max_position_embeddings when the original length is absent.
        "rope_original_max_seq_len": int(
            params.get("original_max_position_embeddings") or keys.required("max_position_embeddings")
        ),
    }


def _moe_fields(keys: _Keys) -> dict[str, Any]:
    arch = keys.arch
    if not arch.moe_layout:
        return {}
    fields = {
        "n_experts": keys.raw.get("num_experts") or keys.get("num_local_experts"),
        "top_k": keys.get("num_experts_per_tok"),
        "aux_loss_coef": float(keys.get("router_aux_loss_coef")),
        "z_loss_coef": 0.0,  # neither Mixtral nor Qwen3-MoE was trained with a router z-loss
    }
    if arch.moe_layout == "qwen3_moe":
        fields["router_renormalize"] = bool(keys.get("norm_topk_prob"))
        fields["moe_ffn_hidden"] = keys.get("moe_intermediate_size")
        fields["first_dense_layers"] = _qwen3_moe_dense_prefix(keys)
    return fields


def _qwen3_moe_dense_prefix(keys: _Keys) -> int:
    """Qwen3-MoE may keep a dense MLP in any layers (`mlp_only_layers`, `decoder_sparse_step`);
    we can keep it only in a run of leading layers (model.first_dense_layers)."""
    n_layers = keys.required("num_hidden_layers")
    step = keys.get("decoder_sparse_step")
    dense = set(keys.get("mlp_only_layers")) | {i for i in range(n_layers) if (i + 1) % step != 0}
    if dense != set(range(len(dense))):
        keys.refuse(
            f"dense layers {sorted(dense)} (mlp_only_layers / decoder_sparse_step)",
            "dense MLPs are supported only in leading layers",
        )
    return len(dense)


# ------------------------------------------------------------------------------------- weights
def hf_tensor_names(cfg: ModelConfig, moe_layout: str) -> dict[str, str]:
    """Our state-dict name -> Hugging Face's, for every tensor except routed experts (which are
    stacked here and separate there: `expert_tensor_names`)."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not cfg.tie_embeddings:
        names["output.weight"] = "lm_head.weight"
    per_layer = _LAYER_NAMES + (_BIAS_NAMES if cfg.qkv_bias else ()) + (_QK_NORM_NAMES if cfg.qk_norm else ())
    for i in range(cfg.n_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        moe_layer = cfg.is_moe and i >= cfg.first_dense_layers
        for a, b in per_layer + (() if moe_layer else _DENSE_MLP_NAMES):
            names[ours + a] = theirs + b
        if moe_layer:
            names[f"{ours}moe.router.gate.weight"] = theirs + _MOE_NAMES[moe_layout][0]
    return names


def expert_tensor_names(cfg: ModelConfig, moe_layout: str, layer: int) -> dict[str, list[str]]:
    """Our stacked expert weight (`layers.N.moe.experts.w1`, [E, in, out]) -> Hugging Face's
    per-expert nn.Linear weights ([out, in] each), expert by expert."""
    _, prefix, (gate, up, down) = _MOE_NAMES[moe_layout]
    base = f"model.layers.{layer}." + prefix
    return {
        f"layers.{layer}.moe.experts.{ours}": [base.format(e=e) + f"{theirs}.weight" for e in range(cfg.n_experts)]
        for ours, theirs in (("w1", gate), ("w3", up), ("w2", down))
    }


def moe_layers(cfg: ModelConfig) -> range:
    return range(cfg.first_dense_layers, cfg.n_layers) if cfg.is_moe else range(0)


class _Weights:
    """The directory's safetensors tensors by name, opened lazily (one file or a sharded index)."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.file_of = self._locate(directory)
        self._open: dict[str, Any] = {}

    @staticmethod
    def _locate(directory: Path) -> dict[str, Path]:
        index = directory / SAFETENSORS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
            files = sorted({directory / file for file in weight_map.values()})
            absent = [p.name for p in files if not p.is_file()]
            if absent:
                raise ColossusError(f"{index} lists shards that are missing: {', '.join(absent)}")
        elif (directory / SAFETENSORS_FILE).is_file():
            files = [directory / SAFETENSORS_FILE]
        else:
            _refuse_other_weights(directory)
        # Names as the files hold them (headers only): an index entry its shard lacks counts as missing.
        located = {}
        for path in files:
            with safe_open(str(path), framework="pt") as handle:
                located.update(dict.fromkeys(handle.keys(), path))
        return located

    def require(self, name: str) -> None:
        if name not in self.file_of:
            raise ColossusError(f"{self.directory}: the weights lack {name}, which config.json implies")

    def get(self, name: str) -> torch.Tensor:
        self.require(name)
        path = self.file_of[name]
        if path not in self._open:
            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path].get_tensor(name)


def _refuse_other_weights(directory: Path) -> None:
    pickles = [name for name in PICKLE_FILES if (directory / name).is_file()]
    if pickles:
        raise ColossusError(
            f"{directory} holds its weights as {pickles[0]} (a pickle, which can run code when loaded, "
            f"so it is never read here); convert it to safetensors first, e.g. in a trusted environment: "
            f"AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR, safe_serialization=True)"
        )
    raise ColossusError(f"{directory} has no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}: no weights to import")


def hf_state_readers(
    directory: str | Path, cfg: ModelConfig, moe_layout: str = ""
) -> dict[str, Callable[[], torch.Tensor]]:
    """Our state-dict name -> a function reading that tensor (stored dtype) from the directory's
    safetensors, one at a time, so a caller keeping one shard of each (the trainer's init_from on
    many ranks) never holds the whole model. Names are checked now: a tensor missing, or one left
    over that the model would not use, is an error before anything is read."""
    weights = _Weights(Path(directory))
    names = hf_tensor_names(cfg, moe_layout)
    experts = {
        ours: per_expert
        for layer in moe_layers(cfg)
        for ours, per_expert in expert_tensor_names(cfg, moe_layout, layer).items()
    }
    needed = [*names.values(), *(name for per_expert in experts.values() for name in per_expert)]
    for name in needed:
        weights.require(name)
    readers: dict[str, Callable[[], torch.Tensor]] = {
        ours: partial(weights.get, theirs) for ours, theirs in names.items()
    }
    readers |= {ours: partial(_stacked_experts, weights, per_expert) for ours, per_expert in experts.items()}
    used = set(needed)
    if cfg.tie_embeddings and "lm_head.weight" in weights.file_of:
        _check_tied_head(weights.get("lm_head.weight"), weights.get(names["tok_embeddings.weight"]))
        used.add("lm_head.weight")
    unused = sorted(name for name in weights.file_of if name not in used and not name.endswith(_IGNORED_SUFFIXES))
    if unused:
        raise ColossusError(
            f"{directory}: {len(unused)} tensors would go unused by the model config.json describes "
            f"(e.g. {', '.join(unused[:3])}); the directory holds parts this importer does not know"
        )
    return readers


def _stacked_experts(weights: _Weights, per_expert: list[str]) -> torch.Tensor:
    """Hugging Face's per-expert nn.Linear weights ([out, in] each) as our stacked [E, in, out]."""
    return torch.stack([weights.get(name).t() for name in per_expert])


def read_hf_state(directory: str | Path, cfg: ModelConfig, moe_layout: str = "") -> dict[str, torch.Tensor]:
    """Our state dict (names and layouts as `Transformer(cfg).state_dict()`, dtype as stored)
    from the directory's safetensors. Tensors left over that the model would not use are an error."""
    state = {name: read() for name, read in hf_state_readers(directory, cfg, moe_layout).items()}
    _check_shapes(state, cfg)
    return state


def _check_tied_head(head: torch.Tensor, embedding: torch.Tensor) -> None:
    if not torch.equal(head, embedding):
        raise ColossusError(
            "config.json says tie_word_embeddings = true, but lm_head.weight differs from the embedding; "
            "the checkpoint contradicts its config"
        )


def _check_shapes(state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    from colossuslm.models.transformer import Transformer  # torch modules: only when weights are read

    with torch.device("meta"):
        expected = Transformer(cfg).state_dict()
    for name, tensor in expected.items():
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise ColossusError(
                f"weight for {name} has shape {tuple(state[name].shape)}, but config.json implies "
                f"{tuple(tensor.shape)}; the weights do not belong to this config"
            )


def run_config_from_hf(cfg: ModelConfig, run_name: str) -> Config:
    """The run configuration an imported model is saved and served with: the defaults, but with
    the model's architecture and a training context no longer than it supports."""
    defaults = Config()
    return Config(
        model=cfg,
        data=dataclasses.replace(defaults.data, seq_len=min(defaults.data.seq_len, cfg.max_seq_len)),
        train=dataclasses.replace(defaults.train, name=run_name),
    ).validate()


def load_hf(directory: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A Hugging Face model directory -> (ModelConfig, our state dict in the stored dtype)."""
    hf_config = read_hf_config(directory)
    cfg = model_config_from_hf(hf_config)
    return cfg, read_hf_state(directory, cfg, architecture_of(hf_config).moe_layout)


__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "architecture_of",
    "expert_tensor_names",
    "hf_state_readers",
    "hf_tensor_names",
    "is_hf_model_dir",
    "load_hf",
    "model_config_from_hf",
    "moe_layers",
    "read_hf_config",
    "read_hf_state",
    "run_config_from_hf",
]
