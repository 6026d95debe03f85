"""The Teacher deployment's class on the tiny bundle, without a Serve cluster."""

import asyncio
from pathlib import Path

import numpy as np
import pytest

from bundle.registry import Registry


@pytest.mark.integration  # the tiny bundle (a model build)
def test_the_teacher_answers_one_array_and_hashes_only_the_teachers_files(tiny_home_copy: Path) -> None:
    from serving.teacher import Teacher as TeacherDeployment

    served = Registry(tiny_home_copy).load(verify=False)
    student = served.path / "student.onnx"
    student.write_bytes(b"not the student")  # the teacher process never loads it
    teacher = TeacherDeployment(model={"home": str(tiny_home_copy)})
    answer = asyncio.run(teacher.predict(["great film", "awful film"]))
    assert isinstance(answer["logits"], np.ndarray)
    assert answer["logits"].shape == (2, len(served.manifest.labels))
