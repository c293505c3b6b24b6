"""train/step_loss.py: the run's micro-batch loss, chosen once."""

import torch

from scaletrain.precision import PrecisionPolicy
from scaletrain.models.losses import sum_cross_entropy
from scaletrain.train.step_loss import build_step_loss

CPU = PrecisionPolicy("fp32", torch.device("cpu"))


class Head(torch.nn.Module):
    """Logits, or the summed loss when given targets (like GPT.head_loss)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(7, 7)

    def forward(self, x, targets=None):
        z = self.emb(x)
        return z if targets is None else sum_cross_entropy(z, targets) + 100.0


def test_the_three_kinds_and_their_precedence():
    model, x, y = Head(), torch.randint(0, 7, (2, 3)), torch.randint(0, 7, (2, 3))
    ce = sum_cross_entropy(model(x), y)
    assert torch.equal(build_step_loss()(model, x, y, CPU, torch.float32), ce)
    in_model = build_step_loss(loss_in_model=True)(model, x, y, CPU, torch.float32)
    assert torch.equal(in_model, ce + 100.0)
    seen = []
    custom = build_step_loss(lambda z, xi, t: seen.append(z.dtype) or z.sum())
    assert torch.equal(custom(model, x, y, CPU, torch.float64), model(x).double().sum())
    assert seen == [torch.float64]  # handed the logits in the loss dtype
