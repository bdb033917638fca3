"""Gene vocabularies and the alignment of users' genes onto them.

A vocabulary is the ordered gene list a model is built on (position = row of the gene table). It
travels with every cell store and checkpoint together with its content hash (`Vocabulary.digest`),
so a store converted on one list is never silently trained or embedded with another.

Built-in vocabularies are downloaded from the official repositories at pinned commits and checked
against a pinned SHA-256 (the files are not part of this package); a local file works too.
`align_genes` maps an AnnData's genes onto a vocabulary by symbol (case-insensitive) or by Ensembl
ID (version suffix ignored), sums duplicated genes and reports the coverage.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
import tempfile
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scfm_jax.data.host_ops import sha256_file
from scfm_jax.errors import InputError, MissingInput, UnknownName

# name -> (official raw-file URL at a pinned commit, SHA-256 of its bytes, path under a mirror).
BUILTIN_VOCABULARIES = {
    "scfoundation": (
        "https://raw.githubusercontent.com/biomap-research/scFoundation/"
        "d09626a5c1bc30b9c6227378677b61e0b987fe8b/OS_scRNA_gene_index.19264.tsv",
        "bb337ea195d94e7b033543abc02a42e7060d6562eba97deb077f7dcecec62661",
        "OS_scRNA_gene_index.19264.tsv",
    ),
    "scmulan": (
        "https://raw.githubusercontent.com/SuperBianC/scMulan/"
        "d64da5ed91fd3c730c4c975e898e5e5cc360d872/scMulan/reference/GeneSymbolUniform/"
        "total_gene_list_42117.txt",
        "9374088e30f6b5f1f6cc6ed9a95586dbfa8a410ca2c5d265b8d26afbc00b0c28",
        "scmulan/total_gene_list_42117.txt",
    ),
}
# An offline mirror (URL or folder) holding the built-in files at their mirror paths, e.g. a
# bucket on a cluster without internet access.
MIRROR_ENV = "SCFM_VOCABULARY_MIRROR"
_ENSEMBL = re.compile(r"^ENS[A-Z]*G\d{6,}(\.\d+)?$", re.IGNORECASE)


def resolve_cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Where downloads are kept: `override`, `$SCFM_CACHE_DIR`, or ~/.cache/scfm-jax."""
    if override is not None:
        return Path(override)
    env = os.environ.get("SCFM_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "scfm-jax"


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """An ordered gene list; `symbols[i]` is model gene position i."""

    name: str
    symbols: tuple[str, ...]
    ensembl_ids: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.ensembl_ids is not None and len(self.ensembl_ids) != len(self.symbols):
            raise InputError(f"vocabulary {self.name!r}: {len(self.symbols)} symbols but "
                             f"{len(self.ensembl_ids)} Ensembl IDs")

    def __len__(self) -> int:
        return len(self.symbols)

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 of the content (symbols and Ensembl IDs, in order); the name is not hashed."""
        h = hashlib.sha256("\n".join(self.symbols).encode())
        if self.ensembl_ids is not None:
            h.update(b"\0" + "\n".join(self.ensembl_ids).encode())
        return h.hexdigest()

    @functools.cached_property
    def _positions(self) -> dict[str, int]:
        positions: dict[str, int] = {}
        for i, s in enumerate(self.symbols):
            positions.setdefault(s, i)
        for i, s in enumerate(self.symbols):
            positions.setdefault(s.upper(), i)
        return positions

    def index_of(self, symbol: str) -> int:
        """Position of a gene symbol (exact match first, then case-insensitive)."""
        position = self._positions.get(symbol, self._positions.get(symbol.upper()))
        if position is None:
            raise UnknownName(f"gene {symbol!r} is not in vocabulary {self.name!r} ({len(self)} genes)")
        return position

    def to_tsv(self, path: str | os.PathLike) -> None:
        """Write `gene_name<TAB>index` (the official scFoundation layout), plus `ensembl_id` if any."""
        Path(path).write_text(self.tsv_text(), encoding="utf-8")

    def tsv_text(self) -> str:
        if self.ensembl_ids is None:
            rows = ["gene_name\tindex"] + [f"{s}\t{i}" for i, s in enumerate(self.symbols)]
        else:
            rows = ["gene_name\tindex\tensembl_id"] + [
                f"{s}\t{i}\t{e}" for i, (s, e) in enumerate(zip(self.symbols, self.ensembl_ids))]
        return "\n".join(rows) + "\n"

    @classmethod
    def from_tsv(cls, path: str | os.PathLike, name: str | None = None) -> "Vocabulary":
        """Read `gene_name<TAB>index[<TAB>ensembl_id]`, the scMulan 42,117-gene list
        (`Approved symbol<TAB>Locus group<TAB>Ensembl gene ID`) or one symbol per line."""
        path = Path(path)
        return cls.from_text(path.read_text(encoding="utf-8"), name or path.name.split(".")[0],
                             source=str(path))

    @classmethod
    def from_text(cls, text: str, name: str, source: str = "<text>") -> "Vocabulary":
        lines = [line.rstrip("\r") for line in text.splitlines() if line.strip()]
        if not lines:
            raise InputError(f"vocabulary file {source} is empty")
        header = lines[0].split("\t")
        lowered = [h.strip().lower() for h in header]
        ensembl = None
        if lowered[:2] == ["gene_name", "index"]:
            rows = [line.split("\t") for line in lines[1:]]
            for line_no, row in enumerate(rows, start=2):
                if len(row) < 2 or row[1].strip() != str(line_no - 2):
                    raise InputError(f"{source} line {line_no}: expected `symbol<TAB>{line_no - 2}`, "
                                     f"got {lines[line_no - 1]!r} (the index must equal the row order)")
            symbols = [row[0].strip() for row in rows]
            if "ensembl_id" in lowered:
                column = lowered.index("ensembl_id")
                ensembl = [row[column].strip() for row in rows]
        elif "approved symbol" in lowered:
            rows = [line.split("\t") for line in lines[1:]]
            symbols = [row[lowered.index("approved symbol")].strip() for row in rows]
            if "ensembl gene id" in lowered:
                column = lowered.index("ensembl gene id")
                ensembl = [row[column].strip() if len(row) > column else "" for row in rows]
        elif len(header) == 1:
            symbols = [line.strip() for line in lines]
        else:
            raise InputError(f"{source}: unrecognised vocabulary header {lines[0]!r}; expected "
                             "`gene_name<TAB>index`, the scMulan gene list, or one symbol per line")
        return cls(name=name, symbols=tuple(symbols),
                   ensembl_ids=None if ensembl is None else tuple(ensembl))


def download(url: str, destination: Path, sha256: str) -> Path:
    """Fetch `url` (http(s):// or file://) to `destination` if the SHA-256 matches; atomic."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    hasher = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                hasher.update(chunk)
                out.write(chunk)
        if hasher.hexdigest() != sha256:
            raise InputError(f"checksum mismatch for {url}: got sha256 {hasher.hexdigest()}, "
                             f"expected {sha256}. The file changed or the download is corrupt; "
                             "nothing was cached. Pass a local vocabulary file instead.")
        os.replace(tmp, destination)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return destination


def load_vocabulary(spec: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Vocabulary:
    """`"scfoundation"`, `"scmulan"` (downloaded once, checksum-verified, cached) or a local file."""
    name = str(spec)
    if name not in BUILTIN_VOCABULARIES:
        path = Path(name).expanduser()
        if not path.is_file():
            raise MissingInput(f"vocabulary {name!r}: no such file, and not a built-in name "
                               f"(choose one of {sorted(BUILTIN_VOCABULARIES)} or a TSV path)")
        return Vocabulary.from_tsv(path)
    url, sha256, mirror_path = BUILTIN_VOCABULARIES[name]
    cached = resolve_cache_dir(cache_dir) / "vocabularies" / Path(mirror_path).name
    if not (cached.is_file() and sha256_file(cached) == sha256):
        mirror = os.environ.get(MIRROR_ENV)
        if mirror:
            base = mirror if "://" in mirror else Path(mirror).resolve().as_uri()
            url = base.rstrip("/") + "/" + mirror_path
        try:
            download(url, cached, sha256)
        except OSError as e:
            raise MissingInput(f"could not download the {name} vocabulary from {url}: {e}. Without "
                               f"internet access, set ${MIRROR_ENV} to a folder or URL holding "
                               f"{mirror_path}, or pass the file's path as the vocabulary.") from e
    return Vocabulary.from_tsv(cached, name=name)


@dataclasses.dataclass
class AlignmentReport:
    """How an input's genes landed on a vocabulary."""

    key: str                          # "symbol" or "ensembl"
    num_input_genes: int
    num_matched_genes: int            # input genes that map to a vocabulary position
    num_vocabulary_covered: int       # distinct vocabulary positions that received a gene
    num_vocabulary: int
    duplicated: list[str]             # input genes that map onto an already used position
    unmatched_examples: list[str]
    matched_fraction: float           # of the input genes
    counts_fraction: float | None = None  # of the input's expressed counts, once measured

    def summary(self) -> str:
        text = (f"{self.num_matched_genes}/{self.num_input_genes} input genes matched by "
                f"{self.key} ({self.matched_fraction:.1%}), covering {self.num_vocabulary_covered}/"
                f"{self.num_vocabulary} vocabulary genes")
        if self.counts_fraction is not None:
            text += f"; {self.counts_fraction:.1%} of the expressed counts map"
        if self.duplicated:
            text += f"; {len(self.duplicated)} duplicated genes summed (e.g. {self.duplicated[:5]})"
        if self.unmatched_examples:
            text += f"; unmatched e.g. {self.unmatched_examples}"
        return text

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class CoverageError(InputError):
    """Too small a part of the input's counts maps onto the vocabulary."""


@dataclasses.dataclass
class GeneAlignment:
    """Input gene j goes to vocabulary position `positions[j]` (-1: not in the vocabulary)."""

    vocabulary: Vocabulary
    positions: np.ndarray
    report: AlignmentReport

    @functools.cached_property
    def _matrix(self) -> sp.csr_matrix:
        # [n_input, n_vocab] 0/1 map; X @ map sums duplicates and drops unmatched genes.
        keep = np.flatnonzero(self.positions >= 0)
        return sp.csr_matrix((np.ones(len(keep), np.float32), (keep, self.positions[keep])),
                             shape=(len(self.positions), len(self.vocabulary)))

    def counts_fraction(self, gene_totals: np.ndarray) -> float:
        """Fraction of the counts (per-input-gene totals) that fall on vocabulary genes."""
        total = float(np.sum(gene_totals, dtype=np.float64))
        return float(np.sum(gene_totals[self.positions >= 0], dtype=np.float64)) / total if total else 0.0

    def check_coverage(self, gene_totals: np.ndarray, min_fraction: float, where: str = "input"):
        """Record the counts fraction in the report; raise CoverageError below `min_fraction`."""
        self.report.counts_fraction = self.counts_fraction(np.asarray(gene_totals))
        if self.report.counts_fraction < min_fraction:
            raise CoverageError(
                f"{where}: only {self.report.counts_fraction:.1%} of the expressed counts fall on "
                f"genes of vocabulary {self.vocabulary.name!r} (minimum {min_fraction:.0%}). "
                f"{self.report.summary()}. Check that the genes are human symbols or Ensembl IDs "
                "(pass gene_column / --gene-column to pick the var column that holds them), or "
                "lower the minimum (--min-coverage) if this is expected.")

    def apply(self, rows, min_fraction: float | None = 0.5) -> sp.csr_matrix:
        """Rows over the input genes (dense or sparse) -> CSR float32 on the vocabulary.

        Refuses (CoverageError) when less than `min_fraction` of these rows' counts map.
        """
        matrix = sp.csr_matrix(rows, dtype=np.float32) if not sp.issparse(rows) else rows.tocsr()
        if matrix.shape[1] != len(self.positions):
            raise ValueError(f"rows have {matrix.shape[1]} genes but the alignment was built for "
                             f"{len(self.positions)}")
        if min_fraction is not None:
            self.check_coverage(np.asarray(matrix.sum(axis=0)).ravel(), min_fraction)
        aligned = (matrix.astype(np.float32) @ self._matrix).tocsr()
        aligned.sort_indices()
        return aligned


def _looks_ensembl(names) -> bool:
    sample = [str(n) for n in list(names)[:1000] if str(n)]
    return bool(sample) and sum(bool(_ENSEMBL.match(n)) for n in sample) > 0.5 * len(sample)


def _strip_version(name: str) -> str:
    return name.split(".")[0].upper()


def align_genes(var_names_or_var_df, vocabulary: Vocabulary, gene_column: str | None = None,
                warn_duplicates: bool = True) -> GeneAlignment:
    """Map input genes onto `vocabulary` by symbol or Ensembl ID (auto-detected).

    `var_names_or_var_df`: a list/Index of names, or an AnnData `var` DataFrame (its index, or
    `gene_column` when given). Ensembl IDs need a vocabulary with Ensembl IDs; version suffixes
    (`.12`) are ignored. Several input genes on one vocabulary gene are summed (with a warning).
    """
    if isinstance(var_names_or_var_df, pd.DataFrame):
        frame = var_names_or_var_df
        if gene_column is not None:
            if gene_column not in frame.columns:
                raise UnknownName(f"gene column {gene_column!r} is not in var (columns: "
                                  f"{list(frame.columns)}); omit it to use var_names")
            names = frame[gene_column].astype(str).tolist()
        else:
            names = frame.index.astype(str).tolist()
    else:
        if gene_column is not None:
            raise ValueError("gene_column needs a var DataFrame, not a list of names")
        names = [str(n) for n in var_names_or_var_df]

    if _looks_ensembl(names):
        if vocabulary.ensembl_ids is None:
            raise InputError(f"the input genes look like Ensembl IDs (e.g. {names[:3]}) but vocabulary "
                             f"{vocabulary.name!r} has symbols only; pass the var column holding "
                             "symbols as gene_column / --gene-column")
        key = "ensembl"
        lookup: dict[str, int] = {}
        for i, e in enumerate(vocabulary.ensembl_ids):
            if e:
                lookup.setdefault(_strip_version(e), i)
        positions = np.array([lookup.get(_strip_version(n), -1) for n in names], np.int64)
    else:
        key = "symbol"
        positions = np.array([vocabulary._positions.get(n, vocabulary._positions.get(n.upper(), -1))
                              for n in names], np.int64)

    matched = positions >= 0
    seen: set[int] = set()
    duplicated = []
    for name, position in zip(names, positions):
        if position >= 0:
            if position in seen:
                duplicated.append(name)
            seen.add(int(position))
    if duplicated and warn_duplicates:
        warnings.warn(f"{len(duplicated)} input genes map onto a vocabulary gene that another input "
                      f"gene already maps to; their counts are summed (e.g. {duplicated[:5]})",
                      stacklevel=2)
    report = AlignmentReport(
        key=key, num_input_genes=len(names), num_matched_genes=int(matched.sum()),
        num_vocabulary_covered=len(seen), num_vocabulary=len(vocabulary), duplicated=duplicated,
        unmatched_examples=[n for n, m in zip(names, matched) if not m][:10],
        matched_fraction=float(matched.mean()) if names else 0.0)
    return GeneAlignment(vocabulary=vocabulary, positions=positions, report=report)
