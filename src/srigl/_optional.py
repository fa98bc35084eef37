"""One owner of which pip extra provides which optional package, and of the error when one is missing.

The core imports only torch; the app, export and integrations import their packages lazily through
:func:`require`, so a missing one reads as one line naming the install command, never a traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from srigl.errors import MissingDependencyError

# Top-level import name -> (pip distribution, srigl extra that installs it).
PACKAGES: dict[str, tuple[str, str]] = {
    "tqdm": ("tqdm", "app"),
    "matplotlib": ("matplotlib", "app"),
    "safetensors": ("safetensors", "app"),
    "sklearn": ("scikit-learn", "app"),
    "onnx": ("onnx", "export"),
    "onnxruntime": ("onnxruntime", "export"),
    "onnxscript": ("onnxscript", "export"),
    "transformers": ("transformers", "integrations"),
    "accelerate": ("accelerate", "integrations"),
    "lightning": ("lightning", "integrations"),
}


def require(module: str, feature: str) -> ModuleType:
    """Import ``module`` (dotted names allowed) or raise MissingDependencyError naming the extra.

    Args:
        module: what to import, e.g. ``"tqdm.auto"`` or ``"safetensors.torch"``.
        feature: what needs it, for the message, e.g. ``"srigl train --progress"``.

    Returns:
        The imported module.
    """
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        # Only a missing package of ours is reworded; a broken install of it keeps its own error.
        if getattr(error, "name", None) not in (top, module) and top not in str(error):
            raise
        distribution, extra = PACKAGES.get(top, (top, "app"))
        raise MissingDependencyError(
            f"{feature} needs {distribution}: pip install 'srigl[{extra}]' (or pip install {distribution})"
        ) from None
