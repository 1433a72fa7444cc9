"""Training-step speed and peak memory of this project's networks and losses against the authors' BFN module
(nnaisense/bayesian-flow-networks) on the same network, batch and machine. Their code is not in this repository: give
the path of a checkout of it (they need only torch to import).

    python benchmarks/speed_vs_authors.py /path/to/bayesian-flow-networks [--rounds 2] [--steps 30]

For each configuration, their module and ours train in turns, each in a fresh process (so that peak memory is the
process's own): 10 warm-up steps, then --steps timed steps of AdamW, gradient clipping at 5 and an EMA update, as in
both training loops. Prints a Markdown table of ms/step and peak resident memory per round.
"""

import argparse
import contextlib
import copy
import json
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {  # name: (script, their configuration, batch)
    "MNIST quick (32 channels, 1 block)": ("mnist", dict(channels=32, blocks=1, dropout=0.0), 32),
    "MNIST paper (128 channels, 2 blocks)": ("mnist", dict(channels=128, blocks=2, dropout=0.5), 32),
    "CIFAR quick (16 bins, 32 channels, 2 blocks)": ("cifar", dict(channels=32, blocks=2, bins=16), 16),
    "text8 quick (4 layers of 128, windows of 128)": ("text8", dict(layers=4, heads=4, width=128, seq_len=128), 32),
}


def theirs(kind, c, batch):
    """Their BFN module and a function giving one batch's loss."""
    import model
    import networks
    import probability
    from networks import adapters

    if kind == "mnist":
        ia = adapters.FourierImageInputAdapter(
            input_channels=1, input_shape=[28, 28], output_height=2, add_pos_feats=False
        )
        oa = adapters.OutputAdapter(input_height=2 * c["channels"], output_channels=1, output_height=1)
        net = networks.UNetModel(
            {"input_adapter": ia, "output_adapter": oa},
            image_size=28,
            in_channels=2,
            model_channels=c["channels"],
            out_channels=c["channels"],
            num_res_blocks=c["blocks"],
            attention_resolutions=[8, 16],
            dropout=c["dropout"],
            channel_mult=[1, 2, 2],
            conv_resample=True,
            dims=2,
            num_heads=4,
            project_input=True,
            skip=True,
        )
        flow = model.DiscreteBayesianFlow(n_classes=2, max_sqrt_beta=3)
        bfn = model.BFN(net, flow, model.DiscreteBayesianFlowLoss(flow, probability.BernoulliFactory()))
        data = lambda: (torch.rand(batch, 28, 28, 1) < 0.3).float()  # noqa: E731
    elif kind == "cifar":
        ia = adapters.FourierImageInputAdapter(
            input_channels=3, input_shape=[32, 32], output_height=3, add_pos_feats=False, add_mask=False
        )
        oa = adapters.OutputAdapter(input_height=c["channels"] + 3, output_channels=3, output_height=2)
        net = networks.UNetVDM(
            {"input_adapter": ia, "output_adapter": oa},
            embedding_dim=c["channels"],
            n_blocks=c["blocks"],
            n_attention_heads=1,
            dropout_prob=0.0,
            norm_groups=32,
            input_channels=3,
            use_fourier_features=True,
            attention_everywhere=False,
            image_size=32,
        )
        flow = model.CtsBayesianFlow(min_variance=1e-3)
        factory = probability.DiscretizedNormalFactory(num_bins=c["bins"], clip=True)
        bfn = model.BFN(net, flow, model.CtsBayesianFlowLoss(flow, factory, noise_pred=True))
        data = lambda: (torch.randint(0, c["bins"], (batch, 32, 32, 3)).float() * 2 + 1) / c["bins"] - 1  # noqa: E731
    else:
        ia = adapters.TextInputAdapter(
            vocab_size=27, seq_len=c["seq_len"], output_size=c["width"], learn_pos_embedding=False
        )
        net = networks.GPT(
            {"input_adapter": ia, "output_adapter": None},
            vocab_size=27,
            n_layer=c["layers"],
            n_head=c["heads"],
            n_embd=c["width"],
            dropout=0.0,
            skip=True,
            bias=True,
        )
        flow = model.DiscreteBayesianFlow(n_classes=27, max_sqrt_beta=0.75)
        bfn = model.BFN(net, flow, model.DiscreteBayesianFlowLoss(flow, probability.CategoricalFactory()))
        data = lambda: torch.randint(0, 27, (batch, c["seq_len"]))  # noqa: E731
    return bfn, lambda: bfn(data())


def ours_model(kind, c, batch):
    """Our network and a function giving one batch's loss, through the script's own train_loss."""
    sys.path.insert(0, ROOT)
    ctx = type("Context", (), {"autocast": contextlib.nullcontext(), "device": torch.device("cpu")})()
    if kind == "mnist":
        import bfn_mnist as m

        cfg = m.Config(channels=c["channels"], res_blocks=c["blocks"], batch_size=batch, dropout=c["dropout"])
        net = m.UNet(c["channels"], (1, 2, 2), c["blocks"], c["dropout"])
        batch_fn = lambda: ((torch.rand(batch, 28, 28) < 0.3).long(), None)  # noqa: E731
    elif kind == "cifar":
        import bfn_cifar as m

        cfg = m.Config(channels=c["channels"], res_blocks=c["blocks"], bins=c["bins"], batch_size=batch, dropout=0.0)
        net = m.UNet(c["channels"], c["blocks"], 0.0, n_out=2)
        batch_fn = lambda: (m.common.bin_centres(c["bins"])[torch.randint(0, c["bins"], (batch, 3, 32, 32))], None)  # noqa
    else:
        import bfn_text8 as m

        cfg = m.Config(layers=c["layers"], heads=c["heads"], width=c["width"], seq_len=c["seq_len"], batch_size=batch)
        net = m.Transformer(c["seq_len"], c["layers"], c["heads"], c["width"], 27)
        batch_fn = lambda: (torch.randint(0, 27, (batch, c["seq_len"])), None)  # noqa: E731
    return net, lambda: m.train_loss(net, batch_fn(), cfg, ctx).mean()


def measure(which, name, steps, authors):
    """In this process: warm up, then time `steps` steps of one implementation. Prints JSON."""
    kind, c, batch = CONFIGS[name]
    torch.manual_seed(0)
    if which == "theirs":
        sys.path.insert(0, authors)
        os.chdir(authors)
        net, loss_fn = theirs(kind, c, batch)
    else:
        net, loss_fn = ours_model(kind, c, batch)
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, betas=(0.9, 0.98), weight_decay=0.01)
    ema = copy.deepcopy(net).requires_grad_(False)

    def step():
        loss_fn().backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters()):
                p_ema.lerp_(p, 1e-4)

    for _ in range(10):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    ms = 1000 * (time.perf_counter() - start) / steps
    print(
        json.dumps(
            {
                "ms": ms,
                "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "params": sum(p.numel() for p in net.parameters()),
            }
        )
    )


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("authors", help="a checkout of nnaisense/bayesian-flow-networks")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--only", default="", help="configurations whose name contains this")
    p.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)  # internal: which name
    args = p.parse_args()
    if args.measure:
        return measure(*args.measure, args.steps, os.path.abspath(args.authors))
    print(
        "| configuration | parameters (theirs / ours) | round | theirs ms/step | ours ms/step | theirs peak MB | "
        "ours peak MB |\n|---|---|---|---|---|---|---|"
    )
    for name in (n for n in CONFIGS if args.only in n):
        for r in range(args.rounds):
            row = {}
            for which in ("theirs", "ours"):
                out = subprocess.run(
                    [sys.executable, __file__, args.authors, "--steps", str(args.steps), "--measure", which, name],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                row[which] = json.loads(out.strip().splitlines()[-1])
            print(
                f"| {name} | {row['theirs']['params']:,} / {row['ours']['params']:,} | {r + 1} | "
                f"{row['theirs']['ms']:.0f} | {row['ours']['ms']:.0f} | {row['theirs']['peak_mb']:.0f} | "
                f"{row['ours']['peak_mb']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
