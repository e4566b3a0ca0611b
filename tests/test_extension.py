"""Extension-build lane: deltakern._C builds with nvcc, imports without a GPU, and reports CUDA errors
as codes that deltakern._ext turns into RuntimeErrors. The `gpu` tests check the NF4 kernel
bit-exactly against a pure-torch reference (which is itself checked against bitsandbytes on the CPU).

Without an installed deltakern._C, the module fixture builds one (DELTAKERN_CUDA_ARCHS=90) into a
temp dir when nvcc is found; without nvcc the build/import tests skip.
"""

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import deltakern
from _helpers import bnb_dequantize_4bit
from deltakern import _ext, _native

ROOT = Path(__file__).resolve().parents[1]
NF4_CODE = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]  # fmt: skip
CUDA_ERROR_INVALID_VALUE = 1


def _setup_module():
    spec = importlib.util.spec_from_file_location("deltakern_setup", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # setup() only runs under __main__
    return mod


def _load_so(path: Path):
    spec = importlib.util.spec_from_file_location("deltakern._C", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def built_so(tmp_path_factory):
    """Path of a freshly built _C (sm_90 only, to stay quick); skips without nvcc."""
    if _setup_module().find_nvcc() is None:
        pytest.skip("nvcc not found: extension build not testable here")
    out = tmp_path_factory.mktemp("ext")
    env = dict(os.environ, DELTAKERN_CUDA_ARCHS="90")
    env.pop("DELTAKERN_BUILD_CUDA", None)
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(out), "--build-temp", str(out / "tmp")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (so,) = (out / "deltakern").glob("_C.*")
    return so


@pytest.fixture(scope="module")
def C(request):
    """The installed deltakern._C, else one built for this test run."""
    mod = _ext.load()
    if mod is not None:
        return mod
    return _load_so(request.getfixturevalue("built_so"))


# ---------------------------------------------------------------- build configuration (no nvcc needed)


def test_parse_archs():
    s = _setup_module()
    assert s.parse_archs(None) == ["80", "86", "89", "90"]
    assert s.parse_archs("9.0") == ["90"]
    assert s.parse_archs("sm_90;8.0") == ["80", "90"]
    assert s.parse_archs("80, 90 90") == ["80", "90"]
    assert s.parse_archs("9.0+PTX;90a") == ["90", "90a"]
    with pytest.raises(ValueError):
        s.parse_archs("hopper")


def test_gencode_flags():
    flags = _setup_module().gencode_flags(["80", "90a"])
    assert flags == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",
        "-gencode=arch=compute_90,code=compute_90",
    ]


# ---------------------------------------------------------------- the built module, without a GPU


def test_build_ext_from_scratch(built_so):
    mod = _load_so(built_so)
    assert "sm_90" in mod.version()


def test_version_and_error_string(C):
    v = C.version()
    assert v.startswith(deltakern.__version__ if hasattr(deltakern, "__version__") else "0.")
    assert "CUDA runtime" in v and "sm_" in v
    assert C.error_string(0) == "no error"
    assert C.error_string(CUDA_ERROR_INVALID_VALUE)


def test_invalid_arguments_return_codes(C):
    args = dict(absmax_is_u8=0, nested_absmax_ptr=0, nested_code_ptr=0, offset=0.0, stream=0)
    # null pointers: rejected before anything touches the driver
    assert C.dequantize_nf4(0, 0, code_ptr=0, out_ptr=0, n=100, blocksize=64, out_dtype=2, **args) == 1
    # bad blocksize / dtype, even with plausible pointers
    for bs, dt in [(48, 2), (16, 2), (8192, 2), (64, 3), (64, -1)]:
        assert C.dequantize_nf4(16, 16, code_ptr=16, out_ptr=16, n=100, blocksize=bs, out_dtype=dt, **args) == 1
    # nested without its tables
    nested = dict(args, absmax_is_u8=1)
    assert C.dequantize_nf4(16, 16, code_ptr=16, out_ptr=16, n=100, blocksize=64, out_dtype=2, **nested) == 1
    # nothing to do
    assert C.dequantize_nf4(0, 0, code_ptr=0, out_ptr=0, n=0, blocksize=64, out_dtype=0, **args) == 0


def test_error_code_becomes_runtime_error(C, monkeypatch):
    monkeypatch.setattr(_ext._native, "_module", C)
    code = C.dequantize_nf4(0, 0, 0, 0, 0, 0.0, 0, 0, 100, 64, 2, 0)
    assert code != 0
    with pytest.raises(RuntimeError, match=r"dequantize_nf4 failed: CUDA error 1: invalid argument"):
        _ext.check(code, "dequantize_nf4")
    _ext.check(0, "dequantize_nf4")  # no error, no raise


@pytest.mark.skipif(torch.cuda.is_available(), reason="fake pointers would fault on a real GPU")
def test_launch_without_device_returns_error(C):
    """Plausible (fake) pointers get past validation; with no GPU the call must return the runtime's
    error code, not crash. Run in a subprocess so a crash shows up as a failure, not a dead session."""
    script = textwrap.dedent(
        f"""
        import importlib.util
        spec = importlib.util.spec_from_file_location("deltakern._C", {str(C.__file__)!r})
        C = importlib.util.module_from_spec(spec); spec.loader.exec_module(C)
        codes = [C.dequantize_nf4(256, 256, 0, 0, 0, 0.0, 256, 256, 1000, 64, dt, 0) for dt in (0, 1, 2)]
        print(codes[0], C.error_string(codes[0]))
        assert len(set(codes)) == 1 and codes[0] != 0
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    code = int(proc.stdout.split()[0])
    with pytest.raises(RuntimeError, match=rf"dequantize_nf4 failed: CUDA error {code}: "):
        _ext.check(code, "dequantize_nf4")


# ---------------------------------------------------------------- the loader


def test_missing_extension_is_reported_when_used(monkeypatch):
    monkeypatch.setattr(_ext._native, "_module", _native.UNSET)
    monkeypatch.setitem(sys.modules, "deltakern._C", None)  # import now raises ImportError
    monkeypatch.delattr(deltakern, "_C", raising=False)
    assert _ext.available() is False
    assert "ImportError" in _ext.load_error() or "ModuleNotFoundError" in _ext.load_error()
    msg = r"installed without its CUDA extension.*nvcc on PATH.*DELTAKERN_BACKEND=triton"
    with pytest.raises(RuntimeError, match=msg):
        _ext.require()
    with pytest.raises(RuntimeError, match=msg):
        _ext.dequantize_nf4_cuda(*_random_nf4(100, 64, nested=False), 100, 64, torch.float32)


def test_cpu_tensors_are_rejected(C, monkeypatch):
    monkeypatch.setattr(_ext._native, "_module", C)
    with pytest.raises(ValueError, match="CUDA tensors"):
        _ext.dequantize_nf4_cuda(*_random_nf4(100, 64, nested=True), 100, 64, torch.bfloat16)


def test_import_touches_no_cuda():
    script = "import torch, deltakern._ext as e; assert not torch.cuda.is_initialized(); print(e.available())"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- reference (CPU) and GPU bit-exactness


def _random_nf4(n, blocksize, nested, seed=0, device="cpu"):
    """Random NF4 state: (packed, absmax, nested_absmax, nested_code, offset, code)."""
    g = torch.Generator().manual_seed(seed)
    nblocks = -(-n // blocksize)
    packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, generator=g)
    code = torch.tensor(NF4_CODE, dtype=torch.float32)
    if nested:
        absmax = torch.randint(0, 256, (nblocks,), dtype=torch.uint8, generator=g)
        nested_absmax = torch.rand(-(-nblocks // 256), generator=g) * 0.5 + 0.01
        nested_code = torch.sort(torch.rand(256, generator=g) * 2 - 1).values
        offset = 0.0371 + float(torch.rand(1, generator=g))
    else:
        # wide range of scales: fp16 subnormals at the low end, fp16/bf16 rounding everywhere
        absmax = torch.exp(torch.rand(nblocks, generator=g) * 24 - 18)
        nested_absmax = nested_code = offset = None
    to = lambda t: t.to(device) if isinstance(t, torch.Tensor) else t  # noqa: E731
    return tuple(to(t) for t in (packed, absmax, nested_absmax, nested_code, offset, code))


def nf4_dequant_ref(packed, absmax, nested_absmax, nested_code, offset, code, n, blocksize, dtype):
    """Pure-torch fp32 reference on the CPU: every product and sum rounded separately, then RNE cast."""
    packed, absmax, code = packed.cpu().reshape(-1).view(torch.uint8), absmax.cpu(), code.cpu()
    p = packed.to(torch.int64)
    nib = torch.stack([p >> 4, p & 15], dim=1).reshape(-1)[:n]
    if nested_absmax is not None:
        blk = torch.arange(absmax.numel())
        scale = nested_code.cpu()[absmax.long()] * nested_absmax.cpu()[blk // 256]
        scale = scale + torch.tensor(float(offset), dtype=torch.float32)
    else:
        scale = absmax
    vals = code[nib] * scale.repeat_interleave(blocksize)[:n]
    return vals.to(dtype)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_matches_bitsandbytes(nested, dtype):
    F = pytest.importorskip("bitsandbytes.functional")
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(5, 123, generator=g) * 0.02).to(dtype)  # K not a multiple of the blocksize
    packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
    want = bnb_dequantize_4bit(packed, qs).reshape(-1)
    state2 = qs.state2 if nested else None
    got = nf4_dequant_ref(
        packed, qs.absmax, state2.absmax if nested else None, state2.code if nested else None,
        qs.offset if nested else None, qs.code, w.numel(), 64, dtype,
    )  # fmt: skip
    assert got.dtype == want.dtype
    assert torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_nf4_cuda_bit_exact(nested, dtype):
    _ext.require()
    cases = [(n, bs) for bs in (32, 64, 128, 256, 512, 1024, 2048, 4096) for n in (1, 31, 33, 3 * bs + 17)]
    cases += [(5 * 123, 64), (1 << 20, 64), ((1 << 20) + 7, 4096), (64 * 256 * 3 + 1, 64)]
    for i, (n, bs) in enumerate(cases):
        state = _random_nf4(n, bs, nested, seed=i, device="cuda")
        got = _ext.dequantize_nf4_cuda(*state, n, bs, dtype)
        assert got.shape == (n,) and got.dtype == dtype and got.device == state[0].device
        want = nf4_dequant_ref(*state, n, bs, dtype)
        assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8)), (n, bs)


@pytest.mark.gpu
def test_dequantize_nf4_cuda_unaligned_and_storage():
    """Shifted packed pointers and a non-uint8 quant_storage give the same bytes."""
    n, bs = 4099, 128
    packed, absmax, na, nc, off, code = _random_nf4(n, bs, nested=True, device="cuda")
    want = nf4_dequant_ref(packed, absmax, na, nc, off, code, n, bs, torch.bfloat16)
    for shift in (1, 4):  # 1: scalar path; 4: word-aligned, still the vector path
        shifted = torch.empty(packed.numel() + shift, dtype=torch.uint8, device="cuda")
        shifted[shift:] = packed
        got = _ext.dequantize_nf4_cuda(shifted[shift:], absmax, na, nc, off, code, n, bs, torch.bfloat16)
        assert torch.equal(got.cpu().view(torch.int16), want.view(torch.int16)), shift
    even = torch.cat([packed, packed.new_zeros(packed.numel() % 2)])  # 2-byte storage needs even length
    got = _ext.dequantize_nf4_cuda(even.view(torch.bfloat16), absmax, na, nc, off, code, 2 * even.numel(), bs,
                                   torch.bfloat16)[:n]  # fmt: skip
    assert torch.equal(got.cpu().view(torch.int16), want.view(torch.int16))


@pytest.mark.gpu
def test_dequantize_nf4_cuda_validates():
    packed, absmax, na, nc, off, code = _random_nf4(100, 64, nested=False, device="cuda")
    with pytest.raises(ValueError, match="packed has"):
        _ext.dequantize_nf4_cuda(packed[:-1], absmax, na, nc, off, code, 100, 64, torch.float16)
    with pytest.raises(TypeError, match="absmax must be torch.float32"):
        _ext.dequantize_nf4_cuda(packed, absmax.half(), na, nc, off, code, 100, 64, torch.float16)
    with pytest.raises(ValueError, match="blocksize"):
        _ext.dequantize_nf4_cuda(packed, absmax, na, nc, off, code, 100, 48, torch.float16)
    with pytest.raises(ValueError, match="expected cuda"):
        _ext.dequantize_nf4_cuda(packed, absmax, na, nc, off, code.cpu(), 100, 64, torch.float16)
