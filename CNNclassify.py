"""CNNclassify: train, test and measure a CIFAR-10 CNN from one script.

    python CNNclassify.py train [--seeds 0 1 2] [--preset efficient|accurate]
    python CNNclassify.py test IMAGE [IMAGE ...]    predict, save CONV_rslt.png
    python CNNclassify.py evaluate | resnet20 | profile | speed

Read top to bottom: settings, data, model, evaluation, training, test, ResNet-20, costs, train's
seeds and resuming, command line, then the machinery (number format, device, files). The report
and the zip to hand in are made by report/build.py beside it.
"""

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import io
import itertools
import json
import os
import pickle
import platform
import random
import shlex
import shutil
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# ----------------------------------------------------------------------------- settings

ROOT = Path(__file__).resolve().parent
MODEL_DIR = ROOT / "model"
MAIN_MODEL = "cnn.pt"
RESULTS_FILE = "results.json"
RECORDS_DIR = MODEL_DIR / "records"
IMAGE_DIR = ROOT / "test_images"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST_FILE = "test_batch"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The training recipe, after airbench94_muon (Keller Jordan) and David Page's "How to train
    your ResNet"; the saved model is a moving average of the trained weights."""
    batch_size: int = 256
    epochs: int = 8
    eval_batch: int = 64
    lr_per_1024: float = 1.5       # SGD's peak lr is this x batch_size / 1024
    bias_lr_scale: float = 64.0    # BatchNorm biases learn this much faster
    momentum: float = 0.85
    decay_per_1024: float = 2e-3   # weight decay per step at peak lr, x batch_size / 1024
    warmup_fraction: float = 0.2   # lr rises from 0.2x to 1x over this share of steps
    label_smoothing: float = 0.2
    translate: int = 2             # random shift in pixels, reflect padding
    widths: tuple = (64, 256, 256)
    bn_momentum: float = 0.4
    logit_scale: float = 1 / 9
    average_decay: float = 0.98    # the saved weights: a moving average of the trained ones
    whitening_images: int = 5000   # conv1 is set from the 5x5 patches of this many images
    whitening_eps: float = 5e-4    # added to each patch variance: keeps noise from being blown up
    conv1_trained: bool = False    # after being set from the data, conv1 stays fixed
    muon_lr_per_1024: float = 0.17  # Muon for the conv filters (0: SGD)
    muon_momentum: float = 0.6
    views: int = 6                 # test-time views of the saved model (ViewAverage)

    @property
    def epoch_views(self):
        """Views of the evaluations before the last epoch: they only draw the curve."""
        return min(2, self.views)


# "accurate": airbench94's widths, the last point of accuracy. "efficient": a narrow net for
# more epochs in about the same training time, one test-time view (bench/README.md).
PRESETS = {"accurate": Recipe(),
           "efficient": Recipe(widths=(32, 144, 144), epochs=20, views=1)}
DEFAULT_PRESET = "efficient"
RECIPE = PRESETS[DEFAULT_PRESET]
RECIPE_VERSION = 2  # bump when a change of the training code changes what a recipe trains

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# By kind of device: the training batch that keeps it busy, and the evaluation batch.
DEVICE_DEFAULTS = {"cpu": {"batch_size": 256, "eval_batch": 64},
                   "gpu": {"batch_size": 1024, "eval_batch": 2000}}


def device_class(device):
    """"cpu" or "gpu", the key of DEVICE_DEFAULTS (CUDA and Apple MPS count as GPUs)."""
    return "cpu" if device.type == "cpu" else "gpu"


def recipe_for(device, batch_size=None, epochs=None, preset=DEFAULT_PRESET):
    """The preset's recipe with the batch size and epochs given, or the device kind's batch."""
    defaults, recipe = DEVICE_DEFAULTS[device_class(device)], PRESETS[preset]
    return dataclasses.replace(recipe, batch_size=batch_size or defaults["batch_size"],
                               epochs=epochs or recipe.epochs, eval_batch=defaults["eval_batch"])


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit code 2, no traceback."""


def first_line(error):
    """An exception's message cut to its first line, for one-line errors."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def log(message):
    """Progress and notes go to stderr so stdout carries results only."""
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data and loader

class BatchUnpickler(pickle.Unpickler):
    """Builds only what a CIFAR-10 batch holds (dicts, lists, strings, numbers, numpy arrays),
    so a crafted file cannot run code when it is read."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: "
                                         "not part of a CIFAR-10 batch")
        return super().find_class(module, name)


def read_cifar_batch(path):
    """One pickled CIFAR-10 batch -> (uint8 N x 3 x 32 x 32, int64 labels), checked. Official
    files have bytes keys, copies made with latin1 str keys: both are read."""
    try:
        with open(path, "rb") as f:
            batch = BatchUnpickler(f, encoding="bytes").load()
    except Exception as error:
        raise UserError(f"{path}: not a readable CIFAR-10 batch ({first_line(error)})") from None
    if not isinstance(batch, dict):
        raise UserError(f"{path}: not a CIFAR-10 batch (a {type(batch).__name__}, not a dict)")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    data, labels = batch.get("data"), batch.get("labels")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1:] == (3072,)):
        raise UserError(f"{path}: 'data' is not a uint8 array of N x 3072 pixels")
    if not (isinstance(labels, list) and len(labels) == len(data)
            and all(isinstance(label, int) and 0 <= label < len(CLASSES) for label in labels)):
        raise UserError(f"{path}: 'labels' is not a list of {len(data)} integers "
                        f"from 0 to {len(CLASSES) - 1}")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return images, torch.tensor(labels, dtype=torch.int64)


def ensure_cifar(data_dir, url=None, md5=None):
    """Download and unpack the official archive (MD5 checked) unless the batches are there.
    Per-file checksums are not checked: a local copy may be rebuilt in another order."""
    folder = Path(data_dir) / CIFAR_FOLDER
    if Path(data_dir).exists() and not Path(data_dir).is_dir():
        raise UserError(f"--data-dir {data_dir}: is a file, not a folder; give the folder that "
                        f"holds {CIFAR_FOLDER}/ (or a new one to download it into)")
    names = CIFAR_TRAIN_FILES + [CIFAR_TEST_FILE]
    if all((folder / name).is_file() for name in names):
        return
    from torchvision.datasets.utils import download_and_extract_archive
    url = url or CIFAR_URL
    log(f"CIFAR-10 not found in {data_dir}; downloading {url}")
    try:
        download_and_extract_archive(url, download_root=str(data_dir), md5=md5 or CIFAR_MD5)
    except Exception as error:  # network down, bad checksum, bad archive: all one message
        raise UserError(f"could not get CIFAR-10 ({type(error).__name__}: {first_line(error)}); "
                        f"put the '{CIFAR_FOLDER}' folder inside {data_dir} or pass --data-dir"
                        ) from None
    if not all((folder / name).is_file() for name in names):
        raise UserError(f"the archive from {url} did not contain {CIFAR_FOLDER}/")


def load_cifar(data_dir, url=None, md5=None):
    """The whole dataset as uint8 tensors, read once: {"train": (x, y), "test": (x, y)}."""
    ensure_cifar(data_dir, url, md5)
    folder = Path(data_dir) / CIFAR_FOLDER
    parts = [read_cifar_batch(folder / name) for name in CIFAR_TRAIN_FILES]
    train = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return {"train": train, "test": read_cifar_batch(folder / CIFAR_TEST_FILE)}


def take_subset(data, subset):
    """The first `subset` train and test images (all with 0), for quick checks."""
    return {part: (x[:subset], y[:subset]) if subset else (x, y) for part, (x, y) in data.items()}


def to_float(images):
    """uint8 N x 3 x H x W -> float in [0, 1], the input every model here takes."""
    return images.float().div_(255)


def flip_half(images, flip_mask):
    """Mirror the images selected by flip_mask, in place of a per-image transform."""
    return torch.where(flip_mask.view(-1, 1, 1, 1), images.flip(-1), images)


def translate(images, offsets, shift):
    """Shift image i by (offsets[0, i] - shift, offsets[1, i] - shift) pixels, reflect padding:
    one gather for the whole batch, on whatever device holds it."""
    if shift == 0:
        return images
    n, channels, h, w = images.shape
    padded = F.pad(images, (shift,) * 4, mode="reflect")
    arange = lambda size: torch.arange(size, device=images.device)
    rows = (arange(h) + offsets[0].unsqueeze(1)).view(n, 1, h, 1)
    cols = (arange(w) + offsets[1].unsqueeze(1)).view(n, 1, 1, w)
    return padded[arange(n).view(n, 1, 1, 1), arange(channels).view(1, channels, 1, 1), rows, cols]


class Loader:
    """The training set on the device, augmented there a batch at a time. One CPU generator
    draws every random number, so a seed gives the same batches on every device and its state
    is enough to resume. Flips alternate between epochs (airbench)."""

    def __init__(self, images, labels, batch_size, shift, seed, device):
        self.images, self.labels = images.to(device), labels.to(device)
        self.batch_size, self.shift, self.device = batch_size, shift, device
        self.generator = torch.Generator().manual_seed(seed)
        self.base_flips = (torch.rand(len(images), generator=self.generator) < 0.5).to(device)

    def __len__(self):
        """Steps per epoch (the last batch may be smaller)."""
        return -(-len(self.images) // self.batch_size)

    def draw(self):
        """One epoch's order and per-image offsets, the offsets drawn batch by batch."""
        order = torch.randperm(len(self.images), generator=self.generator)
        offsets = [torch.zeros(2, 0, dtype=torch.int64)]
        if self.shift:
            offsets = [torch.randint(0, 2 * self.shift + 1, (2, len(index)),
                                     generator=self.generator)
                       for index in order.split(self.batch_size)]
        return order.to(self.device), torch.cat(offsets, 1).to(self.device)

    def epoch(self, number):
        """Batches (images, labels) of epoch `number` (from 0): augmented, channels_last."""
        order, offsets = self.draw()
        for start in range(0, len(order), self.batch_size):
            index = order[start:start + self.batch_size]
            flips = self.base_flips[index] ^ bool(number % 2)
            batch = flip_half(to_float(self.images[index]), flips)
            batch = translate(batch, offsets[:, start:start + self.batch_size], self.shift)
            yield batch.contiguous(memory_format=torch.channels_last), self.labels[index]


# ----------------------------------------------------------------------------- model

def conv3x3(cin, cout):
    """3x3 conv whose first filters start as the identity (airbench's partial dirac init)."""
    conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
    with torch.no_grad():
        nn.init.dirac_(conv.weight[:min(cin, cout)])
    return conv


def batch_norm(channels, momentum):
    """BatchNorm with a learned bias only: the scale is redundant before GELU + next BN."""
    bn = nn.BatchNorm2d(channels, momentum=momentum, eps=1e-12)
    bn.weight.requires_grad_(False)
    return bn


def conv_block(cin, cout, bn_momentum):
    """conv -> pool -> BN -> GELU -> conv -> BN -> GELU; each block halves the size."""
    return nn.Sequential(
        conv3x3(cin, cout), nn.MaxPool2d(2), batch_norm(cout, bn_momentum), nn.GELU(),
        conv3x3(cout, cout), batch_norm(cout, bn_momentum), nn.GELU())


class CNN(nn.Module):
    """Our classifier: RGB floats in [0, 1], N x 3 x 32 x 32 -> logits. conv1 is the assignment's
    Conv2d(3, 32, 5), set from the data (set_whitening), not trained; three conv blocks and a
    linear head follow, in `compute_dtype` (autocast). The input is normalised inside."""

    def __init__(self, widths, bn_momentum, logit_scale, compute_dtype=torch.float32,
                 mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)):
        super().__init__()
        self.settings = {"widths": list(widths), "bn_momentum": bn_momentum,
                         "logit_scale": logit_scale}
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.conv1 = nn.Conv2d(3, 32, kernel_size=5, stride=1, padding=0)
        self.conv1.requires_grad_(False)
        channels = [self.conv1.out_channels, *widths]
        self.blocks = nn.Sequential(*[conv_block(cin, cout, bn_momentum)
                                      for cin, cout in zip(channels, widths)])
        self.head = nn.Linear(widths[-1], len(CLASSES), bias=False)
        self.logit_scale = logit_scale
        self.compute_dtype = compute_dtype

    def first_layer(self, x):
        """Normalised input through conv1: what CONV_rslt.png shows (inside forward's
        autocast, so in the model's compute format, as the models were trained)."""
        return self.conv1((x - self.mean) / self.std)

    def forward(self, x):
        autocast = self.compute_dtype != torch.float32
        with torch.autocast(x.device.type, dtype=self.compute_dtype, enabled=autocast):
            features = self.blocks(F.gelu(self.first_layer(x)))
            logits = self.head(F.adaptive_max_pool2d(features, 1).flatten(1))
            return logits.float() * self.logit_scale


class ViewAverage(nn.Module):
    """Test-time augmentation: logits averaged over 1 (the image), 2 (and its mirror) or 6 views
    (airbench: those two at 1/4 each, both shifted a pixel up-left and down-right at 1/8)."""

    def __init__(self, cnn, views=6):
        super().__init__()
        if views not in (1, 2, 6):
            raise ValueError(f"views must be 1, 2 or 6, not {views}")
        self.cnn, self.views = cnn, views

    def forward(self, x):
        if self.views == 1:
            return self.cnn(x)
        if self.views == 2:
            logits = self.cnn(torch.cat([x, x.flip(-1)]))
            return (logits[:len(x)] + logits[len(x):]) / 2
        padded = F.pad(x, (1,) * 4, mode="reflect")
        images = [x, padded[..., :-2, :-2], padded[..., 2:, 2:]]
        views = [view for image in images for view in (image, image.flip(-1))]
        logits = self.cnn(torch.cat(views)).view(6, len(x), -1)
        return (logits[0] + logits[1]) / 4 + (logits[2:].sum(0)) / 8


def build_cnn(recipe=RECIPE, dtype=torch.float32, mean=None, std=None):
    """A CNN of the recipe's widths in channels_last (the fast layout on CPUs)."""
    normalisation = {"mean": mean, "std": std} if mean is not None else {}
    model = CNN(recipe.widths, recipe.bn_momentum, recipe.logit_scale, dtype, **normalisation)
    return model.to(memory_format=torch.channels_last)


def patch_covariance(x, size):
    """Covariance of the size x size x 3 patches of x (all positions), 3*size*size square."""
    patches = F.unfold(x, kernel_size=size).transpose(1, 2).reshape(-1, 3 * size * size)
    patches = patches - patches.mean(0)
    return patches.T @ patches / len(patches)


@torch.no_grad()
def set_whitening(model, images, eps=5e-4):
    """Set conv1 from the data, every filter over the whole 5x5 kernel. Filters 0-11 are ZCA
    whitening (W = U diag(1/sqrt(l + eps)) U^T of the 5x5 patches): each gives one colour of one
    of the four centre pixels, decorrelated from its 5x5 neighbourhood, so edges and textures at
    every frequency stand out; 12-15 are the 4 strongest principal directions (the coarse shape
    and colour). Each output has unit variance; 16-31 are 0-15 negated (GELU follows)."""
    x = ((to_float(images) - model.mean) / model.std).double()
    k = model.conv1.kernel_size[0]
    covariance = patch_covariance(x, k)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    zca = eigenvectors @ torch.diag((eigenvalues + eps).rsqrt()) @ eigenvectors.T
    centre = [(k // 2, k // 2), (k // 2, k // 2 + 1), (k // 2 + 1, k // 2), (k // 2 + 1, k // 2 + 1)]
    rows = zca[[c * k * k + i * k + j for c in range(3) for i, j in centre]]
    strongest = (eigenvectors[:, -4:].flip(1) / (eigenvalues[-4:].flip(0) + eps).sqrt()).T
    top = torch.cat([rows, strongest])
    top = top / torch.einsum("ri,ij,rj->r", top, covariance, top).sqrt().unsqueeze(1)
    model.conv1.weight.copy_(torch.cat([top, -top]).view(-1, 3, k, k).float())
    model.conv1.bias.zero_()


def save_checkpoint(path, model, extra):
    """State dict plus what is needed to use it (constructor arguments, classes,
    normalisation), written atomically."""
    checkpoint = {"state_dict": model.state_dict(), "settings": model.settings,
                  "classes": list(CLASSES), "mean": model.mean.flatten().tolist(),
                  "std": model.std.flatten().tolist(), **extra}
    write_atomically(path, lambda tmp: torch.save(checkpoint, tmp))


def inference_format(device, precision, trained_in):
    """The number format of `test`, `evaluate` and `speed`: --precision's; with auto, the
    model's training format where this machine computes it natively, else float32."""
    if precision != "auto":
        return PRECISIONS[precision]
    return PRECISIONS[trained_in] if trained_in in candidate_formats(device) else torch.float32


def load_cnn(path=None, device=torch.device("cpu"), precision="auto"):
    """The trained CNN from model/ (or `path`) with its test-time views, in eval mode on
    `device`, in inference_format's choice: it gives the predictions `train` scored."""
    path = path or MODEL_DIR / MAIN_MODEL
    checkpoint = load_torch_file(path, f"no trained model at {path}; "
                                       "run `python CNNclassify.py train` first")
    if not (isinstance(checkpoint, dict)
            and {"state_dict", "settings", "mean", "std"} <= checkpoint.keys()):
        raise UserError(f"{path}: not a model saved by `CNNclassify.py train`")
    dtype = inference_format(device, precision, checkpoint.get("precision", "float32"))
    try:
        model = CNN(**checkpoint["settings"], compute_dtype=dtype, mean=checkpoint["mean"],
                    std=checkpoint["std"])
        model.load_state_dict(checkpoint["state_dict"])
        views = ViewAverage(model.to(memory_format=torch.channels_last), checkpoint.get("views", 6))
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise UserError(f"{path}: its weights do not fit the CNN it describes "
                        f"({first_line(error)})") from None
    return views.to(device).eval()


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, images, labels, batch_size):
    """Mean loss and confusion matrix (rows true class, columns predicted) of a model taking
    [0, 1] floats, on uint8 images on its device; the host waits for the device once."""
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=images.device)
    confusion = torch.zeros(len(CLASSES) ** 2, dtype=torch.int64, device=images.device)
    starts = range(0, len(images), batch_size)
    for start in progress_bar(starts, len(starts), "evaluating"):
        x = to_float(images[start:start + batch_size]).contiguous(memory_format=torch.channels_last)
        y = labels[start:start + batch_size]
        logits = model(x)
        total_loss += F.cross_entropy(logits, y, reduction="sum")
        confusion += torch.bincount(y * len(CLASSES) + logits.argmax(1),
                                    minlength=len(CLASSES) ** 2)
    return total_loss.item() / len(images), confusion.view(len(CLASSES), -1).cpu()


def confusion_on_test_set(model, data_dir, device):
    """The confusion matrix of `model` on the 10,000 CIFAR-10 test images (the test batch only
    is read)."""
    ensure_cifar(data_dir)
    images, labels = read_cifar_batch(Path(data_dir) / CIFAR_FOLDER / CIFAR_TEST_FILE)
    batch = DEVICE_DEFAULTS[device_class(device)]["eval_batch"]
    return evaluate(model, images.to(device), labels.to(device), batch)[1]


def class_lines(confusion, pairs=5):
    """Per-class accuracy (of each class's images, the share called that class) and the most
    confused pairs of classes, from a confusion matrix."""
    total, correct = confusion.sum(1), confusion.diag()
    lines = [f"{'class':<11s} {'accuracy':>8s}  {'correct'}"]
    lines += [f"{name:<11s} {100 * int(c) / max(1, int(t)):7.2f}%  {int(c)}/{int(t)}"
              for name, c, t in zip(CLASSES, correct, total)]
    errors = confusion - torch.diag(correct)
    worst = [divmod(int(i), len(CLASSES)) for i in errors.flatten().argsort(descending=True)]
    lines.append("most confused (true -> predicted): " + ", ".join(
        f"{CLASSES[t]} -> {CLASSES[p]} {int(errors[t, p])}" for t, p in worst[:pairs]
        if errors[t, p] > 0))
    return lines


def draw_confusion(confusion, title, path):
    """The confusion matrix as a picture: counts in every cell, coloured by the share of the
    true class's images (row %)."""
    plt = pyplot()
    shares = 100 * confusion.double() / confusion.sum(1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(9, 8))
    ax.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=100)
    for t, p in itertools.product(range(len(CLASSES)), repeat=2):
        ax.text(p, t, f"{int(confusion[t, p])}\n{shares[t, p]:.1f}%", ha="center", va="center",
                fontsize=7.5, color="white" if shares[t, p] > 60 else "black")
    ax.set(xticks=range(len(CLASSES)), yticks=range(len(CLASSES)), xticklabels=CLASSES,
           yticklabels=CLASSES, xlabel="predicted class", ylabel="true class", title=title)
    plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def command_evaluate(args):
    """`evaluate`: our CNN on the 10,000 test images: accuracy, per class, the most confused
    pairs, and the confusion matrix as a picture (model/confusion.png)."""
    device = pick_device(args.device)
    model = load_cnn(args.model, device, args.precision)
    dtype = model.cnn.compute_dtype
    ensure_writable(Path(args.out).parent)
    confusion = confusion_on_test_set(model, args.data_dir, device)
    correct, total = int(confusion.trace()), int(confusion.sum())
    accuracy, name = 100 * correct / total, Path(args.model).name
    lines = [f"CNN test accuracy: {accuracy:.2f}% ({correct}/{total}, {name}, "
             f"{precision_name(dtype)})", *class_lines(confusion)]
    print("\n".join(lines))
    draw_confusion(confusion, f"CIFAR-10 test set, {name}: {accuracy:.2f}%", args.out)
    save_record(args, "evaluate", lines, {"model": args.model, "confusion": confusion.tolist(),
                                          "correct": correct, "total": total, "accuracy": accuracy},
                device, dtype)


# ----------------------------------------------------------------------------- training

def orthogonalize(matrix, steps=3, eps=1e-7):
    """Roughly U V^T of matrix = U S V^T: Muon's quintic Newton-Schulz iteration pushes every
    singular value towards 1 (into about 0.5-1.5, which trains as well as exact)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = matrix / (matrix.norm() + eps)
    wide = x.size(0) <= x.size(1)
    x = x if wide else x.T
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x if wide else x.T


class Muon(torch.optim.Optimizer):
    """Muon (Keller Jordan, 2024) for conv filters: Nesterov momentum, each update orthogonalised
    so every direction moves at the same speed; weights kept at a fixed norm, so lr sets an
    angle. `dtype`: the format of the Newton-Schulz matmuls."""

    def __init__(self, params, lr, momentum, dtype=torch.float32):
        super().__init__(params, {"lr": lr, "momentum": momentum, "own_norm": False})
        self.dtype = dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buffer = self.state[p].setdefault("momentum", torch.zeros_like(p.grad))
                buffer.mul_(group["momentum"]).add_(p.grad)
                gradient = p.grad.add(buffer, alpha=group["momentum"])
                update = orthogonalize(gradient.reshape(len(p), -1).to(self.dtype)).view(p.shape)
                # the norm is held fixed (sqrt(out channels), or a trained conv1's own from the
                # data), so weight decay is not needed and lr alone sets how far each step turns
                norm = self.state[p].setdefault("norm", p.norm() if group["own_norm"]
                                                else len(p) ** 0.5)
                p.mul_(norm / p.norm())
                p.add_(update.to(p.dtype), alpha=-group["lr"])


def peak_lr(recipe):
    """SGD's peak lr grows with the batch (airbench), so --batch-size alone keeps the
    per-example step and the decay per epoch."""
    return recipe.lr_per_1024 * (recipe.batch_size / 1024)


def make_optimizers(model, recipe, dtype=torch.float32):
    """Nesterov SGD for BN biases (at a higher lr) and the head; Muon for the conv filters (its
    lr growing with the square root of the batch). Each group keeps its peak lr (lr_factor)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    filters = [p for p in trained if p.ndim == 4] if recipe.muon_lr_per_1024 else []
    biases = [p for p in trained if p.ndim == 1]
    others = [p for p in trained if p.ndim == 2 or (p.ndim == 4 and not filters)]
    scale = recipe.batch_size / 1024
    lr, decay = peak_lr(recipe), recipe.decay_per_1024 * scale
    bias_lr = lr * recipe.bias_lr_scale
    groups = [{"params": biases, "lr": bias_lr, "weight_decay": decay / bias_lr},
              {"params": others, "lr": lr, "weight_decay": decay / lr}]
    optimizers = [torch.optim.SGD(groups, momentum=recipe.momentum, nesterov=True)]
    if filters:
        muon_lr = recipe.muon_lr_per_1024 * scale ** 0.5
        conv1 = [p for p in filters if p is model.conv1.weight]  # keeps its scale from the data
        groups = [{"params": [p for p in filters if p is not model.conv1.weight]}]
        groups += [{"params": conv1, "own_norm": True}] if conv1 else []
        optimizers.append(Muon(groups, muon_lr, recipe.muon_momentum, dtype))
    for group in (g for optimizer in optimizers for g in optimizer.param_groups):
        group["peak_lr"] = group["lr"]
    return optimizers


def lr_factor(step, total_steps, warmup_fraction):
    """Linear warm-up from 0.2 to 1, then linear decay to 0 (any number of steps, even 1)."""
    warmup = int(warmup_fraction * total_steps)
    if step < warmup:
        return 0.2 + 0.8 * step / warmup
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup))


@torch.no_grad()
def update_average(average, model, step, decay):
    """Move `average` towards `model` (weights, BatchNorm statistics), the decay ramping up as
    TensorFlow's ExponentialMovingAverage does: the average is a much better model (Polyak)."""
    weight = 1 - min(decay, (1 + step) / (10 + step))
    pairs = [(a, m) for a, m in zip(list(average.parameters()) + list(average.buffers()),
                                    list(model.parameters()) + list(model.buffers()))
             if a.is_floating_point()]
    torch._foreach_lerp_([a for a, _ in pairs], [m for _, m in pairs], weight)


def set_seed(seed):
    """Seed every generator the training touches: python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class Run:
    """One seed's training as it stands; state_dict() is what a progress file keeps, enough to
    go on bit for bit."""

    def __init__(self, train, seed, recipe, device, dtype):
        set_seed(seed)
        images, labels = train
        pixels = to_float(images).transpose(0, 1).reshape(3, -1)
        self.model = build_cnn(recipe, dtype, mean=pixels.mean(1).tolist(),
                               std=pixels.std(1).tolist())
        set_whitening(self.model, images[:recipe.whitening_images], recipe.whitening_eps)
        self.model.conv1.weight.requires_grad_(recipe.conv1_trained)
        self.model.to(device)
        muon_dtype = torch.float32 if dtype == torch.float16 else dtype
        self.optimizers = make_optimizers(self.model, recipe, muon_dtype)
        self.scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        self.loader = Loader(images, labels, recipe.batch_size, recipe.translate, seed, device)
        self.average = copy.deepcopy(self.model).requires_grad_(False)
        self.recipe, self.device = recipe, device
        self.total_steps = recipe.epochs * len(self.loader)
        self.step, self.history, self.seconds = 0, [], 0.0

    def state_dict(self):
        return {"model": self.model.state_dict(), "average": self.average.state_dict(),
                "optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
                "scaler": self.scaler.state_dict(), "generator": self.loader.generator.get_state(),
                "step": self.step, "history": self.history, "seconds": self.seconds}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        self.average.load_state_dict(state["average"])
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        self.scaler.load_state_dict(state["scaler"])
        self.loader.generator.set_state(state["generator"])
        self.step, self.history, self.seconds = state["step"], state["history"], state["seconds"]


def train_steps(run, batches):
    """The training loop: forward, loss, backward, lr, step, moving average, for each batch.
    Loss and correct counts stay on the device (no host sync inside an epoch)."""
    run.model.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
    correct = torch.zeros((), dtype=torch.int64, device=run.device)
    for x, y in batches:
        logits = run.model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=run.recipe.label_smoothing)
        run.model.zero_grad(set_to_none=True)
        run.scaler.scale(loss).backward()
        factor = lr_factor(run.step, run.total_steps, run.recipe.warmup_fraction)
        for optimizer in run.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["peak_lr"] * factor
            run.scaler.step(optimizer)
        run.scaler.update()
        run.step += 1
        update_average(run.average, run.model, run.step, run.recipe.average_decay)
        loss_sum += loss.detach().double() * len(y)
        correct += (logits.argmax(1) == y).sum()
    return loss_sum, correct


class TrainingFailed(UserError):
    """A run that went wrong (diverged, stuck at chance): nothing of it may become the result."""


CHANCE_CHECK_STEPS = 100  # by then every recipe here is far above chance on CIFAR-10


def check_progress(seed, row, steps, batch_size, lr):
    """Stop a failed run before its model is saved: a loss not finite or exploded (always
    guessing costs ln 10), or accuracy near chance after CHANCE_CHECK_STEPS steps."""
    losses = (row["train_loss"], row["test_loss"])
    if all(map(np.isfinite, losses)) and row["test_loss"] < 10 * np.log(len(CLASSES)):
        if steps < CHANCE_CHECK_STEPS or row["test_accuracy"] >= 150 / len(CLASSES):
            return
        what = (f"test accuracy is still at chance ({row['test_accuracy']:.2f}%) "
                f"after {steps} steps")
    else:
        what = f"the loss diverged (train {losses[0]:.4g}, test {losses[1]:.4g})"
    raise TrainingFailed(f"seed {seed} epoch {row['epoch']}: {what}; likely cause: the learning "
                         f"rate, which grows with --batch-size (batch {batch_size}: peak lr "
                         f"{lr:.3g}); try a smaller --batch-size. This seed's model was not saved")


def train_seed(data, seed, recipe, device, dtype, on_epoch=None, progress=None):
    """Train one model; returns the moving average (on the CPU), the per-epoch history and the
    seconds. progress may restore a saved run and saves it after each epoch. Test figures are
    the average's, with epoch_views until the last epoch, then the recipe's views."""
    run = Run(data["train"], seed, recipe, device, dtype)
    if progress and not progress.resume(run):
        run = Run(data["train"], seed, recipe, device, dtype)  # the saved state did not fit
    test_x, test_y = (t.to(device) for t in data["test"])
    train_count = len(data["train"][0])
    for epoch in range(len(run.history), recipe.epochs):
        start = time.perf_counter()
        description = f"seed {seed} epoch {epoch + 1}/{recipe.epochs}"
        loss_sum, correct = train_steps(run, progress_bar(run.loader.epoch(epoch), len(run.loader),
                                                          description))
        synchronize(device)
        train_seconds = time.perf_counter() - start
        views = recipe.views if epoch == recipe.epochs - 1 else recipe.epoch_views
        test_loss, confusion = evaluate(ViewAverage(run.average, views), test_x, test_y,
                                        recipe.eval_batch)
        run.seconds += time.perf_counter() - start
        row = {"epoch": epoch + 1, "train_loss": loss_sum.item() / train_count,
               "train_accuracy": 100.0 * int(correct) / train_count, "test_loss": test_loss,
               "test_accuracy": 100.0 * int(confusion.trace()) / len(test_x),
               "seconds": run.seconds, "images_per_second": train_count / train_seconds,
               "test_views": views, "confusion": confusion.tolist()}
        run.history.append(row)
        check_progress(seed, row, run.step, recipe.batch_size, peak_lr(recipe))
        if progress:
            progress.save(run)
        if on_epoch:
            on_epoch(row)
    return run.average.cpu(), run.history, run.seconds


def seconds_per_step(run, batches, warmup, clock=time.perf_counter):
    """Mean seconds of the training steps on `batches` after `warmup` untimed ones (at least
    one step is timed), the device waited for at both ends."""
    batches = list(batches)
    warmup = min(warmup, len(batches) - 1)
    train_steps(run, batches[:warmup])
    synchronize(run.device)
    start = clock()
    train_steps(run, batches[warmup:])
    synchronize(run.device)
    return (clock() - start) / len(batches[warmup:])


def seconds_per_epoch(data, recipe, device, dtype, steps=4, clock=time.perf_counter):
    """Seconds of one epoch here (timed steps and evaluation, scaled up) and a seed's fixed
    seconds (set-up, the final evaluation's extra views). Measuring changes no result."""
    start = clock()
    run = Run(data["train"], 0, recipe, device, dtype)
    setup = clock() - start
    step = seconds_per_step(run, itertools.islice(run.loader.epoch(0), steps + 2), 2, clock)
    test_x, test_y = data["test"]
    shown = min(len(test_x), 1024)
    start = clock()
    evaluate(ViewAverage(run.average, recipe.epoch_views), test_x[:shown].to(device),
             test_y[:shown].to(device), recipe.eval_batch)
    evaluation = (clock() - start) * len(test_x) / max(1, shown)
    extra_views = (recipe.views / recipe.epoch_views - 1) * evaluation
    return step * len(run.loader) + evaluation, setup + extra_views


def epochs_within(budget, epoch_seconds, margin=0.95):
    """Epochs that fit in `budget` seconds at `epoch_seconds` each, keeping `margin` of it
    (epochs vary a few per cent); at least one, or a UserError."""
    epochs = int(margin * budget // epoch_seconds)
    if epochs < 1:
        raise UserError(f"--budget {budget:g} s is less than one epoch here (about "
                        f"{epoch_seconds:.0f} s measured, evaluation included); give at least "
                        f"{epoch_seconds / margin:.0f} s")
    return epochs


# --------------------------------------------------------------------- test IMAGE and CONV_rslt.png

MAX_IMAGE_PIXELS = 100_000_000  # larger images are refused before decoding
LARGEST_SIDE_KEPT = 1024        # larger images are shrunk right after decoding
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".dib", ".webp", ".tif", ".tiff",
                  ".pbm", ".pgm", ".ppm", ".pnm", ".jp2", ".exr", ".hdr", ".pic", ".sr",
                  ".ras"}  # what OpenCV reads


def resolve_image_path(name):
    """A bare file name missing from the working directory is looked up in test_images/."""
    path = Path(name)
    if not path.exists() and path.parent == Path(".") and (IMAGE_DIR / path).exists():
        return IMAGE_DIR / path
    return path


def decode_quietly(data, flags):
    """cv2.imdecode with the C decoders' stderr captured: libjpeg reports truncation there and
    still returns a half-grey image, so its words are how corruption is detected."""
    import cv2
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            image = cv2.imdecode(data, flags)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        return image, captured.read().decode(errors="replace")


def pixel_count(path):
    """Width x height from the file's header (Pillow reads no pixels yet); 0 where Pillow
    cannot tell, so OpenCV decides; infinite for a decompression bomb."""
    from PIL import Image
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as image:
                return image.size[0] * image.size[1]
    except Image.DecompressionBombError:
        return float("inf")
    except Exception:
        return 0


def shrink_to(image, side):
    """Shrink (INTER_AREA) so the longer side is at most `side`: the model sees 32 x 32 anyway,
    and a 50-megapixel photo in floats would take gigabytes."""
    import cv2
    h, w = image.shape[:2]
    if max(h, w) <= side:
        return image
    size = (max(1, round(w * side / max(h, w))), max(1, round(h * side / max(h, w))))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def to_rgb8(image):
    """OpenCV's array (BGR order, any depth, 1-4 channels) -> uint8 RGB."""
    import cv2
    if image.dtype.kind == "f":
        image = np.clip(np.nan_to_num(image.astype(np.float32)), 0.0, 1.0)
    else:
        image = image.astype(np.float32) / np.iinfo(image.dtype).max
    image = image[:, :, None] if image.ndim == 2 else image
    if image.shape[2] in (2, 4):  # alpha on white
        image = image[:, :, :-1] * image[:, :, -1:] + (1.0 - image[:, :, -1:])
    colour = np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image
    colour = cv2.cvtColor(np.ascontiguousarray(colour[:, :, :3]), cv2.COLOR_BGR2RGB)
    return np.clip(np.rint(colour * 255.0), 0, 255).astype(np.uint8)


def read_image(path):
    """Any common image file -> uint8 RGB H x W x 3 (grey to three channels, alpha on white,
    16-bit and float to 8 bits, EXIF orientation applied), or a UserError naming the problem."""
    import cv2
    path = Path(path)
    if path.is_dir() or not path.exists():
        raise UserError(f"{path}: " + ("is a directory, not an image" if path.is_dir()
                                       else "no such file"))
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise UserError(f"{path}: cannot be read ({error.strerror or first_line(error)})") from None
    if data.size == 0:
        raise UserError(f"{path}: empty file")
    if pixel_count(path) > MAX_IMAGE_PIXELS:
        raise UserError(f"{path}: over {MAX_IMAGE_PIXELS // 10**6} megapixels, too large to "
                        "decode here; shrink it first")
    image, messages = decode_quietly(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise UserError(f"{path}: not an image OpenCV can read (unknown format or corrupt data)")
    if "premature end" in messages.lower():
        raise UserError(f"{path}: truncated or corrupt image data")
    if image.size == 0:
        raise UserError(f"{path}: image has no pixels")
    if image.ndim == 2 or image.shape[2] in (1, 3):  # no alpha: decode again, EXIF-rotated
        image, _ = decode_quietly(data, cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH)
    return to_rgb8(shrink_to(image, LARGEST_SIDE_KEPT))


def image_to_input(rgb):
    """uint8 RGB of any size -> 1 x 3 x 32 x 32 floats in [0, 1]: the whole picture resized (the
    object may be off-centre), averaging pixels when shrinking, bicubic when enlarging."""
    import cv2
    shrinking = min(rgb.shape[:2]) >= 32
    how = cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC
    small = cv2.resize(rgb, (32, 32), interpolation=how)
    return torch.from_numpy(small).permute(2, 0, 1).unsqueeze(0).float() / 255


@torch.no_grad()
def predict(model, x):
    """Class probabilities (ViewAverage's) and the first conv layer's maps of the image (its
    first view: unshifted, unmirrored), from the same forward pass."""
    maps = []
    hook = model.cnn.conv1.register_forward_hook(lambda module, inputs, output: maps.append(output))
    try:
        probabilities = model(x.to(next(model.parameters()).device)).softmax(1)[0].cpu()
    finally:
        hook.remove()
    return probabilities, maps[0][0].float().cpu()


def prediction_lines(probabilities):
    """`prediction result: <class>`, then the three most likely classes."""
    top = probabilities.topk(3)
    lines = [f"prediction result: {CLASSES[top.indices[0]]}"]
    lines += [f"  {rank}. {CLASSES[i]:<10s} {100 * p:6.2f}%"
              for rank, (p, i) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1)]
    return lines


def figure_format(path):
    """The image format matplotlib writes for path's suffix, checked before any work is done."""
    from matplotlib.figure import Figure
    path = Path(path)
    suffix = path.suffix.lower().lstrip(".")
    supported = Figure().canvas.get_supported_filetypes()
    if path.is_dir():
        raise UserError(f"--out {path}: is a directory; give a file name such as "
                        f"{path / 'CONV_rslt.png'}")
    if suffix not in supported:
        raise UserError(f"--out {path}: unknown image type '{path.suffix}' (use one of "
                        f"{', '.join(sorted(supported))})")
    ensure_writable(path.parent)
    return suffix


def draw_conv_maps(rgb, x, maps, title, path):
    """Input image beside the 32 first-layer maps (4 x 8, each on its own scale)."""
    fig = pyplot().figure(figsize=(18, 7.2), dpi=100)
    grid = fig.add_gridspec(4, 11, width_ratios=[1.5, 1.5, 0.2] + [1] * 8)
    plain = {"xticks": [], "yticks": []}
    shown = fig.add_subplot(grid[0:2, 0:2], title=f"input {rgb.shape[1]}x{rgb.shape[0]}", **plain)
    shown.imshow(rgb)
    seen = fig.add_subplot(grid[2:4, 0:2], title="as the model sees it (32x32)", **plain)
    seen.imshow(x[0].permute(1, 2, 0).numpy(), interpolation="nearest")
    for i, feature in enumerate(maps):
        ax = fig.add_subplot(grid[i // 8, 3 + i % 8], **plain)
        ax.imshow(feature.numpy(), cmap="viridis")
        ax.set_title(f"filter {i}", fontsize=9)
    fig.suptitle(title)
    save_figure(fig, path, format=figure_format(path), bbox_inches="tight")


def classify_image(image_path, model):
    """The lines `test` prints, draw_conv_maps's arguments but the path (the report reuses
    both) and the class probabilities."""
    path = resolve_image_path(image_path)
    rgb = read_image(path)
    x = image_to_input(rgb)
    probabilities, maps = predict(model, x)
    title = (f"{path.name}: first conv layer (5x5, 32 filters), 28x28 outputs; "
             f"predicted {CLASSES[probabilities.argmax()]}")
    return prediction_lines(probabilities), (rgb, x, maps, title), probabilities


def image_files(names):
    """The files named, and the image files in the folders named (any depth, sorted, any case
    of the suffix), in the order given."""
    found = []
    for name in map(resolve_image_path, names):
        if not name.is_dir():
            found.append(name)
            continue
        inside = sorted(p for p in name.rglob("*")
                        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not inside:
            raise UserError(f"{name}: is a directory with no image files in it")
        found += inside
    return found


def named_class(path):
    """The CIFAR-10 class a file or folder name names (cat_01.png, dog/x.jpg); None if none or
    two."""
    text = "".join(c if c.isalpha() else " " for c in " ".join(path.parts[-2:]).lower())
    named = [name for name in CLASSES if name in text.split()]
    return named[0] if len(named) == 1 else None


def classify_many(files, model, conv_dir):
    """`test` on several images: one line each, then the accuracy over the images whose names
    name a class; an unreadable image is one stderr line, the others still get theirs."""
    failed, scored = 0, []
    for path in files:
        try:
            _, figure, probabilities = classify_image(path, model)
        except UserError as error:
            log(f"error: {error}")
            failed += 1
            continue
        predicted = CLASSES[probabilities.argmax()]
        print(f"{path}  {predicted}  {100 * probabilities.max():.2f}%", flush=True)
        if conv_dir:
            draw_conv_maps(*figure, Path(conv_dir) / f"{len(scored) + failed:03d}_{path.stem}.png")
        named = named_class(path)
        scored.append(named and named == predicted)
    named = [s for s in scored if s is not None]
    if named:
        print(f"accuracy over the {len(named)} images whose names name a class: "
              f"{100 * np.mean(named):.2f}% ({sum(named)}/{len(named)})")
    if failed:
        raise UserError(f"{failed} of {len(files)} images could not be read (named above)")


def command_test(args):
    """`test IMAGE`: print the predicted class and save CONV_rslt.png. With several images or a
    folder the model loads once (classify_many); the conv maps only with --conv-dir."""
    single = len(args.images) == 1 and not resolve_image_path(args.images[0]).is_dir()
    if not single and args.out:
        raise UserError("--out names one file; with several images use --conv-dir FOLDER")
    files = [resolve_image_path(args.images[0])] if single else image_files(args.images)
    out = args.out or "CONV_rslt.png"
    figure_format(out if single else Path(args.conv_dir or ".") / "x.png")
    model = load_cnn(args.model, pick_device(args.device), args.precision)
    if not single:
        return classify_many(files, model, args.conv_dir)
    lines, figure, _ = classify_image(files[0], model)
    print("\n".join(lines), flush=True)
    draw_conv_maps(*figure, out)


# ----------------------------------------------------------------------------- ResNet-20

RESNET20_URL = ("https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/"
                "pretrained_models/resnet20-12fca82f.th")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a shortcut. Option A pads the identity with zero channels
    (akamaster's checkpoints); option B projects it with a 1x1 conv + BN (`downsample`)."""

    def __init__(self, cin, cout, stride, option):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = (cout - cin) // 2 if option == "A" else 0
        if option == "B" and (stride != 1 or cin != cout):
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            nn.BatchNorm2d(cout))

    def shortcut(self, x):
        if hasattr(self, "downsample"):
            return self.downsample(x)
        if self.pad:
            return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return x

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016): 3 stages x 3 blocks, 16/32/64 channels, taking RGB in
    [0, 1] like our CNN; its normalisation is inside, not in the state dict."""

    def __init__(self, option, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)

        def stage(cin, cout, stride):
            return nn.Sequential(BasicBlock(cin, cout, stride, option),
                                 *[BasicBlock(cout, cout, 1, option) for _ in range(2)])
        self.layer1, self.layer2, self.layer3 = stage(16, 16, 1), stage(16, 32, 2), stage(32, 64, 2)
        self.option = option
        self.head_name = "linear" if option == "A" else "fc"
        setattr(self, self.head_name, nn.Linear(64, 10))

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1((x - self.mean) / self.std)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return getattr(self, self.head_name)(F.adaptive_avg_pool2d(x, 1).flatten(1))


def fetch_resnet20_checkpoint(source):
    """A local path, or a URL that torch.hub downloads once into its cache, checking the sha256
    prefix in the file name (resnet20-12fca82f.th) on the download and on the cached file."""
    if "://" not in source:
        return load_torch_file(source, f"{source}: no such weights file")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / source.rsplit("/", 1)[-1]
    prefix = torch.hub.HASH_REGEX.search(cached.name)
    if cached.is_file() and prefix and not sha256_of(cached).startswith(prefix.group(1)):
        raise UserError(f"checksum mismatch: {cached} does not have sha256 {prefix.group(1)}...; "
                        "delete it to download it again")
    if not cached.is_file():
        log(f"downloading {source} to {cached}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # torch.hub announces downloads there
            return torch.hub.load_state_dict_from_url(source, map_location="cpu", progress=False,
                                                      check_hash=True, weights_only=True)
    except Exception as error:
        if "invalid hash value" in str(error):
            raise UserError(f"checksum mismatch: the file downloaded from {source} does not have "
                            f"sha256 {prefix.group(1)}...; nothing was saved") from None
        raise UserError(f"could not fetch ResNet-20 weights ({type(error).__name__}: "
                        f"{first_line(error)}); download {source} into {cached} or pass "
                        "--weights PATH") from None


def load_resnet20(source=RESNET20_URL):
    """ResNet-20 in eval mode, its variant told by the checkpoint's keys, loaded strictly."""
    checkpoint = fetch_resnet20_checkpoint(source)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"{source}: not a ResNet-20 state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    projected = any("downsample" in k for k in state)
    if "linear.weight" in state and not projected:
        model = ResNet20("A", IMAGENET_MEAN, IMAGENET_STD)
    elif "fc.weight" in state and projected:
        model = ResNet20("B", CIFAR_MEAN, CIFAR_STD)
    else:
        raise UserError(f"{source}: unknown checkpoint layout (expected ResNet-20 with a "
                        "'linear' head and option-A shortcuts, or an 'fc' head and 'downsample')")
    for key, value in model.state_dict().items():  # older checkpoints lack BN's batch counter
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, value)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise UserError(f"{source}: does not fit ResNet-20 ({first_line(error)})") from None
    return model.eval()


def command_resnet20(args):
    """`resnet20`: accuracy of a pretrained ResNet-20 on the 10,000 test images."""
    device = pick_device(args.device)
    model = load_resnet20(args.weights).to(device)
    confusion = confusion_on_test_set(model, args.data_dir, device)
    correct, total = int(confusion.trace()), int(confusion.sum())
    line = f"ResNet-20 test accuracy: {100 * correct / total:.2f}% ({correct}/{total})"
    print(line)
    save_record(args, f"resnet20_option{model.option}", [line],
                {"weights": args.weights, "option": model.option, "correct": correct,
                 "total": total, "accuracy": 100 * correct / total}, device, torch.float32)


# ----------------------------------------------------------------- costs (THOP) and inference speed

def count_costs(model):
    """THOP's MACs and parameters for one 1 x 3 x 32 x 32 input, on a deep copy so the counters
    THOP attaches never stay on the model itself."""
    from thop import profile
    copied = copy.deepcopy(model).cpu().eval()
    macs, params = profile(copied, inputs=(torch.zeros(1, 3, 32, 32),), verbose=False)
    return int(macs), int(params)


def cost_table(cnn, resnet):
    """Rows (name, MACs, params) of both models (ours as shipped, with all its test-time views,
    and with one view when it has more), the printed table and the ratios."""
    from thop import clever_format
    one_view = ("CNN (ours), one view", *count_costs(cnn.cnn))
    rows = [one_view] if cnn.views == 1 else [(f"CNN (ours), {cnn.views} views", *count_costs(cnn)),
                                              one_view]
    rows.append(("ResNet-20", *count_costs(resnet)))
    lines = [f"{'model':<28s} {'MACs':>9s} {'params':>9s} {'MACs (exact)':>14s} "
             f"{'params (exact)':>15s}"]
    for name, macs, params in rows:
        readable_macs, readable_params = clever_format([macs, params], "%.3f")
        lines.append(f"{name:<28s} {readable_macs:>9s} {readable_params:>9s} {macs:>14,d} "
                     f"{params:>15,d}")
    lines.append("THOP counts convolutions, linear layers and BatchNorm; input 1 x 3 x 32 x 32.")
    lines.append(f"ours / ResNet-20, as shipped: {rows[0][1] / rows[-1][1]:.2f}x the MACs, "
                 f"{rows[0][2] / rows[-1][2]:.2f}x the parameters")
    return rows, lines


def command_profile(args):
    """`profile`: MACs and parameters of our CNN and ResNet-20 (THOP)."""
    rows, lines = cost_table(load_cnn(args.model), load_resnet20(args.weights))
    print("\n".join(lines))
    models = [{"name": n, "macs": m, "params": p} for n, m, p in rows]
    save_record(args, "profile", lines, {"weights": args.weights, "models": models},
                torch.device("cpu"), torch.float32)


@torch.inference_mode()
def time_inference(model, x, warmup, iterations):
    """Seconds per call of model(x), one timing per iteration after warm-up."""
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(iterations):
        synchronize(x.device)
        start = time.perf_counter()
        model(x)
        synchronize(x.device)
        times.append(time.perf_counter() - start)
    return np.array(times)


def inference_speed_test(args):
    """Single-image inference time of our CNN (as shipped, in the format `test` uses; also in
    float32 and with one view where those differ) and ResNet-20, on one device. args: device,
    precision, warmup, iterations, model, weights. Returns {"models": [{name, mean_ms,
    median_ms, p95_ms}], "device", "precision", ...}."""
    device = pick_device(args.device)
    cnn = load_cnn(args.model, device, args.precision)
    models = [("CNN (ours)", cnn)]
    if cnn.cnn.compute_dtype != torch.float32:
        in_float32 = copy.deepcopy(cnn)
        in_float32.cnn.compute_dtype = torch.float32
        models.append(("CNN, float32", in_float32))
    if cnn.views > 1:
        models.append(("CNN, one view", cnn.cnn))
    models.append(("ResNet-20", load_resnet20(args.weights).to(device)))
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    results = []
    for name, model in models:
        ms = 1000 * time_inference(model, x, args.warmup, args.iterations)
        results.append({"name": name, "mean_ms": float(ms.mean()),
                        "median_ms": float(np.median(ms)), "p95_ms": float(np.percentile(ms, 95))})
    return {"models": results, "device": str(device), "views": cnn.views,
            "precision": precision_name(cnn.cnn.compute_dtype), "threads": torch.get_num_threads(),
            "input": "1 x 3 x 32 x 32", "warmup": args.warmup, "iterations": args.iterations}


def speed_lines(speed):
    """The table `speed` prints, and each of ours against ResNet-20."""
    lines = [f"device {speed['device']}, CNN in {speed['precision']}, {speed['threads']} torch "
             f"threads, input {speed['input']}, {speed['warmup']} warm-up + "
             f"{speed['iterations']} timed iterations",
             f"{'model':<14s} {'mean ms':>9s} {'median ms':>10s} {'p95 ms':>8s}"]
    lines += [f"{m['name']:<14s} {m['mean_ms']:9.3f} {m['median_ms']:10.3f} {m['p95_ms']:8.3f}"
              for m in speed["models"]]
    views = speed.get("views", 6)
    lines.append(f"CNN (ours) is the model as shipped, with its {views} test-time view"
                 + ("s; 'one view' skips the others." if views > 1 else "."))
    resnet = speed["models"][-1]["mean_ms"]
    lines += [f"{m['name']} / ResNet-20: {m['mean_ms'] / resnet:.2f}x the time"
              for m in speed["models"][:-1]]
    return lines


def command_speed(args):
    """`speed`: print and record inference_speed_test's figures."""
    result = inference_speed_test(args)
    lines = speed_lines(result)
    print("\n".join(lines))
    save_record(args, "speed", lines, result, torch.device(result["device"]),
                PRECISIONS[result["precision"]])


# --------------------------------------------------- train: seeds, resuming, results.json, the plot

def epoch_line(seed, row, epochs):
    """The line `train` prints after each epoch (the report rebuilds it from history)."""
    return (f"seed {seed} epoch {row['epoch']:2d}/{epochs}  train loss {row['train_loss']:.4f}"
            f"  train acc {row['train_accuracy']:6.2f}%  test loss {row['test_loss']:.4f}"
            f"  test acc {row['test_accuracy']:6.2f}%  {row['seconds']:6.1f}s")


def seed_table(results):
    """The table `train` ends with: seed -> final test accuracy, then mean and std."""
    lines = ["seed  test accuracy (%)  train seconds"]
    lines += [f"{run['seed']:4d}  {run['test_accuracy']:17.2f}  {run['train_seconds']:13.1f}"
              for run in results["runs"]]
    lines.append(f"mean {results['mean']:.2f}%  std {results['std']:.2f} "
                 f"(numpy.std over {len(results['runs'])} seeds)")
    return lines


def plot_accuracy(runs, path):
    """The one plot: train and test accuracy per epoch, mean over seeds with a min-max band."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    six = runs[0]["history"][-1].get("test_views") == 6
    test = "test" + (" (mirror TTA; last epoch 6 views)" if six else "")
    for key, label, colour in [("train_accuracy", "train", "tab:blue"),
                               ("test_accuracy", test, "tab:orange")]:
        curves = np.array([[h[key] for h in run["history"]] for run in runs])
        epochs = np.arange(1, curves.shape[1] + 1)
        ax.plot(epochs, curves.mean(0), marker="o", color=colour, label=label)
        if len(runs) > 1:
            ax.fill_between(epochs, curves.min(0), curves.max(0), color=colour, alpha=0.2)
    seeds = ", ".join(str(run["seed"]) for run in runs)
    band = "; mean, band = min-max)" if len(runs) > 1 else ")"
    ax.set(xlabel="epoch", ylabel="accuracy (%)",
           title=f"CIFAR-10 accuracy per epoch (seeds {seeds}{band}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def run_summary(seed, history, seconds):
    """What results.json keeps of one seed's run; per class: the share of each class's images
    called that class at the end."""
    confusion = np.array(history[-1]["confusion"])
    per_class = 100 * confusion.diagonal() / confusion.sum(1).clip(1)
    return {"seed": seed, "test_accuracy": history[-1]["test_accuracy"], "train_seconds": seconds,
            "images_per_second": float(np.mean([h["images_per_second"] for h in history])),
            "seconds_per_epoch": seconds / len(history), "confusion": confusion.tolist(),
            "per_class_accuracy": dict(zip(CLASSES, per_class.tolist())), "history": history}


def save_results(model_dir, runs, extra):
    """results.json, the plot and cnn.pt (the first seed's model), rewritten as each seed ends,
    so an interrupted run leaves files that agree with each other."""
    first = runs[0]
    write_atomically(model_dir / MAIN_MODEL,
                     lambda tmp: shutil.copyfile(model_dir / f"cnn_seed{first['seed']}.pt", tmp))
    accuracies = np.array([run["test_accuracy"] for run in runs])
    results = {**extra, "main_model": MAIN_MODEL, "main_seed": first["seed"], "runs": runs,
               "mean": float(accuracies.mean()), "std": float(np.std(accuracies))}
    write_json(model_dir / RESULTS_FILE, results)
    plot_accuracy(runs, model_dir / "accuracy.png")
    if len(runs) == 1:  # the first seed's, so drawn once
        title = (f"CIFAR-10 test set, {MAIN_MODEL} (seed {first['seed']}): "
                 f"{first['test_accuracy']:.2f}%")
        draw_confusion(torch.tensor(first["confusion"]), title, model_dir / "confusion.png")
    return results


def run_settings(recipe, data, dtype, device):
    """What decides a seed's numbers: a saved model or progress file is reused only when this
    is the same (recipe, data, number format, kind of device, RECIPE_VERSION)."""
    digest = hashlib.blake2b(digest_size=16)
    for images, labels in data.values():
        digest.update(images.numpy().data)
        digest.update(labels.numpy().data)
    return {"recipe": dataclasses.asdict(recipe), "data": digest.hexdigest(),
            "precision": precision_name(dtype), "device": device.type, "version": RECIPE_VERSION}


def differences(saved, settings):
    """The names of the settings (recipe fields one by one) where `saved` differs."""
    recipe = saved["recipe"] if isinstance(saved.get("recipe"), dict) else {}
    names = [k for k in settings["recipe"] if recipe.get(k) != settings["recipe"][k]]
    return names + [k for k in settings if k != "recipe" and saved.get(k) != settings[k]]


class SeedProgress:
    """A seed's state on disk: finished (cnn_seed<N>.pt of the same settings), under way
    (progress_seed<N>.pt, rewritten every epoch), or neither. Files of other settings or
    damaged are never mixed in: one line says why, and the seed starts afresh."""

    def __init__(self, model_dir, seed, settings, restart):
        self.seed, self.settings = seed, settings
        self.model_file = model_dir / f"cnn_seed{seed}.pt"
        self.file = model_dir / f"progress_seed{seed}.pt"
        self.finished = None if restart else self.finished_model()
        self.state = None if restart or self.finished else self.saved_run()
        if restart:
            self.discard()

    def finished_model(self):
        """The seed's saved model, if it was made with these settings."""
        with contextlib.suppress(UserError):
            saved = load_torch_file(self.model_file, "")
            if isinstance(saved, dict) and saved.get("run_settings") == self.settings:
                log(f"seed {self.seed}: already trained with these settings ({self.model_file}); "
                    "kept (--restart trains it again)")
                return saved

    def saved_run(self):
        """The run in the progress file, if there is one of these settings (else None)."""
        if not self.file.is_file():
            return None
        try:
            saved = load_torch_file(self.file, "")
        except UserError as error:
            return self.start_afresh(first_line(error))
        run = saved.get("run") if isinstance(saved, dict) else None
        if not (isinstance(run, dict) and isinstance(saved.get("settings"), dict)
                and isinstance(run.get("history"), list)):
            return self.start_afresh(f"{self.file}: not a progress file of `train`")
        if saved["settings"] != self.settings:
            changed = ", ".join(differences(saved["settings"], self.settings))
            return self.start_afresh(f"{self.file} was made with other settings ({changed})")
        return run

    def start_afresh(self, why):
        log(f"seed {self.seed}: {why}; starting this seed afresh")
        self.discard()
        return None

    def epochs_done(self):
        return len(self.state["history"]) if self.state else 0

    def resume(self, run):
        """Load the saved state into a new `run`; False (after one line) if it does not fit."""
        if not self.state:
            return True
        try:
            run.load_state_dict(self.state)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            self.start_afresh(f"{self.file} is damaged ({first_line(error)})")
            return False
        done, epochs = len(run.history), run.recipe.epochs
        log(f"resuming seed {self.seed} at epoch {done + 1}/{epochs} from {self.file}"
            if done < epochs else
            f"seed {self.seed}: all {epochs} epochs were done ({self.file}); saving its model")
        return True

    def save(self, run):
        state = {"settings": self.settings, "run": run.state_dict()}
        write_atomically(self.file, lambda tmp: torch.save(state, tmp))

    def discard(self):
        self.state = None
        self.file.unlink(missing_ok=True)


def duration(seconds):
    """Seconds as a person says them: 45 s, 12 min, 2 h 15 min."""
    minutes = round(seconds / 60)
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{minutes} min" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"


def estimate_line(epochs, epoch_seconds, setup_seconds, seeds_left, seeds, epochs_left):
    """How long the rest of the command will take here, from the measured seconds of an epoch
    and of a seed's set-up."""
    per_seed = setup_seconds + epochs * epoch_seconds
    left = seeds_left * setup_seconds + epochs_left * epoch_seconds
    line = f"time: about {duration(per_seed)} per seed"
    if epochs_left < epochs * len(seeds):
        line += (f", {duration(left)} for what is left ({epochs_left} of {epochs * len(seeds)} "
                 "epochs)")
    elif len(seeds) > 1:
        line += f", {duration(left)} for {len(seeds)} seeds"
    return line + (f" ({epochs} epochs of ~{epoch_seconds:.3g} s measured here); "
                   "--budget SECONDS fits the run to less")


def train_or_reuse(progress, data, recipe, device, dtype, settings, on_epoch):
    """One seed of `train`: its saved model if it finished with these settings, else trained
    (resumed if it can be) and saved, printing every epoch line. Returns (history, seconds)."""
    print_row = lambda row: print(epoch_line(progress.seed, row, recipe.epochs), flush=True)
    if progress.finished:
        for row in progress.finished["history"]:
            print_row(row)
        return progress.finished["history"], progress.finished["train_seconds"]
    for row in progress.state["history"] if progress.state else []:
        print_row(row)
    try:
        model, history, seconds = train_seed(data, progress.seed, recipe, device, dtype,
                                             lambda row: (print_row(row), on_epoch()), progress)
    except TrainingFailed:
        progress.discard()
        raise
    save_checkpoint(progress.model_file, model,
                    {"seed": progress.seed, "views": recipe.views, "history": history,
                     "train_seconds": seconds, "run_settings": settings,
                     "precision": precision_name(dtype),
                     "hyperparameters": dataclasses.asdict(recipe)})
    return history, seconds


def prepare_train(args):
    """Everything `train` checks before its first step: the options, the device, the output
    folder and its free space, the data and the batch size. Returns the run's pieces."""
    seeds = args.seeds or [args.seed]
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {' '.join(map(str, seeds))}: a seed is given twice")
    model_dir = Path(args.model_dir or (MODEL_DIR / "subset" if args.subset else MODEL_DIR))
    device = pick_device(args.device)
    ensure_writable(model_dir)
    data = take_subset(load_cifar(args.data_dir), args.subset)
    train_count = len(data["train"][0])
    if args.batch_size and args.batch_size > train_count:
        raise UserError(f"--batch-size {args.batch_size} is larger than the {train_count} training "
                        f"images; give at most {train_count}")
    recipe = recipe_for(device, args.batch_size, args.epochs, args.preset)
    model_bytes = sum(t.numel() * t.element_size() for t in build_cnn(recipe).state_dict().values())
    ensure_space(model_dir, (len(seeds) + 5) * (model_bytes + 200_000) + 1_000_000)
    return seeds, model_dir, device, data, recipe


def command_train(args):
    """`train`: one model per seed in model/, with results.json and the plot; the same command
    run again goes on where it stopped (SeedProgress)."""
    seeds, model_dir, device, data, recipe = prepare_train(args)
    dtype, how = training_format(device, args.precision, recipe)
    epoch_seconds, setup_seconds = seconds_per_epoch(data, recipe, device, dtype)
    if args.budget:
        recipe = dataclasses.replace(recipe, epochs=epochs_within(args.budget, epoch_seconds))
        log(f"--budget {args.budget:g} s: {recipe.epochs} epochs of about {epoch_seconds:.1f} s "
            f"each (measured here, {precision_name(dtype)})")
    log(f"training the {args.preset} preset on {device}: batch {recipe.batch_size}, "
        f"{recipe.epochs} epochs, number format {how}")
    extra = {"command": invocation(args), "machine": machine_description(device, dtype),
             "subset": args.subset, "preset": args.preset, "views": recipe.views,
             "precision": precision_name(dtype), "precision_choice": how, "budget": args.budget,
             "epochs": recipe.epochs, "batch_size": recipe.batch_size,
             "eval_batch": recipe.eval_batch, "recipe": dataclasses.asdict(recipe)}
    torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    model_dir.mkdir(parents=True, exist_ok=True)
    settings, runs = run_settings(recipe, data, dtype, device), []
    with exclusive(model_dir):
        seed_progress = [SeedProgress(model_dir, seed, settings, args.restart) for seed in seeds]
        left = [p for p in seed_progress if not p.finished]
        epochs_left = sum(recipe.epochs - p.epochs_done() for p in left)
        log(estimate_line(recipe.epochs, epoch_seconds, setup_seconds, len(left), seeds,
                          epochs_left))
        whole_run = progress_bar(None, epochs_left, "whole run")
        for progress in seed_progress:
            history, seconds = train_or_reuse(progress, data, recipe, device, dtype, settings,
                                              whole_run.update)
            runs.append(run_summary(progress.seed, history, seconds))
            results = save_results(model_dir, runs, extra)
            progress.discard()
        whole_run.close()
    print("\n".join(seed_table(results) + ["", f"main model (seed {results['main_seed']}), "
                    "per class:"] + class_lines(torch.tensor(results["runs"][0]["confusion"]))))


# ----------------------------------------------------------------------------- command line

class Parser(argparse.ArgumentParser):
    """argparse, with a bad option reported as one line (exit 2) like every other error."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each default, unless there is none or the help text already says it."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def int_from(low):
    """An argparse type: an integer of at least `low`."""
    def parse(text):
        if int(text) < low:
            raise argparse.ArgumentTypeError(f"must be {low} or more, not {int(text)}")
        return int(text)
    parse.__name__ = "int"  # argparse names it when the text is no number: "invalid int value"
    return parse


MAX_BUDGET = 7 * 24 * 3600  # --budget above a week is a typo, not a plan


def budget_seconds(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    if not value <= MAX_BUDGET:
        raise argparse.ArgumentTypeError(f"{text} s is more than a week ({MAX_BUDGET} s); give "
                                         "the seconds one seed may take")
    return value


POSITIVE, NON_NEGATIVE = int_from(1), int_from(0)
HAND_IN = ("report and submit are made by report/build.py: python report/build.py report "
           "--author NAME, then submit LAST FIRST")
def shared_options():
    """Options that several commands take, each declared once."""
    precision = ("number format after conv1; auto: `train` times a few steps in each format the "
                 "hardware computes natively and keeps the fastest; test, evaluate and speed use "
                 "the model's training format where this machine computes it natively, else "
                 "float32")
    return {
        "device": [("--device", {"help": "cpu, cuda, cuda:N or mps (default: the fastest "
                                          "present)"}),
                   ("--precision", {"choices": ["auto", *PRECISIONS], "default": "auto",
                                    "help": precision})],
        "model": [("--model", {"default": str(MODEL_DIR / MAIN_MODEL),
                               "help": "our CNN's model file"})],
        "weights": [("--weights", {"default": RESNET20_URL, "help": "ResNet-20 checkpoint path "
                                   "or URL (a URL is cached by torch.hub, sha256-checked)"})],
        "data": [("--data-dir", {"default": "data", "help": "folder holding "
                                 "cifar-10-batches-py/ (downloaded there when missing)"})],
        "records": [("--records-dir", {"default": str(RECORDS_DIR),
                                       "help": "where results are recorded for `report`"})]}


def add_train_options(p):
    """The options of `train` only."""
    p.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of a single run")
    p.add_argument("--seeds", type=NON_NEGATIVE, nargs="+",
                   help="train once per seed, report mean and std")
    p.add_argument("--preset", choices=list(PRESETS), default=DEFAULT_PRESET,
                   help="efficient: beats the pretrained ResNet-20 on accuracy, MACs and latency; "
                        "accurate: the last point of accuracy, for many times the MACs")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=POSITIVE, help="epochs per seed (default: the preset's, "
                        + ", ".join(f"{r.epochs} {name}" for name, r in PRESETS.items()) + ")")
    length.add_argument("--budget", type=budget_seconds,
                        metavar="SECONDS", help="instead of --epochs: as many epochs as fit in "
                        "SECONDS per seed here, evaluation included (measured on a few steps "
                        "first)")
    p.add_argument("--batch-size", type=POSITIVE, help="lr and weight decay scale with it "
                   "(default: " + ", ".join(f"{v['batch_size']} on a {k.upper()}"
                                            for k, v in DEVICE_DEFAULTS.items()) + ")")
    p.add_argument("--subset", type=NON_NEGATIVE, default=0,
                   help="use only the first N train and test images (0: all); such quick checks "
                        "save into model/subset/ unless --model-dir is given")
    p.add_argument("--model-dir", help="where the models, results.json and the plot go "
                                       "(default: model/, or model/subset/ with --subset)")
    p.add_argument("--restart", action="store_true",
                   help="discard saved progress and finished seeds of the same settings, and train "
                        "every seed from scratch (default: seeds already trained are kept, an "
                        "interrupted one resumes)")


def build_parser():
    parser = Parser(prog="CNNclassify.py", description=__doc__.split("\n\n")[0], epilog=HAND_IN)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=Parser)
    options = shared_options()

    def command(name, run, help, *shared):
        p = commands.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
        for flag, settings in (option for use in shared for option in options[use]):
            p.add_argument(flag, **settings)
        p.set_defaults(run=run)
        return p

    add_train_options(command("train", command_train,
                              "train the CNN on CIFAR-10 and save it in model/", "data", "device"))
    p = command("test", command_test, "classify images and save CONV_rslt.png", "model", "device")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, BMP, WebP, "
                   "TIFF, ...) or folders of them; bare names are also looked up in test_images/")
    p.add_argument("--out", help="where the conv-layer figure of a single image goes (.png, .jpg, "
                                 ".pdf, ...; default: CONV_rslt.png)")
    p.add_argument("--conv-dir", help="with several images: save each one's conv-layer figure in "
                                      "this folder (default: none, one line per image only)")
    p = command("evaluate", command_evaluate, "our CNN on the test set: accuracy per class and "
                "the confusion matrix", "model", "data", "records", "device")
    p.add_argument("--out", default=str(MODEL_DIR / "confusion.png"),
                   help="where the confusion-matrix picture goes")
    command("resnet20", command_resnet20, "test accuracy of a pretrained ResNet-20", "weights",
            "data", "records", "device")
    command("profile", command_profile, "MACs and parameters of both models (THOP)", "model",
            "weights", "records")
    p = command("speed", command_speed, "single-image inference time of both models", "model",
                "weights", "records", "device")
    p.add_argument("--warmup", type=NON_NEGATIVE, default=50, help="untimed iterations first")
    p.add_argument("--iterations", type=POSITIVE, default=1000, help="timed iterations")
    return parser


class Terminated(BaseException):
    """SIGTERM (kill, timeout, job schedulers), raised where the program is, like Ctrl-C."""


def raise_terminated(signum, frame):
    raise Terminated


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        args.run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C); files already saved are intact", file=sys.stderr)
        return 130
    except Terminated:
        print("terminated (SIGTERM); files already saved are intact", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


# ------------------------------------------------------------------------- machinery: number format

ONEDNN_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                            "AVX512_CORE_VNNI"}


def precision_name(dtype):
    return str(dtype).removeprefix("torch.")


def candidate_formats(device):
    """The formats worth timing here: float32; bfloat16 where the hardware computes it (CPU
    AVX512_BF16 or AMX, uncapped by ONEDNN_MAX_CPU_ISA; CUDA 8.0+); else float16 on CUDA."""
    if device.type == "cpu":
        capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in ONEDNN_ISAS_WITHOUT_BF16
        native = not capped and bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})
        return ["float32", "bfloat16"] if native else ["float32"]
    if device.type == "cuda":
        modern = torch.cuda.get_device_capability(device)[0] >= 8
        return ["float32", "bfloat16" if modern else "float16"]
    return ["float32"]


def format_cache_file():
    """Where `train` remembers measured choices, so a resumed run keeps its format."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "cnnclassify" / "number_formats.json"


def machine_key(device):
    """What decides which format is fastest: processor, flags, oneDNN cap, threads, torch, GPU."""
    key = {"cpu": cpu_name(), "cpu_flags": sorted(cpu_flags()), "threads": torch.get_num_threads(),
           "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
           "torch": torch.__version__, "device": device.type}
    if device.type == "cuda":
        key["gpu"] = torch.cuda.get_device_name(device)
        key["gpu_capability"] = list(torch.cuda.get_device_capability(device))
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def step_seconds_in(device, dtype, recipe, batch_size, warmup=1, steps=3):
    """Mean seconds of a training step in `dtype` here, on random images."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, len(CLASSES), (batch_size,), generator=generator)
    recipe = dataclasses.replace(recipe, epochs=1, batch_size=batch_size)
    run = Run((images, labels), 0, recipe, device, dtype)
    return seconds_per_step(run, [next(run.loader.epoch(0))] * (warmup + steps), warmup)


def choose_format(device, precision, measure):
    """`train`'s number format: --precision's; with auto, the only candidate, or the fastest by
    measure(dtype) -> seconds per step, remembered per machine. Returns the dtype and why."""
    if precision != "auto":
        return PRECISIONS[precision], f"--precision {precision}"
    candidates = candidate_formats(device)
    if len(candidates) == 1:
        only = candidates[0]
        return PRECISIONS[only], f"auto: {only}, the only format computed natively here"
    key, file = machine_key(device), format_cache_file()
    try:
        cache = json.loads(file.read_text())
    except (OSError, ValueError):
        cache = {}
    cache = cache if isinstance(cache, dict) else {}
    saved = cache.get(key) if isinstance(cache.get(key), dict) else {}
    if saved.get("precision") in candidates:
        best = saved["precision"]
        return PRECISIONS[best], f"auto: {best}, measured fastest here earlier ({file})"
    seconds = {name: measure(PRECISIONS[name]) for name in candidates}
    best = min(seconds, key=seconds.get)
    try:
        write_json(file, {**cache, key: {"precision": best, "seconds_per_step": seconds}})
    except UserError as error:
        log(f"note: the choice is not remembered ({error})")
    timings = ", ".join(f"{n} {1000 * t:.0f} ms" for n, t in seconds.items())
    return PRECISIONS[best], f"auto: {best}, measured fastest here ({timings} per step)"


def training_format(device, precision, recipe):
    """choose_format for `recipe`, timing steps of its batch size (at most 256)."""
    batch = min(recipe.batch_size, 256)
    measure = lambda dtype: step_seconds_in(device, dtype, recipe, batch)
    return choose_format(device, precision, measure)


# -------------------------------------------------------------------- machinery: device and machine

def pick_device(name=None):
    """The named device, checked to be present, or the fastest present: CUDA, Apple MPS, CPU."""
    mps = lambda: bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (cpu, cuda, cuda:N or mps)") from None
    present = {"cpu": lambda: True, "cuda": torch.cuda.is_available, "mps": mps}
    if not present.get(device.type, lambda: False)() or (
            device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"--device {name}: no such device on this machine")
    return device


def synchronize(device):
    """Wait for the device's queued work, so a clock reading means something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def cpuinfo_field(name):
    """A field of the first processor in /proc/cpuinfo ("" where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == name:
                return line.split(":", 1)[1].strip()
    return ""


def cpu_flags():
    return set(cpuinfo_field("flags").split())


def cpu_name():
    """The CPU's name with its family and model numbers (a virtual machine may hide the name)."""
    name = cpuinfo_field("model name") or platform.processor() or platform.machine()
    family, model = cpuinfo_field("cpu family"), cpuinfo_field("model")
    return f"{name} (family {family} model {model})" if family and model else name


def machine_description(device, dtype):
    """What ran a command, stored beside each result so numbers keep their context."""
    described = {"cpu": cpu_name(), "cpu_count": os.cpu_count(),
                 "torch_threads": torch.get_num_threads(), "device": str(device),
                 "torch": torch.__version__, "python": platform.python_version(),
                 "cpu_bfloat16_flags": sorted(cpu_flags() & {"avx512_bf16", "amx_bf16",
                                                             "amx_tile"}),
                 "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
                 "precision": precision_name(dtype)}
    if device.type == "cuda":
        described["gpu"] = torch.cuda.get_device_name(device)
        described["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    return described


def progress_bar(iterable, total, description):
    """A progress bar on stderr when a person watches it (a terminal); else the iterable."""
    return tqdm(iterable, total=total, desc=description, leave=False,
                disable=not sys.stderr.isatty())


# ----------------------------------------------------------------------------- machinery: files

def megabytes(count):
    return f"{count / 1e6:.1f} MB"


def nearest_existing(folder):
    """`folder` if it exists, else the nearest folder above it that does."""
    folder = Path(folder).absolute()
    return next(p for p in [folder, *folder.parents] if p.exists())


def ensure_writable(folder):
    """Prove, before any long work, that files can be written into `folder` (or, while it does
    not exist, into the nearest folder above, which can create it)."""
    try:
        existing = nearest_existing(folder)
        if not existing.is_dir():
            raise NotADirectoryError(0, f"{existing} is not a folder")
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as error:
        raise UserError(f"cannot write into {Path(folder).absolute()} "
                        f"({error.strerror or first_line(error)})") from None


def ensure_space(folder, needed):
    """Refuse before training when `folder` has less than `needed` bytes free."""
    free = shutil.disk_usage(nearest_existing(folder)).free
    if free < needed:
        raise UserError(f"not enough space in {Path(folder).absolute()}: {megabytes(needed)} "
                        f"needed for the models, results and plot, {megabytes(free)} free; free "
                        "some space or pass --model-dir")


def write_atomically(path, write):
    """write(tmp_path), flushed to disk, then renamed over path: a crash leaves the old file or
    the new one, never half a file; a failure is a UserError and keeps the old file."""
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as written:
            os.fsync(written.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make results private
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch's zip writer reports ENOSPC as RuntimeError
        if tmp is None:
            raise UserError(f"cannot write into {path.parent} "
                            f"({getattr(error, 'strerror', None) or first_line(error)})") from None
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        with contextlib.suppress(OSError):
            os.remove(tmp)  # before measuring what is free
        raise UserError(f"could not write {path.name} into {path.parent} "
                        f"({megabytes(shutil.disk_usage(path.parent).free)} free, "
                        f"{megabytes(written)} written before it failed: {first_line(error)}); "
                        "free some space or choose another folder; the previous file is kept"
                        ) from None
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, data):
    write_atomically(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def pyplot():
    """matplotlib.pyplot drawing off-screen (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, **options):
    """savefig into `path` atomically, then free the figure."""
    write_atomically(path, lambda tmp: fig.savefig(tmp, **{"format": "png", **options}))
    pyplot().close(fig)


def invocation(args):
    return "python CNNclassify.py " + shlex.join(args.argv)


def save_record(args, name, lines, data, device, dtype):
    """Keep what a command printed, its numbers, the command and the machine, for the report."""
    write_json(Path(args.records_dir) / f"{name}.json",
               {"command": invocation(args), "machine": machine_description(device, dtype),
                "output": lines, **data})


def load_torch_file(path, missing_message):
    """torch.load(weights_only=True) of a local file: tensors and plain data, never code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(missing_message)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # torch's advice to retry unsafely is not repeated
        if "Unsupported global" in str(error):
            raise UserError(f"{path}: holds objects other than tensors and plain data; refused, "
                            "since loading it would run code") from None
        detail = first_line(str(error).split("WeightsUnpickler error:")[-1])
        raise UserError(f"{path}: not a readable PyTorch file ({detail})") from None
    except Exception as error:
        raise UserError(f"{path}: not a readable PyTorch file ({first_line(error)})") from None


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextlib.contextmanager
def exclusive(folder):
    """Lock `folder` itself (no lock file left behind) while a run writes into it, so a second
    `train` into it is refused instead of mixing files. No lock where there is no fcntl."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another `train` is writing into {folder}; wait for it to end or "
                            "pass another --model-dir") from None
        yield
    finally:
        os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
