"""The `[parallel]` and `[plan]` sections: the layout and its memory planning."""

from __future__ import annotations

from dataclasses import dataclass

from scaletrain.config.fields import F


@dataclass
class ParallelConfig:
    dp_replicate: int = F(1, "Data-parallel replicas: gradients all-reduced (DDP; with "
                          "dp_shard > 1, HSDP). -1 = inferred from the world size.", ge=-1)
    dp_shard: int = F(-1, "Data-parallel shards: parameters, gradients and optimizer "
                      "state sharded (FSDP2 / ZeRO-3). -1 = inferred from the world size "
                      "(world / (dp_replicate * tp * pp)).", ge=-1)
    tp: int = F(1, "Tensor-parallel degree.", ge=1)
    pp: int = F(1, "Pipeline-parallel degree.", ge=1)
    ep: int = F(1, "Expert-parallel degree (mixture-of-experts models): the routed "
                "experts split over groups of ep data-parallel ranks (carved out of "
                "dp_shard, as torchtitan does), tokens exchanged by all-to-all; must "
                "divide dp_shard and model.moe_experts.", ge=1)
    # Model parallelism options (issue #6; parallel/tensor.py, parallel/pipeline.py).
    pp_schedule: str = F("1f1b", "Pipeline schedule: 'gpipe' (all forwards, then all "
                         "backwards), '1f1b' (one forward one backward: activations of at "
                         "most pp micro-batches alive) or 'interleaved-1f1b' (pp_virtual "
                         "stages per rank, smaller bubble).",
                         choices=("gpipe", "1f1b", "interleaved-1f1b"))
    pp_microbatches: int = F(0, "Pipeline micro-batches per step (>= stages); 0 = the "
                             "rank's batch / train.micro_batch_size.", ge=0)
    pp_virtual: int = F(2, "interleaved-1f1b: pipeline stages per rank.", ge=1)
    pp_split_points: str = F("", "Manual pipeline split: comma-separated block indices "
                             "where a new stage starts (e.g. '6' or '3,6,9'); empty = "
                             "blocks split evenly.")
    sequence_parallel: bool = F(False, "TP: shard LayerNorm/dropout activations along the "
                                "sequence (Korthikanti et al. 2022); needs seq_len % tp == 0.")
    loss_parallel: bool = F(True, "TP: keep the logits vocabulary-sharded and compute the "
                            "cross-entropy without gathering them (torch loss_parallel).")
    backend: str = F("auto", "Collective backend: 'auto' = NCCL on CUDA, gloo on CPU.",
                     choices=("auto", "gloo", "nccl"))
    timeout_s: float = F(600.0, "Seconds a collective may wait for a peer before the "
                         "run stops with an error (a dead or hung rank).", gt=0.0)
    reshard_after_forward: bool = F(True, "FSDP2: free each block's gathered parameters "
                                    "after its forward (ZeRO-3); false keeps them until "
                                    "the backward (more memory, one all-gather less).")
    cpu_offload: bool = F(False, "FSDP2: keep parameter shards, gradients and optimizer "
                          "state in host memory (CPUOffloadPolicy).")
    activation_checkpoint: str = F("none", "Recompute activations per transformer block "
                                   "in the backward: 'full' (keep only block inputs), "
                                   "'selective' (keep matmul/attention outputs), or "
                                   "'budget' (the least recomputation, block by block, "
                                   "that fits parallel.activation_budget_gib).",
                                   choices=("none", "full", "selective", "budget"))
    activation_checkpoint_every: int = F(1, "full / selective: checkpoint every k-th block "
                                         "(0, k, 2k, ...); 1 = all blocks.", ge=1)
    activation_budget_gib: float = F(0.0, "budget mode: GiB that this rank's blocks may "
                                     "keep for the backward per micro-batch (the plan's "
                                     "byte model; `scaletrain plan` shows the result).",
                                     ge=0.0)
    ddp_bucket_mb: int = F(25, "DDP: gradient bucket size in MiB (all-reduce granularity, "
                           "overlapped with the backward).", ge=1)
    # Parameter-server mode (issue #7; scaletrain/paramserver/).
    mode: str = F("spmd", "'spmd': every rank trains (data/sharded parallel); 'ps': "
                  "parameter server — ranks [0, ps_servers) hold the parameters, the rest "
                  "are workers.", choices=("spmd", "ps"))
    ps_servers: int = F(1, "PS: server processes (ranks 0..ps_servers-1); parameters are "
                        "sharded across them, balanced by size.", ge=1)
    ps_consistency: str = F("sync", "PS: 'sync' (one update per step from every worker), "
                            "'async' (Downpour: apply each push at once) or 'ssp' (stale-"
                            "synchronous: at most ps_staleness steps ahead of the slowest).",
                            choices=("sync", "async", "ssp"))
    ps_staleness: int = F(2, "PS ssp: how many steps a worker may run ahead of the slowest "
                          "(0 = sync).", ge=0)
    ps_push_every: int = F(1, "PS async: push the accumulated gradient every this many "
                           "worker steps.", ge=1)
    ps_pull_every: int = F(1, "PS async: pull fresh parameters every this many worker "
                           "steps.", ge=1)
    ps_weighting: str = F("tokens", "PS: weight workers' gradients by their target tokens "
                          "(= one big batch) or equally.", choices=("tokens", "equal"))
    ps_timeout_s: float = F(60.0, "PS: a worker silent for this long while others wait "
                            "(or, in async, at all) is dropped and training goes on.", gt=0.0)
    ps_slow_worker: int = F(-1, "PS, tests/benchmarks only: index of a worker to slow "
                            "down; -1 = none.", ge=-1)
    ps_slow_delay_s: float = F(0.0, "PS, tests/benchmarks only: seconds the slowed worker "
                               "sleeps after each step.", ge=0.0)


@dataclass
class PlanConfig:
    # Memory planning (issue #8; scaletrain/plan/): `scaletrain plan --fit` and this.
    auto: bool = F(False, "At start-up, choose the cheapest micro-batch, activation "
                   "checkpointing, CPU offload, precision and optimizer that fit the "
                   "memory (scaletrain plan --fit) and apply them; logged in plan.json "
                   "and summary.json.")
    memory_gib: float = F(0.0, "Memory per rank the plan may use, GiB; 0 = detect (90% of "
                          "MemAvailable / local ranks on CPU, of the GPU's free memory).",
                          ge=0.0)
