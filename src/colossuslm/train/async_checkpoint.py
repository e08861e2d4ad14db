"""Checkpoints written in the background: training stalls only while the state is copied to CPU memory.

The same layout and the same atomicity as `checkpoint.save_checkpoint`; only the timing differs.

  main thread (at the save step)             background (one save in flight at most)
  ---------------------------------          ------------------------------------------------
  wait for the previous save                 DCP's upload thread: plan + write this rank's shards
  rank 0 empties .tmp-step_N; barrier          (its collectives on the coordination group)
  dcp.async_save: copy this rank's model +   the finisher thread, once the upload is done:
    optimizer shards to CPU memory, start      rng/rank_R.json (every rank); on rank 0 also
    the upload                                 model.safetensors (assembled from the shards just
  RNG states, trainer state as JSON            written), trainer_state.json, config, tokenizer
  hand them to the finisher                  agree: all-gather "my files are written" (or an error)
  ... training goes on ...                   rank 0: fsync, manifest, rename to step_N, prune
                                             agree again: every rank learns it was promoted

Collectives: the background threads use only a dedicated gloo group, which the main thread never
touches while a save is in flight, and the main thread's collectives (training, the barrier above)
stay on the default and mesh groups. So no process group ever sees collectives from two threads,
and every rank issues the background collectives in the same order (DCP's, then the two agreements).

Agreement: the checkpoint is promoted only after every rank has reported its files written, and a
rank's save counts as finished only once rank 0 has reported the promotion, so `wait()` returning
on any rank means the checkpoint is complete on disk for all of them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict

from colossuslm.errors import ColossusError
from colossuslm.train import checkpoint as ckpt


@dataclass
class _Snapshot:
    """What the finisher needs besides the DCP shards, captured at the save step."""

    step: int
    tmp: Path
    final: Path
    rng: dict[str, Any]
    trainer_state_json: str
    config_toml: str
    tokenizer_json: Path | None
    keep_last: int


class AsyncCheckpointer:
    """Writes checkpoints in the background, one at a time. Collective: every rank owns one and
    calls `save` and `wait` at the same steps."""

    def __init__(self) -> None:
        self._group: dist.ProcessGroup | None = None
        self._finisher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="colossus-checkpoint")
        self._pending: Future[Path] | None = None

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def save(
        self,
        ckpt_root: Path,
        step: int,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        trainer_state: dict[str, Any],
        config_toml: str,
        tokenizer_json: Path | None,
        keep_last: int,
        consolidate_from_shards: bool = True,
    ) -> Path:
        """Snapshot the state and start writing it; returns the directory the checkpoint will be
        promoted to. Waits first for the previous save, so at most one is in flight.
        (model.safetensors is always assembled from the shards here: `consolidate_from_shards`
        is accepted for the same call as the blocking `save_checkpoint`.)"""
        self.wait()
        group = self._coordination_group()
        tmp, final = ckpt.prepare_temp_dir(ckpt_root, step)
        ckpt.Collectives.barrier()  # nobody writes into .tmp-step_N before rank 0 has emptied it

        model_state, optimizer_state = get_state_dict(model, optimizer)
        # Returns once the shards are copied to CPU memory; the upload runs in DCP's own thread.
        upload = dcp.async_save(
            {"model": model_state, "optimizer": optimizer_state},
            checkpoint_id=str(tmp / "dcp"),
            process_group=group,
            no_dist=group is None,
        )
        snapshot = _Snapshot(
            step=step,
            tmp=tmp,
            final=final,
            rng=ckpt.rng_state(),
            trainer_state_json=json.dumps(trainer_state, indent=1),
            config_toml=config_toml,
            tokenizer_json=tokenizer_json,
            keep_last=keep_last,
        )
        self._pending = self._finisher.submit(self._finish, upload, snapshot, group)
        return final

    def wait(self) -> Path | None:
        """Block until the save in flight (if any) is promoted on every rank; re-raises its error."""
        pending, self._pending = self._pending, None
        return pending.result() if pending is not None else None

    def _coordination_group(self) -> dist.ProcessGroup | None:
        """A gloo group of all ranks for the background threads alone (None in a single process).
        Created at the first save, which every rank reaches at the same step, as new_group requires."""
        if self._group is None and dist.is_available() and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")
        return self._group

    # ---------------------------------------------------------------- the finisher thread
    def _finish(self, upload: Future, snapshot: _Snapshot, group: dist.ProcessGroup | None) -> Path:
        rank = ckpt.Collectives.rank()
        _agree(group, "writing", lambda: self._write_files(upload, snapshot, rank))
        _agree(group, "promoting", lambda: self._promote(snapshot, rank))
        return snapshot.final

    @staticmethod
    def _write_files(upload: Future, snapshot: _Snapshot, rank: int) -> None:
        upload.result()  # this rank's shards are written (DCP fsyncs them); raises if any rank failed
        ckpt.write_rank_files(snapshot.tmp, snapshot.rng)
        if rank == 0:
            # From the shards just written rather than gathered at the save step: the gather is a
            # collective (so it would stall training) and a second copy of the model in memory.
            full_model = ckpt.consolidate_model(snapshot.tmp / "dcp")
            ckpt.write_main_files(
                snapshot.tmp,
                full_model=full_model,
                trainer_state_json=snapshot.trainer_state_json,
                config_toml=snapshot.config_toml,
                tokenizer_json=snapshot.tokenizer_json,
            )

    @staticmethod
    def _promote(snapshot: _Snapshot, rank: int) -> None:
        if rank == 0:  # every rank's files are written: the agreement before this said so
            ckpt.promote(snapshot.tmp, snapshot.final, snapshot.step, ckpt.Collectives.world_size(), snapshot.keep_last)


def _agree(group: dist.ProcessGroup | None, what: str, work: Callable[[], object]) -> None:
    """Run `work` on this rank, then learn every rank's outcome: all succeed or all raise, so no
    rank is left waiting in a collective that a failed rank will never join."""
    local: Exception | None = None
    try:
        work()
    except Exception as exc:  # reported to every rank below, re-raised there
        local = exc
    errors = [None if local is None else f"{type(local).__name__}: {local}"]
    if group is not None:
        mine, errors = errors[0], [None] * dist.get_world_size(group)
        dist.all_gather_object(errors, mine, group=group)
    failed = [f"rank {rank}: {message}" for rank, message in enumerate(errors) if message is not None]
    if failed:
        raise ColossusError(f"background checkpoint save failed while {what}: " + "; ".join(failed)) from local
