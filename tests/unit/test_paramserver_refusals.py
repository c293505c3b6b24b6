"""Parameter-server mode refuses every config field it does not honour (issue 14 item 7):
one ConfigError line naming the field, before any process starts."""

from __future__ import annotations

import pytest

from tests.conftest import TINY_DATA, TINY_GPT, make_cfg, run_cli
from scaletrain.errors import ConfigError
from scaletrain.config.ps_checks import UNSUPPORTED

PS = ["--parallel.mode=ps"]

# A value of each refused field that PS would ignore (neither its default nor "off").
REFUSED_VALUE = {
    "train.compile": "true", "train.grad_clip_value": "0.5", "train.host_reads": "lagged",
    "data.loader_workers": "2",
    "data.mixture": '[{source = "python-stdlib", weight = 1}]',
    "optim.lr_scaling": "linear", "schedule.name": "plateau", "schedule.epoch_steps": "0",
    "checkpoint.async_save": "true",
    "parallel.backend": "gloo", "parallel.timeout_s": "30", "parallel.cpu_offload": "true",
    "parallel.reshard_after_forward": "false", "parallel.ddp_bucket_mb": "50",
    "plan.auto": "true", "init.from": "/nonexistent/run", "finetune.freeze": "['wte.*']",
    "finetune.lora_rank": "4", "distill.teacher": "/nonexistent/teacher",
}


def test_every_row_has_a_test_value():
    assert sorted(REFUSED_VALUE) == sorted(UNSUPPORTED)


@pytest.mark.parametrize("field", sorted(UNSUPPORTED))
def test_ps_refuses_the_field(field, tmp_path):
    args = TINY_DATA + TINY_GPT + PS + [f"--run.dir={tmp_path / 'run'}",
                                        f"--{field}={REFUSED_VALUE[field]}"]
    with pytest.raises(ConfigError) as e:
        make_cfg(args)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{field}=") and "parallel.mode='ps' does not support it" in msg


@pytest.mark.parametrize("field,value", [
    ("train.host_reads", "every-step"), ("faults.skip_nonfinite", "false"),
    ("faults.spike_sigmas", "0"), ("faults.max_consecutive", "0"),
    ("faults.max_consecutive", "3"), ("faults.rollback_lr_factor", "0.5"),
    ("checkpoint.on_signal", "false"), ("schedule.name", "cosine"),
    ("train.compile", "false"), ("train.grad_clip", "0.5"), ("eval.test_batches", "2"),
    # PS's processes tune glibc's allocator as the Trainer does (default 256, issue 19)
    ("train.malloc_mmap_threshold_mib", "0"), ("train.malloc_mmap_threshold_mib", "64"),
])
def test_ps_accepts_what_it_does(field, value, tmp_path):
    """Values that say what PS does (off switches, the defaults, fields it reads)."""
    make_cfg(TINY_DATA + TINY_GPT + PS + [f"--run.dir={tmp_path / 'run'}",
                                          f"--{field}={value}"])


def test_cli_refuses_before_launching(tmp_path, prepared_dir):
    run = tmp_path / "run"
    p = run_cli("train", *TINY_DATA, *TINY_GPT, f"--data.prepared_dir={prepared_dir}",
                f"--run.dir={run}", "--nproc", "2", "--parallel.mode=ps",
                "--train.compile=true", "--train.steps=2", timeout=60)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "train.compile=true" in lines[0] and "parallel.mode='ps'" in lines[0]
    assert not run.exists()  # nothing launched, no run dir


def test_cli_refuses_a_mixture_before_launching(tmp_path):
    """Issue 16: PS train records carry no tokens_by_source, so data.mixture is refused
    (exit 2, one line naming the field) before any data is prepared or a rank starts."""
    run = tmp_path / "run"
    p = run_cli("train", *TINY_DATA, *TINY_GPT, f"--run.dir={run}", "--nproc", "2",
                "--parallel.mode=ps", "--data.mixture=" + REFUSED_VALUE["data.mixture"],
                "--train.steps=2", timeout=60)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert "error: data.mixture=" in lines[0] and "parallel.mode='ps'" in lines[0], lines
    assert not run.exists()  # nothing launched, no run dir
