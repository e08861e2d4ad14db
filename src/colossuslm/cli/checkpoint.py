"""`colossus checkpoint verify PATH`: check checkpoints against their manifests."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("checkpoint", help="inspect and verify checkpoints")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    verify = actions.add_parser(
        "verify",
        help="check every file of a checkpoint (or of all checkpoints of "
        "a run directory) against its manifest's sizes and sha256",
    )
    verify.add_argument("path", type=Path, help="a checkpoint directory or a run directory")
    verify.set_defaults(handler=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    from colossuslm.errors import ColossusError
    from colossuslm.train.checkpoint import MANIFEST, list_checkpoints, verify_checkpoint

    path: Path = args.path
    if (path / MANIFEST).is_file():
        candidates = [path]
    elif (path / "checkpoints").is_dir():
        candidates = list_checkpoints(path / "checkpoints")
        stale = sorted((path / "checkpoints").glob(".tmp-*"))
        for leftover in stale:
            print(f"note: {leftover} is an unfinished write (ignored on resume, removed at the next save)")
        if not candidates:
            raise ColossusError(f"{path} has no complete checkpoint")
    elif path.is_dir():
        raise ColossusError(f"{path} is neither a checkpoint (no {MANIFEST}) nor a run directory (no checkpoints/)")
    else:
        raise ColossusError(f"{path} does not exist")
    bad = 0
    for candidate in candidates:
        try:
            manifest = verify_checkpoint(candidate)
        except ColossusError as exc:
            bad += 1
            print(f"BAD  {exc}")
            continue
        size = sum(f["bytes"] for f in manifest["files"].values())
        state = json.loads((candidate / "trainer_state.json").read_text())
        print(
            f"OK   {candidate}: step {state['step']}, {len(manifest['files'])} files, {size / 1e6:.1f} MB, "
            f"written by {manifest.get('world_size', 1)} rank(s)"
        )
    return 1 if bad else 0
