"""The native CPU quantize kernels of deltakern._cpu (csrc/cpu/cpu_quantize*.cpp): NF4 (4-bit codes +
fp32 absmax) and the 8-bit dynamic-map quantize of double quantization.

Every unit this CPU runs (scalar; avx2, which also serves avx512) is compared BIT FOR BIT, at 1 and
2 threads, with
  * the references quantize_nf4_ref / quantize_nested_ref (deltakern/backends/reference/nf4.py), and
  * the NumPy emulation of bitsandbytes' CUDA quantizer with the correctly rounded reciprocal
    (nf4_cuda_oracle), written from bitsandbytes' algorithm independently of deltakern,
on random data and the oracle's adversarial builders (values on and beside every threshold and
midpoint, zero blocks, subnormals, huge absmax), every blocksize, fp32 / bf16 / fp16 input, odd n
and partial last blocks. Non-finite input gives the reference's bytes; strided input is handled;
bad input raises before anything is written. The ops run these kernels on CPU tensors (backend
`cpu`) and DELTAKERN_BACKEND=torch still selects the references.

When deltakern._cpu is not importable, the `ext` fixture builds it with setup.py into a temp dir;
without a C++ compiler it skips with the reason.
"""

import importlib.util
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nf4_cuda_oracle as cuda
import pytest
import torch

from deltakern import _cpu_ext, _native, nf4
from deltakern._codes import dynamic_map
from deltakern.backends import registry
from deltakern.backends.reference.nf4 import quantize_nested_ref, quantize_nf4_ref

ROOT = Path(__file__).resolve().parents[1]
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ISAS = ("scalar", "avx2", "avx512")


@pytest.fixture(scope="module")
def ext(tmp_path_factory):
    """The importable deltakern._cpu, else one built by setup.py for this module (installed into the loader)."""
    if _cpu_ext.available():
        yield _cpu_ext.load()
        return
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler (c++ / $CXX): deltakern._cpu cannot be built here")
    out = tmp_path_factory.mktemp("cpu_ext")
    env = dict(os.environ, DELTAKERN_BUILD_CUDA="0")
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(out), "--build-temp", str(out / "tmp")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and "was not built" not in proc.stderr, proc.stdout + proc.stderr
    (so,) = (out / "deltakern").glob("_cpu.*")
    spec = importlib.util.spec_from_file_location("deltakern._cpu", so)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    saved = _cpu_ext._native.set(mod)
    yield mod
    _cpu_ext._native.set(*saved)


@pytest.fixture(params=ISAS)
def isa(request, ext, monkeypatch):
    monkeypatch.setenv("DELTAKERN_CPU_ISA", request.param)
    if not ext.supports(request.param):
        with pytest.raises(ValueError, match="does not support ISA"):
            _cpu_ext.quantize_nf4(torch.ones(64), 64)
        pytest.skip(f"this CPU does not run {request.param} (checked that asking for it raises)")
    assert ext.quantize_isa(request.param) == ("scalar" if request.param == "scalar" else "avx2")
    return request.param


@pytest.fixture
def threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def at_1_and_2_threads(fn, *args):
    """fn(*args) at 1 and at 2 threads; the outputs must be identical (one writer per block)."""
    outs = []
    for t in (1, 2):
        torch.set_num_threads(t)
        outs.append(fn(*args))
    for a, b in zip(*outs):
        assert torch.equal(a, b) or (a.dtype.is_floating_point and torch.equal(a.isnan(), b.isnan())
                                     and torch.equal(a.nan_to_num(), b.nan_to_num()))
    return outs[0]


def assert_same(got, want):
    """Same dtype, shape and bits (NaN absmax compared by position)."""
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        if g.dtype == torch.float32:
            assert torch.equal(g.isnan(), w.isnan())
            g, w = g.nan_to_num(), w.nan_to_num()
            assert torch.equal(g.view(torch.int32), w.view(torch.int32)), _first_diff(g, w)
        else:
            assert torch.equal(g, w), _first_diff(g, w)


def _first_diff(g, w):
    i = int((g != w).nonzero()[0])
    return f"{int((g != w).sum())} of {g.numel()} differ; first at {i}: got {g[i].item()}, want {w[i].item()}"


def nf4_input(blocksize, dtype, seed=0):
    """The oracle's adversarial blocks (in `dtype`; fp16 without the beyond-fp16 ones), random blocks
    over a wide range of scales, and an odd-length partial last block."""
    g = torch.Generator().manual_seed(seed)
    adv = cuda.nf4_adversarial(blocksize, seed=seed, huge=dtype != torch.float16)
    scales = torch.exp(torch.rand(3, 1, generator=g) * 12 - 9)  # 1.2e-4 .. 20
    rand = (torch.randn(3, blocksize, generator=g) * scales).reshape(-1)
    tail = torch.randn(blocksize // 2 + 3, generator=g) * 0.05
    return torch.cat([adv, rand, tail]).to(dtype)


# ---- NF4 -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_nf4_bit_exact(isa, blocksize, threads):
    for dtype in DTYPES:
        x = nf4_input(blocksize, dtype, seed=blocksize)
        assert x.numel() % 2 == 1 and x.numel() % blocksize
        got = at_1_and_2_threads(_cpu_ext.quantize_nf4, x, blocksize)
        assert_same(got, quantize_nf4_ref(x, blocksize))
        packed, absmax = cuda.quantize_4bit(x.float().numpy(), blocksize)
        assert_same(got, (torch.from_numpy(packed), torch.from_numpy(absmax)))


@pytest.mark.parametrize("n", [1, 2, 3, 31, 32, 33, 63, 64, 65, 127, 1000, 4097])
def test_nf4_sizes(isa, n, threads):
    """Sizes below, at and beside a block (blocksize 32 and 64): partial blocks, odd n, one element."""
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 3
    for blocksize in (32, 64):
        assert_same(at_1_and_2_threads(_cpu_ext.quantize_nf4, x, blocksize), quantize_nf4_ref(x, blocksize))


def test_nf4_pad_nibble(isa):
    """An odd n pads the code of z = 0 * ftz(1/absmax): 7 in an ordinary block, 0 when the partial
    last block is all zero (0 * inf = NaN), 7 when its absmax exceeds 2^126 (the reciprocal flushes)."""
    cases = [(torch.tensor([0.5, 0.25, -1.0]), 0x7), (torch.zeros(3), 0x0), (torch.tensor([2.0**127, 1.0, 3.0]), 0x7)]
    for tail, pad in cases:
        x = torch.cat([torch.randn(64), tail])
        packed, absmax = _cpu_ext.quantize_nf4(x, 64)
        assert int(packed[-1]) & 0xF == pad
        assert_same((packed, absmax), quantize_nf4_ref(x, 64))
    packed, absmax = _cpu_ext.quantize_nf4(torch.zeros(64), 64)
    assert torch.equal(packed, torch.zeros(32, dtype=torch.uint8)) and float(absmax) == 0.0  # CUDA's 0x00, not 0x77


def test_independent_of_the_flush_denormal_mode(isa, threads):
    """The flushes are explicit: with the CPU's FTZ/DAZ bits set, the bytes do not change."""
    torch.set_num_threads(1)  # torch.set_flush_denormal sets the calling thread's mode
    x = nf4_input(64, torch.float32, seed=11)
    y = torch.cat([cuda.nested_adversarial(seed=2), torch.randn(77)])
    want = (quantize_nf4_ref(x, 64), quantize_nested_ref(y))
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-denormal mode")
    try:
        got = (_cpu_ext.quantize_nf4(x, 64), _cpu_ext.quantize_nested(y))
    finally:
        torch.set_flush_denormal(False)
    assert_same(got[0], want[0])
    assert_same(got[1], want[1])


def test_nf4_non_finite_gives_the_reference_bytes(isa):
    """Not rejected by the op (deltakern.nf4.quantize rejects it before): inf / NaN blocks store
    absmax inf / NaN, codes 0 for the non-finite elements (z = NaN) and as the reference elsewhere."""
    x = torch.randn(64 * 6 + 1)
    x[3], x[70], x[71], x[140], x[200], x[210], x[64 * 6] = math.inf, -math.inf, math.nan, math.nan, math.inf, -math.inf, math.nan
    for dtype in DTYPES:
        got = _cpu_ext.quantize_nf4(x.to(dtype), 64)
        assert_same(got, quantize_nf4_ref(x.to(dtype), 64))
        assert got[1].isinf().tolist() == [True, False, False, True, False, False, False]  # NaN wins over inf
        assert got[1].isnan().tolist() == [False, True, True, False, False, False, True]


def test_nf4_strided_input(ext):
    """Any shape, strides and offset: the row-major flattening of x, as the references read it; x untouched."""
    base = torch.randn(96, 130, generator=torch.Generator().manual_seed(3))
    for dtype in DTYPES:
        for x in (base.to(dtype).t(), base.to(dtype)[:, ::2], base.to(dtype).reshape(-1)[1::3],
                  base.to(dtype).reshape(-1)[1:]):  # contiguous, not vector-aligned: read in place
            before = x.clone()
            got = _cpu_ext.quantize_nf4(x, 64)
            assert_same(got, _cpu_ext.quantize_nf4(x.contiguous(), 64))
            assert_same(got, quantize_nf4_ref(x, 64))
            assert torch.equal(x, before)


def test_nf4_empty(ext):
    packed, absmax = _cpu_ext.quantize_nf4(torch.empty(0), 64)
    assert packed.shape == (0,) and packed.dtype == torch.uint8 and absmax.shape == (0,) and absmax.dtype == torch.float32


def test_bad_inputs(ext):
    x = torch.randn(128)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        _cpu_ext.quantize_nf4(x.tolist(), 64)
    for dtype in (torch.float64, torch.int32, torch.uint8):
        with pytest.raises(TypeError, match="x must be float32 or float16 or bfloat16"):
            _cpu_ext.quantize_nf4(x.to(dtype), 64)
    for bs in (16, 48, 8192, 0, -64):
        with pytest.raises(ValueError, match="blocksize must be a power of two"):
            _cpu_ext.quantize_nf4(x, bs)
    with pytest.raises(ValueError, match="need CPU tensors"):
        _cpu_ext.quantize_nf4(torch.empty(128, device="meta"), 64)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        with pytest.raises(TypeError, match="x must be float32, got"):
            _cpu_ext.quantize_nested(x.to(dtype))
    with pytest.raises(ValueError, match="need CPU tensors"):
        _cpu_ext.quantize_nested(torch.empty(128, device="meta"))


# ---- 8-bit nested --------------------------------------------------------------------------------

def test_nested_bit_exact(isa, threads):
    g = torch.Generator().manual_seed(1)
    x = torch.cat([cuda.nested_adversarial(seed=1), torch.randn(3 * 256, generator=g) * 0.01,
                   torch.rand(256, generator=g) - 0.5, torch.randn(301, generator=g) * 1e-3])
    got = at_1_and_2_threads(_cpu_ext.quantize_nested, x)
    assert_same(got, quantize_nested_ref(x))
    codes, absmax = cuda.quantize_8bit(x.numpy(), dynamic_map().numpy(), 256)
    assert_same(got, (torch.from_numpy(codes), torch.from_numpy(absmax)))
    # the ties to even, the code 0 near -1 and the all-zero group are in there: check a few by value
    mids = (dynamic_map()[:-1] + dynamic_map()[1:]) * 0.5
    q, _ = _cpu_ext.quantize_nested(torch.cat([torch.tensor([1.0]), mids[243:245], torch.tensor([-0.986845255])]))
    assert q[1:].tolist() == [244, 244, 0]


@pytest.mark.parametrize("n", [1, 2, 31, 32, 255, 256, 257, 512 + 33])
def test_nested_sizes(isa, n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.02
    assert_same(_cpu_ext.quantize_nested(x), quantize_nested_ref(x))


def test_nested_non_finite_and_strided(isa):
    x = torch.randn(256 * 3 + 7)
    x[5], x[300], x[301], x[600] = math.inf, math.nan, -math.inf, -math.inf
    assert_same(_cpu_ext.quantize_nested(x), quantize_nested_ref(x))
    y = torch.randn(40, 33).t()
    assert_same(_cpu_ext.quantize_nested(y), quantize_nested_ref(y))
    q, absmax = _cpu_ext.quantize_nested(torch.empty(0))
    assert q.shape == (0,) and absmax.shape == (0,)


# ---- the ops and the public API ------------------------------------------------------------------

def test_ops_run_the_native_kernels(ext, monkeypatch):
    monkeypatch.delenv("DELTAKERN_BACKEND", raising=False)
    for op in ("nf4_quantize", "nf4_quantize_nested"):
        monkeypatch.delenv(f"DELTAKERN_BACKEND_{op.upper()}", raising=False)
        assert registry.resolve(op, "cpu") == "cpu"
    w = torch.randn(48, 100, generator=torch.Generator().manual_seed(5)) * 0.02
    for dtype in DTYPES:
        assert_same(torch.ops.deltakern.nf4_quantize(w.to(dtype).reshape(-1), 64), quantize_nf4_ref(w.to(dtype), 64))
    assert_same(torch.ops.deltakern.nf4_quantize_nested(w.reshape(-1)), quantize_nested_ref(w))
    # other dtypes the op accepts run the reference
    assert_same(torch.ops.deltakern.nf4_quantize(w.double().reshape(-1), 64), quantize_nf4_ref(w.double(), 64))
    monkeypatch.setenv("DELTAKERN_BACKEND", "torch")
    assert registry.resolve("nf4_quantize", "cpu") == "torch" and registry.resolve("nf4_quantize_nested", "cpu") == "torch"


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_same_as_the_torch_backend(ext, monkeypatch, dtype):
    """deltakern.nf4.quantize (nested, an odd size) gives the same NF4Weight on both CPU backends."""
    w = (torch.randn(67, 129, generator=torch.Generator().manual_seed(7)) * 0.02).to(dtype)
    monkeypatch.delenv("DELTAKERN_BACKEND", raising=False)
    native = nf4.quantize(w, 64, double_quant=True)
    monkeypatch.setenv("DELTAKERN_BACKEND", "torch")
    ref = nf4.quantize(w, 64, double_quant=True)
    for name in ("packed", "absmax", "nested_absmax"):
        assert torch.equal(getattr(native, name), getattr(ref, name)), name
    assert native.offset == ref.offset
    assert torch.equal(nf4.dequantize(native), nf4.dequantize(ref))


def test_quantize_rejects_non_finite(ext):
    w = torch.randn(8, 64)
    for bad in (math.nan, math.inf, -math.inf):
        w[3, 5] = bad
        with pytest.raises(ValueError, match="1 non-finite values"):
            nf4.quantize(w, 64)


def test_without_the_extension_quantize_runs_the_references(monkeypatch):
    """deltakern._cpu absent: the launchers say how to get it, the ops and nf4.quantize run the
    references, and DELTAKERN_BACKEND=cpu raises the extension's own error."""
    import deltakern

    monkeypatch.setattr(_cpu_ext._native, "_module", _native.UNSET)
    monkeypatch.setitem(sys.modules, "deltakern._cpu", None)  # import now raises ImportError
    monkeypatch.delattr(deltakern, "_cpu", raising=False)
    monkeypatch.delenv("DELTAKERN_BACKEND", raising=False)
    msg = r"without its native CPU extension deltakern._cpu.*DELTAKERN_BACKEND=torch"
    x = torch.randn(3, 100)
    with pytest.raises(RuntimeError, match=msg):
        _cpu_ext.quantize_nf4(x, 64)
    with pytest.raises(RuntimeError, match=msg):
        _cpu_ext.quantize_nested(x)
    assert registry.resolve("nf4_quantize", "cpu") == "torch" and registry.resolve("nf4_quantize_nested", "cpu") == "torch"
    q = nf4.quantize(x, 64, double_quant=False)
    assert_same((q.packed.reshape(-1), q.absmax), quantize_nf4_ref(x, 64))
    monkeypatch.setenv("DELTAKERN_BACKEND", "cpu")
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.deltakern.nf4_quantize(x.reshape(-1), 64)
