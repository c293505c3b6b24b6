"""Unit tests of scaletrain.metrics: sinks, summary, plots, meters, progress.

All tiny and CPU-only; no test asserts on wall-clock speed (DESIGN.md §4).
"""

from __future__ import annotations

import io
import json
import math

import pytest
import torch

from scaletrain import metrics
from scaletrain.metrics import (
    ConsoleSink,
    JsonlSink,
    MultiSink,
    Progress,
    TensorBoardSink,
    Throughput,
    build_sinks,
    gpt_flops_per_token,
    measure_peak_flops,
    plot_run,
    read_metrics,
    write_summary,
)
from scaletrain.metrics import meters

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _strict_loads(line: str):
    """json.loads that rejects NaN/Infinity tokens, as strict JSON readers do."""
    def bad(tok):
        raise ValueError(f"non-JSON constant {tok}")
    return json.loads(line, parse_constant=bad)


def _train(step, loss, lr=1e-3):
    return {"kind": "train", "step": step, "loss": loss, "lr": lr, "tokens": 64 * step}


# ------------------------------------------------------------------------ JSONL sink

def test_jsonl_full_precision_roundtrip(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    x = 0.1 + 0.2  # 0.30000000000000004: any rounding in the writer would show
    sink.write({"kind": "train", "step": 1, "loss": x, "lr": 1 / 3,
                "np": torch.tensor(2.5, dtype=torch.float64)})
    sink.close()
    (rec,) = read_metrics(path)
    assert rec["loss"] == x and rec["loss"] != 0.3
    assert rec["lr"] == 1 / 3
    assert rec["np"] == 2.5  # 0-d tensor unwrapped
    assert list(rec)[:2] == ["kind", "step"]


def test_jsonl_nonfinite_written_as_strings(tmp_path):
    path = tmp_path / "m.jsonl"
    with MultiSink([JsonlSink(path)]) as sink:
        sink.write({"kind": "train", "step": 1, "loss": math.nan, "a": math.inf,
                    "b": -math.inf})
    raw = _strict_loads(path.read_text().strip())  # valid strict JSON
    assert (raw["loss"], raw["a"], raw["b"]) == ("nan", "inf", "-inf")
    (rec,) = read_metrics(path)
    assert math.isnan(rec["loss"]) and rec["a"] == math.inf and rec["b"] == -math.inf


def test_jsonl_flushed_each_write(tmp_path):
    path = tmp_path / "m.jsonl"
    sink = JsonlSink(path)
    sink.write(_train(1, 2.0))
    sink.write(_train(2, 1.5))
    # Read through a separate file handle before close: a killed run keeps these.
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    sink.close()


def test_read_metrics_skips_truncated_last_line(tmp_path):
    path = tmp_path / "m.jsonl"
    lines = [json.dumps(_train(1, 2.0)), json.dumps(_train(2, 1.5))]
    path.write_text("\n".join(lines) + '\n{"kind": "train", "step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_read_metrics_rejects_corrupt_middle_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(_train(1, 2.0)) + "\n{garbage\n" + json.dumps(_train(2, 1.0)) + "\n")
    with pytest.raises(ValueError, match=":2:"):
        read_metrics(path)


def test_jsonl_reopen_drops_partial_line_then_appends(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(_train(1, 2.0)) + '\n{"kind": "tr')
    sink = JsonlSink(path)  # resume after a kill mid-line
    sink.write(_train(2, 1.5))
    sink.close()
    text = path.read_text()
    assert text.endswith("\n") and '{"kind": "tr\n' not in text
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_record_without_kind_or_step_rejected(tmp_path):
    sink = JsonlSink(tmp_path / "m.jsonl")
    with pytest.raises(ValueError, match="kind"):
        sink.write({"step": 1, "loss": 1.0})
    sink.close()


# ------------------------------------------------------------------ TensorBoard sink

def test_tensorboard_scalars_readable(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(tmp_path / "tb")
    sink.write(_train(1, 2.5, lr=1e-3))
    sink.write(_train(2, 2.0, lr=2e-3))
    sink.write({"kind": "eval", "split": "val", "step": 2, "loss": 2.25, "ppl": 9.5})
    sink.write({"kind": "eval", "split": "test", "step": 2, "loss": 2.3, "note": "x"})
    sink.close()

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens", "eval_val/loss", "eval_val/ppl",
            "eval_test/loss"} <= tags
    assert not any(t.endswith(("/step", "/kind", "/split", "/note")) for t in tags)
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([2.5, 2.0])  # stored as float32
    assert acc.Scalars("eval_val/ppl")[0].value == pytest.approx(9.5)
    assert acc.Scalars("train/lr")[1].value == pytest.approx(2e-3)


# --------------------------------------------------------------- console / build_sinks

def test_console_prints_eval_only(capsys):
    sink = ConsoleSink()
    sink.write(_train(1, 2.0))
    sink.write({"kind": "eval", "split": "val", "step": 1, "loss": 1.234567, "ppl": 3.4})
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["step 1 | eval val | loss 1.2346 | ppl 3.4"]


def test_build_sinks_writes_run_dir(tmp_path, capsys):
    sinks = build_sinks(tmp_path, console=True, tensorboard=True)
    sinks.write(_train(1, 2.0))
    sinks.write({"kind": "eval", "split": "val", "step": 1, "loss": 1.9})
    sinks.close()
    assert len(read_metrics(tmp_path / "metrics.jsonl")) == 2
    assert any((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert "eval val" in capsys.readouterr().out

    only_jsonl = build_sinks(tmp_path / "b", console=False, tensorboard=False)
    assert [type(s) for s in only_jsonl.sinks] == [JsonlSink]
    only_jsonl.close()


def test_multisink_closes_all_despite_error(tmp_path):
    class Boom:
        def write(self, record): pass
        def close(self): raise OSError("boom")

    jsonl = JsonlSink(tmp_path / "m.jsonl")
    multi = MultiSink([Boom(), jsonl])
    with pytest.raises(OSError, match="boom"):
        multi.close()
    assert jsonl._f.closed
    assert isinstance(jsonl, metrics.MetricSink)


# ---------------------------------------------------------------------------- summary

def test_write_summary_atomic_and_valid(tmp_path):
    path = tmp_path / "summary.json"
    write_summary(path, {"train": {"loss": 1.0}, "mfu": 0.1 + 0.2})
    write_summary(path, {"train": {"loss": math.nan}, "mfu": 0.1 + 0.2})  # overwrite
    data = _strict_loads(path.read_text())
    assert data == {"train": {"loss": "nan"}, "mfu": 0.1 + 0.2}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temp left


# ------------------------------------------------------------------------------ plots

def test_plot_run_writes_pngs(tmp_path):
    path = tmp_path / "metrics.jsonl"
    sink = JsonlSink(path)
    for s in range(1, 21):
        sink.write(_train(s, 4.0 / s ** 0.5, lr=1e-3 * min(1, s / 5)))
        if s % 10 == 0:
            sink.write({"kind": "eval", "split": "val", "step": s, "loss": 4.2 / s ** 0.5})
            sink.write({"kind": "eval", "split": "test", "step": s, "loss": 4.3 / s ** 0.5})
    sink.close()
    written = plot_run(path, tmp_path / "plots")
    assert [p.name for p in written] == ["loss.png", "lr.png"]
    for p in written:
        data = p.read_bytes()
        assert data[:8] == PNG_SIGNATURE and len(data) > 5000


def test_plot_run_skips_without_records(tmp_path):
    assert plot_run(tmp_path / "missing.jsonl", tmp_path / "plots") == []
    (tmp_path / "empty.jsonl").write_text("")
    assert plot_run(tmp_path / "empty.jsonl", tmp_path / "plots") == []
    assert not (tmp_path / "plots").exists()


# ----------------------------------------------------------------------------- meters

def test_gpt_flops_per_token():
    # 6N + 12·L·H·Q·T = 6·1000 + 12·2·4·8·16
    assert gpt_flops_per_token(1000, n_layer=2, n_head=4, d_head=8, seq_len=16) == 18288
    # GPT-2 small shape (nanoGPT): N=123_653_376 (all but wpe), L=12, H=12, Q=64, T=1024
    assert gpt_flops_per_token(123_653_376, 12, 12, 64, 1024) == \
        6 * 123_653_376 + 12 * 12 * 12 * 64 * 1024


def test_throughput_fake_clock():
    t = [100.0]
    tp = Throughput(clock=lambda: t[0])
    with pytest.raises(RuntimeError):
        tp.step(1)
    tp.start()
    tp.step(1000)
    t[0] += 1.0
    tp.step(1000)
    t[0] += 1.0
    assert tp.lap() == pytest.approx(1000.0)  # 2000 tokens over 2 s
    tp.step(3000)
    t[0] += 0.5
    assert tp.lap() == pytest.approx(6000.0)  # window only: 3000 over 0.5 s
    assert tp.tokens_per_s == pytest.approx(6000.0)
    assert tp.total_tokens == 5000
    assert tp.avg_tokens_per_s == pytest.approx(5000 / 2.5)
    # MFU = 6000 tok/s × 1e6 FLOP/tok / 1e10 FLOP/s
    assert tp.mfu(flops_per_token=1e6, peak_flops=1e10) == pytest.approx(0.6)
    assert tp.lap() == 0.0  # empty window and no time passed: 0, not a ZeroDivisionError


def test_peak_flops_cache_hit(tmp_path, monkeypatch):
    calls = []

    def fake_time(a, b, warmup, repeats, inner):
        calls.append(a.shape)
        return 0.001

    monkeypatch.setattr(meters, "_time_matmul", fake_time)
    cache = tmp_path / "peak.json"
    f1 = measure_peak_flops(torch.float32, threads=1, n=32, cache_path=cache)
    assert f1 == pytest.approx(2 * 32 ** 3 / 0.001) and len(calls) == 1
    f2 = measure_peak_flops(torch.float32, threads=1, n=32, cache_path=cache)
    assert f2 == f1 and len(calls) == 1  # served from the cache, not timed
    measure_peak_flops(torch.bfloat16, threads=1, n=32, cache_path=cache)
    assert len(calls) == 2  # another dtype is another key
    measure_peak_flops(torch.float32, threads=1, n=32, cache_path=cache, use_cache=False)
    assert len(calls) == 3
    entries = json.loads(cache.read_text())
    assert len(entries) == 2 and all("threads=1" in k for k in entries)


def test_cpu_matmul_size_shrinks_for_a_slow_dtype(tmp_path, monkeypatch):
    """The default CPU size is 2048 where a probe says it takes <= 0.25 s (fp32, bf16 at
    ~100+ GFLOP/s), smaller for a dtype without a fast kernel (fp16 on most CPUs: a 2048
    matmul timed 7 times cost a test minutes), and a default-size entry is keyed
    "n=auto" with the size it used."""
    for gflops, size in ((200.0, 2048), (40.0, 1024), (1.0, 512)):
        monkeypatch.setattr(meters, "_time_matmul",
                            lambda a, b, warmup, repeats, inner, g=gflops:
                            2.0 * a.shape[0] ** 3 / (g * 1e9))
        assert meters.cpu_matmul_size(torch.float16) == size, gflops
        cache = tmp_path / f"p{size}.json"
        measure_peak_flops(torch.float16, threads=1, cache_path=cache)
        (key, entry), = json.loads(cache.read_text()).items()
        assert key.endswith("n=auto") and entry["n"] == size


def test_peak_flops_real_tiny(tmp_path):
    before = torch.get_num_threads()
    flops = measure_peak_flops(torch.float32, threads=1, n=64, warmup=1, repeats=2,
                               cache_path=tmp_path / "p.json")
    assert math.isfinite(flops) and flops > 0
    assert torch.get_num_threads() == before  # thread setting restored


def test_memory_meters():
    _ = torch.empty(1 << 20)  # touch some memory
    peak, cur = metrics.peak_memory_mb("cpu"), metrics.current_rss_mb()
    assert 1 < cur <= peak * 1.05 + 1


# --------------------------------------------------------------------------- progress

def test_progress_off_prints_nothing(capsys):
    p = Progress(10, enabled="off")
    assert not p.enabled
    for s in range(1, 4):
        p.update(s, loss=1.0, lr=1e-3, tokens_per_s=1234.5)
    p.close()
    assert capsys.readouterr().err == ""


def test_progress_auto_not_tty_prints_nothing(capsys):
    # capsys replaces sys.stderr by a non-TTY stream
    p = Progress(10, enabled="auto")
    assert not p.enabled
    p.update(5, loss=1.0)
    p.write("eval line")  # messages still go to stdout
    p.close()
    out = capsys.readouterr()
    assert out.err == "" and out.out == "eval line\n"


def test_progress_on_and_auto_tty(monkeypatch):
    class FakeTTY(io.StringIO):
        def isatty(self):
            return True

    for enabled, stream in (("on", io.StringIO()), ("auto", FakeTTY())):
        monkeypatch.setattr("sys.stderr", stream)
        p = Progress(10, initial=2, enabled=enabled)
        assert p.enabled
        p.update(4, loss=1.23456, lr=3e-4, tokens_per_s=2048.0)
        p.close()
        text = stream.getvalue()
        assert "4/10" in text and "loss=1.2346" in text and "lr=3.00e-04" in text
        assert "tok/s=2,048" in text
    with pytest.raises(ValueError):
        Progress(10, enabled="yes")


def test_peak_flops_remeasure_keeps_the_higher_figure(tmp_path, monkeypatch):
    """A re-measurement on busy cores (slower) must not lower the cached peak; a
    quieter one (faster) raises it."""
    times = iter([0.001, 0.004, 0.0005])
    monkeypatch.setattr(meters, "_time_matmul", lambda *a: next(times))
    cache = tmp_path / "peak.json"
    kw = dict(threads=1, n=32, cache_path=cache, use_cache=False)
    quiet = measure_peak_flops(torch.float32, **kw)
    assert measure_peak_flops(torch.float32, **kw) == quiet  # busy: 4x slower, ignored
    assert measure_peak_flops(torch.float32, **kw) == pytest.approx(2 * quiet)
    assert measure_peak_flops(torch.float32, threads=1, n=32, cache_path=cache) == \
        pytest.approx(2 * quiet)
