"""Measuring models: bits per byte and perplexity against the model's own loss, logprobs in the
OpenAI API against log_softmax of the model's logits, and lm-evaluation-harness run in-process
(the `colossus` model class) and through `local-completions` against a real server, agreeing."""

import json
import math

import httpx
import pytest
import torch

from colossuslm.cli.main import main as colossus_main
from colossuslm.data.tokenizer import EOS_TOKEN
from colossuslm.errors import ColossusError
from colossuslm.eval.harness import ColossusLM, run_tasks, task_manager, task_metrics
from colossuslm.eval.perplexity import plain_text_tokenizer, score_documents, score_files, sliding_windows
from colossuslm.serve.api import ServerSettings, create_app
from colossuslm.serve.async_engine import AsyncEngine
from colossuslm.serve.engine import EngineConfig, LLMEngine
from colossuslm.serve.loading import load_for_inference
from colossuslm.serve.sampling import SamplingParams
from tests.serve_helpers import SENTENCES, ServerThread, make_checkpoint, one_torch_thread  # noqa: F401 (fixture)
from tests.test_train import MICRO

MODEL = "tiny-eval"
TEXT = "The quick brown fox jumps over the lazy dog. Café, naïve: ünïcödé bytes count too."


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("eval"))


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_for_inference(ckpt, device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def server(ckpt):
    engine = AsyncEngine(LLMEngine.from_checkpoint(ckpt, device="cpu", config=EngineConfig(max_num_seqs=4))).start()
    with ServerThread(create_app(engine, ServerSettings(model_name=MODEL))) as srv:
        yield srv
    engine.shutdown()


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=30)


def completion(server, **body) -> dict:
    response = post(server, "/v1/completions", {"model": MODEL} | body)
    assert response.status_code == 200, response.text
    return response.json()


def reference_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the training forward's logits: [len(ids), vocab] (row i predicts ids[i + 1])."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids]))[0][0].float(), dim=-1)


# ---------------------------------------------------------------------- bits per byte, perplexity


def hand_nll(model, tokens: list[int], windows: list[tuple[int, int, int]]) -> float:
    """Summed NLL over windows, from the model's own (mean) loss on the positions each scores."""
    total = 0.0
    for start, end, first_scored in windows:
        window = torch.tensor([tokens[start:end]])
        targets = window[:, 1:].clone()
        targets[:, : first_scored - start - 1] = -100  # context only: scored by an earlier window
        with torch.no_grad():
            hidden, _ = model.hidden_states(window[:, :-1])
            total += float(model.loss(hidden, targets)) * int((targets != -100).sum())
    return total


def test_bits_per_byte_and_perplexity_match_the_models_own_loss(loaded):
    model, tokenizer, eos = loaded.model, loaded.tokenizer, loaded.eos_token_id
    tokens = [eos, *plain_text_tokenizer(tokenizer).encode(TEXT, add_special_tokens=False).ids]
    assert len(tokens) - 1 < model.cfg.max_seq_len  # one window
    score = score_documents(model, tokenizer, [TEXT], prefix_token_id=eos, batch_size=2)
    nll = hand_nll(model, tokens, [(0, len(tokens), 1)])
    assert score.tokens == len(tokens) - 1 and score.bytes == len(TEXT.encode("utf-8")) > len(TEXT)
    assert score.bits_per_byte == pytest.approx(nll / math.log(2) / len(TEXT.encode("utf-8")), rel=1e-5)
    assert score.loss == pytest.approx(nll / score.tokens, rel=1e-5)
    assert score.perplexity == pytest.approx(math.exp(score.loss), rel=1e-9)


@pytest.mark.parametrize("context, stride", [(32, 32), (32, 12), (17, 1)])
def test_long_documents_are_scored_once_per_token_in_sliding_windows(loaded, context, stride):
    model, tokenizer, eos = loaded.model, loaded.tokenizer, loaded.eos_token_id
    text = " ".join(SENTENCES[:4])
    tokens = [eos, *plain_text_tokenizer(tokenizer).encode(text, add_special_tokens=False).ids]
    windows = sliding_windows(len(tokens), context, stride)
    scored = [t for _, end, first in windows for t in range(first, end)]
    assert scored == list(range(1, len(tokens)))  # every token once, in order
    for index, (start, end, first) in enumerate(windows):
        assert end - 1 - start <= context  # the model reads at most `context` positions
        if index:
            assert first - start >= context - stride  # and later windows keep that much context
    score = score_documents(model, tokenizer, [text], prefix_token_id=eos, context=context, stride=stride)
    assert -score.nll == pytest.approx(-hand_nll(model, tokens, windows), rel=1e-5)


def test_text_jsonl_and_parquet_files_score_alike(loaded, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = SENTENCES[:3]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs) + "not json\n")
    pq.write_table(pa.table({"text": docs}), tmp_path / "a.parquet")
    for i, doc in enumerate(docs):
        (tmp_path / f"doc{i}.txt").write_text(doc)
    args = dict(prefix_token_id=loaded.eos_token_id, batch_size=4)
    jsonl, _, _ = score_files(loaded.model, loaded.tokenizer, [tmp_path / "a.jsonl"], **args)
    parquet, _, _ = score_files(loaded.model, loaded.tokenizer, [tmp_path / "a.parquet"], **args)
    texts, per_file, _ = score_files(
        loaded.model, loaded.tokenizer, [tmp_path / f"doc{i}.txt" for i in range(3)], **args
    )
    assert jsonl.documents == parquet.documents == texts.documents == len(per_file) == 3
    assert jsonl.skipped == {"malformed JSON": 1}
    assert jsonl.bits_per_byte == pytest.approx(parquet.bits_per_byte, rel=1e-6)
    assert jsonl.bits_per_byte == pytest.approx(texts.bits_per_byte, rel=1e-6)
    with pytest.raises(ColossusError, match="does not exist"):
        score_files(loaded.model, loaded.tokenizer, [tmp_path / "missing.txt"], **args)


def test_colossus_eval_cli_prints_json(ckpt, tmp_path, capsys):
    data = tmp_path / "sample.txt"
    data.write_text(TEXT)
    assert colossus_main(["eval", str(ckpt), "--data", str(data), "--device", "cpu", "--json", "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    row = report["data"]["all"]
    assert row["bytes"] == len(TEXT.encode()) and row["bits_per_byte"] > 0
    assert report["data"]["stride"] == report["data"]["context"] // 2
    assert colossus_main(["eval", str(ckpt), "--data", str(tmp_path / "nope.txt"), "--device", "cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert colossus_main(["eval", str(ckpt), "--device", "cpu"]) == 2
    assert "give --data FILES and/or --tasks" in capsys.readouterr().err


# ---------------------------------------------------------------------- logprobs in the API


def test_echoed_prompt_logprobs_are_log_softmax_of_the_logits(server, loaded):
    ids = loaded.tokenizer.encode(TEXT).ids
    body = dict(prompt=TEXT, echo=True, max_tokens=0, logprobs=5, return_tokens_as_token_ids=True)
    reply = completion(server, **body)
    choice = reply["choices"][0]
    assert choice["text"] == TEXT and choice["finish_reason"] == "length"
    assert reply["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    logprobs = choice["logprobs"]
    assert logprobs["tokens"] == [f"token_id:{i}" for i in ids]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    reference = reference_logprobs(loaded.model, ids)
    expected = reference[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(logprobs["token_logprobs"][1:]), expected, atol=1e-5)
    for position, top in enumerate(logprobs["top_logprobs"][1:]):
        best = reference[position].topk(5)
        listed = list(top.items())[:5]  # the likeliest five, in order; then the chosen token if not among them
        assert [name for name, _ in listed] == [f"token_id:{i}" for i in best.indices.tolist()]
        assert torch.allclose(torch.tensor([value for _, value in listed]), best.values, atol=1e-5)
        assert top[f"token_id:{ids[position + 1]}"] == logprobs["token_logprobs"][position + 1]
    # By default tokens are named by their text, as OpenAI's are (pieces of one character alike).
    texts = completion(server, **body | {"return_tokens_as_token_ids": False})["choices"][0]["logprobs"]
    assert texts["token_logprobs"] == logprobs["token_logprobs"]
    # (a token holding part of a character reads U+FFFD; whole characters read as themselves)
    assert "".join(texts["tokens"]).startswith(TEXT[:46]) and texts["text_offset"][0] == 0
    assert texts["text_offset"][1:] == [texts["text_offset"][i] + len(t) for i, t in enumerate(texts["tokens"][:-1])]
    for top in texts["top_logprobs"][1:]:
        assert list(top.values())[:-1] == sorted(list(top.values())[:-1], reverse=True)


def test_logprobs_are_the_models_before_temperature(loaded):
    engine = LLMEngine.from_loaded(loaded, EngineConfig(max_num_seqs=2))
    prompt = loaded.tokenizer.encode("Hello there! How").ids
    params = SamplingParams(max_tokens=6, temperature=1.8, top_p=0.9, seed=5, logprobs=3, ignore_eos=True)
    outputs = list(engine.stream(prompt, params))
    generated = [t for out in outputs for t in out.token_ids]
    entries = [e for out in outputs for e in out.logprobs]
    reference = reference_logprobs(loaded.model, prompt + generated)[len(prompt) - 1 : -1]
    assert [e.token_id for e in entries] == generated and len(generated) == 6
    assert torch.allclose(torch.tensor([e.logprob for e in entries]), reference[range(6), generated], atol=1e-5)
    for entry, row in zip(entries, reference):
        assert [i for i, _ in entry.top] == row.topk(3).indices.tolist()


def test_greedy_logprobs_and_chat_logprobs(server):
    greedy = completion(server, prompt="The quick brown", max_tokens=5, temperature=0, logprobs=3, ignore_eos=True)
    logprobs = greedy["choices"][0]["logprobs"]
    for chosen, top in zip(logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert chosen == max(top.values())  # greedy: the chosen token is the likeliest
        assert len(top) == 3
    assert "".join(logprobs["tokens"]) == greedy["choices"][0]["text"]

    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 4, "temperature": 0}
    chat = post(server, "/v1/chat/completions", body | {"logprobs": True, "top_logprobs": 2}).json()
    content = chat["choices"][0]["logprobs"]["content"]
    assert len(content) == chat["usage"]["completion_tokens"]
    for entry in content:
        tops = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(tops) == 2 and tops == sorted(tops, reverse=True) and entry["logprob"] == tops[0]
        assert bytes(entry["bytes"]).decode("utf-8", errors="replace") == entry["token"]
    assert post(server, "/v1/chat/completions", body).json()["choices"][0]["logprobs"] is None


def test_streamed_logprobs_match_the_plain_reply(server):
    body = {"prompt": "Python is a", "max_tokens": 8, "temperature": 0, "logprobs": 1, "ignore_eos": True}
    plain = completion(server, **body, echo=True)["choices"][0]
    tokens, token_logprobs, text = [], [], ""
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json={"model": MODEL, "stream": True, "echo": True} | body, timeout=30
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                text += choice["text"]
                tokens += choice["logprobs"]["tokens"]
                token_logprobs += choice["logprobs"]["token_logprobs"]
    assert text == plain["text"] and text.startswith("Python is a")
    assert tokens == plain["logprobs"]["tokens"]
    assert token_logprobs == plain["logprobs"]["token_logprobs"]


@pytest.mark.parametrize(
    "path, body, param, fragment",
    [
        ("/v1/completions", {"prompt": "x", "logprobs": 21}, "logprobs", "from 0 to 20"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens", "only allowed with echo"),
        ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 50}, "top_logprobs", "from 0 to 20"),
        ("/v1/chat/completions", {"top_logprobs": 3}, "top_logprobs", "needs logprobs = true"),
        ("/v1/chat/completions", {"response_format": {"type": "yaml"}}, "response_format", "type must be"),
        (
            "/v1/completions",
            {"prompt": "x", "response_format": {"type": "json_schema"}},
            "response_format",
            "needs json_schema.schema",
        ),
        (
            "/v1/chat/completions",
            {"tools": [{"type": "function", "function": {"name": "f"}}]},
            "tools",
            "no place for tool definitions",
        ),
        ("/v1/chat/completions", {"tool_choice": "required"}, "tool_choice", "needs tools"),
    ],
)
def test_unsupported_or_too_large_requests_are_refused(server, path, body, param, fragment):
    if path.endswith("chat/completions"):
        body = {"messages": [{"role": "user", "content": "hi"}]} | body
    response = post(server, path, {"model": MODEL} | body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"]


def test_plain_text_response_format_is_accepted(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert post(server, "/v1/chat/completions", body | {"response_format": {"type": "text"}}).status_code == 200


def test_tokenizer_endpoints(server, loaded):
    ids = post(server, "/tokenize", {"prompt": TEXT, "add_special_tokens": False}).json()
    assert ids["tokens"] == loaded.tokenizer.encode(TEXT, add_special_tokens=False).ids and ids["count"] == len(
        ids["tokens"]
    )
    assert post(server, "/detokenize", {"tokens": ids["tokens"]}).json() == {"prompt": TEXT}
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    assert info["eos_token"] == EOS_TOKEN and info["model_max_length"] == loaded.model.cfg.max_seq_len
    eos = post(server, "/tokenize", {"prompt": EOS_TOKEN}).json()["tokens"]
    assert eos == [loaded.eos_token_id]  # lm-eval's remote tokenizer finds its prefix token so
    assert post(server, "/detokenize", {"tokens": [10**6]}).status_code == 400


# ---------------------------------------------------------------------- lm-evaluation-harness


def per_item_loglikelihoods(results: dict, task: str) -> list[list[float]]:
    samples = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[float(r[0][0]) for r in sample["resps"]] for sample in samples]


def test_lm_eval_in_process_and_through_the_api_agree(server, loaded):
    import lm_eval

    lm = ColossusLM.from_model(loaded.model, loaded.tokenizer, loaded.eos_token_id, batch_size=8)
    tasks = ["colossus_mc", "colossus_gen"]
    ours = run_tasks(lm, tasks, log_samples=True, bootstrap_iters=0)
    theirs = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={
            "model": MODEL,
            "base_url": f"{server.url}/v1/completions",
            "max_length": loaded.model.cfg.max_seq_len,
        },
        tasks=tasks,
        task_manager=task_manager(tasks),
        log_samples=True,
        bootstrap_iters=0,
    )
    in_process, via_api = task_metrics(ours), task_metrics(theirs)
    assert in_process["colossus_mc"]["acc"] == via_api["colossus_mc"]["acc"]
    assert in_process["colossus_mc"]["acc_norm"] == via_api["colossus_mc"]["acc_norm"]
    ours_items = per_item_loglikelihoods(ours, "colossus_mc")
    theirs_items = per_item_loglikelihoods(theirs, "colossus_mc")
    assert len(ours_items) == 20 and all(len(choices) == 4 for choices in ours_items)
    assert torch.allclose(torch.tensor(ours_items), torch.tensor(theirs_items), atol=1e-4)
    generations = [s["filtered_resps"] for s in sorted(ours["samples"]["colossus_gen"], key=lambda s: s["doc_id"])]
    api_generations = [
        s["filtered_resps"] for s in sorted(theirs["samples"]["colossus_gen"], key=lambda s: s["doc_id"])
    ]
    assert generations == api_generations and len(generations) == 10
    assert in_process["colossus_gen"]["exact_match"] == via_api["colossus_gen"]["exact_match"]


def test_lm_eval_command_line_runs_the_colossus_model(ckpt, capsys):
    from colossuslm.eval.lm_eval import main as lm_eval_main

    lm_eval_main(
        [
            "--model",
            "colossus",
            "--model_args",
            f"path={ckpt}",
            "--device",
            "cpu",
            "--tasks",
            "colossus_mc",
            "--limit",
            "4",
        ]
    )
    out = capsys.readouterr().out
    assert "colossus_mc" in out and "acc" in out


def test_unknown_tasks_and_bad_model_args_are_clear_errors(loaded, tmp_path):
    with pytest.raises(ColossusError, match="unknown lm-eval task colossus_nope"):
        task_manager(["colossus_nope"], [tmp_path], search_lm_eval=False)  # lm-eval's own index takes seconds
    with pytest.raises(ColossusError, match="does not exist"):
        task_manager(["colossus_mc"], [tmp_path / "missing"])
    with pytest.raises(ColossusError, match="batch_size=auto is not supported"):
        ColossusLM.from_model(loaded.model, loaded.tokenizer, loaded.eos_token_id, batch_size="auto")
    lm = ColossusLM.from_model(loaded.model, loaded.tokenizer, loaded.eos_token_id)
    with pytest.raises(ColossusError, match="num_beams are not supported"):
        lm._generation_settings({"until": ["\n"], "num_beams": 4})


def test_trainer_runs_eval_tasks_and_logs_them(tmp_path):
    from colossuslm.config import load_config
    from colossuslm.train.metrics import read_metrics
    from colossuslm.train.trainer import Trainer

    micro = [
        *MICRO,
        "train.micro_batch_size=4",
        "train.eval_batches=1",
        "train.steps=4",
        "train.eval_every=100000",
        "train.ckpt_every=100000",
        f"train.run_dir={tmp_path / 'runs'}",
    ]
    cfg = load_config(
        [], [*micro, "train.eval_tasks=colossus_mc", "train.eval_tasks_every=3", "train.eval_tasks_limit=4"]
    )
    Trainer(cfg, log=lambda _: None).fit()
    records = [r for r in read_metrics(tmp_path / "runs" / "tiny") if "eval/colossus_mc/acc" in r]
    assert [r["step"] for r in records] == [3, 4]  # every 3 steps, and at the end
    assert all(0 <= r["eval/colossus_mc/acc"] <= 1 for r in records)
    assert not any(key.endswith("_stderr") for key in records[0])
    missing = tmp_path / "no-tasks-here"
    bad = load_config([], [*micro, "train.eval_tasks=mine", f"train.eval_tasks_include_path={missing}", "train.name=b"])
    with pytest.raises(ColossusError, match="no-tasks-here does not exist"):
        Trainer(bad, log=lambda _: None)  # checked before any training
    with pytest.raises(ColossusError, match="train.eval_tasks_limit"):
        load_config([], [*micro, "train.eval_tasks=colossus_mc", "train.eval_tasks_limit=-1"])
