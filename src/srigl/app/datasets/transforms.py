"""Image transforms: per-channel normalisation and the seeded CIFAR crop-and-flip augmentation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Normalize:
    """``(image - mean) / std`` per channel, on ``(C, H, W)`` or ``(N, C, H, W)`` tensors."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, images: Tensor) -> Tensor:
        # (C,) -> (C, 1, 1), broadcast over H, W and any leading batch dimension.
        mean = torch.tensor(self.mean, dtype=images.dtype).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype).view(-1, 1, 1)
        return (images - mean) / std


@dataclass(frozen=True)
class RandomCropFlip:
    """Random crop with zero padding and random horizontal flip, the standard CIFAR augmentation.

    Works on one image ``(C, H, W)`` or a batch ``(N, C, H, W)`` (each image gets its own crop and
    flip), keeps the input size, and draws all randomness from ``generator`` so a seeded
    generator gives the same result every time. Apply it to images in [0, 1] before
    normalisation, so the padding is black as in the usual recipe.

    Attributes:
        padding: Pixels of zero padding on each side before cropping back to the input size.
        flip_probability: Chance that an image is mirrored left-right.
    """

    padding: int = 4
    flip_probability: float = 0.5

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Augment ``images``.

        Args:
            images: ``(C, H, W)`` or ``(N, C, H, W)``.
            generator: Source of randomness; the global RNG when ``None``.

        Returns:
            A tensor of the same shape and dtype.
        """
        if images.ndim not in (3, 4):
            raise ValueError(f"expected (C, H, W) or (N, C, H, W) images, got shape {tuple(images.shape)}")
        batch = images if images.ndim == 4 else images.unsqueeze(0)  # (N, C, H, W)
        n, c, h, w = batch.shape
        p = self.padding
        padded = F.pad(batch, (p, p, p, p))  # (N, C, H + 2p, W + 2p)
        top = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        left = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        flip = torch.rand(n, generator=generator) < self.flip_probability
        if images.ndim == 3:
            # One image (the per-item path of a data loader): slicing is ~10x cheaper than
            # the batched gather below, and draws the same numbers, so the result is the
            # same as augmenting a batch of one.
            y, x = int(top), int(left)
            crop = padded[0, :, y : y + h, x : x + w]  # (C, H, W)
            return crop.flip(-1) if bool(flip) else crop
        rows = top[:, None] + torch.arange(h)  # (N, H)
        cols = left[:, None] + torch.arange(w)  # (N, W)
        # Mirroring the crop is reading its columns right to left.
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        return padded[
            torch.arange(n).view(n, 1, 1, 1),
            torch.arange(c).view(1, c, 1, 1),
            rows.view(n, 1, h, 1),
            cols.view(n, 1, 1, w),
        ]  # (N, C, H, W)
