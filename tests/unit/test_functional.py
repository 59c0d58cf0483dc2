"""The pure math against float64 references and torch's kernels."""

from __future__ import annotations

import pytest
import torch

import syncnorm.functional as SF


def _ref_moments(x: torch.Tensor):
    d = x.double()
    dims = SF.reduce_dims(x)
    return d.mean(dims), d.var(dims, unbiased=False)


@pytest.mark.parametrize("shape", [(16, 3), (8, 3, 11), (4, 3, 5, 6), (2, 3, 2, 3, 4)])
def test_batch_moments_match_float64(shape):
    x = torch.randn(shape) * 3 + 5
    m = SF.batch_moments(x)
    mean, var = _ref_moments(x)
    assert int(m.count) == x.numel() // 3
    torch.testing.assert_close(m.mean, mean, rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(m.var, var, rtol=1e-6, atol=1e-7)


def test_large_offset_variance_is_accurate_where_naive_float32_fails():
    # per-channel mean 1e4, std 1e-2: the float32 spacing at 1e4 is ~1e-3
    x = (torch.randn(64, 4, 16, 16, dtype=torch.float64) * 1e-2 + 1e4).float()
    _, var_ref = _ref_moments(x)
    m = SF.batch_moments(x)
    rel = ((m.var - var_ref).abs() / var_ref).max().item()
    assert rel < 1e-3, rel
    naive = (x * x).mean((0, 2, 3)) - x.mean((0, 2, 3)) ** 2  # E[x^2] - E[x]^2 in float32
    naive_rel = ((naive.double() - var_ref).abs() / var_ref).max().item()
    assert naive_rel > 1e-1, "the case must be hard enough that the naive formula fails"


def test_large_offset_survives_the_cross_rank_merge():
    # uneven chunks with slightly different chunk means, merged through pack/sum/unpack
    x = (torch.randn(40, 3, 8, dtype=torch.float64) * 1e-2 + 1e4).float()
    x[:7] += 3e-3
    mean_ref, var_ref = _ref_moments(x)
    chunks = [x[:7], x[7:7], x[7:30], x[30:]]
    summed = sum(SF.pack_moments(SF.batch_moments(c)) for c in chunks)
    m = SF.unpack_moments(summed, 3)
    assert int(m.count) == 40 * 8
    assert ((m.var - var_ref).abs() / var_ref).max().item() < 1e-3
    assert (m.mean - mean_ref).abs().max().item() < 1e-6


def test_merge_moments_is_exact_chan_merge():
    x = torch.randn(30, 4, 5, dtype=torch.float64) * 2 + 1
    parts = [SF.batch_moments(x[:3]), SF.batch_moments(x[3:3]), SF.batch_moments(x[3:])]
    m = SF.merge_moments(parts)
    mean, var = _ref_moments(x)
    torch.testing.assert_close(m.mean, mean)
    torch.testing.assert_close(m.var, var)


def test_empty_batch_gives_identity_moments():
    m = SF.batch_moments(torch.empty(0, 6, 3))
    assert int(m.count) == 0 and m.mean.abs().sum() == 0 and m.m2.abs().sum() == 0
    assert SF.pack_moments(m).shape == (13,)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_normalize_matches_batch_norm_and_keeps_dtype(dtype):
    x = (torch.randn(8, 5, 4, 4) * 2 + 1).to(dtype)
    w, b = torch.rand(5) + 0.5, torch.randn(5)
    m = SF.batch_moments(x)
    invstd = torch.rsqrt(m.var + 1e-5)
    y = SF.normalize(x, m.mean, invstd, w, b)
    ref = torch.nn.functional.batch_norm(x.double(), None, None, w.double(), b.double(), True, 0.0, 1e-5)
    assert y.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    assert (y.double() - ref).abs().max().item() < tol


def test_normalize_large_offset_precise():
    x = (torch.randn(32, 2, 64, dtype=torch.float64) * 1e-2 + 1e4).float()
    m = SF.batch_moments(x)
    invstd = torch.rsqrt(m.var + 1e-12)
    y = SF.normalize(x, m.mean, invstd, None, None)
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
    sum_dy, sum_dy_xmu = SF.backward_reduce(dy, x.detach(), m.mean, invstd)
    dx = SF.backward_elemt(dy, x.detach(), m.mean, invstd, w.detach(), sum_dy, sum_dy_xmu, m.count)
    torch.testing.assert_close(dx, gx, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(sum_dy_xmu * invstd, gw, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(sum_dy, gb, rtol=1e-9, atol=1e-10)


def test_update_running_stats_and_momentum_factor():
    rm, rv = torch.zeros(3), torch.ones(3)
    SF.update_running_stats(rm, rv, torch.full((3,), 2.0, dtype=torch.float64), torch.full((3,), 5.0, dtype=torch.float64), 0.25)
    torch.testing.assert_close(rm, torch.full((3,), 0.5))
    torch.testing.assert_close(rv, torch.full((3,), 2.0))
    assert SF.momentum_factor(0.1, torch.tensor(7)) == 0.1
    assert SF.momentum_factor(None, torch.tensor(4)) == 0.25


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
