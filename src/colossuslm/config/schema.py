"""Typed run configuration: model, data, training and parallel layout.

Every field has a default so a config file only says what differs. `validate()` methods check
one section on its own; `Config.validate()` checks what spans sections.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from colossuslm.errors import ColossusError


def _require(ok: bool, key: str, value: object, why: str) -> None:
    if not ok:
        raise ColossusError(f"config: {key} = {value!r} is invalid: {why}")


def _positive(section: str, obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value > 0, f"{section}.{name}", value, "must be > 0")


@dataclass
class ModelConfig:
    """Decoder-only transformer; `n_experts > 0` turns the feed-forward into a Grok-style MoE."""

    preset: str = ""  # name from colossuslm.models.presets; explicit fields override it
    vocab_size: int = 8192
    d_model: int = 256
    n_layers: int = 6
    n_heads: int = 8
    n_kv_heads: int = 4
    head_dim: int = 0  # 0 means d_model // n_heads
    ffn_hidden: int = 768  # SwiGLU hidden width of the dense MLP
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    # RoPE frequency scaling: "none", or "llama3" (Llama 3.1: long wavelengths divided by
    # rope_scaling_factor, short ones kept, the band between the two smoothly interpolated).
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 0  # the context length the unscaled model was trained at
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (Qwen3)
    attn_logit_softcap: float = 0.0  # Grok-1 caps attention logits with 30*tanh(x/30); 0 = off
    init_std: float = 0.02
    # Mixture of Experts
    n_experts: int = 0
    top_k: int = 2
    moe_ffn_hidden: int = 0  # 0 means ffn_hidden
    n_shared_experts: int = 0  # always-on experts beside the routed ones (DeepSeek style)
    first_dense_layers: int = 0  # leading layers that keep a dense MLP
    # Gates of the chosen top_k experts: their softmax probabilities renormalised to sum to 1
    # (Mixtral; Qwen3-MoE's norm_topk_prob = true), or false: their probabilities under the
    # softmax over all experts, as they are (Qwen3-MoE's norm_topk_prob = false).
    router_renormalize: bool = True
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.001

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def expert_hidden(self) -> int:
        return self.moe_ffn_hidden or self.ffn_hidden

    def validate(self) -> None:
        _positive(
            "model",
            self,
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "ffn_hidden",
            "max_seq_len",
            "rope_theta",
            "norm_eps",
            "init_std",
        )
        if self.head_dim == 0:
            _require(
                self.d_model % self.n_heads == 0,
                "model.n_heads",
                self.n_heads,
                f"must divide model.d_model = {self.d_model} (or set model.head_dim)",
            )
        else:
            _require(self.head_dim > 0, "model.head_dim", self.head_dim, "must be > 0")
        _require(
            self.resolved_head_dim % 2 == 0,
            "model.head_dim",
            self.resolved_head_dim,
            "must be even for rotary embeddings",
        )
        _require(
            self.n_heads % self.n_kv_heads == 0,
            "model.n_kv_heads",
            self.n_kv_heads,
            f"must divide model.n_heads = {self.n_heads} (grouped-query attention)",
        )
        _require(
            self.attn_logit_softcap >= 0,
            "model.attn_logit_softcap",
            self.attn_logit_softcap,
            "must be >= 0 (0 disables it)",
        )
        self._validate_rope_scaling()
        _require(self.n_experts >= 0, "model.n_experts", self.n_experts, "must be >= 0 (0 = dense)")
        if self.is_moe:
            _require(
                1 <= self.top_k <= self.n_experts,
                "model.top_k",
                self.top_k,
                f"must be between 1 and model.n_experts = {self.n_experts}",
            )
            _require(
                self.moe_ffn_hidden >= 0,
                "model.moe_ffn_hidden",
                self.moe_ffn_hidden,
                "must be >= 0 (0 = use model.ffn_hidden)",
            )
            _require(self.n_shared_experts >= 0, "model.n_shared_experts", self.n_shared_experts, "must be >= 0")
            _require(
                0 <= self.first_dense_layers <= self.n_layers,
                "model.first_dense_layers",
                self.first_dense_layers,
                f"must be between 0 and model.n_layers = {self.n_layers}",
            )
            _require(self.aux_loss_coef >= 0, "model.aux_loss_coef", self.aux_loss_coef, "must be >= 0")
            _require(self.z_loss_coef >= 0, "model.z_loss_coef", self.z_loss_coef, "must be >= 0")

    def _validate_rope_scaling(self) -> None:
        _require(
            self.rope_scaling in ROPE_SCALINGS,
            "model.rope_scaling",
            self.rope_scaling,
            f"choose one of: {', '.join(ROPE_SCALINGS)}",
        )
        if self.rope_scaling == "none":
            defaults = {f.name: f.default for f in fields(self)}
            for name in ROPE_SCALING_FIELDS:
                value = getattr(self, name)
                _require(
                    value == defaults[name],
                    f"model.{name}",
                    value,
                    "has no effect with model.rope_scaling = 'none': set rope_scaling = 'llama3', or leave it out",
                )
            return
        _positive("model", self, "rope_scaling_factor", "rope_low_freq_factor", "rope_original_max_seq_len")
        _require(
            self.rope_high_freq_factor > self.rope_low_freq_factor,
            "model.rope_high_freq_factor",
            self.rope_high_freq_factor,
            f"must be > model.rope_low_freq_factor = {self.rope_low_freq_factor}",
        )


# RoPE frequency scalings `models.transformer.rope_frequencies` implements, and their parameters.
ROPE_SCALINGS = ("none", "llama3")
ROPE_SCALING_FIELDS = (
    "rope_scaling_factor",
    "rope_low_freq_factor",
    "rope_high_freq_factor",
    "rope_original_max_seq_len",
)


@dataclass
class DataConfig:
    # "default" = the embedded corpus (Python's own documentation text), prepared once and cached;
    # otherwise a directory written by `colossus data prepare`.
    dataset: str = "default"
    # tokens: a prepared token dataset. chat: conversation JSONL ({"messages": [...]}) for chat
    # fine-tuning, loss on assistant tokens only ("default" = the bundled conversation set).
    format: str = "tokens"
    seq_len: int = 256
    val_fraction: float = 0.01
    jsonl_field: str = "text"
    prepare_workers: int = 0  # 0 = one per CPU core
    # Several prepared datasets mixed by weight, e.g. {"/data/web" = 7, "/data/code" = 3} ("default"
    # = the embedded corpus): each training sequence comes from one of them, in those proportions
    # (data/mixture.py); they must share one tokenizer. Empty = train on data.dataset alone.
    mixture: dict[str, float] = field(default_factory=dict)
    # Attention stays inside each document of a packed training sequence (documents end with the
    # dataset's EOS id), as Llama 3 trained and Megatron's reset_attention_mask does; off, a
    # sequence's tokens also read the documents packed before them.
    document_mask: bool = False

    def validate(self) -> None:
        _positive("data", self, "seq_len")
        _require(self.dataset != "", "data.dataset", self.dataset, "give a prepared dataset directory or 'default'")
        _require(self.format in ("tokens", "chat"), "data.format", self.format, "choose tokens or chat")
        if self.mixture:
            self._validate_mixture()
        _require(
            not self.document_mask or self.format == "tokens",
            "data.document_mask",
            self.document_mask,
            "chat fine-tuning has one conversation per row, nothing packed to mask",
        )
        _require(0 < self.val_fraction < 0.5, "data.val_fraction", self.val_fraction, "must be in (0, 0.5)")
        _require(self.prepare_workers >= 0, "data.prepare_workers", self.prepare_workers, "must be >= 0")

    def _validate_mixture(self) -> None:
        for name, weight in self.mixture.items():
            _require(name.strip() != "", "data.mixture", self.mixture, "dataset names must not be empty")
            _require(
                0 < weight < float("inf"), f"data.mixture[{name!r}]", weight, "a weight must be a finite number > 0"
            )
        _require(
            self.dataset == "default",
            "data.dataset",
            self.dataset,
            "set data.dataset or data.mixture, not both: add this dataset to the mixture with its weight",
        )
        _require(
            self.format == "tokens",
            "data.mixture",
            self.mixture,
            "mixes token datasets; data.format = 'chat' trains on one conversation file",
        )


@dataclass
class TrainConfig:
    name: str = "tiny"
    run_dir: str = "runs"
    steps: int = 450
    micro_batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_fraction: float = 0.2  # WSD: share of steps spent decaying at the end
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    # auto | bf16 (autocast, fp32 master weights) | fp32. auto: bf16 where the device multiplies bf16
    # in hardware (CUDA GPUs, CPUs with AMX or AVX512-BF16), else fp32 (train/precision.py).
    dtype: str = "auto"
    compile: bool = False
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    # lm-evaluation-harness tasks (comma-separated names, e.g. "colossus_mc,hellaswag"; "" = off)
    # run every eval_tasks_every steps and at the end, logged as eval/TASK/METRIC in metrics.jsonl
    # and TensorBoard. Single-process runs only; evaluate other runs' checkpoints with `colossus eval`.
    eval_tasks: str = ""
    eval_tasks_every: int = 500
    eval_tasks_limit: int = 0  # items per task (0 = all of them): bounds the pause in training
    eval_tasks_include_path: str = ""  # a directory of your own task YAML files
    ckpt_every: int = 150
    keep_last: int = 3
    # Write checkpoints in the background: a save stalls training only while the state is copied to
    # CPU memory (costs a RAM copy of each rank's shards); promoted atomically once every rank is done.
    async_checkpoint: bool = False
    resume: bool = True  # continue from the latest checkpoint in the run directory
    init_from: str = ""  # start from these weights (a checkpoint or run directory), e.g. to fine-tune
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops
    # A rank that makes no progress (no step phase begins or ends) for this long is declared hung:
    # the watchdog (train/watchdog.py) names it and its phase, and the job fails so torchrun can
    # restart it. It must exceed the longest phase (a checkpoint save, an eval); 0 disables it.
    hang_timeout_s: float = 300.0
    progress: bool = True
    # torch.profiler traces of steps profile_start .. profile_start + profile_steps - 1 on every rank,
    # written to RUN_DIR/profile/ (train/profiling.py); 0 = off.
    profile_start: int = 0
    profile_steps: int = 2
    # Float8 matmuls for the Linears (torchao; CUDA compute capability >= 8.9, or CPU for numerics):
    # tensorwise = one scale per tensor (fastest), rowwise = one scale per row (more accurate).
    float8: bool = False
    float8_recipe: str = "tensorwise"
    # Replica-group fault tolerance (torchft; train/fault_tolerance.py): the data-parallel replicas
    # are ft_num_groups separate torchrun jobs, each an FSDP group over parallel.dp_shard, that agree
    # on every step through a lighthouse; when one dies the others go on with their own data and the
    # restarted group copies the weights and optimizer state from a live peer (`colossus launch ft`).
    ft_enabled: bool = False
    ft_replica_group: int = 0  # this job's group, 0 .. ft_num_groups - 1 (its share of the data)
    ft_num_groups: int = 1  # replica groups of the whole run (the data is split over all of them)
    ft_min_replicas: int = 1  # a step commits only with at least this many groups in the quorum
    ft_lighthouse: str = ""  # e.g. http://host:29510; "" = the TORCHFT_LIGHTHOUSE environment variable
    ft_timeout_s: float = 30.0  # quorum, cross-group all-reduce and checkpoint-transfer timeout

    def validate(self) -> None:
        _positive(
            "train",
            self,
            "steps",
            "micro_batch_size",
            "grad_accum",
            "lr",
            "log_every",
            "eval_every",
            "eval_batches",
            "eval_tasks_every",
            "ckpt_every",
            "keep_last",
            "max_bad_steps",
        )
        _require(
            self.schedule in ("cosine", "wsd", "constant"),
            "train.schedule",
            self.schedule,
            "choose one of: cosine, wsd, constant",
        )
        _require(self.dtype in ("auto", "bf16", "fp32"), "train.dtype", self.dtype, "choose auto, bf16 or fp32")
        _require(self.device in ("auto", "cpu", "cuda"), "train.device", self.device, "choose auto, cpu or cuda")
        _require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        _require(0 < self.decay_fraction <= 1, "train.decay_fraction", self.decay_fraction, "must be in (0, 1]")
        _require(0 <= self.warmup_steps, "train.warmup_steps", self.warmup_steps, "must be >= 0")
        _require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        _require(0 <= self.beta1 < 1, "train.beta1", self.beta1, "must be in [0, 1)")
        _require(0 <= self.beta2 < 1, "train.beta2", self.beta2, "must be in [0, 1)")
        _require(self.grad_clip >= 0, "train.grad_clip", self.grad_clip, "must be >= 0 (0 = off)")
        _require(
            0 <= self.hang_timeout_s < float("inf"),
            "train.hang_timeout_s",
            self.hang_timeout_s,
            "must be a finite number of seconds >= 0 (0 disables the hang watchdog)",
        )
        _require(
            self.float8_recipe in ("tensorwise", "rowwise"),
            "train.float8_recipe",
            self.float8_recipe,
            "choose tensorwise or rowwise",
        )
        _require(
            self.name != "" and "/" not in self.name, "train.name", self.name, "must be a non-empty name without '/'"
        )
        _require(
            all(name.strip() for name in self.eval_tasks.split(",")) or self.eval_tasks == "",
            "train.eval_tasks",
            self.eval_tasks,
            'must be comma-separated task names without empty entries, e.g. "colossus_mc,colossus_gen"',
        )
        self._validate_fault_tolerance()
        _require(self.profile_start >= 0, "train.profile_start", self.profile_start, "must be >= 0 (0 = off)")
        _require(self.profile_steps >= 1, "train.profile_steps", self.profile_steps, "must be >= 1")
        _require(
            self.profile_start <= self.steps,
            "train.profile_start",
            self.profile_start,
            f"is after the run's last step (train.steps = {self.steps})",
        )
        _require(self.eval_tasks_limit >= 0, "train.eval_tasks_limit", self.eval_tasks_limit, "must be >= 0 (0 = all)")
        _require(
            self.eval_tasks != "" or self.eval_tasks_include_path == "",
            "train.eval_tasks_include_path",
            self.eval_tasks_include_path,
            "has no effect without train.eval_tasks: name the tasks to run",
        )

    def _validate_fault_tolerance(self) -> None:
        if not self.ft_enabled:
            defaults = TrainConfig()
            for name in ("ft_replica_group", "ft_num_groups", "ft_min_replicas", "ft_lighthouse", "ft_timeout_s"):
                _require(
                    getattr(self, name) == getattr(defaults, name),
                    f"train.{name}",
                    getattr(self, name),
                    "has no effect without train.ft_enabled = true: enable replica-group fault tolerance "
                    "(`colossus launch ft` does), or leave it at its default",
                )
            return
        _require(self.ft_num_groups >= 1, "train.ft_num_groups", self.ft_num_groups, "must be >= 1")
        _require(
            0 <= self.ft_replica_group < self.ft_num_groups,
            "train.ft_replica_group",
            self.ft_replica_group,
            f"must be in [0, train.ft_num_groups - 1 = {self.ft_num_groups - 1}]",
        )
        _require(
            1 <= self.ft_min_replicas <= self.ft_num_groups,
            "train.ft_min_replicas",
            self.ft_min_replicas,
            f"must be in [1, train.ft_num_groups = {self.ft_num_groups}]",
        )
        _require(
            self.ft_lighthouse == "" or self.ft_lighthouse.startswith(("http://", "https://")),
            "train.ft_lighthouse",
            self.ft_lighthouse,
            "must be the lighthouse's URL, e.g. http://host:29510 (or empty for $TORCHFT_LIGHTHOUSE)",
        )
        _require(
            0 < self.ft_timeout_s < float("inf"), "train.ft_timeout_s", self.ft_timeout_s, "must be a finite time > 0"
        )

    @property
    def eval_task_names(self) -> list[str]:
        return [name.strip() for name in self.eval_tasks.split(",") if name.strip()]


@dataclass
class ParallelConfig:
    """Device-mesh sizes. Their product must equal the world size (dp_shard = -1 fills the rest)."""

    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    # With tp > 1: norms and the residual stream are split along the sequence across the TP group
    # (Megatron sequence parallelism), so each TP rank holds 1/tp of those activations.
    sequence_parallel: bool = True
    ep: int = 1
    # Context parallelism: each sequence split over cp ranks (2 * cp chunks, rank i holding chunks
    # i and 2 * cp - 1 - i so causal work is balanced), attention as a ring over them.
    cp: int = 1
    # Pipeline stages: consecutive blocks per stage, train.grad_accum micro-batches in flight.
    pp: int = 1
    pp_schedule: str = "1f1b"  # one of PP_SCHEDULES below (1f1b bounds activation memory)
    # Stages per rank (the planner's PPnxV): 1 for 1f1b / gpipe, >= 2 interleaved, 2 for zbv / dualpipev.
    pp_virtual_stages: int = 1
    # Recompute activations in backward instead of keeping them: "full" keeps only each block's
    # input, "selective" keeps matmul/attention outputs and recomputes the element-wise ops.
    activation_checkpoint: str = "none"  # none | full | selective
    activation_checkpoint_every: int = 1  # checkpoint every N-th block (1 = all of them)

    def validate(self) -> None:
        _positive("parallel", self, "dp_replicate", "tp", "ep", "pp", "cp")
        _require(
            self.dp_shard == -1 or self.dp_shard > 0,
            "parallel.dp_shard",
            self.dp_shard,
            "must be > 0, or -1 to use every remaining rank",
        )
        _require(
            self.pp_schedule in PP_SCHEDULES,
            "parallel.pp_schedule",
            self.pp_schedule,
            f"choose one of: {', '.join(PP_SCHEDULES)}",
        )
        self._validate_virtual_stages()
        _require(
            self.activation_checkpoint in ("none", "full", "selective"),
            "parallel.activation_checkpoint",
            self.activation_checkpoint,
            "choose one of: none, full, selective",
        )
        _positive("parallel", self, "activation_checkpoint_every")
        _require(
            self.activation_checkpoint_every == 1 or self.activation_checkpoint != "none",
            "parallel.activation_checkpoint_every",
            self.activation_checkpoint_every,
            "has no effect with parallel.activation_checkpoint = 'none': set full or selective, or leave it at 1",
        )

    def _validate_virtual_stages(self) -> None:
        v, schedule = self.pp_virtual_stages, self.pp_schedule
        _positive("parallel", self, "pp_virtual_stages")
        _require(
            self.pp > 1 or v == 1,
            "parallel.pp_virtual_stages",
            v,
            "has no effect without parallel.pp > 1: set parallel.pp, or leave it at 1",
        )
        ok, why = virtual_stages_rule(schedule, v)
        _require(ok, "parallel.pp_virtual_stages", v, why)


# Pipeline schedules (torch.distributed.pipelining); zero-bubble ones split backward into input and
# weight gradients; V-shaped ones place stages r and 2 pp - 1 - r on rank r.
PP_SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b", "interleaved_zero_bubble", "zbv", "dualpipev")
PP_ZERO_BUBBLE_SCHEDULES = ("interleaved_zero_bubble", "zbv", "dualpipev")
PP_V_SHAPED_SCHEDULES = ("zbv", "dualpipev")


def virtual_stages_rule(schedule: str, virtual_stages: int) -> tuple[bool, str]:
    """Whether a pipeline schedule runs with this many stages per rank, and the rule it follows
    (the planner's search applies the same rule to its PPnxV layouts)."""
    if schedule in ("1f1b", "gpipe"):
        return virtual_stages == 1, f"must be 1 with parallel.pp_schedule = {schedule} (one stage per rank)"
    if schedule in PP_V_SHAPED_SCHEDULES:
        return virtual_stages == 2, f"must be 2 with parallel.pp_schedule = {schedule} (two stages per rank, in a V)"
    return virtual_stages >= 2, f"must be >= 2 with parallel.pp_schedule = {schedule} (or use 1f1b)"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def validate(self) -> Config:
        self.model.validate()
        self.data.validate()
        self.train.validate()
        self.parallel.validate()
        _require(
            self.data.format == "tokens" or self.train.init_from != "",
            "data.format",
            self.data.format,
            "chat fine-tuning starts from a trained model: set train.init_from to its checkpoint or run directory",
        )
        _require(
            self.data.seq_len <= self.model.max_seq_len,
            "data.seq_len",
            self.data.seq_len,
            f"must be <= model.max_seq_len = {self.model.max_seq_len}",
        )
        if self.parallel.tp > 1 and self.parallel.sequence_parallel:
            _require(
                self.data.seq_len % self.parallel.tp == 0,
                "data.seq_len",
                self.data.seq_len,
                f"must be a multiple of parallel.tp = {self.parallel.tp} with sequence parallelism "
                f"(or set parallel.sequence_parallel = false)",
            )
        if self.train.ft_enabled:
            self._validate_fault_tolerance()
        if self.parallel.cp > 1:
            self._validate_context_parallel()
        if self.parallel.pp > 1:
            self._validate_pipeline()
        if self.parallel.ep > 1:
            _require(
                self.model.is_moe and self.model.n_experts % self.parallel.ep == 0,
                "parallel.ep",
                self.parallel.ep,
                f"must divide model.n_experts = {self.model.n_experts} (and the model must be MoE)",
            )
        return self

    def _validate_fault_tolerance(self) -> None:
        _require(
            self.parallel.dp_replicate == 1,
            "parallel.dp_replicate",
            self.parallel.dp_replicate,
            "must be 1 with train.ft_enabled: the replicas are the train.ft_num_groups replica groups, each "
            "its own torchrun job (set train.ft_num_groups instead)",
        )
        _require(
            self.parallel.pp == 1,
            "parallel.pp",
            self.parallel.pp,
            "must be 1 with train.ft_enabled: replica-group fault tolerance does not drive pipeline schedules yet",
        )
        _require(
            not self.train.async_checkpoint,
            "train.async_checkpoint",
            True,
            "must be false with train.ft_enabled: a background save could still be reading the weights when a "
            "peer's state is copied into them",
        )
        _require(
            self.train.eval_tasks == "",
            "train.eval_tasks",
            self.train.eval_tasks,
            "must be empty with train.ft_enabled (task evaluation runs in single-process training only)",
        )

    def _validate_context_parallel(self) -> None:
        cp, tp = self.parallel.cp, self.parallel.tp
        # 2 * cp chunks per sequence; with sequence parallelism TP splits each rank's share again.
        divisor = 2 * cp * (tp if tp > 1 and self.parallel.sequence_parallel else 1)
        _require(
            self.data.seq_len % divisor == 0,
            "data.seq_len",
            self.data.seq_len,
            f"must be a multiple of {divisor} with parallel.cp = {cp}"
            + (f" and parallel.tp = {tp} (sequence parallel)" if divisor != 2 * cp else "")
            + " (each sequence is cut into 2 x cp equal chunks); change data.seq_len or parallel.cp",
        )

    def _validate_pipeline(self) -> None:
        pp = self.parallel.pp
        _require(
            self.model.n_layers >= pp * self.parallel.pp_virtual_stages,
            "parallel.pp",
            pp,
            f"times parallel.pp_virtual_stages = {self.parallel.pp_virtual_stages} must be <= model.n_layers = "
            f"{self.model.n_layers} (each stage needs a block)",
        )
        self._validate_pipeline_schedule()
        _require(
            self.train.grad_accum >= pp,
            "train.grad_accum",
            self.train.grad_accum,
            f"must be >= parallel.pp = {pp}: the pipeline runs train.grad_accum micro-batches per step, "
            f"and fewer than one per stage leaves stages idle",
        )
        _require(
            not self.model.tie_embeddings,
            "model.tie_embeddings",
            True,
            "must be false with parallel.pp > 1 (the embedding and the head live on different stages)",
        )
        unsupported = [(self.data.format == "chat", "data.format = chat")]
        for present, what in unsupported:
            _require(not present, "parallel.pp", pp, f"pipeline parallelism does not support {what} yet")

    def _validate_pipeline_schedule(self) -> None:
        """Micro-batch counts the schedules of torch.distributed.pipelining accept, and what the
        zero-bubble ones (split backward) cannot combine with in torch 2.13."""
        pp, schedule, accum = self.parallel.pp, self.parallel.pp_schedule, self.train.grad_accum
        if schedule in ("interleaved_1f1b", "interleaved_zero_bubble"):
            rounds = max(1, accum // pp)
            _require(
                accum % rounds == 0,
                "train.grad_accum",
                accum,
                f"must be a multiple of its rounds of parallel.pp = {pp} micro-batches ({rounds}) with "
                f"parallel.pp_schedule = {schedule}: use a multiple of {pp}",
            )
        if schedule == "dualpipev":
            _require(
                accum >= 2 * pp,
                "train.grad_accum",
                accum,
                f"must be >= 2 * parallel.pp = {2 * pp} with parallel.pp_schedule = dualpipev (one micro-batch per stage)",
            )
        if schedule in PP_ZERO_BUBBLE_SCHEDULES:
            _require(
                not self.train.compile,
                "train.compile",
                True,
                f"must be false with parallel.pp_schedule = {schedule}: torch 2.13 cannot split the backward of "
                f"compiled stages into input and weight gradients (use interleaved_1f1b to compile)",
            )
            _require(
                self.parallel.activation_checkpoint != "selective",
                "parallel.activation_checkpoint",
                "selective",
                f"cannot combine with parallel.pp_schedule = {schedule}: selective recomputation allows one "
                f"backward per region, and the split backward takes two (use full, or interleaved_1f1b)",
            )
