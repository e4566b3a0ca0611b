"""The one loader of the native CPU extension `deltakern._cpu`, and its Python launchers.

`import deltakern._cpu_ext` never imports `_cpu`: `load()` tries once (on first use) and caches the
module or the reason it failed; `available()` / `load_error()` report it and `require()` raises a
RuntimeError saying how to get it. The launchers check every tensor (device, dtype, contiguity,
sizes, blocksize) before anything is allocated or written, then pass raw pointers, sizes and
`torch.get_num_threads()` (the OpenMP team size, so the kernels never use more threads than torch)
to the kernels in csrc/cpu/ (fewer threads for calls too small to share).

Kernels (fp32 arithmetic throughout; NF4 layout and rounding as in deltakern/ops/nf4.py):

    dequantize_nf4   out[i] = cast(fp32(code[nib(i)] * scale[i // blocksize]))        bit-exact
                     scale = absmax, or fp32(fp32(nested_code[q] * nested_absmax[b // 256]) + offset)
    nf4_matmul       y[M, N] = x[M, K] . W[N, K]^T (+ bias),   M <= 16 (decode): W is read as 4-bit,
                     never built; w = round_{x.dtype}(fp32(code[nib] * absmax)), fp32 accumulators
    nf4_matmul_dx    dx[M, K] = dy[M, N] . W[N, K],            M <= 16, same w
    dense_weight_fp32  W [N, K] fp32 in a reused per-thread workspace (for M > 16: a GEMM on it)
    gemm             out[M, N] = ((out +) a . op(b) + s2 a2 . op2(b2)) * col_scale + bias, fp32, the packed
                     GEMM of the layers (b dense, or an NF4 W decoded while packed)
    lowrank_*        the rank-r products of the LoRA / DoRA layers (x A^T, g^T x, bias + s g bt, sums)

The matmuls need K % blocksize == 0 (no block crosses a row); `decode_supported` says when they run.
DELTAKERN_CPU_ISA=scalar|avx2|avx512 forces an instruction set (tests); unset, the best this CPU runs.
"""

from __future__ import annotations

import numbers
import threading

import torch

from deltakern._native import NativeModule
from deltakern.backends import registry


_DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MAX_DECODE_M = 16  # rows of x the decode kernels take in one pass over W
STREAM_BYTES = 4 << 20  # outputs at least this large use non-temporal stores (when 64-byte aligned)
HUGE_BYTES = 4 << 20  # fresh outputs at least this large are backed by transparent huge pages


_native = NativeModule("_cpu", "deltakern was installed without its native CPU extension deltakern._cpu: reinstall "
                       "with a C++ compiler with OpenMP on PATH (pip install -e . --no-build-isolation; "
                       "DELTAKERN_BUILD_CPU must not be 0), or set DELTAKERN_BACKEND=torch")
load = _native.load  # the `deltakern._cpu` module, or None if it cannot be imported (tried once, then cached)
available = _native.available  # whether `deltakern._cpu` imports
load_error = _native.load_error  # why `deltakern._cpu` could not be imported, or None
require = _native.require  # the module; RuntimeError saying how to get it if it is missing


_best_isa: dict = {}  # module -> its best_isa() (the CPU does not change under a process)


def isa() -> str:
    """The instruction set the kernels run with: DELTAKERN_CPU_ISA if set, else the CPU's best."""
    forced = registry.getenv("DELTAKERN_CPU_ISA").strip().lower()
    if forced:
        return forced
    mod = require()
    best = _best_isa.get(mod)
    if best is None:
        best = _best_isa[mod] = mod.best_isa()
    return best


# Work per thread below which one more thread does not pay (about 0.2 ms of one core here): waking a
# team costs ~10 us on an idle machine and a scheduler slice when the other cores are busy.
GRAIN = 1 << 20  # dequantized elements (matmuls: GRAIN * 4 multiply-adds)


def _threads(work: int) -> int:
    """torch.get_num_threads(), fewer for small calls (never more than torch)."""
    return max(1, min(torch.get_num_threads(), work // GRAIN))


def _empty(n: int, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(n), asking the kernel for huge pages when large: a fresh allocation page-faults on
    first touch, and 4 KiB faults cost more than writing the data (about 40 ms vs 8 ms for 64 MiB)."""
    out = torch.empty(n, dtype=dtype)
    if out.numel() * out.element_size() >= HUGE_BYTES:
        require().advise_hugepages(out.data_ptr(), out.numel() * out.element_size())
    return out


# ---- validation ---------------------------------------------------------------------------------


def _cpu_tensor(name: str, t) -> None:
    """TypeError unless `t` is a tensor; ValueError unless it is on the CPU."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name} is on {t.device}; the deltakern CPU kernels need CPU tensors")


def _check(name: str, t, dtype: torch.dtype, numel: int | None = None, contiguous: bool = True) -> None:
    _cpu_tensor(name, t)
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (got strides {tuple(t.stride())} for shape {tuple(t.shape)})")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} has {t.numel()} elements, expected {numel}")


def _check_blocksize(blocksize: int) -> int:
    blocksize = int(blocksize)
    if blocksize < 32 or blocksize > 4096 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two in [32, 4096], got {blocksize}")
    return blocksize


def _bytes(packed: torch.Tensor) -> torch.Tensor:
    """packed as flat uint8 (bitsandbytes' quant_storage may hold the bytes in another dtype)."""
    if not isinstance(packed, torch.Tensor):
        raise TypeError(f"packed must be a torch.Tensor, got {type(packed).__name__}")
    if packed.dtype != torch.uint8:
        if not packed.is_contiguous():
            raise ValueError("packed must be contiguous")
        packed = packed.reshape(-1).view(torch.uint8)
    return packed.reshape(-1) if packed.is_contiguous() else packed


def _check_weight(packed, absmax, code, N: int, K: int, blocksize: int):
    N, K, blocksize = int(N), int(K), _check_blocksize(blocksize)
    if N < 0 or K < 0:
        raise ValueError(f"N and K must be >= 0, got N={N}, K={K}")
    packed = _bytes(packed)
    _check("packed", packed, torch.uint8, (N * K + 1) // 2)
    _check("absmax", absmax, torch.float32, -(-N * K // blocksize))
    _check("code", code, torch.float32, 16)
    return packed, N, K, blocksize


def decode_supported(M: int, K: int, blocksize: int) -> bool:
    """Whether nf4_matmul / nf4_matmul_dx take this shape: M <= 16 and K % blocksize == 0."""
    return 0 < M <= MAX_DECODE_M and K % blocksize == 0


# ---- launchers ----------------------------------------------------------------------------------


def dequantize_nf4(packed, absmax, nested_absmax, nested_code, offset, code, n: int, blocksize: int,
                   out_dtype: torch.dtype, out: torch.Tensor | None = None,
                   round_to: torch.dtype | None = None) -> torch.Tensor:
    """n NF4 elements -> [n] of out_dtype (fp32 / fp16 / bf16), bit-exact with dequantize_nf4_ref.

    packed: (n+1)//2 bytes, element 2i in the high nibble of byte i. absmax: fp32 [ceil(n/blocksize)],
    or uint8 of that length with nested_absmax (fp32 [ceil(nblocks/256)]), nested_code (fp32 [256])
    and offset. code: fp32 [16]. `out`: a contiguous [n] tensor of out_dtype to write into (reuse a
    workspace: a fresh large allocation page-faults on first touch); returned. `round_to` (fp16 /
    bf16, fp32 out only): each value is rounded to that dtype and stored as fp32, i.e.
    out == dequantize(..., round_to).float() without the second pass.
    """
    C = require()
    if out_dtype not in _DTYPES:
        raise TypeError(f"out_dtype must be one of {list(_DTYPES)}, got {out_dtype}")
    n, blocksize = int(n), _check_blocksize(blocksize)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    nblocks = -(-n // blocksize)
    packed = _bytes(packed)
    _check("packed", packed, torch.uint8, (n + 1) // 2)
    _check("code", code, torch.float32, 16)
    nested = nested_absmax is not None
    if nested:
        if nested_code is None or offset is None:
            raise ValueError("nested absmax needs nested_absmax, nested_code and offset together")
        _check("absmax", absmax, torch.uint8, nblocks)
        _check("nested_absmax", nested_absmax, torch.float32, -(-nblocks // 256))
        _check("nested_code", nested_code, torch.float32, 256)
        offset = float(offset.item() if isinstance(offset, torch.Tensor) else offset)
    else:
        _check("absmax", absmax, torch.float32, nblocks)
        if offset is not None and not isinstance(offset, (numbers.Real, torch.Tensor)):
            raise TypeError(f"offset must be a float, got {type(offset).__name__}")
        offset = 0.0
    if round_to is not None and (round_to not in _DTYPES or (round_to != torch.float32 and out_dtype != torch.float32)):
        raise ValueError(f"round_to must be float16 / bfloat16 with an fp32 out_dtype, got {round_to} -> {out_dtype}")
    if out is None:
        out = _empty(n, out_dtype)
    else:
        _check("out", out, out_dtype, n)
    if n == 0:
        return out
    streaming = int(out.numel() * out.element_size() >= STREAM_BYTES and out.data_ptr() % 64 == 0)
    C.dequantize_nf4(packed.data_ptr(), absmax.data_ptr(), int(nested),
                     nested_absmax.data_ptr() if nested else 0, nested_code.data_ptr() if nested else 0,
                     offset, code.data_ptr(), out.data_ptr(), n, blocksize, _DTYPES[out_dtype], streaming,
                     _DTYPES[round_to or torch.float32], _threads(n), isa())
    return out


def _as_f32_2d(name: str, t, cols: int) -> torch.Tensor:
    _cpu_tensor(name, t)
    if t.dtype not in _DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")
    if t.dim() != 2 or t.shape[1] != cols:
        raise ValueError(f"{name} must be [M, {cols}], got {tuple(t.shape)}")
    if not 0 < t.shape[0] <= MAX_DECODE_M:
        raise ValueError(f"{name} has {t.shape[0]} rows; the decode kernels take 1..{MAX_DECODE_M}")
    return t.float().contiguous()  # any strides: a small copy (or none for contiguous fp32)


def nf4_matmul(x, packed, absmax, code, N: int, K: int, blocksize: int, bias=None,
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y[M, N] = x[M, K] . W^T (+ bias) for an NF4 W [N, K], M <= 16, K % blocksize == 0.

    Each w = round_{x.dtype}(fp32(code[nibble] * absmax[block])) is decoded in registers; sums are fp32
    (error within fp32 rounding of the exact sum over those w); the result is rounded once to
    out_dtype (default x.dtype). x any strides; bias [N] of any float dtype, added in fp32.
    """
    C = require()
    packed, N, K, blocksize = _check_weight(packed, absmax, code, N, K, blocksize)
    if K % blocksize:
        raise ValueError(f"nf4_matmul needs K % blocksize == 0 (K={K}, blocksize={blocksize}); "
                         "use dense_weight_fp32 for other shapes")
    xf = _as_f32_2d("x", x, K)
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.device.type != "cpu" or bias.shape != (N,):
            raise ValueError(f"bias must be a CPU tensor of shape ({N},)")
        bias = bias.float().contiguous()
    y = torch.empty(xf.shape[0], N, dtype=torch.float32)
    if N and K:
        C.gemv_nf4(xf.data_ptr(), packed.data_ptr(), absmax.data_ptr(), code.data_ptr(),
                   bias.data_ptr() if bias is not None else 0, y.data_ptr(), xf.shape[0], N, K, blocksize,
                   _DTYPES[x.dtype], _threads(xf.shape[0] * N * K // 4), isa())
    else:
        y.zero_()
        if bias is not None:
            y += bias
    return y.to(out_dtype or x.dtype)


def nf4_matmul_dx(dy, packed, absmax, code, N: int, K: int, blocksize: int,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """dx[M, K] = dy[M, N] . W for an NF4 W [N, K], M <= 16, K % blocksize == 0 (W decoded as in
    nf4_matmul with dy's dtype; fp32 sums; rounded once to out_dtype, default dy.dtype)."""
    C = require()
    packed, N, K, blocksize = _check_weight(packed, absmax, code, N, K, blocksize)
    if K % blocksize:
        raise ValueError(f"nf4_matmul_dx needs K % blocksize == 0 (K={K}, blocksize={blocksize}); "
                         "use dense_weight_fp32 for other shapes")
    dyf = _as_f32_2d("dy", dy, N)
    dx = torch.empty(dyf.shape[0], K, dtype=torch.float32)
    if N and K:
        C.dx_nf4(dyf.data_ptr(), packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), dx.data_ptr(),
                 dyf.shape[0], N, K, blocksize, _DTYPES[dy.dtype], _threads(dyf.shape[0] * N * K // 4), isa())
    else:
        dx.zero_()
    return dx.to(out_dtype or dy.dtype)


# ---- the rank-r products (csrc/cpu/cpu_lowrank.h) ----------------------------------------------

MAX_LOWRANK_R = 64  # ranks the rank-r kernels take (their register tiles; beyond it BLAS does well)


def _f32_matrix(name: str, t, rows: int | None = None, cols: int | None = None) -> torch.Tensor:
    """t as a 2-D fp32 CPU matrix whose rows are unit-stride (a copy only if they are not)."""
    _check(name, t, torch.float32, contiguous=False)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if (rows is not None and t.shape[0] != rows) or (cols is not None and t.shape[1] != cols):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({rows if rows is not None else 'any'}, "
                         f"{cols if cols is not None else 'any'})")
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def _rank(R: int) -> int:
    if not 0 < R <= MAX_LOWRANK_R:
        raise ValueError(f"the rank-r kernels take 1 <= r <= {MAX_LOWRANK_R}, got r={R}")
    return R


def _f32_vector(name: str, t, n: int):
    """None, or t as a contiguous fp32 CPU vector of n elements (TypeError / ValueError otherwise)."""
    if t is None:
        return None
    _check(name, t, torch.float32, contiguous=False)
    if t.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")
    return t.contiguous()


def _ptrs(*ts) -> list:
    """Data pointers, 0 for None."""
    return [0 if t is None else t.data_ptr() for t in ts]


def lowrank_supported(t: torch.Tensor, r: int) -> bool:
    """Whether the rank-r kernels serve a product with operand `t` and rank r (fp32 CPU, r <= 64)."""
    return t.dtype == torch.float32 and t.device.type == "cpu" and 0 < r <= MAX_LOWRANK_R and available()


def lowrank_xat(x, a) -> torch.Tensor:
    """y[M, R] = x[M, K] . a[R, K]^T, fp32 (xa = x A^T; dY B as dY . (B^T)^T)."""
    C = require()
    x = _f32_matrix("x", x)
    M, K = x.shape
    a = _f32_matrix("a", a, cols=K).contiguous()
    R = _rank(a.shape[0])
    y = torch.empty(M, R, dtype=torch.float32)
    if M and K:
        C.lowrank_xat(x.data_ptr(), x.stride(0), a.data_ptr(), y.data_ptr(), M, K, R, torch.get_num_threads(), isa())
    else:
        y.zero_()
    return y


def lowrank_gtx(g, x, scale: float = 1.0, colsum: bool = False, transpose: bool = False):
    """(scale * g[M, R]^T . x[M, K] as [R, K], or as [K, R] when `transpose`; sum of x's rows [K] or
    None), fp32: dA = s dyb^T x, and dB = s dY^T xa with db = sum dY in the same pass over dY.
    g any strides."""
    C = require()
    _check("g", g, torch.float32, contiguous=False)
    if g.dim() != 2:
        raise ValueError(f"g must be 2-D, got shape {tuple(g.shape)}")
    M, R = g.shape
    _rank(R)
    x = _f32_matrix("x", x, rows=M)
    K = x.shape[1]
    out = torch.empty((K, R) if transpose else (R, K), dtype=torch.float32)
    cs = torch.empty(K, dtype=torch.float32) if colsum else None
    if M and K:
        C.lowrank_gtx(g.data_ptr(), g.stride(0), g.stride(1), x.data_ptr(), x.stride(0), out.data_ptr(), int(transpose),
                      cs.data_ptr() if cs is not None else 0, float(scale), M, R, K, torch.get_num_threads(), isa())
    else:
        out.zero_()
        if cs is not None:
            cs.zero_()
    return out, cs


def lowrank_gb(g, bt, scale: float = 1.0, bias=None, out=None, out_scale=None) -> torch.Tensor:
    """bias[N] + scale * g[M, R] . bt[R, N], fp32 (the rank-r term of y and of dX), as a new [M, N] tensor;
    or, given `out` (a contiguous fp32 [M, N]), in place out = out * out_scale[N] (if given) + that,
    returning out (DoRA's forward epilogue y = (x W^T) g + b + s xa (g B)^T in one pass). g any strides;
    bias and out_scale None or [N]."""
    C = require()
    _check("g", g, torch.float32, contiguous=False)
    if g.dim() != 2:
        raise ValueError(f"g must be 2-D, got shape {tuple(g.shape)}")
    M, R = g.shape
    _rank(R)
    bt = _f32_matrix("bt", bt, rows=R).contiguous()
    N = bt.shape[1]
    bias, out_scale = _f32_vector("bias", bias, N), _f32_vector("out_scale", out_scale, N)
    accumulate = out is not None
    if accumulate:
        _check("out", out, torch.float32)
        if out.shape != (M, N):
            raise ValueError(f"out must have shape ({M}, {N}), got {tuple(out.shape)}")
    elif out_scale is not None:
        raise ValueError("out_scale scales the values of `out`: pass out as well")
    else:
        out = torch.empty(M, N, dtype=torch.float32)
    if M and N:
        C.lowrank_gb(g.data_ptr(), g.stride(0), g.stride(1), bt.data_ptr(), *_ptrs(bias, out_scale), int(accumulate),
                     float(scale), out.data_ptr(), M, N, R, torch.get_num_threads(), isa())
    return out


def lowrank_colsums(d, y=None, bias=None, g=None, want_db: bool = True):
    """DoRA's column sums over d = dY [M, N] in one pass (fp32): (d * g [M, N] or None when g is None,
    sum_m d [N] or None unless want_db, sum_m d * (y - bias) [N] or None when y is None). Sums run in
    64-row chunks (as lowrank_gtx); each column has one writer, so results do not depend on the thread
    count. d and y: 2-D with unit-stride rows; bias and g: [N] or None."""
    C = require()
    d = _f32_matrix("d", d)
    M, N = d.shape
    if y is not None:
        y = _f32_matrix("y", y, rows=M, cols=N)
    bias, g = _f32_vector("bias", bias, N), _f32_vector("g", g, N)
    dg = torch.empty(M, N, dtype=torch.float32) if g is not None else None
    db = torch.zeros(N, dtype=torch.float32) if want_db else None
    c = torch.zeros(N, dtype=torch.float32) if y is not None else None
    if M and N:
        C.lowrank_colsums(d.data_ptr(), d.stride(0), *_ptrs(y), y.stride(0) if y is not None else 0,
                          *_ptrs(bias, g, dg, db, c), M, N, torch.get_num_threads(), isa())
    return dg, db, c


# ---- the fp32 GEMM with a rank-r term (csrc/cpu/cpu_gemm_impl.h) ------------------------------------

GEMM_MIN_M = MAX_DECODE_M + 1  # rows below which the decode kernels (NF4) or BLAS's GEMV serve better


_gemm_fast: dict = {}  # (module, isa) -> whether its GEMM runs a vector unit


def gemm_fast() -> bool:
    """Whether `gemm` runs a vector unit here (AVX2 / AVX-512); the portable build is correct but slower
    than BLAS."""
    mod = load()
    if mod is None:
        return False
    key = (mod, isa())
    fast = _gemm_fast.get(key)
    if fast is None:
        fast = _gemm_fast[key] = mod.lowrank_isa(key[1]) != "scalar"
    return fast


def _gemm_operand(name: str, t, shape: tuple) -> torch.Tensor:
    t = _f32_matrix(name, t)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")
    return t


def gemm(a, b=None, *, b_t: bool, nf4=None, bias=None, a2=None, b2=None, b2_t: bool = False, scale2: float = 1.0,
         col_scale=None, out=None, proj=None, proj_t: bool = False):
    """out[M, N] = (out, if given: accumulated into) + bias[N] + a[M, K] . op(b) + scale2 * a2[M, R] . op2(b2),
    fp32, by the native packed GEMM (one pass writes out: the rank-R term rides along as R more steps).
    col_scale [N] (not with out) scales the products before the bias: (a . op(b) + scale2 a2 . op2(b2))
    * col_scale + bias, DoRA's g * (x W^T + s xa B^T) + b.
    proj (instead of a2): a2 = a . op(proj) is computed by the kernel from its packed tiles of a (xa = x A^T
    with proj = A [R, K], proj_t; dyb = dY B with proj = B [K, R]) and returned: (out, a2 [M, R]).

    op(b) = b^T for b_t (b [N, K]: y = x W^T) else b [K, N] (dX = dY W). `nf4` = (packed, absmax,
    code, rows, cols, blocksize) replaces b by an NF4 W [rows, cols] (fp32 absmax; cols % 8 == 0),
    decoded to fp32 code[nibble] * absmax while packed (never built dense): b_t reads it as [N, K] =
    [rows, cols], else as [K, N]. op2(b2) = b2^T for b2_t (b2 [N, R]) else b2 [R, N]; R <= 64.
    Sums are fp32 FMAs in a fixed order (thread count does not change them); operands' rows must be
    unit-stride (else copied); `out` contiguous fp32 [M, N]."""
    C = require()
    a = _f32_matrix("a", a)
    M, K = a.shape
    if (b is None) == (nf4 is None):
        raise ValueError("gemm takes exactly one of b (fp32) and nf4 (an NF4 weight)")
    if nf4 is not None:
        packed, absmax, code, rows, cols, blocksize = nf4
        packed, rows, cols, blocksize = _check_weight(packed, absmax, code, rows, cols, blocksize)
        if cols % 8:
            raise ValueError(f"gemm decodes NF4 rows in runs of 8: the weight's columns ({cols}) must be a "
                             "multiple of 8")
        N = rows if b_t else cols
        if (cols if b_t else rows) != K:
            raise ValueError(f"the NF4 weight [{rows}, {cols}] does not match a's K={K} (b_t={b_t})")
        bptr, ldb, nf4_ptrs = 0, cols, (packed.data_ptr(), absmax.data_ptr(), code.data_ptr(), blocksize)
    else:
        b = _f32_matrix("b", b, cols=K if b_t else None, rows=None if b_t else K)
        N = b.shape[0] if b_t else b.shape[1]
        bptr, ldb, nf4_ptrs = b.data_ptr(), b.stride(0), (0, 0, 0, 0)
    bias, col_scale = _f32_vector("bias", bias, N), _f32_vector("col_scale", col_scale, N)
    if col_scale is not None and out is not None:
        raise ValueError("col_scale scales the whole product: it cannot be combined with accumulating into out")
    R = 0
    if proj is not None:
        if a2 is not None:
            raise ValueError("pass a2 or proj (a2 = a . op(proj), computed), not both")
        proj = _f32_matrix("proj", proj, cols=K if proj_t else None, rows=None if proj_t else K)
        a2 = torch.empty(M, _rank(proj.shape[0] if proj_t else proj.shape[1]), dtype=torch.float32)
        if b2 is None:
            raise ValueError("proj feeds the rank-r term: pass b2 as well")
    if (a2 is None) != (b2 is None):
        raise ValueError("the rank-r term needs both a2 and b2")
    if a2 is not None:
        a2 = _f32_matrix("a2", a2, rows=M)
        R = _rank(a2.shape[1])
        b2 = _gemm_operand("b2", b2, (N, R) if b2_t else (R, N))
    if out is None:
        out = torch.empty(M, N, dtype=torch.float32)
        accumulate = 0
    else:
        _check("out", out, torch.float32)
        if tuple(out.shape) != (M, N):
            raise ValueError(f"out must have shape ({M}, {N}), got {tuple(out.shape)}")
        accumulate = 1
    if M and N:
        lda2, ldb2 = (a2.stride(0), b2.stride(0)) if R else (0, 0)
        a2ptr, pargs = (0, (proj.data_ptr(), proj.stride(0), int(proj_t), a2.data_ptr())) if proj is not None \
            else (a2.data_ptr() if R else 0, (0, 0, 0, 0))
        C.gemm(a.data_ptr(), a.stride(0), bptr, ldb, int(b_t), *nf4_ptrs, a2ptr, lda2, *_ptrs(b2), ldb2, int(b2_t), R,
               float(scale2), *pargs, *_ptrs(col_scale, bias), out.data_ptr(), N, accumulate, M, N, K,
               _threads(M * N * (K + R)), isa())  # GRAIN multiply-adds (~20 us) per thread
    elif proj is not None:  # no output columns: the projection alone
        torch.mm(a, proj.t() if proj_t else proj, out=a2)
    return (out, a2) if proj is not None else out


_workspace = threading.local()


def dense_weight_fp32(packed, absmax, code, N: int, K: int, blocksize: int,
                      round_to: torch.dtype | None = None) -> torch.Tensor:
    """The NF4 weight as a dense fp32 [N, K] VIEW of this thread's reused workspace.

    Values fp32(code[nibble] * absmax), rounded to `round_to` (fp16 / bf16: the input dtype of the
    matmul, as the other backends decode W) and held as fp32, so BLAS runs in fp32.

    Valid only until the next call on this thread (which overwrites it): use it for one matmul and
    never return it to a caller or save it for backward. Reusing the buffer avoids the page faults of
    a fresh large allocation. Any K, blocksize (blocks may cross rows).
    """
    packed, N, K, blocksize = _check_weight(packed, absmax, code, N, K, blocksize)
    buf = getattr(_workspace, "buf", None)
    if buf is None or buf.numel() < N * K:
        _workspace.buf = buf = None  # free the old one first
        _workspace.buf = buf = _empty(N * K, torch.float32)
    out = buf[: N * K]
    dequantize_nf4(packed, absmax, None, None, 0.0, code, N * K, blocksize, torch.float32, out=out, round_to=round_to)
    return out.view(N, K)


def release_workspace() -> None:
    """Free this thread's dense-weight workspace."""
    _workspace.buf = None


# ---- NF4 quantize and the 8-bit quantize of double quantization (csrc/cpu/cpu_quantize*.cpp) --------

_quant_tables: dict = {}


def _quant_table(name: str) -> torch.Tensor:
    """The NF4 thresholds [15] or the dynamic map's midpoints [255] (fp32, sorted), built once."""
    if name not in _quant_tables:
        from deltakern import _codes

        table = _codes.nf4_thresholds() if name == "thresholds" else _codes.dynamic_midpoints()
        _quant_tables[name] = table.contiguous()
    return _quant_tables[name]


def _flat_input(x, dtypes) -> torch.Tensor:
    """x (any shape and strides) as a flat contiguous CPU tensor (a copy only when x is strided)."""
    _cpu_tensor("x", x)
    if x.dtype not in dtypes:
        raise TypeError(f"x must be {' or '.join(str(d).removeprefix('torch.') for d in dtypes)}, got {x.dtype}")
    return x.reshape(-1).contiguous()


def quantize_nf4(x, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (fp32 / fp16 / bf16, any shape, flattened row-major) -> (packed uint8 [(n+1)//2], fp32 absmax
    [ceil(n/blocksize)]), bit-exact with quantize_nf4_ref (bitsandbytes' CUDA rule, correctly rounded
    reciprocal). Per block: v = ftz(x), absmax = max|v|, z = v * ftz(1/absmax), code = #{t_j < z} over
    the 15 NF4 thresholds (NaN -> 0); byte i = code(2i) << 4 | code(2i+1), an odd n padding the code
    of 0 * ftz(1/absmax). Non-finite x is not rejected here (nf4.quantize does); it gives the
    reference's bytes: a block holding inf or NaN stores absmax inf or NaN and codes 0 or 7.
    """
    C = require()
    blocksize = _check_blocksize(blocksize)
    flat = _flat_input(x, tuple(_DTYPES))
    n = flat.numel()
    packed = _empty((n + 1) // 2, torch.uint8)
    absmax = _empty(-(-n // blocksize), torch.float32)
    if n:
        C.quantize_nf4(flat.data_ptr(), _DTYPES[flat.dtype], n, blocksize, _quant_table("thresholds").data_ptr(),
                       packed.data_ptr(), absmax.data_ptr(), _threads(n), isa())
    return packed, absmax


def quantize_nested(x) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 x (any shape, flattened) -> (uint8 codes [n], fp32 absmax [ceil(n/256)]): the 8-bit
    dynamic-map step of double quantization, bit-exact with quantize_nested_ref. Per group of 256:
    z = ftz(x) * ftz(1/absmax), q = #{m_j < z} over the 255 fp32 midpoints of the map, +1 when q is
    odd and z == m_q (a tie goes to the even index); NaN z (absmax 0) -> 0."""
    C = require()
    flat = _flat_input(x, (torch.float32,))
    n = flat.numel()
    codes = torch.empty(n, dtype=torch.uint8)
    absmax = torch.empty(-(-n // 256), dtype=torch.float32)
    if n:
        C.quantize_nested(flat.data_ptr(), n, _quant_table("midpoints").data_ptr(), codes.data_ptr(), absmax.data_ptr(),
                          _threads(n), isa())
    return codes, absmax
