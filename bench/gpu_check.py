"""One command that checks a CUDA machine end to end and prints a table.

    python bench/gpu_check.py                 # under 8 minutes on one H100/H200
    python bench/gpu_check.py --only 1b-float8,serve --budget-s 300

Rows, in this order: the NCCL process group (1 rank per GPU, up to 2: init, all_reduce, bus
bandwidth); the default corpus prepared with the 50k vocabulary the big presets use; `1b` bf16
+ torch.compile tokens/s and MFU; the same with float8 (torchao); `moe-small` MFU; the serving
engine on CUDA (output tokens/s at concurrency 16); activation checkpointing none / full /
selective (peak memory and MFU), last, so a slow machine that runs out of budget loses those.

Training rows run `colossus train` in a subprocess and read its metrics.jsonl (tokens_per_s,
mfu, mem_gb), so they measure whatever the trainer is today. A run is stopped (SIGKILL, so it
writes no checkpoint) once enough steady-state steps are logged; the first logged window holds
compilation and is left out. Each row has its own time limit inside a global budget; a row that
fails prints its error and the check goes on.

On a machine without CUDA it says so and exits 0. `--smoke-on-cpu` runs the same rows with the
tiny presets on this CPU (gloo instead of NCCL), to check the script itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

RESULT_MARK = "GPU_CHECK_RESULT "
SCRIPT = Path(__file__).resolve()
MIN_ROW_S = 15  # less budget than this left: not worth starting a row


@dataclass(frozen=True)
class Profile:
    """What the rows run: the real thing on a GPU, or a miniature on a CPU."""

    device: str
    backend: str
    dense: str
    moe: str
    vocab_size: int
    seq_len: int
    micro_batch: int
    compile: bool
    log_every: int
    steady_records: int  # logged windows to measure after the warm-up one
    serve_requests: int
    serve_output_tokens: int
    time_scale: float  # multiplies every row's time limit


GPU = Profile("cuda", "nccl", "1b", "moe-small", 50304, 2048, 8, True, 5, 3, 64, 128, 1.0)
CPU_SMOKE = Profile("cpu", "gloo", "tiny", "moe-tiny", 8192, 128, 2, False, 2, 1, 4, 8, 1.5)


@dataclass
class Row:
    check: str
    setup: str
    tokens_per_s: float | None = None
    mfu: float | None = None
    mem_gb: float | None = None
    seconds: float | None = None
    result: str = ""


# --------------------------------------------------------------------------- training rows


def read_records(metrics_path: Path) -> list[dict]:
    """The training records logged so far (a line being written is skipped)."""
    if not metrics_path.is_file():
        return []
    records = []
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "tokens_per_s" in record:
            records.append(record)
    return records


def summarize_training(records: list[dict]) -> tuple[float, float, float]:
    """(tokens/s, MFU, peak GB): medians over the windows after the first (which holds warm-up and
    compilation); the peak over all of them."""
    if len(records) < 2:
        raise ValueError(f"{len(records)} logged window(s); need one past the warm-up")
    steady = records[1:]
    return (
        statistics.median(r["tokens_per_s"] for r in steady),
        statistics.median(r["mfu"] for r in steady),
        max(r.get("mem_gb", float("nan")) for r in records),
    )


def train_overrides(profile: Profile, preset: str, run_dir: Path, name: str) -> list[str]:
    # train.steps is never reached: the run is stopped once enough windows are logged.
    return [
        f"model.preset={preset}",
        f"data.seq_len={profile.seq_len}",
        f"train.device={profile.device}",
        f"train.micro_batch_size={profile.micro_batch}",
        f"train.compile={str(profile.compile).lower()}",
        f"train.log_every={profile.log_every}",
        "train.steps=100000",
        "train.eval_every=1000000",
        "train.ckpt_every=1000000",
        "train.resume=false",
        "train.progress=false",
        f"train.run_dir={run_dir}",
        f"train.name={name}",
    ]


def stop(proc: subprocess.Popen) -> None:
    """SIGKILL the process and its group (compile workers, torchrun's workers), even when the
    leader has exited already. SIGKILL, not SIGTERM: a trainer on SIGTERM writes a checkpoint."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the group's id is the leader's pid (start_new_session)
    except ProcessLookupError:
        pass  # the whole group is gone
    proc.wait()


def log_tail(log: Path, lines: int = 6) -> str:
    text = log.read_text(encoding="utf-8", errors="replace").strip().splitlines() if log.is_file() else []
    return " | ".join(line.strip() for line in text[-lines:]) or "(no output)"


def run_training(
    profile: Profile, preset: str, extra: list[str], work: Path, name: str, limit_s: float
) -> tuple[float, float, float]:
    overrides = train_overrides(profile, preset, work, name) + extra
    cmd = [sys.executable, "-m", "colossuslm.cli.main", "train", "--no-progress"]
    cmd += [arg for override in overrides for arg in ("--set", override)]
    log = work / f"{name}.log"
    metrics = work / name / "metrics.jsonl"
    wanted = 1 + profile.steady_records
    start = time.monotonic()
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None and time.monotonic() - start < limit_s:
                if len(read_records(metrics)) >= wanted:
                    break
                time.sleep(1.0)
        finally:
            finished_by_itself = proc.poll() is not None
            stop(proc)
    records = read_records(metrics)
    if finished_by_itself and proc.returncode != 0:
        raise RuntimeError(f"exit {proc.returncode}: {log_tail(log)}")
    if len(records) < 2:
        raise RuntimeError(f"timed out after {limit_s:.0f} s with {len(records)} logged window(s): {log_tail(log)}")
    return summarize_training(records)


def activation_checkpoint_available() -> bool:
    from colossuslm.config.schema import ParallelConfig

    return any(f.name == "activation_checkpoint" for f in dataclasses.fields(ParallelConfig))


# --------------------------------------------------------------------------- worker modes


def nccl_worker() -> None:
    """Under torchrun: init the group, check an all_reduce, time a 256 MB one (bus bandwidth)."""
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend, device_id=device if cuda else None)
    world, rank = dist.get_world_size(), dist.get_rank()
    value = torch.full((1,), float(rank + 1), device=device)
    dist.all_reduce(value)
    correct = value.item() == world * (world + 1) / 2
    payload = torch.ones((128 << 20) if cuda else (1 << 20), dtype=torch.bfloat16, device=device)
    for _ in range(3):
        dist.all_reduce(payload)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(10):
        dist.all_reduce(payload)
    sync()
    seconds = (time.perf_counter() - start) / 10
    bus_gbps = 2 * (world - 1) / world * payload.numel() * payload.element_size() / seconds / 1e9
    if rank == 0:
        print(RESULT_MARK + json.dumps({"backend": backend, "world": world, "correct": correct, "bus_gbps": bus_gbps}))
    dist.destroy_process_group()


def serve_worker(preset: str, dataset: str, device: str, concurrency: int, requests: int, output_tokens: int) -> None:
    """Random weights of `preset` (throughput does not depend on their values) in bf16, served by
    the engine in-process with `concurrency` closed-loop clients, greedy, EOS ignored."""
    import torch

    from colossuslm.data.tokenizer import EOS_TOKEN, load_tokenizer
    from colossuslm.models.presets import get_preset
    from colossuslm.models.transformer import Transformer
    from colossuslm.serve.engine import EngineConfig, LLMEngine
    from colossuslm.serve.sampling import SamplingParams

    cfg = get_preset(preset)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = Transformer(cfg).to(device=device, dtype=dtype).eval().requires_grad_(False)
    tokenizer = load_tokenizer(dataset)
    engine = LLMEngine(model, tokenizer, tokenizer.token_to_id(EOS_TOKEN), EngineConfig(max_num_seqs=concurrency))
    ids = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (64 + 16 * (i % 12),), generator=ids).tolist() for i in range(requests)]

    def closed_loop(batch: list[list[int]]) -> tuple[int, float]:
        pending, in_flight, produced = list(batch), 0, 0
        start = time.perf_counter()
        while pending or in_flight:
            while pending and in_flight < concurrency:  # a client whose reply came sends the next
                params = SamplingParams(max_tokens=output_tokens, temperature=0.0, ignore_eos=True)
                engine.add_request(pending.pop(), params)
                in_flight += 1
            for out in engine.step():
                produced += len(out.token_ids)
                in_flight -= out.finished
        return produced, time.perf_counter() - start

    closed_loop(prompts[:2])  # warm-up: allocator, kernels
    produced, seconds = closed_loop(prompts)
    print(
        RESULT_MARK
        + json.dumps({"tokens": produced, "seconds": seconds, "params": sum(p.numel() for p in model.parameters())})
    )


def run_worker(args: list[str], limit_s: float) -> dict:
    """Run `python ARGS` in its own process group and return the JSON it marks as its result; on
    timeout the whole group goes (torchrun's workers too, which would otherwise hold the GPU)."""
    proc = subprocess.Popen(
        [sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        stop(proc)
        raise
    for line in stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    tail = " | ".join((stdout + stderr).strip().splitlines()[-6:])
    raise RuntimeError(f"exit {proc.returncode}: {tail or '(no output)'}")


# --------------------------------------------------------------------------- the rows


@dataclass
class Check:
    key: str
    check: str
    setup: str
    limit_s: float
    run: Callable[[Row, float], None]  # fills the row, or raises


def build_checks(profile: Profile, work: Path, n_gpus: int) -> list[Check]:
    dataset: dict[str, str] = {}

    def process_group(row: Row, limit: float) -> None:
        nproc = max(1, min(2, n_gpus))
        torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        result = run_worker([*torchrun, str(SCRIPT), "--nccl-worker"], limit)
        if not result["correct"]:
            raise RuntimeError(f"all_reduce over {result['world']} rank(s) gave a wrong sum")
        bandwidth = f", bus {result['bus_gbps']:.0f} GB/s" if result["world"] > 1 else " (1 rank: no peer to measure)"
        row.result = f"ok: {result['backend']} group of {result['world']}, all_reduce correct{bandwidth}"

    def corpus(row: Row, limit: float) -> None:
        code = (
            "import json; from colossuslm.data.corpus import default_dataset; "
            f"print({RESULT_MARK!r} + json.dumps(str(default_dataset({profile.vocab_size}))))"
        )
        dataset["path"] = run_worker(["-c", code], limit)
        row.result = f"ok: {dataset['path']}"

    def training(preset: str, name: str, extra: list[str], note: str = "") -> Callable[[Row, float], None]:
        def run(row: Row, limit: float) -> None:
            row.tokens_per_s, row.mfu, row.mem_gb = run_training(profile, preset, extra, work, name, limit)
            row.result = "ok" + (f" ({note})" if note else "")

        return run

    def activation_checkpoint(mode: str) -> Callable[[Row, float], None]:
        measure = training(
            profile.dense, f"ac-{mode}", ["train.compile=false", f"parallel.activation_checkpoint={mode}"]
        )

        def run(row: Row, limit: float) -> None:
            if not activation_checkpoint_available():
                row.result = "not available: this version has no parallel.activation_checkpoint"
                return
            measure(row, limit)

        return run

    def serve(row: Row, limit: float) -> None:
        if "path" not in dataset:
            raise RuntimeError("needs the prepared corpus's tokenizer (the corpus row failed or was skipped)")
        args = [str(SCRIPT), "--serve-worker", "--preset", profile.dense, "--dataset", dataset["path"]]
        args += ["--requests", str(profile.serve_requests), "--output-tokens", str(profile.serve_output_tokens)]
        args += ["--device", profile.device]
        result = run_worker(args, limit)
        row.tokens_per_s = result["tokens"] / result["seconds"]
        row.result = (
            f"ok: {result['tokens']} output tokens in {result['seconds']:.1f} s, {result['params'] / 1e9:.2f}B params"
        )

    compiled = "compile" if profile.compile else "eager"
    serve_dtype = "bf16" if profile.device == "cuda" else "fp32"
    dense, moe = profile.dense, profile.moe
    batch = f"{profile.micro_batch}x{profile.seq_len}"
    return [
        Check("nccl", "process group", f"{profile.backend}, all_reduce", 60, process_group),
        Check("corpus", "default corpus", f"vocab {profile.vocab_size}, prepared once", 180, corpus),
        Check("1b-bf16", f"{dense} bf16", f"{compiled}, batch {batch}", 180, training(dense, "dense-bf16", [])),
        Check(
            "1b-float8",
            f"{dense} float8",
            f"{compiled}, tensorwise",
            180,
            training(dense, "dense-float8", ["train.float8=true"], "MFU against the bf16 peak"),
        ),
        Check("moe-small", f"{moe} bf16", f"eager, batch {batch}", 120, training(moe, "moe", ["train.compile=false"])),
        Check("serve", f"serve {dense}", f"{serve_dtype}, concurrency 16", 120, serve),
        Check("ac-none", f"{dense} AC none", "eager", 90, activation_checkpoint("none")),
        Check("ac-full", f"{dense} AC full", "eager", 90, activation_checkpoint("full")),
        Check("ac-selective", f"{dense} AC selective", "eager", 90, activation_checkpoint("selective")),
    ]


def run_checks(checks: list[Check], budget_s: float, time_scale: float) -> list[Row]:
    deadline = time.monotonic() + budget_s
    rows = []
    for check in checks:
        row = Row(check.check, check.setup)
        left = deadline - time.monotonic()
        limit = min(check.limit_s * time_scale, left)
        start = time.monotonic()
        if left < MIN_ROW_S:
            row.result = "skipped: out of the time budget (--budget-s)"
        else:
            try:
                check.run(row, limit)
            except subprocess.TimeoutExpired:
                row.result = f"FAILED: timed out after {limit:.0f} s"
            except Exception as exc:  # a failing row is reported and the check goes on
                row.result = f"FAILED: {type(exc).__name__}: {exc}"
            row.seconds = time.monotonic() - start
        print(f"  {row.check}: {row.result}", flush=True)
        rows.append(row)
    return rows


def format_table(rows: list[Row]) -> str:
    def cell(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    header = ("check", "setup", "tokens/s", "MFU", "peak GB", "s", "result")
    body = [
        (
            r.check,
            r.setup,
            cell(r.tokens_per_s, ",.0f"),
            "-" if r.mfu is None else f"{100 * r.mfu:.1f}%",
            cell(r.mem_gb, ".1f"),
            cell(r.seconds, ".0f"),
            r.result,
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header) - 1)]
    lines = []
    for line in [header, *body]:
        lines.append("  ".join(text.ljust(width) for text, width in zip(line, widths)) + "  " + line[-1])
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def machine_line(profile: Profile) -> str:
    import torch

    if profile.device != "cuda":
        return f"machine: CPU smoke run (torch {torch.__version__}); numbers say nothing about a GPU"
    names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
    return f"machine: {torch.cuda.device_count()} x {', '.join(sorted(names))}; torch {torch.__version__}, CUDA {torch.version.cuda}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget-s", type=float, default=450, help="total time for all rows (default 450)")
    parser.add_argument("--only", default="", help="comma-separated row keys, e.g. nccl,1b-float8,serve")
    parser.add_argument("--smoke-on-cpu", action="store_true", help="run the rows with tiny presets on this CPU")
    parser.add_argument("--keep", action="store_true", help="keep the run directories (printed)")
    parser.add_argument("--nccl-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", help=argparse.SUPPRESS)
    parser.add_argument("--dataset", help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--output-tokens", type=int, default=128, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.nccl_worker:
        nccl_worker()
        return 0
    if args.serve_worker:
        serve_worker(args.preset, args.dataset, args.device, 16, args.requests, args.output_tokens)
        return 0

    import torch

    if args.smoke_on_cpu:
        profile = CPU_SMOKE
    elif not torch.cuda.is_available():
        print(
            f"bench/gpu_check.py needs a CUDA GPU: this machine has none that torch {torch.__version__} can use "
            "(torch.cuda.is_available() is False). Nothing to check here; run it on a GPU machine "
            "(or --smoke-on-cpu to try the script itself)."
        )
        return 0
    else:
        profile = GPU
    checks = build_checks(profile, work := Path(tempfile.mkdtemp(prefix="gpu-check-")), torch.cuda.device_count())
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {c.key for c in checks}
        if unknown:
            parser.error(f"--only: unknown row(s) {sorted(unknown)}; choose from {[c.key for c in checks]}")
        # the serving row reads the corpus's tokenizer
        checks = [c for c in checks if c.key in wanted or (c.key == "corpus" and "serve" in wanted)]
    print(machine_line(profile), flush=True)
    rows = run_checks(checks, args.budget_s, profile.time_scale)
    print()
    print(format_table(rows))
    if args.keep:
        print(f"\nrun directories and logs: {work}")
    else:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
