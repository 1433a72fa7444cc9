"""Sample quality of what the experiment scripts and beyond/ write, against real test data: samples-*.pt of the
scripts, and inpaint-*.pt, prompt-*.pt, infill-*.pt, guided-*.pt and cf-guided-*.pt of beyond/. No downloads: the data
are the run's own (its --data-dir or --text-file, as saved with the samples, or as given here).

    python bfn_mnist.py --sample-only --sampler ode --sample-steps 10 --num-samples 500
    python benchmarks/score_samples.py runs/bfn_mnist/samples-ode-10.pt [more.pt ...] [--data-dir DIR]

Prints a line per file and writes its figures beside it (samples-ode-10.pt -> samples-ode-10.score.json).

Images: two small classifiers of different shapes and seeds (a: 3x3 kernels, 32 and 64 channels; b: 5x5 kernels, 16
and 32), each trained once on the run's training images (Adam, 2 epochs) and cached next to the data. For each: the
Fréchet distance between the features of the N samples and of N test images, with its spread (the standard deviation
over 20 bootstrap resamples of the samples); the fraction confidently classified (top probability > 0.9); the entropy
of the label histogram in bits. Test images get the same figures against N other test images: the real-vs-real floor.
Samples with labels (a conditional model, gradient guidance, inpainting: the originals' classes) are set against test
images of the same classes, and also get the accuracy, the Fréchet distance within each class, and the diversity
(within-class feature variance over the test images', averaged over the classes). Images of two digits are scored
digit by digit (a crop of each half's ink): confident when both are, right when both are, and each digit alone.

Text: the fraction of whole words of the samples found in the training text, their number, and the bits per character
of the samples under a character 5-gram model of the training text (Witten-Bell); the same for N test windows. With
--guide-word, the fraction of samples that contain it; for infilling, the filled-in words found in the training text.
"""

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import zlib

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CLASSIFIERS = {"a": (3, (32, 64), 0), "b": (5, (16, 32), 1)}  # kernel, widths, seed


class Classifier(nn.Module):
    """A small CNN: (B, c_in, H, W) -> (B, classes) logits; features(): its 128 penultimate features."""

    def __init__(self, c_in, classes, kernel=3, widths=(32, 64), pool=7):
        super().__init__()
        a, b = widths
        self.features = nn.Sequential(
            nn.Conv2d(c_in, a, kernel, padding=kernel // 2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(a, b, kernel, padding=kernel // 2),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(pool),
            nn.Flatten(),
            nn.Linear(pool * pool * b, 128),
            nn.ReLU(),
        )
        self.head = nn.Linear(128, classes)

    def forward(self, x):
        return self.head(self.features(x))


def script_of(saved):
    """The experiment script (module) that wrote a samples file."""
    import importlib

    return importlib.import_module(saved["script"][:-3])


def run_config(module, saved, data_dir=None, text_file=None):
    """The run's Config, from the settings saved with the samples; --data-dir and --text-file may point elsewhere."""
    config = {k: v for k, v in saved["config"].items() if k in module.Config.__dataclass_fields__}
    if data_dir:
        config["data_dir"] = data_dir
    if text_file:
        config["text_file"] = text_file
    return module.Config(**config)


def as_input(module, cfg, images, generator=None):
    """Classifier input of real images: MNIST binarised (B, 1, 28, 28), CIFAR quantised to the run's bins."""
    if module.SCRIPT == "bfn_mnist.py":
        return module.as_data(images, cfg, generator)[:, None].float()
    return module.as_data(images, cfg)


def classifier(module, cfg, kind, device):
    """Scoring classifier a or b of the run's training images (single digits for MNIST), trained once and cached next
    to the data."""
    mnist = module.SCRIPT == "bfn_mnist.py"
    images, labels = (module.load_mnist(cfg.data_dir) if mnist else module.load_cifar(cfg.data_dir))["train"]
    crc = zlib.crc32(labels.numpy().tobytes(), zlib.crc32(images.numpy().tobytes()))
    folder = os.path.join(cfg.data_dir, "MNIST" if mnist else "cifar-10-batches-py")
    path = os.path.join(folder, f"classifier-{kind}-{crc:08x}" + ("" if mnist else f"-k{cfg.bins}") + ".pt")
    kernel, widths, seed = CLASSIFIERS[kind]
    torch.manual_seed(seed)
    clf = Classifier(1 if mnist else 3, 10, kernel, widths, 7 if mnist else 8)
    if os.path.exists(path):
        clf.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return clf.to(device).eval()
    print(f"training classifier {kind} on {len(labels):,} images (once; cached as {path})", flush=True)
    clf, g = clf.to(device), torch.Generator(device).manual_seed(seed)
    images, labels, optimizer = images.to(device), labels.long().to(device), torch.optim.Adam(clf.parameters())
    epochs = [torch.randperm(len(images), generator=g, device=device) for _ in range(2)]  # 2 epochs
    for idx in torch.cat(epochs).split(128):
        x = as_input(module, cfg, images[idx], g)
        if not mnist:  # random horizontal flips
            x = torch.where(torch.rand(len(x), 1, 1, 1, generator=g, device=device) < 0.5, x.flip(-1), x)
        loss = F.cross_entropy(clf(x), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    with contextlib.suppress(OSError):  # a read-only data folder: trained again next time
        torch.save(clf.state_dict(), path)
    return clf.eval()


def digit_crops(x):
    """The two digits of 64x64 images of two, each a 28x28 crop centred on its half's ink.
    (B, 64, 64) -> (2, B, 28, 28)."""
    crops = []
    for half in (x[:, :, :32], x[:, :, 32:]):
        ink = half.float() + 1e-6  # (B, 64, 32)
        rows = (ink.sum(2) * torch.arange(64, device=x.device)).sum(1) / ink.sum((1, 2))  # centre of mass
        cols = (ink.sum(1) * torch.arange(32, device=x.device)).sum(1) / ink.sum((1, 2))
        padded = F.pad(half, (14, 14, 14, 14))  # (B, 92, 60): every crop fits
        top, left = rows.round().long().clamp(0, 63), cols.round().long().clamp(0, 31)
        crops.append(torch.stack([padded[b, top[b] : top[b] + 28, left[b] : left[b] + 28] for b in range(len(x))]))
    return torch.stack(crops)


def frechet_distance(a, b):
    """Fréchet distance between Gaussians fitted to two feature sets (N, D):
    |m_a - m_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64."""
    a, b = a.double(), b.double()
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    values, vectors = torch.linalg.eigh(cov_a)
    root_a = vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return ((a.mean(0) - b.mean(0)).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross).item()


@torch.no_grad()
def image_figures(clf, x):
    """Features (N, D), labels (N,) and {confident, label_entropy_bits} of classifier inputs x (N, C, H, W). Images of
    two digits (N, 1, 64, 64) are scored digit by digit (digit_crops): confident when both are, labelled with the
    number 00-99, their features side by side."""
    parts = digit_crops(x[:, 0])[:, :, None].float() if x.shape[-1] == 64 else x[None]  # (digits, N, C, H, W)
    logits = [torch.cat([clf(c) for c in part.split(500)]) for part in parts]
    feats = torch.cat([torch.cat([clf.features(c) for c in part.split(500)]) for part in parts], 1)
    confident = torch.stack([lg.softmax(-1).amax(-1) > 0.9 for lg in logits]).all(0)
    labels = sum(lg.argmax(-1) * 10 ** (len(logits) - 1 - k) for k, lg in enumerate(logits))
    p = torch.bincount(labels, minlength=10 ** len(logits)).double() / len(labels)
    return (
        feats,
        labels,
        {
            "confident": confident.float().mean().item(),
            "label_entropy_bits": 0.0 - (p[p > 0] * p[p > 0].log2()).sum().item(),
        },
    )


def total_variance(features):
    """The total variance of features (M, D): the trace of their covariance."""
    return torch.cov(features.double().T).trace()


def show(figures):
    """The float figures of a dict, for a line: "name value, ..."."""
    return ", ".join(f"{k} {v:.4g}" for k, v in figures.items() if isinstance(v, float))


def score_images(module, cfg, saved, device):
    """{samples: figures, test: figures} of image samples (see the module docstring)."""
    x, labels = saved["samples"].to(device), saved["labels"]
    x = x[:, None].float() if module.SCRIPT == "bfn_mnist.py" else x.float()  # classifier input (N, C, H, W)
    data = module.load_data(cfg, device)
    g = torch.Generator(device).manual_seed(cfg.seed + 1)
    reference, other = torch.zeros(len(x), dtype=torch.long), torch.zeros(len(x), dtype=torch.long)
    for c in [None] if labels is None else labels.unique().tolist():  # a test image of the same class for each sample
        mine = torch.arange(len(x)) if c is None else (labels == c).nonzero()[:, 0]
        idx = torch.arange(len(data["test"])) if c is None else (data["test_labels"].cpu() == c).nonzero()[:, 0]
        if 2 * len(mine) > len(idx):
            raise SystemExit(
                f"score_samples.py: error: {len(x)} samples need {2 * len(mine)} test images"
                f"{'' if c is None else f' of class {c}'}; the test split has {len(idx)}"
            )
        reference[mine], other[mine] = idx[: len(mine)], idx[len(mine) : 2 * len(mine)]  # and another: the floor
    test = as_input(module, cfg, data["test"][torch.cat([reference, other]).to(device)], g)
    labels = None if labels is None else labels.to(device)
    figures = {"samples": {}, "test": {}}
    for kind in "ab":
        clf, resample = classifier(module, cfg, kind, device), torch.Generator().manual_seed(cfg.seed)
        (f_s, l_s, s), (f_t, l_t, t) = image_figures(clf, x), image_figures(clf, test[: len(x)])
        f_o = image_figures(clf, test[len(x) :])[0]
        s["frechet"], t["frechet"] = frechet_distance(f_s, f_t), frechet_distance(f_o, f_t)
        s["frechet_spread"] = (
            torch.tensor(
                [
                    frechet_distance(f_s[torch.randint(len(f_s), (len(f_s),), generator=resample)], f_t)
                    for _ in range(20)
                ]
            )
            .std()
            .item()
        )
        classes = [] if labels is None else [c for c in labels.unique().tolist() if (labels == c).sum() > 1]
        for part, found, f in ((s, l_s, f_s), (t, l_t, f_o)) if labels is not None else ():
            part["accuracy"] = (found == labels).float().mean().item()
            if x.shape[-1] == 64:  # each digit on its own: the tens (left) and the units (right)
                part["accuracy_tens"] = (found // 10 == labels // 10).float().mean().item()
                part["accuracy_units"] = (found % 10 == labels % 10).float().mean().item()
            part["frechet_by_class"] = {str(c): frechet_distance(f[labels == c], f_t[labels == c]) for c in classes}
            part["diversity"] = float(
                sum(total_variance(f[labels == c]) / total_variance(f_t[labels == c]) for c in classes)
            ) / max(1, len(classes))
        for name, part in (("samples", s), ("test", t)):
            figures[name].update({f"{key}_{kind}": value for key, value in part.items()})
    return figures


def whole_words(text):
    """The words of a window that are whole: split at white space, without the first and last (cut by the edges)."""
    words = text.split()
    return words[1 if text[:1].strip() else 0 : len(words) - (1 if text[-1:].strip() else 0)]


def filled_words(pattern, text):
    """The words of text that overlap the underscores of pattern (text has the pattern's known characters)."""
    words, start = [], 0
    for word in text.split(" "):
        if word and "_" in pattern[start : start + len(word)]:
            words.append(word)
        start += len(word) + 1
    return words


def char_codes(text, chars):
    """A text as codes of its characters in `chars` (sorted, unique), len(chars) for a character not in it. (N,)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    table = np.array([ord(c) for c in chars], dtype=np.uint32)
    i = np.searchsorted(table, codes).clip(max=len(table) - 1)
    return torch.from_numpy(np.where(table[i] == codes, i, len(chars)).astype(np.int64))


class NGram:
    """A character n-gram model of a symbol sequence (N,), interpolated as Witten and Bell do: p_k(c | h) =
    (C(h c) + T(h) p_{k-1}(c | h')) / (C(h) + T(h)), with T(h) the number of distinct symbols seen after h, h' the
    context h without its oldest symbol, and p_0 = 1 / K (x's symbols: 0..K-1)."""

    def __init__(self, x, K, order=5):
        x = x.long().cpu()
        self.order, self.tables, self.K = order, [], K
        for k in range(1, order + 1):  # the k-grams as integers in base K, their contexts as the code // K
            codes = sum(x[j : len(x) - k + 1 + j] * K ** (k - 1 - j) for j in range(k))
            grams, counts = torch.unique(codes, return_counts=True)  # sorted
            contexts, which = torch.unique(grams // K, return_inverse=True)
            context_counts = torch.zeros(len(contexts), dtype=torch.long).index_add_(0, which, counts)
            followers = torch.bincount(which, minlength=len(contexts))
            self.tables.append((grams, counts, contexts, context_counts, followers))

    @staticmethod
    def lookup(keys, values, queries):
        """values[i] where keys[i] == query (keys sorted), else 0."""
        i = torch.searchsorted(keys, queries).clamp(max=len(keys) - 1)
        return torch.where(keys[i] == queries, values[i], torch.zeros_like(values[i]))

    def bits_per_char(self, windows):
        """Mean -log2 p of each symbol given the order - 1 before it, over every position that has them. (M, L) ->
        float."""
        w, K = windows.long().cpu(), self.K
        p = torch.full((len(w), w.shape[1] - self.order + 1), 1 / K, dtype=torch.float64)
        for k, (grams, counts, contexts, context_counts, followers) in enumerate(self.tables, start=1):
            start = self.order - k  # the k-gram ending at each scored position
            codes = sum(w[:, start + j : w.shape[1] - k + 1 + j] * K ** (k - 1 - j) for j in range(k))
            c_hc, c_h, t_h = (
                self.lookup(keys, values, q).double()
                for keys, values, q in (
                    (grams, counts, codes),
                    (contexts, context_counts, codes // K),
                    (contexts, followers, codes // K),
                )
            )
            p = torch.where(c_h > 0, (c_hc + t_h * p) / (c_h + t_h).clamp_min(1), p)
        return -p.log2().mean().item()


def score_text(module, cfg, saved):
    """{samples: figures, test: figures} of text samples (see the module docstring)."""
    texts, data = saved["texts"], module.load_data(cfg, torch.device("cpu"))
    train = module.decode(data["train"], module.symbols(cfg))
    windows = module.test_windows(dataclasses.replace(cfg, eval_examples=0), data)
    if len(windows) < len(texts):
        raise SystemExit(
            f"score_samples.py: error: {len(texts)} samples need as many test windows; the test split has "
            f"{len(windows)} of --seq-len {cfg.seq_len}"
        )
    chars = "".join(sorted(set(train)))
    ngram, vocabulary = NGram(char_codes(train, chars), len(chars) + 1), set(train.split())
    figures = {}
    real = [module.decode(w, module.symbols(cfg)) for w in windows[: len(texts)]]
    for name, part in (("samples", texts), ("test", real)):
        words = [w for text in part for w in whole_words(text)]
        length = min(map(len, part))
        figures[name] = {
            "spelling_accuracy": sum(w in vocabulary for w in words) / len(words) if words else math.nan,
            "words": len(words),
            "ngram_bits_per_char": ngram.bits_per_char(
                torch.stack([char_codes(text[:length], chars) for text in part])
            ),
        }
        if saved.get("guide_word"):
            figures[name]["has_word"] = sum(saved["guide_word"] in text for text in part) / len(part)
    if saved.get("infill"):
        filled = [w for text in texts for w in filled_words(saved["infill"], text)]
        figures["samples"]["filled_words"], figures["samples"]["filled_words_real"] = (
            len(filled),
            sum(w in vocabulary for w in filled),
        )
    return figures


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "files",
        nargs="+",
        help="samples-*.pt of a script, or inpaint-, prompt-, infill-, guided- and cf-guided-*.pt of beyond/",
    )
    p.add_argument("--data-dir", help="the run's data folder, if not where the run had it")
    p.add_argument("--text-file", help="the run's --text-file, if not where the run had it")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    results = {}
    for path in args.files:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            module = script_of(saved)
            assert "samples" in saved or "texts" in saved, "it holds no samples"
        except Exception as failure:
            raise SystemExit(
                f"score_samples.py: error: {path} is not a samples file of the scripts ({failure})"
            ) from None
        cfg = run_config(module, saved, args.data_dir, args.text_file)
        text = "texts" in saved
        figures = (
            score_text(module, cfg, saved) if text else score_images(module, cfg, saved, torch.device(args.device))
        )
        # the BFN's samplers end with one more call at t = 1; "ancestral" (bfn_vs_diffusion.py) makes one per step
        calls = cfg.sample_steps + (cfg.sampler != "ancestral")
        figures = {
            "file": path,
            "examples": len(saved["texts" if text else "samples"]),
            "sampler": cfg.sampler,
            "steps": cfg.sample_steps,
            "network_calls": calls,
            **figures,
        }
        with open(os.path.splitext(path)[0] + ".score.json", "w") as f:
            json.dump(figures, f, indent=1)
        print(
            f"{path} ({figures['examples']}, {cfg.sampler}, {cfg.sample_steps} steps) | samples: "
            f"{show(figures['samples'])} | test data: {show(figures['test'])}",
            flush=True,
        )
        results[path] = figures
    return results


if __name__ == "__main__":
    main()
