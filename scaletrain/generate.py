"""Text generation from a trained GPT: temperature and top-k sampling.

The model is re-run on the (cropped) context for each new token; KV-cache decoding is a
deployment concern (compress/ and serve).
"""

from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def sample(model: nn.Module, prompt_ids: list[int], *, max_new_tokens: int, seq_len: int,
           temperature: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None,
           stop_id: int | None = None) -> list[int]:
    """Continue `prompt_ids`; temperature 0 is greedy. Returns only the new tokens."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    out: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(ids[:, -seq_len:])[0, -1].float()  # (V,)
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            logits = logits / temperature
            if top_k:
                kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            nxt = int(torch.multinomial(probs.cpu(), 1, generator=generator))
        if stop_id is not None and nxt == stop_id:
            break
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]], device=device)], dim=1)
    return out
