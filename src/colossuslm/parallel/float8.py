"""Float8 training through torchao: swap the model's eligible `nn.Linear`s for `Float8Linear`.

Applied to the unchanged model before tensor parallelism and FSDP2 (as torchtitan's model
converters are), so the TP plans and `fully_shard` see the float8 modules. Float8Linear keeps
the bf16/fp32 master weight and casts inputs, weights and output gradients to float8 with
dynamic scales inside each matmul (`torch._scaled_mm`): tensorwise = one scale per tensor,
rowwise = one scale per row (more accurate, a little slower).

What stays in high precision, and why:
- the MoE router: its logits decide the routing; float8 noise there flips expert choices;
- the output head: the logits feed a softmax over the whole vocabulary (torchtitan skips it too);
- the embedding: a lookup, not a matmul (`nn.Embedding`, never converted);
- the routed experts: 3-D grouped weights, not `nn.Linear`s;
- any Linear whose in/out features are not multiples of 16, which `torch._scaled_mm` requires.

On CPU, torch's `_scaled_mm` has a float8 kernel, so the same code trains here (for numerics,
not speed). On CUDA it needs compute capability >= 8.9 (Ada/Hopper); older GPUs are refused.
"""

from __future__ import annotations

import torch
from torch import nn

from colossuslm.config.schema import TrainConfig
from colossuslm.errors import ColossusError
from colossuslm.torchao_import import quiet_torchao_import

FLOAT8_MIN_CAPABILITY = (8, 9)
_MATMUL_MULTIPLE = 16
# Module names (FQN components) kept in high precision by design, not by shape.
_HIGH_PRECISION_NAMES = ("router", "output")


def _import_float8():
    """torchao's float8 API, imported without its CUDA-extension warnings (see torchao_import)."""
    try:
        with quiet_torchao_import():
            from torchao.float8 import Float8LinearConfig, convert_to_float8_training
            from torchao.float8.float8_linear import Float8Linear
    except ImportError as exc:
        raise ColossusError(
            "config: train.float8 = true needs the torchao package (a dependency of colossuslm): "
            f"pip install 'torchao>=0.18'; importing it failed with: {exc}"
        ) from exc
    return Float8LinearConfig, convert_to_float8_training, Float8Linear


def float8_module_filter(module: nn.Module, fqn: str) -> bool:
    """True for the Linears that train in float8 (torchao's `module_filter_fn` contract)."""
    if not isinstance(module, nn.Linear):
        return False
    _, _, Float8Linear = _import_float8()
    if isinstance(module, Float8Linear):  # already converted: applying twice changes nothing
        return False
    if any(part in _HIGH_PRECISION_NAMES for part in fqn.split(".")):
        return False
    return module.in_features % _MATMUL_MULTIPLE == 0 and module.out_features % _MATMUL_MULTIPLE == 0


def check_float8_device(device: torch.device) -> None:
    """Refuse CUDA devices without float8 tensor cores; CPU runs torch's float8 `_scaled_mm`."""
    if device.type != "cuda":
        return
    capability = torch.cuda.get_device_capability(device)
    if capability < FLOAT8_MIN_CAPABILITY:
        raise ColossusError(
            "train.float8 needs an NVIDIA GPU with compute capability >= 8.9 (Hopper/Ada); this machine has "
            f"{torch.cuda.get_device_name(device)} with compute capability {capability[0]}.{capability[1]}: "
            "set train.float8 = false"
        )


def _model_device(model: nn.Module) -> torch.device:
    device = next(model.parameters()).device
    if device.type == "meta" and torch.cuda.is_available():  # built on meta, materialized on the GPU later
        return torch.device("cuda", torch.cuda.current_device())
    return device


def apply_float8(model: nn.Module, cfg: TrainConfig, *, fsdp_float8_all_gather: bool = False) -> list[str]:
    """Convert `model`'s eligible Linears to float8 training in place; returns their names.

    A no-op returning [] when `cfg.float8` is false. `fsdp_float8_all_gather` (tensorwise only)
    makes FSDP2 gather the weights already cast to float8: half the bytes of a bf16 gather."""
    if not cfg.float8:
        return []
    check_float8_device(_model_device(model))
    Float8LinearConfig, convert_to_float8_training, _ = _import_float8()
    config = Float8LinearConfig.from_recipe_name(cfg.float8_recipe)
    if fsdp_float8_all_gather and cfg.float8_recipe == "tensorwise":
        config = Float8LinearConfig(enable_fsdp_float8_all_gather=True)
    converted = [name for name, module in model.named_modules() if float8_module_filter(module, name)]
    convert_to_float8_training(model, module_filter_fn=float8_module_filter, config=config)
    return converted
