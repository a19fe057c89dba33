"""The artifact folder: the frozen quantized model record shared by calibrate, export, evaluate and check.

Files (DESIGN.md): ``recipe.yaml``, ``quantized.safetensors`` (the Q-model's state: folded float weights,
integer weights ``<layer>.weight_int`` (int8 container), int32 biases, scales; key names in ``qpipe.record``),
``qparams.json`` (the typed quantization record, ``qpipe.record.QuantRecord``), ``graph.onnx`` (the float graph with a
``qpipe.mark::Mark`` node on every quantized tensor), ``model.qdq.onnx``, ``metrics*.json``, ``manifest.json``.
Every file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from qpipe.errors import QpipeError
from qpipe.record import QuantRecord

MANIFEST = "manifest.json"
REQUIRED = ("recipe.yaml", "quantized.safetensors", "qparams.json", "graph.onnx", MANIFEST)


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    return write_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=float) + "\n")


@contextlib.contextmanager
def staging_dir(out: str | Path):
    """A temporary folder renamed to ``out`` when the block finishes; removed if it fails."""
    out = Path(out)
    if out.exists():
        raise QpipeError(f"output folder {out} already exists; choose another --out or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class Artifact:
    """An artifact folder on disk."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise QpipeError(f"artifact folder {self.path} does not exist")
        missing = [f for f in REQUIRED if not (self.path / f).is_file()]
        if missing:
            raise QpipeError(f"{self.path} is not a qpipe artifact (missing {', '.join(missing)})")

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def manifest(self) -> dict[str, Any]:
        return self.read_json(MANIFEST)

    @property
    def qparams(self) -> dict[str, Any]:
        """``qparams.json`` as JSON (the serialised ``record``)."""
        return self.read_json("qparams.json")

    @property
    def record(self) -> QuantRecord:
        """The typed quantization record of the artifact."""
        return QuantRecord.from_json(self.qparams, str(self.file("qparams.json")))

    def read_json(self, name: str) -> dict[str, Any]:
        try:
            return json.loads(self.file(name).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise QpipeError(f"{self.file(name)} is not readable JSON ({type(e).__name__})") from e

    @property
    def recipe(self):
        from qpipe.recipe import load_recipe

        return load_recipe(str(self.file("recipe.yaml")))

    def add_file(self, name: str, data: bytes | str, command: str | None = None) -> Path:
        """Write one more file into the artifact and record its hash in the manifest."""
        path = write_atomic(self.file(name), data)
        self.hash_into_manifest([name], command)
        return path

    def hash_into_manifest(self, names: list[str], command: str | None = None) -> None:
        m = self.manifest
        for name in names:
            m.setdefault("files", {})[name] = sha256(self.file(name))
        if command:
            m.setdefault("commands", []).append({"command": command, "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        write_json(self.file(MANIFEST), m)


def hash_files(folder: Path, names: list[str]) -> dict[str, str]:
    return {n: sha256(folder / n) for n in names}
