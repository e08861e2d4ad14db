"""`colossus sample`, `chat`, `serve` as a user runs them."""

import io
import os
import subprocess
import sys
import time

import httpx
import pytest

from colossuslm.cli.main import main
from colossuslm.serve.chat_session import ChatSession
from colossuslm.serve.engine import LLMEngine
from colossuslm.serve.sampling import SamplingParams
from tests.serve_helpers import free_port, make_checkpoint, one_torch_thread  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("cli"))


def test_sample_prints_the_engines_greedy_continuation(ckpt, capsys):
    assert main(["sample", str(ckpt), "--prompt", "Hello there", "--max-tokens", "12", "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    engine = LLMEngine.from_checkpoint(ckpt, device="cpu")
    expected = engine.generate(
        [engine.tokenizer.encode("Hello there").ids], SamplingParams(max_tokens=12, temperature=0)
    )[0].text
    assert printed == expected + "\n"


def test_sample_rejects_bad_parameters_without_a_traceback(ckpt, capsys):
    assert main(["sample", str(ckpt), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_chat_streams_keeps_history_and_resets(ckpt, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\nHow are you?\n/reset\nHi again\n/exit\n"))
    sessions = []
    real_init = ChatSession.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        sessions.append(self)

    monkeypatch.setattr(ChatSession, "__init__", spy)
    assert main(["chat", str(ckpt), "--max-tokens", "8", "--seed", "3", "--system", "Be brief."]) == 0
    out = capsys.readouterr().out
    assert out.count("model> ") == 3 and "(conversation cleared)" in out
    history = sessions[0].history
    assert [m["role"] for m in history] == ["user", "assistant"] and history[0]["content"] == "Hi again"


def test_chat_session_forgets_old_turns_to_fit_the_context(ckpt):
    engine = LLMEngine.from_checkpoint(ckpt, device="cpu")
    session = ChatSession(engine, SamplingParams(max_tokens=16, temperature=0), system="Be brief.")
    for _ in range(6):
        "".join(session.send("Tell me about the quick brown fox and the lazy dog, please."))
    assert session.dropped_turns > 0 and len(session.history) < 12
    assert not engine.has_unfinished_requests()


def test_serve_command_runs_a_server(ckpt):
    port = free_port()
    env = dict(os.environ, COLOSSUS_API_KEY="k")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "colossuslm.cli.main",
            "serve",
            str(ckpt),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, "server did not come up"
            time.sleep(0.1)
        headers = {"Authorization": "Bearer k"}
        models = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers=headers).json()
        assert models["data"][0]["id"] == "run"  # runs/<name>/checkpoints/... serves as <name>
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401  # key from the environment
    finally:
        process.terminate()
        _, err = process.communicate(timeout=15)
    assert "serving" in err


def test_serve_rejects_bad_limits(ckpt, capsys):
    assert main(["serve", str(ckpt), "--max-num-seqs", "0"]) == 2
    assert "--max-num-seqs" in capsys.readouterr().err
