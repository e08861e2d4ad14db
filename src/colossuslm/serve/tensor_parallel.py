"""Tensor-parallel serving (`colossus serve --tp N`): one model sharded over N processes.

The layout is vLLM's multiprocessing executor. Rank 0 (the process the user started) runs the whole
engine: scheduler, KV-cache bookkeeping, sampling, the HTTP server. Every rank holds a TP-sharded
copy of the model, sharded by the trainer's own plan (`parallel.tensor.apply_tensor_parallel`,
without sequence parallelism: a serving step is one flat `[1, T]` row), and its slice of the KV cache:
the keys and values of its own kv heads (n_kv_heads / tp), as the column-parallel q/k/v
projections give each rank whole heads. Each step, rank 0 broadcasts the step's `StepItem`s (new
token ids, start positions, block tables) over a gloo group, as Python objects on the CPU (vLLM V1
likewise sends the scheduler's output and lets each worker lay out its own inputs); every rank then
lays the step out with the same `ModelRunner._prepare` and runs the same forward, whose row-parallel
projections all-reduce, so the final hidden states are whole on every rank. Rank 0 applies the head
(replicated, like the embedding and the final norm) and samples; the workers' results are dropped.
Speculative decoding and prompt log-probabilities need nothing more: they use rank 0's hidden
states and its head.

MoE: the routed experts are split by their hidden width over the TP ranks, exactly as the trainer's
tensor parallelism does (`parallel.expert.shard_experts_over_tp`, called by `apply_tensor_parallel`):
every rank routes every token with the replicated router, computes its slice of each expert, and an
all-reduce sums the slices; shared experts split like the dense MLP. The trainer's expert
parallelism is not used here: its ep ranks are data-parallel ranks holding different tokens, while
TP ranks hold the same tokens, so EP over them would compute every expert row tp times.

Processes: `tensor_parallel_processes` spawns ranks 1..N-1 (each reads only its own shards of the
checkpoint, `loading.build_sharded_model`, and loops in `serve_steps`) and joins the group as
rank 0. gloo on CPU, NCCL with one GPU per rank (rank r on cuda:r). On exit rank 0 sends a stop
message and joins the workers; workers ignore Ctrl-C (the terminal sends it to the whole process
group: rank 0 decides when they stop). When rank 0 leaves on Ctrl-C or SIGTERM (uvicorn's
graceful shutdown, then KeyboardInterrupt or SystemExit) the workers are terminated; they also die
with their parent however it dies (PR_SET_PDEATHSIG) and leave their loop if rank 0's group goes
away.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from colossuslm.errors import ColossusError
from colossuslm.models.transformer import Transformer
from colossuslm.serve.model_runner import ModelRunner, StepItem, StepOutput, kv_cache_for

JOIN_TIMEOUT_S = 20.0  # how long rank 0 waits for a worker to leave after the stop message
# gloo needs a finite timeout; a worker's wait for the next step (an idle server) must not end.
CONTROL_TIMEOUT = datetime.timedelta(days=365)


@dataclass(frozen=True)
class TensorParallelGroup:
    """This process's place in the serving group."""

    rank: int
    size: int
    device: torch.device  # cuda:rank with NCCL, cpu with gloo
    mesh: DeviceMesh  # the 1-D "tp" mesh the trainer's plans shard over
    control: dist.ProcessGroup  # gloo: the step messages, pickled Python objects on the CPU


def shard_for_serving(model: Transformer, group: TensorParallelGroup) -> None:
    """Shard `model` (the same full weights on every rank) with the trainer's TP plan, and mark it
    so that `model_runner.make_runner` gives rank 0 the runner that feeds the workers."""
    from colossuslm.parallel.tensor import apply_tensor_parallel

    apply_tensor_parallel(model, group.mesh, sequence_parallel=False)
    model.tensor_parallel = group


def _broadcast(group: TensorParallelGroup, message: object = None) -> object:
    """Rank 0's `message` on every rank (workers pass nothing and receive it)."""
    box = [message]
    dist.broadcast_object_list(box, src=0, group=group.control)
    return box[0]


class ShardRunner(ModelRunner):
    """A `ModelRunner` over a TP-sharded model: the step runs under no_grad, not inference mode.
    Under inference mode DTensor receives `aten.linear` undecomposed, finds no sharding rule,
    decomposes it by hand and caches nothing, on every call of every row-parallel projection:
    measured 20x slower per forward than no_grad on this CPU (torch 2.13)."""

    no_autograd = staticmethod(torch.no_grad)


class TensorParallelRunner(ShardRunner):
    """Rank 0's runner: every step's items go to the other ranks first, then every rank runs the
    same forward (the collectives inside it pair up)."""

    def __init__(self, model: Transformer, group: TensorParallelGroup, num_blocks: int, block_size: int, **cache):
        _broadcast(group, ("cache", num_blocks, block_size))  # the workers build their cache slices
        super().__init__(model, kv_cache_for(model, num_blocks, block_size, tp=group.size, **cache))
        self.group = group

    def execute_step(self, items: list[StepItem]) -> StepOutput:
        _broadcast(self.group, ("step", items))
        return super().execute_step(items)


def serve_steps(model: Transformer, group: TensorParallelGroup) -> None:
    """A worker's loop: build a cache slice when rank 0 builds its runner, run every step rank 0
    runs, return at the stop message. A step that fails here fails on rank 0 too (same items,
    same layout code), where the engine fails that batch and keeps serving: so does the worker."""
    runner = None
    while (message := _broadcast(group)) is not None:
        kind, *payload = message
        if kind == "cache":
            runner = ShardRunner(model, kv_cache_for(model, *payload, tp=group.size))
            continue
        try:
            runner.execute_step(*payload)
        except (ValueError, IndexError) as exc:  # a bad step's layout, not a broken group
            print(f"colossus tp rank {group.rank}: step failed, as on rank 0: {exc}", file=sys.stderr)


# ----------------------------------------------------------------------------- processes


def check_tensor_parallel_serving(tp: int, device: str, quantization: str) -> None:
    """Refuse what `--tp` cannot do, before any process starts (the model's shapes are checked by
    `check_model_for_tp`)."""
    if tp < 1:
        raise ColossusError(f"--tp must be at least 1 (got {tp})")
    if tp == 1:
        return
    # torchao 0.18 and DTensor do not mix either way round (checked): sharding int8 weights needs
    # aten.split, which Int8Tensor lacks; quantizing sharded weights fails inside torchao.
    if quantization != "none":
        raise ColossusError(
            f"--quantization {quantization} with --tp {tp} is not supported: torchao's int8 weights are not "
            f"sharded by the tensor-parallel plan (DTensor); serve with --tp 1, or without --quantization"
        )
    if device.startswith("cuda:"):
        raise ColossusError(
            f"--device {device} with --tp {tp}: rank r uses cuda:r; pass --device cuda (or auto) and choose the "
            f"GPUs with CUDA_VISIBLE_DEVICES"
        )
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if torch.cuda.device_count() < tp:
            raise ColossusError(
                f"--tp {tp} needs {tp} GPUs (one per rank) but {torch.cuda.device_count()} are visible; lower --tp"
            )
    elif device not in ("auto", "cpu"):
        raise ColossusError(f"--device {device!r} is not a device; use auto, cpu or cuda")


def check_model_for_tp(model_cfg, tp: int) -> None:
    """The trainer's divisibility rules (heads, kv heads, MLP and expert widths), in `--tp` words."""
    from colossuslm.parallel.tensor import check_tensor_parallel

    with torch.device("meta"):  # the check reads shapes only: no weights are made
        model = Transformer(model_cfg)
    try:
        check_tensor_parallel(model, tp)
    except ColossusError as exc:
        raise ColossusError(f"--tp {tp}: {exc}") from None


@contextmanager
def tensor_parallel_processes(
    tp: int, load_options: dict, *, threads: int | None = None
) -> Iterator[TensorParallelGroup | None]:
    """Start ranks 1..tp-1 and join the group as rank 0; yields rank 0's group (None, with nothing
    started, for tp = 1). `load_options` are `load_for_inference`'s (path, device, dtype,
    quantization): each worker loads with them, sharded, then runs `serve_steps`. What --tp cannot
    do is refused first. On a normal exit the workers get the stop message; on an error (or if
    one outlives the wait) they are terminated."""
    device = load_options.get("device", "auto")
    check_tensor_parallel_serving(tp, device, load_options.get("quantization", "none"))
    if tp == 1:
        yield None
        return
    from colossuslm.serve.loading import model_config_of

    check_model_for_tp(model_config_of(load_options["path"]), tp)
    kind = device if device in ("cpu", "cuda") else "auto"
    threads = threads or _default_threads(kind, tp)
    port = _free_port()
    context = mp.get_context("spawn")
    workers = [
        context.Process(
            target=_worker_main,
            args=(rank, tp, port, kind, threads, load_options),
            name=f"colossus-tp{rank}",
            daemon=True,
        )
        for rank in range(1, tp)
    ]
    for worker in workers:
        worker.start()
    stopped = False
    try:
        with _sigterm_raises():
            group = _join(0, tp, port, kind, threads)
            yield group
        _broadcast(group, None)  # the stop message
        stopped = True
    finally:
        _end_workers(workers, JOIN_TIMEOUT_S if stopped else 0.0)
        if dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM on rank 0 raises SystemExit(0), so the cleanup above runs (the default action
    would end the process on the spot; uvicorn, after its graceful shutdown, re-raises the signal
    with the handler it found, this one)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def leave(signum, frame):
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, leave)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _end_workers(workers: list, wait_s: float) -> None:
    """Wait up to `wait_s` for each worker to leave by itself, then terminate it (kill if it must)."""
    for worker in workers:
        worker.join(timeout=wait_s)
        if worker.is_alive():
            worker.terminate()
            worker.join(timeout=5)
        if worker.is_alive():
            worker.kill()
            worker.join()


def _default_threads(kind: str, tp: int) -> int | None:
    """On CPU the ranks share the cores: each gets its share rather than all of them."""
    if kind == "cuda" or (kind == "auto" and torch.cuda.is_available()):
        return None
    return max(1, (os.cpu_count() or 1) // tp)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _join(rank: int, size: int, port: int, kind: str, threads: int | None) -> TensorParallelGroup:
    """Join the process group as torchrun would have it (the trainer's `init_distributed`)."""
    from colossuslm.parallel.mesh import init_distributed

    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": size, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    os.environ.update({name: str(value) for name, value in env.items()})
    if threads is not None:
        torch.set_num_threads(threads)
    joined = init_distributed(kind)
    mesh = init_device_mesh(joined.device.type, (size,), mesh_dim_names=("tp",))
    # Workers wait on the control group for the next step however long the server idles.
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    return TensorParallelGroup(rank, size, joined.device, mesh, control)


def _die_with_parent() -> None:
    """SIGTERM this process when the process that started it dies, however it dies (Linux)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the worker still leaves when rank 0's group goes away


def _worker_main(rank: int, size: int, port: int, kind: str, threads: int | None, load_options: dict) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from colossuslm.serve.loading import load_for_inference

    group = _join(rank, size, port, kind, threads)
    code = 0
    try:
        loaded = load_for_inference(**load_options, tensor_parallel=group)
        serve_steps(loaded.model, group)
    except (RuntimeError, dist.DistBackendError) as exc:  # rank 0 went away mid-collective
        print(f"colossus tp rank {rank}: stopping: {str(exc).splitlines()[0] if str(exc) else exc!r}", file=sys.stderr)
        code = 1
    dist.destroy_process_group()
    # Nothing is left to save: skip the interpreter's teardown of torch, seconds that rank 0
    # (and the user pressing Ctrl-C) would wait for.
    sys.stderr.flush()
    os._exit(code)


__all__ = [
    "TensorParallelGroup",
    "TensorParallelRunner",
    "check_model_for_tp",
    "check_tensor_parallel_serving",
    "serve_steps",
    "shard_for_serving",
    "tensor_parallel_processes",
]
