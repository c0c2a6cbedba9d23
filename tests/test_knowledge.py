import re

import numpy as np
import pytest

from synthpert.config import KnowledgeConfig
from synthpert.data import Knowledge, jaccard, load_pairs
from synthpert.errors import SynthPertError

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def knowledge():
    return Knowledge.load()


@pytest.fixture(scope="module")
def pairs():
    return load_pairs(["k562", "rpe1"])


def test_every_perturbqa_symbol_gets_an_official_name(knowledge):
    symbols = set()
    for cell in ("k562", "rpe1", "hepg2", "jurkat"):
        rows = load_pairs([cell])
        symbols |= set(rows.pert.unique()) | set(rows.gene.unique())
    assert [s for s in sorted(symbols) if knowledge.official(s) is None] == []
    # renamed genes (via PerturbQA's own Ensembl mapping), MT- genes, an Ensembl clone name
    expected = {"GARS": "GARS1", "TAZ": "TAFAZZIN", "MPP6": "PALS2", "MT-ND1": "ND1", "MT-CO1": "COX1", "AC118549.1": "ZZZ3", "RPL7": "RPL7"}
    assert {s: knowledge.official(s) for s in expected} == expected
    assert knowledge.name("TAZ").startswith("tafazzin")
    assert knowledge.official("NOT-A-GENE") is None and knowledge.go("NOT-A-GENE") == frozenset()


def test_go_sets_drop_broad_terms_and_no_data_roots(knowledge):
    assert max(n for _, _, n in knowledge.terms.values()) <= 1000
    all_ids = set().union(*knowledge.go_sets(["RPL7", "MYC", "TP53", "GATA1"]).values())
    assert "GO:0005515" not in all_ids  # protein binding: > 12,000 genes
    assert "GO:0008150" not in knowledge.terms  # biological_process root, only 'ND' annotations
    assert {"GO:0022625"} <= knowledge.go("RPL7")  # cytosolic large ribosomal subunit
    narrow = Knowledge.load(cfg=KnowledgeConfig(max_go_gene_count=50))
    assert max(n for _, _, n in narrow.terms.values()) <= 50 < len(knowledge.go("MYC")) / 2 + 50
    assert narrow.go("MYC") < knowledge.go("MYC")


def test_similarity_matrix_agrees_with_set_jaccard(knowledge):
    a, b = ["RPL7", "RPL5", "MYC", "NOT-A-GENE"], ["RPL11", "MYC", "GATA1"]
    matrix = knowledge.similarity_matrix(a, b)
    direct = np.array([[jaccard(knowledge.go(x), knowledge.go(y)) for y in b] for x in a])
    np.testing.assert_allclose(matrix, direct, rtol=1e-6)
    assert matrix[1, 0] > 0.3 > matrix[0, 1]  # ribosomal proteins resemble each other, not MYC
    assert knowledge.similarity("MYC", "MYC") == 1.0 and jaccard(frozenset(), frozenset()) == 0.0


def test_context_names_terms_and_training_neighbours(knowledge, pairs):
    text = knowledge.context("k562", "RPL7", "MYC", pairs)
    assert text == knowledge.context("k562", "RPL7", "MYC", pairs)  # deterministic
    assert "Perturbed gene RPL7: ribosomal protein L7." in text and "Read-out gene MYC: MYC proto-oncogene" in text
    assert "cytosolic large ribosomal subunit [CC]" in text and "Shared GO terms: DNA binding." in text
    train = pairs[(pairs.cell_line == "k562") & (pairs.split == "train")]
    assert "Knockdown of RPL7" not in text  # never P's own rows in its own line (prompt parity)
    listed = re.search(r"Knockdowns most GO-similar to RPL7: (.*)\.", text).group(1).split("; ")
    assert len(listed) == 3 and listed[0].startswith("RPL36A: ")  # another ribosomal protein first
    for item in listed:  # each neighbour's label is its real training label for MYC
        pert, label = re.match(r"(\S+): (.+) \(GO similarity", item).groups()
        assert train[(train.pert == pert) & (train.gene == "MYC")].label.tolist() == [label]
    assert "in RPE1" not in text  # same cell line only by default
    pooled = knowledge.context("k562", "RPL7", "MYC", pairs, KnowledgeConfig(cross_cell_line=True))
    assert "(all cell lines)" in pooled and " in RPE1: " in pooled
    others = pairs[(pairs.split == "train") & (pairs.pert == "RPL7") & (pairs.cell_line != "k562") & (pairs.gene != "MYC")]
    counts = others.label.value_counts()
    assert f"Knockdown of RPL7 in other cell lines, other read-out genes: {counts['upregulated']} upregulated" in pooled
    assert " in K562: " not in pooled.split("Knockdown of RPL7")[1].split("\n  MYC under")[0]


def test_a_training_tuple_gets_the_context_of_an_unseen_perturbation(knowledge, pairs):
    """Prompt parity: a training tuple's context holds no row of its own perturbation (in its line),
    exactly like a test tuple's, whose perturbation is never a training one of its line."""
    train = pairs[(pairs.cell_line == "k562") & (pairs.split == "train")]
    row = train[train.de == 1].iloc[0]
    text = knowledge.context("k562", row.pert, row.gene, pairs)
    assert row.pert in text and "Knockdown of" not in text
    listed = re.search(r"Knockdowns most GO-similar to \S+: (.*)\.", text)
    assert listed is None or row.pert not in {item.split(":")[0] for item in listed.group(1).split("; ")}
    g_rows = train[(train.gene == row.gene) & (train.pert != row.pert)].label.value_counts()
    assert f"{row.gene} under other knockdowns: {g_rows.get('upregulated', 0)} upregulated" in text
    test_row = pairs[(pairs.cell_line == "k562") & (pairs.split == "test")].iloc[0]
    test_text = knowledge.context("k562", test_row.pert, test_row.gene, pairs)
    for context in (text, test_text):  # the same sections, train or test
        assert "under other knockdowns" in context and "Knockdown of" not in context


def test_context_never_uses_test_labels_or_the_query_pair(knowledge, pairs):
    test_row = pairs[(pairs.cell_line == "rpe1") & (pairs.split == "test") & (pairs.de == 1)].iloc[0]
    text = knowledge.context("rpe1", test_row.pert, test_row.gene, pairs)  # full table passed in
    assert "Knockdown of" not in text
    test_perts = set(pairs[(pairs.cell_line == "rpe1") & (pairs.split == "test")].pert)
    listed = re.search(r"Knockdowns most GO-similar to \S+: (.*)\.", text)
    assert listed and not {item.split(":")[0] for item in listed.group(1).split("; ")} & test_perts
    # a training pair: its own label is not counted under its read-out gene's other knockdowns
    row = pairs[(pairs.cell_line == "k562") & (pairs.split == "train") & (pairs.de == 1)].iloc[0]
    text = knowledge.context("k562", row.pert, row.gene, pairs)
    others = pairs[(pairs.cell_line == "k562") & (pairs.split == "train") & (pairs.gene == row.gene)]
    assert f"{(others.label == row.label).sum() - 1} {row.label}" in text


def test_context_size_and_switch(knowledge, pairs):
    assert knowledge.context("k562", "RPL7", "MYC", pairs, KnowledgeConfig(enabled=False)) is None
    small = knowledge.context("k562", "RPL7", "MYC", pairs, KnowledgeConfig(max_go_terms=2, neighbours=1))
    assert re.search(r"GO terms of RPL7: ([^\n]*)", small).group(1).count("; ") == 1
    assert re.search(r"Knockdowns most GO-similar to RPL7: ([^\n]*)", small).group(1).count("; ") == 0
    bare = knowledge.context("k562", "RPL7", "MYC", None)
    assert "training" not in bare and bare == knowledge.context("k562", "RPL7", "MYC", pairs, KnowledgeConfig(neighbours=0))
    unknown = knowledge.context("k562", "FOO1", "MT-ND1")
    assert "Perturbed gene FOO1: no annotation found." in unknown and "MT-ND1 (official symbol ND1)" in unknown
    with pytest.raises(SynthPertError, match="unknown cell line"):
        knowledge.context("hela", "RPL7", "MYC")


def test_locations_and_propagated_go_sets(knowledge):
    where = knowledge.locations(["TP53", "MDM2", "NOT-A-GENE"])
    assert where.loc[0, ["chromosome", "arm", "band", "cytoband"]].tolist() == ["17", "17p", "17p13", "17p13.1"]
    assert where.loc[0, "position"] == -13.1 and where.loc[1, "position"] == 15.0 and where.loc[2].isna().all()
    direct, propagated = knowledge.go_matrix(["TP53"]), knowledge.propagated_matrix(["TP53"])
    assert propagated.sum() > direct.sum() > 0  # ancestors added
    ic = knowledge.information_content
    assert ic.shape == (propagated.shape[1],) and (ic >= 0).all() and ic[propagated.indices].min() < ic[propagated.indices].max()


def test_training_and_evaluation_prompts_take_neighbours_from_one_pool():
    """The same (P, G) gets the same context as a training tuple (the traces' sample) and as an
    evaluation tuple (eval_tuples' pool: the line's whole training part minus validation). Built
    from the sample, a smoke-sized run's training prompts said "none in the training data"."""
    from synthpert.config import load_config
    from synthpert.data import load_split, sample_tuples, with_context
    from tests.conftest import REPO

    data = load_config(REPO / "configs" / "local.yaml").data
    sample = sample_tuples(data)
    as_evaluated = with_context(sample.assign(split="test"), load_split(data), data)
    assert list(sample["context"]) == list(as_evaluated["context"])
    listed = sample["context"].str.contains("Knockdowns most GO-similar to")
    assert listed.mean() > 0.5 and not sample["context"].str.contains("under other knockdowns: none").all(), sample["context"].tolist()
