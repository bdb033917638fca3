"""What the perturbation task takes from the foundation models: gene tables and the frozen
decoder gene embeddings of the control cells.

The control cells' decoder embeddings ([cells, vocabulary genes, decoder width] per batch) are
computed once, data-parallel over `jax.devices()` (the batch sharded, the weights replicated), in
the model's compute dtype, and only the rows of the measured and the perturbed genes leave the
jitted forward. The GEARS head then reads them from this cache at every step; the FM never runs
during training.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from scfm_jax.analysis.embedding import model_and_vocabulary
from scfm_jax.analysis.loading import LoadedModel
from scfm_jax.analysis.scfoundation_inference import prepare
from scfm_jax.data.host_ops import bucket_length, padded_csr_rows
from scfm_jax.data.vocabulary import align_genes
from scfm_jax.errors import InputError
from scfm_jax.objectives.scfoundation import inference_inputs
from scfm_jax.tasks.perturbation_predictors import GeneTable

# scFoundation-GEARS appends T = S = log10(total count): the `f1` target (total * 1).
TARGET_DEPTH = "f1"


def checkpoint_label(loaded: LoadedModel) -> str:
    """How a result row names the checkpoint it came from."""
    return loaded.source + (f"[{loaded.key}]" if loaded.key else "") + (
        f"@{loaded.step}" if loaded.step is not None else "")


def require_genes(genes, symbols, label: str) -> None:
    """One-line error when a perturbed gene is not in a model's vocabulary."""
    known = set(symbols)
    absent = [g for g in genes if g not in known]
    if absent:
        raise InputError(f"perturbed gene {absent[0]!r} is not in the vocabulary of {label} "
                         f"({len(absent)} of {len(genes)} perturbed genes are absent: "
                         f"{', '.join(absent[:5])}); drop those conditions or give a checkpoint "
                         "whose vocabulary has them")


def scfoundation_token_table(loaded: LoadedModel) -> GeneTable:
    """scFoundation's static gene token table (`pos_emb`, one row per vocabulary gene)."""
    model, vocabulary = model_and_vocabulary(loaded, None)
    table = np.asarray(model.pos_emb.embedding[...], np.float32)[:model.num_genes]
    return GeneTable("scfoundation_tokens", vocabulary.symbols, table, checkpoint_label(loaded))


def scmulan_token_table(loaded: LoadedModel, vocabulary_folder: str | Path | None) -> GeneTable:
    """scMulan's token embedding rows (`wte`) of its gene tokens. `vocabulary_folder` holds
    token_set.tsv, gene_set.txt and meta_categories.json (default: beside the checkpoint)."""
    from scfm_jax.data.cell_sentence import TokenSet

    if loaded.kind != "scmulan":
        raise InputError(f"{loaded.source} holds a {loaded.kind} model, not scMulan")
    folder = Path(vocabulary_folder) if vocabulary_folder else Path(loaded.source).parent
    token_set = TokenSet.from_folder(folder)
    table = np.asarray(loaded.model.wte[...], np.float32)
    if table.shape[0] != len(token_set):
        raise InputError(f"the scMulan checkpoint has {table.shape[0]} tokens but {folder} has "
                         f"{len(token_set)}; give the token set it was trained with")
    return GeneTable("scmulan_tokens", token_set.genes, table[token_set.gene_ids],
                     checkpoint_label(loaded))


@dataclasses.dataclass
class ControlEmbeddings:
    """Frozen decoder gene embeddings of control cells, rows of `genes` only."""

    genes: tuple[str, ...]        # the kept genes (measured genes in the vocabulary + perturbed)
    embeddings: np.ndarray        # [controls, kept genes, decoder width] float32
    checkpoint: str
    seconds: float = 0.0          # wall time of the embedding step (compile included)

    def rows_of(self, genes) -> np.ndarray:
        """[controls, len(genes), width] with zero rows for genes outside the vocabulary."""
        index = {g: i for i, g in enumerate(self.genes)}
        out = np.zeros((len(self.embeddings), len(genes), self.embeddings.shape[-1]), np.float32)
        for column, gene in enumerate(genes):
            if gene in index:
                out[:, column] = self.embeddings[:, index[gene]]
        return out

    def mean_table(self) -> GeneTable:
        """The decoder gene embeddings averaged over the control cells, as a gene table."""
        return GeneTable("scfoundation_decoder", self.genes, self.embeddings.mean(axis=0),
                         self.checkpoint)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_genes", "normalize", "log_total"))
def _kept_embeddings(graphdef, state, batch, kept, *, num_genes, normalize, log_total):
    model = nnx.merge(graphdef, state)
    inputs = inference_inputs(batch, num_genes=num_genes, tgthighres=TARGET_DEPTH,
                              normalize=normalize, log_total=log_total, pad_value=model.pad_value)
    embeddings = model(inputs["encoder_values"], inputs["encoder_gene_ids"],
                       inputs["encoder_padding_mask"], inputs["decoder_values"],
                       output="embedding", stabilizer_scope="cell")
    return jnp.take(embeddings, kept, axis=1).astype(jnp.float32)


def control_embeddings(loaded: LoadedModel, counts, genes, keep, *, batch_size: int = 8,
                       progress: bool = True) -> ControlEmbeddings:
    """Decoder gene embeddings of the cells of `counts` ([cells, measured genes] raw counts,
    measured gene symbols `genes`), keeping the rows of the `keep` symbols that the vocabulary has.

    The batch is sharded over every local device (`batch_size` is rounded up to a multiple of
    their number); one padded length for all cells, so the forward compiles once.
    """
    model, vocabulary = model_and_vocabulary(loaded, None)
    index = {g: i for i, g in enumerate(vocabulary.symbols)}
    kept_genes = tuple(dict.fromkeys(g for g in keep if g in index))
    aligned = align_genes(list(genes), vocabulary, warn_duplicates=False).apply(counts,
                                                                               min_fraction=0.0)
    csr, totals, options = prepare(aligned, model.num_genes)
    options.pop("tgthighres")
    devices = jax.devices()
    mesh = Mesh(np.array(devices), ("data",))
    batch_size = -(-batch_size // len(devices)) * len(devices)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    kept = jax.device_put(np.array([index[g] for g in kept_genes], np.int32),
                          NamedSharding(mesh, PartitionSpec()))
    width = bucket_length(int(np.diff(csr.indptr).max()), model.num_genes)
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    out = np.zeros((csr.shape[0], len(kept_genes), model.decoder_norm.num_features), np.float32)
    started = time.perf_counter()
    for start in tqdm(range(0, csr.shape[0], batch_size), desc="FM control-cell embeddings",
                      disable=not progress, unit="batch"):
        chosen = np.arange(start, min(start + batch_size, csr.shape[0]))
        padded = np.concatenate([chosen, np.full(batch_size - len(chosen), chosen[-1])])
        gene_ids, values = padded_csr_rows(csr, padded, width)
        batch = jax.device_put({"gene_ids": gene_ids, "counts": values,
                                "total_counts": totals[padded].astype(np.float32)}, sharded)
        result = _kept_embeddings(graphdef, state, batch, kept, num_genes=model.num_genes,
                                  **options)
        out[chosen] = np.asarray(result)[:len(chosen)]
    return ControlEmbeddings(genes=kept_genes, embeddings=out, checkpoint=checkpoint_label(loaded),
                             seconds=time.perf_counter() - started)
