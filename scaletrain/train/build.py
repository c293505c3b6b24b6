"""The trainer's build steps, each given the values it needs and returning what it
builds (torchtitan's `parallelize(model, parallel_dims, job_config)` shape): the order of
a run's build reads top to bottom in `Trainer.__init__` (train/trainer.py), and no step
reads anything back from the trainer.

    data (checked against the world) -> run-dir files -> model + layout -> loader
    -> loss (MoE terms, DPO) -> metric sinks -> parameters / FLOPs per token
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import torch

from scaletrain.config import Config, run_files, to_dict
from scaletrain.config.batch_plan import BatchPlan
from scaletrain.data.build import Data, build_data
from scaletrain.data.chat import save_chat_files
from scaletrain.data.loader import StatefulLoader
from scaletrain.finetune import apply_init, converter, writes_every_weight
from scaletrain.metrics import build_sinks
from scaletrain.metrics.trackers import tracker_sinks
from scaletrain.models.documents import masking_eot
from scaletrain.models.moe_terms import MoeStepTerms, moe_step_terms
from scaletrain.models.weight_norm import convert as convert_weight_norm
from scaletrain.parallel.ac import block_modes
from scaletrain.parallel.context import DistContext
from scaletrain.parallel.model_parallel import whole_model_stats
from scaletrain.parallel.parallel_model import ParallelModel
from scaletrain.parallel.parallelize import build_parallel_model
from scaletrain.parallel.pipeline_moe import pipeline_moe_terms
from scaletrain.parallel.world_checks import check_world
from scaletrain.plan.ac_budget import activation_policy
from scaletrain.plan.preflight import check_memory
from scaletrain.precision import PrecisionPolicy
from scaletrain.train.dpo import DPOLoss, dpo_loss, frozen_initial_model
from scaletrain.train.run_guard import prepare_run_dir
from scaletrain.train.runtime import Runtime
from scaletrain.train.step_loss import StepLoss, run_loss


def shows_progress(cfg: Config, rt: Runtime) -> bool:
    """The progress bar (and the data preparation's): the main rank, when asked or on a
    terminal."""
    return rt.is_main and (
        cfg.train.progress == "on" or (cfg.train.progress == "auto" and sys.stderr.isatty()))


def build_run_data(cfg: Config, rt: Runtime, dist: DistContext, progress: bool) -> Data:
    """The run's data, then the checks that need it (its vocabulary, its split size)."""
    with dist.main_first():  # rank 0 fills the data cache, the others read it
        data = build_data(cfg, progress=progress)
    # Everything the world size constrains (the launcher checked it before torchrun
    # without the tokenizer's vocabulary): TP/PP shapes, single-process features.
    check_world(cfg, rt.world, data.vocab_size, dims=dist.dims)
    if cfg.train.descent == "full-batch":  # its batch is the split: known only now
        check_memory(cfg, dist.dims, rt.local_world, len(data.train))
    return data


def write_run_files(cfg: Config, data: Data, run_dir: Path) -> None:
    """Main rank: the run dir prepared (train/run_guard.py), the tokenizer and the chat
    files written into it."""
    prepare_run_dir(cfg)
    if data.tokenizer is not None:
        data.tokenizer.save(run_dir / run_files.TOKENIZER_FILE)
    if cfg.data.format == "chat":  # a resume renders with the run's own copy
        save_chat_files(cfg.data.tokenizer, cfg.data.chat_template, run_dir)


def data_facts(data: Data) -> dict:
    """What the model's shape takes from the data (ModelSpec.build's `facts`)."""
    return {"vocab_size": data.vocab_size, "input_shape": data.input_shape,
            "num_classes": data.num_classes}


def build_model(cfg: Config, facts: dict, batch: BatchPlan, dist: DistContext,
                policy: PrecisionPolicy, device: torch.device,
                resuming: bool) -> tuple[ParallelModel, list[str]]:
    """The parallel model (its module after init.from and the converters) and each of
    this rank's blocks' AC mode."""
    # meta -> freeze / LoRA -> AC -> FSDP | DDP -> seeded init: the same weights on
    # every layout, the adapters sharded and reduced like any parameter.
    ac = activation_policy(cfg, dist.dims, batch)
    # The module with its layout facts (stage views, tied copies, loss parallel).
    parallel = build_parallel_model(
        cfg.model, facts, seed=cfg.train.seed, dims=dist.dims, mesh=dist.mesh,
        pcfg=cfg.parallel, policy=policy, device=device,
        compile=cfg.train.compile and cfg.train.compile_scope, ac=ac,
        init=not writes_every_weight(cfg, resuming),
        expert_mesh=dist.expert_mesh, convert=converter(cfg))
    model = parallel.module
    blocks = getattr(model, "blocks", None) or {}
    # Each of this rank's blocks' AC mode (summary.json parallel.ac_blocks).
    ac_modes = block_modes(ac, sum(b is not None for b in blocks.values()))
    # Trained weights of init.from into the (LoRA layers' base) weights; the adapters.
    model = apply_init(model, cfg, facts["vocab_size"], resuming)
    model = convert_weight_norm(model, cfg.model.weight_norm)
    return replace(parallel, module=model), ac_modes  # weight norm may wrap


def build_loader(cfg: Config, data: Data, dist: DistContext) -> StatefulLoader:
    """This data-parallel rank's share of the train split, resumable."""
    return StatefulLoader(
        data.train, cfg.train.batch_size, rank=dist.dp_rank, world=dist.dims.dp,
        seed=cfg.train.seed, shuffle=cfg.data.shuffle, assignment=cfg.data.assignment,
        workers=cfg.data.loader_workers)


def build_loss(cfg: Config, parallel: ParallelModel, dist: DistContext,
               policy: PrecisionPolicy, device: torch.device, data: Data, facts: dict
               ) -> tuple[int | None, MoeStepTerms | None, StepLoss | DPOLoss]:
    """(document-masking end-of-text id, MoE step terms, the run's one loss)."""
    # data.document_masking: the end-of-text id windows are cut into documents at.
    doc_eot = masking_eot(cfg.data.document_masking, data.tokenizer)
    loss = run_loss(cfg, parallel, device, doc_eot)  # either path
    # MoE layers: their loss terms into the step, load into metrics and the bias; on a
    # pipeline rank its stages' rows of the whole model's (each stage adds its own
    # terms to its backward: parallel/pipeline_moe.py).
    moe = (pipeline_moe_terms(parallel, cfg.model, facts, device, dist.mesh)
           if dist.dims.pp > 1 else
           moe_step_terms(parallel.module, dist.sum_reducer, cfg.model.moe_bias_update_rate))
    if moe is not None:
        loss = replace(loss, extra=moe.collect)
    if cfg.train.objective == "dpo":  # the DPO loss and its frozen reference instead
        loss = dpo_loss(cfg, parallel.module, lambda: frozen_initial_model(
            cfg, facts, dist, policy, device, data.vocab_size))
    return doc_eot, moe, loss


def open_sinks(cfg: Config, run_dir: Path):
    """Main rank: metrics.jsonl, TensorBoard and the experiment trackers asked for."""
    return build_sinks(run_dir, console=False, tensorboard=True,
                       trackers=tracker_sinks(cfg.metrics, run_dir, to_dict(cfg)))


def model_stats(cfg: Config, parallel: ParallelModel, n_params: int, loss, pipeline,
                facts: dict) -> tuple[int, float | None]:
    """(parameters, training FLOPs per token) for summary.json and the MFU: this
    rank's `n_params`, or the whole model's on a pipeline rank."""
    spec, model = parallel.spec, parallel.module
    flops_per_token = (spec.flops_per_token(model, cfg.model.seq_len)
                       if spec.flops_per_token else None)
    if isinstance(loss, DPOLoss):  # "tokens" count pairs there: no MFU from them
        flops_per_token = None
    if pipeline is not None:  # the whole model's, not this rank's stage(s)
        return whole_model_stats(pipeline, spec, cfg.model, facts)
    return n_params, flops_per_token
