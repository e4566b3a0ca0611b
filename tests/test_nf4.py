"""NF4 core on the CPU: deltakern's references vs bitsandbytes (its CPU wheel is the oracle)."""

import json
from fractions import Fraction

import numpy as np
import nf4_cuda_oracle as cuda
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _helpers import bnb_dequantize_4bit
from deltakern import NF4Weight, nf4
from deltakern._codes import dynamic_map, dynamic_midpoints, fp4_code, nf4_code, nf4_thresholds
from deltakern.backends.reference import nf4 as nf4_ref

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = ((5, 123), (7, 33), (1, 1), (3, 4097), (64, 64), (1, 31), (2, 3, 5), (300, 123))


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's raw bits, so equality is bitwise (and NaN-safe)."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def bnb_quantize(w, blocksize, nested, quant_type="nf4", quant_storage=torch.uint8):
    return F.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type,
                           quant_storage=quant_storage)


def bnb_state_dict(packed, state, prefix="weight"):
    sd = {prefix: packed}
    sd.update({f"{prefix}.{k}": v for k, v in state.as_dict(packed=True).items()})
    return sd


def weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * torch.rand(1, generator=g) * 4).to(dtype)


def test_code_books_match_bitsandbytes():
    assert torch.equal(nf4_code(), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(fp4_code(), F.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_map(), F.create_dynamic_map(signed=True))


# ---- the quantization rule: bitsandbytes' CUDA kernel (tests/nf4_cuda_oracle.py emulates it) ----

def assert_matches_cuda_rule(q: NF4Weight, w: torch.Tensor, blocksize: int):
    """Every byte of q equals the CUDA emulation's (correctly rounded reciprocal, as on the CPU)."""
    want = cuda.quantize(w, blocksize, q.nested, dynamic_map())
    assert torch.equal(q.packed_bytes(), want["packed"])
    assert torch.equal(bits(q.absmax), bits(want["absmax"]))
    if q.nested:
        assert q.offset == want["offset"].item()
        assert torch.equal(bits(q.nested_absmax), bits(want["nested_absmax"]))
        assert torch.equal(q.nested_code, dynamic_map())


def test_thresholds_are_the_cuda_tree_literals():
    """The 15 thresholds are the fp32 roundings (once, from the exact decimal) of the literals of
    bitsandbytes' NF4 tree; four of them are 1 ulp off the fp32 midpoints of the levels."""
    literals = sorted(cuda.NF4_TREE_LITERALS.values(), key=Fraction)
    exact = [cuda.f32_literal(t) for t in literals]
    assert torch.equal(nf4_thresholds(), torch.tensor(np.array(exact, dtype=np.float32)))
    for text, t in zip(literals, exact):  # nearest fp32 to the exact decimal
        below, above = np.nextafter(t, np.float32(-2)), np.nextafter(t, np.float32(2))
        err = abs(Fraction(float(t)) - Fraction(text))
        assert err <= abs(Fraction(float(below)) - Fraction(text)) and err <= abs(Fraction(float(above)) - Fraction(text))
    code = nf4_code()
    ulps = nf4_thresholds().view(torch.int32) - ((code[:-1] + code[1:]) / 2).view(torch.int32)
    assert ulps.abs().max() == 1 and torch.nonzero(ulps).reshape(-1).tolist() == [0, 8, 12, 14]


def special_z():
    """fp32 values on and around every NF4 threshold and level, every dynamic-map entry and midpoint,
    +-0, +-1 and beyond, subnormals, NaN, and random values."""
    g = torch.Generator().manual_seed(0)
    code, code2, mids2 = nf4_code(), dynamic_map(), dynamic_midpoints()
    z = torch.cat([cuda._neighbours(t, 3) for t in (nf4_thresholds(), code, (code[:-1] + code[1:]) / 2, code2, mids2)])
    z = torch.cat([z, -z, torch.tensor([0.0, -0.0, 1e-39, -1e-39, 1.0000001, -1.0000001, 1.5, -1.5, float("nan")]),
                   torch.rand(20000, generator=g) * 2.2 - 1.1, torch.randn(20000, generator=g) * 1e-3])
    return z


def test_nf4_codes_equal_the_comparison_tree():
    z = special_z()
    got = nf4_ref.nf4_codes_of(z, nf4_thresholds())
    assert torch.equal(got.long(), torch.from_numpy(cuda.nf4_tree(z.numpy())))
    assert got[torch.isnan(z)].tolist() == [0]  # NaN fails every `>`: code 0
    t = nf4_thresholds()
    assert torch.equal(nf4_ref.nf4_codes_of(t, t).long(), torch.arange(15))  # a tie takes the lower code
    assert nf4_ref.nf4_codes_of(torch.tensor([-0.8480964]), t).item() == 1  # 1 ulp above threshold 0


def test_dynamic_codes_equal_the_binary_search():
    z = special_z()
    got = nf4_ref.dynamic_codes_of(z, dynamic_midpoints())
    assert torch.equal(got.long(), torch.from_numpy(cuda.dynamic_search(z.numpy(), dynamic_map().numpy())))
    assert got[torch.isnan(z)].tolist() == [0]
    m = dynamic_midpoints()
    j = torch.arange(255)
    assert torch.equal(nf4_ref.dynamic_codes_of(m, m).long(), j + j % 2)  # a tie takes the even index
    examples = torch.tensor([0.845312476, -0.986845255])
    assert nf4_ref.dynamic_codes_of(examples, m).tolist() == [244, 0]


def test_reciprocal_is_correctly_rounded_and_flushes():
    """z = ftz(ftz(x) * ftz(1/absmax)) with the IEEE quotient: 1/a in fp64 rounds once more to the
    same fp32 (fp64 carries more than 2*24+2 bits), so this checks the CPU's division."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64 * 500, generator=g) * torch.logspace(-30, 30, 500).repeat_interleave(64)
    z, absmax = nf4_ref.blockwise_scale(x, 64)
    inv = (1 / absmax.double()).float()
    assert torch.equal(z, x.view(-1, 64) * inv[:, None])
    z, absmax = nf4_ref.blockwise_scale(torch.tensor([1e-39, -5e-40, 0.0, 1e-40]), 32)  # subnormals only
    assert absmax.tolist() == [0.0] and torch.isnan(z[0, :4]).all()  # stored 0; 0 * inf = NaN
    z, _ = nf4_ref.blockwise_scale(torch.tensor([2.0**127, 1.0]), 32)  # 1 / 2**127 is subnormal: flushed
    assert z.abs().max() == 0


@pytest.mark.parametrize("blocksize", nf4.BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_matches_cuda_emulation(blocksize, dtype):
    for i, shape in enumerate(SHAPES):
        w = weight(shape, dtype, seed=i)
        for nested in (False, True):
            q = nf4.quantize(w, blocksize, double_quant=nested)
            assert_matches_cuda_rule(q, w, blocksize)
            assert q.shape == w.shape and q.dtype == dtype


@pytest.mark.parametrize("blocksize", nf4.BLOCKSIZES)
@pytest.mark.parametrize("tail", [0, 1, 2, 31])
def test_quantize_adversarial_blocks(blocksize, tail):
    """Thresholds, ties, zero and subnormal blocks, a huge absmax, a partial last block of `tail`
    elements (all zero when tail == 2: code 0 for the pad nibble too), odd n."""
    end = torch.zeros(2) if tail == 2 else torch.linspace(-0.5, 1.0, tail)
    x = torch.cat([cuda.nf4_adversarial(blocksize, seed=tail), end])
    for dtype in DTYPES:  # float16 cannot hold the huge block
        w = (x if dtype != torch.float16 else torch.cat([cuda.nf4_adversarial(blocksize, tail, huge=False), end])).to(dtype)
        for nested in (False, True):
            assert_matches_cuda_rule(nf4.quantize(w, blocksize, double_quant=nested), w, blocksize)
    q = nf4.quantize(x, blocksize, double_quant=False)
    half = blocksize // 2
    full = x[: x.numel() // blocksize * blocksize].view(-1, blocksize)
    blocks = q.packed_bytes()[: full.shape[0] * half].view(-1, half)
    flushed = full.abs().amax(1) < 2.0**-126  # the all-zero and the subnormal-only block
    assert int(flushed.sum()) == 2
    assert (q.absmax[: full.shape[0]][flushed] == 0).all() and (blocks[flushed] == 0).all()  # NaN z: 0x00
    assert (blocks[full.abs().amax(1) == 2.0**127] == 0x77).all()  # inv flushed to 0: z = 0, code 7
    if tail == 2:
        assert q.packed_bytes()[-1] == 0 and q.absmax[-1] == 0


def test_quantize_nested_adversarial():
    x = cuda.nested_adversarial()
    q, absmax, code = nf4.quantize_nested(x)
    want_q, want_absmax = cuda.quantize_8bit(x.numpy(), code.numpy())
    assert torch.equal(q, torch.from_numpy(want_q)) and torch.equal(bits(absmax), bits(torch.from_numpy(want_absmax)))
    groups = x[: x.numel() // 256 * 256].view(-1, 256)
    flushed = groups.abs().amax(1) < 2.0**-126  # the all-zero and the subnormal-only group
    assert int(flushed.sum()) == 2 and (absmax[: groups.shape[0]][flushed] == 0).all()
    assert (q[: groups.numel()].view(-1, 256)[flushed] == 0).all()  # NaN z -> code 0, decodes to 0 * 0
    assert q[x == torch.tensor(-0.0549449474)].tolist() == [0]  # z = -0.986845255 (map[1] only if map[0] were -1)


def nibbles(packed):
    b = packed.reshape(-1).view(torch.uint8)
    return torch.stack([b >> 4, b & 15], 1).reshape(-1)


@pytest.mark.parametrize("blocksize", (32, 64, 128))
def test_agrees_with_bnb_cpu_where_the_rule_does(blocksize):
    """bitsandbytes' CPU backend follows other rules (fp32 midpoints as thresholds, a division in the
    partial last block, 0x77 for a zero block, its own 8-bit search); wherever its code equals the
    CUDA rule's, deltakern's equals it too, and the codes where they part are few (counted)."""
    nib_diff = nib_total = nested_diff = nested_total = 0
    for seed, shape in enumerate(((300, 123), (512, 1000), (77, 333), (1024, 64))):
        for dtype in DTYPES:
            w = weight(shape, dtype, seed)
            q = nf4.quantize(w, blocksize, double_quant=True)
            packed, state = bnb_quantize(w, blocksize, nested=True)
            want = cuda.quantize(w, blocksize, True, dynamic_map())
            ours, theirs, rule = nibbles(q.packed), nibbles(packed), nibbles(want["packed"])
            agree = theirs == rule
            assert torch.equal(ours[agree], theirs[agree])
            nib_diff += int((~agree).sum())
            nib_total += agree.numel()
            assert q.offset == state.offset.item()
            assert torch.equal(q.nested_absmax, state.state2.absmax)
            assert torch.equal(q.nested_code, state.state2.code)
            agree = state.absmax == want["absmax"]
            assert torch.equal(q.absmax[agree], state.absmax[agree])
            nested_diff += int((~agree).sum())
            nested_total += agree.numel()
    assert nib_diff <= 1e-5 * nib_total, f"{nib_diff} of {nib_total} nibbles differ from bitsandbytes' CPU backend"
    assert nested_diff <= 0.01 * nested_total, f"{nested_diff} of {nested_total} nested codes differ"


def test_bnb_cpu_parts_ways_on_zero_blocks_and_midpoint_ties():
    """Where bitsandbytes' CPU backend and the CUDA rule disagree, by construction: an all-zero block
    (0x77 vs 0x00), z on one of the four thresholds that are 1 ulp off the level midpoints."""
    code = nf4_code()
    mids = (code[:-1] + code[1:]) / 2
    row = torch.cat([torch.tensor([1.0]), mids[[0, 8, 12, 14]], torch.zeros(59)])
    w = torch.stack([row, torch.zeros(64)])
    q = nf4.quantize(w, 64, double_quant=False)
    packed, _ = bnb_quantize(w, 64, nested=False)
    theirs, ours = nibbles(packed), nibbles(q.packed)
    assert ours[1:5].tolist() == [1, 8, 13, 15] and theirs[1:5].tolist() == [0, 8, 12, 14]
    assert (ours[64:] == 0).all() and (theirs[64:] == 7).all()


@pytest.mark.parametrize("nested", (False, True))
@pytest.mark.parametrize("blocksize", nf4.BLOCKSIZES)
def test_dequantize_bnb_checkpoint_bit_exact(nested, blocksize):
    for i, shape in enumerate(SHAPES):
        w = weight(shape, torch.float32, seed=10 + i)
        packed, state = bnb_quantize(w, blocksize, nested)
        q = NF4Weight.from_bnb_state_dict(bnb_state_dict(packed, state))
        for dtype in DTYPES:
            state.dtype = dtype
            assert torch.equal(bits(nf4.dequantize(q, dtype)), bits(bnb_dequantize_4bit(packed, state))), (shape, dtype)


@pytest.mark.parametrize("nested", (False, True))
def test_bnb_reads_our_checkpoint_bit_exact(nested):
    for i, shape in enumerate(SHAPES):
        for dtype in DTYPES:
            w = weight(shape, dtype, seed=20 + i)
            q = nf4.quantize(w, 64, double_quant=nested)
            sd = q.to_bnb_state_dict("weight")
            state = F.QuantState.from_dict({k[len("weight."):]: v for k, v in sd.items() if k != "weight"}, device="cpu")
            assert state.shape == w.shape and state.dtype == dtype and state.nested == nested
            assert torch.equal(bits(bnb_dequantize_4bit(sd["weight"], state)), bits(nf4.dequantize(q)))


def test_state_dict_byte_identical_to_bnb():
    w = weight((33, 70), torch.bfloat16, seed=4)
    packed, state = bnb_quantize(w, 128, nested=False)
    ours = nf4.quantize(w, 128, double_quant=False).to_bnb_state_dict("weight")
    theirs = bnb_state_dict(packed, state)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k


def test_nested_quant_state_json_matches_bnb():
    w = weight((100, 64), torch.float16, seed=5)
    packed, state = bnb_quantize(w, 64, nested=True)
    ours = nf4.quantize(w, 64).to_bnb_state_dict("w")
    theirs = bnb_state_dict(packed, state, "w")
    assert ours.keys() == theirs.keys()
    key = "w.quant_state.bitsandbytes__nf4"
    assert bytes(ours[key].tolist()) == bytes(theirs[key].tolist())


@pytest.mark.parametrize("storage", (torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32))
def test_quant_storage(storage):
    w = weight((16, 64), torch.bfloat16, seed=6)
    q = nf4.quantize(w, 64, quant_storage=storage)
    packed, _ = bnb_quantize(w, 64, nested=True, quant_storage=storage)
    assert q.packed.dtype == storage and q.packed.shape == packed.shape
    assert torch.equal(q.packed_bytes(), nf4.quantize(w, 64).packed_bytes())
    assert torch.equal(bits(nf4.dequantize(nf4.quantize(w, 64, quant_storage=torch.uint8))), bits(nf4.dequantize(q)))


def test_fp4_checkpoint_loads_and_dequantizes():
    for nested in (False, True):
        w = weight((40, 77), torch.bfloat16, seed=7)
        packed, state = bnb_quantize(w, 64, nested, quant_type="fp4")
        q = NF4Weight.from_bnb_state_dict(bnb_state_dict(packed, state))
        assert q.quant_type == "fp4"
        assert torch.equal(bits(nf4.dequantize(q)), bits(bnb_dequantize_4bit(packed, state)))
        assert ".quant_state.bitsandbytes__fp4" in next(k for k in q.to_bnb_state_dict() if "quant_state" in k)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), bs=st.sampled_from(nf4.BLOCKSIZES),
       nested=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_fuzz_against_cuda_rule_and_bnb(rows, cols, bs, nested, dtype, seed):
    w = weight((rows, cols), dtype, seed)
    q = nf4.quantize(w, bs, double_quant=nested)
    assert_matches_cuda_rule(q, w, bs)
    packed, state = bnb_quantize(w, bs, nested)
    q_theirs = NF4Weight.from_bnb_state_dict(bnb_state_dict(packed, state))
    assert torch.equal(bits(nf4.dequantize(q_theirs)), bits(bnb_dequantize_4bit(packed, state)))


def test_opcheck_cpu():
    w = weight((9, 70), torch.float32, seed=8)
    torch.library.opcheck(torch.ops.deltakern.nf4_quantize.default, (w.reshape(-1), 64))
    torch.library.opcheck(torch.ops.deltakern.nf4_quantize_nested.default, (w.reshape(-1)[:300] - 0.5,))
    q = nf4.quantize(w, 64)
    args = (q.packed_bytes(), q.absmax, q.nested_absmax, q.nested_code, q.offset, q.code, q.numel, 64, torch.bfloat16)
    torch.library.opcheck(torch.ops.deltakern.nf4_dequantize.default, args)


# ---- bad input --------------------------------------------------------------------------------

def test_quantize_rejects_bad_input():
    w = weight((4, 64), torch.float32)
    with pytest.raises(ValueError, match="blocksize"):
        nf4.quantize(w, 48)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        nf4.quantize(torch.ones(4, 64, dtype=torch.int32))
    with pytest.raises(TypeError, match="torch.Tensor"):
        nf4.quantize([[1.0]])
    bad = w.clone()
    bad[0, :3] = float("nan")
    bad[1, 0] = float("inf")
    with pytest.raises(ValueError, match="4 non-finite"):
        nf4.quantize(bad)
    with pytest.raises(ValueError, match="empty"):
        nf4.quantize(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="whole torch.float32"):
        nf4.quantize(weight((3, 3), torch.float32), 64, quant_storage=torch.float32)
    with pytest.raises(TypeError, match="dtype"):
        nf4.dequantize(nf4.quantize(w), torch.int8)
    with pytest.raises(TypeError, match="fp32"):
        nf4.quantize_nested(w.half())


def test_device_mix_is_rejected():
    q = nf4.quantize(weight((4, 64), torch.float32))
    q.code = q.code.to("meta")
    with pytest.raises(ValueError, match="one device"):
        q.validate()


def _sd(nested=True, shape=(8, 64)):
    packed, state = bnb_quantize(weight(shape, torch.float16, 9), 64, nested)
    return bnb_state_dict(packed, state)


@pytest.mark.parametrize("mutate, message", [
    (lambda sd: sd.pop("weight.absmax"), "missing keys"),
    (lambda sd: sd.pop("weight.nested_quant_map"), "missing keys"),
    (lambda sd: sd.pop("weight.quant_state.bitsandbytes__nf4"), "exactly one"),
    (lambda sd: sd.update(weight=sd["weight"][:-1]), "needs 256"),
    (lambda sd: sd.update({"weight.absmax": sd["weight.absmax"][:-1]}), "blocks"),
    (lambda sd: sd.update({"weight.quant_map": sd["weight.quant_map"][:8]}), "16 values"),
    (lambda sd: sd.update({"weight.quant_state.bitsandbytes__nf4": torch.tensor(list(b"{not json"), dtype=torch.uint8)}), "JSON"),
    (lambda sd: sd.update({"weight.quant_state.bitsandbytes__nf4": torch.tensor(list(b'{"blocksize": 64}'), dtype=torch.uint8)}), "lacks fields"),
    (lambda sd: sd.update({"weight.quant_state.bitsandbytes__nf4": _json(sd, blocksize=48)}), "blocksize"),
    (lambda sd: sd.update({"weight.quant_state.bitsandbytes__nf4": _json(sd, dtype="int8")}), "unsupported dtype"),
    (lambda sd: sd.update({"weight.quant_state.bitsandbytes__nf4": _json(sd, quant_type="fp4")}), "says"),
    (lambda sd: sd.update({"weight.quant_state.bitsandbytes__xx4": sd.pop("weight.quant_state.bitsandbytes__nf4")}), "unknown quant type"),
    (lambda sd: _poison(sd, "weight.nested_absmax"), "nested_absmax has 1 non-finite"),
    (lambda sd: _poison(sd, "weight.quant_map", float("inf")), "code has 1 non-finite"),
    (lambda sd: _poison(sd, "weight.nested_quant_map"), "nested_code has 1 non-finite"),
])
def test_bad_checkpoints_are_rejected(mutate, message):
    sd = _sd()
    mutate(sd)
    with pytest.raises((ValueError, TypeError), match=message):
        NF4Weight.from_bnb_state_dict(sd)


def _poison(sd, key, value=float("nan")):
    t = sd[key].clone()
    t.view(-1)[0] = value
    sd[key] = t


def test_non_finite_absmax_is_rejected():
    sd = _sd(nested=False)
    _poison(sd, "weight.absmax", float("-inf"))
    with pytest.raises(ValueError, match="absmax has 1 non-finite"):
        NF4Weight.from_bnb_state_dict(sd)


def _json(sd, **changes):
    meta = json.loads(bytes(sd["weight.quant_state.bitsandbytes__nf4"].tolist()))
    meta.update(changes)
    return torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
