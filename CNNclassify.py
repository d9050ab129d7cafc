"""CNNclassify: train, test and measure a CIFAR-10 CNN from one script.

    python CNNclassify.py train [--seeds 0 1 2] [--preset efficient|accurate]
    python CNNclassify.py test IMAGE [IMAGE ...]     predicted class, CONV_rslt.png
    python CNNclassify.py resnet20 | profile | speed

It reads in the order of the assignment: settings, the model (conv1 first), train, test,
ResNet-20, MACs and parameters (THOP), inference_speed_test, the command line, then machinery.
The report and the zip to hand in are made by report/build.py beside it.
"""

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import itertools
import json
import os
import pickle
import platform
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

# ----------------------------------------------------------------------------- settings

ROOT = Path(__file__).resolve().parent
MODEL_DIR = ROOT / "model"
MAIN_MODEL = "cnn.pt"            # the model `test` loads: a copy of the first seed's
RESULTS_FILE = "results.json"    # every epoch of every seed, the command and the machine
LOG_FILE = "train_log.txt"       # what `train` printed on stdout
CONFUSION_FILE = "confusion.png"  # the first seed's confusion matrix
RECORDS_DIR = MODEL_DIR / "records"
TEST_FIGURE = "test_CONV_rslt.png"  # in RECORDS_DIR: the figure of the last recorded `test`
IMAGE_DIR = ROOT / "test_images"
os.environ.setdefault("MPLCONFIGDIR", str(ROOT / ".matplotlib"))  # its font cache: not in ~
CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST_FILE = "test_batch"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The training recipe (the efficient preset), after airbench94_muon and David Page's "How to
    train your ResNet"; the saved model is a moving average of the trained weights."""
    batch_size: int = 256
    epochs: int = 20
    widths: tuple = (32, 144, 144)  # channels of the three conv blocks after conv1
    views: int = 1                 # test-time views of the saved model (ViewAverage)
    lr_per_1024: float = 1.5       # SGD's peak lr is this x batch_size / 1024
    bias_lr_scale: float = 64.0    # BatchNorm biases learn this much faster
    momentum: float = 0.85
    decay_per_1024: float = 2e-3   # weight decay per step at peak lr, x batch_size / 1024
    warmup_fraction: float = 0.2   # lr rises from 0.2x to 1x over this share of steps
    label_smoothing: float = 0.2
    translate: int = 2             # random shift in pixels, reflect padding
    bn_momentum: float = 0.4
    logit_scale: float = 1 / 9     # a softmax temperature (airbench's): no early saturation
    average_decay: float = 0.98    # the saved weights: a moving average of the trained ones
    whitening_images: int = 5000   # conv1 is set from the 5x5 patches of this many images
    whitening_eps: float = 5e-4    # added to each patch variance: keeps noise from being blown up
    conv1_trained: bool = True     # set from the data, then trained (Muon, at its own norm)
    muon_lr_per_1024: float = 0.17  # Muon for the conv filters (0: SGD)
    muon_momentum: float = 0.6


# "efficient": a narrow net for many epochs, one view: fewer MACs than ResNet-20 and about its
# accuracy. "accurate": airbench's widths and six test-time views, the last point of accuracy.
PRESETS = {"efficient": Recipe(),
           "accurate": Recipe(widths=(64, 256, 256), epochs=8, views=6)}
DEFAULT_PRESET = "efficient"
RECIPE = PRESETS[DEFAULT_PRESET]
RECIPE_VERSION = 3  # bump when a change of the training code changes what a recipe trains
TRAIN_BATCH = {"cpu": 256, "gpu": 1024}  # what keeps each kind of device busy
PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def eval_batch(device):
    return 64 if device.type == "cpu" else 2000  # a CPU gains nothing from more, a GPU needs many


def recipe_for(device, batch_size=None, epochs=None, preset=DEFAULT_PRESET):
    """The preset's recipe with the batch size and epochs given, or the device kind's batch."""
    kind = "cpu" if device.type == "cpu" else "gpu"
    return dataclasses.replace(PRESETS[preset], batch_size=batch_size or TRAIN_BATCH[kind],
                               epochs=epochs or PRESETS[preset].epochs)


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit code 2, no traceback."""


def first_line(error):
    """An exception's message cut to its first line, for one-line errors."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def log(message):
    """Progress and notes go to stderr so stdout carries results only."""
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- the model

class CNN(nn.Module):
    """Our classifier: RGB in [0, 1], N x 3 x 32 x 32 -> logits; conv1 is the assignment's
    Conv2d(3, 32, 5); three conv blocks and a linear head follow, in `compute_dtype`."""

    def __init__(self, widths, bn_momentum, logit_scale, compute_dtype=torch.float32,
                 mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)):
        super().__init__()
        self.settings = {"widths": list(widths), "bn_momentum": bn_momentum,
                         "logit_scale": logit_scale}
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        # The assignment's first layer: 32 filters of 5x5 over the 3 colours, stride 1, no
        # padding (32x32 -> 28x28). Its weights are set from the data by set_whitening, then
        # trained with the other filters (Recipe.conv1_trained); its bias stays 0.
        self.conv1 = nn.Conv2d(3, 32, kernel_size=5, stride=1, padding=0)
        self.conv1.requires_grad_(False)
        channels = [self.conv1.out_channels, *widths]
        self.blocks = nn.Sequential(*[conv_block(cin, cout, bn_momentum)
                                      for cin, cout in zip(channels, widths)])
        self.head = nn.Linear(widths[-1], len(CLASSES), bias=False)
        self.logit_scale = logit_scale
        self.compute_dtype = compute_dtype

    def first_layer(self, x):
        """Normalised input through conv1: what CONV_rslt.png shows."""
        return self.conv1((x - self.mean) / self.std)

    def forward(self, x):
        # bfloat16/float16 where the hardware is fast at it; the loss is taken in float32
        autocast = self.compute_dtype != torch.float32
        with torch.autocast(x.device.type, dtype=self.compute_dtype, enabled=autocast):
            # conv1's filters come in +/- pairs, so GELU keeps both signs of each response
            features = self.blocks(F.gelu(self.first_layer(x)))
            # global max pool: "is the feature anywhere in the image", 3 x 3 -> 1 x 1
            logits = self.head(F.adaptive_max_pool2d(features, 1).flatten(1))
            return logits.float() * self.logit_scale


def conv_block(cin, cout, bn_momentum):
    """conv -> pool -> BN -> GELU -> conv -> BN -> GELU, halving the size; convs start as partial
    identities (airbench); BN learns a bias only (its scale is redundant before the next BN)."""
    convs = [nn.Conv2d(cin, cout, 3, padding=1, bias=False),
             nn.Conv2d(cout, cout, 3, padding=1, bias=False)]
    norms = [nn.BatchNorm2d(cout, momentum=bn_momentum, eps=1e-12) for _ in convs]
    with torch.no_grad():
        for conv in convs:
            nn.init.dirac_(conv.weight[:min(conv.in_channels, cout)])
    for bn in norms:
        bn.weight.requires_grad_(False)
    return nn.Sequential(convs[0], nn.MaxPool2d(2), norms[0], nn.GELU(), convs[1], norms[1],
                         nn.GELU())


@torch.no_grad()
def set_whitening(model, images, eps=5e-4):
    """conv1 from the data, each filter over the whole 5x5 kernel: 0-11 ZCA whitening of the 4
    centre pixels x 3 colours, 12-15 the strongest principal directions, 16-31 their negatives."""
    x = ((to_float(images) - model.mean) / model.std).double()
    k = model.conv1.kernel_size[0]
    patches = F.unfold(x, kernel_size=k).transpose(1, 2).reshape(-1, 3 * k * k)
    patches = patches - patches.mean(0)
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    # ZCA: every direction of the patches scaled to unit variance, then rotated back, so each
    # row is a filter centred on one pixel and colour that uses the whole 5x5 neighbourhood
    zca = eigenvectors @ torch.diag((eigenvalues + eps).rsqrt()) @ eigenvectors.T
    at = [(k // 2 + i) * k + k // 2 + j for i, j in [(0, 0), (0, 1), (1, 0), (1, 1)]]
    rows = zca[[c * k * k + a for c in range(3) for a in at]]  # index: channel, row, column
    strongest = (eigenvectors[:, -4:].flip(1) / (eigenvalues[-4:].flip(0) + eps).sqrt()).T
    top = torch.cat([rows, strongest])
    # unit variance for every output, so GELU sees inputs on one scale
    top = top / torch.einsum("ri,ij,rj->r", top, covariance, top).sqrt().unsqueeze(1)
    model.conv1.weight.copy_(torch.cat([top, -top]).view(-1, 3, k, k).float())
    model.conv1.bias.zero_()


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


def build_cnn(recipe=RECIPE, dtype=torch.float32, **normalisation):
    """A CNN of the recipe's widths in channels_last (the fast layout on CPUs)."""
    model = CNN(recipe.widths, recipe.bn_momentum, recipe.logit_scale, dtype, **normalisation)
    return model.to(memory_format=torch.channels_last)


def save_checkpoint(path, model, extra):
    """State dict plus what is needed to use it (constructor arguments, normalisation)."""
    checkpoint = {"state_dict": model.state_dict(), "settings": model.settings,
                  "classes": list(CLASSES), "mean": model.mean.flatten().tolist(),
                  "std": model.std.flatten().tolist(), **extra}
    write_atomically(path, lambda tmp: torch.save(checkpoint, tmp))


def load_cnn(path=None, device=torch.device("cpu"), dtype=torch.float32):
    """The trained CNN with its test-time views, in eval mode on `device`, computing in `dtype`."""
    path = Path(path or MODEL_DIR / MAIN_MODEL)
    checkpoint = load_torch_file(path, f"no trained model at {shown_path(path)}; "
                                       "run `python CNNclassify.py train` first")
    if not (isinstance(checkpoint, dict)
            and {"state_dict", "settings", "mean", "std"} <= checkpoint.keys()):
        raise UserError(f"{path}: not a model saved by `CNNclassify.py train`")
    try:
        model = CNN(**checkpoint["settings"], compute_dtype=dtype, mean=checkpoint["mean"],
                    std=checkpoint["std"])
        model.load_state_dict(checkpoint["state_dict"])
        views = ViewAverage(model.to(memory_format=torch.channels_last), checkpoint.get("views", 6))
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise UserError(f"{path}: its weights do not fit the CNN it describes "
                        f"({first_line(error)})") from None
    return views.to(device).eval()


# ----------------------------------------------------------------------------- train

def train(args):
    """`train`: a model per seed from scratch (--resume keeps seeds saved with these settings),
    results.json, the plots, train_log.txt, cnn.pt; stdout carries the epoch lines only."""
    model_dir = Path(args.model_dir or (MODEL_DIR / "subset" if args.subset else MODEL_DIR))
    if len(set(args.seeds)) != len(args.seeds):
        raise UserError(f"--seeds {' '.join(map(str, args.seeds))}: a seed is given twice")
    device = pick_device(args.device)
    data = take_subset(load_cifar(args.data_dir), args.subset)
    ensure_writable(model_dir)
    if args.batch_size and args.batch_size > len(data["train"][0]):
        raise UserError(f"--batch-size {args.batch_size} is larger than the "
                        f"{len(data['train'][0])} training images")
    recipe = recipe_for(device, args.batch_size, args.epochs, args.preset)
    dtype, why = training_format(device, args.precision)
    settings = {"recipe": dataclasses.asdict(recipe), "data": data_digest(data),
                "precision": precision_name(dtype), "device": device.type,
                "version": RECIPE_VERSION}  # a saved seed is reused only if all of these match
    saved = {seed: finished_seed(model_dir / f"cnn_seed{seed}.pt", settings) if args.resume
             else (None, "trained") for seed in args.seeds}
    extra = {"command": invocation(args), "machine": machine_description(device, dtype),
             "preset": args.preset, "subset": args.subset, "precision": precision_name(dtype),
             "precision_choice": why, "epochs": recipe.epochs, "batch_size": recipe.batch_size,
             "views": recipe.views, "recipe": settings["recipe"], "estimated_seconds": None,
             "seed_status": {str(seed): note for seed, (_, note) in saved.items()}}
    torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN pick its fastest kernels
    epochs_left = recipe.epochs * sum(saved[seed][0] is None for seed in args.seeds)
    label = f"{args.preset}, {precision_name(dtype)}"  # the progress bar's prefix
    printed, runs = [], []

    def say(line):  # stdout, and the same line into train_log.txt
        print(line, flush=True)
        printed.append(line)

    def on_epoch(seed, row):
        nonlocal label
        say(epoch_line(seed, row, recipe.epochs))
        if extra["estimated_seconds"] is None:  # the first epoch trained times the whole run
            extra["estimated_seconds"] = round(row["seconds"] * epochs_left)
            label += f", about {extra['estimated_seconds'] / 60:.0f} min in all"

    for seed in args.seeds:
        kept = saved[seed][0]
        if kept:
            history, seconds = kept["history"], kept["train_seconds"]
            for row in history:
                say(epoch_line(seed, row, recipe.epochs))
        else:
            model, history, seconds = train_seed(data, seed, recipe, device, dtype,
                                                 lambda row: on_epoch(seed, row), lambda: label)
            save_checkpoint(model_dir / f"cnn_seed{seed}.pt", model,
                            {"seed": seed, "views": recipe.views, "history": history,
                             "train_seconds": seconds, "run_settings": settings,
                             "precision": precision_name(dtype)})
        path = model_dir / f"cnn_seed{seed}.pt"
        runs.append({"seed": seed, "model": path.name, "model_sha256": sha256_of(path),
                     "test_accuracy": history[-1]["test_accuracy"], "train_seconds": seconds,
                     **class_results(history[-1]), "history": history})
        results = save_results(model_dir, runs, extra, printed)
    for line in seed_table(results):
        say(line)
    write_text(model_dir / LOG_FILE, "\n".join(printed) + "\n")


def finished_seed(path, settings):
    """--resume: (the seed's checkpoint, "kept") if it was trained with these settings, else
    (None, why it is trained again), for results.json."""
    if not path.is_file():
        return None, "trained (none saved)"
    try:
        saved = load_torch_file(path, "")
    except UserError as error:
        return None, f"trained again (saved file unreadable: {first_line(error)})"
    if isinstance(saved, dict) and saved.get("run_settings") == settings:
        return saved, "kept (--resume: saved with these settings)"

    def fields(run_settings):  # the settings, the recipe's fields one by one
        run_settings = run_settings if isinstance(run_settings, dict) else {}
        recipe = run_settings.get("recipe")
        return {**run_settings, **(recipe if isinstance(recipe, dict) else {}), "recipe": None}

    old = fields(saved.get("run_settings") if isinstance(saved, dict) else None)
    names = [k for k, v in fields(settings).items() if old.get(k) != v]
    return None, f"trained again (saved with other settings: {', '.join(names)})"


def class_results(row):
    """Where the model errs: the last evaluation's confusion matrix (rows: true class, columns:
    predicted) and each class's accuracy, by name."""
    matrix = row.get("confusion_matrix")
    if matrix is None:
        return {}
    return {"confusion_matrix": matrix,
            "per_class_accuracy": {name: 100.0 * matrix[i][i] / max(1, sum(matrix[i]))
                                   for i, name in enumerate(CLASSES)}}


def set_seed(seed):
    """Seed every generator the training touches by hand: Python, NumPy and PyTorch (the
    Loader's own generator, for data order and augmentation, takes the same seed)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_seed(data, seed, recipe, device, dtype, on_epoch=None, label=lambda: ""):
    """One model: its moving average (CPU), the history (a row per epoch, to on_epoch too; the
    last holds the confusion matrix) and the seconds. label(): the progress bar's prefix."""
    set_seed(seed)
    images, labels = data["train"]
    pixels = to_float(images).transpose(0, 1).reshape(3, -1)
    model = build_cnn(recipe, dtype, mean=pixels.mean(1).tolist(), std=pixels.std(1).tolist())
    set_whitening(model, images[:recipe.whitening_images], recipe.whitening_eps)
    model.conv1.weight.requires_grad_(recipe.conv1_trained)
    model.to(device)
    optimizers = make_optimizers(model, recipe, torch.float32 if dtype == torch.float16 else dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # float16 only
    loader = Loader(images, labels, recipe.batch_size, recipe.translate, seed, device)
    average = copy.deepcopy(model).requires_grad_(False)
    test_x, test_y = (t.to(device) for t in data["test"])
    step, total_steps, history, seconds = 0, recipe.epochs * len(loader), [], 0.0
    for epoch in range(recipe.epochs):
        start = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # kept on the device:
        correct = torch.zeros((), dtype=torch.int64, device=device)     # no sync in the epoch
        batches = progress_bar(loader.epoch(epoch), len(loader),
                               f"{label()} | seed {seed} epoch {epoch + 1}/{recipe.epochs}")
        for x, y in batches:
            logits = model(x)
            # label smoothing: the targets keep 20% spread over all classes, so the net is not
            # pushed to ever larger logits on images it already gets right
            loss = F.cross_entropy(logits, y, label_smoothing=recipe.label_smoothing)
            model.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            # every group follows one schedule: warm-up, then a straight line down to 0
            factor = lr_factor(step, total_steps, recipe.warmup_fraction)
            for optimizer in optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = group["peak_lr"] * factor
                scaler.step(optimizer)
            scaler.update()
            step += 1
            # the saved model is this average of the weights: better than the last ones
            update_average(average, model, step, recipe.average_decay)
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.argmax(1) == y).sum()
        synchronize(device)
        train_seconds = time.perf_counter() - start
        views = recipe.views if epoch == recipe.epochs - 1 else min(2, recipe.views)  # curve only
        test_loss, right, confusion = evaluate(ViewAverage(average, views), test_x, test_y,
                                               eval_batch(device))
        seconds += time.perf_counter() - start
        row = {"epoch": epoch + 1, "train_loss": loss_sum.item() / len(images),
               "train_accuracy": 100.0 * int(correct) / len(images), "test_loss": test_loss,
               "test_accuracy": 100.0 * right / len(test_x), "seconds": seconds,
               "images_per_second": len(images) / train_seconds, "test_views": views}
        if epoch == recipe.epochs - 1:
            row["confusion_matrix"] = confusion.tolist()
        history.append(row)
        check_progress(seed, row, step, recipe)
        if on_epoch:
            on_epoch(row)
    return average.cpu(), history, seconds


def check_progress(seed, row, steps, recipe):
    """Stop a failed run before its model is saved: a loss not finite or exploded (always
    guessing costs ln 10), or test accuracy under 15% after 100 steps."""
    losses = (row["train_loss"], row["test_loss"])
    if not (all(map(np.isfinite, losses)) and row["test_loss"] < 10 * np.log(len(CLASSES))):
        what = f"the loss diverged (train {losses[0]:.4g}, test {losses[1]:.4g})"
    elif steps >= 100 and row["test_accuracy"] < 15:
        what = f"test accuracy is still at chance ({row['test_accuracy']:.2f}%) after {steps} steps"
    else:
        return
    raise UserError(f"seed {seed} epoch {row['epoch']}: {what}; likely cause: the learning "
                    f"rate, which grows with --batch-size (batch {recipe.batch_size}: peak lr "
                    f"{peak_lr(recipe):.3g}); try a smaller --batch-size. This seed's model was "
                    "not saved")


def make_optimizers(model, recipe, dtype=torch.float32):
    """Nesterov SGD for BN biases and the head, Muon for the conv filters; each group keeps its
    peak lr (lr_factor scales it)."""
    trained = [p for p in model.parameters() if p.requires_grad]
    filters = [p for p in trained if p.ndim == 4] if recipe.muon_lr_per_1024 else []
    biases = [p for p in trained if p.ndim == 1]
    others = [p for p in trained if p.ndim == 2 or (p.ndim == 4 and not filters)]
    scale = recipe.batch_size / 1024
    lr, decay = peak_lr(recipe), recipe.decay_per_1024 * scale
    # BN biases are few and shift whole channels: 64x the lr moves them as fast as the filters.
    # Weight decay is given divided by the lr because SGD multiplies it by the lr: the decay
    # per step is then `decay` at peak lr, whatever each group's lr.
    bias_lr = lr * recipe.bias_lr_scale
    groups = [{"params": biases, "lr": bias_lr, "weight_decay": decay / bias_lr},
              {"params": others, "lr": lr, "weight_decay": decay / lr}]
    optimizers = [torch.optim.SGD(groups, momentum=recipe.momentum, nesterov=True)]
    if filters:
        # an orthogonalised update has a fixed size, so its lr grows with sqrt(batch), not batch
        muon_lr = recipe.muon_lr_per_1024 * scale ** 0.5
        conv1 = [p for p in filters if p is model.conv1.weight]  # keeps its scale from the data
        groups = [{"params": [p for p in filters if p is not model.conv1.weight]}]
        groups += [{"params": conv1, "own_norm": True}] if conv1 else []
        optimizers.append(Muon(groups, muon_lr, recipe.muon_momentum, dtype))
    for group in (g for optimizer in optimizers for g in optimizer.param_groups):
        group["peak_lr"] = group["lr"]
    return optimizers


def peak_lr(recipe):
    """SGD's peak lr grows with the batch (airbench), so --batch-size alone keeps the
    per-example step and the decay per epoch."""
    return recipe.lr_per_1024 * (recipe.batch_size / 1024)


def lr_factor(step, total_steps, warmup_fraction):
    """Linear warm-up from 0.2 to 1, then linear decay to 0 (any number of steps, even 1)."""
    warmup = int(warmup_fraction * total_steps)
    if step < warmup:
        return 0.2 + 0.8 * step / warmup
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup))


class Muon(torch.optim.Optimizer):
    """Muon (Keller Jordan, 2024) for conv filters: orthogonalised Nesterov updates at a fixed
    weight norm, so lr sets an angle. `dtype`: the format of the Newton-Schulz matmuls."""

    def __init__(self, params, lr, momentum, dtype=torch.float32):
        super().__init__(params, {"lr": lr, "momentum": momentum, "own_norm": False})
        self.dtype = dtype

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                # Nesterov momentum: the step looks ahead along the running average
                buffer = self.state[p].setdefault("momentum", torch.zeros_like(p.grad))
                buffer.mul_(group["momentum"]).add_(p.grad)
                gradient = p.grad.add(buffer, alpha=group["momentum"])
                # each filter bank as a matrix (out x in*k*k), its singular values set to ~1:
                # rare directions of the gradient move as fast as common ones
                update = orthogonalize(gradient.reshape(len(p), -1).to(self.dtype)).view(p.shape)
                # the norm is held fixed (sqrt(out channels), or a trained conv1's own from the
                # data), so weight decay is not needed and lr alone sets how far each step turns
                norm = self.state[p].setdefault("norm", p.norm() if group["own_norm"]
                                                else len(p) ** 0.5)
                p.mul_(norm / p.norm())
                p.add_(update.to(p.dtype), alpha=-group["lr"])


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


@torch.no_grad()
def update_average(average, model, step, decay):
    """Move `average` towards `model` (weights, BatchNorm statistics), the decay ramping up as
    TensorFlow's ExponentialMovingAverage does: the average is a much better model (Polyak)."""
    weight = 1 - min(decay, (1 + step) / (10 + step))
    pairs = [(a, m) for a, m in zip(list(average.parameters()) + list(average.buffers()),
                                    list(model.parameters()) + list(model.buffers()))
             if a.is_floating_point()]
    torch._foreach_lerp_([a for a, _ in pairs], [m for _, m in pairs], weight)


class Loader:
    """The training set on the device, augmented there a batch at a time; one CPU generator
    draws every random number (same batches on every device); flips alternate per epoch."""

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
            batch = to_float(self.images[index])
            batch = torch.where(flips.view(-1, 1, 1, 1), batch.flip(-1), batch)
            batch = translate(batch, offsets[:, start:start + self.batch_size], self.shift)
            yield batch.contiguous(memory_format=torch.channels_last), self.labels[index]


def to_float(images):
    """uint8 N x 3 x H x W -> float in [0, 1], the input every model here takes."""
    return images.float().div_(255)


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


@torch.no_grad()
def evaluate(model, images, labels, batch_size):
    """Mean loss, number right and confusion matrix (rows: true class) on uint8 images on the
    model's device; the host waits for the device once, at the end."""
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=images.device)
    counts = torch.zeros(len(CLASSES) ** 2, dtype=torch.int64, device=images.device)
    for start in progress_bar(range(0, len(images), batch_size), None, "evaluating"):
        x = to_float(images[start:start + batch_size]).contiguous(memory_format=torch.channels_last)
        y = labels[start:start + batch_size]
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum")
        counts += torch.bincount(y * len(CLASSES) + logits.argmax(1), minlength=len(CLASSES) ** 2)
    confusion = counts.view(len(CLASSES), len(CLASSES)).cpu()
    return loss.item() / len(images), int(confusion.trace()), confusion


def epoch_line(seed, row, epochs):
    """The line `train` prints after each epoch."""
    return (f"seed {seed} epoch {row['epoch']:2d}/{epochs}  train loss {row['train_loss']:.4f}"
            f"  train acc {row['train_accuracy']:6.2f}%  test loss {row['test_loss']:.4f}"
            f"  test acc {row['test_accuracy']:6.2f}%  {row['seconds']:6.1f}s")


def seed_table(results):
    """The table `train` ends with: seed -> final test accuracy, then mean and numpy.std."""
    lines = ["seed  test accuracy (%)  train seconds"]
    lines += [f"{run['seed']:4d}  {run['test_accuracy']:17.2f}  {run['train_seconds']:13.1f}"
              for run in results["runs"]]
    lines.append(f"mean {results['mean']:.2f}%  std {results['std']:.2f} "
                 f"(numpy.std over {len(results['runs'])} seeds)")
    return lines


def save_results(model_dir, runs, extra, printed):
    """cnn.pt (the first seed's model), results.json, the plot and the log so far, rewritten as
    each seed ends, so an interrupted run leaves files that agree with each other."""
    first = runs[0]
    write_atomically(model_dir / MAIN_MODEL,
                     lambda tmp: shutil.copyfile(model_dir / first["model"], tmp))
    accuracies = np.array([run["test_accuracy"] for run in runs])
    results = {**extra, "main_model": MAIN_MODEL, "main_model_sha256": first["model_sha256"],
               "main_seed": first["seed"], "runs": runs, "mean": float(accuracies.mean()),
               "std": float(np.std(accuracies))}
    write_json(model_dir / RESULTS_FILE, results)
    plot_accuracy(runs, model_dir / "accuracy.png")
    if "confusion_matrix" in first:
        plot_confusion(first, model_dir / CONFUSION_FILE)
    write_text(model_dir / LOG_FILE, "\n".join(printed) + "\n")
    return results


def plot_accuracy(runs, path):
    """The one plot: train and test accuracy per epoch, mean over seeds with a min-max band."""
    from matplotlib.ticker import MaxNLocator
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    six = runs[0]["history"][-1].get("test_views") == 6
    test = "test" + (" (mirror TTA; last epoch 6 views)" if six else "")
    for key, label, colour in [("train_accuracy", "train (augmented batches, while learning)",
                                "tab:blue"), ("test_accuracy", test, "tab:orange")]:
        curves = np.array([[h[key] for h in run["history"]] for run in runs])
        epochs = np.arange(1, curves.shape[1] + 1)
        ax.plot(epochs, curves.mean(0), marker="o", color=colour, label=label)
        if len(runs) > 1:
            ax.fill_between(epochs, curves.min(0), curves.max(0), color=colour, alpha=0.2)
    seeds = ", ".join(str(run["seed"]) for run in runs)
    band = "; mean, band = min-max)" if len(runs) > 1 else ")"
    ax.set(xlabel="epoch", ylabel="accuracy (%)",
           title=f"CIFAR-10 accuracy per epoch (seeds {seeds}{band}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def plot_confusion(run, path):
    """The main seed's confusion matrix as a picture: true class down, predicted across."""
    matrix = np.array(run["confusion_matrix"])
    fig, ax = pyplot().subplots(figsize=(7, 6))
    ax.imshow(matrix / matrix.sum(1, keepdims=True).clip(1), cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center", fontsize=8,
                color="white" if i == j else "black")
    ticks = np.arange(len(CLASSES))
    ax.set_xticks(ticks, CLASSES, rotation=45, ha="right")
    ax.set_yticks(ticks, CLASSES)
    ax.set(xlabel="predicted class", ylabel="true class",
           title=f"seed {run['seed']} ({run['model']}): test images by true and predicted class")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)


def data_digest(data):
    """A hash of the images and labels trained and tested on: a saved seed of other data is
    not reused."""
    digest = hashlib.blake2b(digest_size=16)
    for images, labels in data.values():
        digest.update(images.numpy().data)
        digest.update(labels.numpy().data)
    return digest.hexdigest()


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
    if not all((folder / name).is_file() for name in names):
        from torchvision.datasets.utils import download_and_extract_archive
        try:  # torchvision prints "Downloading ..." on stdout: kept off it (results only)
            with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
                download_and_extract_archive(url or CIFAR_URL, str(data_dir), md5=md5 or CIFAR_MD5)
        except Exception as error:  # network down, bad checksum, bad archive: all one message
            raise UserError(f"could not get CIFAR-10 ({type(error).__name__}: "
                            f"{first_line(error)}); put the '{CIFAR_FOLDER}' folder inside "
                            f"{data_dir} or pass --data-dir") from None


def load_cifar(data_dir, url=None, md5=None, parts=("train", "test")):
    """The dataset as uint8 tensors, read once: {"train": (x, y), "test": (x, y)}."""
    ensure_cifar(data_dir, url, md5)
    folder = Path(data_dir) / CIFAR_FOLDER
    files = {"train": CIFAR_TRAIN_FILES, "test": [CIFAR_TEST_FILE]}
    data = {}
    for part in parts:
        batches = [read_cifar_batch(folder / name) for name in files[part]]
        data[part] = (torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    return data


def take_subset(data, subset):
    """The first `subset` train and test images (all with 0), for quick checks."""
    return {part: (x[:subset], y[:subset]) if subset else (x, y) for part, (x, y) in data.items()}


# ----------------------------------------------------------------------------- test IMAGE

MAX_IMAGE_PIXELS = 100_000_000  # larger images are refused by OpenCV before decoding
LARGEST_SIDE_KEPT = 1024        # larger images are shrunk right after decoding


def test(args):
    """`test IMAGE`: the predicted class and CONV_rslt.png (conv1's 32 maps), kept for the report
    only with --record. Several images: one line each; a bad one is one stderr line."""
    if len(args.images) > 1 and args.out:
        raise UserError("--out names the figure of one image; give one image with it")
    out = args.out or "CONV_rslt.png"
    if len(args.images) == 1:
        figure_format(out)
    device = pick_device(args.device)
    dtype = inference_format(device, args.precision)
    model = load_cnn(args.model, device, dtype)
    if len(args.images) == 1:
        lines, figure, _ = classify_image(args.images[0], model, args.top)
        print("\n".join(lines), flush=True)
        draw_conv_maps(*figure, out)
        if not args.record:
            return
        image = resolve_image_path(args.images[0])
        write_atomically(Path(args.records_dir) / TEST_FIGURE,
                         lambda tmp: shutil.copyfile(out, tmp))
        return save_record(args, "test", lines, {
            **model_identity(args.model), "image": shown_path(image),
            "image_sha256": sha256_of(image), "figure": shown_path(out),
            "figure_sha256": sha256_of(out), "figure_copy": TEST_FIGURE}, device, dtype)
    failed = 0
    for name in args.images:
        try:
            _, _, probabilities = classify_image(name, model)
        except UserError as error:
            log(f"error: {error}")
            failed += 1
            continue
        print(f"{name}  {CLASSES[probabilities.argmax()]}  {100 * probabilities.max():.2f}%",
              flush=True)
    if failed:
        raise UserError(f"{failed} of {len(args.images)} images could not be read (named above)")


def classify_image(name, model, top=0):
    """The lines `test` prints (with the `top` likeliest classes), draw_conv_maps's arguments but
    the path, and the class probabilities."""
    path = resolve_image_path(name)
    rgb = read_image(path)
    x = image_to_input(rgb)
    probabilities, maps = predict(model, x)
    title = (f"{path.name}: first conv layer (5x5, 32 filters), 28x28 outputs; "
             f"predicted {CLASSES[probabilities.argmax()]}")
    return prediction_lines(probabilities, top), (rgb, x, maps, title), probabilities


def resolve_image_path(name):
    """A bare file name missing from the working directory is looked up in test_images/."""
    path = Path(name)
    if not path.exists() and path.parent == Path(".") and (IMAGE_DIR / path).exists():
        return IMAGE_DIR / path
    return path


def read_image(path):
    """Any image file OpenCV reads -> uint8 RGB H x W x 3 (grey to three channels, alpha on
    white, 16-bit and float to 8 bits, EXIF orientation applied), or a UserError."""
    os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(MAX_IMAGE_PIXELS))  # read once
    import cv2
    path = Path(path)
    if path.is_dir() or not path.is_file():
        raise UserError(f"{path}: " + ("is a directory, not an image" if path.is_dir()
                                       else "no such file"))
    try:
        data = np.fromfile(path, dtype=np.uint8)
        if data.size == 0:
            raise UserError(f"{path}: empty file")
        image = quiet_imdecode(data, cv2.IMREAD_UNCHANGED)
        if image is not None and (image.ndim == 2 or image.shape[2] in (1, 3)):
            image = quiet_imdecode(data, cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH)  # EXIF-rotated
    except (OSError, cv2.error) as error:
        too_large = "CV_IO_MAX_IMAGE_PIXELS" in str(error)
        raise UserError(f"{path}: " + (f"over {MAX_IMAGE_PIXELS // 10**6} megapixels, too large "
                        "to decode here; shrink it first" if too_large else
                        f"cannot be read ({first_line(error)})")) from None
    if image is None or image.size == 0:
        raise UserError(f"{path}: not an image OpenCV can read (unknown format, corrupt data or "
                        f"over {MAX_IMAGE_PIXELS // 10**6} megapixels)")
    return to_rgb8(shrink_to(image, LARGEST_SIDE_KEPT))


def quiet_imdecode(data, flags):
    """cv2.imdecode with the C decoders' own words (libpng prints its errors) kept off stderr,
    so a bad image is one line of ours."""
    import cv2
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        return cv2.imdecode(data, flags)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


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


def image_to_input(rgb):
    """uint8 RGB of any size -> 1 x 3 x 32 x 32 floats in [0, 1]: the whole picture resized (the
    object may be off-centre), averaging pixels when shrinking, bicubic when enlarging."""
    import cv2
    how = cv2.INTER_AREA if min(rgb.shape[:2]) >= 32 else cv2.INTER_CUBIC
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


def prediction_lines(probabilities, top=0):
    """`prediction result: <class>` (the assignment's line), then the `top` likeliest classes."""
    lines = [f"prediction result: {CLASSES[probabilities.argmax()]}"]
    best = probabilities.topk(min(top, len(CLASSES)))
    lines += [f"  {rank}. {CLASSES[i]:<10s} {100 * p:6.2f}%"
              for rank, (p, i) in enumerate(zip(best.values.tolist(), best.indices.tolist()), 1)]
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


# ----------------------------------------------------------------------------- ResNet-20

RESNET20_URL = ("https://github.com/akamaster/pytorch_resnet_cifar10/raw/master/"
                "pretrained_models/resnet20-12fca82f.th")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
COURSE_RESNET20 = MODEL_DIR / "resnet20_cifar10_pretrained.pt"  # handed out with the assignment


def resnet20(args):
    """`resnet20`: accuracy of a pretrained ResNet-20 on the 10,000 test images."""
    device = pick_device(args.device)
    model, weights = load_resnet20(args.weights)
    images, labels = load_cifar(args.data_dir, parts=("test",))["test"]
    correct = evaluate(model.to(device), images.to(device), labels.to(device),
                       eval_batch(device))[1]
    total = len(labels)
    line = f"ResNet-20 test accuracy: {100 * correct / total:.2f}% ({correct}/{total})"
    print(line)
    save_record(args, "resnet20", [line],
                {**weights, "correct": correct, "total": total, "accuracy": 100 * correct / total},
                device, torch.float32)


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


def load_resnet20(source=RESNET20_URL):
    """ResNet-20 in eval mode (layout from the keys, loaded strictly) and {"weights",
    "weights_sha256", "option"}. A URL is cached by torch.hub, sha256 checked by its name."""
    path = Path(source)
    if "://" in source:
        path = Path(torch.hub.get_dir()) / "checkpoints" / source.rsplit("/", 1)[-1]
        prefix = torch.hub.HASH_REGEX.search(path.name).group(1)
        if path.is_file() and not sha256_of(path).startswith(prefix):  # hub checks downloads only
            raise UserError(f"{path}: its sha256 does not start with {prefix} as its name says "
                            "(changed or damaged); delete it to download it again")
        try:
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(source, str(path), prefix,
                                               progress=sys.stderr.isatty())
        except Exception as error:
            raise UserError(f"checksum mismatch: the file downloaded from {source} does not have "
                            "the sha256 its name gives; nothing was saved" if "invalid hash"
                            in str(error) else f"could not fetch ResNet-20 weights "
                            f"({type(error).__name__}: {first_line(error)}); download {source} "
                            f"into {path} or pass --weights PATH") from None
    checkpoint = load_torch_file(path, f"{source}: no such weights file")
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else {}
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
    return model.eval(), {"weights": path.name, "weights_sha256": sha256_of(path),
                          "option": model.option}


# ----------------------------------------------------------------- costs (THOP) and inference speed

LAYOUTS = {"channels_last": torch.channels_last, "NCHW": torch.contiguous_format}  # for `speed`
SPEED_TURNS = 5

def command_profile(args):
    """`profile`: MACs and parameters of our CNN and ResNet-20 (THOP)."""
    cnn = load_cnn(args.model)
    resnet, weights = load_resnet20(args.weights)
    rows, lines = cost_table(cnn, resnet)
    print("\n".join(lines))
    save_record(args, "profile", lines, {**model_identity(args.model), **weights, "models": [
        {"name": n, "macs": m, "params": p} for n, m, p in rows]}, torch.device("cpu"),
        torch.float32)


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
    lines.append(f"ours / ResNet-20, as shipped: {rows[0][1] / rows[-1][1]:.2f}x the MACs, "
                 f"{rows[0][2] / rows[-1][2]:.2f}x the parameters")
    return rows, lines


def inference_speed_test(args):
    """`speed`: batch-1 time of both models, each shown in its faster memory layout (the ratio
    compares architectures); printed, returned, recorded when args has records_dir."""
    device = pick_device(args.device)
    dtype = inference_format(device, args.precision)
    cnn = load_cnn(args.model, device, dtype)
    resnet, weights = load_resnet20(args.weights)
    models = [("CNN (ours)", cnn)] + ([("CNN, one view", cnn.cnn)] if cnn.views > 1 else [])
    models.append(("ResNet-20", resnet.to(device)))
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    times = {(name, layout): [] for name, _ in models for layout in LAYOUTS}
    # turns of a share of the iterations each: a slow stretch of the machine falls on all alike
    for turn, share in enumerate(np.array_split(np.arange(args.iterations), SPEED_TURNS)):
        for (name, model), (layout, form) in itertools.product(models, LAYOUTS.items()):
            warmup = min(args.warmup, 5) if turn else args.warmup  # weights, input: one layout
            times[name, layout].append(time_inference(
                model.to(memory_format=form), x.contiguous(memory_format=form), warmup, len(share)))
    results = []
    for name, _ in models:
        ms = {layout: 1000 * np.concatenate(times[name, layout]) for layout in LAYOUTS}
        layouts = {layout: {"mean_ms": float(t.mean()), "median_ms": float(np.median(t)),
                            "p95_ms": float(np.percentile(t, 95))} for layout, t in ms.items()}
        faster = min(layouts, key=lambda layout: layouts[layout]["mean_ms"])
        results.append({"name": name, "layout": faster, **layouts[faster], "layouts": layouts})
    lines = [f"{'model':<14s} {'layout':<14s} {'mean ms':>8s} {'median ms':>10s} {'p95 ms':>8s}"]
    lines += [f"{m['name']:<14s} {m['layout']:<14s} {m['mean_ms']:8.3f} {m['median_ms']:10.3f} "
              f"{m['p95_ms']:8.3f}" for m in results]
    lines += [f"{m['name']} / ResNet-20: {m['mean_ms'] / results[-1]['mean_ms']:.2f}x the time "
              "(mean, each model in its faster layout)" for m in results[:-1]]
    print("\n".join(lines))
    result = {"models": results, "device": str(device), "views": cnn.views,
              "precision": precision_name(dtype), "threads": torch.get_num_threads(),
              "warmup": args.warmup, "iterations": args.iterations, "turns": SPEED_TURNS, **weights}
    if getattr(args, "records_dir", None):
        save_record(args, "speed", lines, {**model_identity(args.model), **result}, device, dtype)
    return {**result, "lines": lines}


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


# ----------------------------------------------------------------------------- command line

class Parser(argparse.ArgumentParser):
    """argparse, with a bad option reported as one line (exit 2) like every other error."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message}\n")


def int_from(low):
    """An argparse type: an integer of at least `low`."""
    def parse(text):
        if int(text) < low:
            raise argparse.ArgumentTypeError(f"must be {low} or more, not {int(text)}")
        return int(text)
    parse.__name__ = "int"  # argparse names it when the text is no number: "invalid int value"
    return parse


def build_parser():
    """The commands and their options; options shared by several commands are declared once."""
    def options(*flags_and_settings):
        p = Parser(add_help=False)
        for flag, settings in flags_and_settings:
            p.add_argument(flag, **settings)
        return p

    precision = ("number format after conv1; auto: train in bfloat16 where the hardware computes "
                 "it natively (CPU with AMX, AMD CPU with AVX512_BF16, CUDA 8.0+), else float32 "
                 "(float16 on older CUDA); test and speed (batch 1) in float32")
    device = options(("--device", {"help": "cpu, cuda, cuda:N or mps (default: the fastest "
                                            "present)"}),
                     ("--precision", {"choices": ["auto", *PRECISIONS], "default": "auto",
                                      "help": precision}))
    model = options(("--model", {"default": str(MODEL_DIR / MAIN_MODEL),
                                 "help": "our CNN's model file"}))
    weights = options(("--weights", {"default": str(COURSE_RESNET20) if COURSE_RESNET20.is_file()
                                     else RESNET20_URL, "help": "ResNet-20 checkpoint "
                                     "path or URL (a URL is cached by torch.hub, sha256-checked); "
                                     f"default: {shown_path(COURSE_RESNET20)} when it is there, "
                                     "else the published option-A file"}))
    data = options(("--data-dir", {"default": "data", "help": "folder holding "
                                   "cifar-10-batches-py/ (downloaded there when missing)"}))
    records = options(("--records-dir", {"default": str(RECORDS_DIR),
                                         "help": "where results are recorded for the report"}))
    parser = Parser(prog="CNNclassify.py", description=__doc__.split("\n\n")[0],
                    epilog="The report and the zip to hand in: python report/build.py --help")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=Parser)

    def command(name, run, help, *parents):
        p = commands.add_parser(name, help=help, description=help, parents=parents,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        p.set_defaults(run=run)
        return p

    p = command("train", train, "train the CNN on CIFAR-10 and save it in model/", data,
                device)
    p.add_argument("--seeds", type=int_from(0), nargs="+", default=[0, 1, 2],
                   help="one model per seed; mean and numpy.std over them")
    p.add_argument("--preset", choices=list(PRESETS), default=DEFAULT_PRESET,
                   help="efficient: a narrow net, one test-time view, fewer MACs than the "
                        "pretrained ResNet-20; accurate: wider, six views, the last point of "
                        "accuracy for many times the MACs")
    p.add_argument("--epochs", type=int_from(1), help="epochs per seed (default: the preset's, "
                   + ", ".join(f"{r.epochs} {name}" for name, r in PRESETS.items()) + ")")
    p.add_argument("--batch-size", type=int_from(1), help="lr and weight decay scale with it "
                   "(default: " + ", ".join(f"{v} on a {k.upper()}" for k, v in TRAIN_BATCH.items())
                   + ")")
    p.add_argument("--subset", type=int_from(0), default=0,
                   help="use only the first N train and test images (0: all); such quick checks "
                        "save into model/subset/ unless --model-dir is given")
    p.add_argument("--model-dir", help="where the models, results.json, the plot and the log go "
                                       "(default: model/, or model/subset/ with --subset)")
    p.add_argument("--resume", action="store_true",
                   help="keep each seed already saved in the model folder with these settings "
                        "(an interrupted run) and train the others; without it every seed is "
                        "trained from scratch")
    p = command("test", test, "classify images and save CONV_rslt.png", model, records, device)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, BMP, WebP, "
                   "TIFF, ...); bare names are also looked up in test_images/")
    p.add_argument("--out", help="where the conv-layer figure of the image goes (.png, .jpg, "
                                 ".pdf, ...; default: CONV_rslt.png)")
    p.add_argument("--top", type=int_from(0), default=0, metavar="N",
                   help="also print the N likeliest classes with their probabilities")
    p.add_argument("--record", action="store_true", help="keep what was printed and a copy of "
                   "the figure in --records-dir, for the report")
    command("resnet20", resnet20, "test accuracy of a pretrained ResNet-20", weights, data,
            records, device)
    command("profile", command_profile, "MACs and parameters of both models (THOP)", model,
            weights, records)
    p = command("speed", inference_speed_test, "single-image inference time of both models", model,
                weights, records, device)
    p.add_argument("--warmup", type=int_from(0), default=50, help="untimed iterations first")
    p.add_argument("--iterations", type=int_from(1), default=1000, help="timed iterations")
    return parser


class Terminated(Exception):
    """SIGTERM (kill, timeout, job schedulers), raised where the program is, like Ctrl-C."""


def stop(signum, frame):
    raise Terminated


def main(argv=None):
    """Run one command; every error the user can fix is one line on stderr and exit code 2. A
    stopped `train` (Ctrl-C, SIGTERM, a crash) says in its one line how to resume."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    signal.signal(signal.SIGTERM, stop)
    resume = "" if args.run is not train else (
        "; rerun the same command to go on" if args.resume else
        f"; `{invocation(args)} --resume` trains the seeds not yet saved")
    try:
        args.run(args)
    except UserError as error:
        log(f"error: {error}")
        return 2
    except (KeyboardInterrupt, Terminated) as signal_:
        what = "interrupted" if isinstance(signal_, KeyboardInterrupt) else "terminated"
        log(f"{what}; files already saved are intact{resume}")
        return 130 if what == "interrupted" else 143
    except Exception as error:  # noqa: BLE001 - a crash mid-training: say how to go on
        if args.run is not train:
            raise
        log(f"error: training stopped ({type(error).__name__}: {first_line(error)}); files "
            f"already saved are intact{resume}")
        return 1
    return 0


# ----------------------------------------------------------------------------- machinery

ONEDNN_ISAS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                            "AVX512_CORE_VNNI"}


def training_format(device, precision):
    """`train`'s format and why (bench/README.md): bfloat16 on AMX or AMD AVX512_BF16 unless
    ONEDNN_MAX_CPU_ISA caps it (Intel AVX512_BF16 alone is slower); CUDA 8.x bf16, 7.x fp16."""
    if precision != "auto":
        return PRECISIONS[precision], f"{precision} (--precision)"
    if device.type == "cpu":
        flags = set(cpuinfo_field("flags").split())
        capped = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() in ONEDNN_ISAS_WITHOUT_BF16
        amd = cpuinfo_field("vendor_id") == "AuthenticAMD"
        if not capped and ("amx_bf16" in flags or (amd and "avx512_bf16" in flags)):
            return torch.bfloat16, "bfloat16 (auto: this CPU computes it natively)"
    if device.type == "cuda":
        major = torch.cuda.get_device_capability(device)[0]
        if major >= 7:
            name = "bfloat16" if major >= 8 else "float16"
            return PRECISIONS[name], f"{name} (auto: CUDA capability {major}.x)"
    return torch.float32, "float32 (auto: no faster format computed natively here)"


def inference_format(device, precision):
    """The number format of `test` and `speed`: float32 unless --precision says otherwise (alike
    on every machine; at batch 1 about as fast as bfloat16 or faster on every CPU measured)."""
    return torch.float32 if precision == "auto" else PRECISIONS[precision]


def precision_name(dtype):
    return str(dtype).removeprefix("torch.")


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
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    found = re.search(rf"^{name}\s*:(.*)$", text, re.M)
    return found.group(1).strip() if found else ""


def machine_description(device, dtype):
    """What ran a command, stored beside each result so numbers keep their context."""
    name = cpuinfo_field("model name") or platform.processor() or platform.machine()
    return {"cpu": f"{name} (family {cpuinfo_field('cpu family')} model {cpuinfo_field('model')})",
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(device), "torch": torch.__version__, "python": platform.python_version(),
            "cpu_bfloat16_flags": sorted({"avx512_bf16", "amx_bf16"}
                                         & set(cpuinfo_field("flags").split())),
            "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
            "precision": precision_name(dtype),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}


def progress_bar(iterable, total, description):
    """A progress bar on stderr when a person watches it (a terminal); else the iterable."""
    return tqdm(iterable, total=total, desc=description, leave=False,
                disable=not sys.stderr.isatty())


def ensure_writable(folder):
    """Prove, before any long work, that `folder` can be made and written into."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise UserError(f"cannot write into {Path(folder).absolute()} "
                        f"({error.strerror or first_line(error)})") from None


def write_atomically(path, write):
    """write(tmp_path), then renamed over path: a crash leaves the old file or the new one,
    never half a file; a failure is one UserError and keeps the old file."""
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make results private
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:  # torch's zip writer reports ENOSPC as RuntimeError
        raise UserError(f"could not write {path.name} into {path.parent} "
                        f"({getattr(error, 'strerror', None) or first_line(error)}); "
                        "the previous file is kept") from None
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    write_atomically(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path, data):
    write_text(path, json.dumps(data, indent=2) + "\n")


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


def shown_path(path):
    """A path as records and messages show it: relative to the project when inside it, else
    with the home folder as ~ (no user's folders in a hand-in)."""
    path = Path(path).absolute()
    if path.is_relative_to(ROOT):
        return path.relative_to(ROOT).as_posix()
    return str(path).replace(str(Path.home()), "~", 1)


def invocation(args):
    """The command as run, absolute paths shown as shown_path does."""
    return "python CNNclassify.py " + " ".join(
        shown_path(a) if os.path.isabs(a) else a for a in args.argv)


def model_identity(path):
    """What names a model file in a record: its path in the project and its sha256."""
    return {"model": shown_path(path), "model_sha256": sha256_of(path)}


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
        if "Unsupported global" in str(error) or "Unsupported class" in str(error):  # torch 2.3
            raise UserError(f"{path}: holds objects other than tensors and plain data; refused, "
                            "since loading it would run code") from None
        detail = first_line(str(error).split("WeightsUnpickler error:")[-1])
        raise UserError(f"{path}: not a readable PyTorch file ({detail})") from None
    except Exception as error:
        raise UserError(f"{path}: not a readable PyTorch file ({first_line(error)})") from None


def sha256_of(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


if __name__ == "__main__":
    sys.exit(main())
