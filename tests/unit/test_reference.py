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
