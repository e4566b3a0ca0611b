"""An emulation of bitsandbytes' CUDA blockwise quantizer, the oracle deltakern's quantize is tested
against (NumPy, fp32 throughout; written from the algorithm's description, not from deltakern).

The kernel (kQuantizeBlockwise, built with fast math): per block of `blocksize` elements, the last
one padded with zeros,
    absmax = max |x|                 (fmaxf with subnormal inputs flushed to zero)
    inv    = rcp.approx.ftz(absmax)  (within 1 ulp of 1/absmax; `recip` below, default correctly rounded)
    z      = x * inv                 (FMUL.FTZ: subnormal inputs and result flushed to zero)
then the 4-bit code from the NF4 comparison tree (`nf4_tree`, transcribed node by node with its
decimal literals) or the 8-bit code from the 7-step binary search over the 256-entry map
(`dynamic_search`, transcribed step by step). Both are vectorised with numpy.where, one element per
lane, exactly as the scalar code branches.
"""

from fractions import Fraction

import numpy as np
import torch

f32 = np.float32
FLT_MIN = f32(2.0**-126)


def f32_literal(text: str) -> np.float32:
    """The fp32 value a C compiler gives the literal `<text>f`: the exact decimal rounded once to the
    nearest fp32, ties to even (NumPy's float32(float(text)) rounds twice, via fp64)."""
    exact = Fraction(text)
    near = f32(float(exact))
    cands = [np.nextafter(near, f32(-np.inf)), near, np.nextafter(near, f32(np.inf))]
    return min(cands, key=lambda c: (abs(Fraction(float(c)) - exact), int(np.array(c).view(np.int32)) & 1))


# The tree's literals by node: "" is the root, then "1"/"0" for the > / <= branch taken.
NF4_TREE_LITERALS = {
    "": "0.03979014977812767",
    "1": "0.3893125355243683", "11": "0.6427869200706482", "111": "0.8614784181118011",
    "110": "0.5016634166240692", "10": "0.2035212516784668", "101": "0.2920137718319893",
    "100": "0.1202552504837513",
    "0": "-0.33967943489551544", "01": "-0.13791173323988914", "011": "-0.045525018125772476",
    "010": "-0.23460740596055984", "00": "-0.6106329262256622", "001": "-0.4599952697753906",
    "000": "-0.8480964004993439",
}
_T = {node: f32_literal(text) for node, text in NF4_TREE_LITERALS.items()}


def ftz(a):
    a = np.asarray(a, dtype=f32)
    return np.where(np.abs(a) < FLT_MIN, f32(0), a).astype(f32)


def nf4_tree(z):
    """dQuantizeNF4: the comparison tree, strict `>` at every node (NaN fails them all)."""
    z = np.asarray(z, dtype=f32)
    gt = lambda node: z > _T[node]  # noqa: E731
    w = np.where
    return w(gt(""),
             w(gt("1"),
               w(gt("11"), w(gt("111"), 0b1111, 0b1110), w(gt("110"), 0b1101, 0b1100)),
               w(gt("10"), w(gt("101"), 0b1011, 0b1010), w(gt("100"), 0b1001, 0b1000))),
             w(gt("0"),
               w(gt("01"), w(gt("011"), 0b0111, 0b0110), w(gt("010"), 0b0101, 0b0100)),
               w(gt("00"), w(gt("001"), 0b0011, 0b0010), w(gt("000"), 0b0001, 0b0000)))).astype(np.int64)


def dynamic_search(z, code):
    """dQuantize (not stochastic): binary search from pivot 127 with steps 64..1 (`z > code[pivot]`),
    then one comparison with the fp32 midpoint (a + b) * 0.5 of the bracketing entries."""
    z = np.asarray(z, dtype=f32)
    code = np.asarray(code, dtype=f32)
    pivot = np.full(z.shape, 127)
    upper_pivot, lower_pivot = np.full(z.shape, 255), np.zeros(z.shape, dtype=np.int64)
    upper, lower = np.full(z.shape, f32(1.0)), np.full(z.shape, f32(-1.0))
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        up = z > val
        lower_pivot, lower = np.where(up, pivot, lower_pivot), np.where(up, val, lower)
        upper_pivot, upper = np.where(up, upper_pivot, pivot), np.where(up, upper, val)
        pivot = np.where(up, pivot + step, pivot - step)
        val = code[pivot]
    upper = np.where(upper_pivot == 255, code[255], upper)
    lower = np.where(lower_pivot == 0, code[0], lower)
    above = z > val
    mid_up = ((upper + val) * f32(0.5)).astype(f32)
    mid_lo = ((lower + val) * f32(0.5)).astype(f32)
    return np.where(above, np.where(z > mid_up, upper_pivot, pivot),
                    np.where(z < mid_lo, lower_pivot, pivot)).astype(np.int64)


def recip_correct(a):
    with np.errstate(divide="ignore"):
        return (f32(1) / np.asarray(a, dtype=f32)).astype(f32)


def recip_ulp(direction):
    """A reciprocal 1 ulp above (+1) or below (-1) the correctly rounded one: what rcp.approx may give."""
    towards = f32(np.inf) if direction > 0 else f32(-np.inf)
    return lambda a: np.nextafter(recip_correct(a), towards).astype(f32)


def scale_blocks(x, blocksize, recip=recip_correct):
    """(z [blocks, blocksize], absmax [blocks]) of flat x, the last block padded with zeros."""
    x = np.asarray(x, dtype=f32).reshape(-1)
    blocks = -(-x.size // blocksize)
    v = ftz(np.pad(x, (0, blocks * blocksize - x.size))).reshape(blocks, blocksize)
    absmax = np.abs(v).max(axis=1)
    inv = ftz(recip(absmax))
    with np.errstate(invalid="ignore"):
        z = ftz(v * inv[:, None])
    return z, absmax


def quantize_4bit(x, blocksize, recip=recip_correct):
    """(packed uint8 [(n+1)//2], absmax fp32): high nibble first, an odd n packs the pad's code."""
    x = np.asarray(x, dtype=f32).reshape(-1)
    z, absmax = scale_blocks(x, blocksize, recip)
    codes = nf4_tree(z.reshape(-1)[: x.size + x.size % 2]).astype(np.uint8)
    return (codes[0::2] << 4) | codes[1::2], absmax


def quantize_8bit(x, code, blocksize=256, recip=recip_correct):
    """(uint8 codes [n], absmax fp32) with the dynamic map `code` (256 fp32 values)."""
    x = np.asarray(x, dtype=f32).reshape(-1)
    z, absmax = scale_blocks(x, blocksize, recip)
    return dynamic_search(z.reshape(-1)[: x.size], code).astype(np.uint8), absmax


def quantize(w: torch.Tensor, blocksize, nested, code2=None, recip=recip_correct, offset=None):
    """bitsandbytes' quantize_4bit on CUDA, emulated: a dict of torch tensors packed [(n+1)//2],
    absmax (fp32, or uint8 when nested) and, when nested, offset (a 0-d fp32 tensor: torch's mean
    of the fp32 absmax as bitsandbytes computes it, here on the CPU, unless given) and nested_absmax."""
    packed, absmax = quantize_4bit(w.detach().float().reshape(-1).numpy(), blocksize, recip)
    out = {"packed": torch.from_numpy(packed), "absmax": torch.from_numpy(absmax)}
    if nested:
        absmax_t = out["absmax"]
        offset = absmax_t.mean() if offset is None else torch.as_tensor(offset, dtype=torch.float32)
        q, nested_absmax = quantize_8bit((absmax_t - offset).numpy(), code2, 256, recip)
        out.update(absmax=torch.from_numpy(q), offset=offset, nested_absmax=torch.from_numpy(nested_absmax))
    return out


# ---- adversarial inputs -------------------------------------------------------------------------

def _blocks_with(values, blocksize, top):
    """Blocks of `blocksize` holding `top` (the block's absmax) then a chunk of `values`, zero-padded."""
    values = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    out = []
    for chunk in values.split(blocksize - 1):
        block = torch.zeros(blocksize)
        block[0] = top
        block[1:1 + chunk.numel()] = chunk
        out.append(block)
    return torch.cat(out)


def _neighbours(t, k=2):
    """t and its k fp32 neighbours on each side."""
    t = torch.as_tensor(t, dtype=torch.float32).reshape(-1)
    out, up, down = [t], t, t
    for _ in range(k):
        up, down = torch.nextafter(up, torch.tensor(float("inf"))), torch.nextafter(down, torch.tensor(float("-inf")))
        out += [up, down]
    return torch.cat(out)


def nf4_adversarial(blocksize, seed=0, huge=True):
    """A flat fp32 tensor of whole blocks that exercise every corner of the 4-bit rule: random values;
    an all-zero block; absmax 1 with every threshold, level and fp32 level midpoint and their
    neighbours (z == x exactly); absmax 7 with x = t * 7 and its neighbours (z lands on and around
    the thresholds after rounding); a negative maximum; a block of subnormals only (flushed: absmax 0,
    all codes 0); subnormals beside a normal maximum (x flushed, not z); with `huge` (beyond float16),
    normal x whose z is subnormal and an absmax above 2**126, whose reciprocal is subnormal and
    flushed (z = 0)."""
    from deltakern._codes import nf4_code, nf4_thresholds

    g = torch.Generator().manual_seed(seed)
    t, code = nf4_thresholds(), nf4_code()
    special = torch.cat([_neighbours(t), _neighbours(code), _neighbours((code[:-1] + code[1:]) / 2)])
    special = special[special.abs() <= 1]
    parts = [
        torch.randn(blocksize, generator=g),
        torch.zeros(blocksize),
        _blocks_with(special, blocksize, 1.0),
        _blocks_with(-special, blocksize, -1.0),
        _blocks_with(_neighbours(t * 7), blocksize, 7.0),
        torch.linspace(-3, 2, blocksize),
        torch.linspace(-1e-39, 5e-40, blocksize),
        torch.cat([torch.tensor([0.5]), torch.linspace(-1e-39, 1e-39, blocksize - 1)]),
        torch.cat([torch.tensor([1.5e-38]), torch.linspace(-1.1e-38, 1.1e-38, blocksize - 1)]),  # v subnormal, z not
    ]
    if huge:
        parts.append(torch.cat([torch.tensor([2.0**100]), torch.linspace(-2.0**-27, 2.0**-27, blocksize - 1)]))  # z subnormal
        parts.append(torch.cat([torch.tensor([2.0**127]), (torch.rand(blocksize - 1, generator=g) * 2 - 1) * 2.0**127]))
    return torch.cat(parts)


def nested_adversarial(seed=0):
    """Flat fp32 input of the 8-bit step: groups of 256 with absmax 1 holding every map entry, every
    fp32 midpoint of the map and their neighbours; absmax 0.3 with x = m * 0.3 and neighbours; an
    all-zero group; a subnormal-only group; subnormal z from normal x; z = -0.986845255 (code 0, not 1); a partial last group
    with absmax 1 at -1.0."""
    from deltakern._codes import dynamic_map

    g = torch.Generator().manual_seed(seed)
    code = dynamic_map()
    mids = (code[:-1] + code[1:]) * 0.5
    special = torch.cat([_neighbours(code), _neighbours(mids)])
    special = special[special.abs() <= 1]
    return torch.cat([
        _blocks_with(special, 256, 1.0),
        _blocks_with(_neighbours(mids * 0.3), 256, 0.3),
        torch.zeros(256),
        torch.linspace(-1e-39, 1e-39, 256),
        torch.cat([torch.tensor([2.0**100, 1.5e-38]), torch.linspace(-2.0**-27, 2.0**-27, 254)]),
        torch.cat([torch.tensor([0.0556773692, -0.0549449474]), torch.randn(254, generator=g) * 0.005]),
        torch.cat([torch.tensor([-1.0]), torch.randn(99, generator=g) * 0.3]),
    ])
