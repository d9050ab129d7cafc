"""`test` on many images in one call against one image per call: the wall time of whole commands
(start-up included), median of --repeats runs each; 100 CIFAR-10 test images written as PNG files.

    python bench/many_images.py --data-dir ../shared/cifar10 > bench/many_images_cpu_2core.txt
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import CNNclassify as C  # noqa: E402


def seconds(args, repeats):
    """Median wall seconds of `python CNNclassify.py ARGS`, which must succeed."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "CNNclassify.py"), *map(str, args)], check=True,
                       capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    images, labels = C.load_cifar(args.data_dir)["test"]
    machine = C.machine_description(C.torch.device("cpu"), C.choose_format(C.torch.device("cpu"), "auto")[0])
    with tempfile.TemporaryDirectory() as folder:
        single, many = Path(folder) / "single", Path(folder) / "many"
        single.mkdir()
        many.mkdir()
        for i in range(args.images):
            name = f"{C.CLASSES[int(labels[i])]}_{i:04d}.png"
            cv2.imwrite(str(many / name), images[i].permute(1, 2, 0).numpy()[:, :, ::-1])
        cv2.imwrite(str(single / name), images[i].permute(1, 2, 0).numpy()[:, :, ::-1])
        classic = seconds(["test", single / name, "--out", Path(folder) / "maps.png"], args.repeats)
        one = seconds(["test", single, many / name], args.repeats)  # the many-image path, two images
        hundred = seconds(["test", many], args.repeats)
    print(f"machine: {machine['cpu']}, {machine['torch_threads']} torch threads, torch {machine['torch']}, "
          f"{machine['precision']}; median of {args.repeats} runs of each whole command")
    print(f"{'command':<48s} {'seconds':>8s}")
    print(f"{'test ONE.png (one image and its CONV_rslt.png)':<48s} {classic:8.2f}")
    print(f"{'test FOLDER_OF_1 TWO.png (2 images, no maps)':<48s} {one:8.2f}")
    print(f"{f'test FOLDER ({args.images} images, no maps)':<48s} {hundred:8.2f}")
    per_image = (hundred - one) / (args.images - 2)
    print(f"{args.images} images in one call: start-up + {1000 * per_image:.1f} ms per image "
          f"(one call per image: {classic:.2f} s each)")


if __name__ == "__main__":
    main()
