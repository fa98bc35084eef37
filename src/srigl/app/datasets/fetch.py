"""The Fashion-MNIST fetcher behind ``srigl data fetch`` and ``make data``: it does nothing when the
data set is already on the search path; otherwise it unpacks the Debian package
``dataset-fashion-mnist`` (``apt-get download`` + ``dpkg-deb -x``, no root needed) into
``DATA_DIR/fashion-mnist``, checking the files before they count as present.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from srigl.app.datasets.builtin import DEBIAN_FASHION_MNIST_FILES, DEBIAN_FASHION_MNIST_PACKAGE, FASHION_MNIST
from srigl.app.datasets.formats import IDX_STEMS, CorruptDatasetError, idx_split
from srigl.app.datasets.registry import dataset_entry
from srigl.app.datasets.search import DatasetNotFoundError, find_dataset_dir


def _run(command: Sequence[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(list(command), cwd=cwd, env=env, capture_output=True, text=True, check=False)


def _apt_download(package: str, workdir: Path, log: Callable[[str], None], otherwise: str) -> Path:
    """``apt-get download package`` into ``workdir``; refresh the package lists once if root.

    ``otherwise`` tells the user how to get the data by hand, for the error messages.
    """
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise DatasetNotFoundError(
            f"cannot fetch {package}: apt-get or dpkg-deb is missing (not a Debian-like system). {otherwise}"
        )
    log(f"running: apt-get download {package}")
    result = _run(["apt-get", "download", package], workdir)
    if result.returncode != 0:
        # A fresh container has no package lists: apt-get cannot locate the package at all.
        if os.geteuid() == 0:
            log("apt-get download failed; running: apt-get update")
            update = _run(["apt-get", "update"], workdir)
            if update.returncode != 0:
                raise DatasetNotFoundError(
                    f"apt-get update failed (exit {update.returncode}):\n{update.stderr.strip()}\n{otherwise}"
                )
            result = _run(["apt-get", "download", package], workdir)
        if result.returncode != 0:
            hint = "" if os.geteuid() == 0 else "If the package lists are missing, run `sudo apt-get update` and retry. "
            raise DatasetNotFoundError(
                f"apt-get download {package} failed (exit {result.returncode}):\n{result.stderr.strip()}\n"
                f"{hint}{otherwise}"
            )
    debs = sorted(workdir.glob(f"{package}_*.deb"))
    if not debs:
        raise DatasetNotFoundError(f"apt-get download {package} succeeded but left no .deb in {workdir}")
    return debs[-1]


def _fetch_fashion_mnist(target: Path, log: Callable[[str], None]) -> None:
    with tempfile.TemporaryDirectory(prefix="srigl-fetch-") as tmp:
        workdir = Path(tmp)
        otherwise = (
            "Or put the four idx files from https://github.com/zalandoresearch/fashion-mnist "
            f"in {target}."
        )
        deb = _apt_download(DEBIAN_FASHION_MNIST_PACKAGE, workdir, log, otherwise)
        log(f"downloaded {deb.name} ({deb.stat().st_size / 1e6:.1f} MB); unpacking with dpkg-deb -x")
        unpacked = workdir / "root"
        result = _run(["dpkg-deb", "-x", str(deb), str(unpacked)], workdir)
        if result.returncode != 0:
            raise CorruptDatasetError(f"dpkg-deb -x {deb.name} failed (exit {result.returncode}):\n{result.stderr.strip()}")
        source = unpacked / DEBIAN_FASHION_MNIST_FILES
        files = [source / f"{stem}.gz" for stem in IDX_STEMS]
        missing = [str(f.relative_to(unpacked)) for f in files if not f.is_file()]
        if missing:
            raise CorruptDatasetError(f"{deb.name} does not contain {', '.join(missing)}")
        # Copy into a staging folder next to the target and check the files there, so that
        # an interrupted or damaged fetch never leaves files that would count as "present".
        target.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target))
        try:
            for file in files:
                shutil.copyfile(file, staging / file.name)
            for images, labels in ((0, 1), (2, 3)):
                idx_split(staging / files[images].name, staging / files[labels].name, FASHION_MNIST.num_classes)
            for file in files:
                os.replace(staging / file.name, target / file.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def fetch(name: str, data_dir: Path | str = "data", log: Callable[[str], None] = print) -> Path | None:
    """Make data set ``name`` available locally, doing nothing if it already is.

    Only Fashion-MNIST is fetched automatically (from the Debian package
    ``dataset-fashion-mnist`` into ``data_dir/fashion-mnist``, without root unless the package
    lists need refreshing); digits ships with scikit-learn; MNIST and CIFAR-10 must be put in
    place by hand, and this says how.

    Args:
        name: Registered data set name.
        data_dir: Where to put fetched files (``DATA_DIR/NAME``); searched first.
        log: Receives one line per action taken.

    Returns:
        The directory holding the data set's files, or ``None`` for digits.

    Raises:
        DatasetNotFoundError: If the data cannot be obtained; the message says how to get it.
        CorruptDatasetError: If the fetched files do not parse.
        UnknownDatasetError: Unknown ``name``.
    """
    dataset_entry(name)  # an unknown name fails here, before anything is searched or run
    if name == "digits":
        log("digits ships with scikit-learn; nothing to fetch")
        return None
    try:
        found = find_dataset_dir(name, data_dir)
    except DatasetNotFoundError:
        if name != "fashion-mnist":
            raise
    else:
        log(f"{name} already present in {found}; nothing to do")
        return found
    target = Path(data_dir).expanduser().resolve() / name
    _fetch_fashion_mnist(target, log)
    log(f"fashion-mnist ready in {target}")
    return target
