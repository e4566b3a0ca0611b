"""Distributed QLoRA on the CPU: FSDP2 (fully_shard), DDP and torch.distributed.checkpoint with gloo on 2
processes, and FSDP2's byte layout at world 8 on the fake process group.

Each 2-process spawn costs 15-30 s (mostly imports), so one spawn runs many checks. Every distributed run is
compared with a single process on the same data: rank r trains on sequence r of a 2-sequence batch, the single
process on both (equal lengths, so the batch mean of the loss is the mean of the ranks' losses).
"""

import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _helpers import batch, llama, perturb  # noqa: E402

import deltakern as dk  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

WORLD = 2
STEPS = 5


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


DEVICE = torch.device("cpu")  # the worker's device (a GPU under NCCL, see the end of this file)
TOL = 1e-6  # relative difference of gradients from one process (fp32 on the CPU)
# Two processes sum each half batch's gradient and then the halves: another fp32 summation order than
# one process over the whole batch (measured up to 2.7e-6 in norm); a sharding or reduction bug shows
# as O(1). Every comparison of two-process gradients with the one-process reference uses it.
SPLIT_TOL = 1e-5


def _build(method=dk.LoRA, seed=0, double_quant=True, meta=False):
    """A tiny Llama, quantized to NF4 (lm_head dense), with LoRA/DoRA on every other linear, perturbed."""
    if meta:
        with torch.device("meta"):
            model = llama()
    else:
        model = llama()
    dk.quantize(model, blocksize=64, double_quant=double_quant, progress=False)
    torch.manual_seed(seed)
    dk.apply(model, method(r=4, alpha=8))
    if not meta:
        perturb(model, scale=0.2, seed=seed + 7)
        model.to(DEVICE)
    return model.train()


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _full(t):
    from deltakern.nn.nf4_linear import is_dtensor

    return t.full_tensor() if is_dtensor(t) else t


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _steps(model, ids, reduce):
    """STEPS AdamW steps; the loss of each step (averaged over ranks by `reduce`)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = _loss(model, ids)
        loss.backward()
        opt.step()
        losses.append(reduce(loss.detach()))
    return losses


def _mean_over_ranks(t):
    t = t.clone()
    torch.distributed.all_reduce(t)
    return (t / torch.distributed.get_world_size()).item()


def _reference(method, ids, double_quant=True):
    """Single process on the whole batch: LoRA gradients after one backward and the losses of STEPS steps."""
    model = _build(method, double_quant=double_quant)
    _loss(model, ids).backward()
    grads = {n: p.grad.clone() for n, p in _trainable(model).items()}
    model = _build(method, double_quant=double_quant)
    return grads, _steps(model, ids, lambda t: t.item())


def _check_training(label, model, ref_grads, ref_losses, ids_r):
    tol = max(TOL, SPLIT_TOL)
    _loss(model, ids_r).backward()
    grads = {n: _full(p.grad) for n, p in _trainable(model).items()}
    assert set(grads) == set(ref_grads), label
    worst = max(rel(grads[n], ref_grads[n]) for n in grads)
    assert worst < tol, f"{label}: LoRA gradients differ from one process by {worst:.2e}"
    model.zero_grad(set_to_none=True)
    losses = _steps(model, ids_r, _mean_over_ranks)
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) <= 1e-5 * abs(b), f"{label}: losses {losses} vs one process {ref_losses}"
    return worst


def _worker(rank, tmp, backend="gloo", world=WORLD):
    global DEVICE, TOL
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from torch.nn.parallel import DistributedDataParallel as DDP

    from deltakern import distributed as dkd
    from deltakern import nf4
    from deltakern.nn import NF4Linear

    if backend == "nccl":
        DEVICE, TOL = torch.device("cuda", rank), 1e-6 if world == 1 else 5e-3  # the GPU's tf32 dots
        torch.cuda.set_device(DEVICE)
        dist.init_process_group(backend, rank=rank, world_size=world)
    else:
        torch.set_num_threads(1)
        init = None if "MASTER_ADDR" in os.environ else f"file://{tmp}/pg"  # torchrun sets env://
        dist.init_process_group(backend, init_method=init, rank=rank, world_size=world)
    try:
        ids, _ = batch(b=world, t=6, pad=False)
        ids = ids.to(DEVICE)
        ids_r = ids[rank:rank + 1]
        report = {}

        # ---- FSDP2, fp32: bytes per rank, gradients and 5 AdamW steps equal one process (LoRA, DoRA) --------
        for method in (dk.LoRA, dk.DoRA):
            for dq in ((True, False) if method is dk.LoRA else (True,)):
                label = f"fsdp {method.__name__} double_quant={dq}"
                ref_grads, ref_losses = _reference(method, ids, dq)
                model = dkd.shard(_build(method, double_quant=dq))
                b = dkd.nf4_bytes(model)
                n_layers = sum(isinstance(m, NF4Linear) for m in model.modules())
                padding = n_layers * 2 * 4  # at most one row of padding per sharded tensor (uint8 / int32 rows)
                assert b["sharded"] <= (b["total"] - b["replicated"]) / world + padding, (label, b)
                report[label] = _check_training(label, model, ref_grads, ref_losses, ids_r)
                report.setdefault("nf4_bytes", b)

        # ---- DDP: LoRA and DoRA equal one process, without find_unused_parameters ---------------------------
        for method in (dk.LoRA, dk.DoRA):
            ref_grads, ref_losses = _reference(method, ids)
            ddp = DDP(_build(method), device_ids=[rank] if DEVICE.type == "cuda" else None)
            grads_ok = _check_training(f"ddp {method.__name__}", _DDPLoss(ddp), ref_grads, ref_losses, ids_r)
            report[f"ddp {method.__name__}"] = grads_ok

        # ---- mixed precision bf16: the 4-bit shards are bit-unchanged by a step, the loss is close -----------
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        model = dkd.shard(_build(), mp_policy=mp)
        before = [p.to_local().clone() for m in model.modules() if isinstance(m, NF4Linear) for p in m.nf4_parameters()]
        losses = _steps(model, ids_r, _mean_over_ranks)
        after = [p.to_local() for m in model.modules() if isinstance(m, NF4Linear) for p in m.nf4_parameters()]
        assert all(a.dtype in (torch.uint8, torch.int32) and torch.equal(a, b) for a, b in zip(after, before))
        ref_losses = _reference(dk.LoRA, ids)[1]
        assert abs(losses[0] - ref_losses[0]) < 0.05 * abs(ref_losses[0]), (losses, ref_losses)
        report["bf16 losses"] = losses
        assert losses[-1] < losses[0], losses

        # ---- a sharded layer dequantizes by gathering, equal to the single-process weight ---------------------
        ref = _build()
        model = dkd.shard(_build())
        name = "model.layers.1.mlp.down_proj"
        layer = dk.methods.base.get_module(model, name)
        assert layer.is_sharded and layer.weight.is_sharded
        assert torch.equal(nf4.dequantize(layer.weight), nf4.dequantize(dk.methods.base.get_module(ref, name).weight))
        with pytest.raises(ValueError, match="NF4"):
            dk.merge(model)
        dense = llama().to(DEVICE)
        dk.apply(dense, dk.LoRA(r=4))
        with pytest.raises(ValueError, match="sharded"):
            dk.merge(dkd.shard(dense))

        # ---- the rank-0 full state dict is byte-equal to the single-process (bitsandbytes-format) dict --------
        ref_sd = {k: v.cpu() for k, v in ref.state_dict().items()}
        full = dkd.full_state_dict(model)
        plain = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            assert list(full) == list(ref_sd)
            for k, v in ref_sd.items():
                assert full[k].dtype == v.dtype and full[k].shape == v.shape, k
                assert bytes(full[k].contiguous().view(torch.uint8).reshape(-1).tolist()) == \
                    bytes(v.contiguous().view(torch.uint8).reshape(-1).tolist()), k
                if ".quant_state." in k:  # torch's own full dict: the same JSON, padded to a fixed length
                    assert json.loads(bytes(plain[k].tolist())) == json.loads(bytes(v.tolist())), k
                else:
                    assert torch.equal(plain[k].cpu(), v), k
        else:
            assert full == {} and plain == {}

        # ---- broadcast from rank 0 into a model quantized on the meta device, then sharded --------------------
        ref_grads, _ = _reference(dk.LoRA, ids)
        fresh = dkd.shard(_build(meta=True))
        fresh.to_empty(device=DEVICE)
        persistent = set(ref.state_dict())
        with torch.no_grad():  # non-persistent buffers (rotary inv_freq) are recomputed, not loaded, as after any meta init
            for n, buf in ref.named_buffers():
                if n not in persistent:
                    fresh.get_buffer(n).copy_(buf)
        set_model_state_dict(fresh, full if rank == 0 else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        _loss(fresh, ids_r).backward()
        worst = max(rel(_full(p.grad), ref_grads[n]) for n, p in _trainable(fresh).items())
        assert worst < max(TOL, SPLIT_TOL), f"broadcast_from_rank0 load: gradients differ by {worst:.2e}"
        report["broadcast load"] = worst

        # ---- DCP: save sharded, load into a freshly built sharded model (other seed): values and grads equal --
        dcp.save(get_model_state_dict(model), checkpoint_id=f"{tmp}/dcp")
        other = dkd.shard(_build(seed=5))
        sd = get_model_state_dict(other)
        dcp.load(sd, checkpoint_id=f"{tmp}/dcp")
        set_model_state_dict(other, sd)
        for k, v in dkd.full_state_dict(other, cpu_offload=False).items():
            assert torch.equal(v.cpu(), ref_sd[k]), k
        _loss(other, ids_r).backward()
        worst = max(rel(_full(p.grad), ref_grads[n]) for n, p in _trainable(other).items())
        assert worst < max(TOL, SPLIT_TOL), f"DCP round trip: gradients differ by {worst:.2e}"
        report["dcp round trip"] = worst

        # ---- deltas saved from live shards (deltakern's format and PEFT's), loaded into a sharded model -------
        target = "model.layers.0.self_attn.q_proj.lora_B"
        with torch.no_grad():
            for n, p in _trainable(model).items():
                if n.endswith("lora_B"):
                    p.to_local().fill_(7.0)
        dk.save_delta(model, f"{tmp}/delta")
        dk.save_peft_adapter(model, f"{tmp}/peft")
        if rank == 0:
            from safetensors.torch import load_file

            d = load_file(f"{tmp}/delta/delta.safetensors")
            assert all((v == 7).all() for k, v in d.items() if k.endswith("lora_B")) and f"0.{target}" in d
            pe = load_file(f"{tmp}/peft/adapter_model.safetensors")
            assert all((v == 7).all() for k, v in pe.items() if "lora_B" in k) and len(pe) == len(d)
        dist.barrier()
        for load in (dk.load_delta, dk.load_peft_adapter):
            into = dkd.shard(_build(seed=9))
            load(into, f"{tmp}/delta" if load is dk.load_delta else f"{tmp}/peft")
            for n, p in _trainable(into).items():
                want = 7.0 if n.endswith("lora_B") else None
                got = _full(p)
                if want is not None:
                    assert (got == want).all(), n
                else:
                    assert torch.equal(got, _full(dict(_trainable(model))[n])), n
        bare = llama()
        dk.quantize(bare, progress=False)
        bare = dkd.shard(bare.to(DEVICE))
        with pytest.warns(UserWarning, match="already sharded"):  # a new delta on a sharded model: inference only
            dk.load_delta(bare, f"{tmp}/delta")
        with torch.no_grad():
            assert rel(_loss(bare, ids_r), _loss(into, ids_r)) < TOL

        # ---- the example (python -m deltakern.examples.fsdp_qlora), a few steps, in this process group -------
        from deltakern.examples import fsdp_qlora

        ex = fsdp_qlora.main(["--hidden", "64", "--layers", "2", "--steps", "4", "--out", f"{tmp}/example"])
        assert ex["losses"][-1] < ex["losses"][0] and os.path.isfile(f"{tmp}/example/delta.safetensors")
        report["example losses"] = ex["losses"]
        if rank == 0:
            with open(f"{tmp}/report.json", "w") as f:
                json.dump(report, f)
    finally:
        dist.destroy_process_group()


class _DDPLoss(torch.nn.Module):
    """A DDP-wrapped model seen through the interface the checks use (named_parameters without 'module.')."""

    def __init__(self, ddp):
        super().__init__()
        self.ddp = ddp

    def forward(self, **kw):
        return self.ddp(**kw)

    def named_parameters(self, *a, **kw):
        for n, p in self.ddp.module.named_parameters(*a, **kw):
            yield n, p


def test_fsdp_ddp_dcp_on_two_processes(tmp_path):
    """One spawn, many checks: see _worker."""
    torch.multiprocessing.spawn(_worker, args=(str(tmp_path),), nprocs=WORLD, join=True)
    report = json.loads((tmp_path / "report.json").read_text())
    print(report)


def test_fsdp_shards_at_world_8_on_the_fake_process_group():
    """FSDP2 at world 8 (fake collectives: shapes and bytes, not values): each rank holds 1/8 of the codes
    and scales plus the replicated tables, and a forward/backward runs."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from deltakern import distributed as dkd

    dist.init_process_group("fake", rank=3, world_size=8, store=FakeStore())
    try:
        model = llama(hidden_size=128, intermediate_size=320, num_attention_heads=4, num_key_value_heads=2)
        dk.quantize(model, progress=False)
        dk.apply(model, dk.LoRA(r=4))
        dkd.shard(model)
        b = dkd.nf4_bytes(model)
        layers = sum(isinstance(m, dk.nn.NF4Linear) for m in model.modules())
        assert b["sharded"] <= (b["total"] - b["replicated"]) / 8 + layers * 2 * 4, b
        assert b["sharded"] >= (b["total"] - b["replicated"]) / 8 - layers * 2 * 64, b  # really sharded
        ids, _ = batch(b=1, t=5, pad=False)
        model(input_ids=ids, labels=ids).loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    # The same checks on GPUs with NCCL (and the Triton kernels), one process per GPU:
    #     OUT=/tmp/out torchrun --nproc-per-node <gpus> tests/test_distributed.py
    # writes $OUT/report.json. With one GPU the world is 1: nothing is split, but every path runs.
    # Without a GPU the same command runs gloo on the CPU.
    out = os.environ.get("OUT", "/tmp")
    backend = os.environ.get("BACKEND", "nccl" if torch.cuda.is_available() else "gloo")
    _worker(int(os.environ["RANK"]), out, backend=backend, world=int(os.environ["WORLD_SIZE"]))
    if int(os.environ["RANK"]) == 0:
        print(open(os.path.join(out, "report.json")).read())
