"""NF4 core on the CPU: deltakern's references vs bitsandbytes (its CPU wheel is the oracle)."""

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deltakern
from _helpers import bnb_dequantize_4bit
from deltakern import NF4Weight, nf4
from deltakern._codes import dynamic_map, fp4_code, nf4_code

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


@pytest.mark.parametrize("blocksize", nf4.BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_matches_bnb_exactly(blocksize, dtype):
    for i, shape in enumerate(SHAPES):
        w = weight(shape, dtype, seed=i)
        q = nf4.quantize(w, blocksize, double_quant=False)
        packed, state = bnb_quantize(w, blocksize, nested=False)
        assert torch.equal(q.packed, packed), shape
        assert torch.equal(bits(q.absmax), bits(state.absmax)), shape
        assert q.shape == w.shape and q.dtype == dtype


@pytest.mark.parametrize("blocksize", (32, 64, 128))
def test_double_quant_matches_bnb(blocksize):
    """Offset and nested scales equal bitsandbytes'; the 8-bit absmax codes equal except where its CPU
    search picks an entry other than the nearest one (documented in deltakern.nf4)."""
    diffs = total = 0
    for seed, shape in enumerate(((300, 123), (512, 1000), (77, 333), (1024, 64))):
        w = weight(shape, torch.float32, seed)
        q = nf4.quantize(w, blocksize, double_quant=True)
        packed, state = bnb_quantize(w, blocksize, nested=True)
        assert torch.equal(q.packed, packed)
        assert q.offset == state.offset.item()
        assert torch.equal(q.nested_absmax, state.state2.absmax)
        assert torch.equal(q.nested_code, state.state2.code)
        differ = q.absmax != state.absmax
        # where the codes differ, ours is the nearer entry
        absmax = nf4.quantize(w, blocksize, double_quant=False).absmax
        groups = torch.arange(absmax.numel()) // 256
        z = (absmax - state.offset) / q.nested_absmax[groups]
        search = q.nested_code.clone()
        search[0] = -1.0
        ours, theirs = (z - search[q.absmax.long()]).abs(), (z - search[state.absmax.long()]).abs()
        assert (ours <= theirs).all()
        diffs += int(differ.sum())
        total += differ.numel()
    assert diffs <= 0.005 * total, f"{diffs} of {total} nested codes differ"


def test_nested_quant_picks_nearest_entry():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5000, generator=g)
    q, absmax, code = nf4.quantize_nested(x)
    search = code.clone()
    search[0] = -1.0
    z = x / absmax.repeat_interleave(256)[: x.numel()]
    dist = (z[:, None] - search[None, :]).abs()
    best = dist.min(dim=1).values
    assert torch.equal(dist[torch.arange(x.numel()), q.long()], best)


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
    assert q.packed.dtype == storage and torch.equal(bits(q.packed), bits(packed))
    assert torch.equal(bits(nf4.dequantize(nf4.quantize(w, 64, quant_storage=torch.uint8))), bits(nf4.dequantize(q)))


def test_fp4_checkpoint_loads_and_dequantizes():
    for nested in (False, True):
        w = weight((40, 77), torch.bfloat16, seed=7)
        packed, state = bnb_quantize(w, 64, nested, quant_type="fp4")
        q = NF4Weight.from_bnb_state_dict(bnb_state_dict(packed, state))
        assert q.quant_type == "fp4"
        assert torch.equal(bits(nf4.dequantize(q)), bits(bnb_dequantize_4bit(packed, state)))
        assert ".quant_state.bitsandbytes__fp4" in next(k for k in q.to_bnb_state_dict() if "quant_state" in k)


def test_ties_and_zero_blocks():
    code = nf4_code()
    mids = ((code[:-1] + code[1:]) / 2).tolist()
    # a block whose absmax is 1 holds every midpoint exactly: ties go to the lower code
    row = torch.tensor([1.0] + mids + [-1.0] * 16 + [0.0] * 32)
    zeros = torch.zeros(64)
    w = torch.stack([row, zeros, row.flip(0)])
    q = nf4.quantize(w, 64, double_quant=False)
    packed, state = bnb_quantize(w, 64, nested=False)
    assert torch.equal(q.packed, packed) and torch.equal(q.absmax, state.absmax)
    assert (q.packed_bytes()[32:64] == 0x77).all()  # the all-zero block
    assert torch.equal(nf4.dequantize(q)[1], zeros)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), bs=st.sampled_from(nf4.BLOCKSIZES),
       nested=st.booleans(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_fuzz_against_bnb(rows, cols, bs, nested, dtype, seed):
    w = weight((rows, cols), dtype, seed)
    q = nf4.quantize(w, bs, double_quant=nested)
    packed, state = bnb_quantize(w, bs, nested)
    assert torch.equal(q.packed, packed)
    q_theirs = NF4Weight.from_bnb_state_dict(bnb_state_dict(packed, state))
    assert torch.equal(bits(nf4.dequantize(q_theirs)), bits(bnb_dequantize_4bit(packed, state)))


def test_opcheck_cpu():
    w = weight((9, 70), torch.float32, seed=8)
    torch.library.opcheck(torch.ops.deltakern.nf4_quantize.default, (w.reshape(-1), 64))
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
