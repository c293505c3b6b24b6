"""`scaletrain generate` (samples printed) and `scaletrain serve` (an HTTP completion
server): text from a run, artefact or Hugging Face directory."""

from __future__ import annotations

from scaletrain.cli.args import base_parser, run_dir_of, split_args
from scaletrain.errors import UserError

# Each command imports the project's modules inside its function, the one place in
# scaletrain that does (scaletrain/cli/__init__.py, tests/unit/test_layers.py).


def cmd_generate(argv: list[str]) -> int:
    import torch

    from scaletrain.compress.artefact import load_artefact
    from scaletrain.generate import sample
    from scaletrain.models.registry import spec_of

    args, overrides = split_args(base_parser("generate", run_dir=True), argv)
    run_dir = run_dir_of(args, overrides)
    cfg, model, tok = load_artefact(run_dir, overrides)  # run, artefact or HF dir
    if tok is None:
        raise UserError(f"'{run_dir}' is not a text model run; generate needs a text model")
    g = cfg.generate
    gen = torch.Generator().manual_seed(g.seed)
    prompt = tok.encode(g.prompt)
    if not prompt:
        raise UserError("generate.prompt must not be empty")
    for i in range(g.num_samples):
        new = sample(model, prompt, max_new_tokens=g.max_new_tokens, seq_len=cfg.model.seq_len,
                     temperature=g.temperature, top_k=g.top_k, generator=gen,
                     stop_id=tok.eot_id, decode=spec_of(cfg.model).decode)
        print(f"--- sample {i + 1} ---")
        print(g.prompt + tok.decode(new))
    return 0


def cmd_serve(argv: list[str]) -> int:
    from scaletrain.serve.server import serve  # lazy (package note)

    args, overrides = split_args(base_parser("serve", run_dir=True), argv)
    serve(run_dir_of(args, overrides), overrides)
    return 0
