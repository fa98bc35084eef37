"""The sparsifier's state dict: what it holds, and the one validator that decides whether it loads.

``load_state_dict`` and :mod:`srigl.io.checkpoint` both call :func:`check`, so a state one of them
refuses the other refuses too, with the same message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch

from srigl.errors import StateDictMismatchError

if TYPE_CHECKING:
    from srigl.sparsifier import Sparsifier

STATE_DICT_VERSION = 1

# Settings that decide what saved masks mean: a state saved with another value is refused. Missing
# keys read as these defaults, so states saved before a key existed still load.
STRICT_KEYS = {"algorithm": None, "sparsity": None, "distribution": None, "structure": None,
               "gamma_sal": None, "erk_power": 1.0, "compact": False}


def dump(sp: "Sparsifier") -> dict[str, Any]:
    """Step, generator, config, budgets, and per tensor its storage's entry: the mask (``"masks"``,
    masked tensors) or the ``(n_active, k)`` layout (``"layouts"``, compact ones, whose indices live
    in the model's own ``state_dict``)."""
    state: dict[str, Any] = {
        "version": STATE_DICT_VERSION,
        "config": sp.config(),
        "step": sp.step_count,
        "masks": {},
        "layouts": {},
        "budgets": {layer.name: layer.budget for layer in sp.layers},
        "generator": sp.generator.get_state(),
    }
    for layer in sp.layers:
        state[layer.state_key][layer.name] = layer.saved()
    return state


def check(sp: "Sparsifier", state: Any, error: type[StateDictMismatchError] = StateDictMismatchError,
          what: str = "state dict") -> None:
    """Raise ``error`` unless ``sp`` can load ``state``; changes nothing. ``what`` names the state in messages."""
    if not isinstance(state, Mapping) or "config" not in state or not ({"masks", "layouts"} & set(state)):
        raise error(f"not a srigl sparsifier {what} (no 'config' and 'masks'/'layouts' entries)")
    mine, theirs = sp.config(), state["config"]
    for key, default in STRICT_KEYS.items():
        if mine.get(key, default) != theirs.get(key, default):
            hint = (
                "; a masked-dense run is continued compact by loading it masked-dense and converting with "
                "srigl.from_masked_dense" if key == "compact" else ""
            )
            raise error(
                f"{what} was saved with {key}={theirs.get(key, default)!r}, this sparsifier has "
                f"{key}={mine.get(key, default)!r}{hint}"
            )
    for kind in ("masks", "layouts"):
        live = {layer.name for layer in sp.layers if layer.state_key == kind}
        saved = set(state.get(kind, {}))
        if live != saved:
            raise error(
                f"{what} {kind} name other tensors: missing {sorted(live - saved)[:5]}, "
                f"unexpected {sorted(saved - live)[:5]}"
            )
    budgets = state.get("budgets", {})
    problems = []
    for layer in sp.layers:
        entry = state[layer.state_key][layer.name]
        problem = layer.problem_with(entry)
        if problem is None and not isinstance(budgets.get(layer.name), int):
            problem = f"no saved budget (got {budgets.get(layer.name)!r})"
        if problem is None:
            # The saved mask must be one an update could have made with the saved budget.
            problem = layer.entry_problem(entry, sp.structure, budgets[layer.name])
        if problem is not None:
            problems.append(f"{layer.name}: {problem}")
    if problems:
        raise error(f"{what} does not fit {len(problems)} tensors: {'; '.join(problems[:5])}")


def load(sp: "Sparsifier", state: Mapping[str, Any]) -> None:
    """Check ``state`` (see :func:`check`), then put its entries, budgets and generator into ``sp``."""
    check(sp, state)
    with torch.no_grad():
        for layer in sp.layers:
            layer.load(state[layer.state_key][layer.name])
            layer.budget = int(state["budgets"][layer.name])
    sp.generator.set_state(state["generator"])
