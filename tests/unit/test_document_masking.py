"""Document masking (data.document_masking): a packed window's documents get the logits
they get when run alone, for both decoder families; the ids come from the inputs alone."""

from __future__ import annotations

import pytest
import torch

from scaletrain.models import documents
from scaletrain.models.documents import (document_ids, document_mask, document_positions,
                                         sdpa_document_mask)
from scaletrain.models.gpt import GPT, GPTConfig
from scaletrain.models.llama import Llama, LlamaConfig

EOT = 0
V = 61


def test_document_ids_count_eot_strictly_before():
    x = torch.tensor([[5, 6, EOT, 7, EOT, EOT, 8, 9],
                      [EOT, 3, 4, 5, 6, 7, 8, 9]])
    assert document_ids(x, EOT).tolist() == [[0, 0, 0, 1, 1, 2, 3, 3],
                                             [0, 1, 1, 1, 1, 1, 1, 1]]
    assert document_ids(x, EOT).dtype == torch.int32
    assert document_positions(document_ids(x, EOT)).tolist() == [[0, 1, 2, 0, 1, 0, 0, 1],
                                                                 [0, 0, 1, 2, 3, 4, 5, 6]]


def test_one_document_is_the_causal_mask():
    ids = torch.zeros(2, 5, dtype=torch.int32)
    mask = sdpa_document_mask(ids)
    assert mask.shape == (2, 1, 5, 5)
    assert torch.equal(mask[0, 0], torch.ones(5, 5, dtype=torch.bool).tril())
    blocks = sdpa_document_mask(torch.tensor([[0, 0, 1, 1, 1]]))[0, 0]
    assert not blocks[2:, :2].any() and blocks[3, 2] and not blocks[1, 2]


def test_cpu_never_builds_a_flex_mask(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("FlexAttention used on CPU")

    monkeypatch.setattr(documents, "flex_document_mask", refuse)
    monkeypatch.setattr(documents, "flex_attention", refuse)
    assert isinstance(document_mask(torch.zeros(1, 4, dtype=torch.int32)), torch.Tensor)


def _gpt(seq_len=24):
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=V, seq_len=seq_len, n_layer=2, n_head=2, d_model=32))
    m.init_weights(7)
    return m.eval()


def _llama(seq_len=24):
    m = Llama(LlamaConfig(vocab_size=V, seq_len=seq_len, n_layer=2, n_head=4, n_kv_head=2,
                          d_model=32, qk_norm=True))
    m.init_weights(7)
    return m.eval()


def _docs():
    g = torch.Generator().manual_seed(3)
    # Three documents, each ending with end-of-text, packed into one 22-token window.
    lens = (7, 9, 6)
    return [torch.cat([torch.randint(1, V, (n - 1,), generator=g), torch.tensor([EOT])])
            for n in lens]


def _packed_vs_alone(model, masked: bool) -> float:
    docs = _docs()
    window = torch.cat(docs)[None]  # (1, 22)
    kwargs = {"doc_ids": document_ids(window, EOT)} if masked else {}
    with torch.no_grad():
        packed = model(window, **kwargs)[0]
        alone = torch.cat([model(d[None])[0] for d in docs])
    return (packed - alone).abs().max().item()


@pytest.mark.parametrize("build", [_gpt, _llama], ids=["gpt", "llama"])
def test_packed_window_equals_documents_alone(build):
    model = build()
    assert _packed_vs_alone(model, masked=True) < 1e-5
    # Without the mask the later documents see the earlier ones: far from equal.
    assert _packed_vs_alone(model, masked=False) > 1e-2


@pytest.mark.parametrize("build", [_gpt, _llama], ids=["gpt", "llama"])
def test_loss_with_targets_uses_the_mask(build):
    """The in-model loss path (forward with targets) takes the same mask."""
    model = build()
    window = torch.cat(_docs())[None]
    y = torch.roll(window, -1, dims=1)
    ids = document_ids(window, EOT)
    with torch.no_grad():
        loss = model(window, y, doc_ids=ids)
        ref = torch.nn.functional.cross_entropy(model(window, doc_ids=ids)[0], y[0],
                                                reduction="sum")
        unmasked = model(window, y)
    assert abs(loss.item() - ref.item()) < 1e-4
    assert abs(loss.item() - unmasked.item()) > 1e-3


def test_one_document_window_is_unchanged_by_masking():
    """No end-of-text inside the window: the mask is the causal one, positions 0..T-1."""
    for model in (_gpt(), _llama()):
        x = torch.randint(1, V, (2, 16), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            diff = (model(x, doc_ids=document_ids(x, EOT)) - model(x)).abs().max().item()
        assert diff < 1e-5


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("build", [_gpt, _llama], ids=["gpt", "llama"])
def test_flex_path_gives_the_same_logits(build, monkeypatch):
    """The CUDA path's FlexAttention BlockMask (mask_mod, create_block_mask, GQA through
    flex_attention), run here on CPU with eager flex_attention instead of the compiled
    one: the same documents-alone logits as the SDPA mask. (This test alone builds a
    BlockMask on CPU; runs pick it only on CUDA.)"""
    from scaletrain.models import gpt, llama

    monkeypatch.setattr(documents, "_compiled_flex", documents.flex_attention)
    for module in (gpt, llama):
        monkeypatch.setattr(module, "document_mask",
                            lambda ids, dropout=0.0: documents.flex_document_mask(ids))
    assert _packed_vs_alone(build(), masked=True) < 1e-5


def test_distillation_refuses_document_masking(tmp_path):
    from scaletrain.errors import ConfigError
    from tests.conftest import make_cfg

    with pytest.raises(ConfigError, match="data.document_masking.*distill.teacher"):
        make_cfg(["--data.document_masking=true", f"--distill.teacher={tmp_path}",
                  f"--run.dir={tmp_path / 'run'}"])
