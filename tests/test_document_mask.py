"""data.document_mask: packed documents attend only within themselves (SDPA mask and Grok's
softcapped block attention, ring blocks included), document ids from EOS tokens, and chat's refusal.
tests/test_parallel_train.py runs it under FSDP2 x TP, context and pipeline parallelism."""

from __future__ import annotations

import pytest
import torch

from colossuslm.config import ModelConfig, load_config
from colossuslm.errors import ColossusError
from colossuslm.models import attention
from colossuslm.models.attention import block_attention
from colossuslm.models.transformer import Transformer, document_causal_mask, document_ids

EOS = 0


def test_document_ids_count_the_documents_ended_before_each_position():
    tokens = torch.tensor([[5, 0, 7, 8, 0, 9], [0, 0, 3, 4, 5, 6]])
    assert document_ids(tokens, EOS).tolist() == [[0, 0, 1, 1, 1, 2], [0, 1, 2, 2, 2, 2]]


@pytest.mark.parametrize("softcap", [0.0, 0.5])
def test_a_packed_document_reads_only_itself(softcap):
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, attn_logit_softcap=softcap
    )
    model = Transformer(cfg).eval()
    first = torch.randint(1, 64, (1, 7))
    second = torch.randint(1, 64, (1, 9))
    packed = torch.cat([first, torch.tensor([[EOS]]), second], dim=1)  # first ends with EOS
    with torch.no_grad():
        masked, _ = model(packed, documents=document_ids(packed, EOS))
        alone, _ = model(second)
        unmasked, _ = model(packed)
    # RoPE scores depend on relative positions only, so the second document at offset 8 is
    # exactly the second document at offset 0 once it cannot see the first.
    torch.testing.assert_close(masked[:, 8:], alone, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(unmasked[:, 8:], alone, rtol=1e-3, atol=1e-3)
    # The first document (and its EOS) never sees the second, masked or not.
    torch.testing.assert_close(masked[:, :8], unmasked[:, :8], rtol=1e-5, atol=1e-5)


def test_block_attention_with_documents_matches_a_masked_softmax(monkeypatch):
    monkeypatch.setattr(attention, "SCORE_CHUNK_BYTES", 2 * 4 * 4 * 12 * 4)  # chunks of 2 query rows
    torch.manual_seed(1)
    q = torch.randn(2, 4, 12, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 2, 12, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 2, 12, 8, dtype=torch.float64, requires_grad=True)
    documents = document_ids(torch.tensor([[1, 2, 0, 3, 4, 5, 0, 6, 7, 8, 9, 1], [0] + [1] * 11]), EOS)
    got, lse = block_attention(q, k, v, causal=True, softcap=0.3, documents=documents)

    kk, vv = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    scores = 0.3 * torch.tanh(q @ kk.transpose(-2, -1) / 8**0.5 / 0.3)
    scores = scores.masked_fill(~document_causal_mask(documents), float("-inf"))
    want = scores.softmax(-1) @ vv
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(lse, scores.logsumexp(-1))
    weights = torch.randn_like(want)
    grads = torch.autograd.grad((got * weights).sum() + lse.sum(), (q, k, v))
    expected = torch.autograd.grad((want * weights).sum() + scores.logsumexp(-1).sum(), (q, k, v))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b)


def test_chat_rows_have_nothing_packed_to_mask():
    with pytest.raises(ColossusError, match="nothing packed"):
        load_config([], ["data.document_mask=true", "data.format=chat", "train.init_from=runs/x"])


def test_a_query_with_no_key_of_its_document_in_a_block_gives_nothing_to_the_merge():
    """Ring attention's blocks: a query row whose document has no key in the block gets output 0
    and lse -inf (so the online-softmax merge ignores it), with finite gradients."""
    torch.manual_seed(2)
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    query_docs, key_docs = torch.tensor([[0, 1, 2]]), torch.tensor([[0, 0, 1, 1, 1]])
    out, lse = block_attention(q, k, v, causal=False, documents=query_docs, key_documents=key_docs)
    assert torch.isinf(lse[..., 2]).all() and (out[..., 2, :] == 0).all()
    other = query_docs[:, None, :, None] != key_docs[:, None, None, :]  # [1, 1, 3, 5]
    scores = (q @ k.transpose(-2, -1) / 2).masked_fill(other, float("-inf"))
    torch.testing.assert_close(out[..., :2, :], scores[..., :2, :].softmax(-1) @ v)
    merged_lse = torch.logaddexp(lse, torch.zeros_like(lse))  # merged with a block of lse 0, as the ring does
    grads = torch.autograd.grad((out.sum() + merged_lse.sum()), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


def test_every_layer_shares_one_mask_for_backward():
    """SDPA keeps its mask for backward: one [B, 1, S, S] bias for the whole forward, not one per layer."""
    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=512)
    model = Transformer(cfg)
    tokens = torch.randint(1, 64, (2, 512))
    tokens[:, ::100] = EOS

    def saved_bytes(**kwargs) -> int:
        storages: dict[int, int] = {}

        def keep(t: torch.Tensor) -> torch.Tensor:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            model(tokens, targets=tokens, **kwargs)
        return sum(storages.values())

    one_mask = 2 * 512 * 512 * 4  # [B, 1, S, S] fp32
    extra = saved_bytes(documents=document_ids(tokens, EOS)) - saved_bytes()
    assert one_mask <= extra < 2 * one_mask
