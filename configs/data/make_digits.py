"""Regenerate digits-train.npz and digits-test.npz from scikit-learn's UCI optical digits.

The 1,797 8x8 images, pixel values scaled to [0, 1] (float32, shape (N, 64)), class ids int64;
a fixed stratified split of 20% for testing (seed 0). Run with `make data`.
"""

from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent


def main() -> None:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0,
                                                        stratify=y)
    np.savez_compressed(HERE / "digits-train.npz", x=x_train, y=y_train)
    np.savez_compressed(HERE / "digits-test.npz", x=x_test, y=y_test)
    print(f"train {x_train.shape}, test {x_test.shape}")


if __name__ == "__main__":
    main()
