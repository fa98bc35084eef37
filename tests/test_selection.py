"""The selection policy: what becomes sparse, what stays dense, and the reason for each."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import srigl
from srigl.selection import DEFAULT_TYPES, SparsityPolicy, select

BIAS = "ndim 1 < 2 (bias or norm)"


class Zoo(nn.Module):
    """One of every module kind the policy must tell apart."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.gconv = nn.Conv2d(8, 8, 3, groups=2, bias=False)  # grouped: weight (8, 4, 3, 3)
        self.dw = nn.Conv2d(8, 8, 3, groups=8)  # depthwise: weight (8, 1, 3, 3)
        self.attn = nn.MultiheadAttention(8, 2, add_bias_kv=True)  # bias_k, bias_v are (1, 1, 8)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)


# (name, shape, sparse, reason) in named_parameters order, written out by hand.
ZOO_DEFAULT = [
    ("emb.weight", (10, 8), False, "type Embedding not in sparse types"),
    ("conv.weight", (8, 3, 3, 3), True, "selected"),
    ("conv.bias", (8,), False, BIAS),
    ("bn.weight", (8,), False, BIAS),
    ("bn.bias", (8,), False, BIAS),
    ("gconv.weight", (8, 4, 3, 3), True, "selected"),
    ("dw.weight", (8, 1, 3, 3), True, "selected"),
    ("dw.bias", (8,), False, BIAS),
    ("attn.in_proj_weight", (24, 8), True, "selected"),
    ("attn.in_proj_bias", (24,), False, BIAS),
    # 3-D but a bias: the "bias" name keeps it out even though ndim >= 2.
    ("attn.bias_k", (1, 1, 8), False, "not a weight"),
    ("attn.bias_v", (1, 1, 8), False, "not a weight"),
    ("attn.out_proj.weight", (8, 8), True, "selected"),
    ("attn.out_proj.bias", (8,), False, BIAS),
    ("ln.weight", (8,), False, BIAS),
    ("ln.bias", (8,), False, BIAS),
    ("head.weight", (5, 8), True, "selected"),
    ("head.bias", (5,), False, BIAS),
]


def _table(decisions):
    return [(c.name, c.shape, c.sparse, c.reason) for c in decisions]


def _by_name(decisions):
    return {c.name: c for c in decisions}


def test_default_policy_on_every_module_kind():
    decisions = select(Zoo(), SparsityPolicy())
    assert _table(decisions) == ZOO_DEFAULT
    # FQN parts: module path and the parameter's own name.
    out_proj = _by_name(decisions)["attn.out_proj.weight"]
    assert (out_proj.module_name, out_proj.param_name) == ("attn.out_proj", "weight")
    in_proj = _by_name(decisions)["attn.in_proj_weight"]
    assert (in_proj.module_name, in_proj.param_name) == ("attn", "in_proj_weight")


def test_is_output_flags_only_the_last_eligible_weight():
    decisions = select(Zoo(), SparsityPolicy())
    assert [c.name for c in decisions if c.is_output] == ["head.weight"]


def test_is_output_when_the_model_ends_in_attention():
    model = nn.Sequential(nn.Linear(8, 8), nn.MultiheadAttention(8, 2))
    decisions = select(model, SparsityPolicy())
    # MultiheadAttention's own in_proj_weight comes before its out_proj submodule.
    assert [c.name for c in decisions if c.sparse] == ["0.weight", "1.in_proj_weight", "1.out_proj.weight"]
    assert [c.name for c in decisions if c.is_output] == ["1.out_proj.weight"]


def test_multihead_attention_with_separate_projections():
    # kdim/vdim != embed_dim: q/k/v get their own weights and in_proj_weight is None (absent).
    attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=4)
    decisions = _by_name(select(attn, SparsityPolicy()))
    for name, shape in [("q_proj_weight", (8, 8)), ("k_proj_weight", (8, 6)), ("v_proj_weight", (8, 4))]:
        assert decisions[name].sparse and decisions[name].shape == shape
    assert "in_proj_weight" not in decisions
    assert not decisions["in_proj_bias"].sparse
    assert decisions["out_proj.weight"].is_output


def test_a_bare_linear_model():
    decisions = select(nn.Linear(4, 3), SparsityPolicy())
    assert _table(decisions) == [("weight", (3, 4), True, "selected"), ("bias", (3,), False, BIAS)]
    assert decisions[0].module_name == "" and decisions[0].is_output


def test_types_allow_list():
    decisions = _by_name(select(Zoo(), SparsityPolicy(types=(nn.Linear,))))
    assert decisions["conv.weight"].reason == "type Conv2d not in sparse types"
    assert decisions["attn.in_proj_weight"].reason == "type MultiheadAttention not in sparse types"
    # out_proj is a Linear subclass (NonDynamicallyQuantizableLinear): still selected.
    assert decisions["attn.out_proj.weight"].sparse
    assert [n for n, c in decisions.items() if c.sparse] == ["attn.out_proj.weight", "head.weight"]


def test_default_types_cover_conv_1d_2d_3d():
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.Conv3d(4, 4, 1), nn.Conv2d(4, 4, 1))
    assert all(isinstance(m, DEFAULT_TYPES) for m in model)
    assert [c.name for c in select(model, SparsityPolicy()) if c.sparse] == ["0.weight", "1.weight", "2.weight"]


def test_include_patterns():
    decisions = _by_name(select(Zoo(), SparsityPolicy(include=("attn.*", "head.weight"))))
    assert [n for n, c in decisions.items() if c.sparse] == [
        "attn.in_proj_weight",
        "attn.out_proj.weight",
        "head.weight",
    ]
    assert decisions["conv.weight"].reason == "not matched by include ['attn.*', 'head.weight']"
    # Patterns only ever choose among eligible tensors: a bias matched by include stays dense.
    assert decisions["attn.in_proj_bias"].reason == BIAS


def test_exclude_patterns_name_the_pattern():
    decisions = _by_name(select(Zoo(), SparsityPolicy(exclude=("*conv.weight", "attn.*_proj*"))))
    assert decisions["conv.weight"].reason == "excluded by pattern '*conv.weight'"
    assert decisions["gconv.weight"].reason == "excluded by pattern '*conv.weight'"
    assert decisions["attn.in_proj_weight"].reason == "excluded by pattern 'attn.*_proj*'"
    assert decisions["attn.out_proj.weight"].reason == "excluded by pattern 'attn.*_proj*'"
    assert [n for n, c in decisions.items() if c.sparse] == ["dw.weight", "head.weight"]


def test_patterns_are_case_sensitive_and_anchored():
    decisions = _by_name(select(Zoo(), SparsityPolicy(exclude=("CONV.weight", "conv"))))
    assert decisions["conv.weight"].sparse  # neither pattern matches the whole FQN exactly


def test_include_is_checked_before_exclude():
    decisions = _by_name(select(Zoo(), SparsityPolicy(include=("head.*",), exclude=("conv.*",))))
    assert decisions["conv.weight"].reason.startswith("not matched by include")


@pytest.mark.parametrize(
    "policy, dense_name, reason",
    [
        (SparsityPolicy(dense_first=True), "conv.weight", "first layer kept dense (dense_first=True)"),
        (SparsityPolicy(dense_last=True), "head.weight", "output layer kept dense (dense_last=True)"),
    ],
)
def test_dense_first_and_dense_last(policy, dense_name, reason):
    decisions = select(Zoo(), policy)
    by_name = _by_name(decisions)
    assert by_name[dense_name].reason == reason and not by_name[dense_name].sparse
    # Exactly one more dense tensor than the default policy.
    default_sparse = {n for n, _, sparse, _ in ZOO_DEFAULT if sparse}
    assert {c.name for c in decisions if c.sparse} == default_sparse - {dense_name}
    # The classifier is still the output layer, dense or not.
    assert by_name["head.weight"].is_output


def test_dense_first_counts_only_eligible_tensors():
    # Under a Linear-only policy the embedding and convs come first in the model but are not
    # eligible, so the "first layer" is the first Linear: attention's out_proj.
    decisions = _by_name(select(Zoo(), SparsityPolicy(dense_first=True, types=(nn.Linear,))))
    assert decisions["attn.out_proj.weight"].reason == "first layer kept dense (dense_first=True)"
    assert decisions["head.weight"].sparse


def test_min_ndim():
    decisions = _by_name(select(Zoo(), SparsityPolicy(min_ndim=3)))
    assert decisions["head.weight"].reason == "ndim 2 < 3 (bias or norm)"
    assert decisions["conv.weight"].sparse
    # The output flag follows the last eligible tensor under this policy.
    assert [n for n, c in decisions.items() if c.is_output] == ["dw.weight"]


def test_decisions_cover_every_parameter_once():
    model = Zoo()
    decisions = select(model, SparsityPolicy())
    assert [c.name for c in decisions] == [n for n, _ in model.named_parameters()]


def test_policy_is_a_frozen_value():
    policy = SparsityPolicy(exclude=("head.*",))
    assert policy == SparsityPolicy(exclude=("head.*",))
    with pytest.raises(AttributeError):
        policy.dense_last = True


def test_sparsifier_summary_reports_the_decisions():
    model = Zoo()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    policy = SparsityPolicy(exclude=("attn.out_proj.*",))
    sp = srigl.RigL(model, opt, sparsity=0.5, total_steps=100, distribution="uniform", policy=policy)
    summary = sp.summary()
    assert list(summary) == [n for n, _ in model.named_parameters()]
    assert summary["attn.out_proj.weight"]["reason"] == "excluded by pattern 'attn.out_proj.*'"
    assert summary["emb.weight"]["reason"] == "type Embedding not in sparse types"
    assert summary["ln.weight"]["reason"] == BIAS
    assert {n for n, e in summary.items() if e["sparse"]} == set(sp.masks()) == {
        "conv.weight",
        "gconv.weight",
        "dw.weight",
        "attn.in_proj_weight",
        "head.weight",
    }
    assert summary["attn.in_proj_weight"]["nnz"] == 96  # uniform 0.5 of 24 x 8


class _HeadFirst(nn.Module):
    """Defines its classifier before the body: registration order says "body" is last."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(32, 10)
        self.body = nn.Linear(64, 32)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


class _Untraceable(_HeadFirst):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 2
        return self.head(torch.relu(self.body(x)))


def test_output_layer_is_the_last_one_called_not_the_last_registered():
    decisions = select(_HeadFirst(), SparsityPolicy())
    assert [c.name for c in decisions if c.is_output] == ["head.weight"]
    model = _HeadFirst()
    sp = srigl.SRigL(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity={"head.weight": 0.5, "body.weight": 0.5}, total_steps=10)
    assert {layer.name: layer.ablate for layer in sp.layers} == {"head.weight": False, "body.weight": True}
    dense_last = select(_HeadFirst(), SparsityPolicy(dense_last=True))
    assert [c.name for c in dense_last if not c.sparse and c.name.endswith("weight")] == ["head.weight"]


def test_an_explicit_output_layer_wins_and_an_unknown_one_is_refused():
    model = _HeadFirst()
    sp = srigl.SRigL(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity={"head.weight": 0.5, "body.weight": 0.5}, total_steps=10,
                     output_layer="body.weight")
    assert {layer.name: layer.ablate for layer in sp.layers} == {"head.weight": True, "body.weight": False}
    with pytest.raises(srigl.InvalidConfigError, match=r"output_layer='classifier\.weight' is not a parameter of "
                                                       r"_HeadFirst \(4 parameters"):
        srigl.SRigL(model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.5, total_steps=10,
                    output_layer="classifier.weight")


def test_an_untraceable_model_falls_back_to_registration_order_or_the_explicit_name():
    assert [c.name for c in select(_Untraceable(), SparsityPolicy()) if c.is_output] == ["body.weight"]
    assert [c.name for c in select(_Untraceable(), SparsityPolicy(), output="head.weight") if c.is_output] == [
        "head.weight"]


def test_a_layer_called_twice_counts_at_its_last_call():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(8, 8)
            self.mid = nn.Linear(8, 8)

        def forward(self, x):
            return self.shared(self.mid(self.shared(x)))

    assert [c.name for c in select(Shared(), SparsityPolicy()) if c.is_output] == ["shared.weight"]
