"""srigl.integrations.lightning.SparsityCallback under the real lightning.pytorch.Trainer (a tiny
LightningModule, in-memory data, CPU)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import lightning
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import srigl
from srigl.integrations.lightning import CHECKPOINT_KEY, SparsityCallback


class TinyModule(lightning.LightningModule):
    def __init__(self, optimizers: int = 1):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
        self.n_optimizers = optimizers
        if optimizers > 1:
            self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        if self.n_optimizers > 1:
            self.manual_backward(loss)
            for optimizer in self.optimizers():
                optimizer.step()
                optimizer.zero_grad()
        return loss

    def configure_optimizers(self):
        if self.n_optimizers > 1:
            return [torch.optim.SGD(self.net[0].parameters(), lr=0.1), torch.optim.SGD(self.net[2:].parameters(), lr=0.1)]
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def loader() -> DataLoader:
    # 8 batches of 4; with accumulate_grad_batches=2: 4 optimizer steps per epoch.
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(32, 16, generator=generator)
    return DataLoader(TensorDataset(x, (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()), batch_size=4)


def trainer_for(callbacks, max_epochs=2, **kw) -> lightning.Trainer:
    kw.setdefault("enable_checkpointing", False)
    kw.setdefault("accumulate_grad_batches", 2)
    return lightning.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, **kw,
    )


def callback(**kwargs) -> SparsityCallback:
    # 8 steps, t_end = 8: updates at steps 1 to 7, so three come after the first epoch's checkpoint (a
    # single late update may regrow every dropped weight in place).
    return SparsityCallback("srigl", 0.8, **{"delta": 1, "t_end": 8, **kwargs})


def masks_obeyed(module, sparsifier) -> None:
    for name, mask in sparsifier.masks().items():
        assert not module.get_parameter(name)[~mask].any(), name


def test_callback_builds_on_the_module_and_steps_once_per_optimizer_step():
    module, cb = TinyModule(), callback()
    trainer = trainer_for([cb])
    trainer.fit(module, loader())
    sp = cb.sparsifier
    assert sp.model is module and sp.optimizer is trainer.strategy.optimizers[0]
    assert sp.total_steps == 8 and sp.schedule.t_end == 8  # 16 batches / 2 accumulated
    assert sp.step_count == trainer.global_step == 8
    assert sp.last_update["step"] == 7 and sum(v["grown"] for v in sp.last_update["layers"].values()) > 0
    assert set(sp.masks()) == {"net.0.weight", "net.2.weight", "net.4.weight"}
    masks_obeyed(module, sp)


def test_checkpoint_holds_the_sparsifier_and_fit_from_it_gives_the_uninterrupted_masks(tmp_path):
    straight_module, straight = TinyModule(), callback()
    trainer_for([straight], max_epochs=2).fit(straight_module, loader())

    first = callback()
    checkpoints = ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    trainer_for([first, checkpoints], max_epochs=2, enable_checkpointing=True).fit(TinyModule(), loader())
    path = tmp_path / "epoch=0.ckpt"
    saved = torch.load(path, weights_only=False)[CHECKPOINT_KEY]
    assert saved["step"] == 4

    resumed_module, resumed = TinyModule(), callback()
    trainer_for([resumed], max_epochs=2).fit(resumed_module, loader(), ckpt_path=str(path))
    assert resumed.sparsifier.step_count == 8
    straight_masks, resumed_masks = straight.sparsifier.masks(), resumed.sparsifier.masks()
    assert straight_masks.keys() == resumed_masks.keys()
    for name in straight_masks:
        assert torch.equal(straight_masks[name], resumed_masks[name]), name
    assert any(not torch.equal(saved["masks"][n], straight_masks[n]) for n in straight_masks)  # steps 5-7 updated
    for name, param in straight_module.named_parameters():
        torch.testing.assert_close(resumed_module.get_parameter(name), param, msg=name)
    masks_obeyed(resumed_module, resumed.sparsifier)


def test_a_checkpoint_without_the_sparsifier_is_refused_by_name(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="dense")
    trainer_for([checkpoints], max_epochs=1, enable_checkpointing=True).fit(TinyModule(), loader())
    with pytest.raises(srigl.CheckpointError, match="no 'srigl_sparsifier' entry"):
        trainer_for([callback()]).fit(TinyModule(), loader(), ckpt_path=str(tmp_path / "dense.ckpt"))


def test_bf16_mixed_on_cpu_trains_with_valid_masks():
    module, cb = TinyModule(), callback(t_end=None)
    trainer = trainer_for([cb], max_epochs=1, precision="bf16-mixed")
    trainer.fit(module, loader())
    sp = cb.sparsifier
    assert sp.step_count == 4 and sp.last_update["step"] == 2  # 4 steps: t_end = 3
    assert all(p.dtype == torch.float32 for p in module.parameters())  # autocast: the weights stay fp32
    for name, mask in sp.masks().items():
        n_rows = mask.shape[0]
        fan_in = mask.reshape(n_rows, -1).sum(dim=1)
        alive = fan_in[fan_in > 0]
        assert (alive == alive[0]).all(), f"{name}: fan-in not constant {fan_in.tolist()}"
    masks_obeyed(module, sp)


def test_several_optimizers_are_refused_with_the_way_out():
    with pytest.raises(srigl.InvalidConfigError, match="got a list of 2: build one sparsifier per optimizer"):
        # Several optimizers need manual optimization, which Lightning runs without gradient accumulation.
        trainer_for([callback()], max_epochs=1, accumulate_grad_batches=1).fit(TinyModule(optimizers=2), loader())


def test_an_unknown_method_is_refused_when_the_callback_is_made():
    with pytest.raises(srigl.InvalidConfigError, match="unknown algorithm 'rigl2'"):
        SparsityCallback("rigl2")


def readme_example(which: int) -> str:
    """The ``which``-th python block of the README's "Hugging Face and Lightning" section."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Hugging Face and Lightning"):]
    return re.findall(r"```python\n(.*?)```", section, re.S)[which]


def test_readme_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default logger and checkpoints write under the working directory
    namespace = {"module": TinyModule(), "loader": loader()}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(readme_example(1), "README.md", "exec"), namespace)
    sp = namespace["callback"].sparsifier
    assert sp.step_count == namespace["trainer"].global_step == 20  # 10 epochs of 8 batches, 4 accumulated
    assert "net.0.weight" in printed.getvalue()  # the summary table
    checkpoint = next(tmp_path.rglob("*.ckpt"))
    assert torch.load(checkpoint, weights_only=False)[CHECKPOINT_KEY]["step"] == 20
