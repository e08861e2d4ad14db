"""Exact parameter counts, training FLOPs and activation bytes of a model config.

The single source of truth for model arithmetic: the trainer's MFU, the planner and the tests
all use `model_arithmetic`. Counts match `sum(p.numel())` of the instantiated model exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from colossuslm.config.schema import ModelConfig


@dataclass(frozen=True)
class ModelArithmetic:
    total_params: int
    active_params: int  # parameters touched by one token (routed experts: only top_k of them)
    embedding_params: int  # the input lookup table (no FLOPs)
    attention_params_per_layer: int
    dense_mlp_params_per_layer: int
    moe_params_per_layer: int  # router + all experts + shared experts (0 for dense models)
    n_moe_layers: int
    flops_per_token: float  # training (forward + backward) at the given sequence length
    attention_flops_per_token: float  # the part of flops_per_token spent in QK^T and AV
    seq_len: int


def _attention_params(cfg: ModelConfig) -> int:
    """One block's attention: the four projection matrices and `_attention_vector_params`."""
    hd = cfg.resolved_head_dim
    matrices = cfg.d_model * hd * (cfg.n_heads + 2 * cfg.n_kv_heads) + cfg.n_heads * hd * cfg.d_model
    return matrices + _attention_vector_params(cfg)


def _attention_vector_params(cfg: ModelConfig) -> int:
    """One block's attention parameters that are not matmul weights: q/k/v biases (Qwen2) and
    the per-head q/k norm gains (Qwen3)."""
    hd = cfg.resolved_head_dim
    bias = hd * (cfg.n_heads + 2 * cfg.n_kv_heads) if cfg.qkv_bias else 0
    qk_norm = 2 * hd if cfg.qk_norm else 0
    return bias + qk_norm


def model_arithmetic(cfg: ModelConfig, seq_len: int | None = None) -> ModelArithmetic:
    """Counts for `cfg`; FLOPs use the PaLM convention (6 per active matmul parameter per token,
    plus 12 * layers * heads * head_dim * seq_len for attention scores, counted non-causally)."""
    seq_len = seq_len or cfg.max_seq_len
    d = cfg.d_model
    norms_per_layer = 2 * d
    attention = _attention_params(cfg)
    dense_mlp = 3 * d * cfg.ffn_hidden
    expert = 3 * d * cfg.expert_hidden
    n_moe_layers = cfg.n_layers - cfg.first_dense_layers if cfg.is_moe else 0
    n_dense_layers = cfg.n_layers - n_moe_layers
    router = d * cfg.n_experts
    moe_total = router + (cfg.n_experts + cfg.n_shared_experts) * expert if cfg.is_moe else 0
    moe_active = router + (cfg.top_k + cfg.n_shared_experts) * expert if cfg.is_moe else 0

    embedding = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    common = embedding + head + d + cfg.n_layers * (attention + norms_per_layer) + n_dense_layers * dense_mlp
    total = common + n_moe_layers * moe_total
    active = common + n_moe_layers * moe_active

    # Matmul parameters: every active parameter except the input lookup, the norm gains and the
    # biases; a tied head is still a matmul with the embedding matrix.
    vectors = cfg.n_layers * (norms_per_layer + _attention_vector_params(cfg)) + d
    matmul_params = active - embedding - vectors + cfg.vocab_size * d * cfg.tie_embeddings
    attention_flops = 12.0 * cfg.n_layers * cfg.n_heads * cfg.resolved_head_dim * seq_len
    return ModelArithmetic(
        total_params=total,
        active_params=active,
        embedding_params=embedding,
        attention_params_per_layer=attention,
        dense_mlp_params_per_layer=dense_mlp,
        moe_params_per_layer=moe_total,
        n_moe_layers=n_moe_layers,
        flops_per_token=6.0 * matmul_params + attention_flops,
        attention_flops_per_token=attention_flops,
        seq_len=seq_len,
    )


def activation_bytes_per_token(cfg: ModelConfig, recompute: str = "none", bytes_per_value: int = 2) -> float:
    """Activation memory one token keeps alive per layer for the backward pass (no TP/SP split).

    recompute = "none": every saved tensor of a block with fused (flash) attention;
    "full": only the block input survives (the block is recomputed in backward).
    The loss's own memory is not included: see `loss_bytes`.
    """
    d, b = cfg.d_model, bytes_per_value
    if recompute == "full":
        return float(d * b)
    if recompute != "none":
        raise ValueError(f"recompute must be 'none' or 'full', not {recompute!r}")
    hd = cfg.resolved_head_dim
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    attention = b * (2 * d + q + 2 * kv + q) + 4 * cfg.n_heads  # norm in/out, q k v, output, lse
    ffn_in = b * 2 * d  # norm input and output
    if cfg.is_moe:
        routed = cfg.top_k + cfg.n_shared_experts
        ffn = ffn_in + 4 * cfg.n_experts + b * routed * (d + 3 * cfg.expert_hidden)
        dense_share = cfg.first_dense_layers / cfg.n_layers
        dense = ffn_in + b * 3 * cfg.ffn_hidden
        ffn = dense_share * dense + (1 - dense_share) * ffn
    else:
        ffn = ffn_in + b * 3 * cfg.ffn_hidden  # gate, up, and their SwiGLU product
    return float(attention + ffn)


def logits_bytes_per_token(cfg: ModelConfig, bytes_per_value: int = 4) -> float:
    """Logits and their gradient held around the loss, by a head that materializes them: fp32 as
    Megatron-style stacks cast them, or `bytes_per_value` 2 where a fused cross-entropy kernel
    reads them and writes their gradient in the compute dtype. The trainer's own loss is `loss_bytes`."""
    return 2.0 * bytes_per_value * cfg.vocab_size


# Rows of hidden states the fused cross-entropy (models/loss.py) projects to logits at a time.
LOSS_CHUNK_ROWS = 512
# The fused loss adds its head-weight gradient a block of vocabulary rows at a time, about this
# many bytes of temporaries per block (models/loss.py).
WEIGHT_GRAD_BLOCK_BYTES = 256 * 2**20
# It keeps the bf16 logit gradients of up to this many bytes of rows (whole chunks) and turns
# them into one weight-gradient update (models/loss.py `loss_row_groups`).
LOSS_GRAD_GROUP_BYTES = 256 * 2**20


def loss_bytes(cfg: ModelConfig, tokens: float, bytes_per_value: int = 2) -> float:
    """Peak memory of the fused, chunked cross-entropy (models/loss.py) on one micro-batch of
    `tokens`, never the full [tokens, vocab] logits. Forward: the fp32 head-weight gradient it
    computes as it goes, the hidden-state gradient and one group's logit gradients, plus the
    larger of one chunk's fp32 logits with their log-softmax, or one block of the weight-gradient
    update. Backward: the fp32 weight gradient and its copy in the weight's dtype."""
    chunk = min(tokens, LOSS_CHUNK_ROWS)
    weight = cfg.vocab_size * cfg.d_model
    hidden_grad = bytes_per_value * tokens * cfg.d_model
    update = min(WEIGHT_GRAD_BLOCK_BYTES, (bytes_per_value + 4.0) * weight)
    chunks = math.ceil(tokens / chunk)
    most_rows = max(chunk, LOSS_GRAD_GROUP_BYTES // (2 * cfg.vocab_size) // chunk * chunk)
    group_rows = min(tokens, math.ceil(chunks / math.ceil(tokens / most_rows)) * chunk)
    group = bytes_per_value * group_rows * cfg.vocab_size
    chunk_peak = max(8.0 * chunk * cfg.vocab_size, update)  # fp32 logits and their log-softmax
    forward = 4.0 * weight + hidden_grad + group + chunk_peak
    backward = (4.0 + bytes_per_value) * weight + hidden_grad
    return max(forward, backward)


@dataclass(frozen=True)
class MatmulShape:
    """One weight matrix a token passes through: `in_features` x `out_features`, `uses` times.

    `split` says how tensor parallelism cuts it: "column" (outputs), "row" (inputs) or
    "none"; `expert` marks routed-expert weights, which expert parallelism also spreads.
    """

    name: str
    in_features: int
    out_features: int
    uses: int  # per token (a routed expert matrix is used top_k times per token, by different experts)
    split: str
    expert: bool = False

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


def layer_matmuls(cfg: ModelConfig, moe: bool) -> list[MatmulShape]:
    """The matrices of one transformer block (dense MLP or MoE), in forward order.

    Their `params * uses` sum to the block's share of the matmul parameters that
    `model_arithmetic` counts, so FLOPs derived from these shapes agree with `flops_per_token`.
    """
    d, hd = cfg.d_model, cfg.resolved_head_dim
    shapes = [
        MatmulShape("qkv", d, hd * (cfg.n_heads + 2 * cfg.n_kv_heads), 1, "column"),
        MatmulShape("attn_out", cfg.n_heads * hd, d, 1, "row"),
    ]
    if moe:
        f = cfg.expert_hidden
        shapes += [
            MatmulShape("router", d, cfg.n_experts, 1, "none"),
            MatmulShape("expert_gate_up", d, 2 * f, cfg.top_k, "column", expert=True),
            MatmulShape("expert_down", f, d, cfg.top_k, "row", expert=True),
        ]
        if cfg.n_shared_experts:
            shapes += [
                MatmulShape("shared_gate_up", d, 2 * f * cfg.n_shared_experts, 1, "column"),
                MatmulShape("shared_down", f * cfg.n_shared_experts, d, 1, "row"),
            ]
    else:
        shapes += [
            MatmulShape("mlp_gate_up", d, 2 * cfg.ffn_hidden, 1, "column"),
            MatmulShape("mlp_down", cfg.ffn_hidden, d, 1, "row"),
        ]
    return shapes


def head_matmul(cfg: ModelConfig) -> MatmulShape:
    """The output projection to the vocabulary (vocabulary-parallel under TP)."""
    return MatmulShape("head", cfg.d_model, cfg.vocab_size, 1, "column")
