"""Where srigl looks for a data set's files, and the error that lists every place it looked.

For a data set called NAME, in order: ``data_dir`` (``--data-dir``), ``$SRIGL_DATA_DIR``, the data
set's ``DataFiles.system_dirs`` (Debian's ``/usr/share/datasets/fashion-mnist``), then ``data/`` in
the working directory and in the source checkout. Under each root the folders tried are the data
set's ``DataFiles.folders``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from srigl.app.datasets.registry import dataset_entry
from srigl.errors import SriglError

DATA_DIR_ENV = "SRIGL_DATA_DIR"


class DatasetNotFoundError(SriglError, FileNotFoundError):
    """A data set's files are not in any searched directory. The message lists them all."""


def _checkout_data_dir() -> Path | None:
    # src/srigl/app/datasets/search.py -> the checkout root, when running from a source
    # checkout (editable install); an installed wheel has no project data/ folder.
    root = Path(__file__).resolve().parents[4]
    if (root / "pyproject.toml").is_file() and (root / "src" / "srigl").is_dir():
        return root / "data"
    return None


def _search_roots(data_dir: Path | str | None) -> tuple[list[Path], list[Path]]:
    """(the user's roots: data_dir and $SRIGL_DATA_DIR; the project's data/ folders)."""
    env_dir = os.environ.get(DATA_DIR_ENV)
    user = [Path(r) for r in (data_dir, env_dir) if r]
    project = [r for r in (Path("data"), _checkout_data_dir()) if r is not None]
    return _dedupe(user), _dedupe(project)


def _dedupe(paths: Sequence[Path]) -> list[Path]:
    seen: set[Path] = set()
    unique = []
    for path in paths:
        key = path.expanduser().resolve()
        if key not in seen:
            seen.add(key)
            unique.append(key)
    return unique


def search_dirs(name: str, data_dir: Path | str | None = None) -> list[Path]:
    """Every directory, in order, where srigl looks for the files of data set ``name``.

    Args:
        name: A registered data set name (``"digits"`` has no files and gives ``[]``).
        data_dir: The user's ``--data-dir``; searched first.

    Returns:
        Absolute directories, first match wins. They need not exist.

    Raises:
        UnknownDatasetError: If ``name`` is not registered.
    """
    files = dataset_entry(name).files
    if files is None:
        return []
    user_roots, project_roots = _search_roots(data_dir)
    return _dedupe(
        [root / folder for root in user_roots for folder in files.folders]
        + list(files.system_dirs)
        + [root / folder for root in project_roots for folder in files.folders]
    )


def find_files(name: str, data_dir: Path | str | None = None) -> dict[str, Path]:
    """``{stem: path}`` from the first searched directory holding every file of ``name``.

    Args:
        name: A registered data set name.
        data_dir: The user's ``--data-dir``; searched first.

    Returns:
        One path per stem of the data set's ``DataFiles`` (``STEM.gz`` where allowed and present);
        ``{}`` for a data set with no files (digits).

    Raises:
        DatasetNotFoundError: If no searched directory holds all the files; the message lists
            every place searched, what was missing there, and how to get the files.
        UnknownDatasetError: If ``name`` is not registered.
    """
    files = dataset_entry(name).files
    if files is None:
        return {}
    looked = []
    for directory in search_dirs(name, data_dir):
        found: dict[str, Path] = {}
        for stem in files.stems:
            candidates = [directory / f"{stem}.gz", directory / stem] if files.allow_gz else [directory / stem]
            path = next((c for c in candidates if c.is_file()), None)
            if path is not None:
                found[stem] = path
        if len(found) == len(files.stems):
            return found
        if not directory.is_dir():
            looked.append(f"{directory} (no such directory)")
        else:
            missing = [s for s in files.stems if s not in found]
            looked.append(f"{directory} (missing {', '.join(missing)})")
    places = "\n".join(f"  {line}" for line in looked)
    target = Path(data_dir or os.environ.get(DATA_DIR_ENV) or "data")
    raise DatasetNotFoundError(
        f"{name} not found; srigl looked in {len(looked)} places:\n{places}\n"
        + files.how_to_get.format(target=target)
    )


def find_dataset_dir(name: str, data_dir: Path | str | None = None) -> Path:
    """The directory that ``load_dataset(name, data_dir)`` would read from.

    Raises:
        DatasetNotFoundError: If no searched directory holds all of the data set's files; the
            message lists every place searched and how to get the files.
        UnknownDatasetError: If ``name`` is not registered.
        ValueError: If the data set has no files (digits).
    """
    paths = find_files(name, data_dir)
    if not paths:
        raise ValueError(f"data set {name!r} has no files on disk")
    return next(iter(paths.values())).parent
