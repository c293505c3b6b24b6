"""2-D layouts on 4 processes (DP×TP, DP×PP, TP×PP) against one process, and a TP×PP
checkpoint resumed in one process."""

from __future__ import annotations

import pytest

from mp_harness import assert_parity, mp_run, mp_spec, reference
from spawn import run_distributed


@pytest.mark.parametrize("layout", [dict(dp_shard=2, tp=2), dict(dp_shard=2, pp=2),
                                    dict(tp=2, pp=2)],
                         ids=["dp2xtp2", "dp2xpp2", "tp2xpp2"])
def test_4_process_layout_matches_one_process(layout):
    spec = mp_spec(**layout)
    out = run_distributed(mp_run, 4, spec, timeout=170)
    assert_parity(reference(spec), out[0])


def test_tp2_pp2_checkpoint_resumes_in_one_process(tmp_path):
    full = reference(mp_spec(steps=4))
    run_distributed(mp_run, 4, mp_spec(steps=3, tp=2, pp=2, save=str(tmp_path)),
                    timeout=170)
    resumed = mp_run(0, 1, mp_spec(steps=1, load=str(tmp_path)))
    a, b = full["losses"][3], resumed["losses"][0]
    assert abs(a - b) / a <= 1e-6, (a, b)


def test_invalid_layouts_exit_2_naming_the_constraint(tmp_path):
    from scaletrain.cli import main

    base = ["--model.n_layer=3", "--model.n_head=2", "--model.d_model=16",
            "--data.source=synthetic"] if False else []
    del base
    from scaletrain.config.schema import Config
    from scaletrain.errors import ConfigError
    from scaletrain.parallel.model_parallel import check_model_parallel

    cfg = Config()
    cfg.model.n_layer, cfg.model.n_head, cfg.model.d_model = 3, 2, 16
    cfg.parallel.pp, cfg.parallel.dp_shard = 2, 1
    with pytest.raises(ConfigError, match="must divide model.n_layer=3"):
        check_model_parallel(cfg, 64, 2)
    cfg.model.n_layer, cfg.parallel.pp, cfg.parallel.tp = 2, 1, 4
    with pytest.raises(ConfigError, match="parallel.tp=4 must divide model.n_head=2"):
        check_model_parallel(cfg, 64, 4)
    cfg.parallel.tp = 3
    with pytest.raises(ConfigError, match="world size 4"):
        check_model_parallel(cfg, 64, 4)
    del main
