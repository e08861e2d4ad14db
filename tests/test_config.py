import pytest

from colossuslm.cli.main import main
from colossuslm.config import load_config, parse_override
from colossuslm.errors import ColossusError


def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_defaults_are_valid_and_tiny_sized():
    cfg = load_config()
    assert cfg.model.d_model == 256 and cfg.data.dataset == "default"


def test_toml_then_overrides(tmp_path):
    path = write(tmp_path, '[model]\npreset = "small"\n[train]\nlr = 1e-3\n')
    cfg = load_config([path], ["train.lr=3e-4", "model.n_layers=4", "train.schedule=wsd"])
    assert cfg.model.d_model == 768 and cfg.model.n_layers == 4 and cfg.model.preset == "small"
    assert cfg.train.lr == 3e-4 and cfg.train.schedule == "wsd"


def test_int_is_accepted_for_float():
    assert load_config([], ["train.lr=1"]).train.lr == 1.0


def test_named_config_in_configs_dir():
    assert load_config(["moe-tiny"]).model.n_experts == 8


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.lrr=1", "unknown key train.lrr"),
        ("optim.lr=1", "unknown section [optim]"),
        ("train.steps=abc", "train.steps = 'abc' has the wrong type: expected int"),
        ("train.steps=1.5", "expected int"),
        ("train.compile=1", "expected bool"),
        ("model.d_model=0", "model.d_model = 0 is invalid: must be > 0"),
        ("train.micro_batch_size=-2", "train.micro_batch_size = -2"),
        ("model.n_heads=7", "model.n_heads = 7 is invalid: must divide model.d_model = 256"),
        ("model.n_kv_heads=3", "model.n_kv_heads = 3 is invalid: must divide model.n_heads = 8"),
        ("model.preset=gpt-5", "unknown model preset 'gpt-5'"),
        ("train.schedule=linear", "choose one of: cosine, wsd, constant"),
        ("data.seq_len=4096", "must be <= model.max_seq_len"),
        ("parallel.pp=2", "train.grad_accum = 1 is invalid: must be >= parallel.pp = 2"),
        ("parallel.pp_schedule=zb", "choose one of: 1f1b, gpipe"),
        ("model.top_k=3", None),  # dense model: top_k unused, still valid
    ],
)
def test_config_errors_name_key_and_value(override, fragment):
    if fragment is None:
        load_config([], [override])
        return
    with pytest.raises(ColossusError) as err:
        load_config([], [override])
    assert fragment in str(err.value)


def test_moe_top_k_bounds():
    with pytest.raises(ColossusError, match="model.top_k = 9 is invalid: must be between 1 and model.n_experts = 8"):
        load_config(["moe-tiny"], ["model.top_k=9"])


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ColossusError, match="section.key=value"):
        parse_override("train.lr")
    with pytest.raises(ColossusError, match="not found"):
        load_config([tmp_path / "nope.toml"])
    with pytest.raises(ColossusError, match="not valid TOML"):
        load_config([write(tmp_path, "[train\n")])


def test_cli_prints_error_without_traceback(capsys):
    assert main(["train", "--set", "model.n_kv_heads=3"]) == 2
    err = capsys.readouterr().err
    assert "model.n_kv_heads = 3" in err and "Traceback" not in err
