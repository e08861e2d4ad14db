"""The embedded default corpus, and turning `data.dataset` into a prepared dataset directory.

Real English prose is on every machine that has Python, no download needed: the docstrings of
the standard library (modules, classes, functions; ~1.7 MB) and the language reference topics that
`help()` shows (`pydoc_data.topics`, ~0.5 MB). Each docstring or topic is one document.
It is prepared once per (corpus version, vocab size, Python version) and cached under
$COLOSSUS_CACHE (default ~/.cache/colossuslm).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import os
import sys
import sysconfig
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from colossuslm.config.schema import DataConfig
from colossuslm.data.prepare import prepare_dataset
from colossuslm.data.shards import MANIFEST_FILE, SPLITS, read_manifest
from colossuslm.data.tokenizer import MIN_VOCAB_SIZE
from colossuslm.errors import ColossusError

CORPUS_VERSION = 1  # bump when the extraction below changes, so caches are rebuilt
DEFAULT_VAL_FRACTION = 0.05  # the corpus is small: 5% gives evaluation tens of thousands of tokens
_SKIPPED_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}


def stdlib_docstrings(stdlib_dir: str | Path | None = None) -> Iterator[str]:
    """Docstrings of every module, class and function in the standard library's .py files,
    in a fixed order (sorted paths, then source order)."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in _SKIPPED_DIRS)
        for name in sorted(files):
            if name.endswith(".py"):
                yield from _docstrings_in(Path(directory) / name)


def _docstrings_in(path: Path) -> Iterator[str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. SyntaxWarning for old escape sequences
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return  # a file this Python cannot parse is simply not part of the corpus
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            docstring = ast.get_docstring(node, clean=True)
            if docstring and docstring.strip():
                yield docstring


def reference_topics() -> Iterator[str]:
    """The Python reference documentation topics shown by `help()`, in sorted topic order."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions package it separately
        return
    for name in sorted(topics):
        if topics[name].strip():
            yield topics[name]


def default_corpus_documents() -> list[str]:
    """All documents of the default corpus, exact duplicates removed (so none is in both splits)."""
    documents = list(dict.fromkeys([*stdlib_docstrings(), *reference_topics()]))
    if sum(map(len, documents)) < 100_000:
        raise ColossusError(
            f"the default corpus needs the Python standard library's .py sources, but "
            f"{sysconfig.get_paths()['stdlib']} yields only {len(documents)} docstrings; prepare a "
            f"dataset with `colossus data prepare` and set data.dataset to its directory"
        )
    return documents


def cache_root() -> Path:
    return Path(os.environ.get("COLOSSUS_CACHE") or Path.home() / ".cache" / "colossuslm")


def default_dataset(vocab_size: int, seq_len: int | None = None) -> Path:
    """The default corpus prepared with a `vocab_size` tokenizer; built on first use, then cached.

    With `seq_len`, also checks that both splits hold at least one sequence.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ColossusError(
            f"vocab size {vocab_size} is too small for the default corpus's byte-level "
            f"tokenizer, which needs at least {MIN_VOCAB_SIZE}; set model.vocab_size "
            f"to e.g. 8192"
        )
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    target = cache_root() / "datasets" / f"pydocs-v{CORPUS_VERSION}-py{python}-vocab{vocab_size}"
    if not (target / MANIFEST_FILE).is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Several ranks (or runs) may ask at once: one builds, the others wait and reuse it.
        with _exclusive_lock(target.parent / f"{target.name}.lock"):
            if not (target / MANIFEST_FILE).is_file():
                _build_default(target, vocab_size)
    _check_sequences_fit(target, read_manifest(target), seq_len)
    return target


def _build_default(target: Path, vocab_size: int) -> None:
    print(
        f"colossus: preparing the default corpus (Python's documentation) in {target}; this happens once",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory(prefix="colossus-corpus-") as scratch:
        corpus_file = Path(scratch) / "pydocs.jsonl"
        with open(corpus_file, "w", encoding="utf-8") as f:
            for document in default_corpus_documents():
                f.write(json.dumps({"text": document}, ensure_ascii=False) + "\n")
        prepare_dataset([corpus_file], target, vocab_size, val_fraction=DEFAULT_VAL_FRACTION)


@contextlib.contextmanager
def _exclusive_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent builders still end safely (the rename is atomic)
        yield
        return
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resolve_dataset(data_cfg: DataConfig, vocab_size: int) -> Path:
    """The prepared dataset directory for `data.dataset`: "default" builds/reuses the embedded corpus;
    anything else must be a directory from `colossus data prepare` whose vocabulary fits the model."""
    if data_cfg.dataset == "default":
        return default_dataset(vocab_size, data_cfg.seq_len)
    path = Path(data_cfg.dataset).expanduser()
    if path.exists() and not (path / MANIFEST_FILE).is_file():
        raise ColossusError(
            f"data.dataset = {path} is not a prepared dataset (no {MANIFEST_FILE} in it); prepare it "
            f"first with `colossus data prepare {path} --out DIR` and set data.dataset = DIR"
        )
    manifest = read_manifest(path)
    if manifest["vocab_size"] > vocab_size:
        raise ColossusError(
            f"dataset {path} was tokenized with {manifest['vocab_size']} token ids but "
            f"model.vocab_size = {vocab_size}; set model.vocab_size to at least {manifest['vocab_size']}"
        )
    _check_sequences_fit(path, manifest, data_cfg.seq_len)
    return path


def resolve_mixture(data_cfg: DataConfig, vocab_size: int) -> list[tuple[Path, float]]:
    """[(prepared dataset directory, weight)] for `data.mixture`, each resolved as `data.dataset`
    would be; they must be distinct and tokenized by one tokenizer (the same ids mean the same text)."""
    sources: list[tuple[Path, float]] = []
    for name, weight in data_cfg.mixture.items():
        one = dataclasses.replace(data_cfg, dataset=name, mixture={})
        sources.append((resolve_dataset(one, vocab_size), weight))
    seen: dict[Path, str] = {}
    for (path, _), name in zip(sources, data_cfg.mixture):
        real = path.resolve()
        if real in seen:
            raise ColossusError(f"data.mixture names {path} twice ({seen[real]!r} and {name!r})")
        seen[real] = name
    first, tokenizer = sources[0][0], read_manifest(sources[0][0])["tokenizer"]["sha256"]
    for path, _ in sources[1:]:
        if read_manifest(path)["tokenizer"]["sha256"] != tokenizer:
            raise ColossusError(
                f"data.mixture: {path} was tokenized with another tokenizer than {first}; prepare every "
                f"dataset of a mixture with one tokenizer: `colossus data prepare INPUT --out DIR --tokenizer {first}`"
            )
    return sources


def _check_sequences_fit(path: Path, manifest: dict, seq_len: int | None) -> None:
    if seq_len is None:
        return
    for split in SPLITS:
        tokens = manifest["splits"][split]["tokens"]
        if tokens < seq_len + 1:
            raise ColossusError(
                f"the {split} split of {path} has {tokens} tokens, fewer than seq_len + 1 = "
                f"{seq_len + 1} needed for one sequence; lower data.seq_len or use a larger dataset"
            )
