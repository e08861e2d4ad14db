"""Tiny real checkpoints for the serve/chat/export tests: a BPE tokenizer trained on a few sentences
and a small random-weight Transformer, saved with the trainer's own `save_checkpoint`."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from colossuslm.config import Config, ModelConfig, save_config
from colossuslm.data.tokenizer import train_tokenizer
from colossuslm.models.transformer import Transformer
from colossuslm.train.checkpoint import save_checkpoint

SENTENCES = [
    "Hello there! How are you today?",
    "I am fine, thank you. The weather is lovely and the sky is blue.",
    "Colossus serves language models with continuous batching.",
    "The quick brown fox jumps over the lazy dog.",
    "Python is a programming language; tokens are bytes merged by BPE.",
    "Ünïcödé text: café, naïve, 日本語, emoji 🙂 should round-trip.",
    "What is two plus two? Two plus two is four.",
    "system user assistant: a conversation has turns.",
]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run faster on one thread, and far faster on a 2-core machine shared with other
    jobs, where intra-op threads mostly wait for each other. Import this into a test module to use
    it there; the previous setting comes back after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model_config(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=384,
        d_model=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=128,
        max_seq_len=128,
        rope_theta=10000.0,
    )
    return ModelConfig(**(base | overrides))


def make_checkpoint(root: Path, seed: int = 0, **model_overrides) -> Path:
    """Write runs-style `root/run/checkpoints/step_00000001` and return the checkpoint directory."""
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(SENTENCES * 4, vocab_size=384)
    model_cfg = tiny_model_config(**model_overrides)
    assert tokenizer.get_vocab_size() <= model_cfg.vocab_size
    config = Config(model=model_cfg, data=dataclasses.replace(Config().data, seq_len=64)).validate()
    model = Transformer(model_cfg)
    with torch.no_grad():  # bigger-than-init weights so outputs depend visibly on the input
        for p in model.parameters():
            p.mul_(4.0 if p.dim() > 1 else 1.0)
    root.mkdir(parents=True, exist_ok=True)
    tok_path, cfg_path = root / "tokenizer.json", root / "config.toml"
    tokenizer.save(str(tok_path))
    save_config(config, cfg_path)
    return save_checkpoint(
        root / "run" / "checkpoints",
        1,
        model=model,
        optimizer=torch.optim.AdamW(model.parameters()),
        trainer_state={"step": 1},
        config_toml=cfg_path.read_text(),
        tokenizer_json=tok_path,
        keep_last=1,
    )


@pytest.fixture(scope="module", name="checkpoint")
def checkpoint_fixture(tmp_path_factory) -> Path:
    """`make_checkpoint`'s tiny model, once per test module that imports this fixture."""
    return make_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module", name="engine")
def engine_fixture(checkpoint):
    """An in-process engine over `checkpoint` running up to four sequences a step."""
    from colossuslm.serve.engine import EngineConfig, LLMEngine

    return LLMEngine.from_checkpoint(checkpoint, device="cpu", config=EngineConfig(max_num_seqs=4))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """A real uvicorn server on a free 127.0.0.1 port, in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", timeout_graceful_shutdown=1)
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@contextlib.contextmanager
def openai_client(checkpoint: Path, settings, config=None) -> Iterator:
    """The official `openai` client of a real server on `checkpoint` (an engine with `config`,
    the app with `settings`), for as long as the block runs."""
    import openai

    from colossuslm.serve.api import create_app
    from colossuslm.serve.async_engine import AsyncEngine
    from colossuslm.serve.engine import LLMEngine

    engine = AsyncEngine(LLMEngine.from_checkpoint(checkpoint, device="cpu", config=config)).start()
    try:
        with ServerThread(create_app(engine, settings)) as server:
            yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
    finally:
        engine.shutdown()
