"""The configs shipped with the package, loaded by path or by name.

`--config=default` is default.py here, `--config=experiments/noise_sweep`
experiments/noise_sweep.py (`cli_flags.resolve_config`). Each file's
docstring gives its command, runtime and measured result.
"""
