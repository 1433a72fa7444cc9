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

TINY = [
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
    "6",
    "--eval-n",
    "inf",
    "3",
    "--sample-steps",
    "3",
    "--num-samples",
    "2",
    "--log-every",
    "1",
]


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
    for name in [
        "ckpt.pt",
        "log.txt",
        "eval.json",
        "samples.txt",
        "samples-paper-3.pt",
        "evolution.txt",
        "evolution.gif",
    ]:
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    ev = json.load(open(os.path.join(out, "eval.json")))
    assert ev["step"] == 3 and ev["split"] == "test" and ev["unit"] == "bits/char" and ev["examples"] == 6
    for r in ev["n"].values():
        assert all(math.isfinite(r[k]) for k in ["loss", "recon", "total", "stderr"])
    samples = open(os.path.join(out, "samples.txt")).read().split("\n")
    lines = [s for s in samples if s and not s.startswith("---")]
    assert len(lines) == 2 and all(len(s) == 32 and set(s) <= set(bfn_text8.ALPHABET) for s in lines)
    assert open(os.path.join(out, "evolution.txt")).read().count("output |") == 11 * 2  # t = 0, 0.1, ..., 1; 2 samples
    run(text8_dir, out, "--sample-only", "--sampler", "ode")
    assert "3 steps, ode)" in open(os.path.join(out, "samples.txt")).read()


def test_data_split_and_windows(text8_dir):
    cfg = bfn_text8.prepare(["--data-dir", text8_dir, "--seq-len", "32"])[0]
    data = bfn_text8.load_data(cfg, torch.device("cpu"))
    n = sum(len(v) for v in data.values())
    assert n == 40_000 and len(data["train"]) == 36_000 and len(data["val"]) == len(data["test"]) == 2_000
    assert data["train"].dtype == torch.uint8 and data["train"].max() < 27
    assert cfg.alphabet == bfn_text8.ALPHABET and cfg.beta_1 == 0.5625  # text8 as the paper has it
    assert bfn_text8.decode(data["train"][:4], cfg.alphabet) == " " + open_text(text8_dir)[1:4]
    windows = bfn_text8.test_windows(cfg, data)
    assert windows.shape == (62, 32)
    cfg.eval_examples = 10
    some = bfn_text8.test_windows(cfg, data)
    assert some.shape == (10, 32) and torch.equal(some, bfn_text8.test_windows(cfg, data))
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
    data = bfn_text8.load_data(bfn_text8.prepare(["--text-file", str(path), "--seq-len", "32"])[0], torch.device("cpu"))
    assert [len(data[k]) for k in ("train", "val", "test")] == [4320, 240, 240]  # 90%, 5%, 5% of 4,800 characters


def test_text_file_with_a_character_outside_the_alphabet(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("hello world " * 10 + "Hello")
    words = tmp_path / "words.txt"  # a model of spaces and a-z, then a text with a capital
    words.write_text("hello world " * 400)
    bfn_text8.main(["--text-file", str(words), "--out-dir", str(tmp_path / "run"), *TINY, "--steps", "1"])
    with pytest.raises(SystemExit, match=r"character 'H' at position 120, not in the alphabet ' abc"):
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
    cfg = bfn_text8.prepare(["--text-file", str(path)])[0]
    assert cfg.alphabet == "".join(sorted(set(line))) and len(cfg.alphabet) == 29
    assert cfg.beta_1 == 0.5625  # more classes than text8: text8's beta(1)
    small = tmp_path / "dna.txt"  # 5 classes: a larger beta(1), text8's K beta(1)
    small.write_text("GATTACA\n" * 10, encoding="ascii")
    assert bfn_text8.prepare(["--text-file", str(small)])[0].beta_1 == pytest.approx(0.5625 * 27 / 5)
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ckpt["config"]["alphabet"] == cfg.alphabet and ckpt["model"]["lm_head.weight"].shape[0] == 29
    samples = open(os.path.join(out, "samples.txt"), encoding="utf-8").read()
    assert samples.count("--- sample ") == 2
    assert set(re.sub(r"--- sample \d \(3 steps, paper\)\n", "", samples)) <= set(cfg.alphabet)
    other = tmp_path / "other.txt"  # another alphabet does not fit this checkpoint's
    other.write_text("Ωmega " * 300, encoding="utf-8")
    with pytest.raises(SystemExit, match="has the character 'a' at position 4, not in the alphabet"):
        bfn_text8.main(["--text-file", str(other), "--out-dir", out, *TINY, "--sample-only"])


@pytest.mark.parametrize(
    "damage,message",
    [
        (lambda b: b[: len(b) // 2], "truncated or corrupt"),
        (lambda b: b[:100] + bytes([b[100] ^ 0xFF]) + b[101:], "not a valid text8 archive"),
    ],
)
def test_corrupt_zip_fails_clearly(text8_dir, tmp_path, damage, message):
    path = os.path.join(text8_dir, "text8.zip")
    blob = open(path, "rb").read()
    open(path, "wb").write(damage(blob))
    with pytest.raises(SystemExit, match=message):
        run(text8_dir, str(tmp_path / "run"), "--steps", "1")


def test_a_different_text8_fails_the_checksum(text8_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(bfn_text8, "TEXT8_CRC32", 0x7D6BE66F)  # the real text8's CRC-32
    with pytest.raises(SystemExit, match="with CRC-32 .*, not .* with 0x7d6be66f"):
        run(text8_dir, str(tmp_path / "run"), "--steps", "1")


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--width", "30", "--heads", "4"], "--width must be a multiple of 2 x --heads"),
        (["--seq-len", "0"], "--seq-len must be at least 1, got 0"),
        (["--grad-accum", "0"], "--grad-accum must be at least 1, got 0"),
        (["--eval-n", "0"], "--eval-n takes inf or positive integers, got 0"),
    ],
)
def test_bad_flags_fail_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bfn_text8.prepare(argv)
    assert message in str(e.value.code) + capsys.readouterr().err


def test_torchrun_two_cpu_processes(text8_dir, tmp_path):
    path = tmp_path / "words.txt"  # the zip's checksums are patched in this process only, so torchrun gets a text file
    path.write_text(open_text(text8_dir))
    out = str(tmp_path / "ddp")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        os.path.join(ROOT, "bfn_text8.py"),
        "--text-file",
        str(path),
        "--out-dir",
        out,
        *TINY,
        "--steps",
        "2",
        "--grad-accum",
        "2",
        "--device",
        "cpu",
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    log = open(os.path.join(out, "log.txt")).read()
    assert "cpu x 2" in log and "step 2 | loss" in log


# ---------------------------------------------------------------------------------------------------- --vocab


def test_merges_by_hand_and_the_round_trip_of_any_text():
    """On "aab aab ab" (words aab, " aab", " ab"): the pair a b (3 times) merges first, then a ab (2 times). Any text
    of the alphabet round-trips, spaces, new lines and characters never seen in training included; a character
    outside it is one named error."""
    merges = bfn_text8.learn_merges("aab aab ab", " ab\nΩé", 2)
    assert merges == ((1, 2), (1, 6))  # token 6 = "a" + "b", token 7 = "a" + "ab"
    cfg = bfn_text8.Config(alphabet=" ab\nΩé", merges=merges, vocab=8)
    assert bfn_text8.symbols(cfg) == [" ", "a", "b", "\n", "Ω", "é", "ab", "aab"]
    assert bfn_text8.tokenize("aab ab", cfg.alphabet, cfg.merges).tolist() == [7, 0, 6]
    rng = torch.Generator().manual_seed(0)
    for _ in range(20):
        text = "".join(cfg.alphabet[k] for k in torch.randint(len(cfg.alphabet), (200,), generator=rng))
        assert bfn_text8.decode(bfn_text8.tokenize(text, cfg.alphabet, cfg.merges), bfn_text8.symbols(cfg)) == text
    with pytest.raises(SystemExit, match=r"--prompt has the character 'x' at position 6, not in the alphabet"):
        bfn_text8.encode("ab ab x", cfg.alphabet, "--prompt")
    plain = bfn_text8.tokenize("the cat", bfn_text8.ALPHABET, ())  # no merges: the characters' own ids, as for K = 27
    assert torch.equal(plain.long(), bfn_text8.encode("the cat", bfn_text8.ALPHABET, "t").long())


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
    cfg_a, cfg_b = (bfn_text8.prepare(["--text-file", str(d / "t.txt"), "--vocab", "40"])[0] for d in (a, b))
    assert cfg_a.merges == cfg_b.merges and len(cfg_a.merges) == 40 - 27
    assert not any("qz" in s for s in bfn_text8.symbols(cfg_b))
    assert cfg_a.chars > 1


def test_bits_per_char_by_hand(tmp_path):
    """Windows of 2 tokens scored ln 2 x (3 + 1) and ln 2 x (5 + 3) bits (loss + L^r), spelling 3 and 8 characters:
    bits/char is all the bits over all the characters, 12/11, not the mean of the windows' ratios; its standard error
    that of the ratio; bits/token 6/2."""
    merges = ((1, 2),) * 3  # 30 tokens: the 27 characters and three merges (their pairs do not matter here)
    cfg = bfn_text8.Config(out_dir=str(tmp_path), vocab=30, seq_len=2, eval_n=("inf",), merges=merges)
    ln2 = math.log(2)
    chars = torch.tensor([3.0, 8.0], dtype=torch.float64)
    losses = {"inf": [torch.tensor([3 * ln2, 5 * ln2])]}
    bfn_text8.write_eval(losses, [torch.tensor([ln2, 3 * ln2])], chars, cfg, types.SimpleNamespace(log=print), 7)
    r = json.load(open(tmp_path / "eval.json"))["n"]["inf"]
    assert r["total"] == pytest.approx(12 / 11) and r["recon"] == pytest.approx(4 / 11)
    spread = (torch.tensor([4.0, 8.0], dtype=torch.float64) - 12 / 11 * chars).std() / chars.mean()
    assert r["stderr"] == pytest.approx(spread.item() / math.sqrt(2))
    assert r["bits_per_token"] == pytest.approx(6 / 2)


def test_vocab_end_to_end(tmp_path, monkeypatch):
    """--vocab trains, evaluates in bits/char (each window over its own characters) and samples readable text; another
    --vocab does not fit the checkpoint."""
    from test_training import write_words

    text, out = write_words(tmp_path / "words.txt"), str(tmp_path / "run")
    seen = {}
    write_eval = bfn_text8.write_eval

    def seeing(losses, recon, chars, *rest):  # the characters of each test window
        seen["chars"] = chars
        return write_eval(losses, recon, chars, *rest)

    monkeypatch.setattr(bfn_text8, "write_eval", seeing)
    bfn_text8.main(["--text-file", text, "--out-dir", out, *TINY, "--vocab", "48", "--steps", "2"])
    cfg = bfn_text8.prepare(["--out-dir", out, "--eval-only"])[0]
    assert cfg.beta_1 == 20.4054 / 48  # subword tokens by default: K beta(1) held at 20.4
    windows = bfn_text8.test_windows(cfg, bfn_text8.load_data(cfg, torch.device("cpu")))
    assert seen["chars"].tolist() == [len(bfn_text8.decode(w, bfn_text8.symbols(cfg))) for w in windows]
    ev = json.load(open(os.path.join(out, "eval.json")))
    assert ev["unit"] == "bits/char" and all(math.isfinite(r["bits_per_token"]) for r in ev["n"].values())
    texts = torch.load(os.path.join(out, "samples-paper-3.pt"))["texts"]
    assert all(len(t) >= 32 and set(t) <= set(cfg.alphabet) for t in texts)  # 32 tokens of one or more characters
    with pytest.raises(SystemExit, match="--vocab 48 in the checkpoint, 50 now"):
        bfn_text8.main(["--out-dir", out, "--eval-only", "--vocab", "50"])
