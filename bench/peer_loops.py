"""The training loops bench/peers.py puts side by side, one per framework.

Every loop trains the same thing, read from one scaletrain config: the same model class
and initial weights (`scaletrain.models.gpt.GPT` via `build_model`, seeded), the same
token windows (`build_data(cfg).train`), AdamW with the same parameter groups and
hyper-parameters (`build_optimizer`: decay on matrices only; the kernel per
`optim.implementation`, which bench/peers.py sets), the same
micro-batch and sequence length, mean cross-entropy on fp32 logits, global-norm
gradient clipping at `train.grad_clip`, and the same precision: fp32, or bf16 autocast
of the forward (`precision.dtype=bf16`) with `train.compile` compiling the model the way
each framework documents it. The learning rate is constant (the bench sets
`schedule.name=constant`), so no loop needs a scheduler beyond scaletrain's own.

- scaletrain: its real `Trainer.fit()` (what `scaletrain train` runs), with the gate
  called after each `train_one_step`; nothing of its loop is re-written here.
- hand loop: `scaletrain.bench.handloop.HandLoop`, also used by `scaletrain bench`.
- Lightning Trainer, Lightning Fabric, Hugging Face Accelerate: as their docs show.

The peers' data come through a plain `torch.utils.data.DataLoader(shuffle=True)`, as a
user of those frameworks writes it; scaletrain uses its own loader. Each loop calls
`gate(loss)` after every optimizer step; the gate (bench/peers.py) does the timing and
pauses the loop between timed segments, so only one framework runs at a time.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from scaletrain.data.build import build_data
from scaletrain.models import build_model
from scaletrain.optim import build_optimizer
from scaletrain.precision import PrecisionPolicy


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy on fp32 logits (scaletrain's loss is the same mean,
    computed as a sum over targets / their count)."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))


def _parts(cfg):
    """(model, optimizer, train windows) exactly as scaletrain builds them."""
    data = build_data(cfg, progress=False)
    model = build_model(cfg.model, {"vocab_size": data.vocab_size}, seed=cfg.train.seed)
    # Built on the plain module, before any compile wrapper, so the groups are the same.
    return model.train(), build_optimizer(model, cfg.optim), data.train


def _loader(cfg, windows):
    g = torch.Generator().manual_seed(cfg.train.seed)
    return torch.utils.data.DataLoader(windows, batch_size=cfg.train.micro_batch_size,
                                       shuffle=True, drop_last=True, generator=g)


def _total(gate) -> int:
    return gate.total_steps


def run_scaletrain(cfg, gate) -> None:
    """`scaletrain train`'s path: the Trainer's steps, the gate after each step."""
    from scaletrain.config.dims import resolve_dims
    from scaletrain.parallel.world import World
    from scaletrain.train.runtime import detect_runtime
    from scaletrain.train.trainer import Trainer

    world = World()  # one process: its runtime and layout, resolved once and handed down
    tr = Trainer(cfg, detect_runtime(cfg.train.device, cfg.train.threads, world),
                 resolve_dims(cfg.parallel, world.size))
    inner = tr.train_one_step

    def step():
        result, lr = inner()
        gate(result.loss)
        return result, lr

    tr.train_one_step = step  # instance attribute (as scaletrain/bench/report.py does)
    with tr.dist.guard():
        tr.fit()
    tr.dist.close()


def run_handloop(cfg, gate) -> None:
    """The hand-written loop of `scaletrain bench` (whole-model `compile()`, autocast)."""
    from scaletrain.bench.handloop import HandLoop

    data = build_data(cfg, progress=False)
    micro = cfg.train.micro_batch_size or cfg.train.batch_size
    # HandLoop reads these attributes of a Trainer; no Trainer (run dir, sinks) needed.
    device = torch.device("cpu")
    tr = types.SimpleNamespace(cfg=cfg, data=data, policy=PrecisionPolicy(
        cfg.precision.dtype, device), micro=micro, accum=cfg.train.batch_size // micro,
        rt=types.SimpleNamespace(device=device))
    loop = HandLoop(tr)
    for _ in range(_total(gate)):
        loop.step()
        gate(None)


def _precision(cfg) -> str:
    return {"fp32": "32-true", "bf16": "bf16-mixed"}[cfg.precision.dtype]


def run_lightning(cfg, gate) -> None:
    """Lightning's Trainer; compile = `torch.compile(lightning_module)` (Lightning docs,
    "Speed up models by compiling them"). Lightning then compiles `training_step` as
    well as `forward` (lightning/pytorch/utilities/compile.py `from_compiled`), so here
    the cross-entropy is in the same graph as the whole model; the other loops compile
    the model (or its blocks) only."""
    import lightning as L

    model, opt, windows = _parts(cfg)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x)

        def training_step(self, batch, _idx):
            x, y = batch
            return _ce(self(x), y)

        def configure_optimizers(self):
            return opt

    class Gate(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, idx):
            gate(outputs["loss"])

    module = Module()
    if cfg.train.compile:
        module = torch.compile(module)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=_precision(cfg),
                        max_steps=_total(gate), gradient_clip_val=cfg.train.grad_clip,
                        gradient_clip_algorithm="norm", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[Gate()])
    trainer.fit(module, _loader(cfg, windows))


def run_fabric(cfg, gate) -> None:
    """Lightning Fabric: the user's loop, Fabric's precision and clipping."""
    from lightning.fabric import Fabric

    fabric = Fabric(accelerator="cpu", devices=1, precision=_precision(cfg))
    model, opt, windows = _parts(cfg)
    if cfg.train.compile:
        model = torch.compile(model)  # Fabric docs: compile, then setup
    model, opt = fabric.setup(model, opt)
    batches = iter(fabric.setup_dataloaders(_loader(cfg, windows)))
    for _ in range(_total(gate)):
        x, y = next(batches)
        loss = _ce(model(x), y)
        fabric.backward(loss)
        fabric.clip_gradients(model, opt, max_norm=cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        gate(loss)


def run_accelerate(cfg, gate) -> None:
    """Hugging Face Accelerate: `mixed_precision="bf16"`, compile by
    `dynamo_backend="inductor"` (whole model, Accelerate's default compile)."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True, mixed_precision="bf16" if cfg.precision.dtype == "bf16"
                      else "no", dynamo_backend="inductor" if cfg.train.compile else "no")
    model, opt, windows = _parts(cfg)
    model, opt, loader = acc.prepare(model, opt, _loader(cfg, windows))
    batches = iter(loader)
    for _ in range(_total(gate)):
        x, y = next(batches)
        loss = _ce(model(x), y)
        acc.backward(loss)
        acc.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        gate(loss)


def versions() -> dict[str, str]:
    """Installed versions of every framework in the comparison."""
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    for name in ("scaletrain", "lightning", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "missing"
    return out


LOOPS = {"scaletrain": run_scaletrain, "hand loop": run_handloop,
         "Lightning Trainer": run_lightning, "Lightning Fabric": run_fabric,
         "Accelerate": run_accelerate}
# Which package each loop needs (a missing one is reported, not crashed on).
NEEDS = {"Lightning Trainer": "lightning", "Lightning Fabric": "lightning",
         "Accelerate": "accelerate"}
