"""Image classification data sets read from local files: the registry, where srigl looks, the
in-memory dataset and its loaders, and the data order of a training run.

Nothing is downloaded while loading: every loader reads files that are already on disk and,
when they are missing or damaged, raises one error that lists every place srigl looked and
says how to get the data.

Data sets are registered by name (``list_datasets()``; the built-in ones are in
:mod:`srigl.app.datasets.builtin`):

* ``"fashion-mnist"`` (default) and ``"mnist"``: the four standard idx files, gzipped or not.
* ``"digits"``: scikit-learn's bundled 8x8 digits, upsampled to 28x28 so every model that
  takes MNIST takes them too.
* ``"cifar10"``: the python pickle batches of ``cifar-10-python.tar.gz``.

Every data set yields either 1x28x28 or 3x32x32 float images, normalised with the data set's
mean and std, and int64 labels.

Where srigl looks, in order, for a data set called NAME:

1. ``data_dir`` (the ``--data-dir`` argument),
2. ``$SRIGL_DATA_DIR``,
3. ``/usr/share/datasets/fashion-mnist`` (where Debian's ``dataset-fashion-mnist`` package
   installs it; Fashion-MNIST only),
4. ``data/`` in the working directory and in the source checkout (what ``make data`` fills).

Under each root, the folders tried are the data set's ``DataFiles.folders``: ``ROOT/NAME`` and
torchvision's ``ROOT/<Name>/raw`` for the idx data sets, ``ROOT/cifar-10-batches-py`` and
``ROOT/cifar10/cifar-10-batches-py`` for CIFAR-10. ``srigl data where NAME`` prints the list.

The fetcher (:mod:`srigl.app.datasets.fetch`), ``srigl data fetch fashion-mnist --data-dir data``,
does nothing when Fashion-MNIST is already somewhere on that path; otherwise it unpacks the Debian
package ``dataset-fashion-mnist`` into ``DATA_DIR/fashion-mnist``.

This package is the public face; each concept lives in its own module, and the imports between
them run one way (registry <- search <- loading; registry <- builtin; fetch on top):

* :mod:`~srigl.app.datasets.registry`: ``DatasetInfo``, ``DataFiles``, ``register_dataset``, lookup.
* :mod:`~srigl.app.datasets.search`: where srigl looks, ``DatasetNotFoundError``.
* :mod:`~srigl.app.datasets.loading`: ``ImageDataset``, loaders, the per-epoch data order.
* :mod:`~srigl.app.datasets.formats`, :mod:`~srigl.app.datasets.transforms`: file readers, transforms.
* :mod:`~srigl.app.datasets.builtin`: the data sets srigl ships.
* :mod:`~srigl.app.datasets.fetch`: ``srigl data fetch`` (imported on demand, not here).
"""

from __future__ import annotations

# Importing builtin registers the shipped data sets, so they are listed whenever this package is
# imported. builtin imports the registry module, never this package, so there is no import cycle.
# The names marked noqa (the built-in DatasetInfos, RawLoader, DATA_DIR_ENV) are not in __all__ but
# have always been importable from this package, and stay so.
from srigl.app.datasets.builtin import CIFAR10, DIGITS, FASHION_MNIST, MNIST  # noqa: F401
from srigl.app.datasets.formats import CorruptDatasetError, read_idx
from srigl.app.datasets.loading import (
    ImageDataset,
    SeededShuffleSampler,
    batches,
    epoch_order,
    epoch_seed,
    load_dataset,
    make_loaders,
    shard,
)
from srigl.app.datasets.registry import (
    DataFiles,
    DatasetInfo,
    RawLoader,  # noqa: F401
    UnknownDatasetError,
    dataset_info,
    list_datasets,
    register_dataset,
)
from srigl.app.datasets.search import (
    DATA_DIR_ENV,  # noqa: F401
    DatasetNotFoundError,
    find_dataset_dir,
    search_dirs,
)
from srigl.app.datasets.transforms import Normalize, RandomCropFlip

__all__ = [
    "CorruptDatasetError",
    "DataFiles",
    "DatasetInfo",
    "DatasetNotFoundError",
    "ImageDataset",
    "Normalize",
    "RandomCropFlip",
    "SeededShuffleSampler",
    "UnknownDatasetError",
    "batches",
    "dataset_info",
    "epoch_order",
    "epoch_seed",
    "find_dataset_dir",
    "list_datasets",
    "load_dataset",
    "make_loaders",
    "read_idx",
    "register_dataset",
    "search_dirs",
    "shard",
]
