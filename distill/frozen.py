"""Fine-tuning with frozen lower layers, whose outputs are computed once.

A 110 M-parameter teacher costs about 3 minutes per forward pass over the 8.5k training snippets on 2
cores (bf16). Training all of it for two epochs would take most of an hour; with the lower layers frozen,
their output is a fixed function of the text, so it is computed once and the epochs run only the top
layers and the head. The teacher's answers on the train, val and test texts come from the same cache.

Works for any encoder whose model runs ``embeddings -> create_bidirectional_mask -> encoder`` (BERT and
MPNet in transformers 5); the head differs by family and is named in ``_head``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from distill.train import autocast, length_bucketed_batches, linear_schedule, mean_pool, optimizer_step

Precision = Literal["bf16", "fp32"]


@dataclass
class LowerStates:
    """Per-text hidden states after the frozen layers (bf16 to halve the memory; about 0.35 GB for 8.5k)."""

    states: list[torch.Tensor]  # [tokens, hidden] each

    def __len__(self) -> int:
        return len(self.states)

    def lengths(self) -> np.ndarray:
        return np.asarray([len(s) for s in self.states])

    def batch(self, index: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded states and their 0/1 mask: padded keys are masked, so their values never matter."""
        rows = [self.states[i] for i in index]
        width = max(len(r) for r in rows)
        hidden = torch.zeros((len(rows), width, rows[0].shape[-1]), dtype=torch.float32)
        mask = torch.zeros((len(rows), width), dtype=torch.int64)
        for k, row in enumerate(rows):
            hidden[k, : len(row)] = row.float()
            mask[k, : len(row)] = 1
        return hidden, mask


def freeze_lower(model: PreTrainedModel, frozen_layers: int) -> None:
    """Only the layers above ``frozen_layers``, a pooler and the head learn. Everything the frozen layers
    use stays as it is, shared parts included (MPNet's relative position bias feeds every layer): a change
    there would make the cached lower states stale."""
    layers = model.base_model.encoder.layer
    if not 0 <= frozen_layers < len(layers):
        raise ValueError(f"frozen layers must be in [0, {len(layers) - 1}], got {frozen_layers}")
    base = {id(p) for p in model.base_model.parameters()}
    learning = [*layers[frozen_layers:]] + ([model.base_model.pooler] if getattr(model.base_model, "pooler", None)
                                            else [])
    learn = {id(p) for module in learning for p in module.parameters()}
    for param in model.parameters():
        param.requires_grad = id(param) not in base or id(param) in learn


@torch.inference_mode()
def lower_states(model: PreTrainedModel, tokenizer, texts: list[str], max_length: int, frozen_layers: int,
                 precision: Precision, batch_size: int = 64, desc: str | None = None) -> LowerStates:
    """The input of layer ``frozen_layers`` for each text, unpadded, from length-sorted batches."""
    model.eval()
    encoded = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    order = np.argsort([len(ids) for ids in encoded], kind="stable")
    states: list[torch.Tensor | None] = [None] * len(texts)
    with _layers_only(model, 0, frozen_layers):
        for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=desc is None, leave=False):
            index = order[start : start + batch_size]
            batch = tokenizer.pad({"input_ids": [encoded[i] for i in index]}, return_tensors="pt")
            with autocast(precision):
                out = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            hidden = out[0].to(torch.bfloat16)
            for k, i in enumerate(index):
                states[i] = hidden[k, : len(encoded[i])].clone()
    return LowerStates(states)  # type: ignore[arg-type]


@contextmanager
def _layers_only(model: PreTrainedModel, first: int, last: int) -> Iterator[None]:
    """Run only encoder layers ``[first, last)``: the family's own encoder code, on a slice of its layers."""
    encoder = model.base_model.encoder
    full = encoder.layer
    encoder.layer = torch.nn.ModuleList(list(full)[first:last])
    try:
        yield
    finally:
        encoder.layer = full


def _head(model: PreTrainedModel, sequence: torch.Tensor) -> torch.Tensor:
    """The family's classification head on the last layer's output."""
    family = model.config.model_type
    if family == "mpnet":
        return model.classifier(sequence)
    if family == "bert":
        return model.classifier(model.dropout(model.bert.pooler(sequence)))
    raise ValueError(f"no frozen-layer fine-tuning for model family {family!r} (supported: bert, mpnet)")


def upper_outputs(model: PreTrainedModel, hidden: torch.Tensor, mask: torch.Tensor,
                  frozen_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the last layer's states from cached lower states: the unfrozen layers and the head."""
    from transformers.masking_utils import create_bidirectional_mask

    encoder = model.base_model.encoder
    attention = create_bidirectional_mask(config=model.config, inputs_embeds=hidden, attention_mask=mask)
    with _layers_only(model, frozen_layers, len(encoder.layer)):
        sequence = encoder(hidden, attention_mask=attention)[0]
    return _head(model, sequence), sequence


@torch.inference_mode()
def cached_features(model: PreTrainedModel, cache: LowerStates, frozen_layers: int, pooled: bool = False,
                    batch_size: int = 128, precision: Precision = "fp32") -> np.ndarray:
    """fp32 logits for every cached text, in the cache's order; with ``pooled``, the mean-pooled last layer
    follows the logits' columns (the representation the student's hidden-state loss learns)."""
    model.eval()
    order = np.argsort(cache.lengths(), kind="stable")
    width = model.config.num_labels + (model.config.hidden_size if pooled else 0)
    out = np.zeros((len(cache), width), dtype=np.float32)
    for start in range(0, len(cache), batch_size):
        index = order[start : start + batch_size]
        hidden, mask = cache.batch(index)
        with autocast(precision):
            logits, sequence = upper_outputs(model, hidden, mask, frozen_layers)
        parts = [logits.float()] + ([mean_pool(sequence.float(), mask)] if pooled else [])
        out[index] = torch.cat(parts, dim=-1).numpy()
    return out


def fit_upper(model: PreTrainedModel, train: LowerStates, train_labels: np.ndarray, val: LowerStates,
              val_labels: np.ndarray, *, frozen_layers: int, epochs: int, lr: float, batch_size: int, seed: int,
              precision: Precision, weights: torch.Tensor | None = None,
              desc: str = "teacher fine-tune") -> tuple[PreTrainedModel, float]:
    """AdamW with warm-up and linear decay on the top layers; keeps the epoch with the best val macro score.

    The val score is balanced accuracy (the mean of per-label recalls): on balanced data it is accuracy,
    on imbalanced data it does not reward ignoring a rare label.
    """
    freeze_lower(model, frozen_layers)
    generator = np.random.default_rng(seed)
    torch.manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, fused=True)
    steps = epochs * max(1, -(-len(train) // batch_size))
    scheduler = linear_schedule(optimizer, steps)
    labels = torch.from_numpy(train_labels)
    best_state, best_score = copy.deepcopy(model.state_dict()), -np.inf
    with tqdm(total=steps, desc=desc, unit="step") as bar:
        for epoch in range(epochs):
            model.train()
            for index in length_bucketed_batches(train.lengths(), batch_size, generator):
                hidden, mask = train.batch(index)
                with autocast(precision):
                    logits, _ = upper_outputs(model, hidden, mask, frozen_layers)
                loss = F.cross_entropy(logits.float(), labels[index], weight=weights)
                optimizer_step(loss, params, optimizer, scheduler)
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            score = balanced_accuracy(cached_features(model, val, frozen_layers).argmax(-1), val_labels)
            tqdm.write(f"{desc}: epoch {epoch + 1} val balanced accuracy {score:.4f}")
            if score > best_score:
                best_score, best_state = score, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    for param in model.parameters():
        param.requires_grad = True
    return model.eval(), float(best_score)


def balanced_accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Mean recall over the labels present in ``labels``."""
    recalls = [float((predictions[labels == c] == c).mean()) for c in np.unique(labels)]
    return float(np.mean(recalls))
