"""Regenerate the shipped .npz data from the data sets that scikit-learn bundles (no download).

- digits-{train,test}.npz: UCI optical digits, the 1,797 8x8 images, pixels scaled to [0, 1]
  (float32, shape (N, 64)), class ids (int64).
- cancer-{train,test}.npz: Wisconsin breast cancer, 569 tumours x 30 features standardized with
  the training split's mean and deviation (float32), y = 1 benign, 0 malignant (float32).
- diabetes-{train,test}.npz: 442 patients x 10 baseline features standardized (float32), y the
  disease progression after one year, standardized with the training split's statistics.
- digits-varlen-{train,test}.npz: the digits as sequences of rows of different lengths: from each
  image, 4 to 8 consecutive rows (a seeded length and offset), padded at the end to 8 rows of -1
  (float32, shape (N, 8, 8)); the class ids.
- digits-multi-{train,test}.npz: the digits for a model of two inputs and two outputs: `image`
  (the 64 pixels), `profile` (16 derived features: the mean of each row, then of each column),
  `digit` (the class id) and `ink` (the mean of the 64 pixels, float32 of shape (N, 1)).

Each set is split 80/20 with seed 0 (stratified for the classification sets). Run `make data`.
"""

from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits
from sklearn.model_selection import train_test_split

HERE = Path(__file__).resolve().parent


def standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean, std = train.mean(axis=0), train.std(axis=0)
    return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)


def save(name: str, x_train, x_test, y_train, y_test) -> None:
    np.savez_compressed(HERE / f"{name}-train.npz", x=x_train, y=y_train)
    np.savez_compressed(HERE / f"{name}-test.npz", x=x_test, y=y_test)
    print(f"{name}: train {x_train.shape}, test {x_test.shape}")


def varlen(x: np.ndarray, seed: int) -> np.ndarray:
    """Each (N, 64) image as 4 to 8 of its consecutive rows, padded at the end with rows of -1."""
    rng = np.random.default_rng(seed)
    images = x.reshape(-1, 8, 8)
    out = np.full_like(images, -1.0)
    lengths = rng.integers(4, 9, len(images))
    starts = rng.integers(0, 9 - lengths)
    for i, (n, s) in enumerate(zip(lengths, starts)):
        out[i, :n] = images[i, s:s + n]
    return out


def save_varlen() -> None:
    train, test = np.load(HERE / "digits-train.npz"), np.load(HERE / "digits-test.npz")
    save("digits-varlen", varlen(train["x"], 1), varlen(test["x"], 2), train["y"], test["y"])


def multi(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """The arrays of digits-multi for images x (N, 64) and class ids y."""
    images = x.reshape(-1, 8, 8)
    profile = np.concatenate([images.mean(axis=2), images.mean(axis=1)], axis=1)
    ink = x.mean(axis=1, keepdims=True)
    return {"image": x, "profile": profile.astype(np.float32), "digit": y,
            "ink": ink.astype(np.float32)}


def save_multi() -> None:
    for split in ("train", "test"):
        digits = np.load(HERE / f"digits-{split}.npz")
        arrays = multi(digits["x"], digits["y"])
        np.savez_compressed(HERE / f"digits-multi-{split}.npz", **arrays)
        print(f"digits-multi {split}: " + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))


def main() -> None:
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    save("digits", x_train, x_test, y_train, y_test)

    cancer = load_breast_cancer()
    x_train, x_test, y_train, y_test = train_test_split(cancer.data, cancer.target, test_size=0.2,
                                                        random_state=0, stratify=cancer.target)
    x_train, x_test = standardize(x_train, x_test)
    save("cancer", x_train, x_test, y_train.astype(np.float32), y_test.astype(np.float32))

    diabetes = load_diabetes()
    x_train, x_test, y_train, y_test = train_test_split(diabetes.data, diabetes.target, test_size=0.2,
                                                        random_state=0)
    x_train, x_test = standardize(x_train, x_test)
    y_train, y_test = standardize(y_train[:, None], y_test[:, None])
    save("diabetes", x_train, x_test, y_train, y_test)

    save_varlen()
    save_multi()


if __name__ == "__main__":
    main()
