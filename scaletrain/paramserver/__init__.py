"""Parameter-server training (issue #7): sync, async (Downpour) and stale-synchronous.

`train_ps(cfg)` runs this process's role; see trainer.py for the roles, coordinator.py
for the consistency models, transport.py for why torch.distributed.rpc.
"""

from scaletrain.paramserver.trainer import train_ps

__all__ = ["train_ps"]
