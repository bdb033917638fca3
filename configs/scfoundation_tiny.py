"""scFoundation, tiny: the same architecture at a size that pretrains on one CPU in minutes.

This file also defines every config field (the other scFoundation configs start from it), so it is
the reference for what can be overridden with `--config.a.b=value`.
"""
import ml_collections

# One table maps the models' logical axis names onto the mesh axes (data, fsdp, tensor).
# Changing the parallelism is an edit here or a --config.mesh.* override, never a code change.
LOGICAL_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("head_dim", None),
    ("genes", None),                # 19,267 rows (prime): the table splits on embed instead,
    ("table_embed", ("fsdp", "tensor")),  # over every parameter axis (1/64 per chip on 16 x 4)
    ("vocab", "tensor"),
    ("bins", None),
    ("features", None),
    ("layers", None),               # the stacked-layer axis: every device holds every layer
)


def get_config():
    config = ml_collections.ConfigDict()
    config.seed = 0

    config.model = model = ml_collections.ConfigDict()
    model.name = "scfoundation"
    model.num_genes = -1          # -1: the size of the training store's vocabulary
    model.bin_num = 16            # auto-discretisation bins (100 in the released model)
    model.bin_alpha = 1.0
    model.mask_value = 102.0      # exact input values that select the mask / pad embeddings
    model.pad_value = 103.0
    model.encoder = ml_collections.ConfigDict(dict(width=64, depth=2, heads=4, mlp_dim=256,
                                                   dropout=0.0))
    model.decoder = ml_collections.ConfigDict(dict(
        width=48, depth=2, heads=4, head_dim=12, mlp_dim=192,
        attention="performer",     # or "dot_product" (exact softmax attention)
        num_features=0,            # 0: int(head_dim * ln(head_dim)) as the original (266 at 64)
        stabilizer_scope="cell",   # "batch" reproduces the original's batch-wide key max
        chunk_size=2048,           # genes per chunk of the linear-attention scan
        redraw_interval=1000,      # train steps between redraws of the random features; 0: never
    ))
    model.dtype = "float32"        # compute dtype; parameters and optimiser state stay float32
    model.remat_policy = "none"    # "none" | "full" | "dots" (save matmul outputs only)
    model.unroll_layers = False    # True: the layer scan unrolled (the trainer counts FLOPs so)
    model.attention_impl = "auto"  # "auto" | "xla" | "cudnn" | "pallas" | "blockwise" (docs/attention.md)

    # Pretraining objective (model input function, on the device).
    config.objective = objective = ml_collections.ConfigDict()
    objective.value_mask_prob = 0.3    # released checkpoint config
    objective.zero_mask_prob = 0.03    # released checkpoint config
    # Read-depth-aware downsampling. ASSUMPTIONS: the paper describes binomial thinning of a part
    # of the cells at a random rate; its exact distribution, fraction and threshold are not in the
    # released code (SPEC.md I.3). These values are ours until checked against Hao et al. 2024.
    objective.downsample_fraction = 0.5     # fraction of cells that are thinned
    objective.downsample_min_total = 1000   # only cells with at least this many counts
    objective.downsample_rate_low = 0.1     # thinning rate drawn uniformly in [low, high]
    objective.downsample_rate_high = 0.9

    config.data = data = ml_collections.ConfigDict()
    data.store = ""                    # cell store URL or folder (scfm-jax convert --output)
    data.vocabulary = ""               # the store's vocabulary must be this one ("": any)
    data.global_batch_size = 32
    data.buckets = (64, 128, 256, 512)  # padded lengths of the sparse rows (non-zero genes)
    data.max_nonzero = 512             # cells with more non-zero genes are randomly subsampled
    data.block_size = 64               # contiguous cells shuffled as a unit (read locality)
    data.window_blocks = 16            # cells are shuffled inside windows of this many blocks
    data.eval_fraction = 0.1           # held-out cells for the evaluation loss
    data.eval_batches = 4
    data.obs_keys = ()                 # obs columns each batch carries as integer codes
    data.prefetch = 2

    config.train = train = ml_collections.ConfigDict()
    train.steps = 600
    train.learning_rate = 1e-3
    train.warmup_steps = 50
    train.end_learning_rate_fraction = 0.1   # cosine decay to this fraction of the peak
    train.weight_decay = 0.0
    train.adam_b1 = 0.9
    train.adam_b2 = 0.999
    train.grad_clip_norm = 1.0
    train.grad_accum_steps = 1
    train.log_every = 10
    train.eval_every = 100
    train.checkpoint_every = 100
    train.keep_checkpoints = 3
    train.checkpoint_dir = ""          # "": <workdir>/checkpoints; or a folder, or gs://bucket/path
    train.profile_steps = ()           # e.g. (10, 15): write a profiler trace for steps 10..14

    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    config.logical_axis_rules = LOGICAL_AXIS_RULES
    # Parameters the mesh cannot split (a dimension not divisible by its mesh axes) are replicated
    # and named at startup; more than this fraction of the parameter bytes is an error.
    config.sharding_tolerance = 0.05
    return config
