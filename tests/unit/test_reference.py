"""The README's configuration reference is generated from the settings models and must be current."""

from __future__ import annotations

from pathlib import Path

from cli.reference import END, START, field_rows, render
from serving.settings import GatewayConfig

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_reference_is_current() -> None:
    text = README.read_text()
    section = text[text.index(START) : text.index(END) + len(END)]
    assert section == render(), "README's configuration reference is stale: run `cascade reference --write`"


def test_every_gateway_field_is_listed_with_its_default() -> None:
    rows = {path: default for path, _, default, _ in field_rows(GatewayConfig)}
    assert rows["teacher.timeout_s"] == f"`{GatewayConfig().teacher.timeout_s}`"
    assert "routing.threshold" in rows and "limits.max_texts" in rows
    assert not any(path.endswith((".routing", ".teacher", ".limits")) for path in rows)  # nested models flattened


def test_every_field_says_what_it_does() -> None:
    from serving.settings import TeacherDeploymentConfig

    for model in (GatewayConfig, TeacherDeploymentConfig):
        undocumented = [path for path, _, _, description in field_rows(model) if not description]
        assert not undocumented, f"{model.__name__} fields without a description: {undocumented}"
