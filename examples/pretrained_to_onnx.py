"""From a pretrained dense model to a sparse ONNX file: magnitude-initialised SRigL fine-tuning,
condensing, ONNX export, and a check that ONNX Runtime computes what torch computes.

Steps: (1) "pretrain" a dense MLP briefly on a synthetic task and save its state dict, as a
downloaded checkpoint would be; (2) load it into a fresh model and fine-tune it sparse with
``srigl.SRigL(..., mask_init="magnitude")``, whose first masks keep each neuron's largest pretrained
weights instead of a random pick; (3) ``srigl.condense`` it; (4) ``srigl.export_onnx`` it and run the
file in onnxruntime. Needs ``pip install 'srigl[export]'``. Set SRIGL_EXAMPLE_TINY=1 for a seconds-long run.
"""

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

import srigl
from srigl._optional import require

ort = require("onnxruntime", "examples/pretrained_to_onnx.py")
tiny = os.environ.get("SRIGL_EXAMPLE_TINY") == "1"
steps = 30 if tiny else 2_000
torch.manual_seed(0)
teacher = torch.randn(64, 10)  # the task: 10 classes told apart by a random linear map of 64 features


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def train(model: nn.Module, steps: int, sparsifier_kwargs: dict | None = None) -> float:
    """Plain SGD on the synthetic task; sparse (SRigL) when ``sparsifier_kwargs`` is given. Returns accuracy."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sparsifier = None if sparsifier_kwargs is None else srigl.SRigL(model, optimizer, total_steps=steps, **sparsifier_kwargs)
    for _ in range(steps):
        x = torch.randn(128, 64)  # (batch, features)
        nn.functional.cross_entropy(model(x), (x @ teacher).argmax(1)).backward()
        optimizer.step()
        if sparsifier is not None:
            sparsifier.step()  # after optimizer.step(), before zero_grad()
        optimizer.zero_grad()
    x = torch.randn(2048, 64)
    with torch.no_grad():
        return (model(x).argmax(1) == (x @ teacher).argmax(1)).float().mean().item()


with tempfile.TemporaryDirectory() as tmp:
    # (1) The "pretrained" checkpoint.
    pretrained = make_model()
    print(f"dense pretrained accuracy {train(pretrained, steps):.3f}")
    torch.save(pretrained.state_dict(), Path(tmp) / "pretrained.pt")

    # (2) Load it and fine-tune sparse, the first masks chosen by the pretrained magnitudes.
    model = make_model()
    model.load_state_dict(torch.load(Path(tmp) / "pretrained.pt", weights_only=True))
    accuracy = train(model, steps, dict(sparsity=0.9, mask_init="magnitude", delta=max(steps // 10, 1)))
    print(f"90 % sparse fine-tuned accuracy {accuracy:.3f}")

    # (3) Condense, (4) export and run in ONNX Runtime.
    model.eval()
    condensed = srigl.condense(model)
    path = srigl.export_onnx(condensed, torch.randn(1, 64), Path(tmp) / "sparse.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(32, 64)
    (onnx_out,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        torch_out = condensed(x)
        gap = (torch.from_numpy(onnx_out) - torch_out).abs().max().item()
        masked_gap = (torch_out - model(x)).abs().max().item()
    print(f"ONNX file {path.stat().st_size / 1024:.0f} KiB; condensed vs masked max |diff| {masked_gap:.2e}")
    print(f"onnxruntime vs torch max |diff| {gap:.2e}")
    if gap > 1e-4 or masked_gap > 1e-4:
        raise SystemExit(f"outputs disagree: onnxruntime vs torch {gap}, condensed vs masked {masked_gap}")
