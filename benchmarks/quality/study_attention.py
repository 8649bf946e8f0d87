"""Per-layer attention error of the quality study: each self-attention site's output against full attention on the
same q, k, v, taken from a real forward pass of the model (forward hooks on ``block.self_attn.core``).

Before fine-tuning the model is the dense pretrained one and the candidates are fresh layers of each variant (what
conversion puts there); after fine-tuning each converted model is measured against full attention on its own q, k, v.
"""

from __future__ import annotations

import zlib
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from sla_dist import SparseLinearAttention
from sla_dist.sampling import TIMESTEP_SCALE

Site = Callable[[int, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def relative_l2(output: torch.Tensor, reference: torch.Tensor) -> float:
    """||output - reference|| / ||reference|| over the whole tensor, in float32."""
    reference = reference.float()
    return float((output.float() - reference).norm() / reference.norm().clamp_min(1e-30))


@torch.no_grad()
def visit_attention(model: nn.Module, latents: torch.Tensor, text: torch.Tensor, visit: Site, seed: int = 0) -> None:
    """One forward of ``model`` (a VideoDiT) on held-out ``latents`` [N, C, T, H, W] noised to levels spread over
    (0, 1) (clip i at sigma (i + 0.5) / N, seeded noise), calling ``visit(layer, core, q, k, v, out)`` at every
    self-attention site. Runs under bf16 autocast on CUDA, as training does."""
    n = latents.shape[0]
    sigma = ((torch.arange(n, dtype=torch.float32) + 0.5) / n).to(latents.device)
    generator = torch.Generator().manual_seed(zlib.crc32(f"attention-error,{seed}".encode()))
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    s = sigma.view(-1, 1, 1, 1, 1)
    handles = [block.self_attn.core.register_forward_hook(
        lambda core, args, out, i=i: visit(i, core, args[0], args[1], args[2], out))
        for i, block in enumerate(model.blocks)]
    try:
        with torch.autocast(latents.device.type, dtype=torch.bfloat16, enabled=latents.device.type == "cuda"):
            model((1 - s) * latents + s * noise, sigma * TIMESTEP_SCALE, text)
    finally:
        for handle in handles:
            handle.remove()


def candidate_errors(model: nn.Module, latents: torch.Tensor, text: torch.Tensor,
                     candidates: dict[str, Callable[[torch.device], nn.Module]]) -> dict[str, dict[str, list[float]]]:
    """{name: {'error': per-layer relative L2 vs full attention, 'sparsity': per-layer realised block sparsity
    (SLA candidates only)}} of a fresh layer ``candidates[name](device)`` run on each site's q, k, v."""
    found: dict[str, dict[str, list[float]]] = {name: {"error": [], "sparsity": []} for name in candidates}

    def visit(layer, core, q, k, v, out):
        reference = F.scaled_dot_product_attention(q, k, v)
        for name, make in candidates.items():
            candidate = make(q.device)
            if isinstance(candidate, SparseLinearAttention):
                o, sparsity = candidate(q, k, v, return_sparsity=True)
                found[name]["sparsity"].append(float(sparsity))
            else:
                o = candidate(q, k, v)
            found[name]["error"].append(relative_l2(o, reference))

    visit_attention(model, latents, text, visit)
    return {name: {k: v for k, v in r.items() if v} for name, r in found.items()}


def own_errors(model: nn.Module, latents: torch.Tensor, text: torch.Tensor) -> list[float]:
    """Per-layer relative L2 of each site's own output vs full attention on its q, k, v."""
    errors: list[float] = []
    visit_attention(model, latents, text,
                    lambda layer, core, q, k, v, out: errors.append(
                        relative_l2(out, F.scaled_dot_product_attention(q, k, v))))
    return errors
