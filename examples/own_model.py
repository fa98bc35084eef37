"""Your own model in a plain PyTorch training loop with srigl.SRigL, then condensed for inference.

Shows: the one extra line per step (sparsifier.step() after optimizer.step()), the summary, and that
srigl.condense gives a model computing what the masked one does. Set SRIGL_EXAMPLE_TINY=1 for a
seconds-long run (what tests/test_examples.py does).
"""

import os

import torch
from torch import nn

import srigl

tiny = os.environ.get("SRIGL_EXAMPLE_TINY") == "1"
steps = 20 if tiny else 2_000
torch.manual_seed(0)

# A synthetic task: 10 classes told apart by a random linear map of 64 features.
teacher = torch.randn(64, 10)
model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
sparsifier = srigl.SRigL(model, optimizer, sparsity=0.9, total_steps=steps, delta=max(steps // 10, 1))

for step in range(steps):
    x = torch.randn(128, 64)  # (batch, features)
    y = (x @ teacher).argmax(dim=1)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    sparsifier.step()  # after optimizer.step(), before zero_grad()
    optimizer.zero_grad()
print(f"final loss {loss.item():.4f}")
print(sparsifier.summary())

model.eval()
condensed = srigl.condense(model)
x = torch.randn(32, 64)
with torch.no_grad():
    gap = (condensed(x) - model(x)).abs().max().item()
print(f"condensed vs masked max |diff| {gap:.2e}")
if gap > 1e-4:
    raise SystemExit(f"condensed model disagrees with the masked one by {gap}")
