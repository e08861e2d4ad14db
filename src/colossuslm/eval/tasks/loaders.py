"""Datasets of the shipped tasks, read from the JSONL files next to this file (lm-eval loads this
module by path for `custom_dataset: !function loaders.NAME`, so the tasks work from any directory
and offline)."""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).parent


def _jsonl(name: str) -> datasets.DatasetDict:
    lines = (HERE / name).read_text(encoding="utf-8").splitlines()
    return datasets.DatasetDict({"test": datasets.Dataset.from_list([json.loads(line) for line in lines if line])})


def colossus_mc(**_metadata) -> datasets.DatasetDict:
    """20 everyday multiple-choice questions: question, choices (4), answer (index)."""
    return _jsonl("colossus_mc.jsonl")


def colossus_gen(**_metadata) -> datasets.DatasetDict:
    """10 one-word questions: question, answer."""
    return _jsonl("colossus_gen.jsonl")
