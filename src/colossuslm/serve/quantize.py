"""Weight-only quantization for serving, applied from outside the model after its weights are loaded.

`quantize_for_serving(model, "int8")` swaps the weights of the transformer blocks' `nn.Linear`s
for torchao `Int8Tensor`s (`quantize_(model, Int8WeightOnlyConfig())`): int8 values with one
scale per output channel (symmetric, per row), a quarter of the fp32 bytes. Activations stay in
the serving dtype (fp32, bf16 or fp16): each matmul dequantizes the weight and multiplies in that
dtype, so int8 weight-only saves memory, and speed only where memory traffic is what limits it.
The model's code does not change: its modules call `self.wq(x)`, which torchao's tensor subclass
answers, and parameter names stay the same.

What stays in the serving dtype, and why (the layout vLLM and torchao's own recipes use):
- the embedding: a lookup, not a matmul; and the engine sizes the KV cache from its dtype;
- the output head (and so a tied embedding/head, which is one tensor): its logits feed a softmax
  over the whole vocabulary and are returned as logprobs, where int8 noise is most visible;
- the MoE router: its logits decide the routing; noise there flips expert choices;
- the routed MoE experts: 3-D `[E, in, out]` parameters multiplied by a grouped GEMM
  (`torch._grouped_mm`), not `nn.Linear`s; torchao's int8 weight-only tensor has no grouped
  matmul, so they are left as they are and the summary says so (shared experts are Linears and
  are quantized);
- norms and biases: vectors, a negligible share of the bytes.

int4 is refused: torchao 0.18's int4 weight-only kernels need CUDA (tinygemm) or the separate
`mslk` package; on a CPU build none of its packing formats runs (measured, issue 12).
Quantized weights exist only in memory: checkpoints and `colossus export` keep the full weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from colossuslm.errors import ColossusError
from colossuslm.torchao_import import quiet_torchao_import

METHODS = ("none", "int8")
# Module names (FQN components) kept in the serving dtype by design (see the module docstring).
_KEPT_NAMES = ("router",)


@dataclass
class QuantizationSummary:
    """What `quantize_for_serving` did, for the start-up log line and the bench."""

    method: str
    quantized: list[str] = field(default_factory=list)  # module names whose weight is int8
    kept: list[str] = field(default_factory=list)  # weights that stay in the serving dtype, by design
    weight_bytes_before: int = 0
    weight_bytes_after: int = 0

    def describe(self) -> str:
        if self.method == "none":
            return "no quantization"
        mb = 1 / 2**20
        return (
            f"{self.method} weight-only: {len(self.quantized)} Linear layers quantized; weights "
            f"{self.weight_bytes_before * mb:.1f} MiB -> {self.weight_bytes_after * mb:.1f} MiB; "
            f"kept in the serving dtype: {', '.join(self.kept)}"
        )


def check_method(method: str) -> str:
    """`method` if it is one `quantize_for_serving` takes; a user error naming the fix otherwise."""
    if method == "int4":
        raise ColossusError(
            "--quantization int4 is not supported: torchao 0.18's int4 weight-only kernels need a CUDA "
            "GPU (tinygemm) or the mslk package, and none runs on a CPU build; use --quantization int8"
        )
    if method not in METHODS:
        raise ColossusError(f"--quantization {method!r} is not a method; use one of {', '.join(METHODS)}")
    return method


def quantize_for_serving(model: nn.Module, method: str) -> QuantizationSummary:
    """Quantize `model`'s block Linears in place (an inference-only model: eval mode, no grads)."""
    check_method(method)
    before = weight_bytes(model)
    summary = QuantizationSummary(method, weight_bytes_before=before, weight_bytes_after=before)
    if method == "none":
        return summary
    quantize_, config = _import_int8()
    summary.quantized = [name for name, module in model.named_modules() if _is_quantized_linear(module, name)]
    # filter_fn is torchao's contract: (module, fully qualified name) -> quantize this one?
    quantize_(model, config, filter_fn=_is_quantized_linear)
    summary.kept = _kept_weights(model)
    summary.weight_bytes_after = weight_bytes(model)
    return summary


def _is_quantized_linear(module: nn.Module, fqn: str) -> bool:
    """The Linears of the transformer blocks (attention, dense and shared-expert SwiGLU), not the
    router; the head (`output`) is outside `layers.` and stays too."""
    parts = fqn.split(".")
    return (
        isinstance(module, nn.Linear)
        and parts[0] == "layers"
        and not any(part in _KEPT_NAMES for part in parts)
        and not is_quantized(module.weight)  # applying twice changes nothing
    )


def _kept_weights(model: nn.Module) -> list[str]:
    """Short names of the matrices left unquantized, for the log line (routed experts named as such)."""
    kept = ["embedding"]
    if getattr(model, "output", None) is not None:
        kept.append("output head")
    else:
        kept[0] = "tied embedding/head"
    names = {name for name, _ in model.named_modules()}
    if any(name.endswith(".router") for name in names):
        kept.append("MoE router")
    if any(name.endswith(".experts") for name in names):
        kept.append("routed MoE experts (3-D grouped weights, no int8 grouped GEMM)")
    return kept


def is_quantized(tensor: torch.Tensor) -> bool:
    """True for a torchao quantized weight (a tensor subclass holding int8 data and scales)."""
    return is_traceable_wrapper_subclass(tensor)


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Bytes a weight really occupies: a quantized one's inner tensors (int8 data + scales), not
    the `numel * element size` of the dtype it presents."""
    if is_quantized(tensor):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters (a tied embedding/head counted once)."""
    return sum(tensor_bytes(p) for p in model.parameters())


def _import_int8():
    """torchao's `quantize_` and int8 weight-only config, imported without its CUDA-extension
    warnings (see torchao_import)."""
    try:
        with quiet_torchao_import():
            from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise ColossusError(
            "--quantization int8 needs the torchao package (a dependency of colossuslm): "
            f"pip install 'torchao>=0.18'; importing it failed with: {exc}"
        ) from exc
    # Per-row = one scale per output channel. set_inductor_config=False: serving runs eagerly, and
    # the default would change torch._inductor's global settings for the whole process.
    return quantize_, Int8WeightOnlyConfig(set_inductor_config=False)


__all__ = ["METHODS", "QuantizationSummary", "check_method", "is_quantized", "quantize_for_serving", "weight_bytes"]
