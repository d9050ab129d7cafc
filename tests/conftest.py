import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR_DIR = SHARED / "cifar10"
WEIGHTS_A = SHARED / "weights" / "resnet20-12fca82f.th"
WEIGHTS_B = SHARED / "weights" / "resnet20_cifar10_pretrained.pt"
SHIPPED_MODEL = ROOT / "model" / "cnn.pt"

sys.path.insert(0, str(ROOT))


def run_cli(*args, cwd=ROOT, env=None):
    """The script as a user runs it: a fresh process, its exit code, stdout and stderr."""
    return subprocess.run([sys.executable, str(ROOT / "CNNclassify.py"), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def cifar():
    if not (CIFAR_DIR / "cifar-10-batches-py").is_dir():
        pytest.skip(f"real CIFAR-10 not found in {CIFAR_DIR}")
    import CNNclassify
    return CNNclassify.load_cifar(CIFAR_DIR)


@pytest.fixture(scope="session")
def shipped_model():
    if not SHIPPED_MODEL.exists():
        pytest.skip("no trained model committed in model/")
    import CNNclassify
    return CNNclassify.load_cnn()


@pytest.fixture(scope="session")
def shipped_evaluation(tmp_path_factory, shipped_model):
    """`evaluate --precision float32` of the shipped model on all 10,000 test images, run once
    for every test that needs them scored: (the finished process, its record, its folder)."""
    folder = tmp_path_factory.mktemp("evaluate")
    result = run_cli("evaluate", "--data-dir", CIFAR_DIR, "--records-dir", folder, "--out", folder / "c.png",
                     "--precision", "float32")
    record = json.loads((folder / "evaluate.json").read_text()) if result.returncode == 0 else None
    return result, record, folder


@pytest.fixture(scope="session", autouse=True)
def private_format_cache(tmp_path_factory):
    """Tests (and the commands they start) keep measured number formats in a folder of their
    own, never in the user's cache; one folder for the session, as one user's runs share one,
    so a resumed run trains in the format of the run it is compared with."""
    import os
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME")
    else:
        os.environ["XDG_CACHE_HOME"] = previous
