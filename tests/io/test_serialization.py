"""safetensors save/load of condensed models: round trips, size, skeletons, damaged files."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from srigl.condensed import CondensedConv2d, CondensedLinear, CondensedMultiheadAttention, condense
from srigl.io.serialization import (
    SERIALIZABLE,
    CorruptFileError,
    SkeletonMismatchError,
    SkeletonRequiredError,
    load_condensed,
    read_metadata,
    save_condensed,
)
from sparse_models import SmallCNN, _AttentionBlock, _mask_attention, assert_same_outputs, sparsify


def _condensed_linear():
    return CondensedLinear.from_dense(sparsify(nn.Linear(9, 6)))


def _condensed_conv():
    return CondensedConv2d.from_dense(sparsify(nn.Conv2d(4, 6, 3, padding="same", groups=2)))


# Per registered name: (factory, input shape or None for containers checked through their children).
EXAMPLES = {
    "Sequential": (lambda: nn.Sequential(nn.Linear(4, 3), nn.ReLU()), (2, 4)),
    "ModuleList": (lambda: nn.ModuleList([nn.Linear(2, 2)]), None),
    "ModuleDict": (lambda: nn.ModuleDict({"a": nn.Linear(2, 2)}), None),
    "Linear": (lambda: nn.Linear(5, 3, bias=False), (2, 5)),
    "Conv2d": (lambda: nn.Conv2d(2, 4, (3, 1), stride=2, padding=(1, 0), groups=2, padding_mode="reflect"), (1, 2, 6, 5)),
    "BatchNorm1d": (lambda: sparsify(nn.Sequential(nn.BatchNorm1d(3, eps=1e-3, momentum=None)))[0], (4, 3)),
    "BatchNorm2d": (lambda: sparsify(nn.Sequential(nn.BatchNorm2d(3, affine=False)))[0], (2, 3, 2, 2)),
    "LayerNorm": (lambda: nn.LayerNorm((3, 4), eps=1e-4, bias=False), (2, 3, 4)),
    "Identity": (nn.Identity, (2, 3)),
    "Flatten": (lambda: nn.Flatten(0, 1), (2, 3, 4)),
    "ReLU": (nn.ReLU, (5,)),
    "ReLU6": (nn.ReLU6, (5,)),
    "LeakyReLU": (lambda: nn.LeakyReLU(0.3), (5,)),
    "GELU": (lambda: nn.GELU("tanh"), (5,)),
    "SiLU": (nn.SiLU, (5,)),
    "Tanh": (nn.Tanh, (5,)),
    "Sigmoid": (nn.Sigmoid, (5,)),
    "Softmax": (lambda: nn.Softmax(dim=0), (3, 2)),
    "Dropout": (lambda: nn.Dropout(0.25), (5,)),
    "MaxPool2d": (lambda: nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True), (1, 2, 7, 7)),
    "AvgPool2d": (lambda: nn.AvgPool2d(2, count_include_pad=False, padding=1), (1, 2, 5, 5)),
    "AdaptiveAvgPool2d": (lambda: nn.AdaptiveAvgPool2d((2, 3)), (1, 2, 5, 7)),
    "CondensedLinear": (_condensed_linear, (3, 9)),
    "CondensedConv2d": (_condensed_conv, (2, 4, 5, 5)),
    # Called as attn(q, k, v): its outputs are checked by test_condensed_attention_round_trip.
    "CondensedMultiheadAttention": (lambda: _condensed_attention_block().attn, None),
    "NonDynamicallyQuantizableLinear": (lambda: nn.modules.linear.NonDynamicallyQuantizableLinear(5, 3), (2, 5)),
}


def _condensed_attention_block():
    torch.manual_seed(0)
    model = _AttentionBlock(dim=16, heads=4).eval()
    masks = _mask_attention(model, torch.Generator().manual_seed(5))
    return condense(model, masks)


def test_condensed_attention_round_trip(tmp_path):
    condensed = _condensed_attention_block()
    assert type(condensed.attn) is CondensedMultiheadAttention
    path = save_condensed(condensed, tmp_path / "attn.safetensors")
    with pytest.raises(SkeletonRequiredError, match="_AttentionBlock"):
        load_condensed(path)
    loaded = load_condensed(path, model=_AttentionBlock(dim=16, heads=4))  # a dense skeleton
    assert type(loaded.attn) is CondensedMultiheadAttention and type(loaded.attn.in_proj) is CondensedLinear
    assert loaded.attn.num_heads == 4 and loaded.attn.batch_first
    assert_same_outputs(condensed, loaded.eval(), torch.randn(3, 6, 16))


def test_every_serializable_type_has_an_example():
    assert set(EXAMPLES) == set(SERIALIZABLE)


@pytest.mark.parametrize("name", sorted(SERIALIZABLE))
def test_registered_type_round_trips(name, tmp_path):
    factory, input_shape = EXAMPLES[name]
    torch.manual_seed(0)
    module = factory().eval()
    assert type(module) is SERIALIZABLE[name][0]
    loaded = load_condensed(save_condensed(module, tmp_path / "m.safetensors"))
    assert type(loaded) is type(module) and repr(loaded) == repr(module)
    for key, tensor in module.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor) and loaded.state_dict()[key].dtype == tensor.dtype
    if input_shape is not None:
        assert_same_outputs(module, loaded, torch.randn(input_shape))


def test_condensed_cnn_round_trip_without_python_objects(tmp_path):
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 4),
    ))
    condensed, report = condense(model, return_report=True)
    assert report["removals"]
    path = save_condensed(condensed, tmp_path / "cnn.safetensors", metadata={"model": "cnn", "sparsity": 0.7})
    loaded = load_condensed(path)
    assert not loaded.training
    assert_same_outputs(model, loaded, torch.randn(2, 3, 9, 9))
    assert read_metadata(path) == {"model": "cnn", "sparsity": "0.7"}
    assert not list(tmp_path.glob(".*.tmp"))  # the temporary file was renamed, not left behind


def test_file_size_is_proportional_to_density(tmp_path):
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)),
                     density=0.1, ablated=0.0)
    dense_size = save_condensed(model, tmp_path / "dense.safetensors").stat().st_size
    condensed = condense(model)
    sparse_size = save_condensed(condensed, tmp_path / "sparse.safetensors").stat().st_size
    # 10 % of the weights at 4 (value) + 2 (int16 index) bytes each, against 4 bytes per dense weight.
    assert sparse_size <= 0.2 * dense_size
    assert sparse_size >= 0.1 * dense_size


def test_custom_model_needs_a_skeleton(tmp_path):
    torch.manual_seed(0)
    model = sparsify(SmallCNN(), ablated=0.3)
    condensed = condense(model)
    path = save_condensed(condensed, tmp_path / "cnn.safetensors")
    with pytest.raises(SkeletonRequiredError, match="sparse_models.SmallCNN"):
        load_condensed(path)
    loaded = load_condensed(path, model=SmallCNN())  # fresh weights, original (dense) shapes
    assert type(loaded.features[0]) is CondensedConv2d
    assert_same_outputs(model, loaded, torch.randn(2, 3, 17, 17))
    with pytest.raises(SkeletonMismatchError):
        load_condensed(path, model=nn.Sequential())


def _flip(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda p: p.write_bytes(p.read_bytes()[:-7]), None),  # truncated tensor data
        (lambda p: p.write_bytes(p.read_bytes()[:100]), "header"),  # truncated header
        (lambda p: p.write_bytes(b"\x01\x02"), "too short"),
        (lambda p: _flip(p, 10), None),  # inside the JSON header
        (lambda p: _flip(p, len(p.read_bytes()) - 3), "checksum"),  # one byte of tensor data
    ],
    ids=["truncated-data", "truncated-header", "tiny", "flipped-header", "flipped-data"],
)
def test_damaged_file_raises_corrupt_file_error(tmp_path, damage, match):
    model = copy.deepcopy(_condensed_linear())
    path = save_condensed(nn.Sequential(model, nn.ReLU()), tmp_path / "m.safetensors")
    damage(path)
    with pytest.raises(CorruptFileError, match=match):
        load_condensed(path)


def test_plain_safetensors_file_is_not_mistaken_for_a_condensed_model(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(CorruptFileError, match="not written by save_condensed"):
        load_condensed(tmp_path / "plain.safetensors")


# (model name, create_model arguments): small widths keep the test fast.
REGISTRY_CASES = {
    "mlp": dict(in_channels=1, image_size=28),
    "lenet5": dict(in_channels=1, image_size=28),
    "resnet18": dict(in_channels=3, image_size=16, width=0.125),
    "wrn-22-2": dict(in_channels=3, image_size=16),
    "vit-tiny": dict(in_channels=1, image_size=28),
}


@pytest.mark.parametrize("model_name", list(REGISTRY_CASES))
def test_every_registry_model_round_trips_with_a_skeleton(model_name, tmp_path):
    # Unregistered blocks (ResNet's BasicBlock, the ViT's TransformerBlock) sit inside registered
    # containers (nn.Sequential), so loading must follow the skeleton below registered nodes too.
    import srigl
    from srigl.app.models import create_model

    kwargs = REGISTRY_CASES[model_name]
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10, **kwargs)
    srigl.SRigL(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.9, total_steps=10)
    model.eval()
    condensed = condense(model)
    path = save_condensed(condensed, tmp_path / f"{model_name}.safetensors")
    torch.manual_seed(1)  # the skeleton's own weights must not matter
    loaded = load_condensed(path, model=create_model(model_name, num_classes=10, **kwargs)).eval()
    x = torch.randn(2, kwargs["in_channels"], kwargs["image_size"], kwargs["image_size"])
    assert_same_outputs(model, loaded, x)
    assert any(isinstance(m, (CondensedLinear, CondensedConv2d)) for m in loaded.modules())
    if model_name == "vit-tiny":
        assert isinstance(loaded.blocks[0].attn, CondensedMultiheadAttention)


# ---------------------------------------------------------------------- crafted files (#14)
def write_crafted(path, spec, tensors, *, format_=None, spec_text=None):
    """A file as save_condensed would write it for ``spec`` and ``tensors``, with a valid checksum
    (anyone can recompute it), so that only the content under test is wrong."""
    import json

    from safetensors.torch import save

    from srigl.io import serialization

    metadata = {"srigl.format": format_ or serialization.FORMAT,
                "srigl.spec": spec_text if spec_text is not None else json.dumps(spec)}
    legacy = metadata["srigl.format"] == "srigl-condensed/1"
    metadata["srigl.sha256"] = serialization._digest(tensors, None if legacy else metadata)
    path.write_bytes(save(tensors, metadata=metadata))
    return path


def _linear_spec(in_features=64, out_features=8, fan_in=4, n_active=8, **extra):
    args = {"in_features": in_features, "out_features": out_features, "fan_in": fan_in, "n_active": n_active,
            "bias": True, "index_dtype": {"dtype": "int16"}, **extra}
    return {"type": "CondensedLinear", "args": args, "children": {}}


def _linear_tensors(active_rows=(0, 1, 2, 3, 4, 5, 6, 7), index=0):
    n = len(active_rows)
    return {"values": torch.ones(n, 4), "indices": torch.full((n, 4), index, dtype=torch.int16),
            "active_rows": torch.tensor(active_rows, dtype=torch.int64), "bias": torch.zeros(8)}


_MEMORY_BOMB = """
import resource, sys, time
from srigl.io.serialization import CorruptFileError, load_condensed

# The spec declares 14.4 GB + 64 GB: refuse such allocations outright rather than let the machine swap.
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 2 * 2**30, resource.RLIM_INFINITY))
before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
try:
    load_condensed(sys.argv[1])
except CorruptFileError as error:
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    print(f"refused after {time.perf_counter() - start:.3f} s, peak RSS grew {grown:.1f} MB: {error}")
    sys.exit(0 if grown < 100 else 4)
print("loaded")
sys.exit(3)
"""


def test_tiny_file_declaring_huge_layers_is_refused_before_allocating(tmp_path):
    """Red-team F3: the spec's sizes are compared with the stored tensors before any memory is allocated."""
    import subprocess
    import sys

    spec = {"type": "Sequential", "args": {}, "children": {
        "0": {"type": "Linear", "args": {"in_features": 60000, "out_features": 60000, "bias": False}, "children": {}},
        "1": {"type": "Conv2d", "args": {"in_channels": 4096, "out_channels": 4096, "kernel_size": [31, 31]},
              "children": {}}}}
    path = write_crafted(tmp_path / "bomb.safetensors", spec, {"0.weight": torch.zeros(1)})
    assert path.stat().st_size < 1000
    script = tmp_path / "bomb.py"
    script.write_text(_MEMORY_BOMB)
    done = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "0.weight: spec (60000, 60000), stored (1,)" in done.stdout


def test_flipped_byte_in_the_spec_is_refused(tmp_path):
    """Red-team F9: the checksum covers the module spec (a LeakyReLU slope 0.01 -> 0.91 was loaded silently)."""
    path = save_condensed(nn.Sequential(nn.Linear(8, 16), nn.LeakyReLU(0.01), nn.Linear(16, 4)), tmp_path / "m.safetensors")
    data = bytearray(path.read_bytes())
    at = data.find(b'negative_slope\\": 0.01') + len(b'negative_slope\\": 0.01') - 2
    data[at] = ord("9")
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="does not match the checksum"):
        load_condensed(path)


def test_flipped_byte_in_user_metadata_is_refused(tmp_path):
    path = save_condensed(nn.Linear(2, 2), tmp_path / "m.safetensors", metadata={"model": "mlp"})
    path.write_bytes(path.read_bytes().replace(b'"mlp"', b'"mlq"'))
    with pytest.raises(CorruptFileError, match="does not match the checksum"):
        load_condensed(path)


def test_first_format_file_still_loads_with_a_warning(tmp_path):
    """Files of format 1 (checksum over the tensors only) stay readable; the warning says what is unprotected."""
    import json

    from srigl.io.serialization import _spec

    model = nn.Sequential(nn.Linear(3, 2))
    path = write_crafted(tmp_path / "v1.safetensors", None, dict(model.state_dict()),
                         format_="srigl-condensed/1", spec_text=json.dumps(_spec(model)))
    with pytest.warns(UserWarning, match="checksum does not cover the module spec"):
        loaded = load_condensed(path)
    assert torch.equal(loaded[0].weight, model[0].weight)


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"type": "Linear", "args": {"in_features": 2, "out_features": 2, "dtype": {"dtype": "load"}}, "children": {}},
         r"Linear argument 'dtype': \{'dtype': 'load'\} is not a dtype"),
        (_linear_spec(index_dtype={"dtype": "no_such_attr"}), r"CondensedLinear argument 'index_dtype': .* is not a dtype"),
        ({"type": "Linear", "args": {"in_features": {"x": 1}, "out_features": 2}, "children": {}},
         r"Linear argument 'in_features': \{'x': 1\} is not a dtype"),
        ({"type": "Linear", "args": {"in_features": 2, "out_features": 2, "evil": 1}, "children": {}},
         r"Linear takes no argument 'evil'"),
        ({"type": "Linear", "args": {"in_features": -1, "out_features": 2}, "children": {}},
         r"Linear argument 'in_features' must be an integer >= 0, got -1"),
        ({"type": "Linear", "args": {"in_features": 2.5, "out_features": 2}, "children": {}},
         r"Linear argument 'in_features' must be an integer >= 0, got 2.5"),
        ({"type": "Linear", "args": {"out_features": 2}, "children": {}},
         r"Linear arguments \{'out_features': 2\}: missing a required argument: 'in_features'"),
        ({"type": "CondensedConv2d", "args": {"in_channels": 2, "out_channels": 2, "kernel_size": [1, 1], "fan_in": 1,
                                              "n_active": 2, "groups": 0}, "children": {}},
         r"CondensedConv2d argument 'groups' must be an integer >= 1, got 0"),
        ({"type": "CondensedConv2d", "args": {"in_channels": 3, "out_channels": 2, "kernel_size": [1, 1], "fan_in": 1,
                                              "n_active": 2, "groups": 2}, "children": {}},
         r"cannot build CondensedConv2d from the spec arguments .*must divide by groups=2"),
        ({"type": "CondensedMultiheadAttention", "args": {"embed_dim": 4, "num_heads": 0}, "children": {}},
         r"CondensedMultiheadAttention argument 'num_heads' must be an integer >= 1, got 0"),
        ({"type": "Linear", "args": {"in_features": 2, "out_features": 2}}, r"spec node has no 'children' object"),
        ([1, 2], r"spec node is a list, expected an object"),
        ({"type": "Sequential", "args": {}, "children": {"a.b": {"type": "ReLU", "args": {}, "children": {}}}},
         r"child name 'a.b' is empty or contains a dot"),
        ({"type": None, "children": {}}, r"unregistered module has no 'class' string"),
        ({"type": "Sequential", "args": {}, "children": {"0": {"type": "os.system", "args": {}, "children": {}}}},
         r"0: unknown module type 'os.system'"),
        ({"type": "Sequential", "args": [], "children": {}}, r"Sequential has no 'args' object"),
    ],
    ids=["dtype-torch-load", "index-dtype-unknown", "dict-not-dtype", "unknown-kwarg", "negative-size", "float-size",
         "missing-arg", "groups-0", "groups-not-dividing", "num-heads-0", "no-children", "list-root", "dotted-child",
         "no-class", "unknown-type", "args-not-object"],
)
def test_crafted_spec_arguments_raise_corrupt_file_error_naming_the_argument(tmp_path, spec, match):
    """Red-team L3: each of these escaped as TypeError / KeyError / RuntimeError / ZeroDivisionError."""
    path = write_crafted(tmp_path / "f.safetensors", spec, {"dummy": torch.zeros(1)})
    with pytest.raises(CorruptFileError, match=match):
        load_condensed(path)


@pytest.mark.parametrize(
    "active_rows, index, match",
    [
        ((0, 0, 0, 0), 0, r"active_rows repeats at position 1 \(active_rows\[0\] = 0, active_rows\[1\] = 0\)"),
        ((0, 2, 1, 3), 0, r"active_rows is not ascending at position 2 \(active_rows\[1\] = 2, active_rows\[2\] = 1\)"),
        ((0, 1, 2, 8), 0, r"active_rows must lie in \[0, 8\), got \[0, 8\]"),
        ((-1, 1, 2, 3), 0, r"active_rows must lie in \[0, 8\), got \[-1, 3\]"),
        ((0, 1, 2, 3), -5, r"indices must lie in \[0, 64\); found min -5"),
        ((0, 1, 2, 3), 64, r"indices must lie in \[0, 64\); found min 64 and max 64"),
    ],
    ids=["duplicate-rows", "unsorted-rows", "row-too-large", "negative-row", "negative-index", "index-too-large"],
)
def test_crafted_condensed_storage_is_refused_at_load(tmp_path, active_rows, index, match):
    """Red-team L17: repeated active_rows loaded and ran, silently dropping all but one copy's output."""
    path = write_crafted(tmp_path / "f.safetensors", _linear_spec(n_active=4), _linear_tensors(active_rows, index))
    with pytest.raises(CorruptFileError, match="f.safetensors: the root: " + match):
        load_condensed(path)


def test_condensed_storage_that_disagrees_with_its_spec_is_refused(tmp_path):
    path = write_crafted(tmp_path / "f.safetensors", _linear_spec(n_active=8), _linear_tensors((0, 1, 2, 3)))
    with pytest.raises(CorruptFileError, match=r"values: spec \(8, 4\), stored \(4, 4\)"):
        load_condensed(path)
