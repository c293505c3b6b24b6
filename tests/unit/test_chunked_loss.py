"""model.loss_chunks: the head + cross-entropy chunk by chunk (models/chunked_loss.py)
gives the unchunked loss and gradients (fp64, 1e-10), for the GPT and the llama
family, tied and untied heads, with ignored targets and document masking; and the
chunked forward never holds the whole logits."""

from __future__ import annotations

import pytest
import torch

from scaletrain.config.schema import Config
from scaletrain.models import chunked_loss
from scaletrain.models.chunked_loss import fusable
from scaletrain.models.documents import document_kwargs
from scaletrain.models.losses import IGNORE_INDEX
from scaletrain.models.registry import build_model

V, T, B = 97, 24, 3
EOT = 5


def _model(family: str, tied: bool, chunks: int):
    cfg = Config()
    m = cfg.model
    m.name, m.n_layer, m.n_head, m.d_model, m.seq_len, m.vocab_size = family, 2, 2, 16, T, V
    m.loss_chunks = chunks
    if family == "llama":
        m.tie_embeddings = tied
    model = build_model(m, {"vocab_size": V}, seed=3).double()
    if family == "gpt" and not tied:  # GPT ties by default: give the head its own copy
        model.lm_head.weight = torch.nn.Parameter(model.wte.weight.detach().clone() * 1.5)
    return model


def _batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (B, T), generator=g)
    x[:, 7] = EOT  # documents end mid-window
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :5] = IGNORE_INDEX  # masked prompt
    y[1, -9:] = IGNORE_INDEX  # padding
    return x, y


def _loss_and_grads(model, x, y, docs: bool):
    model.zero_grad(set_to_none=True)
    kw = document_kwargs(x, EOT) if docs else {}
    loss = model(x, targets=y, **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family,tied", [("gpt", True), ("gpt", False),
                                         ("llama", True), ("llama", False)])
@pytest.mark.parametrize("chunks", [1, 5, 64])
@pytest.mark.parametrize("path", ["fused", "checkpoint"])
def test_chunked_equals_unchunked_fp64(family, tied, chunks, path):
    """Both paths of models/chunked_loss.py: the fused Function (a plain head) and the
    checkpointed module calls (TP's DTensor head; here forced by a hook on the head)."""
    x, y = _batch()
    ref = _model(family, tied, 0)
    out = _model(family, tied, chunks)
    out.load_state_dict(ref.state_dict())
    if path == "checkpoint":
        out.lm_head.register_forward_hook(lambda mod, args, output: None)
    assert fusable(out.lm_head, out.lm_head.weight) == (path == "fused")
    assert (out.lm_head.weight is (out.wte.weight if family == "gpt"
                                   else out.embed_tokens.weight)) == tied
    for docs in (False, True):
        l0, g0 = _loss_and_grads(ref, x, y, docs)
        l1, g1 = _loss_and_grads(out, x, y, docs)
        assert abs(l1.item() - l0.item()) <= 1e-10 * abs(l0.item())
        assert g0.keys() == g1.keys()
        for name in g0:
            torch.testing.assert_close(g1[name], g0[name], rtol=1e-10, atol=1e-12,
                                       msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("path", ["fused", "checkpoint"])
def test_chunked_forward_never_holds_whole_logits(path):
    """The largest tensor made during forward + backward is one chunk's logits."""
    x, y = _batch()
    model = _model("gpt", True, 4)
    if path == "checkpoint":
        model.lm_head.register_forward_hook(lambda mod, args, output: None)
    biggest = []

    class Sizes(torch.utils._python_dispatch.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == V:
                    biggest.append(t.numel())
            return out

    with Sizes():
        model(x, targets=y).backward()
    assert biggest and max(biggest) <= B * (T // 4) * V


@pytest.mark.parametrize("overrides,match", [
    ({"model.name": "mlp", "data.source": "digits"}, "needs a text model"),
    ({"model.seq_len": "8", "model.loss_chunks": "9"}, "exceeds model.seq_len=8"),
    ({"distill.teacher": "some/run"}, "not supported with distill.teacher"),
])
def test_loss_chunks_refused_where_it_cannot_apply(overrides, match):
    from scaletrain.config import build_config
    from scaletrain.errors import ConfigError

    pairs = {"model.loss_chunks": "4", **overrides}
    with pytest.raises(ConfigError, match=match):
        build_config(None, list(pairs.items()))


def _blocks_of(rows: int, itemsize: int) -> int:
    """_BLOCK_BYTES for `rows` rows of fp32 / fp64 logits per block."""
    return rows * V * itemsize


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunks", [1, 5])
def test_fused_blocks_within_a_piece_fp64(monkeypatch, tied, chunks):
    """A piece cut into several cross-entropy blocks (uneven: 3 rows each, over pieces
    of 72 and 14-15 rows) gives the unchunked loss and gradients (fp64, 1e-10)."""
    x, y = _batch()
    ref = _model("gpt", tied, 0)
    out = _model("gpt", tied, chunks)
    out.load_state_dict(ref.state_dict())
    monkeypatch.setattr(chunked_loss, "_BLOCK_BYTES", _blocks_of(3, 8))
    l0, g0 = _loss_and_grads(ref, x, y, False)
    l1, g1 = _loss_and_grads(out, x, y, False)
    assert abs(l1.item() - l0.item()) <= 1e-10 * abs(l0.item())
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-10, atol=1e-12)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("block_rows", [None, 4])
@pytest.mark.parametrize("tied", [True, False])
def test_fused_bf16_autocast_matches_unchunked_autocast(monkeypatch, tied, block_rows):
    """Under bf16 autocast (fp32 weights) the fused path is the unchunked autocast
    head up to bf16 rounding. Both round the logits and the logits' gradient to bf16
    once (unit roundoff 2^-9 = 2e-3), in different places (the unchunked head rounds
    the gradient after the 1/N scaling, the fused one before; its weight gradient sums
    per-piece bf16 products), and the rounding spreads through the blocks: each
    parameter's gradient is ~3-9e-3 (relative norm) from the fp64 one on either path
    (measured), so the two differ by up to ~1e-2 per parameter: 2e-2 is the bound, and
    the fused gradients as a whole must be as close to fp64 as the unchunked ones
    (within 1.5x). The fp32 loss of (nearly) the same bf16 logits agrees to 1e-4. A
    real error (a missing one-hot, a wrong scale, a skipped block) is O(1)."""
    x, y = _batch()
    truth = _model("gpt", tied, 0)  # fp64, no autocast
    ref = _model("gpt", tied, 0).float()
    out = _model("gpt", tied, 5).float()
    out.load_state_dict(ref.state_dict())
    if block_rows:
        monkeypatch.setattr(chunked_loss, "_BLOCK_BYTES", _blocks_of(block_rows, 4))
    n = (y != IGNORE_INDEX).sum()
    (truth(x, targets=y) / n).backward()
    with torch.autocast("cpu", torch.bfloat16):
        l0 = ref(x, targets=y)
        l1 = out(x, targets=y)
    assert l1.dtype == l0.dtype == torch.float32
    (l0 / n).backward()
    (l1 / n).backward()
    assert abs(l1.item() - l0.item()) <= 1e-4 * abs(l0.item())
    for (name, p0), p1 in zip(ref.named_parameters(), out.parameters()):
        assert p1.grad.dtype == p0.grad.dtype == torch.float32
        assert _rel(p1.grad, p0.grad) <= 2e-2, f"{name}: {_rel(p1.grad, p0.grad)}"
    flat = [torch.cat([p.grad.double().flatten() for p in m.parameters()])
            for m in (truth, ref, out)]
    assert _rel(flat[2], flat[0]) <= 1.5 * _rel(flat[1], flat[0])


def test_fused_second_backward_refused():
    """The fused Function scales its stored gradients in place, so a second backward
    through a retained graph fails instead of returning gradients scaled twice."""
    x, y = _batch()
    model = _model("gpt", True, 4)
    loss = model(x, targets=y) / 7
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="a second time"):
        loss.backward()


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of each distinct storage of >= `least` bytes the ops under it return,
    except the storages that existed before (`old`: inputs, weights)."""

    def __init__(self, old, least: int):
        super().__init__()
        self.old, self.least, self.seen = set(old), least, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= self.least:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self.old:
                    self.seen[ptr] = t.untyped_storage().nbytes()
        return out


@pytest.mark.parametrize("dtype,block_rows", [("fp32", None), ("bf16", None), ("bf16", 5)])
def test_fused_buffer_bytes_are_the_tensors_the_forward_makes(monkeypatch, dtype, block_rows):
    """`fused_buffer_bytes` (what plan counts for the fused head, plan/memory.py) lists
    exactly the tensors of >= 1 KiB that the fused head's forward allocates: the same
    bytes in all (N 48 rows, D 16, V 97, 4 chunks; under bf16 autocast with the fp32
    block of the softmax cut to 5 rows, and whole). Smaller ones are per-row vectors
    (targets, masks, LayerNorm statistics: <= 384 B here)."""
    if block_rows:
        monkeypatch.setattr(chunked_loss, "_BLOCK_BYTES", _blocks_of(block_rows, 4))
    D, chunks = 16, 4
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, T, D, generator=g, requires_grad=True)
    y = torch.randint(0, V, (2, T), generator=g)
    y[0, :5] = IGNORE_INDEX
    norm, head = torch.nn.LayerNorm(D), torch.nn.Linear(D, V, bias=False)
    old = {t.untyped_storage().data_ptr() for t in (h, y, *norm.parameters(), head.weight)}
    with torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bf16"):
        x_bytes = norm(h).element_size()  # ln_f's output dtype under this autocast
        with _Allocations(old, 1024) as made:
            loss = chunked_loss.chunked_head_loss(norm, head, h, y, chunks)
    cb = 2 if dtype == "bf16" else 4
    kept, work = chunked_loss.fused_buffer_bytes(2 * T, V, D, chunks, cb, 4, x_bytes, 4)
    assert sorted(made.seen.values()) == sorted([*kept.values(), *work.values()])
    loss.backward()
    assert h.grad.shape == h.shape and head.weight.grad.shape == head.weight.shape
