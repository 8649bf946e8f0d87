"""Sequence-parallel training forward of a VideoDiT: shard the token sequence over the SP group, loss per shard.

    embed (replicated) -> this rank's tail-padded slice of tokens and RoPE -> blocks, whose self-attention cores
    exchange over the SP group (Ulysses / context parallel) -> head on the local tokens -> loss on the local tokens

Gradient convention (DeepSpeed's, see ``SLAStrategy``): every rank's gradient is its *share*, and the shares of an
SP group sum to the full gradient; ZeRO sums over SP and averages over DP. That holds because each rank's loss is the
sum of its own tokens' errors over the *global* token count, the slice is a plain index (its backward puts zeros
elsewhere, no collective), and the replicated conditioning (timestep, text) only reaches the loss through local
tokens. The target is brought into the head's token layout by ``target_tokens``, so nothing is gathered.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention import SparseLinearAttention
from ..models import VideoDiT
from ..models.layers import DenseAttention, SelfAttention
from ..parallel import SequenceParallelGroups, SequenceParallelSLA, SequenceShard
from ..parallel.exchange import fused_ulysses
from ..parallel.groups import ensure_deepspeed_comm
from ..parallel.ulysses import EXCHANGES
from ..parallel.sharding import check_same_sequence, pad_along, valid_length


class ShardedDense:
    """Dense softmax attention over a sequence sharded across the SP group (Ulysses all-to-all, no ring split).
    Like SequenceParallelSLA it is a plain callable (``SelfAttention.parallel``), not a module, and takes the same
    ``exchange`` (``EXCHANGES``): the fused one (traced as functional collectives under torch.compile) or
    DeepSpeed's."""

    def __init__(self, groups: SequenceParallelGroups, exchange: str = "fused") -> None:
        if groups.ring_degree > 1:
            raise ValueError(f"dense attention layers under sequence parallelism need ring_degree=1, not "
                             f"{groups.ring_degree}; convert every layer to SLA or use pure Ulysses")
        if exchange not in EXCHANGES:
            raise ValueError(f"exchange={exchange!r} is not one of {EXCHANGES}")
        from deepspeed.sequence.layer import DistributedAttention

        ensure_deepspeed_comm()
        self.groups = groups
        self.exchange = exchange
        self.distributed = DistributedAttention(self._local, groups.ulysses_group, scatter_idx=2, gather_idx=1)

    def __deepcopy__(self, memo: dict) -> "ShardedDense":
        # process groups are communicator handles: copies (EMA, teacher) share them
        return type(self)(self.groups, self.exchange)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sp_size={self.groups.sp_size}, exchange={self.exchange!r})"

    def _local(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_len: int) -> torch.Tensor:
        """[B, L_padded, H/U, D] after DeepSpeed's exchange; padded keys must not enter the softmax."""
        full = q.shape[1]
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
        return pad_along(self._attend_valid(q, k, v, seq_len), 2, full).transpose(1, 2)

    @staticmethod
    def _attend_valid(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_len: int) -> torch.Tensor:
        """[B, h, L_padded, D] -> attention over (and of) the first ``seq_len`` tokens, [B, h, seq_len, D]."""
        return F.scaled_dot_product_attention(q[:, :, :seq_len], k[:, :, :seq_len], v[:, :, :seq_len])

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_len: int | None = None) -> torch.Tensor:
        """This rank's shard [B, H, L_local, D] of a sequence with ``seq_len`` valid tokens (None: no padding)."""
        seq_len = valid_length(seq_len, q.shape[2], self.groups.sp_size)
        if self.exchange == "fused":
            return fused_ulysses(self.groups.ulysses_group, q, k, v,
                                 lambda *qkv: self._attend_valid(*qkv, seq_len))
        out = self.distributed(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0, None, seq_len=seq_len)
        return out.transpose(1, 2)


def enable_sequence_parallel(model: VideoDiT, groups: SequenceParallelGroups) -> int:
    """Run every self-attention core of ``model`` sequence-parallel; returns how many were newly enabled.

    The cores stay in place (``SelfAttention.parallel`` runs them over the shards), so the model's parameter names
    and state_dict keys do not change: checkpoints move between SP sizes as they are."""
    enabled = 0
    for module in model.modules():
        if not isinstance(module, SelfAttention) or module.parallel is not None:
            continue
        if isinstance(module.core, SparseLinearAttention):
            module.parallel = SequenceParallelSLA(module.core, groups)
        elif isinstance(module.core, DenseAttention):
            module.parallel = ShardedDense(groups)
        else:
            raise ValueError(f"cannot run attention core {type(module.core).__name__} sequence-parallel")
        enabled += 1
    return enabled


def target_tokens(model: VideoDiT, target: torch.Tensor, tiling) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, L, p_t p_h p_w C] in the head's output layout and token order (inverse of unembed)."""
    B, C = target.shape[:2]
    (T, H, W), (pt, ph, pw) = model.token_grid((B, model.config.in_channels, *target.shape[2:])), \
        model.config.patch_size
    x = target.reshape(B, C, T, pt, H, ph, W, pw).permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(B, T * H * W, -1)
    return x if tiling is None else tiling.tile(x, dim=1)


@dataclass
class LocalPrediction:
    """A model's prediction on this rank's tokens, in the head's token layout."""

    tokens: torch.Tensor
    """[B, L_local, p_t p_h p_w C_out]; rows past ``mask`` are padding."""
    mask: torch.Tensor | None
    """[L_local] bool, True on real tokens; None when the sequence is not sharded."""
    shard: SequenceShard | None
    tiling: object
    grid: tuple[int, int, int]

    def localize(self, model: VideoDiT, latents_like: torch.Tensor) -> torch.Tensor:
        """This rank's tokens of a [B, C, T, H, W] tensor (e.g. the target), in the same layout."""
        x = target_tokens(model, latents_like, self.tiling)
        return x if self.shard is None else self.shard.local_piece(self.shard.pad_to_padded(x, 1), 1)

    def sq_error(self, other: torch.Tensor) -> torch.Tensor:
        """Sum over this rank's real tokens of (prediction - other)^2, in float32."""
        err = (self.tokens.float() - other.float()) ** 2
        return (err if self.mask is None else err * self.mask[None, :, None]).sum()


def predict_local(model: VideoDiT, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                  groups: SequenceParallelGroups | None) -> LocalPrediction:
    """Run ``model`` with its token sequence sharded over ``groups``' SP group (unsharded for sp_size 1)."""
    inputs = model.embed(latents, timestep, text)
    if groups is None or groups.sp_size == 1:
        x = model.forward_blocks(inputs.tokens, inputs)
        return LocalPrediction(model.head_tokens(x, inputs.t_emb), None, None, inputs.tiling, inputs.grid)
    seq_len = inputs.tokens.shape[1]
    frames, height, width = inputs.grid
    check_same_sequence(groups.sp_group, groups.device, batch=inputs.tokens.shape[0], frames=frames, height=height,
                        width=width, tokens=seq_len)
    shard = SequenceShard.for_group(seq_len, groups.sp_group)
    tokens = shard.local_piece(shard.pad_to_padded(inputs.tokens, 1), 1)
    inputs.rope = tuple(shard.local_piece(shard.pad_to_padded(t, 0), 0) for t in inputs.rope)
    x = model.forward_blocks(tokens, inputs, seq_len)
    return LocalPrediction(model.head_tokens(x, inputs.t_emb), shard.valid_mask(x.device), shard, inputs.tiling,
                           inputs.grid)


def predict_full(model: VideoDiT, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                 groups: SequenceParallelGroups | None) -> torch.Tensor:
    """The whole prediction [B, C_out, T, H, W] on every rank (shards gathered over the SP group): for sampling."""
    pred = predict_local(model, latents, timestep, text, groups)
    tokens = pred.tokens if pred.shard is None else pred.shard.gather(pred.tokens, 1)
    if pred.tiling is not None:
        tokens = pred.tiling.untile(tokens, dim=1)
    return model.unpatchify(tokens, pred.grid)
