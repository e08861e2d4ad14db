import pytest
import torch

from colossuslm.data.tokenizer import train_tokenizer
from colossuslm.serve.detokenizer import token_bytes_table
from colossuslm.serve.errors import InvalidRequestError
from colossuslm.serve.sampling import SamplingParams, _truncate, make_generator, sample
from tests.serve_helpers import SENTENCES, one_torch_thread  # noqa: F401 (fixture)


def draws(logits: torch.Tensor, params: SamplingParams, n: int = 300) -> set[int]:
    generator = make_generator(0, torch.device("cpu"))
    return {sample(logits.unsqueeze(0), [params], [generator])[0] for _ in range(n)}


def test_top_k_and_top_p_only_ever_pick_allowed_tokens():
    logits = torch.log(torch.tensor([0.05, 0.4, 0.3, 0.2, 0.05]))
    assert draws(logits, SamplingParams(top_k=2)) == {1, 2}
    assert draws(logits, SamplingParams(top_p=0.65)) == {1, 2}  # 0.4 + 0.3 >= 0.65 -> two tokens
    assert draws(logits, SamplingParams(top_p=0.75)) == {1, 2, 3}
    assert draws(logits, SamplingParams()) == {0, 1, 2, 3, 4}
    assert draws(logits, SamplingParams(temperature=0.0)) == {1}


def test_rows_use_their_own_parameters_and_generators():
    logits = torch.log(torch.tensor([[0.1, 0.2, 0.7], [0.5, 0.25, 0.25], [0.3, 0.3, 0.4]]))
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=1, temperature=1.0), SamplingParams(seed=3)]
    gens = [make_generator(p.seed, torch.device("cpu")) for p in params]
    first = sample(logits, params, gens)
    assert first[:2] == [2, 0]
    again = sample(logits, params, [make_generator(p.seed, torch.device("cpu")) for p in params])
    assert again == first


def test_truncate_keeps_at_least_the_best_token():
    sorted_logits, ids = _truncate(torch.tensor([[0.0, 9.0, 1.0]]), top_k=[3], top_p=[1e-9], min_p=[0.0])
    assert ids[0, 0] == 1 and torch.isfinite(sorted_logits[0]).tolist() == [True, False, False]


@pytest.mark.parametrize(
    "kwargs",
    [dict(temperature=-0.1), dict(top_p=1.5), dict(top_k=-2), dict(max_tokens=0), dict(stop=[""]), dict(seed=2**70)],
)
def test_out_of_range_parameters(kwargs):
    with pytest.raises(InvalidRequestError, match=next(iter(kwargs))):
        SamplingParams(**kwargs).validate()


def test_token_byte_table_agrees_with_the_tokenizer():
    tokenizer = train_tokenizer(SENTENCES * 4, vocab_size=384)
    table = token_bytes_table(tokenizer)
    assert len(table) == tokenizer.get_vocab_size()
    for token_id, raw in enumerate(table):
        text = raw.decode("utf-8", errors="replace")
        assert text == tokenizer.decode([token_id], skip_special_tokens=True)
