"""Property tests of the algorithms: invariants that hold after every step of every run.

Each example trains a tiny Linear or Conv2d (plain, grouped, depthwise) model of odd sizes on random
data with frequent mask updates (``delta`` 1..5), under SGD with momentum or Adam, and checks after
every optimizer step and every mask update:

* masked weights are exactly zero after each optimizer step;
* unstructured algorithms keep exactly their initial number of weights;
* SRigL keeps a constant fan-in ``k'`` over its active neurons, ``nnz == k' * active`` with
  ``budget - active < nnz <= budget``; ablated neurons are all zero; the output layer is never ablated;
  ``gamma_sal = 0`` never ablates;
* weights grown by an update start at exactly zero, and the optimizer state of every position that is
  not kept (grown, dropped, inactive) is zero;
* masks change over a run (``Static``: never).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import srigl
from srigl.errors import InfeasibleSparsityError, ParameterNotInOptimizerError, StepOrderError

TOTAL_STEPS = 40  # t_end = 30: between 6 (delta = 5) and 29 (delta = 1) mask updates per run

ALGORITHMS = {
    "static": (srigl.Static, {}),
    "set": (srigl.SET, {}),
    "rigl": (srigl.RigL, {}),
    "srigl-g0": (srigl.SRigL, {"gamma_sal": 0.0}),
    "srigl-g0.3": (srigl.SRigL, {"gamma_sal": 0.3}),
    "srigl-g0.95": (srigl.SRigL, {"gamma_sal": 0.95}),
}


# ----------------------------------------------------------------------------- models
@st.composite
def mlps(draw):
    sizes = draw(st.lists(st.integers(3, 23), min_size=3, max_size=3))  # in, hidden1, hidden2
    n_classes = draw(st.integers(2, 7))
    model = nn.Sequential(
        nn.Linear(sizes[0], sizes[1]),
        nn.ReLU(),
        nn.Linear(sizes[1], sizes[2], bias=draw(st.booleans())),
        nn.ReLU(),
        nn.Linear(sizes[2], n_classes),
    )
    return model, (sizes[0],), n_classes


@st.composite
def convnets(draw):
    groups = draw(st.integers(1, 3))
    c_in = draw(st.sampled_from([1, 3]))
    c1 = groups * draw(st.integers(1, 4))
    c2 = groups * draw(st.integers(1, 4))
    side = draw(st.sampled_from([5, 7]))
    n_classes = draw(st.integers(2, 5))
    model = nn.Sequential(
        nn.Conv2d(c_in, c1, 3, padding=1),  # (B, c1, side, side)
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, groups=groups),  # grouped: weight (c2, c1 / groups, 3, 3)
        nn.ReLU(),
        nn.Conv2d(c2, c2, 3, groups=c2, bias=False),  # depthwise: weight (c2, 1, 3, 3)
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),  # (B, c2)
        nn.Linear(c2, n_classes),
    )
    return model, (c_in, side, side), n_classes


MODELS = {"linear": mlps, "conv": convnets}


def _optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    return torch.optim.Adam(model.parameters(), lr=0.02)


def _build(algorithm, kwargs, model, optimizer, sparsity, **common):
    """Construct the sparsifier; an infeasible target is retried at the largest feasible one."""
    try:
        return algorithm(model, optimizer, sparsity, TOTAL_STEPS, **kwargs, **common), sparsity
    except InfeasibleSparsityError as err:
        # Tiny layers cannot keep one weight per neuron at high sparsity: run at the boundary the
        # library names instead, which also checks that boundary is really feasible.
        assert 0.0 < err.max_feasible < sparsity
        return algorithm(model, optimizer, err.max_feasible, TOTAL_STEPS, **kwargs, **common), err.max_feasible


# ----------------------------------------------------------------------------- invariants
def _rows(mask: torch.Tensor) -> torch.Tensor:
    return mask.reshape(mask.shape[0], -1)  # (out, fan_in)


def _check_structure(sp, params, budgets, output_name, gamma_sal):
    for name, mask in sp.masks().items():
        weight = params[name].detach()
        assert not bool(weight[~mask].any()), f"{name}: non-zero weight where the mask is False"
        nnz = int(mask.sum())
        if not isinstance(sp, srigl.SRigL):
            assert nnz == budgets[name], f"{name}: {nnz} active weights, budget {budgets[name]}"
            continue
        counts = _rows(mask).sum(dim=1)  # (out,)
        active = counts > 0
        n_active = int(active.sum())
        fan_ins = counts[active].unique().tolist()
        assert len(fan_ins) == 1, f"{name}: fan-in not constant over active neurons: {fan_ins}"
        k = fan_ins[0]
        assert nnz == k * n_active
        assert nnz <= budgets[name] and budgets[name] - nnz < n_active, (name, nnz, budgets[name], n_active)
        # Ablated neurons: every incoming weight zero (the mask is zero by definition of ablated).
        assert not bool(_rows(weight)[~active].any()), f"{name}: an ablated neuron has non-zero weights"
        if name == output_name or gamma_sal == 0.0:
            assert n_active == mask.shape[0], f"{name}: {mask.shape[0] - n_active} neurons ablated"


def _check_update(sp, optimizer, params, old, new, stats):
    assert stats["layers"].keys() == new.keys()
    for name in new:
        param = params[name]
        grown = new[name] & ~old[name]
        kept = new[name] & old[name]
        assert stats["layers"][name]["grown"] == int(grown.sum())
        assert stats["layers"][name]["active_neurons"] == int(_rows(new[name]).any(dim=1).sum())
        assert not bool(param.detach()[grown].any()), f"{name}: a regrown weight does not start at 0"
        for key, state in optimizer.state.get(param, {}).items():
            if torch.is_tensor(state) and state.shape == param.shape:
                assert not bool(state[~kept].any()), f"{name}: optimizer state {key!r} not reset"


@st.composite
def runs(draw, model_kind: str):
    model, input_shape, n_classes = draw(MODELS[model_kind]())
    return {
        "model": model,
        "input_shape": input_shape,
        "n_classes": n_classes,
        "sparsity": draw(st.floats(0.5, 0.99)),
        "distribution": draw(st.sampled_from(["erk", "uniform"])),
        "delta": draw(st.integers(1, 5)),
        "alpha": draw(st.sampled_from([0.3, 1.0])),  # 1.0: the first updates drop nearly everything
        "optimizer": draw(st.sampled_from(["sgd", "adam"])),
        "dense_warmup": draw(st.sampled_from([0, 2])),
        "seed": draw(st.integers(0, 2**16)),
    }


@pytest.mark.parametrize("model_kind", sorted(MODELS))
@pytest.mark.parametrize("algorithm_name", list(ALGORITHMS))
def test_invariants_hold_after_every_step(algorithm_name, model_kind):
    algorithm, kwargs = ALGORITHMS[algorithm_name]

    @settings(deadline=None, max_examples=12, suppress_health_check=[HealthCheck.too_slow])
    @given(run=runs(model_kind))
    def check(run):
        with torch.random.fork_rng():  # seeds below must not leak into other tests
            run_and_check(run)

    def run_and_check(run):
        torch.manual_seed(run["seed"])
        model = run["model"]
        for module in model.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()  # initialised under this example's seed
        optimizer = _optimizer(run["optimizer"], model)
        for _ in range(run["dense_warmup"]):
            # Dense steps before sparsifying fill the optimizer state everywhere.
            x = torch.randn(8, *run["input_shape"])
            F.cross_entropy(model(x), torch.randint(0, run["n_classes"], (8,))).backward()
            optimizer.step()
            optimizer.zero_grad()
        sp, _ = _build(
            algorithm, kwargs, model, optimizer, run["sparsity"],
            distribution=run["distribution"], delta=run["delta"], alpha=run["alpha"], seed=run["seed"],
        )
        params = dict(model.named_parameters())
        masks = sp.masks()
        budgets = {name: int(mask.sum()) for name, mask in masks.items()}
        output_name = [n for n, p in model.named_parameters() if p.dim() >= 2][-1]
        gamma_sal = kwargs.get("gamma_sal")

        for name, mask in masks.items():
            # Construction resets the state of every pruned position (here left from dense warm-up).
            for key, state in optimizer.state.get(params[name], {}).items():
                if torch.is_tensor(state) and state.shape == mask.shape:
                    assert not bool(state[~mask].any()), f"{name}: optimizer state {key!r} not reset at init"
        if isinstance(sp, srigl.SRigL):
            # Initial masks already have constant fan-in with every neuron active.
            for name, mask in masks.items():
                fan_in = _rows(mask).sum(dim=1)  # (out,)
                assert bool((fan_in == fan_in[0]).all()) and int(fan_in[0]) >= 1, name
        _check_structure(sp, params, budgets, output_name, gamma_sal)

        data = torch.Generator().manual_seed(run["seed"])
        changed = owed = False
        n_updates = 0
        for step in range(1, TOTAL_STEPS + 1):
            x = torch.randn(8, *run["input_shape"], generator=data)
            y = torch.randint(0, run["n_classes"], (8,), generator=data)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            _check_structure(sp, params, budgets, output_name, gamma_sal)
            old = sp.masks()
            stats = sp.step()
            new = sp.masks()
            # t_end = 0.75 * 40 = 30; Static never updates.
            assert (stats is not None) == (algorithm is not srigl.Static and step % run["delta"] == 0 and step < 30)
            if stats is None:
                assert all(torch.equal(old[n], new[n]) for n in new), f"masks changed off-schedule at {step}"
            else:
                n_updates += 1
                _check_update(sp, optimizer, params, old, new, stats)
                _check_structure(sp, params, budgets, output_name, gamma_sal)
                changed |= any(not torch.equal(old[n], new[n]) for n in new)
                # A change is only owed where some layer drops at least one weight and has a free
                # position to grow into (a 9-weight depthwise kernel at budget 2 drops int(0.3 * 2) = 0).
                owed |= any(
                    int(stats["drop_fraction"] * int(m.sum())) >= 1 and int(m.sum()) < m.numel() for m in old.values()
                )
            optimizer.zero_grad()

        assert sp.step_count == TOTAL_STEPS
        if algorithm is srigl.Static:
            assert n_updates == 0 and not changed
        else:
            assert n_updates == len(range(run["delta"], 30, run["delta"]))
            assert changed or not owed, "no mask changed over a whole run of updates"
        # The summary reports the same masks.
        summary = sp.summary()
        for name, mask in sp.masks().items():
            assert summary[name]["nnz"] == int(mask.sum())
            assert summary[name]["active_neurons"] == int(_rows(mask).any(dim=1).sum())

    check()


# ----------------------------------------------------------------------------- misuse
def _small_model():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))


@pytest.mark.parametrize("algorithm_name", list(ALGORITHMS))
def test_step_before_optimizer_step_raises(algorithm_name):
    algorithm, kwargs = ALGORITHMS[algorithm_name]
    model = _small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sp = algorithm(model, optimizer, 0.5, TOTAL_STEPS, delta=1, **kwargs)
    with pytest.raises(StepOrderError, match="at step 0"):
        sp.step()
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    sp.step()
    # A second sparsifier step without another optimizer step is out of order too.
    with pytest.raises(StepOrderError, match="at step 1"):
        sp.step()
    assert sp.step_count == 1


@pytest.mark.parametrize(
    "algorithm_name, compact",
    [(name, False) for name in ALGORITHMS] + [(name, True) for name, (alg, _) in ALGORITHMS.items() if alg is srigl.SRigL],
)
def test_a_step_skipped_by_grad_scaler_is_not_counted(algorithm_name, compact):
    algorithm, kwargs = ALGORITHMS[algorithm_name]
    model = _small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = algorithm(model, optimizer, 0.5, TOTAL_STEPS, delta=2, **kwargs, **({"compact": True} if compact else {}))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x = torch.randn(4, 6)

    def train_step(overflow: bool):
        scaler.scale(model(x).square().mean()).backward()
        if overflow:  # what an fp16 overflow leaves in one gradient
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")
        scaler.step(optimizer)  # skips optimizer.step() when a gradient is not finite
        scaler.update()
        stats = sp.step()
        optimizer.zero_grad()
        return stats

    train_step(False)
    assert sp.step_count == 1 and sp.skipped_steps == 0
    before = [p.detach().clone() for p in model.parameters()]
    assert train_step(True) is None  # step 2 would be an update step: nothing happens instead
    assert sp.step_count == 1 and sp.skipped_steps == 1
    assert scaler.get_scale() == 2.0**7  # the scaler did skip and back off
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    stats = train_step(False)  # the real step 2: the update happens now, on finite gradients
    assert sp.step_count == 2
    if algorithm is not srigl.Static:
        assert stats is not None and not stats.get("skipped")
    # Forgetting optimizer.step() with finite gradients is still refused.
    scaler.scale(model(x).square().mean()).backward()
    with pytest.raises(StepOrderError, match="at step 2"):
        sp.step()


@pytest.mark.parametrize("algorithm_name", list(ALGORITHMS))
def test_parameters_not_in_optimizer_raise(algorithm_name):
    algorithm, kwargs = ALGORITHMS[algorithm_name]
    model = _small_model()
    optimizer = torch.optim.SGD(model[0].parameters(), lr=0.1)  # the last layer is left out
    with pytest.raises(ParameterNotInOptimizerError, match=r"1 of 2 sparse tensors .*\['2\.weight'\]"):
        algorithm(model, optimizer, 0.5, TOTAL_STEPS, **kwargs)
