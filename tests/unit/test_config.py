"""Config parsing, precedence and every error class (one clear line, ConfigError)."""

import pytest

from scaletrain.config import build_config, dumps_toml, parse_overrides
from scaletrain.config.load import apply_dict, describe, load_toml
from scaletrain.config.schema import Config
from scaletrain.errors import ConfigError


def test_defaults_validate():
    cfg = build_config()
    assert cfg.model.name == "gpt" and cfg.train.steps > 0


def test_precedence_cli_over_file_over_defaults(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[train]\nsteps = 7\nbatch_size = 16\n[optim]\nlr = 0.01\n")
    cfg = build_config(str(f), [("train.steps", "9")])
    assert cfg.train.steps == 9  # CLI wins
    assert cfg.train.batch_size == 16  # file wins over default
    assert cfg.optim.lr == 0.01
    assert cfg.train.seed == Config().train.seed  # default


def test_types_are_coerced_from_cli():
    cfg = build_config(None, [("train.steps", "1e3"), ("optim.lr", "3e-4"),
                              ("run.overwrite", "true"), ("data.source", "x/*.txt"),
                              ("model.name", "gpt")])
    assert cfg.train.steps == 1000 and isinstance(cfg.train.steps, int)
    assert cfg.optim.lr == 3e-4 and cfg.run.overwrite is True


@pytest.mark.parametrize("overrides, fragment", [
    ([("train.stepz", "5")], "did you mean 'train.steps'"),
    ([("trian.steps", "5")], "did you mean 'train.steps'"),
    ([("optim.lr", "-1")], "optim.lr: must be > 0.0"),
    ([("optim.lr", "nan")], "optim.lr: must be finite"),
    ([("train.steps", "2.5")], "train.steps: expected an integer"),
    ([("train.steps", "many")], "train.steps: expected an integer"),
    ([("run.overwrite", "maybe")], "expected true or false"),
    ([("optim.name", "adamx")], "did you mean 'adam'"),
    ([("model.n_head", "5"), ("model.d_model", "128")], "model.n_head=5 must divide"),
    ([("train.batch_size", "32"), ("train.micro_batch_size", "5")],
     "must be divisible by train.micro_batch_size=5"),
    ([("data.val_fraction", "0.6"), ("data.test_fraction", "0.5")], "must be < 1"),
    ([("model.dropout", "1.0")], "model.dropout: must be < 1.0"),
    ([("model.name", "cnn")], "image model"),
    ([("steps", "5")], "section.key"),
])
def test_errors_are_one_line_and_name_the_field(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        build_config(None, overrides)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg


def test_bad_toml_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("[train\nsteps = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        build_config(str(f))
    with pytest.raises(ConfigError, match="does not exist"):
        build_config(str(tmp_path / "missing.toml"))
    f.write_text("[train]\nsteps = 'ten'\n")
    with pytest.raises(ConfigError, match="train.steps: expected an integer"):
        build_config(str(f))


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = build_config(None, [("generate.prompt", 'say "hi"\n'), ("optim.lr", "0.1")])
    f = tmp_path / "resolved.toml"
    f.write_text(dumps_toml(cfg))
    again = apply_dict(Config(), load_toml(f))
    assert again == cfg


def test_parse_overrides_forms():
    pairs, rest = parse_overrides(["--train.steps=5", "--optim.lr", "0.1", "--run.overwrite",
                                   "--config", "x.toml"])
    assert pairs == [("train.steps", "5"), ("optim.lr", "0.1"), ("run.overwrite", "true")]
    assert rest == ["--config", "x.toml"]


def test_every_field_is_documented():
    text = describe()
    assert "train.micro_batch_size" in text and "precision.dtype" in text


@pytest.mark.parametrize("name", ["tiny", "gpt-10m", "gpt2-small", "digits-cnn"])
def test_presets_validate(name):
    build_config(f"configs/{name}.toml")


def test_list_fields_from_cli_both_forms():
    for text in ("3,5", "[3, 5]"):
        cfg = build_config(None, [("schedule.name", "multistep"), ("schedule.milestones", text)])
        assert cfg.schedule.milestones == [3, 5]
    with pytest.raises(ConfigError, match=r"schedule.milestones\[1\]: expected an integer"):
        build_config(None, [("schedule.name", "multistep"), ("schedule.milestones", "3,x")])


def test_user_keys_are_the_cli_and_file_keys_only(tmp_path):
    from scaletrain.config.load import user_keys

    f = tmp_path / "c.toml"
    f.write_text("[model]\nn_layer = 4\n[train]\nsteps = 7\n")
    assert user_keys(str(f), [("init.from", "r"), ("train.steps", "9")]) == \
        {"model.n_layer", "train.steps", "init.from"}
    assert user_keys(None, []) == frozenset()
