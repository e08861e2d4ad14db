"""The training loop: read top to bottom.

setup (device, data, model, optimizer) -> resume if a checkpoint exists -> loop of
(train_step, log, evaluate, checkpoint) -> summary. Ctrl-C or SIGTERM saves a checkpoint first.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from colossuslm.config import Config, config_to_dict, load_config, save_config
from colossuslm.config.schema import ModelConfig
from colossuslm.errors import ColossusError
from colossuslm.models.arithmetic import model_arithmetic
from colossuslm.models.transformer import Transformer
from colossuslm.parallel.build import build_model
from colossuslm.parallel.materialize import materialize_model
from colossuslm.parallel.mesh import ParallelDims, build_mesh, init_distributed, set_collective_timeout
from colossuslm.parallel.runner import PlainRunner, StepRunner
from colossuslm.plan.units import si
from colossuslm.train import checkpoint as ckpt
from colossuslm.train.async_checkpoint import AsyncCheckpointer
from colossuslm.train.fault_tolerance import (
    ReplicaGroup,
    ReplicaGroupRunner,
    group_run_dir_name,
    load_local_model_state,
    local_state,
    optimizer_state_from_local,
)
from colossuslm.train.metrics import MetricsLogger, NullMetrics, ProgressDisplay
from colossuslm.train.optim import build_optimizer, build_scheduler
from colossuslm.train.peak import device_name, device_profile, peak_flops
from colossuslm.train.precision import resolve_train_dtype
from colossuslm.train.profiling import StepProfiler, written_message
from colossuslm.train.report import RunReport, StepResult, straggler_report
from colossuslm.train.watchdog import HangWatchdog, collective_timeout_s, setup_timeout_s


def _trained_model_config(model_dir: Path) -> ModelConfig:
    from colossuslm.models.hf_import import is_hf_model_dir, model_config_from_hf, read_hf_config

    if is_hf_model_dir(model_dir):
        return model_config_from_hf(read_hf_config(model_dir))
    return load_config([model_dir / "config.toml"]).model


class Trainer:
    def __init__(self, cfg: Config, *, log: Callable[[str], None] | None = None):
        self.cfg = cfg
        tc = cfg.train
        # A replica group of a fault-tolerant run keeps its own directory (train/fault_tolerance.py).
        self.run_dir = Path(tc.run_dir) / tc.name
        if tc.ft_enabled:
            self.run_dir = self.run_dir / group_run_dir_name(tc.ft_replica_group)
        # Progress marks from the first moment: hang detection, and the restart milestones that
        # bench/chaos.py reads from the heartbeat files.
        self.watchdog = HangWatchdog(self.run_dir, tc.hang_timeout_s)
        self.watchdog.beat("rendezvous")
        self.env = init_distributed(tc.device, timeout_s=setup_timeout_s(tc.hang_timeout_s))
        self.device = self.env.device
        self.profiler = StepProfiler(
            self.run_dir / "profile", self.env.rank, tc.profile_start, tc.profile_steps, self.device
        )
        self.dims = ParallelDims.resolve(cfg.parallel, self.env.world_size)
        self.meshes = build_mesh(self.dims, self.device.type) if self.env.world_size > 1 else None
        set_collective_timeout(self.meshes, setup_timeout_s(tc.hang_timeout_s))  # the mesh's groups too
        self.watchdog.beat("setup")
        self.world_size = self.env.world_size
        # Ranks that read different data; TP and CP ranks of one replica read the same batches.
        self.dp_rank = self.meshes.dp.get_local_rank() if self.meshes else 0
        self.dp_size = self.dims.dp_size
        # Losses are averaged over the data-parallel ranks and the cp ranks (each holds a weighted
        # share of every sequence's loss: parallel/context.py).
        self.dp_group = self.meshes.dp_cp.get_group() if self.meshes and self.dims.dp_cp_size > 1 else None
        self.is_main = self.env.is_main
        self.ckpt_root = self.run_dir / "checkpoints"
        self._log = (log or print) if self.is_main else (lambda _message: None)
        if tc.dtype == "auto":  # resolved once, here: the model, autocast, MFU and config.toml see the choice
            tc.dtype = resolve_train_dtype(tc.dtype, self.device)
            if tc.dtype == "fp32":
                self._log(f"train.dtype auto: fp32, since {self.device.type} has no bf16 matrix instructions")
        self._task_manager = self._check_eval_tasks() if tc.eval_tasks else None  # before the slow setup
        torch.manual_seed(tc.seed)

        # A checkpoint, a run directory or a Hugging Face model directory (read in place).
        self.init_checkpoint = ckpt.resolve_model_dir(tc.init_from) if tc.init_from else None
        if self.init_checkpoint is not None:
            # Fine-tuning keeps the architecture the weights were trained with.
            trained = _trained_model_config(self.init_checkpoint)
            if trained != cfg.model:
                self._log(
                    f"train.init_from: using the architecture {self.init_checkpoint} was trained with "
                    f"(the [model] settings of this config are ignored)"
                )
            cfg.model = trained
            cfg.validate()
        self.train_loader, self.val_loader, self.tokenizer_json = self._build_loaders()

        self.model, fsdp_casts = self._build_model()
        self.step_model = self.model
        if tc.compile and self.dims.pp > 1:
            # The pipeline schedule calls the stage's model itself: compile its blocks in place.
            for block in self.model.layers.values():
                block.compile()
        elif tc.compile:
            self.step_model = torch.compile(self.model)
        self.optimizer = build_optimizer(self.model, tc)
        self.scheduler = build_scheduler(self.optimizer, tc)
        bf16 = tc.dtype == "bf16"
        self.autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16 and not fsdp_casts)
        self.runner = self._build_runner()
        # With replica-group fault tolerance a torchft Manager runs every step's quorum and the
        # cross-group gradient average; the step function is chosen once, here.
        self.replicas: ReplicaGroup | None = None
        self._step_fn = self._plain_train_step
        if tc.ft_enabled:
            self.replicas = ReplicaGroup(tc, self.device, self._replica_state, self._load_replica_state)
            self.runner = ReplicaGroupRunner(self.runner, self.replicas)
            self._step_fn = self._replica_train_step
        if not tc.compile:  # dynamo would trace the hooks' side effects into the compiled graph
            self.watchdog.watch_model(self.model)

        self.arithmetic = model_arithmetic(cfg.model, cfg.data.seq_len)
        self.tokens_per_step = tc.micro_batch_size * tc.grad_accum * cfg.data.seq_len * self.dp_size  # per group
        # CPU: measured once per machine in the run's dtype, with the peak
        self.device_profile = device_profile(self.device, tc.dtype)
        self.peak_flops = self.device_profile["peak_flops"] if self.device_profile else peak_flops(self.device)
        self.report = RunReport(
            cfg,
            self.dims,
            self.arithmetic,
            self.device,
            peak_flops=self.peak_flops,
            device_profile=self.device_profile,
            tokens_per_step=self.tokens_per_step,
            run_dir=self.run_dir,
            log=self._log,
        )
        self.step = 0
        self.tokens_seen = 0
        self.skipped_steps = 0
        self.bad_steps_in_row = 0
        self._stop_signal: int | None = None
        self.async_checkpointer = AsyncCheckpointer() if tc.async_checkpoint else None
        self._task_lm = None  # the lm-eval wrapper of self.model, built at the first task evaluation

    def _build_model(self) -> tuple[Transformer, bool]:
        """Meta device -> this rank's pipeline stage -> TP / EP / FSDP2 (parallel/build.py) ->
        allocate and initialize only this rank's shards (parallel/materialize.py), so nothing ever
        holds the whole model. Initial weights are layout-independent: any layout starts from the
        single-process weights. Returns (model, whether FSDP2 casts to bf16 itself)."""
        model, fsdp_casts = build_model(self.cfg, self.dims, self.meshes)
        materialize_model(model, self.device, seed=self.cfg.train.seed)
        if self.init_checkpoint is not None:
            ckpt.load_model_weights(self.init_checkpoint, model)  # each rank reads only its shards
        return model, fsdp_casts

    def _build_runner(self) -> StepRunner:
        tc = self.cfg.train
        # data.document_mask: documents end at the data's EOS id and attend only within themselves
        eos_id = self.train_loader.eos_id if self.cfg.data.document_mask else None
        context = None
        if self.dims.cp > 1:  # each cp rank takes its chunks of the batch and runs them at their positions
            from colossuslm.parallel.context import ContextParallelStep, ContextShard

            context = ContextShard(self.meshes.cp)
        if self.dims.pp > 1:
            from colossuslm.parallel.pipeline import PipelineRunner

            return PipelineRunner(
                self.model,
                self.meshes.pp,
                tc.grad_accum,
                self.cfg.parallel.pp_schedule,
                self.device,
                self.autocast,
                grad_clip=tc.grad_clip,
                dp_group=self.dp_group,
                context=context,
                eos_id=eos_id,
            )
        step_model = self.step_model if context is None else ContextParallelStep(self.step_model, context)
        return PlainRunner(
            step_model,
            self.model,
            grad_accum=tc.grad_accum,
            grad_clip=tc.grad_clip,
            autocast=self.autocast,
            device=self.device,
            dp_group=self.dp_group,
            eos_id=eos_id,
        )

    def _build_loaders(self):
        cfg, tc = self.cfg, self.cfg.train
        # Replica group g of a fault-tolerant run reads the g-th share of every global batch.
        groups, group = (tc.ft_num_groups, tc.ft_replica_group) if tc.ft_enabled else (1, 0)
        loader_args = dict(
            seq_len=cfg.data.seq_len,
            batch_size=tc.micro_batch_size,
            seed=tc.seed,
            rank=group * self.dp_size + self.dp_rank,
            world_size=groups * self.dp_size,
        )
        if cfg.data.format == "chat":
            from colossuslm.data.chat_loader import ChatLoader
            from colossuslm.data.chat_template import load_model_tokenizer

            tokenizer = load_model_tokenizer(self.init_checkpoint)  # carries the model's own chat template
            tokenizer_json = self.init_checkpoint / "tokenizer.json"
            path = None if cfg.data.dataset == "default" else cfg.data.dataset
            return (
                ChatLoader(path, tokenizer, split="train", **loader_args),
                ChatLoader(path, tokenizer, split="val", **loader_args),
                tokenizer_json,
            )

        if cfg.data.mixture:
            from colossuslm.data.corpus import resolve_mixture
            from colossuslm.data.mixture import MixtureLoader

            sources = resolve_mixture(cfg.data, cfg.model.vocab_size)  # each file-locked across ranks
            return (
                MixtureLoader(sources, split="train", **loader_args),
                MixtureLoader(sources, split="val", **loader_args),
                sources[0][0] / "tokenizer.json",  # every dataset of a mixture has it (resolve_mixture)
            )

        from colossuslm.data.corpus import resolve_dataset  # data pulls in tokenizers; import when used
        from colossuslm.data.loader import TokenLoader

        dataset_dir = resolve_dataset(cfg.data, cfg.model.vocab_size)  # file-locked across ranks
        return (
            TokenLoader(dataset_dir, split="train", **loader_args),
            TokenLoader(dataset_dir, split="val", **loader_args),
            dataset_dir / "tokenizer.json",
        )

    # ---------------------------------------------------------------- one optimizer step
    def train_step(self) -> StepResult:
        return self._step_fn()

    def _plain_train_step(self) -> StepResult:
        tc = self.cfg.train
        start = time.perf_counter()
        self.watchdog.beat("train step", self.step + 1)
        batches = (self._next_train_batch() for _ in range(tc.grad_accum))
        loss_value, norm_value = self.runner.train_step(batches)
        self.watchdog.mark("optimizer")
        return self._apply_step(start, loss_value, norm_value)

    def _replica_train_step(self) -> StepResult:
        """One step of a replica group: quorum (healing from a peer if behind), forward and backward,
        the average over the groups, and the optimizer only if every group's step succeeded; a
        failed attempt is redone with the same data by the next quorum."""
        tc = self.cfg.train
        replicas = self.replicas
        replicas.retries = 0
        while True:
            start = time.perf_counter()
            self.watchdog.beat("quorum", self.step + 1)
            replicas.start_quorum()  # may load a peer's state: self.step and the loader move with it
            replicas.quorum_s = time.perf_counter() - start  # a lapsed peer's wait or a heal lands here
            data_position = self.train_loader.state_dict()
            self.watchdog.beat("train step", self.step + 1)
            batches = (self._next_train_batch() for _ in range(tc.grad_accum))
            loss_value, norm_value = self.runner.train_step(batches)
            self.watchdog.mark("commit")
            if replicas.should_commit():
                break
            replicas.retries += 1
            self._log(
                f"step {self.step + 1} failed in replica group {replicas.group} (quorum {replicas.quorum_id}, "
                f"{replicas.manager.errored() or 'a peer failed'}); redoing it with the next quorum"
            )
            self.optimizer.zero_grad(set_to_none=True)
            self.train_loader.load_state_dict(data_position)
        self.watchdog.mark("optimizer")
        result = self._apply_step(start, loss_value, norm_value, groups=replicas.participants)
        if self.step != replicas.manager.current_step():
            raise ColossusError(
                f"replica group {replicas.group} is at step {self.step} but its torchft manager at "
                f"{replicas.manager.current_step()}: the step counts diverged"
            )
        return result

    def _apply_step(self, start: float, loss_value: float, norm_value: float, groups: int = 1) -> StepResult:
        tc = self.cfg.train
        lr = self.optimizer.param_groups[0]["lr"]
        skipped = not (math.isfinite(loss_value) and math.isfinite(norm_value))
        if skipped:  # keep the weights: one bad batch must not poison the run
            self.skipped_steps += 1
            self.bad_steps_in_row += 1
        else:
            self.optimizer.step()
            self.bad_steps_in_row = 0
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.tokens_seen += self.tokens_per_step * groups
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        if not self.watchdog.armed:  # warm-up is over: hangs count from now, collectives wait less
            set_collective_timeout(self.meshes, collective_timeout_s(tc.hang_timeout_s))
            self.watchdog.arm()
        return StepResult(loss_value, norm_value, lr, time.perf_counter() - start, skipped)

    def _replica_state(self) -> dict[str, Any]:
        """What a healing peer copies from this group (this rank's shards; called by torchft)."""
        return {
            "model": local_state(self.model.state_dict()),
            "optimizer": local_state(self.optimizer.state_dict()),
            "trainer": self.trainer_state(),
        }

    def _load_replica_state(self, state: dict[str, Any]) -> None:
        """Take a live peer's state in place of this group's (called by torchft before the step)."""
        trainer = state["trainer"]
        if not _same_model_config(trainer["model_config"], self.cfg.model):
            raise ColossusError("a peer replica group trains a different model configuration than this group")
        load_local_model_state(self.model, state["model"])
        self.optimizer.load_state_dict(optimizer_state_from_local(self.optimizer, state["optimizer"]))
        self.scheduler.load_state_dict(trainer["scheduler"])
        self.train_loader.load_state_dict(trainer["train_loader"])
        self._log(
            f"replica group {self.cfg.train.ft_replica_group}: healed from a peer, step {self.step} -> "
            f"{trainer['step']}"
        )
        self.step, self.tokens_seen = trainer["step"], trainer["tokens"]
        self.skipped_steps = trainer["skipped_steps"]

    def _next_train_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.watchdog.mark("data")
        return self.train_loader.next_batch()

    def evaluate(self) -> tuple[float, dict[str, float]]:
        """(validation loss, {"val_loss/DATASET": loss} of a data.mixture's datasets, else {})."""
        self.watchdog.beat("eval")
        parts = self.val_loader.validation_parts(self.cfg.train.eval_batches)
        losses = {}
        for label, _, loader, batches in parts:
            loader.reset()
            losses[label] = self.runner.eval_loss(loader, batches)
        total = sum(weight * losses[label] for label, weight, _, _ in parts)
        return total, ({f"val_loss/{label}": loss for label, loss in losses.items()} if len(parts) > 1 else {})

    def _check_eval_tasks(self):
        """Find train.eval_tasks before step 1, so a misspelt task fails now, not hours in."""
        if self.world_size > 1:
            raise ColossusError(
                "train.eval_tasks runs in single-process training only (the harness drives the whole model "
                "on one rank); leave it empty and run `colossus eval runs/NAME --tasks ...` on checkpoints"
            )
        from colossuslm.eval.harness import task_manager

        tc = self.cfg.train
        return task_manager(tc.eval_task_names, [tc.eval_tasks_include_path] if tc.eval_tasks_include_path else [])

    def evaluate_tasks(self) -> dict[str, float]:
        """train.eval_tasks on the current weights: {"eval/TASK/METRIC": value}."""
        from colossuslm.eval.harness import ColossusLM, quiet_lm_eval_logs, run_tasks, task_metrics

        tc = self.cfg.train
        self.watchdog.beat("eval tasks")
        if self._task_lm is None:
            from colossuslm.data.tokenizer import load_tokenizer, read_special_tokens

            tokenizer = load_tokenizer(self.tokenizer_json)
            # The model's own EOS (an imported Llama's is not <|endoftext|>), as serving reads it.
            special = read_special_tokens(self.tokenizer_json.parent, tokenizer)
            self._task_lm = ColossusLM.from_model(
                self.model,
                tokenizer,
                special.eos_id,
                batch_size=tc.micro_batch_size,
                autocast=self.autocast,
                on_batch=lambda: self.watchdog.mark("eval tasks batch"),  # a long eval is not a hang
            )
        with quiet_lm_eval_logs():
            results = run_tasks(
                self._task_lm,
                tc.eval_task_names,
                limit=tc.eval_tasks_limit or None,
                manager=self._task_manager,
                bootstrap_iters=0,  # no standard errors: a training curve needs the figures, fast
                reseed=False,  # lm-eval would otherwise reseed the global generators mid-run
            )
        return {
            f"eval/{task}/{metric}": value
            for task, metrics in task_metrics(results).items()
            for metric, value in metrics.items()
        }

    # ---------------------------------------------------------------- checkpoints
    def trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "tokens": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "scheduler": self.scheduler.state_dict(),
            "train_loader": self.train_loader.state_dict(),
            "model_config": asdict(self.cfg.model),
        }

    def save_checkpoint(self) -> Path:
        """Collective. With train.async_checkpoint it returns once the state is copied to CPU memory and
        the checkpoint appears later; `wait_for_checkpoint` blocks until it has."""
        import tomli_w

        self.watchdog.beat("checkpoint save")
        save = self.async_checkpointer.save if self.async_checkpointer else ckpt.save_checkpoint
        return save(
            self.ckpt_root,
            self.step,
            model=self.model,
            optimizer=self.optimizer,
            trainer_state=self.trainer_state(),
            config_toml=tomli_w.dumps(config_to_dict(self.cfg)),
            tokenizer_json=self.tokenizer_json,
            keep_last=self.cfg.train.keep_last,
            # a rank holds one pipeline stage: the full weights are assembled from every rank's shards
            consolidate_from_shards=self.dims.pp > 1,
        )

    def wait_for_checkpoint(self) -> None:
        """Collective. Returns once a background save in flight (if any) is promoted on every rank."""
        if self.async_checkpointer is not None:
            self.watchdog.beat("checkpoint wait")
            self.async_checkpointer.wait()

    def _agree_on_checkpoint(self) -> Path | None:
        """Rank 0 picks (and verifies) the checkpoint; every rank then loads the same one."""
        found = ckpt.latest_checkpoint(self.ckpt_root, log=self._log) if self.is_main else None
        if self.world_size > 1:
            box = [str(found) if found else None]
            dist.broadcast_object_list(box, src=0)
            found = Path(box[0]) if box[0] else None
        return found

    def resume(self) -> Path | None:
        found = self._agree_on_checkpoint()
        if found is None:
            return None
        state = json.loads((found / "trainer_state.json").read_text())
        if not _same_model_config(state["model_config"], self.cfg.model):
            raise ColossusError(
                f"{found} was written for a different model configuration than this run's; "
                f"pick a new run name (--set train.name=...) or set train.resume=false with a new name"
            )
        state, rng = ckpt.load_checkpoint(found, self.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.train_loader.load_state_dict(state["train_loader"])
        if rng is not None:
            ckpt.set_rng_state(rng)
        self.step, self.tokens_seen = state["step"], state["tokens"]
        self.skipped_steps = state["skipped_steps"]
        return found

    # ---------------------------------------------------------------- the run
    def _request_stop(self, signum: int, _frame: Any) -> None:
        self._stop_signal = signum
        signal.signal(signum, signal.SIG_DFL)  # a second Ctrl-C stops at once

    def _stop_agreed(self) -> bool:
        """True once any rank got a stop signal, on every rank at the same step."""
        stop = self._stop_signal is not None
        if self.world_size > 1:
            self.watchdog.beat("agree on stop")
            flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            stop = bool(flag.item())
            if stop and self._stop_signal is None:
                self._stop_signal = signal.SIGTERM
        return stop

    def close(self, clean: bool = True) -> None:
        """Leave the process group. After a failure (`clean` False) no barrier: the peers may be
        waiting in another collective, and the failing rank must exit so torchrun sees it."""
        if self.replicas is not None:
            self.replicas.shutdown()
        if self.world_size > 1 and dist.is_initialized():
            # Rank 0 still writes the summary after the last collective; tearing the group down
            # while a peer is busy has aborted gloo at exit, so every rank arrives first.
            if clean:
                dist.barrier()
            dist.destroy_process_group()

    def fit(self) -> dict[str, Any]:
        cfg, tc = self.cfg, self.cfg.train
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.watchdog.beat("resume")
        resumed_from = self.resume() if tc.resume else None
        self.watchdog.beat("open metrics")
        if not tc.resume and ckpt.list_checkpoints(self.ckpt_root):
            raise ColossusError(
                f"{self.run_dir} already holds checkpoints and train.resume = false; "
                f"choose another train.name so nothing is overwritten"
            )
        if resumed_from is not None:
            self._log(f"resumed from {resumed_from} (step {self.step})")
        if self.replicas is not None:  # the step this group offers the quorum (a peer further on heals it)
            self.replicas.set_step(self.step)
        if self.step >= tc.steps:
            self._log(f"run {tc.name!r} is already complete at step {self.step}; raise train.steps to go on")
            return self._read_summary()
        if self.is_main:
            save_config(cfg, self.run_dir / "config.toml")
        metrics = MetricsLogger(self.run_dir, resume_step=self.step) if self.is_main else NullMetrics()
        a = self.arithmetic
        self._log(
            f"model: {a.total_params / 1e6:.2f}M parameters ({a.active_params / 1e6:.2f}M active), "
            f"{a.flops_per_token / 1e6:.1f} MFLOP/token; device {device_name(self.device)} "
            f"(peak {si(self.peak_flops, 'FLOP/s', 2)} {tc.dtype}); {self.tokens_per_step} tokens/step"
        )
        self._log(f"data: {self.train_loader.describe()}")

        previous = {sig: signal.signal(sig, self._request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        self.watchdog.start()
        started, step_times, window, first_val, val_loss = time.perf_counter(), [], [], None, None
        try:
            if self.step == 0 and not self._restarted_replica_group():
                first_val, by_dataset = self.evaluate()
                val_loss = first_val
                metrics.log({"step": 0, "tokens": 0, "val_loss": val_loss} | by_dataset)
            with ProgressDisplay(tc.steps, self.step, tc.progress, silent=not self.is_main) as bar:
                profiled = False  # a step since the last metrics record ran under the profiler
                while self.step < tc.steps and not self._stop_agreed():
                    profiled |= self.profiler.active(self.step + 1)
                    self.profiler.step_begins(self.step + 1)
                    result = self.train_step()
                    if (trace := self.profiler.step_ends(self.step)) is not None:
                        bar.print(written_message(trace))
                    window.append(result)
                    step_times.append(result.step_time_s)
                    if self.bad_steps_in_row >= tc.max_bad_steps:
                        metrics.log(self._record(window))
                        raise ColossusError(
                            f"{self.bad_steps_in_row} steps in a row had a non-finite loss or gradient "
                            f"(last loss {result.loss}); stopping. The last good checkpoint is kept in "
                            f"{self.ckpt_root}; lower train.lr or check the data"
                        )
                    record = None
                    if self.step % tc.log_every == 0 or self.step == tc.steps:
                        record = self._record(window)
                        window = []
                    if self.step % tc.eval_every == 0 or self.step == tc.steps:
                        val_loss, by_dataset = self.evaluate()
                        record = (record or {"step": self.step, "tokens": self.tokens_seen}) | {"val_loss": val_loss}
                        record |= by_dataset
                        each = ", ".join(f"{k.removeprefix('val_loss/')} {v:.4f}" for k, v in by_dataset.items())
                        bar.print(f"step {self.step}: val_loss {val_loss:.4f}" + (f" ({each})" if each else ""))
                    if tc.eval_tasks and (self.step % tc.eval_tasks_every == 0 or self.step == tc.steps):
                        scores = self.evaluate_tasks()
                        record = (record or {"step": self.step, "tokens": self.tokens_seen}) | scores
                        bar.print(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
                    if record is not None and self.replicas is not None:
                        record |= self._replica_record()
                    if record is not None and profiled:
                        record["profiled"], profiled = True, False  # slower: the profiler was recording
                    if record is not None:
                        metrics.log(record)
                        bar.update(
                            self.step,
                            f"loss {record.get('loss', float('nan')):.3f} "
                            f"{record.get('tokens_per_s', 0):,.0f} tok/s "
                            f"MFU {100 * record.get('mfu', 0):.1f}%",
                        )
                    else:
                        bar.update(self.step)
                    # Never checkpoint in the middle of a run of non-finite steps: the newest
                    # checkpoint should always be a state the run was healthy in.
                    if (self.step % tc.ckpt_every == 0 or self.step == tc.steps) and not self.bad_steps_in_row:
                        self.save_checkpoint()
                if self.step < tc.steps:  # left the loop on a signal
                    path = self.save_checkpoint()
                    self.wait_for_checkpoint()
                    bar.print(f"stopped by signal {self._stop_signal}: checkpoint saved to {path}")
        finally:
            if (trace := self.profiler.finish(self.step)) is not None:  # the run ended inside the window
                self._log(written_message(trace))
            self.watchdog.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            metrics.close()
            self.wait_for_checkpoint()  # never leave with a save in flight, even on an error
        stragglers = straggler_report(step_times, self.world_size)
        if not self.is_main:
            return {}
        summary = self.report.summary(
            steps=self.step,
            tokens=self.tokens_seen,
            skipped_steps=self.skipped_steps,
            step_times=step_times,
            wall_s=time.perf_counter() - started,
            first_val=first_val,
            val_loss=val_loss,
        )
        summary |= stragglers
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary

    def _restarted_replica_group(self) -> bool:
        """A replica group torchrun restarted: its first quorum heals it from a live peer, so its own
        step-0 weights are about to be overwritten and evaluating them would only delay the rejoin."""
        return self.replicas is not None and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0"

    def _replica_record(self) -> dict[str, Any]:
        """The quorum of the step just taken: groups in it, its id, attempts redone, and the time its
        quorum took (bench/chaos.py counts a reconfigured quorum's time as recovery, not training)."""
        r = self.replicas
        return {
            "ft_group": r.group,
            "ft_replicas": r.participants,
            "ft_quorum": r.quorum_id,
            "ft_retries": r.retries,
            "ft_quorum_s": r.quorum_s,  # of the committed attempt (inside step_time_s)
        }

    def _record(self, window: list[StepResult]) -> dict[str, Any]:
        return self.report.window_record(self.step, self.tokens_seen, window, self.skipped_steps)

    def _read_summary(self) -> dict[str, Any]:
        path = self.run_dir / "summary.json"
        return json.loads(path.read_text()) if path.exists() else {}


def _same_model_config(stored: dict[str, Any], current: ModelConfig) -> bool:
    """Whether a checkpoint's recorded model config is `current`. Fields added to ModelConfig
    after the checkpoint was written take their defaults (which are the behaviour it was trained
    with), so older runs still resume; a field this version does not know never matches."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    if not set(stored) <= known:
        return False
    return asdict(dataclasses.replace(ModelConfig(), **stored)) == asdict(current)
