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
    return CNNclassify.load_cnn()  # float32, as `test` computes
