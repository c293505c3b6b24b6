"""The training loops bench/peers.py puts side by side for the llama family
(`bench/peers.py --loops llama_loops --config configs/llama-10m.toml`).

The same ~10M llama, data, optimizer and precision in every loop (bench/peer_loops.py
says what they share): scaletrain's `Trainer.fit()`, the hand-written loop over the same
module (`scaletrain.bench.handloop.HandLoop`), and transformers' `LlamaForCausalLM` —
the model a Hugging Face user trains — built from the same config and loaded with the
same initial weights (scaletrain's names are transformers' with `model.layers.<i>` ->
`blocks.<i>` and `model.` dropped), trained

- by the HF `Trainer` (TrainingArguments: constant LR, the same AdamW passed in as the
  optimizer, `max_grad_norm`, `bf16` / `torch_compile` in the best mode, no logging,
  evaluation or saving), and
- by Hugging Face Accelerate with the usual hand loop over `LlamaForCausalLM`.

transformers computes the loss itself from `labels = input_ids` (shifted inside the
model: T-1 predictions per window of T, 1/256 fewer than the others at seq 256; the
forward and backward over T tokens are the same work), as a transformers user writes it.
"""

from __future__ import annotations

import torch

from peer_loops import _loader, _parts, _total, run_handloop, run_scaletrain


def hf_llama(model, cfg):
    """transformers' LlamaForCausalLM of scaletrain's llama `model`, same weights."""
    import transformers

    c = model.config
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.ff,
        num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
        num_key_value_heads=c.kv_heads, head_dim=c.hd, max_position_embeddings=c.seq_len,
        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, attention_bias=False,
        tie_word_embeddings=c.tie_embeddings, attention_dropout=0.0)
    hf_cfg._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(hf_cfg)
    state = {}
    for k, v in model.state_dict().items():
        k = k.replace("blocks.", "model.layers.", 1) if k.startswith("blocks.") else k
        state[k if k.startswith(("model.", "lm_head")) else "model." + k] = v
    hf.load_state_dict(state, strict=not c.tie_embeddings)
    return hf.train()


class Windows(torch.utils.data.Dataset):
    """scaletrain's token windows as transformers' {"input_ids", "labels"} records."""

    def __init__(self, windows):
        self.windows = windows

    def __len__(self):
        return len(self.windows)

    def __getitem__(self, i):
        x, _ = self.windows[i]
        x = torch.as_tensor(x)
        return {"input_ids": x, "labels": x}


def run_hf_trainer(cfg, gate) -> None:
    """transformers' Trainer on LlamaForCausalLM (its documented causal-LM set-up)."""
    import transformers

    model, _, windows = _parts(cfg)
    hf = hf_llama(model, cfg)
    from scaletrain.optim import build_optimizer

    opt = build_optimizer(hf, cfg.optim)  # the same groups and hyper-parameters
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)  # constant

    class Gate(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            gate(None)

    best = cfg.train.compile
    args = transformers.TrainingArguments(
        output_dir="/tmp/scaletrain-bench-peers/hf_trainer", use_cpu=True,
        max_steps=_total(gate), per_device_train_batch_size=cfg.train.micro_batch_size,
        gradient_accumulation_steps=1, max_grad_norm=cfg.train.grad_clip,
        bf16=cfg.precision.dtype == "bf16", torch_compile=best, report_to=[],
        logging_strategy="no", save_strategy="no", eval_strategy="no",
        dataloader_num_workers=0, seed=cfg.train.seed, disable_tqdm=True)
    trainer = transformers.Trainer(model=hf, args=args, train_dataset=Windows(windows),
                                   optimizers=(opt, sched), callbacks=[Gate()])
    trainer.train()


def run_hf_accelerate(cfg, gate) -> None:
    """Accelerate's loop over LlamaForCausalLM: `mixed_precision="bf16"` and
    `dynamo_backend="inductor"` in the best mode."""
    from accelerate import Accelerator

    from scaletrain.optim import build_optimizer

    acc = Accelerator(cpu=True, mixed_precision="bf16" if cfg.precision.dtype == "bf16"
                      else "no", dynamo_backend="inductor" if cfg.train.compile else "no")
    model, _, windows = _parts(cfg)
    hf = hf_llama(model, cfg)
    opt = build_optimizer(hf, cfg.optim)
    hf, opt, loader = acc.prepare(hf, opt, _loader(cfg, Windows(windows)))
    batches = iter(loader)
    for _ in range(_total(gate)):
        b = next(batches)
        loss = hf(input_ids=b["input_ids"], labels=b["labels"]).loss
        acc.backward(loss)
        acc.clip_grad_norm_(hf.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        gate(loss)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    for name in ("scaletrain", "transformers", "accelerate"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "missing"
    out["lightning"] = "-"  # peers.py's table names it; not a peer here
    return out


LOOPS = {"scaletrain": run_scaletrain, "hand loop": run_handloop,
         "HF Trainer (LlamaForCausalLM)": run_hf_trainer,
         "Accelerate (LlamaForCausalLM)": run_hf_accelerate}
NEEDS = {"HF Trainer (LlamaForCausalLM)": "accelerate",  # the Trainer runs on Accelerate
         "Accelerate (LlamaForCausalLM)": "accelerate"}
