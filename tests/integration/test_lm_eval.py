"""`scaletrain eval RUN --tasks=…` with lm-evaluation-harness: the wrapper's
log-likelihoods equal a direct computation with the model, and equal those of the
harness's own HF model (`HFLM`) on the run exported with `export --format hf`; the CLI's
task scores (multiple choice, rolling perplexity, generation) equal the harness's HF
model's on the same tasks; results land in the run directory and its MLflow run; bad
input is one line. The tasks are the test's own YAML over local JSONL files (no
downloads)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from tests.conftest import TINY_DATA, TINY_GPT, one_error_line, run_cli

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402  (after the importorskip)
from lm_eval.models.huggingface import HFLM  # noqa: E402

pytestmark = pytest.mark.timeout(600)

# A task's documents: short (the tiny model's window is 32 tokens) Python snippets.
MC_DOCS = [
    {"q": "def add(a, b):\n    return", "choices": [" a + b", " a - b", " None"], "answer": 0},
    {"q": "import os\nprint(os.path.", "choices": ["join", "exists", "sep"], "answer": 1},
    {"q": "for i in range(", "choices": ["10):", "len(x)):", "0)"], "answer": 0},
    {"q": "class Foo(", "choices": ["object):", "Exception):", "):"], "answer": 2},
    {"q": "if __name__ ==", "choices": [" '__main__':", " None:", " 0:"], "answer": 0},
    {"q": "    raise", "choices": [" ValueError", " TypeError(", " KeyError"], "answer": 1},
]
ROLLING_DOCS = [
    {"text": "def f(x):\n    return x * 2\n"},
    {"text": "import sys\n\n\ndef main(argv):\n    for arg in argv[1:]:\n        print(arg)\n"
             "    return 0\n\n\nif __name__ == '__main__':\n    sys.exit(main(sys.argv))\n"},
]
GEN_DOCS = [{"prompt": p, "target": t} for p, t in [
    ("import", " os"), ("def", " f"), ("    return", " None"), ("class Foo", "("),
    ("for i in", " range"), ("x = ", "1")]]


def _task_dir(root):
    """Three tasks of the harness's YAML format over JSONL files in `root`."""
    for name, docs in (("mc", MC_DOCS), ("roll", ROLLING_DOCS), ("gen", GEN_DOCS)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))

    def common(name):
        return (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n"
                f"    test: {root / name}.jsonl\ntest_split: test\n")

    (root / "st_mc.yaml").write_text(
        "task: st_mc\n" + common("mc") + "output_type: multiple_choice\n"
        "doc_to_text: '{{q}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\n"
        "target_delimiter: ''\nmetric_list:\n  - metric: acc\n")
    (root / "st_roll.yaml").write_text(
        "task: st_roll\n" + common("roll") + "output_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: '{{text}}'\nmetric_list:\n"
        "  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    (root / "st_gen.yaml").write_text(
        "task: st_gen\n" + common("gen") + "output_type: generate_until\n"
        "doc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\ntarget_delimiter: ''\n"
        "generation_kwargs:\n  until: ['\\n', ' ', '(']\n  max_gen_toks: 6\n"
        "  do_sample: false\nmetric_list:\n  - metric: exact_match\n")
    return root


@pytest.fixture(scope="module")
def setup(prepared_dir, tmp_path_factory):
    """A tiny GPT run, its HF export, and the task folder. One step at a vanishing LR:
    the weights stay near their random initialisation, whose greedy tokens vary from
    context to context (the tiny model trained for a few dozen steps greedy-decodes only
    spaces, which would make the generation comparisons vacuous)."""
    root = tmp_path_factory.mktemp("lmeval")
    run = root / "run"
    proc = run_cli("train", *TINY_DATA, *TINY_GPT, f"--data.prepared_dir={prepared_dir}",
                   "--train.steps=1", "--optim.lr=1e-9", "--eval.test=false",
                   "--train.threads=1",
                   "--metrics.mlflow=true", f"--metrics.mlflow_uri={root / 'mlruns'}",
                   f"--run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    hf = root / "hf"
    proc = run_cli("export", str(run), "--format", "hf", "--out", str(hf))
    assert proc.returncode == 0, proc.stderr[-3000:]
    tasks = root / "tasks"
    tasks.mkdir()
    return run, hf, _task_dir(tasks), root


def _ours(run):
    from scaletrain.compress.artefact import load_artefact
    from scaletrain.evaluate.harness_model import ScaletrainLM
    from scaletrain.models.registry import spec_of
    from scaletrain.precision import PrecisionPolicy

    cfg, model, tok = load_artefact(run, which="best")
    return model, tok, ScaletrainLM(model, tok, seq_len=cfg.model.seq_len,
                                    policy=PrecisionPolicy("fp32", torch.device("cpu")),
                                    batch_size=4, decode=spec_of(cfg.model).decode)


def _requests(kind, args):
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


PAIRS = [(d["q"], c) for d in MC_DOCS for c in d["choices"]] + [("", "def main():")]


def test_loglikelihoods_equal_a_direct_computation(setup):
    run, _, _, _ = setup
    model, tok, lm = _ours(run)
    got = lm.loglikelihood(_requests("loglikelihood", PAIRS), disable_tqdm=True)
    for (context, cont), (ll, greedy) in zip(PAIRS, got):
        ctx = tok.encode(context.rstrip()) if context else [tok.eot_id]
        spaces = context[len(context.rstrip()):] if context else ""
        whole = tok.encode(context.rstrip() + spaces + cont) if context else ctx + tok.encode(cont)
        cont_ids = whole[len(ctx):]
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([whole[:-1]])).double(), -1)[0]
        rows = logp[len(ctx) - 1:]
        want = sum(float(rows[i, t]) for i, t in enumerate(cont_ids))
        assert ll == pytest.approx(want, abs=1e-4)
        assert greedy == all(int(rows[i].argmax()) == t for i, t in enumerate(cont_ids))


def test_loglikelihoods_equal_the_harness_hf_model_on_the_export(setup):
    run, hf_dir, _, _ = setup
    _, _, lm = _ours(run)
    hf = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=4, dtype="float32")
    reqs = _requests("loglikelihood", PAIRS)
    ours, theirs = lm.loglikelihood(reqs, disable_tqdm=True), hf.loglikelihood(reqs, True)
    for (a, ga), (b, gb) in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-4) and ga == gb
    texts = _requests("loglikelihood_rolling", [(d["text"],) for d in ROLLING_DOCS])
    for a, b in zip(lm.loglikelihood_rolling(texts, True), hf.loglikelihood_rolling(texts, True)):
        assert a == pytest.approx(b, abs=1e-3)
    # Greedy generation: the same strings, cut at the same stop strings.
    gens = _requests("generate_until", [(d["prompt"], {"until": ["\n\n", "]]"],
                                                       "max_gen_toks": 12, "do_sample": False})
                                        for d in GEN_DOCS])
    ours, theirs = lm.generate_until(gens, True), hf.generate_until(gens, True)
    assert ours == theirs and len(set(ours)) > 3, (ours, theirs)  # varied, not one string


def test_cli_scores_equal_the_harness_hf_model_and_reach_the_run_and_its_tracker(setup):
    from mlflow.tracking import MlflowClient

    run, hf_dir, tasks, root = setup
    proc = run_cli("eval", str(run), "--tasks=st_mc,st_roll,st_gen",
                   f"--include-path={tasks}", "--batch-size=3",
                   env={"HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted((run / "lm_eval").glob("results-*.json"))
    assert len(files) == 1
    ours = json.loads(files[0].read_text())["metrics"]
    from lm_eval.tasks import TaskManager

    theirs = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf_dir},dtype=float32", device="cpu",
        tasks=["st_mc", "st_roll", "st_gen"], task_manager=TaskManager(include_path=str(tasks)),
        batch_size=3, bootstrap_iters=0, log_samples=False)["results"]
    assert ours["st_mc"]["acc"] == theirs["st_mc"]["acc,none"]
    assert ours["st_gen"]["exact_match"] == theirs["st_gen"]["exact_match,none"]
    assert math.isclose(ours["st_roll"]["word_perplexity"],
                        theirs["st_roll"]["word_perplexity,none"], rel_tol=1e-4)
    # The run's own MLflow run (trackers.json) got the scores at the weights' step.
    run_id = json.loads((run / "trackers.json").read_text())["mlflow"]["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlruns' / 'mlflow.db'}")
    history = client.get_metric_history(run_id, "lm_eval/st_mc/acc")
    assert [m.value for m in history] == [ours["st_mc"]["acc"]]
    # A second call writes a new results file; the first is kept.
    proc = run_cli("eval", str(run), "--tasks=st_mc", f"--include-path={tasks}", "--limit=2",
                   env={"HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((run / "lm_eval").glob("results-*.json"))) == 2
    assert files[0].is_file()


def test_eval_tasks_on_an_hf_directory(setup):
    _, hf_dir, tasks, _ = setup
    proc = run_cli("eval", str(hf_dir), "--tasks=st_mc", f"--include-path={tasks}",
                   env={"HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "st_mc: acc=" in proc.stdout
    assert list((hf_dir / "lm_eval").glob("results-*.json"))


@pytest.mark.parametrize("args,fragment", [
    (["--tasks=st_mcc"], "did you mean st_mc"),
    (["--tasks=no_such_task_at_all_xyz"], "--include-path"),
    (["--tasks=st_mc", "--limit=0"], "--limit must be >= 1"),
    (["--tasks=,"], "at least one"),
])
def test_bad_task_arguments_are_one_line(setup, args, fragment):
    run, _, tasks, _ = setup
    before = sorted(os.listdir(run))
    proc = run_cli("eval", str(run), *args, f"--include-path={tasks}")
    one_error_line(proc, fragment)
    assert sorted(os.listdir(run)) == before  # nothing written


def test_include_path_must_be_a_folder(setup, tmp_path):
    run, _, _, _ = setup
    one_error_line(run_cli("eval", str(run), "--tasks=st_mc",
                           f"--include-path={tmp_path / 'nope'}"), "not a directory")


def test_eval_tasks_on_a_safetensors_export_equal_the_hf_directory(setup, tmp_path):
    """A checkpoint exported with `export --format safetensors` (config.toml, weights,
    tokenizer) is scored like the run: the same accuracy as its HF export (whose
    log-likelihoods equal the harness's own HF model's, above)."""
    run, hf_dir, tasks, _ = setup
    out = tmp_path / "st"
    proc = run_cli("export", str(run), "--format", "safetensors", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    accs = []
    for d in (out, hf_dir):
        proc = run_cli("eval", str(d), "--tasks=st_mc", f"--include-path={tasks}",
                       env={"HF_DATASETS_OFFLINE": "1"})
        assert proc.returncode == 0, proc.stderr[-3000:]
        newest = sorted((d / "lm_eval").glob("results-*.json"))[-1]
        accs.append(json.loads(newest.read_text())["metrics"]["st_mc"]["acc"])
    assert accs[0] == accs[1], accs
