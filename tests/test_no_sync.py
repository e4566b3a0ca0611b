"""The steady-state training step of every method makes no host synchronisation.

On a GPU, a device -> host read (`.item()`, `bool(t)`, `.tolist()`, `.cpu()`, a data-dependent shape
such as `nonzero()` or boolean-mask indexing) or a host -> device copy of a fresh Python value
(`torch.tensor(v, device=...)`) stalls the stream and makes the step uncapturable in a CUDA graph.
On the CPU nothing stalls, so these tests turn each of those Python entry points into an error for
the duration of one step and run the step's forward and backward with the reference ops.

What this proves: no Python code on the step's path (the modules, autograd functions, op wrappers
and references) calls any of the patched entry points. What it does not prove: syncs inside C++
(none of torch's CPU ops used here sync on CUDA either, except the data-dependent ones patched
here), or syncs that only the CUDA launch path takes (the Triton launchers' Python runs in the
interpreter lane, which reads tensors back by design and so cannot be run under the guard; the
launchers take only shapes, strides and Python scalars).
"""

import contextlib

import pytest
import torch
from torch import nn

import deltakern as dk
import deltakern.autograd.dora as dora_mod
from deltakern import nf4
from deltakern.autograd.dora import _W, check_dora_norms, dora_weight_norm
from deltakern.nn import DoRALinear, LoRALinear, NF4Linear
from deltakern.backends.reference.nf4 import absmax_ref
from deltakern.autograd import dora_norm


@pytest.fixture(autouse=True)
def _gpu_norm_path(monkeypatch):
    """Run DoRA's sync-free norm recomputation as on a GPU (no CPU-only shortcut that reads `bad`)."""
    monkeypatch.setattr(dora_norm, "CPU_SKIP_CLEAN_REPAIR", False)


class HostSync(AssertionError):
    pass


def _raiser(name):
    def f(*args, **kwargs):
        raise HostSync(f"host synchronisation: {name}")

    return f


@contextlib.contextmanager
def no_host_sync():
    """Make every Python entry point that would synchronise a CUDA stream raise HostSync."""
    T = torch.Tensor
    saved = []

    def patch(owner, name, new):
        saved.append((owner, name, owner.__dict__.get(name, getattr(owner, name))))
        setattr(owner, name, new)

    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero",
                 "masked_select", "unique"):
        patch(T, name, _raiser(f"Tensor.{name}"))
    for name in ("nonzero", "masked_select", "unique", "argwhere"):
        patch(torch, name, _raiser(f"torch.{name}"))
    get = T.__getitem__

    def getitem(self, idx):
        for i in idx if isinstance(idx, tuple) else (idx,):
            if isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8):
                raise HostSync("host synchronisation: boolean-mask indexing")
        return get(self, idx)

    patch(T, "__getitem__", getitem)
    for name in ("tensor", "as_tensor"):
        orig = getattr(torch, name)

        def new(*args, _orig=orig, _name=name, **kwargs):
            if kwargs.get("device") is not None:
                raise HostSync(f"host -> device copy: torch.{_name}(..., device=...)")
            return _orig(*args, **kwargs)

        patch(torch, name, new)
    try:
        yield
    finally:
        for owner, name, old in reversed(saved):
            setattr(owner, name, old)


def test_the_guard_catches_each_kind_of_sync():
    t = torch.ones(3)
    for fn in (lambda: t.sum().item(), lambda: bool(t.any()), lambda: t.tolist(), lambda: t.cpu(),
               lambda: t.nonzero(), lambda: t[t > 0], lambda: torch.tensor(1.0, device="cpu"),
               lambda: float(t[0]), lambda: int(t[0])):
        with no_host_sync(), pytest.raises(HostSync):
            fn()
    with no_host_sync():
        assert torch.equal(t[1:] * 2 + 1.5, torch.full((2,), 3.5))  # ordinary device work is allowed
    assert t.sum().item() == 3.0  # and everything is restored afterwards


K, N, R = 64, 48, 4


@pytest.fixture(autouse=True)
def _no_pending_flags():
    dora_mod._deferred.clear()
    yield
    dora_mod._deferred.clear()


def _base(kind, bias, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(K, N, bias=bias)
    if kind == "nf4":
        return NF4Linear.from_linear(lin, blocksize=64, double_quant=True)
    return lin


def _model(method, kind, dropout):
    if method == "lora":
        return LoRALinear(_base(kind, True), r=R, alpha=8, dropout=dropout)
    if method == "dora":
        return DoRALinear(_base(kind, True), r=R, alpha=8, dropout=dropout)
    model = nn.Sequential(_base(kind, True))
    dk.apply(model, dk.BitFit())
    return model


def _step(model, x):
    y = model(x)
    y.float().square().mean().backward()
    return y


@pytest.mark.parametrize("kind", ["dense", "nf4"])
@pytest.mark.parametrize("method,dropout", [("lora", 0.0), ("lora", 0.1), ("dora", 0.0), ("dora", 0.1),
                                            ("bitfit", 0.0)])
def test_steady_state_step_makes_no_host_sync(method, dropout, kind, monkeypatch):
    # the reference ops: the `cpu` backend (native kernels, BLAS compositions) is CPU-only code, where no
    # host sync exists; what runs on a GPU is the autograd/composition code and the op wrappers checked here
    monkeypatch.setenv("DELTAKERN_BACKEND", "torch")
    model = _model(method, kind, dropout).train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert params
    opt = torch.optim.SGD(params, lr=0.1)
    x = torch.randn(5, K, requires_grad=True)
    for _ in range(2):  # the first steps fill the caches (decoded scales, ||W||^2): allowed to sync once
        _step(model, x)
        opt.step()  # moves A, B, m: the next step recomputes DoRA's norms, as every training step does
        opt.zero_grad()
    with no_host_sync():
        y = _step(model, x)
    assert torch.isfinite(y).all() and all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert x.grad is not None


def test_nested_scales_python_scalar_offset_bit_equal_to_a_device_tensor_offset():
    """absmax_ref adds the double-quant offset as a Python scalar (no host -> device copy): the same
    single fp32 rounding as adding an fp32 tensor holding the offset (offsets that are not fp32
    values included: both round the offset to fp32 first)."""
    g = torch.Generator().manual_seed(3)
    nested_code = torch.sort(torch.rand(256, generator=g) * 2 - 1).values
    for n_blocks in (1, 255, 256, 700):
        q = torch.randint(0, 256, (n_blocks,), dtype=torch.uint8, generator=g)
        nested_absmax = torch.rand(-(-n_blocks // 256), generator=g) * 3
        for offset in (0.0, 0.0123456789, float(torch.rand(1, generator=g)), -1e-3, 1 / 3):
            got = absmax_ref(q, nested_absmax, nested_code, offset)
            groups = torch.arange(n_blocks) // 256
            want = nested_code[q.long()] * nested_absmax[groups] + torch.tensor(offset, dtype=torch.float32)
            assert got.dtype == torch.float32
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (n_blocks, offset)


def test_decoded_scales_are_cached_on_the_weight_and_follow_in_place_writes():
    w = nf4.quantize(torch.randn(N, K), blocksize=64, double_quant=True)
    a = w.absmax_fp32()
    assert w.absmax_fp32() is a  # decoded once
    ref = absmax_ref(w.absmax, w.nested_absmax, w.nested_code, w.offset, w.nested_blocksize)
    assert torch.equal(a, ref)
    w.absmax.copy_(torch.roll(w.absmax, 1))  # an in-place rewrite bumps the version: decoded again
    b = w.absmax_fp32()
    assert b is not a and torch.equal(b, absmax_ref(w.absmax, w.nested_absmax, w.nested_code, w.offset))
    moved = w.to("cpu")
    assert torch.equal(moved.absmax_fp32(), b)
    plain = nf4.quantize(torch.randn(N, K), blocksize=64, double_quant=False)
    assert plain.absmax_fp32() is plain.absmax


def _dense_w(W):
    return _W(W, None, None, W.shape[0], W.shape[1], 0)


def test_dora_norm_repairs_cancelled_rows_on_the_device_and_defers_the_zero_row_error():
    torch.manual_seed(0)
    W = torch.randn(N, K)
    A = torch.randn(R, K) * 0.1
    B = torch.randn(N, R) * 0.1
    s = 2.0
    # rows 3 and 7: W_j = -s (BA)_j + tiny, so the expanded sum cancels; row 11: exactly zero
    B[11] = 0
    BA = B @ A
    W[3] = -s * BA[3] + 1e-4 * torch.randn(K)
    W[7] = -s * BA[7] + 1e-4 * torch.randn(K)
    W[11] = 0
    exact = (W.double() + s * BA.double()).norm(dim=1)
    check_dora_norms()  # nothing pending
    with no_host_sync():
        norm, _, _ = dora_weight_norm(_dense_w(W), A, B, s, None, sync=False)
    naive = (W.square().sum(1) + 2 * s * (W * BA).sum(1) + s * s * BA.square().sum(1)).clamp_min(0).sqrt()
    ok = torch.ones(N, dtype=torch.bool)
    ok[11] = False
    assert torch.allclose(norm[ok].double(), exact[ok], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(naive[[3, 7]].double(), exact[[3, 7]], rtol=1e-4)  # the rows really needed repair
    assert norm[11] == 0
    with pytest.raises(ValueError, match="became zero"):
        check_dora_norms()  # the zero row was recorded on the device and is raised where it is read
    check_dora_norms()  # and reset
    # more cancelled rows than REPAIR_ROWS: flagged, not silently dropped
    Wm = -s * BA + 1e-4 * torch.randn(N, K)
    with no_host_sync():
        dora_weight_norm(_dense_w(Wm), A, B, s, None, sync=False)
    with pytest.raises(ValueError, match="cancellation"):
        check_dora_norms()
    # the synchronous form (a layer's first norm) raises at once, naming the row
    with pytest.raises(ValueError, match=r"rows \[11\]"):
        dora_weight_norm(_dense_w(W), A, B, s, None)
    norm_sync, _, _ = dora_weight_norm(_dense_w(W[ok]), A, B[ok], s, None)
    assert torch.allclose(norm_sync.double(), exact[ok], rtol=1e-4, atol=1e-6)


def test_dora_module_zero_row_in_training_is_raised_by_the_next_check():
    lin = nn.Linear(K, N)
    mod = DoRALinear(lin, r=R, alpha=8)
    x = torch.randn(3, K)
    mod(x).sum().backward()  # first norm: synchronous, fine
    with torch.no_grad():  # an update that zeroes row 5 of W + s B A exactly
        mod.lora_B.zero_()
        mod.lora_B[5] = 1.0
        mod.lora_A.copy_(-lin.weight[5] / mod.scaling / R)  # s * (B A)_5 = -W_5 exactly (powers of 2)
    with no_host_sync():
        y = mod(x)
    assert not torch.isfinite(y[:, 5]).all()
    with pytest.raises(ValueError, match="became zero"):
        check_dora_norms()


def test_autotuning_during_graph_capture_is_refused(monkeypatch):
    """Autotuning cannot be captured in a CUDA graph: a launch that would tune while capturing raises
    (simulated on the CPU: a fake autotuner, `is_current_stream_capturing` patched, a cuda device)."""
    triton = pytest.importorskip("triton")
    from deltakern.triton_kernels import _common

    class FakeTuner(triton.runtime.autotuner.Autotuner):
        def __init__(self):  # only what _untuned_key reads
            self.configs, self.arg_names, self.keys, self.cache = [1, 2], ["x", "M", "FLAG"], ["M", "FLAG"], {}
            self.fn = type("F", (), {"__name__": "fake_kernel"})

        def __getitem__(self, grid):
            return lambda *a, **k: "launched"

    tuner = FakeTuner()
    x = torch.zeros(2)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(_common, "device_guard", lambda device: contextlib.nullcontext())
    with pytest.raises(RuntimeError, match="autotune during CUDA graph capture"):
        _common.launch(tuner, (1,), torch.device("cuda"), x, 64, FLAG=1)
    tuner.cache[(64, 1, str(x.dtype))] = "tuned"  # tuned before capture: the launch goes ahead
    assert _common.launch(tuner, (1,), torch.device("cuda"), x, 64, FLAG=1) == "launched"
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert _common.launch(tuner, (1,), torch.device("cuda"), x, 128, FLAG=1) == "launched"  # not capturing
