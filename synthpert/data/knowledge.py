"""Gene and GO knowledge for prompts (SUMMER-style) and for the similarity-based baselines.

`Knowledge.load()` reads the vendored gene / GO tables once and indexes them: official names
(PerturbQA symbols resolved directly, then through PerturbQA's own symbol -> Ensembl mapping,
then through gene aliases, MT- genes included), GO term sets per gene with the over-broad terms
(annotated to more than `max_go_gene_count` genes) and "no data" root annotations dropped, and
GO Jaccard similarity (per pair of genes, or as a matrix via sparse products), GO sets propagated up
the hierarchy and genomic locations (for the ranker's features). `context()` renders a deterministic
text block for one (cell line, P, G) tuple from these and from labelled TRAINING pairs only.
"""

from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from synthpert.config import LABELS, KnowledgeConfig
from synthpert.data.files import data_file, read_csv
from synthpert.data.perturbqa import check_cell_lines
from synthpert.errors import SynthPertError
from synthpert.prompts import CELL_DESCRIPTIONS

ONTOLOGIES = ("BP", "MF", "CC")
HIERARCHY = ("isa", "part of")  # go_parents edges a term's genes inherit upwards
_CYTOBAND = re.compile(r"^(\d+|X|Y)([pq])(\d+)?(?:\.(\d+))?")  # 19q13.43: chromosome, arm, band, sub-band
_STR = pa.string()


def jaccard(a: frozenset, b: frozenset) -> float:
    """|a & b| / |a | b| (0 when both are empty)."""
    union = len(a | b)
    return len(a & b) / union if union else 0.0


@dataclass(frozen=True)
class _TrainIndex:
    """Training rows as arrays, grouped by perturbation and by read-out gene.

    Keys are (cell_line, symbol), or (symbol,) when neighbours are pooled over cell lines.
    """

    columns: dict[str, np.ndarray]
    by_pert: dict[tuple, np.ndarray]
    by_gene: dict[tuple, np.ndarray]


class Knowledge:
    """Official names, filtered GO sets and GO similarity for gene symbols, plus prompt context."""

    def __init__(self, info: dict[str, list[str]], ensembl_of: dict[str, str], go: dict[str, frozenset], terms: dict[str, tuple[str, str, int]], cfg: KnowledgeConfig,
                 data_dir: str | Path | None = None):
        self.data_dir = data_dir  # the hierarchy (go_parents) is read from here on first use
        self._info, self._ensembl_of = info, ensembl_of  # gene_info columns; PerturbQA symbol -> Ensembl id
        self._names = dict(zip(reversed(info["symbol"]), reversed(info["gene_name"])))  # official -> name (first row wins)
        self._go = go  # official symbol -> frozenset of GO ids (filtered)
        self.terms = terms  # kept GO id -> (term, ontology, number of genes annotated)
        self.cfg = cfg
        self._rank = {go_id: i for i, go_id in enumerate(sorted(terms, key=lambda g: (terms[g][2], g)))}
        self._column = {go_id: i for i, go_id in enumerate(sorted(terms))}
        self._train: tuple[object, bool, _TrainIndex] | None = None

    @classmethod
    def load(cls, data_dir: str | Path | None = None, cfg: KnowledgeConfig | None = None) -> Knowledge:
        """Read and index the vendored (or `data_dir`) gene and GO tables."""
        cfg = cfg or KnowledgeConfig()
        info = _columns("gene_info.tsv.gz", ("entrez_id", "symbol", "gene_name", "gene_type", "ensembl_ids", "aliases", "chromosome", "cytogenetic_location"), data_dir)
        mapping_path = data_file("perturbqa", "k562_gw_mapping_full.json", data_dir)
        try:
            ensembl_of = json.loads(mapping_path.read_text())
        except json.JSONDecodeError as exc:
            raise SynthPertError(f"{mapping_path} is not valid JSON: {exc}") from exc
        # "ND" (no biological data) marks root-term placeholders, not knowledge
        annotations = _table("gene_go_direct.tsv.gz", ("symbol", "go_id", "evidence"), data_dir)
        annotations = annotations.filter(pc.not_equal(annotations["evidence"], "ND"))
        n_genes = annotations.group_by("go_id").aggregate([("symbol", "count_distinct")])
        n_genes = n_genes.filter(pc.less_equal(n_genes["symbol_count_distinct"], cfg.max_go_gene_count))
        kept = dict(zip(n_genes["go_id"].to_pylist(), n_genes["symbol_count_distinct"].to_pylist()))
        term_table = _table("go_terms.tsv.gz", ("go_id", "term", "ontology"), data_dir)
        term_table = term_table.filter(pc.is_in(term_table["go_id"], value_set=n_genes["go_id"]))
        terms = {g: (t, o, kept[g]) for g, t, o in zip(*(term_table[c].to_pylist() for c in ("go_id", "term", "ontology")))}
        annotations = annotations.filter(pc.is_in(annotations["go_id"], value_set=term_table["go_id"]))
        per_gene = annotations.group_by("symbol").aggregate([("go_id", "distinct")])
        go = {s: frozenset(ids) for s, ids in zip(per_gene["symbol"].to_pylist(), per_gene["go_id_distinct"].to_pylist())}
        return cls(info, ensembl_of, go, terms, cfg, data_dir)

    # ------------------------------------------------------------------ lookups
    @functools.cached_property
    def _resolved(self) -> dict[str, str]:
        """Non-official symbol -> official symbol (built on the first symbol that needs it)."""
        return _resolve_symbols(self._info, self._ensembl_of, self._names)

    def official(self, symbol: str) -> str | None:
        """The official (Entrez) symbol of a PerturbQA symbol, or None when it cannot be resolved."""
        if symbol in self._names:
            return symbol
        if symbol in self._resolved:
            return self._resolved[symbol]
        return self._resolved.get(symbol.replace("-", "", 1)) if symbol.startswith("MT-") else None

    def name(self, symbol: str) -> str | None:
        official = self.official(symbol)
        return None if official is None else self._names[official]

    def go(self, symbol: str) -> frozenset:
        """GO ids annotated to the gene (direct annotations, over-broad terms dropped)."""
        official = self.official(symbol)
        return self._go.get(official, frozenset()) if official else frozenset()

    def go_sets(self, symbols: Iterable[str]) -> dict[str, frozenset]:
        return {s: self.go(s) for s in symbols}

    def similarity(self, a: str, b: str) -> float:
        """GO Jaccard similarity of two genes."""
        return jaccard(self.go(a), self.go(b))

    def go_matrix(self, symbols: Iterable[str]) -> sp.csr_matrix:
        """Binary sparse matrix: one row per symbol, one column per kept GO term."""
        symbols = list(symbols)
        rows, cols = [], []
        for i, symbol in enumerate(symbols):
            ids = [self._column[g] for g in self.go(symbol)]
            rows += [i] * len(ids)
            cols += ids
        return sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(len(symbols), len(self._column)))

    def similarity_matrix(self, symbols_a: list[str], symbols_b: list[str]) -> np.ndarray:
        """Dense Jaccard matrix (len(a) x len(b)) from sparse products: for retrieval over many genes."""
        a, b = self.go_matrix(symbols_a), self.go_matrix(symbols_b)
        inter = (a @ b.T).toarray()
        union = np.asarray(a.sum(1)) + np.asarray(b.sum(1)).T - inter
        return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)

    @functools.cached_property
    def column_terms(self) -> pd.DataFrame:
        """Per `go_matrix` column: its ontology (BP, MF, CC) and how many genes it is annotated to."""
        ids = sorted(self._column, key=self._column.__getitem__)
        return pd.DataFrame({"ontology": [self.terms[g][1] for g in ids], "genes": [self.terms[g][2] for g in ids]})

    @functools.cached_property
    def _propagation(self) -> tuple[sp.csr_matrix, np.ndarray]:
        """(kept term x every GO term) reachability over `HIERARCHY` edges, self included, and each
        term's information content -log(share of annotated genes carrying it after propagation)."""
        edges = _table("go_parents.tsv.gz", ("child", "parent", "relationship_type"), self.data_dir)
        edges = edges.filter(pc.is_in(edges["relationship_type"], value_set=pa.array(HIERARCHY)))
        child, parent = edges["child"].to_pylist(), edges["parent"].to_pylist()
        ids = pd.Index(sorted(set(self._column) | set(child) | set(parent)))
        step = sp.csr_matrix((np.ones(len(child)), (ids.get_indexer(child), ids.get_indexer(parent))), shape=(len(ids),) * 2)
        kept = ids.get_indexer(sorted(self._column, key=self._column.__getitem__))
        reach = sp.csr_matrix((np.ones(len(kept)), (np.arange(len(kept)), kept)), shape=(len(kept), len(ids)))
        while True:  # add parents until nothing new (the hierarchy is a DAG, ~15 levels deep)
            grown = ((reach + reach @ step) > 0).astype(float)
            if grown.nnz == reach.nnz:
                break
            reach = grown
        genes = ((self.go_matrix(self._go) @ reach) > 0).astype(float)
        share = np.asarray(genes.sum(axis=0)).ravel() / max(genes.shape[0], 1)
        return reach.tocsr(), -np.log(np.where(share > 0, share, 1.0))

    def propagated_matrix(self, symbols: Iterable[str]) -> sp.csr_matrix:
        """`go_matrix` with every ancestor term of each annotation set (columns: all GO terms)."""
        return ((self.go_matrix(symbols) @ self._propagation[0]) > 0).astype(float).tocsr()

    @property
    def information_content(self) -> np.ndarray:
        """-log(share of annotated genes) per `propagated_matrix` column: specific terms weigh more."""
        return self._propagation[1]

    def locations(self, symbols: Iterable[str]) -> pd.DataFrame:
        """Chromosome, arm (19q), band (19q13), cytoband (19q13.43) and a position along the
        chromosome (p bands negative, q positive: 13.43 for q13.43) from gene_info; None/NaN where unknown."""
        where = dict(zip(reversed(self._info["symbol"]), reversed(self._info["cytogenetic_location"])))
        rows = []
        for symbol in symbols:
            match = _CYTOBAND.match((where.get(self.official(symbol) or "", "") or "").split(";")[0])
            if match is None:
                rows.append((None, None, None, None, np.nan))
                continue
            chrom, arm, band, sub = match.groups()
            position = float(f"{band or 0}.{sub or 0}") * (-1 if arm == "p" else 1)
            rows.append((chrom, chrom + arm, f"{chrom}{arm}{band or ''}", match.group(0), position))
        return pd.DataFrame(rows, columns=["chromosome", "arm", "band", "cytoband", "position"])

    def top_terms(self, ids: Iterable[str], n: int) -> list[str]:
        """Up to n GO ids, most specific (fewest genes) first, alternating BP, MF, CC for variety."""
        by_ontology = {o: sorted((g for g in ids if self.terms[g][1] == o), key=self._rank.__getitem__) for o in ONTOLOGIES}
        merged = [g for rnd in zip(*(lst + [None] * (n - len(lst)) for lst in by_ontology.values())) for g in rnd if g]
        return merged[:n]

    # ------------------------------------------------------------------ prompt context
    def _index(self, train_pairs: pd.DataFrame, pooled: bool) -> _TrainIndex:
        """Index the training rows once per train_pairs object (a context call is then ~1 ms)."""
        if self._train is not None and self._train[0] is train_pairs and self._train[1] == pooled:
            return self._train[2]
        rows = train_pairs
        if "split" in rows.columns:
            rows = rows[rows["split"] == "train"]  # never test labels, whatever the caller passed
        coded = {}  # column -> (integer codes, distinct values as a list of str)
        for c in ("cell_line", "pert", "gene", "label"):
            codes, uniques = pd.factorize(rows[c])
            coded[c] = (codes, [str(u) for u in uniques])
        columns = {c: np.asarray(names, dtype=object)[codes] for c, (codes, names) in coded.items()}

        def group(column: str) -> dict[tuple, np.ndarray]:
            (cells, cell_names), (symbols, names) = coded["cell_line"], coded[column]
            key = symbols.astype(np.int64) if pooled else cells.astype(np.int64) * len(names) + symbols
            order = np.argsort(key, kind="stable")
            unique, starts = np.unique(key[order], return_index=True)
            label = (lambda k: (names[k],)) if pooled else (lambda k: (cell_names[k // len(names)], names[k % len(names)]))
            return {label(k): chunk for k, chunk in zip(unique.tolist(), np.split(order, starts[1:]))}

        index = _TrainIndex(columns, group("pert"), group("gene"))
        self._train = (train_pairs, pooled, index)
        return index

    def _describe(self, role: str, symbol: str, n_terms: int) -> list[str]:
        official = self.official(symbol)
        if official is None:
            return [f"{role} {symbol}: no annotation found."]
        alias = "" if official == symbol else f" (official symbol {official})"
        lines = [f"{role} {symbol}{alias}: {self.name(symbol)}."]
        top = self.top_terms(self.go(symbol), n_terms)
        if top:
            lines.append(f"  GO terms of {symbol}: " + "; ".join(f"{self.terms[g][0]} [{self.terms[g][1]}]" for g in top) + ".")
        return lines

    def _neighbours(self, index: _TrainIndex, positions, other: str, query: str, exclude: str, n: int, pooled: bool,
                    skip_cell: str | None = None) -> tuple[str, list[str]]:
        """Label counts at `positions` (rows whose `other` gene is `exclude`, and rows of `skip_cell`,
        left out) and the n rows whose `other` gene is most GO-similar to `query` (similarity > 0;
        ties by symbol, then cell line)."""
        positions = np.asarray([] if positions is None else positions, dtype=int)
        symbols, labels, cells = (index.columns[c][positions] for c in (other, "label", "cell_line"))
        keep = (symbols != exclude) & (cells != skip_cell)
        symbols, labels, cells = symbols[keep], labels[keep], cells[keep]
        if not len(symbols):
            return "none in the training data", []
        counts = Counter(labels)
        summary = ", ".join(f"{counts.get(label, 0)} {label}" for label in LABELS)
        target = self.go(query)
        scored = sorted((-jaccard(target, self.go(s)), s, c, lab) for s, c, lab in zip(symbols, cells, labels))
        where = (lambda c: f" in {_short(c)}") if pooled else (lambda c: "")
        best = [f"{s}{where(c)}: {lab} (GO similarity {-sim:.2f})" for sim, s, c, lab in scored[:n] if sim < 0]
        return summary, best

    def context(self, cell_line: str, pert: str, gene: str, train_pairs: pd.DataFrame | None = None, cfg: KnowledgeConfig | None = None) -> str | None:
        """Deterministic background text for one tuple; None when knowledge is switched off.

        Gene names and the most specific GO terms of P and G, their shared terms, and with
        `train_pairs` the labels of G under other knockdowns (the most GO-similar listed first)
        and, with cfg.cross_cell_line, of P in the OTHER cell lines. Only rows with split ==
        "train" are used, and never a row of P in the tuple's own line: a test (or validation)
        perturbation is never a training perturbation of its line, so a training tuple's prompt is
        built as if P were unseen too, and train and test prompts show the same kinds of facts.
        """
        cfg = cfg or self.cfg
        if not cfg.enabled:
            return None
        check_cell_lines([cell_line])
        lines = self._describe("Perturbed gene", pert, cfg.max_go_terms) + self._describe("Read-out gene", gene, cfg.max_go_terms)
        shared = self.top_terms(self.go(pert) & self.go(gene), cfg.max_go_terms)
        lines.append("Shared GO terms: " + ("; ".join(self.terms[g][0] for g in shared) if shared else "none") + ".")
        if train_pairs is not None and cfg.neighbours > 0:
            pooled = cfg.cross_cell_line
            index = self._index(train_pairs, pooled)
            key = () if pooled else (cell_line,)
            lines.append(f"Labelled training data ({'all cell lines' if pooled else _short(cell_line)}):")
            if pooled:
                p_summary, p_best = self._neighbours(index, index.by_pert.get((pert,)), "gene", gene, gene, cfg.neighbours,
                                                     pooled, skip_cell=cell_line)
                lines.append(f"  Knockdown of {pert} in other cell lines, other read-out genes: {p_summary}.")
                if p_best:
                    lines.append(f"    Read-out genes most GO-similar to {gene}: " + "; ".join(p_best) + ".")
            g_summary, g_best = self._neighbours(index, index.by_gene.get((*key, gene)), "pert", pert, pert, cfg.neighbours, pooled)
            lines.append(f"  {gene} under other knockdowns: {g_summary}.")
            if g_best:
                lines.append(f"    Knockdowns most GO-similar to {pert}: " + "; ".join(g_best) + ".")
        return "\n".join(lines)


def _short(cell_line: str) -> str:
    return CELL_DESCRIPTIONS[cell_line].split(" ")[0]


def _table(name: str, columns: tuple[str, ...], data_dir) -> pa.Table:
    return read_csv(data_file("annotations", name, data_dir), {c: _STR for c in columns}, delimiter="\t").select(list(columns))


def _columns(name: str, columns: tuple[str, ...], data_dir) -> dict[str, list[str]]:
    """Columns of an annotation TSV as Python lists."""
    table = _table(name, columns, data_dir)
    return {c: table[c].to_pylist() for c in columns}


def _resolve_symbols(info: dict[str, list[str]], ensembl_of: dict[str, str], official: dict[str, str]) -> dict[str, str]:
    """Symbol -> official symbol for names that are not official: PerturbQA's Ensembl mapping, then aliases.

    An alias shared by several genes goes to the one whose symbol extends it (GARS -> GARS1), then
    to a protein-coding gene, then to the lowest Entrez id.
    """
    by_ensembl: dict[str, list[str]] = {}
    candidates: dict[str, list[tuple]] = {}
    for entrez, symbol, gene_type, ensembl_ids, aliases in zip(info["entrez_id"], info["symbol"], info["gene_type"], info["ensembl_ids"], info["aliases"]):
        for ens in filter(None, ensembl_ids.split(";")):
            by_ensembl.setdefault(ens, []).append(symbol)
        for alias in filter(None, aliases.split(";")):
            if alias not in official:
                rank = (not symbol.startswith(alias), gene_type != "protein-coding", int(entrez) if entrez.isdigit() else 1 << 62)
                candidates.setdefault(alias, []).append((rank, symbol))
    by_alias = {alias: min(options)[1] for alias, options in candidates.items()}
    by_mapping = {s: by_ensembl[e][0] for s, e in ensembl_of.items() if s not in official and len(by_ensembl.get(e, ())) == 1}
    return {**by_alias, **by_mapping}
