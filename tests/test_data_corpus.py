"""The embedded default corpus (Python's own documentation) and `resolve_dataset`."""

from __future__ import annotations

import json
import time

import pytest

from colossuslm.config.schema import DataConfig
from colossuslm.data import corpus
from colossuslm.data.corpus import default_corpus_documents, default_dataset, resolve_dataset, stdlib_docstrings
from colossuslm.data.loader import TokenLoader
from colossuslm.data.prepare import prepare_dataset
from colossuslm.data.shards import verify_dataset
from colossuslm.errors import ColossusError


def test_docstrings_come_from_modules_classes_and_functions_outside_test_dirs(tmp_path):
    (tmp_path / "pkg" / "tests").mkdir(parents=True)
    (tmp_path / "idlelib").mkdir()
    (tmp_path / "pkg" / "mod.py").write_text(
        '"""Module text."""\n'
        'class Thing:\n    """Class text.\n\n    More lines.\n    """\n'
        '    def method(self):\n        """Method text."""\n'
        'async def run():\n    """Async text."""\n'
        "def bare():\n    pass\n"
    )
    (tmp_path / "pkg" / "tests" / "test_mod.py").write_text('"""Test text."""\n')
    (tmp_path / "idlelib" / "x.py").write_text('"""Idle text."""\n')
    (tmp_path / "broken.py").write_text('"""Broken text."""\ndef (:\n')
    (tmp_path / "a.py").write_text('"""A text."""\n')
    docs = list(stdlib_docstrings(tmp_path))
    assert docs == ["A text.", "Module text.", "Class text.\n\nMore lines.", "Async text.", "Method text."]


def test_default_corpus_is_real_documentation_text():
    documents = default_corpus_documents()
    size = sum(len(d.encode()) for d in documents)
    assert size > 1_000_000 and len(documents) > 3000
    assert len(set(documents)) == len(documents)
    assert any(d.startswith("JSON (JavaScript Object Notation)") for d in documents)  # json module
    assert any('The "if" statement is used for conditional execution' in d for d in documents)  # pydoc


def test_default_dataset_is_built_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("COLOSSUS_CACHE", str(tmp_path))
    with pytest.raises(ColossusError, match="vocab size 100 is too small .* set model.vocab_size"):
        default_dataset(100)
    started = time.perf_counter()
    path = default_dataset(8192, seq_len=256)
    built_in = time.perf_counter() - started
    assert path.parent == tmp_path / "datasets" and "vocab8192" in path.name
    manifest = verify_dataset(path)
    assert manifest["vocab_size"] == 8192 and manifest["dtype"] == "uint16"
    assert manifest["splits"]["train"]["tokens"] > 400_000 and manifest["splits"]["val"]["tokens"] > 10_000
    assert built_in < 30, f"preparing the default corpus took {built_in:.1f} s"

    def must_not_rebuild(*args, **kwargs):
        raise AssertionError("the cached dataset was rebuilt")

    monkeypatch.setattr(corpus, "prepare_dataset", must_not_rebuild)
    started = time.perf_counter()
    assert default_dataset(8192) == path
    assert time.perf_counter() - started < 0.5
    assert resolve_dataset(DataConfig(dataset="default", seq_len=256), 8192) == path
    inputs, targets = TokenLoader(path, "val", seq_len=256, batch_size=2).next_batch()
    assert inputs.shape == (2, 256) and int(inputs.max()) < 8192
    with pytest.raises(ColossusError, match="the val split .* fewer than seq_len \\+ 1"):
        default_dataset(8192, seq_len=100_000)  # longer than val, not train


@pytest.fixture
def small_dataset(tmp_path):
    with open(tmp_path / "d.jsonl", "w") as f:
        for i in range(200):
            f.write(json.dumps({"text": f"document {i} says something about tokens and models"}) + "\n")
    manifest = prepare_dataset(
        [tmp_path / "d.jsonl"], tmp_path / "ds", 300, val_fraction=0.2, workers=1, progress=False
    )
    return tmp_path / "ds", manifest


def test_resolve_accepts_a_prepared_directory_that_fits_the_model(small_dataset):
    path, manifest = small_dataset
    assert resolve_dataset(DataConfig(dataset=str(path), seq_len=32), manifest["vocab_size"]) == path


def test_resolve_rejects_a_vocabulary_larger_than_the_model(small_dataset):
    path, manifest = small_dataset
    size = manifest["vocab_size"]
    with pytest.raises(
        ColossusError,
        match=f"tokenized with {size} token ids but model.vocab_size = "
        f"{size - 1}; set model.vocab_size to at least {size}",
    ):
        resolve_dataset(DataConfig(dataset=str(path), seq_len=32), size - 1)


def test_resolve_rejects_sequences_longer_than_a_split(small_dataset):
    path, manifest = small_dataset
    val = manifest["splits"]["val"]["tokens"]
    with pytest.raises(ColossusError, match=f"val split .* has {val} tokens, .* lower data.seq_len"):
        resolve_dataset(DataConfig(dataset=str(path), seq_len=val), 8192)


def test_resolve_rejects_what_is_not_a_dataset(tmp_path):
    with pytest.raises(ColossusError, match="does not exist.*colossus data prepare"):
        resolve_dataset(DataConfig(dataset=str(tmp_path / "nope")), 8192)
    with pytest.raises(ColossusError, match=r"not a prepared dataset \(no manifest.json in it\); prepare it"):
        resolve_dataset(DataConfig(dataset=str(tmp_path)), 8192)
