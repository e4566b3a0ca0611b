"""The one place that decides which implementation runs a deltakern op, and which path a layer takes.

Ops (`deltakern/ops/*.py`) declare the `deltakern::` schemas and fake kernels; their bodies call
`call(op, ...)`. Backends register an implementation per op and device type with `register`:

    torch   deltakern.backends.reference  pure-torch references, every device; the test oracle
    triton  deltakern.backends.triton     Triton kernels on CUDA (on the CPU only in the interpreter lane)
    cuda    deltakern.backends.cuda       the CUDA C++ extension deltakern._C
    cpu     deltakern.backends.cpu        native CPU kernels (the deltakern._cpu extension)

Which backend runs op `op` on a tensor of device type `d`, read at call time:

1. `DELTAKERN_BACKEND_<OP>` (e.g. `DELTAKERN_BACKEND_NF4_DEQUANTIZE=cuda`), else `DELTAKERN_BACKEND`,
   names a backend. It applies to the device types that backend serves (`torch`: all; `triton`,
   `cuda`: CUDA; `cpu`: CPU). There, the named backend runs the op if it registered it, and the
   `torch` reference runs it otherwise: `DELTAKERN_BACKEND=torch` runs no Triton and no C++ kernel,
   `=cuda` runs no Triton. A named backend that registered the op but cannot load (Triton not
   installed, extension not built) raises its own error saying how to get it.
2. Otherwise the device's default order, skipping backends that cannot load:
   CUDA: triton, torch;  CPU: cpu, torch.
   The interpreter lane (`TRITON_INTERPRET=1` and `DELTAKERN_CPU_KERNELS=1`, set by tests) puts
   triton first on the CPU too, so the CUDA code path runs in Triton's interpreter.

The layer functions (`lora_linear`, `dora_linear`, `linear`) choose between one fused op and a
composition of torch ops with `fused_path`; its cost model is `prefer_fused`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

BACKENDS = ("triton", "cuda", "cpu", "torch")
SERVES = {"triton": ("cuda",), "cuda": ("cuda",), "cpu": ("cpu",), "torch": None}  # None: every device
DEFAULT_ORDER = {"cuda": ("triton", "torch"), "cpu": ("cpu", "torch")}
MAX_FUSED_R = 128  # the Triton kernels pad r to a power of two >= 16 held in registers
NF4_FUSED_M = {"lora": 1024, "dora": 384}  # rows up to which an NF4 layer fuses on CUDA (see prefer_fused)


@dataclass(frozen=True)
class Impl:
    fn: Callable
    devices: Optional[tuple]  # None: every device type
    available: Callable[[], bool]
    kind: Optional[str] = None  # what it is, in words (default: the backend's KINDS entry)


_IMPLS: dict[str, dict[str, Impl]] = {}  # op -> backend -> Impl


def register(op: str, backend: str, devices: Optional[tuple] = None,
             available: Optional[Callable[[], bool]] = None, kind: Optional[str] = None):
    """Decorator: `fn` implements `torch.ops.deltakern.<op>` for `backend` on `devices` (device
    types; None = all). `fn` takes exactly the op's arguments and returns its outputs. `available()`
    says whether the backend can run now (cheap, cached by the backend); the default order skips it
    when false. `kind` describes it in words for `describe` (default: the backend's KINDS entry)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; one of {BACKENDS}")

    def deco(fn):
        _IMPLS.setdefault(op, {})[backend] = Impl(fn, None if devices is None else tuple(devices),
                                                 available or (lambda: True), kind)
        invalidate()
        return fn

    return deco


if os.name == "posix" and isinstance(getattr(os.environ, "_data", None), dict):
    _ENV_DATA = os.environ._data  # the bytes -> bytes mapping os.environ keeps in sync (setenv / putenv)
    _ENV_KEYS: dict = {}

    def getenv(name: str) -> str:
        """os.environ.get(name, ""), without its encode / Mapping overhead (~25x cheaper: the layers
        read a handful of these per op call)."""
        key = _ENV_KEYS.get(name)
        if key is None:
            key = _ENV_KEYS[name] = os.fsencode(name)
        value = _ENV_DATA.get(key)
        return "" if value is None else os.fsdecode(value)
else:  # pragma: no cover  (Windows: os.environ's own lookup)
    def getenv(name: str) -> str:
        return os.environ.get(name, "")


_OP_VARS: dict = {}


def _op_var(op: str) -> str:
    var = _OP_VARS.get(op)
    if var is None:
        var = _OP_VARS[op] = f"DELTAKERN_BACKEND_{op.upper()}"
    return var


def _env_backend(var: str) -> Optional[str]:
    name = getenv(var).strip().lower()
    if not name:
        return None
    if name not in BACKENDS:
        raise ValueError(f"{var}={name!r} is not one of {BACKENDS}")
    return name


def requested(op: Optional[str] = None) -> Optional[str]:
    """The backend named for `op` by DELTAKERN_BACKEND_<OP> or DELTAKERN_BACKEND, or None."""
    if op is not None:
        name = _env_backend(_op_var(op))
        if name is not None:
            return name
    return _env_backend("DELTAKERN_BACKEND")


def backend() -> str:
    """DELTAKERN_BACKEND, or "auto" when unset (the per-device default order)."""
    return requested() or "auto"


def interpreter_lane() -> bool:
    """Whether CPU tensors run the Triton kernels in Triton's interpreter (tests)."""
    return getenv("DELTAKERN_CPU_KERNELS") == "1" and getenv("TRITON_INTERPRET") == "1"


def _serves(backend_name: str, device: str) -> bool:
    if backend_name == "triton" and device == "cpu" and interpreter_lane():
        return True
    devs = SERVES[backend_name]
    return devs is None or device in devs


def _has(impl: Optional[Impl], device: str) -> bool:
    return impl is not None and (impl.devices is None or device in impl.devices)


def default_order(device: str) -> tuple:
    order = DEFAULT_ORDER.get(device, ("torch",))
    if device == "cpu" and interpreter_lane():
        order = ("triton",) + order
    return order


_RESOLVED: dict = {}  # (op, device, the environment variables the rule reads) -> backend name


def invalidate() -> None:
    """Forget the resolved backends: an implementation was registered or an extension module swapped
    (`_native.NativeModule.set`), so availability may differ. The environment is part of the key."""
    _RESOLVED.clear()


def resolve(op: str, device: str) -> str:
    """The name of the backend that runs `op` on a tensor of device type `device` (see the module
    docstring for the rule). Remembered per op, device and the values of the variables the rule reads
    (a layer resolves several ops per call; the availability checks behind it import modules)."""
    key = (op, device, getenv(_op_var(op)), getenv("DELTAKERN_BACKEND"), getenv("DELTAKERN_CPU_KERNELS"),
           getenv("TRITON_INTERPRET"))
    name = _RESOLVED.get(key)
    if name is None:
        name = _RESOLVED[key] = _resolve(op, device)
    return name


def _resolve(op: str, device: str) -> str:
    impls = _IMPLS.get(op)
    if not impls:
        raise KeyError(f"no implementation of deltakern::{op} is registered")
    named = requested(op)
    if named is not None and _serves(named, device):
        return named if _has(impls.get(named), device) else "torch"
    for name in default_order(device):
        impl = impls.get(name)
        if _has(impl, device) and impl.available():
            return name
    return "torch"


def implementation(op: str, device: str) -> Callable:
    return _IMPLS[op][resolve(op, device)].fn


def call(op: str, *args):
    """Run `op` with the backend chosen for the device of its first tensor argument."""
    device = next(a.device.type for a in args if hasattr(a, "device"))
    return implementation(op, device)(*args)


def run(op: str, *args):
    """`torch.ops.deltakern.<op>(*args)`, minus the op dispatch in eager mode: the layers call their
    ops through this. In eager mode on a real device it is `call` (the custom-op layer costs ~50 us a
    call on the CPU, several times per layer and step); under torch.compile, and on the meta device,
    it goes through torch.ops so that the fake kernels trace."""
    import torch

    device = next(a.device.type for a in args if hasattr(a, "device"))
    if device == "meta" or torch.compiler.is_compiling():
        return getattr(torch.ops.deltakern, op)(*args)
    return implementation(op, device)(*args)


KINDS = {"torch": "pure-torch reference ops", "triton": "Triton kernels", "cuda": "CUDA C++ kernels",
         "cpu": "native CPU kernels"}


def describe(op: str, device: str) -> str:
    """What runs `op` on `device`, in words (e.g. "native CPU kernels (backend cpu) on CPU")."""
    name = resolve(op, device)
    impl = _IMPLS[op].get(name)
    kind = impl.kind if impl is not None and impl.kind else KINDS[name]
    return f"{kind} (backend {name}) on {device.upper()}"


def implementations(op: str) -> dict:
    """backend name -> device types (None: all), for docs and tests."""
    return {name: impl.devices for name, impl in _IMPLS.get(op, {}).items()}


def ops() -> list:
    return sorted(_IMPLS)


# ---- layer path choice ----------------------------------------------------------------------------

IMPL_VARS = {"lora": "DELTAKERN_LORA_IMPL", "dora": "DELTAKERN_DORA_IMPL", "linear": "DELTAKERN_LINEAR_IMPL"}
FUSED_OP = {"lora": "lora_fwd", "dora": "dora_fwd", "linear": "linear_fwd"}


def forced_impl(var: str) -> Optional[bool]:
    """`var`=triton|torch (e.g. DELTAKERN_LORA_IMPL): the fused op (True) or the torch composition
    (False); unset: None; anything else raises ValueError."""
    forced = getenv(var).strip().lower()
    if forced == "triton":
        return True
    if forced == "torch":
        return False
    if forced:
        raise ValueError(f"{var}={forced!r} is not one of ('triton', 'torch')")
    return None


def prefer_fused(family: str, M: int, N: int, K: int, weight_kind: str, r: int = 0) -> bool:
    """The cost model for a CUDA call: one fused Triton op (True) or a torch composition (False).

    `DELTAKERN_<FAMILY>_IMPL=triton|torch` forces it. N and K are in the signature for a measured
    model; the defaults below are UNTUNED (no GPU has measured them) and read only M, the weight kind
    and r (N and K enter `fused_path`'s int32 check):
    * lora, dora: Triton for M <= 64 with a dense W (fusing saves a launch and an [M, N] pass; above,
      cuBLAS is the stronger GEMM), and with NF4 for M <= NF4_FUSED_M[family]; r > MAX_FUSED_R always
      composes. The NF4 bounds are the crossovers of a cost model fed by the static kernel report
      (benchmarks/kernel_report.py, sm_90 SASS; H100 figures: 132 SMs x 4 warp-instructions per cycle
      at 1.755 GHz, 708 TFLOP/s bf16, 3.02 TB/s copy), for one training step's forward + dX:
          fused(kernel) = max(ceil(M / 128) N K ipe / (132 * 4 * 1.755e9), 2 M N K / (0.8 * 708e12))
              (ipe: warp-instructions per weight element per 128-row tile; max() because the decoded
              tile is the wgmma's register operand and the loop does not wait on its MMA; 0.8: an
              assumed Triton wgmma efficiency against cuBLAS)
          composition(GEMM) = (N K / 2 + N K / 16 + 2 N K) / (0.9 * 3.02e12)          dequantize
                              + max(2 M N K / 708e12, (2 N K + 2 M K + 2 M N) / 3.02e12)  cuBLAS
      For N = 14336, K = 4096: LoRA (ipe 0.27 forward, 0.31 dX: both kernels MMA-bound) fuses below
      M ~ 1300 -> 1024; DoRA (0.25 forward, 0.82 dX, which still waits on its MMA) below M ~ 390
      -> 384. (With the element-wise NF4 loader the LoRA crossover was M ~ 144, with the per-element
      code gather M ~ 530.) Predictions, to be replaced by measured crossovers.
    * linear (BitFit): dense -> composition (cuBLAS; the extra read of dY for db is ~1/K of the GEMM's
      traffic); NF4 -> Triton (no transient dense W).
    """
    forced = forced_impl(IMPL_VARS[family])
    if forced is not None:
        return forced
    if family == "linear":
        return weight_kind == "nf4"
    if r > MAX_FUSED_R:
        return False
    return M <= (NF4_FUSED_M[family] if weight_kind == "nf4" else 64)


def fused_path(family: str, x, M: int, N: int, K: int, weight_kind: str, r: int = 0) -> bool:
    """Whether a `family` layer call (lora | dora | linear) runs its fused ops or the composition.

    Off CUDA: the fused ops (their CPU kernels are native or the references, per `resolve`) unless
    DELTAKERN_<FAMILY>_IMPL=torch forces the composition. On CUDA: the composition whenever the
    fused op would not run on Triton (DELTAKERN_BACKEND=cuda or torch), for r > MAX_FUSED_R, or where
    the Triton kernels' int32 indexing would overflow; else `prefer_fused`.
    """
    device = x.device.type
    forced = forced_impl(IMPL_VARS[family])  # validated on every device
    if device != "cuda":
        return forced is not False
    if resolve(FUSED_OP[family], device) != "triton":
        return False
    if r > MAX_FUSED_R or M * max(N, K) >= 2**31 or N * K >= 2**31:
        return False
    return prefer_fused(family, M, N, K, weight_kind, r)
