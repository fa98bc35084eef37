"""Data loaders: idx and CIFAR parsing on tiny files in the real formats, errors, augmentation,
deterministic loaders, digits, the fetcher (with stand-in apt-get), and the real Fashion-MNIST
when it is on this machine."""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from srigl.app import datasets as data
from srigl.app.cli import main
from srigl.app.datasets import builtin, registry, search
from srigl.app.datasets import fetch as fetching
from srigl.app.datasets import (
    CorruptDatasetError,
    DatasetNotFoundError,
    RandomCropFlip,
    UnknownDatasetError,
    batches,
    epoch_order,
    list_datasets,
    load_dataset,
    make_loaders,
    read_idx,
    shard,
)

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# ---------------------------------------------------------------------------------------------
# Writers for the real on-disk formats, written independently of srigl's readers
# ---------------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08, compress: bool = True) -> Path:
    """Write ``array`` as an idx file: magic 0x0000TTNN, big-endian uint32 dims, big-endian data."""
    big_endian = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[type_code]
    header = struct.pack(">BBBB", 0, 0, type_code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + np.ascontiguousarray(array, dtype=big_endian).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def write_mnist_like(directory: Path, n_train: int = 12, n_test: int = 5, compress: bool = True, seed: int = 0):
    """Four idx files of random 28x28 uint8 images and labels 0..9; returns the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        IDX_NAMES[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        IDX_NAMES[1]: (np.arange(n_train) % 10).astype(np.uint8),
        IDX_NAMES[2]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        IDX_NAMES[3]: ((np.arange(n_test) * 3) % 10).astype(np.uint8),
    }
    for stem, array in arrays.items():
        write_idx(directory / (f"{stem}.gz" if compress else stem), array, compress=compress)
    return arrays


class Python2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 byte strings, as in the real CIFAR batches (pickled by
    Python 2), which Python 3 reads back as bytes with encoding="bytes"."""

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    def save_str(self, obj: str) -> None:
        self.save_bytes(obj.encode("latin-1"))

    dispatch = {**pickle._Pickler.dispatch, bytes: save_bytes, str: save_str}


def dump_batch(batch: dict, path: Path, python2: bool = True) -> None:
    with path.open("wb") as file:
        (Python2Pickler(file, protocol=2) if python2 else pickle.Pickler(file, protocol=2)).dump(batch)


def write_cifar(directory: Path, per_batch: int = 3, seed: int = 0, python2: bool = True) -> dict[str, np.ndarray]:
    """CIFAR-10 python batches: pickled dicts with b"data" (N, 3072) uint8 and b"labels" list."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for stem in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pixels = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, per_batch)]
        batch = {b"batch_label": stem.encode(), b"labels": labels, b"data": pixels, b"filenames": [b"x.png"] * per_batch}
        dump_batch(batch, directory / stem, python2)
        written[stem] = pixels
        written[stem + "/labels"] = np.array(labels)
    dump_batch({b"label_names": [b"airplane"] * 10, b"num_cases_per_batch": per_batch}, directory / "batches.meta", python2)
    return written


def debian_dir(root: Path) -> Path:
    """Stand-in for /usr/share/datasets/fashion-mnist inside an ``isolated`` test."""
    return root / "debian" / "fashion-mnist"


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """Search path limited to tmp_path: no env var, no real Debian files, no checkout data/,
    and the working directory (hence ./data) is tmp_path."""
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    entry = registry.dataset_entry("fashion-mnist")
    files = dataclasses.replace(entry.files, system_dirs=(debian_dir(tmp_path),))
    # Patched where they live: the registry's table and the search module's checkout lookup.
    monkeypatch.setitem(registry._DATASETS, "fashion-mnist", dataclasses.replace(entry, files=files))
    monkeypatch.setattr(search, "_checkout_data_dir", lambda: None)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ---------------------------------------------------------------------------------------------
# idx parser
# ---------------------------------------------------------------------------------------------


def test_read_idx_golden_bytes(tmp_path):
    # magic 0x00000C01: int32, one dimension of 3; big-endian 1, 256, -2.
    raw = bytes.fromhex("00000c01" "00000003" "00000001" "00000100" "fffffffe")
    (tmp_path / "a").write_bytes(raw)
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw))
    for name in ("a", "a.gz"):
        array = read_idx(tmp_path / name)
        assert array.dtype == np.int32 and array.dtype.isnative
        np.testing.assert_array_equal(array, [1, 256, -2])


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_uint8_images(tmp_path, compress):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    array = read_idx(write_idx(tmp_path / "img", images, compress=compress))
    assert array.shape == (2, 3, 4) and array.dtype == np.uint8
    np.testing.assert_array_equal(array, images)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    type_code=st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E]),
    compress=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_read_idx_round_trips_every_type(tmp_path_factory, shape, type_code, compress, seed):
    native = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.int16, 0x0C: np.int32, 0x0D: np.float32, 0x0E: np.float64}
    rng = np.random.default_rng(seed)
    array = (rng.standard_normal(shape) * 100).astype(native[type_code])
    path = write_idx(tmp_path_factory.mktemp("idx") / "x", array, type_code, compress)
    back = read_idx(path)
    assert back.shape == tuple(shape) and back.dtype == native[type_code]
    np.testing.assert_array_equal(back, array)


def test_read_idx_bad_magic_names_file_and_magic(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(struct.pack(">I", 0x12345678) + bytes(16))
    with pytest.raises(CorruptDatasetError, match="0x12345678") as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_read_idx_truncated_payload_reports_sizes(tmp_path):
    path = write_idx(tmp_path / "x.gz", np.zeros((2, 28, 28), np.uint8))
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(CorruptDatasetError, match=r"\(2, 28, 28\) = 1568 data bytes.*holds 1558"):
        read_idx(path)


def test_read_idx_truncated_header_and_empty_file(tmp_path):
    (tmp_path / "short").write_bytes(bytes.fromhex("00000803" "00000002"))
    with pytest.raises(CorruptDatasetError, match="truncated header, 8 bytes but 3 dimensions need 16"):
        read_idx(tmp_path / "short")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(CorruptDatasetError, match="0 bytes"):
        read_idx(tmp_path / "empty")


def test_read_idx_truncated_gzip_stream(tmp_path):
    path = write_idx(tmp_path / "x.gz", np.arange(5000, dtype=np.uint8).reshape(50, 100) % 7)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CorruptDatasetError, match="gzip stream is damaged or truncated") as info:
        read_idx(path)
    assert str(path) in str(info.value)


# ---------------------------------------------------------------------------------------------
# MNIST-like loaders and the search path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fashion-mnist", "mnist"])
def test_idx_dataset_parses_shapes_labels_values(isolated, name):
    arrays = write_mnist_like(isolated / "d" / name)
    train, test, info = load_dataset(name, isolated / "d")
    assert (len(train), len(test)) == (12, 5)
    image, label = train[3]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert label.dtype == torch.int64 and int(label) == 3
    raw = torch.from_numpy(arrays[IDX_NAMES[0]][3].astype(np.float32))
    expected = (raw / 255 - info.mean[0]) / info.std[0]
    torch.testing.assert_close(image[0], expected)
    np.testing.assert_array_equal(test.labels.numpy(), arrays[IDX_NAMES[3]])


def test_uncompressed_files_in_torchvision_layout(isolated):
    arrays = write_mnist_like(isolated / "d" / "MNIST" / "raw", compress=False)
    train, _, _ = load_dataset("mnist", isolated / "d")
    np.testing.assert_array_equal(train.images[:, 0].numpy(), arrays[IDX_NAMES[0]])


def test_missing_files_list_every_place_and_how_to_get_them(isolated):
    partial = isolated / "mine" / "fashion-mnist"
    write_mnist_like(partial)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist", isolated / "mine")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    expected_dirs = [partial, isolated / "mine" / "FashionMNIST" / "raw", debian_dir(isolated), isolated / "data" / "fashion-mnist"]
    for directory in expected_dirs:
        assert str(directory) in message
    assert "missing t10k-labels-idx1-ubyte" in message
    assert f"looked in {len(data.search_dirs('fashion-mnist', isolated / 'mine'))} places" in message
    assert "make data" in message and "srigl data fetch fashion-mnist" in message


def test_corrupt_file_is_reported_not_skipped(isolated):
    # A damaged copy first on the search path must fail loudly, not fall through to another copy.
    write_mnist_like(isolated / "data" / "mnist")
    write_mnist_like(isolated / "mine" / "mnist")
    bad = isolated / "mine" / "mnist" / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 5))
    with pytest.raises(CorruptDatasetError) as info:
        load_dataset("mnist", isolated / "mine")
    assert str(bad) in str(info.value)


def test_label_count_mismatch(isolated):
    directory = isolated / "d" / "mnist"
    write_mnist_like(directory)
    write_idx(directory / "train-labels-idx1-ubyte.gz", np.zeros(11, np.uint8))
    with pytest.raises(CorruptDatasetError, match="holds 11 labels but .* holds 12 images"):
        load_dataset("mnist", isolated / "d")


def test_wrong_image_size_or_label_range(isolated):
    directory = isolated / "d" / "mnist"
    write_mnist_like(directory)
    write_idx(directory / "t10k-labels-idx1-ubyte.gz", np.array([0, 1, 2, 3, 10], np.uint8))
    with pytest.raises(CorruptDatasetError, match=r"label 10 outside 0\.\.9"):
        load_dataset("mnist", isolated / "d")
    write_mnist_like(directory)
    write_idx(directory / "t10k-images-idx3-ubyte.gz", np.zeros((5, 32, 32), np.uint8))
    with pytest.raises(CorruptDatasetError, match=r"\(N, 28, 28\).*\(5, 32, 32\)"):
        load_dataset("mnist", isolated / "d")


def test_search_order_data_dir_then_env_then_debian_then_project(isolated, monkeypatch):
    for root, n_train in (("arg", 11), ("env", 12), ("debian", 13), ("data", 14)):
        directory = debian_dir(isolated) if root == "debian" else isolated / root / "fashion-mnist"
        write_mnist_like(directory, n_train=n_train)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(isolated / "env"))
    assert len(load_dataset("fashion-mnist", isolated / "arg")[0]) == 11
    assert len(load_dataset("fashion-mnist")[0]) == 12
    monkeypatch.delenv(data.DATA_DIR_ENV)
    assert len(load_dataset("fashion-mnist")[0]) == 13
    shutil.rmtree(debian_dir(isolated))
    assert len(load_dataset("fashion-mnist")[0]) == 14  # ./data, relative to the working directory


def test_search_dirs_are_deduplicated(isolated, monkeypatch):
    monkeypatch.setenv(data.DATA_DIR_ENV, "data")
    dirs = data.search_dirs("mnist", "data")
    assert dirs == [isolated / "data" / "mnist", isolated / "data" / "MNIST" / "raw"]


# ---------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("python2", [True, False], ids=["python2-pickles", "python3-pickles"])
def test_cifar10_parses_pickle_batches(isolated, python2):
    written = write_cifar(isolated / "d" / "cifar-10-batches-py", python2=python2)
    train, test, info = load_dataset("cifar10", isolated / "d", augment=False)
    assert (len(train), len(test)) == (15, 3)
    assert train.images.shape == (15, 3, 32, 32) and train.images.dtype == torch.uint8
    # Row layout: 1024 red values, 1024 green, 1024 blue, each plane row-major.
    row = written["data_batch_2"][1]
    image = train.images[3 + 1]
    assert int(image[0, 0, 0]) == row[0] and int(image[0, 0, 1]) == row[1] and int(image[0, 1, 0]) == row[32]
    assert int(image[1, 0, 0]) == row[1024] and int(image[2, 31, 31]) == row[3071]
    np.testing.assert_array_equal(test.labels.numpy(), written["test_batch/labels"])
    x, y = test[0]
    mean, std = torch.tensor(info.mean).view(3, 1, 1), torch.tensor(info.std).view(3, 1, 1)
    torch.testing.assert_close(x, (test.images[0].float() / 255 - mean) / std)
    assert int(y) == written["test_batch/labels"][0]


def test_cifar10_found_under_cifar10_folder(isolated):
    write_cifar(isolated / "d" / "cifar10" / "cifar-10-batches-py")
    assert len(load_dataset("cifar10", isolated / "d")[1]) == 3


def test_cifar10_missing_batch_says_where_to_download(isolated):
    directory = isolated / "d" / "cifar-10-batches-py"
    write_cifar(directory)
    (directory / "data_batch_4").unlink()
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar10", isolated / "d")
    message = str(info.value)
    assert "missing data_batch_4" in message and str(directory) in message
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in message and "cifar-10-python.tar.gz" in message


def test_cifar10_truncated_and_wrong_shape_batches(isolated):
    directory = isolated / "d" / "cifar-10-batches-py"
    write_cifar(directory)
    batch = directory / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:100])
    with pytest.raises(CorruptDatasetError, match="not a readable CIFAR python batch") as info:
        load_dataset("cifar10", isolated / "d")
    assert str(batch) in str(info.value)
    with batch.open("wb") as file:
        pickle.dump({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, file, protocol=2)
    with pytest.raises(CorruptDatasetError, match=r"\(N, 3072\).*\(2, 3000\)"):
        load_dataset("cifar10", isolated / "d")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_cifar10_refuses_pickles_that_call_functions(isolated):
    directory = isolated / "d" / "cifar-10-batches-py"
    write_cifar(directory)
    with (directory / "test_batch").open("wb") as file:
        pickle.dump({b"data": _Exploit(), b"labels": []}, file, protocol=2)
    with pytest.raises(CorruptDatasetError, match="refusing to load global"):
        load_dataset("cifar10", isolated / "d")


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------


def test_flip_flips_and_no_padding_keeps_image():
    images = torch.rand(4, 3, 8, 8)
    always_flip = RandomCropFlip(padding=0, flip_probability=1.0)
    torch.testing.assert_close(always_flip(images), images.flip(-1), rtol=0, atol=0)
    torch.testing.assert_close(always_flip(images[0]), images[0].flip(-1), rtol=0, atol=0)
    never = RandomCropFlip(padding=0, flip_probability=0.0)
    torch.testing.assert_close(never(images), images, rtol=0, atol=0)


def test_crop_is_a_window_of_the_zero_padded_image():
    images = torch.rand(16, 2, 6, 6) + 1  # nonzero, so padding shows as 0
    out = RandomCropFlip(padding=2)(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))  # (N, C, 10, 10)
    windows = [padded[:, :, y : y + 6, x : x + 6] for y in range(5) for x in range(5)]
    windows += [w.flip(-1) for w in windows]
    for i in range(16):
        assert any(torch.equal(out[i], w[i]) for w in windows)
    assert (out == 0).any(), "some crop should include padding"


def test_augmentation_is_deterministic_per_generator_and_matches_batch_of_one():
    images = torch.rand(32, 3, 32, 32)
    aug = RandomCropFlip()
    a = aug(images, torch.Generator().manual_seed(7))
    b = aug(images, torch.Generator().manual_seed(7))
    c = aug(images, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    for seed in range(10):
        single = aug(images[0], torch.Generator().manual_seed(seed))
        batch_of_one = aug(images[:1], torch.Generator().manual_seed(seed))
        assert single.shape == (3, 32, 32) and torch.equal(single, batch_of_one[0])


def test_augmentation_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"got shape \(32, 32\)"):
        RandomCropFlip()(torch.zeros(32, 32))


# ---------------------------------------------------------------------------------------------
# Loaders
# ---------------------------------------------------------------------------------------------


def _epoch(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_make_loaders_order_and_augmentation_follow_the_seed(isolated):
    write_cifar(isolated / "d" / "cifar-10-batches-py", per_batch=4)
    kwargs = dict(data_dir=isolated / "d", batch_size=6)
    train_a, test_a, info = make_loaders("cifar10", seed=3, **kwargs)
    train_b, _, _ = make_loaders("cifar10", seed=3, **kwargs)
    train_c, _, _ = make_loaders("cifar10", seed=4, **kwargs)
    assert info.name == "cifar10"
    epoch_a = _epoch(train_a)
    assert [len(y) for _, y in epoch_a] == [6, 6, 6, 2]
    assert epoch_a[0][0].shape == (6, 3, 32, 32) and epoch_a[0][1].dtype == torch.int64
    assert _same(epoch_a, _epoch(train_b))
    assert not _same(epoch_a, _epoch(train_c))
    assert not _same(epoch_a, _epoch(train_a)), "a second epoch should be reshuffled"
    # The test loader is in file order and never augmented.
    first, second = _epoch(test_a), _epoch(test_a)
    assert _same(first, second) and torch.equal(first[0][1], test_a.dataset.labels[:6])


def test_generator_state_replays_an_epoch(isolated):
    write_cifar(isolated / "d" / "cifar-10-batches-py", per_batch=4)
    train, _, _ = make_loaders("cifar10", data_dir=isolated / "d", batch_size=8, seed=0)
    _epoch(train)
    state = train.sampler.generator.get_state()
    second = _epoch(train)
    train.sampler.generator.set_state(state)
    assert _same(second, _epoch(train))


def test_results_do_not_depend_on_num_workers(isolated):
    write_cifar(isolated / "d" / "cifar-10-batches-py", per_batch=2)
    serial, _, _ = make_loaders("cifar10", data_dir=isolated / "d", batch_size=4, seed=1)
    parallel, _, _ = make_loaders("cifar10", data_dir=isolated / "d", batch_size=4, seed=1, num_workers=2)
    assert _same(_epoch(serial), _epoch(parallel))


def test_limits_take_the_first_items(isolated):
    write_mnist_like(isolated / "d" / "mnist", n_train=12, n_test=5)
    train, test, _ = make_loaders("mnist", isolated / "d", batch_size=100, limit_train=7, limit_test=50)
    assert len(train.dataset) == 7 and len(test.dataset) == 5
    labels = torch.cat([y for _, y in train])
    assert sorted(labels.tolist()) == list(range(7))
    with pytest.raises(ValueError, match="at least 1 item, got 0"):
        make_loaders("mnist", isolated / "d", limit_train=0)


def test_digits_are_upsampled_to_28x28():
    train, test, info = load_dataset("digits")
    assert (len(train), len(test)) == (1797 - builtin.DIGITS_TEST_SIZE, builtin.DIGITS_TEST_SIZE)
    assert train.images.shape == (1437, 1, 28, 28)
    assert set(test.labels.tolist()) == set(range(10))
    x, _ = make_loaders("digits", batch_size=2000)[0].__iter__().__next__()
    assert x.shape == (1437, 1, 28, 28)
    # The recorded mean/std normalise the training set.
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01
    assert info.input_shape == (1, 28, 28)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_datasets())
def test_every_dataset_describes_a_shape_every_model_takes(name):
    info = data.dataset_info(name)
    assert info.name == name
    assert info.input_shape in {(1, 28, 28), (3, 32, 32)}
    assert len(info.mean) == len(info.std) == info.in_channels
    assert len(info.class_names) == info.num_classes


@pytest.mark.parametrize("name", [n for n in list_datasets() if data.search_dirs(n)])
def test_every_missing_dataset_lists_where_srigl_looked_and_how_to_get_it(isolated, name):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, isolated / "empty")
    message = str(info.value)
    for directory in data.search_dirs(name, isolated / "empty"):
        assert f"{directory} (no such directory)" in message
    how_to = message.splitlines()[-1]
    assert str(isolated / "empty") in how_to and "{target}" not in how_to


def test_unknown_dataset_lists_choices():
    with pytest.raises(UnknownDatasetError) as info:
        load_dataset("imagenet")
    for name in list_datasets():
        assert name in str(info.value)


# ------------------------------------------------------------------------------------------ data order
def test_epoch_order_is_a_pure_function_of_seed_and_epoch():
    assert epoch_order(50, 3, 7) == epoch_order(50, 3, 7)
    assert epoch_order(50, 3, 7) != epoch_order(50, 3, 8)
    assert epoch_order(50, 3, 7) != epoch_order(50, 4, 7)
    assert sorted(i for i, _ in epoch_order(50, 0, 0)) == list(range(50))


def test_shard_splits_like_a_distributed_sampler():
    order = list(range(10))
    parts = [shard(order, rank, 3) for rank in range(3)]
    assert parts == [[0, 3, 6, 9], [1, 4, 7, 0], [2, 5, 8, 1]]  # padded by wrapping to 12
    assert shard(order, 0, 1) is order


def test_fast_batches_equal_the_data_loader():
    from torch.utils.data import DataLoader

    train_set, _, _ = load_dataset("digits")
    subset = train_set.head(300)
    order = epoch_order(len(subset), 0, 1)
    fast = list(batches(subset, order, 64))
    slow = list(DataLoader(subset, batch_size=64, sampler=order))
    assert len(fast) == len(slow) == 5
    for (x_fast, y_fast), (x_slow, y_slow) in zip(fast, slow):
        assert torch.equal(x_fast, x_slow) and torch.equal(y_fast, y_slow)


# ---------------------------------------------------------------------------------------------
# Fetcher
# ---------------------------------------------------------------------------------------------


def test_fetch_does_nothing_when_present(isolated, monkeypatch):
    write_mnist_like(debian_dir(isolated))
    monkeypatch.setattr(fetching, "_run", lambda *a, **k: pytest.fail("fetch must not run commands"))
    lines = []
    assert fetching.fetch("fashion-mnist", isolated / "data", log=lines.append) == debian_dir(isolated)
    assert lines == [f"fashion-mnist already present in {debian_dir(isolated)}; nothing to do"]
    assert not (isolated / "data").exists()


def _fake_apt(tmp_path: Path, fail_until_update: bool) -> Path:
    """A .deb laid out like dataset-fashion-mnist, and an apt-get stand-in that 'downloads' it."""
    package = tmp_path / "pkg"
    write_mnist_like(package / "usr" / "share" / "datasets" / "fashion-mnist", n_train=20, n_test=10)
    (package / "DEBIAN").mkdir()
    (package / "DEBIAN" / "control").write_text(
        "Package: dataset-fashion-mnist\nVersion: 0.0-1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: t\n"
    )
    deb = tmp_path / "dataset-fashion-mnist_0.0-1_all.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(package), str(deb)], check=True, capture_output=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "updated"
    script = f"""#!/bin/sh
echo "$@" >> {tmp_path / 'apt.log'}
if [ "$1" = update ]; then touch {marker}; exit 0; fi
if [ "$1" = download ]; then
  if {'[ ! -e ' + str(marker) + ' ]' if fail_until_update else 'false'}; then
    echo "E: Unable to locate package $2" >&2; exit 100
  fi
  cp {deb} .; exit 0
fi
exit 1
"""
    apt = bin_dir / "apt-get"
    apt.write_text(script)
    apt.chmod(apt.stat().st_mode | stat.S_IXUSR)
    return bin_dir


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb not installed (not a Debian-like system)")
@pytest.mark.parametrize("fail_until_update", [False, True])
def test_fetch_unpacks_the_debian_package(isolated, monkeypatch, fail_until_update):
    bin_dir = _fake_apt(isolated, fail_until_update)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(os, "geteuid", lambda: 0)  # the refresh-and-retry path is for root only
    lines = []
    target = fetching.fetch("fashion-mnist", isolated / "out", log=lines.append)
    assert target == isolated / "out" / "fashion-mnist"
    assert sorted(p.name for p in target.iterdir()) == sorted(f"{stem}.gz" for stem in IDX_NAMES)
    train, test, _ = load_dataset("fashion-mnist", isolated / "out")
    assert (len(train), len(test)) == (20, 10)
    calls = (isolated / "apt.log").read_text().splitlines()
    expected = ["download dataset-fashion-mnist"]
    if fail_until_update:
        expected = ["download dataset-fashion-mnist", "update", "download dataset-fashion-mnist"]
    assert calls == expected
    assert any("apt-get download" in line for line in lines) and lines[-1] == f"fashion-mnist ready in {target}"
    # Idempotent: a second fetch finds the files and runs nothing.
    fetching.fetch("fashion-mnist", isolated / "out", log=lines.append)
    assert (isolated / "apt.log").read_text().splitlines() == expected
    assert lines[-1].endswith("nothing to do")


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="dpkg-deb not installed (not a Debian-like system)")
def test_fetch_without_package_lists_and_without_root_says_what_to_do(isolated, monkeypatch):
    bin_dir = _fake_apt(isolated, fail_until_update=True)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(DatasetNotFoundError) as info:
        fetching.fetch("fashion-mnist", isolated / "out", log=lambda line: None)
    message = str(info.value)
    assert "apt-get download dataset-fashion-mnist failed (exit 100)" in message
    assert "Unable to locate package" in message and "sudo apt-get update" in message
    assert str(isolated / "out" / "fashion-mnist") in message
    assert (isolated / "apt.log").read_text().splitlines() == ["download dataset-fashion-mnist"]
    assert not any((isolated / "out" / "fashion-mnist").glob("*.gz"))


def test_cli_reports_missing_data_and_exits_1(isolated, capsys):
    assert main(["data", "fetch", "cifar10", "--data-dir", str(isolated / "d")]) == 1
    assert "cifar-10-python.tar.gz" in capsys.readouterr().err
    assert main(["data", "fetch", "digits"]) == 0
    assert "scikit-learn" in capsys.readouterr().out
    write_mnist_like(isolated / "d" / "mnist")
    assert main(["data", "where", "mnist", "--data-dir", str(isolated / "d")]) == 0
    assert f"found: {isolated / 'd' / 'mnist'}" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# The real Fashion-MNIST, when this machine has it (`make data` fetches it before `make test`)
# ---------------------------------------------------------------------------------------------


def _real_fashion_mnist_dir() -> Path | None:
    try:
        return data.find_dataset_dir("fashion-mnist")
    except DatasetNotFoundError:
        return None


@pytest.mark.skipif(
    _real_fashion_mnist_dir() is None,
    reason="Fashion-MNIST not on the search path; run `make data` "
    "(srigl data fetch fashion-mnist --data-dir data)",
)
def test_real_fashion_mnist():
    train, test, info = load_dataset("fashion-mnist")
    assert (len(train), len(test)) == (60000, 10000)
    assert train.images.shape == (60000, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.bincount().tolist() == [6000] * 10
    assert test.labels.bincount().tolist() == [1000] * 10
    pixels = train.images.float() / 255
    assert abs(float(pixels.mean()) - info.mean[0]) < 1e-3 and abs(float(pixels.std()) - info.std[0]) < 1e-3


def test_read_idx_gzip_bomb_is_refused_without_inflating_it(tmp_path):
    """Red-team L15: a small .gz whose stream holds far more than its idx header promises was inflated
    whole (13 MB -> 3 GB) before the header was checked."""
    import tracemalloc
    import zlib

    header = struct.pack(">IIII", 0x00000803, 10, 28, 28)  # promises 10 * 28 * 28 = 7840 bytes
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: a gzip stream
    zeros = bytes(1 << 20)
    parts = [compressor.compress(header)] + [compressor.compress(zeros) for _ in range(64)] + [compressor.flush()]
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(b"".join(parts))  # about 64 KB holding 64 MB
    tracemalloc.start()
    try:
        with pytest.raises(CorruptDatasetError, match=r"promises shape \(10, 28, 28\) = 7840 data bytes, but the file "
                                                      r"holds more than 7840 \(reading stopped there\) once decompressed"):
            read_idx(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB while refusing a {path.stat().st_size} byte file"


def test_read_idx_header_promising_more_than_any_file_is_refused(tmp_path):
    path = tmp_path / "huge"
    path.write_bytes(struct.pack(">IIIII", 0x00000804, 2**32 - 1, 2**32 - 1, 2**32 - 1, 2**32 - 1) + bytes(8))
    with pytest.raises(CorruptDatasetError, match=r"= 340282366604025813516997721482669850625 data bytes, but the file holds 8"):
        read_idx(path)
