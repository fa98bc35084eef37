"""The extreme multi-label (XMC) data sets ``srigl train`` takes, by name: ``xmc-synthetic`` (the
generator of :mod:`~srigl.app.datasets.xmc_synthetic`) and ``xmc:NAME`` (a folder of the Extreme
Classification Repository's files).

``xmc:NAME`` reads the folder ``NAME`` found the way the image data sets are found: ``--data-dir``
itself when it holds the files, else ``DIR/NAME`` for ``DIR`` in ``--data-dir``,
``$SRIGL_DATA_DIR`` and the project's ``data/``. The name, not the path, is what identifies the data
in run folders and reports, so a folder may move (``--resume --data-dir NEW``). Inside it, the
first of these layouts that is complete is read (each file may also be gzipped, as ``FILE.gz``):

==================================================  =================================================
``train.txt`` + ``test.txt``                         combined format, as EURLex-4K and Amazon-670K ship
``trn.txt`` + ``tst.txt``                            combined format, short names
``trn_X_Xf.txt`` + ``trn_X_Y.txt`` + ``tst_X_Xf.txt`` + ``tst_X_Y.txt``  the split pairs of newer sets
==================================================  =================================================

The test split must declare the training split's feature and label counts (``F`` and ``L``): the
model's input and output sizes come from them.

``xmc-synthetic`` draws ``points`` training and ``points // 4`` test points from one generator call
with data seed 0 (the same labels' prototypes in both splits; the run's ``--seed`` does not change
the data, so runs of different seeds train on the same data set).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from srigl.app.datasets.formats import CorruptDatasetError
from srigl.app.datasets.search import DatasetNotFoundError, _search_roots
from srigl.app.datasets.xmc import XMCDataset, read_xmc, read_xmc_pair, take_rows
from srigl.errors import InvalidConfigError

SYNTHETIC = "xmc-synthetic"
FILES_PREFIX = "xmc:"
# The synthetic data set's default sizes: small enough that a CPU trains it in seconds.
SYNTHETIC_POINTS, SYNTHETIC_FEATURES, SYNTHETIC_LABELS = 2000, 500, 1000
SYNTHETIC_DATA_SEED = 0
# (train files, test files) of each layout, in the order they are tried; a tuple of two is a pair.
LAYOUTS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    (("train.txt",), ("test.txt",)),
    (("trn.txt",), ("tst.txt",)),
    (("trn_X_Xf.txt", "trn_X_Y.txt"), ("tst_X_Xf.txt", "tst_X_Y.txt")),
)


def is_xmc(name: str) -> bool:
    """Whether data set ``name`` is an XMC one (``xmc-synthetic`` or ``xmc:NAME``)."""
    return name == SYNTHETIC or name.startswith(FILES_PREFIX)


def check_xmc_name(name: str) -> None:
    """Refuse an ``xmc:NAME`` whose NAME is empty or a path.

    Raises:
        InvalidConfigError: NAME is empty, or holds a path separator or is ``.``/``..`` (the
            location goes in ``--data-dir``: a path in the name would tie the run to it).
    """
    if name == SYNTHETIC:
        return
    folder = name[len(FILES_PREFIX):]
    if not folder or "/" in folder or "\\" in folder or folder in (".", ".."):
        raise InvalidConfigError(
            f"data {name!r}: give xmc:NAME with NAME a folder name such as xmc:EURLex-4K, and its location "
            "with --data-dir (the folder itself or the folder holding it)"
        )


@dataclass(frozen=True)
class XMCSplits:
    """The train and test splits of an XMC data set and their sizes (``F`` features, ``L`` labels)."""

    train: XMCDataset
    test: XMCDataset
    n_features: int
    n_labels: int


def _layout_files(folder: Path) -> tuple[list[Path], list[Path]] | None:
    """The first complete layout's (train, test) files in ``folder`` (``FILE.gz`` preferred), or None."""
    for train_names, test_names in LAYOUTS:
        found = []
        for name in (*train_names, *test_names):
            path = next((p for p in (folder / f"{name}.gz", folder / name) if p.is_file()), None)
            if path is None:
                break
            found.append(path)
        else:
            return found[: len(train_names)], found[len(train_names):]
    return None


def _read(files: list[Path]) -> XMCDataset:
    return read_xmc(files[0]) if len(files) == 1 else read_xmc_pair(files[0], files[1])


def find_xmc_folder(name: str, data_dir: Path | str | None) -> tuple[Path, tuple[list[Path], list[Path]]]:
    """The folder ``xmc:NAME`` reads from and its (train, test) files; see the module docstring.

    Raises:
        DatasetNotFoundError: no searched folder holds a complete layout; the message lists every
            place looked and the file names expected.
    """
    check_xmc_name(name)
    folder = name[len(FILES_PREFIX):]
    user_roots, project_roots = _search_roots(data_dir)
    # --data-dir itself as the user wrote it (messages then name the files as they would), then the roots.
    candidates = ([Path(data_dir).expanduser()] if data_dir else []) + [
        root / folder for root in (*user_roots, *project_roots)
    ]
    looked = []
    for candidate in dict.fromkeys(candidates):
        files = _layout_files(candidate) if candidate.is_dir() else None
        if files is not None:
            return candidate, files
        looked.append(f"  {candidate}" + ("" if candidate.is_dir() else " (no such directory)"))
    expected = "; ".join(" + ".join(train + test) for train, test in LAYOUTS)
    raise DatasetNotFoundError(
        f"{name} not found; srigl looked in {len(looked)} places:\n" + "\n".join(looked)
        + f"\nexpected one of: {expected} (each may be gzipped as FILE.gz); give their folder with --data-dir"
    )


def load_xmc(
    name: str,
    data_dir: Path | str | None = None,
    *,
    points: int | None = None,
    features: int | None = None,
    labels: int | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> XMCSplits:
    """Load XMC data set ``name`` (``xmc-synthetic`` or ``xmc:NAME``).

    Args:
        name: the data set.
        data_dir: where ``xmc:NAME`` is looked for first.
        points, features, labels: the synthetic data set's sizes (training points, ``F``, ``L``);
            None for the defaults. Files carry their own sizes.
        limit_train, limit_test: keep only the first N points of a split.

    Returns:
        The two splits and ``F``, ``L``.

    Raises:
        DatasetNotFoundError: see :func:`find_xmc_folder`.
        XMCFormatError: a file does not parse (its subclasses name the problem; the message
            names the file and the 1-based line).
        CorruptDatasetError: the test split declares other ``F`` or ``L`` than the training split.
        InvalidConfigError: a synthetic size below 1, or more labels per point than labels.
    """
    if name == SYNTHETIC:
        from srigl.app.datasets.xmc_synthetic import make_synthetic_xmc

        n_train = points or SYNTHETIC_POINTS
        n_test = max(n_train // 4, 1)
        data = make_synthetic_xmc(
            n_train + n_test, features or SYNTHETIC_FEATURES, labels or SYNTHETIC_LABELS,
            max_labels=min(5, labels or SYNTHETIC_LABELS), seed=SYNTHETIC_DATA_SEED,
        )
        train_rows, test_rows = torch.arange(n_train), torch.arange(n_train, n_train + n_test)
        train = XMCDataset(take_rows(data.features, train_rows), take_rows(data.labels, train_rows))
        test = XMCDataset(take_rows(data.features, test_rows), take_rows(data.labels, test_rows))
    else:
        _, (train_files, test_files) = find_xmc_folder(name, data_dir)
        train, test = _read(train_files), _read(test_files)
        if (test.n_features, test.n_labels) != (train.n_features, train.n_labels):
            raise CorruptDatasetError(
                f"{test_files[0]} declares F={test.n_features} features and L={test.n_labels} labels but "
                f"{train_files[0]} F={train.n_features}, L={train.n_labels}; both splits must share them"
            )
    train, test = _head(train, limit_train), _head(test, limit_test)
    return XMCSplits(train, test, train.n_features, train.n_labels)


def _head(data: XMCDataset, n: int | None) -> XMCDataset:
    if n is None or n >= len(data):
        return data
    rows = torch.arange(n)
    return XMCDataset(take_rows(data.features, rows), take_rows(data.labels, rows))
