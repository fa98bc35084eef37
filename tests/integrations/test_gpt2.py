"""Hugging Face GPT-2 (the real transformers library, a tiny model built from a config; nothing is
downloaded): its attention and MLP projections are ``Conv1D`` layers whose weight is stored
``(in, out)``. srigl sparsifies them by default with the fan-in counted per output neuron (a column
of the stored weight), ablates output neurons and never inputs, condenses them into
``CondensedLinear`` layers that give the same logits, and resumes them from a checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
from transformers.pytorch_utils import Conv1D

import srigl
from srigl.condensed import CondensedLinear
from srigl.integrations.huggingface import SPARSIFIER_FILE, SparsityCallback

VOCAB, SEQ = 100, 12


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def conv1d_weights(model) -> list[str]:
    return [n + ".weight" for n, m in model.named_modules() if isinstance(m, Conv1D)]


def build(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    # Updates every 2 steps until step 18; gamma_sal 0.6 ablates neurons at these tiny sizes.
    sparsifier = srigl.SRigL(model, optimizer, sparsity=0.5, total_steps=24, delta=2, gamma_sal=0.6)
    return sparsifier, optimizer


def train(model, sparsifier, optimizer, steps: int, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        tokens = torch.randint(0, VOCAB, (4, SEQ), generator=generator)
        model(tokens, labels=tokens).loss.backward()
        optimizer.step()
        sparsifier.step()
        optimizer.zero_grad()


@pytest.fixture(scope="module")
def trained():
    model = tiny_gpt2()
    sparsifier, optimizer = build(model)
    train(model, sparsifier, optimizer, 12)
    return model, sparsifier


def test_every_conv1d_is_selected_by_default_and_read_transposed():
    model = tiny_gpt2()
    names = conv1d_weights(model)
    assert len(names) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 2 blocks
    decisions = {c.name: c for c in srigl.selection.select(model, srigl.SparsityPolicy())}
    for name in names:
        assert decisions[name].sparse and decisions[name].transposed, (name, decisions[name].reason)
        assert decisions[name].view.rows_shape == model.get_parameter(name).shape[::-1]


def test_after_ablating_updates_every_output_neuron_has_one_fan_in_and_no_input_is_ablated(trained):
    model, sparsifier = trained
    assert sparsifier.step_count == 12 and sparsifier.last_update["step"] == 12
    masks = sparsifier.masks()
    ablated_total = 0
    for name in conv1d_weights(model):
        mask = masks[name]  # (in, out), as stored
        weight = model.get_parameter(name)
        assert mask.shape == weight.shape
        assert not weight[~mask].any(), name  # the mask is applied to the stored parameter
        per_output = mask.sum(dim=0)  # (out,): fan-in of each output neuron
        active = per_output > 0
        assert per_output[active].unique().numel() == 1, (name, per_output.unique())
        # Ablation empties columns (outputs); every input still feeds some neuron.
        assert bool(mask.any(dim=1).all()), (name, int((~mask.any(dim=1)).sum()))
        summary = sparsifier.summary()[name]
        assert summary["neurons"] == weight.shape[1] and summary["dense_fan_in"] == weight.shape[0]
        assert summary["active_neurons"] == int(active.sum()) and summary["fan_in"] == int(per_output[active][0])
        ablated_total += int((~active).sum())
    assert ablated_total > 0, "no neuron was ablated: the test would not tell outputs from inputs"


def test_condensed_gpt2_gives_the_sparse_models_logits(trained):
    model, _ = trained
    model = copy.deepcopy(model).eval()
    tokens = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(7))
    condensed, report = srigl.condense(model, return_report=True)
    for name in conv1d_weights(model):
        module_name = name.removesuffix(".weight")
        assert isinstance(condensed.get_submodule(module_name), CondensedLinear), module_name
        assert report["layers"][module_name]["converted_from"] == "Conv1D"
    with torch.no_grad():
        expected, got = model(tokens).logits, condensed(tokens).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_checkpoint_round_trip_resumes_the_same_masks_and_weights(tmp_path):
    model = tiny_gpt2()
    sparsifier, optimizer = build(model)
    train(model, sparsifier, optimizer, 5)
    srigl.save_checkpoint(tmp_path / "ckpt.pt", srigl.training_state(model, optimizer, sparsifier))
    train(model, sparsifier, optimizer, 6, seed=2)  # updates at steps 6, 8, 10

    resumed = tiny_gpt2(seed=3)
    resumed_sparsifier, resumed_optimizer = build(resumed)
    state = srigl.load_checkpoint(tmp_path / "ckpt.pt")
    srigl.restore_training_state(state, resumed, resumed_optimizer, resumed_sparsifier)
    train(resumed, resumed_sparsifier, resumed_optimizer, 6, seed=2)
    for name, mask in sparsifier.masks().items():
        assert torch.equal(mask, resumed_sparsifier.masks()[name]), name
    for name, param in model.named_parameters():
        torch.testing.assert_close(resumed.get_parameter(name), param, rtol=0, atol=0, msg=name)


def test_trainer_with_the_callback_sparsifies_gpt2_per_output_neuron(tmp_path):
    """The README's Hugging Face route on a GPT-2 (it used to find no sparsifiable tensor)."""
    model = tiny_gpt2()
    generator = torch.Generator().manual_seed(1)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, VOCAB, (8, SEQ), generator=generator)]
    callback = SparsityCallback("srigl", 0.8, delta=1, gamma_sal=0.6)
    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, save_steps=4, learning_rate=3e-3,
        report_to=[], use_cpu=True, logging_strategy="no", disable_tqdm=True, seed=0,
    )
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    sparsifier = callback.sparsifier
    assert sparsifier.step_count == 4 and sparsifier.last_update["step"] == 2  # t_end = 3
    assert set(conv1d_weights(model)) <= set(sparsifier.masks())
    for name in conv1d_weights(model):
        per_output = sparsifier.masks()[name].sum(dim=0)  # (out,)
        assert per_output[per_output > 0].unique().numel() == 1, name
    assert (tmp_path / "checkpoint-4" / SPARSIFIER_FILE).is_file()
