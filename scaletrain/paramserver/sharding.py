"""Which server holds which parameter tensor: greedy bin packing by size.

Tensors are placed largest first, each on the server with the fewest elements so far
(the LPT rule; Graham 1969 bounds its makespan by 4/3 of the optimum). Whole tensors,
not slices: the optimizer's per-tensor state and the weight-decay grouping then stay
exactly as in single-process training, and a GPT's tensors are small compared to the
total, so the balance is good. Ties break by name, so every process computes the same
assignment without talking.
"""

from __future__ import annotations

from scaletrain.errors import ConfigError


def assign_shards(sizes: dict[str, int], n_servers: int) -> list[list[str]]:
    """Parameter names of each server, in the model's parameter order within a server.

    `sizes`: name -> numel in model order (`dict(model.named_parameters())`).
    """
    if n_servers > len(sizes):
        raise ConfigError(f"parallel.ps_servers={n_servers} exceeds the {len(sizes)} "
                          "parameter tensors of the model (a server would hold nothing)")
    load = [0] * n_servers
    owner: dict[str, int] = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        s = min(range(n_servers), key=lambda i: (load[i], i))
        owner[name] = s
        load[s] += sizes[name]
    return [[n for n in sizes if owner[n] == s] for s in range(n_servers)]
