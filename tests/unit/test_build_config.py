"""`cascade build` from your own data: the configuration file, its defaults, and every bad input refused with one
line that names the file and row (or the URL), a non-zero exit, and nothing new in the registry."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from distill.config import BuildConfig, BuildInputError, load_config_file


def test_config_file_is_laid_over_the_preset_and_paths_are_relative_to_it(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "build.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"data": {"path": "data.csv", "labels": ["x", "y"]},
                                    "student": {"layers": 3}, "teacher": {"kind": "checkpoint", "checkpoint": "ck"}}))
    cfg = load_config_file(path, tiny=True)
    assert cfg.name == "tiny" and cfg.max_length == 32 and cfg.student.layers == 3 and cfg.student.epochs == 2
    assert cfg.data.path == tmp_path / "conf" / "data.csv" and cfg.teacher.checkpoint == tmp_path / "conf" / "ck"


@pytest.mark.parametrize(("content", "message"), [
    ({"studnet": {"layers": 2}}, r"build.yaml: unknown setting\(s\) \['studnet'\]"),
    ({"student": {"layers": 0}}, r"build.yaml: student.layers: Input should be greater than or equal to 1"),
    ({"student": {"layer": 2}}, r"build.yaml: student.layer: Extra inputs are not permitted"),
    ({"teacher": {"kind": "checkpoint"}}, r"build.yaml: teacher: Value error, teacher.kind 'checkpoint' needs"),
    ({"teacher": {"kind": "remote", "remote": {"model": "m"}}}, r"build.yaml: teacher.remote.url: Field required"),
])
def test_a_bad_config_file_is_one_line_naming_the_setting(tmp_path: Path, content: dict, message: str) -> None:
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(BuildInputError, match=message) as caught:
        load_config_file(path)
    assert "\n" not in str(caught.value)


def test_bundles_built_before_the_sections_still_read() -> None:
    legacy = {"name": "tiny", "max_length": 32, "train_limit": 640, "eval_limit": 160, "teacher_epochs": 3,
              "student_layers": 2, "kd_alpha": 0.3, "kd_augment": True, "target_agreement": 0.95,
              "bootstrap_samples": 100, "latency_runs": 20, "seed": 0, "threads": 2}
    cfg = BuildConfig.model_validate(legacy)
    assert (cfg.data.train_limit, cfg.student.layers, cfg.distillation.alpha, cfg.calibration.target_agreement,
            cfg.evaluation.latency_runs) == (640, 2, 0.3, 0.95, 20)
