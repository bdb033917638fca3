"""The accelerator chips scfm-jax knows: per-chip peak FLOP/s, HBM and HBM bandwidth, and which chip
a JAX device is.

The one home of these figures: the training log's MFU (`train.metrics.device_peak_flops`), the plan
(`scfm-jax plan`, `train --dry-run`) and the benchmarks read them here, so they cannot disagree on a
chip.
"""
import dataclasses

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    hbm_bytes: float          # HBM per chip
    peak_flops: float         # dense bf16 matmul FLOP/s per chip
    hbm_bandwidth: float      # bytes/s per chip
    source: str
    peak_flops_float32: float | None = None   # dense float32 matmul FLOP/s, where published


# Published per-chip figures (the vendors' system-architecture pages, read 2026-12).
TPUS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1200e9, "https://cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 819e9, "https://cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2765e9, "https://cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1638e9, "https://cloud.google.com/tpu/docs/v6e"),
}
# GPUs: SXM parts, dense bf16 (the data sheets quote twice that with 2:4 sparsity).
GPUS = {
    "nvidia h200": Chip("NVIDIA H200", 141e9, 989e12, 4.8e12,
                        "https://www.nvidia.com/en-us/data-center/h200/"),
    "nvidia h100": Chip("NVIDIA H100", 80e9, 989e12, 3.35e12,
                        "https://www.nvidia.com/en-us/data-center/h100/"),
    "nvidia a100": Chip("NVIDIA A100 80GB", 80e9, 312e12, 2.039e12,
                        "https://www.nvidia.com/en-us/data-center/a100/", peak_flops_float32=19.5e12),
}
# jax's `device_kind` of each chip, lower case (compile-only topology devices report the same):
# v5e reports "TPU v5 lite", v5p "TPU v5", v6e "TPU v6 lite".
DEVICE_KINDS = {"tpu v4": TPUS["v4"], "tpu v5 lite": TPUS["v5e"], "tpu v5e": TPUS["v5e"],
                "tpu v5p": TPUS["v5p"], "tpu v5": TPUS["v5p"], "tpu v6 lite": TPUS["v6e"],
                "tpu v6e": TPUS["v6e"], **GPUS}


def chip_of_kind(device_kind: str) -> Chip | None:
    """The chip of a `device_kind` string ("TPU v5 lite", "NVIDIA H100 80GB HBM3", ...); None for
    CPUs and unknown kinds. The longest matching prefix wins ("tpu v5 lite" before "tpu v5")."""
    kind = device_kind.lower()
    for prefix, chip in sorted(DEVICE_KINDS.items(), key=lambda item: -len(item[0])):
        if kind.startswith(prefix):
            return chip
    return None


def chip_of_devices(devices) -> Chip | None:
    """The published figures of these devices' chip; None for CPUs and unknown kinds."""
    return chip_of_kind(devices[0].device_kind)


def published_peak_flops(device_kind: str, dtype_name: str) -> float | None:
    """The data-sheet matmul peak of a device kind for `dtype_name` ("bfloat16", "float32"), or
    None when no figure is published here."""
    chip = chip_of_kind(device_kind)
    if chip is None:
        return None
    return {"bfloat16": chip.peak_flops, "float32": chip.peak_flops_float32}.get(dtype_name)
