import os
import pickle
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# Nothing written into the checkout: matplotlib's font cache goes to a temporary folder and no bytecode is written
# (the script's own default for MPLCONFIGDIR is the project's git-ignored .matplotlib/), for
# this process and every `python CNNclassify.py` the tests start.
os.environ["MPLCONFIGDIR"] = tempfile.mkdtemp(prefix="cnnclassify-tests-mpl-")
os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
sys.dont_write_bytecode = True

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR_DIR = SHARED / "cifar10"
WEIGHTS_A = SHARED / "weights" / "resnet20-12fca82f.th"
SHIPPED_MODEL = ROOT / "model" / "cnn.pt"

sys.path.insert(0, str(ROOT))


def write_fake_batch(path, n, bytes_keys, seed=0):
    """A CIFAR-10 batch file of n random images and labels, in the official layout."""
    import numpy as np
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    batch = {"data": data, "labels": labels, "batch_label": "fake", "filenames": [f"{i}.png" for i in range(n)]}
    if bytes_keys:
        batch = {k.encode(): v for k, v in batch.items()}
    with open(path, "wb") as f:
        pickle.dump(batch, f)
    return data, labels


def make_fake_cifar(folder, n=64):
    """A small synthetic CIFAR-10 folder (cifar-10-batches-py) for fast end-to-end runs."""
    import CNNclassify as C
    folder.mkdir(parents=True)
    for i, name in enumerate(C.CIFAR_TRAIN_FILES + [C.CIFAR_TEST_FILE]):
        write_fake_batch(folder / name, n, bytes_keys=True, seed=i)


def run_cli(*args, cwd=ROOT, env=None):
    """The script as a user runs it: a fresh process, its exit code, stdout and stderr."""
    return subprocess.run([sys.executable, str(ROOT / "CNNclassify.py"), *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


IN_CI = os.environ.get("CI") == "true"


def need_shared(path):
    """A file of ../shared (the real CIFAR-10, the published ResNet-20): a clear skip where it
    is missing on a developer's machine, a failure in CI, which always has it."""
    if not Path(path).exists():
        message = f"{path} not found (../shared beside the project)"
        pytest.fail(message) if IN_CI else pytest.skip(message)
    return path


def shared_cifar():
    return need_shared(CIFAR_DIR / "cifar-10-batches-py").parent


@pytest.fixture(scope="session")
def cifar():
    import CNNclassify
    return CNNclassify.load_cifar(shared_cifar())


@pytest.fixture
def cli(capfd):
    """`python CNNclassify.py ...` run inside the test process: the same exit code, stdout and
    stderr (file-descriptor level) as run_cli, without a new process importing torch. For
    checks of one command's answer; run_cli stays for what only a fresh process shows."""
    import CNNclassify

    def run(*args, cwd=None):
        before = os.getcwd()
        capfd.readouterr()
        try:
            os.chdir(cwd or ROOT)
            code = CNNclassify.main([str(a) for a in args])
        except SystemExit as stop:  # argparse: --help, bad options
            code = stop.code
        finally:
            os.chdir(before)
        out, err = capfd.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)
    return run


@pytest.fixture(scope="session")
def shipped_model():
    if not SHIPPED_MODEL.exists():
        pytest.skip("no trained model committed in model/")
    import CNNclassify
    return CNNclassify.load_cnn()  # float32, as `test` computes
