"""Extreme multi-label classification (XMC) data: the sparse text formats of the Extreme
Classification Repository (manikvarma.org/downloads/XC/XMLRepository.html), read line by line
into compact CSR rows, and written back.

Supported variants (all indices 0-based, as the repository's README specifies):

* **Combined file** (``train.txt``, ``test.txt``, ``Amazon-670K/trn.txt`` ...)::

      N F L                       <- header: points, features, labels
      l1,l2,...  f:v f:v ...      <- one line per point

  The label list may be empty; the line then starts with a space or directly with a feature
  token. A line with neither labels nor features (blank) is a point with nothing.
* **Split pair** (``trn_X_Xf.txt`` + ``trn_X_Y.txt``, the layout of the newer LF-/BoW data sets):
  a feature matrix with header ``N F`` and rows ``f:v f:v ...``, and a label matrix with header
  ``N L`` and rows ``l:v l:v ...``. Label values are parsed (they must be numbers) and dropped:
  a listed label is a positive, whatever value the file gives it (the repository writes 1).
* Either file gzipped. Compression is detected from the content (the gzip magic bytes), not the
  suffix, and the decompressed size is bounded (``max_decompressed_bytes``) so a hostile or
  corrupt archive cannot fill memory.

Not supported: scipy ``.npz`` matrices, the raw-text/title files, 1-based (libsvm) indices, and
the ``*_trSplit.txt`` / ``*_tstSplit.txt`` index files of the small data sets (Mediamill, Bibtex,
Delicious); select rows with :func:`take_rows` after reading.

Within a row the reader sorts indices ascending (the canonical CSR form ``torch.sparse_csr_tensor``
expects); a row that lists one index twice is an error, not a sum. Every error is an
:class:`XMCFormatError` (a :class:`~srigl.app.datasets.formats.CorruptDatasetError`) that names
the file and the 1-based line number.
"""

from __future__ import annotations

import gzip
import io
import re
import warnings
import zlib
from array import array
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

import numpy as np
import torch
from torch import Tensor

from srigl.app.datasets.formats import CorruptDatasetError

# 64 GiB: the largest training file in the repository (Amazon-3M) is well under this decompressed.
DEFAULT_MAX_DECOMPRESSED_BYTES = 64 * 2**30
_GZIP_MAGIC = b"\x1f\x8b"
# A point line is a few kB; one without a newline for 64 MiB is not text in this format (and must
# not be read into one string whatever its size).
MAX_LINE_BYTES = 64 * 2**20


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


class XMCFormatError(CorruptDatasetError):
    """An XMC text file that does not parse; ``path`` and 1-based ``line`` say where."""

    def __init__(self, path: Path | str, line: int, message: str):
        super().__init__(f"{path}: line {line}: {message}")
        self.path = Path(path)
        self.line = line


class XMCHeaderError(XMCFormatError):
    """A header that is missing or malformed, or whose point count the file does not keep."""


class XMCTokenError(XMCFormatError):
    """A label or ``index:value`` token that is malformed, or an index listed twice in a row."""


class XMCIndexRangeError(XMCFormatError):
    """A label id or feature index that is negative or not below the count the header declares."""


class DecompressedSizeError(XMCFormatError):
    """A gzipped file that decompresses to more than the allowed number of bytes.

    ``line`` is the line being read when the bound was crossed; reading ahead in 8 kB blocks,
    that can be a few lines before the byte that crossed it.
    """


# ---------------------------------------------------------------------------------------------
# The in-memory representation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SparseRows:
    """A sparse ``(n_rows, n_cols)`` matrix in CSR form, the layout of both features and labels.

    Attributes:
        indptr: ``(n_rows + 1,)`` int64; row ``i`` owns positions ``indptr[i]:indptr[i + 1]``.
        indices: ``(nnz,)`` int64 column ids, ascending and unique within each row.
        values: ``(nnz,)`` float32, or ``None`` for a binary matrix (labels: every entry is 1).
        n_cols: the number of columns (features ``F`` or labels ``L``).
    """

    indptr: Tensor
    indices: Tensor
    values: Tensor | None
    n_cols: int

    @property
    def n_rows(self) -> int:
        return self.indptr.numel() - 1

    @property
    def nnz(self) -> int:
        return self.indices.numel()

    def row_lengths(self) -> Tensor:
        """``(n_rows,)`` int64: the number of stored entries of each row."""
        return self.indptr[1:] - self.indptr[:-1]

    def row(self, i: int) -> tuple[Tensor, Tensor | None]:
        """``(indices, values)`` of row ``i`` (``values`` is ``None`` for a binary matrix)."""
        lo, hi = int(self.indptr[i]), int(self.indptr[i + 1])
        return self.indices[lo:hi], None if self.values is None else self.values[lo:hi]

    def to_sparse_csr(self) -> Tensor:
        """The matrix as a ``torch.sparse_csr_tensor`` of shape ``(n_rows, n_cols)``, float32."""
        values = self.values if self.values is not None else torch.ones(self.nnz, dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            # The readers and the generator already checked the invariants, vectorised.
            return torch.sparse_csr_tensor(
                self.indptr, self.indices, values, (self.n_rows, self.n_cols), check_invariants=False
            )

    def check(self) -> None:
        """Verify the CSR invariants, vectorised (for rows built outside the readers).

        Raises:
            CorruptDatasetError: ``indptr`` not starting at 0, decreasing, or not ending at
                ``nnz``; a column outside ``[0, n_cols)``; columns not strictly ascending within a
                row; or ``values`` of another length than ``indices``.
        """
        indptr, indices = self.indptr, self.indices
        if indptr.dim() != 1 or indptr.numel() < 1 or int(indptr[0]) != 0 or int(indptr[-1]) != indices.numel():
            raise CorruptDatasetError(
                f"indptr of shape {tuple(indptr.shape)} must start at 0 and end at nnz = {indices.numel()}"
            )
        lengths = self.row_lengths()  # (n_rows,)
        if bool((lengths < 0).any()):
            row = int(torch.nonzero(lengths < 0)[0])
            raise CorruptDatasetError(f"indptr decreases at row {row}: {int(indptr[row])} -> {int(indptr[row + 1])}")
        if self.values is not None and self.values.shape != indices.shape:
            raise CorruptDatasetError(f"{self.values.numel()} values for {indices.numel()} indices")
        outside = torch.nonzero((indices < 0) | (indices >= self.n_cols)).flatten()
        if outside.numel():
            raise CorruptDatasetError(f"column {int(indices[outside[0]])} outside [0, {self.n_cols})")
        row_of = torch.repeat_interleave(torch.arange(self.n_rows), lengths)  # (nnz,)
        # Strictly ascending within each row <=> the key row * n_cols + column strictly ascends.
        key = row_of * self.n_cols + indices  # (nnz,)
        unsorted = torch.nonzero(key[1:] <= key[:-1]).flatten()
        if unsorted.numel():
            row = int(row_of[unsorted[0] + 1])
            raise CorruptDatasetError(f"row {row}: columns are not strictly ascending (repeated or unsorted)")

    def equals(self, other: SparseRows) -> bool:
        """Whether both matrices hold exactly the same entries (values compared bit for bit)."""
        if self.n_cols != other.n_cols or (self.values is None) != (other.values is None):
            return False
        same = torch.equal(self.indptr, other.indptr) and torch.equal(self.indices, other.indices)
        return same and (self.values is None or torch.equal(self.values, other.values))


@dataclass(frozen=True, eq=False)
class XMCDataset:
    """``N`` points: ``features`` is ``(N, F)`` with float32 values, ``labels`` is ``(N, L)`` binary."""

    features: SparseRows
    labels: SparseRows

    def __post_init__(self):
        if self.features.n_rows != self.labels.n_rows:
            raise CorruptDatasetError(f"{self.features.n_rows} feature rows but {self.labels.n_rows} label rows")

    def __len__(self) -> int:
        return self.features.n_rows

    @property
    def n_features(self) -> int:
        return self.features.n_cols

    @property
    def n_labels(self) -> int:
        return self.labels.n_cols

    def equals(self, other: XMCDataset) -> bool:
        """Whether both data sets hold exactly the same features and labels."""
        return self.features.equals(other.features) and self.labels.equals(other.labels)


def take_rows(rows: SparseRows, row_ids: Tensor) -> SparseRows:
    """The rows ``row_ids`` (in that order, repeats allowed) of ``rows``, without a Python loop.

    Args:
        rows: the matrix to select from.
        row_ids: ``(B,)`` int64 row numbers.

    Returns:
        A ``(B, n_cols)`` :class:`SparseRows`.
    """
    row_ids = row_ids.to(torch.int64)
    starts = rows.indptr[row_ids]  # (B,)
    lengths = rows.indptr[row_ids + 1] - starts  # (B,)
    indptr = torch.zeros(row_ids.numel() + 1, dtype=torch.int64)
    torch.cumsum(lengths, 0, out=indptr[1:])
    # Position k of the output row b is position starts[b] + k of the input: shift each output
    # position by (starts[b] - indptr[b]) for every entry of row b.
    shift = torch.repeat_interleave(starts - indptr[:-1], lengths)  # (nnz_out,)
    gather = torch.arange(int(indptr[-1]), dtype=torch.int64) + shift  # (nnz_out,)
    values = None if rows.values is None else rows.values[gather]
    return SparseRows(indptr, rows.indices[gather], values, rows.n_cols)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

_INT = r"-?\d+"
# A decimal number: no nan/inf, no Python-only spellings such as "1_0".
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_PAIR = re.compile(rf"({_INT}):({_NUMBER})")
_PAIRS = re.compile(rf"{_INT}:{_NUMBER}(?:[ \t]+{_INT}:{_NUMBER})*")
_LABEL_LIST = re.compile(rf"{_INT}(?:,{_INT})*")
_LABEL = re.compile(_INT)


class _SizeLimitExceeded(Exception):
    """Raised inside the byte stream; turned into DecompressedSizeError where the line is known."""


class _BoundedRaw(io.RawIOBase):
    """A readable byte stream that stops after ``limit`` bytes of the stream it wraps."""

    def __init__(self, inner: IO[bytes], limit: int):
        self._inner = inner
        self._limit = limit
        self.total = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._inner.readinto(buffer)
        self.total += n
        if self.total > self._limit:
            raise _SizeLimitExceeded
        return n


def _numbered_lines(path: Path, max_decompressed_bytes: int) -> Iterator[tuple[int, str]]:
    """``(line number, line without its newline)`` of a text file, gzipped or not, read streaming."""
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == _GZIP_MAGIC
        raw.seek(0)
        inner: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if gzipped else raw
        limit = max_decompressed_bytes if gzipped else 2**63
        # Bytes line by line, decoded here rather than by a TextIOWrapper: its decoder works on
        # 8 kB chunks, so a bad byte would be reported at the line that started the chunk.
        stream = io.BufferedReader(_BoundedRaw(inner, limit))
        line_no = 0
        while True:
            line_no += 1
            try:
                line = stream.readline(MAX_LINE_BYTES + 1)
            except _SizeLimitExceeded:
                raise DecompressedSizeError(
                    path, line_no, f"decompresses to more than max_decompressed_bytes={max_decompressed_bytes}"
                ) from None
            except (EOFError, OSError, zlib.error) as error:
                raise XMCFormatError(path, line_no, f"gzip stream is damaged or truncated: {error}") from error
            if not line:
                return
            if len(line) > MAX_LINE_BYTES:
                raise XMCFormatError(path, line_no, f"line is longer than MAX_LINE_BYTES={MAX_LINE_BYTES}: not this text format")
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as error:
                raise XMCFormatError(path, line_no, f"not UTF-8 text: {error}") from error
            yield line_no, text.rstrip("\r\n")


def _read_header(path: Path, lines: Iterator[tuple[int, str]], names: tuple[str, ...]) -> list[int]:
    expected = " ".join(names)
    try:
        _, header = next(lines)
    except StopIteration:
        raise XMCHeaderError(path, 1, f"empty file; expected a header '{expected}'") from None
    fields = header.split()
    if len(fields) != len(names) or not all(f.isascii() and f.isdigit() for f in fields):
        raise XMCHeaderError(path, 1, f"header {header[:80]!r} is not '{expected}' ({len(names)} non-negative integers)")
    return [int(f) for f in fields]


def _bad_pair(path: Path, line_no: int, text: str, what: str) -> XMCTokenError:
    """The error naming the first token of ``text`` that is not ``index:value``."""
    for token in text.split():
        if not _PAIR.fullmatch(token):
            return XMCTokenError(path, line_no, f"malformed {what} token {token[:40]!r}; expected index:value")
    return XMCTokenError(path, line_no, f"malformed {what} list {text[:80]!r}")  # pragma: no cover


def _bad_labels(path: Path, line_no: int, text: str) -> XMCTokenError:
    for token in text.split(","):
        if not _LABEL.fullmatch(token):
            return XMCTokenError(path, line_no, f"malformed label token {token[:40]!r} in label list {text[:80]!r}")
    return XMCTokenError(path, line_no, f"malformed label list {text[:80]!r}")  # pragma: no cover


class _RowBuilder:
    """Accumulates CSR rows in compact typed arrays (no per-entry Python objects kept)."""

    def __init__(self, path: Path, what: str, n_cols: int, binary: bool):
        self.path, self.what, self.n_cols, self.binary = path, what, n_cols, binary
        self.indptr = array("q", [0])
        self.indices = array("q")
        self.values = array("d")

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    def add(self, line_no: int, indices=(), values=None) -> None:
        """Append one row; ``values`` is ignored for a binary matrix."""
        try:
            self.indices.extend(indices)
        except OverflowError:
            del self.indices[self.indptr[-1]:]
            raise XMCIndexRangeError(self.path, line_no, f"a {self.what} id does not fit in 64 bits") from None
        if values is not None and not self.binary:
            self.values.extend(values)
        self.indptr.append(len(self.indices))

    def finish(self) -> SparseRows:
        """Sort each row, check ranges, values and duplicates, and hand over as tensors."""
        path, what, n_cols = self.path, self.what, self.n_cols
        indptr = np.frombuffer(self.indptr, dtype=np.int64).copy()
        indices = np.frombuffer(self.indices, dtype=np.int64).copy()
        with np.errstate(over="ignore"):  # a value past float32 becomes inf, refused below
            values = None if self.binary else np.frombuffer(self.values, dtype=np.float64).astype(np.float32)
        row_of = np.repeat(np.arange(len(indptr) - 1, dtype=np.int64), np.diff(indptr))  # (nnz,)

        def line_of(position: int) -> int:  # header is line 1, row r is line r + 2
            return int(row_of[position]) + 2

        if values is not None:
            overflow = np.flatnonzero(~np.isfinite(values))
            if overflow.size:
                bad = int(overflow[0])
                raise XMCTokenError(
                    path, line_of(bad), f"value {self.values[bad]!r} of {what} {indices[bad]} does not fit in float32"
                )

        outside = np.flatnonzero((indices < 0) | (indices >= n_cols))
        if outside.size:  # report the first one in file order
            bad = int(outside[0])
            why = "is negative" if indices[bad] < 0 else f"is not below the header's count {n_cols}"
            raise XMCIndexRangeError(path, line_of(bad), f"{what} {indices[bad]} {why}")
        order = np.lexsort((indices, row_of))  # by row, then by index within the row
        indices, row_of = indices[order], row_of[order]
        repeated = np.flatnonzero((indices[1:] == indices[:-1]) & (row_of[1:] == row_of[:-1]))
        if repeated.size:
            first = int(repeated[0]) + 1
            raise XMCTokenError(path, line_of(first), f"{what} {indices[first]} is listed twice")
        return SparseRows(
            torch.from_numpy(indptr),
            torch.from_numpy(indices),
            None if values is None else torch.from_numpy(values[order]),
            n_cols,
        )


def _check_row_count(path: Path, n_rows: int, promised: int, line_no: int) -> None:
    if n_rows != promised:
        raise XMCHeaderError(
            path, line_no, f"header promises {promised} points but the file ends after {n_rows} (at line {line_no})"
        )


def _parse_pairs(path: Path, line_no: int, text: str, what: str) -> tuple[list[int], list[float]]:
    if not _PAIRS.fullmatch(text):
        raise _bad_pair(path, line_no, text, what)
    # "3:0.5 7:1" -> ["3", "0.5", "7", "1"]: the regex guarantees the pieces alternate.
    pieces = text.replace(":", " ").split()
    return list(map(int, pieces[0::2])), list(map(float, pieces[1::2]))


def read_xmc(path: Path | str, *, max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES) -> XMCDataset:
    """Read a combined XMC file (header ``N F L``, then ``labels  f:v ...`` per point).

    Args:
        path: the file, plain or gzipped (detected from its first bytes).
        max_decompressed_bytes: refuse a gzipped file that inflates past this many bytes.

    Returns:
        An :class:`XMCDataset` with ``features`` ``(N, F)`` float32 and ``labels`` ``(N, L)``.

    Raises:
        XMCHeaderError: A malformed header, or a point count other than the header's ``N``.
        XMCTokenError: A malformed label or feature token, or an index listed twice in a row.
        XMCIndexRangeError: A negative label/feature, a label ``>= L`` or a feature ``>= F``.
        DecompressedSizeError: A gzipped file larger than ``max_decompressed_bytes`` inflated.
        XMCFormatError: A damaged gzip stream or bytes that are not UTF-8.
    """
    path = Path(path)
    lines = _numbered_lines(path, max_decompressed_bytes)
    n_points, n_features, n_labels = _read_header(path, lines, ("N", "F", "L"))
    features = _RowBuilder(path, "feature", n_features, binary=False)
    labels = _RowBuilder(path, "label", n_labels, binary=True)
    last_line = 1
    for line_no, line in lines:
        last_line = line_no
        stripped = line.strip()
        if features.n_rows == n_points:
            if stripped:
                raise XMCHeaderError(path, line_no, f"header promises {n_points} points but line {line_no} is one more")
            continue
        # The label list is the first token unless that is already a feature token (an empty
        # label list, written as a leading space that strip() removed).
        if not stripped:  # a point with neither labels nor features
            labels.add(line_no)
            features.add(line_no)
            continue
        first, *rest = stripped.split(None, 1)  # labels and features may be split by a tab
        if ":" in first:
            label_text, feature_text = "", stripped
        else:
            label_text, feature_text = first, "".join(rest)
        if label_text and not _LABEL_LIST.fullmatch(label_text):
            raise _bad_labels(path, line_no, label_text)
        labels.add(line_no, map(int, label_text.split(",")) if label_text else ())
        if feature_text:
            features.add(line_no, *_parse_pairs(path, line_no, feature_text, "feature"))
        else:
            features.add(line_no)
    _check_row_count(path, features.n_rows, n_points, last_line)
    return XMCDataset(features.finish(), labels.finish())


def read_sparse_matrix(
    path: Path | str, *, binary: bool = False, max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES
) -> SparseRows:
    """Read one sparse matrix file (header ``N C``, then ``c:v c:v ...`` per row).

    This is the format of ``trn_X_Xf.txt`` (features, ``C = F``) and ``trn_X_Y.txt`` (labels,
    ``C = L``).

    Args:
        path: the file, plain or gzipped.
        binary: drop the values (after checking they are numbers): the label matrix.
        max_decompressed_bytes: refuse a gzipped file that inflates past this many bytes.

    Returns:
        ``(N, C)`` :class:`SparseRows`, float32 values unless ``binary``.

    Raises:
        The errors of :func:`read_xmc`.
    """
    path = Path(path)
    what = "label" if binary else "feature"
    lines = _numbered_lines(path, max_decompressed_bytes)
    n_rows, n_cols = _read_header(path, lines, ("N", "L" if binary else "F"))
    rows = _RowBuilder(path, what, n_cols, binary)
    last_line = 1
    for line_no, line in lines:
        last_line = line_no
        stripped = line.strip()
        if rows.n_rows == n_rows:
            if stripped:
                raise XMCHeaderError(path, line_no, f"header promises {n_rows} points but line {line_no} is one more")
            continue
        if stripped:
            rows.add(line_no, *_parse_pairs(path, line_no, stripped, what))
        else:
            rows.add(line_no)
    _check_row_count(path, rows.n_rows, n_rows, last_line)
    return rows.finish()


def read_xmc_pair(
    features_path: Path | str, labels_path: Path | str, *, max_decompressed_bytes: int = DEFAULT_MAX_DECOMPRESSED_BYTES
) -> XMCDataset:
    """Read a split pair: ``*_X_Xf.txt`` (header ``N F``) and ``*_X_Y.txt`` (header ``N L``).

    Raises:
        XMCHeaderError: The two files disagree on ``N`` (reported at line 1 of the label file),
            or either file's own header is wrong. Otherwise the errors of :func:`read_xmc`.
    """
    features = read_sparse_matrix(features_path, max_decompressed_bytes=max_decompressed_bytes)
    labels = read_sparse_matrix(labels_path, binary=True, max_decompressed_bytes=max_decompressed_bytes)
    if features.n_rows != labels.n_rows:
        raise XMCHeaderError(
            labels_path, 1, f"{labels.n_rows} label rows but {features_path} has {features.n_rows} feature rows"
        )
    return XMCDataset(features, labels)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


@contextmanager
def _open_for_writing(path: Path) -> Iterator[IO[str]]:
    with open(path, "wb") as raw:
        if path.suffix == ".gz":
            # No file name and mtime=0 in the gzip header: the same data set always gives the same bytes.
            with gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as packed:
                with io.TextIOWrapper(packed, encoding="utf-8", newline="\n") as text:
                    yield text
        else:
            with io.TextIOWrapper(raw, encoding="utf-8", newline="\n") as text:
                yield text


def _pairs_text(indices: np.ndarray, values: np.ndarray | None) -> str:
    if values is None:
        return " ".join(f"{i}:1" for i in indices.tolist())
    # 9 significant digits round-trip every float32 exactly.
    return " ".join(f"{i}:{v:.9g}" for i, v in zip(indices.tolist(), values.tolist()))


def write_xmc(path: Path | str, dataset: XMCDataset) -> None:
    """Write ``dataset`` as a combined XMC file (gzipped when ``path`` ends in ``.gz``).

    :func:`read_xmc` of the result gives back exactly ``dataset`` (float32 values bit for bit).
    """
    path = Path(path)
    f_ptr, f_idx = dataset.features.indptr.numpy(), dataset.features.indices.numpy()
    f_val = dataset.features.values.numpy() if dataset.features.values is not None else None
    l_ptr, l_idx = dataset.labels.indptr.numpy(), dataset.labels.indices.numpy()
    with _open_for_writing(path) as out:
        out.write(f"{len(dataset)} {dataset.n_features} {dataset.n_labels}\n")
        for i in range(len(dataset)):
            labels = ",".join(map(str, l_idx[l_ptr[i]:l_ptr[i + 1]].tolist()))
            lo, hi = f_ptr[i], f_ptr[i + 1]
            features = _pairs_text(f_idx[lo:hi], None if f_val is None else f_val[lo:hi])
            # An empty label list is written as a leading space, as the repository's files do.
            line = f"{labels} {features}".rstrip()
            out.write(line + "\n")


def write_sparse_matrix(path: Path | str, rows: SparseRows) -> None:
    """Write ``rows`` as header ``N C`` and ``c:v ...`` lines (values ``1`` for a binary matrix)."""
    path = Path(path)
    indptr, indices = rows.indptr.numpy(), rows.indices.numpy()
    values = None if rows.values is None else rows.values.numpy()
    with _open_for_writing(path) as out:
        out.write(f"{rows.n_rows} {rows.n_cols}\n")
        for i in range(rows.n_rows):
            lo, hi = indptr[i], indptr[i + 1]
            out.write(_pairs_text(indices[lo:hi], None if values is None else values[lo:hi]) + "\n")
