"""Attention with reduced per-head query/key (``r_qk``) and value/output (``r_vo``) widths (AdaPTwin product twins).

:class:`TwinAttention` replaces a Hugging Face ``WhisperAttention`` or Llama-style attention module (same call
signature and ``(output, attn_weights)`` return) and computes attention itself, because the HF classes reshape with
``self.head_dim``. Its ``q_proj``/``k_proj``/``v_proj`` and output projection are plain ``nn.Linear`` (narrower
``out``/``in`` features), so PEFT LoRA targets them unchanged. Caches (``DynamicCache``, ``EncoderDecoderCache``
with cross-attention reuse), boolean or additive masks, GQA and RoPE (``position_embeddings``) are supported.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..registry import register_layer

FAMILIES = ("whisper", "llama")


def _active_outputs() -> dict[str, list] | None:
    """The outputs transformers is collecting in this forward (``output_attentions=True`` etc.), or ``None``."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # other transformers versions: the layer's own output_attentions argument only
        return None
    return _active_collector.get()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@register_layer
class TwinAttention(nn.Module):
    """Multi-head attention whose heads use ``qk_rank`` query/key dims and ``vo_rank`` value dims.

    Shapes: ``q_proj.weight [num_heads·qk_rank, embed_dim]``, ``k_proj.weight [num_kv_heads·qk_rank, kv_dim]``,
    ``v_proj.weight [num_kv_heads·vo_rank, kv_dim]``, ``<out_name>.weight [embed_dim, num_heads·vo_rank]``.
    Scores are ``(q·scaling)·kᵀ`` (``scaling`` is the dense model's ``head_dim^-0.5``); with ``rope`` the query and
    key heads (then ``qk_rank == head_dim``) are rotated by the ``position_embeddings`` ``(cos, sin)`` the decoder
    layer passes.
    """

    layer_type = "twin_attention"

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int, qk_rank: int, vo_rank: int,
                 scaling: float, kv_dim: int | None = None, family: str = "whisper", out_name: str = "out_proj",
                 q_bias: bool = True, k_bias: bool = False, v_bias: bool = False, o_bias: bool = True,
                 rope: bool = False, is_causal: bool = False, is_decoder: bool = False, layer_idx: int | None = None,
                 dropout: float = 0.0, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if family not in FAMILIES:
            raise ValueError(f"hf_compress: TwinAttention family must be one of {FAMILIES}, got {family!r}.")
        if num_heads % num_kv_heads:
            raise ValueError(f"hf_compress: TwinAttention: num_heads {num_heads} is not a multiple of num_kv_heads "
                             f"{num_kv_heads}.")
        if min(qk_rank, vo_rank) < 1:
            raise ValueError(f"hf_compress: TwinAttention ranks must be >= 1, got qk={qk_rank}, vo={vo_rank}.")
        kv_dim = kv_dim or embed_dim
        self.embed_dim, self.kv_dim, self.family, self.out_name = embed_dim, kv_dim, family, out_name
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.num_key_value_groups = num_heads // num_kv_heads
        self.qk_rank, self.vo_rank, self.scaling = qk_rank, vo_rank, float(scaling)
        self.rope, self.is_causal, self.is_decoder, self.layer_idx = rope, is_causal, is_decoder, layer_idx
        self.dropout = dropout
        kw = {"device": device, "dtype": dtype}
        self.q_proj = nn.Linear(embed_dim, num_heads * qk_rank, bias=q_bias, **kw)
        self.k_proj = nn.Linear(kv_dim, num_kv_heads * qk_rank, bias=k_bias, **kw)
        self.v_proj = nn.Linear(kv_dim, num_kv_heads * vo_rank, bias=v_bias, **kw)
        setattr(self, out_name, nn.Linear(num_heads * vo_rank, embed_dim, bias=o_bias, **kw))

    @property
    def head_dim(self) -> int:
        """Query/key width per head (what HF code reading ``attn.head_dim`` for the scores expects)."""
        return self.qk_rank

    def _heads(self, x: torch.Tensor, batch: int, heads: int, dim: int) -> torch.Tensor:
        """``[batch, seq, heads·dim] -> [batch, heads, seq, dim]`` (a different-batch input folds into seq)."""
        return x.view(batch, -1, heads, dim).transpose(1, 2).contiguous()

    def forward(self, hidden_states: torch.Tensor, key_value_states: torch.Tensor | None = None,
                cache: Any = None, attention_mask: torch.Tensor | None = None, output_attentions: bool = False,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                past_key_values: Any = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``hidden_states [batch, seq, embed_dim]`` (``key_value_states [batch, src, kv_dim]`` for
        cross-attention) -> ``(output [batch, seq, embed_dim], attention weights or None)``."""
        from transformers.cache_utils import EncoderDecoderCache

        cache = cache if cache is not None else past_key_values
        batch, seq = hidden_states.shape[:2]
        is_cross = key_value_states is not None
        query = self._heads(self.q_proj(hidden_states) * self.scaling, batch, self.num_heads, self.qk_rank)
        is_updated = False
        if cache is not None and isinstance(cache, EncoderDecoderCache):
            is_updated = cache.is_updated.get(self.layer_idx)
            if is_cross:
                cache.is_updated[self.layer_idx] = True
                cache = cache.cross_attention_cache
            else:
                cache = cache.self_attention_cache
        current = key_value_states if is_cross else hidden_states
        if is_cross and cache is not None and is_updated:
            key, value = cache.layers[self.layer_idx].keys, cache.layers[self.layer_idx].values
        else:
            key = self._heads(self.k_proj(current), batch, self.num_kv_heads, self.qk_rank)
            value = self._heads(self.v_proj(current), batch, self.num_kv_heads, self.vo_rank)
            if self.rope:
                if position_embeddings is None:
                    raise ValueError("hf_compress: TwinAttention(rope=True) needs the decoder layer's "
                                     "`position_embeddings=(cos, sin)`; call it from its HF decoder layer.")
                cos, sin = (t.unsqueeze(1) for t in position_embeddings)
                query = query * cos + _rotate_half(query) * sin
                key = key * cos + _rotate_half(key) * sin
            if cache is not None:
                key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
        # output_attentions=True on the model: transformers 5 collects the weights through hooks on its own
        # attention classes only, so a twin computes and hands in its weights itself
        capture = "cross_attentions" if is_cross else "attentions"
        collected = _active_outputs()
        wanted = collected is not None and capture in collected
        out, weights = self._attend(query, key, value, attention_mask, output_attentions or wanted)
        if wanted:
            collected[capture].append(weights)
        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.vo_rank)
        return getattr(self, self.out_name)(out), weights

    def _attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                output_attentions: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``query [b, H, q, r_qk]``, ``key [b, Hkv, k, r_qk]``, ``value [b, Hkv, k, r_vo]`` -> ``[b, H, q, r_vo]``."""
        if self.num_key_value_groups > 1:
            key = key.repeat_interleave(self.num_key_value_groups, dim=1)
            value = value.repeat_interleave(self.num_key_value_groups, dim=1)
        if mask is not None and mask.ndim == 4:
            mask = mask[:, :, :, : key.shape[-2]]
        p = self.dropout if self.training else 0.0
        q_len, kv_len = query.shape[2], key.shape[2]
        causal = self.is_causal and mask is None and q_len > 1
        # causal without a mask: query i sits at position kv_len - q_len + i (the last query sees every key; SDPA's
        # is_causal aligns top-left, so a longer key sequence gets the explicit mask)
        keep = (torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
                if causal and (output_attentions or kv_len > q_len) else None)
        if not output_attentions:
            out = nn.functional.scaled_dot_product_attention(
                query, key, value, attn_mask=mask if keep is None else keep, dropout_p=p,
                is_causal=causal and keep is None, scale=1.0)
            return out, None
        scores = query @ key.transpose(2, 3)
        if keep is not None:
            scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
        if mask is not None:
            scores = (scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool
                      else scores + mask)
        weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        weights = nn.functional.dropout(weights, p=p, training=self.training)
        return weights @ value, weights

    def spec(self) -> dict[str, Any]:
        out = getattr(self, self.out_name)
        return {"type": self.layer_type, "embed_dim": self.embed_dim, "kv_dim": self.kv_dim,
                "num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads, "qk_rank": self.qk_rank,
                "vo_rank": self.vo_rank, "scaling": self.scaling, "family": self.family, "out_name": self.out_name,
                "q_bias": self.q_proj.bias is not None, "k_bias": self.k_proj.bias is not None,
                "v_bias": self.v_proj.bias is not None, "o_bias": out.bias is not None, "rope": self.rope,
                "is_causal": self.is_causal, "is_decoder": self.is_decoder, "layer_idx": self.layer_idx,
                "dropout": self.dropout}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> TwinAttention:
        args = {k: v for k, v in spec.items() if k != "type"}
        return cls(**args)

    def extra_repr(self) -> str:
        return (f"family={self.family}, heads={self.num_heads}, kv_heads={self.num_kv_heads}, "
                f"qk_rank={self.qk_rank}, vo_rank={self.vo_rank}, rope={self.rope}")
