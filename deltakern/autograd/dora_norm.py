"""DoRA's row norms ||W + s B A||_row: computed without forming B A or a dense W, repaired where the
expansion cancels, cached between optimizer steps (DoRANormCache), and sync-free in the steady state
(check_dora_norms raises what the sync-free recomputations deferred). Also the implementation of the
opaque op `deltakern::dora_weight_norm` that compiled graphs call."""

from __future__ import annotations

from typing import Optional

import torch

import deltakern.ops.dora  # noqa: F401  (defines torch.ops.deltakern.dora_*)
from deltakern._autocast import autocast_off
from deltakern.backends import registry

# A row whose expanded squared norm is below this fraction of its parts (||W_j||^2 + s^2 ||(BA)_j||^2)
# lost too many digits to cancellation and is recomputed exactly from W_j + s B_j A.
NORM_CANCELLATION_RTOL = 1e-3



class FrozenWeight:
    """A frozen weight as the ops take it: (weight-or-packed, absmax fp32 or None, code or None, N, K, blocksize)."""

    __slots__ = ("w", "absmax", "code", "N", "K", "blocksize")

    def __init__(self, w, absmax, code, N, K, blocksize):
        self.w, self.absmax, self.code, self.N, self.K, self.blocksize = w, absmax, code, N, K, blocksize

    @property
    def args(self):
        return self.w, self.absmax, self.code, self.N, self.K, self.blocksize

    def dense_rows(self, rows: torch.Tensor, dtype) -> torch.Tensor:
        """W[rows] in dtype (NF4 decoded for those rows only)."""
        if self.absmax is None:
            return self.w[rows].to(dtype)
        flat = rows[:, None].long() * self.K + torch.arange(self.K, device=rows.device)
        byte = self.w.reshape(-1).view(torch.uint8)[flat >> 1].long()
        nib = torch.where(flat % 2 == 0, byte >> 4, byte & 15)
        return (self.code[nib] * self.absmax[flat // self.blocksize]).to(dtype)



def _row_list(rows: torch.Tensor, limit: int = 10) -> str:
    idx = rows.tolist()
    more = f" and {len(idx) - limit} more" if len(idx) > limit else ""
    return f"{idx[:limit]}{more}"



# Steady-state norm recomputations (after an optimizer step) repair at most this many cancelled rows
# on the device, without reading anything back (see dora_weight_norm).
REPAIR_ROWS = 32
# On CPU tensors the sync-free recomputation first checks whether any row is cancelled at all and
# skips the fixed-size repair when none is (same result, ~0.2 ms less per DoRA layer and step at
# N = K = 1024). Tests set it False to run the GPU's sync-free path on the CPU.
CPU_SKIP_CLEAN_REPAIR = True



_deferred = {}  # device -> int32 flags of the sync-free recomputations: 1 = a zero row, 2 = too many cancelled rows



def _deferred_flags(device) -> torch.Tensor:
    flags = _deferred.get(device)
    if flags is None:
        flags = _deferred[device] = torch.zeros((), dtype=torch.int32, device=device)
    return flags



def check_dora_norms():
    """Raise ValueError if a sync-free DoRA norm recomputation since the last check met a row whose
    norm ||W_j + s (BA)_j|| is exactly 0 (the output scale m / 0 is undefined: those outputs are
    inf/NaN, as in PEFT) or more cancelled rows than it repairs (REPAIR_ROWS; the rest keep the
    expanded sum's value). Reads one flag per device (a synchronisation): call it where the host
    waits anyway (logging, checkpointing); the first norm computation of every DoRA layer calls it.
    """
    for device, flags in list(_deferred.items()):
        bits = int(flags.item())
        if bits:
            flags.zero_()
            if bits & 1:
                raise ValueError(
                    "DoRA weight norm ||W + s*B@A|| became zero for some output row during training "
                    "(recomputed after an optimizer step); the magnitude/norm scale is undefined there.")
            raise ValueError(
                f"more than {REPAIR_ROWS} rows of a DoRA weight norm lost their digits to cancellation "
                "in one recomputation; the rest were not repaired. Raise "
                "deltakern.autograd.dora.REPAIR_ROWS or check the adapter for divergence.")



def dora_weight_norm(weight: FrozenWeight, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                     sumsq: Optional[torch.Tensor] = None, sync: bool = True):
    """Row norms ||W_j + s (B A)_j|| (fp32 [N]) without forming B A or a dense W.

        ||W_j + s (BA)_j||^2 = ||W_j||^2 + 2 s <B_j, (W A^T)_j> + s^2 <B_j, (B (A A^T))_j>

    W A^T and ||W_j||^2 come from one pass over W (`deltakern::dora_norm_parts`; W in lora_A's dtype,
    NF4 dequantized exactly as the forward uses it); pass `sumsq` (cached ||W_j||^2) to skip the
    squares. All sums are fp32. Rows whose expansion cancels badly (below NORM_CANCELLATION_RTOL of
    its parts) are recomputed exactly from W_j + s B_j A.

    sync=True (a layer's first norm): every such row is repaired, and a row whose norm is then
        exactly 0 raises ValueError naming it (m / 0 has no meaning; PEFT would silently produce
        NaN). This reads the row set back to the host: one synchronisation.
    sync=False (the steady state, after each optimizer step): nothing is read back. The
        REPAIR_ROWS rows with the smallest ratio n2 / parts are recomputed exactly (a fixed-size
        gather, so no data-dependent shape) and taken where they are cancelled; a zero row, or more
        cancelled rows than that, sets a device flag that `check_dora_norms()` raises on later.
        Between the event and that check the outputs of a zero row are inf/NaN (PEFT's behaviour).

    Returns (norm [N], W A^T [N, r], ||W_j||^2 [N]), all fp32.
    """
    with torch.no_grad(), autocast_off(lora_A.device.type):
        A, B = lora_A.detach(), lora_B.detach()
        wa, sq = registry.run("dora_norm_parts", *weight.args, A, int(sumsq is None))
        if sumsq is not None:
            sq = sumsq
        Af, Bf = A.float(), B.float()
        bq = torch.mm(Bf, torch.mm(Af, Af.t()))  # B (A A^T)  [N, r]
        quad = (bq * Bf).sum(1)  # ||(BA)_j||^2
        cross = (wa * Bf).sum(1)  # <W_j, (BA)_j>
        n2 = sq + (2.0 * scaling) * cross + (scaling * scaling) * quad
        parts = sq + (scaling * scaling) * quad
        bad = n2 <= NORM_CANCELLATION_RTOL * parts
        if not sync:
            # On the CPU reading `bad` back costs nothing (no stream to wait for): skip the repair
            # when no row needs it (it would change nothing: a zero row is always a cancelled row).
            clean = CPU_SKIP_CLEAN_REPAIR and n2.device.type == "cpu" and not bool(bad.any())
            if weight.N and not clean:
                k = min(REPAIR_ROWS, weight.N)
                ratio = torch.where(parts > 0, n2 / parts, torch.zeros_like(n2))  # zero parts: a zero row
                rows = torch.topk(ratio, k, largest=False).indices
                v = weight.dense_rows(rows, A.dtype).float() + scaling * torch.mm(Bf[rows], Af)
                exact = v.square().sum(1)
                fix = bad[rows]
                n2 = n2.index_put((rows,), torch.where(fix, exact, n2[rows]))
                zero = (fix & (exact == 0)).any().to(torch.int32)
                over = (bad.sum() > k).to(torch.int32)
                _deferred_flags(n2.device).bitwise_or_(zero | (over << 1))
        elif bool(bad.any()):
            rows = bad.nonzero().flatten()
            v = weight.dense_rows(rows, A.dtype).float() + scaling * torch.mm(Bf[rows], Af)
            exact = v.square().sum(1)
            n2 = n2.index_put((rows,), exact)
            zero = rows[exact == 0]
            if zero.numel():
                raise ValueError(
                    f"DoRA weight norm ||W + s*B@A|| is zero for output rows {_row_list(zero)} "
                    f"({zero.numel()} of {weight.N}); the magnitude/norm scale is undefined there. "
                    "Drop or perturb those rows of the base weight (or of B) before using DoRA."
                )
        return n2.clamp_min(0.0).sqrt(), wa, sq



def _tensor_key(t: torch.Tensor):
    return (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape), tuple(t.stride()))



def dora_weight_norm_op(w: torch.Tensor, absmax: Optional[torch.Tensor], code: Optional[torch.Tensor], N: int,
                         K: int, blocksize: int, lora_A: torch.Tensor, lora_B: torch.Tensor,
                         scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`deltakern::dora_weight_norm` (the schema is in deltakern/ops/dora.py): `dora_weight_norm` as one opaque op, for torch.compile (a traced graph cannot raise on values).
    The first call for a weight (storage, version, shape) checks synchronously; later calls, the
    compiled steady state, are sync-free (sync=False)."""
    key = (w.data_ptr(), w._version, w.device, tuple(w.shape), None if absmax is None else absmax.data_ptr())
    first = key not in _checked_weights
    if first:
        if len(_checked_weights) >= 4096:
            _checked_weights.clear()
        check_dora_norms()
    out = dora_weight_norm(FrozenWeight(w, absmax, code, N, K, blocksize), lora_A, lora_B, scaling, None, sync=first)
    _checked_weights.add(key)
    return out



_checked_weights: set = set()



class DoRANormCache:
    """Caches what DoRA's row norms need between optimizer steps.

    * ||W_j||^2 (fp32 [N]) and, for NF4, the decoded fp32 block scales: W is frozen, so these are
      computed once (keyed on the weight storage and its version, and the compute dtype);
    * ||W + s B A||_row (fp32 [N]) and W A^T (fp32 [N, r]): recomputed only when A or B changed,
      tracked by their data pointers and `_version` counters (an optimizer step bumps both
      versions), or when the scaling or compute dtype changes. Holds O(N r) memory.
    `clear()` forgets everything (e.g. after writing W in place without bumping its version).
    Inside torch.compile the cache is bypassed (data pointers and version counters cannot be
    traced): the compiled graph recomputes the norms on every call through one opaque op,
    `deltakern::dora_weight_norm`, which costs one extra read of W per call.
    """

    def __init__(self):
        self.clear()

    def clear(self):
        self._w_key = self._sumsq = self._absmax = None
        self._key = self._norm = self._wa = None

    def _weight(self, w_key):
        if self._w_key != w_key:  # a different (or rewritten) base weight: forget everything
            self.clear()
            self._w_key = w_key

    def absmax(self, nf4_weight, w_key):
        """The decoded fp32 block scales of an NF4 weight (decoded once)."""
        self._weight(w_key)
        if self._absmax is None:
            self._absmax = nf4_weight.absmax_fp32()
        return self._absmax

    def norm(self, weight: FrozenWeight, w_key, lora_A, lora_B, ab_key, scaling):
        """(||W + s B A||_row, W A^T), recomputed only when W, A, B, s or the dtype changed."""
        self._weight(w_key)
        key = (ab_key, float(scaling))
        if self._key != key or self._norm is None:
            first = self._norm is None  # a layer's first norm checks synchronously; later ones do not
            if first:
                check_dora_norms()
            self._norm, self._wa, self._sumsq = dora_weight_norm(weight, lora_A, lora_B, scaling, self._sumsq,
                                                                 sync=first)
            self._key = key
        return self._norm, self._wa


_W = FrozenWeight  # the old private name
