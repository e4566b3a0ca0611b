"""Triton NF4 kernels and their pure-torch references vs bitsandbytes (CPU wheel as the oracle).

Without CUDA the kernels run in the Triton interpreter on tiny shapes; with CUDA the same tests
run the compiled kernels, and the `gpu` tests add bf16 bit-exactness and large shapes.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import nf4_cuda_oracle as cuda  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from deltakern._codes import dynamic_map  # noqa: E402
from deltakern.triton_kernels import nf4  # noqa: E402

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

DEV = "cuda" if torch.cuda.is_available() else "cpu"
COMPILED = DEV == "cuda"  # else: interpreter, whose fp32 -> bf16 cast truncates
CODE = torch.tensor(nf4.NF4_CODE, dtype=torch.float32)

DEQUANT_CASES = [  # (shape, blocksize): odd sizes, partial last blocks, blocks crossing rows
    ((5, 123), 64), ((7, 33), 32), ((1, 1), 64), ((3, 4097), 4096), ((6, 48), 32),
    ((6, 48), 64), ((16, 64), 256), ((33, 500), 32),  # 516 blocks: 3 nested groups
]
QUANT_CASES = [((5, 123), 64), ((7, 33), 32), ((1, 1), 64), ((3, 4097), 4096), ((6, 48), 32),
               ((4, 256), 128), ((2, 1000), 512), ((3, 700), 2048)]


def bits(t):
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * (0.1 + 4 * torch.rand(1, generator=g))).to(dtype)


@torch._dynamo.config.patch(disable=True)  # bnb wraps its dequant in torch.compile: run it eagerly
def bnb_quant(w, blocksize, nested=False, quant_storage=torch.uint8):
    return F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=nested,
                           quant_storage=quant_storage)


@torch._dynamo.config.patch(disable=True)
def bnb_dequant(packed, state, out_dtype):
    state.dtype = out_dtype
    return F.dequantize_4bit(packed, state).reshape(-1)


def nf4_args(state, device="cpu"):
    """(absmax, code, nested kwargs) of a bnb QuantState, on `device`."""
    kw = {}
    if state.nested:
        kw = dict(nested_absmax=state.state2.absmax.to(device), nested_code=state.state2.code.to(device),
                  offset=float(state.offset))
    return state.absmax.to(device), state.code.to(device), kw


def assert_bf16_close(k, r):
    """Interpreter lane: bf16 outputs within one ulp of the exact ones (same sign)."""
    d = (bits(k).int() - bits(r).int()).abs()
    assert int(d.max()) <= 1, int(d.max())


def check_dequant(w, blocksize, nested, out_dtype, quant_storage=torch.uint8):
    packed, state = bnb_quant(w, blocksize, nested, quant_storage)
    expect = bnb_dequant(packed, state, out_dtype)
    n = w.numel()
    absmax, code, kw = nf4_args(state)
    ref = nf4.dequantize_nf4_ref(packed, absmax, n, blocksize, out_dtype, code, **kw)
    assert ref.shape == (n,) and torch.equal(bits(ref), bits(expect))
    absmax, code, kw = nf4_args(state, DEV)
    got = nf4.dequantize_nf4(packed.to(DEV), absmax, n, blocksize, out_dtype, code, **kw).cpu()
    assert got.shape == (n,) and got.dtype == out_dtype
    if out_dtype == torch.bfloat16 and not COMPILED:
        assert_bf16_close(got, expect)
    else:
        assert torch.equal(bits(got), bits(expect))


def check_quant(w, blocksize):
    """The reference equals the CUDA emulation (correctly rounded reciprocal) bit for bit; the kernel
    equals the reference in the interpreter (same reciprocal) and bitsandbytes' CUDA kernel on the GPU
    (both use rcp.approx.ftz). The fp32 absmax holds no reciprocal: equal everywhere."""
    ref_p, ref_a = nf4.quantize_nf4_ref(w, blocksize)
    want_p, want_a = cuda.quantize_4bit(w.float().reshape(-1).numpy(), blocksize)
    assert torch.equal(ref_p, torch.from_numpy(want_p)) and torch.equal(bits(ref_a), bits(torch.from_numpy(want_a)))
    got_p, got_a = nf4.quantize_nf4(w.to(DEV), blocksize)
    assert got_p.shape == ref_p.shape and torch.equal(bits(got_a.cpu()), bits(ref_a))
    if COMPILED:
        packed, _ = bnb_quant(w.to(DEV), blocksize)
        assert torch.equal(got_p, packed.reshape(-1))
    else:
        assert torch.equal(got_p, ref_p)
    return got_p.cpu(), got_a.cpu()


def check_quant_nested(x):
    """The same for the 8-bit step of double quantization (bitsandbytes' quantize_blockwise, 256)."""
    ref_q, ref_a = nf4.quantize_nested_ref(x)
    want_q, want_a = cuda.quantize_8bit(x.numpy(), dynamic_map().numpy())
    assert torch.equal(ref_q, torch.from_numpy(want_q)) and torch.equal(bits(ref_a), bits(torch.from_numpy(want_a)))
    got_q, got_a = nf4.quantize_nested(x.to(DEV))
    assert torch.equal(bits(got_a.cpu()), bits(ref_a))
    if COMPILED:
        q, state = F.quantize_blockwise(x.to(DEV), code=dynamic_map().to(DEV), blocksize=256)
        assert torch.equal(got_q, q) and torch.equal(got_a, state.absmax)
    else:
        assert torch.equal(got_q.cpu(), ref_q)


# ----------------------------------------------------------------------------- dequantize


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("nested", [0, 1])
@pytest.mark.parametrize("shape,blocksize", DEQUANT_CASES)
def test_dequantize_matches_bnb(shape, blocksize, nested, out_dtype):
    check_dequant(weight(shape, torch.bfloat16, seed=blocksize), blocksize, nested, out_dtype)


@pytest.mark.parametrize("storage", [torch.float16, torch.float32], ids=str)
def test_dequantize_other_quant_storage(storage):
    check_dequant(weight((8, 64), torch.float16), 64, 1, torch.float16, quant_storage=storage)


def test_dequantize_nested_offset_is_a_separate_add():
    # scale = fp32(code2[q] * nested_absmax) + offset: check the two roundings directly
    q = torch.arange(256, dtype=torch.uint8)
    code2 = torch.linspace(-1, 1, 256) * 0.7310586
    nabs, offset = torch.tensor([0.0123457]), 0.0370371
    packed = torch.full((256 * 16,), 0xF0, dtype=torch.uint8)  # nibbles 15 (code 1.0) and 0 (-1.0)
    out = nf4.dequantize_nf4(packed.to(DEV), q.to(DEV), 256 * 32, 32, torch.float32, CODE.to(DEV),
                             nested_absmax=nabs.to(DEV), nested_code=code2.to(DEV), offset=offset).cpu()
    scale = (code2 * nabs) + torch.tensor(offset)
    assert torch.equal(out[0::32], scale) and torch.equal(out[1::32], -scale)
    ref = nf4.dequantize_nf4_ref(packed, q, 256 * 32, 32, torch.float32, CODE,
                                 nested_absmax=nabs, nested_code=code2, offset=offset)
    assert torch.equal(ref, out)


def test_dequantize_empty_and_errors():
    empty = torch.empty(0, dtype=torch.uint8, device=DEV)
    assert nf4.dequantize_nf4(empty, empty.float(), 0, 64, torch.float16, CODE.to(DEV)).shape == (0,)
    p = torch.zeros(3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="packed"):
        nf4.dequantize_nf4(p, torch.ones(1), 7, 64, torch.float32, CODE)
    with pytest.raises(ValueError, match="blocksize"):
        nf4.dequantize_nf4(p, torch.ones(1), 6, 48, torch.float32, CODE)
    with pytest.raises(ValueError, match="uint8"):
        nf4.dequantize_nf4(p, torch.ones(1), 6, 64, torch.float32, CODE, torch.ones(1), torch.ones(256))


# ----------------------------------------------------------------------------- quantize


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,blocksize", QUANT_CASES)
def test_quantize_follows_cuda_rule(shape, blocksize, dtype):
    check_quant(weight(shape, dtype, seed=len(shape) + blocksize), blocksize)


@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("tail", [0, 7, 2])
def test_quantize_adversarial_blocks(blocksize, tail):
    """Thresholds and their neighbours, all-zero and subnormal-only blocks (0x00), a huge absmax,
    a partial last block (all zero when tail == 2), odd n."""
    end = torch.zeros(tail) if tail == 2 else torch.linspace(-0.3, 0.9, tail)
    x = torch.cat([cuda.nf4_adversarial(blocksize, seed=tail), end])
    packed, absmax = check_quant(x, blocksize)
    full = x[: x.numel() // blocksize * blocksize].view(-1, blocksize)
    flushed = full.abs().amax(1) < 2.0**-126
    assert int(flushed.sum()) == 2 and (absmax[: full.shape[0]][flushed] == 0).all()
    assert (packed[: full.numel() // 2].view(-1, blocksize // 2)[flushed] == 0).all()
    if tail == 2:
        assert packed[-1] == 0 and absmax[-1] == 0


def test_quantize_nested_kernel():
    g = torch.Generator().manual_seed(5)
    check_quant_nested(cuda.nested_adversarial())
    check_quant_nested(torch.randn(3 * 256 + 17, generator=g) * 0.01 - 0.003)  # partial last group
    check_quant_nested(torch.zeros(5))


def test_quantize_kernel_errors():
    with pytest.raises(ValueError, match="blocksize"):
        nf4.quantize_nf4(torch.ones(64, device=DEV), 48)
    with pytest.raises(ValueError, match="float32"):
        nf4.quantize_nested(torch.ones(64, dtype=torch.float16, device=DEV))
    p, a = nf4.quantize_nf4(torch.empty(0, device=DEV), 64)
    assert p.shape == (0,) and a.shape == (0,)


# ----------------------------------------------------------------------------- fuzzing

shapes = st.tuples(st.integers(1, 9), st.integers(1, 300))
blocksizes = st.sampled_from([32, 64, 128, 256, 4096])
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


@settings(max_examples=25, deadline=None)
@given(shape=shapes, blocksize=blocksizes, dtype=dtypes, out_dtype=dtypes, nested=st.booleans(),
       seed=st.integers(0, 2**16))
def test_refs_match_bnb_fuzz(shape, blocksize, dtype, out_dtype, nested, seed):
    w = weight(shape, dtype, seed)
    packed, state = bnb_quant(w, blocksize, nested)
    ref_p, ref_a = nf4.quantize_nf4_ref(w, blocksize)
    want_p, want_a = cuda.quantize_4bit(w.float().reshape(-1).numpy(), blocksize)
    assert torch.equal(ref_p, torch.from_numpy(want_p)) and torch.equal(ref_a, torch.from_numpy(want_a))
    absmax, code, kw = nf4_args(state)
    ref = nf4.dequantize_nf4_ref(packed, absmax, w.numel(), blocksize, out_dtype, code, **kw)
    assert torch.equal(bits(ref), bits(bnb_dequant(packed, state, out_dtype)))


@settings(max_examples=10, deadline=None)
@given(shape=shapes, blocksize=blocksizes, dtype=dtypes, nested=st.booleans(), seed=st.integers(0, 2**16))
def test_kernels_match_refs_fuzz(shape, blocksize, dtype, nested, seed):
    w = weight(shape, dtype, seed)
    check_quant(w, blocksize)
    check_dequant(w, blocksize, nested, torch.float16 if dtype == torch.bfloat16 else dtype)


# ----------------------------------------------------------------------------- GPU lane


@triton.jit
def _hw_rcp_kernel(a_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    a = tl.load(a_ptr + i, mask=i < n, other=1.0)
    tl.store(out_ptr + i, nf4._rcp(a, 1), mask=i < n)


def hw_recip(a):
    """The GPU's rcp.approx.ftz.f32 of each fp32 value of the NumPy array a (as the oracle's `recip`)."""
    t = torch.from_numpy(a.reshape(-1).copy()).to(DEV)
    out = torch.empty_like(t)
    if t.numel():
        _hw_rcp_kernel[(triton.cdiv(t.numel(), 1024),)](t, out, t.numel(), BLOCK=1024)
    return out.cpu().numpy().reshape(a.shape)


def gpu_inputs(dtype, blocksize):
    w = weight((1024, 4096 + 64), torch.float32, seed=3).reshape(-1)
    w[blocksize: 2 * blocksize] = 0  # an all-zero block
    w[3 * blocksize: 4 * blocksize] = 1e-39  # a subnormal-only block
    adv = cuda.nf4_adversarial(blocksize, seed=1, huge=dtype != torch.float16)
    return torch.cat([w, adv, torch.linspace(-1, 1, 33)]).to(dtype)  # odd n, partial last block


def bnb_cuda_state(w, blocksize, nested):
    packed, state = bnb_quant(w.to(DEV), blocksize, nested)
    out = {"packed": packed.reshape(-1).cpu(), "absmax": state.absmax.cpu()}
    if nested:
        out.update(offset=state.offset.cpu(), nested_absmax=state.state2.absmax.cpu(), code2=state.state2.code.cpu())
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("nested", [0, 1])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_gpu_quantize_equals_bnb_cuda(dtype, blocksize, nested):
    """deltakern.nf4.quantize on CUDA writes bitsandbytes' CUDA bytes: packed codes, absmax (uint8
    when nested), offset, nested absmax and map."""
    from deltakern import nf4 as dk_nf4

    w = gpu_inputs(dtype, blocksize)
    q = dk_nf4.quantize(w.to(DEV), blocksize, double_quant=bool(nested))
    want = bnb_cuda_state(w, blocksize, nested)
    assert torch.equal(q.packed_bytes().cpu(), want["packed"])
    assert torch.equal(bits(q.absmax.cpu()), bits(want["absmax"]))
    if nested:
        assert q.offset == want["offset"].item()
        assert torch.equal(bits(q.nested_absmax.cpu()), bits(want["nested_absmax"]))
        assert torch.equal(q.nested_code.cpu(), want["code2"])


@pytest.mark.gpu
@pytest.mark.parametrize("blocksize", [64, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_emulation_with_hardware_rcp_equals_bnb_cuda(dtype, blocksize):
    """The oracle, fed the GPU's own rcp.approx values, reproduces bitsandbytes' CUDA bytes (nested
    included): the emulation is the CUDA algorithm. With the correctly rounded reciprocal (the CPU
    reference) only codes within an ulp of a decision point may differ, on random weights few."""
    w = gpu_inputs(dtype, blocksize)
    want = bnb_cuda_state(w, blocksize, True)
    # the offset is torch's mean on the device; CPU and CUDA sums may round differently: use CUDA's
    emu = cuda.quantize(w.cpu(), blocksize, True, dynamic_map(), recip=hw_recip, offset=want["offset"])
    for key in ("packed", "absmax", "nested_absmax"):
        assert torch.equal(bits(emu[key]), bits(want[key])), key
    random = weight((1024, 4096), dtype, seed=4)
    want = bnb_cuda_state(random, blocksize, True)
    emu = cuda.quantize(random, blocksize, True, dynamic_map(), offset=want["offset"])
    nib = lambda p: torch.stack([p >> 4, p & 15], 1).reshape(-1)  # noqa: E731
    assert (nib(emu["packed"]) != nib(want["packed"])).float().mean() <= 1e-5
    assert (emu["absmax"] != want["absmax"]).float().mean() <= 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("nested", [0, 1])
@pytest.mark.parametrize("shape,blocksize", [((4096, 4096), 64), ((4097, 123), 32), ((1024, 11008), 4096)])
def test_gpu_large(shape, blocksize, nested):
    w = weight(shape, torch.bfloat16, seed=1)
    w.view(-1)[blocksize: 2 * blocksize] = 0  # one all-zero block
    w.view(-1)[3 * blocksize: 4 * blocksize] = 1e-39  # one subnormal block
    for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
        check_dequant(w, blocksize, nested, out_dtype)
    packed, absmax = nf4.quantize_nf4(w.to(DEV), blocksize)
    want, state = bnb_quant(w.to(DEV), blocksize)
    assert torch.equal(packed, want.reshape(-1)) and torch.equal(bits(absmax), bits(state.absmax))
