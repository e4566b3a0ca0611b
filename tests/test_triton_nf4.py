"""Triton NF4 kernels and their pure-torch references vs bitsandbytes (CPU wheel as the oracle).

Without CUDA the kernels run in the Triton interpreter on tiny shapes; with CUDA the same tests
run the compiled kernels, and the `gpu` tests add bf16 bit-exactness and large shapes.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from deltakern.triton_kernels import nf4  # noqa: E402

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

DEV = "cuda" if torch.cuda.is_available() else "cpu"
COMPILED = DEV == "cuda"  # else: interpreter, whose fp32 -> bf16 cast truncates
CODE = torch.tensor(nf4.NF4_CODE, dtype=torch.float32)
MIDS = (CODE[:-1] + CODE[1:]) / 2

DEQUANT_CASES = [  # (shape, blocksize): odd sizes, partial last blocks, blocks crossing rows
    ((5, 123), 64), ((7, 33), 32), ((1, 1), 64), ((3, 4097), 4096), ((6, 48), 32),
    ((6, 48), 64), ((16, 64), 256), ((33, 500), 32),  # 516 blocks: 3 nested groups
]
QUANT_CASES = [((5, 123), 64), ((7, 33), 32), ((1, 1), 64), ((3, 4097), 4096), ((6, 48), 32),
               ((4, 256), 128), ((2, 1000), 512)]


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
    packed, state = bnb_quant(w, blocksize)
    packed = packed.reshape(-1)
    ref_p, ref_a = nf4.quantize_nf4_ref(w, blocksize)
    assert torch.equal(ref_p, packed) and torch.equal(bits(ref_a), bits(state.absmax))
    got_p, got_a = nf4.quantize_nf4(w.to(DEV), blocksize)
    assert torch.equal(got_p.cpu(), packed)
    assert torch.equal(bits(got_a.cpu()), bits(state.absmax))
    return packed, state.absmax


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
def test_quantize_matches_bnb(shape, blocksize, dtype):
    check_quant(weight(shape, dtype, seed=len(shape) + blocksize), blocksize)


def rounding_block(am=7.0):
    """A block of 32 with absmax `am` whose values fall in different codes under x * (1 / am)
    (full-block rule) and x / am (partial-block rule): fp32 neighbours of am * m_j."""
    am = torch.tensor(am)
    c = (MIDS * am).unsqueeze(1)
    cand = torch.cat([torch.nextafter(c, c - 1), c, torch.nextafter(c, c + 1)], 1).reshape(-1)
    split = cand[torch.bucketize(cand / am, MIDS) != torch.bucketize(cand * torch.reciprocal(am), MIDS)]
    assert split.numel() >= 4
    return torch.cat([am.view(1), split, torch.zeros(31 - split.numel())])


@pytest.mark.parametrize("tail", ["full", "partial_ties", "partial_zero", "partial_round"])
def test_quantize_special_blocks(tail):
    """Blocks of 32: random | all zero | exact midpoints (ties) | negative max | subnormal |
    division-vs-reciprocal splits | tail."""
    ties = torch.cat([MIDS, -MIDS, torch.tensor([1.0, 0.0])])  # absmax 1 -> scaled == x exactly
    neg = torch.linspace(-3, 2, 32)
    tiny = torch.linspace(-1e-39, 5e-40, 32)  # absmax below the 1e-38 clamp
    rnd = rounding_block()
    last = {"full": ties, "partial_ties": ties[:31], "partial_zero": torch.zeros(5),
            "partial_round": rnd[:21]}[tail]
    x = torch.cat([weight((32,), torch.float32), torch.zeros(32), ties, neg, tiny, rnd, last])
    packed, absmax = check_quant(x, 32)
    nib = torch.stack((packed >> 4, packed & 15), 1).reshape(-1)
    assert torch.all(packed[16:32] == 0x77) and absmax[1] == 0  # all-zero block: code 7, absmax 0
    assert nib[64:79].tolist() == list(range(15))  # x == m_j gives the lower code j
    assert nib[94:96].tolist() == [15, 7]
    assert nib[96] == 0 and absmax[3] == 3
    assert absmax[4] == torch.tensor(1e-39)  # full block: absmax stored unclamped
    am = torch.tensor(7.0)
    assert torch.equal(nib[160:192].long(), torch.bucketize(rnd * torch.reciprocal(am), MIDS))  # x * (1/am)
    if tail == "partial_ties":  # x / absmax path: ties still go low; odd n pads nibble 7
        assert nib[192:207].tolist() == list(range(15)) and nib[222:224].tolist() == [15, 7]
    if tail == "partial_zero":  # partial block: the clamped absmax 1e-38 is stored
        assert absmax[6] == torch.tensor(1e-38) and packed[96:].tolist() == [0x77, 0x77, 0x77]
    if tail == "partial_round":  # partial block: x / am
        assert torch.equal(nib[192:213].long(), torch.bucketize(rnd[:21] / am, MIDS))


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
    assert torch.equal(ref_p, packed.reshape(-1))
    if not nested:
        assert torch.equal(bits(ref_a), bits(state.absmax))
    absmax, code, kw = nf4_args(state)
    ref = nf4.dequantize_nf4_ref(packed, absmax, w.numel(), blocksize, out_dtype, code, **kw)
    assert torch.equal(bits(ref), bits(bnb_dequant(packed, state, out_dtype)))


@settings(max_examples=10, deadline=None)
@given(shape=shapes, blocksize=blocksizes, dtype=dtypes, nested=st.booleans(), seed=st.integers(0, 2**16))
def test_kernels_match_refs_fuzz(shape, blocksize, dtype, nested, seed):
    w = weight(shape, dtype, seed)
    packed, absmax = nf4.quantize_nf4(w.to(DEV), blocksize)
    ref_p, ref_a = nf4.quantize_nf4_ref(w, blocksize)
    assert torch.equal(packed.cpu(), ref_p) and torch.equal(bits(absmax.cpu()), bits(ref_a))
    check_dequant(w, blocksize, nested, torch.float16 if dtype == torch.bfloat16 else dtype)


# ----------------------------------------------------------------------------- GPU lane


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
    ref_p, ref_a = nf4.quantize_nf4_ref(w, blocksize)
    assert torch.equal(packed.cpu(), ref_p) and torch.equal(bits(absmax.cpu()), bits(ref_a))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gpu_quantize_special_blocks(dtype):
    x = torch.cat([weight((32,), torch.float32), torch.zeros(32), MIDS, -MIDS, torch.ones(2),
                   torch.linspace(-1e-39, 5e-40, 32), rounding_block(), rounding_block(3.0)[:21]])
    check_quant(x.to(dtype), 32)
