"""What expert parallelism (parallel.ep, parallel/expert.py) changes in one rank's
memory, for plan/memory.py and plan/report.py (bytes; E routed experts of (D, F) SwiGLU
weights, El = E / ep of them on this rank, top_k routed copies of each token):

- parameters, gradients, optimizer state: the rank holds El whole experts, split again
  by FSDP2 over the dp_shard / ep ranks beside it — E / dp_shard experts' worth, as
  FSDP2 alone keeps (plan/report.py `expert_shards`);
- FSDP2's gathered blocks: the expert module is its own unit over the "efsdp" ranks
  (parallel/fsdp.py `_shard_experts`), so an all-gather rebuilds the El local experts,
  not all E (`gathered_expert_numel`);
- the autocast weight casts the experts' matmuls save (plan/activations.py measures one
  block of E experts: 3·E casts of D·F elements): the rank runs only its El experts
  (models/moe.py `swiglu_experts` on the local weights), so 3·(E − El) casts are not
  made (`skipped_casts`);
- the all-to-all buffers of one MoE layer (`exchange_buffers`): the dispatch's receive
  buffer of R rows of the residual stream (D values each, the block's input dtype), and
  the combine's send buffer of the same R rows, each alive within the layer's forward
  (and again in its backward, the reverse exchange of the gradients); R = tokens ·
  top_k, the rows of a balanced load (each rank receives what it sends on average; a
  skewed router can send a rank up to ep times that). What the experts save for the
  backward over those R rows is what one process saves over its M = tokens · top_k
  rows, measured (plan/activations.py).
"""

from __future__ import annotations

from scaletrain.config.model_checks import is_moe_layer


def moe_blocks(model_cfg, blocks) -> list[int]:
    """The MoE blocks among model block indices `blocks`."""
    m = model_cfg
    return [i for i in blocks if is_moe_layer(i, m.moe_experts, m.moe_every,
                                              m.moe_first_dense)]


def expert_dims(shapes: dict) -> tuple:
    """(E, D, F) of the routed experts (their gate_proj's shape), or () without any."""
    return next((tuple(sh) for k, sh in shapes.items()
                 if k.endswith(".mlp.experts.gate_proj")), ())


def gathered_expert_numel(numel: float, ep: int) -> float:
    """Elements of one routed expert tensor (E, D, F) that FSDP2 all-gathers on a rank:
    its El = E / ep local experts."""
    return numel / ep


def skipped_casts(expert_dims: tuple, ep: int) -> tuple[float, float]:
    """(count, elements each) of the bf16 expert-weight casts an MoE block does not make
    under EP: 3·(E − E/ep) of D·F elements (gate, up (D, F) and down (F, D))."""
    if ep <= 1 or not expert_dims:
        return 0.0, 0.0
    E, D, F = expert_dims
    return 3.0 * (E - E // ep), float(D * F)


def exchange_buffers(expert_dims: tuple, ep: int, tokens: int, top_k: int,
                     r: int) -> list[float]:
    """Bytes of the all-to-all buffers alive at once in one MoE layer (module doc): the
    received rows and the rows sent back, R = tokens · top_k rows of D values of `r`
    bytes each."""
    if ep <= 1 or not expert_dims:
        return []
    rows = tokens * top_k
    return [float(rows * expert_dims[1] * r)] * 2
