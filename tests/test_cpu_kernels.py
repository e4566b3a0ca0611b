"""The native CPU extension deltakern._cpu: build (and a failed build), the loader with the module
absent, and every kernel against its reference on every ISA this CPU runs, at 1 and 2 threads.

  dequantize   bit-exact with dequantize_nf4_ref (itself bit-exact with bitsandbytes, test_nf4.py),
               and with bitsandbytes' dequantize_4bit directly
  nf4_matmul / nf4_matmul_dx   fp32 sums, checked against float64 of the same decoded W with the
               bound |err| <= K * eps32 * (|x| . |w|) (eps32 = 2^-23; the classic sum bound is
               gamma_K ~ K * 2^-24), and bit-identical at 1 and 2 threads (each output has one owner)
  backend      torch.ops.deltakern.* on CPU tensors run these kernels and match the torch references

When deltakern._cpu is not importable, the `ext` fixture builds it with setup.py into a temp dir;
without a C++ compiler that fixture skips with the reason (never silently).
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deltakern
from deltakern import _cpu_ext, _native
from deltakern._codes import nf4_code
from deltakern.backends.reference.nf4 import dequantize_nf4_ref, quantize_nf4_ref

ROOT = Path(__file__).resolve().parents[1]
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ISAS = ("scalar", "avx2", "avx512")
EPS32 = 2.0**-23
CODE = nf4_code(torch.device("cpu"))


def _bits(t):
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _build(out: Path, env_extra: dict) -> subprocess.CompletedProcess:
    env = dict(os.environ, DELTAKERN_BUILD_CUDA="0", **env_extra)
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(out), "--build-temp", str(out / "tmp")]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _load_so(path: Path):
    spec = importlib.util.spec_from_file_location("deltakern._cpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _have_cxx() -> bool:
    return shutil.which(os.environ.get("CXX", "c++")) is not None


@pytest.fixture(scope="module")
def built_so(tmp_path_factory):
    """A deltakern._cpu freshly built by setup.py (skips, saying so, without a C++ compiler)."""
    if not _have_cxx():
        pytest.skip("no C++ compiler (c++ / $CXX): deltakern._cpu cannot be built here")
    out = tmp_path_factory.mktemp("cpu_ext")
    proc = _build(out, {})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "was not built" not in proc.stderr, proc.stderr
    (so,) = (out / "deltakern").glob("_cpu.*")
    return so


@pytest.fixture(scope="module")
def ext(request):
    """The importable deltakern._cpu, else one built for this run (installed into the loader)."""
    if _cpu_ext.available():
        yield _cpu_ext.load()
        return
    mod = _load_so(request.getfixturevalue("built_so"))
    saved = _cpu_ext._native.set(mod)
    yield mod
    _cpu_ext._native.set(*saved)


@pytest.fixture(params=ISAS)
def isa(request, ext, monkeypatch):
    if not ext.supports(request.param):
        with pytest.raises(ValueError, match="does not support ISA"):
            monkeypatch.setenv("DELTAKERN_CPU_ISA", request.param)
            _cpu_ext.dequantize_nf4(*_random_nf4(64, 64, False), 64, 64, torch.float32)
        pytest.skip(f"this CPU does not run {request.param} (checked that asking for it raises)")
    monkeypatch.setenv("DELTAKERN_CPU_ISA", request.param)
    return request.param


@pytest.fixture
def threads(monkeypatch):
    """Restores torch's thread count after a test that changes it; every call, however small, uses
    all of torch's threads (no grain), so the 2-thread runs really split the work."""
    monkeypatch.setattr(_cpu_ext, "GRAIN", 1)
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def _random_nf4(n, blocksize, nested, seed=0):
    """Random NF4 state (packed, absmax, nested_absmax, nested_code, offset, code) with scales over a
    wide range (fp16 subnormals at the low end, fp16 overflow at the high end)."""
    g = torch.Generator().manual_seed(seed)
    nblocks = -(-n // blocksize)
    packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, generator=g)
    if nested:
        absmax = torch.randint(0, 256, (nblocks,), dtype=torch.uint8, generator=g)
        nested_absmax = torch.rand(-(-nblocks // 256), generator=g) * 0.5 + 0.01
        nested_code = torch.sort(torch.rand(256, generator=g) * 2 - 1).values
        offset = 0.0371 + float(torch.rand(1, generator=g))
        return packed, absmax, nested_absmax, nested_code, offset, CODE
    absmax = torch.exp(torch.rand(nblocks, generator=g) * 40 - 26)
    return packed, absmax, None, None, None, CODE


def _ref(state, n, blocksize, dtype):
    packed, absmax, nabs, ncode, offset, code = state
    return dequantize_nf4_ref(packed, absmax, n, blocksize, dtype, code, nabs, ncode, offset or 0.0)


# ---------------------------------------------------------------- build


def test_build_from_scratch(built_so):
    mod = _load_so(built_so)
    assert mod.supports("scalar") and mod.best_isa() in ISAS


def test_failed_compile_leaves_a_pure_python_install(tmp_path):
    """A compiler that fails: setup.py prints one notice, succeeds, and installs no _cpu module."""
    fake = tmp_path / "badcxx"
    fake.write_text("#!/bin/sh\necho 'fatal error: no compiler here' >&2\nexit 1\n")
    fake.chmod(0o755)
    proc = _build(tmp_path / "out", {"CXX": str(fake)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr.count("deltakern._cpu was not built") == 1, proc.stderr
    assert not list((tmp_path / "out").rglob("_cpu.*"))


def test_build_can_be_skipped(tmp_path):
    proc = _build(tmp_path / "out", {"DELTAKERN_BUILD_CPU": "0"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DELTAKERN_BUILD_CPU=0" in proc.stderr
    assert not list((tmp_path / "out").rglob("_cpu.*"))


# ---------------------------------------------------------------- the module absent


def test_missing_extension_is_reported_when_used(monkeypatch):
    from deltakern.backends import registry

    monkeypatch.setattr(_cpu_ext._native, "_module", _native.UNSET)
    monkeypatch.setitem(sys.modules, "deltakern._cpu", None)  # import now raises ImportError
    monkeypatch.delattr(deltakern, "_cpu", raising=False)
    monkeypatch.delenv("DELTAKERN_BACKEND", raising=False)
    assert _cpu_ext.available() is False
    assert "ImportError" in _cpu_ext.load_error() or "ModuleNotFoundError" in _cpu_ext.load_error()
    msg = r"without its native CPU extension deltakern._cpu.*C\+\+ compiler.*DELTAKERN_BACKEND=torch"
    state = _random_nf4(100, 64, False)
    with pytest.raises(RuntimeError, match=msg):
        _cpu_ext.dequantize_nf4(*state, 100, 64, torch.float32)
    packed, absmax = quantize_nf4_ref(torch.randn(4, 64), 64)
    with pytest.raises(RuntimeError, match=msg):
        _cpu_ext.nf4_matmul(torch.randn(1, 64), packed, absmax, CODE, 4, 64, 64)
    with pytest.raises(RuntimeError, match=msg):
        _cpu_ext.nf4_matmul_dx(torch.randn(1, 4), packed, absmax, CODE, 4, 64, 64)
    # dequantize falls back to the reference; the layer ops keep their BLAS compositions (cpu_blas)
    assert registry.resolve("nf4_dequantize", "cpu") == "torch"
    assert registry.resolve("linear_fwd", "cpu") == "cpu"  # the BLAS compositions need no extension
    out = torch.ops.deltakern.nf4_dequantize(*state[:2], None, None, 0.0, CODE, 100, 64, torch.float32)
    assert torch.equal(out, _ref(state, 100, 64, torch.float32))
    # the rank-r products fall back to their BLAS references, and a LoRA layer trains as before
    assert {registry.resolve(op, "cpu") for op in ("lowrank_xat", "lowrank_gtx", "lowrank_gb")} == {"torch"}
    x = torch.randn(300, 64, requires_grad=True)
    A, B = torch.randn(8, 64, requires_grad=True), torch.randn(32, 8, requires_grad=True)
    W = torch.randn(32, 64)
    deltakern.lora_linear(x, W, None, A, B, 0.5).sum().backward()
    torch.testing.assert_close(A.grad, 0.5 * (torch.ones(300, 32) @ B.detach()).t() @ x.detach())
    # naming the backend explicitly raises its own error
    monkeypatch.setenv("DELTAKERN_BACKEND", "cpu")
    with pytest.raises(RuntimeError, match=msg):
        torch.ops.deltakern.nf4_dequantize(*state[:2], None, None, 0.0, CODE, 100, 64, torch.float32)


def test_import_loads_nothing():
    script = "import sys, deltakern, deltakern._cpu_ext; assert 'deltakern._cpu' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- dequantize


@pytest.mark.parametrize("nested", [False, True], ids=["fp32absmax", "nested"])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_dequantize_bit_exact(isa, blocksize, nested, threads):
    for seed, n in enumerate((1, 2, 63, blocksize, 3 * blocksize + 1, 5 * blocksize + 34, 4 * blocksize - 1)):
        state = _random_nf4(n, blocksize, nested, seed=seed)
        for dtype in OUT_DTYPES:
            ref = _ref(state, n, blocksize, dtype)
            for t in (1, 2):
                torch.set_num_threads(t)
                out = _cpu_ext.dequantize_nf4(*state, n, blocksize, dtype)
                assert out.shape == (n,) and out.dtype == dtype
                assert torch.equal(_bits(out), _bits(ref)), (isa, n, dtype, t)


@pytest.mark.parametrize("blocksize", [64, 256])
def test_dequantize_matches_bitsandbytes(ext, blocksize):
    F = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(96, 200)
    for dtype in OUT_DTYPES:
        packed, state = F.quantize_4bit(w.to(dtype), blocksize=blocksize, compress_statistics=True, quant_type="nf4")
        ours = _cpu_ext.dequantize_nf4(packed, state.absmax, state.state2.absmax, state.state2.code, state.offset,
                                       state.code, w.numel(), blocksize, dtype)
        assert torch.equal(_bits(ours), _bits(F.dequantize_4bit(packed, state).reshape(-1))), dtype


def test_dequantize_16bit_rounding_edges(isa):
    """code values that hit fp16 overflow (65520 rounds to inf, 65519 does not), ties, fp16 subnormals
    and their ties, bf16 ties, signed zeros, infinities, NaN: the kernel's casts equal torch's."""
    specials = torch.tensor([65504.0, 65519.0, 65520.0, 70000.0, 2.0**-24, 2.0**-25, 3 * 2.0**-26, 2.0**-14,
                             2.0**-14 - 2.0**-25, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 0.0, -0.0,
                             float("inf"), 1e-30])
    g = torch.Generator().manual_seed(3)
    sets = [specials, -specials]
    for _ in range(200):  # random bit patterns over the whole finite fp32 range
        sets.append(torch.randint(-(2**31), 2**31 - 1, (16,), dtype=torch.int32, generator=g).view(torch.float32))
    n, bs = 64, 32
    packed = torch.tensor([(2 * i) << 4 | (2 * i + 1) for i in range(8)] * 4, dtype=torch.uint8)
    absmax = torch.ones(2)
    sets.append(torch.tensor([float("nan"), -float("nan")] + [1.0] * 14))
    for code in sets:
        code = code.contiguous()
        for dtype in (torch.float16, torch.bfloat16):
            ref = dequantize_nf4_ref(packed, absmax, n, bs, dtype, code)
            out = _cpu_ext.dequantize_nf4(packed, absmax, None, None, 0.0, code, n, bs, dtype)
            nan = ref.isnan()
            assert torch.equal(out.isnan(), nan), (code, dtype)  # NaN stays NaN (payload bits may differ)
            assert torch.equal(_bits(out)[~nan], _bits(ref)[~nan]), (code, dtype)


def test_dequantize_out_streaming_and_misaligned(isa, monkeypatch):
    n, bs = 6 * 4096 + 100, 64
    state = _random_nf4(n, bs, True, seed=5)
    for dtype in OUT_DTYPES:
        ref = _ref(state, n, bs, dtype)
        monkeypatch.setattr(_cpu_ext, "STREAM_BYTES", 0)  # non-temporal stores for every aligned output
        buf = torch.full((n + 17,), 7.0, dtype=dtype)
        for off in (0, 1):  # 64-byte aligned (streaming) and misaligned (ordinary stores)
            out = buf[off:off + n]
            got = _cpu_ext.dequantize_nf4(*state, n, bs, dtype, out=out)
            assert got.data_ptr() == out.data_ptr()
            assert torch.equal(_bits(out), _bits(ref)), (dtype, off)
        assert buf[n + 1:].eq(7).all()  # nothing written past the output
        # misaligned inputs (element-aligned views one element into their storage)
        packed, absmax, nabs, ncode, offset, code = state
        moved = [torch.cat([t.new_zeros(1), t])[1:] if isinstance(t, torch.Tensor) else t for t in state]
        assert moved[1].data_ptr() % 64 != 0
        assert torch.equal(_bits(_cpu_ext.dequantize_nf4(*moved, n, bs, dtype)), _bits(ref))


def test_dequantize_round_to(isa):
    n, bs = 1000, 64
    state = _random_nf4(n, bs, False, seed=9)
    for dt in (torch.bfloat16, torch.float16):
        out = _cpu_ext.dequantize_nf4(*state, n, bs, torch.float32, round_to=dt)
        assert out.dtype == torch.float32 and torch.equal(out, _ref(state, n, bs, dt).float())
    with pytest.raises(ValueError, match="round_to"):
        _cpu_ext.dequantize_nf4(*state, n, bs, torch.bfloat16, round_to=torch.float16)


def test_dequantize_bad_inputs(ext):
    n, bs = 300, 64
    packed, absmax, _, _, _, code = _random_nf4(n, bs, False)
    pk8, am8, nabs, ncode, off, _ = _random_nf4(n, bs, True)
    ok = lambda **kw: dict(dict(packed=packed, absmax=absmax, nested_absmax=None, nested_code=None, offset=0.0,  # noqa: E731
                                code=code, n=n, blocksize=bs, out_dtype=torch.float32), **kw)
    cases = [
        (ok(absmax=absmax.half()), TypeError, "absmax must be torch.float32"),
        (ok(code=code[:15]), ValueError, "code has 15 elements"),
        (ok(packed=packed[:-1]), ValueError, "packed has"),
        (ok(packed=torch.zeros(2 * packed.numel(), dtype=torch.uint8)[::2]), ValueError, "contiguous"),
        (ok(absmax=absmax.to("meta")), ValueError, "on meta"),
        (ok(blocksize=48), ValueError, "power of two"),
        (ok(blocksize=16), ValueError, "power of two"),
        (ok(blocksize=8192), ValueError, "power of two"),
        (ok(n=-1), ValueError, "n must be"),
        (ok(out_dtype=torch.float64), TypeError, "out_dtype"),
        (ok(absmax=am8, nested_absmax=nabs, nested_code=None, offset=off), ValueError, "together"),
        (ok(absmax=absmax, nested_absmax=nabs, nested_code=ncode, offset=off), TypeError, "absmax must be torch.uint8"),
        (ok(packed=[1, 2]), TypeError, "packed must be a torch.Tensor"),
    ]
    for kw, exc, msg in cases:
        sentinel = torch.full((kw["n"] if kw["n"] > 0 else 1,), 3.0)
        with pytest.raises(exc, match=msg):
            _cpu_ext.dequantize_nf4(**kw, out=sentinel if kw["out_dtype"] == torch.float32 and kw["n"] == n else None)
        assert sentinel.eq(3.0).all()  # nothing half-written
    with pytest.raises(ValueError, match="out has"):
        _cpu_ext.dequantize_nf4(**ok(), out=torch.empty(n - 1))
    with pytest.raises(TypeError, match="out must be torch.bfloat16"):
        _cpu_ext.dequantize_nf4(**ok(out_dtype=torch.bfloat16), out=torch.empty(n))
    with pytest.raises(ValueError, match="unknown ISA"):
        os.environ["DELTAKERN_CPU_ISA"] = "sse9"
        try:
            _cpu_ext.dequantize_nf4(**ok())
        finally:
            del os.environ["DELTAKERN_CPU_ISA"]
    assert _cpu_ext.dequantize_nf4(**ok(n=0, packed=packed[:0], absmax=absmax[:0])).shape == (0,)


# ---------------------------------------------------------------- small-M matmuls


def _weight(N, K, bs, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * torch.exp(torch.randn(N, 1, generator=g))
    packed, absmax = quantize_nf4_ref(w, bs)
    return packed, absmax


def _decoded(packed, absmax, N, K, bs, dtype):
    """W as the kernels use it: fp32(code * absmax) rounded to the input dtype, in float64."""
    return dequantize_nf4_ref(packed, absmax, N * K, bs, dtype, CODE).view(N, K).double()


MATMUL_SHAPES = [(7, 64, 64), (33, 96, 32), (300, 256, 128), (5, 4096, 4096), (260, 128, 64)]  # (N, K, bs)


@pytest.mark.parametrize("M", [1, 2, 3, 8, 9, 16])
def test_matmul_within_fp32_rounding(isa, M, threads):
    for i, (N, K, bs) in enumerate(MATMUL_SHAPES):
        packed, absmax = _weight(N, K, bs, seed=i)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            g = torch.Generator().manual_seed(100 * M + i)
            x = torch.randn(M, K, generator=g).to(dtype)
            bias = torch.randn(N, generator=g)
            w = _decoded(packed, absmax, N, K, bs, dtype)
            exact = x.double() @ w.t() + bias.double()
            bound = K * EPS32 * (x.double().abs() @ w.abs().t() + bias.double().abs()) + 1e-30
            outs = []
            for t in (1, 2):
                torch.set_num_threads(t)
                y = _cpu_ext.nf4_matmul(x, packed, absmax, CODE, N, K, bs, bias, out_dtype=torch.float32)
                assert y.shape == (M, N) and y.dtype == torch.float32
                assert ((y.double() - exact).abs() <= bound).all(), (isa, M, N, K, dtype, t)
                outs.append(y)
            assert torch.equal(outs[0], outs[1])  # one owner per output: independent of the thread count
            y = _cpu_ext.nf4_matmul(x, packed, absmax, CODE, N, K, bs, bias)
            assert y.dtype == dtype and torch.equal(y, outs[0].to(dtype))  # one rounding


@pytest.mark.parametrize("M", [1, 2, 4, 9, 16])
def test_matmul_dx_within_fp32_rounding(isa, M, threads):
    for i, (N, K, bs) in enumerate(MATMUL_SHAPES):
        packed, absmax = _weight(N, K, bs, seed=i)
        for dtype in (torch.float32, torch.bfloat16):
            g = torch.Generator().manual_seed(200 * M + i)
            dy = torch.randn(M, N, generator=g).to(dtype)
            w = _decoded(packed, absmax, N, K, bs, dtype)
            exact = dy.double() @ w
            bound = N * EPS32 * (dy.double().abs() @ w.abs()) + 1e-30
            outs = []
            for t in (1, 2):
                torch.set_num_threads(t)
                dx = _cpu_ext.nf4_matmul_dx(dy, packed, absmax, CODE, N, K, bs, out_dtype=torch.float32)
                assert dx.shape == (M, K)
                assert ((dx.double() - exact).abs() <= bound).all(), (isa, M, N, K, dtype, t)
                outs.append(dx)
            assert torch.equal(outs[0], outs[1])


def test_matmul_strided_inputs(ext):
    N, K, bs = 40, 128, 64
    packed, absmax = _weight(N, K, bs, seed=1)
    x = torch.randn(K, 3).t()  # non-contiguous x: handled (copied)
    assert not x.is_contiguous()
    y = _cpu_ext.nf4_matmul(x, packed, absmax, CODE, N, K, bs)
    assert torch.equal(y, _cpu_ext.nf4_matmul(x.contiguous(), packed, absmax, CODE, N, K, bs))
    am = torch.cat([absmax.new_zeros(1), absmax])[1:]  # misaligned (element-aligned) scales
    assert torch.equal(y, _cpu_ext.nf4_matmul(x.contiguous(), packed, am, CODE, N, K, bs))
    strided = torch.stack([packed, packed], 1)[:, 0]  # non-contiguous packed: a clear error
    with pytest.raises(ValueError, match="packed must be contiguous"):
        _cpu_ext.nf4_matmul(x, strided, absmax, CODE, N, K, bs)


def test_matmul_bad_inputs(ext):
    N, K, bs = 8, 128, 64
    packed, absmax = _weight(N, K, bs, seed=2)
    x = torch.randn(2, K)
    cases = [
        (dict(x=torch.randn(17, K)), ValueError, "1..16"),
        (dict(x=torch.randn(0, K)), ValueError, "1..16"),
        (dict(x=torch.randn(2, K + 1)), ValueError, r"x must be \[M, 128\]"),
        (dict(x=x.double()), TypeError, "x must be float32"),
        (dict(x=x.to("meta")), ValueError, "on meta"),
        (dict(absmax=absmax[:-1]), ValueError, "absmax has"),
        (dict(absmax=absmax.half()), TypeError, "absmax must be torch.float32"),
        (dict(blocksize=100), ValueError, "power of two"),
        (dict(bias=torch.randn(N + 1)), ValueError, "bias must be"),
    ]
    for kw, exc, msg in cases:
        args = dict(dict(x=x, packed=packed, absmax=absmax, code=CODE, N=N, K=K, blocksize=bs, bias=None), **kw)
        with pytest.raises(exc, match=msg):
            _cpu_ext.nf4_matmul(**args)
    p2, a2 = _weight(5, 96, 64, seed=3)  # K % blocksize != 0: blocks cross rows
    with pytest.raises(ValueError, match="K % blocksize == 0"):
        _cpu_ext.nf4_matmul(torch.randn(1, 96), p2, a2, CODE, 5, 96, 64)
    with pytest.raises(ValueError, match="K % blocksize == 0"):
        _cpu_ext.nf4_matmul_dx(torch.randn(1, 5), p2, a2, CODE, 5, 96, 64)
    with pytest.raises(ValueError, match=r"dy must be \[M, 8\]"):
        _cpu_ext.nf4_matmul_dx(torch.randn(2, 9), packed, absmax, CODE, N, K, bs)


def test_thread_count_follows_torch_and_work(ext, monkeypatch, threads):
    torch.set_num_threads(2)
    monkeypatch.setattr(_cpu_ext, "GRAIN", 1000)
    assert _cpu_ext._threads(999) == 1 and _cpu_ext._threads(1500) == 1 and _cpu_ext._threads(10**9) == 2
    torch.set_num_threads(1)
    assert _cpu_ext._threads(10**9) == 1


def test_dense_weight_workspace(ext):
    for N, K, bs in [(13, 96, 64), (40, 256, 32), (7, 100, 128)]:  # blocks crossing rows, partial last block
        packed, absmax = _weight(N, K, bs, seed=N)
        for rt in (None, torch.bfloat16, torch.float16):
            w = _cpu_ext.dense_weight_fp32(packed, absmax, CODE, N, K, bs, round_to=rt)
            ref = dequantize_nf4_ref(packed, absmax, N * K, bs, rt or torch.float32, CODE).float().view(N, K)
            assert w.shape == (N, K) and torch.equal(w, ref)
    big = _cpu_ext.dense_weight_fp32(*_weight(40, 256, 32, seed=0), CODE, 40, 256, 32).data_ptr()
    assert _cpu_ext.dense_weight_fp32(*_weight(13, 96, 64, seed=1), CODE, 13, 96, 64).data_ptr() == big  # reused
    _cpu_ext.release_workspace()


# ---------------------------------------------------------------- the cpu backend behind torch.ops.deltakern


@pytest.mark.parametrize("M", [1, 5, 16, 33])
@pytest.mark.parametrize("NKbs", [(24, 128, 64), (9, 96, 64)], ids=["aligned", "blocks-cross-rows"])
def test_backend_ops_match_references(ext, monkeypatch, M, NKbs):
    from deltakern.backends import registry

    N, K, bs = NKbs
    monkeypatch.delenv("DELTAKERN_BACKEND", raising=False)
    for op in ("nf4_dequantize", "linear_fwd", "linear_bwd", "lora_fwd_nf4", "lora_dx_nf4"):
        assert registry.resolve(op, "cpu") == "cpu"
    packed, absmax = _weight(N, K, bs, seed=M)
    r, s = 4, 0.7
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(M)
        x, dy = torch.randn(M, K, generator=g).to(dtype), torch.randn(M, N, generator=g).to(dtype)
        bias, B, A = torch.randn(N, generator=g).to(dtype), torch.randn(N, r, generator=g), torch.randn(r, K, generator=g)
        xa, dyb = (x.float() @ A.t()).to(dtype), (dy.float() @ B).to(dtype)
        mask = torch.rand(M, K, generator=g) > 0.3
        ops = torch.ops.deltakern
        calls = {
            "linear_fwd": lambda: ops.linear_fwd(x, packed, absmax, CODE, N, K, bs, bias),
            "linear_bwd": lambda: ops.linear_bwd(dy, packed, absmax, CODE, N, K, bs, 1),
            "lora_fwd_nf4": lambda: ops.lora_fwd_nf4(x, packed, absmax, CODE, N, K, bs, bias, xa, B.to(dtype), s),
            "lora_dx_nf4": lambda: ops.lora_dx_nf4(dy, packed, absmax, CODE, N, K, bs, dyb, A.to(dtype), s, mask, 1.25),
        }
        for name, call in calls.items():
            ours = call()
            monkeypatch.setenv("DELTAKERN_BACKEND", "torch")
            ref = call()
            monkeypatch.delenv("DELTAKERN_BACKEND")
            ours, ref = (ours, ref) if isinstance(ours, tuple) else ((ours,), (ref,))
            for o, e in zip(ours, ref):
                assert o.dtype == e.dtype and o.shape == e.shape
                # same maths, different fp32 summation order; then one rounding to dtype
                tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
                torch.testing.assert_close(o, e, **tol, msg=f"{name} {dtype}")
    state = _random_nf4(N * K, bs, True)
    out = torch.ops.deltakern.nf4_dequantize(*state[:4], state[4], CODE, N * K, bs, torch.bfloat16)
    assert torch.equal(_bits(out), _bits(_ref(state, N * K, bs, torch.bfloat16)))


def test_backend_float64_and_dense_use_references(ext):
    N, K, bs = 8, 64, 64
    packed, absmax = _weight(N, K, bs, seed=4)
    x = torch.randn(3, K, dtype=torch.float64)
    w = dequantize_nf4_ref(packed, absmax, N * K, bs, torch.float64, CODE).view(N, K)
    torch.testing.assert_close(torch.ops.deltakern.linear_fwd(x, packed, absmax, CODE, N, K, bs, None), x @ w.t())
    wd = torch.randn(N, K)
    xf = torch.randn(3, K)
    torch.testing.assert_close(torch.ops.deltakern.linear_fwd(xf, wd, None, None, N, K, bs, None), xf @ wd.t())
