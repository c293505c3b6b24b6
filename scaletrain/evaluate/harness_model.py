"""scaletrain's text models as an lm-evaluation-harness model (`lm_eval.api.model.
TemplateLM`): the three request types the harness's tasks are made of, over the model
and tokenizer of a run, a checkpoint, an artefact or an imported HF directory.

- loglikelihood(context, continuation): the harness's own `TemplateLM.loglikelihood`
  encodes the pair (trailing spaces of the context move to the continuation; an empty
  context is conditioned on the end-of-text token) and calls `_loglikelihood_tokens`,
  written here: the summed log-probability of the continuation's tokens and whether
  greedy decoding would produce them, in batches of right-padded rows (the model is
  causal, so padding after a row's last token changes none of its logits). A row longer
  than the model's window keeps its last `seq_len` + 1 tokens, as the harness's HF model
  does.
- loglikelihood_rolling(text): the whole text's log-likelihood over disjoint windows of
  `seq_len` tokens (the harness's `get_rolling_token_windows`), for perplexity tasks.
- generate_until(context, gen_kwargs): greedy decoding with the KV cache (generate.py
  `sample`) until one of the `until` strings or `max_gen_toks` tokens; one request at a
  time (decoding is sequential per token; a batch would only pad).

Written here, not taken from the harness: its HF model (`lm_eval.models.huggingface.
HFLM`) needs a `transformers` model, and scaletrain's models (LoRA-converted, pruned,
quantized, any family) are plain modules. The arithmetic is the harness's, and the tests
compare the two on an exported checkpoint.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from tqdm import tqdm

from scaletrain.data.tokenizer import Tokenizer
from scaletrain.generate import sample
from scaletrain.precision import PrecisionPolicy

DEFAULT_MAX_GEN_TOKS = 256  # the harness's default for generate_until tasks


class ScaletrainLM(TemplateLM):
    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, *, seq_len: int,
                 policy: PrecisionPolicy, batch_size: int, decode: Callable | None):
        """`decode`: the family's cached forward (`ModelSpec.decode`), for generation."""
        super().__init__()
        self.model = model.eval()
        self.tok = tokenizer
        self.seq_len = seq_len
        self.policy = policy
        self.batch_size_per_call = batch_size
        self.decode = decode

    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    @property
    def max_length(self) -> int:
        return self.seq_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs) -> list[int]:
        # scaletrain's tokenizers add no special tokens: a document is its text's ids.
        return self.tok.encode(string)

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    @torch.no_grad()
    def _logprobs(self, rows: list[list[int]]) -> list[torch.Tensor]:
        """(len(row), V) fp32 log-softmax of the model's logits for each row."""
        width = max(len(r) for r in rows)
        batch = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            batch[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        with self.policy.autocast():
            logits = self.model(batch.to(self.policy.device))
        logp = F.log_softmax(logits.float(), dim=-1).cpu()
        return [logp[i, :len(r)] for i, r in enumerate(rows)]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """[(cache key, context ids, continuation ids)] -> [(log-prob, is greedy)]."""
        window = self.seq_len
        rows, conts = [], []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("a loglikelihood request with an empty continuation")
            if len(continuation) > window:
                raise ValueError(f"a continuation of {len(continuation)} tokens does not "
                                 f"fit the model's window of {window} (model.seq_len)")
            rows.append((context + continuation)[-(window + 1):][:-1])
            conts.append(continuation)
        # Longest first: a batch's rows are of similar length (little padding), and a
        # window that does not fit memory fails on the first batch, not the last.
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        step = self.batch_size_per_call
        for start in tqdm(range(0, len(order), step), desc="lm-eval loglikelihood",
                          disable=disable_tqdm or len(order) <= step):
            idx = order[start:start + step]
            for i, logp in zip(idx, self._logprobs([rows[i] for i in idx])):
                cont = torch.tensor(conts[i], dtype=torch.long)
                mine = logp[-len(cont):]  # the positions that predict the continuation
                picked = mine.gather(1, cont[:, None]).squeeze(1)
                results[i] = (float(picked.sum()), bool((mine.argmax(-1) == cont).all()))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in tqdm([r.args for r in requests], desc="lm-eval rolling",
                            disable=disable_tqdm):
            windows = [(None, *lm_utils.make_disjoint_window(w))
                       for w in lm_utils.get_rolling_token_windows(
                           token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                           max_seq_len=self.seq_len, context_len=1)]
            out.append(sum(ll for ll, _ in self._loglikelihood_tokens(windows, True)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for context, gen_kwargs in tqdm([r.args for r in requests], desc="lm-eval generate",
                                        disable=disable_tqdm):
            kwargs = dict(gen_kwargs or {})
            until = kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
            if kwargs.get("do_sample") or float(kwargs.get("temperature", 0) or 0) > 0:
                raise ValueError("generate_until: scaletrain's harness model decodes "
                                 "greedily (do_sample=false, temperature=0)")

            def stop(new_ids: list[int]) -> bool:
                text = self.tok_decode(new_ids)
                return any(u in text for u in until)

            prompt = self.tok_encode(context) or [self.prefix_token_id]
            with self.policy.autocast():
                new = sample(self.model, prompt, max_new_tokens=max_new, seq_len=self.seq_len,
                             temperature=0.0, stop_id=self.eot_token_id, decode=self.decode,
                             stop=stop)
            text = self.tok_decode(new)
            for u in until:
                text = text.split(u)[0]
            out.append(text)
        return out
