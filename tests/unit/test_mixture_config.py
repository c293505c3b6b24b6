"""`data.source` as a list and `data.mixture` in the config (config/mixture_checks.py):
the TOML and CLI forms, paths made absolute, config.toml round trip, one-line errors."""

from __future__ import annotations

import tomllib

import pytest

from scaletrain.checkpoint.compat import differences
from scaletrain.config import build_config, dumps_toml, to_dict
from scaletrain.config.load import apply_dict
from scaletrain.config.mixture_checks import mixture_names
from scaletrain.config.schema import Config
from scaletrain.errors import ConfigError


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    """Two source folders a/ and web/ (with one file each) in the working directory."""
    monkeypatch.chdir(tmp_path)
    for d in ("a", "web"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.txt").write_text("some text " * 10)
    return tmp_path


def test_source_list_from_toml_and_cli(corpus):
    f = corpus / "c.toml"
    f.write_text('[data]\nsource = ["a", "web/*.txt"]\n')
    cfg = build_config(str(f))
    assert cfg.data.source == [str(corpus / "a"), str(corpus / "web/*.txt")]
    cli = build_config(None, [("data.source", '["a", "web/*.txt"]')])
    assert cli.data.source == cfg.data.source
    assert build_config(None, [("data.source", "a")]).data.source == str(corpus / "a")
    # A glob that starts with a character class is one source, not a broken list.
    assert build_config(None, [("data.source", "[aw]*/*.txt")]).data.source == \
        str(corpus / "[aw]*/*.txt")


def test_mixture_from_toml_and_cli_round_trips_through_config_toml(corpus):
    f = corpus / "c.toml"
    f.write_text('[data]\nmixture = [{source = "a", weight = 0.7}, '
                 '{source = "web", weight = 3, name = "web-en"}]\n')
    cfg = build_config(str(f))
    want = [{"source": str(corpus / "a"), "weight": 0.7},
            {"source": str(corpus / "web"), "weight": 3, "name": "web-en"}]
    assert cfg.data.mixture == want
    cli = build_config(None, [("data.mixture", '[{source="a", weight=0.7}, '
                                               '{source="web", weight=3, name="web-en"}]')])
    assert cli.data.mixture == want
    again = apply_dict(Config(), tomllib.loads(dumps_toml(cfg)))  # the saved config.toml
    assert again.data.mixture == want
    assert mixture_names(cfg.data.mixture) == ["a", "web-en"]


@pytest.mark.parametrize("overrides, fragment", [
    ([("data.mixture", '[{source="a", weight=0}]')], "data.mixture[0].weight: must be a number > 0"),
    ([("data.mixture", '[{source="a", weight=-1}]')], "must be a number > 0, got -1"),
    ([("data.mixture", '[{source="a", weight=true}]')], "must be a number > 0"),
    ([("data.mixture", '[{source="a"}]')], "data.mixture[0].weight"),
    ([("data.mixture", '[{source="a", wieght=1}]')], "unknown key 'wieght' (did you mean 'weight'?)"),
    ([("data.mixture", '[{source="a", weight=1}, {source="wbe", weight=1}]')],
     "data.mixture[1].source: '{root}/wbe' does not exist (did you mean '{root}/web'?)"),
    ([("data.mixture", '[{source="web/*.md", weight=1}]')], "matches no files"),
    ([("data.mixture", '[{source="digits", weight=1}]')], "text sources only"),
    ([("data.mixture", '[{source="a", weight=1}]'), ("data.source", "web")],
     "data.mixture and data.source are both set"),
    ([("data.mixture", '[{source="a", weight=1}, {source="web/../a", weight=1}]')],
     "a second source named 'a'"),
    ([("data.mixture", '[{source="a", weight=1, name="a/b"}]')], "data.mixture[0].name"),
    ([("data.mixture", '["a"]')], "data.mixture[0]: expected a table"),
    ([("data.source", '["a", "nope"]')], "data.source[1]: '{root}/nope' does not exist"),
    ([("data.source", '[]')], "data.source: an empty list"),
    ([("data.source", '["a", "a"]')], "listed twice"),
    ([("data.mixture", '[{source="a", weight=1}]'), ("data.format", "chat")],
     "data.format='chat' is not supported with it"),
    ([("data.mixture", '[{source="a", weight=1}]'), ("train.objective", "dpo")],
     "data.mixture is not supported with train.objective='dpo'"),
])
def test_bad_mixture_or_source_list_is_one_clear_line(corpus, overrides, fragment):
    with pytest.raises(ConfigError) as e:
        build_config(None, overrides)
    msg = str(e.value)
    assert fragment.format(root=corpus) in msg and "\n" not in msg


def test_resume_refuses_a_changed_mixture_but_not_a_checkpoint_from_before_mixtures(corpus):
    plain = to_dict(build_config(None, []))
    mixed = to_dict(build_config(None, [("data.mixture", '[{source="a", weight=1}]')]))
    assert differences(plain, mixed) == [f"data.mixture: [] -> {mixed['data']['mixture']!r}"]
    reweighted = to_dict(build_config(None, [("data.mixture", '[{source="a", weight=2}]')]))
    assert len(differences(mixed, reweighted)) == 1
    old = {**plain, "data": {k: v for k, v in plain["data"].items() if k != "mixture"}}
    assert differences(old, plain) == []  # saved before the field existed: its default
