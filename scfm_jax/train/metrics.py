"""Training metrics: TensorBoard event files (tensorboardX, no TensorFlow), a JSON-lines log, and
the device peak FLOP/s that MFU is measured against (the data sheet's, from `train.chips`, or a
measured matmul for chips it does not know).

Only process 0 writes. A resumed run appends to the same files; readers keep the last record of a
step (`read_metrics`), since steps after the last checkpoint of a killed run are logged twice.
"""
import functools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from scfm_jax.train import chips


class MetricsWriter:
    def __init__(self, workdir: str | Path, enabled: bool = True, purge_step: int | None = None):
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self._tensorboard = None
        if enabled:
            from tensorboardX import SummaryWriter
            # purge_step: TensorBoard hides the events a killed run logged after this step
            self._tensorboard = SummaryWriter(str(Path(workdir) / "tensorboard"),
                                              purge_step=purge_step or None)
            self._file = open(self.path, "a", encoding="utf-8")

    def write(self, step: int, scalars: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        values = {f"{prefix}/{name}": float(value) for name, value in scalars.items()}
        for name, value in values.items():
            self._tensorboard.add_scalar(name, value, step)
        self._file.write(json.dumps({"step": int(step), "time": time.time(), **values}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self.enabled:
            self._tensorboard.close()
            self._file.close()


def read_metrics(workdir: str | Path) -> dict[int, dict]:
    """step -> merged metrics of a workdir's JSON-lines log (later records win)."""
    records: dict[int, dict] = {}
    path = Path(workdir) / "metrics.jsonl"
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                records.setdefault(record["step"], {}).update(record)
    return dict(sorted(records.items()))


def measure_matmul_peak(dtype=jnp.float32, size: int = 2048, repeats: int = 5,
                        device=None) -> float:
    """FLOP/s of a large square matmul on one device: the practical peak MFU is measured against."""
    device = device or jax.local_devices()[0]
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * size ** 3 / best


@functools.lru_cache(maxsize=None)
def device_peak_flops(dtype_name: str) -> tuple[float, str]:
    """(peak FLOP/s per device, where the number comes from) for the first local device."""
    peak = chips.published_peak_flops(jax.local_devices()[0].device_kind, dtype_name)
    if peak is not None:
        return peak, "data sheet"
    return measure_matmul_peak(jnp.dtype(dtype_name)), "measured matmul"


def plot_loss_curves(workdir: str | Path, output: str | Path, baseline: float | None = None) -> Path:
    """A PNG of train and eval loss against step, with an optional baseline line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(workdir)
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for key, label in (("train/loss", "train (masked MSE)"), ("eval/loss", "held-out (masked MSE)")):
        points = [(step, r[key]) for step, r in records.items() if key in r]
        if points:
            steps, values = np.asarray(points).T
            ax.plot(steps, values, marker="o" if key.startswith("eval") else None,
                    markersize=3, label=label)
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle="--", label="per-gene-mean baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("masked MSE")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    output = Path(output)
    fig.savefig(output)
    plt.close(fig)
    return output
