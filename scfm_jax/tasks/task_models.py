"""Either model from any checkpoint, with what a downstream task needs to feed it.

scFoundation checkpoints load through `analysis.load` (official `models.ckpt` with a gene
vocabulary, or a training workdir). scMulan needs its token set beside the model: an official `.pt`
takes it from a token-set folder (`token_set.tsv`, `gene_set.txt`, `meta_categories.json`, and
`total_gene_list_42117.txt`, the symbol list user genes are aligned through); a training workdir
carries it in its config.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from scfm_jax.data.vocabulary import Vocabulary, align_genes
from scfm_jax.errors import UsageError
from scfm_jax.output_safety import OVERWRITE_FOLDER_HELP, check_output


@dataclasses.dataclass
class TaskModel:
    kind: str                 # "scfoundation" or "scmulan"
    model: object             # scFoundation: analysis.LoadedModel; scMulan: the ScMulan module
    vocabulary: Vocabulary    # scFoundation: its genes; scMulan: the symbol list genes align to
    source: str
    token_set: object = None  # scMulan's TokenSet

    @property
    def genes(self) -> list[str]:
        """The model's genes, in model order."""
        if self.kind == "scmulan":
            return list(self.token_set.genes)
        return list(self.vocabulary.symbols)

    @property
    def embedding_key(self) -> str:
        """Where the model's cell embedding goes in obsm (its objective's: X_scfoundation, ...)."""
        from scfm_jax.objectives import get_objective
        return get_objective(self.kind).embedding_key

    def embed(self, adata, key_added: str, *, layer: str | None = None,
              gene_column: str | None = None, min_coverage: float = 0.5, batch_size: int = 16,
              progress: bool = True) -> None:
        """`adata.obsm[key_added]`: the model's cell embedding from the raw counts (scFoundation:
        the encoder's pooled embedding; scMulan: the last layer's hidden state at the first
        generated cell-type token, as its authors take it)."""
        if self.kind == "scfoundation":
            from scfm_jax import analysis
            analysis.embed_cells(self.model, adata, layer=layer, gene_column=gene_column,
                                 min_coverage=min_coverage, key_added=key_added,
                                 batch_size=batch_size, progress=progress)
            return
        import anndata
        import pandas as pd

        from scfm_jax.analysis import scmulan_tasks
        expression, report = scmulan_tasks.gene_set_expression(
            adata, self.token_set, self.vocabulary, layer=layer, counts=True,
            gene_column=gene_column, min_coverage=min_coverage)
        if progress:
            print(f"genes: {report.summary()}", file=sys.stderr)
        work = anndata.AnnData(expression, obs=pd.DataFrame(index=adata.obs_names),
                               var=pd.DataFrame(index=list(self.token_set.genes)))
        scmulan_tasks.annotate(self.model, self.token_set, work, batch_size=batch_size,
                               key_added=key_added, progress=progress)
        adata.obsm[key_added] = work.obsm[key_added]


def load_task_model(checkpoint, *, vocabulary=None, token_set=None, key: str = "cell") -> TaskModel:
    """`checkpoint`: an official scFoundation `models.ckpt` (weight set `key`; `vocabulary`: its
    gene list, default the released 19,264 genes), an official scMulan `.pt` (`token_set`: its
    folder), or a scfm-jax training workdir of either model."""
    from scfm_jax.analysis.loading import checkpoint_kind, load
    from scfm_jax.analysis.scmulan_tasks import load_annotator

    path = Path(str(checkpoint))
    if path.is_file() and checkpoint_kind(path) == "scmulan":
        if token_set is None:
            raise UsageError(f"{path} is an official scMulan checkpoint: pass --token-set (the "
                             "folder with token_set.tsv, gene_set.txt, meta_categories.json and "
                             "total_gene_list_42117.txt)")
        annotator = load_annotator(path, vocabulary=str(token_set))
        return TaskModel("scmulan", annotator.model, annotator.gene_list, str(path),
                         annotator.token_set)
    loaded = load(checkpoint, key=key, vocabulary=vocabulary if path.is_file() else None)
    if loaded.kind == "scmulan":
        from scfm_jax.objectives.scmulan import token_set_from_config
        return TaskModel("scmulan", loaded.model, loaded.vocabulary, loaded.source,
                         token_set_from_config(loaded.config))
    return TaskModel("scfoundation", loaded, loaded.vocabulary, loaded.source)


def counts_on_model_genes(task_model: TaskModel, matrix, var, *, gene_column=None,
                          min_coverage: float | None = 0.5):
    """(`matrix` [cells, input genes] as CSR on the model's genes, the alignment report).

    scFoundation: aligned onto its vocabulary; scMulan: onto its symbol list, then its gene set."""
    alignment = align_genes(var, task_model.vocabulary, gene_column=gene_column)
    aligned = alignment.apply(matrix, min_fraction=min_coverage)
    if task_model.kind == "scmulan":
        columns = np.array([task_model.vocabulary.index_of(g) for g in task_model.token_set.genes])
        aligned = aligned[:, columns]
    return sp.csr_matrix(aligned), alignment.report


def add_task_arguments(parser, batch_size: int) -> None:
    """The options every task command takes: the input's genes, official checkpoints' vocabularies,
    the batch size, and how the output is written."""
    parser.add_argument("--batch-size", type=int, default=batch_size,
                        help=f"cells per forward (default {batch_size})")
    parser.add_argument("--gene-column", default=None,
                        help="var column with gene symbols (e.g. gene_symbol; default var_names)")
    parser.add_argument("--layer", default=None, help="read the counts from this layer")
    parser.add_argument("--vocabulary", default=None,
                        help="gene list of an official scFoundation checkpoint (default: the "
                             "released 19,264 genes)")
    parser.add_argument("--token-set", default=None,
                        help="folder of an official scMulan checkpoint's token_set.tsv, "
                             "gene_set.txt, meta_categories.json, total_gene_list_42117.txt")
    parser.add_argument("--min-coverage", type=float, default=0.5,
                        help="refuse inputs of which less than this fraction of the counts falls "
                             "on the model's genes (default 0.5)")
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_FOLDER_HELP)
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def parse_task_arguments(parser, argv, command: str):
    """The arguments of a task command (`add_task_arguments`), its --output folder checked
    (`output_safety.check_output`) before anything is read or loaded."""
    args = parser.parse_args(argv)
    check_output(args.output, command=command, inputs=[args.input], overwrite=args.overwrite,
                 folder=True)
    return args
