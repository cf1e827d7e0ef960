"""Integrations of zckpt with training frameworks, one module each.

Each module imports its framework itself, and only when that module is imported:
importing ``zckpt`` or this package imports no framework.

- :mod:`zckpt.integrations.lightning`: ``ZckptCheckpointIO``, a Lightning ``CheckpointIO``
  plugin (``Trainer(plugins=[ZckptCheckpointIO()])``).
- :mod:`zckpt.integrations.transformers`: the Hugging Face ``Trainer`` integration.
"""
