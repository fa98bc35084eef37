"""The run configuration (:mod:`srigl.app.config`): the TOML writer (hypothesis round trip through
tomllib), JSON layout, resolution rules and their refusals, and key/type checks of config files."""

from __future__ import annotations

import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from srigl.app.config import TrainConfig, config_from_mapping, dumps_json, dumps_toml, resolve_config, run_name
from srigl.errors import InvalidConfigError


# ------------------------------------------------------------------------------------------ TOML / JSON
_keys = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=8)
_scalars = st.one_of(
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12),
)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(_keys, st.one_of(_scalars, st.lists(st.integers(-5, 5), max_size=4)), max_size=6))
def test_toml_writer_round_trips_through_tomllib(values):
    assert tomllib.loads(dumps_toml(values)) == values


def test_toml_writer_tables_and_none():
    text = dumps_toml({"a": 1, "skip": None, "t": {"x": 0.5, "y": "q\"uote"}})
    assert tomllib.loads(text) == {"a": 1, "t": {"x": 0.5, "y": 'q"uote'}}


def test_dumps_json_keeps_number_lists_on_one_line():
    text = dumps_json({"layers": {"fc": {"fan_in_counts": [1, 2, 3]}}, "x": [{"a": 1}]})
    assert '"fan_in_counts": [1, 2, 3]' in text
    import json

    assert json.loads(text) == {"layers": {"fc": {"fan_in_counts": [1, 2, 3]}}, "x": [{"a": 1}]}


# ------------------------------------------------------------------------------------------ config
def test_resolve_fills_dependent_defaults():
    c = resolve_config(TrainConfig(data="digits"))
    assert (c.method, c.sparsity, c.gamma_sal, c.lr, c.weight_decay) == ("srigl", 0.9, 0.3, 0.1, 5e-4)
    assert c.out.endswith("digits-mlp-srigl-g0.3-s0.9-seed0")
    assert resolve_config(TrainConfig(data="digits", model="vit-tiny")).gamma_sal == 0.95
    dense = resolve_config(TrainConfig(data="digits", method="dense"))
    assert (dense.sparsity, dense.gamma_sal) == (0.0, None)
    adamw = resolve_config(TrainConfig(data="digits", optimizer="adamw"))
    assert (adamw.lr, adamw.weight_decay) == (1e-3, 0.05)
    off = resolve_config(TrainConfig(data="digits", no_ablation=True))
    assert off.gamma_sal == 0.0 and run_name(off).endswith("srigl-noablation-s0.9-seed0")


# no_ablation applies to srigl only (any other method refuses it), so it is varied for srigl alone.
@pytest.mark.parametrize(
    "method, no_ablation",
    [(method, False) for method in ("dense", "static", "set", "rigl", "srigl")] + [("srigl", True)],
)
def test_resolve_is_idempotent_through_toml(method, no_ablation, tmp_path):
    c = resolve_config(TrainConfig(data="digits", method=method, no_ablation=no_ablation, out=str(tmp_path)))
    again = resolve_config(config_from_mapping(tomllib.loads(dumps_toml(c.to_dict()))))
    assert again == c


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(model="nope"), ["unknown model 'nope'", "mlp", "lenet5", "vit-tiny"]),
        (dict(data="imagenet"), ["unknown data set 'imagenet'", "fashion-mnist", "digits"]),
        (dict(method="magic"), ["unknown method 'magic'", "dense", "rigl", "srigl"]),
        (dict(method="rigl", gamma_sal=0.3), ["gamma_sal applies to method 'srigl' only"]),
        (dict(method="set", no_ablation=True), ["no_ablation applies to method 'srigl' only"]),
        (dict(no_ablation=True, gamma_sal=0.5), ["no_ablation means gamma_sal = 0", "0.5"]),
        (dict(method="dense", sparsity=0.5), ["method 'dense'", "sparsity=0.5"]),
        (dict(sparsity=1.0), ["sparsity must be in [0.0, 1.0)", "1.0"]),
        (dict(sparsity=-0.1), ["sparsity must be in [0.0, 1.0)", "-0.1"]),
        (dict(method="rigl", sparsity=0.0), ["needs a sparsity in (0, 1)"]),
        (dict(gamma_sal=1.5), ["gamma_sal must be in [0.0, 1.0]", "1.5"]),
        (dict(epochs=0), ["epochs must be >= 1, got 0"]),
        (dict(warmup_epochs=5, epochs=2), ["warmup_epochs must be in [0, epochs=2], got 5"]),
        (dict(t_end_fraction=0.0), ["t_end_fraction must be in (0.0, 1.0]"]),
        (dict(compact=True, method="rigl"), ["compact training needs a constant fan-in method such as 'srigl', not 'rigl'"]),
    ],
)
def test_resolve_refuses_with_the_numbers(kwargs, words):
    with pytest.raises(InvalidConfigError) as error:
        resolve_config(TrainConfig(**{"data": "digits", **kwargs}))
    for word in words:
        assert word in str(error.value)


def test_config_from_mapping_checks_keys_and_types():
    with pytest.raises(InvalidConfigError, match=r"unknown keys \['epoch'\]; valid keys are \[.*'epochs'"):
        config_from_mapping({"epoch": 3})
    with pytest.raises(InvalidConfigError, match="epochs must be int, got True"):
        config_from_mapping({"epochs": True})
    with pytest.raises(InvalidConfigError, match="sparsity must be float, got '0.9'"):
        config_from_mapping({"sparsity": "0.9"})
    assert config_from_mapping({"sparsity": 1, "lr": 2}).sparsity == 1.0  # an int is a valid float
