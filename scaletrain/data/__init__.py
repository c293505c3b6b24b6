"""Data: preparation (cached), datasets, the global sampler and the stateful loader.

`build.build_data(cfg)` is the one entry point the trainer needs. This file imports
nothing: every datatrove worker process of `prepare` unpickles its pipeline steps from
`scaletrain.data.dt_steps`, which imports this package first, and a worker should not
pay for torch, matplotlib or jinja2 (seconds each under load) that its steps never use.
"""
