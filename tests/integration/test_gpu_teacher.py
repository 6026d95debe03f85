"""The teacher on a GPU (`runtime.device: cuda`, the chart's examples/gpu.yaml): same answers as on the CPU.

Runs only where PyTorch sees a GPU; everywhere else it is skipped with the reason (the project's venv pins the
CPU build of torch, so a GPU machine needs a CUDA build of the same torch version installed first).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="no CUDA GPU visible to PyTorch (torch.cuda.is_available() is False)")]

TEXTS = ["a warm, funny and beautifully acted film", "a dull and lifeless mess", "it was fine, I guess"] * 6


def test_teacher_on_cuda_answers_as_on_cpu(tiny_home: Path) -> None:
    from bundle.registry import Registry
    from bundle.teachers import open_teacher

    bundle = Registry(tiny_home).load()
    manifest = bundle.manifest
    teachers = {device: open_teacher(manifest.teacher, bundle.path, manifest.labels, max_length=manifest.max_length,
                                     device=device) for device in ("cpu", "cuda")}
    assert teachers["cuda"].state()["device"] == "cuda"
    assert next(teachers["cuda"].runtime.model.parameters()).is_cuda
    logits = {device: asyncio.run(teacher.logits(TEXTS)) for device, teacher in teachers.items()}
    np.testing.assert_allclose(logits["cuda"], logits["cpu"], atol=1e-3)
    assert (logits["cuda"].argmax(axis=1) == logits["cpu"].argmax(axis=1)).all()
