"""optim/step_end.py: the one end of step shared by train_step, Pipeline.step and the
parameter server's apply."""

import torch

from scaletrain.optim.step_end import finish_step


def _model_and_grads(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    model(torch.randn(5, 4)).pow(2).sum().backward()
    return model, list(model.parameters())


def test_finish_step_matches_the_written_out_order():
    """penalty -> clip value -> clip norm -> optimizer step -> zero grad, bitwise."""
    ref, ref_params = _model_and_grads()
    opt = torch.optim.SGD(ref_params, lr=0.1)
    for p in ref_params:
        p.grad.add_(0.01 * p.detach())  # the penalty
    torch.nn.utils.clip_grad_value_(ref_params, 0.5)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref_params, 1.0, foreach=True)
    opt.step()

    model, params = _model_and_grads()
    opt2 = torch.optim.SGD(params, lr=0.1)

    def penalty():
        for p in params:
            p.grad.add_(0.01 * p.detach())

    end = finish_step(opt2, params, add_penalty_grads=penalty, grad_clip_value=0.5,
                      grad_clip=1.0)
    assert not end.skipped
    assert torch.equal(end.grad_norm, ref_norm)
    for a, b in zip(ref_params, params):
        assert torch.equal(a, b)
        assert b.grad is None


def test_guard_refusal_skips_the_update_and_zeroes_the_grads():
    model, params = _model_and_grads()
    before = [p.detach().clone() for p in params]
    seen = []
    end = finish_step(torch.optim.SGD(params, lr=0.1), params, grad_clip=1e-3,
                      guard=lambda loss, norm: seen.append((loss, norm)) or False,
                      loss=torch.tensor(2.0))
    assert end.skipped
    assert seen and float(seen[0][0]) == 2.0 and float(seen[0][1]) > 1e-3  # pre-clip norm
    assert all(torch.equal(a, p) and p.grad is None for a, p in zip(before, params))


def test_clip_norm_counts_norm_params_only():
    """The pipeline's tied copies are left out of the norm: `norm_params` is what the
    norm function sees (with max_norm inf when train.grad_clip is 0)."""
    model, params = _model_and_grads()
    got = []
    finish_step(torch.optim.SGD(params, lr=0.0), params, grad_clip_value=1e-4,
                clip_norm=lambda ps, max_norm: got.append((ps, max_norm)),
                norm_params=params[:1])
    assert len(got[0][0]) == 1 and got[0][0][0] is params[0]
    assert got[0][1] == float("inf")  # grad_clip 0: measure only
