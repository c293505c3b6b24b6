"""`scaletrain generate` at the edges of its input: temperatures down to the smallest
float sample (greedily), a prompt that is not UTF-8 is one line and exit 2."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli
from tests.integration.test_cli import assert_user_error

pytestmark = pytest.mark.timeout(180)

GEN = ["--generate.num_samples=2", "--generate.max_new_tokens=12", "--generate.prompt=def "]


@pytest.fixture(scope="module")
def run(prepared_dir, tmp_path_factory):
    from tests.conftest import TINY_DATA, TINY_GPT

    run = tmp_path_factory.mktemp("generate") / "run"
    proc = run_cli("train", *TINY_DATA, *TINY_GPT, f"--data.prepared_dir={prepared_dir}",
                   "--train.steps=5", "--eval.test=false", f"--run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_tiny_temperatures_sample_like_greedy(run):
    greedy = run_cli("generate", str(run), *GEN, "--generate.temperature=0")
    assert greedy.returncode == 0, greedy.stderr[-2000:]
    for t in ("1e-45", "1e-300"):  # accepted by validation; used to end in inf/nan probs
        proc = run_cli("generate", str(run), *GEN, f"--generate.temperature={t}")
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout == greedy.stdout  # the limit of T -> 0 is greedy


def test_prompt_that_is_not_utf8_is_one_line(run):
    # "\udcff" is how Python decodes the byte 0xff of an argv; subprocess sends the byte.
    proc = run_cli("generate", str(run), "--generate.prompt=ab\udcff\udcfe", *GEN[:2])
    assert_user_error(proc, "generate.prompt", "not valid UTF-8", "byte 0xff")
