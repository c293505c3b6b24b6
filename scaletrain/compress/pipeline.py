"""`scaletrain compress RUN_DIR`: prune and / or quantize a trained text model, write each
result as an artefact directory, and measure every one against the original.

    original --prune.method--> pruned (+ short fine-tune) --save--> artefact
             --quant.methods--> quantized (each method)   --save--> artefact
    each artefact is re-loaded from disk (load_artefact) before it is measured, so the
    table describes what `generate` / `serve` will actually run.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from scaletrain.compress import artefact as art
from scaletrain.compress import prune as pr
from scaletrain.compress import quantize as qz
from scaletrain.compress.report import generation_speeds, measure, table, write_report
from scaletrain.config.paths import make_dir
from scaletrain.config.run_files import pick_weights
from scaletrain.errors import ConfigError
from scaletrain.evaluate.model_data import data_for_model
from scaletrain.finetune.lora import has_lora, merge_lora_run
from scaletrain.models.losses import count_targets, sum_cross_entropy
from scaletrain.models.registry import spec_of


def check(cfg) -> None:
    """Validate the compress request before any compute (one line per problem)."""
    for m in cfg.quant.methods:
        if m not in qz.METHODS:
            raise ConfigError(f"quant.methods: '{m}' is not one of {', '.join(qz.METHODS)}")
    if cfg.prune.method == "none" and not cfg.quant.methods:
        raise ConfigError("compress: nothing to do; set --prune.method=magnitude|structured "
                          "and / or --quant.methods=dynamic-int8,weight-int8,weight-int4")
    spec = spec_of(cfg.model)
    if spec.kind != "text":
        raise ConfigError(f"compress works on text models, not model.name='{cfg.model.name}'")
    if cfg.prune.method == "structured" and spec.prune_units is None:
        raise ConfigError(f"prune.method='structured' needs a family with prune units "
                          f"(models/prune_units.py); model.name='{cfg.model.name}' has none")


def finetune(model: nn.Module, train_set, steps: int, lr: float, batch_size: int,
             seed: int) -> list[float]:
    """A short constant-LR AdamW fine-tune on random train windows; returns the losses.

    Pruning masks (forward pre-hooks of torch.nn.utils.prune) stay attached, so pruned
    weights stay zero; the gradient flows to `weight_orig` masked.
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        x, y = train_set.batch(rng.integers(0, len(train_set), size=batch_size))
        loss = sum_cross_entropy(model(x), y) / count_targets(y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def compress(run_dir: str, overrides=()) -> dict:
    """Run the requested pruning / quantization on `run_dir`; returns the report."""
    cfg, model, tok = art.load_artefact(run_dir, overrides)
    check(cfg)
    if tok is None:
        raise ConfigError(f"'{run_dir}' has no tokenizer.json; compress needs a text run")
    out = make_dir("compress.out", cfg.compress.out or Path(run_dir) / "compressed")
    # Encoded with the run's own tokenizer, whatever the config's data says.
    data = data_for_model(cfg, run_dir, tok, dict(overrides).get("data.tokenizer", ""))
    if data.val is None:
        raise ConfigError("compress measures validation loss; data.val_fraction is 0")
    c = cfg.compress
    prompt = tok.encode(cfg.generate.prompt) or [tok.eot_id]
    tied = spec_of(cfg.model).tied  # the family's tied pairs (models/contract.py)
    opts = dict(batch_size=cfg.eval.batch_size, batches=c.eval_batches, tied=tied)
    torch.manual_seed(cfg.train.seed)

    original, original_file = "original", _weights_file(Path(run_dir))
    if has_lora(model):
        # A LoRA run's weights file holds only its adapters (0.13 MB for the demo): the
        # baseline every artefact is compared with is the merged model they all come
        # from, written out as the dense artefact it is (issue 13 item 8).
        merge_lora_run(cfg, model)
        original = "original-merged"
        d = art.save_artefact(out / original, art.dense_state(model, tied), cfg, tok,
                              "dense")
        original_file = d / art.WEIGHTS
    rows = [measure(original, "dense", original_file, model, data.val, **opts)]
    models = [model]  # kept for the round-robin speed measurement at the end
    extra: dict = {"source": str(run_dir), "threads": torch.get_num_threads()}
    p = cfg.prune
    if p.method != "none":
        pruned = copy.deepcopy(model)
        meta: dict = {}
        if p.method == "magnitude":
            pr.magnitude_prune(pruned, p.amount)
        else:
            meta = pr.structured_prune(pruned, p.amount, spec_of(cfg.model).prune_units)
            extra["structured"] = {**meta, "claimed_params": pr.structured_param_count(
                cfg.model, model.config.vocab_size, meta["heads"], meta["d_ff"])}
        if p.finetune_steps:
            extra["prune_finetune_losses"] = finetune(
                pruned, data.train, p.finetune_steps, p.finetune_lr, cfg.train.batch_size,
                cfg.train.seed)
        if p.method == "magnitude":
            pr.make_permanent(pruned)
            extra["sparsity"] = pr.sparsity(pruned)
        kind = "dense" if p.method == "magnitude" else "structured"
        name = f"pruned-{p.method}-{p.amount:g}"
        d = art.save_artefact(out / name, art.dense_state(pruned, tied), cfg, tok, kind,
                              **meta)
        _, loaded, _ = art.load_artefact(d)
        rows.append(measure(name, kind, d / art.WEIGHTS, loaded, data.val, **opts))
        models.append(loaded)
    for method in cfg.quant.methods:
        name = f"quant-{method}"
        state = qz.quantized_state(model, method, cfg.quant.group_size)
        d = art.save_artefact(out / name, state, cfg, tok, method)
        _, loaded, _ = art.load_artefact(d)
        rows.append(measure(name, method, d / art.WEIGHTS, loaded, data.val, **opts))
        models.append(loaded)
    speeds = generation_speeds(models, prompt, c.gen_tokens, cfg.model.seq_len,
                               rounds=c.gen_repeats, threads=c.gen_threads,
                               decode=spec_of(cfg.model).decode)
    for row, speed in zip(rows, speeds):
        row["tokens_per_s"] = speed
    extra["gen_threads"] = c.gen_threads or torch.get_num_threads()
    extra["gen_speed"] = f"median of {c.gen_repeats} round-robin repeats after a warm-up"
    write_report(out, rows, extra)
    return {"rows": rows, "out": str(out), "table": table(rows), **extra}


def _weights_file(d: Path) -> Path:
    meta = art.read_meta(d)
    if meta is not None:
        return d / art.WEIGHTS

    return pick_weights(d, "best")
