"""Data, model and training: fast checks on synthetic data, one short run on real data."""
import dataclasses
import functools
import hashlib
import http.server
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import CNNclassify as C
from conftest import CIFAR_DIR, ROOT, make_fake_cifar, run_cli, shared_cifar, write_fake_batch


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_read_cifar_batch_accepts_bytes_and_str_keys(tmp_path, bytes_keys):
    data, labels = write_fake_batch(tmp_path / "b", 7, bytes_keys)
    images, read_labels = C.read_cifar_batch(tmp_path / "b")
    assert images.dtype == torch.uint8 and images.shape == (7, 3, 32, 32)
    # row-major R, G, B planes: pixel (row 1, col 2) of the green plane is entry 1024 + 32 + 2
    assert images[3, 1, 1, 2] == data[3, 1024 + 32 + 2]
    assert read_labels.tolist() == labels


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
    served, base_url = local_server
    shared_cifar()
    archive = served / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=0) as tar:  # gzip, unsqueezed: fast
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


def ring_shares(weight):
    """Each filter's share of its absolute weight on the outer ring of its 5x5 kernel."""
    inner = torch.zeros(5, 5, dtype=torch.bool)
    inner[1:4, 1:4] = True
    return weight.abs()[..., ~inner].sum((1, 2)) / weight.abs().sum((1, 2, 3))


def test_whitening_fills_every_5x5_filter_and_decorrelates_patches():
    """After set_whitening each group of filters (ZCA of the 4 centre pixels x 3 colours, then
    the 4 strongest directions of the 5x5 patches) gives uncorrelated, unit-variance outputs;
    16-31 are the negatives; every filter has weight on the kernel's outer ring."""
    images = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8)
    blurred = torch.nn.functional.avg_pool2d(images.float(), 3, 1, 1)  # neighbouring pixels correlate
    images = (blurred * 0.3 + blurred.mean(1, keepdim=True) * 0.7).to(torch.uint8)  # so do channels
    model = C.build_cnn()
    C.set_whitening(model, images, eps=0)
    with torch.no_grad():
        out = model.first_layer(C.to_float(images)).double()
    for group in (slice(0, 12), slice(12, 16)):
        features = out[:, group].permute(1, 0, 2, 3).reshape(out[:, group].shape[1], -1)
        assert torch.allclose(torch.cov(features), torch.eye(len(features), dtype=torch.double), atol=0.05)
    assert torch.allclose(out[:, 16:], -out[:, :16])
    assert ring_shares(model.conv1.weight).min() > 0.01 and model.conv1.bias.abs().max() == 0


def test_trained_conv1_keeps_its_norm_under_muon():
    """With conv1_trained, conv1 goes to Muon at the norm it was set to (not sqrt(32))."""
    recipe = dataclasses.replace(C.RECIPE, conv1_trained=True, epochs=1, batch_size=32, whitening_images=96)
    model, _, _ = C.train_seed(tiny_data(), 0, recipe, torch.device("cpu"), torch.float32)
    fixed, _, _ = C.train_seed(tiny_data(), 0, dataclasses.replace(recipe, conv1_trained=False),
                               torch.device("cpu"), torch.float32)
    assert not torch.equal(model.conv1.weight, fixed.conv1.weight)
    assert model.conv1.weight.norm().item() == pytest.approx(fixed.conv1.weight.norm().item(), rel=0.02)


def test_muon_orthogonalises_and_keeps_the_filter_norm():
    matrix = torch.randn(64, 288, generator=torch.Generator().manual_seed(0))
    singular = torch.linalg.svdvals(C.orthogonalize(matrix))
    assert singular.min() > 0.5 and singular.max() < 1.5  # Muon's quintic lands in about 0.5-1.5
    conv = torch.nn.Conv2d(32, 64, 3, bias=False)
    optimizer = C.Muon(conv.parameters(), lr=0.1, momentum=0.6)
    for _ in range(3):
        conv(torch.randn(2, 32, 8, 8)).square().mean().backward()
        optimizer.step()
        conv.zero_grad()
    # rescaled to sqrt(64) before each step, then moved by lr x an update of spectral norm ~1
    assert abs(conv.weight.norm().item() - 8.0) < 0.1 * 8 ** 0.5 * 1.5


def test_translate_is_a_batched_view_of_the_input():
    images = torch.arange(6 * 3 * 32 * 32, dtype=torch.float32).view(6, 3, 32, 32)
    offsets = torch.tensor([[0, 4, 2, 1, 3, 0], [0, 4, 2, 3, 1, 4]])
    assert torch.equal(C.translate(images, offsets, 0), images)
    shifted = C.translate(images, offsets, 2)
    padded = torch.nn.functional.pad(images, (2,) * 4, mode="reflect")
    for i, (dy, dx) in enumerate(offsets.T.tolist()):  # image i is the window of the padded image at its offsets
        assert torch.equal(shifted[i], padded[i, :, dy:dy + 32, dx:dx + 32])
    assert torch.equal(shifted[2], images[2])  # offset (2, 2) is no shift


def test_view_average_weighs_the_mirror_and_one_pixel_shifts_as_airbench():
    model = C.build_cnn().eval()
    x = torch.rand(3, 3, 32, 32)
    padded = torch.nn.functional.pad(x, (1,) * 4, mode="reflect")
    with torch.no_grad():
        mirror = (model(x) + model(x.flip(-1))) / 2
        shifted = [(model(v) + model(v.flip(-1))) / 2 for v in (padded[..., :32, :32], padded[..., 2:, 2:])]
        assert torch.allclose(C.ViewAverage(model, 2)(x), mirror, atol=1e-5)
        six = C.ViewAverage(model)(x)  # the default: what load_cnn gives
    assert torch.allclose(six, mirror / 2 + (shifted[0] + shifted[1]) / 4, atol=1e-5)
    assert not torch.allclose(six, mirror, atol=1e-5)  # the shifted views do count
    with torch.no_grad():
        assert torch.equal(C.ViewAverage(model, 1)(x), model(x))  # one view: the CNN alone
    with pytest.raises(ValueError, match="views must be 1, 2 or 6"):
        C.ViewAverage(model, 4)


def test_loader_shuffles_each_epoch_and_alternates_flips():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 32, 32).contiguous()
    images[:, :, :, :16] = 255  # left half white: a flip is visible
    loader = C.Loader(images, torch.arange(10), 4, 0, seed=5, device=torch.device("cpu"))
    assert len(loader) == 3
    seen = []
    for epoch in range(2):
        batches = list(loader.epoch(epoch))
        assert [len(y) for _, y in batches] == [4, 4, 2]
        labels = torch.cat([y for _, y in batches])
        assert sorted(labels.tolist()) == list(range(10))  # every image once per epoch
        x = torch.cat([x for x, _ in batches])
        assert x.is_contiguous(memory_format=torch.channels_last) and x.dtype == torch.float32
        flipped = x[:, 0, 0, 0] < 1  # the left edge is no longer white
        seen.append(dict(zip(labels.tolist(), flipped.tolist())))
    assert all(seen[0][i] != seen[1][i] for i in range(10))  # each image flipped in one epoch of the two
    shifted = [[x for x, _ in C.Loader(images, torch.arange(10), 4, 2, seed, torch.device("cpu")).epoch(0)]
               for seed in (5, 5, 6)]
    assert all(torch.equal(a, b) for a, b in zip(shifted[0], shifted[1]))  # same seed, same batches
    assert not all(torch.equal(a, b) for a, b in zip(shifted[0], shifted[2]))


def test_lr_schedule_warms_up_then_decays_to_zero():
    factors = [C.lr_factor(step, 100, 0.2) for step in range(101)]
    assert factors[0] == pytest.approx(0.2) and max(factors) == pytest.approx(1.0)
    assert factors[20] == pytest.approx(1.0) and factors[100] == 0.0
    assert all(a <= b for a, b in zip(factors[:20], factors[1:21]))
    assert all(a >= b for a, b in zip(factors[20:], factors[21:]))
    assert [C.lr_factor(step, 1, 0.2) for step in (0, 1)] == [1.0, 0.0]  # a single step is a valid run


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
    loaded = C.load_cnn(tmp_path / "m.pt")  # float32, the format the model was built with
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():  # load_cnn gives the model with its 6-view TTA, in eval mode
        assert torch.equal(C.ViewAverage(model).eval()(x), loaded(x))
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


def tiny_data():
    rng = torch.Generator().manual_seed(123)
    return {"train": (torch.randint(0, 256, (96, 3, 32, 32), dtype=torch.uint8, generator=rng),
                      torch.randint(0, 10, (96,), generator=rng)),
            "test": (torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=rng),
                     torch.randint(0, 10, (32,), generator=rng))}


def tiny_run(seed):
    recipe = dataclasses.replace(C.RECIPE, epochs=2, batch_size=32, whitening_images=96, widths=(16, 32, 32))
    model, history, _ = C.train_seed(tiny_data(), seed, recipe, torch.device("cpu"), torch.float32)
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
    result = run_cli("train", "--seeds", "0", "1", "--epochs", "1", "--subset", "512", "--batch-size", "128",
                     "--data-dir", CIFAR_DIR, "--model-dir", tmp_path, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("seed 0 epoch  1/1  train loss") and "test acc" in lines[0]
    assert lines[1].startswith("seed 1 epoch  1/1")
    assert lines[2].startswith("seed  test accuracy") and lines[5].startswith("mean ") and len(lines) == 6
    assert (tmp_path / "train_log.txt").read_text() == result.stdout  # the log is what was printed
    results = json.loads((tmp_path / "results.json").read_text())
    accuracies = [run["test_accuracy"] for run in results["runs"]]
    assert [run["seed"] for run in results["runs"]] == [0, 1]
    assert results["mean"] == pytest.approx(np.mean(accuracies)) and results["std"] == pytest.approx(np.std(accuracies))
    assert all(15 < a <= 100 for a in accuracies), accuracies  # 4 steps: chance is 10% +/- 1.3; seen 20.3, 19.1 (Zen 5)
    assert results["runs"][0]["history"][0]["epoch"] == 1 and results["machine"]["cpu"]
    assert results["preset"] == C.DEFAULT_PRESET and results["views"] == C.RECIPE.views
    for name in ["cnn.pt", "cnn_seed0.pt", "cnn_seed1.pt", "accuracy.png"]:
        assert (tmp_path / name).stat().st_size > 0
    assert (tmp_path / "cnn.pt").read_bytes() == (tmp_path / "cnn_seed0.pt").read_bytes()
    assert results["main_model_sha256"] == C.sha256_of(tmp_path / "cnn.pt")
    assert [run["model_sha256"] for run in results["runs"]] == [C.sha256_of(tmp_path / f"cnn_seed{s}.pt") for s in (0, 1)]
    conv = C.load_cnn(tmp_path / "cnn.pt").cnn.conv1
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding) == (3, 32, (5, 5), (1, 1), (0, 0))
    assert ring_shares(conv.weight).min() > 0.01
    for run in results["runs"]:  # where each seed errs: the last evaluation's confusion matrix
        matrix = np.array(run["confusion_matrix"])
        assert matrix.shape == (10, 10) and matrix.sum() == 512 and 100 * np.trace(matrix) / 512 == pytest.approx(run["test_accuracy"])
        assert list(run["per_class_accuracy"]) == list(C.CLASSES)
        assert run["per_class_accuracy"]["cat"] == pytest.approx(100 * matrix[3, 3] / matrix[3].sum())
    assert (tmp_path / "confusion.png").stat().st_size > 0
    assert results["estimated_seconds"] > 0 and results["seed_status"] == {"0": "trained", "1": "trained"}
    assert result.stderr == ""  # off a terminal: no bar, no note; results on stdout only


def test_train_preset_accurate_end_to_end(tmp_path, cli):
    """`train --preset accurate` trains the accurate recipe: its widths, its 6 test-time views in
    the last evaluation, saved and loaded with them. (That the recipe learns is checked on real
    data with the default preset: the same code with other widths.)"""
    make_fake_cifar(tmp_path / "data" / C.CIFAR_FOLDER)
    result = cli("train", "--preset", "accurate", "--epochs", "1", "--subset", "64", "--batch-size", "32",
                 "--seeds", "0", "--data-dir", tmp_path / "data", "--model-dir", tmp_path / "m", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "m" / "results.json").read_text())
    assert results["preset"] == "accurate" and results["views"] == 6 and results["runs"][0]["history"][-1]["test_views"] == 6
    recipe = results["recipe"]
    assert (recipe["widths"], recipe["epochs"], recipe["batch_size"], recipe["views"]) == ([64, 256, 256], 1, 32, 6)
    checkpoint = torch.load(tmp_path / "m" / "cnn.pt", weights_only=True)
    assert checkpoint["settings"]["widths"] == [64, 256, 256] and checkpoint["views"] == 6
    assert C.load_cnn(tmp_path / "m" / "cnn.pt").views == 6


def test_train_help_lists_options(cli):
    result = cli("train", "--help")
    assert result.returncode == 0
    for option in ["--seeds", "--epochs", "--batch-size", "--data-dir", "--model-dir", "--device", "--precision",
                   "--subset", "--resume", "--preset"]:
        assert option in result.stdout
    text = " ".join(result.stdout.split())
    epochs = ", ".join(f"{recipe.epochs} {name}" for name, recipe in C.PRESETS.items())
    assert f"(default: the preset's, {epochs})" in text and "(default: data)" in text
    assert f"(default: {C.DEFAULT_PRESET})" in text and "(default: [0, 1, 2])" in text
    assert "(default: 256 on a CPU, 1024 on a GPU)" in text


def test_train_without_options_trains_seeds_0_1_2(tmp_path, cli):
    make_fake_cifar(tmp_path / "data" / C.CIFAR_FOLDER)
    result = cli("train", "--epochs", "1", "--subset", "32", "--data-dir", tmp_path / "data", "--model-dir", tmp_path / "m")
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "m" / "results.json").read_text())
    assert [run["seed"] for run in results["runs"]] == [0, 1, 2] and "over 3 seeds" in result.stdout
    assert sorted(p.name for p in (tmp_path / "m").glob("cnn_seed*.pt")) == [f"cnn_seed{s}.pt" for s in range(3)]


def test_shipped_model_scores_what_training_recorded(cifar, shipped_model):
    """load_cnn() on raw [0, 1] RGB, in float32 as `test` computes, gives the final accuracy and
    confusion matrix that results.json reports for cnn.pt, within a stated tolerance: 5 of the
    10,000 images (0.05 points) when it was trained in float32, since CPU kernels (AVX2, AVX-512,
    AMX) sum in other orders and a borderline image may flip; 20 images (0.2 points) when it was
    trained in bfloat16, which rounds differently from float32."""
    results = json.loads((ROOT / "model" / "results.json").read_text())
    main_run = next(run for run in results["runs"] if run["seed"] == results["main_seed"])
    _, right, confusion = C.evaluate(shipped_model, *cifar["test"], 64)
    tolerance = 0.05 if results["precision"] == "float32" else 0.2
    assert right / 100 == pytest.approx(main_run["test_accuracy"], abs=tolerance) and right / 100 > 92.0
    if "confusion_matrix" in main_run:
        assert np.abs(confusion.numpy() - np.array(main_run["confusion_matrix"])).sum() <= 2 * tolerance * 100
    assert len(results["runs"]) == 3 and results["command"] == "python CNNclassify.py train"
    assert all(share > 0.01 for share in ring_shares(shipped_model.cnn.conv1.weight))


# ----------------------------------------------------------------------------- number format

@pytest.mark.parametrize("vendor,flags,cap,expected", [
    ("AuthenticAMD", {"avx512_bf16"}, "", "bfloat16"), ("GenuineIntel", {"amx_bf16", "amx_tile"}, "", "bfloat16"),
    ("GenuineIntel", {"avx512_bf16"}, "", "float32"),  # AVX512_BF16 without AMX: slower in bfloat16
    ("AuthenticAMD", {"avx2", "avx512f"}, "", "float32"), ("AuthenticAMD", {"avx512_bf16"}, "AVX2", "float32"),
    ("GenuineIntel", {"amx_bf16"}, "avx512_core", "float32"),
    ("AuthenticAMD", {"avx512_bf16"}, "AVX512_CORE_BF16", "bfloat16")])
def test_cpu_format_rule_follows_the_hardware_and_the_onednn_cap(monkeypatch, vendor, flags, cap, expected):
    monkeypatch.setattr(C, "cpuinfo_field", lambda name: {"vendor_id": vendor, "flags": " ".join(flags)}.get(name, ""))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    dtype, why = C.training_format(torch.device("cpu"), "auto")
    assert C.precision_name(dtype) == expected and why.startswith(expected)
    assert C.training_format(torch.device("cpu"), "float16")[0] == torch.float16  # --precision overrides
    assert C.inference_format(torch.device("cpu"), "auto") == torch.float32  # batch 1: float32
    assert C.inference_format(torch.device("cpu"), "bfloat16") == torch.bfloat16  # --precision overrides


@pytest.mark.parametrize("capability,expected", [((9, 0), torch.bfloat16), ((8, 6), torch.bfloat16),
                                                 ((7, 5), torch.float16), ((6, 1), torch.float32)])
def test_gpu_format_follows_the_capability(monkeypatch, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert C.training_format(torch.device("cuda"), "auto")[0] == expected


def learnable_data(n=192, seed=0):
    """Images whose class is their colour (ten hues, noise on top): a tiny net learns it in a few
    steps, so a falling loss means the training path works."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    hues = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255],
                         [128, 0, 0], [0, 128, 0], [0, 0, 128], [128, 128, 128]], dtype=torch.float32)
    images = hues[labels].view(n, 3, 1, 1) + 40 * torch.randn(n, 3, 32, 32, generator=g)
    images = images.clamp(0, 255).to(torch.uint8)
    return {"train": (images, labels), "test": (images[:64], labels[:64])}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_training_learns_and_loads_for_test(tmp_path, monkeypatch, dtype):
    """bfloat16 and float16 train on every CPU (emulated where not native: fine at this size):
    the loss falls, float16 goes through a loss scaler that scales (bfloat16 needs none), and the
    saved model classifies through `test` in that format and in float32."""
    scalers = []

    class Spy(torch.amp.GradScaler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            scalers.append(self)

    monkeypatch.setattr(torch.amp, "GradScaler", Spy)
    recipe = dataclasses.replace(C.RECIPE, epochs=4, batch_size=32, whitening_images=96, widths=(16, 16, 16))
    model, history, _ = C.train_seed(learnable_data(), 0, recipe, torch.device("cpu"), dtype)
    losses = [row["train_loss"] for row in history]
    assert all(np.isfinite(losses)) and losses == sorted(losses, reverse=True) and losses[-1] < losses[0] - 0.1, losses
    assert len(scalers) == 1 and scalers[0].is_enabled() == (dtype == torch.float16)
    if dtype == torch.float16:
        assert scalers[0].get_scale() > 1  # the loss was scaled up before backward
    C.save_checkpoint(tmp_path / "m.pt", model, {"views": 1})
    for precision in (C.precision_name(dtype), "float32"):
        loaded = C.load_cnn(tmp_path / "m.pt", dtype=C.PRECISIONS[precision])
        lines, _, probabilities = C.classify_image(str(ROOT / "test_images" / "chelsea.png"), loaded, top=3)
        assert lines[0].startswith("prediction result: ") and len(lines) == 4
        assert torch.isfinite(probabilities).all() and probabilities.sum().item() == pytest.approx(1, abs=1e-3)


def test_avx2_capped_train_records_float32(tmp_path):
    make_fake_cifar(tmp_path / "data" / C.CIFAR_FOLDER)
    env = dict(os.environ, ONEDNN_MAX_CPU_ISA="AVX2")
    result = run_cli("train", "--seeds", "0", "--epochs", "1", "--subset", "64", "--data-dir", tmp_path / "data",
                     "--model-dir", tmp_path / "m", "--device", "cpu", env=env)
    assert result.returncode == 0, result.stderr
    results = json.loads((tmp_path / "m" / "results.json").read_text())
    assert results["precision"] == "float32" and results["machine"]["onednn_max_cpu_isa"] == "AVX2"
    assert results["machine"]["precision"] == "float32" and results["precision_choice"].startswith("float32 (auto")
    assert torch.load(tmp_path / "m" / "cnn.pt", weights_only=True)["precision"] == "float32"


def test_nothing_in_home_and_nothing_on_stderr(tmp_path):
    """train, test, profile and speed with HOME (and the cache folders under it) an empty folder:
    it stays empty; off a terminal each writes its results on stdout and nothing on stderr."""
    make_fake_cifar(tmp_path / "data" / C.CIFAR_FOLDER)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XDG_", "TORCH_HOME"))}
    env["HOME"] = str(home)
    runs = [("train", "--seeds", "0", "--epochs", "1", "--subset", "64", "--data-dir", tmp_path / "data",
             "--model-dir", tmp_path / "m"),
            ("test", ROOT / "test_images" / "cat.png", "--model", tmp_path / "m" / "cnn.pt", "--out", tmp_path / "c.png",
             "--records-dir", tmp_path / "r"),
            ("profile", "--model", tmp_path / "m" / "cnn.pt", "--weights", C.COURSE_RESNET20, "--records-dir", tmp_path / "r"),
            ("speed", "--model", tmp_path / "m" / "cnn.pt", "--weights", C.COURSE_RESNET20, "--iterations", "2", "--warmup", "1",
             "--records-dir", tmp_path / "r")]
    for args in runs:
        result = run_cli(*args, env=env)
        assert result.returncode == 0 and result.stdout and result.stderr == "", result.stderr
    assert list(home.iterdir()) == []


# ----------------------------------------------------------------------------- bad input

def test_crafted_batch_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({"data": Payload(), "labels": []}))
    with pytest.raises(C.UserError, match="data_batch_3.*refused to load"):
        C.read_cifar_batch(tmp_path / "data_batch_3")
    assert not marker.exists()


@pytest.mark.parametrize("batch,problem", [
    ({"data": np.zeros((4, 3000), np.uint8), "labels": [0] * 4}, "'data'"),
    ({"data": np.zeros((4, 3072), np.float32), "labels": [0] * 4}, "'data'"),
    ({"data": np.zeros((4, 3072), np.uint8), "labels": [0] * 3}, "'labels'"),
    ({"data": np.zeros((4, 3072), np.uint8), "labels": [0, 1, 2, 10]}, "'labels'"),
    ([1, 2, 3], "not a CIFAR-10 batch")])
def test_malformed_batch_is_one_error_naming_the_file(tmp_path, batch, problem):
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch))
    with pytest.raises(C.UserError, match=problem) as error:
        C.read_cifar_batch(tmp_path / "test_batch")
    assert "test_batch" in str(error.value)


@pytest.mark.parametrize("args,problem", [
    (["--epochs", "0"], "--epochs: must be 1 or more"), (["--batch-size", "-5"], "--batch-size: must be 1 or more"),
    (["--batch-size", "0"], "--batch-size: must be 1 or more"), (["--seeds", "-1"], "--seeds: must be 0 or more"),
    (["--subset", "-3"], "--subset: must be 0 or more"), (["--seeds", "0", "0"], "a seed is given twice"),
    (["--device", "foo"], "not a device name"), (["--device", "cuda:999"], "no such device"),
    (["--seeds", "x"], "invalid int value"), (["--preset", "fast"], "invalid choice")])
def test_bad_train_options_are_one_line_and_change_nothing(tmp_path, args, problem, cli):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "cnn.pt").write_bytes(b"shipped model")
    result = cli("train", *args, "--data-dir", tmp_path / "none", "--model-dir", model_dir)
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and problem in lines[0], lines
    assert [p.name for p in model_dir.iterdir()] == ["cnn.pt"] and (model_dir / "cnn.pt").read_bytes() == b"shipped model"


@pytest.mark.parametrize("model_dir", ["/proc/no/such/place", "read-only"])
def test_unwritable_model_dir_fails_before_training(tmp_path, model_dir, cli):
    make_fake_cifar(tmp_path / "data" / C.CIFAR_FOLDER)
    if model_dir == "read-only":
        model_dir = tmp_path / "ro"
        model_dir.mkdir()
        model_dir.chmod(0o555)
        if os.access(model_dir, os.W_OK) and os.geteuid() == 0:  # root ignores the mode bits
            model_dir = Path("/proc/self/read-only")
    result = cli("train", "--subset", "64", "--data-dir", tmp_path / "data", "--model-dir", model_dir)
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "cannot write into" in result.stderr


def test_subset_runs_never_replace_the_default_model(tmp_path, monkeypatch, cli):
    make_fake_cifar(tmp_path / "data" / C.CIFAR_FOLDER)
    monkeypatch.setattr(C, "MODEL_DIR", tmp_path / "model")
    assert C.main(["train", "--epochs", "1", "--subset", "64", "--data-dir", str(tmp_path / "data")]) == 0
    assert (tmp_path / "model" / "subset" / "cnn.pt").is_file() and not (tmp_path / "model" / "cnn.pt").exists()
    assert "model/subset/" in cli("train", "--help").stdout.replace("\n", " ").replace("  ", " ")


def test_one_step_run_trains_and_saves(tmp_path, cli):
    make_fake_cifar(tmp_path / "data" / C.CIFAR_FOLDER)
    result = cli("train", "--epochs", "1", "--subset", "50", "--data-dir", tmp_path / "data", "--model-dir", tmp_path / "m")
    assert result.returncode == 0, result.stderr  # 50 images in one batch of 256: one optimiser step
    assert (tmp_path / "m" / "cnn.pt").is_file()


def test_results_are_written_as_each_seed_ends(tmp_path, monkeypatch, capsys):
    """Ctrl-C during the second seed leaves cnn.pt, results.json and the plot of the first."""
    make_fake_cifar(tmp_path / "data" / C.CIFAR_FOLDER)
    real = C.train_seed

    def interrupted_at_seed_1(data, seed, *args):
        if seed == 1:
            raise KeyboardInterrupt
        return real(data, seed, *args)

    monkeypatch.setattr(C, "train_seed", interrupted_at_seed_1)
    code = C.main(["train", "--seeds", "0", "1", "--epochs", "1", "--subset", "64",
                   "--data-dir", str(tmp_path / "data"), "--model-dir", str(tmp_path / "m")])
    assert code == 130
    results = json.loads((tmp_path / "m" / "results.json").read_text())
    assert [run["seed"] for run in results["runs"]] == [0]
    assert (tmp_path / "m" / "cnn.pt").read_bytes() == (tmp_path / "m" / "cnn_seed0.pt").read_bytes()
    assert (tmp_path / "m" / "accuracy.png").is_file()


# ----------------------------------------------------------------------------- runs that fail, faults

def shipped_like_model_dir(folder):
    """A model folder as a finished run leaves it, to check that a failing run changes nothing."""
    folder.mkdir()
    for name in ("cnn.pt", "cnn_seed0.pt", "results.json", "accuracy.png"):
        (folder / name).write_bytes(f"previous {name}".encode())
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_data_dir_that_is_a_file_is_one_line(tmp_path, cli):
    result = cli("train", "--data-dir", ROOT / "README.md", "--model-dir", tmp_path / "m")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "is a file, not a folder" in result.stderr and "downloading" not in result.stderr


def test_batch_larger_than_the_training_set_is_refused_before_training(tmp_path, cli):
    make_fake_cifar(tmp_path / "data" / C.CIFAR_FOLDER)
    before = shipped_like_model_dir(tmp_path / "m")
    result = cli("train", "--subset", "64", "--batch-size", "100000", "--data-dir", tmp_path / "data",
                     "--model-dir", tmp_path / "m")
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert "--batch-size 100000 is larger than the 64 training images" in result.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before


def test_a_diverging_run_fails_and_changes_no_result(tmp_path, monkeypatch, capsys):
    """A learning rate far too high: the loss explodes in the first epoch, the run stops
    with one line naming the epoch and the cause, and the previous results stay."""
    make_fake_cifar(tmp_path / "data" / C.CIFAR_FOLDER)
    before = shipped_like_model_dir(tmp_path / "m")
    monkeypatch.setitem(C.PRESETS, C.DEFAULT_PRESET, dataclasses.replace(C.RECIPE, lr_per_1024=1e6))
    code = C.main(["train", "--epochs", "3", "--subset", "64", "--batch-size", "32", "--data-dir", str(tmp_path / "data"),
                   "--model-dir", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: seed 0 epoch 1: the loss diverged")
    assert "--batch-size" in err[-1] and "was not saved" in err[-1]
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before


@pytest.mark.parametrize("row,steps,problem", [
    ({"train_loss": float("nan"), "test_loss": 2.3, "test_accuracy": 30.0}, 10, "the loss diverged"),
    ({"train_loss": 2.0, "test_loss": float("inf"), "test_accuracy": 30.0}, 10, "the loss diverged"),
    ({"train_loss": 9.0, "test_loss": 14620.0, "test_accuracy": 9.99}, 10, "the loss diverged"),
    ({"train_loss": 2.3, "test_loss": 2.3, "test_accuracy": 10.2}, 150, "still at chance (10.20%) after 150 steps"),
    ({"train_loss": 2.3, "test_loss": 2.3, "test_accuracy": 10.2}, 20, None),  # too early to tell
    ({"train_loss": 1.2, "test_loss": 0.9, "test_accuracy": 81.8}, 196, None)])  # the recipe's first epoch
def test_progress_check(row, steps, problem):
    row = dict(row, epoch=2)
    if problem is None:
        C.check_progress(0, row, steps, C.RECIPE)
    else:
        with pytest.raises(C.UserError, match=re.escape(problem)):
            C.check_progress(0, row, steps, C.RECIPE)


def test_full_disk_at_save_is_one_line_and_leaves_nothing_partial(tmp_path, monkeypatch, capsys):
    """torch's zip writer on a full disk (what a 3 MB filesystem gave): the error names the
    folder, no temporary file is left and the previous files are kept."""
    make_fake_cifar(tmp_path / "data" / C.CIFAR_FOLDER)
    before = shipped_like_model_dir(tmp_path / "m")

    def full_disk_save(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"x" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2816 vs 2710")

    monkeypatch.setattr(torch, "save", full_disk_save)
    code = C.main(["train", "--seeds", "0", "--epochs", "1", "--subset", "64", "--data-dir", str(tmp_path / "data"),
                   "--model-dir", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("error: could not write cnn_seed0.pt into " + str(tmp_path / "m"))
    assert "previous file is kept" in err[-1]
    assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == before


@pytest.mark.parametrize("signum,code,said", [(signal.SIGTERM, 143, "terminated"), (signal.SIGINT, 130, "interrupted")])
def test_sigterm_and_ctrl_c_stop_with_one_line_and_leave_nothing_partial(tmp_path, signum, code, said):
    make_fake_cifar(tmp_path / "data" / C.CIFAR_FOLDER)
    process = subprocess.Popen([sys.executable, str(ROOT / "CNNclassify.py"), "train", "--epochs", "50", "--subset", "64",
                                "--data-dir", str(tmp_path / "data"), "--model-dir", str(tmp_path / "m")],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal, also
    assert process.stdout.readline().startswith("seed 0 epoch  1/50")  # when the tests run as a background job
    process.send_signal(signum)
    _, err = process.communicate(timeout=60)
    assert process.returncode == code and "Traceback" not in err
    command = f"python CNNclassify.py train --epochs 50 --subset 64 --data-dir {tmp_path / 'data'} --model-dir {tmp_path / 'm'}"
    assert err.strip().splitlines() == [f"{said}; files already saved are intact; `{command} --resume` trains "
                                        "the seeds not yet saved"]
    assert list((tmp_path / "m").iterdir()) == []  # no model, results or temporary file of the unfinished seed


# ----------------------------------------------------------------------------- rerun after a fault

RERUN = ("train", "--seeds", "0", "1", "--epochs", "2", "--batch-size", "32", "--subset", "128",  # 4 steps an epoch
         "--device", "cpu")  # bit for bit: the CPU


def start_train(folder, model_dir, *more):
    return subprocess.Popen([sys.executable, str(ROOT / "CNNclassify.py"), *RERUN, "--data-dir", str(folder / "data"),
                             "--model-dir", str(model_dir), *more], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_after(process, line_start):
    """SIGKILL (nothing to catch, as for the out-of-memory killer) once a line starting so is printed."""
    for line in process.stdout:
        if line.startswith(line_start):
            process.kill()
            break
    _, err = process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, err
    return err


def final(model_dir):
    """The weights of every seed and what results.json says of them, seconds left out."""
    results = json.loads((model_dir / "results.json").read_text())
    weights = {s: torch.load(model_dir / f"cnn_seed{s}.pt", weights_only=True)["state_dict"] for s in (0, 1)}
    timeless = [[{k: v for k, v in row.items() if k not in ("seconds", "images_per_second")} for row in run["history"]]
                for run in results["runs"]]
    return weights, [run["test_accuracy"] for run in results["runs"]], timeless, results["mean"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rerun")
    make_fake_cifar(folder / "data" / C.CIFAR_FOLDER, n=64)
    result = run_cli(*RERUN, "--data-dir", folder / "data", "--model-dir", folder / "whole")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # off a terminal: the estimate is in the bar's text and results.json
    results = json.loads((folder / "whole" / "results.json").read_text())
    first = results["runs"][0]["history"][0]["seconds"]
    assert results["estimated_seconds"] == round(first * 4)  # the first epoch's time x the 4 to train
    return folder, final(folder / "whole"), result.stdout


def test_killed_during_seed_1_then_rerun_keeps_seed_0_and_gives_the_same_results(uninterrupted, tmp_path):
    folder, expected, expected_stdout = uninterrupted
    model_dir = tmp_path / "m"
    kill_after(start_train(folder, model_dir), "seed 1 epoch  1/2")  # seed 0 finished, seed 1 under way
    assert {p.name for p in model_dir.iterdir()} >= {"cnn_seed0.pt"} and not (model_dir / "cnn_seed1.pt").exists()
    seed0 = (model_dir / "cnn_seed0.pt").read_bytes()
    result = run_cli(*RERUN, "--data-dir", folder / "data", "--model-dir", model_dir, "--resume")
    assert result.returncode == 0 and result.stderr == ""
    results = json.loads((model_dir / "results.json").read_text())
    assert results["seed_status"] == {"0": "kept (--resume: saved with these settings)", "1": "trained (none saved)"}
    assert results["estimated_seconds"] == round(results["runs"][1]["history"][0]["seconds"] * 2)  # 2 epochs left
    assert (model_dir / "cnn_seed0.pt").read_bytes() == seed0  # the finished seed was not trained again
    weights, accuracies, histories, mean = final(model_dir)
    assert all(torch.equal(weights[s][k], expected[0][s][k]) for s in (0, 1) for k in weights[s])
    assert (accuracies, histories, mean) == expected[1:]
    strip = lambda out: [re.sub(r"\s+[\d.]+s$", "", line) for line in out.splitlines()]
    assert strip(result.stdout)[:4] == strip(expected_stdout)[:4]  # every epoch line, seed 0's too
    assert (model_dir / "train_log.txt").read_text() == result.stdout
    assert not list(model_dir.glob(".*"))


def test_resume_trains_other_settings_again_and_plain_train_trains_every_seed(uninterrupted, tmp_path, cli):
    folder, expected, _ = uninterrupted
    model_dir = tmp_path / "m"
    shutil.copytree(folder / "whole", model_dir)
    result = cli(*RERUN, "--epochs", "1", "--data-dir", folder / "data", "--model-dir", model_dir, "--resume")
    assert result.returncode == 0 and result.stderr == ""
    status = json.loads((model_dir / "results.json").read_text())["seed_status"]
    assert status == {s: "trained again (saved with other settings: epochs)" for s in ("0", "1")}
    (model_dir / "cnn_seed1.pt").write_bytes(b"half a file")
    result = cli(*RERUN, "--data-dir", folder / "data", "--model-dir", model_dir, "--resume")
    status = json.loads((model_dir / "results.json").read_text())["seed_status"]
    assert result.returncode == 0 and status["1"].startswith("trained again (saved file unreadable: ")
    result = cli(*RERUN, "--data-dir", folder / "data", "--model-dir", model_dir)  # plain: all from scratch
    status = json.loads((model_dir / "results.json").read_text())["seed_status"]
    assert result.returncode == 0 and status == {"0": "trained", "1": "trained"}
    weights, *recorded = final(model_dir)
    assert recorded == list(expected[1:]) and all(torch.equal(weights[1][k], expected[0][1][k]) for k in weights[1])


def test_plain_train_trains_again_and_resume_keeps(tmp_path, cli):
    """`train` run twice into one folder trains the seed again (a new file, same numbers: it is
    seeded); with --resume the saved seed is kept as it is."""
    make_fake_cifar(tmp_path / "data" / C.CIFAR_FOLDER)
    args = ("train", "--seeds", "0", "--subset", "512", "--epochs", "1", "--data-dir", tmp_path / "data",
            "--model-dir", tmp_path / "m")
    seed0 = tmp_path / "m" / "cnn_seed0.pt"
    stamps, numbers = [], []
    for more in ([], [], ["--resume"]):
        result = cli(*args, "--device", "cpu", *more)
        assert result.returncode == 0 and result.stderr == ""
        stamps.append((seed0.stat().st_ino, seed0.stat().st_mtime_ns))
        numbers.append((torch.load(seed0, weights_only=True)["state_dict"], final_numbers(tmp_path / "m")))
    assert stamps[1] != stamps[0] and stamps[2] == stamps[1]
    (first, first_results), (second, second_results) = numbers[:2]
    assert all(torch.equal(first[k], second[k]) for k in first) and first_results == second_results


def final_numbers(model_dir):
    """Every number of results.json but the seconds (and the sha256 of files that hold them)."""
    results = json.loads((model_dir / "results.json").read_text())
    return [(run["test_accuracy"], [{k: v for k, v in row.items() if k not in ("seconds", "images_per_second")}
                                    for row in run["history"]]) for run in results["runs"]]


def test_a_crash_while_training_is_one_line_that_says_how_to_resume(tmp_path, monkeypatch, capsys):
    make_fake_cifar(tmp_path / "data" / C.CIFAR_FOLDER)
    monkeypatch.setattr(C, "train_seed", lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("out of memory\nmore")))
    code = C.main(["train", "--epochs", "1", "--subset", "64", "--data-dir", str(tmp_path / "data"),
                   "--model-dir", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 1
    assert err[0].startswith("error: training stopped (RuntimeError: out of memory); files already saved are intact; `")
    assert err[0].endswith(" --resume` trains the seeds not yet saved")
