"""The NF4 decode kernel (triton_kernels/decode.py, M <= 16) in Triton's interpreter against
x . dequantize(W)^T in float64, on fresh random inputs with odd N, partial tiles and nested scales."""

import os

import pytest
import torch

from _helpers import gen, rand  # noqa: F401  (also sets TRITON_INTERPRET without a GPU)
from deltakern import nf4

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs the Triton interpreter or a GPU", allow_module_level=True)

from deltakern.triton_kernels import decode as D  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _bound(x, w, dtype):
    """fp32 accumulation over K terms (gamma_K = K 2^-24 of sum |x||w|) plus the output rounding."""
    K = x.shape[1]
    mag = x.double().abs() @ w.double().abs().t()
    out_ulp = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    return K * 2.0**-24 * mag + out_ulp * mag + 1e-30


@pytest.mark.parametrize("M,N,K,blocksize,nested,bias,dtype", [
    (1, 40, 128, 64, True, False, torch.float32),
    (5, 37, 192, 32, False, True, torch.float32),
    (16, 23, 64, 32, True, True, torch.float16),
    (3, 50, 256, 64, True, False, torch.bfloat16),
    (1, 7, 96, 32, False, True, torch.bfloat16),
])
def test_decode_matches_dequantize_then_matmul(M, N, K, blocksize, nested, bias, dtype):
    W = rand((N, K), 11, 0.4)
    q = nf4.quantize(W, blocksize=blocksize, double_quant=nested).to(DEV)
    x = rand((M, K), 12, dtype=dtype, device=DEV)
    b = rand((N,), 13, dtype=dtype, device=DEV) if bias else None
    got = D.decode_forward(x, q.packed_bytes(), b, N, (q.absmax_fp32(), q.code, q.blocksize))
    w = q.dequantize(dtype)  # the weight as the kernel rounds it
    ref = x.double() @ w.double().t() + (0 if b is None else b.double())
    assert got.dtype == dtype and got.shape == (M, N)
    err = (got.double() - ref).abs()
    assert torch.all(err <= _bound(x, w, dtype) + (0 if b is None else b.double().abs() * 2.0**-8)), err.max()


def test_decode_pair_table():
    code = torch.linspace(-1, 1, 16, device=DEV)
    t = D.pair_table(code)
    bits = code.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    for b in (0, 1, 0x7F, 0xA5, 0xFF):
        assert int(t[b]) % 2**64 == int(bits[b >> 4]) | (int(bits[b & 15]) << 32)  # two words of an int64
    assert D.pair_table(code) is t


def test_decode_validation():
    q = nf4.quantize(torch.randn(8, 64), blocksize=64).to(DEV)
    args = (q.packed_bytes(), None, 8, (q.absmax_fp32(), q.code, 64))
    with pytest.raises(ValueError, match="M <= 16"):
        D.decode_forward(torch.randn(17, 64, device=DEV), *args)
    q2 = nf4.quantize(torch.randn(8, 96), blocksize=64).to(DEV)
    with pytest.raises(ValueError, match="K % blocksize"):
        D.decode_forward(torch.randn(2, 96, device=DEV), q2.packed_bytes(), None, 8, (q2.absmax_fp32(), q2.code, 64))
    with pytest.raises(ValueError, match="bias"):
        D.decode_forward(torch.randn(2, 64, device=DEV), args[0], torch.zeros(7, device=DEV), 8, args[3])


def test_pair_table_follows_the_code_tensor_not_its_address():
    for i in range(20):  # freed and reallocated tables land on reused addresses: never a stale table
        code = torch.linspace(-1, 1, 16, device=DEV) * (i + 1)
        t = D.pair_table(code)
        assert int(t[0x10]) % 2**32 == int(code.view(torch.int32)[1]) % 2**32
        del code, t
    code = torch.linspace(-1, 1, 16, device=DEV)
    t = D.pair_table(code)
    code.mul_(2)  # written in place: rebuilt
    assert D.pair_table(code) is not t and int(D.pair_table(code)[0x10]) % 2**32 == int(code.view(torch.int32)[1]) % 2**32
