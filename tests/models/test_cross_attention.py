"""Cross-attention over few keys with query chunks folded into the batch (layers.few_key_attention)."""

import pytest
import torch
import torch.nn.functional as F

from sla_dist.models.layers import CrossAttention, few_key_attention, query_chunks


def _inputs(q_len, k_len, dtype, device="cpu", heads=3, head_dim=16):
    # q as the DiT holds it: a [B, H, L, D] view of a token-major [B, L, H, D] tensor.
    q = torch.randn(2, q_len, heads, head_dim, device=device, dtype=dtype).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(2, heads, k_len, head_dim, device=device, dtype=dtype).requires_grad_() for _ in "kv")
    return q, k, v


@pytest.mark.parametrize("q_len,chunks", [(45, 1), (45, 3), (45, 5), (45, 15), (64, 8), (63, 7)])
def test_matches_sdpa_in_float64(q_len, chunks):
    torch.manual_seed(q_len * 17 + chunks)
    q, k, v = _inputs(q_len, 11, torch.float64)
    grad = torch.randn(q.shape, dtype=torch.float64)
    got = few_key_attention(q, k, v, chunks)
    want = F.scaled_dot_product_attention(q, k, v)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got_grads = torch.autograd.grad(got, (q, k, v), grad)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    for name, g, w in zip("qkv", got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-11, atol=1e-11, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("chunks", [0, -2, 4])
def test_rejects_chunks_that_do_not_divide(chunks):
    q, k, v = _inputs(45, 5, torch.float32)
    with pytest.raises(ValueError, match=f"chunks={chunks} .* query length 45"):
        few_key_attention(q, k, v, chunks)


def test_query_chunks_off_cuda():
    assert query_chunks(1, 12, 32760, 512, torch.device("cpu")) == 1


@pytest.mark.gpu
def test_query_chunks_on_cuda():
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    # 12 heads x 8 key tiles = 96 programs, under 4x the SMs of any recent data-centre GPU.
    assert query_chunks(1, 12, 32760, 512, device) == (8 if 96 < 4 * sms else 1)
    assert query_chunks(1, 12, 28665, 512, device) == (7 if 96 < 4 * sms else 1)
    # Too few queries per chunk (fewer than 4x the keys): no folding; enough programs already: no folding.
    assert query_chunks(1, 12, 2048, 512, device) == 1
    assert query_chunks(64, 12, 32760, 512, device) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_compiled_matches_unfolded(dtype):
    torch.manual_seed(0)
    layer = CrossAttention(256, 2, 1e-6).cuda().to(dtype)
    x = torch.randn(1, 4095, 256, device="cuda", dtype=dtype, requires_grad=True)
    text = torch.randn(1, 77, 256, device="cuda", dtype=dtype)
    compiled = torch.compile(layer, fullgraph=True)
    got = compiled(x, text)
    got.float().square().sum().backward()
    got_dx = x.grad.clone()
    x.grad = None
    q, k, v = layer.q(x), *layer.kv(text).chunk(2, dim=-1)
    heads = (2, -1)
    q = layer.norm_q(q).unflatten(-1, heads).transpose(1, 2)
    k = layer.norm_k(k).unflatten(-1, heads).transpose(1, 2)
    want = layer.out(F.scaled_dot_product_attention(q, k, v.unflatten(-1, heads).transpose(1, 2))
                     .transpose(1, 2).flatten(2))
    want.float().square().sum().backward()
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got_dx, x.grad, rtol=5e-2, atol=5e-2)
