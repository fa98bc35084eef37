"""The data set registry: what a data set is (:class:`DatasetInfo`), which files it reads
(:class:`DataFiles`), and the table from name to description and raw loader that
:func:`register_dataset` fills and :func:`dataset_entry` reads.

This module imports no other part of :mod:`srigl.app.datasets`, so the modules that register
data sets (:mod:`~srigl.app.datasets.builtin`) and the ones that look them up
(:mod:`~srigl.app.datasets.search`, :mod:`~srigl.app.datasets.loading`,
:mod:`~srigl.app.datasets.fetch`) all depend on it and never on each other through the package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from srigl.errors import SriglError


class UnknownDatasetError(SriglError, ValueError):
    """A data set name is not in the registry. The message lists the valid names."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and a report need to know about a data set, without loading it.

    Attributes:
        name: Registry name, e.g. ``"fashion-mnist"``.
        in_channels: Image channels (1 or 3).
        image_size: Height and width of the square images (28 or 32).
        num_classes: Number of label values, labels are ``0 .. num_classes - 1``.
        mean: Per-channel mean of the training images in [0, 1] units, used to normalise.
        std: Per-channel standard deviation of the training images in [0, 1] units.
        class_names: Human-readable name of each label.
    """

    name: str
    in_channels: int
    image_size: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """``(in_channels, image_size, image_size)`` of one image."""
        return (self.in_channels, self.image_size, self.image_size)


@dataclass(frozen=True)
class DataFiles:
    """Where a data set's files are looked for, and which must be there.

    Attributes:
        folders: Folders tried under each search root, in order (``"mnist"``, ``"MNIST/raw"``).
        stems: Files that must all be in one folder.
        allow_gz: Whether ``STEM.gz`` (tried first) may stand in for ``STEM``.
        system_dirs: Absolute folders tried after the user's roots and before the project's
            ``data/`` folders.
        how_to_get: Tells the user how to get the files; ``{target}`` becomes their data folder.
    """

    folders: tuple[str, ...]
    stems: tuple[str, ...]
    allow_gz: bool = False
    system_dirs: tuple[Path, ...] = ()
    how_to_get: str = ""


# The loader of a registered data set: {stem: path} of its files -> (train images, train
# labels, test images, test labels), images (N, C, H, W) uint8 or float in [0, 1], labels (N,)
# int64.
RawLoader = Callable[[dict[str, Path]], tuple[Tensor, Tensor, Tensor, Tensor]]


@dataclass(frozen=True)
class DatasetEntry:
    """One registered data set: what :func:`register_dataset` was given.

    Attributes:
        info: The data set's description; ``info.name`` is its registry key.
        files: The files its loader reads and where to look for them; ``None`` when it reads
            nothing on disk (digits comes with scikit-learn).
        load: The raw loader.
        augment_by_default: Whether ``load_dataset(..., augment=None)`` augments its training set.
    """

    info: DatasetInfo
    files: DataFiles | None
    load: RawLoader
    augment_by_default: bool


# name -> entry. Filled by the @register_dataset decorators as their modules are imported:
# the package imports builtin, so the built-in data sets are here whenever srigl.app.datasets is.
_DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(
    info: DatasetInfo, files: DataFiles | None = None, augment_by_default: bool = False
) -> Callable[[RawLoader], RawLoader]:
    """Decorator that registers a raw loader under ``info.name``.

    The loader receives ``{stem: path}`` for the files in ``files``, found on the search path
    by ``load_dataset``, and returns ``(train_images, train_labels, test_images, test_labels)``.

    Args:
        info: Description of the data set; its ``name`` is the registry key.
        files: The files the loader reads and where to look for them; ``None`` if it reads none.
        augment_by_default: Whether ``load_dataset(..., augment=None)`` applies the train-time
            augmentation to this data set.

    Returns:
        The decorator, which returns the loader unchanged.

    Raises:
        ValueError: If the name is already registered.
    """

    def decorator(load: RawLoader) -> RawLoader:
        if info.name in _DATASETS:
            raise ValueError(f"data set {info.name!r} is already registered")
        _DATASETS[info.name] = DatasetEntry(info, files, load, augment_by_default)
        return load

    return decorator


def list_datasets() -> list[str]:
    """Names of all registered data sets, sorted."""
    return sorted(_DATASETS)


def dataset_entry(name: str) -> DatasetEntry:
    """The registry entry of data set ``name``: its description, files, loader and default.

    Raises:
        UnknownDatasetError: If ``name`` is not registered; the message lists valid names.
    """
    try:
        return _DATASETS[name]
    except KeyError:
        raise UnknownDatasetError(
            f"unknown data set {name!r}; choose one of: {', '.join(list_datasets())}"
        ) from None


def dataset_info(name: str) -> DatasetInfo:
    """The ``DatasetInfo`` of a registered data set, without touching any file.

    Raises:
        UnknownDatasetError: If ``name`` is not registered; the message lists valid names.
    """
    return dataset_entry(name).info
