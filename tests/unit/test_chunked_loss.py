"""model.loss_chunks: the head + cross-entropy chunk by chunk (models/chunked_loss.py)
gives the unchunked loss and gradients (fp64, 1e-10), for the GPT and the llama
family, tied and untied heads, with ignored targets and document masking; and the
chunked forward never holds the whole logits."""

from __future__ import annotations

import pytest
import torch

from scaletrain.config.schema import Config
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
