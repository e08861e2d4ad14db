"""Chaos benchmark: goodput of a real multi-process training run while ranks are killed or stalled.

Runs `colossus train --nproc 4 --max-restarts R` (torchrun, gloo on CPU; HSDP: 2 replicas x 2
FSDP shards of a 1.8M-parameter model, ~0.5 s a step on a 2-core CPU) and, on a seeded schedule,
SIGKILLs a random rank every K seconds (`--mode kill`) or SIGSTOPs one (`--mode stall`: longer than
`train.hang_timeout_s`, so the hang watchdog must turn it into a failure). The run recovers the
way the trainer does today: torchrun restarts the whole group and it resumes from the newest
checkpoint. The bench reads what happened from the run itself: metrics.jsonl (one record per step,
each step's time as the trainer measured it; records past the checkpoint a restart resumes from are
dropped and written again) and the heartbeat files of train/watchdog.py (when each restarted rank's
process started and reached rendezvous, setup, checkpoint load and its first step).

Before the chaos run it runs the same command without failures (`--no-reference` skips it), so the
table shows what startup and checkpoints cost by themselves. A run ends at `--steps` or at
`--duration` seconds, where the bench sends SIGTERM and the trainer checkpoints and exits (its
normal stop path), so every step up to the end counts. Failures are not injected while the group
is still recovering from the previous one, nor in the last 30 s: each failure's cost is measured on
its own.

    python bench/chaos.py                                   # kill mode, one kill a minute, 3 minutes
    python bench/chaos.py --kill-every 30 --duration 150 --ckpt-every 20 --no-reference
    python bench/chaos.py --mode stall --hang-timeout 10 --kill-every 40 --duration 150

`--recovery ft` (or `both`: the restart baseline first, then this) runs the same model and global batch
as replica-group fault tolerance instead (train/fault_tolerance.py, `colossus launch ft`): 2 torchft
replica groups of nproc / 2 FSDP ranks, each its own torchrun job, coordinated by a lighthouse. A
kill restarts only the victim's group; the other keeps committing steps alone and the restarted
group copies its state over HTTP and rejoins. A step committed by any quorum is productive; its
time is defined below. recomputed = step attempts dropped by a failed commit (redone with the same
data); kill -> step = to the next committed step of the job; rejoin = to the first step the
victim's group commits in a full quorum again; readmit = how much longer than a median step the
survivors' step that took the group back in was (they wait while it heals). plan/failure_rates.py
(CHAOS_FT) takes these three means as replica groups' recovery times in `colossus plan
--simulate-failures`.

    python bench/chaos.py --recovery both --kill-every 60 --duration 180 --no-reference

Columns: wall = launch to exit; productive = the summed step times of the steps in the final model
(under ft: a step's time in the group that spent least on it, less its quorum whenever that quorum
was not the previous step's: the wait for a dead group's heartbeat to lapse, a reconfiguration or a
heal is recovery, not training); goodput = productive / wall, from launch to exit; start s = launch
to the first step beginning (imports, setup, step-0 evaluation); stop s = the SIGTERM at --duration
to the exit (final checkpoint, teardown); steady = productive / the time between them, the goodput
a run of days keeps under the same failures (its one start-up and one stop are negligible there);
recomputed = steps done more than once (rolled back by a restart);
per failure, kill -> step = from the kill (or stop) to the next completed step, split into its
parts, and regain = until the run is past the step it had reached when the failure hit.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from colossuslm.config.schema import TrainConfig

# This file is the entry point: the command line and the order of the runs. The checkpoint-restart
# mode is in chaos_restart.py, the torchft replica-group mode in chaos_ft.py; what both use in
# chaos_launch.py (running the trainer) and chaos_metrics.py (what a run measured, the tables).
# `python bench/chaos.py` puts bench/ on sys.path for those imports, but tests/test_replica_ft.py
# loads this file by its path, which does not.
_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from chaos_ft import GroupTail as GroupTail  # noqa: E402  (re-exported: tests/test_replica_ft.py checks it here)
from chaos_ft import print_ft_table, run_ft  # noqa: E402
from chaos_metrics import phases as phases  # noqa: E402  (re-exported for the same test)
from chaos_restart import print_table, run  # noqa: E402


def main() -> int:
    """Parses the command line, runs the reference and chaos runs of each mode asked for and prints their tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["kill", "stall"], default="kill")
    parser.add_argument(
        "--recovery",
        choices=["restart", "ft", "both"],
        default="restart",
        help="restart: torchrun restarts the whole job (HSDP); ft: torchft replica groups; both: one after the other",
    )
    parser.add_argument("--kill-every", type=float, default=60.0, metavar="K", help="seconds between failures")
    parser.add_argument("--duration", type=float, default=180.0, help="seconds each run may last (then SIGTERM)")
    parser.add_argument("--steps", type=int, default=0, help="train.steps (0: until --duration)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the failure schedule, the victims and the run")
    parser.add_argument("--nproc", type=int, default=4)
    parser.add_argument("--max-restarts", type=int, default=100)
    parser.add_argument(
        "--ckpt-every", type=int, default=TrainConfig().ckpt_every, help="train.ckpt_every (default: the trainer's)"
    )
    parser.add_argument(
        "--hang-timeout",
        type=float,
        default=None,
        help="train.hang_timeout_s (default: the trainer's in kill mode, 10 s in stall mode)",
    )
    parser.add_argument(
        "--stall-s", type=float, default=0.0, help="stall mode: SIGCONT after this long (0: leave it stopped)"
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the failure-free run")
    parser.add_argument("--keep", type=Path, default=None, help="keep the run directories and logs here")
    args = parser.parse_args()
    if args.hang_timeout is None:
        args.hang_timeout = TrainConfig().hang_timeout_s if args.mode == "kill" else 10.0
    if args.mode == "stall" and not args.hang_timeout:
        print(
            "note: train.hang_timeout_s = 0: a stalled rank is only caught by the collective timeout", file=sys.stderr
        )
    if args.recovery != "restart" and args.mode != "kill":
        parser.error("--recovery ft / both measures kills only (--mode kill)")
    if args.nproc < 4 or args.nproc % 2:
        parser.error("--nproc must be even and >= 4: the layout is 2 HSDP replicas of nproc / 2 shards")
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        results, ft_results = [], []
        if args.recovery in ("restart", "both"):
            if not args.no_reference:
                results.append(run("reference", args, work, chaos=False))
            results.append(run(args.mode, args, work, chaos=True))
            print_table(results, args)
        if args.recovery in ("ft", "both"):
            if not args.no_reference:
                ft_results.append(run_ft("ft-reference", args, work, chaos=False))
            ft_results.append(run_ft("ft-kill", args, work, chaos=True))
            print_ft_table([*results, *ft_results], args)
        for r in [*results, *ft_results]:
            if r.returncode and not r.stopped_at_duration:
                print(f"{r.name} failed (exit {r.returncode}); log: {r.log}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
