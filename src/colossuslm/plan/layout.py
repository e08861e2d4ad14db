"""A parallel layout (how a job splits over GPUs) and the software features it runs with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Activation recomputation, cheapest compute first and least memory last:
#   none       keep every activation the backward pass needs;
#   selective  keep GEMM inputs and outputs, recompute the cheap parts in backward (norm outputs,
#              the MLP activation, the attention core -- Korthikanti et al. 2022 and its successors);
#   full       keep only each layer's input and rerun the whole layer forward in backward.
RECOMPUTE_LEVELS = ("none", "selective", "full")


@dataclass(frozen=True)
class Software:
    """Features of the training stack that change cost but not the maths.

    Defaults describe a common 2024 stack (flash attention, sequence parallelism, overlapped
    gradient reduction and pipeline sends); features that only some stacks have (overlapped TP
    collectives, hidden expert all-to-alls, fp8) are off unless asked for.
    """

    flash_attention: bool = True  # fused attention; False materialises the s x s scores
    sequence_parallel: bool = True  # TP ranks also split norms/residuals along the sequence
    tp_overlap: bool = False  # TP collectives overlapped with GEMMs (Megatron-Core TP overlap, async TP)
    dp_overlap: bool = True  # gradient reduction overlapped with the backward pass
    pp_overlap: bool = True  # asynchronous pipeline sends, split over TP ranks (Megatron scatter/gather)
    ep_overlap: bool = False  # expert all-to-alls hidden behind another micro-batch's compute (DualPipe)
    ep_max_domains: int = 0  # node-limited routing: a token reaches at most this many NVLink domains
    # and crosses the network once per domain (DeepSeek-V3 / DeepEP); 0 = plain all-to-all
    fp8: bool = False  # GEMMs (and the expert dispatch) in fp8; attention and the rest stay bf16
    fused_elementwise: bool = True  # norms, activations and rotary embeddings as fused kernels
    # (torch.compile, Transformer Engine, Apex); eager PyTorch runs each as several passes
    # Memory as Colossus LM's trainer holds it (plan/memory.py): its chunked loss on a head (and
    # embedding) replicated over TP ranks, ring attention keeping the K/V chunks it received, and
    # FSDP2 under pipelining keeping each stage gathered with unsharded gradients through the step.
    # False = Megatron-style stacks (vocabulary-parallel head with whole fp32 logits).
    colossus_trainer: bool = False


@dataclass(frozen=True)
class Stack(Software):
    """`Software` plus the features of a training stack that only the planner's cost and memory
    models read (plan/costmodel.py, whose constants the names below refer to; plan/memory.py).

    attention_kernel: "fused" -- a kernel built for the GPU (cuDNN / Transformer Engine fused
        attention, FlashAttention-3 on Hopper); "fa2" -- FlashAttention-2 through PyTorch SDPA,
        which on Hopper and later runs at FA2_ON_HOPPER of that rate; "triton" -- the Triton
        port of FlashAttention, at TRITON_FLASH_ON_AMPERE of FA2's rate on Ampere, FA2's on Hopper.
    selective: what `recompute = "selective"` reruns in backward. "attention" -- the attention
        core and the element-wise ops, GEMM outputs kept (Megatron, Korthikanti et al. 2022);
        "every_other_matmul" -- torchtitan's per-op policy (its `_save_list`): every second
        matmul, the element-wise ops and the TP all-gathers are rerun; the attention output and
        the reduce-scatters are kept.
    """

    attention_kernel: Literal["fused", "fa2", "triton"] = "fused"
    selective: Literal["attention", "every_other_matmul"] = "attention"
    # "learned": a trained router, whose per-rank loads vary by chance around the mean;
    # "balanced": the benchmark forces equal loads (NeMo's force-balanced / fake balanced gate).
    routing: Literal["learned", "balanced"] = "learned"
    # FSDP under pipeline parallelism: "per_micro_batch" -- weights regathered and gradients
    # reduce-scattered for every micro-batch, so they stay sharded as the memory model assumes;
    # "per_step" -- torch.distributed.pipelining with FSDP2 (torchtitan, NeMo AutoModel) keeps the
    # gathered weights and unreduced gradients across the step's micro-batches (resharding and
    # gradient sync off until the last backward): one gather and one reduce-scatter a step, at
    # the memory of unsharded stage weights and gradients, which plan/memory.py does not count.
    fsdp_under_pp: Literal["per_micro_batch", "per_step"] = "per_micro_batch"
    # Whose TP overlap `tp_overlap` is: Megatron-Core's (userbuffers) or PyTorch's async TP, which
    # pipelines TORCH_ASYNC_TP_SHARE of the traffic.
    tp_overlap_impl: Literal["megatron", "torch_async"] = "megatron"
    # The cross-entropy over materialized logits (memory only): "fp32" -- cast to fp32 and kept
    # with an fp32 gradient (Megatron's vocab-parallel loss); "fused" -- a kernel that reads them
    # and writes their gradient in the compute dtype (flash-attn's cross_entropy, llm-foundry's
    # default loss_fn 'fused_crossentropy').
    loss_kernel: Literal["fp32", "fused"] = "fp32"


def stack_feature(sw: Software, name: str) -> str:
    """A `Stack` feature of `sw`, or its default when `sw` is a plain `Software`."""
    return getattr(sw, name, getattr(Stack, name))


@dataclass(frozen=True)
class Layout:
    """Degrees of parallelism and per-GPU batch. GPUs = tp * pp * cp * dp.

    `ep` carves expert shards out of the dp * cp ranks (experts are also split by tp).
    `zero`: 1 shards optimizer states over data-parallel ranks, 2 also gradients, 3 also the
    weights (FSDP). `vp` is the number of interleaved pipeline chunks per GPU.
    """

    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    ep: int = 1
    micro_batch: int = 1  # sequences per micro-batch per data-parallel rank
    grad_accum: int = 1  # micro-batches per step per data-parallel rank
    vp: int = 1
    recompute: str = "none"
    zero: int = 1
    software: Software = field(default_factory=Software)
    # The pipeline schedule in the trainer's names (parallel.pp_schedule); "" = 1F1B, interleaved
    # when vp > 1 (what the search assumes unless a schedule is fixed).
    schedule: str = ""

    @property
    def pp_schedule(self) -> str:
        return self.schedule or self._default_schedule

    @property
    def _default_schedule(self) -> str:
        return "interleaved_1f1b" if self.vp > 1 else "1f1b"

    @property
    def n_gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step."""
        return self.dp * self.micro_batch * self.grad_accum

    def short(self, compact: bool = False) -> str:
        """ "TP8 PP16x4 CP1 EP1 DP64" (xN: interleaved chunks; "PP8x2/zbv" names a schedule chosen
        instead of 1F1B); `compact` drops CP1 and EP1."""
        named = self.pp > 1 and self.pp_schedule != self._default_schedule
        pipeline = f"PP{self.pp}" + (f"x{self.vp}" if self.vp > 1 else "") + (f"/{self.schedule}" if named else "")
        parts = [f"TP{self.tp}", pipeline]
        parts += [f"{name}{degree}" for name, degree in (("CP", self.cp), ("EP", self.ep)) if degree > 1 or not compact]
        return " ".join(parts + [f"DP{self.dp}"])

    def family(self) -> str:
        """The combination of parallelisms in use, e.g. "DP+TP+PP"; rejections are grouped by it."""
        names = ["DP"] + [
            name for name, degree in (("TP", self.tp), ("PP", self.pp), ("CP", self.cp), ("EP", self.ep)) if degree > 1
        ]
        return "+".join(names)
