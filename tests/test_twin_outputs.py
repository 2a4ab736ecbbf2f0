"""Product-twin attention seen from the model: attention maps (``output_attentions``) and refused attention types."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from conftest import tiny_model
from test_adaptwin import LLAMA, WHISPER, _compress, _llama_biased, _with_biases

from hf_compress.methods.adaptwin import ProductTwinConfig


def test_output_attentions_path_matches_sdpa() -> None:
    model = _compress(_with_biases(tiny_model(WHISPER)), ProductTwinConfig(rank=5))
    layer = model.model.decoder.layers[0].self_attn
    x = torch.randn(2, 6, 48)
    a, none = layer(x)
    b, weights = layer(x, output_attentions=True)
    assert none is None and weights.shape == (2, 4, 6, 6)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert torch.allclose(weights.triu(1), torch.zeros(()))  # causal


@pytest.mark.parametrize("make", [lambda: _with_biases(tiny_model(WHISPER)), _llama_biased], ids=["whisper", "llama"])
def test_model_output_attentions_returns_the_twins_maps(make) -> None:
    """``model(..., output_attentions=True)`` on an eager model: full-rank twins give the dense model's maps."""
    model = make()
    model.config._attn_implementation = "eager"  # the implementation whose dense attentions are returned
    for sub in model.modules():
        if isinstance(getattr(sub, "config", None), transformers.PretrainedConfig):
            sub.config._attn_implementation = "eager"
    arch = WHISPER if "Whisper" in type(model).__name__ else LLAMA
    dense = copy.deepcopy(model)
    _compress(model, ProductTwinConfig(rank_ratio=1.0))
    inputs = arch.inputs()
    with torch.no_grad():
        want, got = dense(**inputs, output_attentions=True), model(**inputs, output_attentions=True)
    keys = ["encoder_attentions", "decoder_attentions", "cross_attentions"] if arch is WHISPER else ["attentions"]
    for key in keys:
        assert len(getattr(got, key)) == len(getattr(want, key)) == 2, key
        for a, b in zip(getattr(got, key), getattr(want, key)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_attention_with_qk_norms_is_refused_with_the_reason() -> None:
    cfg = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    with pytest.raises(TypeError, match=r"q_norm/k_norm.*LowRankConfig"):
        _compress(transformers.Qwen3ForCausalLM(cfg), ProductTwinConfig(rank_ratio=0.5), r"self_attn$")


@pytest.mark.parametrize("kv_len", [3, 5])
def test_twin_attention_paths_agree_on_a_causal_continuation_without_mask(kv_len: int) -> None:
    """Causal, no mask, 3 queries over ``kv_len`` keys (a continuation with a cache): both paths put query i at
    position kv_len - 3 + i (the SDPA path used the first 3 keys only, the eager path bottom-right alignment)."""
    from hf_compress.layers.twin_attention import TwinAttention

    torch.manual_seed(0)
    layer = TwinAttention(embed_dim=8, num_heads=2, num_kv_heads=2, qk_rank=4, vo_rank=4, scaling=0.5,
                          is_causal=True, family="llama", out_name="o_proj").eval()
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, kv_len, 4), torch.randn(1, 2, kv_len, 4)
    keep = torch.ones(3, kv_len, dtype=torch.bool).tril(kv_len - 3)
    reference = torch.softmax((q @ k.transpose(2, 3)).masked_fill(~keep, float("-inf")), -1) @ v
    fast, _ = layer._attend(q, k, v, None, False)
    eager, weights = layer._attend(q, k, v, None, True)
    assert torch.allclose(fast, reference, atol=1e-6) and torch.allclose(eager, reference, atol=1e-6)
    assert torch.equal(weights[..., ~keep], torch.zeros_like(weights[..., ~keep]))
