"""Choosing the autocast precision that the hardware runs fast.

bf16 autocast shortens steps on GPUs and on CPUs with bf16 instructions (AVX512-BF16 or AMX).
A CPU without them emulates bf16. On a 2-core AVX2 machine a quickstart step then took about
10 times longer than in fp32 (docs/BENCHMARKS.md), so 'auto' picks bf16 only where it is native.
"""

from __future__ import annotations

import logging

import torch
from accelerate.utils import parse_flag_from_env

from wartok_cli.errors import WartokError

log = logging.getLogger("wartok")


def accelerator_device() -> torch.device:
    """Return the kind of device that Accelerate will train on in this process, without initialising it.

    Creating Accelerate's state here, before the Accelerator, would fix its settings too early, so
    this repeats Accelerate's rule for the two devices wartok runs on: the GPU unless there is none
    or ACCELERATE_USE_CPU is set.
    """
    if torch.cuda.is_available() and not parse_flag_from_env("ACCELERATE_USE_CPU"):
        return torch.device("cuda")
    return torch.device("cpu")


def native_bf16(device: torch.device) -> bool:
    """Return whether the device computes in bf16 natively, rather than by emulation."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        # NOTE: torch.cpu._is_avx512_bf16_supported and _is_amx_tile_supported are private (torch 2.14);
        # where they are missing, the CPU counts as having no native bf16, so 'auto' chooses fp32.
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def resolve_mixed_precision(requested: str, device: torch.device, field: str) -> str:
    """Return the Accelerate mixed-precision value for a recipe's setting on this device.

    'auto' becomes 'bf16' where bf16 is native and 'no' elsewhere. 'fp16' off a GPU is an error,
    and 'bf16' on a CPU that emulates it runs with a warning.
    """
    if requested == "auto":
        return "bf16" if native_bf16(device) else "no"
    if requested == "fp16" and device.type != "cuda":
        raise WartokError(
            f"{field} 'fp16' needs a GPU; on the CPU it would silently run in fp32. Use 'auto', 'bf16' or 'no'."
        )
    if requested == "bf16" and device.type == "cpu" and not native_bf16(device):
        log.warning("%s is 'bf16', but this CPU has no bf16 instructions (AVX512-BF16 or AMX), so bf16 is "
                    "emulated and steps run several times slower than in fp32. Set %s to 'auto' or 'no'.",
                    field, field)  # fmt: skip
    return requested
