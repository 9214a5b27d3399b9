"""tbhealth inside the training frameworks people already use.

- :mod:`tbhealth.integrations.lightning` — ``TBHealthCallback`` for a Lightning ``Trainer``
  (``pip install 'tbhealth[lightning]'``).
- :mod:`tbhealth.integrations.transformers` — ``TBHealthCallback`` for a Hugging Face ``Trainer``
  (``pip install 'tbhealth[transformers]'``).

Each is a thin adapter over the public :class:`tbhealth.Monitor`: it turns the framework's hooks
into ``start_epoch`` / ``step`` / ``end_epoch`` calls, lets the framework's own mechanisms carry
out pause, stop and "checkpoint now", and keeps the monitor's state in the framework's checkpoint
so that the framework's resume continues the same tbhealth run. The frameworks are optional
extras: importing this package imports neither; importing a submodule without its framework
raises an ``ImportError`` that names the extra to install.
"""
