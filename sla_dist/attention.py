"""The SparseLinearAttention module: block-map prediction, both branches and the learnable projection proj_l."""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import SLAConfig
from .kernels.block_map import BlockMap, predict_block_map
from .kernels.op import check_inputs, sla_branches, sparse_linear_attention
from .kernels.projection import plain_linear
from .kernels.reference import sla_branches_ref


class SparseLinearAttention(nn.Module):
    """Sparse-Linear Attention over q, k, v of shape [B, H, L, D].

    The constructor mirrors the public SLA module (``head_dim, topk, feature_map, BLKQ, BLKK, use_bf16,
    tie_feature_map_qk``) and its state_dict keys (``proj_l.weight``, ``proj_l.bias``), so checkpoints move between
    the two. ``proj_l`` starts at zero: a fresh layer is pure block-sparse attention until fine-tuning teaches the
    linear branch what to add.

    Args:
        head_dim: D.
        topk: fraction of key blocks per query block computed exactly (at least one).
        feature_map: phi of the linear branch: 'softmax', 'elu' or 'relu'.
        BLKQ, BLKK: query / key block sizes (64 or 128 / 64).
        use_bf16: float32 inputs on CUDA run the kernels in bfloat16 (else float16) and are cast back.
        tie_feature_map_qk: kept for compatibility; the feature maps here have no parameters, so q and k always
            share phi.
        negligible: fraction of key blocks per query block skipped entirely.
        linear_scope: 'marginal' (paper), 'all' (public main branch) or 'none' (sparse branch only).
        linear_sums: 'save' (the kernels' backward reads the linear branch's sums the forward made) or 'recompute'
            (it makes them again: less memory held between forward and backward); see SLAConfig.linear_sums.
        dkdv_split: 'env' (SLA_DIST_DKDV_SPLIT decides), 'long' or 'off': whether the kernels' dK/dV splits long
            query-block lists, worth it for skewed block maps such as a video DiT's; see SLAConfig.dkdv_split.
        backend: 'auto' (Triton on CUDA, dense reference on CPU), 'triton' or 'reference'.
    """

    def __init__(
        self,
        head_dim: int,
        topk: float = 0.05,
        feature_map: str = "softmax",
        BLKQ: int = 64,
        BLKK: int = 64,
        use_bf16: bool = True,
        tie_feature_map_qk: bool = True,
        *,
        negligible: float = 0.10,
        linear_scope: str = "marginal",
        linear_sums: str = "save",
        dkdv_split: str = "env",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if head_dim <= 0:
            raise ValueError(f"head_dim={head_dim} must be positive")
        self.config = SLAConfig(topk=topk, negligible=negligible, block_q=BLKQ, block_k=BLKK,
                                feature_map=feature_map, linear_scope=linear_scope, linear_sums=linear_sums,
                                dkdv_split=dkdv_split, backend=backend)
        self.head_dim = head_dim
        self.use_bf16 = use_bf16
        self.tie_feature_map_qk = tie_feature_map_qk
        self.proj_l = nn.Linear(head_dim, head_dim)
        nn.init.zeros_(self.proj_l.weight)
        nn.init.zeros_(self.proj_l.bias)

    @classmethod
    def from_config(cls, head_dim: int, config: SLAConfig, **kwargs) -> "SparseLinearAttention":
        return cls(head_dim, config.topk, config.feature_map, config.block_q, config.block_k,
                   negligible=config.negligible, linear_scope=config.linear_scope, linear_sums=config.linear_sums,
                   dkdv_split=config.dkdv_split, backend=config.backend, **kwargs)

    def extra_repr(self) -> str:
        c = self.config
        return (f"head_dim={self.head_dim}, topk={c.topk}, negligible={c.negligible}, block=({c.block_q}, "
                f"{c.block_k}), feature_map={c.feature_map!r}, linear_scope={c.linear_scope!r}, "
                f"linear_sums={c.linear_sums!r}, dkdv_split={c.dkdv_split!r}, backend={c.backend!r}")

    def uses_kernels(self, device: torch.device) -> bool:
        return self.config.backend == "triton" or (self.config.backend == "auto" and device.type == "cuda")

    def run_dtype(self, q: torch.Tensor) -> torch.dtype:
        """The dtype the layer computes in: float32 inputs on CUDA run the kernels in bfloat16 (``use_bf16``) or
        float16; everything else in its own dtype."""
        if q.dtype == torch.float32 and q.device.type == "cuda" and self.uses_kernels(q.device):
            return torch.bfloat16 if self.use_bf16 else torch.float16
        return q.dtype

    def _prepare(self, q: torch.Tensor, k: torch.Tensor,
                 v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, BlockMap]:
        """q, k, v checked and cast to the run dtype, and their block map."""
        check_inputs(q, k, v, kernel=self.uses_kernels(q.device))
        if q.shape[-1] != self.head_dim:
            raise ValueError(f"q has head dim {q.shape[-1]} but this layer was built with head_dim={self.head_dim}")
        dtype = self.run_dtype(q)
        if q.dtype != dtype:  # a call into the dispatcher per tensor even when it returns the tensor itself
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        c = self.config
        block_map = predict_block_map(q, k, topk=c.topk, negligible=c.negligible, block_q=c.block_q,
                                      block_k=c.block_k)
        return q, k, v, block_map

    def branches(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, BlockMap]:
        """(o_s, o_l, lse, block_map) before projection, for callers that merge attention parts by LSE.

        q [B, H, Lq, D], k, v [B, H, Lk, D]; o_s, o_l [B, H, Lq, D] in the run dtype (float32 inputs on CUDA run in
        bfloat16 / float16, see ``use_bf16``), o_l None for linear_scope 'none', lse [B, H, Lq] float32."""
        c = self.config
        if self.uses_kernels(q.device):
            branches = functools.partial(sla_branches, linear_sums=c.linear_sums, dkdv_split=c.dkdv_split,
                                         inputs_checked=True)
        else:
            branches = sla_branches_ref
        q, k, v, block_map = self._prepare(q, k, v)
        o_s, o_l, lse = branches(q, k, v, block_map, feature_map=c.feature_map, linear_scope=c.linear_scope)
        return o_s, o_l, lse, block_map

    def fuses_projection(self, device: torch.device) -> bool:
        """Whether ``forward`` applies proj_l inside the Triton forward kernel (no separate GEMM and add): when the
        kernels run, the linear branch is on, and proj_l is a plain ``nn.Linear`` that nothing expects to be called.

        Anything that hooks proj_l's forward or replaces the module (an adapter) keeps the unfused path, which calls
        proj_l as a module. ZeRO-3 is one: it partitions parameters and gathers a module's own ones only around that
        module's forward (hooks), so proj_l's weight is whole while proj_l is called (``project``) and an empty
        partition (with a ``ds_id``) when this layer reads it directly. Gathering it with this layer instead
        (``deepspeed.zero.register_external_parameter``) would let ZeRO-3 fuse too, once checked on GPUs."""
        return plain_linear(self.proj_l) and self.uses_kernels(device) and self.config.linear_scope != "none"

    def project(self, o_l: torch.Tensor) -> torch.Tensor:
        """proj_l(O_l) in O_l's dtype. proj_l is called as a module (not through its weight) so that wrappers that
        gather parameters in module hooks, such as ZeRO-3, see it used.

        Half-precision O_l is projected in its own dtype (autocast casts the [D, D] weight, not the [B, H, L, D]
        activation): upcasting O_l to a float32 weight cost two full-size casts and a float32 GEMM off the tensor
        cores, more than half a millisecond at L = 32K on an H200."""
        weight_dtype = self.proj_l.weight.dtype
        if o_l.dtype == weight_dtype or torch.is_autocast_enabled(o_l.device.type):
            return self.proj_l(o_l)
        if o_l.dtype in (torch.float16, torch.bfloat16):
            with torch.autocast(o_l.device.type, dtype=o_l.dtype):
                return self.proj_l(o_l)
        return self.proj_l(o_l.to(weight_dtype)).to(o_l.dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_sparsity: bool = False):
        """q, k, v: [B, H, L, D] -> [B, H, L, D] (and the realised block sparsity if ``return_sparsity``)."""
        if self.fuses_projection(q.device):
            c = self.config
            q_run, k_run, v_run, block_map = self._prepare(q, k, v)
            out = sparse_linear_attention(q_run, k_run, v_run, block_map, self.proj_l.weight, self.proj_l.bias,
                                          feature_map=c.feature_map, linear_scope=c.linear_scope,
                                          linear_sums=c.linear_sums, dkdv_split=c.dkdv_split, inputs_checked=True)
        else:
            out, o_l, _, block_map = self.branches(q, k, v)
            if o_l is not None:
                out = out + self.project(o_l)
        if out.dtype != q.dtype:
            out = out.to(q.dtype)
        if return_sparsity:
            return out, 1.0 - block_map.critical_fraction()
        return out


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full softmax attention, the baseline SLA replaces (and what it equals at topk = 1 with proj_l = 0)."""
    return F.scaled_dot_product_attention(q, k, v)


def relative_l1(output: torch.Tensor, reference: torch.Tensor) -> float:
    """sum|output - reference| / sum|reference| in float32."""
    reference = reference.float()
    return float((output.float() - reference).abs().sum() / reference.abs().sum().clamp_min(1e-30))
