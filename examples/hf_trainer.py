"""A Hugging Face ``transformers.Trainer`` run with srigl.integrations.huggingface.SparsityCallback.

Shows: the callback builds SRigL on the Trainer's own model and optimizer when training begins, takes
``total_steps`` from the Trainer (``max_steps``), steps once per optimizer step, and its summary
reports the sparsity reached. The model is a small BERT classifier built from a ``BertConfig``
(random weights, nothing downloaded) on a synthetic task: the label is the parity of the first token.
Needs ``pip install 'srigl[integrations]'``. Set SRIGL_EXAMPLE_TINY=1 for a seconds-long run.
"""

import os
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from srigl.integrations.huggingface import SparsityCallback

tiny = os.environ.get("SRIGL_EXAMPLE_TINY") == "1"
vocab, length = 100, 16
torch.manual_seed(0)
config = BertConfig(vocab_size=vocab, hidden_size=32 if tiny else 128, num_hidden_layers=1 if tiny else 4,
                    num_attention_heads=2 if tiny else 4, intermediate_size=64 if tiny else 512,
                    max_position_embeddings=length, num_labels=2)
model = BertForSequenceClassification(config)

tokens = torch.randint(0, vocab, (64 if tiny else 4096, length))  # (examples, sequence)
dataset = [{"input_ids": ids, "labels": ids[0] % 2} for ids in tokens]
callback = SparsityCallback("srigl", sparsity=0.9, delta=2 if tiny else 50)
with tempfile.TemporaryDirectory() as out:
    args = TrainingArguments(output_dir=out, max_steps=8 if tiny else 1_000, per_device_train_batch_size=16,
                             learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, seed=0)
    Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback]).train()

for name, entry in callback.sparsifier.summary().items():
    if entry.get("sparse"):
        print(f"{name}: sparsity {entry['sparsity']:.3f}, fan-in {entry['fan_in']}, "
              f"{entry['active_neurons']}/{entry['neurons']} neurons active")
weight = model.bert.encoder.layer[0].intermediate.dense.weight
zero = (weight == 0).float().mean().item()
print(f"steps taken by the sparsifier {callback.sparsifier.step_count}")
print(f"encoder FFN zero fraction {zero:.3f}")
if callback.sparsifier.step_count != args.max_steps or zero < 0.5:
    raise SystemExit("the callback did not step once per optimizer step, or did not sparsify the FFN")
