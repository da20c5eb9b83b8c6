"""The choice of autocast precision: 'auto' follows the hardware, and impossible choices are explained.

Some tests need a CPU with bf16 instructions and others one without them. Those tests replace
torch's CPU feature checks by monkeypatch, and the rest run on the real machine.
"""

from __future__ import annotations

import logging

import pytest
import torch

from wartok_cli.errors import WartokError
from wartok_cli.precision import accelerator_device, native_bf16, resolve_mixed_precision

CPU = torch.device("cpu")


@pytest.fixture(params=[True, False], ids=["bf16-cpu", "avx2-cpu"])
def cpu_bf16(request, monkeypatch):
    """Make torch report a CPU with or without bf16 instructions; return whether it has them."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: request.param)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return request.param


def test_auto_follows_native_bf16(cpu_bf16):
    assert native_bf16(CPU) is cpu_bf16
    assert resolve_mixed_precision("auto", CPU, "pretrain.mixed_precision") == ("bf16" if cpu_bf16 else "no")


@pytest.mark.parametrize("requested", ["no", "bf16"])
def test_explicit_choice_kept(cpu_bf16, requested):
    assert resolve_mixed_precision(requested, CPU, "pretrain.mixed_precision") == requested


def test_emulated_bf16_warns(monkeypatch, caplog):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with caplog.at_level(logging.WARNING, logger="wartok"):
        resolve_mixed_precision("bf16", CPU, "wartok.mixed_precision")
    assert "wartok.mixed_precision is 'bf16'" in caplog.text
    assert "'auto' or 'no'" in caplog.text


def test_native_bf16_does_not_warn(monkeypatch, caplog):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    with caplog.at_level(logging.WARNING, logger="wartok"):
        resolve_mixed_precision("bf16", CPU, "wartok.mixed_precision")
    assert caplog.text == ""


def test_missing_private_check_means_no_bf16(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert resolve_mixed_precision("auto", CPU, "pretrain.mixed_precision") == "no"


def test_fp16_on_cpu_names_field():
    with pytest.raises(WartokError, match="train_prior.mixed_precision 'fp16' needs a GPU"):
        resolve_mixed_precision("fp16", CPU, "train_prior.mixed_precision")


@pytest.mark.parametrize(("use_cpu", "expected"), [("1", "cpu"), (None, "cuda")])
def test_accelerator_device_follows_accelerate(monkeypatch, use_cpu, expected):
    # This machine has no GPU, so torch.cuda.is_available is replaced to report one.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    if use_cpu:
        monkeypatch.setenv("ACCELERATE_USE_CPU", use_cpu)
    else:
        monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    assert accelerator_device().type == expected
