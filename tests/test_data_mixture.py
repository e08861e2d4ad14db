"""MixtureLoader and data.mixture: proportions batch by batch, rows from the right dataset, ranks,
exact resume at another world size, weights changed at a resume, and the errors."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from colossuslm.config import load_config
from colossuslm.data.corpus import resolve_mixture
from colossuslm.data.loader import TokenLoader
from colossuslm.data.mixture import MixtureLoader
from colossuslm.data.prepare import prepare_dataset
from colossuslm.errors import ColossusError

SEQ = 16
TOPICS = {
    "fruit": "apple banana cherry plum pear grape melon lemon lime fig".split(),
    "tools": "hammer wrench saw drill chisel plane file rasp vise clamp".split(),
    "birds": "robin crow owl hawk wren finch swan duck goose heron".split(),
}


def write_docs(path: Path, words: list[str], count: int, seed: int) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(count):
            f.write(json.dumps({"text": f"{i} " + " ".join(rng.choice(words) for _ in range(12))}) + "\n")
    return path


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> dict[str, Path]:
    """Three datasets of very different sizes on one tokenizer (trained on all three), and one more
    on a tokenizer of its own."""
    root = tmp_path_factory.mktemp("mixture")
    sizes = {"fruit": 240, "tools": 120, "birds": 20}  # documents: birds wraps around first
    docs = {
        name: write_docs(root / f"{name}.jsonl", TOPICS[name], n, seed) for seed, (name, n) in enumerate(sizes.items())
    }
    args = dict(val_fraction=0.1, shard_tokens=700, workers=1, progress=False)
    prepare_dataset(list(docs.values()), root / "all", 300, **args)
    out = {name: root / name for name in TOPICS}
    for name, path in out.items():
        prepare_dataset([docs[name]], path, 300, tokenizer_path=root / "all", **args)
    prepare_dataset([docs["fruit"]], root / "own", 280, **args)
    out["own"] = root / "own"
    return out


def stream(dataset: Path, split: str) -> np.ndarray:
    manifest = json.loads((dataset / "manifest.json").read_text())
    return np.concatenate(
        [np.fromfile(dataset / s["file"], dtype=manifest["dtype"]) for s in manifest["splits"][split]["shards"]]
    ).astype(np.int64)


def is_window_of(row: torch.Tensor, tokens: np.ndarray) -> bool:
    row = row.numpy()
    return any(np.array_equal(tokens[w * SEQ : w * SEQ + SEQ + 1], row) for w in range((len(tokens) - 1) // SEQ))


def mixture(datasets, weights: dict[str, float], **kwargs) -> MixtureLoader:
    return MixtureLoader([(datasets[n], w) for n, w in weights.items()], seq_len=SEQ, seed=7, **kwargs)


def global_rows(loaders: list[MixtureLoader]) -> torch.Tensor:
    """One step of every rank's loader, rows in rank order (inputs ++ last target)."""
    rows = []
    for loader in loaders:
        inputs, targets = loader.next_batch()
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        rows.append(torch.cat([inputs, targets[:, -1:]], dim=1))
    return torch.cat(rows)


def test_each_dataset_gets_its_share_batch_by_batch_and_rows_come_from_it(datasets):
    weights = {"fruit": 5, "tools": 3, "birds": 2}
    loader = mixture(datasets, weights, batch_size=10)
    streams = [stream(datasets[n], "train") for n in weights]
    shares = np.array(list(weights.values())) / 10
    for step in range(1, 41):
        first = loader._samples_seen
        which = loader.sources_of(np.arange(first, first + 10))
        rows = global_rows([loader])
        # A low-discrepancy sequence: after every batch each share is within 2 samples of exact.
        assert np.abs(loader._drawn - shares * 10 * step).max() <= 2, loader._drawn
        if step <= 3:
            assert all(is_window_of(row, streams[s]) for row, s in zip(rows, which))
    # The smallest dataset wraps into its next epoch while the largest is still in its first.
    birds, fruit = (TokenLoader(datasets[n], "train", SEQ, 1) for n in ("birds", "fruit"))
    assert loader._drawn[2] > birds.n_windows and loader._drawn[0] < fruit.n_windows


def test_ranks_split_the_same_global_batch(datasets):
    weights = {"fruit": 1, "tools": 1, "birds": 1}
    one = mixture(datasets, weights, batch_size=8)
    two = [mixture(datasets, weights, batch_size=4, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        assert torch.equal(global_rows([one]), global_rows(two))


def test_a_restored_loader_continues_exactly_at_another_world_size(datasets):
    weights = {"fruit": 2, "tools": 1, "birds": 1}
    reference = mixture(datasets, weights, batch_size=8)
    expected = [global_rows([reference]) for _ in range(6)]
    before = [mixture(datasets, weights, batch_size=4, rank=r, world_size=2) for r in range(2)]
    for step in range(3):
        assert torch.equal(global_rows(before), expected[step])
    state = json.loads(json.dumps(before[0].state_dict()))  # as a checkpoint stores it
    assert state == before[1].state_dict()
    after = [mixture(datasets, weights, batch_size=2, rank=r, world_size=4) for r in range(4)]
    for loader in after:
        loader.load_state_dict(state)
    for step in range(3, 6):
        assert torch.equal(global_rows(after), expected[step])


def test_weights_may_change_at_a_resume_and_each_dataset_goes_on_where_it_was(datasets):
    first = mixture(datasets, {"fruit": 1, "tools": 1}, batch_size=8)
    for _ in range(4):
        first.next_batch()
    state = first.state_dict()
    drawn = {entry["path"]: entry["drawn"] for entry in state["sources"]}
    # Annealing: more tools, and birds joins.
    second = mixture(datasets, {"fruit": 1, "tools": 3, "birds": 1}, batch_size=8)
    second.load_state_dict(state)
    start = second._samples_seen
    which = second.sources_of(np.arange(start, start + 8))
    rows = global_rows([second])
    for source, name in enumerate(("fruit", "tools", "birds")):
        here = which == source
        assert here.any()
        begin = drawn.get(str(datasets[name]), 0)
        reader = TokenLoader(datasets[name], "train", SEQ, 1, seed=7)
        assert torch.equal(
            rows[torch.from_numpy(here)],
            torch.from_numpy(reader.rows(np.arange(begin, begin + here.sum())).astype(np.int64)),
        )


def test_validation_reads_each_dataset_in_order_from_the_start_again_after_reset(datasets):
    loader = mixture(datasets, {"fruit": 1, "birds": 1}, split="val", batch_size=6)
    first = global_rows([loader])
    global_rows([loader])
    loader.reset()
    assert torch.equal(global_rows([loader]), first)
    which = loader.sources_of(np.arange(6))
    fruit_val = stream(datasets["fruit"], "val")
    rows = first[torch.from_numpy(which == 0)]
    assert torch.equal(rows[0], torch.from_numpy(fruit_val[: SEQ + 1]))  # the first window, unshuffled


def test_validation_is_stratified_by_dataset(datasets):
    loader = mixture(datasets, {"fruit": 6, "tools": 3, "birds": 1}, split="val", batch_size=2, rank=1, world_size=2)
    parts = loader.validation_parts(8)
    assert [(label, round(w, 2), n) for label, w, _, n in parts] == [
        ("fruit", 0.6, 5),
        ("tools", 0.3, 2),
        ("birds", 0.1, 1),
    ]
    fruit = parts[0][2]  # each dataset's own val split, read by this rank's share
    assert (fruit.split, fruit.rank, fruit.world_size, fruit.batch_size) == ("val", 1, 2, 2)
    assert fruit.dataset_dir == datasets["fruit"] and loader.validation_parts(8)[0][2] is fruit


def test_a_single_dataset_state_and_a_mixture_state_refuse_each_other(datasets):
    single = TokenLoader(datasets["fruit"], "train", SEQ, 4)
    mixed = mixture(datasets, {"fruit": 1, "tools": 1}, batch_size=4)
    with pytest.raises(ColossusError, match="one data.dataset and this run reads a data.mixture"):
        mixed.load_state_dict(single.state_dict())
    with pytest.raises(ColossusError, match="reading a data.mixture and this run reads one data.dataset"):
        single.load_state_dict(mixed.state_dict())
    with pytest.raises(ColossusError, match="seq_len"):
        MixtureLoader([(datasets["fruit"], 1)], seq_len=SEQ * 2).load_state_dict(mixed.state_dict())


def test_mixture_settings_that_cannot_work_are_clear_errors(datasets):
    def resolved(table: str, *more: str):
        cfg = load_config([], [f"data.mixture={table}", "data.seq_len=16", *more])
        return resolve_mixture(cfg.data, 300)

    fruit, tools, own = (str(datasets[n]) for n in ("fruit", "tools", "own"))
    assert [w for _, w in resolved(f'{{"{fruit}" = 3, "{tools}" = 1}}')] == [3.0, 1.0]
    with pytest.raises(ColossusError, match="another tokenizer.*--tokenizer"):
        resolved(f'{{"{fruit}" = 1, "{own}" = 1}}')
    with pytest.raises(ColossusError, match="twice"):
        resolved(f'{{"{fruit}" = 1, "{fruit}/." = 1}}')
    with pytest.raises(ColossusError, match="not a prepared dataset"):
        resolved(f'{{"{fruit}" = 1, "{Path(fruit).parent}" = 1}}')
    with pytest.raises(ColossusError, match="weight must be a finite number > 0"):
        resolved(f'{{"{fruit}" = -1}}')
    with pytest.raises(ColossusError, match="not both"):
        resolved(f'{{"{fruit}" = 1}}', f"data.dataset={tools}")
    with pytest.raises(ColossusError, match="chat"):
        resolved(f'{{"{fruit}" = 1}}', "data.format=chat")
    with pytest.raises(ColossusError, match="table of name = number"):
        resolved('["a", "b"]')


def test_a_run_trains_on_a_mixture_and_resumes_it(datasets, tmp_path):
    table = f'{{"{datasets["fruit"]}" = 3, "{datasets["birds"]}" = 1}}'
    overrides = [
        f"data.mixture={table}",
        "data.seq_len=16",
        "model.vocab_size=320",
        "model.d_model=32",
        "model.n_layers=1",
        "model.n_heads=2",
        "model.n_kv_heads=2",
        "model.ffn_hidden=64",
        "train.dtype=fp32",
        "train.progress=false",
        "train.micro_batch_size=4",
        "train.warmup_steps=1",
        "train.log_every=1",
        "train.eval_every=2",
        "train.eval_batches=2",
        "train.ckpt_every=2",
        f"train.run_dir={tmp_path}",
        "train.name=mix",
    ]

    def train(steps: int) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "colossuslm.cli.main", "train", "--no-progress", f"--set=train.steps={steps}"]
        done = subprocess.run(cmd + [f"--set={o}" for o in overrides], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done

    assert f"data: mixture of 2 datasets: {datasets['fruit']} 75.0 %" in train(2).stdout
    train(4)  # resumes from step 2's checkpoint
    records = [json.loads(line) for line in (tmp_path / "mix" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    for r in (r for r in records if "val_loss" in r):  # the mixture's loss, stratified by dataset
        assert r["val_loss"] == pytest.approx(0.75 * r["val_loss/fruit"] + 0.25 * r["val_loss/birds"])
    assert [r["step"] for r in records if "val_loss" in r] == [0, 2, 4]
    state = json.loads(next((tmp_path / "mix" / "checkpoints").glob("step_00000004/trainer_state.json")).read_text())
    sources = state["train_loader"]["sources"]
    assert state["train_loader"]["kind"] == "mixture" and state["train_loader"]["samples_seen"] == 16
    drawn = [s["drawn"] for s in sources]
    assert sum(drawn) == 16 and abs(drawn[0] - 12) <= 1, drawn
