"""The sparsifier's state has one validator, and wrappers do not change the names it uses."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import srigl
from srigl.io.checkpoint import restore_training_state, training_state
from srigl.masks import masks_of, unwrap, unwrap_optimizer
from srigl.structures import NM, ConstantFanIn, Unstructured


def _build(sparsity=0.5, gamma_sal=0.3, erk_power=1.0, compact=False, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = srigl.SRigL(model, opt, sparsity=sparsity, total_steps=20, gamma_sal=gamma_sal, erk_power=erk_power,
                     compact=compact, seed=seed)
    return model, opt, sp


def _damaged(state):
    """(what, state) pairs: each one a state neither load_state_dict nor a checkpoint restore may take."""
    cases = []
    for key, value in (("sparsity", 0.8), ("gamma_sal", 0.5), ("erk_power", 2.0), ("algorithm", "rigl"),
                       ("structure", "Unstructured()"), ("compact", True)):
        bad = copy.deepcopy(state)
        bad["config"][key] = value
        cases.append((key, bad))
    bad = copy.deepcopy(state)
    bad["masks"]["0.weight"] = bad["masks"]["0.weight"][:, :8]
    cases.append(("mask shape", bad))
    bad = copy.deepcopy(state)
    del bad["masks"]["2.weight"]
    cases.append(("missing tensor", bad))
    bad = copy.deepcopy(state)
    del bad["budgets"]["0.weight"]
    cases.append(("missing budget", bad))
    return cases


def test_load_state_dict_and_checkpoint_restore_refuse_the_same_states():
    model, opt, sp = _build()
    state = training_state(model, opt, sp)
    for what, bad_sparsifier_state in _damaged(sp.state_dict()):
        before = {n: m.clone() for n, m in sp.masks().items()}
        with pytest.raises(srigl.StateDictMismatchError) as direct:
            sp.load_state_dict(bad_sparsifier_state)
        bad_checkpoint = {**state, "sparsifier": bad_sparsifier_state}
        with pytest.raises(srigl.CheckpointMismatchError) as restored:
            restore_training_state(bad_checkpoint, model, opt, sp)
        # The same validator speaks in both: one message, apart from what it calls the state.
        assert str(restored.value).replace("checkpoint", "state dict") == str(direct.value), what
        assert all(torch.equal(before[n], m) for n, m in sp.masks().items()), f"{what}: refused, yet changed"


def test_a_state_saved_before_a_key_existed_still_loads():
    model, opt, sp = _build()
    state = sp.state_dict()
    del state["config"]["erk_power"], state["layouts"]  # what older versions wrote
    sp.load_state_dict(state)
    assert sp.step_count == 0


def test_compact_state_round_trips_and_masked_state_is_refused_with_the_way_out():
    _, _, compact = _build(compact=True)
    _, _, masked = _build()
    assert set(compact.state_dict()["layouts"]) == {"0.weight", "2.weight"} and not compact.state_dict()["masks"]
    compact.load_state_dict(compact.state_dict())
    with pytest.raises(srigl.StateDictMismatchError, match="compact=False.*from_masked_dense"):
        compact.load_state_dict(masked.state_dict())


def test_wrappers_are_unwrapped_and_names_stay_the_users():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    compiled = torch.compile(model)  # an OptimizedModule; compiles only when called
    assert unwrap(compiled) is model and unwrap(nn.DataParallel(compiled)) is model
    assert "_orig_mod.0.weight" in dict(compiled.named_parameters())
    sp = srigl.SRigL(compiled, torch.optim.SGD(compiled.parameters(), lr=0.1), sparsity=0.5, total_steps=10)
    assert set(sp.masks()) == {"0.weight", "2.weight"} == set(masks_of(compiled))
    assert sp.model is model



class _DelegatingOptimizer(torch.optim.Optimizer):
    """What accelerate's AcceleratedOptimizer is: an Optimizer subclass that never ran
    ``Optimizer.__init__`` (so it takes no step hook) and shows its inner optimizer's param groups."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def step(self, closure=None):
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none)


def test_optimizer_wrappers_are_unwrapped_and_the_inner_step_is_hooked():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = _DelegatingOptimizer(_DelegatingOptimizer(inner))
    assert unwrap_optimizer(wrapped) is inner and unwrap_optimizer(inner) is inner
    with pytest.raises(AttributeError, match="_optimizer_step_post_hooks"):
        wrapped.register_step_post_hook(lambda *a: None)  # why the sparsifier must hook the inner one
    sp = srigl.SRigL(model, wrapped, sparsity=0.5, total_steps=8, delta=2)
    assert sp.optimizer is inner
    for _ in range(4):
        model(torch.randn(8, 16)).sum().backward()
        wrapped.step()
        sp.step()
        wrapped.zero_grad()
    assert sp.step_count == 4 and sp.last_update["step"] == 4
    for name, mask in sp.masks().items():
        assert not model.get_parameter(name)[~mask].any(), name
    # A scheduler also has an ``optimizer`` but is no optimizer; an optimizer with its own groups is no wrapper.
    scheduler = torch.optim.lr_scheduler.StepLR(inner, 1)
    assert unwrap_optimizer(scheduler) is scheduler
    lookalike = torch.optim.SGD(model.parameters(), lr=0.1)
    lookalike.optimizer = inner
    assert unwrap_optimizer(lookalike) is lookalike


def test_a_list_of_optimizers_is_refused_and_one_sparsifier_per_optimizer_works():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    first = torch.optim.SGD(model[0].parameters(), lr=0.1)
    second = torch.optim.Adam(model[2].parameters(), lr=0.01)
    with pytest.raises(srigl.InvalidConfigError, match="one sparsifier per optimizer"):
        srigl.SRigL(model, [first, second], sparsity=0.5, total_steps=8)
    sps = [
        srigl.SRigL(model, opt, sparsity=0.5, total_steps=8, delta=2, policy=srigl.SparsityPolicy(include=(name,)))
        for opt, name in ((first, "0.weight"), (second, "2.weight"))
    ]
    for _ in range(4):
        model(torch.randn(8, 16)).sum().backward()
        for opt, sp in zip((first, second), sps):
            opt.step()
            sp.step()
            opt.zero_grad()
    assert [set(sp.masks()) for sp in sps] == [{"0.weight"}, {"2.weight"}]
    assert all(sp.step_count == 4 for sp in sps)
    for sp in sps:
        for name, mask in sp.masks().items():
            assert not model.get_parameter(name)[~mask].any(), name

@pytest.mark.parametrize(
    "structure, shape, min_density, fixed, k_after",
    [
        # budget 40 over (rows, fan_in); 7 surviving neurons
        (Unstructured(), (10, 20), 1 / 200, None, 40),
        (ConstantFanIn(), (10, 20), 1 / 20, None, 5),  # 40 // 7 = 5
        (NM(2, 4), (10, 20), 0.5, 0.5, 2),
    ],
)
def test_structure_rules_golden(structure, shape, min_density, fixed, k_after):
    assert structure.min_density(*shape) == pytest.approx(min_density)
    assert structure.fixed_density() == fixed
    assert structure.per_unit_after(40, 7, shape[1]) == k_after
    assert ConstantFanIn().per_unit_after(40, 1, 20) == 20  # k' never exceeds the fan-in
    assert structure.ablatable == (structure == ConstantFanIn()) == structure.condensable


def test_structure_invariants_name_the_broken_rule():
    alive = torch.tensor([True, True, False])
    good = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 0]], dtype=torch.bool)
    ConstantFanIn().check_update("w", good, alive, 2, 4)
    Unstructured().check_update("w", good, alive, 4, 4)
    bad = good.clone()
    bad[0, 2] = True
    with pytest.raises(srigl.NotConstantFanInError, match=r"w: fan-in .* counts \[0, 2, 3\] for k'=2"):
        ConstantFanIn().check_update("w", bad, alive, 2, 4)
    with pytest.raises(srigl.MaskInvariantError, match="w: 5 active weights after the update, budget 4"):
        Unstructured().check_update("w", bad, alive, 4, 4)
