"""GPT-2-style decoder: cached token-by-token logits equal a full forward; real size on meta."""

from __future__ import annotations

import pytest
import torch

from srigl.app.decoder import Decoder, gpt2_small
from srigl.errors import ContextLengthError

TINY = {"vocab_size": 37, "context": 16, "dim": 32, "depth": 2, "heads": 4}


def test_cached_steps_give_the_full_forward_logits():
    torch.manual_seed(0)
    model = Decoder(**TINY).eval()
    tokens = torch.randint(0, 37, (2, 9))
    with torch.no_grad():
        full, _ = model(tokens)  # (2, 9, 37)
        logits, past = model(tokens[:, :4])  # prompt
        steps = [logits]
        for t in range(4, 9):
            logits, past = model(tokens[:, t : t + 1], past)
            steps.append(logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert past[0][0].shape == (2, 4, 9, 8)


def test_generate_matches_greedy_full_forward_and_respects_the_context():
    torch.manual_seed(0)
    model = Decoder(**TINY).eval()
    out = model.generate(torch.tensor([[1, 2, 3]]), new_tokens=5)
    assert out.shape == (1, 8)
    with torch.no_grad():
        for t in range(3, 8):
            assert model(out[:, :t])[0][0, -1].argmax() == out[0, t]
    with pytest.raises(ContextLengthError, match="exceed the context length 16"):
        model.generate(torch.zeros(1, 10, dtype=torch.long), new_tokens=8)


def test_gpt2_small_real_size_on_the_meta_device():
    with torch.device("meta"):
        model = gpt2_small()
        logits, past = model(torch.zeros(1, 5, dtype=torch.long))
    assert logits.shape == (1, 5, 50257) and len(past) == 12 and past[0][0].shape == (1, 12, 5, 64)
    assert sum(p.numel() for p in model.parameters()) == 124_439_808  # GPT-2 small, tied head
