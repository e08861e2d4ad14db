"""`prepare_dataset`: shards + manifest integrity, splits, dtype, inputs and every bad-input case."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import colossuslm.data.prepare as prepare_module
from colossuslm.data.prepare import prepare_dataset
from colossuslm.data.shards import dtype_for_vocab, verify_dataset
from colossuslm.data.tokenizer import EOS_TOKEN, load_tokenizer
from colossuslm.errors import ColossusError

WORDS = (
    "language models predict the next token from the tokens before it . training data is "
    "cut into shards Tiếng Việt có dấu اللغة العربية 中文 🤖"
).split()


def sentence_docs(count: int, words: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"doc {i}: " + " ".join(rng.choice(WORDS) for _ in range(words)) for i in range(count)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def prepare(inputs, out, **kwargs) -> dict:
    kwargs = {"workers": 1, "progress": False, **kwargs}
    return prepare_dataset(inputs, out, kwargs.pop("vocab_size", 400), **kwargs)


def split_documents(out: Path, manifest: dict, split: str) -> list[str]:
    """Decode a split's shards back into its documents (split on the eos separator)."""
    tokens = np.concatenate(
        [np.fromfile(out / s["file"], dtype=manifest["dtype"]) for s in manifest["splits"][split]["shards"]]
    )
    tokenizer = load_tokenizer(out)
    cuts = np.flatnonzero(tokens == manifest["eos_id"])
    pieces = np.split(tokens, cuts + 1)
    eos = manifest["eos_id"]
    # A piece ends with eos unless it is a document cut at the end of the split.
    return [tokenizer.decode((p[:-1] if p[-1] == eos else p).tolist()) for p in pieces if p.size]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict, list[str]]:
    root = tmp_path_factory.mktemp("prepared")
    docs = sentence_docs(300, 30)
    write_jsonl(root / "docs.jsonl", docs)
    out = root / "ds"
    manifest = prepare([root / "docs.jsonl"], out, shard_tokens=3000, val_fraction=0.05)
    return out, manifest, docs


def test_manifest_describes_every_shard_exactly(dataset):
    out, manifest, _ = dataset
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert manifest["dtype"] == "uint16" and manifest["eos_id"] == 0
    assert manifest["special_tokens"]["<|im_start|>"] == 2
    assert len(manifest["splits"]["train"]["shards"]) > 2  # shard_tokens=3000 forces several
    for split in ("train", "val"):
        entries = manifest["splits"][split]["shards"]
        assert sum(e["tokens"] for e in entries) == manifest["splits"][split]["tokens"] > 0
        for entry in entries:
            data = (out / entry["file"]).read_bytes()
            assert len(data) == 2 * entry["tokens"] and entry["tokens"] <= 3000
            assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    tokenizer_bytes = (out / "tokenizer.json").read_bytes()
    assert hashlib.sha256(tokenizer_bytes).hexdigest() == manifest["tokenizer"]["sha256"]
    assert verify_dataset(out) == manifest
    assert sorted(p.name for p in out.iterdir() if not p.name.endswith(".bin")) == ["manifest.json", "tokenizer.json"]


def test_splits_are_disjoint_and_together_hold_every_document(dataset):
    out, manifest, docs = dataset
    train, val = split_documents(out, manifest, "train"), split_documents(out, manifest, "val")
    assert sorted(train + val) == sorted(docs)
    assert not set(train) & set(val)
    assert 5 <= len(val) <= 25  # about 5% of 300, spread by the golden-ratio sequence
    assert manifest["splits"]["val"]["documents"] == len(val) and not manifest["val_from_tail"]


@pytest.mark.parametrize(
    "victim, damage, message",
    [
        ("train_00001.bin", "flip", "shard train_00001.bin has sha256"),
        ("val_00000.bin", "truncate", "shard val_00000.bin has .* bytes"),
        ("train_00002.bin", "delete", "shard train_00002.bin is missing"),
        ("tokenizer.json", "flip", "tokenizer.json does not match"),
    ],
)
def test_verify_names_the_damaged_file(dataset, tmp_path, victim, damage, message):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(dataset[0], out)
    path = out / victim
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(bytes(data[:-2]))
    else:
        path.unlink()
    with pytest.raises(ColossusError, match=message):
        verify_dataset(out)


def test_verify_rejects_a_directory_without_manifest(tmp_path):
    with pytest.raises(ColossusError, match="not a prepared dataset .*colossus data prepare"):
        verify_dataset(tmp_path)


def test_dtype_is_uint16_up_to_65536_ids_then_uint32():
    assert dtype_for_vocab(8192) == np.uint16
    assert dtype_for_vocab(2**16) == np.uint16  # ids 0..65535
    assert dtype_for_vocab(2**16 + 1) == np.uint32


def test_large_vocabulary_is_stored_as_uint32(tmp_path):
    # A foreign tokenizer with 70,000 tokens: the added special tokens land above 65,535.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {char: i for i, char in enumerate(alphabet)}
    vocab.update({f"filler{i}": len(alphabet) + i for i in range(70_000 - len(alphabet))})
    big = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    big.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    big.decoder = decoders.ByteLevel()
    big.save(str(tmp_path / "big.json"))
    docs = sentence_docs(40, 10)
    manifest = prepare(
        [write_jsonl(tmp_path / "d.jsonl", docs)],
        tmp_path / "ds",
        tokenizer_path=tmp_path / "big.json",
        vocab_size=0,
        val_fraction=0.1,
    )
    assert manifest["dtype"] == "uint32" and manifest["vocab_size"] == 70_004
    assert manifest["eos_id"] >= 70_000 and manifest["tokenizer"]["added_special_tokens"] == [
        "<|endoftext|>",
        "<|pad|>",
        "<|im_start|>",
        "<|im_end|>",
    ]
    shard = manifest["splits"]["train"]["shards"][0]
    assert (tmp_path / "ds" / shard["file"]).stat().st_size == 4 * shard["tokens"]
    train = split_documents(tmp_path / "ds", manifest, "train")
    assert sorted(train + split_documents(tmp_path / "ds", manifest, "val")) == sorted(docs)


def test_given_tokenizer_is_copied_byte_for_byte(dataset, tmp_path):
    source = dataset[0] / "tokenizer.json"
    manifest = prepare(
        [write_jsonl(tmp_path / "d.jsonl", sentence_docs(50, 10))],
        tmp_path / "ds",
        tokenizer_path=source,
        vocab_size=8192,
    )
    assert (tmp_path / "ds" / "tokenizer.json").read_bytes() == source.read_bytes()
    assert manifest["tokenizer"]["trained"] is False and manifest["tokenizer"]["added_special_tokens"] == []
    with pytest.raises(ColossusError, match="more than the vocab size 300; raise --vocab-size"):
        prepare([tmp_path / "d.jsonl"], tmp_path / "ds2", tokenizer_path=source, vocab_size=300)


def test_worker_processes_write_the_same_bytes_as_one_process(tmp_path):
    # ~1.3 MB of input cut into several tasks (the text file too), so two spawned workers share it.
    write_jsonl(tmp_path / "a.jsonl", sentence_docs(2500, 40, seed=1))
    book = " ".join(sentence_docs(2500, 40, seed=2))
    (tmp_path / "b.txt").write_text(book)
    one = prepare([tmp_path / "a.jsonl", tmp_path / "b.txt"], tmp_path / "one", workers=1)
    two = prepare([tmp_path / "a.jsonl", tmp_path / "b.txt"], tmp_path / "two", workers=2)
    assert two["stats"]["workers"] == 2
    assert one["splits"] == two["splits"] and one["tokenizer"]["sha256"] == two["tokenizer"]["sha256"]
    # The text file, tokenized in pieces, is still exactly one document.
    documents = [*split_documents(tmp_path / "two", two, "train"), *split_documents(tmp_path / "two", two, "val")]
    assert len(documents) == 2501 and book in documents


def test_bad_bytes_late_in_a_large_text_file_skip_the_whole_file(tmp_path):
    write_jsonl(tmp_path / "good.jsonl", sentence_docs(50, 20))
    (tmp_path / "big.txt").write_bytes(b"plain ascii text\n" * 40_000 + b"caf\xe9\n")
    manifest = prepare([tmp_path / "good.jsonl", tmp_path / "big.txt"], tmp_path / "ds")
    [skipped] = manifest["sources"]["skipped_files"]
    assert skipped["reason"].startswith(f"not valid UTF-8 (undecodable byte at offset {17 * 40_000 + 3})")
    assert manifest["sources"]["files_used"] == 1
    assert all("plain ascii" not in d for d in split_documents(tmp_path / "ds", manifest, "train"))


def test_directories_are_searched_recursively_ignoring_hidden_files(tmp_path):
    (tmp_path / "corpus" / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "corpus" / ".git").mkdir()
    docs = sentence_docs(4, 200)
    (tmp_path / "corpus" / "a.txt").write_text(docs[0])
    (tmp_path / "corpus" / "sub" / "b.md").write_text(docs[1])
    (tmp_path / "corpus" / "sub" / "deeper" / "c").write_text(docs[2])
    (tmp_path / "corpus" / ".git" / "config").write_text(docs[3])
    (tmp_path / "corpus" / ".hidden.txt").write_text(docs[3])
    manifest = prepare([tmp_path / "corpus", tmp_path / "corpus" / "a.txt"], tmp_path / "ds")
    assert manifest["sources"]["files_used"] == 3  # a.txt named twice counts once
    assert manifest["sources"]["files_skipped"] == 0
    out = tmp_path / "ds"
    found = split_documents(out, manifest, "train") + split_documents(out, manifest, "val")
    # Three documents; with so few, val is the tail of the last one, so compare the joined text.
    assert "".join(found) == "".join(docs[:3])
    assert manifest["val_from_tail"] and manifest["splits"]["val"]["tokens"] > 0

    # A dataset prepared into the input folder is not read back as text the next time.
    prepare([tmp_path / "corpus"], tmp_path / "corpus" / "ds")
    again = prepare([tmp_path / "corpus"], tmp_path / "ds2")
    assert again["splits"] == manifest["splits"]
    assert again["sources"]["skipped_files"] == [
        {"path": str(tmp_path / "corpus" / "ds"), "reason": "a prepared dataset directory, not text"}
    ]


def test_jsonl_and_parquet_read_the_named_field(tmp_path):
    docs = sentence_docs(60, 12)
    write_jsonl(tmp_path / "a.jsonl", docs[:30], field="content")
    pq.write_table(pa.table({"content": docs[30:], "n": list(range(30))}), tmp_path / "b.parquet", row_group_size=7)
    manifest = prepare(
        [tmp_path / "a.jsonl", tmp_path / "b.parquet"], tmp_path / "ds", jsonl_field="content", val_fraction=0.1
    )
    assert manifest["sources"]["files_used"] == 2 and manifest["jsonl_field"] == "content"
    found = [*split_documents(tmp_path / "ds", manifest, "train"), *split_documents(tmp_path / "ds", manifest, "val")]
    assert sorted(found) == sorted(docs)


def test_bad_records_are_counted_and_the_rest_of_the_file_kept(tmp_path):
    good = sentence_docs(40, 12)
    lines = [json.dumps({"text": d}) for d in good[:20]]
    lines += [
        '{"text": "unterminated',
        json.dumps({"body": "x"}),
        json.dumps(["a list"]),
        json.dumps({"text": 7}),
        json.dumps({"text": "  "}),
        "",
        '{"text": "also bad"',
    ]
    lines += [json.dumps({"text": d}) for d in good[20:]]
    (tmp_path / "d.jsonl").write_bytes("\n".join(lines).encode() + b"\n" + b'{"text": "\xff"}\n')
    manifest = prepare([tmp_path / "d.jsonl"], tmp_path / "ds", val_fraction=0.1)
    [entry] = manifest["sources"]["skipped_records"]
    assert entry["reasons"] == {
        "malformed JSON": 2,
        "missing field 'text'": 1,
        "not a JSON object": 1,
        "field 'text' is not a string": 1,
        "empty text": 1,
        "invalid UTF-8": 1,
    }
    assert entry["first_at"]["malformed JSON"] == 21 and entry["first_at"]["invalid UTF-8"] == 48
    assert entry["numbered_by"] == "line" and manifest["sources"]["records_skipped"] == 7
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 40


def test_unusable_files_are_skipped_with_reasons(tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    docs = sentence_docs(30, 30)
    write_jsonl(inputs / "good.jsonl", docs)
    (inputs / "empty.txt").write_bytes(b"")
    (inputs / "blank.txt").write_text(" \n\t\n")
    (inputs / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (inputs / "late_nul.txt").write_bytes(b"a" * 10_000 + b"\x00 tail")
    (inputs / "latin1.txt").write_bytes("café".encode("latin-1"))
    write_jsonl(inputs / "wrong_field.jsonl", docs[:3], field="body")
    pq.write_table(pa.table({"body": ["x"]}), inputs / "wrong.parquet")
    (inputs / "fake.parquet").write_text("not parquet")
    manifest = prepare([inputs], tmp_path / "ds")
    reasons = {Path(s["path"]).name: s["reason"] for s in manifest["sources"]["skipped_files"]}
    assert reasons == {
        "empty.txt": "empty file",
        "blank.txt": "contains only whitespace",
        "image.png": "binary file (contains NUL bytes)",
        "late_nul.txt": "binary file (NUL byte at offset 10000)",
        "latin1.txt": "not valid UTF-8 (undecodable byte at offset 3); convert it to UTF-8 first",
        "wrong_field.jsonl": "no usable records (3 missing field 'text')",
        "wrong.parquet": "no column 'text' (columns: body); choose one with --field",
        "fake.parquet": reasons["fake.parquet"],
    }
    assert reasons["fake.parquet"].startswith("not a readable Parquet file")
    assert manifest["sources"]["files_used"] == 1 and manifest["sources"]["files_skipped"] == 8


def test_everything_skipped_is_an_error_listing_each_reason(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "empty.txt").write_bytes(b"")
    (tmp_path / "in" / "data.bin").write_bytes(b"\x00\x01\x02")
    write_jsonl(tmp_path / "in" / "x.jsonl", ["a", "b"], field="body")
    with pytest.raises(ColossusError, match="every input file was skipped") as error:
        prepare([tmp_path / "in"], tmp_path / "ds")
    message = str(error.value)
    assert "data.bin: binary file" in message and "empty.txt: empty file" in message
    assert "x.jsonl: no usable records (2 missing field 'text')" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # nothing written


@pytest.mark.parametrize(
    "inputs, message",
    [
        ([], "no inputs given"),
        (["missing.txt"], "input .*missing.txt does not exist"),
        (["empty_dir"], "no input files found in .*empty_dir"),
    ],
)
def test_missing_inputs_are_errors(tmp_path, inputs, message):
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ColossusError, match=message):
        prepare([tmp_path / i for i in inputs], tmp_path / "ds")


def test_too_small_corpus_is_an_error(tmp_path):
    (tmp_path / "tiny.txt").write_text("hi")
    with pytest.raises(ColossusError, match="only 3 tokens .*too few to hold out a validation split"):
        prepare([tmp_path / "tiny.txt"], tmp_path / "ds")
    assert not (tmp_path / "ds").exists()


def test_a_single_document_still_gets_a_disjoint_validation_tail(tmp_path):
    text = " ".join(sentence_docs(50, 20))
    (tmp_path / "book.txt").write_text(text)
    manifest = prepare([tmp_path / "book.txt"], tmp_path / "ds", val_fraction=0.1)
    train, val = manifest["splits"]["train"]["tokens"], manifest["splits"]["val"]["tokens"]
    assert manifest["val_from_tail"] and val == pytest.approx(0.1 * (train + val), abs=2)
    tokens = np.concatenate(
        [
            np.fromfile(tmp_path / "ds" / s["file"], dtype=np.uint16)
            for split in ("train", "val")
            for s in manifest["splits"][split]["shards"]
        ]
    )
    tokenizer = load_tokenizer(tmp_path / "ds")
    assert tokenizer.decode(tokens.tolist(), skip_special_tokens=False) == text + EOS_TOKEN


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"vocab_size": 100}, "vocab size 100 is too small"),
        ({"val_fraction": 0.0}, "validation fraction 0.0 is invalid"),
        ({"val_fraction": 0.6}, "validation fraction 0.6 is invalid"),
        ({"shard_tokens": 0}, "shard size 0 tokens is invalid"),
        ({"workers": -1}, "workers = -1 is invalid"),
    ],
)
def test_bad_arguments_are_errors(tmp_path, kwargs, message):
    (tmp_path / "a.txt").write_text("some text " * 100)
    with pytest.raises(ColossusError, match=message):
        prepare([tmp_path / "a.txt"], tmp_path / "ds", **kwargs)


def test_existing_output_is_never_overwritten(dataset, tmp_path):
    (tmp_path / "a.txt").write_text("some text " * 100)
    before = (dataset[0] / "manifest.json").read_text()
    with pytest.raises(ColossusError, match="already exists and is not an empty directory"):
        prepare([tmp_path / "a.txt"], dataset[0])
    assert (dataset[0] / "manifest.json").read_text() == before
    (tmp_path / "empty_target").mkdir()
    prepare([tmp_path / "a.txt"], tmp_path / "empty_target")  # an empty directory is fine
    assert (tmp_path / "empty_target" / "manifest.json").is_file()


def test_interrupted_prepare_leaves_nothing_behind(tmp_path, monkeypatch):
    (tmp_path / "in").mkdir()
    write_jsonl(tmp_path / "in" / "d.jsonl", sentence_docs(100, 10))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "write_manifest", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare([tmp_path / "in"], tmp_path / "out" / "ds")
    assert list((tmp_path / "out").iterdir()) == []  # no dataset and no temporary directory
