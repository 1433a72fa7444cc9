"""The training section the three scripts share: exact resume, preemption by a real signal, checked resume, redundant
checkpoints, failed writes, data fingerprints, out-of-memory messages, failures under torchrun, and presets.

    python -m pytest -q tests/test_training.py
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

import bfn_cifar
import bfn_mnist
import bfn_text8
from conftest import ROOT, write_cifar, write_mnist

TINY = ["--batch-size", "4", "--eval-examples", "6", "--eval-batch-size", "4", "--eval-n", "inf", "3", "--sample-steps",
        "3", "--num-samples", "4", "--log-every", "1"]
NETS = {bfn_mnist: ["--channels", "8", "--res-blocks", "1"], bfn_cifar: ["--channels", "8", "--res-blocks", "1"],
        bfn_text8: ["--layers", "2", "--heads", "2", "--width", "16", "--seq-len", "32"]}


def write_words(path, seed=0, n_words=4000):
    """A text file of spaces and a-z for --text-file."""
    import numpy as np
    words = ["the", "of", "and", "one", "zero", "nine", "in", "a", "to", "is", "bayesian", "flow"]
    path.write_text(" ".join(np.random.default_rng(seed).choice(words, n_words)))
    return str(path)


@pytest.fixture(params=[bfn_mnist, bfn_cifar, bfn_text8], ids=["mnist", "cifar", "text8"])
def script(request, tmp_path):
    """(module, flags): one of the three scripts with tiny data and a tiny network."""
    module = request.param
    if module is bfn_text8:
        data = ["--text-file", write_words(tmp_path / "words.txt")]
    else:
        writer = write_mnist if module is bfn_mnist else write_cifar
        data = ["--data-dir", writer(str(tmp_path / "data"))]
    return module, data + NETS[module] + TINY


def load(out, name="ckpt.pt"):
    return torch.load(os.path.join(out, name), weights_only=True)


def assert_same_weights(a, b):
    for key in ["model", "ema"]:
        for name, v in a[key].items():
            assert torch.equal(v, b[key][name]), f"{key}.{name}"


def test_resume_gives_the_same_weights(script, tmp_path):
    module, flags = script
    straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
    module.main(flags + ["--out-dir", straight, "--steps", "3"])
    module.main(flags + ["--out-dir", resumed, "--steps", "2"])
    module.main(flags + ["--out-dir", resumed, "--steps", "3", "--resume"])
    assert_same_weights(load(straight), load(resumed))
    assert load(straight)["optimizer"]["state"][0]["step"] == load(resumed)["optimizer"]["state"][0]["step"] == 3


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_preemption_signal_saves_and_resume_is_exact(tmp_path, sig):
    """A real signal, sent to a running training process at a step the test does not choose: it finishes the step,
    writes the checkpoint, says how to resume and exits with its own code; resuming gives the uninterrupted weights."""
    flags = ["--data-dir", write_mnist(str(tmp_path / "data"))] + NETS[bfn_mnist] + TINY
    out = str(tmp_path / "run")
    cmd = [sys.executable, os.path.join(ROOT, "bfn_mnist.py"), *flags, "--out-dir", out, "--steps", "100000"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # threads as in this process
    deadline = time.time() + 120
    while "step 3 |" not in open_or_empty(os.path.join(out, "log.txt")) and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == bfn_mnist.PREEMPTED, stderr[-2000:]
    stopped = load(out)["step"]
    assert 3 <= stopped < 100000
    assert f"preempted by {sig.name} after step {stopped}" in stdout and "--resume" in stdout
    bfn_mnist.main(flags + ["--out-dir", out, "--steps", str(stopped + 2), "--resume"])
    straight = str(tmp_path / "straight")
    bfn_mnist.main(flags + ["--out-dir", straight, "--steps", str(stopped + 2)])
    assert_same_weights(load(straight), load(out))


def open_or_empty(path):
    return open(path).read() if os.path.exists(path) else ""


def test_resume_refuses_other_model_settings_and_logs_safe_changes(script, tmp_path):
    module, flags = script
    out = str(tmp_path / "run")
    module.main(flags + ["--out-dir", out, "--steps", "1"])
    size_flag = "--width" if module is bfn_text8 else "--channels"
    schedule_flag = "--sigma-1" if module is bfn_cifar else "--beta-1"
    with pytest.raises(SystemExit) as e:
        module.main(flags + ["--out-dir", out, "--steps", "2", "--resume", size_flag, "24", schedule_flag, "0.5"])
    message = str(e.value)
    assert f"{size_flag} {16 if module is bfn_text8 else 8} in the checkpoint, 24 now" in message
    assert f"{schedule_flag} " in message and "0.5 now" in message and "\n" not in message
    module.main(flags + ["--out-dir", out, "--steps", "2", "--resume", "--eval-n", "inf", "--sample-steps", "2"])
    log = open(os.path.join(out, "log.txt")).read()
    assert "changed since the checkpoint: --steps 1 -> 2, --eval-n" in log and "--sample-steps 3 -> 2" in log
    assert load(out)["step"] == 2


def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path):
    flags = ["--data-dir", write_mnist(str(tmp_path / "data"))] + NETS[bfn_mnist] + TINY
    out, straight = str(tmp_path / "run"), str(tmp_path / "straight")
    bfn_mnist.main(flags + ["--out-dir", out, "--steps", "2", "--ckpt-every", "1"])
    assert load(out, "ckpt-prev.pt")["step"] == 1 and load(out)["step"] == 2
    path = os.path.join(out, "ckpt.pt")
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: len(blob) // 2])  # truncated, as by a crash of the file system
    bfn_mnist.main(flags + ["--out-dir", out, "--steps", "3", "--resume"])
    log = open(os.path.join(out, "log.txt")).read()
    assert f"warning: {path} is unreadable" in log and "using the previous checkpoint" in log
    bfn_mnist.main(flags + ["--out-dir", straight, "--steps", "3"])
    assert_same_weights(load(straight), load(out))  # resumed from step 1, it still ends where the straight run does


def test_no_readable_checkpoint_fails_clearly(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit, match="no checkpoint in .* to resume, evaluate or sample from"):
        bfn_mnist.main(["--data-dir", write_mnist(str(tmp_path / "data")), *NETS[bfn_mnist], *TINY,
                        "--out-dir", str(out), "--eval-only"])


def test_a_failed_checkpoint_write_stops_and_keeps_the_last_good_one(tmp_path, monkeypatch):
    flags = ["--data-dir", write_mnist(str(tmp_path / "data"))] + NETS[bfn_mnist] + TINY
    out = str(tmp_path / "run")
    bfn_mnist.main(flags + ["--out-dir", out, "--steps", "1"])

    def disk_full(obj, path):
        open(path, "wb").write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit, match=r"writing the checkpoint .*ckpt.pt failed \(\[Errno 28\] No space left"):
        bfn_mnist.main(flags + ["--out-dir", out, "--steps", "3", "--resume"])
    assert load(out)["step"] == 1 and not os.path.exists(os.path.join(out, "ckpt.pt.tmp"))


def test_resume_on_a_different_text_file_stops(tmp_path):
    flags = NETS[bfn_text8] + TINY
    out = str(tmp_path / "run")
    bfn_text8.main(flags + ["--text-file", write_words(tmp_path / "a.txt", seed=0), "--out-dir", out, "--steps", "1"])
    with pytest.raises(SystemExit, match="the checkpoint was trained on other data"):
        other = write_words(tmp_path / "b.txt", seed=1)
        bfn_text8.main(flags + ["--text-file", other, "--out-dir", out, "--steps", "2", "--resume"])
    same = write_words(tmp_path / "c.txt", seed=0)  # the same text under another name resumes
    bfn_text8.main(flags + ["--text-file", same, "--out-dir", out, "--steps", "2", "--resume"])
    assert load(out)["step"] == 2


def test_out_of_memory_names_the_batch_flags(tmp_path, monkeypatch):
    def oom(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bfn_mnist, "train_loss", oom)
    with pytest.raises(SystemExit) as e:
        bfn_mnist.main(["--data-dir", write_mnist(str(tmp_path / "data")), *NETS[bfn_mnist], *TINY,
                        "--out-dir", str(tmp_path / "run"), "--steps", "2", "--grad-accum", "2"])
    message = str(e.value)
    assert "out of memory on cpu" in message and "Tried to allocate 2.00 GiB" in message
    assert "--batch-size 4" in message and "--grad-accum 2" in message and "--eval-batch-size 4" in message


FAILING = """
import os, sys
sys.path.insert(0, {root!r})
import bfn_mnist
rank = int(os.environ["RANK"])
if {where!r} == "eval" and rank == 0:
    def evaluate(*args, **kwargs):
        raise RuntimeError("injected failure in evaluation")
    bfn_mnist.evaluate = evaluate
if {where!r} == "train" and rank == 1:
    real, calls = bfn_mnist.train_loss, []
    def train_loss(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure in training")
        return real(*args)
    bfn_mnist.train_loss = train_loss
bfn_mnist.main(sys.argv[1:])
"""


@pytest.mark.parametrize("where,rank", [("eval", 0), ("train", 1)])
def test_a_failure_on_one_process_ends_all_of_them(tmp_path, where, rank):
    """Under torchrun (gloo on CPU): an exception on any rank ends every process within a minute, not an hour's wait,
    and the run's log says which process stopped and why."""
    wrapper = tmp_path / "failing.py"
    wrapper.write_text(textwrap.dedent(FAILING.format(root=ROOT, where=where)))
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(wrapper),
           "--data-dir", write_mnist(str(tmp_path / "data")), *NETS[bfn_mnist], *TINY, "--out-dir", out, "--steps", "5",
           "--eval-every", "1", "--device", "cpu"]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0 and time.time() - t0 < 60
    cause = "evaluation" if rank == 0 else "training"
    log = open(os.path.join(out, "log.txt")).read()
    assert f"process {rank} of 2 stopped: RuntimeError: injected failure in {cause}" in log


# ---------------------------------------------------------------------------------------------------------- presets

QUICK = {  # the README's quick commands, flag for flag
    bfn_mnist: "--channels 32 --res-blocks 1 --dropout 0 --lr 1e-3 --lr-warmup 100 --lr-decay cosine --batch-size 32 "
               "--steps 1600 --eval-every 0 --sample-every 0 --eval-examples 2000",
    bfn_cifar: "--bins 16 --channels 32 --res-blocks 2 --dropout 0 --batch-size 16 --lr 1e-3 --steps 2400 "
               "--eval-every 0 --sample-every 0 --eval-examples 500 --sample-steps 100",
    bfn_text8: "--layers 4 --heads 4 --width 128 --seq-len 32 --batch-size 16 --lr 1e-3 --steps 17904 --eval-every 0 "
               "--sample-every 0 --eval-examples 1000 --num-samples 4 --sample-steps 100",
}


@pytest.mark.parametrize("module", [bfn_mnist, bfn_cifar, bfn_text8], ids=["mnist", "cifar", "text8"])
def test_the_quick_preset_is_the_measured_recipe_and_flags_win(module):
    quick = module.parse_args(["--preset", "quick"])
    assert quick == module.parse_args(["--preset", "quick", *QUICK[module].split()])
    assert module.parse_args(QUICK[module].split()).__dict__ | {"preset": "quick"} == quick.__dict__
    assert module.parse_args(["--preset", "paper"]) == module.parse_args([])
    mine = module.parse_args(["--preset", "quick", "--steps", "7", "--lr", "3e-4"])
    assert (mine.steps, mine.lr, mine.batch_size) == (7, 3e-4, quick.batch_size)
    assert [k for k, v in mine.__dict__.items() if v != quick.__dict__[k]] == ["steps", "lr"]


def test_a_bad_preset_fails_clearly(capsys):
    with pytest.raises(SystemExit) as e:
        bfn_text8.parse_args(["--preset", "fast"])
    assert e.value.code == 2 and "--preset takes paper or quick, got fast" in capsys.readouterr().err


def test_the_quick_preset_end_to_end(script, tmp_path):
    """The preset's network and batch, on tiny data, for two steps: the log names the preset and the changed flags."""
    module, flags = script
    data = flags[:2]
    out = str(tmp_path / "run")
    short = ["--steps", "2", "--eval-examples", "4", "--num-samples", "2", "--sample-steps", "2"]
    module.main(["--preset", "quick", *data, "--out-dir", out, *short])
    log = open(os.path.join(out, "log.txt")).read()
    header, settings = [line for line in log.splitlines() if "====" in line or "settings beyond" in line]
    assert "--preset quick" in header and "--steps 2 " in settings and "--lr 0.001" in settings
    assert load(out)["config"]["lr"] == 1e-3


def test_a_paper_size_model_on_a_cpu_says_what_a_step_costs(tmp_path):
    out = str(tmp_path / "run")
    bfn_mnist.main(["--data-dir", write_mnist(str(tmp_path / "data")), "--out-dir", out, "--batch-size", "2", "--steps",
                    "1", "--eval-n", "inf", "--eval-examples", "2", "--num-samples", "1", "--sample-steps", "1"])
    log = open(os.path.join(out, "log.txt")).read()
    assert "parameters: 24.81M" in log and "plan: ≈" in log and " s per step (timed on 4 and 8 examples), ≈" in log
    assert "; --preset quick trains a small model in minutes" in log
    assert "step 1 | loss" in log and "ETA" in log


def test_the_first_log_line_comes_early(tmp_path):
    out = str(tmp_path / "run")
    bfn_mnist.main(["--data-dir", write_mnist(str(tmp_path / "data")), *NETS[bfn_mnist], *TINY, "--out-dir", out,
                    "--steps", "12", "--log-every", "1000"])
    steps = [line[9:].split(" |")[0] for line in open(os.path.join(out, "log.txt")) if line[9:].startswith("step ")]
    assert int(steps[0].split()[1]) <= 10 and steps[-1] == "step 12"


# ---------------------------------------------------------------------------------------------------------- schedule

def test_the_learning_rate_schedule():
    cfg = bfn_mnist.parse_args(["--lr", "1", "--lr-warmup", "10", "--steps", "110", "--lr-final", "0.1"])
    assert [bfn_mnist.learning_rate(s, cfg) for s in (0, 4, 9, 10, 60, 109)] == pytest.approx([0.1, 0.5, 1, 1, 1, 1])
    cfg.lr_decay = "cosine"  # the middle of the decay is halfway between 1 and 0.1; it ends at 0.1
    assert [bfn_mnist.learning_rate(s, cfg) for s in (10, 60, 110)] == pytest.approx([1, 0.55, 0.1])
    cfg.lr_decay = "linear"
    assert [bfn_mnist.learning_rate(s, cfg) for s in (35, 60, 85)] == pytest.approx([0.775, 0.55, 0.325])
    assert bfn_mnist.parse_args([]).lr_decay == "none" and bfn_mnist.parse_args([]).lr_warmup == 0  # the paper's


def test_resume_with_a_schedule_gives_the_same_weights(tmp_path):
    flags = ["--data-dir", write_mnist(str(tmp_path / "data"))] + NETS[bfn_mnist] + TINY + [
        "--lr-warmup", "2", "--lr-decay", "cosine", "--lr", "1e-3"]
    straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
    bfn_mnist.main(flags + ["--out-dir", straight, "--steps", "4"])
    bfn_mnist.main(flags + ["--out-dir", resumed, "--steps", "4", "--ckpt-every", "1"])
    os.replace(os.path.join(resumed, "ckpt-prev.pt"), os.path.join(resumed, "ckpt.pt"))  # back to step 3
    bfn_mnist.main(flags + ["--out-dir", resumed, "--steps", "4", "--resume"])
    assert_same_weights(load(straight), load(resumed))
    assert "| lr 0.0005 |" in open(os.path.join(straight, "log.txt")).read()  # step 1 of a 2-step warm-up


def test_freed_memory_stays_in_the_process_on_glibc():
    """mallopt accepted every setting (it returns 1 on success); the speed-up itself is measured, not tested."""
    import platform
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("only glibc's allocator returns freed blocks eagerly")
    assert bfn_mnist.keep_freed_memory() and bfn_cifar.keep_freed_memory() and bfn_text8.keep_freed_memory()


# ---------------------------------------------------------------------------------------------------------- init-from

def test_init_from_loads_the_weights_with_a_fresh_optimiser(script, tmp_path):
    module, flags = script
    source, tuned, scored = str(tmp_path / "source"), str(tmp_path / "tuned"), str(tmp_path / "scored")
    module.main(flags + ["--out-dir", source, "--steps", "2"])
    ckpt = os.path.join(source, "ckpt.pt")
    cfg = module.parse_args(flags + ["--out-dir", tuned, "--init-from", ckpt])
    ctx = module.setup(cfg)
    model, ema, optimizer = module.build(cfg, ctx.device)
    data_id = module.fingerprint(module.load_data(cfg, ctx.device))
    assert module.restore(cfg, ctx, module.read_checkpoint(cfg, ctx), model, ema, optimizer, data_id) == 0
    assert_same_weights(load(source), {"model": model.state_dict(), "ema": ema.state_dict()})
    module.main(flags + ["--out-dir", tuned, "--steps", "1", "--init-from", ckpt, "--lr", "1e-3"])  # fine-tune
    assert load(tuned)["step"] == 1 and load(tuned)["optimizer"]["state"][0]["step"] == 1  # a fresh AdamW
    assert "weights from" in open(os.path.join(tuned, "log.txt")).read()
    module.main(flags + ["--out-dir", scored, "--eval-only", "--init-from", ckpt])  # no checkpoint of its own needed
    assert os.path.exists(os.path.join(scored, "eval.json"))


def test_init_from_refuses_what_does_not_fit(tmp_path, capsys):
    flags = ["--data-dir", write_mnist(str(tmp_path / "data"))] + NETS[bfn_mnist] + TINY
    source = str(tmp_path / "source")
    bfn_mnist.main(flags + ["--out-dir", source, "--steps", "1"])
    ckpt = os.path.join(source, "ckpt.pt")
    run = flags + ["--out-dir", str(tmp_path / "run"), "--steps", "1"]
    with pytest.raises(SystemExit, match="--channels 8 in the checkpoint, 16 now"):
        bfn_mnist.main(run + ["--init-from", ckpt, "--channels", "16"])
    authors = str(tmp_path / "authors.pt")
    torch.save({"net.conv_in.weight": torch.zeros(3)}, authors)
    fits = r"authors.pt does not fit this network: tensor conv_in.weight is \(3,\) there, not in this network here"
    with pytest.raises(SystemExit, match=fits):
        bfn_mnist.main(run + ["--init-from", authors])
    other = str(tmp_path / "other.pt")
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(SystemExit, match="neither a checkpoint of bfn_mnist.py nor one of the authors' release"):
        bfn_mnist.main(run + ["--init-from", other])
    state = load(source)
    state["model"]["out.2.weight"] = torch.zeros(2, 8, 3, 3)
    torch.save(state, other)
    with pytest.raises(SystemExit, match=r"tensor out.2.weight is \(2, 8, 3, 3\) there, \(8, 8, 3, 3\) here"):
        bfn_mnist.main(run + ["--init-from", other])
    with pytest.raises(SystemExit, match="no such file"):
        bfn_mnist.main(run + ["--init-from", str(tmp_path / "missing.pt")])
    with pytest.raises(SystemExit):
        bfn_mnist.parse_args(["--resume", "--init-from", ckpt])
    assert "--resume and --init-from exclude each other" in capsys.readouterr().err
