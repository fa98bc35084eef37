"""Nothing lost through the API (issue #14): masks survive the checkpoints users already write,
edited masks and misuse are refused by name instead of silently changing what trains."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import srigl
from srigl.errors import MaskError


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))


def _build(algorithm=srigl.SRigL, seed=0, lr=0.1, **kw):
    model = _model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    kw = {"sparsity": 0.8, "total_steps": 200, "delta": 5, **kw}
    return model, opt, algorithm(model, opt, **kw)


def _step(model, opt, sp, backward=True, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else sp.step_count)
    if backward:
        x, y = torch.randn(16, 64, generator=g), torch.randint(0, 10, (16,), generator=g)
        nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    stats = sp.step()
    opt.zero_grad()
    return stats


def _trained(algorithm=srigl.SRigL, steps=12):
    model, opt, sp = _build(algorithm)
    for _ in range(steps):
        _step(model, opt, sp)
    return model, opt, sp


# ----------------------------------------------------------------------------- model.state_dict round trips
@pytest.mark.parametrize("algorithm", [srigl.SRigL, srigl.RigL])
def test_model_state_dict_alone_restores_the_masks_when_loaded_before_the_sparsifier(algorithm):
    model, _, sp = _trained(algorithm)
    saved, masks = model.state_dict(), sp.masks()
    fresh = _model(seed=7)
    fresh.load_state_dict(saved)
    opt = torch.optim.SGD(fresh.parameters(), lr=0.0)
    with pytest.warns(UserWarning, match="zeros are adopted as masks"):
        restored = algorithm(fresh, opt, sparsity=0.8, total_steps=200, delta=5)
    assert set(restored.initial_masks.values()) == {"nonzero"}
    for name, mask in restored.masks().items():
        weight = fresh.get_submodule(name.rpartition(".")[0]).weight.detach()
        assert torch.equal(weight, saved[name]), f"{name}: a loaded weight was changed"
        assert bool(mask[weight != 0].all()) and int(mask.sum()) == int(masks[name].sum()), name


def test_model_state_dict_loaded_into_a_model_that_has_a_sparsifier_keeps_every_weight():
    # The Lightning / Hugging Face order: model and sparsifier built first, then the weights loaded.
    model, _, sp = _trained()
    saved = model.state_dict()
    fresh = _model(seed=7)
    opt = torch.optim.SGD(fresh.parameters(), lr=0.0)  # lr 0: any change to a weight is the sparsifier's
    restored = srigl.SRigL(fresh, opt, sparsity=0.8, total_steps=200, delta=5)
    with pytest.warns(UserWarning, match="re-derived from the loaded weights' zeros"):
        fresh.load_state_dict(saved)
    _step(fresh, opt, restored)
    for name in sp.masks():
        weight = fresh.get_submodule(name.rpartition(".")[0]).weight.detach()
        assert torch.equal(weight, saved[name]), f"{name}: the next step zeroed loaded weights"
    assert [restored.summary()[n]["fan_in"] for n in sp.masks()] == [sp.summary()[n]["fan_in"] for n in sp.masks()]


def test_loaded_weights_that_cannot_be_a_mask_raise_loudly_instead_of_being_zeroed():
    model, _, sp = _trained()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved["0.weight"][0] = 1.0  # one dense row: no constant fan-in mask holds it
    fresh = _model(seed=7)
    srigl.SRigL(fresh, torch.optim.SGD(fresh.parameters(), lr=0.1), sparsity=0.8, total_steps=200)
    with pytest.raises(MaskError, match=r"0.weight: the loaded weights have \d+ non-zeros outside"):
        fresh.load_state_dict(saved)


def test_a_full_checkpoint_restore_does_not_trigger_the_re_derivation(recwarn):
    model, opt, sp = _trained()
    state = srigl.training_state(model, opt, sp)
    fresh, opt2, sp2 = _build(seed=7)
    srigl.restore_training_state(state, fresh, opt2, sp2)
    assert not [w for w in recwarn if "re-derived" in str(w.message)]
    assert all(torch.equal(sp.masks()[n], m) for n, m in sp2.masks().items())


# ----------------------------------------------------------------------------- edited masks
def test_an_edited_mask_row_is_refused_at_the_next_update_instead_of_ablating_the_layer():
    model, opt, sp = _build()
    for _ in range(2):
        _step(model, opt, sp)
    model[0].weight_mask[0, :] = True
    _step(model, opt, sp)  # not an update step: nothing is read yet
    _step(model, opt, sp)
    with pytest.raises(MaskError, match=r"0.weight: its mask no longer fits ConstantFanIn\(\) with budget 320 at step 5: "
                                        r"fan-in not constant: active neurons hold \[10, 64\] weights"):
        _step(model, opt, sp)


@pytest.mark.parametrize("edit, message", [
    (lambda m: torch.ones_like(m), r"0.weight: 32 active neurons with fan-in 64, but budget 320 gives them 10 each"),
    (lambda m: m.float(), r"saved mask has dtype torch.float32, not torch.bool"),
])
def test_load_state_dict_refuses_masks_that_disagree_with_the_budget_or_dtype(edit, message):
    _, _, a = _build()
    _, _, b = _build()
    state = a.state_dict()
    state["masks"]["0.weight"] = edit(state["masks"]["0.weight"])
    with pytest.raises(srigl.StateDictMismatchError, match=message):
        b.load_state_dict(state)


# ----------------------------------------------------------------------------- misuse, refused by name
def test_an_update_step_without_a_backward_pass_skips_instead_of_regrowing_by_zeros():
    model, opt, sp = _build(srigl.RigL)
    for _ in range(4):
        _step(model, opt, sp)
    before = sp.masks()
    with pytest.warns(RuntimeWarning, match=r"no backward pass since the last step \(step 5\)"):
        stats = _step(model, opt, sp, backward=False)
    assert stats == {"step": 5, "skipped": True, "reason": "no backward pass since the last step"}
    assert all(torch.equal(before[n], m) for n, m in sp.masks().items())


def test_a_replaced_parameter_is_refused_at_the_next_optimizer_step():
    model, opt, sp = _build()
    new = nn.Parameter(model[0].weight.detach().clone())
    model[0].weight = new
    opt.param_groups[0]["params"][0] = new
    nn.functional.cross_entropy(model(torch.randn(4, 64)), torch.tensor([0, 1, 2, 3])).backward()
    with pytest.raises(MaskError, match="0.weight was replaced by another Parameter after the sparsifier was built"):
        opt.step()


def test_two_optimizer_steps_per_sparsifier_step_are_refused():
    model, opt, sp = _build()
    nn.functional.cross_entropy(model(torch.randn(4, 64)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    opt.step()
    with pytest.raises(srigl.StepOrderError, match=r"2 optimizer steps since the last sparsifier.step\(\) \(at step 0\)"):
        sp.step()


def test_a_second_sparsifier_on_the_same_tensors_is_refused_until_the_first_lets_go():
    model, opt, sp = _build()
    budget = sp.layers[0].budget
    with pytest.raises(srigl.InvalidConfigError, match=r"0.weight is already sparsified by another SRigL \(step 0\)"):
        srigl.SRigL(model, opt, sparsity=0.5, total_steps=200)
    assert int(model[0].weight_mask.sum()) == budget  # the first one's masks are intact
    sp.remove_hooks()
    second = srigl.SRigL(model, opt, sparsity=0.5, total_steps=200, mask_init="random")
    assert second.layers[0].budget != budget


def test_pickling_a_sparsifier_says_what_to_save_and_deepcopy_still_works():
    model, opt, sp = _trained(steps=3)
    with pytest.raises(TypeError, match=r"cannot be pickled .* save sparsifier.state_dict\(\)"):
        pickle.dumps(sp)
    clone = copy.deepcopy(sp)
    assert clone.model is not sp.model and clone.step_count == sp.step_count
    assert all(torch.equal(sp.masks()[n], m) for n, m in clone.masks().items())
