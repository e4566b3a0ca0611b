"""The fused kernels add the LoRA term into the GEMM's fp32 accumulator *before* the reduction loop
(it seeds the accumulator, so one fp32 tile is live in the loop and nothing spills). That changes
only the order of the fp32 additions. Bound, in the interpreter with fp32 operands and IEEE dots:
|kernel - exact| <= (K + r + 4) 2^-24 (|x| |W|^T + |s| |xa| |B|^T) elementwise (the classic
gamma_n bound of a length-n fp32 dot, n = K + r terms plus the scaling / mask / g multiplies),
with `exact` computed in float64 from the same inputs."""

import os

import pytest
import torch

from _helpers import gen, rand  # noqa: F401  (also sets TRITON_INTERPRET without a GPU)

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs the Triton interpreter", allow_module_level=True)
if torch.cuda.is_available():
    pytest.skip("the GPU's fp32 dots use TF32 by default: this bound is for IEEE fp32 dots", allow_module_level=True)

from deltakern.triton_kernels import linear as L  # noqa: E402
from deltakern.triton_kernels import lora as T  # noqa: E402

U = 2.0**-24


def _check(got, exact, mag, n):
    err = (got.double() - exact).abs()
    bound = (n + 4) * U * mag + 1e-300
    assert torch.all(err <= bound), (err / bound).max()


@pytest.mark.parametrize("M,K,N,r", [(7, 64, 37, 4), (5, 33, 20, 16)])
def test_lora_forward_and_dx_within_fp32_dot_bound(M, K, N, r):
    x, W = rand((M, K), 1), rand((N, K), 2)
    xa, B = rand((M, r), 3), rand((N, r), 4)
    s = 0.37  # not a power of two
    got = T.lora_forward(x, W, None, xa, B, s)
    exact = x.double() @ W.double().t() + s * (xa.double() @ B.double().t())
    _check(got, exact, x.double().abs() @ W.double().abs().t() + s * (xa.double().abs() @ B.double().abs().t()), K + r)
    dy, dyb, A = rand((M, N), 5), rand((M, r), 6), rand((r, K), 7)
    keep = torch.rand(M, K, generator=gen(8)) > 0.3
    got = T.lora_backward_dx(dy, W, dyb, A, s, keep, 1 / 0.7)
    lo = s * (dyb.double() @ A.double()) * keep / 0.7
    exact = dy.double() @ W.double() + lo
    mag = dy.double().abs() @ W.double().abs() + (s / 0.7) * (dyb.double().abs() @ A.double().abs())
    _check(got, exact, mag, N + r)


def test_dora_dropout_forward_within_fp32_dot_bound():
    M, K, N, r = 6, 64, 29, 4
    x, W = rand((M, K), 11), rand((N, K), 12)
    xa, B = rand((M, r), 13), rand((N, r), 14)
    g = rand((N,), 15).abs() + 0.5
    keep = torch.rand(M, K, generator=gen(16)) > 0.3
    s, ms = 0.37, 1 / 0.7
    got = L.frozen_forward(x, W, N, lora=(xa, B, s), g=g, keep=keep, mask_scale=ms)
    xd = torch.where(keep, x.double() * ms, 0.0)
    Wd, gd = W.double(), g.double()
    exact = x.double() @ Wd.t() + (gd - 1) * (xd @ Wd.t()) + gd * s * (xa.double() @ B.double().t())
    mag = (x.double().abs() @ Wd.abs().t() + (gd - 1).abs() * (xd.abs() @ Wd.abs().t())
           + gd * s * (xa.double().abs() @ B.double().abs().t()))
    _check(got, exact, mag, 2 * K + r)
