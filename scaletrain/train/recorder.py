"""The run recorder: what a run writes about itself besides training — evaluations
(metrics.jsonl), keep-best (best.safetensors), the final weights, the test on the
weights chosen on validation, and at the end summary.json and the plots.

Shared by the spmd trainer (train/trainer.py) and the parameter server's rank 0
(paramserver/trainer.py), so the two cannot drift apart. What differs by layout comes
in as callables: how a split's batches are evaluated (pipeline stages, a replica
pulled from the servers), how the full weights are gathered and written, and the
summary fields of the layout. The best validation loss and its step live in the run's
`TrainState` (checkpointed with it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from scaletrain.config import run_files
from scaletrain.data.datasets import MixtureWindows
from scaletrain.data.loader import eval_batches
from scaletrain.evaluate import covered_samples, mixture_result, split_batches
from scaletrain.metrics import plot_run, write_summary
from scaletrain.train.state import TrainState

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


class RunRecorder:
    def __init__(self, cfg, run_dir: Path, data, state: TrainState, *,
                 run_eval: Callable[[str, Batches], dict],
                 save_weights: Callable[[Path], None],
                 load_weights: Callable[[Path], None],
                 log: Callable[[dict], None],
                 is_main: bool = True, rank: int = 0, world: int = 1,
                 barrier: Callable[[], None] = lambda: None,
                 on_val: Callable[[float], None] = lambda loss: None,
                 eval_extra: Callable[[], dict] = dict):
        """`run_eval(split, batches)`: the layout's evaluation of a split's batches
        ({"loss", ...}); `save_weights(path)` every rank calls (a collective when
        sharded), `load_weights(path)` too; `rank`/`world`: the data-parallel shard of
        the eval batches; `on_val(loss)`: after each validation (plateau schedules);
        `eval_extra()`: fields added to each eval record (PS: wall_s)."""
        self.cfg, self.run_dir, self.data, self.state = cfg, Path(run_dir), data, state
        self.run_eval, self.log = run_eval, log
        self.save_weights, self.load_weights = save_weights, load_weights
        self.is_main, self.rank, self.world, self.barrier = is_main, rank, world, barrier
        self.on_val, self.eval_extra = on_val, eval_extra

    def evaluate(self, split: str, step: int) -> dict:
        """Evaluate `split` ("val": eval.batches; "test": the whole split), log the
        record; returns it with the samples the loss covers (for summary.json)."""
        dataset = {"val": self.data.val, "test": self.data.test}[split]
        e = self.cfg.eval
        n_batches = split_batches(split, e)
        if isinstance(dataset, MixtureWindows):
            result = self._evaluate_mixture(split, dataset, n_batches)
        else:
            result = self.run_eval(split, eval_batches(dataset, e.batch_size, n_batches,
                                                       rank=self.rank, world=self.world))
        if split == "val":
            self.on_val(result["loss"])
        self.log({"kind": "eval", "split": split, "step": step, **result,
                  **self.eval_extra()})
        # summary.json says what each loss covers (metrics.jsonl keeps its schema).
        parts = dataset.parts if isinstance(dataset, MixtureWindows) else [dataset]
        return {**result, "samples": sum(covered_samples(p, e.batch_size, n_batches)
                                         for p in parts)}

    def _evaluate_mixture(self, split: str, dataset: MixtureWindows, n_batches: int) -> dict:
        """Each source's split on its own (the same `eval.batches` of each, every rank
        in the same order: the evaluation's collectives match), combined by
        `mixture_result` (loss_by_source, mixture-weighted loss)."""
        e = self.cfg.eval
        by_source = {name: self.run_eval(split, eval_batches(part, e.batch_size, n_batches,
                                                             rank=self.rank,
                                                             world=self.world))
                     for name, part in zip(dataset.names, dataset.parts)}
        return mixture_result(by_source, dataset.weights)

    def keep_best(self, val_loss: float, step: int) -> None:
        """A new best validation loss: remember it and write best.safetensors."""
        if val_loss < self.state.best_val:
            self.state.best_val, self.state.best_step = val_loss, step
            self.save_weights(self.run_dir / run_files.BEST_WEIGHTS)

    def validate(self, step: int) -> dict:
        """A validation with keep-best (the loop's eval interval, and step 0)."""
        val = self.evaluate("val", step)
        self.keep_best(val["loss"], step)
        return val

    def test_best(self, step: int) -> dict | None:
        """eval.test: the test split on the weights chosen on validation (loaded when
        the best step is not the last)."""
        if not self.cfg.eval.test or self.data.test is None:
            return None
        best = self.run_dir / run_files.BEST_WEIGHTS
        self.barrier()  # rank 0 has finished writing best.safetensors
        if best.is_file() and self.state.best_step != step:
            self.load_weights(best)
        return self.evaluate("test", step)

    def finish(self, step: int, *, tokens: int, params: int, train_loss: float | None,
               details: Callable[[], dict[str, Any]],
               before_test: Callable[[], None] = lambda: None,
               close: Callable[[], None] = lambda: None) -> dict:
        """The end of a run: validation + keep-best, the final weights, `before_test()`
        (PS: its last checkpoint), the test on the best weights, then on the main rank
        summary.json, the plots and `close()` (the metric sinks). `details()`: the
        layout's summary fields after the common ones (may be a collective: every rank
        calls `finish`). Returns the summary."""
        val = self.validate(step)
        self.save_weights(self.run_dir / run_files.FINAL_WEIGHTS)
        before_test()
        test = self.test_best(step)
        summary = {"steps": step, "tokens": tokens, "params": params,
                   "train_loss": train_loss, "val": val, "test": test,
                   "best_val_loss": self.state.best_val, "best_step": self.state.best_step,
                   **details()}
        if self.is_main:  # metrics.jsonl is flushed per line: the plots read it whole
            write_summary(self.run_dir / "summary.json", summary)
            plot_run(self.run_dir / "metrics.jsonl", self.run_dir / "plots")
            close()  # after them: the trackers upload summary and plots as artefacts
        return summary
