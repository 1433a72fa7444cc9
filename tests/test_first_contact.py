"""What a newcomer meets first: stopping, devices, a run directory that remembers its settings, one-line errors for
every input mistake, readable logs and --help.

    python -m pytest -q tests/test_first_contact.py
"""

import importlib
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import bfn_cifar
import bfn_mnist
import bfn_text8
from conftest import ROOT, write_cifar, write_mnist
from test_training import NETS, TINY, load, open_or_empty, write_words


@pytest.fixture(params=[bfn_mnist, bfn_cifar, bfn_text8], ids=["mnist", "cifar", "text8"])
def script(request, tmp_path):
    """(module, data flags) of one of the three scripts with tiny data."""
    module = request.param
    if module is bfn_text8:
        return module, ["--text-file", write_words(tmp_path / "words.txt")]
    return module, ["--data-dir", (write_mnist if module is bfn_mnist else write_cifar)(str(tmp_path / "data"))]


def log_of(out):
    return open(os.path.join(out, "log.txt")).read()


# ---------------------------------------------------------------------------------------------------- stopping


def test_a_first_signal_stops_after_the_step_and_a_second_at_once(tmp_path):
    """A real process: the first SIGINT is answered at once ("stopping after step N"), the run then writes its
    checkpoint and exits with 75; in another run, a second signal right after the first ends it at once, the last
    checkpoint untouched."""
    flags = ["--data-dir", write_mnist(str(tmp_path / "data")), "--batch-size", "16", *TINY[2:]]

    def start(out):
        p = subprocess.Popen(
            [sys.executable, os.path.join(ROOT, "bfn_mnist.py"), *flags, "--out-dir", out, "--steps", "100000"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.time() + 120
        while "step 3 |" not in open_or_empty(os.path.join(out, "log.txt")) and time.time() < deadline:
            time.sleep(0.1)
        return p

    out = str(tmp_path / "once")
    p = start(out)
    p.send_signal(signal.SIGINT)
    stdout, _ = p.communicate(timeout=120)
    assert p.returncode == bfn_mnist.PREEMPTED and re.search(r"SIGINT: stopping after step \d+", stdout)
    assert "continue with --resume" in stdout
    out = str(tmp_path / "twice")
    p = start(out)
    p.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    start_time = time.time()
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGTERM and time.time() - start_time < 5  # ended at once by the default action
    assert "stopped by" not in log_of(out) and not os.path.exists(os.path.join(out, "ckpt.pt"))  # nothing written


def test_where_the_platform_lacks_a_signal_the_scripts_train_without_it(tmp_path, monkeypatch):
    """Windows has no SIGUSR1: the scripts stop on the signals the platform has and train as anywhere else (simulated
    here by removing SIGUSR1 and importing the script afresh)."""
    monkeypatch.delattr(signal, "SIGUSR1")
    try:
        module = importlib.reload(bfn_mnist)
        assert module.STOP_SIGNALS == [signal.SIGTERM, signal.SIGINT]
        out = str(tmp_path / "run")
        before = signal.getsignal(signal.SIGINT)
        flags = ["--data-dir", write_mnist(str(tmp_path / "data")), *NETS[module], *TINY, "--out-dir", out]
        module.main([*flags, "--steps", "2"])
        assert os.path.exists(os.path.join(out, "ckpt.pt")) and signal.getsignal(signal.SIGINT) is before
    finally:
        monkeypatch.undo()
        importlib.reload(bfn_mnist)
    assert signal.SIGUSR1 in bfn_mnist.STOP_SIGNALS


# ---------------------------------------------------------------------------------------------------- devices


@pytest.mark.parametrize("device", ["gpu", "cuda:7", "mps", "cuda"])
def test_a_device_that_is_not_here_is_one_line(device, tmp_path):
    if device == "cuda" and torch.cuda.is_available() or device == "mps" and torch.backends.mps.is_available():
        pytest.skip(f"this machine has {device}")
    with pytest.raises(SystemExit, match=f"--device {device} is not available here; available: cpu"):
        bfn_mnist.main(["--device", device, "--out-dir", str(tmp_path / "run")])
    assert not os.path.exists(tmp_path / "run")


# ---------------------------------------------------------------------------------------------------- run directories


def test_a_run_directory_remembers_its_settings(script, tmp_path):
    """--eval-only, --sample-only and --resume on a run directory take all its settings when none are given, and the
    flags given on top."""
    module, data = script
    out = str(tmp_path / "run")
    module.main(["--preset", "quick", *data, *NETS[module], *TINY, "--out-dir", out, "--steps", "2"])
    module.main(["--out-dir", out, "--eval-only"])
    result = json.load(open(os.path.join(out, "eval.json")))
    assert result["examples"] == 6 and set(result["n"]) == {"inf", "3"}  # the checkpoint's --eval-examples, --eval-n
    module.main(["--out-dir", out, "--sample-only", "--sample-steps", "2"])
    assert os.path.exists(os.path.join(out, "samples-paper-2.pt"))
    module.main(["--out-dir", out, "--resume", "--steps", "3"])
    assert load(out)["step"] == 3 and load(out)["config"]["lr"] == 1e-3 and load(out)["config"]["batch_size"] == 4


def test_init_from_a_checkpoint_of_another_script_says_which(tmp_path):
    out = str(tmp_path / "text")
    bfn_text8.main(
        ["--text-file", write_words(tmp_path / "words.txt"), *NETS[bfn_text8], *TINY, "--out-dir", out, "--steps", "1"]
    )
    with pytest.raises(SystemExit, match="is a checkpoint of bfn_text8.py"):
        bfn_mnist.main(
            [
                "--data-dir",
                write_mnist(str(tmp_path / "data")),
                "--init-from",
                os.path.join(out, "ckpt.pt"),
                "--out-dir",
                str(tmp_path / "mnist"),
            ]
        )


# ---------------------------------------------------------------------------------------------------- input errors


def test_every_input_mistake_is_one_line_and_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(SystemExit, match="--text-file .*empty.txt is empty"):
        bfn_text8.prepare(["--text-file", str(tmp_path / "empty.txt")])
    with pytest.raises(SystemExit, match="--text-file .*missing.txt does not exist"):
        bfn_text8.prepare(["--text-file", str(tmp_path / "missing.txt")])
    monkeypatch.chdir(tmp_path)  # the default data/ and runs/ folders, here
    with pytest.raises(SystemExit, match="--data-dir /no/such/dir does not exist"):
        bfn_mnist.main(["--data-dir", "/no/such/dir"])
    assert not os.path.exists("/no/such/dir")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    import torchvision
    import torchvision.datasets.utils

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", offline)
    expected = r"text8.zip \(31 MB\) failed .* Put text8.zip into data/ by hand, or train on any text with --text-file"
    with pytest.raises(SystemExit, match=expected):
        bfn_text8.main(["--preset", "quick"])
    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(SystemExit, match=r"downloading MNIST \(4 files, 11 MB\) from .* into data/MNIST/raw failed"):
        bfn_mnist.main(["--preset", "quick"])
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(SystemExit, match=r"downloading CIFAR-10 \(163 MB\) from https://www.cs.toronto.edu/.* failed"):
        bfn_cifar.main(["--preset", "quick"])
    assert set(os.listdir(tmp_path)) == {"empty.txt", "runs"}  # no data/ left behind; the runs' logs say what failed


# ---------------------------------------------------------------------------------------------------- logs and help


def test_each_run_in_the_log_starts_with_a_header_and_lines_are_timed(tmp_path):
    out = str(tmp_path / "run")
    flags = ["--data-dir", write_mnist(str(tmp_path / "data")), *NETS[bfn_mnist], *TINY, "--out-dir", out]
    bfn_mnist.main(flags + ["--steps", "1"])
    bfn_mnist.main(flags + ["--sample-only"])
    lines = log_of(out).splitlines()
    headers = [line for line in lines if " ==== " in line]
    assert len(headers) == 2 and all(
        re.match(
            r"\d\d:\d\d:\d\d ==== \d{4}-\d\d-\d\d \d\d:\d\d:\d\d \| python "
            r"bfn_mnist.py --data-dir .* \| cpu x 1$",
            h,
        )
        for h in headers
    )
    assert "--sample-only" in headers[1] and all(re.match(r"\d\d:\d\d:\d\d ", line) for line in lines)
    for name in ("eval.json", "samples.png", "samples-paper-3.pt", "evolution.png", "evolution.gif"):
        assert name in log_of(out) and os.path.exists(os.path.join(out, name))


def test_help_shows_choices_defaults_as_typed_and_the_presets_values(capsys):
    with pytest.raises(SystemExit):
        bfn_mnist.prepare(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "{paper,ode,sde}" in text and "(default: inf 10 100)" in text and "(default: )" not in text
    assert "U-Net base channels (a multiple of 8) (default: 128) (--preset quick: 32)" in text
    assert "--dropout" not in text and "usage: bfn_mnist.py" in text  # preset-only settings are not flags
