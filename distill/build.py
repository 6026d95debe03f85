"""`cascade build`: your data, a teacher (fine-tuned, a checkpoint, or a remote server), a distilled int8
student, calibration, evaluation, and a registered bundle.

Resumable: the fine-tuned teacher and the fp32 student are kept under ``$CASCADE_HOME/work/<name>`` and
reused by a later build whose settings and data are the same; a remote teacher's answers are cached on disk.
Bad input stops the build before anything is staged, with one line naming the file and row or the URL.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from bundle.registry import TEACHER_DIR, Bundle, Registry
from bundle.runtime import TEACHER_ONNX_FILE
from bundle.teacher_spec import TeacherSpec
from distill import base_models, frozen, train
from distill.config import BuildConfig, BuildInputError
from distill.data import Dataset, Splits, load_splits
from distill.export import build_teacher_onnx
from distill.publish import CALIBRATION_FILE as CALIBRATION_FILE  # where `cascade calibrate` reads it
from distill.publish import publish_student, timed

TEACHER_CACHE = "teacher_answers"  # the folder distill.evaluate.teacher_cache_dir reads: eval reuses build answers


def splits_for(cfg: BuildConfig) -> Splits:
    """The build's data, as its configuration names it (the movie snippets by default)."""
    return load_splits(cfg.data, cfg.seed)


def relabel(splits: Splits, names: tuple[str, ...]) -> Splits:
    """The same texts with the label order ``names`` (a permutation of the current label names)."""

    def one(data: Dataset) -> Dataset:
        index = np.asarray([names.index(name) for name in data.label_names], dtype=np.int64)
        return Dataset(data.name, data.texts, index[data.labels], names, data.ratings, data.ids)

    return Splits(one(splits.train), one(splits.val), one(splits.test))


@dataclass
class Teacher:
    """The teacher as the build uses it: logits in the bundle's label order, whatever its kind."""

    kind: str
    logits: Callable[[list[str]], np.ndarray]
    spec: TeacherSpec
    identity: dict[str, Any]
    model: Any = None  # a transformers classifier for local kinds, None for remote
    tokenizer: Any = None
    own_tokenizer: bool = False  # its tokenizer differs from the student's: kept inside teacher/
    columns: list[int] = field(default_factory=list)  # model output columns in the bundle's label order
    # Answers computed while fine-tuning (train: logits then the pooled last layer; val, test: logits), so
    # the teacher answers each build text once.
    answers: dict[str, np.ndarray] = field(default_factory=dict)
    max_length: int = 64

    def features(self, texts: list[str], desc: str | None = None) -> np.ndarray:
        """Logits, then the mean-pooled last layer: the targets of the hidden-state loss (local teachers)."""
        if self.model is None:
            raise BuildInputError("distillation.hidden_weight needs a teacher whose weights are in the build, "
                                  "not a remote one: set it to 0")
        out = train.predict_logits(self.model, self.tokenizer, texts, self.max_length, desc=desc, pooled=True)
        labels = len(self.columns)
        return np.concatenate([out[:, :labels][:, self.columns], out[:, labels:]], axis=1)


def _data_key(splits: Splits) -> dict[str, Any]:
    return {"labels": list(splits.train.label_names), "train": splits.train.fingerprint(),
            "val": splits.val.fingerprint()}


def _local_logits(model, tokenizer, max_length: int, columns: list[int]) -> Callable[[list[str]], np.ndarray]:
    def logits(texts: list[str], desc: str | None = None) -> np.ndarray:
        return train.predict_logits(model, tokenizer, texts, max_length, desc=desc)[:, columns]

    return logits


def teacher_base(cfg: BuildConfig) -> Path:
    """The encoder a fine-tuned teacher starts from: ``teacher.base``, else the bundled one ``base_model`` names."""
    if cfg.teacher.base is not None:
        base = Path(cfg.teacher.base)
    elif cfg.teacher.base_model == "mpnet-base":
        base = base_models.mpnet_base()
    else:
        base = train.base_model_dir()
    if not (base / "config.json").is_file():
        raise BuildInputError(f"{base}: teacher.base is not a Hugging Face model directory (no config.json)")
    return base


def fine_tune_teacher(cfg: BuildConfig, splits: Splits, work: Path) -> Teacher:
    """Fine-tune the base encoder on the data, unless ``work`` holds one trained with the same settings.

    With ``teacher.frozen_layers``, the lower layers' outputs are computed once for train, val and test
    (distill/frozen.py) and the teacher's answers on those texts come from the same cache, kept in ``work``.
    """
    settings = cfg.teacher
    base = teacher_base(cfg)
    precision = train.resolve_precision(cfg.precision)
    labels = splits.train.label_names
    weights = train.class_weights(splits.train.labels, len(labels), cfg.class_weights)
    key = {"recipe": "length-bucketed batches", "kind": "fine-tune", "base": str(base), "max_length": cfg.max_length,
           "seed": cfg.seed, "precision": precision, "class_weights": cfg.class_weights} \
        | settings.model_dump(include={"layers", "epochs", "lr", "batch_size", "frozen_layers"}) | _data_key(splits)
    teacher_dir = work / "teacher"
    done = teacher_dir / "cascade_done.json"
    answers_file = work / "teacher_answers.npz"
    tokenizer = train.load_tokenizer(base)
    answers: dict[str, np.ndarray] = {}
    if done.is_file() and json.loads(done.read_text()).get("settings") == key:
        tqdm.write(f"teacher: reusing {teacher_dir}")
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(
            str(teacher_dir), local_files_only=True, use_safetensors=True).eval()
        if answers_file.is_file():
            with np.load(answers_file) as saved:
                answers = {name: saved[name] for name in saved.files}
    else:
        model = train.new_teacher(labels, base, settings.layers, seed=cfg.seed)
        if settings.frozen_layers:
            model, answers = _fit_upper_layers(cfg, model, tokenizer, splits, precision, weights)
        else:
            model, _ = train.fit(
                model, tokenizer, splits.train, splits.val, epochs=settings.epochs, lr=settings.lr,
                batch_size=settings.batch_size, max_length=cfg.max_length,
                loss_fn=train.weighted_hard_label_loss(weights), bucket_by_length=True, seed=cfg.seed,
                precision=precision, score=lambda logits: frozen.balanced_accuracy(logits.argmax(-1),
                                                                                   splits.val.labels),
                desc="teacher fine-tune",
            )
        shutil.rmtree(teacher_dir, ignore_errors=True)
        answers_file.unlink(missing_ok=True)
        model.save_pretrained(str(teacher_dir), safe_serialization=True)
        if answers:
            np.savez(answers_file, **answers)
        done.write_text(json.dumps({"settings": key}))
    columns = list(range(len(labels)))
    return Teacher("fine-tune", _local_logits(model, tokenizer, cfg.max_length, columns), TeacherSpec(), key,
                   model, tokenizer, own_tokenizer=True, columns=columns, answers=answers,
                   max_length=cfg.max_length)


def _fit_upper_layers(cfg: BuildConfig, model, tokenizer, splits: Splits, precision: str,
                      weights: torch.Tensor | None) -> tuple[Any, dict[str, np.ndarray]]:
    """Cache the frozen layers' outputs once, train the layers above, and answer train, val and test from
    the cache. Train states are kept in bf16 (training targets); val and test in fp32, as served."""
    frozen_layers, settings = cfg.teacher.frozen_layers, cfg.teacher
    total = model.config.num_hidden_layers
    if frozen_layers >= total:
        raise BuildInputError(f"teacher.frozen_layers {frozen_layers} leaves none of the base's {total} layers "
                              "to learn")
    caches = {
        part: frozen.lower_states(model, tokenizer, getattr(splits, part).texts, cfg.max_length, frozen_layers,
                                  precision if part == "train" else "fp32",
                                  desc=f"teacher layers 1-{frozen_layers}, {part} texts")
        for part in ("train", "val", "test")
    }
    model, _ = frozen.fit_upper(
        model, caches["train"], splits.train.labels, caches["val"], splits.val.labels, frozen_layers=frozen_layers,
        epochs=settings.epochs, lr=settings.lr, batch_size=settings.batch_size, seed=cfg.seed,
        precision=precision, weights=weights, desc=f"teacher fine-tune (layers {frozen_layers + 1}-{total})",
    )
    labels = len(splits.train.label_names)
    answers = {part: frozen.cached_features(model, cache, frozen_layers, pooled=part == "train",
                                            precision=precision if part == "train" else "fp32")
               for part, cache in caches.items()}
    answers["val"], answers["test"] = answers["val"][:, :labels], answers["test"][:, :labels]
    return model, answers


def checkpoint_columns(id2label: dict[int, str], labels: tuple[str, ...], where: Path) -> list[int]:
    """The checkpoint's output columns in the data's label order, matched by name.

    An unnamed head (``LABEL_0`` ...) of the right size is taken in the data's order, as serving does.
    """
    names = [str(id2label[i]) for i in range(len(id2label))]
    if sorted(names) == sorted(labels):
        return [names.index(label) for label in labels]
    if len(names) == len(labels) and all(name.startswith("LABEL_") for name in names):
        return list(range(len(labels)))
    raise BuildInputError(f"{where}: the checkpoint's labels {names} (config.json id2label) do not match the data's "
                          f"labels {list(labels)}")


def load_checkpoint_teacher(cfg: BuildConfig, splits: Splits) -> tuple[Teacher, Splits]:
    """An already fine-tuned classifier, used as it is (safetensors only: nothing user-supplied is unpickled).

    Without ``data.labels`` the bundle takes the checkpoint's label order, so its raw outputs are already
    in the bundle's order everywhere; with them, columns are mapped by name.
    """
    path = Path(cfg.teacher.checkpoint or "")
    if not (path / "config.json").is_file():
        raise BuildInputError(f"{path}: teacher.checkpoint is not a model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        raise BuildInputError(f"{path}: no .safetensors weights (only safetensors checkpoints are loaded)")
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    labels = splits.train.label_names
    checkpoint_columns(config.id2label, labels, path)  # fail on a mismatch before loading any weights
    if cfg.data.labels is None:
        names = tuple(str(config.id2label[i]) for i in range(len(config.id2label)))
        if sorted(names) == sorted(labels):
            splits, labels = relabel(splits, names), names
    columns = checkpoint_columns(config.id2label, labels, path)
    try:
        tokenizer = train.load_tokenizer(path)
    except (OSError, ValueError) as exc:
        raise BuildInputError(f"{path}: the checkpoint has no loadable tokenizer ({exc})") from exc
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), local_files_only=True, use_safetensors=True).eval()
    weights = sorted(path.glob("*.safetensors"))
    key = {"kind": "checkpoint", "path": str(path.resolve()), "max_length": cfg.max_length,
           "weights": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights]} | _data_key(splits)
    teacher = Teacher("checkpoint", _local_logits(model, tokenizer, cfg.max_length, columns), TeacherSpec(), key,
                      model, tokenizer, own_tokenizer=True, columns=columns)
    return teacher, splits


def remote_teacher(cfg: BuildConfig, splits: Splits, home: Path) -> Teacher:
    """An Open Inference Protocol v2 server; its answers on the build's texts are cached by text hash."""
    from bundle.teachers import TeacherUnavailable, open_teacher, teacher_logits_sync

    assert cfg.teacher.remote is not None
    spec = TeacherSpec(kind="remote", remote=cfg.teacher.remote)
    labels = list(splits.train.label_names)

    def logits(texts: list[str], desc: str | None = None) -> np.ndarray:
        client = open_teacher(spec, home, labels)
        try:
            return teacher_logits_sync(client, texts, home / "work" / TEACHER_CACHE)
        except TeacherUnavailable as exc:
            raise BuildInputError(f"{cfg.teacher.remote.url}: remote teacher unavailable ({exc})") from exc

    key = {"kind": "remote", "url": cfg.teacher.remote.url, "model": cfg.teacher.remote.model,
           "output": cfg.teacher.remote.output, "scores": cfg.teacher.remote.scores} | _data_key(splits)
    return Teacher("remote", logits, spec, key)


def prepare_teacher(cfg: BuildConfig, splits: Splits, home: Path, work: Path) -> tuple[Teacher, Splits]:
    if cfg.teacher.kind == "checkpoint":
        return load_checkpoint_teacher(cfg, splits)
    if cfg.teacher.kind == "remote":
        return remote_teacher(cfg, splits, home), splits
    return fine_tune_teacher(cfg, splits, work), splits


def initial_student(cfg: BuildConfig, teacher: Teacher, labels: tuple[str, ...]):
    """The student before distillation and its tokenizer, plus which init was used.

    From the teacher's own layers when it is a BERT-family model here; otherwise from the bundled MiniLM,
    whose tokenizer then becomes the bundle's (the teacher keeps its own inside teacher/).
    """
    init = cfg.student.init
    if init == "auto":
        init = "teacher" if teacher.model is not None and train.is_bert_family(teacher.model) else "minilm"
    if init == "minilm":
        try:
            student, tokenizer = train.student_from_minilm(labels, cfg.student.layers, seed=cfg.seed,
                                                           hidden_size=cfg.student.hidden_size)
        except ValueError as exc:
            raise BuildInputError(str(exc)) from exc
        return student, tokenizer, init
    if teacher.model is None:
        raise BuildInputError("student.init 'teacher' needs a teacher whose weights are in the build "
                              "(not a remote one): use 'auto' or 'minilm'")
    try:
        student = train.student_from_teacher(teacher.model, cfg.student.layers)
        if cfg.student.hidden_size is not None and cfg.student.hidden_size != student.config.hidden_size:
            student = train.narrowed(student, cfg.student.hidden_size)
    except ValueError as exc:
        raise BuildInputError(str(exc)) from exc
    if teacher.columns != list(range(len(labels))):  # the head's rows in the bundle's label order
        with torch.no_grad():
            student.classifier.weight.copy_(student.classifier.weight[teacher.columns])
            student.classifier.bias.copy_(student.classifier.bias[teacher.columns])
    student.config.id2label = dict(enumerate(labels))
    student.config.label2id = {name: i for i, name in enumerate(labels)}
    return student, teacher.tokenizer, init


def distill_student(cfg: BuildConfig, student, tokenizer, splits: Splits, soft_targets: np.ndarray,
                    val_teacher_logits: np.ndarray, augmented: train.EpochExtra | None, augmented_size: int = 0,
                    desc: str = "student distillation"):
    """Train the student on ``alpha * CE + (1 - alpha) * T^2 * KL`` against the teacher's logits, plus the
    hidden-state loss where ``distillation.hidden_weight`` is set (``soft_targets`` then carry the teacher's
    pooled last layer after its logits).

    ``augmented`` gives each epoch its teacher-labelled perturbed texts (``augmented_size`` of them); the
    epoch kept is the one whose val answers agree most with the teacher's, since agreement is what decides
    how much traffic the cascade must defer.
    """
    val_teacher_labels = val_teacher_logits.argmax(-1)
    precision = train.resolve_precision(cfg.precision)
    settings, kd = cfg.student, cfg.distillation
    labels = splits.train.label_names
    hidden = None
    if kd.hidden_weight > 0:
        hidden = train.HiddenStateDistillation(student.config.hidden_size, soft_targets.shape[1] - len(labels),
                                               kd.hidden_weight)
    weights = train.class_weights(splits.train.labels, len(labels), cfg.class_weights)
    return train.fit(
        student, tokenizer, splits.train, splits.val, epochs=settings.epochs, lr=settings.lr,
        batch_size=settings.batch_size, max_length=cfg.max_length,
        loss_fn=train.distillation_loss(kd.alpha, kd.temperature, weights), soft_targets=soft_targets,
        extra=augmented, extra_per_epoch=augmented_size if augmented is not None else None,
        score=lambda logits: float((logits.argmax(-1) == val_teacher_labels).mean()), bucket_by_length=True,
        seed=cfg.seed, precision=precision, hidden=hidden, desc=desc,
    )


def augmentation(cfg: BuildConfig, teacher: Teacher, train_set: Dataset,
                 work: Path) -> tuple[train.EpochExtra | None, int]:
    """Each epoch's teacher-labelled perturbed texts, and how many: none without ``distillation.augment``; a
    fresh copy each epoch with ``augment_copies`` null; else that many copies answered once and reused."""
    kd = cfg.distillation
    if not kd.augment:
        return None, 0
    precision = train.resolve_precision(cfg.precision)
    if kd.augment_copies is None:
        def fresh(_epoch: int, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
            texts = train.perturb(train_set.texts, rng)
            with train.autocast(precision):  # training targets only; a remote teacher is unaffected
                return texts, _teacher_targets(cfg, teacher, texts)

        return fresh, len(train_set)
    texts, targets = labelled_copies(cfg, teacher, train_set, work)
    return (lambda _epoch, _rng: (texts, targets)), len(texts)


def _teacher_targets(cfg: BuildConfig, teacher: Teacher, texts: list[str]) -> np.ndarray:
    if cfg.distillation.hidden_weight > 0:
        return teacher.features(texts, desc="teacher labels")
    return teacher.logits(texts, desc="teacher labels")


def labelled_copies(cfg: BuildConfig, teacher: Teacher, train_set: Dataset, work: Path) -> tuple[list[str], np.ndarray]:
    """``distillation.augment_copies`` perturbed copies of the train texts with the teacher's answers, each
    text answered once and kept in ``work`` copy by copy (a 110 M teacher spends about 2-3 minutes on one copy
    here, so a recipe with one more copy pays for that copy only)."""
    labels = len(train_set.label_names)
    pooled = teacher.model is not None  # kept whether or not this recipe uses it: a later one may
    texts: list[str] = []
    parts: list[np.ndarray] = []
    for copy in range(cfg.distillation.augment_copies or 1):
        copy_texts, targets = _labelled_copy(cfg, teacher, train_set, work, copy, pooled)
        texts += copy_texts
        parts.append(targets)
    targets = np.concatenate(parts)
    return texts, targets if cfg.distillation.hidden_weight > 0 else targets[:, :labels]


def _labelled_copy(cfg: BuildConfig, teacher: Teacher, train_set: Dataset, work: Path, copy: int,
                   pooled: bool) -> tuple[list[str], np.ndarray]:
    """Copy number ``copy``: its own seeded draw, so copy 2 is the same whether 2 or 4 copies are asked for."""
    key = {"teacher": teacher.identity, "seed": cfg.seed, "copy": copy, "pooled": pooled,
           "precision": train.resolve_precision(cfg.precision), "texts": train_set.fingerprint()}
    path, key_path = work / f"augmented-{copy}.npz", work / f"augmented-{copy}.json"
    if path.is_file() and key_path.is_file() and json.loads(key_path.read_text()) == key:
        with np.load(path) as saved:
            return [str(t) for t in saved["texts"]], saved["targets"]
    texts = train.perturb(train_set.texts, np.random.default_rng([cfg.seed, copy]))
    with train.autocast(train.resolve_precision(cfg.precision)):  # training targets only
        desc = f"teacher labels, copy {copy + 1}"
        targets = teacher.features(texts, desc=desc) if pooled else teacher.logits(texts, desc=desc)
    np.savez(path, texts=np.asarray(texts, dtype=str), targets=targets)
    key_path.write_text(json.dumps(key))
    return texts, targets


def _student_checkpoint(cfg: BuildConfig, teacher: Teacher, splits: Splits, soft: np.ndarray,
                        val_teacher: np.ndarray, work: Path):
    """The distilled fp32 student and its tokenizer, kept in ``work`` so export can be redone alone."""
    student_dir = work / "student_fp32"
    done = student_dir / "cascade_done.json"
    student, tokenizer, init = initial_student(cfg, teacher, splits.train.label_names)
    key = {"teacher": teacher.identity, "init": init, "max_length": cfg.max_length, "seed": cfg.seed,
           "precision": train.resolve_precision(cfg.precision),
           "student": cfg.student.model_dump(), "distillation": cfg.distillation.model_dump(),
           "class_weights": cfg.class_weights, "loss": "class-weighted distillation"}
    if done.is_file() and json.loads(done.read_text()).get("settings") == key:
        from transformers import AutoModelForSequenceClassification

        tqdm.write(f"student: reusing {student_dir}")
        model = AutoModelForSequenceClassification.from_pretrained(
            str(student_dir), local_files_only=True, use_safetensors=True).eval()
        return model, tokenizer, init, json.loads(done.read_text())["val_agreement"]
    augmented, augmented_size = augmentation(cfg, teacher, splits.train, work)
    student, val_agreement = distill_student(cfg, student, tokenizer, splits, soft, val_teacher, augmented,
                                             augmented_size)
    shutil.rmtree(student_dir, ignore_errors=True)
    student.save_pretrained(str(student_dir), safe_serialization=True)
    done.write_text(json.dumps({"settings": key, "val_agreement": val_agreement}))
    return student, tokenizer, init, val_agreement


def teacher_answers(cfg: BuildConfig, teacher: Teacher, splits: Splits) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The teacher's train targets (logits, then its pooled last layer where the hidden-state loss is on) and
    its val and test logits: from the fine-tuning cache where it has them, else asked now."""
    labels = len(splits.train.label_names)
    hidden = cfg.distillation.hidden_weight > 0
    soft = teacher.answers.get("train")
    if soft is None or (hidden and soft.shape[1] == labels):
        with train.autocast(train.resolve_precision(cfg.precision)):  # training targets; val and test stay fp32
            soft = _teacher_targets(cfg, teacher, splits.train.texts)
    soft = soft if hidden else soft[:, :labels]
    val = teacher.answers["val"] if "val" in teacher.answers else teacher.logits(splits.val.texts)
    test = teacher.answers["test"] if "test" in teacher.answers else teacher.logits(splits.test.texts)
    return soft, val, test


def _stage_teacher(teacher: Teacher, cfg: BuildConfig, check_texts: list[str], stages: dict[str, float],
                   staging: Path) -> dict[str, Any]:
    """A local teacher's weights (and its own tokenizer) and its fp32 ONNX graph in ``teacher/``; a remote
    teacher has no files. Returns the manifest's ``teacher_onnx`` metric (None for a remote teacher)."""
    if teacher.model is None:
        return {"teacher_onnx": None}
    teacher.model.save_pretrained(str(staging / TEACHER_DIR), safe_serialization=True)
    if teacher.own_tokenizer:  # serving and evaluation read a tokenizer inside teacher/ before tokenizer/
        teacher.tokenizer.save_pretrained(str(staging / TEACHER_DIR))
    with timed(stages, "teacher onnx export"):
        teacher_onnx = build_teacher_onnx(teacher.model, teacher.tokenizer, check_texts, cfg.max_length,
                                          staging / TEACHER_DIR / TEACHER_ONNX_FILE)
    tqdm.write(f"fp32 ONNX teacher: {teacher_onnx}")
    return {"teacher_onnx": teacher_onnx}


def _manifest_fields(cfg: BuildConfig, teacher: Teacher, splits: Splits, parent: str | None, teacher_val: float,
                     student_val_agreement: float, init: str) -> dict[str, Any]:
    """The build's own manifest fields: labels, data fingerprints, lineage, settings and its training metrics
    (publish_student adds calibration's fields and the export checks)."""
    return {
        "labels": list(splits.train.label_names),
        "max_length": cfg.max_length,
        "teacher": teacher.spec,
        "source_data": {part: {"name": data.name, "texts": len(data), "sha256": data.fingerprint()}
                        for part, data in (("train", splits.train), ("val", splits.val), ("test", splits.test))},
        "parent_version": parent,
        "metrics": {"teacher_val_accuracy": teacher_val, "student_fp32_val_agreement": student_val_agreement},
        "build": cfg.model_dump(mode="json") | {"student_init": init},
    }


def build(cfg: BuildConfig, home: Path, promote: bool = True) -> Bundle:
    """Run the whole pipeline and publish a new registry version (promoted to ``current`` by default).

    Data and teacher are checked before anything is staged, so bad input leaves the registry as it was.
    """
    torch.set_num_threads(cfg.threads)
    started = time.time()
    registry = Registry(home)
    splits = splits_for(cfg)
    tqdm.write(f"data: {len(splits.train)} train / {len(splits.val)} val / {len(splits.test)} test texts, "
               f"labels {list(splits.train.label_names)}")
    work = home / "work" / cfg.name
    work.mkdir(parents=True, exist_ok=True)

    stages: dict[str, float] = {}
    with timed(stages, "teacher"):
        teacher, splits = prepare_teacher(cfg, splits, home, work)
    with timed(stages, "teacher logits"):
        soft, val_teacher, test_teacher = teacher_answers(cfg, teacher, splits)
    teacher_val = float((val_teacher.argmax(-1) == splits.val.labels).mean())
    with timed(stages, "student distillation"):
        student, tokenizer, init, student_val_agreement = _student_checkpoint(cfg, teacher, splits, soft,
                                                                             val_teacher, work)
    fields = _manifest_fields(cfg, teacher, splits, registry.current_version(), teacher_val, student_val_agreement,
                              init)
    bundle = publish_student(
        registry, student=student, tokenizer=tokenizer, cfg=cfg, splits=splits, teacher_val=val_teacher,
        teacher_test=test_teacher, fields=fields, threads=cfg.threads, started=started, stages=stages,
        stage_teacher=partial(_stage_teacher, teacher, cfg, splits.val.texts[:64], stages), progress=tqdm.write,
    )
    assert bundle is not None  # no judge: nothing refuses it
    if promote:
        registry.promote(bundle.version)
    return registry.load(bundle.version)
