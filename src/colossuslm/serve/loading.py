"""Load a model for inference: a checkpoint, a run directory or a Hugging Face model directory.

Weights come from safetensors (never pickle); the tokenizer carries the model's chat template and
special tokens (`data/chat_template.py` load_model_tokenizer), so an imported Llama 3 stops at its
own <|eot_id|> and chats in its own template, and a project model at <|endoftext|> in ChatML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from colossuslm.config import Config, ModelConfig, load_config
from colossuslm.data.chat import ChatTemplate, chat_template_of
from colossuslm.data.chat_template import load_model_tokenizer
from colossuslm.data.tokenizer import EOS_TOKEN, SpecialTokens, has_hf_tokenizer_files
from colossuslm.errors import ColossusError
from colossuslm.models.hf_import import (
    is_hf_model_dir,
    load_hf,
    model_config_from_hf,
    read_hf_config,
    run_config_from_hf,
)
from colossuslm.models.transformer import Transformer, rope_tables
from colossuslm.serve.quantize import QuantizationSummary, check_method, quantize_for_serving
from colossuslm.serve.tensor_parallel import TensorParallelGroup, shard_for_serving
from colossuslm.train.checkpoint import resolve_model_dir

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    path: Path  # the checkpoint (or Hugging Face) directory actually loaded
    config: Config
    model: Transformer  # eval mode, on `device`, in `dtype`
    tokenizer: Tokenizer  # carries `chat_template` (chat_template_of(tokenizer) returns it)
    name: str  # default name to serve the model under
    chat_template: ChatTemplate
    # --quantization: which weights are int8 in memory (the checkpoint on disk is unchanged).
    quantization: QuantizationSummary = field(default_factory=lambda: QuantizationSummary("none"))

    @property
    def special(self) -> SpecialTokens:
        """The model's special tokens (BOS, EOS ids, names), as its chat template holds them."""
        return self.chat_template.special

    @property
    def eos_token_id(self) -> int:
        """The model's EOS token (the first of `special.eos_ids`; load_for_inference checks there is one)."""
        return self.special.eos_ids[0]

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ColossusError(f"--device {device} was asked for but no CUDA device is available; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ColossusError(f"--device {device!r} is not a device; use auto, cpu or cuda") from None


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ColossusError(f"dtype {dtype} is not supported; use one of {', '.join(map(str, DTYPES.values()))}")
        return dtype
    if dtype == "auto":
        # bf16 halves memory traffic on GPUs; CPU bf16 matmuls are slower than fp32 on most cores.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ColossusError(f"--dtype {dtype!r} is not supported; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def default_model_name(ckpt_dir: Path) -> str:
    """`runs/NAME/checkpoints/step_X` serves as NAME; a loose checkpoint directory by its own name."""
    if ckpt_dir.parent.name == "checkpoints":
        return ckpt_dir.parent.parent.name
    return ckpt_dir.name


def build_model(
    config: Config, state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> Transformer:
    """A Transformer holding `state`, without spending time on a random init first."""
    with torch.device("meta"):
        model = Transformer(config.model)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ColossusError(
            f"checkpoint weights do not match its config.toml ({exc}); "
            f"the checkpoint is damaged or was written by a different model version"
        ) from None
    # RoPE tables are non-persistent buffers (not in the file); rebuild them on a real device.
    cos, sin = rope_tables(config.model)
    model.rope_cos, model.rope_sin = cos, sin
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def build_sharded_model(config: Config, model_dir: Path, group: TensorParallelGroup, dtype: torch.dtype) -> Transformer:
    """This rank's tensor-parallel shard of the model, read from `model_dir` without ever holding
    the whole: built on the meta device, sharded by the TP plan, then each rank allocates its own
    shards and reads just them (the trainer's `load_model_weights`: slices of model.safetensors,
    a checkpoint's DCP shards, or a Hugging Face directory one tensor at a time). So a model that
    fits only across the group's devices can be served."""
    from colossuslm.train.checkpoint import load_model_weights

    with torch.device("meta"):
        model = Transformer(config.model).to(dtype)
    shard_for_serving(model, group)
    model.to_empty(device=group.device)
    load_model_weights(model_dir, model)
    cos, sin = rope_tables(config.model)  # non-persistent buffers: to_empty left them unset
    model.rope_cos, model.rope_sin = cos.to(group.device, dtype), sin.to(group.device, dtype)
    return model.eval().requires_grad_(False)


def _run_config(model_dir: Path) -> Config:
    """The run config of a checkpoint or Hugging Face directory, without reading weights."""
    if is_hf_model_dir(model_dir):
        return run_config_from_hf(model_config_from_hf(read_hf_config(model_dir)), run_name=model_dir.resolve().name)
    if not (model_dir / "model.safetensors").is_file():
        raise ColossusError(f"checkpoint {model_dir} has no model.safetensors")
    return load_config([model_dir / "config.toml"])


def model_config_of(path: str | Path) -> ModelConfig:
    """The model config of what `load_for_inference(path)` would load, without reading weights."""
    return _run_config(resolve_model_dir(path)).model


def load_for_inference(
    path: str | Path,
    device: str = "auto",
    dtype: str | torch.dtype = "auto",
    quantization: str = "none",
    tensor_parallel: TensorParallelGroup | None = None,
) -> LoadedModel:
    """A checkpoint directory, a run directory (its newest valid checkpoint), or a Hugging Face
    model directory (config.json + safetensors, read through models/hf_import.py, nothing written).

    `quantization` ("none", "int8": serve/quantize.py) is applied after the weights are loaded and
    cast to `dtype`, so int8 weights serve fp32, bf16 or fp16 activations alike. With
    `tensor_parallel` (serve/tensor_parallel.py) every rank reads only its own shards onto its own
    device (`build_sharded_model`, the trainer's TP plan); `device` is then the group's."""
    check_method(quantization)  # before minutes of loading, not after
    model_dir = resolve_model_dir(path)
    if tensor_parallel is not None:
        config = _run_config(model_dir)
        model = build_sharded_model(config, model_dir, tensor_parallel, resolve_dtype(dtype, tensor_parallel.device))
        summary = QuantizationSummary("none")  # --tp refuses quantization (check_tensor_parallel_serving)
    else:
        config = _run_config(model_dir)
        # safetensors either way: plain tensors, nothing executed on load
        state = load_hf(model_dir)[1] if is_hf_model_dir(model_dir) else load_file(str(model_dir / "model.safetensors"))
        torch_device = resolve_device(device)
        model = build_model(config, state, torch_device, resolve_dtype(dtype, torch_device))
        del state  # after a dtype cast, the file's copies: freed before quantizing lowers the peak memory
        summary = quantize_for_serving(model, quantization)
    tokenizer = load_model_tokenizer(model_dir)
    template = chat_template_of(tokenizer)
    if template.special.eos_id is None:
        raise ColossusError(_no_eos_message(model_dir))
    if tokenizer.get_vocab_size(with_added_tokens=True) > config.model.vocab_size:
        raise ColossusError(
            f"tokenizer in {model_dir} has {tokenizer.get_vocab_size()} tokens but the "
            f"model only {config.model.vocab_size}; they do not belong together"
        )
    return LoadedModel(
        path=model_dir,
        config=config,
        model=model,
        tokenizer=tokenizer,
        name=default_model_name(model_dir),
        chat_template=template,
        quantization=summary,
    )


def _no_eos_message(model_dir: Path) -> str:
    if has_hf_tokenizer_files(model_dir):
        return (
            f"the model in {model_dir} names no EOS token (no eos_token in tokenizer_config.json, no "
            f"eos_token_id in generation_config.json or config.json), so generation could never stop"
        )
    return f"the tokenizer in {model_dir} has no {EOS_TOKEN} token; it was not made by `colossus data prepare`"
