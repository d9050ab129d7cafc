"""`test IMAGE`: what reaches the model for each kind of file, bad input, CONV_rslt.png."""
import json
import dataclasses
import shutil

import cv2
import numpy as np
import pytest
import torch

import CNNclassify as C
from conftest import ROOT, run_cli

RED_RGB = (255, 0, 0)


def model_input(path):
    return C.image_to_input(C.read_image(path))


def solid_bgr(h, w, rgb, dtype=np.uint8):
    scale = 257 if dtype == np.uint16 else 1
    image = np.zeros((h, w, 3), dtype)
    image[:] = [c * scale for c in rgb[::-1]]
    return image


@pytest.mark.parametrize("name,dtype", [("red.png", np.uint8), ("red16.png", np.uint16), ("red.bmp", np.uint8),
                                        ("red.webp", np.uint8), ("red.tiff", np.uint8), ("red16.tif", np.uint16)])
def test_lossless_formats_reach_the_model_as_red(tmp_path, name, dtype):
    params = [cv2.IMWRITE_WEBP_QUALITY, 101] if name.endswith("webp") else []  # 101 = lossless
    assert cv2.imwrite(str(tmp_path / name), solid_bgr(40, 50, RED_RGB, dtype), params)
    x = model_input(tmp_path / name)
    assert x.shape == (1, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x[0, 0], torch.ones(32, 32)) and torch.equal(x[0, 1:], torch.zeros(2, 32, 32))


@pytest.mark.parametrize("name", ["red.jpg", "red.JPEG"])
def test_jpeg_any_extension_case_is_red_not_blue(tmp_path, name):
    assert cv2.imwrite(str(tmp_path / name), solid_bgr(64, 64, RED_RGB), [cv2.IMWRITE_JPEG_QUALITY, 100])
    x = model_input(tmp_path / name)[0]
    assert x[0].mean() > 0.95 and x[1].mean() < 0.05 and x[2].mean() < 0.05


def test_grey_becomes_three_equal_channels(tmp_path):
    grey = np.full((30, 30), 128, np.uint8)
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    x = model_input(tmp_path / "g.png")[0]
    assert torch.allclose(x, torch.full((3, 32, 32), 128 / 255))


def test_alpha_is_composited_on_white(tmp_path):
    bgra = np.zeros((32, 32, 4), np.uint8)
    bgra[:, :16] = [0, 0, 255, 255]  # left half opaque red
    bgra[:, 16:] = [0, 0, 0, 0]      # right half fully transparent (black underneath)
    cv2.imwrite(str(tmp_path / "a.png"), bgra)
    x = model_input(tmp_path / "a.png")[0]
    assert torch.equal(x[:, :, :16], torch.tensor([1.0, 0, 0]).view(3, 1, 1).expand(3, 32, 16))
    assert torch.equal(x[:, :, 16:], torch.ones(3, 32, 16))


@pytest.mark.parametrize("h,w", [(1200, 1600), (5, 7), (32, 32), (300, 451)])
def test_any_size_becomes_32x32_with_content_kept(tmp_path, h, w):
    bgr = solid_bgr(h, w, (0, 0, 255))
    bgr[:, : w // 2] = [0, 255, 0]  # left half green, right half blue
    cv2.imwrite(str(tmp_path / "s.png"), bgr)
    x = model_input(tmp_path / "s.png")[0]
    assert x.shape == (3, 32, 32)
    assert x[1, :, :8].min() > 0.9 and x[2, :, -8:].min() > 0.9 and x[0].max() < 0.1


def test_same_size_image_reaches_model_unchanged(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "x.png"), rgb[:, :, ::-1])
    assert torch.equal(model_input(tmp_path / "x.png")[0], torch.from_numpy(rgb).permute(2, 0, 1) / 255)


def test_exif_orientation_is_applied(tmp_path):
    from PIL import Image
    rgb = np.zeros((40, 40, 3), np.uint8)
    rgb[:20] = [255, 0, 0]  # top half red as stored; EXIF 3 = rotate 180, so it shows at the bottom
    exif = Image.Exif()
    exif[0x0112] = 3
    Image.fromarray(rgb).save(tmp_path / "phone.jpg", quality=100, exif=exif)
    x = model_input(tmp_path / "phone.jpg")[0]
    assert x[0, -8:].mean() > 0.9 and x[0, :8].mean() < 0.1


def test_conv_maps_are_the_first_layer_of_the_same_forward(shipped_model):
    x = torch.rand(1, 3, 32, 32)
    probabilities, maps = C.predict(shipped_model, x)
    dtype = shipped_model.cnn.compute_dtype  # conv1 runs inside the model's autocast
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        assert torch.equal(maps, shipped_model.cnn.first_layer(x)[0].float())
    with torch.no_grad():
        assert torch.allclose(probabilities, shipped_model(x).softmax(1)[0])
    assert maps.shape == (32, 28, 28)


def test_cli_prints_the_prediction_saves_the_figure_and_writes_nothing_else(tmp_path, shipped_model):
    """A grader's `test IMAGE`: the assignment's line on stdout, CONV_rslt.png, nothing recorded."""
    result = run_cli("test", "--records-dir", tmp_path / "records", "car.png", cwd=tmp_path)  # bare name found in test_images/
    assert result.returncode == 0, result.stderr
    assert result.stdout == "prediction result: automobile\n"  # car.png is the first automobile of test_batch
    figure = cv2.imread(str(tmp_path / "CONV_rslt.png"))
    assert figure is not None and figure.shape[1] >= 1000
    assert result.stderr == ""  # off a terminal: results on stdout, nothing else anywhere
    assert sorted(p.name for p in tmp_path.iterdir()) == ["CONV_rslt.png"]  # no record without --record


def test_cli_top_and_record(tmp_path, shipped_model):
    """--top 3 adds the three likeliest classes; --record keeps what was printed and the figure."""
    result = run_cli("test", "--records-dir", tmp_path / "records", "car.png", "--top", "3", "--record", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "prediction result: automobile" and len(lines) == 4
    ranked = [float(line.rsplit(None, 1)[1].rstrip("%")) for line in lines[1:]]
    assert lines[1].strip().startswith("1. automobile") and ranked == sorted(ranked, reverse=True)
    record = json.loads((tmp_path / "records" / "test.json").read_text())  # what the report shows
    assert record["output"] == lines and record["command"].startswith("python CNNclassify.py test ")
    assert record["image"] == "test_images/car.png" and record["image_sha256"] == C.sha256_of(ROOT / "test_images" / "car.png")
    assert record["model_sha256"] == C.sha256_of(ROOT / "model" / "cnn.pt")
    copy = tmp_path / "records" / record["figure_copy"]
    assert copy.read_bytes() == (tmp_path / "CONV_rslt.png").read_bytes() and record["figure_sha256"] == C.sha256_of(copy)


def test_cli_predictions_match_batch_predictions_on_real_images(tmp_path, cifar, shipped_model, capsys):
    images, labels = cifar["test"]
    picks = list(range(0, 10000, 1000))
    for i in picks:
        cv2.imwrite(str(tmp_path / f"{i}.png"), images[i].permute(1, 2, 0).numpy()[:, :, ::-1])
    with torch.no_grad():
        expected = shipped_model(C.to_float(images[picks])).argmax(1).tolist()
    predicted = []
    for i in picks:
        assert C.main(["test", str(tmp_path / f"{i}.png"), "--out", str(tmp_path / "c.png"),
                       "--records-dir", str(tmp_path / "records")]) == 0
        predicted.append(C.CLASSES.index(capsys.readouterr().out.splitlines()[0].split(": ")[1]))
    assert predicted == expected
    assert np.mean(np.array(predicted) == labels[picks].numpy()) >= 0.75


def make_bad_inputs(folder):
    (folder / "dir.png").mkdir()
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("not an image at all\n")
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    ok, png = cv2.imencode(".png", image)
    (folder / "truncated.png").write_bytes(png.tobytes()[: len(png) // 2])
    ok, jpg = cv2.imencode(".jpg", image)
    (folder / "truncated.jpg").write_bytes(jpg.tobytes()[: len(jpg) // 2])
    header = bytearray(png.tobytes()[:33])  # signature + IHDR; width field set to 0
    header[16:20] = (0).to_bytes(4, "big")
    (folder / "zero_width.png").write_bytes(bytes(header) + png.tobytes()[33:])


@pytest.mark.parametrize("name,problem", [("missing.png", "no such file"), ("dir.png", "directory"),
                                          ("empty.png", "empty file"), ("notes.png", "not an image"),
                                          ("truncated.png", "not an image"), ("truncated.jpg", "not an image"),
                                          ("zero_width.png", "not an image")])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, name, problem, shipped_model, cli):
    make_bad_inputs(tmp_path)
    (tmp_path / "CONV_rslt.png").write_bytes(b"earlier result")
    result = cli("test", "--records-dir", tmp_path / "records", tmp_path / name, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and name in err[0] and problem in err[0] and "Traceback" not in result.stderr
    assert (tmp_path / "CONV_rslt.png").read_bytes() == b"earlier result"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_missing_model_says_train_first(tmp_path, cli):
    shutil.copy(ROOT / "test_images" / "car.png", tmp_path)
    result = cli("test", "--records-dir", tmp_path / "records", "car.png", "--model", tmp_path / "none.pt", cwd=tmp_path)
    assert result.returncode == 2 and "python CNNclassify.py train" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path / "CONV_rslt.png").exists()


def test_corrupt_model_file_is_one_line(tmp_path, cli):
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    result = cli("test", "--records-dir", tmp_path / "records", "car.png", "--model", tmp_path / "broken.pt", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and "broken.pt" in err[0] and "not a readable PyTorch file" in err[0]


def test_huge_image_is_refused_before_decoding(tmp_path, shipped_model):
    from PIL import Image
    Image.new("L", (12000, 12000)).save(tmp_path / "huge.png")  # 144 megapixels, small on disk
    result = run_cli("test", "--records-dir", tmp_path / "records", tmp_path / "huge.png", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "too large" in result.stderr
    assert not (tmp_path / "CONV_rslt.png").exists()


def test_large_photo_is_shrunk_right_after_decoding():
    image = np.zeros((3000, 4000, 3), np.uint16)
    assert C.shrink_to(image, 1024).shape == (768, 1024, 3) and C.shrink_to(image, 1024).dtype == np.uint16
    assert C.shrink_to(image[:20, :30], 1024).shape == (20, 30, 3)


@pytest.mark.parametrize("out,problem", [("folder", "is a directory"), ("x.weird", "unknown image type"),
                                         ("/proc/self/nope/x.png", "cannot write into")])
def test_bad_out_path_is_one_line_before_any_work(tmp_path, out, problem, shipped_model, cli):
    (tmp_path / "folder").mkdir()
    result = cli("test", "--records-dir", tmp_path / "records", "car.png", "--out", out, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and problem in result.stderr


def test_out_suffix_chooses_the_file_format(tmp_path, shipped_model, cli):
    for name, magic in [("c.jpg", b"\xff\xd8"), ("c.pdf", b"%PDF"), ("c.png", b"\x89PNG")]:
        result = cli("test", "--records-dir", tmp_path / "records", "car.png", "--out", name, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert (tmp_path / name).read_bytes().startswith(magic)


def other_widths_checkpoint(path):
    model = C.build_cnn(dataclasses.replace(C.RECIPE, widths=(16, 32, 64)))
    checkpoint = {"state_dict": model.state_dict(), "settings": dict(model.settings, widths=[64, 128, 256]),
                  "mean": [0.5] * 3, "std": [0.25] * 3}
    torch.save(checkpoint, path)


@pytest.mark.parametrize("maker,problem", [
    (lambda path: shutil.copy(C.COURSE_RESNET20, path),
     "not a model saved by `CNNclassify.py train`"),
    (other_widths_checkpoint, "do not fit the CNN it describes"),
    (lambda path: torch.save({"state_dict": {}, "settings": {}, "mean": 0, "std": 0, "x": C.UserError("x")}, path),
     "refused, since loading it would run code")])
def test_wrong_model_file_is_one_line(tmp_path, maker, problem, cli):
    maker(tmp_path / "other.pt")
    result = cli("test", "--records-dir", tmp_path / "records", "car.png", "--model", tmp_path / "other.pt", cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == "" and "Traceback" not in result.stderr
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and problem in err[0] and "weights_only=False" not in err[0]


# ----------------------------------------------------------------------------- many images, evaluate

def test_several_images_one_line_each_and_an_unreadable_one_is_named(tmp_path, shipped_model, cli):
    (tmp_path / "broken.png").write_bytes(b"not an image")
    result = cli("test", "--records-dir", tmp_path / "records", "car.png", tmp_path / "broken.png", "chelsea.png", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'broken.png'}: not an image OpenCV can read (unknown format, corrupt data or "
        f"over 100 megapixels)", "error: 1 of 3 images could not be read (named above)"]
    lines = result.stdout.strip().splitlines()
    assert [line.split("  ")[0] for line in lines] == ["car.png", "chelsea.png"]
    single = cli("test", "--records-dir", tmp_path / "records", "chelsea.png", "--out", tmp_path / "c.png", cwd=tmp_path).stdout.splitlines()[0]
    assert lines[1].split("  ")[1] == single.split(": ")[1]  # the same prediction as alone
    assert not (tmp_path / "CONV_rslt.png").exists()  # several images: no maps
    result = cli("test", "--records-dir", tmp_path / "records", "car.png", "cat.png", "--out", tmp_path / "x.png", cwd=tmp_path)
    assert result.returncode == 2 and "give one image with it" in result.stderr
