"""The training loop: trainer (build + loop), step, losses, state, runtime, run directory."""
