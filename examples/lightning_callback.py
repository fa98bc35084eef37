"""A LightningModule trained with srigl.integrations.lightning.SparsityCallback (pip install 'srigl[integrations]').

Shows: the callback builds SRigL on the trainer's model and optimizer, takes total_steps from the
trainer, and its summary reports the sparsity reached. Set SRIGL_EXAMPLE_TINY=1 for a seconds-long run.
"""

import os

import lightning
import torch
from torch import nn

from srigl.integrations.lightning import SparsityCallback

tiny = os.environ.get("SRIGL_EXAMPLE_TINY") == "1"


class Classifier(lightning.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 4))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


torch.manual_seed(0)
x = torch.randn(256 if tiny else 4096, 32)  # (samples, features)
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :4].argmax(1)), batch_size=32)
callback = SparsityCallback("srigl", sparsity=0.9, delta=4)
trainer = lightning.Trainer(max_epochs=2 if tiny else 10, callbacks=[callback], logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
trainer.fit(Classifier(), loader)
print(callback.sparsifier.summary())
weight = trainer.lightning_module.net[0].weight
print(f"layer 0 zero fraction {(weight == 0).float().mean().item():.3f}")
if (weight == 0).float().mean().item() < 0.8:  # ERK gives the first layer more than the 90 % average
    raise SystemExit("the callback did not sparsify the first layer")
