"""What the commands in beyond/ share: opening a run directory of any of the three scripts through that script's own
functions, with the script's sampling flags (--sampler, --sample-steps, --num-samples, --batch-size, --seed, --device)
on top of the run's settings; the classes of guided samples; image grids."""

import datetime
import importlib
import os
import shlex
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def open_run(run_dir, flags, command, argv):
    """(script, cfg, runtime, net): the script module that wrote run_dir/ckpt.pt, the run's settings with the flags
    given on top, the script's device and log (into run_dir/log.txt, after a header line with the command), and the
    EMA network. command: this file's name, for messages; argv: its arguments, for the header."""
    path = os.path.join(run_dir, "ckpt.pt")
    if not os.path.exists(path):
        raise SystemExit(f"{command}: error: {path} does not exist; give the run directory of a trained model")
    try:
        name = torch.load(path, map_location="cpu", weights_only=True)["script"]
        script = importlib.import_module(name.removesuffix(".py"))
    except Exception as failure:
        raise SystemExit(f"{command}: error: {path} is not a checkpoint of the scripts ({failure})") from None
    cfg, runtime, ckpt = script.prepare([*flags, "--out-dir", run_dir, "--sample-only"])
    arguments = shlex.join(sys.argv[1:] if argv is None else argv)
    runtime.log(
        f"==== {datetime.datetime.now():%Y-%m-%d %H:%M:%S} | python beyond/{command} {arguments} | {runtime.device}"
    )
    _, ema, _, _ = script.build(cfg, runtime, ckpt)
    return script, cfg, runtime, ema


def class_labels(classes, n, device):
    """The class of each of about n samples: each of `classes` n / len(classes) times (at least once), in turn."""
    each = max(1, n // len(classes))
    return torch.tensor(classes, device=device).repeat_interleave(each), each


def save_images(script, x, path, nrow):
    """Image samples (N, H, W) of pixel classes (MNIST: ink black) or (N, 3, H, W) in [-1, 1] (CIFAR) as a grid."""
    from torchvision.utils import save_image

    if script.SCRIPT == "bfn_mnist.py":
        save_image(1 - x[:, None].float(), path, nrow=nrow, pad_value=0.5)
    else:
        save_image((x.clamp(-1, 1) + 1) / 2, path, nrow=nrow, pad_value=1)
