"""The backend seam (deltakern.backends.registry): which implementation runs each op, per device, and
which path each layer function takes - one rule for every method."""

from types import SimpleNamespace

import pytest
import torch

import deltakern
from deltakern.backends import registry
from deltakern.backends import triton as triton_backend

CUDA_X = SimpleNamespace(device=SimpleNamespace(type="cuda"))  # what fused_path reads of x
FAMILIES = ("lora", "dora", "linear")
OPS = ("nf4_quantize", "nf4_quantize_nested", "nf4_dequantize", "lora_fwd", "lora_fwd_nf4", "lora_dx", "lora_dx_nf4",
       "lora_fwd_xa", "lora_dx_dyb", "linear_fwd", "linear_bwd", "dora_norm_parts", "dora_fwd", "dora_bwd",
       "dora_colsum", "dora_ctw", "dora_fwd_xa", "dora_bwd_dyb")


@pytest.fixture
def clean_env(monkeypatch):
    for var in ("DELTAKERN_BACKEND", "DELTAKERN_CPU_KERNELS", *registry.IMPL_VARS.values()):
        monkeypatch.delenv(var, raising=False)
    for op in OPS:
        monkeypatch.delenv(f"DELTAKERN_BACKEND_{op.upper()}", raising=False)
    return monkeypatch


def test_every_op_has_a_reference_and_a_schema():
    assert set(OPS) <= set(registry.ops())
    for op in registry.ops():
        assert "torch" in registry.implementations(op), op
        assert hasattr(torch.ops.deltakern, op), op


def test_resolve_follows_the_extension_and_the_environment(clean_env):
    """resolve() remembers its answers, keyed by the environment it reads; a change of the extension's
    state (an import, NativeModule.set, a monkeypatch of its module) makes it resolve again."""
    from deltakern import _cpu_ext

    if not _cpu_ext.available():
        pytest.skip("needs the native CPU extension")
    assert registry.resolve("nf4_dequantize", "cpu") == "cpu"
    clean_env.setenv("DELTAKERN_BACKEND", "torch")
    assert registry.resolve("nf4_dequantize", "cpu") == "torch"
    clean_env.delenv("DELTAKERN_BACKEND")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_cpu_ext._native, "_module", None)  # as if its import had failed
        assert registry.resolve("nf4_dequantize", "cpu") == "torch"
    assert registry.resolve("nf4_dequantize", "cpu") == "cpu"


def test_default_order(clean_env):
    for op in OPS:
        assert registry.resolve(op, "cuda") == ("triton" if triton_backend.available() else "torch"), op
        assert registry.resolve(op, "cpu") in ("cpu", "torch"), op
        assert registry.resolve(op, "meta") == "torch", op


@pytest.mark.parametrize("name", ["torch", "cuda"])
def test_no_triton_under_torch_or_cuda_backend(clean_env, name):
    """DELTAKERN_BACKEND=torch runs no Triton and no C++ kernel; =cuda runs no Triton: every op and every
    layer family, dense and NF4 (BitFit and DoRA used to keep their Triton path under =torch)."""
    clean_env.setenv("DELTAKERN_BACKEND", name)
    for op in OPS:
        want = "cuda" if (name == "cuda" and op == "nf4_dequantize") else "torch"
        assert registry.resolve(op, "cuda") == want, op
    for family in FAMILIES:
        for kind in ("dense", "nf4"):
            clean_env.setenv(registry.IMPL_VARS[family], "triton")  # even when the layer asks for it
            assert registry.fused_path(family, CUDA_X, 8, 64, 64, kind, 16) is False, (family, kind)
            clean_env.delenv(registry.IMPL_VARS[family])
            assert registry.fused_path(family, CUDA_X, 8, 64, 64, kind, 16) is False, (family, kind)


def test_default_path_choice_is_one_rule(clean_env):
    if not triton_backend.available():
        pytest.skip("needs Triton importable")
    for family in FAMILIES:
        assert registry.fused_path(family, CUDA_X, 8, 64, 64, "nf4", 16) is True
        clean_env.setenv(registry.IMPL_VARS[family], "torch")
        assert registry.fused_path(family, CUDA_X, 8, 64, 64, "nf4", 16) is False
        clean_env.delenv(registry.IMPL_VARS[family])
    # r too large for the registers, or int32 indexing overflow: always the composition
    assert registry.fused_path("lora", CUDA_X, 8, 64, 64, "nf4", 256) is False
    assert registry.fused_path("lora", CUDA_X, 2**20, 2**12, 2**12, "nf4", 16) is False


def test_per_op_override_and_bad_names(clean_env):
    clean_env.setenv("DELTAKERN_BACKEND", "torch")
    clean_env.setenv("DELTAKERN_BACKEND_NF4_DEQUANTIZE", "cuda")
    assert registry.resolve("nf4_dequantize", "cuda") == "cuda"
    assert registry.resolve("nf4_quantize", "cuda") == "torch"
    assert registry.resolve("nf4_quantize", "cpu") == "torch"
    # the per-op name replaces DELTAKERN_BACKEND for that op; "cuda" does not serve CPU tensors, so
    # they take the CPU default order
    assert registry.resolve("nf4_dequantize", "cpu") in ("cpu", "torch")
    clean_env.setenv("DELTAKERN_BACKEND", "bogus")
    with pytest.raises(ValueError, match="DELTAKERN_BACKEND='bogus'"):
        registry.resolve("lora_fwd", "cpu")
    clean_env.setenv("DELTAKERN_BACKEND", "torch")
    clean_env.setenv("DELTAKERN_LORA_IMPL", "cublas")
    with pytest.raises(ValueError, match="DELTAKERN_LORA_IMPL='cublas'"):
        registry.fused_path("lora", CUDA_X, 8, 64, 64, "nf4", 16)


def test_interpreter_lane_runs_triton_and_torch_backend_stops_it(clean_env):
    """In the interpreter lane CPU tensors run the Triton kernels; DELTAKERN_BACKEND=torch stops them
    for every method: with the Triton modules made unloadable, LoRA, DoRA and BitFit over dense and
    NF4 weights still run forward and backward."""
    clean_env.setenv("TRITON_INTERPRET", "1")
    clean_env.setenv("DELTAKERN_CPU_KERNELS", "1")
    assert registry.resolve("lora_fwd", "cpu") == "triton"
    clean_env.setenv("DELTAKERN_BACKEND", "torch")

    def no_triton(name):
        raise AssertionError(f"Triton module {name} loaded under DELTAKERN_BACKEND=torch")

    clean_env.setattr(triton_backend, "module", no_triton)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 64, generator=g, requires_grad=True)
    W = torch.randn(24, 64, generator=g) * 0.1
    Wq = deltakern.nf4.quantize(W, blocksize=64)
    b = torch.zeros(24, requires_grad=True)
    A = (torch.randn(4, 64, generator=g) * 0.1).requires_grad_()
    B = (torch.randn(24, 4, generator=g) * 0.1).requires_grad_()
    m = (torch.rand(24, generator=g) + 0.5).requires_grad_()
    for w in (W, Wq):
        deltakern.lora_linear(x, w, b, A, B, 0.5).sum().backward()
        deltakern.dora_linear(x, w, b, A, B, m, 0.5).sum().backward()
        deltakern.linear(x, w, b).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_register_rejects_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend"):
        registry.register("lora_fwd", "opencl")


def test_describe_names_the_backend(clean_env):
    clean_env.setenv("DELTAKERN_BACKEND", "torch")
    assert registry.describe("lora_fwd", "cpu") == "pure-torch reference ops (backend torch) on CPU"


def test_integrations_reachable_after_plain_import():
    """A newcomer's first call: `import deltakern; deltakern.integrations.peft.patch` (fresh process)."""
    import subprocess
    import sys

    code = ("import sys, deltakern; assert 'peft' not in sys.modules; "
            "assert callable(deltakern.integrations.peft.patch); assert callable(deltakern.integrations.bnb.convert)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_one_pattern_rule_everywhere():
    """Delta targets, quantize(skip=...) and bnb.convert(skip=...) share deltakern._patterns: exact, dotted
    suffix or regex, and an invalid regex is an error naming it (delta targets used to ignore it)."""
    from deltakern import _patterns
    from deltakern.methods import base

    assert base.match is _patterns.match
    assert _patterns.match("model.layers.0.self_attn.q_proj", ["q_proj"])
    assert _patterns.match("model.layers.0.self_attn.q_proj", [r".*layers\.0\..*_proj"])
    assert not _patterns.match("model.layers.0.self_attn.q_proj", ["k_proj", "proj"])
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    for call in (lambda: deltakern.apply(model, deltakern.LoRA(target=["q_proj("])),
                 lambda: deltakern.quantize(model, skip=("lm_head(",), progress=False)):
        with pytest.raises(ValueError, match=r"pattern 'q_proj\(' |pattern 'lm_head\(' "):
            call()
    assert model[0].weight.requires_grad  # the refused apply left the model as it was


def test_run_is_the_op_without_dispatch_and_traces_under_compile(clean_env):
    """registry.run: eager calls go straight to the chosen implementation (same result as the op);
    meta tensors and torch.compile(fullgraph=True) go through torch.ops.deltakern (fake kernels)."""
    x, a = torch.randn(40, 33), torch.randn(5, 33)
    want = torch.ops.deltakern.lowrank_xat(x, a)
    assert torch.equal(registry.run("lowrank_xat", x, a), want)
    meta = registry.run("lowrank_xat", x.to("meta"), a.to("meta"))
    assert meta.device.type == "meta" and meta.shape == (40, 5)
    compiled = torch.compile(lambda u, v: registry.run("lowrank_xat", u, v) * 2, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x, a), want * 2)


def test_autocast_off_is_a_no_op_without_autocast_and_disables_it_within():
    from deltakern._autocast import autocast_off

    a = torch.randn(4, 4)
    with autocast_off("cpu"):
        assert torch.mm(a, a).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.mm(a, a).dtype == torch.bfloat16
        with autocast_off("cpu"):
            assert torch.mm(a, a).dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
        assert torch.is_autocast_enabled("cpu")
