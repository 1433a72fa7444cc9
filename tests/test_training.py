"""The run machinery the three scripts share: its size and sameness, exact resume, preemption by a real signal,
refusal of other model settings, redundant checkpoints, out-of-memory messages, torchrun, presets, schedules and
--init-from.

    python -m pytest -q tests/test_training.py
"""

import ast
import dataclasses
import os
import re
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
import common
from conftest import ROOT, write_cifar, write_mnist

TINY = [
    "--batch-size",
    "4",
    "--eval-examples",
    "6",
    "--eval-n",
    "inf",
    "3",
    "--sample-steps",
    "3",
    "--num-samples",
    "4",
    "--log-every",
    "1",
]
NETS = {
    bfn_mnist: ["--channels", "8", "--res-blocks", "1"],
    bfn_cifar: ["--channels", "8", "--res-blocks", "1"],
    bfn_text8: ["--layers", "2", "--heads", "2", "--width", "16", "--seq-len", "32"],
}


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


SCRIPTS = ["bfn_mnist.py", "bfn_cifar.py", "bfn_text8.py"]


def formatted(name):
    """The lines of a file as ruff formats it at 120 columns (the budgets count these, so packing cannot meet them)."""
    path = os.path.join(ROOT, name)
    run = subprocess.run([sys.executable, "-m", "ruff", "format", "--line-length", "120", "-"], input=open(path).read(),
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, f"ruff, a development dependency, formats the code: {run.stderr[-500:]}"
    return run.stdout.splitlines()


def machinery(lines):
    """The run machinery: from its banner's line "the same in every script" to the end."""
    return lines[next(i for i, line in enumerate(lines) if "same in every script" in line) :]


def shared_functions(module, names):
    """The source of the named functions of a script, which the three scripts share above their machinery."""
    tree = ast.parse(open(module.__file__).read())
    source = open(module.__file__).read()
    return {n.name: ast.get_source_segment(source, n) for n in tree.body if getattr(n, "name", None) in names}


def test_the_scripts_keep_their_budgets_and_share_their_machinery():
    """The budgets, on formatted code: each script <= 850 lines and <= 35 flags, its machinery <= 200 lines
    and the same in the three, as are the settings' helpers, the flags, the recipe and the shared writers; common.py
    <= 650 lines, its paper's samplers <= 15 lines each; each file of beyond/ <= 350 lines."""
    first = machinery(formatted(SCRIPTS[0]))
    shared = ["error", "setting", "parse_flags", "make_optimizer", "optimizer_step", "check_memory"]
    for name, module in zip(SCRIPTS, (bfn_mnist, bfn_cifar, bfn_text8)):
        lines = formatted(name)
        assert len(lines) <= 850 and len(machinery(lines)) <= 200, (name, len(lines), len(machinery(lines)))
        assert machinery(lines) == first, name
        assert shared_functions(module, shared) == shared_functions(bfn_mnist, shared), name
        assert sum(1 for f in module.Config.__dataclass_fields__.values() if f.metadata["help"]) <= 35, name
    assert shared_functions(bfn_cifar, ["write_eval", "save_gif"]) == shared_functions(
        bfn_mnist, ["write_eval", "save_gif"]
    )
    assert len(formatted("common.py")) <= 650
    tree = ast.parse(open(os.path.join(ROOT, "common.py")).read())
    samplers = ("continuous_sample", "discretised_sample", "discrete_sample")
    for node in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in samplers):
        assert node.end_lineno - node.lineno + 1 <= 15, node.name
    for name in os.listdir(os.path.join(ROOT, "beyond")):
        if name.endswith(".py"):
            assert len(formatted(os.path.join("beyond", name))) <= 350, name


def test_copying_algorithm_9_takes_three_functions():
    """discrete_sample calls, of common.py, only discrete_update and sample_categorical, which call nothing of it."""
    tree = ast.parse(open(os.path.join(ROOT, "common.py")).read())
    names = set(dir(common))
    calls = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            called = [c.func.id for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)]
            calls[node.name] = {name for name in called if name in names}
    assert calls["discrete_sample"] == {"discrete_update", "sample_categorical"}
    assert calls["discrete_update"] == calls["sample_categorical"] == set()


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
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while "step 3 |" not in open_or_empty(os.path.join(out, "log.txt")) and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(sig)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == bfn_mnist.PREEMPTED, stderr[-2000:]
    stopped = load(out)["step"]
    assert 3 <= stopped < 100000 and re.search(rf"{sig.name}: stopping after step {stopped}; a second", stdout)
    assert f"stopped by {sig.name} after step {stopped}" in stdout and "--resume" in stdout
    bfn_mnist.main(flags + ["--out-dir", out, "--steps", str(stopped + 2), "--resume"])
    straight = str(tmp_path / "straight")
    bfn_mnist.main(flags + ["--out-dir", straight, "--steps", str(stopped + 2)])
    assert_same_weights(load(straight), load(out))


def open_or_empty(path):
    return open(path).read() if os.path.exists(path) else ""


def test_out_of_memory_names_the_batch_flags(tmp_path, monkeypatch):
    def oom(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(bfn_mnist, "train_loss", oom)
    with pytest.raises(SystemExit) as e:
        bfn_mnist.main(
            [
                "--data-dir",
                write_mnist(str(tmp_path / "data")),
                *NETS[bfn_mnist],
                *TINY,
                "--out-dir",
                str(tmp_path / "run"),
                "--steps",
                "2",
                "--grad-accum",
                "2",
            ]
        )
    assert str(e.value) == (
        "bfn_mnist.py: error: out of memory on cpu at --batch-size 4: lower --batch-size and raise --grad-accum as "
        "much (the same global batch), or use --preset quick"
    )


def test_a_step_that_cannot_fit_stops_before_it_in_one_line(tmp_path, monkeypatch):
    """Before the first step the batch's need is set against the memory free, here a container's limit less its
    usage (cgroup v2's files, then v1's): too little stops the run in one line that says what to type, with only the
    log written; no limit ("max") lets it train, and the log says what a step needs."""
    cgroup = tmp_path / "cgroup"
    (cgroup / "memory").mkdir(parents=True)
    monkeypatch.setattr(bfn_mnist, "CGROUP", str(cgroup) + "/")
    (cgroup / "memory.max").write_text(f"{10 * 2**20}\n")
    (cgroup / "memory.current").write_text(f"{9 * 2**20}\n")  # 1 MiB free
    out = tmp_path / "run"
    flags = ["--data-dir", write_mnist(str(tmp_path / "data")), *NETS[bfn_mnist], *TINY, "--out-dir", str(out)]
    expected = r"a step of --batch-size 4 needs about \d+\.\d GiB, and cpu has 0\.0 GiB free: lower --batch-size and"
    with pytest.raises(SystemExit, match=expected):
        bfn_mnist.main([*flags, "--steps", "2"])
    assert os.listdir(out) == ["log.txt"]
    (cgroup / "memory.max").write_text("max\n")  # no limit here; v1's files say 1 MiB
    (cgroup / "memory" / "memory.limit_in_bytes").write_text(f"{2**20}\n")
    (cgroup / "memory" / "memory.usage_in_bytes").write_text("0\n")
    with pytest.raises(SystemExit, match=expected):
        bfn_mnist.main([*flags, "--steps", "2"])
    os.remove(cgroup / "memory" / "memory.limit_in_bytes")
    bfn_mnist.main([*flags, "--steps", "1"])
    log = open(out / "log.txt").read()
    small = re.search(r"a step of --batch-size 4 needs about (\d+\.\d) GiB, (\d+\.\d) GiB free", log)
    assert small and float(small[2]) > 0 and os.path.exists(out / "ckpt.pt")


def test_each_numeric_flag_refuses_a_value_past_its_bound():
    """--steps 0 or -1, and every other int or float flag below its bound, stop in one line before anything runs."""
    for module in (bfn_mnist, bfn_cifar, bfn_text8):
        for field in dataclasses.fields(module.Config):
            low = field.metadata["low"]
            if field.metadata["help"] is None or field.type not in (int, float) or low is None:
                continue
            flag = "--" + field.name.replace("_", "-")
            bad = low - 1 if field.type is int else low
            with pytest.raises(SystemExit, match=f"error: {flag} must be (at least|more than) {low:g}, got"):
                module.prepare([flag, str(bad)])
        with pytest.raises(SystemExit, match="error: --steps must be at least 1, got -1"):
            module.prepare(["--steps", "-1"])


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
    """Under torchrun (gloo on CPU): an exception on any rank ends every process within a minute, not an hour's wait
    in a collective, and the failed process's error reaches the console."""
    wrapper = tmp_path / "failing.py"
    wrapper.write_text(textwrap.dedent(FAILING.format(root=ROOT, where=where)))
    out = str(tmp_path / "ddp")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(wrapper),
        "--data-dir",
        write_mnist(str(tmp_path / "data")),
        *NETS[bfn_mnist],
        *TINY,
        "--out-dir",
        out,
        "--steps",
        "5",
        "--device",
        "cpu",
    ]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0 and time.time() - t0 < 60
    assert f"RuntimeError: injected failure in {'evaluation' if rank == 0 else 'training'}" in p.stderr


# ---------------------------------------------------------------------------------------------------------- presets

QUICK = {  # the measured recipes (RESULTS.md, "The quick presets"), setting for setting
    bfn_mnist: bfn_mnist.QUICK_NETWORK | bfn_mnist.QUICK_TRAINING | {"eval_examples": 2000},
    bfn_cifar: bfn_cifar.PRESETS["quick"],
    bfn_text8: bfn_text8.QUICK_NETWORK | bfn_text8.QUICK_TRAINING | bfn_text8.QUICK_OUTPUTS,
}


@pytest.mark.parametrize("module", [bfn_mnist, bfn_cifar, bfn_text8], ids=["mnist", "cifar", "text8"])
def test_the_quick_preset_is_the_measured_recipe_and_flags_win(module):
    quick = module.prepare(["--preset", "quick"])[0]
    paper = module.prepare([])[0]
    assert {k: v for k, v in quick.__dict__.items() if v != paper.__dict__[k]} == {"preset": "quick", **QUICK[module]}
    assert module.prepare(["--preset", "paper"])[0] == paper
    mine = module.prepare(["--preset", "quick", "--steps", "7", "--lr", "3e-4"])[0]
    assert (mine.steps, mine.lr, mine.batch_size) == (7, 3e-4, quick.batch_size)
    assert [k for k, v in mine.__dict__.items() if v != quick.__dict__[k]] == ["steps", "lr"]


def test_a_bad_preset_fails_clearly(capsys):
    with pytest.raises(SystemExit) as e:
        bfn_text8.prepare(["--preset", "fast"])
    assert e.value.code == 2 and "argument --preset: invalid choice: 'fast'" in capsys.readouterr().err


def test_the_quick_preset_end_to_end(script, tmp_path):
    """The preset's network and batch, on tiny data, for two steps: the header has the command as typed."""
    module, flags = script
    out = str(tmp_path / "run")
    short = ["--steps", "2", "--eval-examples", "4", "--num-samples", "2", "--sample-steps", "2"]
    module.main(["--preset", "quick", *flags[:2], "--out-dir", out, *short])
    (header,) = [line for line in open(os.path.join(out, "log.txt")).read().splitlines() if "====" in line]
    assert f"| python {module.SCRIPT} --preset quick {flags[0]} " in header
    assert load(out)["config"]["lr"] == 1e-3 and load(out)["config"]["lr_warmup"] == QUICK[module].get("lr_warmup", 0)


def test_a_paper_size_model_on_a_cpu_says_it_is_meant_for_gpus(tmp_path):
    out = str(tmp_path / "run")
    bfn_mnist.main(
        [
            "--data-dir",
            write_mnist(str(tmp_path / "data")),
            "--out-dir",
            out,
            "--batch-size",
            "2",
            "--steps",
            "1",
            "--eval-n",
            "inf",
            "--eval-examples",
            "2",
            "--num-samples",
            "1",
            "--sample-steps",
            "1",
        ]
    )
    log = open(os.path.join(out, "log.txt")).read().splitlines()
    assert log[1].endswith(
        "24.81M parameters: the paper's size, meant for GPUs; --preset quick trains a small one"
    )  # the line after the header, before the first step
    assert "a step of --batch-size 2 needs about" in log[2] and "step 1 | loss" in log[3] and "ETA" in log[3]
    quick = str(tmp_path / "quick")
    bfn_mnist.main(
        ["--preset", "quick", "--data-dir", str(tmp_path / "data"), "--out-dir", quick, *TINY, "--steps", "1"]
    )
    assert "meant for GPUs" not in open(os.path.join(quick, "log.txt")).read()


def test_the_first_log_line_comes_after_the_first_step(tmp_path):
    out = str(tmp_path / "run")
    bfn_mnist.main(
        [
            "--data-dir",
            write_mnist(str(tmp_path / "data")),
            *NETS[bfn_mnist],
            *TINY,
            "--out-dir",
            out,
            "--steps",
            "12",
            "--log-every",
            "5",
        ]
    )
    steps = [line[9:].split(" |")[0] for line in open(os.path.join(out, "log.txt")) if line[9:].startswith("step ")]
    assert steps == ["step 1", "step 5", "step 10", "step 12"]


# ---------------------------------------------------------------------------------------------------------- schedule


def learning_rate(cfg, step):
    """The learning rate optimizer_step sets at this step (from 0), on a one-weight model with a zero gradient."""
    model = torch.nn.Linear(1, 1)
    ema = torch.nn.Linear(1, 1)
    optimizer = bfn_mnist.make_optimizer(model, cfg.lr)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    bfn_mnist.optimizer_step(cfg, model, ema, optimizer, step)
    return optimizer.param_groups[0]["lr"]


def test_the_learning_rate_schedule():
    cfg = bfn_mnist.prepare(["--lr", "1", "--steps", "110"])[0]
    assert [learning_rate(cfg, s) for s in (0, 60, 109)] == [1, 1, 1]  # the paper's: constant
    cfg.lr_warmup = 10
    assert [learning_rate(cfg, s) for s in (0, 4, 9, 10, 60, 109)] == pytest.approx([0.1, 0.5, 1, 1, 1, 1])
    cfg.lr_decay = "cosine"  # the middle of the decay is halfway between 1 and 0.1; it ends at 0.1
    assert [learning_rate(cfg, s) for s in (10, 60, 110)] == pytest.approx([1, 0.55, 0.1])


def test_resume_with_a_schedule_gives_the_same_weights(tmp_path, monkeypatch):
    monkeypatch.setitem(bfn_mnist.PRESETS, "quick", dict(lr=1e-3, lr_warmup=2, lr_decay="cosine"))
    flags = ["--preset", "quick", "--data-dir", write_mnist(str(tmp_path / "data"))] + NETS[bfn_mnist] + TINY
    straight, resumed = str(tmp_path / "a"), str(tmp_path / "b")
    bfn_mnist.main(flags + ["--out-dir", straight, "--steps", "4"])
    bfn_mnist.main(flags + ["--out-dir", resumed, "--steps", "3"])
    bfn_mnist.main(["--out-dir", resumed, "--steps", "4", "--resume"])  # the schedule from the run directory
    assert_same_weights(load(straight), load(resumed))
    last_lr = load(resumed)["optimizer"]["param_groups"][0]["lr"]
    cfg = bfn_mnist.prepare(flags + ["--steps", "4"])[0]
    assert load(resumed)["config"]["lr_warmup"] == 2 and last_lr == pytest.approx(learning_rate(cfg, 3))


# ---------------------------------------------------------------------------------------------------------- init-from


def test_init_from_loads_the_weights_with_a_fresh_optimiser(script, tmp_path):
    module, flags = script
    source, tuned, scored = str(tmp_path / "source"), str(tmp_path / "tuned"), str(tmp_path / "scored")
    module.main(flags + ["--out-dir", source, "--steps", "2"])
    ckpt = os.path.join(source, "ckpt.pt")
    cfg, runtime, checkpoint = module.prepare(flags + ["--out-dir", tuned, "--init-from", ckpt])
    model, ema, optimizer, step = module.build(cfg, runtime, checkpoint)
    assert step == 0 and not optimizer.state
    assert_same_weights(load(source), {"model": model.state_dict(), "ema": ema.state_dict()})
    module.main(flags + ["--out-dir", tuned, "--steps", "1", "--init-from", ckpt, "--lr", "1e-3"])  # fine-tune
    assert load(tuned)["step"] == 1 and load(tuned)["optimizer"]["state"][0]["step"] == 1  # a fresh AdamW
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
    authors, other = str(tmp_path / "authors.pt"), str(tmp_path / "other.pt")
    torch.save({"net.conv_in.weight": torch.zeros(3)}, authors)
    sizes = "give its --digits --conditional --beta-1 --channels --res-blocks"
    with pytest.raises(SystemExit, match=r"authors.pt does not fit this network \(Missing key.*\); " + sizes):
        bfn_mnist.main(run + ["--init-from", authors])
    torch.save({"weights": torch.zeros(3)}, other)
    with pytest.raises(SystemExit, match=r"other.pt does not fit this network \(Missing key"):
        bfn_mnist.main(run + ["--init-from", other])
    state = load(source)
    state["model"]["out.2.weight"] = torch.zeros(2, 8, 3, 3)
    torch.save(state, other)
    with pytest.raises(SystemExit, match=r"size mismatch for out.2.weight: .*\[2, 8, 3, 3\].*\[8, 8, 3, 3\]"):
        bfn_mnist.main(run + ["--init-from", other])
    with pytest.raises(SystemExit, match="no readable checkpoint: .*missing.pt"):
        bfn_mnist.main(run + ["--init-from", str(tmp_path / "missing.pt")])
    with pytest.raises(SystemExit, match="--resume and --init-from exclude each other"):
        bfn_mnist.prepare(["--resume", "--init-from", ckpt])
