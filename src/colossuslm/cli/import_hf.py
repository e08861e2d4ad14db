"""`colossus import hf DIR --out runs/NAME`: a Hugging Face model directory as a run directory.

The run directory holds one checkpoint in the trainer's format (fp32 model.safetensors,
config.toml, tokenizer.json, trainer_state.json, manifest.json, promoted by a rename), so
`colossus sample/serve/chat/export runs/NAME` and `train.init_from=runs/NAME` take it as they take
a trained one. It has no DCP shards: the trainer's init_from reads model.safetensors directly.
Beside tokenizer.json it keeps the model's tokenizer files (special tokens, chat template,
generation stop ids: `data/tokenizer.py` TOKENIZER_SIDE_FILES), which chat, serve, fine-tuning
and export read. Every command above also takes the Hugging Face directory itself; importing
once saves re-reading and checking it on every start.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and the model stack load only when the command runs
    import torch

    from colossuslm.config import ModelConfig

# Token-id keys of config.json that transformers copies into a generation_config.json it writes.
_GENERATION_TOKEN_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "import",
        help="import a Hugging Face model as a run directory",
        description="Convert a model directory saved by transformers into a run directory that "
        "sample, serve, chat, export and train.init_from accept.",
    )
    formats = parser.add_subparsers(dest="format", metavar="FORMAT", required=True)
    hf = formats.add_parser(
        "hf",
        help="a transformers model directory (config.json + safetensors + tokenizer.json)",
        description="Supported: LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, Qwen2ForCausalLM, "
        "Qwen3ForCausalLM, Qwen3MoeForCausalLM. Weights are read from safetensors only, never from pickles.",
    )
    hf.add_argument("source", metavar="DIR", type=Path, help="the Hugging Face model directory")
    hf.add_argument("--out", required=True, type=Path, help="run directory to create, e.g. runs/NAME (new or empty)")
    hf.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    checkpoint = import_hf(args.source, args.out)
    print(
        f"imported {args.source} to {checkpoint}; try `colossus sample {args.out} --prompt ...`, "
        f"`colossus serve {args.out}`, or fine-tune with --set train.init_from={args.out}"
    )
    return 0


def import_hf(source: Path, out: Path) -> Path:
    """Write `out/checkpoints/step_00000000` from the Hugging Face directory `source`; returns it."""
    from colossuslm.errors import ColossusError
    from colossuslm.models.hf_import import load_hf

    source, out = Path(source), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ColossusError(f"{out} exists and is not empty; choose a new run directory (nothing was written)")
    cfg, state = load_hf(source)  # every check on the source runs before anything is written
    tokenizer_json = _checked_tokenizer(source, cfg.vocab_size)
    created = not out.exists()
    tmp = out / "checkpoints" / ".tmp-import"
    try:
        tmp.mkdir(parents=True)
        _write_checkpoint(tmp, source, cfg, state, tokenizer_json, run_name=out.resolve().name)
        return _promote(tmp)
    except BaseException:
        shutil.rmtree(out if created else out / "checkpoints", ignore_errors=True)  # leave `out` as it was
        raise


def _checked_tokenizer(source: Path, vocab_size: int) -> Path:
    """tokenizer.json, once it and its side files (special tokens, chat template) have loaded."""
    from colossuslm.data.chat_template import load_model_tokenizer
    from colossuslm.data.tokenizer import TOKENIZER_FILE, vocab_size_of
    from colossuslm.errors import ColossusError

    path = source / TOKENIZER_FILE
    tokens = vocab_size_of(load_model_tokenizer(source))
    if tokens > vocab_size:
        raise ColossusError(
            f"{path} has {tokens} tokens but config.json's vocab_size is {vocab_size}; they do not belong together"
        )
    return path


def _write_checkpoint(
    tmp: Path, source: Path, cfg: ModelConfig, state: dict[str, torch.Tensor], tokenizer_json: Path, run_name: str
) -> None:
    import torch
    from safetensors.torch import save_file

    from colossuslm.config import save_config
    from colossuslm.data.tokenizer import GENERATION_CONFIG, TOKENIZER_SIDE_FILES
    from colossuslm.models.hf_import import architecture_of, read_hf_config, run_config_from_hf

    # fp32, as the trainer writes it: fine-tuning keeps fp32 master weights; serving casts on load.
    save_file({name: t.to(torch.float32).contiguous() for name, t in state.items()}, str(tmp / "model.safetensors"))
    save_config(run_config_from_hf(cfg, run_name), tmp / "config.toml")
    hf_config = read_hf_config(source)
    trainer_state = {
        "step": 0,
        "tokens": 0,
        "imported_from": str(source.resolve()),
        "architecture": architecture_of(hf_config).name,
        "model_config": dataclasses.asdict(cfg),
    }
    (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1))
    shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
    for name in TOKENIZER_SIDE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, tmp / name)
    generation = {key: value for key in _GENERATION_TOKEN_KEYS if (value := hf_config.get(key)) is not None}
    if not (source / GENERATION_CONFIG).is_file() and generation:
        # config.json stays behind, so its stop ids move to where readers look (transformers'
        # save_pretrained writes the same file from the same keys: GenerationConfig.from_model_config).
        (tmp / GENERATION_CONFIG).write_text(json.dumps(generation, indent=2) + "\n")


def _promote(tmp: Path) -> Path:
    """The trainer's last step of a save (train/checkpoint.py `promote`: fsync every file, write
    the manifest of sizes and sha256, rename into place), checked back with `verify_checkpoint`."""
    from colossuslm.train.checkpoint import checkpoint_name, promote, verify_checkpoint

    final = tmp.parent / checkpoint_name(0)
    promote(tmp, final, step=0, world_size=1, keep_last=1)
    verify_checkpoint(final)
    return final
