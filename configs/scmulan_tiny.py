"""scMulan, tiny: the cell-sentence GPT at a size that pretrains on one CPU in minutes.

Data, train, mesh and sharding rules are scfoundation_tiny's; `model` and `objective` are scMulan's.
The token set is built from the store when training starts (`scfm_jax.objectives.scmulan.
resolve_config`): the `num_genes` genes expressed in most cells (or `gene_list`), plus the
categories of the obs columns below as metadata terms. The defaults name the obs columns of scanpy's
pbmc68k_reduced (the demo store); set them to your store's columns.
"""
import ml_collections

from scfm_jax.train.config_checks import base_config


def get_config():
    config = base_config(__file__, "scfoundation_tiny")

    config.model = model = ml_collections.ConfigDict()
    model.name = "scmulan"
    model.vocab_size = -1          # -1: the size of the token set (resolved from the store)
    model.n_layer = 2
    model.n_head = 4
    model.n_embd = 64
    model.expression_level = 10    # levels 1..10 for genes, 0 for every other token
    model.bias = False
    model.attention = "dot_product"  # exact causal attention (the only kind scMulan has)
    model.dtype = "float32"        # compute dtype; parameters and optimiser state stay float32
    model.remat_policy = "none"    # "none" | "full" | "dots"
    model.unroll_layers = False    # True: the layer scan unrolled (the trainer counts FLOPs so)
    model.attention_impl = "auto"  # "auto" | "xla" | "cudnn" | "pallas" | "blockwise" (docs/attention.md)

    config.objective = objective = ml_collections.ConfigDict()
    objective.token_set = ""       # "": build from the store; or an official-layout folder
    objective.gene_list = ""       # "": the num_genes most often expressed genes; or a file
    objective.num_genes = 512
    objective.gene_selection_cells = 5000   # cells read to rank genes by how often they are expressed
    objective.metadata_columns = ("bulk_labels", "phase")  # prompts of the generation task
    objective.cell_type_columns = ("bulk_labels",)         # targets after <PCT>, in order
    objective.organ_columns = ()                           # targets after <SPToken3>, in order
    objective.task_weights = (1.0, 1.0, 1.0)  # annotate, organ, generate (where the cell allows)
    objective.mse_weight = 1.0                # level regression next to the entity BCE
    # filled in from the store by resolve_config
    objective.gene_set = ()
    objective.gene_positions = ()
    objective.categories = ml_collections.ConfigDict()

    config.data.obs_keys = ()      # resolve_config adds the objective's columns
    config.data.buckets = (128, 256, 512)
    return config
