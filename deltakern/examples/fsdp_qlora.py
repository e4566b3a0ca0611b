"""QLoRA with FSDP2 on several processes: the NF4 base sharded by plain `fully_shard`.

    torchrun --nproc-per-node 2 -m deltakern.examples.fsdp_qlora            # CPU: gloo
    torchrun --nproc-per-node 8 -m deltakern.examples.fsdp_qlora --bf16     # GPUs: NCCL, bf16 compute
    python -m deltakern.examples.fsdp_qlora                                 # one process (nothing split)

The low-memory path, step by step:
1. every rank builds the model on the meta device (no memory) and `deltakern.quantize` turns its
   linear layers into empty NF4 layers; LoRA is applied; the model is sharded (`fully_shard` per
   decoder layer, then the root) and `to_empty` allocates each rank's shards only;
2. rank 0 alone builds the real model, quantizes it (the checkpoint here is a random tiny Llama; with
   a real one it is the bitsandbytes state dict from disk) and `set_model_state_dict(...,
   broadcast_from_rank0=True)` sends each rank its shards;
3. the LoRA parameters train with AdamW on a toy task (repeat a random token sequence), and the delta
   is saved from the live shards (rank 0 writes).
It prints each rank's bytes of the 4-bit base (its shards plus the replicated tables), the loss, and
where the delta went.
"""

from __future__ import annotations

import argparse
import os

import torch


def _config(hidden: int, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                       num_attention_heads=max(hidden // 64, 2), num_key_value_heads=max(hidden // 128, 1),
                       vocab_size=256, max_position_embeddings=128)


def _build(config, device, seed: int = 0):
    """Llama -> NF4 (lm_head stays dense) -> LoRA on every other linear. On the meta device: no memory."""
    from transformers import LlamaForCausalLM

    import deltakern as dk

    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    dk.quantize(model, progress=False)
    dk.apply(model, dk.LoRA(r=8, alpha=16))
    return model


def main(argv=None) -> dict:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import MixedPrecisionPolicy

    import deltakern as dk
    from deltakern import distributed as dkd

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--bf16", action="store_true", help="mixed precision: compute in bf16 (the 4-bit base is unchanged)")
    p.add_argument("--out", default="fsdp_qlora_delta", help="directory for the saved delta")
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    own_group = not dist.is_initialized()
    if own_group:
        if "MASTER_ADDR" in os.environ:  # torchrun
            dist.init_process_group("nccl" if cuda else "gloo")
        else:  # plain `python -m`: one process
            import tempfile

            init = f"file://{tempfile.mkdtemp()}/pg"
            dist.init_process_group("nccl" if cuda else "gloo", init_method=init, rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        config = _config(args.hidden, args.layers)
        model = _build(config, "meta")
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 else None
        dkd.shard(model, mp_policy=mp)
        model.to_empty(device=device)
        with torch.no_grad():  # non-persistent buffers (the rotary table) are computed, never loaded
            rotary = type(model.model.rotary_emb)(config=config).to(device)
            for name, buf in rotary.named_buffers():
                model.model.rotary_emb.get_buffer(name).copy_(buf)
        full = _build(config, "cpu").state_dict() if rank == 0 else {}
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full

        b = dkd.nf4_bytes(model)
        print(f"[rank {rank}/{world}] NF4 base on this rank: {b['sharded'] / 2**10:.1f} KiB of shards + "
              f"{b['replicated'] / 2**10:.1f} KiB of replicated tables (the whole base: {b['total'] / 2**10:.1f} KiB)",
              flush=True)

        g = torch.Generator().manual_seed(1000 + rank)  # each rank its own data
        pattern = torch.randint(0, config.vocab_size, (8, 16), generator=g)
        ids = pattern.repeat(1, 2).to(device)  # learn to repeat the first half
        opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=3e-3)
        model.train()
        losses = []
        for step in range(args.steps):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            avg = loss.detach().clone()
            dist.all_reduce(avg)
            losses.append(avg.item() / world)
            if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
                print(f"step {step:3d}  loss {losses[-1]:.4f}", flush=True)
        path = dk.save_delta(model, args.out)
        if rank == 0:
            print(f"saved the LoRA delta to {os.path.abspath(path)}", flush=True)
        return {"losses": losses, "nf4_bytes": b, "path": str(path)}
    finally:
        if own_group:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
