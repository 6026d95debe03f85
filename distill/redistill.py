"""`cascade distill --from-queue`: a new student from the teacher answers (and true labels) the gateway collected.

The new student starts from the current one's fp32 weights and trains on the base training set
(teacher soft labels) plus the queued records: a record's target is its true label where a person
gave one (``/v1/feedback``), else the teacher's probabilities turned back into logits.

Three disjoint slices of the leased records, fixed by record id so every run agrees:

- the gate's held-out slice: a uniform sample of recent traffic (shadow and fallback records, each
  held out with a chance inverse to its sampling probability; see ``split_records``), never trained on;
- the selection slice: chooses the epoch (checkpoint) on recent traffic, under a base-val constraint
  (agreement with the teacher on base val at most ``base_val_drop`` below the current student's);
- the rest is learnt from.

The gate (routing/promotion.py) decides promote, reject or wait with paired tests. A decision needs new
evidence: against one current student, a new look is taken only once the held-out slice has grown
by ``min_new_evidence`` since the last look, and each look spends less alpha (the state is kept in
``work/gate_state.json``). Records are acknowledged only after the new version is registered; on
reject or wait nothing is registered and the leases are released at once.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from bundle.model import Model
from bundle.registry import STUDENT_FP32_DIR, TEACHER_DIR, Bundle, Registry, link_tree
from bundle.runtime import StudentRuntime
from bundle.teachers import open_teacher, teacher_logits_sync
from distill import train
from distill.build import splits_for
from distill.config import BuildConfig
from distill.data import Dataset, Splits
from distill.evaluate import teacher_cache_dir
from distill.publish import Candidate, publish_student, student_logits
from records.queue import AnswerRecord, Leased, QueueBackend
from routing.promotion import GateDecision, Paired, decide, false_promotion_rate


class RedistillConfig(BaseModel):
    """How a re-distillation run trains and what it must prove."""

    epochs: int = Field(2, ge=1)
    lr: float = Field(1e-4, gt=0)
    queue_sharpen: float = Field(1.0, ge=1.0, description="Queued teacher logits are scaled by this (sharper "
                                 "targets make the student surer on the queued domain; what 2.0 and 3.0 measured: "
                                 "docs/results.md).")
    queue_weight: int = Field(3, ge=1, description="Each queued record counts this many times: the shifted "
                              "traffic is what the new student must learn, and it is far smaller than the base set.")
    base_replay: int | None = Field(3000, ge=0, description="Base training texts replayed beside the queued "
                                    "records (a fixed random subset); None: all of them.")
    augment_copies: int = Field(4, ge=0, description="Teacher-labelled perturbed copies of each queued teacher "
                                "answer added to each epoch (words dropped or a span kept, as in the build).")
    label_weight: int = Field(1, ge=0, description="Each record with a true label (/v1/feedback) counts this many "
                              "times; 0: labels are not learnt from (they still judge the gate).")
    batch_size: int = Field(32, ge=1)
    min_records: int = Field(20, ge=1, description="Fewer queued records than this: nothing to learn yet.")
    max_records: int = Field(50_000, ge=1)
    holdout_share: float = Field(0.3, gt=0, lt=1, description="Shadow records kept out of training for the gate.")
    select_share: float = Field(0.15, ge=0, lt=1, description="Other records kept out to choose the epoch on.")
    base_val_drop: float = Field(0.01, ge=0, le=1, description="Checkpoint choice: base-val agreement with the "
                                 "teacher may fall at most this far below the current student's.")
    label_smoothing: float = Field(0.05, ge=0, lt=1, description="A true label's target: this much spread evenly.")
    max_accuracy_drop: float = Field(0.01, ge=-1, le=1, description="Non-inferiority margin on the base test set "
                                     "(negative: the new student must gain that much). With about 1,000 test texts "
                                     "and the 5% of answers a re-distilled student changes, the one-sided 95% bound "
                                     "is about 1.1 points wide: a smaller margin is met only by a student that gains.")
    alpha: float = Field(0.05, gt=0, lt=1, description="Chance of ever promoting a student that is no better, over "
                         "all looks against one current student.")
    min_holdout_records: int = Field(20, ge=1, description="Fewer held-out shadow records: wait, do not train.")
    min_new_evidence: float = Field(0.25, ge=0, description="A new look needs the held-out slice this much larger "
                                    "than at the last look against the same current student.")
    lease_s: float = Field(2 * 3600, gt=0, description="How long the run holds its records.")
    threads: int | None = Field(None, ge=1, description="CPU threads for training and inference; None: the "
                                "build's. A job that shares its cores (a CronJob beside the gateway) runs faster "
                                "with fewer: PyTorch's threads spin against each other when a core is taken.")
    promote: bool = True
    register_whatever_the_gate_says: bool = Field(False, description="Register the candidate even when the gate "
                                                  "does not promote it (it is never promoted then): for measuring "
                                                  "recipes in a throwaway model home (python -m distill.recipes).")


class RedistillResult(BaseModel):
    status: str = Field(description="promoted, registered, rejected, wait or skipped")
    message: str
    version: str | None = None
    parent_version: str | None = None
    gate: dict[str, Any] = Field(default_factory=dict)
    records_used: int = 0


def _is_holdout(record_id: str, share: float) -> bool:
    """A stable split by record id: a record is in the held-out slice in every run."""
    digest = int(hashlib.sha256(record_id.encode()).hexdigest()[:8], 16)
    return digest / 0xFFFFFFFF < share


def _teacher_logits(bundle: Bundle, teacher: Model, splits: Splits) -> dict[str, np.ndarray]:
    """Teacher logits on the base splits from the teacher the bundle names (its weights or a remote server),
    cached on disk by teacher and text, so a re-distillation pays for each text once."""
    return {name: teacher_logits_sync(teacher, getattr(splits, name).texts, teacher_cache_dir(bundle))
            for name in ("train", "val", "test")}


def _starting_student(bundle: Bundle, build_cfg: BuildConfig):
    """The current student's fp32 weights; a bundle without them starts again from the teacher's layers."""
    from transformers import AutoModelForSequenceClassification

    fp32 = bundle.path / STUDENT_FP32_DIR
    if fp32.is_dir():
        return AutoModelForSequenceClassification.from_pretrained(str(fp32), local_files_only=True,
                                                                  use_safetensors=True)
    teacher = AutoModelForSequenceClassification.from_pretrained(str(bundle.teacher_dir), local_files_only=True,
                                                                 use_safetensors=True)
    return train.student_from_teacher(teacher, build_cfg.student.layers)


def target_logits(record: AnswerRecord, n_labels: int, teacher_temperature: float, sharpen: float,
                  label_smoothing: float) -> np.ndarray | None:
    """What the student learns for one record: a true label outranks the teacher's answer (None: neither)."""
    if record.label is not None:
        probs = np.full(n_labels, label_smoothing / n_labels)
        probs[record.label] += 1 - label_smoothing
        return np.log(probs) * teacher_temperature
    if record.teacher_probs is None:
        return None
    return np.log(np.clip(record.teacher_probs, 1e-6, 1.0)) * teacher_temperature * sharpen


def training_rows(items: list[Leased], n_labels: int, teacher_temperature: float, sharpen: float,
                  label_smoothing: float, label_repeat: int = 1,
                  teacher_repeat: int = 1) -> tuple[list[str], np.ndarray]:
    """Texts and target logits (``target_logits``), each row repeated by its kind's weight. A text with a true
    label is learnt from its label only: the label outranks the teacher's answer for the same text, so the
    teacher records of a labelled text are dropped (unless ``label_repeat`` is 0: labels not learnt, the
    teacher's answer is). Records with neither a label nor a teacher answer are skipped.
    """
    labelled = {item.record.text for item in items if item.record.label is not None} if label_repeat else set()
    texts, rows = [], []
    for item in items:
        record = item.record
        if record.label is None and record.text in labelled:
            continue
        row = target_logits(record, n_labels, teacher_temperature, sharpen, label_smoothing)
        if row is not None:
            count = label_repeat if record.label is not None else teacher_repeat
            texts += [record.text] * count
            rows += [row] * count
    return texts, np.array(rows, np.float32).reshape(len(rows), n_labels)


def augmented_texts(answered: list[str], copies: int, rng: np.random.Generator) -> list[str]:
    """``copies`` perturbed variants of each teacher-answered queued text (``train.perturb``: words dropped or
    a span kept), for the teacher to label: the shifted domain is seen through a few thousand texts at most."""
    return [text for _ in range(copies) for text in train.perturb(answered, rng)]


def gate_target(record: AnswerRecord) -> int:
    """The answer a held-out record is judged against: the true label if known, else the teacher's."""
    return record.label if record.label is not None else int(np.argmax(record.teacher_probs))


def split_records(leased: list[Leased], teacher_version: str, holdout_share: float,
                  select_share: float) -> tuple[list[Leased], list[Leased], list[Leased]]:
    """(gate held-out, checkpoint selection, learn): disjoint, stable by record id, no text in two slices.

    The held-out slice is a uniform sample of recent *traffic* answered by the current teacher. Shadow
    records sample student-served texts with probability ``s`` (the shadow share); fallback records hold
    deferred texts with probability ``p >= s``. Holding a record out with probability
    ``holdout_share * s / p`` gives every text the same chance, ``holdout_share * s``. Shadow records
    alone would sample only the texts the current student was sure of, where it is right by selection:
    the gate would favour it against any candidate. Feedback records are not traffic; they are learnt from.
    Records that repeat a held-out text (the same text sent twice, or sent again with its true label)
    are left out of training, so the gate never judges a text the candidate learnt.
    """
    traffic = [item for item in leased if item.record.reason in ("shadow", "fallback")
               and item.record.teacher_version == teacher_version and item.record.teacher_probs is not None]
    shadow_share = min((item.record.sampling_probability for item in traffic if item.record.reason == "shadow"),
                       default=None)
    holdout = [] if shadow_share is None else [
        item for item in traffic
        if _is_holdout(item.record.id, holdout_share * shadow_share / item.record.sampling_probability)]
    held_ids = {item.record.id for item in holdout}
    held_texts = {item.record.text for item in holdout}
    select, learn = [], []
    for item in leased:
        record = item.record
        if record.id in held_ids or record.text in held_texts:
            continue
        (select if _is_holdout(record.id + "/select", select_share) else learn).append(item)
    return holdout, select, learn


def _gate_state(home: Path) -> Path:
    return home / "work" / "gate_state.json"


def _read_gate_state(home: Path, parent_version: str) -> dict[str, int]:
    path = _gate_state(home)
    state = json.loads(path.read_text()) if path.is_file() else {}
    return state.get(parent_version, {"looks": 0, "holdout": 0})


def _write_gate_state(home: Path, parent_version: str, looks: int, holdout: int) -> None:
    path = _gate_state(home)
    state = json.loads(path.read_text()) if path.is_file() else {}
    state[parent_version] = {"looks": looks, "holdout": holdout}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2))


def _wait(queue: QueueBackend, leased: list[Leased], parent: Bundle, message: str,
          gate: dict[str, Any] | None = None, status: str = "wait") -> RedistillResult:
    """Nothing registered; the leases end now, so the records are there for the next run."""
    queue.release([item.token for item in leased])
    return RedistillResult(status=status, parent_version=parent.version, gate=gate or {}, records_used=len(leased),
                           message=message)


def not_ready_reason(cfg: RedistillConfig, holdout: int, prior: dict[str, int], parent_version: str) -> str | None:
    """Why the gate cannot look yet (too few held-out records, or no new evidence since its last look against
    this student: each look spends alpha); None when it can. Checked before any training is paid for."""
    if holdout < cfg.min_holdout_records:
        return (f"{holdout} held-out shadow records (< {cfg.min_holdout_records}): not enough recent traffic to "
                "judge a new student yet")
    needed = int(np.ceil(prior["holdout"] * (1 + cfg.min_new_evidence)))
    if prior["looks"] and holdout < needed:
        return (f"the gate looked {prior['looks']} time(s) at {prior['holdout']} held-out records against "
                f"{parent_version}; a new look needs new evidence: {needed} (now {holdout})")
    return None


def replay_indices(n_train: int, base_replay: int | None, seed: int) -> np.ndarray:
    """The base training rows replayed beside the queued records: a fixed random subset by the build's seed
    (sorted, so the rows keep their order), or all of them with None."""
    replay = np.arange(n_train)
    if base_replay is not None and base_replay < n_train:
        replay = np.sort(np.random.default_rng(seed).choice(replay, base_replay, replace=False))
    return replay


@dataclass(frozen=True)
class Slices:
    """The leased records and their three disjoint slices (``split_records``)."""

    leased: list[Leased]
    holdout: list[Leased]
    select: list[Leased]
    learn: list[Leased]


@dataclass(frozen=True)
class TrainingData:
    """What the new student learns from and chooses its epoch on."""

    combined: Dataset  # replayed base texts, then the queued rows (each repeated by its kind's weight)
    soft: np.ndarray  # their target logits
    selection: Dataset  # base val, then the selection slice (labelled by teacher or true label)
    selection_rows: int  # rows of the selection slice in ``selection``
    answered: list[str]  # queued texts the teacher answered: perturbed copies of them join each epoch


def training_data(cfg: RedistillConfig, splits: Splits, base_train_logits: np.ndarray, slices: Slices, seed: int,
                  teacher_temperature: float, parent_version: str = "the current student") -> TrainingData:
    """Base replay plus queued rows to learn from, and base val plus the selection slice to choose the epoch on."""
    n_labels = len(splits.train.label_names)

    def targets(items: list[Leased], label_repeat: int = 1, teacher_repeat: int = 1) -> tuple[list[str], np.ndarray]:
        return training_rows(items, n_labels, teacher_temperature, cfg.queue_sharpen, cfg.label_smoothing,
                             label_repeat, teacher_repeat)

    learn_texts, queued_logits = targets(slices.learn, cfg.label_weight, cfg.queue_weight)
    select_texts, select_logits = targets(slices.select)
    replay = replay_indices(len(splits.train), cfg.base_replay, seed)
    combined = Dataset(
        name=f"{splits.train.name}+queue",
        texts=[splits.train.texts[i] for i in replay] + learn_texts,
        labels=np.concatenate([splits.train.labels[replay], queued_logits.argmax(-1)]).astype(np.int64),
        label_names=splits.train.label_names,
    )
    soft = np.concatenate([base_train_logits[replay], queued_logits]).astype(np.float32)
    selection = Dataset(name=f"{splits.val.name}+selection", texts=splits.val.texts + select_texts,
                        labels=np.concatenate([splits.val.labels, select_logits.argmax(-1)]).astype(np.int64),
                        label_names=splits.val.label_names)
    labelled = sum(item.record.label is not None for item in slices.learn)
    tqdm.write(f"re-distilling {parent_version}: {len(replay)} base + {len(learn_texts)} queued rows (weighted) "
               f"({labelled} with true labels; {len(select_texts)} choose the epoch, {len(slices.holdout)} held out "
               "for the gate)")
    # Teacher-labelled perturbations of the queued texts, fresh each epoch: the shifted domain is seen
    # through a few thousand texts at most, and the teacher can answer variants of them (as in the build).
    answered = list(dict.fromkeys(item.record.text for item in slices.learn if item.record.label is None))
    return TrainingData(combined, soft, selection, len(select_texts), answered)


@dataclass
class EpochChoice:
    """``train.fit``'s score: agreement on the selection slice of recent traffic, for epochs that keep base-val
    agreement with the teacher at or above ``floor`` (an epoch below it scores under every epoch above it).
    Every epoch's two agreements are kept for the gate's report."""

    val_teacher_labels: np.ndarray  # the teacher's answers on base val: the first rows scored
    select_labels: np.ndarray  # the selection slice's targets: the rows after them
    floor: float
    checkpoints: list[dict[str, float]] = field(default_factory=list)

    def __call__(self, logits: np.ndarray) -> float:
        n_val = len(self.val_teacher_labels)
        base = float((logits[:n_val].argmax(-1) == self.val_teacher_labels).mean())
        recent = float((logits[n_val:].argmax(-1) == self.select_labels).mean()) if len(self.select_labels) else base
        self.checkpoints.append({"base_val_agreement": base, "selection_agreement": recent})
        return recent if base >= self.floor else base - 1.0


def queue_augmentation(teacher: Model, answered: list[str], copies: int, sharpen: float,
                       n_labels: int) -> train.EpochExtra | None:
    """Each epoch's ``copies`` fresh perturbations of the teacher-answered queued texts, with the teacher's
    sharpened answers (None without copies)."""
    if not copies:
        return None

    def augmented(_epoch: int, rng: np.random.Generator) -> tuple[list[str], np.ndarray]:
        texts = augmented_texts(answered, copies, rng)
        if not texts:
            return [], np.zeros((0, n_labels), np.float32)
        return texts, teacher_logits_sync(teacher, texts) * sharpen

    return augmented


def _train_candidate(parent: Bundle, build_cfg: BuildConfig, cfg: RedistillConfig, data: TrainingData,
                     choice: EpochChoice, extra: train.EpochExtra | None) -> tuple[Any, Any]:
    """The new fp32 student and its tokenizer: the current student trained further on ``data``, the epoch
    ``choice`` scores best kept."""
    tokenizer = train.load_tokenizer(parent.tokenizer_dir)
    student, _ = train.fit(
        _starting_student(parent, build_cfg), tokenizer, data.combined, data.selection, epochs=cfg.epochs, lr=cfg.lr,
        batch_size=cfg.batch_size, max_length=build_cfg.max_length,
        loss_fn=train.distillation_loss(build_cfg.distillation.alpha, build_cfg.distillation.temperature),
        soft_targets=data.soft, score=choice, bucket_by_length=True, seed=build_cfg.seed,
        precision=train.resolve_precision(build_cfg.precision),
        extra=extra, extra_per_epoch=cfg.augment_copies * len(data.answered), desc="re-distillation",
    )
    return student, tokenizer


def holdout_targets(slices: Slices) -> np.ndarray:
    """What each held-out record is judged against: a true label that came back for the same text
    (/v1/feedback) outranks the teacher's answer."""
    true_labels = {item.record.text: item.record.label for item in slices.leased if item.record.label is not None}
    return np.array([true_labels.get(item.record.text, gate_target(item.record)) for item in slices.holdout])


@dataclass
class Gate:
    """``publish_student``'s judge: paired tests of the int8 candidate against the current student on the
    held-out slice and the base test set (routing/promotion.py). The look is recorded whatever it decides;
    the candidate is refused (None) unless it is promoted or ``register_whatever_the_gate_says``."""

    home: Path
    cfg: RedistillConfig
    parent: Bundle
    current: StudentRuntime
    slices: Slices
    test: Dataset
    test_teacher: np.ndarray  # the teacher's answers on the base test set
    look: int
    choice: EpochChoice
    decision: GateDecision | None = None
    report: dict[str, Any] = field(default_factory=dict)

    def __call__(self, candidate: Candidate) -> dict[str, Any] | None:
        n_labels, cfg = len(self.parent.manifest.labels), self.cfg
        texts, targets = [item.record.text for item in self.slices.holdout], holdout_targets(self.slices)
        old_test = student_logits(self.current, self.test.texts, n_labels).argmax(-1)
        new_test = candidate.test_logits.argmax(-1)
        old_hold = student_logits(self.current, texts, n_labels).argmax(-1)
        new_hold = student_logits(candidate.runtime, texts, n_labels).argmax(-1)
        holdout_pair = Paired.of(targets, old_hold, new_hold)
        base_pair = Paired.of(self.test.labels, old_test, new_test)
        self.decision = decide(holdout_pair, base_pair, margin=cfg.max_accuracy_drop, alpha=cfg.alpha, look=self.look)
        _write_gate_state(self.home, self.parent.version, self.look, len(self.slices.holdout))
        self.report = self.decision.as_dict() | {
            "false_promotion": false_promotion_rate(holdout_pair, base_pair, margin=cfg.max_accuracy_drop,
                                                    alpha=cfg.alpha, look=self.look),
            "base_test_texts": len(self.test),
            "current_test_accuracy": float((old_test == self.test.labels).mean()),
            "new_test_accuracy": float((new_test == self.test.labels).mean()),
            # Agreement with the teacher on the base test set: how close distillation brought the student on
            # the domain it was built from, the level re-distillation on new traffic can hope to approach there.
            "current_test_agreement": float((old_test == self.test_teacher).mean()),
            "new_test_agreement": float((new_test == self.test_teacher).mean()),
            "holdout_records": len(self.slices.holdout),
            "holdout_labelled": int(sum(item.record.label is not None for item in self.slices.holdout)),
            "current_holdout_agreement": float((old_hold == targets).mean()),
            "new_holdout_agreement": float((new_hold == targets).mean()),
            "checkpoints": self.choice.checkpoints,
            "base_val_floor": self.choice.floor,
            "max_accuracy_drop": cfg.max_accuracy_drop,
            "passed": self.decision.outcome == "promote",
        }
        if self.decision.outcome != "promote" and not cfg.register_whatever_the_gate_says:
            return None
        return {"gate": self.report}


def _manifest_fields(cfg: RedistillConfig, parent: Bundle, build_cfg: BuildConfig, slices: Slices,
                     data: TrainingData) -> dict[str, Any]:
    """The new version's own manifest fields: the parent's labels, teacher and lineage, and what it learnt from
    (publish_student adds calibration's fields, the export check and the gate)."""
    return {
        "labels": parent.manifest.labels,
        "max_length": build_cfg.max_length,
        "source_data": parent.manifest.source_data | {"queue": {"records": len(slices.learn),
                                                                "selection": data.selection_rows,
                                                                "held_out": len(slices.holdout)}},
        "parent_version": parent.version,
        "teacher_version": parent.teacher_version,
        "teacher": parent.manifest.teacher,
        "queue_records": [item.record.id for item in slices.leased],
        "build": parent.manifest.build | {"redistill": cfg.model_dump()},
    }


def _link_parent_teacher(parent: Bundle, staging: Path) -> dict[str, Any]:
    """The parent's teacher/ as hard links: the teacher is not retrained (a remote teacher's bundle has none)."""
    if parent.teacher_dir.is_dir():
        link_tree(parent.teacher_dir, staging / TEACHER_DIR)
    return {}


def _registered(registry: Registry, queue: QueueBackend, bundle: Bundle, gate: Gate, cfg: RedistillConfig,
                slices: Slices) -> RedistillResult:
    """Promote when the gate passed it (and ``promote`` is on), then acknowledge the records: only now, with
    the new version registered, are they done with."""
    assert gate.decision is not None
    promoted = cfg.promote and gate.decision.outcome == "promote"
    if promoted:
        registry.promote(bundle.version)
    queue.ack([item.token for item in slices.leased])
    return RedistillResult(status="promoted" if promoted else "registered", version=bundle.version,
                           parent_version=gate.parent.version, gate=gate.report, records_used=len(slices.leased),
                           message=f"{bundle.version} registered from {len(slices.learn)} queued records; "
                           + "; ".join(gate.decision.reasons))


def redistill(home: Path, queue: QueueBackend, cfg: RedistillConfig) -> RedistillResult:
    """One run: lease, train, export, gate, register (and promote), acknowledge."""
    registry = Registry(home)
    parent = registry.load()
    build_cfg = BuildConfig.model_validate(parent.manifest.build)
    leased: list[Leased] = queue.lease(cfg.max_records, cfg.lease_s)
    if len(leased) < cfg.min_records:
        return RedistillResult(status="skipped", parent_version=parent.version, records_used=len(leased),
                               message=f"{len(leased)} queued records (< {cfg.min_records}): nothing to learn yet")
    started = time.time()
    import torch

    threads = cfg.threads or build_cfg.threads
    torch.set_num_threads(threads)
    slices = Slices(leased, *split_records(leased, parent.teacher_version, cfg.holdout_share, cfg.select_share))
    prior = _read_gate_state(home, parent.version)
    reason = not_ready_reason(cfg, len(slices.holdout), prior, parent.version)
    if reason is not None:
        return _wait(queue, leased, parent, reason)
    splits = splits_for(build_cfg)
    teacher = open_teacher(parent.manifest.teacher, parent.path, parent.manifest.labels,
                           max_length=build_cfg.max_length, threads=threads)
    base_logits = _teacher_logits(parent, teacher, splits)
    n_labels = len(parent.manifest.labels)
    data = training_data(cfg, splits, base_logits["train"], slices, build_cfg.seed,
                         parent.manifest.temperatures.teacher, parent.version)
    current = StudentRuntime(parent.student_path, parent.tokenizer_dir, build_cfg.max_length, threads)
    val_teacher_labels = base_logits["val"].argmax(-1)
    floor = float((student_logits(current, splits.val.texts, n_labels).argmax(-1) == val_teacher_labels).mean()
                  ) - cfg.base_val_drop
    choice = EpochChoice(val_teacher_labels, data.selection.labels[len(splits.val):], floor)
    extra = queue_augmentation(teacher, data.answered, cfg.augment_copies, cfg.queue_sharpen, n_labels)
    student, tokenizer = _train_candidate(parent, build_cfg, cfg, data, choice, extra)
    gate = Gate(home, cfg, parent, current, slices, splits.test, base_logits["test"].argmax(-1), prior["looks"] + 1,
                choice)
    bundle = publish_student(
        registry, student=student, tokenizer=tokenizer, cfg=build_cfg, splits=splits, teacher_val=base_logits["val"],
        teacher_test=base_logits["test"], fields=_manifest_fields(cfg, parent, build_cfg, slices, data),
        stage_teacher=partial(_link_parent_teacher, parent), tokenizer_dir=parent.tokenizer_dir, threads=threads,
        started=started, judge=gate,
    )
    if bundle is None:
        assert gate.decision is not None
        status = "rejected" if gate.decision.outcome == "reject" else "wait"
        return _wait(queue, leased, parent, f"gate: {gate.decision.outcome}: " + "; ".join(gate.decision.reasons),
                     gate.report, status)
    return _registered(registry, queue, bundle, gate, cfg, slices)
