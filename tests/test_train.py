"""Data, model and training: fast checks on synthetic data, one short run on real data."""
import functools
import hashlib
import http.server
import json
import pickle
import tarfile
import threading
from argparse import Namespace

import numpy as np
import pytest
import torch

import CNNclassify as C
from conftest import CIFAR_DIR, ROOT, run_cli


def write_fake_batch(path, n, bytes_keys, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, n).tolist()
    batch = {"data": data, "labels": labels, "batch_label": "fake", "filenames": [f"{i}.png" for i in range(n)]}
    if bytes_keys:
        batch = {k.encode(): v for k, v in batch.items()}
    with open(path, "wb") as f:
        pickle.dump(batch, f)
    return data, labels


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_read_cifar_batch_accepts_bytes_and_str_keys(tmp_path, bytes_keys):
    data, labels = write_fake_batch(tmp_path / "b", 7, bytes_keys)
    images, read_labels = C.read_cifar_batch(tmp_path / "b")
    assert images.dtype == torch.uint8 and images.shape == (7, 3, 32, 32)
    # row-major R, G, B planes: pixel (row 1, col 2) of the green plane is entry 1024 + 32 + 2
    assert images[3, 1, 1, 2] == data[3, 1024 + 32 + 2]
    assert read_labels.tolist() == labels


def make_fake_cifar(folder, n=64):
    folder.mkdir(parents=True)
    for i, name in enumerate(C.CIFAR_TRAIN_FILES + [C.CIFAR_TEST_FILE]):
        write_fake_batch(folder / name, n, bytes_keys=True, seed=i)


@pytest.fixture
def local_server(tmp_path):
    """An HTTP server on loopback serving tmp_path/served, stopped after the test."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_path_with_checksum(tmp_path, local_server):
    """The real download code, fed an archive of the real batches over loopback HTTP, MD5 checked."""
    if not (CIFAR_DIR / C.CIFAR_FOLDER).is_dir():
        pytest.skip("real CIFAR-10 not found")
    served, base_url = local_server
    archive = served / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        tar.add(CIFAR_DIR / C.CIFAR_FOLDER, arcname=C.CIFAR_FOLDER)
    md5 = hashlib.md5(archive.read_bytes()).hexdigest()
    data = C.load_cifar(tmp_path / "data", url=f"{base_url}/{archive.name}", md5=md5)
    assert data["train"][0].shape == (50000, 3, 32, 32) and data["test"][0].shape == (10000, 3, 32, 32)
    assert (tmp_path / "data" / C.CIFAR_FOLDER / "test_batch").is_file()

    with pytest.raises(C.UserError, match="could not get CIFAR-10"):
        C.load_cifar(tmp_path / "other", url=f"{base_url}/{archive.name}", md5="0" * 32)


def test_no_dataset_and_no_network_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(C, "CIFAR_URL", (tmp_path / "unreachable.tar.gz").as_uri())
    code = C.main(["train", "--data-dir", str(tmp_path / "data"), "--model-dir", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: could not get CIFAR-10") and "cifar-10-batches-py" in err[-1]
    assert not (tmp_path / "m").exists()


def test_first_layer_is_the_assignments():
    conv = C.build_cnn().conv1
    assert isinstance(conv, torch.nn.Conv2d)
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (3, 32, (5, 5), (1, 1), (0, 0))


@pytest.mark.parametrize("training", [True, False])
def test_output_shapes(training):
    model = C.build_cnn().train(training)
    with torch.no_grad():
        assert model(torch.rand(5, 3, 32, 32)).shape == (5, 10)
        assert model.first_layer(torch.rand(2, 3, 32, 32)).shape == (2, 32, 28, 28)


def test_whitening_decorrelates_patches():
    """After set_whitening the first 16 filters give uncorrelated, unit-variance outputs."""
    images = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8)
    images = (images.float() * 0.3 + images.float().mean(1, keepdim=True) * 0.7).to(torch.uint8)  # correlated channels
    model = C.build_cnn()
    C.set_whitening(model, images, eps=0)
    with torch.no_grad():
        out = model.first_layer(C.to_float(images)).double()
    features = out[:, :16].permute(1, 0, 2, 3).reshape(16, -1)
    covariance = torch.cov(features)
    assert torch.allclose(covariance, torch.eye(16, dtype=torch.double), atol=0.05)
    assert torch.allclose(out[:, 16:], -out[:, :16])


def test_flip_and_translate_are_batched_views_of_the_input():
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    flipped = C.flip_half(images, torch.tensor([True, False]))
    assert torch.equal(flipped[0], images[0].flip(-1)) and torch.equal(flipped[1], images[1])
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(C.translate(images, 0, generator), images)
    shifted = C.translate(images, 2, generator)
    padded = torch.nn.functional.pad(images, (2,) * 4, mode="reflect")
    for i in range(2):  # each output is one 32 x 32 window of the padded image
        windows = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(shifted[i], w) for w in windows)


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [C.lr_factor(step, 100, 0.2) for step in range(101)]
    assert factors[0] == pytest.approx(0.2) and max(factors) == pytest.approx(1.0)
    assert factors[20] == pytest.approx(1.0) and factors[100] == 0.0
    assert all(a <= b for a, b in zip(factors[:20], factors[1:21]))
    assert all(a >= b for a, b in zip(factors[20:], factors[21:]))


def test_weight_average_moves_by_the_ramped_decay():
    average, model = C.build_cnn(), C.build_cnn()
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            tensor.add_(1)
    before = {k: v.clone() for k, v in average.state_dict().items()}
    C.update_average(average, model, step=0, decay=0.99)  # ramp: decay 1/10 at the first step
    after = {k: v.clone() for k, v in average.state_dict().items()}
    target = model.state_dict()
    for key in before:
        if before[key].is_floating_point():
            assert torch.allclose(after[key], before[key] + 0.9 * (target[key] - before[key]))
        else:  # BatchNorm's step counter is left alone
            assert torch.equal(after[key], before[key])
    C.update_average(average, model, step=10**6, decay=0.99)  # late: capped at the decay
    moved = average.head.weight - after["head.weight"]
    assert torch.allclose(moved, 0.01 * (model.head.weight - after["head.weight"]), atol=1e-7)


def test_save_load_round_trip(tmp_path):
    model = C.build_cnn()
    C.set_whitening(model, torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8))
    model.train()
    with torch.no_grad():
        for _ in range(2):  # move BN statistics away from their initial values
            model(torch.rand(8, 3, 32, 32))
    C.save_checkpoint(tmp_path / "m.pt", model, {"seed": 3})
    loaded = C.load_cnn(tmp_path / "m.pt")
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded(x))
    assert not loaded.training
    checkpoint = torch.load(tmp_path / "m.pt", weights_only=True)
    assert checkpoint["classes"] == list(C.CLASSES) and checkpoint["seed"] == 3


def test_atomic_write_keeps_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "cnn.pt"
    target.write_bytes(b"previous model")

    def crash(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        C.write_atomically(target, crash)
    assert target.read_bytes() == b"previous model"
    assert [p.name for p in tmp_path.iterdir()] == ["cnn.pt"]


def tiny_run(seed):
    rng = torch.Generator().manual_seed(123)
    data = {"train": (torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8, generator=rng),
                      torch.randint(0, 10, (96,), generator=rng)),
            "test": (torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=rng),
                     torch.randint(0, 10, (32,), generator=rng))}
    args = Namespace(device="cpu", subset=0, epochs=2)
    hyp = dict(C.HYPERPARAMETERS, batch_size=32, whitening_images=96)
    model, history, _ = C.train_one_seed(data, seed, args, hyp)
    return model.state_dict(), history


def test_same_seed_same_numbers_other_seed_other_numbers(capsys):
    state_a, history_a = tiny_run(0)
    state_b, history_b = tiny_run(0)
    state_c, _ = tiny_run(1)
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in h]
    assert strip(history_a) == strip(history_b)
    assert not torch.equal(state_a["head.weight"], state_c["head.weight"])


def test_train_end_to_end_on_real_data(tmp_path, cifar):
    result = run_cli("train", "--seeds", "0", "1", "--epochs", "1", "--subset", "2000",
                     "--data-dir", CIFAR_DIR, "--model-dir", tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("seed 0 epoch  1/1  train loss") and "test acc" in lines[0]
    assert lines[1].startswith("seed 1 epoch  1/1")
    assert lines[2].startswith("seed  test accuracy") and lines[-1].startswith("mean ")
    results = json.loads((tmp_path / "results.json").read_text())
    accuracies = [run["test_accuracy"] for run in results["runs"]]
    assert [run["seed"] for run in results["runs"]] == [0, 1]
    assert results["mean"] == pytest.approx(np.mean(accuracies)) and results["std"] == pytest.approx(np.std(accuracies))
    assert all(20 < a <= 100 for a in accuracies)  # 1 epoch on 2,000 images: well above chance (10%)
    assert results["runs"][0]["history"][0]["epoch"] == 1 and results["machine"]["cpu"]
    for name in ["cnn.pt", "cnn_seed0.pt", "cnn_seed1.pt", "accuracy.png"]:
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "cnn.pt").read_bytes() == (tmp_path / "cnn_seed0.pt").read_bytes()
    conv = C.load_cnn(tmp_path / "cnn.pt").conv1
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (3, 32, (5, 5), (1, 1), (0, 0))


def test_train_help_lists_options():
    result = run_cli("train", "--help")
    assert result.returncode == 0
    for option in ["--seed", "--seeds", "--epochs", "--batch-size", "--data-dir", "--model-dir", "--device", "--subset"]:
        assert option in result.stdout


def test_shipped_model_scores_what_training_recorded(cifar, shipped_model):
    """load_cnn() on raw [0, 1] RGB gives the final accuracy that results.json reports."""
    results = json.loads((ROOT / "model" / "results.json").read_text())
    main_run = next(run for run in results["runs"] if run["seed"] == results["main_seed"])
    _, correct = C.evaluate(shipped_model, *cifar["test"], "cpu")
    assert 100 * correct / 10000 == pytest.approx(main_run["test_accuracy"], abs=0.05)
    assert correct >= 7500
