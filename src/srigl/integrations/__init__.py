"""Sparse training inside the frameworks where users train: each one a callback over the one engine.

* :mod:`srigl.integrations.huggingface`: ``SparsityCallback`` for ``transformers.Trainer``.
* :mod:`srigl.integrations.lightning`: ``SparsityCallback`` for ``lightning.pytorch.Trainer``.

Nothing in srigl's core imports this package, and this package imports no framework: each submodule
imports its own (``pip install 'srigl[integrations]'``) when it is imported.
"""
