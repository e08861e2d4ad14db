"""Rank 0 of `tests/test_serve_tp.py::test_tp_ranks_read_only_their_shards`: how much this
process's allocated memory grows (at its peak) while it loads its tensor-parallel shard of MODEL_DIR (a checkpoint or a
Hugging Face directory), and whether that shard equals the same slice of the model loaded whole.

Usage: python serve_tp_load_worker.py MODEL_DIR OUT_JSON
"""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import torch

from colossuslm.parallel.materialize import locate_shard
from colossuslm.serve.loading import load_for_inference
from colossuslm.serve.tensor_parallel import tensor_parallel_processes


def anonymous_bytes() -> int:
    """This process's anonymous resident memory (RssAnon): what it allocated, not the pages of the
    safetensors files it maps, which are the kernel's page cache, shared between the ranks and
    dropped under memory pressure."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


class PeakSampler:
    """The highest `anonymous_bytes()` seen while the block runs (sampled every millisecond)."""

    def __enter__(self) -> PeakSampler:
        self.peak, self._done = anonymous_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.001):
            self.peak = max(self.peak, anonymous_bytes())

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self.peak = max(self.peak, anonymous_bytes())


def main() -> None:
    model_dir, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    options = dict(path=model_dir, device="cpu", dtype="bf16", quantization="none")
    with tensor_parallel_processes(2, options, threads=1) as group:
        before = anonymous_bytes()
        with PeakSampler() as sampler:
            sharded = load_for_inference(**options, tensor_parallel=group).model
        growth = sampler.peak - before
        whole = dict(load_for_inference(model_dir, device="cpu", dtype="bf16").model.named_parameters())
        mismatched = []
        for name, param in sharded.named_parameters():
            local, _shape, indices = locate_shard(param.data)
            expected = whole[name].data[torch.meshgrid(*indices, indexing="ij")]
            if not torch.equal(local, expected):
                mismatched.append(name)
        model_bytes = sum(p.numel() * p.element_size() for p in whole.values())
    Path(out).write_text(json.dumps({"growth": growth, "model_bytes": model_bytes, "mismatched": mismatched}))


if __name__ == "__main__":
    main()
