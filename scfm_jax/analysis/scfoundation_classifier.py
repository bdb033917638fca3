"""scFoundation's cell-type classifier: a head on frozen embeddings, or the encoder fine-tuned with it.

`fit_classifier` trains logistic regression (or a one-hidden-layer MLP) on an `obsm` embedding;
`fine_tune` trains the encoder and the head together (the official fine-tuning recipe: encoder,
pooled tokens, standardised, then the head). Both take their optimiser steps as pretraining does
(`train.train_state`: a functional TrainState and `apply_gradients`), hold out a stratified part of
the labelled cells and report accuracy and macro-F1 on it. `predict` writes `obs["cell_type_pred"]`.
(scMulan annotates zero-shot by generation: `analysis.scmulan_tasks.annotate`.)
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any

import anndata
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
from flax import nnx
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

from scfm_jax.analysis import scfoundation_inference as inference
from scfm_jax.analysis.embedding import model_and_vocabulary, aligned_matrix
from scfm_jax.data.host_ops import bucket_length, padded_csr_rows
from scfm_jax.errors import InputError, UnknownName, UsageError
from scfm_jax.models import layers
from scfm_jax.models.scfoundation import ScFoundation, pool_cell_embeddings
from scfm_jax.objectives.scfoundation import inference_inputs
from scfm_jax.train.train_state import apply_gradients, init_train_state, split_model


class Standardization(nnx.Variable):
    """Fixed feature mean / scale of the training cells (not trained)."""


class Head(nnx.Module):
    """Standardise, then logistic regression (`hidden=0`) or Linear-ReLU-Linear."""

    def __init__(self, mean: np.ndarray, scale: np.ndarray, num_classes: int, *, hidden: int = 0,
                 rngs: nnx.Rngs):
        features = len(mean)
        self.mean = Standardization(jnp.asarray(mean, jnp.float32))
        self.scale = Standardization(jnp.asarray(scale, jnp.float32))
        kernel = layers.with_axes(nnx.initializers.lecun_normal(), (layers.EMBED, None))
        self.hidden = nnx.Linear(features, hidden, kernel_init=kernel, rngs=rngs) if hidden else None
        self.out = nnx.Linear(hidden or features, num_classes, kernel_init=kernel, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = (x - self.mean[...]) / self.scale[...]
        if self.hidden is not None:
            x = nnx.relu(self.hidden(x))
        return self.out(x)


class _EncoderClassifier(nnx.Module):
    """scFoundation encoder -> pooled cell embedding -> head, on sparse count batches."""

    def __init__(self, encoder: ScFoundation, head: Head, *, tgthighres: str, pool: str,
                 options: dict):
        self.encoder, self.head = encoder, head
        self.tgthighres, self.pool = tgthighres, pool
        self.options = tuple(sorted(options.items()))  # static and hashable: part of the graphdef

    def __call__(self, batch) -> jax.Array:
        inputs = inference_inputs(batch, num_genes=self.encoder.num_genes,
                                  tgthighres=self.tgthighres, pad_value=self.encoder.pad_value,
                                  **dict(self.options))
        encoded = self.encoder.encode(inputs["encoder_values"], inputs["encoder_gene_ids"],
                                      inputs["encoder_padding_mask"])
        return self.head(pool_cell_embeddings(encoded, inputs["encoder_lengths"], self.pool))


@dataclasses.dataclass
class Classifier:
    """A trained cell-type classifier and its held-out report."""

    head: Head
    classes: np.ndarray                  # label of output i
    report: dict                         # accuracy, macro_f1, cells, losses on the held-out split
    embedding_key: str | None = None     # frozen: the obsm key it reads
    encoder: ScFoundation | None = None  # fine-tuned: the encoder it runs on counts
    vocabulary: Any = None
    embed_options: dict = dataclasses.field(default_factory=dict)

    def embeddings(self, adata: anndata.AnnData, progress: bool = False) -> np.ndarray:
        if self.encoder is None:
            if self.embedding_key not in adata.obsm:
                raise UnknownName(f"adata.obsm has no {self.embedding_key!r}; embed the cells first "
                                  "(embed_cells) with the model the classifier was trained on")
            return np.asarray(adata.obsm[self.embedding_key], np.float32)
        options = dict(self.embed_options)
        matrix, _ = aligned_matrix(adata, self.vocabulary, layer=options.pop("layer"),
                                   gene_column=options.pop("gene_column"),
                                   min_coverage=options.pop("min_coverage"), verbose=progress)
        return inference.cell_embeddings(self.encoder, matrix, cell_names=list(adata.obs_names),
                                         progress=progress, **options)

    def predict_proba(self, adata: anndata.AnnData, progress: bool = False) -> np.ndarray:
        """Class probabilities [cells, classes] (columns follow `classes`)."""
        logits = _logits(self.head, jnp.asarray(self.embeddings(adata, progress)))
        return np.asarray(jax.nn.softmax(logits, axis=-1))


@nnx.jit
def _logits(head: Head, x: jax.Array) -> jax.Array:
    return head(x)


def scores(true_labels, predicted_labels) -> dict:
    """Accuracy and macro-F1 (scikit-learn; macro over the classes present in either)."""
    return {"accuracy": float(accuracy_score(true_labels, predicted_labels)),
            "macro_f1": float(f1_score(true_labels, predicted_labels, average="macro",
                                       zero_division=0))}


def labelled_codes(adata: anndata.AnnData, label_key: str):
    if label_key not in adata.obs:
        raise UnknownName(f"adata.obs has no {label_key!r} (columns: {list(adata.obs.columns)})")
    labels = adata.obs[label_key]
    labelled = np.flatnonzero(labels.notna().to_numpy())
    classes, codes = np.unique(labels.iloc[labelled].astype(str).to_numpy(), return_inverse=True)
    if len(classes) < 2:
        raise InputError(f"obs[{label_key!r}] has {len(classes)} class among the labelled cells; "
                         "a classifier needs at least 2")
    return labelled, classes, codes


def split_cells(codes: np.ndarray, test_fraction: float, seed: int):
    """(train, test) positions; stratified by label when every class has two cells or more."""
    if not 0 < test_fraction < 1:
        raise UsageError(f"test_fraction must be in (0, 1), got {test_fraction}")
    positions = np.arange(len(codes))
    stratify = codes if np.bincount(codes).min() >= 2 else None
    train, test = train_test_split(positions, test_size=test_fraction, random_state=seed,
                                   stratify=stratify)
    return np.sort(train), np.sort(test)


def _standardization(x: np.ndarray):
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    return mean, np.where(scale > 1e-6, scale, 1.0)


def _report(probabilities, codes_test, classes, losses, cells) -> dict:
    predicted = classes[np.argmax(probabilities, axis=1)]
    return dict(scores(classes[codes_test], predicted), train_cells=int(cells[0]),
                test_cells=int(cells[1]), final_train_loss=float(losses[-1]),
                losses=[float(v) for v in losses])


def fit_classifier(adata: anndata.AnnData, label_key: str,
                   embedding_key: str = "X_scfoundation", *, hidden: int = 0,
                   test_fraction: float = 0.2, steps: int = 300, learning_rate: float = 1e-2,
                   weight_decay: float = 1e-4, seed: int = 0, verbose: bool = True) -> Classifier:
    """A head on the frozen embedding `obsm[embedding_key]`, trained full-batch with AdamW.

    `hidden=0`: multinomial logistic regression; `hidden>0`: one ReLU hidden layer of that width.
    Held-out accuracy and macro-F1 are in `classifier.report`.
    """
    if embedding_key not in adata.obsm:
        raise UnknownName(f"adata.obsm has no {embedding_key!r} (keys: {list(adata.obsm)}); run "
                          "embed_cells first")
    labelled, classes, codes = labelled_codes(adata, label_key)
    train, test = split_cells(codes, test_fraction, seed)
    x = np.asarray(adata.obsm[embedding_key], np.float32)[labelled]
    head = Head(*_standardization(x[train]), len(classes), hidden=hidden,
                rngs=nnx.Rngs(seed))
    optimizer = optax.adamw(learning_rate, weight_decay=weight_decay)
    graphdef, state = _train_state(head, optimizer, seed)
    x_train, y_train = jnp.asarray(x[train]), jnp.asarray(codes[train])
    weights = jnp.ones(len(train), jnp.float32)
    losses = []
    for _ in range(steps):
        state, loss = _step(graphdef, optimizer, state, x_train, y_train, weights)
        losses.append(float(loss))
    head = nnx.merge(graphdef, state.params, state.buffers)
    probabilities = np.asarray(jax.nn.softmax(_logits(head, jnp.asarray(x[test])), axis=-1))
    report = _report(probabilities, codes[test], classes, losses, (len(train), len(test)))
    if verbose:
        print(f"classifier on obsm[{embedding_key!r}]: held-out accuracy "
              f"{report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f} "
              f"({len(test)} cells)", file=sys.stderr)
    return Classifier(head=head, classes=classes, report=report, embedding_key=embedding_key)


def _training_batches(csr, totals, cells: np.ndarray, codes: np.ndarray, batch_size: int,
                      rng: np.random.Generator, num_genes: int):
    """Shuffled batches of `cells`, grouped by padded length; short batches repeat a cell at
    weight 0 (a real cell keeps S = log10(total) finite)."""
    lengths = np.diff(csr.indptr)[cells]
    # one bucket per doubling: few shapes to compile for the backward pass
    widths = np.array([bucket_length(int(n), num_genes, steps_per_doubling=1) for n in lengths])
    batches = []
    for width in np.unique(widths):
        group = rng.permutation(cells[widths == width])
        batches += [(int(width), group[start:start + batch_size])
                    for start in range(0, len(group), batch_size)]
    for index in rng.permutation(len(batches)):
        width, chosen = batches[index]
        padded = np.concatenate([chosen, np.full(batch_size - len(chosen), chosen[0])])
        gene_ids, values = padded_csr_rows(csr, padded, width)
        weights = (np.arange(batch_size) < len(chosen)).astype(np.float32)
        yield ({"gene_ids": gene_ids, "counts": values,
                "total_counts": totals[padded].astype(np.float32)},
               codes[padded].astype(np.int32), weights)


def _train_state(network: nnx.Module, optimizer: optax.GradientTransformation, seed: int):
    """(graphdef, TrainState at step 0) of a network, as pretraining initialises its state."""
    key_data = jax.random.key_data(jax.random.key(seed))
    return split_model(network)[0], init_train_state(network, optimizer, key_data)


@functools.partial(jax.jit, static_argnames=("graphdef", "optimizer"))
def _step(graphdef, optimizer, state, inputs, labels, weights):
    """(state after one optimiser step on the weighted cross-entropy, the loss): the functional
    step of `train.train_state`, compiled once per (network structure, optimiser, shapes)."""
    def loss_fn(params):
        network = nnx.merge(graphdef, params, state.buffers)
        losses = optax.softmax_cross_entropy_with_integer_labels(network(inputs), labels)
        return jnp.sum(losses * weights) / jnp.sum(weights)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return apply_gradients(state, grads, optimizer), loss


def fine_tune(model, adata: anndata.AnnData, label_key: str, *, layer: str | None = None,
              tgthighres: str = "t4", pool: str = "all", hidden: int = 0,
              test_fraction: float = 0.2, epochs: int = 5, batch_size: int = 16,
              encoder_learning_rate: float = 1e-4, head_learning_rate: float = 1e-3,
              seed: int = 0, gene_column: str | None = None, min_coverage: float = 0.5,
              progress: bool = True) -> Classifier:
    """Fine-tune a copy of the scFoundation encoder together with a classification head.

    The head standardises the pooled embedding with the training cells' statistics under the
    initial encoder (the official recipe's affine-free BatchNorm, frozen), then classifies.
    AdamW with separate learning rates for the encoder and the head; the given model is not
    changed. Held-out accuracy and macro-F1 (and the loss per epoch) are in `classifier.report`.
    """
    encoder, vocabulary = model_and_vocabulary(model, None)
    labelled, classes, codes = labelled_codes(adata, label_key)
    train, test = split_cells(codes, test_fraction, seed)
    matrix, _ = aligned_matrix(adata, vocabulary, layer=layer, gene_column=gene_column,
                               min_coverage=min_coverage, verbose=progress)
    matrix = matrix[labelled]
    names = list(adata.obs_names[labelled])
    csr, totals, options = inference.prepare(matrix, encoder.num_genes, cell_names=names)
    tgthighres = options.pop("tgthighres") or tgthighres
    embed_options = dict(tgthighres=tgthighres, pool=pool, batch_size=batch_size)
    initial = inference.cell_embeddings(encoder, matrix[train], progress=progress,
                                        cell_names=[names[i] for i in train], **embed_options)
    head = Head(*_standardization(initial), len(classes), hidden=hidden, rngs=nnx.Rngs(seed))
    network = _EncoderClassifier(nnx.clone(encoder), head, tgthighres=tgthighres, pool=pool,
                                 options=options)
    def label_of(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "head" if path[0].key == "head" else "encoder", params)

    optimizer = optax.multi_transform(
        {"encoder": optax.adamw(encoder_learning_rate, weight_decay=0.0),
         "head": optax.adamw(head_learning_rate, weight_decay=1e-4)}, label_of)
    graphdef, state = _train_state(network, optimizer, seed)
    rng = np.random.default_rng(seed)
    epoch_losses = []
    for epoch in range(epochs):
        batch_losses = []
        for batch, labels, weights in tqdm(
                list(_training_batches(csr, totals, train, codes, batch_size, rng,
                                       encoder.num_genes)),
                desc=f"fine-tune epoch {epoch + 1}/{epochs}", disable=not progress, unit="batch"):
            state, loss = _step(graphdef, optimizer, state, batch, labels, weights)
            batch_losses.append((float(loss), float(weights.sum())))
        losses, counts = np.asarray(batch_losses).T
        epoch_losses.append(float(np.sum(losses * counts) / np.sum(counts)))
    network = nnx.merge(graphdef, state.params, state.buffers)
    classifier = Classifier(head=network.head, classes=classes, report={},
                            encoder=network.encoder, vocabulary=vocabulary,
                            embed_options=dict(embed_options, layer=layer,
                                               gene_column=gene_column,
                                               min_coverage=min_coverage))
    held_out = adata[labelled[test]]
    classifier.report = _report(classifier.predict_proba(held_out, progress), codes[test],
                                classes, epoch_losses, (len(train), len(test)))
    if progress:
        print(f"fine-tuned encoder + head: held-out accuracy {classifier.report['accuracy']:.3f}, "
              f"macro-F1 {classifier.report['macro_f1']:.3f} ({len(test)} cells)",
              file=sys.stderr)
    return classifier


def predict(classifier: Classifier, adata: anndata.AnnData, *,
            key_added: str = "cell_type_pred", progress: bool = False) -> None:
    """`obs[key_added]` (categorical) and `obs[key_added + "_probability"]` for every cell."""
    probabilities = classifier.predict_proba(adata, progress)
    adata.obs[key_added] = pd.Categorical(classifier.classes[np.argmax(probabilities, axis=1)],
                                          categories=classifier.classes)
    adata.obs[f"{key_added}_probability"] = probabilities.max(axis=1)
