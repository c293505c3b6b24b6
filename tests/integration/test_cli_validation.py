"""Bad input a new user typed (issue 13 items 13, 14, 16, 17, 19, 20): each ends with exit
code 2 and one line naming what is wrong, before anything is allocated or launched."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TINY_DATA, TINY_GPT, run_cli
from tests.integration.test_cli import assert_user_error


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> str:
    """A one-step tiny GPT run (its own prepared corpus): the base for init.from and
    compress."""
    root = tmp_path_factory.mktemp("tiny_run")
    proc = run_cli("train", *TINY_DATA, *TINY_GPT, f"--data.prepared_dir={root / 'prep'}",
                   f"--run.dir={root / 'run'}", "--train.steps=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return str(root / "run")


# -- item 13: a batch that cannot fit is refused with the figure, not OOM-killed --------
def test_absurd_batch_is_refused_by_its_own_size(tmp_path):
    # batch 1e20 with a small micro-batch: the plan's tensors fit, the step's sample
    # indices alone (8e20 bytes) cannot; this run used to grow to 24 GB and be killed.
    proc = run_cli("train", f"--run.dir={tmp_path}/r", "--train.batch_size=1e20",
                   "--train.micro_batch_size=4", timeout=60)
    assert_user_error(proc, "train.batch_size=100000000000000000000", "lower train.batch_size")
    assert not (tmp_path / "r").exists()


def test_model_that_cannot_fit_names_the_predicted_peak_and_plan_fit(tmp_path):
    # ~3e16 bytes of activations on any machine; the batch term (2 GiB) would fit.
    proc = run_cli("train", f"--run.dir={tmp_path}/r", "--model.n_layer=8",
                   "--model.d_model=4096", "--model.n_head=32", "--model.seq_len=1024",
                   "--train.batch_size=65536", timeout=60)
    assert_user_error(proc, "predicted peak memory", "GiB per rank", "scaletrain plan --fit")


# -- item 14 ------------------------------------------------------------------------------
@pytest.mark.parametrize("arg, fragment", [
    ("--train.seed=99999999999999999999999", "train.seed: must be <= 9223372036854775807"),
    ("--train.threads=100000", "train.threads: must be <= 1024"),
])
def test_seed_and_threads_out_of_range(arg, fragment, tmp_path):
    assert_user_error(run_cli("train", f"--run.dir={tmp_path}/r", arg, timeout=60), fragment)


# -- item 16: a file where a directory must go -------------------------------------------
@pytest.mark.parametrize("cmd", ["prepare", "train"])
def test_prepared_dir_that_is_a_file(cmd, tmp_path):
    (tmp_path / "f").write_text("mine\n")
    proc = run_cli(cmd, *TINY_DATA, f"--data.prepared_dir={tmp_path}/f",
                   f"--run.dir={tmp_path}/r", timeout=60)
    assert_user_error(proc, "data.prepared_dir", "is an existing file")
    assert (tmp_path / "f").read_text() == "mine\n"


def test_compress_out_that_is_a_file(tiny_run, tmp_path):
    (tmp_path / "f").write_text("mine\n")
    proc = run_cli("compress", tiny_run, f"--compress.out={tmp_path}/f",
                   "--quant.methods=weight-int8", timeout=120)
    assert_user_error(proc, "compress.out", "is an existing file")
    assert (tmp_path / "f").read_text() == "mine\n"


# -- item 17: plan judges a world as train does ------------------------------------------
@pytest.mark.parametrize("args, fragment", [
    (["--world", "0"], "plan --world must be >= 1, got 0"),
    (["--world", "-4"], "plan --world must be >= 1, got -4"),
    (["--world", "48"], "divisible by the data-parallel degree 48"),
    (["--world", "1e9"], "divisible by the data-parallel degree 1000000000"),
    (["--fit", "--memory-gib", "-1"], "plan --memory-gib must be a number of GiB > 0"),
])
def test_plan_refuses_worlds_and_budgets_it_cannot_use(args, fragment):
    assert_user_error(run_cli("plan", *args, timeout=60), fragment)


def test_plan_of_an_image_model_is_one_line(tmp_path):
    """plan measures transformer blocks: an image model used to end in KeyError."""
    assert_user_error(run_cli("plan", "--config", "configs/digits-cnn.toml", timeout=60),
                      "model.name='cnn' has no transformer blocks")
    assert_user_error(run_cli("train", "--config", "configs/digits-cnn.toml",
                              "--plan.auto=true", f"--run.dir={tmp_path}/r", timeout=60),
                      "plan.auto needs a model with transformer blocks")
    assert not (tmp_path / "r").exists()


def test_plan_and_train_refuse_the_same_layout(tmp_path):
    plan = run_cli("plan", "--world", "3", timeout=60)
    train = run_cli("train", f"--run.dir={tmp_path}/r", "--nproc", "3", timeout=60)
    assert_user_error(plan, "train.batch_size=32 must be divisible by the data-parallel "
                            "degree 3")
    assert_user_error(train)
    assert plan.stderr.split("error: ", 1)[1] == train.stderr.split("error: ", 1)[1]


# -- item 19: values that used to be accepted silently -----------------------------------
def test_negative_nproc(tmp_path):
    assert_user_error(run_cli("train", f"--run.dir={tmp_path}/r", "--nproc", "-2",
                              timeout=60), "--nproc", "got -2")


def test_bench_negative_steps(tmp_path):
    assert_user_error(run_cli("bench", f"--run.dir={tmp_path}/r", "--steps", "-1",
                              timeout=60), "bench --steps must be >= 1, got -1")
    assert not (tmp_path / "r").exists()


def test_init_from_refuses_a_shape_override(tiny_run, tmp_path):
    proc = run_cli("train", f"--init.from={tiny_run}", "--model.n_layer=8",
                   f"--run.dir={tmp_path}/r", timeout=60)
    assert_user_error(proc, "model.n_layer=8", "init.from", "whose n_layer is 2")


def test_init_from_refuses_a_shape_override_equal_to_the_default(tiny_run, tmp_path):
    # item 19: n_layer=4 is the default, set explicitly over a 2-layer source: refused,
    # on the command line and in a --config file (it used to train 2 layers silently).
    from scaletrain.config.schema import ModelConfig

    assert ModelConfig().n_layer == 4
    data = [*TINY_DATA, f"--data.prepared_dir={Path(tiny_run).parent / 'prep'}",
            "--train.steps=1"]
    proc = run_cli("train", f"--init.from={tiny_run}", "--model.n_layer=4", *data,
                   f"--run.dir={tmp_path}/r", timeout=60)
    assert_user_error(proc, "model.n_layer=4", "init.from", "whose n_layer is 2")
    (tmp_path / "c.toml").write_text("[model]\nn_layer = 4\n")
    proc = run_cli("train", "--config", str(tmp_path / "c.toml"), f"--init.from={tiny_run}",
                   *data, f"--run.dir={tmp_path}/r2", timeout=60)
    assert_user_error(proc, "model.n_layer=4", "init.from", "whose n_layer is 2")


def test_init_from_weights_that_disagree_with_its_config_write_no_run_dir(tiny_run, tmp_path):
    # A source whose config.toml says d_model=64 while its weights are 32 wide: refused
    # from the safetensors header before the run dir exists (it used to fail in the
    # trainer's load, after the new run.dir had been created).
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_run, copy)
    cfg = (copy / "config.toml").read_text()
    assert "d_model = 32\n" in cfg
    (copy / "config.toml").write_text(cfg.replace("d_model = 32\n", "d_model = 64\n"))
    data = [*TINY_DATA, f"--data.prepared_dir={Path(tiny_run).parent / 'prep'}",
            "--train.steps=1"]
    proc = run_cli("train", f"--init.from={copy}", *data, f"--run.dir={tmp_path}/new",
                   timeout=60)
    assert not (tmp_path / "new").exists(), proc.stderr[-2000:]
    assert_user_error(proc, f"init.from='{copy}'", "wte.weight", "(384, 32)", "(384, 64)",
                      "config.toml")


# -- item 20: the README's quoted glob under ~ ------------------------------------------
def test_tilde_in_a_quoted_source_glob_is_the_home_directory(tmp_path):
    from scaletrain.data.sources import list_text_files

    home = tmp_path / "home"
    corpus = home / "corpus" / "a"
    corpus.mkdir(parents=True)
    for f in list_text_files("python-stdlib", 6).files:
        (corpus / f"{f.stem}.txt").write_bytes(f.read_bytes())
    proc = run_cli("prepare", "--data.source=~/corpus/**/*.txt", "--data.vocab_size=300",
                   f"--data.prepared_dir={tmp_path}/p", "--data.prep_workers=1",
                   env={"HOME": str(home)}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"prepared {home}/corpus/**/*.txt" in proc.stdout
