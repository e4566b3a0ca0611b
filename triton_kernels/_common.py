# Pieces shared by the LoRA (lora.py), frozen-linear / DoRA-epilogue (linear.py) and DoRA weight-norm
# (dora.py) kernels: the in-register weight-tile loader, the dot helper, the grouped tile order,
# autotuning config lists with their shared-memory pruning, and the launchers' argument helpers.
#
# W [N, K] is dense (fp16 / bf16 / fp32, any strides) or NF4 (bitsandbytes layout: flat index
# n*K + k, byte index // 2, high nibble first, one fp32 absmax per `blocksize` consecutive flat
# elements). NF4 tiles are gathered by flat index, so odd K (rows straddling bytes and blocks) needs
# no special case, and decoded as cast(fp32(code[nibble] * absmax)) -- never written to memory.
#
# Autotuning: config lists are pinned to one tiny config when TRITON_INTERPRET=1 (CPU interpreter)
# and to their first entry with DELTAKERN_TRITON_PIN=1.

import contextlib
import os
import weakref

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
PIN = os.environ.get("DELTAKERN_TRITON_PIN", "0") == "1"
MAX_R = 128
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) of the interpreter's only config.
INTERPRET_CONFIG = (16, 32, 32, 4, 4, 1)
SMEM_BUDGET = 200 * 1024  # sm_90 allows 227 KB per block; leave room for the epilogue


# --------------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def w_tile(w_ptr, absmax_ptr, code_ptr, rows, cols, N, K, stride_wn, stride_wk,
           IS_NF4: tl.constexpr, NF4_BLOCK: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """W[rows, cols] in OUT_DTYPE for broadcastable index tensors (0 outside [N, K])."""
    ok = (rows < N) & (cols < K)
    if IS_NF4:
        flat = rows * K + cols
        packed = tl.load(w_ptr + (flat >> 1), mask=ok, other=0).to(tl.int32)
        shift = 4 - 4 * (flat & 1)  # element 2i sits in the high nibble of byte i
        level = tl.load(code_ptr + ((packed >> shift) & 15))
        scale = tl.load(absmax_ptr + flat // NF4_BLOCK, mask=ok, other=0.0)
        w = (level * scale).to(OUT_DTYPE)  # one fp32 product, one rounding (the dequantize rule)
    else:
        w = tl.load(w_ptr + rows * stride_wn + cols * stride_wk, mask=ok, other=0.0)
    return w


@triton.jit
def nf4_rows_tile(w_ptr, absmax_ptr, pair_ptr, rows, k0, N, K,
                  ROWS: tl.constexpr, BK: tl.constexpr, NF4_BLOCK: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """W[rows, k0 : k0 + BK] as [ROWS, BK] in OUT_DTYPE (0 outside [N, K]) for an NF4 weight whose rows
    start on a block (K % NF4_BLOCK == 0, so K is even and no block or byte straddles two rows).

    One vector load of the BK / 2 packed bytes of each row; both levels of a byte from one 8-byte load
    of the 2 KB pair table (pair_table: one gather per byte, not per element), joined back in element
    order; one fp32 absmax per (row, block), broadcast over the block's columns (BK / NF4_BLOCK of
    them per row when BK > NF4_BLOCK, else one). w = cast(fp32(code[nibble] * absmax)), the
    dequantize rule.
    k0 is a multiple of BK, and BK and NF4_BLOCK are powers of two, so a tile never straddles a block
    unless it covers whole blocks.
    """
    half_k = K // 2
    kb = k0 // 2 + tl.arange(0, BK // 2)
    row_ok = rows < N
    b = tl.load(w_ptr + rows[:, None] * half_k + kb[None, :], mask=row_ok[:, None] & (kb[None, :] < half_k),
                other=0).to(tl.int32)
    pair = tl.load(pair_ptr + b)  # int64: level(high nibble) | level(low nibble) << 32
    hi = (pair & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
    lo = (pair >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
    level = tl.reshape(tl.join(hi, lo), (ROWS, BK))  # element 2j: high nibble of byte j
    NB: tl.constexpr = BK // NF4_BLOCK if BK > NF4_BLOCK else 1
    WIDTH: tl.constexpr = BK // NB
    cb = k0 + tl.arange(0, NB) * WIDTH  # first column of each block in the tile
    scale = tl.load(absmax_ptr + (rows[:, None] * K + cb[None, :]) // NF4_BLOCK,
                    mask=row_ok[:, None] & (cb[None, :] < K), other=0.0)  # [ROWS, NB]; 0 outside
    w = tl.reshape(level, (ROWS, NB, WIDTH)) * scale[:, :, None]
    return tl.reshape(w, (ROWS, BK)).to(OUT_DTYPE)


@triton.jit
def mma(a, b, acc, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """acc + a.b; DOT_FP32 upcasts both operands (the interpreter mis-computes bf16 dots)."""
    if DOT_FP32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=INPUT_PRECISION)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def grouped_tile(M, N_OUT, BLOCK_M: tl.constexpr, BLOCK_OUT: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of this program; GROUP_M row tiles walk the same column tiles
    together so the W tiles they stream stay in L2."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_o = tl.cdiv(N_OUT, BLOCK_OUT)
    group = GROUP_M * tiles_o
    first = (pid // group) * GROUP_M
    rows = tl.minimum(tiles_m - first, GROUP_M)
    return first + (pid % group) % rows, (pid % group) // rows


# --------------------------------------------------------------------------------------------
# autotuning
# --------------------------------------------------------------------------------------------


def config_shapes(table, kernel, weight):
    """The config tuples table[(kernel, weight)] this process tunes over (pinned as in the header)."""
    if INTERPRET:
        return [INTERPRET_CONFIG]
    shapes = table[(kernel, weight)]
    return shapes[:1] if PIN else shapes


def smem_estimate(kernel, cfg, elem, nf4, drop=False):
    """Rough shared-memory bytes of one config (fitted to sm_90 compiles of these kernels).

    kernel "fwd" reduces over BLOCK_K, "dx" over BLOCK_N; NF4 tiles gather two fp32 values per
    weight element (code, absmax), which the software pipeline stages through shared memory. `drop`
    (the DROP forward of linear.py) also stages the keep mask / x_d tile.
    """
    bm, bn, bk, stages = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"], cfg.num_stages
    red, other = (bk, bn) if kernel == "fwd" else (bn, bk)  # reduction tile, W's other dim
    a_tile = bm * red * elem * (2 if drop and kernel == "fwd" else 1)
    operands = a_tile + red * other * elem
    if not nf4:
        return max(stages, 1) * operands
    return operands + max(stages - 1, 0) * (a_tile + red * other * 8)


# ---- registers on sm_8x --------------------------------------------------------------------------
# The config lists are tuned on sm_90, where wgmma keeps the MMA operands out of the registers. On
# sm_8x (mma.sync) the same tiles need more: the kernel report's sm_80 compiles spill above these
# fp32 accumulator values per thread (output tile rows x columns / threads); an NF4 kernel with a
# heavy epilogue (DoRA's dX: g, db, c; the dropout column sums of z) at half that and at most
# SM8X_W_TILE decoded weight values per thread (half with two accumulators).
SM8X_ACC = {"dense": 64, "nf4": 32}
SM8X_W_TILE = 32
_ARCH = None  # set by `pruning_arch` (the kernel report prunes for archs it compiles but does not run)


def target_arch(t: torch.Tensor) -> int:
    """The compute capability (major * 10 + minor) the autotuner prunes for: `pruning_arch`'s, else
    t's CUDA device's, else 90 (the interpreter lane keeps the sm_90 lists)."""
    if _ARCH is not None:
        return _ARCH
    if t.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(t.device)
        return 10 * major + minor
    return 90


@contextlib.contextmanager
def pruning_arch(arch: int):
    """Prune configs as for compute capability `arch` inside the block (the kernel report)."""
    global _ARCH
    old, _ARCH = _ARCH, arch
    try:
        yield
    finally:
        _ARCH = old


def fit_registers(configs, arch, nf4, out_key, red_key, accumulators=1, heavy=False):
    """sm_90 and up: `configs` unchanged. sm_8x: each config with its output tile (out_key: BLOCK_N for
    a forward, BLOCK_K for a dX) halved until its `accumulators` fp32 tiles hold at most
    SM8X_ACC / accumulators values per thread (half again for NF4 with a `heavy` epilogue, whose
    reduction tile red_key is also halved until the decoded W tile holds at most
    SM8X_W_TILE / accumulators values per thread); duplicates dropped, order kept."""
    if arch >= 90:
        return configs
    limit = SM8X_ACC["nf4" if nf4 else "dense"] // accumulators // (2 if nf4 and heavy else 1)
    out, seen = [], set()
    for cfg in configs:
        kw, threads = dict(cfg.kwargs), 32 * cfg.num_warps
        while kw["BLOCK_M"] * kw[out_key] // threads > limit and kw[out_key] > 16:
            kw[out_key] //= 2
        while nf4 and heavy and kw["BLOCK_N"] * kw["BLOCK_K"] // threads > SM8X_W_TILE // accumulators \
                and kw[red_key] > 16:
            kw[red_key] //= 2
        sig = (tuple(sorted(kw.items())), cfg.num_warps, cfg.num_stages)
        if sig not in seen:
            seen.add(sig)
            out.append(triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return out


def fit_smem(configs, estimate):
    """The configs that fit SMEM_BUDGET (estimate(cfg) bytes), each with as many of its pipeline
    stages as fit, duplicates dropped; may be empty."""
    kept, seen = [], set()
    for cfg in configs:
        while cfg.num_stages > 1 and estimate(cfg) > SMEM_BUDGET:
            cfg = triton.Config(dict(cfg.kwargs), num_warps=cfg.num_warps, num_stages=cfg.num_stages - 1)
        sig = (tuple(sorted(cfg.kwargs.items())), cfg.num_warps, cfg.num_stages)
        if estimate(cfg) <= SMEM_BUDGET and sig not in seen:
            seen.add(sig)
            kept.append(cfg)
    return kept


def autotuned(fn, table, kernel, weight, flags, prune_configs_by, pre_hook=None):
    """fn autotuned over config_shapes(table, kernel, weight), keyed on the M bucket, N, K, R_PAD and
    the mode flags. One autotuner per (kernel, weight kind) over the same jit function. `pre_hook`
    (Triton's autotuner pre_hook(nargs, reset_only=False)) runs before every timed trial and once
    after tuning, before the real launch: kernels whose result depends on what an output held
    before the launch (e.g. partial-sum buffers whose used rows depend on BLOCK_M) reset it there."""
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": g}, num_warps=w, num_stages=s)
               for bm, bn, bk, g, w, s in config_shapes(table, kernel, weight)]
    return triton.autotune(configs=configs, key=["M_BUCKET", "N", "K", "R_PAD", *flags],
                           prune_configs_by=prune_configs_by, pre_hook=pre_hook)(fn)


def zero_when(*pairs):
    """An autotuner pre_hook zeroing argument `ptr` for each (ptr, flag) pair whose constexpr flag is
    set. Autotuning runs every config on the same buffers, so a fp32 partial-sum buffer of
    [ceil(M / min BLOCK_M), N] rows keeps the rows a small-BLOCK_M trial wrote and a larger-BLOCK_M
    final launch does not overwrite; zeroing before each trial and before the real launch keeps
    the caller's sum over rows exact (GPU only: the interpreter runs one pinned config)."""

    def hook(nargs, reset_only=False):
        for ptr, flag in pairs:
            if nargs.get(flag):
                nargs[ptr].zero_()

    return hook


# --------------------------------------------------------------------------------------------
# launcher helpers
# --------------------------------------------------------------------------------------------


def device_guard(device):
    """Triton launches on the *current* CUDA device and its current stream: make that the device the
    tensors live on (a no-op for CPU tensors, i.e. the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _untuned_key(kernel, args, kwargs):
    """The autotuner key this launch would tune for, or None when it is tuned (or not autotuned).
    Mirrors triton.runtime.autotuner.Autotuner.run (Triton 3.6): the key arguments, then the dtypes
    of every argument that has one."""
    if not isinstance(kernel, triton.runtime.autotuner.Autotuner) or len(kernel.configs) <= 1:
        return None
    named = {**dict(zip(kernel.arg_names, args)), **kwargs}
    named = {k: v for k, v in named.items() if k in kernel.arg_names}
    key = [named[k] for k in kernel.keys if k in named]
    key += [str(v.dtype) for v in named.values() if hasattr(v, "dtype")]
    key = tuple(key)
    return None if key in kernel.cache else key


def launch(kernel, grid, device, *args, **kwargs):
    """kernel[grid](*args, **kwargs) on `device` (see device_guard).

    Autotuning times every config with real launches and synchronises, which a CUDA graph capture
    cannot contain: a launch that would tune while the current stream is capturing raises instead
    (run one eager step with the same shapes first, or pin the configs: DELTAKERN_TRITON_PIN=1)."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        key = _untuned_key(kernel, args, kwargs)
        if key is not None:
            name = getattr(kernel.fn, "__name__", "a Triton kernel")
            raise RuntimeError(
                f"{name} would autotune during CUDA graph capture (key {key[:6]}...): run one eager step "
                "with the same shapes before capturing, or set DELTAKERN_TRITON_PIN=1")
    with device_guard(device):
        return kernel[grid](*args, **kwargs)


def check(cond, msg):
    if not cond:
        raise ValueError(msg)


def r_pad(r):
    check(1 <= r <= MAX_R, f"LoRA rank r={r} is outside the kernels' range [1, {MAX_R}]")
    return max(16, triton.next_power_of_2(r))


_pairs = {}  # id(code) -> (weak reference to code, its version, its pair table)


def pair_table(code):
    """int64 [256] for a 16-entry fp32 code book: entry b holds the fp32 bits of code[b >> 4] (low
    word: the byte's first element) and of code[b & 15] (high word). One 8-byte load then decodes
    both levels of a packed byte. Built on code's device with torch ops (no host copy) and kept
    while that code tensor lives and is not written (matched by object identity, never by address,
    which a later tensor may reuse)."""
    hit = _pairs.get(id(code))
    if hit is not None and hit[0]() is code and hit[1] == code._version:
        return hit[2]
    bits = code.reshape(-1).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    b = torch.arange(256, device=code.device)
    table = bits[b >> 4] | (bits[b & 15] << 32)
    if len(_pairs) >= 256:  # forget the tables of dead code tensors
        for k in [k for k, v in _pairs.items() if v[0]() is None]:
            del _pairs[k]
    _pairs[id(code)] = (weakref.ref(code), code._version, table)
    return table


def nf4_aligned(is_nf4, K, blocksize):
    """Whether an NF4 weight's rows start on a block (K % blocksize == 0): the kernels then take the
    vector-load path (nf4_rows_tile) instead of gathering every element by its flat index."""
    return int(bool(is_nf4) and K % blocksize == 0)


def m_bucket(m):
    return triton.next_power_of_2(max(int(m), 1))


def tf32_matmul():
    """Whether torch lets fp32 matmuls use TF32. torch >= 2.9 refuses to read the legacy
    `allow_tf32` flag (RuntimeError) once the `fp32_precision` API has set TF32; ask that one then."""
    matmul = torch.backends.cuda.matmul
    try:
        return bool(matmul.allow_tf32)
    except RuntimeError:
        return getattr(matmul, "fp32_precision", "ieee") == "tf32"


def dot_flags(dtype):
    """(DOT_FP32, INPUT_PRECISION): fp32 follows torch's tf32 switch on the GPU, ieee in the
    interpreter; bf16 dots are upcast in the interpreter, whose bf16 tl.dot is wrong."""
    if dtype == torch.float32:
        tf32 = (not INTERPRET) and tf32_matmul()
        return 0, ("tf32" if tf32 else "ieee")
    if dtype == torch.bfloat16 and INTERPRET:
        return 1, "ieee"
    return 0, "tf32"  # the default; it only affects fp32 operands


def check_int32(name, t):
    """Tile offsets are int32: the largest element offset of an operand must fit."""
    if t is not None and t.numel() > 0:
        last = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        check(last < 2**31, f"{name} spans {last + 1} elements; the kernels' int32 offsets need < 2**31")


def weight_args(weight, nf4, N, K, dtype, device):
    """(w tensor, absmax, code, stride_wn, stride_wk, IS_NF4, NF4_BLOCK) for a dense [N, K] weight
    or, with nf4=(absmax_fp32, code, blocksize), the packed bytes of one; for NF4 rows that start on a
    block (nf4_aligned) `code` is the byte-indexed pair table (pair_table) that nf4_rows_tile reads."""
    if nf4 is None:
        check(isinstance(weight, torch.Tensor) and weight.dim() == 2 and tuple(weight.shape) == (N, K),
              f"weight must be [N, K] = [{N}, {K}], got {tuple(getattr(weight, 'shape', ()))}")
        check(weight.dtype == dtype, f"weight dtype {weight.dtype} != compute dtype {dtype}")
        check(weight.device == device, f"weight is on {weight.device}, expected {device}")
        check_int32("weight", weight)
        return weight, weight, weight, weight.stride(0), weight.stride(1), 0, 1
    absmax, code, blocksize = nf4
    check(N * K < 2**31, f"an NF4 weight with N*K = {N * K} elements needs int64 indexing (unsupported)")
    packed = weight.reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)  # other quant_storage dtypes hold the same bytes
    check(packed.numel() >= (N * K + 1) // 2, f"packed NF4 data has {packed.numel()} bytes, need {(N * K + 1) // 2}")
    check(absmax.dtype == torch.float32 and absmax.numel() >= -(-N * K // blocksize),
          "absmax must be fp32 with ceil(N*K/blocksize) entries (decode nested scales first)")
    check(code.dtype == torch.float32 and code.numel() == 16, "code must be 16 fp32 values")
    check(blocksize > 0 and blocksize & (blocksize - 1) == 0, f"blocksize {blocksize} must be a power of two")
    for name, t in (("packed", packed), ("absmax", absmax), ("code", code)):
        check(t.device == device, f"{name} is on {t.device}, expected {device}")
    # rows that start on a block take nf4_rows_tile, which reads both levels of a byte from the pair table
    table = pair_table(code) if nf4_aligned(1, K, blocksize) else code.reshape(-1).contiguous()
    return packed, absmax.reshape(-1).contiguous(), table, 0, 0, 1, int(blocksize)
