"""Loading and iterating a registered data set: the in-memory :class:`ImageDataset`, the seeded
sampler and loaders, and the data order of a training run as a pure function of ``(seed, epoch)``,
sharded over ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from srigl.app.datasets.registry import DatasetInfo, dataset_entry
from srigl.app.datasets.search import find_files
from srigl.app.datasets.transforms import Normalize, RandomCropFlip

# ---------------------------------------------------------------------------------------------
# Datasets, sampling and loaders
# ---------------------------------------------------------------------------------------------


class ImageDataset(Dataset):
    """Images and labels held in memory; items are normalised float images and int64 labels.

    Images are stored as given (uint8 in 0..255, or float in [0, 1]) and converted per item,
    which keeps CIFAR-10's training set at 150 MB instead of 600 MB.

    An item index is either an ``int`` or an ``(int, seed)`` pair. With a pair, the
    augmentation of that item draws from ``torch.Generator().manual_seed(seed)``, so the
    result depends only on the index and seed (not on worker processes or on what was loaded
    before); ``SeededShuffleSampler`` yields such pairs.

    Attributes:
        images: ``(N, C, H, W)`` uint8 or float tensor.
        labels: ``(N,)`` int64 tensor.
        info: The data set's description.
        transform: Augmentation applied to a ``(C, H, W)`` image in [0, 1] with a generator,
            before normalisation; ``None`` for none.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        info: DatasetInfo,
        transform: Callable[[Tensor, torch.Generator | None], Tensor] | None = None,
    ) -> None:
        expected = (info.in_channels, info.image_size, info.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"{info.name}: expected images (N, {', '.join(map(str, expected))}), got {tuple(images.shape)}")
        if labels.shape != (len(images),):
            raise ValueError(f"{info.name}: {tuple(labels.shape)} labels for {len(images)} images")
        self.images = images
        self.labels = labels.long()
        self.info = info
        self.transform = transform
        self.normalize = Normalize(info.mean, info.std)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[Tensor, Tensor]:
        seed = None
        if isinstance(index, tuple):
            index, seed = index
        image = self.images[index]
        image = image.float().div_(255.0) if image.dtype == torch.uint8 else image.float()
        if self.transform is not None:
            generator = torch.Generator().manual_seed(seed) if seed is not None else None
            image = self.transform(image, generator)
        return self.normalize(image), self.labels[index]

    def head(self, n: int) -> ImageDataset:
        """The first ``min(n, len(self))`` items, same transform (a deterministic subset).

        Raises:
            ValueError: If ``n < 1``.
        """
        if n < 1:
            raise ValueError(f"a subset needs at least 1 item, got {n}")
        return ImageDataset(self.images[:n], self.labels[:n], self.info, self.transform)


class SeededShuffleSampler(Sampler):
    """Shuffles item indices each epoch and pairs each with a seed for its augmentation.

    All of an epoch's randomness (order and per-item augmentation seeds) is drawn from
    ``generator`` when iteration starts. Saving ``generator.get_state()`` before an epoch and
    restoring it with ``set_state`` replays that epoch exactly, whatever ``num_workers`` is.

    Attributes:
        num_samples: Number of items in the data set.
        generator: The one source of randomness for the data order and augmentation.
    """

    def __init__(self, num_samples: int, generator: torch.Generator) -> None:
        self.num_samples = num_samples
        self.generator = generator

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.num_samples, generator=self.generator)
        seeds = torch.randint(0, 2**62, (self.num_samples,), generator=self.generator)
        return iter(zip(order.tolist(), seeds.tolist()))


def load_dataset(
    name: str = "fashion-mnist",
    data_dir: Path | str | None = None,
    augment: bool | None = None,
) -> tuple[ImageDataset, ImageDataset, DatasetInfo]:
    """Load a registered data set's train and test splits from local files.

    Args:
        name: Registered name, see ``list_datasets()``.
        data_dir: Directory searched first (then ``$SRIGL_DATA_DIR``, Debian's location, ``data/``).
        augment: Apply ``RandomCropFlip`` to training items; ``None`` uses the data set's
            default (on for CIFAR-10 only).

    Returns:
        ``(train, test, info)``; the test set is never augmented.

    Raises:
        UnknownDatasetError: Unknown ``name``; the message lists valid names.
        DatasetNotFoundError: Files missing; the message lists every place searched and how to
            get them.
        CorruptDatasetError: A file exists but does not parse; the message names it.
    """
    entry = dataset_entry(name)
    train_images, train_labels, test_images, test_labels = entry.load(find_files(name, data_dir))
    augment = entry.augment_by_default if augment is None else augment
    transform = RandomCropFlip(padding=4) if augment else None
    train = ImageDataset(train_images, train_labels, entry.info, transform)
    test = ImageDataset(test_images, test_labels, entry.info)
    return train, test, entry.info


def make_loaders(
    name: str = "fashion-mnist",
    data_dir: Path | str | None = None,
    batch_size: int = 128,
    seed: int = 0,
    num_workers: int = 0,
    limit_train: int | None = None,
    limit_test: int | None = None,
    augment: bool | None = None,
) -> tuple[DataLoader, DataLoader, DatasetInfo]:
    """Train and test loaders whose order and augmentation depend only on ``seed``.

    The training loader's sampler is a ``SeededShuffleSampler``; its generator,
    ``train_loader.sampler.generator``, is the only source of randomness, so a checkpoint can
    save its state between epochs and restore it to replay the data exactly.

    Args:
        name: Registered data set name.
        data_dir: Directory searched first for the files.
        batch_size: Items per batch, for both loaders; the last batch may be smaller.
        seed: Seed of the training loader's generator.
        num_workers: Loader worker processes; results do not depend on it.
        limit_train: Keep only the first ``limit_train`` training items (all if larger).
        limit_test: Keep only the first ``limit_test`` test items (all if larger).
        augment: See ``load_dataset``.

    Returns:
        ``(train_loader, test_loader, info)``. Batches are ``(images, labels)`` with images
        ``(B, C, H, W)`` float32 and labels ``(B,)`` int64.

    Raises:
        ValueError: If ``batch_size`` or a limit is below 1.
        UnknownDatasetError, DatasetNotFoundError, CorruptDatasetError: See ``load_dataset``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    train, test, info = load_dataset(name, data_dir, augment=augment)
    if limit_train is not None:
        train = train.head(limit_train)
    if limit_test is not None:
        test = test.head(limit_test)
    sampler = SeededShuffleSampler(len(train), torch.Generator().manual_seed(seed))
    train_loader = DataLoader(train, batch_size=batch_size, sampler=sampler, num_workers=num_workers)
    test_loader = DataLoader(test, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    return train_loader, test_loader, info


# ---------------------------------------------------------------------------------------------
# Data order: a pure function of (seed, epoch), sharded over ranks
# ---------------------------------------------------------------------------------------------


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of epoch ``epoch``'s data order: a pure function of ``(seed, epoch)``."""
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63)


def epoch_order(num_items: int, seed: int, epoch: int) -> list[tuple[int, int]]:
    """The epoch's ``(item index, augmentation seed)`` pairs, as :class:`SeededShuffleSampler` draws them."""
    return list(SeededShuffleSampler(num_items, torch.Generator().manual_seed(epoch_seed(seed, epoch))))


def shard(order: list, rank: int, world: int) -> list:
    """This rank's part of ``order``: padded by wrapping to a multiple of ``world``, then strided.

    The same split as ``torch.utils.data.DistributedSampler`` (which would draw its own order);
    here the order comes from :func:`epoch_order` so augmentation seeds stay deterministic.
    """
    if world == 1:
        return order
    padded = order + order[: (-len(order)) % world]
    return padded[rank::world]


def batches(dataset, order: list[tuple[int, int]], batch_size: int, num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` batches of ``dataset`` in ``order``.

    An in-memory ``ImageDataset`` without augmentation is gathered a whole batch at a time
    (about 10x faster than item by item, with the same values); anything else goes through a
    ``DataLoader`` whose sampler is ``order``.
    """
    if isinstance(dataset, ImageDataset) and dataset.transform is None:
        normalize = Normalize(dataset.info.mean, dataset.info.std)
        indices = torch.tensor([i for i, _ in order], dtype=torch.long)
        for start in range(0, len(indices), batch_size):
            idx = indices[start : start + batch_size]
            images = dataset.images[idx]  # (B, C, H, W)
            images = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
            yield normalize(images), dataset.labels[idx]
        return
    yield from DataLoader(dataset, batch_size=batch_size, sampler=order, num_workers=num_workers)
