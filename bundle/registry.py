"""The model registry: versioned, checksummed bundles and an atomically switched ``current`` pointer.

This module is read on the serving path, so it imports no training code (no torch, no transformers).
Layout under ``$CASCADE_HOME``::

    registry/<version>/teacher/        Hugging Face directory (safetensors)
    registry/<version>/tokenizer/      Hugging Face tokenizer files
    registry/<version>/student.onnx    int8 student
    registry/<version>/student_fp32/   the student before export (safetensors): where re-distillation starts
    registry/<version>/manifest.json   labels, temperatures, threshold, sha256 of every file, lineage, metrics
    registry/<version>/report.json, operating_curve.png
    registry/current                   the served version (replaced atomically)
    registry/history.jsonl             every switch of ``current``, for rollback
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from bundle.teacher_spec import TeacherSpec

MANIFEST = "manifest.json"
STUDENT_FILE = "student.onnx"
TEACHER_DIR = "teacher"
STUDENT_FP32_DIR = "student_fp32"
TOKENIZER_DIR = "tokenizer"
REPORT_FILE = "report.json"
CURVE_FILE = "operating_curve.png"
STAGING_PREFIX = ".staging-"  # a bundle being made: never a version (see ``Registry.staging``)

# What each serving process loads, for ``Registry.load(verify=...)``: a process checks only those files.
STUDENT_FILES = (STUDENT_FILE, TOKENIZER_DIR)
TEACHER_FILES = (TEACHER_DIR, TOKENIZER_DIR)


class BundleError(RuntimeError):
    """A bundle is missing, incomplete or altered; the message names the file."""


class Temperatures(BaseModel):
    student: float = Field(1.0, gt=0)
    teacher: float = Field(1.0, gt=0)


class Manifest(BaseModel):
    """What a bundle is and how to serve it; everything serving needs besides the weights."""

    version: str
    created: str
    labels: list[str]
    max_length: int
    temperatures: Temperatures
    threshold: float
    confidence_measure: str = "max_prob"
    files: dict[str, str] = Field(description="relative path -> sha256")
    source_data: dict[str, Any] = Field(default_factory=dict)
    parent_version: str | None = None
    teacher_version: str | None = Field(None, description="Bundle the teacher was trained in; kept by re-distillation.")
    teacher: TeacherSpec = Field(default_factory=TeacherSpec, description="Which teacher: local weights in "
                                 "teacher/ or a remote inference server (then the bundle has no teacher/ folder).")
    queue_records: list[str] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)
    build: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def teacher_version(self) -> str:
        """Which teacher this is: the bundle it was trained in (re-distilled bundles keep their parent's)."""
        return self.manifest.teacher_version or self.manifest.version

    @property
    def student_path(self) -> Path:
        return self.path / STUDENT_FILE

    @property
    def teacher_dir(self) -> Path:
        return self.path / TEACHER_DIR

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / TOKENIZER_DIR


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


UNCHECKED = frozenset({MANIFEST, REPORT_FILE})


def checksums(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` but the manifest and the report, which are rewritten later."""
    return {
        str(path.relative_to(root)): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and str(path.relative_to(root)) not in UNCHECKED
    }


def _atomic_write(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Registry:
    """Versions live in immutable folders; only the small ``current`` file ever changes."""

    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.root = self.home / "registry"

    @property
    def current_file(self) -> Path:
        return self.root / "current"

    @property
    def history_file(self) -> Path:
        return self.root / "history.jsonl"

    def versions(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir()
                      if (p / MANIFEST).is_file() and not p.name.startswith(STAGING_PREFIX))

    def current_version(self) -> str | None:
        try:
            return self.current_file.read_text().strip() or None
        except FileNotFoundError:
            return None

    def new_version_id(self) -> str:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        version, n = f"v{stamp}", 1
        while (self.root / version).exists():
            n += 1
            version = f"v{stamp}-{n}"
        return version

    @contextmanager
    def staging(self) -> Iterator[Path]:
        """A new empty folder inside the registry for one bundle being made, so ``publish`` can move it into
        place with one rename (same file system). Whatever the body does not publish is removed on the way
        out, raised or not: a failed or refused build never leaves a half bundle. Its name starts with
        ``STAGING_PREFIX``, which ``versions`` never lists, even in the instant ``publish`` has written the
        manifest and not yet renamed the folder."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=self.root))
        try:
            yield path
        finally:
            if path.exists():  # published folders were renamed away
                shutil.rmtree(path, ignore_errors=True)

    def publish(self, staging: Path, manifest_fields: dict[str, Any], version: str | None = None) -> Bundle:
        """Checksum a staged folder, write its manifest, and move it into the registry in one rename."""
        version = version or self.new_version_id()
        manifest = Manifest(
            version=version,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            files=checksums(staging),
            **manifest_fields,
        )
        _atomic_write(staging / MANIFEST, manifest.model_dump_json(indent=2))
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.root / version
        os.rename(staging, target)
        return Bundle(target, manifest)

    def promote(self, version: str) -> None:
        """Point ``current`` at a verified version; the switch is a single atomic rename."""
        self.load(version)
        previous = self.current_version()
        _atomic_write(self.current_file, version + "\n")
        with self.history_file.open("a") as handle:
            handle.write(json.dumps({"time": time.time(), "from": previous, "to": version}) + "\n")

    def rollback(self) -> str:
        """Return ``current`` to the version it held before the last promotion."""
        history = self.history()
        current = self.current_version()
        for entry in reversed(history):
            if entry["to"] == current and entry["from"]:
                self.promote(entry["from"])
                return entry["from"]
        raise BundleError("nothing to roll back to: no earlier promotion is recorded")

    def history(self) -> list[dict[str, Any]]:
        if not self.history_file.is_file():
            return []
        return [json.loads(line) for line in self.history_file.read_text().splitlines() if line.strip()]

    def load(self, version: str | None = None, verify: bool | Collection[str] = True) -> Bundle:
        """Open a version (default: ``current``) and verify checksums: every file (``True``), none
        (``False``), or only the files under the given relative paths (e.g. ``STUDENT_FILES``), which is
        what a serving process does on every reconfigure and swap: those results are cached per file in
        the process (see ``verify_subset``), so a version is hashed once, not on every reload."""
        version = version or self.current_version()
        if version is None:
            raise BundleError(f"no current model in {self.root}: run `cascade build` first")
        path = self.root / version
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise BundleError(f"bundle {version!r} not found: {manifest_path} is missing")
        try:
            manifest = Manifest.model_validate_json(manifest_path.read_text())
        except ValueError as exc:
            raise BundleError(f"{manifest_path}: invalid manifest: {exc}") from exc
        if verify is True:
            verify_files(path, manifest.files)
        elif verify:
            verify_subset(path, manifest.files, verify)
        return Bundle(path, manifest)

    def save_manifest(self, bundle: Bundle, manifest: Manifest) -> Bundle:
        """Rewrite serving parameters (threshold, temperatures); the checksummed files stay as they are."""
        if manifest.files != bundle.manifest.files or manifest.version != bundle.version:
            raise BundleError("a manifest rewrite may not change the files or the version")
        _atomic_write(bundle.path / MANIFEST, manifest.model_dump_json(indent=2))
        return Bundle(bundle.path, manifest)


def link_tree(source: Path, target: Path) -> None:
    """Copy a folder as hard links where the file system allows (bundle files are never rewritten)."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link)


def home_with_current(home: Path, prefix: str) -> Path:
    """A new model home in a temp dir holding ``home``'s current bundle (hard links: no copy of the weights),
    for measurements that register throwaway versions without touching ``home``.

    Its ``work/teacher_answers`` is a link to ``home``'s: teacher answers are cached by teacher and text
    (distill.evaluate.teacher_cache_dir), so every throwaway home shares one cache and the teacher answers
    each text once, not once per run. The caller removes the returned folder.
    """
    source = Registry(home)
    version = source.current_version()
    if version is None:
        raise BundleError(f"no current bundle in {home}")
    target = Path(tempfile.mkdtemp(prefix=prefix))
    registry = target / "registry"
    registry.mkdir()
    link_tree(source.root / version, registry / version)
    (registry / "current").write_text(version + "\n")
    answers = home / "work" / "teacher_answers"
    answers.mkdir(parents=True, exist_ok=True)
    (target / "work").mkdir()
    (target / "work" / "teacher_answers").symlink_to(answers.resolve(), target_is_directory=True)
    return target


def verify_files(root: Path, expected: dict[str, str]) -> None:
    """Raise on the first missing or altered file, naming it and both hashes."""
    for relative, digest in expected.items():
        path = root / relative
        if not path.is_file():
            raise BundleError(f"bundle {root.name}: file {relative} is missing")
        actual = sha256_file(path)
        if actual != digest:
            raise BundleError(
                f"bundle {root.name}: checksum mismatch for {relative} "
                f"(manifest {digest[:12]}…, file {actual[:12]}…): the file was altered or is corrupt"
            )


# (file, sha256, size, mtime_ns) already verified in this process: version folders are immutable, and a
# file rewritten in place changes its size or mtime, so it is hashed again.
_VERIFIED: set[tuple[str, str, int, int]] = set()


def verify_subset(root: Path, expected: dict[str, str], prefixes: Collection[str]) -> None:
    """Verify only the manifest's files under ``prefixes`` (a file or a folder each), once per process.
    A prefix the manifest does not list is no error (a bundle with a remote teacher has no teacher folder);
    the loader of that file then fails with its own message."""
    chosen = {rel: digest for rel, digest in expected.items()
              if any(rel == prefix or rel.startswith(prefix.rstrip("/") + "/") for prefix in prefixes)}
    unverified: dict[str, str] = {}
    for relative, digest in chosen.items():
        try:
            stat = (root / relative).stat()
        except FileNotFoundError:
            raise BundleError(f"bundle {root.name}: file {relative} is missing") from None
        if (str(root / relative), digest, stat.st_size, stat.st_mtime_ns) not in _VERIFIED:
            unverified[relative] = digest
    verify_files(root, unverified)
    for relative, digest in unverified.items():
        stat = (root / relative).stat()
        _VERIFIED.add((str(root / relative), digest, stat.st_size, stat.st_mtime_ns))
