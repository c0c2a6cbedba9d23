import gzip
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from synthpert.config import CELL_LINES, DataConfig
from synthpert.data import apply_split, build_split, evaluation_view, gene_sample, leakage_report, load_pairs, load_split, read_user_pairs, subsample
from synthpert.data.files import VENDOR_DIR
from synthpert.errors import SynthPertError
from tests.conftest import run_cli


# /work/shared/data/README.md: (DE train, DE test, dir train, dir test, share up in dir train, in dir test)
README_COUNTS = {
    "k562": (134_467, 23_212, 16_861, 3_119, 0.655, 0.811),
    "rpe1": (149_147, 37_942, 21_287, 5_365, 0.394, 0.395),
    "hepg2": (101_140, 25_749, 14_257, 3_603, 0.438, 0.444),
    "jurkat": (113_684, 29_138, 15_937, 4_121, 0.321, 0.335),
}


@pytest.fixture(scope="module")
def pairs():
    return load_pairs()


@pytest.mark.unit
def test_counts_match_the_data_readme(pairs):
    assert list(pairs.columns) == ["cell_line", "pert", "gene", "de", "direction", "label", "split"]
    for cell, (de_train, de_test, dir_train, dir_test, up_train, up_test) in README_COUNTS.items():
        rows = pairs[pairs.cell_line == cell]
        for split, n_de, n_dir, up in (("train", de_train, dir_train, up_train), ("test", de_test, dir_test, up_test)):
            part = rows[rows.split == split]
            assert len(part) == n_de
            assert int(part.de.sum()) == n_dir
            assert (part.direction == "up").sum() / n_dir == pytest.approx(up, abs=6e-4)
    assert not pairs.duplicated(["cell_line", "pert", "gene"]).any()


@pytest.mark.unit
def test_labels_are_consistent_with_de_and_direction(pairs):
    expected = {("up", 1): "upregulated", ("down", 1): "downregulated", ("none", 0): "not differentially expressed"}
    combos = pairs.groupby(["direction", "de", "label"], observed=True).size()
    assert {(d, de): lab for d, de, lab in combos.index} == expected


@pytest.mark.unit
def test_official_split_has_unseen_perturbations_within_a_line(pairs):
    for cell in CELL_LINES:
        rows = pairs[pairs.cell_line == cell]
        assert not rows[rows.split == "test"].pert.isin(rows[rows.split == "train"].pert.unique()).any()


@pytest.mark.unit
def test_shared_layout_and_flat_layout_give_the_same_table(tmp_path, pairs):
    k562 = pairs[pairs.cell_line == "k562"].reset_index(drop=True)
    assert load_pairs(["k562"], data_dir=VENDOR_DIR).equals(k562)  # (assert_frame_equal is slow on str)
    for name in ("k562-de.csv.gz", "k562-dir.csv.gz"):
        shutil.copy(VENDOR_DIR / "perturbqa" / name, tmp_path / name)  # flat, no SHA256SUMS
    flat = load_pairs("k562", data_dir=tmp_path)
    assert flat.equals(k562) and (flat.dtypes == k562.dtypes).all()


@pytest.mark.unit
def test_checksum_mismatch_is_a_clear_error(tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(VENDOR_DIR, copy)
    target = copy / "perturbqa" / "rpe1-dir.csv.gz"
    target.chmod(0o644)
    target.write_bytes(gzip.compress(gzip.decompress(target.read_bytes()) + b"A,B,1,train\n"))
    with pytest.raises(SynthPertError, match=r"checksum mismatch for .*rpe1-dir\.csv\.gz"):
        load_pairs(["rpe1"], data_dir=copy)
    load_pairs(["k562"], data_dir=copy)  # the other files still verify


def _write(directory, name, text):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(gzip.compress(text.encode()))


DE = "pert,gene,label,split\nP1,G1,1,train\nP1,G2,0,train\nP2,G1,1,test\nP2,G2,0,test\n"
DIR = "pert,gene,label,split\nP1,G1,1,train\nP2,G1,0,test\n"


@pytest.mark.parametrize(
    "de, direction, message",
    [
        (DE, DIR, None),
        (DE, "pert,gene,label,split\nP1,G1,1,train\n", r"k562-de\.csv\.gz: line 4: DE-positive pair without a direction row.*\(P2, G1\)"),
        (DE, DIR + "P1,G2,1,train\n", r"k562-dir\.csv\.gz: line 4: direction row for a pair that is not DE-positive.*\(P1, G2\)"),
        (DE, DIR + "P9,G1,1,train\n", r"k562-dir\.csv\.gz: line 4: direction row .*\(P9, G1\)"),
        (DE, DIR.replace("P2,G1,0,test", "P2,G1,0,train"), r"k562-dir\.csv\.gz: line 3: split differs .*\(P2, G1\)"),
        (DE + "P1,G1,0,train\n", DIR, r"k562-de\.csv\.gz: line 6: duplicate pair \(P1, G1\)"),
        (DE.replace("P1,G2,0", "P1,G2,2"), DIR, r"k562-de\.csv\.gz: line 3: label 2 is not one of \[0, 1\]"),
        (DE.replace("P2,G2,0,test", "P2,G2,0,valid"), DIR, r"line 5: split valid is not one of"),
        (DE.replace("P1,G2,0", "P1,G2,x"), DIR, r"cannot read .*k562-de\.csv\.gz.*'x'"),
        (DE.replace("gene,", "readout,"), DIR, r"k562-de\.csv\.gz lacks column\(s\) \['gene'\]"),
    ],
)
@pytest.mark.unit
def test_join_and_value_errors_name_file_and_pair(tmp_path, de, direction, message):
    _write(tmp_path / "perturbqa", "k562-de.csv.gz", de)
    _write(tmp_path / "perturbqa", "k562-dir.csv.gz", direction)
    if message is None:
        got = load_pairs(["k562"], data_dir=tmp_path)
        assert got.label.tolist() == ["upregulated", "not differentially expressed", "downregulated", "not differentially expressed"]
        assert got.split.tolist() == ["train", "train", "test", "test"]
    else:
        with pytest.raises(SynthPertError, match=message):
            load_pairs(["k562"], data_dir=tmp_path)


@pytest.mark.unit
def test_missing_file_and_unknown_cell_line(tmp_path):
    with pytest.raises(SynthPertError, match=r"data file not found: .*hepg2-de\.csv\.gz"):
        load_pairs(["hepg2"], data_dir=tmp_path)
    with pytest.raises(SynthPertError, match=r"unknown cell line\(s\) \['k526'\]"):
        load_pairs(["k526"])
    with pytest.raises(SynthPertError, match="not a directory"):
        load_pairs(["k562"], data_dir=tmp_path / "nope")


@pytest.mark.unit
def test_holdout_split_tests_on_the_whole_line(pairs):
    held = apply_split(pairs, "holdout:rpe1")
    assert (held.split[held.cell_line == "rpe1"] == "test").all()
    assert (held.split[held.cell_line != "rpe1"] == "train").all()
    assert pairs.attrs["split"] == "perturbqa" and (pairs.split == "test").sum() == 116_041  # input untouched
    with pytest.raises(SynthPertError, match="reload"):
        apply_split(held, "perturbqa")
    with pytest.raises(SynthPertError, match="unknown split 'holdout:mouse'"):
        apply_split(pairs, "holdout:mouse")
    with pytest.raises(SynthPertError, match="needs at least one other cell line"):
        apply_split(pairs[pairs.cell_line == "rpe1"], "holdout:rpe1")


@pytest.mark.unit
def test_leakage_report_counts(pairs):
    report = leakage_report(pairs)
    k562 = report["per_cell_line"]["k562"]
    assert (k562["test_perturbations"], k562["test_perturbations_in_train"]) == (267, 254)  # data README
    assert report["test_pairs"] == 116_041
    # recompute one line directly
    rpe1_test = pairs[(pairs.cell_line == "rpe1") & (pairs.split == "test")]
    train = pairs[pairs.split == "train"]
    seen = pd.MultiIndex.from_frame(rpe1_test[["pert", "gene"]]).isin(pd.MultiIndex.from_frame(train[["pert", "gene"]]))
    assert report["per_cell_line"]["rpe1"]["test_pairs_in_train"] == seen.sum() > 0
    assert 0.5 < report["pair_label_agreement"] < 1
    alone = leakage_report(load_pairs(["k562"]))
    assert alone["test_perturbations_in_train"] == 0 and alone["test_pairs_in_train"] == 0
    held = leakage_report(apply_split(pairs, "holdout:rpe1"))
    assert list(held["per_cell_line"]) == ["rpe1"] and held["split"] == "holdout:rpe1"
    assert held["test_pairs"] == 37_942 + 149_147


@pytest.mark.unit
def test_subsample_is_seeded_exact_and_stratified(pairs):
    a = subsample(pairs, limit=1000, seed=3)
    assert len(a) == 1000
    assert a.equals(subsample(pairs, limit=1000, seed=3))
    assert not a.equals(subsample(pairs, limit=1000, seed=4))
    share = pairs.groupby(["cell_line", "split", "label"], observed=True).size() / len(pairs)
    got = a.groupby(["cell_line", "split", "label"], observed=True).size().reindex(share.index, fill_value=0)
    assert np.abs(got - share * 1000).max() < 1  # every stratum within one row of its share
    assert len(subsample(pairs, fraction=0.01)) == round(0.01 * len(pairs))
    assert len(subsample(pairs, fraction=0.5, limit=7, stratify=False)) == 7
    assert subsample(pairs) is pairs
    with pytest.raises(SynthPertError, match="fraction"):
        subsample(pairs, fraction=1.5)


@pytest.mark.parametrize("limit", [8, 60])
@pytest.mark.unit
def test_gene_sample_keeps_the_per_gene_auroc_defined(pairs, limit):
    from synthpert.evaluate import mean_auroc_per_gene

    test = apply_split(pairs[pairs.cell_line == "k562"], "perturbqa")
    test = test[test.split == "test"]
    got = gene_sample(test, limit, seed=1)
    assert len(got) == limit and got.equals(gene_sample(test, limit, seed=1)) and got.index.is_monotonic_increasing
    assert got.gene.nunique() < limit / 2  # whole genes, not one pair each
    labels = got.groupby("gene", observed=True).label.nunique()
    assert (labels == 3).sum() >= len(labels) - 1  # all three classes, but for a last gene cut short
    de = (got.label != "not differentially expressed").to_numpy()
    score = np.random.default_rng(0).random(len(got))
    assert not np.isnan(mean_auroc_per_gene(got.gene.to_numpy(), de, score))
    assert gene_sample(test, len(test), seed=1) is test
    with pytest.raises(SynthPertError, match="limit"):
        gene_sample(test, 0)


@pytest.mark.unit
def test_build_split_samples_training_rows_and_keeps_the_test_set():
    got = build_split(DataConfig(cell_lines=["k562", "rpe1"], split="holdout:rpe1", limit=500, seed=1))
    assert set(got.split[got.cell_line == "rpe1"]) == {"test"} and (got.split == "test").sum() == 149_147 + 37_942
    train = got[got.split.isin(["train", "validation"])]  # the teacher's pool: train + validation
    assert len(train) == 500 and set(train.cell_line) == {"k562"} and got.index.equals(pd.RangeIndex(len(got)))
    assert train.label.value_counts()["upregulated"] == round(500 * (11_041 + 2_530) / (134_467 + 23_212))
    official = build_split(DataConfig(cell_lines=["k562"], fraction=0.1))
    assert official.split.isin(["train", "validation"]).sum() == round(0.1 * 134_467) and (official.split == "test").sum() == 23_212
    with pytest.raises(SynthPertError, match="not among the loaded lines"):
        build_split(DataConfig(cell_lines=["k562"], split="holdout:rpe1"))


@pytest.mark.parametrize("split", ["perturbqa", "holdout:rpe1"])
@pytest.mark.slow  # seconds: a CLI subprocess, a loopback server or a fit over whole lines
def test_validation_is_carved_from_train_by_perturbation(split):
    cfg = DataConfig(cell_lines=["k562", "rpe1"], split=split, validation_fraction=0.1, seed=3)
    pairs = load_split(cfg)
    official = apply_split(load_pairs(["k562", "rpe1"]), split)
    assert ((pairs.split == "test") == (official.split == "test")).all()  # the test set is untouched
    perts = {part: set(zip(rows.cell_line, rows.pert)) for part, rows in pairs.groupby("split", observed=True)}
    assert not perts["validation"] & perts["train"] and not perts["validation"] & perts["test"]  # disjoint by perturbation
    for cell, rows in pairs[pairs.split != "test"].groupby("cell_line", observed=True):
        share = rows[rows.split == "validation"].pert.nunique() / rows.pert.nunique()
        assert 0.05 < share < 0.15, (cell, share)
    assert pairs.split.equals(load_split(cfg).split)  # seeded: the same every time
    assert not load_split(cfg.model_copy(update={"seed": 4})).split.equals(pairs.split)
    assert (load_split(cfg.model_copy(update={"validation_fraction": 0.0})).split != "validation").all()
    assert set(evaluation_view(pairs, "validation").split) == {"train", "test"}
    assert len(evaluation_view(pairs, "validation").query("split == 'test'")) == (pairs.split == "validation").sum()


@pytest.mark.unit
def test_vendored_checksums_cover_every_vendored_file():
    listed = dict(line.split()[::-1] for line in (VENDOR_DIR / "SHA256SUMS").read_text().splitlines())
    files = sorted(p.relative_to(VENDOR_DIR).as_posix() for p in VENDOR_DIR.glob("*/*"))
    assert sorted(listed) == files
    for name in files:
        assert hashlib.sha256((VENDOR_DIR / name).read_bytes()).hexdigest() == listed[name]


@pytest.mark.slow  # seconds: a CLI subprocess, a loopback server or a fit over whole lines
def test_cli_data_stats_json_and_tables():
    proc = run_cli("data", "stats", "--json", check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for cell, (de_train, de_test, dir_train, dir_test, _, _) in README_COUNTS.items():
        got = result["per_cell_line"][cell]
        train = {k: got["train"][k] + got["validation"][k] for k in ("pairs", "upregulated", "downregulated")}  # validation: carved from train
        assert (train["pairs"], got["test"]["pairs"]) == (de_train, de_test)
        assert train["upregulated"] + train["downregulated"] == dir_train
        assert got["test"]["upregulated"] + got["test"]["downregulated"] == dir_test
    assert result["leakage"]["per_cell_line"]["k562"]["test_perturbations_in_train"] == 254
    assert "23,212" in proc.stdout and "validation" in proc.stdout and "Leakage" in proc.stdout  # the rich tables, untruncated


@pytest.mark.slow  # seconds: a CLI subprocess, a loopback server or a fit over whole lines
def test_cli_data_stats_holdout_subsample_and_bad_split(tmp_path):
    proc = run_cli("data", "stats", "--split", "holdout:rpe1", "--set", "data.cell_lines=[k562,rpe1]", "--set", "data.limit=300",
                   "--data-dir", "/work/shared/data" if Path("/work/shared/data").is_dir() else str(VENDOR_DIR), "--json", check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["rows"] == 300 + 187_089 and result["split"] == "holdout:rpe1"
    assert set(result["per_cell_line"]["rpe1"]) == {"test"} and set(result["per_cell_line"]["k562"]) == {"train", "validation"}
    bad = run_cli("data", "stats", "--split", "random")
    assert bad.returncode == 2 and "unknown split 'random'" in bad.stderr
    missing = run_cli("data", "stats", "--data-dir", str(tmp_path))
    assert missing.returncode == 2 and "data file not found" in missing.stderr and "k562-de.csv.gz" in missing.stderr


@pytest.mark.parametrize(
    "text, message",
    [
        ("cell_line,pert,gene,label\nk562,AAMP,ADGRE5,upregulated\nrpe1,RPL7,MYC,not differentially expressed\n", None),
        ("cell_line,pert\nk562,AAMP\n", r"lacks column\(s\) \['gene', 'label'\]"),
        ("cell_line,pert,gene,label\nk562,AAMP,ADGRE5,up\n", r"line 2: label 'up' is not one of"),
        ("cell_line,pert,gene,label\nk562,AAMP,ADGRE5,upregulated\nK562,AAMP,ADGRE5,upregulated\n", r"line 3: cell_line 'K562' is not one of"),
        ("cell_line,pert,gene,label\nk562,AAMP,NOTAGENE,upregulated\n", r"line 2: gene 'NOTAGENE' is not in PerturbQA for that cell line"),
    ],
)
@pytest.mark.unit
def test_read_user_pairs_names_row_and_value(tmp_path, pairs, text, message):
    path = tmp_path / "mine.csv"
    path.write_text(text)
    if message is None:
        got = read_user_pairs(path, pairs, label=True)
        assert got.cell_line.tolist() == ["k562", "rpe1"] and got.label.iloc[1] == "not differentially expressed"
        got.to_parquet(tmp_path / "mine.parquet")
        assert read_user_pairs(tmp_path / "mine.parquet", pairs).equals(got)
    else:
        with pytest.raises(SynthPertError, match=message):
            read_user_pairs(path, pairs, label=True)


@pytest.mark.unit
def test_read_user_pairs_file_errors(tmp_path):
    with pytest.raises(SynthPertError, match="file not found"):
        read_user_pairs(tmp_path / "absent.csv")
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(SynthPertError, match="unsupported file type"):
        read_user_pairs(tmp_path / "x.xlsx")
