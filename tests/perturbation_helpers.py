"""A random-weight scFoundation over the released 19,264-gene vocabulary, for the perturbation
tests and benchmark: the shared fixture's architecture and config with the vocabulary widened, so
that the Norman perturbed genes (absent from the fixture's 200 genes) have embeddings."""
import copy
from pathlib import Path

from flax import nnx

from scfm_jax.interop.scfoundation_torch import (model_config_from_official,
                                                 read_official_checkpoint,
                                                 save_official_checkpoint)
from scfm_jax.models.scfoundation import ScFoundation

RELEASED_GENES = 19264


def widened_fixture_checkpoint(template: Path, path: Path, num_genes: int = RELEASED_GENES,
                               seed: int = 0) -> Path:
    """Write (once) an official-format models.ckpt of `template`'s architecture with `num_genes`
    genes and random weights drawn with `seed`; returns `path`."""
    if path.is_file():
        return path
    official, state_dict = read_official_checkpoint(template, "gene")
    official = copy.deepcopy(official)
    autobin = official["model_config"]["mae_autobin"]
    for section in (autobin, autobin["encoder"], autobin["decoder"]):
        section["seq_len"] = num_genes + 2
    autobin["gene_num"] = num_genes + 2
    model_config = model_config_from_official(official, state_dict)
    save_official_checkpoint(ScFoundation(model_config, rngs=nnx.Rngs(seed)), path, official)
    return path
