"""Rank 0 of `tests/test_serve_tp.py`: greedy tokens from one checkpoint served with tp=1 and
with tp=2 (this process spawns rank 1 through `serve.tensor_parallel`, gloo on the CPU), plain
and with n-gram speculative decoding, and the wall time of each.

Usage: python serve_tp_worker.py CKPT OUT_JSON
"""

from __future__ import annotations

import json
import sys
import time

import torch

from colossuslm.serve.engine import EngineConfig, LLMEngine
from colossuslm.serve.loading import load_for_inference
from colossuslm.serve.model_runner import StepItem
from colossuslm.serve.sampling import SamplingParams
from colossuslm.serve.tensor_parallel import tensor_parallel_processes

PROMPTS = [[5, 17, 42, 9], [100, 3, 3, 3, 3, 77, 12, 250, 8, 1, 2], [7], list(range(20, 60))]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
# Seeded sampling draws from rank 0's generators: identical tokens need near-identical probabilities.
SAMPLED = [SamplingParams(max_tokens=24, temperature=1.0, seed=seed, ignore_eos=True) for seed in range(len(PROMPTS))]
CASES = {
    # whole-context blocks (decode reads the cache in place); paged 4-token blocks with prefix caching
    # and prompts chunked 16 tokens a step; n-gram speculation (verification spans); seeded sampling
    "plain": (EngineConfig(max_num_seqs=4, enable_prefix_caching=False, kv_cache_tokens=4 * 128), GREEDY),
    "paged": (EngineConfig(max_num_seqs=4, block_size=4, max_num_batched_tokens=16), GREEDY),
    "ngram": (EngineConfig(max_num_seqs=4, speculative="ngram", enable_prefix_caching=False), GREEDY),
    "sampled": (EngineConfig(max_num_seqs=4, enable_prefix_caching=False), SAMPLED),
}


def generate(loaded, draft) -> dict:
    """`draft`: an unsharded model, run by rank 0 alone as the draft of --speculative draft."""
    results = {}
    cases = CASES | {"draft": (EngineConfig(max_num_seqs=4, speculative="draft"), GREEDY)}
    for name, (config, params) in cases.items():
        engine = LLMEngine.from_loaded(loaded, config, draft if name == "draft" else None)
        start = time.perf_counter()
        results[name] = [r.token_ids for r in engine.generate(PROMPTS, params)]
        results[f"{name}_s"] = time.perf_counter() - start
    return results


def main() -> None:
    ckpt, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    draft = load_for_inference(ckpt, device="cpu").model  # the model as its own draft: all accepted
    results = {"tp1": generate(load_for_inference(ckpt, device="cpu"), draft)}
    options = dict(path=ckpt, device="cpu", dtype="auto", quantization="none")
    with tensor_parallel_processes(2, options, threads=1) as group:
        loaded = load_for_inference(**options, tensor_parallel=group)
        wk = loaded.model.layers["0"].attention.wk.weight.to_local()
        results["kv_heads_per_rank"] = wk.shape[0] // loaded.config.model.resolved_head_dim
        results["tp2"] = generate(loaded, draft)
        # A step that fails (here in its layout, on every rank alike) leaves the group serving.
        engine = LLMEngine.from_loaded(loaded, CASES["plain"][0])
        try:
            engine.runner.execute_step([StepItem([], 0, [0])])
        except ValueError:
            results["bad_step_raised"] = True
        results["after_bad_step"] = [r.token_ids for r in engine.generate(PROMPTS, GREEDY)]
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main()
