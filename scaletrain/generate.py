"""Text generation from a trained text model: greedy, temperature and top-k sampling,
with KV-cache decoding.

KV cache: the prompt is run once (prefill) and each block's keys and values are kept;
every new token then runs the model on that one position only, attending to the cached
keys/values, so a token costs O(T) attention instead of a full O(T²) re-run of the
context (the standard decoder inference scheme; e.g. Pope et al. 2022, "Efficiently
Scaling Transformer Inference"). The cached forward is a family fact (`ModelSpec.decode`:
models/gpt.py and models/llama.py `forward_cached`, the llama cache holding n_kv_head
heads): it re-uses the model's own submodules (embeddings, norms, the linears —
whatever LoRA / pruning / quantization converted them to) and only re-states the
attention's data flow, which must stay in step with the model's forward (the
KV-vs-no-cache tests check it).

The model is trained on at most `seq_len` positions (learned ones stop there; rotary
ones were never trained past it): once the window is full the context must slide,
every position shifts, and the cache is invalid; decoding then falls back to re-running
the last `seq_len` tokens per step, exactly what the no-cache path does, so both paths
give the same tokens for any length. (Exception: torch.ao dynamic int8 layers pick
activation scales per call, so a one-token call rounds differently from a whole-context
call; the logits are close, the greedy path may differ.)
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


def _pick(logits: torch.Tensor, temperature: float, top_k: int,
          generator: torch.Generator | None) -> int:
    """Next token from (V,) logits; temperature 0 is greedy.

    Any temperature > 0 is safe, down to the smallest float: the logits are shifted so
    that their maximum is 0 (softmax is shift-invariant) and divided in float64, where a
    Python float temperature is exact. Scaled values then lie in [-inf, 0] with at least
    one 0, so the softmax has no inf/nan; a tiny temperature sends every non-maximal
    logit to -inf, i.e. greedy (ties sampled evenly) — its limit. Dividing the raw fp32
    logits instead overflowed (logit / 1e-45 = inf, and 1e-300 rounds to 0 in fp32),
    which gave inf/nan probabilities.
    """
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.double()
    logits = (logits - logits.max()) / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def sample(model: nn.Module, prompt_ids: list[int], *, max_new_tokens: int, seq_len: int,
           temperature: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None,
           stop_id: int | None = None, use_cache: bool = True,
           decode: Callable | None = None,
           stop: Callable[[list[int]], bool] | None = None) -> list[int]:
    """Continue `prompt_ids`; temperature 0 is greedy. Returns only the new tokens.
    Ends at `stop_id` (not returned), or once `stop(new tokens so far)` is true (the
    token that made it true is returned: lm-eval's stop strings are cut from the text).

    `decode`: the family's cached forward (`spec_of(cfg.model).decode`: (model, idx,
    cache, pos0) -> logits); None, or `use_cache=False`, re-runs the (cropped) context
    for every token: the reference the cached path is tested against.
    """
    was_training = model.training
    model.eval()  # dropout off: the cache holds deterministic keys and values
    device = next(model.parameters()).device
    ids = list(prompt_ids)
    use_cache = use_cache and decode is not None
    cache: list = [None] * len(model.blocks) if use_cache else []
    pos = 0  # positions held in the cache
    out: list[int] = []
    try:
        for _ in range(max_new_tokens):
            if use_cache and pos == 0:
                ctx = ids[-seq_len:]
                logits = decode(model, torch.tensor([ctx], device=device), cache, 0)
                pos = len(ctx)
            elif use_cache and pos < seq_len:  # the last token is not in the cache yet
                logits = decode(model, torch.tensor([[ids[-1]]], device=device), cache, pos)
                pos += 1
            else:  # no cache, or the window is full: re-run the last seq_len tokens
                logits = model(torch.tensor([ids[-seq_len:]], device=device))
            nxt = _pick(logits[0, -1].float(), temperature, top_k, generator)
            if stop_id is not None and nxt == stop_id:
                break
            out.append(nxt)
            ids.append(nxt)
            if stop is not None and stop(out):
                break
    finally:
        model.train(was_training)
    return out
