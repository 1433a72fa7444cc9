"""Shared test helpers: tiny synthetic datasets written in the real on-disk formats, so no test needs the network or
a real dataset."""

import gzip
import os
import struct
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_mnist(root, n_train=200, n_test=40, seed=0):
    """The four MNIST files as gzipped idx (magic 2051 images, 2049 labels) in torchvision's layout root/MNIST/raw."""
    rng = np.random.default_rng(seed)
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for prefix, n in [("train", n_train), ("t10k", n_test)]:
        images = np.zeros((n, 28, 28), np.uint8)  # a bright square at a random place: something to learn
        for k in range(n):
            r, c = rng.integers(2, 18, 2)
            images[k, r : r + 8, c : c + 8] = rng.integers(128, 256)
        with gzip.open(os.path.join(raw, f"{prefix}-images-idx3-ubyte.gz"), "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with gzip.open(os.path.join(raw, f"{prefix}-labels-idx1-ubyte.gz"), "wb") as f:
            f.write(struct.pack(">II", 2049, n) + rng.integers(0, 10, n, dtype=np.uint8).tobytes())
    return root


@pytest.fixture
def mnist_dir(tmp_path):
    return write_mnist(str(tmp_path / "data"))


def write_text8(root, n_chars=40_000, seed=0):
    """A text8.zip in the real format: one member 'text8' of spaces and a-z.
    Returns (path, zip bytes, text bytes, CRC-32)."""
    import zipfile
    import zlib

    rng = np.random.default_rng(seed)
    words = ["the", "of", "and", "one", "zero", "nine", "in", "a", "to", "is", "anarchism", "bayesian", "flow"]
    text = (" " + " ".join(rng.choice(words, n_chars // 3)))[:n_chars].encode()
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "text8.zip")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("text8", text)
    return path, os.path.getsize(path), len(text), zlib.crc32(text)


def write_cifar(root, n_per_batch=20, seed=0):
    """cifar-10-batches-py as python pickles: data_batch_1..5 and test_batch ({'data': (N, 3072) uint8, 'labels'})
    and batches.meta. The images are coloured squares on a dark background."""
    import pickle

    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        images = np.full((n_per_batch, 3, 32, 32), 20, np.uint8)
        for k in range(n_per_batch):
            r, c = rng.integers(0, 20, 2)
            images[k, :, r : r + 12, c : c + 12] = rng.integers(100, 256, (3, 1, 1))
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(
                {
                    "data": images.reshape(n_per_batch, 3072),
                    "labels": rng.integers(0, 10, n_per_batch).tolist(),
                    "batch_label": name,
                },
                f,
            )
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [str(k) for k in range(10)], "num_cases_per_batch": n_per_batch}, f)
    return root


@pytest.fixture
def cifar_dir(tmp_path):
    return write_cifar(str(tmp_path / "data"))


def cpu_context(out_dir="."):
    """A stand-in for the scripts' Context on the CPU, for calling their functions directly."""
    import contextlib
    import types

    import torch

    return types.SimpleNamespace(
        device=torch.device("cpu"),
        autocast=contextlib.nullcontext(),
        rank=0,
        world=1,
        out_dir=out_dir,
        log=lambda line: None,
    )
