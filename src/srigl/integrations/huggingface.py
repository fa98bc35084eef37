"""Dynamic sparse training under the Hugging Face ``transformers.Trainer``.

::

    from srigl.integrations.huggingface import SparsityCallback

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[SparsityCallback("srigl", 0.9)])
    trainer.train()                                # or trainer.train(resume_from_checkpoint=True)

The callback builds the sparsifier when training begins, on the Trainer's own model and optimizer
(accelerate's ``AcceleratedOptimizer`` is unwrapped), with ``total_steps = state.max_steps``. It steps
it in ``on_optimizer_step``: once per optimizer step whatever ``gradient_accumulation_steps`` is, and
before ``model.zero_grad()``, so an fp16 step the gradient scaler skipped is recognised by its
non-finite gradients and not counted. It writes the sparsifier state (masks, step, generator) as
``srigl_sparsifier.pt`` into each ``checkpoint-N/`` folder, from the process that saves, and reads it
back when ``trainer.train(resume_from_checkpoint=...)`` resumes.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from srigl._optional import require
from srigl.errors import CheckpointError
from srigl.integrations._build import build_sparsifier, check_method
from srigl.io.atomic import atomic_write
from srigl.sparsifier import Sparsifier

# Through require: a missing transformers reads as one line naming the extra, not a traceback.
TrainerCallback = require("transformers", "srigl.integrations.huggingface").TrainerCallback
PREFIX_CHECKPOINT_DIR = require("transformers.trainer_utils", "srigl.integrations.huggingface").PREFIX_CHECKPOINT_DIR

if not hasattr(TrainerCallback, "on_optimizer_step"):  # without it the callback would never step
    raise ImportError("srigl.integrations.huggingface needs transformers>=4.42 (TrainerCallback.on_optimizer_step)")

#: The sparsifier state's file name inside each ``checkpoint-N/`` folder.
SPARSIFIER_FILE = "srigl_sparsifier.pt"


class SparsityCallback(TrainerCallback):
    """Sparse training for ``transformers.Trainer``.

    Args:
        method: a registered algorithm name (``"srigl"``, ``"rigl"``, ``"set"``, ``"static"``).
        sparsity: global target in [0, 1), or a ``{param FQN: sparsity}`` map.
        resume_from: the checkpoint folder to read the sparsifier state from when the Trainer resumes.
            Default: ``<output_dir>/checkpoint-<global step>``, the folder the Trainer resumes from
            unless it was given a folder elsewhere (callbacks are not told which).
        **sparsifier_kwargs: passed to the algorithm (``delta``, ``alpha``, ``structure``, ``policy``,
            ``seed``, ...); ``total_steps`` defaults to the Trainer's ``state.max_steps``.

    Attributes:
        sparsifier: the :class:`srigl.Sparsifier`, from the start of training on (None before).
    """

    def __init__(self, method: str = "srigl", sparsity: Any = 0.9, *, resume_from: str | os.PathLike | None = None,
                 **sparsifier_kwargs: Any):
        self.method = check_method(method)
        self.sparsity = sparsity
        self.resume_from = resume_from
        self.sparsifier_kwargs = sparsifier_kwargs
        self.sparsifier: Sparsifier | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.sparsifier is not None:  # a second trainer.train() with this callback
            self.sparsifier.remove_hooks()
            self.sparsifier = None
        saved = self._saved_state(args, state) if state.global_step > 0 else None
        self.sparsifier = build_sparsifier(
            model, optimizer, self.method, self.sparsity, state.max_steps, self.sparsifier_kwargs, saved
        )

    def on_optimizer_step(self, args, state, control, **kwargs):
        # After optimizer.step() and before model.zero_grad(); on_step_end comes after zero_grad.
        self.sparsifier.step()

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save or self.sparsifier is None:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        sparsifier_state = self.sparsifier.state_dict()
        atomic_write(folder / SPARSIFIER_FILE, lambda file: torch.save(sparsifier_state, file))

    def _saved_state(self, args, state) -> dict[str, Any]:
        folder = (
            Path(self.resume_from) if self.resume_from is not None
            else Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        )
        path = folder / SPARSIFIER_FILE
        if not path.is_file():
            raise CheckpointError(
                f"the Trainer resumes at step {state.global_step}, but {path} does not exist: resuming "
                f"from a checkpoint outside {args.output_dir}, pass SparsityCallback(..., resume_from=that folder); "
                "a checkpoint saved without SparsityCallback holds no masks to resume"
            )
        return torch.load(path, map_location="cpu", weights_only=True)
