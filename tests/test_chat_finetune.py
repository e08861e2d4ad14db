"""Chat fine-tuning: conversations in, loss only on assistant tokens, starting from a checkpoint."""

import pytest

from colossuslm.config import load_config
from colossuslm.data.chat import load_conversations
from colossuslm.data.chat_loader import IGNORE, ChatLoader
from colossuslm.data.tokenizer import IM_END, IM_START, load_tokenizer
from colossuslm.errors import ColossusError
from colossuslm.train.trainer import Trainer
from tests.test_train import MICRO


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs")
    cfg = load_config([], [*MICRO, f"train.run_dir={run_dir}", "train.name=base", "train.steps=10", "data.seq_len=128"])
    Trainer(cfg, log=lambda _: None).fit()
    return run_dir


def test_only_assistant_replies_are_targets(base_run):
    tokenizer = load_tokenizer(base_run / "base" / "checkpoints" / "step_00000010" / "tokenizer.json")
    loader = ChatLoader(None, tokenizer, split="train", seq_len=128, batch_size=4)
    inputs, targets = loader.next_batch()
    im_start, im_end = tokenizer.token_to_id(IM_START), tokenizer.token_to_id(IM_END)
    for row_in, row_t in zip(inputs.tolist(), targets.tolist()):
        learned = [t for t in row_t if t != IGNORE]
        assert learned and learned.count(im_end) >= 1  # each reply is learned up to its closing token
        assert im_start not in learned  # headers are prompt, never targets
        # Every learned position follows an assistant header somewhere before it.
        text = tokenizer.decode(row_in, skip_special_tokens=False)
        assert "assistant" in text
    assert len(load_conversations()) > loader.n_rows  # some conversations are held out


def test_fine_tune_from_checkpoint_lowers_the_chat_loss(base_run):
    cfg = load_config(
        [],
        [
            *MICRO,
            f"train.run_dir={base_run}",
            "train.name=chat",
            "data.format=chat",
            f"train.init_from={base_run / 'base'}",
            "data.seq_len=128",
            "train.steps=30",
            "train.eval_every=30",
            "train.lr=3e-3",
            "model.n_layers=7",
        ],
    )
    summary = Trainer(cfg, log=lambda _: None).fit()
    assert summary["final_val_loss"] < summary["first_val_loss"] - 0.5
    saved = load_config([base_run / "chat" / "config.toml"])
    assert saved.model.n_layers == 2  # the architecture comes from the checkpoint, not the override


def test_chat_format_needs_a_starting_checkpoint():
    with pytest.raises(ColossusError, match="set train.init_from"):
        load_config([], ["data.format=chat"])
