"""Typed configuration: `schema` declares it, `load` builds and validates it."""

from scaletrain.config.checks import accumulation_steps, data_parallel_degree
from scaletrain.config.load import build_config, dumps_toml, parse_overrides, to_dict
from scaletrain.config.schema import Config

__all__ = ["Config", "build_config", "dumps_toml", "parse_overrides", "to_dict",
           "accumulation_steps", "data_parallel_degree"]
