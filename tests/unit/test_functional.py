"""The pure math against float64 references and torch's kernels.

Tolerances: float32 statistics are compared at 1e-6 relative (float32 carries ~6e-8; the sums
behind them are float32 or better), float64 ones at 1e-9; normalized outputs at 1e-5 absolute
(values of order 1 in float32).
"""

from __future__ import annotations

import pytest
import torch

import syncnorm.functional as SF
from syncnorm.distributed import signature_head


def _ref_moments(x: torch.Tensor):
    """Two-pass float64 mean and biased variance (torch's multi-dim ``var`` is off by ~4e-9 at
    mean 1e8, std 1; two passes are exact to ~1e-15 there)."""
    d = x.double()
    dims = SF.reduce_dims(x)
    mean = d.mean(dims, keepdim=True)
    return mean.flatten(), (d - mean).square().mean(dims)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs() / b.double().abs()).max().item()


@pytest.mark.parametrize("shape", [(16, 3), (8, 3, 11), (4, 3, 5, 6), (2, 3, 2, 3, 4)])
def test_batch_moments_match_float64(shape):
    x = torch.randn(shape) * 3 + 5
    m = SF.batch_moments(x)
    mean, var = _ref_moments(x)
    assert int(m.count) == x.numel() // 3
    torch.testing.assert_close(m.mean, mean, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(m.var, var, rtol=1e-6, atol=1e-7)


def test_local_stats_cpu_takes_the_fused_kernel_for_moderate_data():
    x = torch.randn(8, 5, 6, 6) * 2 + 3
    mean, var, residual = SF.local_stats_cpu(x)
    assert mean.dtype == torch.float32 and residual is None  # the fused kernel's output
    ref_mean, ref_var = _ref_moments(x)
    assert (mean.double() - ref_mean).abs().max().item() < 1e-6
    assert _rel(var, ref_var) < 1e-6


def test_local_stats_cpu_is_exact_for_large_offsets_where_the_fused_kernel_is_not():
    # per-channel mean 1e4, std 1e-2: the float32 spacing at 1e4 is ~1e-3
    x = (torch.randn(64, 4, 16, 16, dtype=torch.float64) * 1e-2 + 1e4).float()
    ref_mean, ref_var = _ref_moments(x)
    mean, var, residual = SF.local_stats_cpu(x, exact=True)
    assert _rel(var, ref_var) < 1e-6
    assert ((mean + residual - ref_mean).abs() / ref_var.sqrt()).max().item() < 1e-6
    fast_mean, fast_var, _ = SF.local_stats_cpu(x)
    assert _rel(fast_var, ref_var) > 1e-5, "the case must be hard enough that the fused kernel fails"
    # what tells the engine to take the exact path: the squared offset ratio is far above the limit
    ratios = SF.offset_ratios(fast_mean.double(), fast_mean.double(), fast_var.double())
    assert ratios[1].item() > 1e11 > SF.FAST_STATS_RATIO_LIMIT ** 2 and torch.isfinite(ratios).all()
    naive = (x * x).mean((0, 2, 3)) - x.mean((0, 2, 3)) ** 2  # E[x^2] - E[x]^2 in float32
    assert _rel(naive, ref_var) > 1e-1


def _merge(chunks, shift, dtype=torch.float64):
    """What W ranks holding ``chunks`` compute: each fills a payload, the sum is merged."""
    c = chunks[0].shape[1]
    head = torch.tensor(signature_head(123, 0, len(chunks)), dtype=torch.float64)
    summed = 0
    for ch in chunks:
        n = ch.numel() // c
        mean, var, residual = (SF.local_stats_cpu(ch, exact=True) if n else (None, None, None))
        h = head.clone()
        h[-2:] = torch.tensor([n, n - 1.0 / len(chunks)], dtype=torch.float64)
        summed = summed + SF.fill_payload(h, mean, var, shift, n, residual)
    q, vu = SF.merge_payload(summed[head.numel():], summed[head.numel() - 2:head.numel()])
    return shift + q, vu, summed


@pytest.mark.parametrize("dtype,offset,std,tol", [(torch.float32, 1e4, 1e-2, 1e-6), (torch.float64, 1e8, 1.0, 1e-9)])
def test_shifted_merge_is_exact_for_offset_data_where_raw_sums_fail(dtype, offset, std, tol):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(40, 3, 8, dtype=torch.float64, generator=g) * std + offset).to(dtype)
    x[:7] += 0.3 * std  # ranks with slightly different means
    chunks = [x[:7], x[7:7], x[7:30], x[30:]]  # uneven, one empty
    ref_mean, ref_var = _ref_moments(x)
    previous = (torch.randn(16, 3, 8, dtype=torch.float64, generator=g) * std + offset).mean((0, 2))
    mean, vu, summed = _merge(chunks, previous)  # centred on the previous step's mean
    assert int(summed[-2 * 3 - 2]) == 40 * 8
    assert _rel(vu[0], ref_var) < tol
    assert _rel(vu[1], ref_var * 320 / 319) < tol
    # a float64 mean near 1e8 is itself quantized at 1.5e-8: allow a few units in the last place
    ulp = torch.finfo(torch.float64).eps * offset
    assert ((mean - ref_mean).abs() / ref_var.sqrt()).max().item() < max(tol, 4 * ulp / std)
    _, raw, _ = _merge(chunks, torch.zeros(3, dtype=torch.float64))  # raw sums: what the shift avoids
    assert _rel(raw[0], ref_var) > 100 * tol


def test_merge_of_a_single_chunk_equals_its_moments_and_empty_is_the_identity():
    x = torch.randn(9, 4, 5) * 2 + 1
    mean, vu, _ = _merge([x], torch.zeros(4, dtype=torch.float64))
    mean2, vu2, _ = _merge([x, x[:0]], torch.full((4,), 0.7, dtype=torch.float64))
    ref_mean, ref_var = _ref_moments(x)
    for m, v in ((mean, vu), (mean2, vu2)):
        torch.testing.assert_close(m, ref_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(v[0], ref_var, rtol=1e-6, atol=1e-7)
    empty = SF.fill_payload(torch.zeros(11, dtype=torch.float64), None, None, torch.ones(4, dtype=torch.float64), 0)
    assert empty.shape == (11 + 8,) and empty.abs().sum().item() == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_normalize_matches_batch_norm_and_keeps_dtype(dtype):
    x = (torch.randn(8, 5, 4, 4) * 2 + 1).to(dtype)
    w, b = torch.rand(5) + 0.5, torch.randn(5)
    m = SF.batch_moments(x)
    y = SF.normalize(x, m.mean, m.var, w, b, 1e-5, fused=True)
    ref = torch.nn.functional.batch_norm(x.double(), None, None, w.double(), b.double(), True, 0.0, 1e-5)
    assert y.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    assert (y.double() - ref).abs().max().item() < tol


def test_normalize_large_offset_precise():
    x = (torch.randn(32, 2, 64, dtype=torch.float64) * 1e-2 + 1e4).float()
    m = SF.batch_moments(x)
    y = SF.normalize(x, m.mean, m.var, None, None, 1e-12, fused=False)
    mean, var = _ref_moments(x)
    ref = (x.double() - mean.view(1, -1, 1)) / torch.sqrt(var.view(1, -1, 1) + 1e-12)
    assert (y.double() - ref).abs().max().item() < 1e-3  # torch's float32 kernel is off by ~0.05 here


def test_backward_matches_float64_autograd():
    x = (torch.randn(6, 4, 5, dtype=torch.float64) * 2 + 3).requires_grad_()
    w = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    y = torch.nn.functional.batch_norm(x, None, None, w, b, True, 0.0, 1e-5)
    dy = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, w, b), dy)
    m = SF.batch_moments(x.detach())
    invstd = torch.rsqrt(m.var + 1e-5)
    for fused in (True, False):
        sum_dy, sum_dy_xhat = SF.backward_reduce(dy, x.detach(), m.mean, invstd, fused)
        dx = SF.backward_elemt(dy, x.detach(), m.mean, invstd, w.detach(), sum_dy, sum_dy_xhat, float(m.count), fused)
        torch.testing.assert_close(dx, gx, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(sum_dy_xhat, gw, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(sum_dy, gb, rtol=1e-9, atol=1e-10)


def test_renorm_correction_matches_the_formula_with_clipping():
    g = torch.Generator().manual_seed(1)
    mean, var = torch.randn(6, generator=g, dtype=torch.float64), torch.rand(6, generator=g, dtype=torch.float64) * 4
    rm, rv = torch.randn(6, generator=g), torch.rand(6, generator=g) + 0.1
    r, d = SF.renorm_correction(mean, var, rm, rv, 1e-5, 1.5, 0.5)
    sigma = torch.sqrt(rv.double() + 1e-5)
    r_ref = (torch.sqrt(var + 1e-5) / sigma).clamp(1 / 1.5, 1.5)
    d_ref = ((mean - rm.double()) / sigma).clamp(-0.5, 0.5)
    torch.testing.assert_close(r, r_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(d, d_ref, rtol=1e-12, atol=1e-12)
    assert (r == 1.5).any() and (d.abs() == 0.5).any(), "clipping must be exercised"
    r_t, d_t = SF.renorm_correction(mean, var, rm, rv, 1e-5, torch.tensor(1.5), torch.tensor(0.5))
    torch.testing.assert_close(r_t, r_ref), torch.testing.assert_close(d_t, d_ref)


@pytest.mark.parametrize("channels_last", [False, True])
def test_large_inputs_take_the_chunked_path_with_the_same_result(channels_last):
    x = torch.randn(9, 3, 200, 200) * 2 + 1e3  # 1.08M elements: chunks of 4, 4 and 1 samples
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert x.numel() > SF.CHUNK_ELEMENTS
    m = SF.batch_moments(x)
    mean, var = _ref_moments(x)
    torch.testing.assert_close(m.mean, mean, rtol=1e-9, atol=1e-7)
    torch.testing.assert_close(m.var, var, rtol=1e-5, atol=0)
