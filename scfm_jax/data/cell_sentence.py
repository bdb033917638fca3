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
                if term not in terms and term not in reserved:
                    terms.append(term)
        special = [f"<SPToken{i}>" for i in range(1, NUM_SPECIAL_TOKENS + 1)]
        tokens = (END_TOKEN, *genes, *terms, CELL_TYPE_TASK, *special)
        return cls(tokens, genes, {k: tuple(map(str, v)) for k, v in categories.items()},
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
