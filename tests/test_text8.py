"""bfn_text8.py end to end on a tiny synthetic text8.zip: outputs, --text-file, bad data, torchrun.

    python -m pytest -q tests/test_text8.py
"""
import json
import math
import os
import re
import subprocess
import sys
import types

import pytest
import torch

import bfn_text8
from conftest import ROOT, write_text8

TINY = ["--layers", "2", "--heads", "2", "--width", "16", "--seq-len", "32", "--batch-size", "4",
        "--eval-examples", "6", "--eval-n", "inf", "3", "--sample-steps", "3", "--num-samples", "2", "--log-every", "1"]


@pytest.fixture
def text8_dir(tmp_path, monkeypatch):
    """A synthetic text8.zip; the module's expected sizes and CRC-32 are set to this file's, so the real checks run
    on it."""
    root = str(tmp_path / "data")
    _, zip_bytes, text_bytes, crc = write_text8(root)
    monkeypatch.setattr(bfn_text8, "TEXT8_ZIP_BYTES", zip_bytes)
    monkeypatch.setattr(bfn_text8, "TEXT8_BYTES", text_bytes)
    monkeypatch.setattr(bfn_text8, "TEXT8_CRC32", crc)
    return root


def run(data, out, *extra):
    bfn_text8.main(["--data-dir", data, "--out-dir", out, *TINY, *extra])


def test_three_steps_end_to_end(text8_dir, tmp_path):
    out = str(tmp_path / "run")
    run(text8_dir, out, "--steps", "3")
    for name in ["ckpt.pt", "log.txt", "eval.json", "samples.txt", "samples-paper-3.pt", "evolution.txt",
                 "evolution.gif"]:
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    ev = json.load(open(os.path.join(out, "eval.json")))
    assert ev["step"] == 3 and ev["split"] == "test" and ev["unit"] == "bits/char" and ev["examples"] == 6
    for r in ev["n"].values():
        assert all(math.isfinite(r[k]) for k in ["loss", "recon", "total", "stderr"])
    samples = open(os.path.join(out, "samples.txt")).read().split("\n")
    lines = [s for s in samples if s and not s.startswith("---")]
    assert len(lines) == 2 and all(len(s) == 32 and set(s) <= set(bfn_text8.ALPHABET) for s in lines)
    assert open(os.path.join(out, "evolution.txt")).read().count("output |") == 11
    run(text8_dir, out, "--sample-only", "--sampler", "ode")
    assert "ode sampler" in open(os.path.join(out, "samples.txt")).read()


def test_data_split_and_windows(text8_dir):
    cfg = bfn_text8.parse_args(["--data-dir", text8_dir, "--seq-len", "32"])
    data = bfn_text8.load_data(cfg, torch.device("cpu"))
    n = sum(len(v) for v in data.values())
    assert n == 40_000 and len(data["train"]) == 36_000 and len(data["val"]) == len(data["test"]) == 2_000
    assert data["train"].dtype == torch.uint8 and data["train"].max() < 27
    assert cfg.alphabet == bfn_text8.ALPHABET and cfg.beta_1 == 0.5625  # text8 as the paper has it
    assert bfn_text8.decode(data["train"][:4], cfg.alphabet) == " " + open_text(text8_dir)[1:4]
    windows = bfn_text8.evaluation_set(data["test"], cfg)
    assert windows.shape == (62, 32)
    cfg.eval_examples = 10
    some = bfn_text8.evaluation_set(data["test"], cfg)
    assert some.shape == (10, 32) and torch.equal(some, bfn_text8.evaluation_set(data["test"], cfg))
    torch.manual_seed(0)
    x, labels = bfn_text8.get_batch(data, cfg)
    assert x.shape == (cfg.batch_size, 32) and labels is None


def open_text(root):
    import zipfile
    return zipfile.ZipFile(os.path.join(root, "text8.zip")).read("text8").decode()



def test_text_file(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("hello world " * 400 + "\n")
    out = str(tmp_path / "run")
    bfn_text8.main(["--text-file", str(path), "--out-dir", out, *TINY, "--steps", "1"])
    data = bfn_text8.load_data(bfn_text8.parse_args(["--text-file", str(path), "--seq-len", "32"]), torch.device("cpu"))
    assert [len(data[k]) for k in ("train", "val", "test")] == [4320, 240, 240]  # 90%, 5%, 5% of 4,800 characters


def test_text_file_with_a_character_outside_the_alphabet(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("hello world " * 10 + "Hello")
    words = tmp_path / "words.txt"  # a model of spaces and a-z, then a text with a capital
    words.write_text("hello world " * 400)
    bfn_text8.main(["--text-file", str(words), "--out-dir", str(tmp_path / "run"), *TINY, "--steps", "1"])
    with pytest.raises(SystemExit, match=r"character 'H' at position 120, which is not in the alphabet ' abc"):
        bfn_text8.main(["--text-file", str(path), "--out-dir", str(tmp_path / "run"), "--sample-only"])
    path.write_bytes(b"caf\xe9 " * 100)  # Latin-1, not UTF-8
    with pytest.raises(SystemExit, match=r"is not UTF-8 text \(byte 3: invalid continuation byte\)"):
        bfn_text8.main(["--text-file", str(path), "--out-dir", str(tmp_path / "run"), *TINY])


def test_any_utf8_text_has_its_own_alphabet(tmp_path):
    """A text beyond a-z (capitals, digits, punctuation, new lines, accents, Greek): its characters are the alphabet,
    kept in the checkpoint; beta(1) follows the rule for its K; training, sampling, prompts and quality all run."""
    line = "Ångström wrote 42 lines; α + β = γ, Noël? Ω!\n"
    path = tmp_path / "mixed.txt"
    path.write_text(line * 200, encoding="utf-8")
    out = str(tmp_path / "run")
    bfn_text8.main(["--text-file", str(path), "--out-dir", out, *TINY, "--steps", "2"])
    cfg = bfn_text8.parse_args(["--text-file", str(path)])
    assert cfg.alphabet == "".join(sorted(set(line))) and len(cfg.alphabet) == 29
    assert cfg.beta_1 == bfn_text8.discrete_beta_1(29) == 0.5625  # more classes than text8: text8's beta(1)
    small = tmp_path / "dna.txt"  # 5 classes: a larger beta(1), leaving the final input as uncertain as text8's
    small.write_text("GATTACA\n" * 10, encoding="ascii")
    assert bfn_text8.parse_args(["--text-file", str(small)]).beta_1 == bfn_text8.discrete_beta_1(5) > 0.5625
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["config"]["alphabet"] == cfg.alphabet and ckpt["model"]["lm_head.weight"].shape[0] == 29
    samples = open(os.path.join(out, "samples.txt"), encoding="utf-8").read()
    assert samples.count("--- sample ") == 2 and set(re.sub(r"--- sample \d \(3 steps, paper sampler\)\n", "",
                                                           samples)) <= set(cfg.alphabet)
    bfn_text8.main(["--text-file", str(path), "--out-dir", out, *TINY, "--sample-only", "--prompt", "Noël?\nÅ"])
    lines = open(os.path.join(out, "prompt.txt"), encoding="utf-8").read().split("\n--- ")
    assert all(chunk.split("\n", 1)[1].startswith("Noël?\nÅ") for chunk in lines[1:])
    other = tmp_path / "other.txt"  # another alphabet does not fit this checkpoint's
    other.write_text("Ωmega " * 300, encoding="utf-8")
    with pytest.raises(SystemExit, match="has the character 'a' at position 4, which is not in the alphabet"):
        bfn_text8.main(["--text-file", str(other), "--out-dir", out, *TINY, "--sample-only"])


@pytest.mark.parametrize("damage,message", [
    (lambda b: b[: len(b) // 2], "truncated or corrupt"),
    (lambda b: b[:100] + bytes([b[100] ^ 0xFF]) + b[101:], "not a valid text8 archive"),
])
def test_corrupt_zip_fails_clearly(text8_dir, tmp_path, damage, message):
    path = os.path.join(text8_dir, "text8.zip")
    blob = open(path, "rb").read()
    open(path, "wb").write(damage(blob))
    with pytest.raises(SystemExit, match=message):
        run(text8_dir, str(tmp_path / "run"), "--steps", "1")


def test_a_different_text8_fails_the_checksum(text8_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(bfn_text8, "TEXT8_CRC32", 0x7D6BE66F)  # the real text8's CRC-32
    with pytest.raises(SystemExit, match="expected .* bytes with CRC-32 0x7d6be66f"):
        run(text8_dir, str(tmp_path / "run"), "--steps", "1")


@pytest.mark.parametrize("argv,message", [
    (["--width", "30", "--heads", "4"], "--width must be a multiple of 2 x --heads"),
    (["--seq-len", "0"], "--seq-len must be at least 1, got 0"),
    (["--grad-accum", "0"], "--grad-accum must be at least 1, got 0"),
    (["--eval-n", "0"], "--eval-n takes inf or positive integers, got 0"),
])
def test_bad_flags_fail_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bfn_text8.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_torchrun_two_cpu_processes(text8_dir, tmp_path):
    path = tmp_path / "words.txt"  # the zip's checksums are patched in this process only, so torchrun gets a text file
    path.write_text(open_text(text8_dir))
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "bfn_text8.py"),
           "--text-file", str(path), "--out-dir", out, *TINY, "--steps", "2", "--grad-accum", "2", "--device", "cpu"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    log = open(os.path.join(out, "log.txt")).read()
    assert "cpu x 2" in log and "step 2 | loss" in log


@pytest.mark.parametrize("sampler", ["paper", "ode", "sde"])
def test_prompt_and_infill_keep_the_given_text(text8_dir, tmp_path, sampler):
    out = str(tmp_path / "run")
    run(text8_dir, out, "--steps", "1")
    run(text8_dir, out, "--sample-only", "--prompt", "the bayesian", "--sampler", sampler)
    lines = open(os.path.join(out, "prompt.txt")).read().splitlines()
    assert lines[0].startswith("prompt |the bayesian|") and all(line.startswith("the bayesian") for line in lines[2::2])
    run(text8_dir, out, "--sample-only", "--infill", "the ____ of flow", "--sampler", sampler)
    lines = open(os.path.join(out, "infill.txt")).read().splitlines()
    for line in lines[2::2]:
        assert line[:4] == "the " and line[8:16] == " of flow"
    assert torch.load(os.path.join(out, f"infill-{sampler}-3-p1.pt"), weights_only=True)["texts"] == lines[2::2]
    assert os.path.exists(os.path.join(out, "prompt.txt"))  # the prompt's completions were not overwritten


def test_prompt_errors():
    with pytest.raises(SystemExit):
        bfn_text8.parse_args(["--prompt", "Hello"])
    with pytest.raises(SystemExit):
        bfn_text8.parse_args(["--prompt", "a", "--infill", "_"])


def test_word_guidance_and_particles_end_to_end(text8_dir, tmp_path):
    """--guide-word with --grad-guidance through the network, with every sampler, and prompts and infilling by
    sequential Monte Carlo with the stochastic samplers."""
    out = str(tmp_path / "run")
    run(text8_dir, out, "--steps", "1")
    for sampler in ("paper", "ode", "sde"):
        run(text8_dir, out, "--sample-only", "--guide-word", "flow", "--grad-guidance", "3", "--sampler", sampler)
        saved = torch.load(os.path.join(out, f"samples-{sampler}-3-gg3.pt"), weights_only=True)
        assert saved["config"]["guide_word"] == "flow" and len(saved["texts"]) == 2
    for flag, text in (("--prompt", "the flow"), ("--infill", "the ____ of")):
        run(text8_dir, out, "--sample-only", flag, text, "--particles", "3", "--sampler", "sde")
        lines = open(os.path.join(out, f"{flag[2:]}.txt")).read().splitlines()
        assert "3 particles" in lines[0] and all(line.startswith(text[:4]) for line in lines[2::2])


# ---------------------------------------------------------------------------------------------------- --vocab

def test_merges_by_hand_and_the_round_trip_of_any_text():
    """On "aab aab ab" (words aab, " aab", " ab"): the pair a b (3 times) merges first, then a ab (2 times). Any text
    of the alphabet round-trips, spaces, new lines and characters never seen in training included; a character
    outside it is one named error."""
    merges = bfn_text8.learn_merges("aab aab ab", " ab\nΩé", 2)
    assert merges == ((1, 2), (1, 6))  # token 6 = "a" + "b", token 7 = "a" + "ab"
    cfg = bfn_text8.Config(alphabet=" ab\nΩé", merges=merges, vocab=8)
    assert bfn_text8.symbols(cfg) == (" ", "a", "b", "\n", "Ω", "é", "ab", "aab")
    assert bfn_text8.tokenize("aab ab", cfg).tolist() == [7, 0, 6]
    rng = torch.Generator().manual_seed(0)
    for _ in range(20):
        text = "".join(cfg.alphabet[k] for k in torch.randint(len(cfg.alphabet), (200,), generator=rng))
        assert bfn_text8.decode(bfn_text8.tokenize(text, cfg), bfn_text8.symbols(cfg)) == text
    with pytest.raises(SystemExit, match=r"the character 'x' at position 6 is not in the alphabet"):
        bfn_text8.tokenize("ab ab x", cfg)
    plain = bfn_text8.Config(alphabet=bfn_text8.ALPHABET)  # no merges: the characters' own ids, as for K = 27
    assert torch.equal(bfn_text8.tokenize("the cat", plain).long(), bfn_text8.encode(b"the cat", bfn_text8.ALPHABET,
                                                                                     "t").long())


def test_merges_are_learnt_on_the_training_split_only(tmp_path):
    """Two texts that differ only in their last 10% (validation and test) give the same merges; a word repeated only
    there never becomes a token."""
    from test_training import write_words
    base = open(write_words(tmp_path / "w.txt", n_words=3000)).read()
    cut = len(base) * 90 // 100
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "t.txt").write_text(base)
    (b / "t.txt").write_text(base[:cut] + " qzqz" * ((len(base) - cut) // 5))
    cfg_a, cfg_b = (bfn_text8.parse_args(["--text-file", str(d / "t.txt"), "--vocab", "40"]) for d in (a, b))
    assert cfg_a.merges == cfg_b.merges and len(cfg_a.merges) == 40 - 27
    assert not any("qz" in s for s in bfn_text8.symbols(cfg_b))
    assert [n for n in os.listdir(a) if n.startswith("bpe-")] and cfg_a.chars > 1  # cached beside the text


def test_bits_per_char_by_hand(tmp_path):
    """Windows of 2 tokens scored ln 2 x (3 + 1) and ln 2 x (5 + 3) bits (loss + L^r), spelling 3 and 8 characters:
    bits/char is the mean of 4/3 and 8/8, its standard error that of those two values; bits/token 6/2."""
    cfg = bfn_text8.Config(out_dir=str(tmp_path), vocab=30, seq_len=2, eval_n=("inf",))
    ln2 = math.log(2)
    bfn_text8.report({"inf": [torch.tensor([3 * ln2, 5 * ln2])]}, [torch.tensor([ln2, 3 * ln2])], cfg,
                     types.SimpleNamespace(log=print), 7, torch.tensor([3.0, 8.0], dtype=torch.float64))
    r = json.load(open(tmp_path / "eval.json"))["n"]["inf"]
    assert r["total"] == pytest.approx((4 / 3 + 1) / 2) and r["recon"] == pytest.approx((1 / 3 + 3 / 8) / 2)
    assert r["stderr"] == pytest.approx(torch.tensor([4 / 3, 1.0]).std().item() / math.sqrt(2))
    assert r["bits_per_token"]["total"] == pytest.approx(6 / 2)


def test_vocab_end_to_end(tmp_path, monkeypatch):
    """--vocab trains, evaluates in bits/char (each window over its own characters) and samples readable text; prompts,
    infilling and word guidance take tokens; another --vocab does not fit the checkpoint; a K that cannot fit stops
    before the first step."""
    from test_training import write_words
    text, out = write_words(tmp_path / "words.txt"), str(tmp_path / "run")
    seen = {}
    report = bfn_text8.report
    monkeypatch.setattr(bfn_text8, "report", lambda *a: seen.update(chars=a[-1]) or report(*a))
    bfn_text8.main(["--text-file", text, "--out-dir", out, *TINY, "--vocab", "48", "--steps", "2"])
    cfg = bfn_text8.parse_args(["--out-dir", out], torch.load(os.path.join(out, "ckpt.pt"))["config"])
    assert cfg.beta_1 == 20.4054 / 48  # common.discrete_beta_1_tokens: K beta(1) held at 20.4
    windows = bfn_text8.evaluation_set(bfn_text8.load_data(cfg, torch.device("cpu"))["test"], cfg)
    assert seen["chars"].tolist() == [len(bfn_text8.decode(w, bfn_text8.symbols(cfg))) for w in windows]
    ev = json.load(open(os.path.join(out, "eval.json")))
    assert ev["unit"] == "bits/char" and all(math.isfinite(r["bits_per_token"]["total"]) for r in ev["n"].values())
    texts = torch.load(os.path.join(out, "samples-paper-3.pt"))["texts"]
    assert all(len(t) >= 32 and set(t) <= set(cfg.alphabet) for t in texts)  # 32 tokens of one or more characters
    bfn_text8.main(["--out-dir", out, "--sample-only", "--prompt", "the flow"])
    assert all(t.startswith("the flow") for t in torch.load(os.path.join(out, "prompt-paper-3-p1.pt"))["texts"])
    bfn_text8.main(["--out-dir", out, "--sample-only", "--infill", "the _ of"])
    assert all(t.startswith("the ") for t in torch.load(os.path.join(out, "infill-paper-3-p1.pt"))["texts"])
    bfn_text8.main(["--out-dir", out, "--sample-only", "--guide-word", " flow", "--grad-guidance", "2"])
    with pytest.raises(SystemExit, match="--vocab 48 in the checkpoint, 50 now"):
        bfn_text8.main(["--out-dir", out, "--eval-only", "--vocab", "50"])
    with pytest.raises(SystemExit, match=r"K = 48 symbols need about .* GiB .* lower --batch-size"):
        bfn_text8.main(["--out-dir", out, "--resume", "--batch-size", "100000000", "--steps", "3"])
