"""scMulan tasks on AnnData: zero-shot annotation + embedding, conditional generation, smoothing.

`annotate` reproduces `get_cell_types_and_embds_for_adata` (SPEC.md II.5) but batched, with a KV
cache and cells grouped by prompt length: for each cell the prompt `genes + <PCT>` generates up to
three tokens greedily; the tokens at positions -3 and -2 of the final sequence are the coarse and
fine cell type (`Unclassified` unless they are terms of `cell_type` or `MCT`), and the embedding is
the final-LayerNorm output the official code reads (`hidden_states[-1][0, -2]`). Each type comes
with the probability the model gave its generated token (see `models.generation`; NaN for
`Unclassified`), which the official code does not report.
"""
from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

import anndata
import jax
import ml_collections
import numpy as np
import pandas as pd
import scipy.sparse
from tqdm.auto import tqdm

from scfm_jax.analysis.output_checks import require_finite
from scfm_jax.data import cell_sentence, host_ops
from scfm_jax.data.cell_sentence import TokenSet
from scfm_jax.errors import CheckpointError, InputError, MissingCheckpoint, UnknownName, UsageError
from scfm_jax.models import generation
from scfm_jax.models.scmulan import ScMulan

UNCLASSIFIED = "Unclassified"
LENGTH_QUANTUM = 64  # prompts are padded to a multiple of this, so few shapes get compiled


def _gene_set_matrix(adata: anndata.AnnData, token_set: TokenSet, layer: str | None):
    matrix = adata.layers[layer] if layer is not None else adata.X
    positions = pd.Index(adata.var_names).get_indexer(list(token_set.genes))
    missing = [g for g, p in zip(token_set.genes, positions) if p < 0]
    if missing:
        raise InputError(
            f"{len(missing)} of the {len(token_set.genes)} scMulan genes are not in var_names "
            f"(e.g. {missing[:5]}); map the genes first with scfm_jax.data.vocabulary.align_genes "
            "(or `scfm-jax annotate`, which does it), so absent genes become zero columns")
    matrix = matrix[:, positions]
    return matrix.tocsr() if scipy.sparse.issparse(matrix) else np.asarray(matrix)


def _check_log_normalised(matrix, what: str):
    values = matrix.data if scipy.sparse.issparse(matrix) else matrix
    if values.size and (np.max(values) >= 10 or np.min(values) < 0):
        raise InputError(
            f"{what} has values in [{np.min(values):.3g}, {np.max(values):.3g}]; scMulan expects "
            "log1p of counts normalised to 1e4 per cell (max < 10). Normalise first "
            "(scanpy.pp.normalize_total(target_sum=1e4) then scanpy.pp.log1p), or pass raw counts "
            "with counts=True")


def _batches(lengths: np.ndarray, batch_size: int):
    order = np.argsort(lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def _run_batches(model, prompts, batch_size, progress, desc, **generate_kwargs):
    """Generates for every prompt, batched by similar length; returns per-cell results."""
    lengths = np.array([len(ids) for ids, _ in prompts])
    results = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, unit="cell", disable=not progress)
    for index in _batches(lengths, batch_size):
        batch = [prompts[i] for i in index]
        # pad the batch to full size with its first cell so one program serves every batch
        batch += [batch[0]] * (batch_size - len(batch))
        width = -(-int(lengths[index].max()) // LENGTH_QUANTUM) * LENGTH_QUANTUM
        ids, levels, lens = cell_sentence.pad_prompts(batch, width)
        out = generation.generate(model, ids, levels, lens, **generate_kwargs)
        for row, cell in enumerate(index):
            results[cell] = (out.tokens(row), out.token_probabilities(row), out.embedding[row])
        bar.update(len(index))
    bar.close()
    return results


def read_cell_types(prompt_ids: np.ndarray, generated_ids: np.ndarray,
                    generated_probabilities: np.ndarray, token_set: TokenSet):
    """(coarse, fine, coarse probability, fine probability): the types are the tokens at -3 and
    -2 of the final sequence, as the official reads; each probability is the one the model gave
    that generated token, NaN when the type is `Unclassified` (or the position is the prompt's)."""
    sequence = np.concatenate([prompt_ids, generated_ids])
    names = token_set.decode(sequence[-3:-1])
    cell_types = token_set.cell_type_terms
    coarse, fine = (name if name in cell_types else UNCLASSIFIED for name in names)
    generated = len(generated_ids)
    coarse_p, fine_p = (float(generated_probabilities[generated - back])
                        if generated >= back and name != UNCLASSIFIED else float("nan")
                        for back, name in ((3, coarse), (2, fine)))
    return coarse, fine, coarse_p, fine_p


def annotate(model: ScMulan, token_set: TokenSet, adata: anndata.AnnData, *,
             layer: str | None = None, counts: bool = False, batch_size: int = 16,
             key_added: str = "X_scmulan", type_key: str = "cell_type_scmulan",
             progress: bool = True) -> anndata.AnnData:
    """Zero-shot cell types and embeddings, written into `adata` (also returned):
    `obs[type_key]` (fine type), `obs[type_key + "_coarse"]`, their probabilities
    `obs[type_key + "_probability"]` and `obs[type_key + "_coarse_probability"]`, `obsm[key_added]`.

    `adata.X` (or `layers[layer]`) holds log1p-normalised expression with the scMulan gene symbols
    in `var_names`; `counts=True` normalises raw counts first (1e4 per cell, over all genes).
    """
    if adata.n_obs == 0:
        raise InputError("the AnnData has no cells")
    if counts:
        matrix = adata.layers[layer] if layer is not None else adata.X
        source = anndata.AnnData(host_ops.log_normalise(matrix), var=adata.var[[]].copy())
        matrix = _gene_set_matrix(source, token_set, None)
    else:
        matrix = _gene_set_matrix(adata, token_set, layer)
        _check_log_normalised(matrix, f"adata.{'layers[%r]' % layer if layer else 'X'}")
    prompts = cell_sentence.annotation_prompts(
        matrix, token_set, num_levels=model.cfg.expression_level,
        cell_names=list(adata.obs_names))
    results = _run_batches(model, prompts, min(batch_size, len(prompts)), progress,
                           "scMulan annotation", max_new_tokens=3, top_k=1)
    coarse, fine, coarse_p, fine_p = zip(*(read_cell_types(p[0], r[0], r[1], token_set)
                                           for p, r in zip(prompts, results)))
    adata.obs[type_key] = pd.Categorical(fine)
    adata.obs[type_key + "_coarse"] = pd.Categorical(coarse)
    adata.obs[type_key + "_probability"] = np.array(fine_p, np.float32)
    adata.obs[type_key + "_coarse_probability"] = np.array(coarse_p, np.float32)
    embeddings = np.stack([r[2] for r in results])
    require_finite(embeddings, adata.obs_names, key_added)
    adata.obsm[key_added] = embeddings
    return adata


def generate_cells(model: ScMulan, token_set: TokenSet, conditions: Sequence[Sequence[str]], *,
                   max_new_tokens: int = 1000, top_k: int = 0, temperature: float = 1.0,
                   seed: int = 0, batch_size: int = 16, progress: bool = True,
                   ) -> anndata.AnnData:
    """Cells generated from metadata terms (one list of terms per cell, e.g. `['Heart',
    'Cardiomyocyte cell', '50 year', 'M']`), sampled until `<E>`: an AnnData of expression levels
    (cells x the model's gene set; 0 for genes not generated) with the terms in `obs`."""
    if not conditions:
        raise UsageError("no conditions given")
    prompts = [cell_sentence.condition_prompt(terms, token_set) for terms in conditions]
    gene_column = {int(t): j for j, t in enumerate(token_set.gene_ids)}
    size = min(batch_size, len(prompts))
    levels = np.zeros((len(prompts), len(token_set.genes)), np.float32)
    lengths = np.array([len(ids) for ids, _ in prompts])
    bar = tqdm(total=len(prompts), desc="scMulan generation", unit="cell", disable=not progress)
    key = jax.random.key(seed)
    ended = np.zeros(len(prompts), bool)
    for index in _batches(lengths, size):
        batch = [prompts[i] for i in index] + [prompts[index[0]]] * (size - len(index))
        ids, lv, lens = cell_sentence.pad_prompts(batch)
        key, batch_key = jax.random.split(key)
        out = generation.generate(model, ids, lv, lens, max_new_tokens=max_new_tokens,
                                  top_k=top_k, temperature=temperature, key=batch_key)
        for row, cell in enumerate(index):
            tokens, token_levels = out.tokens(row), out.token_levels(row)
            ended[cell] = tokens.size > 0 and tokens[-1] == generation.END_ID
            for token, level in zip(tokens, token_levels):
                if int(token) in gene_column:
                    levels[cell, gene_column[int(token)]] = level
        bar.update(len(index))
    bar.close()
    obs = pd.DataFrame({"condition": [", ".join(t) for t in conditions], "ended": ended},
                       index=[f"generated_{i}" for i in range(len(conditions))])
    return anndata.AnnData(scipy.sparse.csr_matrix(levels), obs=obs,
                           var=pd.DataFrame(index=list(token_set.genes)))


def smooth_cell_types(adata: anndata.AnnData, *, type_key: str = "cell_type_scmulan",
                      use_rep: str = "X_scmulan", n_neighbors: int = 15, weighted: bool = True,
                      threshold: float = 0.5) -> anndata.AnnData:
    """kNN vote over predicted types (scMulan's `cell_type_smoothing`): each cell takes the type
    with the largest (inverse-distance weighted) share among its neighbours in `obsm[use_rep]`,
    or `Unclassified` when that share is below `threshold`. Writes `obs[type_key + "_smoothed"]`
    and `obs[type_key + "_smoothing_score"]`."""
    from sklearn.neighbors import NearestNeighbors

    if use_rep not in adata.obsm or type_key not in adata.obs:
        raise InputError(f"run annotate first: need obsm[{use_rep!r}] and obs[{type_key!r}]")
    if adata.n_obs < 2:
        raise InputError("smoothing needs at least two cells")
    k = min(n_neighbors, adata.n_obs)
    distances, neighbours = NearestNeighbors(n_neighbors=k).fit(adata.obsm[use_rep]).kneighbors()
    labels = np.asarray(adata.obs[type_key].astype(str))
    smoothed, scores = [], []
    for dist, nbr in zip(distances, neighbours):
        weights = 1.0 / np.maximum(dist, 1e-12) if weighted else np.ones_like(dist)
        weights = weights / weights.sum()
        votes = pd.Series(weights).groupby(labels[nbr]).sum()
        smoothed.append(votes.idxmax())
        scores.append(float(votes.max()))
    scores = np.array(scores)
    smoothed = np.where(scores < threshold, UNCLASSIFIED, np.array(smoothed, dtype=object))
    adata.obs[type_key + "_smoothed"] = pd.Categorical(smoothed)
    adata.obs[type_key + "_smoothing_score"] = scores
    return adata


def cell_type_categories(token_set: TokenSet) -> list[str]:
    """The labels annotation can give, in a fixed order (the codes of a store output)."""
    return sorted(token_set.cell_type_terms - {UNCLASSIFIED}) + [UNCLASSIFIED]


def store_annotation_task(model: ScMulan, token_set: TokenSet, store_vocabulary, *,
                          counts: bool = False):
    """The annotation task of `store_inference.run`: a store's rows (on `store_vocabulary`, which
    must name scMulan's gene-set symbols) to prompts, bucketed by prompt length as `annotate`
    does; fine and coarse types (codes into `cell_type_categories`), their probabilities and
    embeddings out."""
    from scfm_jax.analysis.store_inference import StoreTask

    columns = pd.Index(store_vocabulary.symbols).get_indexer(list(token_set.genes))
    if (columns < 0).mean() > 0.5:
        raise InputError(f"only {(columns >= 0).sum()} of the {len(columns)} scMulan genes are in "
                         f"the store's vocabulary {store_vocabulary.name!r}; convert the store with "
                         "--vocabulary scmulan")
    categories = cell_type_categories(token_set)
    code = {name: i for i, name in enumerate(categories)}
    gene_set_columns = scipy.sparse.csr_matrix(
        (np.ones(int((columns >= 0).sum()), np.float32),
         (columns[columns >= 0], np.flatnonzero(columns >= 0))),
        shape=(len(store_vocabulary), len(columns)))

    def prepare(rows, cells):
        matrix = rows.to_csr(len(store_vocabulary))
        if counts:
            matrix = host_ops.log_normalise(matrix)
        matrix = (matrix @ gene_set_columns).tocsr()
        if not counts:
            _check_log_normalised(matrix, "the store's values")
        prompts = cell_sentence.annotation_prompts(matrix, token_set,
                                                   num_levels=model.cfg.expression_level,
                                                   cell_names=[f"store cell {c}" for c in cells])
        return prompts, [-(-len(ids) // LENGTH_QUANTUM) * LENGTH_QUANTUM for ids, _ in prompts]

    def batch(prompts, width):
        ids, levels, lengths = cell_sentence.pad_prompts(prompts, width)
        return {"ids": ids, "levels": levels, "lengths": lengths}

    def forward(model, batch):
        tokens, _, probabilities, count, embedding = generation.generate_tokens(
            model, batch["ids"], batch["levels"], batch["lengths"], jax.random.key(0),
            np.zeros((model.cfg.vocab_size,), bool), max_new_tokens=3, top_k=1,
            temperature=1.0, gamma=1.0)
        return {"tokens": tokens, "probabilities": probabilities, "count": count,
                "embedding": embedding.astype(np.float32)}

    def finish(prompts, out):
        coarse, fine, coarse_p, fine_p = zip(*(
            read_cell_types(ids, out["tokens"][row, :out["count"][row]],
                            out["probabilities"][row, :out["count"][row]], token_set)
            for row, (ids, _) in enumerate(prompts)))
        return {"embedding": out["embedding"],
                "cell_type": np.array([code[name] for name in fine], np.int32),
                "cell_type_coarse": np.array([code[name] for name in coarse], np.int32),
                "cell_type_probability": np.array(fine_p, np.float32),
                "cell_type_coarse_probability": np.array(coarse_p, np.float32)}

    longest = len(token_set.genes) + 2
    widths = list(range(LENGTH_QUANTUM, longest + LENGTH_QUANTUM, LENGTH_QUANTUM))
    task_id = token_set.id(cell_sentence.CELL_TYPE_TASK)
    return StoreTask(
        name="annotate", model=model,
        arrays={"embedding": ((model.cfg.n_embd,), "float32"), "cell_type": ((), "int32"),
                "cell_type_coarse": ((), "int32"), "cell_type_probability": ((), "float32"),
                "cell_type_coarse_probability": ((), "float32")},
        widths=widths, prepare=prepare, batch=batch,
        dummy=lambda width: (np.array([task_id], np.int32), np.zeros(1, np.int32)),
        forward=forward, finish=finish,
        attributes={"obsm_key": "X_scmulan",
                    "obs_keys": {name: "cell_type_scmulan" + name.removeprefix("cell_type")
                                 for name in ("cell_type", "cell_type_coarse",
                                              "cell_type_probability",
                                              "cell_type_coarse_probability")},
                    "categories": {"cell_type": categories, "cell_type_coarse": categories}})


# ------------------------------------------------------------------ files and stores (the CLI's API)

GENE_LIST_FILE = "total_gene_list_42117.txt"


@dataclasses.dataclass
class Annotator:
    """An scMulan model with its token set, the symbol list its genes are aligned through, and
    where it came from."""

    model: ScMulan
    token_set: TokenSet
    gene_list: object   # a vocabulary.Vocabulary
    source: str
    config: ml_collections.ConfigDict   # has `.model`; the whole experiment config for our runs
    step: int | None = None


def load_annotator(checkpoint, *, vocabulary=None, gene_list=None) -> Annotator:
    """An official scMulan `.pt` (with `vocabulary`, the folder with token_set.tsv, gene_set.txt
    and meta_categories.json; `gene_list`: the 42,117-symbol list, by default the folder's
    total_gene_list_42117.txt or 'scmulan') or a scfm-jax training workdir (its config carries
    the token set, its vocabulary the genes)."""
    from pathlib import Path

    from scfm_jax.analysis.loading import checkpoint_kind, load
    from scfm_jax.data import vocabulary as vocabulary_lib

    path = Path(checkpoint)
    if path.is_dir() or "://" in str(checkpoint):
        from scfm_jax.objectives.scmulan import token_set_from_config
        loaded = load(checkpoint)
        if loaded.kind != "scmulan":
            raise CheckpointError(f"{checkpoint} holds a {loaded.kind} model, not scMulan")
        return Annotator(loaded.model, token_set_from_config(loaded.config), loaded.vocabulary,
                         loaded.source, loaded.config, loaded.step)
    if not path.is_file():
        raise MissingCheckpoint(f"--checkpoint {checkpoint}: no such file or training workdir")
    if checkpoint_kind(path) != "scmulan":
        raise CheckpointError(f"--checkpoint {checkpoint} is a scFoundation checkpoint; "
                         "`scfm-jax annotate` runs scMulan models (use `scfm-jax embed` for it)")
    if vocabulary is None:
        raise UsageError("an official .pt checkpoint needs --vocabulary: the folder with "
                         "token_set.tsv, gene_set.txt and meta_categories.json")
    token_set = TokenSet.from_folder(vocabulary)
    if gene_list is None:
        local = Path(vocabulary) / GENE_LIST_FILE
        gene_list = str(local) if local.is_file() else "scmulan"
    genes = vocabulary_lib.load_vocabulary(gene_list)
    symbols = set(genes.symbols)
    missing = [g for g in token_set.genes if g not in symbols]
    if missing:
        raise InputError(f"{len(missing)} scMulan genes are not in the gene list {gene_list} "
                         f"(e.g. {missing[:5]}); use the 42,117-symbol list of scMulan")
    loaded = load(path)
    if loaded.model.cfg.vocab_size != len(token_set):
        raise CheckpointError(f"the checkpoint has {loaded.model.cfg.vocab_size} tokens but the "
                         f"vocabulary folder {vocabulary} has {len(token_set)}; they do not "
                         "belong together")
    return Annotator(loaded.model, token_set, genes, loaded.source, loaded.config)


def gene_set_expression(adata: anndata.AnnData, token_set, gene_list, *, layer=None,
                        counts=False, gene_column=None, min_coverage=0.5):
    """[cells, 2,000 gene-set genes] log1p-normalised CSR, aligned through the symbol list, and
    the alignment report."""
    from scfm_jax.data import vocabulary

    if layer is not None and layer not in adata.layers:
        raise UnknownName(f"the input has no layer {layer!r} (layers: {list(adata.layers)})")
    matrix = adata.layers[layer] if layer is not None else adata.X
    if counts:
        matrix = host_ops.log_normalise(matrix)
    alignment = vocabulary.align_genes(adata.var, gene_list, gene_column=gene_column)
    aligned = alignment.apply(matrix, min_fraction=min_coverage)
    columns = np.array([gene_list.index_of(g) for g in token_set.genes])
    return aligned[:, columns].tocsr(), alignment.report


def annotate_anndata(annotator: Annotator, adata: anndata.AnnData, *, layer=None, counts=False,
                     gene_column=None, min_coverage=0.5, batch_size=16, smooth: int = 0,
                     progress=True) -> anndata.AnnData:
    """Cell types and embeddings of any AnnData (genes by symbol or Ensembl ID, aligned through
    the symbol list), written into it: obs cell_type_scmulan(_coarse)(_probability), obsm
    X_scmulan, and with `smooth` the kNN-smoothed type over that many neighbours."""
    expression, report = gene_set_expression(
        adata, annotator.token_set, annotator.gene_list, layer=layer, counts=counts,
        gene_column=gene_column, min_coverage=min_coverage)
    print(f"genes: {report.summary()}", file=sys.stderr)
    work = anndata.AnnData(expression, obs=pd.DataFrame(index=adata.obs_names),
                           var=pd.DataFrame(index=list(annotator.token_set.genes)))
    annotate(annotator.model, annotator.token_set, work, batch_size=batch_size, progress=progress)
    for column in work.obs.columns:
        adata.obs[column] = work.obs[column].values
    adata.obsm["X_scmulan"] = work.obsm["X_scmulan"]
    if smooth:
        smooth_cell_types(adata, n_neighbors=smooth)
    return adata


def annotate_store(annotator: Annotator, store, output, *, selection=None, counts=False,
                   batch_size=None, chunk_cells=4096, overwrite=False, progress=True,
                   devices=None) -> dict:
    """Cell types (codes into the output's categories) and embeddings of a whole cell store on
    every device of every process, into a resumable zarr output (see `store_inference`)."""
    from scfm_jax.analysis import store_inference

    store = store_inference.open_store(store)
    task = store_annotation_task(annotator.model, annotator.token_set, store.vocabulary,
                                 counts=counts)
    return store_inference.run(
        task, store, str(output), selection=selection or store_inference.Selection(),
        checkpoint=store_inference.checkpoint_identity(annotator.source, annotator.step),
        config=annotator.config, options={"counts": counts},
        batch_size=batch_size, chunk_cells=chunk_cells, overwrite=overwrite, progress=progress,
        devices=devices)
