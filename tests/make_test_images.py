"""Write test_images/: the first image of each class in the CIFAR-10 test batch (as
<class>.png, and the first automobile again as car.png) plus the cat photo from shared/.

    python tests/make_test_images.py ../shared/cifar10 ../shared/photos/chelsea.png
"""
import shutil
import sys
from pathlib import Path

import cv2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import CNNclassify  # noqa: E402


def main(data_dir, photo):
    images, labels = CNNclassify.load_cifar(data_dir)["test"]
    out = CNNclassify.IMAGE_DIR
    out.mkdir(exist_ok=True)
    for label, name in enumerate(CNNclassify.CLASSES):
        index = int((labels == label).nonzero()[0])
        bgr = images[index].permute(1, 2, 0).numpy()[:, :, ::-1]
        cv2.imwrite(str(out / f"{name}.png"), bgr)
        if name == "automobile":
            cv2.imwrite(str(out / "car.png"), bgr)
        print(f"{name}.png  test_batch index {index}")
    shutil.copyfile(photo, out / "chelsea.png")


if __name__ == "__main__":
    main(*sys.argv[1:3])
