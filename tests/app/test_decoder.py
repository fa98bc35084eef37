"""GPT-2-style decoder: cached token-by-token logits (both caches) equal a full forward; the untied
head is a sparse output layer; real size on meta."""

from __future__ import annotations

import copy

import pytest
import torch

import srigl
from srigl.app.decoder import Decoder, KVCache, gpt2_small
from srigl.condensed import CondensedLinear
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


@pytest.mark.parametrize("tie_head", [True, False])
def test_preallocated_cache_steps_give_the_full_forward_logits_in_place(tie_head):
    torch.manual_seed(0)
    model = Decoder(**TINY, tie_head=tie_head).eval()
    tokens = torch.randint(0, 37, (2, 9))
    with torch.no_grad():
        full, _ = model(tokens)  # (2, 9, 37)
        cache = model.new_cache(2, capacity=10)
        buffers = [k.data_ptr() for k in cache.keys]
        logits, returned = model(tokens[:, :4], cache)  # prompt
        assert returned is cache and cache.length == 4
        steps = [logits]
        for t in range(4, 9):
            logits, cache = model(tokens[:, t : t + 1], cache)
            steps.append(logits)
        # The same as the functional cache, which concatenates.
        _, pairs = model(tokens)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 9 and cache.capacity == 10 and [k.data_ptr() for k in cache.keys] == buffers
    for (k, v), (k_ref, v_ref) in zip(cache.pairs(), pairs):
        assert k.shape == (2, 4, 9, 8)
        torch.testing.assert_close(k, k_ref, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(v, v_ref, atol=1e-6, rtol=1e-6)
    # Rewinding: the step at position 8 computed again over the same buffers gives the same logits.
    cache.length = 8
    with torch.no_grad():
        again, _ = model(tokens[:, 8:9], cache)
    torch.testing.assert_close(again, steps[-1], atol=0, rtol=0)


def test_preallocated_cache_refuses_steps_past_its_capacity():
    model = Decoder(**TINY).eval()
    cache = model.new_cache(1, capacity=5)
    assert isinstance(cache, KVCache)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), cache)
        with pytest.raises(ContextLengthError, match="exceed the KVCache's capacity 5"):
            model(torch.zeros(1, 2, dtype=torch.long), cache)
    assert cache.length == 4  # nothing written by the refused call


def test_untied_sparse_head_is_the_condensed_output_layer_and_matches_the_masked_model():
    torch.manual_seed(0)
    model = Decoder(**TINY, tie_head=False)
    assert model.lm_head.weight is not model.token_embed.weight
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    sparsifier = srigl.SRigL(model, optimizer, sparsity=0.9, total_steps=100, delta=1, gamma_sal=0.95)
    tokens = torch.randint(0, 37, (2, 9))
    logits, _ = model(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    optimizer.step()
    sparsifier.step()  # an update with ablation
    head = sparsifier.summary()["lm_head.weight"]
    assert head["sparse"] and head["active_neurons"] == 37  # the output layer is never ablated
    sparsifier.remove_hooks()
    model.eval()
    condensed = srigl.condense(copy.deepcopy(model)).eval()
    assert isinstance(condensed.lm_head, CondensedLinear) and condensed.lm_head.fan_in < 32
    with torch.no_grad():
        expected, _ = model(tokens)
        got, _ = condensed(tokens)
        cache = condensed.new_cache(2)
        condensed(tokens[:, :5], cache)
        step, _ = condensed(tokens[:, 5:6], cache)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(step[:, 0], expected[:, 5], atol=1e-5, rtol=1e-5)


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
    with torch.device("meta"):
        untied = gpt2_small(tie_head=False)
    assert sum(p.numel() for p in untied.parameters()) == 124_439_808 + 768 * 50257
