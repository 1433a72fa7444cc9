"""benchmarks/score_samples.py: its measures against closed forms and hand counts, and end to end on what each script
writes (tiny data in the real formats).

    python -m pytest -q tests/test_scoring.py
"""

import json
import math
import os
import sys

import pytest
import torch

import bfn_cifar
import bfn_mnist
import bfn_text8
from conftest import ROOT, write_cifar, write_mnist
from test_training import write_words

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
sys.path.insert(0, os.path.join(ROOT, "beyond"))
import classifier_free_guidance
import conditioning
import gradient_guidance
import score_samples as S

IMAGES = [
    "--channels",
    "8",
    "--res-blocks",
    "1",
    "--batch-size",
    "4",
    "--eval-examples",
    "4",
    "--eval-n",
    "inf",
    "--sample-steps",
    "3",
    "--log-every",
    "1",
    "--steps",
    "1",
]


def test_frechet_distance_of_gaussians_is_the_closed_form():
    """Feature sets whose sample mean is m and sample covariance diag(s^2) exactly: the distance between them is
    |m_a - m_b|^2 + sum (s_a - s_b)^2, and a rotation of both sets leaves it unchanged."""

    def points(m, s):  # 2D points m +- c s_i e_i, c^2 = (2D - 1) / 2: unbiased covariance exactly diag(s^2)
        d = len(m)
        offsets = math.sqrt((2 * d - 1) / 2) * torch.diag(torch.tensor(s, dtype=torch.float64))
        return torch.tensor(m, dtype=torch.float64) + torch.cat([offsets, -offsets])

    a, b = points([0.0, 1.0, 2.0], [1.0, 2.0, 0.5]), points([1.0, 1.0, 0.0], [3.0, 0.5, 0.5])
    expected = (1 + 0 + 4) + (4 + 2.25 + 0)
    assert S.frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert S.frechet_distance(a, a) == pytest.approx(0, abs=1e-9)
    rotation, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    assert S.frechet_distance(a @ rotation, b @ rotation) == pytest.approx(expected, rel=1e-9)


def test_digit_crops_centre_each_half():
    x = torch.zeros(2, 64, 64, dtype=torch.long)
    x[0, 10:18, 3:9] = 1  # left digit
    x[0, 40:50, 45:55] = 1  # right digit
    x[1, 30:38, 20:30] = 1
    x[1, 0:6, 58:64] = 1
    crops = S.digit_crops(x)  # (2, B, 28, 28)
    assert crops.shape == (2, 2, 28, 28)
    assert crops.sum((2, 3)).tolist() == [[48, 80], [100, 36]]  # every ink pixel of each half is inside its crop
    assert crops[1, 0, 10:20, 10:20].all()  # the 10x10 square, centred at (14.5, 14.5) in its crop, to the pixel


def test_ngram_model_is_witten_bell_by_hand():
    """Training text a b a b a c (symbols 1 2 1 2 1 3), order 2; the window a b c scores b after a and c after b."""
    ngram = S.NGram(torch.tensor([1, 2, 1, 2, 1, 3]), 27, order=2)
    p1 = lambda count: (count + 3 / 27) / (6 + 3)  # noqa: E731  unigrams: N = 6, T = 3 distinct symbols
    p_b_after_a = (2 + 2 * p1(2)) / (3 + 2)  # a is followed by b twice and c once: C(a) = 3, T(a) = 2
    p_c_after_b = (0 + 1 * p1(1)) / (2 + 1)  # b is followed by a twice: C(b) = 2, T(b) = 1; c was seen once
    expected = -(math.log2(p_b_after_a) + math.log2(p_c_after_b)) / 2
    assert ngram.bits_per_char(torch.tensor([[1, 2, 3]])) == pytest.approx(expected, rel=1e-12)


def test_words_and_characters():
    assert S.whole_words("xx the cat sa") == ["the", "cat"] and S.whole_words(" the cat ") == ["the", "cat"]
    assert S.filled_words("the ____ of x", "the catsup of x") == ["catsup"]
    assert S.filled_words("a ___ b", "a c d b") == ["c", "d"]  # a space drawn inside the gap
    assert S.char_codes("bad Ω", " abd").tolist() == [2, 1, 3, 0, 4]  # a character not in the set: its own code


def test_image_samples_end_to_end(tmp_path):
    """Unconditional MNIST samples: both classifiers trained once and cached, every figure in range, the real-vs-real
    floor beside them, the figures written beside the samples; a class-conditional run is scored class by class;
    more samples than test images of a class is one line."""
    data, out = write_mnist(str(tmp_path / "data")), str(tmp_path / "run")
    bfn_mnist.main(["--data-dir", data, "--out-dir", out, *IMAGES, "--num-samples", "8"])
    path = os.path.join(out, "samples-paper-3.pt")
    q = S.main([path])[path]
    assert q["examples"] == 8 and q["network_calls"] == 4 and json.load(open(path[:-3] + ".score.json")) == q
    for part in ("samples", "test"):
        for k in "ab":  # two classifiers of different shapes and seeds
            assert 0 <= q[part][f"confident_{k}"] <= 1 and 0 <= q[part][f"label_entropy_bits_{k}"] <= math.log2(10)
            assert q[part][f"frechet_{k}"] >= 0
    assert q["samples"]["frechet_spread_a"] >= 0 and q["samples"]["frechet_a"] != q["samples"]["frechet_b"]
    assert sorted(f for f in os.listdir(os.path.join(data, "MNIST")) if f.startswith("classifier-")) == [
        "classifier-a-" + f.split("-")[2] for f in os.listdir(os.path.join(data, "MNIST")) if "classifier-a" in f
    ] + ["classifier-b-" + f.split("-")[2] for f in os.listdir(os.path.join(data, "MNIST")) if "classifier-b" in f]
    counts = torch.bincount(bfn_mnist.load_mnist(data)["test"][1].long(), minlength=10)
    c = (counts >= 4).nonzero()[0, 0].item()  # a class with 2 + 2 test images
    cond = str(tmp_path / "cond")
    bfn_mnist.main(["--data-dir", data, "--out-dir", cond, *IMAGES, "--conditional", "--channels", "32"])
    classifier_free_guidance.main([cond, "--weight", "1", "--class", str(c), "--num-samples", "2"])
    path = os.path.join(cond, "cf-guided-paper-3-w1.pt")
    q = S.main([path])[path]
    assert 0 <= q["samples"]["accuracy_a"] <= 1 and list(q["samples"]["frechet_by_class_b"]) == [str(c)]
    assert q["test"]["accuracy_a"] >= 0 and "diversity_a" in q["samples"]
    classifier_free_guidance.main(
        [cond, "--weight", "1", "--class", str(c), "--num-samples", str(2 * counts[c].item() + 2)]
    )
    with pytest.raises(SystemExit, match=r"score_samples.py: error: \d+ samples need \d+ test images of class"):
        S.main([path])


def test_cifar_and_inpainting_samples_end_to_end(tmp_path):
    data, out = write_cifar(str(tmp_path / "data"), n_per_batch=60), str(tmp_path / "run")
    bfn_cifar.main(["--data-dir", data, "--out-dir", out, *IMAGES, "--bins", "16", "--num-samples", "4"])
    conditioning.main([out, "--region", "left"])  # completions of test images
    assert sorted(n for n in os.listdir(out) if n.endswith(".pt")) == [
        "ckpt.pt",
        "inpaint-left-paper-3-p1.pt",
        "samples-paper-3.pt",
    ]
    paths = [os.path.join(out, name) for name in ("samples-paper-3.pt", "inpaint-left-paper-3-p1.pt")]
    results = S.main(paths)
    assert all(0 <= results[p]["samples"]["confident_b"] <= 1 for p in paths)
    assert 0 <= results[paths[1]]["samples"]["accuracy_a"] <= 1  # against the originals' classes


def test_text_samples_end_to_end(tmp_path):
    """Real words and the 5-gram model on an untrained model's letter soup and on real text; the guide word; the
    filled-in words of an infilling."""
    text, out = write_words(tmp_path / "words.txt"), str(tmp_path / "run")
    flags = [
        "--layers",
        "2",
        "--heads",
        "2",
        "--width",
        "16",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--eval-examples",
        "4",
        "--eval-n",
        "inf",
        "--sample-steps",
        "3",
        "--num-samples",
        "4",
    ]
    bfn_text8.main(["--text-file", text, "--out-dir", out, *flags, "--steps", "1"])
    gradient_guidance.main([out, "--word", "flow", "--weight", "2"])
    conditioning.main([out, "--infill", "the ____ of"])
    plain, guided, infill = (
        os.path.join(out, n) for n in ("samples-paper-3.pt", "guided-paper-3-w2.pt", "infill-paper-3-p1.pt")
    )
    results = S.main([plain, guided, infill])
    q = results[plain]
    assert q["samples"]["words"] == 0 or 0 <= q["samples"]["spelling_accuracy"] <= 1  # no whole words: NaN
    assert q["test"]["spelling_accuracy"] == 1.0 and q["test"]["words"] > 0  # real words
    assert q["test"]["ngram_bits_per_char"] < q["samples"]["ngram_bits_per_char"]  # an untrained model's letter soup
    assert 0 <= results[guided]["samples"]["has_word"] <= 1 and "has_word" not in q["samples"]
    assert results[infill]["samples"]["filled_words"] >= results[infill]["samples"]["filled_words_real"] >= 0
    with pytest.raises(SystemExit, match="is not a samples file"):
        S.main([os.path.join(out, "ckpt.pt")])
