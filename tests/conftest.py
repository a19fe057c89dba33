import os

os.environ.setdefault("OMP_NUM_THREADS", "2")


import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is faster, and far faster on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- shared artifacts

def _listing(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*") if p.is_file()}


class Artifacts:
    """Each distinct (model, data, recipe, overrides, export format) artifact, calibrated once per session.

    The artifacts are shared by every test that asks for the same options, so they are read-only: a test that
    writes into one (export, evaluate, diagnose, a tampered file) works on ``copy(art, tmp_path)``. At the end of
    the session every shared artifact is checked to be as it was made."""

    def __init__(self, tmp_path_factory):
        self._factory = tmp_path_factory
        self._made: dict[tuple, object] = {}
        self._listings: dict[Path, dict] = {}

    def get(self, model: str, data: str, recipe: str, *overrides: str, export: str | None = None):
        """The artifact ``qpipe.calibrate(model, data, recipe, overrides=[...])``, exported to ``export`` if set."""
        import qpipe

        key = (model, data, recipe, overrides, export)
        if key not in self._made:
            out = self._factory.mktemp(f"shared-{model}-{recipe}") / "art"
            art = qpipe.calibrate(model, data, recipe, out, overrides=list(overrides), progress=False)
            if export:
                qpipe.export(art, export)
            self._made[key] = art
            self._listings[Path(out)] = _listing(Path(out))
        return self._made[key]

    @staticmethod
    def copy(art, dest: Path) -> Path:
        """A private copy of a shared artifact folder, for a test that writes into it."""
        shutil.copytree(getattr(art, "path", art), dest)
        return dest

    def check_untouched(self):
        changed = [str(p) for p, before in self._listings.items() if _listing(p) != before]
        assert not changed, f"a test wrote into a shared artifact (use Artifacts.copy): {changed}"


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    cache = Artifacts(tmp_path_factory)
    yield cache
    cache.check_untouched()


@pytest.fixture(scope="session")
def cnn_w8a8(artifacts):
    """digits-cnn, W8A8, the recipe's defaults (512 calibration images); calibrated, not exported."""
    return artifacts.get("digits-cnn", "digits", "w8a8")


@pytest.fixture(scope="session")
def cnn_w8a8_64_qdq(artifacts):
    """digits-cnn, W8A8 calibrated on 64 images, exported to QDQ (model.qdq.onnx); not evaluated."""
    return artifacts.get("digits-cnn", "digits", "w8a8", "calibration.images=64", export="qdq")
