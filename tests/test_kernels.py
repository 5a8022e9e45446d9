"""The compiled bfloat16 sum-of-squares kernels: their documented summation order, bit for bit, and their accuracy."""
import numpy as np
import pytest
import torch

from hetmoe_core import kernels
from hetmoe_core.scores import _norms


def _bf16(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * torch.logspace(-3, 1, shape[-1])   # many binades, as real weights
    return x.to(torch.bfloat16)


def _rows_in_order(x):
    """The kernel's row order written with float32 tensor adds (each an IEEE-rounded add): lanes c mod LANES,
    in order, then halving."""
    sq, lanes = x.float().square(), kernels.LANES
    acc = torch.zeros(x.shape[0], lanes)
    whole = x.shape[1] // lanes
    for i in range(whole):
        acc += sq[:, i * lanes:(i + 1) * lanes]
    tail = sq[:, whole * lanes:]
    acc[:, :tail.shape[1]] += tail
    half = lanes // 2
    while half:
        acc[:, :half] += acc[:, half:2 * half]
        half //= 2
    return acc[:, 0]


def _cols_in_order(x):
    """Row r to lane r mod LANES, in order; then halving, absent lanes as zero."""
    sq, lanes = x.float().square(), kernels.LANES
    acc = torch.zeros(lanes, x.shape[1])
    for r in range(x.shape[0]):
        acc[r % lanes] += sq[r]
    half = lanes // 2
    while half:
        acc[:half] += acc[half:2 * half]
        half //= 2
    return acc[0]


@pytest.mark.parametrize("shape", [(7, 2048), (5, 130), (3, 50), (4, 1), (0, 64)])
def test_rows_follow_the_documented_order_bit_for_bit(shape):
    x = _bf16(*shape)
    want = _rows_in_order(x)
    assert torch.equal(kernels.row_sumsq(x, torch.empty(shape[0])), want)
    assert torch.equal(kernels.row_sumsq(x, torch.empty(shape[0]), native=False), want)


@pytest.mark.parametrize("shape", [(2048, 96), (130, 33), (40, 7), (1, 5), (64, 1), (0, 3)])
def test_columns_follow_the_documented_order_bit_for_bit(shape):
    x = _bf16(*shape, seed=1)
    want = _cols_in_order(x)
    assert torch.equal(kernels.col_sumsq(x, torch.empty(shape[1])), want)
    assert torch.equal(kernels.col_sumsq(x, torch.empty(shape[1]), native=False), want)


def test_the_compiled_route_is_taken_here():
    """This machine has a C compiler: the fast route must be the one in use (else the streaming goal is lost)."""
    assert kernels.route().startswith("compiled"), kernels.route()


def test_accuracy_against_float64():
    x = _bf16(256, 2048, seed=2)
    rows, cols = kernels.row_sumsq(x, torch.empty(256)), kernels.col_sumsq(x, torch.empty(2048))
    ref_r, ref_c = x.double().square().sum(1), x.double().square().sum(0)
    assert float(((rows.double() - ref_r).abs() / ref_r).max()) < 1e-6
    assert float(((cols.double() - ref_c).abs() / ref_c).max()) < 1e-6


def test_wrong_input_is_refused_in_one_line():
    with pytest.raises(ValueError, match="contiguous 2-D bfloat16"):
        kernels.row_sumsq(torch.zeros(4, 8), torch.empty(4))
    with pytest.raises(ValueError, match="not contiguous"):
        kernels.col_sumsq(_bf16(8, 4).t(), torch.empty(8))
    with pytest.raises(ValueError, match=r"float32 \[4\]"):
        kernels.row_sumsq(_bf16(4, 8), torch.empty(3))


def test_norms_of_a_strided_bf16_tensor_equal_its_contiguous_copy():
    w = _bf16(3, 96, 70, seed=3).transpose(1, 2)           # [3, 70, 96], not contiguous
    for dim in (1, 2):
        a, b = _norms(w, dim), _norms(w.contiguous(), dim)
        assert torch.equal(a, b)
        ref = w.double().square().sum(dim).sqrt()
        np.testing.assert_allclose(a.numpy(), ref.numpy(), rtol=1e-6)


@pytest.mark.parametrize("env, why", [({"HETMOE_NATIVE": "0"}, "torch (HETMOE_NATIVE=0)"),
                                      ({"CC": "false"}, "torch (false failed")])
def test_without_the_compiled_kernels_the_torch_route_is_taken(env, why):
    import os
    import subprocess
    import sys
    code = ("import torch; from hetmoe_core import kernels, scores\n"
            "x = (torch.randn(9, 200, generator=torch.Generator().manual_seed(4)) * 3).bfloat16()\n"
            "print(kernels.route()); print(scores._norms(x, 1).numpy().tobytes().hex())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(__file__)))
    route, norms = done.stdout.splitlines()
    assert route.startswith(why), route
    x = (torch.randn(9, 200, generator=torch.Generator().manual_seed(4)) * 3).bfloat16()
    assert norms == _norms(x, 1).numpy().tobytes().hex()      # compiled here, torch there: the same bits
