"""srigl.integrations.huggingface.SparsityCallback under the real transformers.Trainer (tiny models
built from configs, in-memory data, CPU; nothing is downloaded)."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch
from transformers import (
    BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments,
)

import srigl
from srigl.integrations.huggingface import SPARSIFIER_FILE, SparsityCallback

VOCAB, SEQ = 50, 8


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=SEQ, num_labels=2,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def dataset(n: int = 16) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=generator)
    return [{"input_ids": ids[i], "labels": ids[i, 0] % 2} for i in range(n)]


def trainer_for(model, out, callback, max_steps=8, save_steps=4, **args) -> Trainer:
    # 16 examples in batches of 2, two batches per optimizer step: 4 optimizer steps per epoch.
    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        save_steps=save_steps, learning_rate=1e-3, report_to=[], use_cpu=True, logging_strategy="no",
        disable_tqdm=True, seed=0, **args,
    )
    return Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[callback])


def callback(**kw) -> SparsityCallback:
    return SparsityCallback("srigl", 0.8, delta=1, **kw)  # t_end = 6 of 8 steps: updates at steps 1 to 5


def masks_obeyed(model, sparsifier) -> None:
    for name, mask in sparsifier.masks().items():
        assert not model.get_parameter(name)[~mask].any(), name


def test_callback_builds_on_the_trainers_model_and_steps_once_per_optimizer_step(tmp_path):
    model, cb = tiny_bert(), callback()
    trainer = trainer_for(model, tmp_path, cb, save_steps=100)
    trainer.train()
    sp = cb.sparsifier
    assert sp.model is model
    assert sp.optimizer is trainer.optimizer.optimizer  # accelerate's AcceleratedOptimizer, unwrapped
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    assert sp.total_steps == 8 and sp.schedule.t_end == 6
    assert sp.step_count == trainer.state.global_step == 8  # 16 backward passes, 8 optimizer steps
    assert sp.last_update["step"] == 5 and sum(v["grown"] for v in sp.last_update["layers"].values()) > 0
    assert "bert.encoder.layer.0.attention.self.query.weight" in sp.masks()
    assert abs(sp.global_sparsity() - 0.8) < 0.02  # constant fan-in rounds down per neuron on tiny layers
    masks_obeyed(model, sp)


def test_checkpoint_holds_the_sparsifier_and_resume_gives_the_uninterrupted_masks(tmp_path):
    straight_model, straight = tiny_bert(), callback()
    trainer_for(straight_model, tmp_path / "straight", straight).train()

    first_model, first = tiny_bert(), callback()
    trainer_for(first_model, tmp_path / "resumed", first, max_steps=8).train()
    saved_file = tmp_path / "resumed" / "checkpoint-4" / SPARSIFIER_FILE
    assert saved_file.is_file() and (tmp_path / "resumed" / "checkpoint-8" / SPARSIFIER_FILE).is_file()
    saved = torch.load(saved_file, weights_only=True)
    assert saved["step"] == 4

    # A new process would build everything anew: a fresh model, trainer and callback, resumed at step 4.
    resumed_model, resumed = tiny_bert(), callback()
    trainer = trainer_for(resumed_model, tmp_path / "resumed", resumed)
    trainer.train(resume_from_checkpoint=str(tmp_path / "resumed" / "checkpoint-4"))
    assert resumed.sparsifier.step_count == 8
    straight_masks, resumed_masks = straight.sparsifier.masks(), resumed.sparsifier.masks()
    assert straight_masks.keys() == resumed_masks.keys()
    for name in straight_masks:
        assert torch.equal(straight_masks[name], resumed_masks[name]), name
    # The masks changed after the checkpoint (update at step 5), so the test compares something.
    assert any(not torch.equal(saved["masks"][n], straight_masks[n]) for n in straight_masks)
    for name, param in straight_model.named_parameters():
        torch.testing.assert_close(resumed_model.get_parameter(name), param, msg=name)
    masks_obeyed(resumed_model, resumed.sparsifier)


def test_resume_without_the_sparsifier_file_is_refused_by_name(tmp_path):
    trainer_for(tiny_bert(), tmp_path, callback(), max_steps=4).train()
    (tmp_path / "checkpoint-4" / SPARSIFIER_FILE).unlink()
    trainer = trainer_for(tiny_bert(), tmp_path, callback())
    with pytest.raises(srigl.CheckpointError, match=r"resumes at step 4, but .*checkpoint-4/srigl_sparsifier.pt"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-4"))


def test_a_checkpoint_elsewhere_is_read_through_resume_from(tmp_path):
    first = callback()
    trainer_for(tiny_bert(), tmp_path / "a", first, max_steps=4).train()
    resumed = callback(resume_from=tmp_path / "a" / "checkpoint-4")
    trainer_for(tiny_bert(), tmp_path / "b", resumed).train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    assert resumed.sparsifier.step_count == 8


def test_skipped_step_is_recognised_and_not_counted(tmp_path):
    """A step whose gradients overflowed is skipped by the gradient scaler (no optimizer step); the
    callback's sparsifier.step() then counts it as skipped, not as a training step."""
    model, cb = tiny_bert(), callback()
    trainer = trainer_for(model, tmp_path, cb, max_steps=4, save_steps=100)
    inner = None

    class Overflow(TrainerCallback):  # what a GradScaler does on overflow: inf gradients, no step taken
        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
            nonlocal inner
            if state.global_step == 1:
                model.classifier.weight.grad.fill_(float("inf"))
                inner = cb.sparsifier.optimizer
                inner.step, self.real_step = (lambda *a, **k: None), inner.step

        def on_optimizer_step(self, args, state, control, **kwargs):
            if state.global_step == 1:
                del inner.step  # the optimizer's own step again

    trainer.add_callback(Overflow())
    trainer.train()
    assert cb.sparsifier.skipped_steps == 1
    assert cb.sparsifier.step_count == 3 and trainer.state.global_step == 4


def test_bert_linear_layers_are_selected_by_the_default_policy():
    """BERT's projections are nn.Linear, stored (out, fan_in): the default policy selects them, read
    as they are stored (GPT-2's Conv1D, stored transposed: tests/integrations/test_gpt2.py)."""
    model = tiny_bert()
    decisions = {c.name: c for c in srigl.selection.select(model, srigl.SparsityPolicy())}
    linear = {n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert linear and all(decisions[n].sparse and not decisions[n].transposed for n in linear)


def readme_example(which: int) -> str:
    """The ``which``-th python block of the README's "Hugging Face and Lightning" section."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Hugging Face and Lightning"):]
    return re.findall(r"```python\n(.*?)```", section, re.S)[which]


def test_readme_example_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it writes to "out"
    namespace = {"model": tiny_bert(), "data": dataset()}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(readme_example(0), "README.md", "exec"), namespace)
    sp = namespace["callback"].sparsifier
    assert sp.step_count == namespace["trainer"].state.global_step > 0
    assert "bert.encoder.layer.0.attention.self.query.weight" in printed.getvalue()  # the summary table
    assert list((tmp_path / "out").glob(f"checkpoint-*/{SPARSIFIER_FILE}"))
