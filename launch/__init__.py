"""Entry points: CLI, typed config, data, the training loop on the DeepSpeed engine,
checkpoints, launchers, benchmarks and sweeps. Uses every other package.
"""
