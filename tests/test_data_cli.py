"""`colossus data prepare|verify` through the real CLI entry point."""

from __future__ import annotations

import json
import random

import pytest

from colossuslm.cli.main import build_parser, main

WORDS = "the command line prepares shards and prints what it did Tiếng Việt 中文".split()


@pytest.fixture
def inputs(tmp_path):
    rng = random.Random(0)
    folder = tmp_path / "in"
    folder.mkdir()
    with open(folder / "docs.jsonl", "w") as f:
        for _ in range(300):
            f.write(json.dumps({"body": " ".join(rng.choice(WORDS) for _ in range(20))}) + "\n")
        f.write("{broken\n")
    (folder / "blob.bin").write_bytes(b"\x00\x01\x02\x03")
    return folder


def test_data_command_is_registered():
    assert "data" in build_parser().format_help()


def test_prepare_prints_a_summary_and_verify_accepts_the_result(inputs, tmp_path, capsys):
    out = tmp_path / "ds"
    code = main(
        [
            "data",
            "prepare",
            str(inputs),
            "--out",
            str(out),
            "--vocab-size",
            "300",
            "--field",
            "body",
            "--val-fraction",
            "0.1",
            "--workers",
            "1",
            "--shard-tokens",
            "2000",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    manifest = json.loads((out / "manifest.json").read_text())
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert manifest["vocab_size"] <= 300 and manifest["jsonl_field"] == "body"
    assert len(train["shards"]) > 1
    assert f"documents  300 (train {train['documents']}, val {val['documents']})" in printed
    assert f"tokens     train {train['tokens']:,} ({len(train['shards'])} shards)" in printed
    assert "blob.bin: binary file (contains NUL bytes)" in printed
    assert "docs.jsonl: 1 malformed JSON (first at line 301)" in printed
    assert "MB/s" in printed

    assert main(["data", "verify", str(out)]) == 0
    assert "OK" in capsys.readouterr().out

    # Reusing that tokenizer: no --vocab-size needed, and the ids come out the same.
    again = tmp_path / "again"
    assert (
        main(
            [
                "data",
                "prepare",
                str(inputs),
                "--out",
                str(again),
                "--tokenizer",
                str(out / "tokenizer.json"),
                "--field",
                "body",
                "--val-fraction",
                "0.1",
                "--workers",
                "1",
                "--shard-tokens",
                "2000",
            ]
        )
        == 0
    )
    assert json.loads((again / "manifest.json").read_text())["splits"] == manifest["splits"]
    assert (
        main(
            [
                "data",
                "prepare",
                str(inputs),
                "--out",
                str(tmp_path / "x"),
                "--tokenizer",
                str(out),
                "--vocab-size",
                "261",
                "--field",
                "body",
            ]
        )
        == 2
    )
    assert "raise --vocab-size to at least" in capsys.readouterr().err


def test_verify_reports_a_corrupt_shard_and_exits_non_zero(inputs, tmp_path, capsys):
    out = tmp_path / "ds"
    assert (
        main(
            [
                "data",
                "prepare",
                str(inputs / "docs.jsonl"),
                "--out",
                str(out),
                "--vocab-size",
                "300",
                "--field",
                "body",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    shard = out / "train_00000.bin"
    data = bytearray(shard.read_bytes())
    data[10] ^= 1
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["data", "verify", str(out)]) == 2
    assert "train_00000.bin has sha256" in capsys.readouterr().err


def test_user_mistakes_exit_with_a_message_not_a_traceback(inputs, tmp_path, capsys):
    code = main(["data", "prepare", str(inputs / "blob.bin"), "--out", str(tmp_path / "ds")])
    error = capsys.readouterr().err
    assert code == 2
    assert error.startswith("colossus data: error: every input file was skipped")
    assert "Traceback" not in error
    assert main(["data", "prepare", str(inputs), "--out", str(tmp_path / "ds"), "--vocab-size", "10"]) == 2
    assert "vocab size 10 is too small" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()
