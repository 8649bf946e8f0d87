"""Load diffusers ``WanTransformer3DModel`` weights into the reference :class:`~sla_dist.models.dit.VideoDiT`.

The two models compute the same function (Wan2.1 T2V); the reference fuses projections (q|k|v in self-attention,
k|v in cross-attention) and folds the Conv3d patch embedding into a Linear, so loading is a key rename plus a few
concatenations. Works on a plain state_dict: no diffusers import and no download (bring the checkpoint).
"""

from __future__ import annotations

import torch

# reference name -> diffusers name, for tensors copied as they are ({i} is the block index).
_RENAMES = {
    "patch_embed.bias": "patch_embedding.bias",
    "text_embed.0.weight": "condition_embedder.text_embedder.linear_1.weight",
    "text_embed.0.bias": "condition_embedder.text_embedder.linear_1.bias",
    "text_embed.2.weight": "condition_embedder.text_embedder.linear_2.weight",
    "text_embed.2.bias": "condition_embedder.text_embedder.linear_2.bias",
    "time_embed.0.weight": "condition_embedder.time_embedder.linear_1.weight",
    "time_embed.0.bias": "condition_embedder.time_embedder.linear_1.bias",
    "time_embed.2.weight": "condition_embedder.time_embedder.linear_2.weight",
    "time_embed.2.bias": "condition_embedder.time_embedder.linear_2.bias",
    "time_mod.1.weight": "condition_embedder.time_proj.weight",
    "time_mod.1.bias": "condition_embedder.time_proj.bias",
    "head_modulation": "scale_shift_table",
    "head.weight": "proj_out.weight",
    "head.bias": "proj_out.bias",
}
_BLOCK_RENAMES = {
    "self_attn.norm_q.weight": "attn1.norm_q.weight",
    "self_attn.norm_k.weight": "attn1.norm_k.weight",
    "self_attn.out.weight": "attn1.to_out.0.weight",
    "self_attn.out.bias": "attn1.to_out.0.bias",
    "cross_attn.q.weight": "attn2.to_q.weight",
    "cross_attn.q.bias": "attn2.to_q.bias",
    "cross_attn.norm_q.weight": "attn2.norm_q.weight",
    "cross_attn.norm_k.weight": "attn2.norm_k.weight",
    "cross_attn.out.weight": "attn2.to_out.0.weight",
    "cross_attn.out.bias": "attn2.to_out.0.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.up.weight": "ffn.net.0.proj.weight",
    "mlp.up.bias": "ffn.net.0.proj.bias",
    "mlp.down.weight": "ffn.net.2.weight",
    "mlp.down.bias": "ffn.net.2.bias",
    "modulation": "scale_shift_table",
}
# reference name -> the diffusers projections concatenated (along the output dim) to form it.
_BLOCK_FUSED = {
    "self_attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "cross_attn.kv": ("attn2.to_k", "attn2.to_v"),
}


def video_dit_state_dict_from_wan(wan: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """Map a diffusers Wan T2V state_dict (``num_layers`` blocks) to VideoDiT's keys.

    Raises ValueError naming missing keys, or keys left over that the reference has no place for (e.g. the
    image-conditioning projections of Wan I2V)."""
    used: set[str] = set()

    def take(name: str) -> torch.Tensor:
        if name not in wan:
            raise ValueError(f"Wan state_dict has no {name!r}")
        used.add(name)
        return wan[name]

    out = {ours: take(theirs) for ours, theirs in _RENAMES.items()}
    conv = take("patch_embedding.weight")
    out["patch_embed.weight"] = conv.reshape(conv.shape[0], -1)
    for i in range(num_layers):
        for ours, theirs in _BLOCK_RENAMES.items():
            out[f"blocks.{i}.{ours}"] = take(f"blocks.{i}.{theirs}")
        for ours, parts in _BLOCK_FUSED.items():
            for kind in ("weight", "bias"):
                out[f"blocks.{i}.{ours}.{kind}"] = torch.cat([take(f"blocks.{i}.{p}.{kind}") for p in parts])
    unused = sorted(set(wan) - used)
    if unused:
        raise ValueError(f"{len(unused)} Wan keys have no place in VideoDiT, e.g. {unused[:4]}")
    return out
