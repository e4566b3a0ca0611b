"""The vector-load NF4 tile loader (triton_kernels/_common.py `nf4_rows_tile`) in Triton's interpreter:
bit-exact against the dequantize reference for every tile / block relation (a tile inside one block,
a tile covering several blocks), at the edges of N and K, and with nested scales.

The GEMM kernels' interpreter config has BLOCK_K = 32, which never covers several blocks (the
smallest blocksize is 32); this test drives the loader directly with wider tiles."""

import os

import pytest
import torch

from _helpers import rand  # noqa: E402  (also sets TRITON_INTERPRET without a GPU)
from deltakern import nf4

triton = pytest.importorskip("triton")
tl = triton.language

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs the Triton interpreter or a GPU", allow_module_level=True)

from deltakern.triton_kernels._common import nf4_aligned, nf4_rows_tile, pair_table  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _tile_kernel(w_ptr, absmax_ptr, pair_ptr, out_ptr, N, K,
                 ROWS: tl.constexpr, BK: tl.constexpr, NF4_BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    k0 = tl.program_id(1) * BK
    w = nf4_rows_tile(w_ptr, absmax_ptr, pair_ptr, rows, k0, N, K, ROWS, BK, NF4_BLOCK, tl.float32)
    cols = k0 + tl.arange(0, BK)
    # store the whole tile, out of range included: an [N_pad, K_pad] output shows the zeros too
    tl.store(out_ptr + rows[:, None] * (tl.cdiv(K, BK) * BK) + cols[None, :], w)


@pytest.mark.parametrize("N,K,blocksize,rows,bk", [
    (12, 64, 32, 8, 64),     # a tile covers two blocks
    (12, 256, 64, 4, 128),   # two blocks per tile, several tiles per row
    (9, 128, 32, 8, 128),    # four blocks per tile, a partial last row tile
    (10, 192, 64, 8, 32),    # a tile inside a block (two tiles per block)
    (5, 96, 32, 4, 64),      # K not a multiple of the tile: a half-empty last tile
])
@pytest.mark.parametrize("nested", [False, True])
def test_nf4_rows_tile_is_bit_exact(N, K, blocksize, rows, bk, nested):
    W = rand((N, K), 7, 0.5)
    q = nf4.quantize(W, blocksize=blocksize, double_quant=nested).to(DEV)
    assert nf4_aligned(1, K, blocksize)
    tiles_k = triton.cdiv(K, bk)
    n_pad = triton.cdiv(N, rows) * rows
    out = torch.full((n_pad, tiles_k * bk), float("nan"), device=DEV)
    _tile_kernel[(triton.cdiv(N, rows), tiles_k)](q.packed_bytes(), q.absmax_fp32(), pair_table(q.code), out, N, K,
                                                  ROWS=rows, BK=bk, NF4_BLOCK=blocksize)
    want = q.dequantize(torch.float32)
    assert torch.equal(out[:N, :K], want)  # bit for bit: cast(fp32(code * absmax))
    assert torch.all(out[N:] == 0) and torch.all(out[:, K:] == 0)  # zeros outside [N, K]


def test_nf4_aligned_rule():
    assert nf4_aligned(1, 4096, 64) == 1
    assert nf4_aligned(1, 4000, 64) == 0  # rows would start inside a block: the gather path
    assert nf4_aligned(1, 33, 32) == 0
    assert nf4_aligned(0, 4096, 64) == 0  # dense weights never take it
