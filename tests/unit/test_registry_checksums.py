"""The registry's checksums on the serving path: a subset verified once per process, re-hashed on change."""

import os
from pathlib import Path

import pytest

from bundle import registry as registry_module
from bundle.registry import STUDENT_FILES, BundleError, Registry


def test_a_verified_file_is_not_hashed_again_while_its_size_and_mtime_hold(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    (staging / "tokenizer").mkdir(parents=True)
    (staging / "student.onnx").write_bytes(b"student")
    (staging / "tokenizer" / "vocab.txt").write_bytes(b"vocab")
    registry = Registry(tmp_path)
    version = registry.publish(staging, {"labels": ["a", "b"], "max_length": 8, "temperatures": {},
                                         "threshold": 0.5}).version
    registry.load(version, verify=STUDENT_FILES)
    student = tmp_path / "registry" / version / "student.onnx"
    stat = student.stat()
    student.write_bytes(b"STUDENT")  # same size; mtime put back: only a hash could tell
    os.utime(student, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    registry.load(version, verify=STUDENT_FILES)  # a cache hit: not hashed, so not refused
    with pytest.raises(BundleError, match=r"student\.onnx"):
        registry.load(version)  # a full verify always hashes
    assert any(Path(entry[0]).name == "student.onnx" for entry in registry_module._VERIFIED)


def test_checksums_of_a_subset_are_verified_once_per_process(tmp_path: Path) -> None:
    staging = tmp_path / "staging"
    (staging / "tokenizer").mkdir(parents=True)
    (staging / "teacher").mkdir()
    (staging / "student.onnx").write_bytes(b"student")
    (staging / "tokenizer" / "vocab.txt").write_bytes(b"vocab")
    (staging / "teacher" / "model.safetensors").write_bytes(b"teacher")
    registry = Registry(tmp_path)
    version = registry.publish(staging, {"labels": ["a", "b"], "max_length": 8, "temperatures": {},
                                         "threshold": 0.5}).version
    from bundle import registry as registry_module
    from bundle.registry import STUDENT_FILES, BundleError

    teacher_file = tmp_path / "registry" / version / "teacher" / "model.safetensors"
    teacher_file.write_bytes(b"altered")
    registry.load(version, verify=STUDENT_FILES)  # the gateway never loads the teacher: not hashed
    ours = tmp_path / "registry"  # the cache is per process: other tests' registries are in it too
    checked = {Path(entry[0]).name for entry in registry_module._VERIFIED if Path(entry[0]).is_relative_to(ours)}
    assert {"student.onnx", "vocab.txt"} <= checked and "model.safetensors" not in checked
    with pytest.raises(BundleError, match=r"teacher/model\.safetensors"):
        registry.load(version)
    student_file = tmp_path / "registry" / version / "student.onnx"
    student_file.write_bytes(b"STUDENT")  # same size, new mtime: hashed again
    with pytest.raises(BundleError, match=r"student\.onnx"):
        registry.load(version, verify=STUDENT_FILES)
