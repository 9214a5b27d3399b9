"""The config-driven trainer behind ``tbhealth train``: one user of the public Monitor API.

``config`` (the YAML config, validated), ``registry`` (names and import paths to data, models,
losses, optimizers and schedulers), ``data`` and ``models`` (the built-in offline examples),
``checkpoint`` (checkpoint files) and ``trainer`` (the training recipe).
"""
