"""Sequence parallelism for a diffusers ``WanTransformer3DModel``: its own forward, wrapped (DeepSpeed-Ulysses
style) rather than rewritten. :func:`enable_wan_sequence_parallel` installs, on the model:

* a forward pre-hook: the SP ranks must hold the same sequence (``check_same_sequence``); notes this forward's
  :class:`~sla_dist.parallel.SequenceShard` (tail padding to whole 128-token units per rank);
* a hook on ``rope``: the tables cut to this rank's tokens (global positions), carried as a :class:`ShardedRotary`
  that also holds the valid token count; the blocks pass it to every self-attention, also when recomputed under
  gradient checkpointing (it is an argument of the checkpointed block, not state read later);
* a hook on ``patch_embedding``: this rank's slice of the patch tokens, shaped so that the model's own
  ``flatten(2).transpose(1, 2)`` yields ``[B, L_local, C]``;
* processors on ``blocks.*.attn1``: the Ulysses all-to-all around the SLA layer (``SequenceParallelSLA``) or dense
  softmax (layers left dense), so every rank attends over the whole valid sequence for its heads; padded tokens never
  enter attention. Cross-attention (``attn2``) is untouched: its queries are local, the text is replicated;
* a hook on ``proj_out``: the output tokens gathered over the SP group, so the model returns the whole prediction on
  every rank and the user's loss is unchanged.

Gradient convention (``SLAStrategy``'s: each rank holds a share, ZeRO sums the shares over SP): the slice is a plain
index (its backward is zero elsewhere, no collective) and the gather's backward keeps this rank's slice of the
gradient of the (replicated) loss, so each parameter's gradient is the part that flows through this rank's tokens.
That requires every trainable parameter to reach the loss through the model's output, as in plain flow matching.
Every SP rank must run every forward of the model (the hooks communicate), e.g. sampling on all ranks, not rank 0.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from diffusers import WanTransformer3DModel

from ..models.diffusers import WanSLAProcessor
from ..parallel import SequenceParallelGroups, SequenceParallelSLA, SequenceShard
from ..parallel.sharding import check_same_sequence
from .sequence import ShardedDense


class ShardedRotary(tuple):
    """Wan's ``(freqs_cos, freqs_sin)`` cut to this rank's tokens, plus the valid length of the whole sequence."""

    seq_len: int

    def __new__(cls, tables, seq_len: int) -> "ShardedRotary":
        rotary = super().__new__(cls, tables)
        rotary.seq_len = seq_len
        return rotary


class WanSequenceParallelProcessor(WanSLAProcessor):
    """Wan self-attention on a sharded sequence: the stock projections, norms and RoPE on local tokens, then
    ``parallel`` (SequenceParallelSLA, or ShardedDense for a layer left dense) over the SP group."""

    def __init__(self, parallel: SequenceParallelSLA | ShardedDense) -> None:
        self.parallel = parallel

    def attend(self, attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rotary_emb) -> torch.Tensor:
        if not isinstance(rotary_emb, ShardedRotary):
            raise RuntimeError("a sequence-parallel Wan self-attention ran without the sharded rotary tables; call "
                               "the WanTransformer3DModel itself, not its blocks")
        return self.parallel(q, k, v, rotary_emb.seq_len)


class _WanShards:
    """The hooks of one model and the shard of its current forward."""

    def __init__(self, groups: SequenceParallelGroups) -> None:
        self.groups = groups
        self.shard: SequenceShard | None = None

    def __deepcopy__(self, memo: dict) -> "_WanShards":
        # process groups are communicator handles: copies of the model (EMA, teacher) share them
        return type(self)(self.groups)

    def before_forward(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        latents = args[0] if args else kwargs["hidden_states"]
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if timestep is not None and timestep.ndim == 2:
            raise NotImplementedError(f"per-token timesteps (shape {tuple(timestep.shape)}, Wan 2.2 TI2V) are not "
                                      "supported under sequence parallelism")
        batch, (frames, height, width) = latents.shape[0], (
            n // p for n, p in zip(latents.shape[2:], model.config.patch_size))
        tokens = frames * height * width
        check_same_sequence(self.groups.sp_group, latents.device, batch=batch, frames=frames, height=height,
                            width=width, tokens=tokens)
        self.shard = SequenceShard.for_group(tokens, self.groups.sp_group)

    def _local(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        return self.shard.local_piece(self.shard.pad_to_padded(x, dim), dim)

    def after_rope(self, module: nn.Module, args: tuple, tables) -> ShardedRotary:
        return ShardedRotary((self._local(t, 1) for t in tables), self.shard.seq_len)

    def after_patch_embedding(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        local = self._local(out.flatten(2), 2)  # [B, C, L_local]
        return local[:, :, None, None, :]  # the model's flatten(2).transpose(1, 2) makes it [B, L_local, C]

    def after_proj_out(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return self.shard.gather(out, 1)


def enable_wan_sequence_parallel(model: nn.Module, groups: SequenceParallelGroups) -> int:
    """Run the diffusers WanTransformer3DModel ``model`` sequence-parallel over ``groups``; returns how many
    self-attention layers were newly made sequence-parallel (0 when it already was).

    Parameter and state_dict names do not change (hooks and processors hold no parameters), so checkpoints move
    between SP sizes as they are."""
    if not isinstance(model, WanTransformer3DModel):
        raise ValueError(f"expected a diffusers WanTransformer3DModel, got {type(model).__name__}")
    if getattr(model, "_sla_sequence_parallel", None) is not None:
        return 0
    shards = _WanShards(groups)
    for block in model.blocks:
        attn = block.attn1
        sla = getattr(attn, "sla", None)
        parallel = ShardedDense(groups) if sla is None else SequenceParallelSLA(sla, groups)
        attn.set_processor(WanSequenceParallelProcessor(parallel))
    model.register_forward_pre_hook(shards.before_forward, with_kwargs=True)
    model.rope.register_forward_hook(shards.after_rope)
    model.patch_embedding.register_forward_hook(shards.after_patch_embedding)
    model.proj_out.register_forward_hook(shards.after_proj_out)
    model._sla_sequence_parallel = shards
    return len(model.blocks)
