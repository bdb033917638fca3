"""scMulan cell sentences: token set files, prompts as the original builds them, errors."""
import json

import numpy as np
import pytest
import scipy.sparse

from shared_helpers import shared_path
from scfm_jax.data import cell_sentence
from scfm_jax.data.cell_sentence import TokenSet


@pytest.fixture(scope="module")
def official():
    return TokenSet.from_folder(shared_path("data", "scmulan"))


def test_official_token_set(official):
    assert len(official) == 2222
    assert official.tokens[0] == "<E>" and official.id("<PCT>") == 2206
    assert official.id("<SPToken1>") == 2207 and official.id("<SPToken3>") == 2209
    np.testing.assert_array_equal(official.gene_ids, np.arange(1, 2001))
    assert len(official.categories["cell_type"]) == 109 and len(official.categories["MCT"]) == 29
    assert "B cell" in official.cell_type_terms and "Heart" not in official.cell_type_terms


def test_annotation_prompts_match_the_original():
    folder = shared_path("fixtures", "scmulan-tiny")
    token_set = TokenSet.from_folder(folder)
    cells, expected = np.load(folder / "cells.npz"), np.load(folder / "expected.npz")
    for matrix in (cells["expr"], scipy.sparse.csr_matrix(cells["expr"])):
        prompts = cell_sentence.annotation_prompts(matrix, token_set)
        for i, (ids, levels) in enumerate(prompts):
            np.testing.assert_array_equal(ids, expected[f"ids_{i}"])
            np.testing.assert_array_equal(levels, expected[f"levels_{i}"])


def test_levels_and_order():
    token_set = TokenSet.build(["G1", "G2", "G3", "G4"], {"organ": ["Heart"]})
    ids, levels = cell_sentence.gene_tokens(np.array([0.5, 0.0, 2.0, 1.0]), token_set)
    # expressed genes in gene-set order, reversed; the maximum gets level 10
    assert token_set.decode(ids) == ["G4", "G3", "G1"]
    np.testing.assert_array_equal(levels, [5, 10, 3])
    ids, levels = cell_sentence.annotation_prompts(np.array([[0, 0, 0.3, 0]]), token_set,
                                                   task_token="<SPToken3>")[0]
    assert token_set.decode(ids) == ["G3", "<SPToken3>"] and list(levels) == [10, 0]


def test_condition_prompt_and_padding(official):
    ids, levels = cell_sentence.condition_prompt(["Heart", "Cardiomyocyte cell", "50 year", "M"],
                                                 official)
    assert official.decode(ids)[-1] == "<SPToken1>" and not levels.any()
    padded, padded_levels, lengths = cell_sentence.pad_prompts([(ids, levels), (ids[:2], levels[:2])])
    assert padded.shape == (2, 5) and list(lengths) == [5, 2] and padded[1, 2:].sum() == 0
    with pytest.raises(KeyError, match="Hearts"):
        cell_sentence.condition_prompt(["Hearts"], official)


def test_build_save_and_read_back(tmp_path):
    built = TokenSet.build(["A", "B"], {"tissue": ["lung", "blood"], "cell_type": ["T", "B"]})
    # 'B' is a gene already: the metadata term shares its token
    assert built.tokens == ("<E>", "A", "B", "lung", "blood", "T", "<PCT>",
                            *[f"<SPToken{i}>" for i in range(1, 16)])
    built.save(tmp_path)
    again = TokenSet.from_folder(tmp_path)
    assert again.tokens == built.tokens and again.genes == built.genes
    assert dict(again.categories) == {"tissue": ("lung", "blood"), "cell_type": ("T", "B")}


def test_bad_inputs_give_clear_errors(tmp_path, official):
    with pytest.raises(FileNotFoundError, match="gene_set.txt"):
        (tmp_path / "token_set.tsv").write_text("token_id\ttoken\n0\t<E>\n")
        TokenSet.from_folder(tmp_path)
    (tmp_path / "gene_set.txt").write_text("A\n")
    (tmp_path / "meta_categories.json").write_text(json.dumps({}))
    (tmp_path / "token_set.tsv").write_text("token_id\ttoken\n0\t<E>\n2\tA\n")
    with pytest.raises(ValueError, match="line 3"):
        TokenSet.from_folder(tmp_path)
    with pytest.raises(ValueError, match="one per gene"):
        cell_sentence.gene_tokens(np.ones(5), official)
    with pytest.raises(ValueError, match="cell c2 expresses none"):
        cell_sentence.annotation_prompts(np.zeros((1, 2000)), official, cell_names=["c2"])
