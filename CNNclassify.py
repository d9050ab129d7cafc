"""CNNclassify: train, test and measure a CIFAR-10 CNN from one script.

    python CNNclassify.py train [--seeds 0 1 2]   train, save model/, plot accuracy
    python CNNclassify.py test IMAGE              predict a photo, save CONV_rslt.png
    python CNNclassify.py resnet20                accuracy of a pretrained ResNet-20
    python CNNclassify.py profile                 MACs and parameters (THOP)
    python CNNclassify.py speed                   single-image inference time
    python CNNclassify.py report                  report/report.md and report.pdf

The file reads top to bottom: settings, data, models, training, prediction and
visualisation, ResNet-20, costs, report, command line.
"""

import argparse
import copy
import json
import os
import pickle
import platform
import random
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------- settings

ROOT = Path(__file__).resolve().parent
MODEL_DIR = ROOT / "model"
MAIN_MODEL = "cnn.pt"
RESULTS_FILE = "results.json"
RECORDS_DIR = MODEL_DIR / "records"
REPORT_DIR = ROOT / "report"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST_FILE = "test_batch"

# The training recipe. Most of it follows airbench94 (Keller Jordan, arXiv 2404.00498)
# and David Page's "How to train your ResNet": a frozen patch-whitening first layer,
# BatchNorm with only a bias, GELU, label smoothing, Nesterov SGD with a short warm-up
# and a linear decay, alternating flips, 2-pixel translations and flip test-time
# augmentation; what is evaluated and saved is a moving average of the weights. Widths,
# batch size and epochs are chosen for a 2-core CPU, where bfloat16 autocast and
# channels_last together give 2.5x the throughput of float32 NCHW (bench/throughput.py).
HYPERPARAMETERS = {
    "epochs": 13,
    "batch_size": 256,
    "lr_per_1024": 1.5,       # peak lr of the batch-mean loss is this x batch_size / 1024
    "bias_lr_scale": 64.0,    # BatchNorm biases learn this much faster (airbench94)
    "momentum": 0.85,
    "decay_per_1024": 2e-3,   # weight decay per step at peak lr is this x batch_size / 1024
    "warmup_fraction": 0.2,   # lr rises from 0.2x to 1x over this share of steps
    "label_smoothing": 0.2,
    "translate": 2,           # random shift in pixels, reflect padding
    "widths": (64, 128, 256),
    "batchnorm_momentum": 0.4,
    "logit_scale": 1 / 9,
    "bfloat16": True,         # autocast after the first layer (CPU and CUDA)
    "average_decay": 0.98,    # evaluated and saved weights: moving average of the trained ones
    "whitening_images": 5000,
}

EVAL_BATCH = 64   # 1.5x the images/s of batches of 1000 on 2 cores (bench/throughput.py --evaluation)


class UserError(Exception):
    """A problem the user can fix; printed as one line, exit code 2, no traceback."""


def first_line(error):
    """An exception's message cut to its first line, for one-line errors."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def log(message):
    """Progress and notes go to stderr so stdout carries results only."""
    print(message, file=sys.stderr, flush=True)


def pick_device(name=None):
    """CUDA if present, then Apple MPS, then CPU, unless the user names one."""
    if name:
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def set_seed(seed):
    """Seed every generator the training touches: python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def machine_description(device):
    """What ran a command, stored beside each result so numbers keep their context."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    described = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                 "device": str(device), "torch": torch.__version__, "python": platform.python_version()}
    if device.type == "cuda":
        described["gpu"] = torch.cuda.get_device_name(device)
    return described


def write_atomically(path, write):
    """Call write(tmp_path), then rename over path: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name, suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would make results private
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, data):
    def write(tmp):
        Path(tmp).write_text(json.dumps(data, indent=2) + "\n")
    write_atomically(path, write)


def command_line(args):
    return "python CNNclassify.py " + shlex.join(args.argv)


def record(args, name, lines, data, device):
    """Keep what a command printed, its numbers, the command and the machine, for `report`."""
    write_json(Path(args.records_dir) / f"{name}.json",
               {"command": command_line(args), "machine": machine_description(device),
                "output": lines, **data})


# ----------------------------------------------------------------------------- data

def read_cifar_batch(path):
    """One pickled CIFAR-10 batch -> (uint8 N x 3 x 32 x 32, int64 labels).

    Official files have bytes keys under encoding="bytes"; copies made with
    latin1 have str keys. Both are accepted.
    """
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    images = torch.from_numpy(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).copy())
    labels = torch.tensor(batch["labels"], dtype=torch.int64)
    return images, labels


def cifar_present(data_dir):
    folder = Path(data_dir) / CIFAR_FOLDER
    return all((folder / name).is_file() for name in CIFAR_TRAIN_FILES + [CIFAR_TEST_FILE])


def ensure_cifar(data_dir, url=None, md5=None):
    """Download and unpack the official archive (MD5 checked) unless the batches are there.

    Per-file checksums are not checked: a local copy may be rebuilt in another order.
    """
    if cifar_present(data_dir):
        return
    url, md5 = url or CIFAR_URL, md5 or CIFAR_MD5
    from torchvision.datasets.utils import download_and_extract_archive
    log(f"CIFAR-10 not found in {data_dir}; downloading {url}")
    try:
        download_and_extract_archive(url, download_root=str(data_dir), md5=md5)
    except Exception as error:  # network down, bad checksum, bad archive: all one message
        raise UserError(f"could not get CIFAR-10 ({type(error).__name__}: {first_line(error)}); put the "
                        f"'{CIFAR_FOLDER}' folder inside {data_dir} or pass --data-dir") from None
    if not cifar_present(data_dir):
        raise UserError(f"the archive from {url} did not contain {CIFAR_FOLDER}/")


def load_cifar(data_dir, url=None, md5=None):
    """The whole dataset as uint8 tensors, read once: {"train": (x, y), "test": (x, y)}."""
    ensure_cifar(data_dir, url, md5)
    folder = Path(data_dir) / CIFAR_FOLDER
    try:
        parts = [read_cifar_batch(folder / name) for name in CIFAR_TRAIN_FILES]
        test = read_cifar_batch(folder / CIFAR_TEST_FILE)
    except Exception as error:
        raise UserError(f"cannot read CIFAR-10 in {folder}: {first_line(error)}") from None
    train = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return {"train": train, "test": test}


def to_float(images):
    """uint8 N x 3 x H x W -> float in [0, 1], the input every model here takes."""
    return images.float().div_(255)


def flip_half(images, flip_mask):
    """Mirror the images selected by flip_mask, in place of a per-image transform."""
    return torch.where(flip_mask.view(-1, 1, 1, 1), images.flip(-1), images)


def translate(images, shift, generator):
    """Shift each image by up to `shift` pixels each way (reflect padding), batched.

    One slice per possible offset instead of one per image: at most (2*shift+1)^2 slices.
    """
    if shift == 0:
        return images
    n, _, h, w = images.shape
    padded = F.pad(images, (shift,) * 4, mode="reflect")
    offsets = torch.randint(0, 2 * shift + 1, (2, n), generator=generator)
    out = torch.empty_like(images)
    codes = offsets[0] * (2 * shift + 1) + offsets[1]
    for code in codes.unique().tolist():
        dy, dx = divmod(code, 2 * shift + 1)
        chosen = (codes == code).nonzero().squeeze(1)
        out[chosen] = padded[chosen, :, dy:dy + h, dx:dx + w]
    return out


def training_batches(images, labels, batch_size, epoch, base_flips, hyp, generator):
    """Yield augmented float batches for one epoch, shuffled with `generator`.

    Flips alternate (airbench): an image flipped in one epoch is unflipped in the next,
    so every pair of epochs sees both views; base_flips fixes the first epoch's choice.
    """
    order = torch.randperm(len(images), generator=generator)
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        batch = to_float(images[index])
        batch = flip_half(batch, base_flips[index] ^ bool(epoch % 2))
        batch = translate(batch, hyp["translate"], generator)
        yield batch, labels[index]


# ----------------------------------------------------------------------------- models

def conv_block(cin, cout, bn_momentum):
    """conv -> pool -> BN -> GELU -> conv -> BN -> GELU; each call halves the size."""
    return nn.Sequential(
        conv3x3(cin, cout), nn.MaxPool2d(2), batch_norm(cout, bn_momentum), nn.GELU(),
        conv3x3(cout, cout), batch_norm(cout, bn_momentum), nn.GELU())


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


class CNN(nn.Module):
    """Our CIFAR-10 classifier. Takes RGB floats in [0, 1], N x 3 x 32 x 32.

    conv1 is the assignment's fixed first layer: Conv2d(3, 32, 5, stride 1, no padding).
    Its weights are set from the training data (whitening, see set_whitening) and not
    trained. Three conv blocks and a linear head follow. In eval mode the prediction
    averages the image and its mirror (test-time augmentation), so load_cnn() gives
    exactly the accuracy that training reports.
    """

    def __init__(self, widths=HYPERPARAMETERS["widths"], mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                 bn_momentum=HYPERPARAMETERS["batchnorm_momentum"],
                 logit_scale=HYPERPARAMETERS["logit_scale"], bfloat16=HYPERPARAMETERS["bfloat16"]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))
        self.conv1 = nn.Conv2d(3, 32, kernel_size=5, stride=1, padding=0)
        self.conv1.requires_grad_(False)
        self.blocks = nn.Sequential(conv_block(32, widths[0], bn_momentum),
                                    conv_block(widths[0], widths[1], bn_momentum),
                                    conv_block(widths[1], widths[2], bn_momentum))
        self.head = nn.Linear(widths[2], 10, bias=False)
        self.logit_scale = logit_scale
        self.bfloat16 = bfloat16

    def first_layer(self, x):
        """Normalised input through conv1, kept in float32: what CONV_rslt.png shows."""
        return self.conv1((x - self.mean) / self.std)

    def classify(self, features):
        autocast = self.bfloat16 and features.device.type in ("cpu", "cuda")
        with torch.autocast(features.device.type, dtype=torch.bfloat16, enabled=autocast):
            x = self.blocks(F.gelu(features))
            x = F.adaptive_max_pool2d(x, 1).flatten(1)
            return self.head(x).float() * self.logit_scale

    def forward(self, x):
        if self.training:
            return self.classify(self.first_layer(x))
        both = self.first_layer(torch.cat([x, x.flip(-1)]))
        logits = self.classify(both)
        return (logits[:len(x)] + logits[len(x):]) / 2

    def settings(self):
        """What it takes to rebuild this model from its state dict."""
        return {"widths": [block[0].out_channels for block in self.blocks],
                "bn_momentum": self.blocks[0][2].momentum, "logit_scale": self.logit_scale,
                "bfloat16": self.bfloat16}


@torch.no_grad()
def set_whitening(model, images, eps=5e-4):
    """Make conv1 a patch-whitening filter bank (airbench; idea from Page's ResNet series).

    The 5x5x3 = 75-dim patches of the normalised training images have a covariance;
    its top 16 eigenvectors, each divided by sqrt(eigenvalue), and their negatives fill
    the 32 filters. After GELU each pair acts like one linear, decorrelated feature.
    """
    x = (to_float(images) - model.mean) / model.std
    patches = F.unfold(x.double(), kernel_size=5).transpose(1, 2).reshape(-1, 75)
    patches = patches - patches.mean(0)
    covariance = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    top = eigenvectors[:, -16:].flip(1).T / (eigenvalues[-16:].flip(0) + eps).sqrt().unsqueeze(1)
    filters = torch.cat([top, -top]).reshape(32, 3, 5, 5)
    model.conv1.weight.copy_(filters.float())
    model.conv1.bias.zero_()


def build_cnn(settings=None, mean=None, std=None):
    settings = dict(settings or {})
    model = CNN(widths=tuple(settings.get("widths", HYPERPARAMETERS["widths"])),
                bn_momentum=settings.get("bn_momentum", HYPERPARAMETERS["batchnorm_momentum"]),
                logit_scale=settings.get("logit_scale", HYPERPARAMETERS["logit_scale"]),
                bfloat16=settings.get("bfloat16", HYPERPARAMETERS["bfloat16"]),
                **({"mean": mean, "std": std} if mean is not None else {}))
    return model.to(memory_format=torch.channels_last)


def save_checkpoint(path, model, extra):
    """State dict plus everything needed to use it, written atomically."""
    checkpoint = {"state_dict": model.state_dict(), "settings": model.settings(),
                  "classes": list(CLASSES), "mean": model.mean.flatten().tolist(),
                  "std": model.std.flatten().tolist(), **extra}
    write_atomically(path, lambda tmp: torch.save(checkpoint, tmp))


def load_torch_file(path, missing_message):
    """torch.load(weights_only=True) of a local file: tensors and plain data, never code."""
    path = Path(path)
    if not path.is_file():
        raise UserError(missing_message)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"{path}: not a readable PyTorch file ({first_line(error)})") from None


def load_cnn(path=None, device="cpu"):
    """The trained CNN from model/ (or `path`) in eval mode, on `device`.

    It takes RGB floats in [0, 1], N x 3 x 32 x 32: normalisation is inside.
    """
    path = path or MODEL_DIR / MAIN_MODEL
    checkpoint = load_torch_file(path, f"no trained model at {path}; run `python CNNclassify.py train` first")
    model = build_cnn(checkpoint["settings"], checkpoint["mean"], checkpoint["std"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval()


# ----------------------------------------------------------------------------- training

def make_optimizer(model, hyp):
    """Nesterov SGD; BN biases get a higher lr, and decay is set per step, apart from lr.

    lr and decay grow with the batch size, as in airbench, so --batch-size alone keeps
    the per-example step and the decay per epoch.
    """
    biases = [p for p in model.parameters() if p.requires_grad and p.ndim == 1]
    others = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    scale = hyp["batch_size"] / 1024
    lr, decay = hyp["lr_per_1024"] * scale, hyp["decay_per_1024"] * scale
    bias_lr = lr * hyp["bias_lr_scale"]
    groups = [{"params": biases, "lr": bias_lr, "weight_decay": decay / bias_lr},
              {"params": others, "lr": lr, "weight_decay": decay / lr}]
    return torch.optim.SGD(groups, momentum=hyp["momentum"], nesterov=True)


@torch.no_grad()
def update_average(average, model, step, decay):
    """Move `average` towards `model`: an exponential moving average of the weights.

    The trained weights jitter at the peak learning rate, and their average is a much
    better model (Polyak averaging; airbench94's lookahead plays the same role). The
    decay ramps up as (1 + step) / (10 + step), as in TensorFlow's
    ExponentialMovingAverage, so early steps are not held back by the initial weights.
    BatchNorm's running statistics are averaged the same way.
    """
    weight = 1 - min(decay, (1 + step) / (10 + step))
    pairs = [(a, m) for a, m in zip(list(average.parameters()) + list(average.buffers()),
                                    list(model.parameters()) + list(model.buffers()))
             if a.is_floating_point()]
    torch._foreach_lerp_([a for a, _ in pairs], [m for _, m in pairs], weight)


def lr_factor(step, total_steps, warmup_fraction):
    """Linear warm-up from 0.2 to 1, then linear decay to 0."""
    warmup = max(1, int(warmup_fraction * total_steps))
    if step < warmup:
        return 0.2 + 0.8 * step / warmup
    return max(0.0, (total_steps - step) / (total_steps - warmup))


@torch.no_grad()
def evaluate(model, images, labels, device):
    """Mean loss and number correct of a [0, 1]-input model in eval mode on uint8 images."""
    model.to(device).eval()
    total_loss, correct = 0.0, 0
    for start in range(0, len(images), EVAL_BATCH):
        x = to_float(images[start:start + EVAL_BATCH]).to(device, memory_format=torch.channels_last)
        y = labels[start:start + EVAL_BATCH].to(device)
        logits = model(x)
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    return total_loss / len(images), correct


def epoch_line(seed, record, epochs):
    """The line `train` prints after each epoch (the report rebuilds it from history)."""
    return (f"seed {seed} epoch {record['epoch']:2d}/{epochs}  train loss {record['train_loss']:.4f}"
            f"  train acc {record['train_accuracy']:6.2f}%  test loss {record['test_loss']:.4f}"
            f"  test acc {record['test_accuracy']:6.2f}%  {record['seconds']:6.1f}s")


def seed_table(results):
    """The table `train` ends with: seed -> final test accuracy, then mean and std."""
    lines = ["seed  test accuracy (%)  train seconds"]
    lines += [f"{run['seed']:4d}  {run['test_accuracy']:17.2f}  {run['train_seconds']:13.1f}" for run in results["runs"]]
    lines.append(f"mean {results['mean']:.2f}%  std {results['std']:.2f} (numpy.std over {len(results['runs'])} seeds)")
    return lines


def train_one_seed(data, seed, args, hyp):
    """Train one model from scratch; returns it with its per-epoch history and timings.

    The model returned, evaluated after each epoch and saved, is the moving average of
    the trained weights (update_average); train loss and accuracy are those of the
    trained weights on the augmented batches they learn from.
    """
    set_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    device = pick_device(args.device)
    train_x, train_y = data["train"]
    test_x, test_y = data["test"]
    if args.subset:
        train_x, train_y = train_x[:args.subset], train_y[:args.subset]
        test_x, test_y = test_x[:args.subset], test_y[:args.subset]

    pixels = to_float(train_x).transpose(0, 1).reshape(3, -1)
    model = build_cnn(mean=pixels.mean(1).tolist(), std=pixels.std(1).tolist())
    set_whitening(model, train_x[:hyp["whitening_images"]])
    model.to(device)
    optimizer = make_optimizer(model, hyp)
    steps_per_epoch = -(-len(train_x) // hyp["batch_size"])
    total_steps = args.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, hyp["warmup_fraction"]))
    base_flips = torch.rand(len(train_x), generator=generator) < 0.5
    average = copy.deepcopy(model).requires_grad_(False)

    history, train_seconds = [], 0.0
    for epoch in range(args.epochs):
        start = time.perf_counter()
        model.train()
        loss_sum, correct = 0.0, 0
        for x, y in training_batches(train_x, train_y, hyp["batch_size"], epoch, base_flips, hyp, generator):
            x, y = x.to(device, memory_format=torch.channels_last), y.to(device)
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=hyp["label_smoothing"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            update_average(average, model, schedule.last_epoch, hyp["average_decay"])
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
        epoch_train_seconds = time.perf_counter() - start
        test_loss, test_correct = evaluate(average, test_x, test_y, device)
        test_accuracy = 100.0 * test_correct / len(test_x)
        train_seconds += time.perf_counter() - start
        record = {"epoch": epoch + 1, "train_loss": loss_sum / len(train_x),
                  "train_accuracy": 100.0 * correct / len(train_x), "test_loss": test_loss,
                  "test_accuracy": test_accuracy, "seconds": train_seconds,
                  "images_per_second": len(train_x) / epoch_train_seconds}
        history.append(record)
        print(epoch_line(seed, record, args.epochs), flush=True)
    return average.cpu(), history, train_seconds


def plot_accuracy(runs, path):
    """One plot: train and test accuracy per epoch, mean over seeds with a min-max band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label, colour in [("train_accuracy", "train", "tab:blue"), ("test_accuracy", "test", "tab:orange")]:
        curves = np.array([[h[key] for h in run["history"]] for run in runs])
        epochs = np.arange(1, curves.shape[1] + 1)
        ax.plot(epochs, curves.mean(0), marker="o", color=colour, label=label)
        if len(runs) > 1:
            ax.fill_between(epochs, curves.min(0), curves.max(0), color=colour, alpha=0.2)
    seeds = ", ".join(str(run["seed"]) for run in runs)
    ax.set(xlabel="epoch", ylabel="accuracy (%)",
           title=f"CIFAR-10 accuracy per epoch (seeds {seeds}" + ("; mean, band = min-max)" if len(runs) > 1 else ")"))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)


def train(args):
    """`train`: one model per seed, saved in model/, with results.json and the plot."""
    hyp = dict(HYPERPARAMETERS, batch_size=args.batch_size)
    seeds = args.seeds if args.seeds is not None else [args.seed]
    model_dir = Path(args.model_dir)
    data = load_cifar(args.data_dir)
    runs = []
    for seed in seeds:
        model, history, seconds = train_one_seed(data, seed, args, hyp)
        extra = {"seed": seed, "history": history, "train_seconds": seconds,
                 "hyperparameters": {**hyp, "epochs": args.epochs, "widths": list(hyp["widths"])}}
        save_checkpoint(model_dir / f"cnn_seed{seed}.pt", model, extra)
        runs.append({"seed": seed, "test_accuracy": history[-1]["test_accuracy"],
                     "train_seconds": seconds,
                     "images_per_second": float(np.mean([h["images_per_second"] for h in history])),
                     "seconds_per_epoch": seconds / len(history), "history": history})
    main_seed = seeds[0]
    write_atomically(model_dir / MAIN_MODEL,
                     lambda tmp: shutil.copyfile(model_dir / f"cnn_seed{main_seed}.pt", tmp))
    accuracies = np.array([run["test_accuracy"] for run in runs])
    results = {"command": command_line(args),
               "machine": machine_description(pick_device(args.device)),
               "main_model": MAIN_MODEL, "main_seed": main_seed, "subset": args.subset,
               "runs": runs, "mean": float(accuracies.mean()), "std": float(np.std(accuracies))}
    write_json(model_dir / RESULTS_FILE, results)
    plot_accuracy(runs, model_dir / "accuracy.png")
    print("\n".join(seed_table(results)))



# ----------------------------------------------------------------------------- prediction and visualisation

IMAGE_DIR = ROOT / "test_images"


def resolve_image_path(name):
    """A bare file name missing from the working directory is looked up in test_images/."""
    path = Path(name)
    if not path.exists() and path.parent == Path(".") and (IMAGE_DIR / path).exists():
        return IMAGE_DIR / path
    return path


def decode_quietly(data, flags):
    """cv2.imdecode with the C decoders' stderr captured: libjpeg reports truncation there
    and still returns a half-grey image, so its words are how corruption is detected."""
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
        messages = captured.read().decode(errors="replace")
    return image, messages


def read_image(path):
    """Any common image file -> uint8 RGB array H x W x 3, or a UserError naming the problem.

    Grey becomes three equal channels, alpha is composited on white (transparent areas
    look like paper, not black), 16-bit and float images are scaled to 8 bits, and JPEG
    EXIF orientation is applied, so a phone photo is seen upright.
    """
    import cv2
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a directory, not an image")
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as error:
        raise UserError(f"{path}: cannot be read ({error.strerror or first_line(error)})") from None
    if data.size == 0:
        raise UserError(f"{path}: empty file")
    image, messages = decode_quietly(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise UserError(f"{path}: not an image OpenCV can read (unknown format or corrupt data)")
    if "premature end" in messages.lower():
        raise UserError(f"{path}: truncated or corrupt image data")
    if image.size == 0:
        raise UserError(f"{path}: image has no pixels")
    if image.ndim == 2 or image.shape[2] in (1, 3):  # no alpha: decode again, EXIF-rotated
        image, _ = decode_quietly(data, cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH)
    return to_rgb8(image)


def to_rgb8(image):
    """OpenCV's array (BGR order, any depth, 1-4 channels) -> uint8 RGB."""
    import cv2
    if image.dtype == np.uint16:
        image = image.astype(np.float32) / 65535.0
    elif image.dtype.kind == "f":
        image = np.clip(np.nan_to_num(image.astype(np.float32)), 0.0, 1.0)
    elif image.dtype != np.uint8:
        image = image.astype(np.float32) / np.iinfo(image.dtype).max
    else:
        image = image.astype(np.float32) / 255.0
    if image.ndim == 2:
        image = image[:, :, None]
    colour = image
    if image.shape[2] in (2, 4):
        alpha = image[:, :, -1:]
        colour = image[:, :, :-1] * alpha + (1.0 - alpha)
    if colour.shape[2] == 1:
        colour = np.repeat(colour, 3, axis=2)
    colour = cv2.cvtColor(np.ascontiguousarray(colour[:, :, :3]), cv2.COLOR_BGR2RGB)
    return np.clip(np.rint(colour * 255.0), 0, 255).astype(np.uint8)


def image_to_input(rgb):
    """uint8 RGB of any size -> the model's input, 1 x 3 x 32 x 32 floats in [0, 1].

    The whole picture is resized to 32 x 32 (no crop: the object may be off-centre);
    INTER_AREA averages pixels when shrinking, bicubic when enlarging.
    """
    import cv2
    h, w = rgb.shape[:2]
    shrinking = h >= 32 and w >= 32
    small = cv2.resize(rgb, (32, 32), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_CUBIC)
    return torch.from_numpy(small).permute(2, 0, 1).unsqueeze(0).float() / 255


@torch.no_grad()
def predict(model, x):
    """Class probabilities and the first conv layer's maps from one forward pass."""
    maps = []
    hook = model.conv1.register_forward_hook(lambda module, inputs, output: maps.append(output))
    try:
        device = next(model.parameters()).device
        probabilities = model(x.to(device)).softmax(1)[0].cpu()
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


def draw_conv_maps(rgb, x, maps, title, path):
    """Input image beside the 32 first-layer maps (4 x 8, each on its own scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig = plt.figure(figsize=(18, 7.2), dpi=100)
    grid = fig.add_gridspec(4, 11, width_ratios=[1.5, 1.5, 0.2] + [1] * 8)
    shown = fig.add_subplot(grid[0:2, 0:2])
    shown.imshow(rgb)
    shown.set_title(f"input {rgb.shape[1]}x{rgb.shape[0]}")
    seen = fig.add_subplot(grid[2:4, 0:2])
    seen.imshow(x[0].permute(1, 2, 0).numpy(), interpolation="nearest")
    seen.set_title("as the model sees it (32x32)")
    for i, feature in enumerate(maps):
        ax = fig.add_subplot(grid[i // 8, 3 + i % 8])
        ax.imshow(feature.numpy(), cmap="viridis")
        ax.set_title(f"filter {i}", fontsize=9)
    for ax in fig.axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    plt.close(fig)


def classify_image(image_path, model, out_path):
    """Everything `test` does, returned as printed lines (the report reuses it)."""
    path = resolve_image_path(image_path)
    rgb = read_image(path)
    x = image_to_input(rgb)
    probabilities, maps = predict(model, x)
    lines = prediction_lines(probabilities)
    draw_conv_maps(rgb, x, maps, f"{path.name}: first conv layer (5x5, 32 filters), 28x28 outputs; "
                   f"predicted {lines[0].split(': ')[1]}", out_path)
    return lines


def test(args):
    """`test IMAGE`: print the predicted class and save CONV_rslt.png."""
    model = load_cnn(args.model, device=pick_device(args.device))
    for line in classify_image(args.image, model, args.out):
        print(line)



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
        self.pad = 0
        if stride != 1 or cin != cout:
            if option == "A":
                self.pad = (cout - cin) // 2
            else:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

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
    """CIFAR ResNet-20 (He et al. 2016): 3 stages x 3 blocks, 16/32/64 channels.

    Takes RGB floats in [0, 1] like our CNN; the checkpoint's normalisation is inside
    (non-persistent buffers, so the state dict is exactly the checkpoint's).
    """

    def __init__(self, option, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, cin = [], 16
        for cout, stride in [(16, 1), (32, 2), (64, 2)]:
            stages.append(nn.Sequential(*[BasicBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1, option)
                                          for i in range(3)]))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.option = option
        self.head_name = "linear" if option == "A" else "fc"
        setattr(self, self.head_name, nn.Linear(64, 10))

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1((x - self.mean) / self.std)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return getattr(self, self.head_name)(F.adaptive_avg_pool2d(x, 1).flatten(1))


def fetch_resnet20_checkpoint(source):
    """A local path, or a URL fetched into the torch hub cache with its sha256 prefix checked."""
    if "://" not in source:
        return load_torch_file(source, f"{source}: no such weights file")
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    try:
        return torch.hub.load_state_dict_from_url(source, map_location="cpu", check_hash=True,
                                                  progress=False, weights_only=True)
    except Exception as error:
        name = source.rsplit("/", 1)[-1]
        raise UserError(f"could not fetch ResNet-20 weights ({type(error).__name__}); download {source} "
                        f"into {cache / name} or pass --weights PATH") from None


def load_resnet20(source=RESNET20_URL):
    """ResNet-20 in eval mode, variant detected from the checkpoint's keys, loaded strictly."""
    checkpoint = fetch_resnet20_checkpoint(source)
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"{source}: not a ResNet-20 state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if "linear.weight" in state and not any("downsample" in k for k in state):
        model = ResNet20("A", IMAGENET_MEAN, IMAGENET_STD)
    elif "fc.weight" in state and any("downsample" in k for k in state):
        model = ResNet20("B", CIFAR_MEAN, CIFAR_STD)
    else:
        raise UserError(f"{source}: unknown checkpoint layout (expected ResNet-20 with a "
                        "'linear' head and option-A shortcuts, or an 'fc' head and 'downsample')")
    expected = model.state_dict()
    for key, value in expected.items():  # older checkpoints predate BN's batch counter
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = value
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise UserError(f"{source}: does not fit ResNet-20 ({first_line(error)})") from None
    return model.eval()


def resnet20(args):
    """`resnet20`: accuracy of a pretrained ResNet-20 on the 10,000 test images."""
    device = pick_device(args.device)
    model = load_resnet20(args.weights)
    images, labels = load_cifar(args.data_dir)["test"]
    _, correct = evaluate(model, images, labels, device)
    line = f"ResNet-20 test accuracy: {100 * correct / len(labels):.2f}% ({correct}/{len(labels)})"
    print(line)
    record(args, f"resnet20_option{model.option}", [line],
           {"weights": args.weights, "correct": correct, "total": len(labels),
            "accuracy": 100 * correct / len(labels)}, device)



# ----------------------------------------------------------------------------- costs (THOP, speed)

class OneView(nn.Module):
    """Our CNN on one view of the image (no test-time mirror), for counting its cost."""

    def __init__(self, cnn):
        super().__init__()
        self.cnn = cnn

    def forward(self, x):
        return self.cnn.classify(self.cnn.first_layer(x))


def count_costs(model):
    """THOP's MACs and parameters for one 1 x 3 x 32 x 32 input, on a deep copy so the
    counters THOP attaches never stay on the model itself."""
    from thop import profile
    copied = copy.deepcopy(model).cpu().eval()
    macs, params = profile(copied, inputs=(torch.zeros(1, 3, 32, 32),), verbose=False)
    return int(macs), int(params)


def cost_table(cnn, resnet):
    """Rows (name, MACs, params) for both models, and the printed table."""
    from thop import clever_format
    rows = [("CNN (ours), one view", *count_costs(OneView(cnn))),
            ("CNN (ours), with flip TTA", *count_costs(cnn)),
            ("ResNet-20", *count_costs(resnet))]
    lines = [f"{'model':<28s} {'MACs':>9s} {'params':>9s} {'MACs (exact)':>14s} {'params (exact)':>15s}"]
    for name, macs, params in rows:
        readable_macs, readable_params = clever_format([macs, params], "%.3f")
        lines.append(f"{name:<28s} {readable_macs:>9s} {readable_params:>9s} {macs:>14,d} {params:>15,d}")
    lines.append("THOP counts convolutions, linear layers and BatchNorm; input 1 x 3 x 32 x 32.")
    return rows, lines


def profile_models(args):
    """`profile`: MACs and parameters of our CNN and ResNet-20 (THOP)."""
    rows, lines = cost_table(load_cnn(args.model), load_resnet20(args.weights))
    print("\n".join(lines))
    record(args, "profile", lines, {"weights": args.weights,
                                    "models": [{"name": n, "macs": m, "params": p} for n, m, p in rows]},
           torch.device("cpu"))


@torch.inference_mode()
def time_inference(model, x, warmup, iterations):
    """Seconds per call of model(x), one timing per iteration after warm-up."""
    synchronize = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(iterations):
        synchronize()
        start = time.perf_counter()
        model(x)
        synchronize()
        times.append(time.perf_counter() - start)
    return np.array(times)


def inference_speed_test(args):
    """Single-image inference time of our CNN and ResNet-20, same device and threads.

    args: device, warmup, iterations, model (our checkpoint), weights (ResNet-20's).
    Returns {"models": [{name, mean_ms, median_ms, p95_ms}], "device", "threads", "input"}.
    """
    device = pick_device(args.device)
    cnn = load_cnn(args.model, device)
    models = [("CNN (ours)", cnn), ("CNN, one view", OneView(cnn).eval()),
              ("ResNet-20", load_resnet20(args.weights).to(device))]
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    results = []
    for name, model in models:
        ms = 1000 * time_inference(model, x, args.warmup, args.iterations)
        results.append({"name": name, "mean_ms": float(ms.mean()), "median_ms": float(np.median(ms)),
                        "p95_ms": float(np.percentile(ms, 95))})
    return {"models": results, "device": str(device), "threads": torch.get_num_threads(),
            "input": "1 x 3 x 32 x 32", "warmup": args.warmup, "iterations": args.iterations}


def speed_lines(speed):
    lines = [f"device {speed['device']}, {speed['threads']} torch threads, input {speed['input']}, "
             f"{speed['warmup']} warm-up + {speed['iterations']} timed iterations",
             f"{'model':<14s} {'mean ms':>9s} {'median ms':>10s} {'p95 ms':>8s}"]
    lines += [f"{m['name']:<14s} {m['mean_ms']:9.3f} {m['median_ms']:10.3f} {m['p95_ms']:8.3f}"
              for m in speed["models"]]
    lines.append("CNN (ours) is the model as shipped: it also classifies the mirrored image and averages;"
                 " 'one view' skips that.")
    return lines


def speed(args):
    """`speed`: print and record inference_speed_test's figures."""
    result = inference_speed_test(args)
    lines = speed_lines(result)
    print("\n".join(lines))
    record(args, "speed", lines, result, pick_device(args.device))



# ----------------------------------------------------------------------------- report

TRAINING_OUTPUT = "(b) Output of training"


def read_record(path, maker, missing):
    """A JSON record, or None with the command that makes it noted in `missing`."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        missing.append(f"{Path(path).name} is missing: run `{maker}` to make it")
        return None


def made_by(rec):
    machine = rec["machine"]
    where = machine.get("gpu") or f"{machine['cpu']}, {machine['torch_threads']} threads"
    return f"made by `{rec['command']}` on {where} ({machine['device']}), torch {machine['torch']}"


def seconds_to_reach(history, accuracy):
    """Training seconds at the end of the first epoch whose test accuracy reaches `accuracy`."""
    return next((h["seconds"] for h in history if h["test_accuracy"] >= accuracy), None)


def gather_report(args):
    """Every section of the report as (heading, made-by line, text lines, image), from records."""
    model_dir, records_dir, out_dir = Path(args.model_dir), Path(args.records_dir), Path(args.out_dir)
    missing, sections, summary = [], [], []
    results = read_record(model_dir / RESULTS_FILE, "python CNNclassify.py train --seeds 0 1 2", missing)
    if results:
        runs = results["runs"]
        machine = results["machine"]
        summary.append(("machine (training)", f"{machine['cpu']}, {machine['cpu_count']} cores, "
                        f"{machine['torch_threads']} torch threads, {machine['device']}, torch {machine['torch']}"))
        summary.append(("CNN (ours) test accuracy", f"{results['mean']:.2f}% +/- {results['std']:.2f} "
                        f"(mean +/- numpy.std, seeds {', '.join(str(r['seed']) for r in runs)})"))
        seconds = [r["train_seconds"] for r in runs]
        summary.append(("CNN training time per seed", f"{np.mean(seconds):.0f} s mean, {max(seconds):.0f} s max "
                        f"({np.mean([r['images_per_second'] for r in runs]):.0f} images/s)"))
        reached = [seconds_to_reach(r["history"], 75.0) for r in runs]
        summary.append(("CNN first epoch end at >= 75% test accuracy", "not reached by every seed" if None in reached
                        else f"{max(reached):.0f} s at most ({', '.join(f'{t:.0f}' for t in reached)} s)"))
        sections.append(("(g) Seeds and final test accuracy", made_by(results), seed_table(results), None))
        plot = model_dir / "accuracy.png"
        if plot.exists():
            shutil.copyfile(plot, out_dir / "accuracy.png")
            sections.append(("(e) Train and test accuracy per epoch", made_by(results), [], "accuracy.png"))
        epochs = len(runs[0]["history"])
        lines = [f"$ {results['command']}"]
        lines += [epoch_line(r["seed"], h, epochs) for r in runs for h in r["history"]] + seed_table(results)
        sections.append((TRAINING_OUTPUT, made_by(results), lines, None))
    model_file = model_dir / MAIN_MODEL
    if model_file.exists():
        lines = classify_image(IMAGE_DIR / "car.png", load_cnn(model_file), out_dir / "CONV_rslt.png")
        summary.append(("test car.png", lines[0]))
        sections.append(("(b) Output of testing an image", "made by `report`, running `python CNNclassify.py "
                         "test car.png` on the model in model/", ["$ python CNNclassify.py test car.png"] + lines, None))
        sections.append(("(c) First conv layer for car.png (CONV_rslt.png)", "made by the same run", [], "CONV_rslt.png"))
    else:
        missing.append(f"{model_file} is missing: run `python CNNclassify.py train` to make it")
    resnet_records = sorted(records_dir.glob("resnet20_*.json"))
    if not resnet_records:
        missing.append("resnet20_*.json is missing: run `python CNNclassify.py resnet20` to make it")
    for path in resnet_records:
        rec = json.loads(path.read_text())
        summary.append((f"ResNet-20 ({Path(rec['weights']).name})", f"{rec['accuracy']:.2f}%"))
        sections.append((f"(d) ResNet-20 test accuracy, {Path(rec['weights']).name}", made_by(rec),
                         [f"$ {rec['command']}"] + rec["output"], None))
    rec = read_record(records_dir / "profile.json", "python CNNclassify.py profile", missing)
    if rec:
        for m in rec["models"]:
            summary.append((f"MACs / params: {m['name']}", f"{m['macs']:,} / {m['params']:,}"))
        sections.append(("(f) MACs and parameters (THOP)", made_by(rec), [f"$ {rec['command']}"] + rec["output"], None))
    rec = read_record(records_dir / "speed.json", "python CNNclassify.py speed", missing)
    if rec:
        for m in rec["models"]:
            summary.append((f"inference: {m['name']}", f"{m['mean_ms']:.3f} ms mean per image"))
        sections.append(("(h) Inference time, one image", made_by(rec), [f"$ {rec['command']}"] + rec["output"], None))
    return summary, sections, missing


def write_markdown(summary, sections, missing, path):
    out = ["# CNNclassify report", "", "Built by `python CNNclassify.py report` from the records of the "
           "commands below; no number is typed by hand.", "", "| item | result |", "| --- | --- |"]
    out += [f"| {k} | {v} |" for k, v in summary]
    for heading, source, lines, image in sections:
        out += ["", f"## {heading}", "", source + ".", ""]
        out += ["```", *lines, "```"] if lines else []
        out += [f"![{heading}]({image})"] if image else []
    out += ["", "## (a) Code", "", "[`CNNclassify.py`](../CNNclassify.py), printed in full at the end of report.pdf."]
    if missing:
        out += ["", "## Missing records", ""] + [f"- {m}" for m in missing]
    write_atomically(path, lambda tmp: Path(tmp).write_text("\n".join(out) + "\n"))


def text_pages(pdf, heading, lines, per_page=70, size=7.5):
    """Monospace text on A4 pages, as many as the lines need."""
    import matplotlib.pyplot as plt
    for start in range(0, max(len(lines), 1), per_page):
        fig = plt.figure(figsize=(8.27, 11.69))
        fig.text(0.05, 0.97, heading, fontsize=13, weight="bold", va="top")
        fig.text(0.05, 0.94, "\n".join(lines[start:start + per_page]), family="monospace",
                 fontsize=size, va="top")
        pdf.savefig(fig)
        plt.close(fig)


def write_pdf(summary, sections, missing, out_dir, path):
    """Title page with the summary, one page per item, then the code, all with matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    def write(tmp):
        with PdfPages(tmp, metadata={"CreationDate": None}) as pdf:  # same records, same bytes
            width = max([len(k) for k, _ in summary] + [10])
            text_pages(pdf, "CNNclassify report", [f"{k:<{width}s}  {v}" for k, v in summary]
                       + [""] + [f"missing: {m}" for m in missing], size=8)
            for heading, source, lines, image in sections:
                if image:
                    fig = plt.figure(figsize=(11.69, 8.27))
                    fig.text(0.04, 0.96, heading, fontsize=13, weight="bold", va="top")
                    fig.text(0.04, 0.92, source, fontsize=8, va="top")
                    ax = fig.add_axes([0.03, 0.03, 0.94, 0.85])
                    ax.imshow(plt.imread(out_dir / image))
                    ax.axis("off")
                    pdf.savefig(fig)
                    plt.close(fig)
                else:
                    wrapped = [source, ""] + [chunk for line in lines for chunk in
                                              [line[i:i + 120] for i in range(0, max(len(line), 1), 120)]]
                    text_pages(pdf, heading, wrapped, size=6.5 if len(lines) > 40 else 7.5)
            code = Path(__file__).read_text().splitlines()
            text_pages(pdf, "(a) Code: CNNclassify.py", [f"{i + 1:4d}  {line}" for i, line in enumerate(code)],
                       per_page=95, size=5.8)
    write_atomically(path, write)


def replace_between_markers(text, name, content):
    """Swap what stands between <!-- name:start --> and <!-- name:end --> for content."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    if start not in text or end not in text:
        return text
    before, rest = text.split(start, 1)
    return f"{before}{start}\n{content}\n{end}{rest.split(end, 1)[1]}"


def update_readme(summary, sections, path):
    """Rewrite README's results table and command outputs, so README never re-types a number."""
    text = path.read_text() if path.exists() else ""
    table = "\n".join(["| item | result |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in summary])
    outputs = []
    for heading, source, lines, image in sections:
        if lines and heading != TRAINING_OUTPUT:  # too long for README; the report has it
            outputs += [f"{heading} ({source}):", "", "```", *lines, "```", ""]
    text = replace_between_markers(text, "results", table)
    text = replace_between_markers(text, "outputs", "\n".join(outputs).rstrip())
    write_atomically(path, lambda tmp: Path(tmp).write_text(text))


def report(args):
    """`report`: report/report.md and report/report.pdf from the recorded results, and
    README's results table (with --readme)."""
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        summary, sections, missing = gather_report(args)
    except (KeyError, TypeError, json.JSONDecodeError) as error:
        raise UserError(f"a record is malformed ({type(error).__name__}: {first_line(error)}); "
                        "rerun the command that made it") from None
    write_markdown(summary, sections, missing, out_dir / "report.md")
    write_pdf(summary, sections, missing, out_dir, out_dir / "report.pdf")
    if args.readme:
        update_readme(summary, sections, Path(args.readme))
    for line in missing:
        log(line)
    print(f"wrote {out_dir / 'report.md'} and {out_dir / 'report.pdf'}")


# ----------------------------------------------------------------------------- command line

def add_common(parser, model=True):
    """Options several commands share."""
    if model:
        parser.add_argument("--model", default=str(MODEL_DIR / MAIN_MODEL), help="our CNN's model file")
    parser.add_argument("--records-dir", default=str(RECORDS_DIR), help="where the output is recorded for `report`")
    parser.add_argument("--device", help="cpu, cuda or mps (default: the fastest present)")


def build_parser():
    parser = argparse.ArgumentParser(prog="CNNclassify.py", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("train", help="train the CNN on CIFAR-10 and save it in model/")
    p.add_argument("--seed", type=int, default=0, help="seed for one run (default 0)")
    p.add_argument("--seeds", type=int, nargs="+", help="train once per seed, report mean and std")
    p.add_argument("--epochs", type=int, default=HYPERPARAMETERS["epochs"])
    p.add_argument("--batch-size", type=int, default=HYPERPARAMETERS["batch_size"],
                   help="lr and weight decay scale with it (default %(default)s)")
    p.add_argument("--subset", type=int, default=0,
                   help="use only the first N train and test images (quick checks)")
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/")
    p.add_argument("--model-dir", default=str(MODEL_DIR), help="where the model is saved")
    p.add_argument("--device", help="cpu, cuda or mps (default: the fastest present)")
    p.set_defaults(run=train)

    p = commands.add_parser("test", help="classify an image and save CONV_rslt.png")
    p.add_argument("image", help="image file (PNG, JPEG, BMP, WebP, TIFF, ...); bare names "
                                 "are also looked up in test_images/")
    p.add_argument("--out", default="CONV_rslt.png", help="where the conv-layer figure goes")
    p.add_argument("--model", default=str(MODEL_DIR / MAIN_MODEL), help="model file")
    p.add_argument("--device", help="cpu, cuda or mps (default: the fastest present)")
    p.set_defaults(run=test)

    p = commands.add_parser("resnet20", help="test accuracy of a pretrained ResNet-20")
    p.add_argument("--weights", default=RESNET20_URL,
                   help="checkpoint path or URL (default: the published option-A ResNet-20, cached by torch.hub)")
    p.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/")
    add_common(p, model=False)
    p.set_defaults(run=resnet20)

    p = commands.add_parser("profile", help="MACs and parameters of both models (THOP)")
    p.add_argument("--weights", default=RESNET20_URL, help="ResNet-20 checkpoint path or URL")
    add_common(p)
    p.set_defaults(run=profile_models)

    p = commands.add_parser("speed", help="single-image inference time of both models")
    p.add_argument("--weights", default=RESNET20_URL, help="ResNet-20 checkpoint path or URL")
    p.add_argument("--warmup", type=int, default=50, help="untimed iterations first (default 50)")
    p.add_argument("--iterations", type=int, default=1000, help="timed iterations (default 1000)")
    add_common(p)
    p.set_defaults(run=speed)

    p = commands.add_parser("report", help="build report/report.md and report/report.pdf from the records")
    p.add_argument("--model-dir", default=str(MODEL_DIR), help="where results.json and the model are")
    p.add_argument("--records-dir", default=str(RECORDS_DIR), help="where resnet20/profile/speed recorded")
    p.add_argument("--out-dir", default=str(REPORT_DIR), help="where the report goes")
    p.add_argument("--readme", help="also rewrite the results table between the markers in this README")
    p.set_defaults(run=report)
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        args.run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; files already saved are intact", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
