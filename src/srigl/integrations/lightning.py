"""Dynamic sparse training under Lightning (``lightning.pytorch.Trainer``).

::

    from srigl.integrations.lightning import SparsityCallback

    trainer = lightning.Trainer(max_epochs=10, callbacks=[SparsityCallback("srigl", 0.9)])
    trainer.fit(module)                            # or trainer.fit(module, ckpt_path="last.ckpt")

The callback builds the sparsifier when fitting starts, on the LightningModule and the strategy's
optimizer (``LightningOptimizer`` is unwrapped), with ``total_steps = trainer.estimated_stepping_batches``.
It steps it after every batch that ended with an optimizer step (``trainer.global_step`` moved), so
once per optimizer step whatever ``accumulate_grad_batches`` is, and before the next window's
``zero_grad`` (a step the gradient scaler skipped is recognised by its non-finite gradients). The
sparsifier state (masks, step, generator) is saved under ``checkpoint["srigl_sparsifier"]`` and
restored by ``trainer.fit(..., ckpt_path=...)``.
"""

from __future__ import annotations

from typing import Any

from srigl._optional import require
from srigl.errors import CheckpointError
from srigl.integrations._build import build_sparsifier, check_method
from srigl.sparsifier import Sparsifier

# Through require: a missing lightning reads as one line naming the extra, not a traceback.
Callback = require("lightning.pytorch", "srigl.integrations.lightning").Callback

#: The sparsifier state's key in a Lightning checkpoint.
CHECKPOINT_KEY = "srigl_sparsifier"


class SparsityCallback(Callback):
    """Sparse training for ``lightning.pytorch.Trainer``.

    Args:
        method: a registered algorithm name (``"srigl"``, ``"rigl"``, ``"set"``, ``"static"``).
        sparsity: global target in [0, 1), or a ``{param FQN: sparsity}`` map (names as in the
            LightningModule, e.g. ``"net.0.weight"``).
        **sparsifier_kwargs: passed to the algorithm (``delta``, ``alpha``, ``structure``, ``policy``,
            ``seed``, ...); ``total_steps`` defaults to ``trainer.estimated_stepping_batches``.

    Attributes:
        sparsifier: the :class:`srigl.Sparsifier`, from the start of fitting on (None before).
    """

    def __init__(self, method: str = "srigl", sparsity: Any = 0.9, **sparsifier_kwargs: Any):
        self.method = check_method(method)
        self.sparsity = sparsity
        self.sparsifier_kwargs = sparsifier_kwargs
        self.sparsifier: Sparsifier | None = None
        self._saved: dict[str, Any] | None = None  # read from a checkpoint before the sparsifier exists
        self._global_step = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        # After the strategy made the optimizers and before it restores their state from a checkpoint.
        if self.sparsifier is not None:  # a second trainer.fit() with this callback
            self.sparsifier.remove_hooks()
            self.sparsifier = None
        optimizers = trainer.optimizers  # one, or a list the sparsifier refuses by name
        self.sparsifier = build_sparsifier(
            pl_module, optimizers[0] if len(optimizers) == 1 else optimizers, self.method, self.sparsity,
            trainer.estimated_stepping_batches, self.sparsifier_kwargs, self._saved,
        )
        self._saved = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._global_step = trainer.global_step  # restored by now when resuming

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self._global_step:  # this batch closed an accumulation window
            self._global_step = trainer.global_step
            self.sparsifier.step()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if self.sparsifier is not None:
            checkpoint[CHECKPOINT_KEY] = self.sparsifier.state_dict()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(CHECKPOINT_KEY)
        if saved is None:
            raise CheckpointError(
                f"the checkpoint has no {CHECKPOINT_KEY!r} entry (it was saved without SparsityCallback) and holds "
                "no masks to resume; start a new fit from its weights (LightningModule.load_from_checkpoint) instead"
            )
        if self.sparsifier is None:  # the usual order: checkpoints are read before fitting starts
            self._saved = saved
        else:  # strategies that restore after setup (DeepSpeed, FSDP)
            self.sparsifier.load_state_dict(saved)
