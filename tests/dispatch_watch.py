"""A dispatch mode that records the largest tensor an aten op returns, shared by the tests that a
layer's dense form is never allocated (tests/storage/test_meta.py, tests/app/test_xmc_train.py).

Lives at the root of tests/ (on sys.path through the rootdir conftest): ``from dispatch_watch import LargestTensor``.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LargestTensor(TorchDispatchMode):
    """Records in ``largest`` the most entries of any tensor an aten op returns while active
    (``skip_meta``: not counting tensors on the meta device, which hold no memory)."""

    def __init__(self, skip_meta: bool = False):
        super().__init__()
        self.skip_meta = skip_meta
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not (self.skip_meta and t.is_meta):
                self.largest = max(self.largest, t.numel())
        return out
