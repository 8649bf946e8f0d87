"""SLA attention processors for diffusers video transformers (optional: ``pip install -e '.[diffusers]'``).

Each converted attention module gets an ``sla`` submodule (a :class:`~sla_dist.SparseLinearAttention`, holding
``proj_l``) and a stateless processor that reads it, so the parameters live in the model's state_dict under
``...attn1.sla.proj_l.*`` while processors stay plain, swappable objects as diffusers expects.

This module is imported only by :func:`sla_dist.models.patch.apply_sla` once a diffusers model is passed in.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .joint_attention import sla_with_dense_keys
from .sites import PatchConfig, new_sla
from .rope import apply_rope

try:
    from diffusers.models.embeddings import apply_rotary_emb as _cogvideox_rope
except ImportError as error:  # pragma: no cover - only without the optional extra
    raise ImportError("SLA for diffusers models needs diffusers: pip install -e '.[diffusers]'") from error


def _convert(attns: list[nn.Module], head_dim: int, config: PatchConfig, processor) -> list[int]:
    if any(hasattr(attn, "sla") for attn in attns):
        raise ValueError("apply_sla() was already applied to this model")
    chosen = config.select(len(attns))
    for i in chosen:
        attns[i].add_module("sla", new_sla(head_dim, config.sla, attns[i]))
        attns[i].set_processor(processor)
    return chosen


def _no_mask(attention_mask) -> None:
    if attention_mask is not None:
        raise NotImplementedError("SLA self-attention does not take an attention_mask (got one of shape "
                                  f"{tuple(attention_mask.shape)})")


class WanSLAProcessor:
    """Wan self-attention with SLA, in the stock processor's order: to_q/k/v -> norm_q/k -> heads -> RoPE ->
    attention -> to_out."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, rotary_emb=None) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise NotImplementedError("WanSLAProcessor serves self-attention (attn1) only; got encoder states")
        _no_mask(attention_mask)
        if getattr(attn, "fused_projections", False):
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        heads = (attn.heads, -1)
        q = attn.norm_q(q).unflatten(2, heads)
        k = attn.norm_k(k).unflatten(2, heads)
        v = v.unflatten(2, heads)
        if rotary_emb is not None:
            # Wan's tables are [1, L, 1, D] with each pair's value repeated; pairs rotate interleaved, as ours.
            freqs_cos, freqs_sin = rotary_emb
            cos, sin = freqs_cos[0, :, 0, 0::2].float(), freqs_sin[0, :, 0, 1::2].float()
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = self.attend(attn, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), rotary_emb)
        o = o.transpose(1, 2).flatten(2).type_as(q)
        return attn.to_out[1](attn.to_out[0](o))

    def attend(self, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary_emb) -> torch.Tensor:
        """The attention core on [B, H, L, D] (after RoPE): the layer's SLA. Sequence parallelism overrides it
        (``sla_dist.lightning.sequence_diffusers``), reading the valid length from ``rotary_emb``."""
        return attn.sla(q, k, v)


class CogVideoXSLAProcessor:
    """CogVideoX joint attention with SLA on the video part: text rows attend densely to every key; video rows
    attend densely to the text keys and with SLA to the video keys, merged exactly by LSE (joint_attention.py)."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        _no_mask(attention_mask)
        text_len = encoder_hidden_states.size(1)
        x = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        B, L, _ = x.shape
        q, k, v = (proj(x).view(B, L, attn.heads, -1).transpose(1, 2) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:
            q = torch.cat([q[:, :, :text_len], _cogvideox_rope(q[:, :, text_len:], image_rotary_emb)], dim=2)
            k = torch.cat([k[:, :, :text_len], _cogvideox_rope(k[:, :, text_len:], image_rotary_emb)], dim=2)
        (q_t, q_v), (k_t, k_v), (v_t, v_v) = (t.split([text_len, L - text_len], dim=2) for t in (q, k, v))
        o_text = F.scaled_dot_product_attention(q_t, k, v)
        o_video = sla_with_dense_keys(attn.sla, q_v, k_v, v_v, k_t, v_t)
        o = torch.cat([o_text, o_video], dim=2).transpose(1, 2).flatten(2)
        o = attn.to_out[1](attn.to_out[0](o))
        return o[:, text_len:], o[:, :text_len]


def patch_wan(model: nn.Module, config: PatchConfig) -> list[int]:
    """Convert ``blocks.*.attn1`` of a diffusers WanTransformer3DModel; cross-attention (attn2) stays dense."""
    attns = [block.attn1 for block in model.blocks]
    return _convert(attns, attns[0].inner_dim // attns[0].heads, config, WanSLAProcessor())


def patch_cogvideox(model: nn.Module, config: PatchConfig) -> list[int]:
    """Convert ``transformer_blocks.*.attn1`` of a diffusers CogVideoXTransformer3DModel."""
    attns = [block.attn1 for block in model.transformer_blocks]
    return _convert(attns, attns[0].to_q.out_features // attns[0].heads, config, CogVideoXSLAProcessor())
