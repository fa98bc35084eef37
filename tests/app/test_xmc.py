"""Extreme multi-label data (#16): the repository's text formats on files the tests write, every
bad input named with its line, the synthetic generator (determinism, Zipf shape, memory,
learnability), hand-computed P@k / nDCG@k, and batches with a BCE that needs no dense target."""

from __future__ import annotations

import gzip
import math
import tracemalloc

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from srigl.app import xmc_metrics
from srigl.app.datasets import CorruptDatasetError
from srigl.app.datasets.xmc import (
    DecompressedSizeError,
    SparseRows,
    XMCDataset,
    XMCFormatError,
    XMCHeaderError,
    XMCIndexRangeError,
    XMCTokenError,
    read_sparse_matrix,
    read_xmc,
    read_xmc_pair,
    take_rows,
    write_sparse_matrix,
    write_xmc,
)
from srigl.app.datasets.xmc_batches import bce_with_logits_csr, dense_rows, iterate_batches
from srigl.app.datasets.xmc_synthetic import AMAZON_670K_LABELS, label_prototypes, make_synthetic_xmc
from srigl.errors import InvalidConfigError

# The metric and loss code moves labels to the scores' device: checked on CUDA where there is one.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rows(lists, n_cols, values=None) -> SparseRows:
    """SparseRows from Python lists of column ids (and optional value lists)."""
    indptr = torch.tensor([0] + list(np.cumsum([len(r) for r in lists])), dtype=torch.int64)
    indices = torch.tensor([c for r in lists for c in r], dtype=torch.int64)
    vals = None if values is None else torch.tensor([v for r in values for v in r], dtype=torch.float32)
    return SparseRows(indptr, indices, vals, n_cols)


# ---------------------------------------------------------------------------------------------
# Reading the repository's formats
# ---------------------------------------------------------------------------------------------

# Point 1 has no label (leading space), point 2 no feature, point 3 a tab after its labels;
# point 4 is a blank line: neither labels nor features.
COMBINED = """5 6 5
0,3 0:0.5 2:1.25
 1:2 5:-3e-1
4
2,1\t4:1 3:0.75

"""


def test_read_combined_file_by_hand(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(COMBINED)
    data = read_xmc(path)
    assert (len(data), data.n_features, data.n_labels) == (5, 6, 5)
    assert data.features.indptr.tolist() == [0, 2, 4, 4, 6, 6]
    assert data.features.indices.tolist() == [0, 2, 1, 5, 3, 4]  # sorted within each row
    assert data.features.values.tolist() == pytest.approx([0.5, 1.25, 2.0, -0.3, 0.75, 1.0])
    assert data.features.values.dtype == torch.float32
    assert data.labels.indptr.tolist() == [0, 2, 2, 3, 5, 5]
    assert data.labels.indices.tolist() == [0, 3, 4, 1, 2]
    assert data.labels.values is None
    dense = data.features.to_sparse_csr().to_dense()  # (N, F)
    assert dense.shape == (5, 6) and dense[3, 3] == 0.75 and dense[2].abs().sum() == 0


def test_read_pair_files_by_hand(tmp_path):
    (tmp_path / "trn_X_Xf.txt").write_text("3 4\n0:1 3:0.5\n\n2:2\n")
    (tmp_path / "trn_X_Y.txt").write_text("3 7\n6:1 2:1\n0:1\n\n")
    data = read_xmc_pair(tmp_path / "trn_X_Xf.txt", tmp_path / "trn_X_Y.txt")
    assert (len(data), data.n_features, data.n_labels) == (3, 4, 7)
    assert data.features.indptr.tolist() == [0, 2, 2, 3]
    assert data.labels.indptr.tolist() == [0, 2, 3, 3]
    assert data.labels.indices.tolist() == [2, 6, 0]


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gz"])
def test_synthetic_round_trips_through_the_combined_format(tmp_path, gzipped):
    data = make_synthetic_xmc(300, 500, 1000, seed=3)
    path = tmp_path / ("train.txt.gz" if gzipped else "train.txt")
    write_xmc(path, data)
    assert path.read_bytes().startswith(b"\x1f\x8b") == gzipped
    assert read_xmc(path).equals(data)


@pytest.mark.parametrize("gzipped", [False, True], ids=["plain", "gz"])
def test_synthetic_round_trips_through_the_pair_format(tmp_path, gzipped):
    data = make_synthetic_xmc(200, 300, 50, seed=4)
    suffix = ".txt.gz" if gzipped else ".txt"
    write_sparse_matrix(tmp_path / f"trn_X_Xf{suffix}", data.features)
    write_sparse_matrix(tmp_path / f"trn_X_Y{suffix}", data.labels)
    assert read_xmc_pair(tmp_path / f"trn_X_Xf{suffix}", tmp_path / f"trn_X_Y{suffix}").equals(data)


def test_windows_line_endings(tmp_path):
    path = tmp_path / "crlf.txt"
    path.write_bytes(COMBINED.replace("\n", "\r\n").encode())
    assert read_xmc(path).equals(read_xmc(_plain(tmp_path, COMBINED)))


def test_gzip_is_detected_from_content_not_suffix(tmp_path):
    path = tmp_path / "train.txt"  # gzipped but without .gz, as some mirrors ship it
    path.write_bytes(gzip.compress(COMBINED.encode()))
    assert read_xmc(path).equals(read_xmc(_plain(tmp_path, COMBINED)))


def test_writing_is_deterministic_bytes(tmp_path):
    data = make_synthetic_xmc(50, 80, 40, seed=0)
    write_xmc(tmp_path / "a.txt.gz", data)
    write_xmc(tmp_path / "b.txt.gz", data)
    assert (tmp_path / "a.txt.gz").read_bytes() == (tmp_path / "b.txt.gz").read_bytes()


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sets(st.integers(0, 9), max_size=4),
            st.dictionaries(st.integers(0, 19), st.floats(-1e6, 1e6, allow_nan=False, width=32), max_size=5),
        ),
        min_size=1,
        max_size=8,
    )
)
def test_round_trip_of_arbitrary_small_data_sets(tmp_path_factory, points):
    labels = rows([sorted(p[0]) for p in points], 10)
    features = rows([sorted(p[1]) for p in points], 20, [[p[1][c] for c in sorted(p[1])] for p in points])
    data = XMCDataset(features, labels)
    path = tmp_path_factory.mktemp("rt") / "d.txt"
    write_xmc(path, data)
    assert read_xmc(path).equals(data)


# ---------------------------------------------------------------------------------------------
# Bad input: each error named, with the file and the line
# ---------------------------------------------------------------------------------------------


def _plain(tmp_path, text, name="bad.txt"):
    path = tmp_path / name
    path.write_text(text)
    return path


BAD_COMBINED = [
    ("empty file", "", XMCHeaderError, 1, "empty file"),
    ("two-field header", "2 5\n0 1:1\n1 2:1\n", XMCHeaderError, 1, "'N F L'"),
    ("non-numeric header", "2 x 3\n", XMCHeaderError, 1, "'N F L'"),
    ("fewer points", "3 5 4\n0 1:1\n1 2:1\n", XMCHeaderError, 3, "promises 3 points but the file ends after 2"),
    ("more points", "1 5 4\n0 1:1\n1 2:1\n", XMCHeaderError, 3, "promises 1 points but line 3"),
    ("label >= L", "2 5 4\n0 1:1\n1,4 2:1\n", XMCIndexRangeError, 3, "label 4 is not below the header's count 4"),
    ("negative label", "2 5 4\n-1 1:1\n1 2:1\n", XMCIndexRangeError, 2, "label -1 is negative"),
    ("feature >= F", "3 5 4\n0 1:1\n1 2:1\n2 0:1 5:2\n", XMCIndexRangeError, 4, "feature 5 is not below"),
    ("negative feature", "2 5 4\n0 -2:1\n1 2:1\n", XMCIndexRangeError, 2, "feature -2 is negative"),
    ("feature without value", "2 5 4\n0 1:1\n1 2\n", XMCTokenError, 3, "malformed feature token '2'"),
    ("value not a number", "2 5 4\n0 1:abc\n1 2:1\n", XMCTokenError, 2, "malformed feature token '1:abc'"),
    ("nan value", "2 5 4\n0 1:1\n1 2:nan\n", XMCTokenError, 3, "'2:nan'"),
    ("two colons", "2 5 4\n0 1:1:2\n1 2:1\n", XMCTokenError, 2, "'1:1:2'"),
    ("empty label", "2 5 4\n0,,1 1:1\n1 2:1\n", XMCTokenError, 2, "malformed label token ''"),
    ("label not an integer", "2 5 4\n0 1:1\n1.5 2:1\n", XMCTokenError, 3, "malformed label token '1.5'"),
    ("repeated feature", "2 5 4\n0 1:1\n1 2:1 2:3\n", XMCTokenError, 3, "feature 2 is listed twice"),
    ("repeated label", "2 5 4\n0,0 1:1\n1 2:1\n", XMCTokenError, 2, "label 0 is listed twice"),
    ("id past 64 bits", "2 5 4\n0 1:1\n1 99999999999999999999:1\n", XMCIndexRangeError, 3, "does not fit in 64 bits"),
    ("value past float32", "2 5 4\n0 1:1\n1 2:1e39\n", XMCTokenError, 3, "value 1e+39 of feature 2 does not fit in float32"),
    ("value past float64", "2 5 4\n0 1:1e999\n1 2:1\n", XMCTokenError, 2, "does not fit in float32"),
]


@pytest.mark.parametrize("text, error, line, words", [c[1:] for c in BAD_COMBINED], ids=[c[0] for c in BAD_COMBINED])
def test_bad_combined_file_is_named_with_its_line(tmp_path, text, error, line, words):
    path = _plain(tmp_path, text)
    with pytest.raises(error) as caught:
        read_xmc(path)
    assert caught.value.line == line and caught.value.path == path
    message = str(caught.value)
    assert message.startswith(f"{path}: line {line}: ") and words in message
    assert isinstance(caught.value, CorruptDatasetError)  # callers catching the old error still do


BAD_MATRIX = [
    ("three-field header", "2 5 4\n1:1\n2:1\n", XMCHeaderError, 1),
    ("fewer rows", "3 5\n1:1\n", XMCHeaderError, 2),
    ("index >= C", "2 5\n1:1\n0:1 9:1\n", XMCIndexRangeError, 3),
    ("label list instead of pairs", "2 5\n1:1\n0,1\n", XMCTokenError, 3),
]


@pytest.mark.parametrize("text, error, line", [c[1:] for c in BAD_MATRIX], ids=[c[0] for c in BAD_MATRIX])
def test_bad_matrix_file_is_named_with_its_line(tmp_path, text, error, line):
    path = _plain(tmp_path, text, "trn_X_Y.txt")
    with pytest.raises(error, match=rf"trn_X_Y\.txt: line {line}: ") as caught:
        read_sparse_matrix(path, binary=True)
    assert caught.value.line == line


def test_pair_files_that_disagree_on_the_point_count(tmp_path):
    features = _plain(tmp_path, "2 4\n0:1\n1:1\n", "trn_X_Xf.txt")
    labels = _plain(tmp_path, "3 4\n0:1\n1:1\n2:1\n", "trn_X_Y.txt")
    with pytest.raises(XMCHeaderError, match=r"trn_X_Y\.txt: line 1: 3 label rows but .*trn_X_Xf\.txt has 2"):
        read_xmc_pair(features, labels)


def test_truncated_gzip_names_the_line_it_reached(tmp_path):
    text = "500 10 10\n" + "".join(f"{i % 10} {i % 10}:1\n" for i in range(500))
    packed = gzip.compress(text.encode())
    path = tmp_path / "train.txt.gz"
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(XMCFormatError, match=r"train\.txt\.gz: line \d+: gzip stream is damaged or truncated"):
        read_xmc(path)


def test_gzip_bomb_is_refused_at_the_size_bound(tmp_path):
    # 2 MB of one repeated line compresses to a few kB; the bound stops it after 64 kB.
    text = "200000 10 10\n" + "1 2:1\n" * 200_000
    path = tmp_path / "bomb.txt.gz"
    path.write_bytes(gzip.compress(text.encode()))
    assert path.stat().st_size < 20_000
    with pytest.raises(DecompressedSizeError, match=r"bomb\.txt\.gz: line \d+: decompresses to more than max_decompressed_bytes=65536") as caught:
        read_xmc(path, max_decompressed_bytes=65_536)
    assert 2 <= caught.value.line <= 65_536 // len("1 2:1\n") + 2
    assert len(read_xmc(path)) == 200_000  # the default bound lets it through


def test_a_line_past_the_line_bound(tmp_path, monkeypatch):
    monkeypatch.setattr("srigl.app.datasets.xmc.MAX_LINE_BYTES", 100)
    path = _plain(tmp_path, "2 500 4\n0 1:1\n1 " + " ".join(f"{i}:1" for i in range(100)) + "\n")
    with pytest.raises(XMCFormatError, match=r"line 3: line is longer than MAX_LINE_BYTES=100"):
        read_xmc(path)


BAD_ROWS = [
    ("indptr not at 0", (torch.tensor([1, 2]), torch.tensor([0, 1]), 3), "must start at 0 and end at nnz = 2"),
    ("indptr short of nnz", (torch.tensor([0, 1]), torch.tensor([0, 1]), 3), "end at nnz = 2"),
    ("indptr decreasing", (torch.tensor([0, 2, 1, 2]), torch.tensor([0, 1]), 3), "indptr decreases at row 1: 2 -> 1"),
    ("column outside", (torch.tensor([0, 2]), torch.tensor([0, 3]), 3), r"column 3 outside \[0, 3\)"),
    ("unsorted row", (torch.tensor([0, 1, 3]), torch.tensor([2, 1, 0]), 3), "row 1: columns are not strictly ascending"),
    ("repeated column", (torch.tensor([0, 2]), torch.tensor([1, 1]), 3), "row 0: columns are not strictly ascending"),
]


@pytest.mark.parametrize("arrays, words", [c[1:] for c in BAD_ROWS], ids=[c[0] for c in BAD_ROWS])
def test_check_names_broken_csr(arrays, words):
    indptr, indices, n_cols = arrays
    with pytest.raises(CorruptDatasetError, match=words):
        SparseRows(indptr, indices, None, n_cols).check()


def test_readers_and_generator_give_rows_that_pass_check(tmp_path):
    data = make_synthetic_xmc(100, 200, 300, seed=0)
    data.features.check()
    data.labels.check()
    read = read_xmc(_plain(tmp_path, COMBINED))
    read.features.check()
    read.labels.check()
    with pytest.raises(CorruptDatasetError, match="100 feature rows but 5 label rows"):
        XMCDataset(data.features, read.labels)


def test_bytes_that_are_not_utf8(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"2 5 4\n0 1:1\n1 \xff\xfe:1\n")
    with pytest.raises(XMCFormatError, match=r"line 3: not UTF-8"):
        read_xmc(path)


# ---------------------------------------------------------------------------------------------
# The synthetic generator
# ---------------------------------------------------------------------------------------------


def test_synthetic_is_a_function_of_the_seed():
    a = make_synthetic_xmc(400, 1000, 5000, seed=7)
    assert a.equals(make_synthetic_xmc(400, 1000, 5000, seed=7))
    assert not a.equals(make_synthetic_xmc(400, 1000, 5000, seed=8))


def test_synthetic_rows_are_valid_csr():
    data = make_synthetic_xmc(500, 300, 2000, max_labels=5, seed=1)
    n_labels = data.labels.row_lengths()
    assert int(n_labels.min()) >= 1 and int(n_labels.max()) <= 5
    for part in (data.features, data.labels):
        part.check()  # sorted, unique, in-range columns; consistent indptr
        csr = part.to_sparse_csr()
        assert csr.shape == (500, part.n_cols) and csr.values().dtype == torch.float32
    row_of = torch.repeat_interleave(torch.arange(500), data.features.row_lengths())  # (nnz,)
    norms = torch.zeros(500, dtype=torch.float64).index_add_(0, row_of, data.features.values.double() ** 2)
    assert torch.allclose(norms, torch.ones(500, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("exponent", [0.8, 1.2])
def test_label_frequencies_follow_a_zipf_law(exponent):
    data = make_synthetic_xmc(20_000, 100, 5_000, zipf_exponent=exponent, prototype_nnz=1, noise_nnz=0, seed=0)
    counts = np.sort(np.bincount(data.labels.indices.numpy(), minlength=5_000))[::-1]
    ranks = np.arange(5, 200)  # skip the head, where "at most once per point" saturates
    slope = np.polyfit(np.log(ranks + 1), np.log(counts[ranks]), 1)[0]
    assert slope == pytest.approx(-exponent, abs=0.12)
    assert np.argmax(np.bincount(data.labels.indices.numpy())) == 0  # label 0 is the most frequent


def test_amazon_670k_sized_labels_stay_in_memory_bounds():
    tracemalloc.start()
    try:
        data = make_synthetic_xmc(2_000, 50_000, AMAZON_670K_LABELS, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert data.n_labels == AMAZON_670K_LABELS and len(data) == 2_000
    # numpy reports its buffers to tracemalloc; torch.from_numpy shares them. Measured: ~10 MB,
    # of which 5.4 MB is the Zipf CDF over 670,091 labels; a dense L x F float32 would be 134 GB.
    assert peak < 50 * 2**20, f"peak {peak / 2**20:.1f} MiB"


def test_features_carry_the_labels_prototypes():
    data = make_synthetic_xmc(300, 5_000, 1_000, seed=2)
    on_own, on_other = [], []
    rng = np.random.default_rng(0)
    for i in range(300):
        labels, _ = data.labels.row(i)
        features, values = data.features.row(i)
        own, _ = label_prototypes(labels.numpy(), 5_000, 8, seed=2)
        other, _ = label_prototypes(rng.integers(0, 1_000, size=len(labels)), 5_000, 8, seed=2)
        mass = values.double().numpy() ** 2  # rows are L2-normalised: mass sums to 1
        on_own.append(mass[np.isin(features.numpy(), own)].sum())
        on_other.append(mass[np.isin(features.numpy(), other)].sum())
    assert np.mean(on_own) > 0.85 and np.mean(on_other) < 0.1


def test_a_linear_model_learns_the_synthetic_labels():
    torch.manual_seed(0)
    data = make_synthetic_xmc(3_000, 400, 60, zipf_exponent=0.7, seed=5)
    model = torch.nn.Linear(400, 60)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for epoch in range(4):
        for batch in iterate_batches(data, 250, seed=0, epoch=epoch):
            optimizer.zero_grad()
            bce_with_logits_csr(model(batch.features), batch.labels).backward()
            optimizer.step()
    with torch.no_grad():
        scores = model(dense_rows(data.features))
    learned = xmc_metrics.xmc_metrics(scores, data.labels.indptr, data.labels.indices, 60)
    always_label_0 = xmc_metrics.xmc_metrics(torch.arange(60, 0, -1.0).expand(3_000, 60), data.labels.indptr, data.labels.indices, 60)
    assert learned["P@1"] > 0.9 and learned["P@1"] > always_label_0["P@1"] + 0.4


def test_synthetic_refuses_impossible_sizes():
    with pytest.raises(InvalidConfigError, match="max_labels=5 distinct labels per point, but only 3 labels"):
        make_synthetic_xmc(10, 10, 3)
    with pytest.raises(InvalidConfigError, match="n_points=0"):
        make_synthetic_xmc(0, 10, 10)


# ---------------------------------------------------------------------------------------------
# Metrics: golden values computed by hand
# ---------------------------------------------------------------------------------------------

# Row 0: true {1, 3}, ranking 3, 0, 1, 5, 2 -> hits 1 0 1 0 0.
# Row 1: true {0, 2, 4, 5}, ranking 1, 2, 3, 4, 5 -> hits 0 1 0 1 1.
# Row 2: no true label -> every metric 0.
TOP_K = torch.tensor([[3, 0, 1, 5, 2], [1, 2, 3, 4, 5], [0, 1, 2, 3, 4]])
LABEL_INDPTR = torch.tensor([0, 2, 6, 6])
LABEL_INDICES = torch.tensor([1, 3, 0, 2, 4, 5])
D = [1.0, 1 / math.log2(3), 1 / 2, 1 / math.log2(5), 1 / math.log2(6)]  # 1 / log2(rank + 1)
GOLDEN = {
    "P@1": [1.0, 0.0, 0.0],
    "P@3": [2 / 3, 1 / 3, 0.0],
    "P@5": [2 / 5, 3 / 5, 0.0],
    "nDCG@1": [1.0, 0.0, 0.0],
    "nDCG@3": [(D[0] + D[2]) / (D[0] + D[1]), D[1] / (D[0] + D[1] + D[2]), 0.0],
    # Row 0 has 2 labels: IDCG@5 stops at rank 2. Row 1 has 4: IDCG@5 stops at rank 4.
    "nDCG@5": [(D[0] + D[2]) / (D[0] + D[1]), (D[1] + D[3] + D[4]) / (D[0] + D[1] + D[2] + D[3]), 0.0],
}


@pytest.mark.parametrize("device", DEVICES)
def test_per_point_metrics_golden(device):
    values = xmc_metrics.per_point_metrics(TOP_K.to(device), LABEL_INDPTR, LABEL_INDICES, 6)
    assert set(values) == set(GOLDEN)
    for name, expected in GOLDEN.items():
        assert values[name].tolist() == pytest.approx(expected, abs=1e-12), name
    # The same numbers to 4 decimals, worked on paper: 0.9197 = 1.5 / 1.6309, 0.5654 = 1.4485 / 2.5616.
    assert values["nDCG@3"][0].item() == pytest.approx(0.9197, abs=1e-4)
    assert values["nDCG@5"][1].item() == pytest.approx(0.5654, abs=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_metrics_from_scores_rank_like_top_k(device):
    scores = torch.full((3, 6), -10.0, device=device)
    for row, ranking in enumerate(TOP_K.tolist()):
        scores[row, ranking] = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], device=device)  # distinct: no ties
    from_scores = xmc_metrics.xmc_metrics(scores, LABEL_INDPTR, LABEL_INDICES, 6)
    assert list(from_scores) == ["P@1", "P@3", "P@5", "nDCG@1", "nDCG@3", "nDCG@5"]
    for name, expected in GOLDEN.items():
        assert from_scores[name] == pytest.approx(sum(expected) / 3, abs=1e-12)
    assert xmc_metrics.xmc_metrics(TOP_K, LABEL_INDPTR, LABEL_INDICES, 6) == from_scores


def test_metrics_on_labels_sliced_from_a_larger_csr():
    # A batch's labels are often a view into the data set's CSR: indptr need not start at 0.
    batch = take_rows(rows([[9], [1, 3], [0, 2, 4, 5], []], 10), torch.tensor([1, 2, 3]))
    values = xmc_metrics.per_point_metrics(TOP_K, batch.indptr, batch.indices, 10)
    assert values["P@3"].tolist() == pytest.approx(GOLDEN["P@3"])


def test_metric_inputs_that_do_not_fit():
    with pytest.raises(xmc_metrics.XMCMetricInputError, match="3 ranked rows but a label indptr of 3"):
        xmc_metrics.per_point_metrics(TOP_K, LABEL_INDPTR[:3], LABEL_INDICES, 6)
    with pytest.raises(xmc_metrics.XMCMetricInputError, match=r"K >= max\(ks\) = 5"):
        xmc_metrics.per_point_metrics(TOP_K[:, :3], LABEL_INDPTR, LABEL_INDICES, 6)
    with pytest.raises(xmc_metrics.XMCMetricInputError, match="for 7 labels"):
        xmc_metrics.xmc_metrics(torch.zeros(3, 6), LABEL_INDPTR, LABEL_INDICES, 7)


# ---------------------------------------------------------------------------------------------
# Batches and the loss
# ---------------------------------------------------------------------------------------------


def test_batches_cover_every_point_once_in_a_seeded_order():
    data = make_synthetic_xmc(103, 50, 30, seed=0)
    batches = list(iterate_batches(data, 25, seed=1, epoch=0))
    assert [len(b.row_ids) for b in batches] == [25, 25, 25, 25, 3]
    seen = torch.cat([b.row_ids for b in batches])
    assert sorted(seen.tolist()) == list(range(103))
    again = torch.cat([b.row_ids for b in iterate_batches(data, 25, seed=1, epoch=0)])
    other_epoch = torch.cat([b.row_ids for b in iterate_batches(data, 25, seed=1, epoch=1)])
    assert torch.equal(seen, again) and not torch.equal(seen, other_epoch)
    assert len(list(iterate_batches(data, 25, drop_last=True))) == 4


def test_batch_contents_match_the_rows_they_name():
    data = make_synthetic_xmc(40, 60, 30, seed=0)
    everything = dense_rows(data.features)  # (N, F)
    all_labels = dense_rows(data.labels)  # (N, L)
    for dense, sparse in zip(iterate_batches(data, 16, seed=3), iterate_batches(data, 16, seed=3, sparse_features=True)):
        assert torch.equal(dense.features, everything[dense.row_ids])
        assert sparse.features.layout == torch.sparse_csr
        assert torch.equal(sparse.features.to_dense(), dense.features)
        assert torch.equal(dense.multi_hot(), all_labels[dense.row_ids])


@pytest.mark.parametrize("device", DEVICES)
def test_bce_from_csr_equals_the_dense_target_loss(device):
    data = make_synthetic_xmc(32, 20, 50, seed=0)
    batch = next(iterate_batches(data, 32, seed=0))
    logits = (torch.randn(32, 50, dtype=torch.float64) * 4).to(device).requires_grad_()
    target = batch.multi_hot(device).double()
    for reduction in ("mean", "sum"):
        expected = F.binary_cross_entropy_with_logits(logits, target, reduction=reduction)
        got = bce_with_logits_csr(logits, batch.labels, reduction=reduction)
        assert got.item() == pytest.approx(expected.item(), rel=1e-9)
    grad_csr, = torch.autograd.grad(bce_with_logits_csr(logits, batch.labels), logits)
    grad_dense, = torch.autograd.grad(F.binary_cross_entropy_with_logits(logits, target), logits)
    assert torch.allclose(grad_csr, grad_dense, atol=1e-12)
    with pytest.raises(InvalidConfigError, match=r"logits of shape \(32, 49\)"):
        bce_with_logits_csr(logits[:, :49], batch.labels)
