"""One chip table: the training log's MFU peak and the plan read the same figures for every device
kind jax reports, TPU and GPU."""
import types

import jax
import pytest

from scfm_jax.train import chips, metrics

KINDS = {  # device_kind as jax reports it -> the chip it is
    "TPU v4": "TPU v4", "TPU v5 lite": "TPU v5e", "TPU v5e": "TPU v5e", "TPU v5": "TPU v5p",
    "TPU v5p": "TPU v5p", "TPU v6 lite": "TPU v6e", "TPU v6e": "TPU v6e",
    "NVIDIA H100 80GB HBM3": "NVIDIA H100", "NVIDIA H200": "NVIDIA H200",
    "NVIDIA A100-SXM4-80GB": "NVIDIA A100 80GB",
}


@pytest.mark.parametrize("kind, chip_name", sorted(KINDS.items()))
def test_log_mfu_and_plan_use_the_same_peak(kind, chip_name, monkeypatch):
    device = types.SimpleNamespace(device_kind=kind, platform="tpu")
    monkeypatch.setattr(jax, "local_devices", lambda *a, **k: [device])
    metrics.device_peak_flops.cache_clear()
    try:
        log_peak, source = metrics.device_peak_flops("bfloat16")
    finally:
        metrics.device_peak_flops.cache_clear()
    plan_chip = chips.chip_of_devices([device])   # what `train --dry-run` and the plan print
    assert plan_chip is not None and plan_chip.name == chip_name
    assert (log_peak, source) == (plan_chip.peak_flops, "data sheet")


def test_v5_lite_is_not_mistaken_for_v5p():
    assert chips.chip_of_kind("TPU v5 lite").peak_flops == 197e12
    assert chips.chip_of_kind("TPU v5").peak_flops == 459e12


def test_unknown_devices_have_no_published_peak():
    assert chips.chip_of_kind("cpu") is None
    assert chips.published_peak_flops("cpu", "bfloat16") is None
    assert chips.published_peak_flops("NVIDIA H100", "float32") is None  # measured instead
    assert chips.published_peak_flops("NVIDIA A100-SXM4-80GB", "float32") == 19.5e12
