"""scFoundation 100M inference speed and memory on this machine (prints tables; not a test).

    python benchmarks/bench_model.py [--cells 4] [--expressed 1100] [--repeats 3]

The released architecture (configs/scfoundation_100m.py, float32 compute, random weights) on
synthetic cells with about 1,100 expressed genes, through the public path
(`analysis.scfoundation_inference`): cell embeddings (encoder only) and the full forward over all
19,266 positions (predicted expression). Reports wall time (best of --repeats, after a compile
run), the executable's memory (XLA's buffer assignment: arguments + outputs + temporaries) and the
process's peak RSS, useful FLOPs per cell (analytic, at each cell's own length, no padding) and
XLA's count for the executed (padded) program, and MFU against a float32 matmul peak measured in
the same run. Then the memory of one decoder layer for 2k-19,266 genes, performer vs exact
dot-product attention (compiled only; the quadratic ones would not fit).

The peer runs in the same process on the same weights and cells: the PyTorch reference
(`benchmarks/torch_reference`, checked against the original code's fixtures) doing what the
official `get_embedding.py` does, one cell per forward (`--output_type cell`, and
`gene_expression` for the full forward), with `torch.set_num_threads` = the cores JAX uses
(`--reference-threads`), best of --reference-repeats after one untimed run. Its outputs are
compared with ours (max abs difference printed). Needs torch; without it the peer is skipped.

`--attention` prints instead the encoder table of issue 12: one cell of the 100M encoder with 1k to
19,264 expressed genes, today's [L, L] softmax (`model.attention_impl="xla"`) against the
memory-linear path (`"auto"`, blockwise on CPU), side by side: XLA temporaries of the forward and
of its gradient (compiled only) and the forward's time where its temporaries fit in --max-gb.
With `--official-code DIR` (the `model/` folder of a clone of biomap-research/scFoundation, with
einops and local-attention installed) the table adds the official code's peak RSS: its own
`select_model` builds the 100M architecture (random weights) and its modules embed one cell as
`get_embedding.py --output_type cell` does (`load.gatherData`, `token_emb` + `pos_emb`, `encoder`,
under `torch.no_grad`, on the CPU). Without it the PyTorch reference (`torch_reference`, the same
`nn.TransformerEncoderLayer` encoder) stands in, and the header says so. Each size runs in a fresh
process with its address space capped at --reference-max-gb; the column is the rise of peak RSS
over the process with weights and input ready, or "out of memory".
`--attention --train-step` adds the XLA memory plan of one full 100M train step (configs/
scfoundation_100m.py: bfloat16, remat "dots") on one cell with every gene expressed, compiled only.
"""
import argparse
import dataclasses
import os
import resource
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
from flax import nnx

from scfm_jax.analysis import scfoundation_inference as inference
from scfm_jax.configs import scfoundation_100m
from scfm_jax.data import host_ops
from scfm_jax.models import performer
from scfm_jax.models.scfoundation import PerformerLayer, ScFoundation, ScFoundationConfig

jax.config.update("jax_default_matmul_precision", "highest")


def matmul_peak(size: int = 2048, repeats: int = 5) -> float:
    """Best float32 matmul FLOP/s of this process's devices."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    matmul = jax.jit(lambda a, b: a @ b)
    matmul(a, b).block_until_ready()
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def synthetic_counts(cells: int, expressed: int, num_genes: int, seed: int = 0) -> sp.csr_matrix:
    """Cells with expressed +-5% genes each, at most every gene of the vocabulary."""
    if not 1 <= expressed <= num_genes:
        raise SystemExit(f"--expressed must be in [1, {num_genes}] (the vocabulary), got {expressed}")
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(cells):
        n = min(int(rng.integers(int(expressed * 0.95), int(expressed * 1.05))), num_genes)
        row = np.zeros(num_genes, np.float32)
        row[rng.choice(num_genes, n, replace=False)] = rng.negative_binomial(1, 0.3, n) + 1
        rows.append(row)
    return sp.csr_matrix(np.stack(rows))


def encoder_flops(config, tokens: int) -> float:
    enc = config.encoder
    per_layer = tokens * (2 * 4 * enc.width**2 + 2 * 2 * enc.width * enc.mlp_dim)
    per_layer += 2 * 2 * tokens**2 * enc.width  # QK^T and AV
    embed = tokens * 2 * (config.bin_num + config.bin_num**2 + config.bin_num * enc.width)
    return enc.depth * per_layer + embed


def decoder_flops(config) -> float:
    enc, dec = config.encoder, config.decoder
    length = config.num_genes + 2
    inner = dec.heads * dec.head_dim
    features = performer.num_random_features(dec.head_dim, dec.num_features)
    per_token = (2 * 4 * dec.width * inner + 2 * 2 * dec.width * dec.mlp_dim
                 + 4 * 2 * dec.heads * features * dec.head_dim)  # q, k features; kv; output
    embed = 2 * (config.bin_num + config.bin_num**2 + config.bin_num * enc.width)
    return length * (dec.depth * per_token + embed + 2 * enc.width * dec.width + 2 * dec.width)


def executable_stats(output: str, model, counts, batch_size: int):
    """(XLA memory bytes, XLA FLOPs per call) of the executable the public path runs."""
    csr, totals, prepared = inference.prepare(counts, model.num_genes)
    tgthighres = prepared.pop("tgthighres") or "t4"
    _, batch, padded = next(inference._batches(csr, model.num_genes, batch_size, False))
    batch["total_counts"] = totals[padded].astype(np.float32)
    graphdef, state = nnx.split(model)
    compiled = inference._forward.lower(
        graphdef, state, batch, output=output, num_genes=model.num_genes, tgthighres=tgthighres,
        pool="all", stabilizer_scope=None, **prepared).compile()
    memory = compiled.memory_analysis()
    total = (memory.argument_size_in_bytes + memory.output_size_in_bytes
             + memory.temp_size_in_bytes - memory.alias_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return total, float(cost.get("flops", 0.0))


def timed(fn, repeats: int) -> tuple[float, object]:
    """(best wall time of `repeats` calls after a first untimed one, the last result)."""
    fn()  # compile (JAX) / first-call allocations (torch)
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, np.asarray(result)


def reference_rows(model, counts, repeats: int, threads: int, ours: dict):
    """The PyTorch reference's one-cell-per-pass runs of the same paths, or None without torch."""
    try:
        import torch
    except ImportError:
        return None
    from torch_reference import scfoundation as reference

    torch.set_num_threads(threads)
    peer = reference.MaeAutobin.from_scfm_jax(model)
    rows = []
    for name, output_type in (("cell embeddings", "cell"),
                              ("full forward (19,266)", "gene_expression")):
        seconds, result = timed(
            lambda: reference.get_embedding(peer, counts, output_type=output_type), repeats)
        rows.append((name, seconds, float(np.abs(result - ours[name]).max())))
    return rows, f"torch {torch.__version__}, {torch.get_num_threads()} threads"


def layer_memory(config, genes: int, attention: str) -> float:
    dec = config.decoder
    decoder = ScFoundationConfig.from_config(config).decoder
    layer = nnx.eval_shape(lambda: PerformerLayer(
        dataclasses.replace(decoder, attention=attention), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(layer)
    x = jax.ShapeDtypeStruct((1, genes, dec.width), jnp.float32)
    compiled = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x)).lower(state, x).compile()
    memory = compiled.memory_analysis()
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes
            + memory.temp_size_in_bytes - memory.alias_size_in_bytes)


ATTENTION_SIZES = (1_000, 2_000, 5_000, 10_000, 19_264)


def encoder_attention_table(sizes, repeats: int, max_gb: float,
                            reference: dict[int, str] | None = None,
                            reference_name: str = "") -> None:
    """Encoder memory and time against expressed genes, today's softmax vs the linear path, and
    the PyTorch reference's peak RSS rise where measured (`reference_rss_column`)."""
    config = scfoundation_100m.get_config().model
    config.dtype = "float32"
    impls = ("xla", "auto")
    graphdefs = {}
    for impl in impls:
        config.attention_impl = impl
        graphdefs[impl] = nnx.split(nnx.eval_shape(
            lambda: ScFoundation(config, rngs=nnx.Rngs(0))))[0]
    state = nnx.split(ScFoundation(config, rngs=nnx.Rngs(0)))[1]

    def encode(graphdef, state, values, ids, mask):
        return nnx.merge(graphdef, state).encode(values, ids, mask)

    def loss(graphdef, state, values, ids, mask):
        return jnp.sum(jnp.square(encode(graphdef, state, values, ids, mask)))

    print(f"100M encoder ({config.encoder.depth} layers, width {config.encoder.width}, "
          f"{config.encoder.heads} heads), one cell, float32; GB are XLA temporaries; time is the "
          f"forward, best of {repeats}, where its temporaries are under {max_gb} GB")
    header = f"{'genes':>7}" + "".join(f"{impl + ' fwd GB':>14}{impl + ' grad GB':>15}"
                                       f"{impl + ' s':>10}" for impl in impls)
    if reference:
        header += f"   {reference_name}: peak RSS rise, time"
    print(header)
    print("-" * len(header))
    for genes in sizes:
        tokens = genes + 2  # the expressed genes and the depth tokens T, S
        rng = np.random.default_rng(genes)
        values = jnp.asarray(rng.uniform(0.1, 5.0, (1, tokens)), jnp.float32)
        ids = jnp.asarray(rng.permutation(config.num_genes + 2)[None, :tokens], jnp.int32)
        mask = jnp.zeros((1, tokens), bool)
        cells = []
        for impl in impls:
            graphdef = graphdefs[impl]
            forward = jax.jit(encode, static_argnums=0).lower(graphdef, state, values, ids,
                                                              mask).compile()
            gradient = jax.jit(jax.grad(loss, argnums=1), static_argnums=0).lower(
                graphdef, state, values, ids, mask).compile()
            forward_gb = forward.memory_analysis().temp_size_in_bytes / 1e9
            grad_gb = gradient.memory_analysis().temp_size_in_bytes / 1e9
            seconds = (timed(lambda: forward(state, values, ids, mask).block_until_ready(),
                             repeats)[0] if forward_gb <= max_gb else float("nan"))
            cells.append(f"{forward_gb:>14.2f}{grad_gb:>15.2f}{seconds:>10.2f}")
        if reference:
            cells.append("   " + reference.get(genes, "-"))
        print(f"{genes:>7}" + "".join(cells), flush=True)


def _official_cell_embedding(code_dir: str, config):
    """The official code's `get_embedding.py --output_type cell` steps for one raw count row, with
    its own modules (`select_model`, `load.gatherData`) on the CPU: (embed(counts), model)."""
    import sys

    import torch
    sys.path.insert(0, str(Path(code_dir).absolute()))
    import load as official_load   # the official model/load.py
    from pretrainmodels.select_model import select_model

    enc, dec = config.encoder, config.decoder
    model = select_model({
        "model": "mae_autobin", "seq_len": config.num_genes + 2, "n_class": 104,
        "bin_alpha": 1.0, "bin_num": config.bin_num, "pad_token_id": 103, "mask_token_id": 102,
        "encoder": {"hidden_dim": enc.width, "depth": enc.depth, "heads": enc.heads,
                    "dim_head": enc.width // enc.heads, "module_type": "transformer"},
        "decoder": {"hidden_dim": dec.width, "depth": dec.depth, "heads": dec.heads,
                    "dim_head": dec.head_dim, "module_type": "performer"}}).eval()

    @torch.no_grad()
    def embed(counts):
        total = counts.sum()
        row = np.log1p(counts / total * 1e4).tolist() + [4.0, np.log10(total)]   # tgthighres t4
        x = torch.tensor(row).unsqueeze(0)
        gene_ids = torch.arange(x.shape[1]).repeat(1, 1)
        values, padding = official_load.gatherData(x, x > 0, 103)
        positions, _ = official_load.gatherData(gene_ids, x > 0, 103)
        h = model.token_emb(torch.unsqueeze(values, 2).float(), output_weight=0)
        h += model.pos_emb(positions)
        genes = model.encoder(h, padding)
        return torch.cat([genes[:, -1], genes[:, -2], genes[:, :-2].max(1).values,
                          genes[:, :-2].mean(1)], 1).numpy()

    return embed, model


def reference_encoder_rss(genes: int, official_code: str | None = None) -> dict:
    """In this (fresh) process: one cell expressing `genes` genes embedded as `get_embedding.py
    --output_type cell` does, by the official code (`official_code`) or the PyTorch reference,
    100M architecture, random weights: peak RSS before and after the forward, and its time."""
    import torch

    config = scfoundation_100m.get_config().model
    torch.manual_seed(0)
    if official_code:
        embed, _ = _official_cell_embedding(official_code, config)
    else:
        from torch_reference import scfoundation as reference
        peer = reference.MaeAutobin(
            num_genes=config.num_genes, bin_num=config.bin_num, bin_alpha=1.0, mask_value=102.0,
            pad_value=103.0, encoder=dict(config.encoder),
            decoder=dict(width=config.decoder.width, depth=config.decoder.depth,
                         heads=config.decoder.heads, head_dim=config.decoder.head_dim,
                         mlp_dim=config.decoder.mlp_dim,
                         features=performer.num_random_features(
                             config.decoder.head_dim, config.decoder.num_features))).eval()

        def embed(counts):
            return reference.get_embedding(peer, counts[None], output_type="cell")
    rng = np.random.default_rng(genes)
    counts = np.zeros(config.num_genes, np.float64)
    counts[rng.choice(config.num_genes, genes, replace=False)] = rng.integers(1, 30, genes)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    try:
        out = embed(counts)
    except (RuntimeError, MemoryError) as error:   # the address-space cap: torch cannot allocate
        return {"before": before, "error": type(error).__name__}
    seconds = time.perf_counter() - start
    return {"before": before, "seconds": seconds, "width": int(out.shape[-1]),
            "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def reference_rss_column(sizes, max_gb: float, threads: int,
                         official_code: str | None = None) -> dict[int, str]:
    """genes -> the official code's (or the reference's) peak RSS rise (GB) and time, each size in
    a fresh process."""
    import json
    import subprocess
    import sys

    cells = {}
    for genes in sizes:
        child = subprocess.run(
            [sys.executable, __file__, "--reference-encoder-rss", str(genes),
             "--reference-threads", str(threads), "--reference-max-gb", str(max_gb),
             *(["--official-code", official_code] if official_code else [])],
            capture_output=True, text=True)
        if child.returncode != 0 or not child.stdout.strip():
            tail = (child.stderr.strip().splitlines() or ["no output"])[-1]
            cells[genes] = f"failed (exit {child.returncode}: {tail[:60]})"
            continue
        result = json.loads(child.stdout.strip().splitlines()[-1])
        cells[genes] = (f"out of memory (>{max_gb:g} GB)" if "error" in result else
                        f"{(result['peak'] - result['before']) / 1e9:.2f} GB, "
                        f"{result['seconds']:.2f} s")
    return cells


def train_step_memory(impls=("xla", "auto"), genes: int = 19_264) -> None:
    """XLA memory of one compiled (not run) 100M train step on a cell expressing `genes` genes."""
    from scfm_jax.train import partitioning
    from scfm_jax.train.trainer import Trainer
    from scfm_jax.objectives import get_objective

    print(f"\n100M train step, one cell, {genes:,} expressed genes (compiled only)")
    print(f"{'attention_impl':<16}{'XLA temp GB':>12}{'arguments GB':>14}")
    for impl in impls:
        config = scfoundation_100m.get_config()
        config.model.attention_impl = impl
        config.data.update(global_batch_size=1, buckets=(genes,), max_nonzero=genes)
        config.train.grad_accum_steps = 1
        config.mesh.update(data=1, fsdp=1, tensor=1)
        mesh = partitioning.make_mesh(config.mesh, devices=jax.devices()[:1])
        trainer = Trainer(config, get_objective("scfoundation"), mesh)
        batch = {name: jax.ShapeDtypeStruct(shape, dtype,
                                            sharding=partitioning.batch_sharding(mesh, len(shape),
                                                                              trainer.rules))
                 for name, shape, dtype in (("gene_ids", (1, genes), jnp.int32),
                                            ("counts", (1, genes), jnp.float32),
                                            ("total_counts", (1,), jnp.float32),
                                            ("num_nonzero", (1,), jnp.int32))}
        memory = trainer.compile_train_step(trainer.abstract_sharded_state(),
                                             batch).memory_analysis()
        print(f"{impl:<16}{memory.temp_size_in_bytes / 1e9:>12.2f}"
              f"{memory.argument_size_in_bytes / 1e9:>14.2f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=4)
    parser.add_argument("--expressed", type=int, default=1100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--reference-repeats", type=int, default=1,
                        help="timed repeats of the PyTorch reference (0: skip it)")
    parser.add_argument("--reference-threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch.set_num_threads (default: the cores JAX uses)")
    parser.add_argument("--attention", action="store_true",
                        help="print the encoder attention table (issue 12) instead")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(ATTENTION_SIZES),
                        help="expressed genes per cell for --attention")
    parser.add_argument("--max-gb", type=float, default=4.0,
                        help="--attention times a forward only when its temporaries fit in this")
    parser.add_argument("--train-step", action="store_true",
                        help="with --attention: also the 100M train step's memory at 19,264 genes")
    parser.add_argument("--reference-max-gb", type=float, default=16.0,
                        help="--attention: address-space cap of each PyTorch reference process")
    parser.add_argument("--official-code", default=None,
                        help="--attention: the model/ folder of a biomap-research/scFoundation "
                             "clone, whose own code then gives the peak RSS column")
    parser.add_argument("--reference-encoder-rss", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.reference_encoder_rss:   # the child of reference_rss_column
        import json

        import torch
        torch.set_num_threads(args.reference_threads)
        cap = int(args.reference_max_gb * 1e9)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        print(json.dumps(reference_encoder_rss(args.reference_encoder_rss, args.official_code)))
        return
    if args.attention:
        reference, name = None, ""
        if args.reference_repeats > 0:
            try:
                import torch  # noqa: F401
                reference = reference_rss_column(args.sizes, args.reference_max_gb,
                                                 args.reference_threads, args.official_code)
                name = ("official code" if args.official_code else
                        "PyTorch reference (standing in for the official code)")
            except ImportError:
                print("torch is not installed: no PyTorch column")
        encoder_attention_table(args.sizes, args.repeats, args.max_gb, reference, name)
        if args.train_step:
            train_step_memory()
        return

    config = scfoundation_100m.get_config().model
    config.dtype = "float32"
    device = jax.devices()[0]
    print(f"device: {device.platform} {device.device_kind}, {os.cpu_count()} CPU cores visible, "
          f"load average {os.getloadavg()[0]:.1f} at start")
    if device.platform == "cpu":
        print("note: this CPU has 2 cores shared with other agents' processes right now; timings "
              "and the peak are noisy and both drop when others compute")
    peak = matmul_peak()
    print(f"float32 matmul peak (2048^3, best of 5): {peak / 1e9:.1f} GFLOP/s\n")

    model = ScFoundation(config, rngs=nnx.Rngs(0))
    counts = synthetic_counts(args.cells, args.expressed, config.num_genes)
    expressed = np.diff(counts.indptr)
    tokens = expressed + 2
    cells = args.cells
    cell_flops = sum(encoder_flops(config, int(n)) for n in tokens)
    full_flops = cell_flops + cells * decoder_flops(config)
    runs = [("cell embeddings", "cell", inference.cell_embeddings, cells, cell_flops),
            ("full forward (19,266)", "expression", inference.predicted_expression, 1, full_flops)]
    rows, outputs = [], {}
    for name, output, function, batch_size, flops in runs:
        seconds, outputs[name] = timed(
            lambda: function(model, counts, batch_size=batch_size, progress=False), args.repeats)
        memory, xla = executable_stats(output, model, counts, batch_size)
        rows.append((name, batch_size, seconds, memory, flops, xla / batch_size))
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    peer = (reference_rows(model, counts, args.reference_repeats, args.reference_threads, outputs)
            if args.reference_repeats else None)

    print(f"{cells} cells, {expressed.min()}-{expressed.max()} expressed genes "
          f"(encoder bucket {host_ops.bucket_length(int(expressed.max()) + 2, config.num_genes)}"
          f" tokens), float32, best of {args.repeats}; time and FLOP/s are for all {cells} cells")
    header = (f"{'path':<24}{'batch':>6}{'time s':>9}{'XLA mem GB':>12}{'GFLOP/cell':>12}"
              f"{'XLA GFLOP/cell':>16}{'GFLOP/s':>10}{'MFU':>7}")
    print(header)
    print("-" * len(header))
    peak_after = matmul_peak()
    print(f"float32 matmul peak again after the runs: {peak_after / 1e9:.1f} GFLOP/s; MFU uses "
          f"the higher of the two")
    peak = max(peak, peak_after)
    for name, batch_size, seconds, memory, flops, xla in rows:
        rate = flops / seconds
        print(f"{name:<24}{batch_size:>6}{seconds:>9.2f}{memory / 1e9:>12.2f}"
              f"{flops / cells / 1e9:>12.1f}{xla / 1e9:>16.1f}{rate / 1e9:>10.1f}{rate / peak:>7.0%}")
    print(f"process peak RSS (JAX runs, incl. compilers; before the PyTorch reference): "
          f"{peak_rss:.2f} GB")
    if peer is None:
        print("PyTorch reference skipped" + ("" if not args.reference_repeats else
                                             ": torch is not installed (pip install torch)"))
    else:
        peer_rows, settings = peer
        print(f"\nPyTorch reference, same weights and cells, one cell per forward as the official "
              f"get_embedding.py ({settings}; best of {args.reference_repeats}):")
        print(f"{'path':<24}{'time s':>9}{'GFLOP/s':>10}{'MFU':>7}{'ours x faster':>15}"
              f"{'max abs diff':>14}")
        for (name, seconds, difference), row in zip(peer_rows, rows):
            rate = row[4] / seconds
            print(f"{name:<24}{seconds:>9.2f}{rate / 1e9:>10.1f}{rate / peak:>7.0%}"
                  f"{seconds / row[2]:>14.2f}x{difference:>14.1e}")
    print(f"load average {os.getloadavg()[0]:.1f} at the end\n")

    print("one decoder layer (width 512, 8 heads x 64), one cell, XLA memory in MB")
    print(f"{'genes':>8}{'performer':>12}{'dot-product':>14}")
    for genes in (2_000, 5_000, 10_000, 19_266):
        print(f"{genes:>8}{layer_memory(config, genes, 'performer') / 1e6:>12.1f}"
              f"{layer_memory(config, genes, 'dot_product') / 1e6:>14.1f}")


if __name__ == "__main__":
    main()
