"""The data sets srigl ships: Fashion-MNIST, MNIST, CIFAR-10 and scikit-learn's digits, each with
its description, where its files are looked for, how to get them, and its raw loader.

Importing :mod:`srigl.app.datasets` imports this module, which registers the four of them in
:mod:`srigl.app.datasets.registry` (imported directly, not through the package, so no cycle).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from srigl.app.datasets.formats import CIFAR_TRAIN_BATCHES, IDX_STEMS, cifar_batch, load_idx_splits
from srigl.app.datasets.registry import DataFiles, DatasetInfo, register_dataset
from srigl._optional import require

# Where the Debian package dataset-fashion-mnist puts the four gzipped idx files.
DEBIAN_FASHION_MNIST_FILES = "usr/share/datasets/fashion-mnist"
DEBIAN_FASHION_MNIST_DIR = Path("/") / DEBIAN_FASHION_MNIST_FILES
DEBIAN_FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


FASHION_MNIST = DatasetInfo(
    name="fashion-mnist",
    in_channels=1,
    image_size=28,
    num_classes=10,
    # Pixel mean and std over the 60000 training images.
    mean=(0.2860,),
    std=(0.3530,),
    class_names=(
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
)

MNIST = DatasetInfo(
    name="mnist",
    in_channels=1,
    image_size=28,
    num_classes=10,
    mean=(0.1307,),
    std=(0.3081,),
    class_names=tuple(str(d) for d in range(10)),
)


FASHION_MNIST_FILES = DataFiles(
    folders=("fashion-mnist", "FashionMNIST/raw"),  # srigl's fetcher, torchvision
    stems=IDX_STEMS,
    allow_gz=True,
    system_dirs=(DEBIAN_FASHION_MNIST_DIR,),
    how_to_get=(
        "Get it with `make data` or `srigl data fetch fashion-mnist --data-dir {target}` "
        f"(unpacks the Debian package {DEBIAN_FASHION_MNIST_PACKAGE}), or put the four idx files "
        "from https://github.com/zalandoresearch/fashion-mnist in {target}/fashion-mnist."
    ),
)

MNIST_FILES = DataFiles(
    folders=("mnist", "MNIST/raw"),
    stems=IDX_STEMS,
    allow_gz=True,
    how_to_get=(
        "Put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz "
        "and t10k-labels-idx1-ubyte.gz (gzipped or not, from any MNIST mirror) in {target}/mnist, "
        "or point --data-dir at a folder holding torchvision's MNIST/raw."
    ),
)


@register_dataset(FASHION_MNIST, FASHION_MNIST_FILES)
def _load_fashion_mnist(paths: dict[str, Path]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return load_idx_splits(paths, FASHION_MNIST.num_classes)


@register_dataset(MNIST, MNIST_FILES)
def _load_mnist(paths: dict[str, Path]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return load_idx_splits(paths, MNIST.num_classes)


# ---------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------

CIFAR10 = DatasetInfo(
    name="cifar10",
    in_channels=3,
    image_size=32,
    num_classes=10,
    # Per-channel pixel mean and std over the 50000 training images. (The often-quoted
    # (0.2023, 0.1994, 0.2010) is a mean of per-image stds, not the pixel std.)
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    class_names=(
        "airplane", "automobile", "bird", "cat", "deer",
        "dog", "frog", "horse", "ship", "truck",
    ),
)


CIFAR10_FILES = DataFiles(
    folders=("cifar-10-batches-py", "cifar10/cifar-10-batches-py"),
    stems=(*CIFAR_TRAIN_BATCHES, "test_batch"),
    how_to_get=(
        f"Download cifar-10-python.tar.gz from {CIFAR10_URL} and extract it into {{target}} "
        "(`tar -xzf cifar-10-python.tar.gz -C {target}` creates {target}/cifar-10-batches-py)."
    ),
)


@register_dataset(CIFAR10, CIFAR10_FILES, augment_by_default=True)
def _load_cifar10(paths: dict[str, Path]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    train = [cifar_batch(paths[stem]) for stem in CIFAR_TRAIN_BATCHES]
    test_images, test_labels = cifar_batch(paths["test_batch"])
    train_images = torch.cat([images for images, _ in train])
    train_labels = torch.cat([labels for _, labels in train])
    return train_images, train_labels, test_images, test_labels


# ---------------------------------------------------------------------------------------------
# scikit-learn digits
# ---------------------------------------------------------------------------------------------

DIGITS = DatasetInfo(
    name="digits",
    in_channels=1,
    image_size=28,
    num_classes=10,
    # Pixel mean and std of the 1437 training images after upsampling to 28x28.
    mean=(0.3056,),
    std=(0.3247,),
    class_names=tuple(str(d) for d in range(10)),
)
DIGITS_TEST_SIZE = 360
_DIGITS_SPLIT_SEED = 0


@register_dataset(DIGITS)
def _load_digits(paths: dict[str, Path]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    del paths  # bundled with scikit-learn
    bunch = require("sklearn.datasets", "the digits data set").load_digits()
    # Pixel values are counts 0..16. (N, 64) -> (N, 1, 8, 8)
    images = torch.from_numpy(bunch.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    # Bilinear upsampling to 28x28 so that every model built for MNIST takes digits as is.
    images = F.interpolate(images, size=(28, 28), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    # The bundle is ordered by writer; a fixed permutation (independent of the training seed)
    # gives a test split that is the same in every run.
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(_DIGITS_SPLIT_SEED))
    test, train = order[:DIGITS_TEST_SIZE], order[DIGITS_TEST_SIZE:]
    return images[train], labels[train], images[test], labels[test]
