"""Run inside a clean virtualenv holding only the srigl wheel and its core dependencies.

Imports srigl, trains a tiny model a few steps with srigl.SRigL, condenses it and checks the condensed
model computes what the masked one does (through the C++ kernel, or the fallback with its warning).

Usage: ``python wheel_smoke.py TORCH_VERSION``, the ``torch.__version__`` the caller installed on purpose
(``2.13.0+cpu`` from tests/test_wheel.py; ``2.13.0+cu130`` from .ci/test_matrix.sh, where PyPI has no CPU
build for that Python). A CPU build must come without the nvidia-* packages: pip did not choose CUDA.
"""

import importlib.metadata
import importlib.util
import sys
import warnings

import torch
from torch import nn

import srigl

expected_torch = sys.argv[1]
assert torch.__version__ == expected_torch, f"torch {torch.__version__} was installed, not {expected_torch}"
if torch.version.cuda is None:
    cuda_packages = [d.metadata["Name"] for d in importlib.metadata.distributions()
                     if d.metadata["Name"].startswith("nvidia")]
    assert not cuda_packages, f"CUDA packages were pulled beside the CPU torch: {cuda_packages}"
for optional in ("tqdm", "matplotlib", "onnx", "transformers"):  # core install only
    assert importlib.util.find_spec(optional) is None, f"{optional} is installed but is not a core dependency"

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
sparsifier = srigl.SRigL(model, optimizer, sparsity=0.8, total_steps=10, delta=3)
for _ in range(10):
    x = torch.randn(16, 32)  # (batch, features)
    nn.functional.cross_entropy(model(x), x[:, :4].argmax(1)).backward()
    optimizer.step()
    sparsifier.step()
    optimizer.zero_grad()

model.eval()
condensed = srigl.condense(model)
x = torch.randn(8, 32)
with warnings.catch_warnings(record=True) as caught, torch.no_grad():
    warnings.simplefilter("always")
    gap = (condensed(x) - model(x)).abs().max().item()
for warning in caught:
    print(f"warning: {warning.message}")
assert gap < 1e-4, f"condensed and masked models differ by {gap}"
print(f"wheel smoke ok: srigl {srigl.__version__ if hasattr(srigl, '__version__') else ''} torch {torch.__version__} gap {gap:.2e}")
