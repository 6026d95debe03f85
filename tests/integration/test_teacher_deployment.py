"""The teacher replica's host (serving/teacher_host.py) on the tiny bundle, without Ray."""

import asyncio
from pathlib import Path

import numpy as np
import pytest

from bundle.registry import Registry


@pytest.mark.integration  # the tiny bundle (a model build)
def test_the_teacher_answers_one_array_and_hashes_only_the_teachers_files(tiny_home_copy: Path) -> None:
    from serving.teacher_host import TeacherHost
    from tests.fakes import RecordingMetrics

    served = Registry(tiny_home_copy).load(verify=False)
    student = served.path / "student.onnx"
    student.write_bytes(b"not the student")  # the teacher process never loads it
    metrics = RecordingMetrics()
    teacher = TeacherHost(metrics, model={"home": str(tiny_home_copy)})
    answer = asyncio.run(teacher.predict(["great film", "awful film"]))
    assert metrics.counts["call"] == 1 and answer["version"] == served.teacher_version
    assert isinstance(answer["logits"], np.ndarray)
    assert answer["logits"].shape == (2, len(served.manifest.labels))
