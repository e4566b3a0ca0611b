"""torch.library registrations: every deltakern kernel is a `torch.ops.deltakern.*` op with a
pure-torch CPU kernel (the reference), a CUDA kernel (Triton or CUDA C++) and a fake kernel."""
