"""`autocast_off(device_type)`: the deltakern ops compute in their inputs' dtypes, whatever autocast says."""

import contextlib

import torch

_NULL = contextlib.nullcontext()


def autocast_off(device_type: str):
    """`torch.autocast(device_type, enabled=False)` when autocast is on for that device type, else a
    no-op context: entering a real autocast context costs ~10 us, several times per layer and step."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else _NULL
