"""scMulan cell sentences: the token set, per-cell expression levels and prompts (SPEC.md II.1-2).

A cell becomes a sentence of entities: its expressed genes (those of the model's gene set, in gene
set order, then reversed), each with an expression level 1..10 binned per cell, plus metadata terms
and task tokens at level 0. Annotation prompts are `genes + <PCT>`; organ/region prompts
`genes + <SPToken3>`; conditional generation prompts `metadata terms + <SPToken1>`.

`TokenSet` reads the official layout (`token_set.tsv`, `gene_set.txt`, `meta_categories.json`,
as exported from scMulan's `meta_info.pt`) or builds a new token set from a store's genes and obs
categories for pretraining. `build_sentences` builds pretraining sentences on the device, with fixed
shapes, from the pipeline's sparse batches.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse

END_TOKEN = "<E>"
CELL_TYPE_TASK = "<PCT>"
GENERATE_TASK = "<SPToken1>"
ORGAN_TASK = "<SPToken3>"
NUM_SPECIAL_TOKENS = 15
NUM_LEVELS = 10  # expression levels 1..10; 0 is the level of every non-gene token
# Categories whose terms count as cell types when a generated token is read as an annotation.
CELL_TYPE_CATEGORIES = ("cell_type", "MCT")

# obs categories that mean "no value" (the cell store writes missing entries as "nan")
MISSING_TERMS = frozenset({"nan", ""})

TOKEN_FILE, GENE_FILE, CATEGORY_FILE = "token_set.tsv", "gene_set.txt", "meta_categories.json"


@dataclasses.dataclass(frozen=True)
class TokenSet:
    """The model's vocabulary: token names (id = position), its gene set and metadata categories."""
    tokens: tuple[str, ...]
    genes: tuple[str, ...]
    categories: Mapping[str, tuple[str, ...]]
    cell_type_categories: tuple[str, ...] = CELL_TYPE_CATEGORIES

    def __post_init__(self):
        index = {}
        for i, token in enumerate(self.tokens):
            index.setdefault(token, i)
        object.__setattr__(self, "_index", index)
        missing = [g for g in self.genes if g not in index]
        if missing:
            raise ValueError(f"{len(missing)} genes of the gene set are not tokens, e.g. "
                             f"{missing[:5]}; the token set and gene set do not belong together")
        for token in (END_TOKEN, CELL_TYPE_TASK):
            if token not in index:
                raise ValueError(f"the token set has no {token!r} token")

    def __len__(self):
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self._index

    def id(self, token: str) -> int:
        try:
            return self._index[token]
        except KeyError:
            raise KeyError(f"{token!r} is not in the scMulan token set ({len(self)} tokens); "
                           "metadata terms must be spelled as in meta_categories.json") from None

    def encode(self, tokens: Sequence[str]) -> np.ndarray:
        return np.array([self.id(t) for t in tokens], np.int32)

    def decode(self, ids) -> list[str]:
        return [self.tokens[int(i)] for i in np.asarray(ids).reshape(-1)]

    @property
    def gene_ids(self) -> np.ndarray:
        """Token id of each gene of the gene set, in gene set order."""
        return self.encode(self.genes)

    @property
    def cell_type_terms(self) -> frozenset[str]:
        return frozenset(t for c in self.cell_type_categories for t in self.categories.get(c, ()))

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "TokenSet":
        """Reads `token_set.tsv`, `gene_set.txt` and `meta_categories.json` from `folder`."""
        folder = Path(folder)
        paths = [folder / name for name in (TOKEN_FILE, GENE_FILE, CATEGORY_FILE)]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{folder} is not an scMulan vocabulary folder: {', '.join(missing)} missing "
                f"(it needs {TOKEN_FILE}, {GENE_FILE} and {CATEGORY_FILE}, as exported from "
                "scMulan's utils/meta_info.pt)")
        with open(paths[0], newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f, delimiter="\t"))
        if not rows or rows[0] != ["token_id", "token"]:
            raise ValueError(f"{paths[0]}: expected a header 'token_id<TAB>token'")
        tokens = []
        for line, row in enumerate(rows[1:], start=2):
            if len(row) != 2 or not row[0].isdigit() or int(row[0]) != len(tokens):
                raise ValueError(f"{paths[0]} line {line}: expected '{len(tokens)}<TAB>token', "
                                 f"got {row!r}")
            tokens.append(row[1])
        genes = [g for g in paths[1].read_text(encoding="utf-8").splitlines() if g]
        raw = json.loads(paths[2].read_text(encoding="utf-8"))
        categories = {k: tuple(v) for k, v in raw.items() if isinstance(v, list)}
        return cls(tuple(tokens), tuple(genes), categories)

    @classmethod
    def build(cls, genes: Sequence[str], categories: Mapping[str, Sequence[str]],
              cell_type_categories: Sequence[str] = CELL_TYPE_CATEGORIES) -> "TokenSet":
        """A new token set in the official layout: `<E>`, the genes, every metadata term once
        (category by category), `<PCT>`, `<SPToken1..15>`."""
        genes = tuple(str(g) for g in genes)
        if len(set(genes)) != len(genes):
            raise ValueError("the gene list for a new scMulan token set has duplicate symbols")
        reserved = {END_TOKEN, CELL_TYPE_TASK} | set(genes)
        terms: list[str] = []
        for values in categories.values():
            for term in map(str, values):
                if term not in terms and term not in reserved and term not in MISSING_TERMS:
                    terms.append(term)
        special = [f"<SPToken{i}>" for i in range(1, NUM_SPECIAL_TOKENS + 1)]
        tokens = (END_TOKEN, *genes, *terms, CELL_TYPE_TASK, *special)
        categories = {k: tuple(t for t in map(str, v) if t not in MISSING_TERMS)
                      for k, v in categories.items()}
        return cls(tokens, genes, categories,
                   tuple(cell_type_categories))

    def save(self, folder: str | os.PathLike) -> None:
        """Writes the three files of the official layout (readable by `from_folder`)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / TOKEN_FILE, "w", newline="", encoding="utf-8") as f:
            f.write("token_id\ttoken\n")
            f.writelines(f"{i}\t{t}\n" for i, t in enumerate(self.tokens))
        (folder / GENE_FILE).write_text("".join(g + "\n" for g in self.genes), encoding="utf-8")
        (folder / CATEGORY_FILE).write_text(
            json.dumps({k: list(v) for k, v in self.categories.items()}, indent=1),
            encoding="utf-8")


def expression_levels(values: np.ndarray, num_levels: int = NUM_LEVELS) -> np.ndarray:
    """Per-cell levels of positive values: `digitize(v, linspace(0, max, num_levels+1), right=True)`
    (1..num_levels; the maximum gets num_levels), computed as scMulan does."""
    bins = np.linspace(0, np.max(values), num_levels + 1)
    return np.digitize(values, bins, right=True)


def gene_tokens(expression: np.ndarray, token_set: TokenSet,
                num_levels: int = NUM_LEVELS) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, levels) of one cell's expressed genes: `expression` [genes of the gene set, in
    gene set order]; expressed genes (value > 0) in gene set order, reversed."""
    expression = np.asarray(expression)
    if expression.shape != (len(token_set.genes),):
        raise ValueError(f"a cell has {expression.shape} values; expected one per gene of the "
                         f"{len(token_set.genes)}-gene set, in gene set order")
    expressed = np.flatnonzero(expression > 0)[::-1]
    if expressed.size == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    values = expression[expressed]
    return token_set.gene_ids[expressed], expression_levels(values, num_levels).astype(np.int32)


def annotation_prompts(expression, token_set: TokenSet, task_token: str = CELL_TYPE_TASK,
                       num_levels: int = NUM_LEVELS, cell_names: Sequence[str] | None = None,
                       ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Prompts `genes + task_token` (levels `[levels..., 0]`) for every row of `expression`
    ([cells, genes of the gene set], dense or sparse, log1p of counts normalised to 1e4).
    `<PCT>` asks for the cell type (coarse, fine); `<SPToken3>` for organ and region."""
    task = token_set.id(task_token)
    rows = expression.tocsr() if scipy.sparse.issparse(expression) else np.asarray(expression)
    prompts = []
    for i in range(rows.shape[0]):
        row = rows[i].toarray()[0] if scipy.sparse.issparse(rows) else rows[i]
        ids, levels = gene_tokens(row, token_set, num_levels)
        if ids.size == 0:
            name = cell_names[i] if cell_names is not None else f"row {i}"
            raise ValueError(f"cell {name} expresses none of the {len(token_set.genes)} genes of "
                             "the scMulan gene set; remove it or check the gene alignment")
        prompts.append((np.append(ids, task).astype(np.int32),
                        np.append(levels, 0).astype(np.int32)))
    return prompts


def condition_prompt(terms: Sequence[str], token_set: TokenSet,
                     task_token: str = GENERATE_TASK) -> tuple[np.ndarray, np.ndarray]:
    """Conditional generation prompt: metadata terms (level 0), then `<SPToken1>`; e.g.
    `['Heart', 'Cardiomyocyte cell', '50 year', 'M']`."""
    ids = token_set.encode([*terms, task_token])
    return ids, np.zeros_like(ids)


def pad_prompts(prompts: Sequence[tuple[np.ndarray, np.ndarray]], length: int | None = None,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pads prompts with token 0 / level 0: (ids [B, T], levels [B, T], lengths [B])."""
    lengths = np.array([len(ids) for ids, _ in prompts], np.int32)
    width = int(lengths.max()) if length is None else length
    if lengths.max() > width:
        raise ValueError(f"a prompt of {lengths.max()} tokens does not fit in {width}")
    ids = np.zeros((len(prompts), width), np.int32)
    levels = np.zeros((len(prompts), width), np.int32)
    for row, (i, lv) in enumerate(prompts):
        ids[row, :len(i)] = i
        levels[row, :len(lv)] = lv
    return ids, levels, lengths


# ---------------------------------------------------------------------------------------------
# Pretraining sentences, built on the device from the pipeline's sparse batches.

TASKS = ("annotate", "organ", "generate")  # order of objective.task_weights


@dataclasses.dataclass(frozen=True)
class SentenceTables:
    """How a store's batches become sentences of a token set.

    `gene_positions[i]`: store vocabulary position of gene i of the gene set (-1: not in the store).
    `obs_tokens[column][code]`: token id of that obs category (-1: not a term of the token set).
    """
    token_set: TokenSet
    gene_positions: tuple[int, ...]
    obs_tokens: Mapping[str, tuple[int, ...]]
    metadata_columns: tuple[str, ...]
    cell_type_columns: tuple[str, ...]
    organ_columns: tuple[str, ...]

    @classmethod
    def create(cls, token_set: TokenSet, store_genes: Sequence[str],
               obs_categories: Mapping[str, Sequence[str]], metadata_columns: Sequence[str] = (),
               cell_type_columns: Sequence[str] = (), organ_columns: Sequence[str] = (),
               ) -> "SentenceTables":
        positions = {}
        for i, symbol in enumerate(store_genes):
            positions.setdefault(symbol, i)
            positions.setdefault(symbol.upper(), i)
        gene_positions = tuple(positions.get(g, positions.get(g.upper(), -1))
                               for g in token_set.genes)
        if max(gene_positions, default=-1) < 0:
            raise ValueError("none of the token set's genes is in the store's vocabulary")
        columns = dict.fromkeys([*metadata_columns, *cell_type_columns, *organ_columns])
        missing = [c for c in columns if c not in obs_categories]
        if missing:
            raise ValueError(f"obs columns {missing} are not in the store (it has "
                             f"{sorted(obs_categories)}); set objective.*_columns accordingly")
        obs_tokens = {c: obs_token_table(token_set, obs_categories[c]) for c in columns}
        return cls(token_set, gene_positions, obs_tokens, tuple(metadata_columns),
                   tuple(cell_type_columns), tuple(organ_columns))


def obs_token_table(token_set: TokenSet, categories: Sequence[str]) -> tuple[int, ...]:
    """Token id per obs category code; -1 for missing values and terms outside the token set."""
    return tuple(-1 if str(t) in MISSING_TERMS or str(t) not in token_set else token_set.id(str(t))
                 for t in categories)


def _compact(tokens, levels):
    """Moves valid entries (token >= 0) to the front, keeping their order; returns the count."""
    order = jnp.argsort(tokens < 0, axis=1, stable=True)
    tokens = jnp.take_along_axis(tokens, order, axis=1)
    return tokens, jnp.take_along_axis(levels, order, axis=1), jnp.sum(tokens >= 0, axis=1)


def _pad_to(x, width, value):
    return jnp.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=value)


def expressed_gene_tokens(batch: Mapping, tables: "SentenceTables", num_levels: int = NUM_LEVELS):
    """(gene tokens [B, K], their levels [B, K], count [B]) of a pipeline batch: each cell's
    expressed genes of the gene set in gene set order, reversed, left-compacted (-1 after the
    count), with per-cell levels of log1p(count / total * 1e4) as at inference (jit-able)."""
    gene_ids, counts = batch["gene_ids"], batch["counts"]
    positions = np.asarray(tables.gene_positions)
    store_to_token = np.full(max(positions.max() + 1, 1), -1, np.int32)
    store_to_token[positions[positions >= 0]] = tables.token_set.gene_ids[positions >= 0]
    in_range = (gene_ids >= 0) & (gene_ids < store_to_token.shape[0])
    tokens = jnp.where(in_range & (counts > 0),
                       jnp.asarray(store_to_token)[jnp.clip(gene_ids, 0, store_to_token.shape[0] - 1)],
                       -1)
    total = jnp.maximum(batch["total_counts"], 1e-12)[:, None]
    values = jnp.where(tokens >= 0, jnp.log1p(counts / total * 1e4), 0.0)
    cell_max = jnp.max(values, axis=1, keepdims=True)
    edges = cell_max[..., None] * (jnp.arange(num_levels + 1) / num_levels)  # [B, 1, levels+1]
    levels = jnp.sum(edges < values[..., None], axis=-1).astype(jnp.int32)
    # expressed genes in gene-set order reversed = descending token id (genes are ids in order)
    order = jnp.argsort(jnp.where(tokens >= 0, -tokens, jnp.iinfo(jnp.int32).max), axis=1)
    genes = jnp.take_along_axis(tokens, order, axis=1)
    gene_levels = jnp.where(genes >= 0, jnp.take_along_axis(levels, order, axis=1), 0)
    return genes, gene_levels, jnp.sum(genes >= 0, axis=1)


def build_sentences(batch: Mapping, tables: SentenceTables, key, task_weights=(1.0, 1.0, 1.0),
                    num_levels: int = NUM_LEVELS) -> dict:
    """Pretraining sentences for a pipeline batch, with fixed shapes (jit-able).

    Each cell draws one task (among those its data allows, weighted by `task_weights` for
    annotate / organ / generate) and becomes `prefix + task token + targets + <E>`:
    annotate `genes <PCT> cell types`, organ `genes <SPToken3> organ terms`, generate
    `metadata <SPToken1> genes`. Genes are the cell's expressed genes of the gene set in gene set
    order, reversed, with per-cell levels of log1p(count / total * 1e4) as at inference.

    Returns ids, levels [B, L] (right-padded with 0), `prefix_length` [B] (tokens before the
    targets, the task token included), `target_length` [B] (targets without <E>), `valid` [B]
    (False for cells with no gene of the gene set) and `task` [B] (index into TASKS).
    """

    ts = tables.token_set
    batch_size = batch["gene_ids"].shape[0]
    genes, gene_levels, num_genes = expressed_gene_tokens(batch, tables, num_levels)

    def obs_tokens(columns):
        if not columns:
            return jnp.full((batch_size, 1), -1, jnp.int32), jnp.zeros((batch_size,), jnp.int32)
        cols = []
        for c in columns:
            table = jnp.asarray(np.asarray(tables.obs_tokens[c], np.int32).reshape(-1))
            code = batch[f"obs/{c}"].astype(jnp.int32)
            ok = (code >= 0) & (code < table.shape[0])
            cols.append(jnp.where(ok, table[jnp.clip(code, 0, max(table.shape[0] - 1, 0))], -1))
        stacked = jnp.stack(cols, axis=1)
        compact, _, count = _compact(stacked, jnp.zeros_like(stacked))
        return compact, count

    meta, num_meta = obs_tokens(tables.metadata_columns)
    cell_types, num_types = obs_tokens(tables.cell_type_columns)
    organs, num_organs = obs_tokens(tables.organ_columns)

    weights = jnp.asarray(task_weights, jnp.float32)
    available = jnp.stack([num_types > 0, num_organs > 0, jnp.ones_like(num_genes, bool)], 1)
    available = available & (num_genes > 0)[:, None] & (weights > 0)[None, :]
    valid = jnp.any(available, axis=1)
    logits = jnp.where(available, jnp.log(jnp.maximum(weights, 1e-30))[None, :], -jnp.inf)
    task = jax.random.categorical(key, jnp.where(valid[:, None], logits, 0.0), axis=1)
    is_generate = task == 2

    width_first = max(genes.shape[1], meta.shape[1])
    width_second = max(genes.shape[1], cell_types.shape[1], organs.shape[1])
    zeros_meta = jnp.zeros_like(meta)
    first = jnp.where(is_generate[:, None], _pad_to(meta, width_first, -1),
                      _pad_to(genes, width_first, -1))
    first_levels = jnp.where(is_generate[:, None], _pad_to(zeros_meta, width_first, 0),
                             _pad_to(gene_levels, width_first, 0))
    num_first = jnp.where(is_generate, num_meta, num_genes)
    second = jnp.select([task[:, None] == 0, task[:, None] == 1],
                        [_pad_to(cell_types, width_second, -1), _pad_to(organs, width_second, -1)],
                        _pad_to(genes, width_second, -1))
    second_levels = jnp.where(is_generate[:, None], _pad_to(gene_levels, width_second, 0), 0)
    num_second = jnp.select([task == 0, task == 1], [num_types, num_organs], num_genes)
    task_token = jnp.asarray(ts.encode([CELL_TYPE_TASK, ORGAN_TASK, GENERATE_TASK]))[task]

    length = genes.shape[1] + max(meta.shape[1], cell_types.shape[1], organs.shape[1]) + 2
    p = jnp.arange(length)[None, :]
    n1, n2 = num_first[:, None], num_second[:, None]
    in_first, in_second = p < n1, (p > n1) & (p <= n1 + n2)
    take = lambda x, i: jnp.take_along_axis(x, jnp.clip(i, 0, x.shape[1] - 1), axis=1)  # noqa
    ids = jnp.where(in_first, take(first, p), 0)
    ids = jnp.where(p == n1, task_token[:, None], ids)
    ids = jnp.where(in_second, take(second, p - n1 - 1), ids)
    sentence_levels = jnp.where(in_first, take(first_levels, p), 0)
    sentence_levels = jnp.where(in_second, take(second_levels, p - n1 - 1), sentence_levels)
    # <E> (id 0) follows the targets; padding is id 0 too, so nothing more to write
    return dict(ids=ids.astype(jnp.int32), levels=sentence_levels.astype(jnp.int32),
                prefix_length=(num_first + 1).astype(jnp.int32),
                target_length=num_second.astype(jnp.int32), valid=valid, task=task)
