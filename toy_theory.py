"""toy_theory.py -- see *why* SimCLR works, on models small enough for a CPU.

Four experiments, each putting one theoretical claim to a test on a toy model, each a subcommand:

    python toy_theory.py cnn          # Zhang & Cao 2024 (arXiv:2409.18685): pre-training removes the n*SNR^q label need
    python toy_theory.py clusters     # Calder & Lee 2025 (arXiv:2503.10812): the loss has trivial minimisers;
                                      #   in training, clusters appear, persist, then fade towards one
    python toy_theory.py covariance   # Tian, Yu, Chen & Ganguli 2020 (arXiv:2010.00578): the covariance operator,
                                      #   layer by layer, and the object selectivity it amplifies
    python toy_theory.py hltm         # the same paper, Sec. 6: hidden nodes learn the latents of a latent tree

    python toy_theory.py cnn --part scaling   # the sweeps behind flags: cnn --part scaling, hltm --part width
    python toy_theory.py cnn --quick  # any subcommand: a seconds-long end-to-end run (used by the tests)
    python toy_theory.py cnn --fig assets/toy_cnn.png   # the figure (default: <out>/<subcommand>[_<part>].png)

SimCLR itself: Chen et al. 2020, arXiv:2002.05709. The companion `simclr.py` trains the real thing.

Each subcommand prints its tables, writes `summary.json` under `--out` (default runs/toy/<subcommand>[_<part>]),
then a PNG when matplotlib is installed. Only torch and numpy are required. Every default run costs at most about
two minutes of one CPU thread (README.md).

What each experiment measures (numbers and verdicts: README.md, "Toy theory"):
  cnn        supervised GD from a random init, and fine-tuning from filters pre-trained on n0 unlabelled samples by
             SimCLR, by SimCLR on views that share nothing and by PCA (controls), on the same labelled sets (label
             counts stratified): supervised test error against n at several SNRs (Cao et al.'s n SNR^q threshold),
             fine-tuned test error against n at several n0 SNR^2. --part scaling: SimCLR's alignment with mu
             against n0 SNR^2 / (1 + 2 sqrt(n0/d)), and what decides the fine-tuning outcome.
  clusters   (a) an exact identity, so an illustration: an embedding that ignores the clusters has the same loss as
             one that respects them; (b) a one-hidden-layer net trained with NT-Xent on the unit circle: how
             clustered its latents are over training, against the input's own clustering and a no-cluster control.
  covariance (a) Theorem 3, -grad_{W_l} L_simp = 4 V_z0[Kbar_l] vec(W_l), against autograd layer by layer on a
             bias-free ReLU MLP, f(x) = W x, and the conv net of (b); (b) that conv net on the "11" / "101" objects
             of Tian et al.'s Fig. 3: filters grow object-selective when the two views share the object and not when
             the positive view holds an independent one, and its first NT-Xent step follows its covariance
             operator only in the first case.
  hltm       a tree-shaped ReLU net trained on pairs that share only the root of a hierarchical latent tree model:
             its nodes come to correlate with latents it never sees, against the Bayes ceiling and a control
             trained as far on pairs that share one latent just above the leaves instead of the root (--control-level):
             it learns that latent, not the root. The loss is NT-Xent, 2N - 2 negatives per view, where the authors'
             code uses a one-negative loss (--loss nce). --part width: nodes per latent below a root block of fixed
             size.
"""

import argparse
import json
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time

if __name__ == "__main__":  # Ctrl-C while torch loads: a quiet stop (exit 130), not a traceback; main() takes over
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import numpy as np
import torch
import torch.nn.functional as F



# =====================================================================================================
# Config: every flag once, default in every help
# =====================================================================================================


def common_flags(s):
    s.add_argument("--seed", type=int, default=0, help="base random seed (default: 0)")
    s.add_argument("--out", type=str, default=None, help="output folder (default: runs/toy/<subcommand>[_<part>])")
    s.add_argument("--fig", type=str, default=None, help="PNG path (default: <out>/<subcommand>[_<part>].png)")
    s.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    s.add_argument("--quick", action="store_true", help="tiny sizes, runs in seconds (default: off)")


def cnn_flags(s):
    s.add_argument("--part", choices=["main", "scaling"], default="main",
                   help="main: test error against n, supervised at each --snrs and fine-tuned at each --n0-snr2s; "
                        "scaling: pre-training at n0 SNR^2 fixed while n0 varies, at each --scaling-ds (default: main)")
    s.add_argument("--d", type=int, default=1000, help="patch dimension; d > n is the over-parameterised regime (default: 1000)")
    s.add_argument("--sigma-p", type=float, default=1.0, help="noise std per coordinate (default: 1.0)")
    s.add_argument("--m", type=int, default=10, help="filters per class, 2m in all (default: 10)")
    s.add_argument("--q", type=int, default=3, help="ReLU^q exponent, q > 2 as both papers require (default: 3)")
    s.add_argument("--snrs", type=float, nargs="+", default=[0.25, 0.35, 0.5], help="SNRs of supervised training (default: 0.25 0.35 0.5)")
    s.add_argument("--ns", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64, 128],
                   help="labelled sample sizes n (default: 2 4 8 16 32 64 128)")
    s.add_argument("--level", type=float, default=0.25, help="test error whose first crossing marks the n SNR^q threshold (default: 0.25)")
    s.add_argument("--ft-snr", type=float, default=0.1, help="SNR of pre-training and fine-tuning (default: 0.1)")
    s.add_argument("--n0-snr2s", type=float, nargs="+", default=[0.25, 1, 4],
                   help="n0 SNR^2 of pre-training; n0 = n0 SNR^2 / SNR^2 (default: 0.25 1 4)")
    s.add_argument("--seeds", type=int, default=8, help="labelled sets per n, with stratified label counts; each also seeds a pre-training (default: 8)")
    s.add_argument("--sigma0", type=float, default=0.01, help="init std of supervised filters; fine-tuning filters get the same norm (default: 0.01)")
    s.add_argument("--eta", type=float, default=0.01, help="fine-tuning / supervised GD step (default: 0.01)")
    s.add_argument("--steps", type=int, default=2000, help="most fine-tuning / supervised full-batch GD steps (default: 2000)")
    s.add_argument("--loss-tol", type=float, default=1e-3, help="GD stops once the training loss is below this (default: 0.001)")
    s.add_argument("--n-test", type=int, default=1000, help="test samples (default: 1000)")
    s.add_argument("--tau", type=float, default=1.0, help="InfoNCE temperature for pre-training (default: 1.0)")
    s.add_argument("--pre-sigma0", type=float, default=1e-6, help="init std for pre-training (default: 1e-6)")
    s.add_argument("--pre-rate", type=float, default=0.4, help="pre-training step as a fraction of 1 / lambda_1, lambda_1 = 2||mu||^2/tau with ||mu||^2 estimated from the unlabelled pairs (default: 0.4)")
    s.add_argument("--pre-drop", type=float, default=0.1,
                   help="pre-training stops once the InfoNCE loss is this far below log n0, its value at h = 0 (default: 0.1)")
    s.add_argument("--pre-steps", type=int, default=200, help="most pre-training GD steps (default: 200)")
    s.add_argument("--scaling-ds", type=int, nargs="+", default=[200, 2000], help="d of --part scaling (default: 200 2000)")
    s.add_argument("--n0s", type=int, nargs="+", default=[25, 100, 400, 1600], help="n0 of --part scaling (default: 25 100 400 1600)")
    s.add_argument("--scaling-n0snr2", type=float, nargs="+", default=[0.25, 1, 4, 16, 64],
                   help="n0 SNR^2 grid of --part scaling, at each of --n0s (default: 0.25 1 4 16 64)")
    s.add_argument("--scaling-n", type=int, default=20, help="labelled n of --part scaling (default: 20)")
    s.add_argument("--scaling-seeds", type=int, default=3, help="seeds (and labelled sets) per cell of --part scaling (default: 3)")


def clusters_flags(s):
    s.add_argument("--per-cluster", type=int, default=50, help="points per cluster, 4 clusters (default: 50)")
    s.add_argument("--radius", type=float, default=0.8, help="cluster disk radius, centres (+-1,+-1) (default: 0.8)")
    s.add_argument("--kernel-tau", type=float, default=0.1, help="Gaussian-kernel temperature of part (a) (default: 0.1)")
    s.add_argument("--tau", type=float, default=0.2, help="NT-Xent temperature on the circle (default: 0.2)")
    s.add_argument("--hidden", type=int, default=100, help="hidden width (default: 100)")
    s.add_argument("--lr", type=float, default=0.05, help="SGD learning rate, full batch (default: 0.05)")
    s.add_argument("--steps", type=int, default=3000, help="training steps, logged 8 times per decade (default: 3000)")
    s.add_argument("--seeds", type=int, default=8, help="networks (init and views), one per seed, each also trained on the control (default: 8)")
    s.add_argument("--k-scramble", type=int, default=97, help="multiplier of the scrambling map r -> k r mod N (default: 97)")


def covariance_flags(s):
    s.add_argument("--D", type=int, default=12, help="input dimension of the Theorem 3 check (default: 12)")
    s.add_argument("--widths", type=int, nargs="+", default=[10, 8, 6], help="layer widths of the ReLU MLP of the check (default: 10 8 6)")
    s.add_argument("--N", type=int, default=16, help="latents z0 in the Theorem 3 check (default: 16)")
    s.add_argument("--K", type=int, default=5, help="augmentations per latent in the Theorem 3 check (default: 5)")
    s.add_argument("--L", type=int, default=16, help="length of the 1-D signal (default: 16)")
    s.add_argument("--filters", type=int, default=16, help="conv filters (default: 16)")
    s.add_argument("--width", type=int, default=3, help="conv filter width (default: 3)")
    s.add_argument("--batch", type=int, default=128, help="SimCLR batch (default: 128)")
    s.add_argument("--tau", type=float, default=0.5, help="NT-Xent temperature (default: 0.5)")
    s.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default: 0.05)")
    s.add_argument("--steps", type=int, default=1500, help="training steps (default: 1500)")
    s.add_argument("--log-every", type=int, default=100, help="steps between measurements (default: 100)")
    s.add_argument("--noise", type=float, default=0.05, help="pixel noise std of each view (default: 0.05)")
    s.add_argument("--seeds", type=int, default=5, help="networks, one init per seed, each with its control (default: 5)")


def hltm_flags(s):
    s.add_argument("--part", choices=["main", "width"], default="main",
                   help="main: SimCLR vs control vs ceiling at --hid; width: SimCLR at each of --hids (default: main)")
    s.add_argument("--depth", type=int, default=5, help="levels of latents below the root; 2^depth leaves (default: 5)")
    s.add_argument("--children", type=int, default=2, help="children per latent (default: 2)")
    s.add_argument("--delta-lo", type=float, default=0.7, help="smallest |delta| of an edge (default: 0.7)")
    s.add_argument("--delta-hi", type=float, default=1.0, help="largest |delta| of an edge (default: 1.0)")
    s.add_argument("--hid", type=int, default=10, help="network nodes per latent (default: 10)")
    s.add_argument("--emb", type=int, default=None, help="nodes of the root block, the embedding (default: --hid)")
    s.add_argument("--control-level", type=int, default=None,
                   help="the control's views share latent 0 of this level instead of the root (1 .. --depth; "
                        "default: --depth - 1, the latent just above the first two leaves, or 1 at --depth 1)")
    s.add_argument("--loss", choices=["nt-xent", "nce"], default="nt-xent",
                   help="nt-xent: SimCLR's, 2N - 2 negatives per view; nce: the authors' code's, one negative "
                        "(they use --lr 0.1 --tau 0.01) (default: nt-xent)")
    s.add_argument("--batch", type=int, default=128, help="SimCLR batch (default: 128)")
    s.add_argument("--tau", type=float, default=0.1, help="temperature of the loss (default: 0.1)")
    s.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default: 0.05)")
    s.add_argument("--steps", type=int, default=2000, help="training steps (default: 2000)")
    s.add_argument("--log-every", type=int, default=250, help="steps between measurements (default: 250)")
    s.add_argument("--n-eval", type=int, default=8192, help="fresh samples the correlations are measured on (default: 8192)")
    s.add_argument("--seeds", type=int, default=5, help="trees (and networks), one per seed (default: 5)")
    s.add_argument("--hids", type=int, nargs="+", default=[1, 2, 5, 10],
                   help="nodes per latent below the root, --part width (default: 1 2 5 10)")


SUBCOMMANDS = dict(cnn=("Zhang & Cao 2024: SimCLR pre-training vs supervised, two-layer CNN", cnn_flags),
                   clusters=("Calder & Lee 2025: trivial minimisers; clusters appear in training, then fade",
                             clusters_flags),
                   covariance=("Tian et al. 2020: covariance operator and object selectivity", covariance_flags),
                   hltm=("Tian et al. 2020: latents of a hierarchical latent tree learned without labels", hltm_flags))
# --quick: tiny sizes as the subcommand's defaults, so a flag typed beside it still wins
QUICK = dict(cnn=dict(d=100, snrs=[0.5], ns=[2, 16], ft_snr=0.5, n0_snr2s=[16], seeds=2, n_test=200, steps=300,
                      scaling_ds=[100], n0s=[25, 100], scaling_n0snr2=[1, 16], scaling_seeds=1),
             clusters=dict(per_cluster=20, steps=150, seeds=1),
             covariance=dict(steps=100, log_every=50, seeds=1),
             hltm=dict(depth=3, steps=200, log_every=100, n_eval=1024, seeds=1, hids=[1, 4]))


def parser():
    """The command line: the parser and each subcommand's own (for its usage line and its defaults)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub, subs = p.add_subparsers(dest="cmd", required=True), {}
    for name, (text, flags) in SUBCOMMANDS.items():
        subs[name] = sub.add_parser(name, help=text)
        common_flags(subs[name])
        flags(subs[name])
        subs[name]._negative_number_matcher = re.compile(r"-\.?\d|-(inf|nan)", re.I)  # --lr -inf: a value, refused
    return p, subs


def get_args(argv=None):
    p, subs = parser()
    args = p.parse_args(argv)
    if args.quick:
        subs[args.cmd].set_defaults(**QUICK[args.cmd])
        args = p.parse_args(argv)
    check_args(subs[args.cmd], args)
    # derived values, in one place
    name = args.cmd if getattr(args, "part", "main") == "main" else f"{args.cmd}_{args.part}"  # e.g. cnn_scaling
    args.out = os.path.join("runs", "toy", name) if args.out is None else os.path.expanduser(args.out)  # --out=~/x
    args.fig = os.path.join(args.out, name + ".png") if args.fig is None else os.path.expanduser(args.fig)
    for flag, path, folder in [("--out", args.out, True), ("--fig", args.fig, False)]:
        problem = unwritable(path, folder)
        if problem:
            subs[args.cmd].error(f"{flag} {path}: {problem}; give another path")
    for key, value in vars(args).items():  # a value typed twice is one column, computed once
        if isinstance(value, list):
            setattr(args, key, sorted(set(value)) if key == "ns" else list(dict.fromkeys(value)))
    if args.cmd == "hltm" and args.control_level is None:
        args.control_level = max(1, args.depth - 1)
    return args


# flags no run can use: the smallest value each may take (every float must also be finite); float32 holds no
# --pre-sigma0 below 1e-30 as a normal number, and a correlation over fewer than 64 samples (--n-eval) is noise
AT_LEAST = dict(seed=0, threads=1, steps=1, seeds=1, d=2, m=1, q=3, ns=1, scaling_seeds=1, n_test=1, pre_sigma0=1e-30,
                pre_steps=0, loss_tol=0, scaling_ds=2, n0s=2, scaling_n=1, per_cluster=3, hidden=1, k_scramble=1, D=2,
                widths=1, N=2, K=1, L=3, filters=2, width=1, batch=2, log_every=1, noise=0, depth=1, children=1,
                delta_lo=0, hid=1, emb=2, n_eval=64, hids=1, control_level=1)
POSITIVE = ["sigma_p", "snrs", "level", "ft_snr", "n0_snr2s", "sigma0", "eta", "tau", "pre_sigma0", "pre_rate",
            "pre_drop", "scaling_n0snr2", "radius", "kernel_tau", "lr"]


def check_args(p, args):
    """Refuse a flag no run can use with argparse's usage line and a message (exit 2), before anything runs."""
    for key, value in vars(args).items():
        flag = "--" + key.replace("_", "-")
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, float) and not math.isfinite(v):
                p.error(f"{flag} must be a finite number (got {v})")
            if key in AT_LEAST and v is not None and v < AT_LEAST[key]:
                p.error(f"{flag} must be at least {AT_LEAST[key]} (got {v})")
            if key in POSITIVE and v <= 0:
                p.error(f"{flag} must be above 0 (got {v})")
    if args.seed >= 2 ** 32:
        p.error(f"--seed must be below 2^32 (got {args.seed})")
    if args.threads > (os.cpu_count() or 1):
        p.error(f"--threads {args.threads}: this machine has {os.cpu_count()} cores; give at most that")
    if args.cmd == "cnn":
        if args.level >= 0.5:
            p.error(f"--level must be below 0.5, the error of a coin (got {args.level})")
        for k in args.n0_snr2s:
            if round(k / args.ft_snr ** 2) < 2:
                p.error(f"--n0-snr2s {k:g} at --ft-snr {args.ft_snr} gives n0 = {round(k / args.ft_snr ** 2)} "
                        "unlabelled samples; InfoNCE needs at least 2: raise it or lower --ft-snr")
    if args.cmd == "clusters" and math.gcd(args.k_scramble, 4 * args.per_cluster) != 1:
        p.error(f"--k-scramble {args.k_scramble} must be coprime to N = 4 x --per-cluster = {4 * args.per_cluster}, "
                "so that k rank mod N is a permutation")
    if args.cmd == "covariance" and args.width > args.L:
        p.error(f"--width {args.width} is longer than the signal, --L {args.L}: give a width of at most {args.L}")
    if args.cmd == "hltm" and not args.delta_lo <= args.delta_hi <= 1:
        p.error(f"need 0 <= --delta-lo <= --delta-hi <= 1 (got {args.delta_lo}, {args.delta_hi}): "
                "delta is the correlation between a latent and its parent")
    if args.cmd == "hltm" and (args.emb or args.hid) < 2:  # F.normalize of one node is its sign: no gradient
        p.error(f"--hid {args.hid} gives a root block (the embedding NT-Xent normalises) of 1 node, which cannot "
                "learn: give --emb 2 or more")
    if args.cmd == "hltm" and (args.control_level or 0) > args.depth:
        p.error(f"--control-level {args.control_level} is below the leaves (level --depth = {args.depth}): give "
                f"at most {args.depth}")
    need, have = memory_needed(args), os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:  # refused before allocating: a size that cannot fit would only swap, or fail after minutes
        fits = lambda key, v: memory_needed(argparse.Namespace(**{**vars(args), key: v})) <= have
        limits = []
        for key, v in vars(args).items():
            if key in AT_LEAST and type(v) is int and v > p.get_default(key) and fits(key, AT_LEAST[key]):
                lo, hi = AT_LEAST[key], v  # the largest value that fits, the rest as given: fits(lo), not fits(hi)
                while hi - lo > 1:
                    lo, hi = ((lo + hi) // 2, hi) if fits(key, (lo + hi) // 2) else (lo, (lo + hi) // 2)
                limits.append(f"--{key.replace('_', '-')} at most {lo}")
        p.error(f"these sizes need about {need / 2 ** 30:.3g} GiB of memory, more than this machine's "
                f"{have / 2 ** 30:.3g} GiB: lower them ({', '.join(limits) or 'the sizes you raised'}, each with the "
                "rest as given)")


def memory_needed(a):
    """Rough bytes of the largest tensors a run of a holds at once (what check_args compares with the memory)."""
    if a.cmd == "cnn":
        main = a.part == "main"
        cells = (len(a.snrs) + 1 + 3 * len(a.n0_snr2s)) * a.seeds if main else (
            2 * len(a.n0s) * len(a.scaling_n0snr2) * a.scaling_seeds)
        n0 = max(round(k / a.ft_snr ** 2) for k in a.n0_snr2s) if main else max(a.n0s)
        return 8 * (a.d if main else max(a.scaling_ds)) * (
            4 * cells * (max(a.ns) if main else a.scaling_n) + 5 * n0 + 2 * a.n_test + 2 * a.m)
    if a.cmd == "clusters":  # 2 seeds' nets, (2N)^2 similarities and (2N, hidden) activations, a few of each
        return 16 * 2 * a.seeds * 8 * a.per_cluster * (8 * a.per_cluster + a.hidden)
    if a.cmd == "covariance":  # the connections K_l of the Theorem 3 check, float64; the conv net's views
        sizes = [a.D] + a.widths
        return 24 * a.N * a.K * sizes[-1] * max(i * o for i, o in zip(sizes, sizes[1:])) + 64 * a.batch * a.L * a.filters
    nets = (2 if a.part == "main" else 1) * a.seeds
    hid = max([a.hid, a.emb or 0] + (a.hids if a.part == "width" else []))
    leaves = a.children ** min(a.depth, 100)  # the evaluation trees and their forward pass, float64 for correlations
    return nets * leaves * (a.n_eval + 3 * a.batch) * (16 + 24 * hid)


def unwritable(path, folder):
    """Why a run could not write `path` (a folder if `folder`, else a PNG), or None."""
    if not path:
        return "is empty"
    if not folder and os.path.splitext(os.path.basename(path))[1].lower() != ".png":  # ".png" alone has no name
        return "the figure is written as a PNG, so the name must end in .png"
    if os.path.exists(path) and os.path.isdir(path) != folder:
        return "exists and is a file, not a folder" if folder else "is a folder"
    parent = path if folder else os.path.dirname(path) or "."
    while not os.path.lexists(parent):  # lexists: a link to nothing stops the walk, to be named below
        parent = os.path.dirname(parent) or "."
    if not os.path.exists(parent):
        return f"{parent} is a link to nothing" if parent == path else f"{parent} is a link to nothing, not a folder"
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a folder"
    try:  # a real write into the nearest folder that exists: os.access says yes to root on /proc or /sys
        tempfile.TemporaryFile(dir=parent).close()
    except OSError as e:
        return f"cannot write there ({e.strerror})"
    return None


# =====================================================================================================
# Shared plumbing: seeding in one place, the loss, output
# =====================================================================================================


def generator(seed):
    """Every random draw comes from a torch.Generator seeded from --seed (and the covariance conv's init from
    torch.manual_seed): seeding in one place."""
    return torch.Generator().manual_seed(int(seed))


def nt_xent(h1, h2, tau):
    """SimCLR's NT-Xent (Eq. 1 of arXiv:2002.05709) on 2N views, self-similarity masked with -inf. h1, h2: (..., N, C);
    one loss per leading index, so that independent runs train as one batch."""
    N = h1.shape[-2]
    z = F.normalize(torch.cat([h1, h2], -2), dim=-1)  # (..., 2N, C)
    sim = (z / tau) @ z.mT  # (..., 2N, 2N)
    sim.diagonal(dim1=-2, dim2=-1).fill_(float("-inf"))
    positive = torch.cat([torch.arange(N, 2 * N), torch.arange(N)]).expand(sim.shape[:-1])  # view i's: i + N, and back
    return F.cross_entropy(sim.flatten(0, -2), positive.flatten(), reduction="none").view(sim.shape[:-1]).mean(-1)


def finite(loss, step, flag):
    """loss as a float, or FloatingPointError naming the flag to lower: a run that diverged says so and stops."""
    value = loss.sum().item()
    if not math.isfinite(value):
        raise FloatingPointError(f"the loss is {value} at step {step}: lower {flag}")
    return value


def strict_json(o):
    """o with inf and nan as strings: JSON has neither, and strict parsers (JavaScript's) refuse Python's Infinity."""
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {k: strict_json(v) for k, v in o.items()}
    return [strict_json(v) for v in o] if isinstance(o, (list, tuple)) else o


def write_atomic(path, write):
    """write(f) to a temporary file beside path, renamed to path once whole: a run stopped mid-write leaves the last
    whole file. An OSError (a full disk, ulimit -f, a folder gone) names path, not the temporary file."""
    folder = os.path.dirname(path) or "."
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
        umask = os.umask(0o022)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp's 0600 would hide the file from the others sharing the folder
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from e
    finally:
        if tmp and os.path.exists(tmp):  # the write failed
            os.remove(tmp)


def pyplot():
    """matplotlib.pyplot, or None without matplotlib: figures are optional, the experiments need torch and numpy."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def mean_std(xs):
    return float(np.mean(xs)), float(np.std(xs))


def pm(xs, f="%.3f"):
    """'mean ± std' of xs, each with format f."""
    return (f + " ± " + f) % mean_std(xs)


def print_table(header, rows):
    w = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    line = lambda r: "| " + " | ".join(str(c).rjust(w[i]) for i, c in enumerate(r)) + " |"
    print(line(header))
    print("|" + "|".join("-" * (x + 2) for x in w) + "|")
    for r in rows:
        print(line(r))



# =====================================================================================================
# 1. cnn -- SimCLR pre-training in a two-layer CNN (Zhang & Cao 2024, arXiv:2409.18685)
# =====================================================================================================
# Data (Cao et al. 2022, adopted by Zhang & Cao): x = [x(1), x(2)], one patch y*mu, the other
# xi ~ N(0, sigma_p^2 (I - mu mu^T/||mu||^2)). SNR = ||mu|| / (sigma_p sqrt(d)).
# Supervised (Cao et al. 2022): GD from a random init fits any n labels; the test error is small when n SNR^q is
# large (benign overfitting) and stays at a constant when n^-1 SNR^-q is large (harmful overfitting).
# Zhang & Cao's main theorem: pre-train a linear CNN with InfoNCE on n0 unlabelled samples, fine-tune on n labels,
# and once n0 SNR^2 is large the n SNR^q requirement is gone.
# Two controls ask what the pre-training contributes. Share-nothing: the same SimCLR with a positive view of an
# independent label, so the two views share nothing. PCA: the top principal direction of the same unlabelled
# samples. mu is that direction in this data model (the signal adds ||mu||^2 to one direction's variance), so any
# variance-seeking pre-training finds it once n0 SNR^2 is large; only what PCA and share-nothing lack is contrastive.


def cnn_mu(d, snr, sigma_p):
    """mu = ||mu|| e_1 with ||mu|| = SNR sigma_p sqrt(d); the direction is arbitrary, e_1 keeps the projection simple."""
    mu = torch.zeros(d, dtype=torch.float64)
    mu[0] = snr * sigma_p * math.sqrt(d)
    return mu


def cnn_data(y, mu, sigma_p, g):
    """Samples x | y. Returns X (n, 2, d): the signal patch y*mu at a random position, noise orthogonal to mu."""
    n, d = len(y), len(mu)
    u = mu / mu.norm()
    xi = sigma_p * torch.randn(n, d, generator=g, dtype=torch.float64)
    xi = xi - (xi @ u)[:, None] * u  # project out mu: covariance sigma_p^2 (I - u u^T)
    sig = y[:, None] * mu  # (n, d)
    first = torch.rand(n, generator=g) < 0.5  # which patch holds the signal; the CNN sums over patches anyway
    X = torch.stack([torch.where(first[:, None], sig, xi), torch.where(first[:, None], xi, sig)], 1)  # (n, 2, d)
    return X


def cnn_labels(n, g):
    return (torch.randint(0, 2, (n,), generator=g) * 2 - 1).double()


def stratified_labels(n, j, sets, g):
    """Labels of the j-th of `sets` labelled sets: k of them +1, the rest -1, in a random order, k the (j + 1/2)/sets
    quantile of Binomial(n, 1/2). Over the sets k follows the law of n fair coins, so a set holding one class only
    comes up as often as its probability 2^(1-n) allows (half the sets at n = 2), not by luck of the draw."""
    u, cdf, k = (j + 0.5) / sets, 0.0, -1
    while cdf < u and k < n:
        k += 1
        cdf += math.comb(n, k) / 2 ** n
    y = -torch.ones(n, dtype=torch.float64)
    y[:k] = 1
    return y[torch.randperm(n, generator=g)]


def cnn_f(W, X, q, m):
    """f(W, x) = F_{+1} - F_{-1},  F_j = (1/m) sum_r sum_p ReLU(<w_{j,r}, x(p)>)^q, for W (..., 2m, d), rows 0..m-1
    W_{+1}, and X (..., n, 2, d): one network per leading index of W. (..., n)"""
    act = torch.relu(torch.einsum("...npd,...rd->...npr", X, W)) ** q  # (..., n, 2, 2m)
    Fj = act.sum(-2) / m  # (..., n, 2m): sum over the two patches
    return Fj[..., :m].sum(-1) - Fj[..., m:].sum(-1)


def train_logistic(W, X, y, mu, q, m, eta, steps, tol):
    """Full-batch GD on the logistic loss log(1 + exp(-y f)) (Cao et al. 2022; Zhang & Cao's fine-tuning) of C
    independent networks W (C, 2m, d), each on its own set X (C, n, 2, d), y (C, n) of signal mu (C, d), until its
    training loss is below tol, the epsilon of both papers' theorems, or for `steps` steps. Returns W, the losses and
    the steps taken (C,).

    Sample i's patches are y_i mu and a noise patch xi_i, so a gradient is a combination of mu and the xi_i and W stays
    W0 + B [mu; xi] (the signal-noise decomposition of Cao et al.): GD runs on B (C, 2m, n + 1) through the Gram
    matrix of [mu; xi], a step costing (n + 1)^2 2m instead of 2n d 2m. mu is a coordinate here, never a label."""
    C, n = y.shape
    P = torch.cat([mu[:, None], X.sum(2) - y[..., None] * mu[:, None]], 1)  # (C, n + 1, d): mu, xi_i = s_i - y_i mu
    gram, pre0 = P @ P.mT, W @ P.mT  # (C, n + 1, n + 1), (C, 2m, n + 1): <p_a, p_b>, <w0_r, p_b>
    sign = torch.cat([torch.ones(m), -torch.ones(m)]).to(X.dtype)[:, None] / m  # (2m, 1): F_{+1} - F_{-1}, each / m
    B, losses, taken = (torch.zeros(C, 2 * m, n + 1, dtype=X.dtype), torch.zeros(C, dtype=X.dtype),
                        torch.zeros(C, dtype=torch.long))
    live, b = torch.arange(C), B  # the networks still training, and their B
    for step in range(steps + 1):
        pre = pre0 + b @ gram  # (c, 2m, n + 1): <w_r, mu>, then <w_r, xi_i>
        act_s = torch.relu(y[:, None] * pre[..., :1])  # (c, 2m, n): ReLU(<w_r, y_i mu>), the signal patches
        act_n = torch.relu(pre[..., 1:])  # (c, 2m, n): ReLU(<w_r, xi_i>), the noise patches
        f = (sign * (act_s ** q + act_n ** q)).sum(1)  # (c, n)
        loss = F.softplus(-y * f).mean(1)  # (c,)
        finite(loss, step, "--eta")
        done = (loss < tol) | (step == steps)
        if done.any():  # record the finished networks, go on with the rest
            B[live[done]], losses[live[done]], taken[live[done]] = b[done], loss[done], step
            keep = ~done
            live, gram, pre0, y, b, act_s, act_n, f = (v[keep] for v in (live, gram, pre0, y, b, act_s, act_n, f))
            if not len(live):
                break
        coef = (-y * torch.sigmoid(-y * f) / n)[:, None] * sign * q  # (c, 2m, n): dL/df_i times df_i/dF_j
        grad_s = (coef * act_s ** (q - 1) * y[:, None]).sum(-1, keepdim=True)  # (c, 2m, 1): dL/d<w_r, mu>
        b = b - eta * torch.cat([grad_s, coef * act_n ** (q - 1)], -1)  # and dL/d<w_r, xi_i>
    return W + B @ P, losses, taken


def test_error(W, X, y, q, m):
    """Test error of each network W (..., 2m, d) on one test set X (n, 2, d), y (n,)."""
    return (torch.sign(cnn_f(W, X, q, m)) != y).double().mean(-1)


def info_nce(h, hp, tau):
    """InfoNCE with inner-product similarity: -1/n sum_i log exp(<h_i,h+_i>/tau) / sum_j exp(<h_i,h+_j>/tau)."""
    logits = h @ hp.T / tau  # (n0, n0)
    return F.cross_entropy(logits, torch.arange(len(h)))


def directions(W):
    """The rows of W at unit norm, in float64: filters as small as --pre-sigma0 1e-30 square without underflow (and
    F.normalize's eps of 1e-12 would not leave them at unit norm)."""
    return W.double() / W.double().norm(dim=-1, keepdim=True)


def mean_abs_cos(W, mu):
    """Mean over the filters of |cos(w_r, mu)|."""
    return (directions(W) @ mu).abs().mean().item() / mu.norm().item()


def filter_response(W, mu, sigma_p):
    """Median over the filters of |<w, mu>| / (sigma_p ||P w||), P the projection off mu: a filter's response to the
    signal over the spread of its response to a noise patch (whose covariance is sigma_p^2 P)."""
    u, W = mu / mu.norm(), directions(W)
    off = (W - (W @ u)[:, None] * u).norm(dim=1)  # (2m,): ||P w||
    return ((W @ mu).abs() / (sigma_p * off)).median().item()


def pretrain_linear_cnn(X, Xp, mu, W, tau, eta, steps, drop):
    """SimCLR pre-training of the linear CNN h(x) = sum_p W x(p) (Zhang & Cao), GD from a small init W (2m, d).

    While h is small the InfoNCE gradient is linear in W: a power iteration w <- (I + eta A) w whose top eigenvector
    is +-mu once n0 SNR^2 is large (Zhang & Cao's analysis of pre-training). GD stops when the loss has fallen
    `drop` below log n0, its value at h = 0: the end of that small-h phase, read off the unlabelled data alone.
    Returns the 2m filters, the mean |cos(w_r, mu)| after every step (measured, never used) and the steps taken.
    """
    W = W.clone().requires_grad_(True)
    s, sp = X.sum(1), Xp.sum(1)  # (n0, d): the projection head sums patch activations, so only x(1)+x(2) matters
    cos = [mean_abs_cos(W.detach(), mu)]
    for step in range(steps + 1):
        loss = info_nce(s @ W.T, sp @ W.T, tau)
        if finite(loss, step, "--pre-rate") < math.log(len(X)) - drop or step == steps:
            break
        (grad,) = torch.autograd.grad(loss, W)
        with torch.no_grad():
            W -= eta * grad
        cos.append(mean_abs_cos(W.detach(), mu))
    return W.detach(), cos, step


def shared_energy(X, Xp):
    """mean_i s_i . s'_i, s = x(1) + x(2) of a sample and s' of its positive view: the energy they share, an unbiased
    estimate of ||mu||^2 (their noises are independent) from unlabelled pairs alone; at least the energy per
    coordinate, mean_i ||s_i||^2 / d, so that a noisy estimate at low SNR cannot make the step unbounded."""
    s, sp = X.sum(1), Xp.sum(1)
    return max((s * sp).sum(1).mean().item(), (s * s).sum(1).mean().item() / s.shape[1])


def top_direction(X):
    """The top principal direction of the samples' s = x(1) + x(2) (uncentred: E s = 0), from the smaller of the two
    Gram matrices. (d,)"""
    S = X.sum(1)  # (k, d)
    if len(S) >= S.shape[1]:
        return torch.linalg.eigh(S.T @ S).eigenvectors[:, -1]
    return F.normalize(S.T @ torch.linalg.eigh(S @ S.T).eigenvectors[:, -1], dim=0)  # S^T u: u's right twin


def cnn_pretrain(args, snr, n0, seed, controls=True):
    """Pre-training for one (SNR, n0, seed), from one init: SimCLR on pairs sharing their hidden label (Zhang & Cao's
    positive view, a fresh draw of the same class) and, with controls, SimCLR on pairs of independent labels
    ('share-nothing') and the top principal direction of all 2 n0 samples, signed per filter as the init ('pca').
    Returns {method: (the 2m filters ready for fine-tuning, what they learned: mean |cos(w_r, mu)|, the filter
    response, the steps, the |cos| curve)}."""
    g = generator(seed)
    mu = cnn_mu(args.d, snr, args.sigma_p)
    y0 = cnn_labels(n0, g)
    X0, X0p = cnn_data(y0, mu, args.sigma_p, g), cnn_data(y0, mu, args.sigma_p, g)
    W0 = args.pre_sigma0 * torch.randn(2 * args.m, args.d, generator=g, dtype=torch.float64)
    # step as a fixed fraction of the power iteration's top eigenvalue 2||mu||^2/tau (Zhang & Cao), with ||mu||^2
    # estimated from the unlabelled pairs (mu is hidden), so every SNR gets about the same number of power steps;
    # the tiny init keeps us in the linear (power-method) phase longer. The control keeps SimCLR's step.
    eta0 = args.pre_rate * args.tau / (2 * shared_energy(X0, X0p))
    run = lambda Xp: pretrain_linear_cnn(X0.float(), Xp.float(), mu, W0.float(), args.tau, eta0, args.pre_steps,
                                         args.pre_drop)  # float32: a power iteration needs no more, at 3x the speed
    pre = {"simclr": run(X0p)}
    if controls:
        pre["share-nothing"] = run(cnn_data(cnn_labels(n0, g), mu, args.sigma_p, g))  # views of independent labels
        v = top_direction(torch.cat([X0, X0p]))
        pre["pca"] = (torch.where(W0 @ v < 0, -1.0, 1.0)[:, None] * v, [], 0)
    # Fine-tuning starts from the pre-trained *directions* at the norm of the random init (sigma0 sqrt d), so the
    # comparison is direction vs direction, not a bigger init vs a smaller one. One random split into W_{+1}, W_{-1}.
    split = torch.randperm(2 * args.m, generator=g)
    return {k: ((directions(W) * args.sigma0 * math.sqrt(args.d))[split].float(),
                dict(cos=mean_abs_cos(W, mu), response=filter_response(W, mu, args.sigma_p), stop=stop, curve=curve))
            for k, (W, curve, stop) in pre.items()}


def cnn_labelled(args, snr, n, j, sets):
    """The j-th labelled set of size n and a random init, from one stream per (set, n): supervised training and
    fine-tuning see the same set, at every SNR and n0."""
    g = generator(100_003 * (args.seed + j) + n)
    y = stratified_labels(n, j, sets, g)
    X = cnn_data(y, cnn_mu(args.d, snr, args.sigma_p), args.sigma_p, g)
    W0 = args.sigma0 * torch.randn(2 * args.m, args.d, generator=g, dtype=torch.float64)
    return X.float(), y.float(), W0.float()  # float32: GD here needs no more, at twice the speed


def cnn_cells(args, cells, sets):
    """Train every cell, a dict of snr, n, set and init (the pre-trained filters; None: supervised from a random
    init), all cells of one n as one batch; adds the test error, the final loss, the steps and one_class."""
    for n in sorted({c["n"] for c in cells}):
        batch = [c for c in cells if c["n"] == n]
        data = [cnn_labelled(args, c["snr"], n, c["set"], sets) for c in batch]
        X, y, W0 = (torch.stack(v) for v in zip(*data))
        W0 = torch.stack([W0[i] if c["init"] is None else c["init"] for i, c in enumerate(batch)])
        mu = torch.stack([cnn_mu(args.d, c["snr"], args.sigma_p) for c in batch]).float()
        t0 = time.time()
        W, loss, steps = train_logistic(W0, X, y, mu, args.q, args.m, args.eta, args.steps, args.loss_tol)
        print(f"n={n}: {len(batch)} networks, {time.time() - t0:.1f}s")
        for i, c in enumerate(batch):
            c.update(W=W[i], loss=loss[i].item(), steps=steps[i].item(), one_class=bool(abs(y[i].sum().item()) == n))
    for snr, j in {(c["snr"], c["set"]) for c in cells}:  # one test set per (SNR, set), every network on it at once
        g = generator(100_003 * (args.seed + j))  # stream n = 0 of cnn_labelled's: shared by every n
        yt = cnn_labels(args.n_test, g)
        Xt = cnn_data(yt, cnn_mu(args.d, snr, args.sigma_p), args.sigma_p, g).float()
        mine = [c for c in cells if (c["snr"], c["set"]) == (snr, j)]
        err = test_error(torch.stack([c.pop("W") for c in mine]), Xt, yt.float(), args.q, args.m)
        for c, e in zip(mine, err.tolist()):
            c["err"] = e
    for c in cells:
        c.pop("init")
    return cells


def first_crossing(ns, errs, level):
    """The n at which the mean test error first falls to `level`, interpolated in log n; None if it never does."""
    for n1, e1, n2, e2 in zip(ns, errs, ns[1:], errs[1:]):
        if e1 > level >= e2:
            return math.exp(math.log(n1) + math.log(n2 / n1) * (e1 - level) / (e1 - e2))
    return None


def run_cnn(args):
    return {"main": cnn_main, "scaling": cnn_scaling}[args.part](args)


def select(cells, **kv):
    """The cells whose every key in kv has that value (floats compared with math.isclose)."""
    return [c for c in cells if all(c.get(k) == v or isinstance(v, float) and math.isclose(c.get(k) or 0, v)
                                    for k, v in kv.items())]


METHODS = {"simclr": "SimCLR", "share-nothing": "views share nothing", "pca": "PCA direction"}


def cnn_main(args):
    """Label complexity: supervised test error against n at each SNR (Cao et al.'s n SNR^q threshold), and fine-tuned
    test error against n at each n0 SNR^2 (Zhang & Cao: pre-training removes the threshold), with both controls."""
    t0, sets = time.time(), range(args.seeds)
    cells = [dict(snr=snr, n=n, set=j, init=None, method="supervised")
             for snr in sorted(set(args.snrs) | {args.ft_snr}) for n in args.ns for j in sets]
    for k in args.n0_snr2s:
        n0 = round(k / args.ft_snr ** 2)
        for j in sets:
            for method, (W, info) in cnn_pretrain(args, args.ft_snr, n0, args.seed + j).items():
                cells += [dict(snr=args.ft_snr, n=n, set=j, init=W, method=method, n0=n0, n0_snr2=k, **info)
                          for n in args.ns]
    print(f"pre-training: {time.time() - t0:.0f}s")
    cnn_cells(args, cells, args.seeds)
    print(f"supervised and fine-tuning: {time.time() - t0:.0f}s")
    sup, ft = select(cells, method="supervised"), [c for c in cells if c["method"] != "supervised"]
    crossings, q_fit = cnn_supervised_table(args, sup)
    cnn_finetune_tables(args, sup, ft)
    strip = lambda cs: [{k: v for k, v in c.items() if k != "curve"} for c in cs]
    summary = dict(config=vars(args), supervised=strip(sup), finetuned=strip(ft), q_fit=q_fit,
                   crossings={str(s): n_c for s, n_c in crossings.items()}, capped=capped_cells(args, cells))
    return summary, lambda plt: plot_cnn_main(plt, args, sup, ft)


def cnn_supervised_table(args, sup):
    print(f"\nSupervised test error, mean ± std over {args.seeds} labelled sets (d={args.d}, m={args.m}, q={args.q}, "
          f"GD step {args.eta} until the training loss < {args.loss_tol:g} or {args.steps} steps)")
    err = lambda **kv: [c["err"] for c in select(sup, **kv)]
    print_table(["n"] + [f"SNR {s}: n SNR^{args.q}" for s in args.snrs] + [f"SNR {s}" for s in args.snrs],
                [[n] + [f"{n * s ** args.q:.3g}" for s in args.snrs] + [pm(err(snr=s, n=n)) for s in args.snrs]
                 for n in args.ns])
    crossings = {s: first_crossing(args.ns, [np.mean(err(snr=s, n=n)) for n in args.ns], args.level) for s in args.snrs}
    for s, n_c in crossings.items():
        print(f"SNR {s}: mean error first at {args.level} at " + (
            f"n = {n_c:.0f}, n SNR^{args.q} = {n_c * s ** args.q:.2f}" if n_c else f"no n up to {args.ns[-1]}"))
    fit = [(math.log(s), math.log(n_c)) for s, n_c in crossings.items() if n_c]
    q_fit = -np.polyfit(*zip(*fit), 1)[0] if len(fit) > 1 else None
    if q_fit is not None:
        print(f"a line through log n against log SNR at those points: n ∝ SNR^-{q_fit:.2f} (the theorem's "
              f"q = {args.q})")
    return crossings, q_fit


def cnn_finetune_tables(args, sup, ft):
    print(f"\nSNR {args.ft_snr}: test error, mean ± std over {args.seeds} labelled sets; fine-tuned from SimCLR, from "
          f"SimCLR on views that share nothing, and from the unlabelled data's top principal direction, each "
          f"pre-trained on n0 = n0 SNR^2 / SNR^2 samples, once per set")
    print_table(["n0 SNR^2", "n", "supervised"] + list(METHODS.values()),
                [[f"{k:g} (n0 {round(k / args.ft_snr ** 2)})", n]
                 + [pm([c["err"] for c in select(sup, snr=args.ft_snr, n=n)])]
                 + [pm([c["err"] for c in select(ft, n0_snr2=k, n=n, method=m)]) for m in METHODS]
                 for k in args.n0_snr2s for n in args.ns])
    n = args.ns[0]
    print_table(["pre-training, mean ± std over sets", *(f"n0 SNR^2 = {k:g}" for k in args.n0_snr2s)],
                [[f"{name}: {METHODS[m]}"] + [pm([c[key] for c in select(ft, n0_snr2=k, n=n, method=m)])
                                               for k in args.n0_snr2s]
                 for name, key in [("|cos(w, mu)|", "cos"), ("filter response", "response"), ("steps", "stop")]
                 for m in METHODS if key != "stop" or m != "pca"])
    mean_err = lambda cs: "%.3f" % np.mean([c["err"] for c in cs]) if cs else "-"
    rows = [[n, f"{len(select(sup, snr=args.ft_snr, n=n, one_class=True))} of {args.seeds}",
             mean_err(select(sup, snr=args.ft_snr, n=n, one_class=True))]
            + [mean_err(select(ft, n0_snr2=k, n=n, one_class=True, method="simclr")) + " / "
               + mean_err(select(ft, n0_snr2=k, n=n, one_class=False, method="simclr")) for k in args.n0_snr2s]
            for n in args.ns if select(ft, n=n, one_class=True)]
    if rows:
        print(f"\nthe sets holding one class only: test error on them / on the other sets, SNR {args.ft_snr}, SimCLR")
        print_table(["n", "one-class sets", "supervised"] + [f"n0 SNR^2 = {k:g}" for k in args.n0_snr2s], rows)


def capped_cells(args, cells):
    """The networks GD left at the --steps cap with their training loss still above --loss-tol: printed per method,
    returned one by one."""
    capped = [c for c in cells if c["loss"] >= args.loss_tol]
    print(f"\n{len(capped)} of {len(cells)} networks stopped at the {args.steps}-step cap with the training loss above "
          f"{args.loss_tol:g} (loss ln(2)/n is one sample at f = 0, on which no filter fires: its own gradient is 0)")
    group = lambda c: (c["method"], c.get("n0"))
    groups = {group(c): [x for x in capped if group(x) == group(c)] for c in cells}
    print_table(["method", "n0", "capped", "at n", "training loss", "their test error"],
                [[method, n0 or "-", f"{len(cs)} of {len(select(cells, method=method, n0=n0))}",
                  " ".join(str(n) for n in sorted({c["n"] for c in cs})) or "-",
                  "%.4f-%.4f" % (min(c["loss"] for c in cs), max(c["loss"] for c in cs)) if cs else "-",
                  pm([c["err"] for c in cs]) if cs else "-"] for (method, n0), cs in groups.items()])
    return [{k: c.get(k) for k in ("method", "snr", "n0", "n", "set", "loss", "steps", "err")} for c in capped]


def cnn_scaling(args):
    """Which combination of n0 and SNR pre-training needs, and what decides the fine-tuning outcome. In the power
    iteration the signal eigenvalue is ||mu||^2 = SNR^2 sigma_p^2 d against a noise bulk ~ sigma_p^2 (d/n0 +
    2 sqrt(d/n0)): their ratio is n0 SNR^2 / (1 + 2 sqrt(n0/d)), which is n0 SNR^2 only when d >> n0. So at each d,
    n0 SNR^2 is held on a grid while n0 varies; at each cell supervised training and fine-tuning see the same labels."""
    cells, t0 = [], time.time()
    for d in args.scaling_ds:
        a = argparse.Namespace(**{**vars(args), "d": d})
        cs = []
        for n0 in args.n0s:
            for k in args.scaling_n0snr2:
                snr = math.sqrt(k / n0)
                for j in range(args.scaling_seeds):
                    W, info = cnn_pretrain(a, snr, n0, args.seed + j, controls=False)["simclr"]
                    cs += [dict(d=d, snr=snr, n=args.scaling_n, set=j, n0=n0, n0_snr2=k, init=init, method=method,
                                **info) for init, method in [(W, "simclr"), (None, "supervised")]]
        cells += cnn_cells(a, cs, args.scaling_seeds)
        print(f"d={d}: {time.time() - t0:.0f}s")
    capped = capped_cells(args, cells)
    cells = [dict(c, err_sup=s["err"]) for c, s in zip(cells[::2], cells[1::2])]  # each with its supervised twin
    print(f"\nPre-training stopped by the loss (log n0 - {args.pre_drop}), mean over {args.scaling_seeds} seeds: "
          f"|cos(w, mu)| at the stop, and test error at n={args.scaling_n} supervised -> fine-tuned; columns n0 SNR^2")
    print_table(["d", "n0", "d/n0"] + [f"{k:g}" for k in args.scaling_n0snr2],
                [[d, n0, f"{d / n0:.3g}"] + [
                    "%.2f: %.2f -> %.2f" % tuple(np.mean([[c["cos"], c["err_sup"], c["err"]]
                                                           for c in select(cells, d=d, n0=n0, n0_snr2=float(k))], 0))
                    for k in args.scaling_n0snr2] for d in args.scaling_ds for n0 in args.n0s])
    # what decides the outcome: the filters' response to the signal against their response to the noise
    bins = [0, 0.5, 1, 2, 4, 8, math.inf]  # octaves
    rows = []
    for lo, hi in zip(bins, bins[1:]):
        c = [c for c in cells if lo <= c["response"] < hi]
        if c:
            rows.append([f"[{lo:g}, {hi:g})", len(c), "%.3f" % np.mean([x["err_sup"] for x in c]),
                         "%.3f" % np.mean([x["err"] for x in c]), "%.2f" % np.mean([x["cos"] for x in c])])
    print("\nevery cell above, grouped by the filter response |<w, mu>| / (sigma_p ||P w||) at the stop (median "
          "over filters)")
    print_table(["response", "cells", "supervised error", "fine-tuned error", "|cos(w, mu)|"], rows)
    summary = dict(config=vars(args), cells=[{k: v for k, v in c.items() if k != "curve"} for c in cells],
                   by_response=rows, capped=capped)
    return summary, lambda plt: plot_cnn_scaling(plt, args, cells)


def plot_cnn_main(plt, args, sup, ft):
    fig, ax = plt.subplots(1, 4, figsize=(18, 4.8))
    curve = lambda cells, **kv: np.array([mean_std([c["err"] for c in select(cells, n=n, **kv)]) for n in args.ns]).T
    for i, snr in enumerate(args.snrs):
        for a, x in [(ax[0], np.array(args.ns)), (ax[1], np.array(args.ns) * snr ** args.q)]:
            a.errorbar(x, *curve(sup, snr=snr), fmt="o-", color=f"C{i}", capsize=2, ms=4, label=f"SNR {snr}")
    ax[0].set(xscale="log", xlabel="labelled n", ylabel="test error", title="supervised, from a random init")
    ax[1].axhline(args.level, color="gray", ls=":")
    ax[1].set(xscale="log", xlabel=f"n SNR^{args.q}", title=f"the same against n SNR^{args.q}")
    for a in ax[2:]:
        a.errorbar(args.ns, *curve(sup, snr=args.ft_snr), fmt="o--", color="gray", capsize=2, ms=4, label="supervised")
    for i, k in enumerate(args.n0_snr2s):
        ax[2].errorbar(args.ns, *curve(ft, n0_snr2=k, method="simclr"), fmt="s-", color=f"C{i + 3}", capsize=2, ms=4,
                       label=f"n0 SNR² = {k:g}")
        for method, style in [("simclr", "s-"), ("share-nothing", "x--"), ("pca", "^:")]:
            ax[3].plot(args.ns, curve(ft, n0_snr2=k, method=method)[0], style, color=f"C{i + 3}", ms=5,
                       label=f"{METHODS[method]}, n0 SNR² = {k:g}")
    ax[2].set(xscale="log", xlabel="labelled n", title=f"SimCLR + fine-tune, SNR {args.ft_snr}")
    ax[3].set(xscale="log", xlabel="labelled n", title=f"SimCLR against its controls (means), SNR {args.ft_snr}")
    for a in ax:
        a.set_ylim(-0.02, 0.6)
        a.legend(fontsize=6) if a is not ax[3] else a.legend(fontsize=6, ncol=2, loc="upper center",
                                                            bbox_to_anchor=(0.5, -0.16))
    fig.suptitle(f"d = {args.d}, {args.seeds} labelled sets per point (mean ± std)", fontsize=9)
    return fig


def plot_cnn_scaling(plt, args, cells):
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.8))
    for j, d in enumerate(args.scaling_ds):
        for i, n0 in enumerate(args.n0s):
            c = select(cells, d=d, n0=n0)
            k = np.array(args.scaling_n0snr2)
            cos = [np.mean([x["cos"] for x in select(c, n0_snr2=float(v))]) for v in k]
            ax[1].plot(k / (1 + 2 * math.sqrt(n0 / d)), cos, "os"[j % 2] + "-", color=f"C{i}", ms=4,
                       label=f"d={d}, n0={n0}")
            if j == 0:  # the power iteration, first seed, at the middle n0 SNR^2
                mid = select(c, n0_snr2=float(k[len(k) // 2]), set=0)[0]
                ax[0].plot(mid["curve"], color=f"C{i}", label=f"n0={n0}")
    ax[0].set(xlabel="pre-training step", ylabel="mean |cos(w_r, mu)|",
              title=f"power iteration until the stop, d={args.scaling_ds[0]}, n0 SNR²="
                    f"{args.scaling_n0snr2[len(args.scaling_n0snr2) // 2]:g}")
    ax[0].legend(fontsize=7)
    ax[1].set(xscale="log", xlabel="n0 SNR² / (1 + 2 sqrt(n0/d))", ylabel="|cos(w, mu)| at the stop",
              ylim=(0, 1.02), title="alignment against the power iteration's signal/noise")
    ax[1].legend(fontsize=6, ncol=2)
    resp = np.array([x["response"] for x in cells])
    ax[2].scatter(resp, [x["err_sup"] for x in cells], s=10, marker="o", color="gray", alpha=0.6, label="supervised")
    ax[2].scatter(resp, [x["err"] for x in cells], s=10, marker="s", color="C3", alpha=0.6, label="SimCLR + fine-tune")
    ax[2].set(xscale="log", xlabel="filter response |<w, mu>| / (sigma_p ||P w||) at the stop",
              ylabel=f"test error, n={args.scaling_n}", title="what decides the fine-tuning outcome")
    ax[2].legend(fontsize=7)
    return fig


# =====================================================================================================
# 2. clusters -- trivial minimisers; clusters appear in training, then fade (Calder & Lee 2025, arXiv:2503.10812)
# =====================================================================================================
# Data, after an exploratory script by one of the authors: 4 clusters uniform in disks of radius 0.8 centred at
# (+-1, +-1); augmentation adds ONE N(0,1) scalar s to both coordinates, x -> x + s (1, 1). It leaves
# u(x) = (x_1 - x_2)/sqrt(2) unchanged, and u is the same for the clusters at (1, 1) and (-1, -1): what survives
# augmentation tells apart 3 *groups* (u ~ -sqrt2, 0, +sqrt2), not 4 clusters, so the measures use the groups.
#
# (a) The loss alone does not pick a clustered minimiser. Two losses, one argument; an exact identity (the loss
# is a symmetric function of the latents), so part (a) illustrates Calder & Lee's first claim, it is no evidence.
# Gaussian-kernel InfoNCE on a 1-D latent (the exploratory script's loss: SimCLR's with similarity -|z - z'|^2):
#     L = 1/N sum_i [ |z_i - z'_i|^2 / tau + log sum_j exp(-|z_i - z'_j|^2 / tau) ]         (z = f(x), z' = f(x'))
# Any embedding z = g(u) has zero alignment term, and L = 1/N sum_i log sum_j exp(-|z_i - z_j|^2/tau) depends
# only on the *multiset* {z_i}. Every term is >= log 1 (the j = i term), so L >= 0, and an injective g scaled by
# c -> infinity drives L -> 0: every injective invariant embedding is a minimising sequence. Take
#     g_1(x) = c * rank(u(x))            (monotone in u: keeps the cluster order, "cluster-respecting")
#     g_k(x) = c * (k * rank(u(x)) mod N)   (k coprime to N: a permutation of the same ranks, so the same multiset)
# g_1 and g_k give the SAME loss at every scale c, exactly, yet g_k spreads every cluster over the whole range:
# its latent distribution given the cluster is ~uniform, i.e. it carries no cluster information.
# Collapsing each group to a point is strictly worse: L >= mean log(group size) > 0 for every c.
# NT-Xent on latents normalised onto the unit circle (the paper's setting; its Fig. 1 plots NT-Xent against the
# latent distribution): the same argument with angles 2 pi g_k(x) / N. Equally spaced angles are the N-point
# version of the uniform distribution on the circle, which minimises the population loss (perfect alignment and
# uniformity: Wang & Isola 2020, arXiv:2005.10242), the trivial minimiser of Calder & Lee.
#
# (b) Training dynamics (the paper's second claim): a one-hidden-layer net Linear(2, 100) -> LeakyReLU(0.2) ->
# Linear(100, 2), its output normalised onto the circle, trained on NT-Xent by full-batch SGD with fresh views each
# step, logged at log-spaced steps. Calder & Lee: clustering appears early and persists for a long time, though
# training converges to a trivial minimiser. The clustering measure is the Fisher ratio of the latents' angle along
# the circle, cut at the widest empty arc: an affine map of u onto an arc of any length keeps u's own ratio, so a
# net that only copies u scores u's level, and a higher score means the groups sit tighter than u has them.
# Two references: that level, and a no-cluster control -- the same points with u redrawn uniform, the same net,
# views and group sizes -- which shows what training does to the measure when the input holds no clusters.
# Wang & Isola's uniformity log E exp(-2 |z - z'|^2) tracks the approach to the trivial minimiser (the uniform
# circle's: log(e^-4 I_0(4)) = -1.574).


def clusters(per_cluster, radius, g):
    """4 clusters uniform in disks centred at (+-1, +-1). Returns X (N, 2) float64 and labels (N,)."""
    centres = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0], [1.0, -1.0]])
    lab = torch.arange(4).repeat_interleave(per_cluster)
    r = radius * torch.sqrt(torch.rand(len(lab), generator=g))  # sqrt: uniform in the disk, not in the radius
    th = 2 * math.pi * torch.rand(len(lab), generator=g)
    X = centres[lab] + torch.stack([r * torch.cos(th), r * torch.sin(th)], 1)  # (N, 2)
    return X.double(), lab  # float64: the views' u must agree to ~1e-16 for the exact identity of part (a)


def invariant_groups(lab):
    """Cluster label -> group of u = (x_1 - x_2)/sqrt(2): 0 for (-1, 1), 1 for (1, 1) and (-1, -1), 2 for (1, -1)."""
    return torch.tensor([1, 0, 1, 2])[lab]


def augment_diag(X, g):
    """x -> x + s (1, 1), s ~ N(0, 1): one scalar added to every coordinate."""
    return X + torch.randn(len(X), 1, generator=g, dtype=X.dtype)


def gaussian_nce(z1, z2, tau):
    """The loss above. z1, z2: (N, k) embeddings of the two views, row i of each from the same x."""
    logits = -torch.cdist(z1, z2) ** 2 / tau  # (N, N)
    return F.cross_entropy(logits, torch.arange(len(z1)))


def fisher_ratio(z, lab):
    """Between-group / within-group sum of squares of the embedding (scale-free)."""
    z = z.reshape(len(z), -1).double()  # (N, k)
    mean, between, within = z.mean(0), 0.0, 0.0
    for c in lab.unique():
        zc = z[lab == c]
        between += len(zc) * ((zc.mean(0) - mean) ** 2).sum().item()
        within += ((zc - zc.mean(0)) ** 2).sum().item()
    return between / within if within > 1e-12 * between else float("inf")  # inf: clusters collapsed to points


def knn_accuracy(z, lab, k=10):
    """Leave-one-out k-NN accuracy of the label from the embedding."""
    z = z.reshape(len(z), -1).double()
    D = torch.cdist(z, z)
    D.fill_diagonal_(float("inf"))
    nn_lab = lab[D.topk(k, largest=False).indices]  # (N, k)
    pred = torch.mode(nn_lab, dim=1).values
    return (pred == lab).double().mean().item()


def unwrapped_angle(z):
    """The angles (N,) of latents z (N, 2) on the circle, measured from the far side of the widest empty arc, so they
    run over one interval shorter than 2 pi. With no widest arc (equally spaced latents) the cut falls on a tie."""
    a = torch.atan2(z[:, 1], z[:, 0]).double()
    srt = torch.sort(a).values
    gaps = torch.cat([srt[1:] - srt[:-1], srt[:1] + 2 * math.pi - srt[-1:]])  # gap i runs from srt[i] onwards
    start = srt[(gaps.argmax() + 1) % len(srt)]
    return (a - start) % (2 * math.pi)


def angle_fisher(z, groups):
    """The clustering measure of part (b): the Fisher ratio of the unwrapped angle over the groups. An affine image
    of u on any arc scores exactly u's own ratio; a short arc alone does not raise it."""
    return fisher_ratio(unwrapped_angle(z), groups)


def uniformity(z, t=2.0):
    """Wang & Isola's uniformity log E_{i != j} exp(-t |z_i - z_j|^2) (arXiv:2005.10242, Eq. 5 on samples)."""
    d2 = torch.cdist(z, z)[~torch.eye(len(z), dtype=torch.bool)] ** 2  # (N (N - 1),)
    return torch.log(torch.exp(-t * d2).mean()).item()


def u_coord(X):
    """The augmentation-invariant coordinate u = (x_1 - x_2)/sqrt(2), in float64."""
    X = X.double()
    return (X[:, 0] - X[:, 1]) / math.sqrt(2)


def rank_embedding(X, u_ref, c, k=1):
    """g_k(x) = c * (k * rank(u(x)) mod N), rank among the reference points; a function of x alone (see above)."""
    # the 1e-9 absorbs the float round-off of (x_1 + s) - (x_2 + s), so both views get the same rank
    rank = torch.searchsorted(torch.sort(u_ref).values, u_coord(X) + 1e-9) - 1  # in 0..N-1
    return (c * ((k * rank) % len(u_ref))).double()[:, None]  # (N, 1)


def circle_embedding(X, u_ref, k=1):
    """The angle 2 pi g_k(x) / N as a point on the unit circle: equally spaced latents, ordered by u if k = 1. (N, 2)"""
    theta = rank_embedding(X, u_ref, 2 * math.pi / len(u_ref), k)  # (N, 1)
    return torch.cat([theta.cos(), theta.sin()], 1)


def no_cluster_control(X, groups, g):
    """Part (b)'s control: the same points with u redrawn uniform on u's range and v = (x_1 + x_2)/sqrt(2), the
    coordinate the augmentation moves, kept; grouped into bins contiguous in u with the groups' sizes. (X, bins)"""
    u, v = u_coord(X), (X[:, 0] + X[:, 1]) / math.sqrt(2)
    u = u.min() + (u.max() - u.min()) * torch.rand(len(X), generator=g, dtype=torch.float64)
    rank, sizes = torch.argsort(torch.argsort(u)), torch.bincount(groups).cumsum(0)
    bins = (rank[:, None] >= sizes[None, :-1]).sum(1)  # (N,): 0 for the lowest sizes[0] values of u, ...
    return torch.stack([(v + u) / math.sqrt(2), (v - u) / math.sqrt(2)], 1), bins


def circle_measures(z, groups):
    return dict(fisher=angle_fisher(z, groups), uniformity=uniformity(z.double()), knn=knn_accuracy(z, groups))


def circle_net(params, X):
    """Linear(2, hidden) -> LeakyReLU(0.2) -> Linear(hidden, 2), one net per leading index: X (S, B, 2) -> (S, B, 2)."""
    W1, b1, W2, b2 = params
    return F.leaky_relu(X @ W1.mT + b1[:, None], 0.2) @ W2.mT + b2[:, None]


def train_on_circle(X, groups, args, seeds, log_at):
    """Part (b): the nets of the rows of X (S, N, 2), trained as one batch in float32 (part (a)'s exact identities
    need float64, training does not): NT-Xent on the outputs normalised onto the circle, full-batch SGD, fresh views
    each step. Row i's net starts from seeds[i]'s init, nn.Linear's uniform +-1/sqrt(fan in), and sees that seed's
    stream of views: rows of one seed share both. Returns each row's measures over its groups (S, N) at every step in
    log_at, with the latents' angles (for the figure)."""
    S, N, _ = X.shape
    gens = {s: generator(s) for s in dict.fromkeys(seeds)}
    unif = lambda g, fan_in, *shape: (2 * torch.rand(*shape, generator=g) - 1) / math.sqrt(fan_in)
    init = {s: [unif(g, 2, args.hidden, 2), unif(g, 2, args.hidden), unif(g, args.hidden, 2, args.hidden),
                unif(g, args.hidden, 2)] for s, g in gens.items()}
    params = [torch.stack(p).requires_grad_() for p in zip(*(init[s] for s in seeds))]  # W1, b1, W2, b2: (S, ...)
    hist, X, loss = [[] for _ in range(S)], X.float(), None
    for step in range(args.steps + 1):
        if step in log_at:
            with torch.no_grad():
                z = F.normalize(circle_net(params, X), dim=-1)  # (S, N, 2): the latents on the circle
            for i in range(S):
                hist[i].append(dict(step=step, loss=None if loss is None else loss[i].item(), **circle_measures(
                    z[i], groups[i]), angle=torch.atan2(z[i, :, 1], z[i, :, 0]).tolist()))
        if step == args.steps:
            break
        noise = {s: torch.randn(2 * N, 1, generator=g) for s, g in gens.items()}  # x -> x + s (1, 1), both views
        z = circle_net(params, X.repeat(1, 2, 1) + torch.stack([noise[s] for s in seeds]))  # (S, 2N, 2)
        loss = nt_xent(z[:, :N], z[:, N:], args.tau)  # (S,)
        finite(loss, step, "--lr")
        grads = torch.autograd.grad(loss.sum(), params)  # each net's own gradient: the losses share no weight
        with torch.no_grad():
            for p, grad in zip(params, grads):
                p -= args.lr * grad
    return hist, params


def run_clusters(args):
    g = generator(args.seed)
    X, lab = clusters(args.per_cluster, args.radius, g)
    groups = invariant_groups(lab)
    X1, X2 = augment_diag(X, g), augment_diag(X, g)  # one fixed pair of views: the losses of (a) are exact on it
    part_a = clusters_part_a(args, X, X1, X2, groups)
    summary, draw = clusters_part_b(args, X, X1, X2, groups, g)
    return dict(config=vars(args), part_a=part_a, **summary), draw


def clusters_part_a(args, X, X1, X2, groups):
    """(a) the same loss, with and without clusters: an exact identity, an illustration."""
    N, u, rows, part_a = len(X), u_coord(X), [], []
    centre_u = (groups - 1).double()  # u of each group's centre / sqrt 2
    embeddings = [("groups -> 3 points", None), ("g_1 monotone rank", 1),
                  (f"g_{args.k_scramble} scrambled rank", args.k_scramble)]

    def add_row(loss_name, name, spacing, z1, z2, latent, loss):  # latent (N,): the 1-D latent, or the angle
        align = ((z1 - z2) ** 2).sum(1).mean().item()
        part_a.append(dict(loss_fn=loss_name, embedding=name, spacing=spacing, loss=loss, align=align,
                           fisher=fisher_ratio(latent, groups), knn=knn_accuracy(latent, groups)))
        rows.append([loss_name, name, spacing, f"{loss:.6f}", f"{align:.1e}", f"{part_a[-1]['fisher']:.2f}",
                     f"{part_a[-1]['knn']:.3f}"])

    for spacing in [0.25, 1.0, 2.0]:  # distance between neighbouring ranks, in units of sqrt(kernel tau)
        c = spacing * math.sqrt(args.kernel_tau)
        for name, k in embeddings:
            if k is None:
                z1 = z2 = z = c * N / 2 * (centre_u + 1)[:, None]  # each group at one point, the same for both views
            else:
                z1, z2, z = (rank_embedding(V, u, c, k) for V in (X1, X2, X))
            add_row("Gaussian kernel", name, spacing, z1, z2, z, gaussian_nce(z1, z2, args.kernel_tau).item())
    for name, k in embeddings:
        if k is None:
            angle = 2 * math.pi / 3 * centre_u[:, None]  # the 3 groups at 3 equally spaced points
            z1 = z2 = torch.cat([angle.cos(), angle.sin()], 1)
        else:
            z1, z2 = (circle_embedding(V, u, k) for V in (X1, X2))
            angle = rank_embedding(X, u, 2 * math.pi / N, k)
        add_row("NT-Xent, circle", name, "-", z1, z2, angle, nt_xent(z1, z2, args.tau).item())
    print(f"\n(a) hand-built augmentation-invariant embeddings, N={N}: Gaussian-kernel InfoNCE (tau={args.kernel_tau}) "
          f"on a line, NT-Xent (tau={args.tau}) on the unit circle; Fisher ratio of the latent (or its angle) and "
          f"10-NN over the 3 groups. The losses agree because they depend on the latents' multiset only")
    print_table(["loss", "embedding", "spacing/sqrt(tau)", "loss value", "align", "Fisher ratio", "10-NN acc"], rows)
    return part_a


def clusters_part_b(args, X, X1, X2, groups, g):
    """(b) training dynamics of a one-hidden-layer net on the circle, and its no-cluster control."""
    u, S, t0 = u_coord(X), args.seeds, time.time()
    log_at = sorted({0, args.steps} | {round(10 ** (e / 8)) for e in range(8 * math.ceil(math.log10(args.steps + 1)) + 1)
                                       if 10 ** (e / 8) <= args.steps})  # 8 per decade
    Xc, bins = no_cluster_control(X, groups, g)
    ref = dict(input_u=fisher_ratio(u, groups), control_input_u=fisher_ratio(u_coord(Xc), bins),
               uniform=dict(circle_measures(circle_embedding(X, u), groups),
                            fisher=fisher_ratio(rank_embedding(X, u, 1.0), groups)))  # cut at the rank's ends
    print(f"\n(b) Linear(2,{args.hidden}) -> LeakyReLU(0.2) -> Linear({args.hidden},2) -> unit circle, NT-Xent "
          f"tau {args.tau}, SGD lr {args.lr}, full batch, fresh views each step, {S} seeds; the control: "
          f"u redrawn uniform, the same nets and views, bins of u of the groups' sizes")
    seeds = [args.seed + s for s in range(S)]
    hist, params = train_on_circle(torch.stack([X] * S + [Xc] * S), [groups] * S + [bins] * S, args, seeds * 2, log_at)
    runs, controls = hist[:S], hist[S:]
    print(f"{2 * S} nets, {time.time() - t0:.1f}s")
    fisher = np.array([[h["fisher"] for h in r] for r in runs])  # (seeds, steps)
    fisher_c = np.array([[h["fisher"] for h in r] for r in controls])
    top = int(fisher.mean(0).argmax())  # the one step where the mean over seeds peaks, the same step for every seed
    shown = sorted({log_at[top]} | {t for t in log_at if t in {0, args.steps} or any(t == round(10 ** (e / 2))
                                                                                     for e in range(12))})
    table = [[t] + [pm(v, "%.2f") for v in (fisher[:, log_at.index(t)], fisher_c[:, log_at.index(t)])]
             + [pm([r[log_at.index(t)][key] for r in runs]) for key in ("uniformity", "knn")] for t in shown]
    table += [["input u, no net", f"{ref['input_u']:.2f}", f"{ref['control_input_u']:.2f}", "-", "-"],
              ["equally spaced, by rank(u)", f"{ref['uniform']['fisher']:.2f}", "-",
               f"{ref['uniform']['uniformity']:.3f}", f"{ref['uniform']['knn']:.3f}"]]
    print(f"\nmean ± std over {S} seeds; the last rows: u itself, and the trivial minimiser of (a)")
    print_table(["step", "angle Fisher ratio", "control: no clusters", "uniformity", "10-NN acc (groups)"], table)
    peak = dict(step=log_at[top], fisher=mean_std(fisher[:, top]), control=mean_std(fisher_c[:, top]),
                control_peak=mean_std(fisher_c[:, int(fisher_c.mean(0).argmax())]),
                end=mean_std(fisher[:, -1]), control_end=mean_std(fisher_c[:, -1]))
    print(f"at step {peak['step']}, where the mean peaks: {pm(fisher[:, top], '%.2f')} against u's own "
          f"{ref['input_u']:.2f}; the control {pm(fisher_c[:, top], '%.2f')} against its u's "
          f"{ref['control_input_u']:.2f}")

    # the last seed's net on its own pairs, re-assigned to the data points by a permutation that mixes groups: the
    # loss is a symmetric function of the pairs (z_i, z'_i), so it cannot change, while the groups disappear
    with torch.no_grad():
        last = [p[S - 1:S] for p in params]
        z1, z2 = (F.normalize(circle_net(last, V[None].float())[0], dim=1).double() for V in (X1, X2))
    perm = torch.randperm(len(X), generator=g)
    trained, permuted = (dict(loss=nt_xent(z1[i], z2[i], args.tau).item(), fisher=angle_fisher(z1[i], groups),
                              knn=knn_accuracy(z1[i], groups)) for i in (slice(None), perm))
    print("\nlast net vs the same pairs permuted across groups (one fixed pair of views): (a)'s identity again")
    print_table(["embedding", "loss", "angle Fisher ratio", "10-NN acc"],
                [[name, f"{m['loss']:.6f}", f"{m['fisher']:.2f}", f"{m['knn']:.3f}"]
                 for name, m in [("trained net", trained), ("pairs permuted", permuted)]])
    strip = lambda h: {k: v for k, v in h.items() if k != "angle"}
    summary = dict(reference=ref, peak=peak, runs=[[strip(h) for h in r] for r in runs],
                   controls=[[strip(h) for h in r] for r in controls], trained=trained, permuted=permuted)
    return summary, lambda plt: plot_clusters(plt, args, X, u, groups, runs, controls, ref, top)


def plot_clusters(plt, args, X, u, groups, runs, controls, ref, top):
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.8), gridspec_kw=dict(width_ratios=[1, 1.2, 1.5]))
    for name, k in [("monotone g_1", 1), (f"scrambled g_{args.k_scramble}", args.k_scramble)]:
        z = rank_embedding(X, u, 1.0, k)[:, 0]
        ax[0].scatter(z, groups + (0.15 if k > 1 else -0.15), s=4, label=name)
    ax[0].set(xlabel="latent (rank)", ylabel="group", yticks=[0, 1, 2], title="(a) the same loss, exactly")
    ax[0].legend(fontsize=7)
    steps = [h["step"] for h in runs[0]]
    for rs, colour, name in [(runs, "C0", "4 clusters"), (controls, "C1", "control: u uniform")]:
        f = np.array([[h["fisher"] for h in r] for r in rs])
        ax[1].plot(steps, f.T, "-", color=colour, lw=0.5, alpha=0.4)
        ax[1].plot(steps, f.mean(0), "-", color=colour, lw=2, label=f"{name}, mean of {len(rs)}")
    ax[1].axhline(ref["input_u"], color="C0", ls="--", lw=1, label="u of the 4 clusters itself")
    ax[1].axhline(ref["control_input_u"], color="C1", ls="--", lw=1, label="u of the control itself")
    ax[1].axhline(ref["uniform"]["fisher"], color="gray", ls=":", label="equally spaced by rank(u)")
    ax[1].axvline(steps[top], color="gray", lw=0.5)
    ax[1].set(xscale="symlog", xlim=(0, args.steps), xlabel="SGD step", ylabel="Fisher ratio of the angle",
              title="(b) clustering of the latents over training")
    ax[1].legend(fontsize=6)
    # the latents on the circle at init, at the step where the mean peaks and at the end, first seed; each group
    # drawn on its own radius (0.8, 1, 1.2) so that groups sharing an arc stay visible
    for j, h in enumerate([runs[0][0], runs[0][top], runs[0][-1]]):
        angle = torch.tensor(h["angle"])
        for c in range(3):
            r = 0.8 + 0.2 * c
            ax[2].scatter(3 * j + r * angle[groups == c].cos(), r * angle[groups == c].sin(), s=2, color=f"C{c}",
                          label=f"group {c}" if j == 0 else None)
        ax[2].text(3 * j, -1.55, f"step {h['step']}", ha="center", fontsize=8)
    ax[2].set(aspect="equal", xticks=[], yticks=[], ylim=(-1.75, 1.9),
              title=f"(b) latents at init, the peak step, the end (seed {args.seed})")
    ax[2].legend(fontsize=7, ncol=3, loc="upper center", markerscale=3)
    return fig


# =====================================================================================================
# 3. covariance -- the covariance operator (Tian, Yu, Chen & Ganguli 2020, arXiv:2010.00578)
# =====================================================================================================
# L_simp (their Sec. 3, for one positive x+ and one negative x-):  L_simp = ||f(x1) - f(x+)||^2 - ||f(x1) - f(x-)||^2,
# x1, x+ two augmentations of the same latent z0, x- an augmentation of an independent z0'.
# Theorem 3 for a bias-free ReLU net f(x) = W_L relu(... relu(W_1 x)). Write f = K_l(x)^T vec(W_l), where the
# connection K_l(x) (their Definition 1) is, per output o, J_l(x)[o, i] a_{l-1}(x)[j]: a_{l-1} the input of layer l,
# J_l = df / d(pre-activation of layer l). Both are constant in W_l almost everywhere (ReLU gates), so
#   grad_{W_l} ||f(x) - f(x')||^2 = 2 (K_l(x) - K_l(x')) (K_l(x) - K_l(x'))^T vec(W_l),
# and with Kbar_l(z0) = E_aug[K_l | z0] (two augmentations independent given z0)
#   E[(K1 - K+)(K1 - K+)^T] - E[(K1 - K-)(K1 - K-)^T] = -2 E_z0[Kbar Kbar^T] + 2 E[Kbar] E[Kbar]^T = -2 V_z0[Kbar_l],
# so  -grad_{W_l} E[L_simp] = 4 V_z0[ Kbar_l(z0) ] vec(W_l),  layer by layer (Theorem 3, the constant for this L_simp).
# For one linear layer f(x) = W x, K = I (x) x and this is 4 W Cov_z0[ E_aug x | z0 ]. Exact finite-sample version:
# take the expectation under the *empirical* distribution -- z0 uniform over N latents, aug uniform over K stored
# augmentations, drawn independently (so k = k' and z0' = z0 are included). Then the identity holds with the
# empirical conditional means and the biased (1/N) covariance, up to float round-off.


def relu_mlp(Ws, X):
    """Bias-free ReLU net f(x) = W_L relu(... relu(W_1 x)); a single layer is the linear f(x) = W x. X (..., D)."""
    h = X
    for l, W in enumerate(Ws):
        h = (torch.relu(h) if l > 0 else h) @ W.T
    return h


def l_simp_of_outputs(f):
    """E_emp[L_simp] from the outputs f (N, K, out) of every stored augmentation of every latent."""
    N, K, _ = f.shape
    pos = ((f[:, :, None] - f[:, None, :]) ** 2).sum(-1).mean()  # over i and all (k, k'): (N, K, K)
    flat = f.reshape(N * K, -1)  # (N*K, out): negatives are any (z0', aug') pair, z0' = z0 included
    neg = (torch.cdist(flat, flat) ** 2).mean()
    return pos - neg


def connection(Ws, X, l):
    """K_l(x) of the bias-free ReLU net for each row of X (B, D): (B, out, n_l, n_{l-1}), f = sum_ij K[:, i, j] W_l[i, j]."""
    a, pre = [X], []  # a[k]: the input of layer k; pre[k]: its pre-activation
    for W in Ws:
        pre.append(a[-1] @ W.T)
        a.append(torch.relu(pre[-1]))
    J = torch.eye(Ws[-1].shape[0], dtype=X.dtype).expand(len(X), -1, -1)  # (B, out, out): df / df
    for k in range(len(Ws) - 1, l, -1):  # back to layer l through each W_k and the ReLU gate in front of it
        J = (J @ Ws[k]) * (pre[k - 1] > 0)[:, None, :]  # (B, out, n_{k-1})
    return J[:, :, :, None] * a[l][:, None, None, :]  # (B, out, n_l, n_{l-1})


def covariance_operator(Ws, Xa, l):
    """4 V_z0[Kbar_l(z0)] vec(W_l), shaped like W_l, for the empirical distribution of Xa (N, K, D)."""
    N, K, D = Xa.shape
    Kc = connection(Ws, Xa.reshape(N * K, D), l)  # (N*K, out, n_l, n_{l-1})
    Kc = Kc.reshape(N, K, *Kc.shape[1:]).mean(1)  # (N, out, n_l, n_{l-1}): Kbar_l(z0) = E_aug[K_l | z0]
    Kc = Kc - Kc.mean(0)
    proj = torch.einsum("noij,ij->no", Kc, Ws[l])  # (N, out): (Kbar - E Kbar)^T vec(W_l)
    return 4 * torch.einsum("noij,no->ij", Kc, proj) / N


# Fig. 3 of the paper: a 1-layer conv net on 1-D signals holding the object "11" or "101" at a random position;
# augmentation = a new position (plus pixel noise). The pooled code is h_c(x) = sum_p relu(<w_c, x_p>) over the
# windows x_p, so h_c = <K_c(x), w_c> with the connection K_c(x) = sum_p 1[<w_c, x_p> > 0] x_p: a bias-free ReLU net,
# one block per filter, and Theorem 3 holds for it with z0 = the object: -grad_{w_c} E[L_simp] = 4 V_z0[Kbar_c] w_c.
# With two objects V_z0 is rank one, (Kbar_c("11") - Kbar_c("101")) (...)^T / 4, so each filter grows at the rate
# (r_c("11") - r_c("101"))^2 / ||w_c||^2 of its pooled responses r_c: the operator amplifies what tells the objects
# apart. The control keeps net, init and views but puts an independent object in the positive view: nothing is
# shared, V_z0 is over a constant, and the operator is 0.


def translated_objects(objects, L, noise, g):
    """Tian et al. Fig. 3: a 1-D signal of length L holding object "11" or "101" at a random position.
    objects: (B,) in {0, 1}. Returns (B, 1, L)."""
    span = 1 + objects  # from the first 1 to the second: "11" -> 1, "101" -> 2
    X = noise * torch.randn(len(objects), 1, L, generator=g)
    z = (torch.rand(len(objects), generator=g) * (L - span)).long()  # z': the position, changed by augmentation
    rows = torch.arange(len(objects))
    X[rows, 0, z] += 1
    X[rows, 0, z + span] += 1
    return X


def conv_h(conv, X):
    """1-layer conv net: h = sum over positions of relu(conv(x)), a translation-invariant pooled code. (B, C)"""
    return torch.relu(conv(X)).sum(-1)


def conv_connection(W, X):
    """K_c(x) = sum_p 1[<w_c, x_p> > 0] x_p for every filter c of W (C, width) and signal of X (B, 1, L), so that
    h_c(x) = <K_c(x), w_c>. (B, C, width)"""
    win = X[:, 0].unfold(1, W.shape[1], 1)  # (B, P, width): every window of the signal
    gate = (win @ W.T > 0).to(X.dtype)  # (B, P, C): the ReLU gates
    return torch.einsum("bpc,bpk->bck", gate, win)


def conv_covariance_operator(W, Xa):
    """4 V_z0[Kbar_c(z0)] w_c for every filter, shaped like W (C, width), under the empirical distribution of
    Xa (N, K, 1, L): N latents z0, K stored augmentations of each (Theorem 3 for the conv net)."""
    N, K = Xa.shape[:2]
    Kbar = conv_connection(W, Xa.flatten(0, 1)).unflatten(0, (N, K)).mean(1)  # (N, C, width): E_aug[K_c | z0]
    Kbar = Kbar - Kbar.mean(0)
    proj = torch.einsum("ncw,cw->nc", Kbar, W)  # (N, C): (Kbar_c - E Kbar_c)^T w_c
    return 4 * torch.einsum("ncw,nc->cw", Kbar, proj) / N


def object_augmentations(L, K, noise, g):
    """The empirical distribution of the conv check: z0 = the object, K augmentations (position and noise) of
    each. (2, K, 1, L), float64."""
    return torch.stack([translated_objects(torch.full((K,), o), L, noise, g) for o in (0, 1)]).double()


def operator_rate(W, Xa):
    """Per filter, <w_c, 4 V[Kbar_c] w_c> / ||w_c||^2: the rate at which gradient flow on E[L_simp] grows ||w_c||^2 / 2."""
    return ((conv_covariance_operator(W, Xa) * W).sum(1) / (W * W).sum(1)).numpy()


def nt_xent_direction(conv, args, shared, g, batches=16):
    """-grad of NT-Xent at the conv's weights, averaged over `batches` training batches: the expected SGD step. (C, width)"""
    total = 0
    for _ in range(batches):
        obj = torch.randint(0, 2, (args.batch,), generator=g)
        obj2 = obj if shared else torch.randint(0, 2, (args.batch,), generator=g)
        x1, x2 = translated_objects(obj, args.L, args.noise, g), translated_objects(obj2, args.L, args.noise, g)
        (grad,) = torch.autograd.grad(nt_xent(conv_h(conv, x1), conv_h(conv, x2), args.tau), conv.weight)
        total = total - grad[:, 0] / batches
    return total.double()


def cosine(a, b):
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def object_responses(conv, L):
    """Per filter, the pooled response to "11" and "101" averaged over all their clean positions. (2, C)"""
    resp = []
    for pat in ([1.0, 1.0], [1.0, 0.0, 1.0]):
        X = torch.zeros(L - len(pat) + 1, 1, L)
        for z in range(len(X)):
            X[z, 0, z:z + len(pat)] = torch.tensor(pat)
        with torch.no_grad():
            resp.append(conv_h(conv, X).mean(0))  # (C,)
    return torch.stack(resp)


def selectivity(conv, L):
    """Per filter |r(11) - r(101)| / (r(11) + r(101)); 0 for a filter that responds to neither (a dead one)."""
    r = object_responses(conv, L)
    return ((r[0] - r[1]).abs() / (r[0] + r[1] + 1e-8)).numpy()


def object_only_nt_xent(N, tau, cos):
    """The NT-Xent of an encoder whose code depends on the object alone (the two codes at cosine `cos`), averaged
    over the batch's composition, k ~ Binomial(N, 1/2) pairs holding "11". An anchor among the 2k views of its
    object has the positive and 2k - 2 more views at logit 1/tau, and 2(N - k) at cos/tau."""
    loss = 0.0
    for k in range(N + 1):
        for same in (2 * k, 2 * (N - k)):  # the views of the anchor's object; no anchor if 0
            if same:
                loss += math.comb(N, k) / 2 ** N * same / (2 * N) * math.log(
                    same - 1 + (2 * N - same) * math.exp((cos - 1) / tau))
    return loss


def train_conv(args, seed, shared=True):
    """Fig. 3's net trained with NT-Xent from the seed's init, on the seed's stream of views; shared=False is the
    control, whose positive view holds an independent object. Returns the net and the mean selectivity and mean
    loss (over the steps since the previous entry) every --log-every steps."""
    torch.manual_seed(seed)  # the init: the same for the run and its control
    conv = torch.nn.Conv1d(1, args.filters, args.width, bias=False)
    g = generator(seed)
    opt = torch.optim.SGD(conv.parameters(), lr=args.lr)
    hist, losses = [], []
    for step in range(args.steps + 1):
        if step % args.log_every == 0 or step == args.steps:
            hist.append(dict(step=step, selectivity=float(selectivity(conv, args.L).mean()),
                             loss=float(np.mean(losses)) if losses else None))
            losses = []
        if step == args.steps:
            break
        obj = torch.randint(0, 2, (args.batch,), generator=g)
        obj2 = obj if shared else torch.randint(0, 2, (args.batch,), generator=g)
        x1, x2 = translated_objects(obj, args.L, args.noise, g), translated_objects(obj2, args.L, args.noise, g)
        loss = nt_xent(conv_h(conv, x1), conv_h(conv, x2), args.tau)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(finite(loss, step, "--lr"))
    return conv, hist


def run_covariance(args):
    g = generator(args.seed)
    theorem3 = covariance_part_a(args, g)
    summary, draw = covariance_part_b(args, g)
    return dict(config=vars(args), theorem3=theorem3, **summary), draw


def covariance_part_a(args, g):
    """(a) Theorem 3 checked against autograd, layer by layer, float64."""
    # latents z0: N random prototypes; augmentation: a random circular shift in {-1, 0, 1} plus pixel noise
    proto = torch.randn(args.N, args.D, generator=g, dtype=torch.float64)
    shifts = torch.randint(-1, 2, (args.N, args.K), generator=g)
    Xa = torch.stack([torch.stack([torch.roll(proto[i], int(shifts[i, k])) for k in range(args.K)]) for i in range(args.N)])
    Xa = Xa + 0.3 * torch.randn(Xa.shape, generator=g, dtype=torch.float64)  # (N, K, D)
    widths = [args.D] + args.widths
    nets = {"linear f = W x": [torch.randn(args.D // 2, args.D, generator=g, dtype=torch.float64)],
            f"ReLU MLP {'-'.join(map(str, widths))}, no bias": [
                torch.randn(o, i, generator=g, dtype=torch.float64) / math.sqrt(i) for i, o in zip(widths, widths[1:])]}
    checks = []  # (net, layer, shape, -grad, operator)
    for name, Ws in nets.items():
        Ws = [W.requires_grad_() for W in Ws]
        grads = torch.autograd.grad(l_simp_of_outputs(relu_mlp(Ws, Xa)), Ws)
        checks += [(name, l + 1, W.shape, -grad, covariance_operator([W.detach() for W in Ws], Xa, l))
                   for l, (W, grad) in enumerate(zip(Ws, grads))]
    # the conv net of (b) at its init, z0 = the object, K positions and noise draws of each
    torch.manual_seed(args.seed)
    W = torch.nn.Conv1d(1, args.filters, args.width, bias=False).weight.detach()[:, 0].double().requires_grad_()
    Xo = object_augmentations(args.L, args.K, args.noise, g)  # (2, K, 1, L)
    h = torch.relu(torch.nn.functional.conv1d(Xo.flatten(0, 1), W[:, None])).sum(-1)  # (2K, C)
    (grad,) = torch.autograd.grad(l_simp_of_outputs(h.unflatten(0, (2, args.K))), W)
    checks.append(("conv net of (b), z0 = object", 1, W.shape, -grad, conv_covariance_operator(W.detach(), Xo)))
    theorem3 = [dict(net=name, layer=l, shape=list(shape), rel_err=((ng - op).abs().max() / op.abs().max()).item(),
                     max_grad=ng.abs().max().item()) for name, l, shape, ng, op in checks]
    print(f"\n(a) Theorem 3 against autograd, N={args.N} latents x K={args.K} augmentations (the conv net: 2 objects "
          f"x K), float64")
    print_table(["net", "layer l", "W_l", "max |-grad - 4 V[Kbar_l] w_l| / max |4 V[Kbar_l] w_l|", "max |grad|"],
                [[t["net"], t["layer"], tuple(t["shape"]), f"{t['rel_err']:.1e}", f"{t['max_grad']:.3f}"]
                 for t in theorem3])
    return theorem3


def covariance_part_b(args, g):
    """(b) object selectivity of a 1-layer conv net, Fig. 3, and its no-shared-object control."""
    print(f"\n(b) conv1d({args.filters} filters, width {args.width}, no bias) -> ReLU -> sum pool, NT-Xent tau "
          f"{args.tau}, batch {args.batch}, SGD lr {args.lr}, {args.steps} steps; positive view = the same object at "
          f"a new position; control: an independent object")
    Xo = object_augmentations(args.L, 256, args.noise, g)  # the empirical distribution of the operator's rates
    runs, t0 = [], time.time()
    for s in range(args.seeds):
        seed = args.seed + s
        torch.manual_seed(seed)
        init = torch.nn.Conv1d(1, args.filters, args.width, bias=False)  # the same init train_conv draws
        W0 = init.weight.detach()[:, 0].double()
        op = conv_covariance_operator(W0, Xo)
        run = dict(seed=seed, sel_init=selectivity(init, args.L).tolist(), rate=operator_rate(W0, Xo).tolist(),
                   norm_init=init.weight.detach()[:, 0].norm(dim=1).tolist(),
                   step_cos={key: cosine(nt_xent_direction(init, args, shared, g), op)
                             for key, shared in [("shared", True), ("control", False)]})
        for key, shared in [("shared", True), ("control", False)]:
            conv, hist = train_conv(args, seed, shared)
            run[key] = dict(history=hist, sel=selectivity(conv, args.L).tolist(),
                            live=(object_responses(conv, args.L).sum(0) > 1e-6).tolist(),
                            norm=conv.weight.detach()[:, 0].norm(dim=1).tolist(),
                            filters=conv.weight.detach()[:, 0].tolist())
        runs.append(run)
        sh, ct = run["shared"], run["control"]
        print(f"seed {seed}: shared object: loss {sh['history'][-1]['loss']:.3f}, {sum(np.array(sh['sel']) > 0.9)} "
              f"filters above 0.9, live {sum(sh['live'])}/{args.filters} | control: loss "
              f"{ct['history'][-1]['loss']:.3f}, {sum(np.array(ct['sel']) > 0.9)} above 0.9, live "
              f"{sum(ct['live'])}/{args.filters}, {time.time() - t0:.1f}s")

    def stats(key):
        sel0, rate = np.array([r["sel_init"] for r in runs]), np.array([r["rate"] for r in runs])  # (seeds, C)
        sel, live = (np.array([r[key][k] for r in runs]) for k in ("sel", "live"))
        top = rate.argmax(1)  # each network's filter with the fastest L_simp growth at init
        return {f"NT-Xent, mean of the last {args.log_every} steps": ([r[key]["history"][-1]["loss"] for r in runs], "%.3f"),
                "cos(NT-Xent step at init, Thm 3 operator)": ([r["step_cos"][key] for r in runs], "%.2f"),
                "mean selectivity, trained (init: %.3f)" % sel0.mean(): (sel.mean(1), "%.3f"),
                "live filters (respond to an object)": (live.sum(1), "%.1f"),
                "filters with selectivity > 0.9": ((sel > 0.9).sum(1), "%.1f"),
                "fastest filter at init: selectivity, trained": (sel[np.arange(len(runs)), top], "%.3f")}
    table = {key: {k: (mean_std(v), f) for k, (v, f) in stats(key).items()} for key in ("shared", "control")}
    print(f"\nmean ± std over {args.seeds} networks of {args.filters} filters; the control starts from the same "
          f"weights; Thm 3 rate: <w_c, 4 V[Kbar_c] w_c> / ||w_c||^2 at init, z0 = the object")
    print_table(["", "shared object", "control: independent object"],
                [[k] + [(f + " ± " + f) % table[key][k][0] for key in ("shared", "control")]
                 for k, (_, f) in table["shared"].items()])
    table = {key: {k: m for k, (m, _) in t.items()} for key, t in table.items()}
    ref = dict(input_blind=math.log(2 * args.batch - 1), object_only=object_only_nt_xent(args.batch, args.tau, -1.0),
               object_only_nonneg=object_only_nt_xent(args.batch, args.tau, 0.0))
    print(f"NT-Xent of an encoder that ignores its input: log(2N - 1) = {ref['input_blind']:.3f}; the best encoder that "
          f"sees only the object: {ref['object_only']:.3f} (codes at cosine -1), {ref['object_only_nonneg']:.3f} with "
          f"non-negative codes like the ReLU net's (cosine 0)")

    return dict(table=table, reference=ref, runs=runs), lambda plt: plot_covariance(plt, args, runs)


def plot_covariance(plt, args, runs):
    fig, ax = plt.subplots(1, 3, figsize=(14, 3.8))
    steps = [h["step"] for h in runs[0]["shared"]["history"]]
    for key, colour, name in [("shared", "C0", "shared object"), ("control", "C1", "control: independent object")]:
        for r in runs:
            ax[0].plot(steps, [h["selectivity"] for h in r[key]["history"]], color=colour, alpha=0.6,
                       label=name if r is runs[0] else None)
    ax[0].set(xlabel="SGD step", ylabel="mean selectivity over filters", title='(b) selectivity for "11" vs "101"')
    ax[0].legend(fontsize=7)
    sel0 = np.concatenate([r["sel_init"] for r in runs])
    for key, colour, marker, name in [("shared", "C0", "o", "shared object"), ("control", "C1", "x", "control")]:
        ax[1].scatter(sel0, np.concatenate([r[key]["sel"] for r in runs]), s=12, marker=marker, color=colour,
                      alpha=0.7, label=f"{name}: NT-Xent step at init vs operator, cos "
                                       f"{np.mean([r['step_cos'][key] for r in runs]):.2f}")
    ax[1].set(xlabel="selectivity at init", ylabel="selectivity, trained", title="(b) every filter, same init")
    ax[1].legend(fontsize=7)
    ax[2].imshow(np.array(runs[0]["shared"]["filters"]), cmap="RdBu_r", aspect="auto")
    ax[2].set(xlabel="tap", ylabel="filter", title=f"learned filters, shared object, seed {args.seed}")
    return fig


# =====================================================================================================
# 4. hltm -- latents learned without supervision (Tian, Yu, Chen & Ganguli 2020, Sec. 6, Theorems 5-6)
# =====================================================================================================
# Hierarchical latent tree model (setup of the authors' ssl/hltm code, SPEC Sec. 6): binary latents z_mu in a tree
# of depth D with C children per node. The root is uniform on {0, 1}; a child copies its parent with probability
# (1 + delta) / 2, i.e. P(child | parent) = 1/2 [[1+delta, 1-delta], [1-delta, 1+delta]], one delta per edge,
# |delta| ~ U[0.7, 1] with a random sign. The input x is the C^D leaves. A positive pair shares the root and has
# everything below it resampled: the root is what "survives augmentation".
# The network mirrors the tree: one small fully connected block of `hid` nodes per latent, fed by the ReLU outputs
# of its children's blocks, so the nodes at mu's place see exactly the leaves under mu. Nothing ever tells a node
# about z_mu. Measure: for each latent, the best |Pearson correlation| between z_mu and the hid pre-activations at
# its place, averaged over the latents of a level. Theorem 5: some node is "lucky" at initialisation (already
# partly correlated); the covariance operator amplifies it (Theorem 6), so the correlation grows with training.
# Two references make the numbers readable. A control: the same network, init and loss, trained on pairs that share
# one latent z_s of level --control-level (default: just above the leaves) instead of the root, each view alone a
# draw of the model. It trains as hard (its weights move as far), but Theorem 3's operator is then V_{z_s}[Kbar(z_s)]:
# what survives its augmentation is z_s, so the embedding should learn z_s and the root only as far as z_s carries it
# (|corr(z_root, z_s)| = the product of the deltas between them). Pairs sharing nothing would not do: their expected
# gradient is about 0, so such a control never leaves its init. And the Bayes ceiling corr(z_mu, P(z_mu = 1 |
# leaves under mu)), which no function of those leaves can beat (Cauchy-Schwarz: corr(z, f(x)) <= corr(z, E[z | x])).


def hltm_deltas(depth, C, lo, hi, g):
    """delta of every edge, level by level: deltas[l] (C^(l+1),) are the edges into level l+1 (root = level 0)."""
    return [(lo + (hi - lo) * torch.rand(C ** (l + 1), generator=g))
            * torch.where(torch.rand(C ** (l + 1), generator=g) < 0.5, -1.0, 1.0) for l in range(depth)]


def hltm_sample(deltas, root, g, path=None):
    """Latents of every level given the root (..., B) in {0, 1}: [(..., B, 1), (..., B, C), ..., (..., B, C^D)]; the
    last is x. deltas[l]: (..., C^(l+1)), one tree per leading index (none: one tree). path {level: (index, values
    (..., B))} holds those latents at the given values (hltm_view's ancestors)."""
    C = deltas[0].shape[-1]
    z = [root[..., None]]  # (..., B, 1)
    for level, delta in enumerate(deltas, 1):
        parent = z[-1].repeat_interleave(C, dim=-1)  # (..., B, n_children): node j's children are j*C .. j*C + C-1
        keep = torch.rand(parent.shape, generator=g) < (1 + delta[..., None, :]) / 2
        z.append(torch.where(keep, parent, 1 - parent))
        if path and level in path:
            z[-1][..., path[level][0]] = path[level][1]
    return z


def hltm_view(deltas, z, shared, g):
    """A positive view of the trees z: the latent shared = (level, index) kept, the rest of the tree drawn from the
    model given it. Its ancestors are drawn upwards (with uniform marginals the reverse of a symmetric channel is
    the same channel), then everything else downwards from them, so each view alone is a draw of the model and the
    pair shares exactly that latent. shared = (0, 0), the root, is the augmentation of Sec. 6."""
    level, index = shared
    C, path = deltas[0].shape[-1], {level: (index, z[level][..., index])}
    for l in range(level, 0, -1):  # the parent of node j at level l is node j // C at level l - 1
        child, delta = path[l][1], deltas[l - 1][..., path[l][0]]
        keep = torch.rand(child.shape, generator=g) < (1 + delta[..., None]) / 2
        path[l - 1] = (path[l][0] // C, torch.where(keep, child, 1 - child))
    return hltm_sample(deltas, path.pop(0)[1], g, path)


def hltm_posterior(deltas, x):
    """P(z_mu = 1 | the leaves under mu) for every non-leaf latent, root level first: [(..., B, 1), ..., (..., B,
    C^(D-1))]. One upward pass of belief propagation, exact on a tree; every latent's prior is uniform."""
    C = deltas[0].shape[-1]
    lik = torch.stack([1 - x, x], -1).double()  # (..., B, n_leaves, 2): likelihood of each value of each leaf
    post = []
    for delta in reversed(deltas):
        p_same = ((1 + delta.double()) / 2)[..., None, :, None]  # (..., 1, n_children, 1)
        msg = p_same * lik + (1 - p_same) * lik.flip(-1)  # sum_c P(c | z) lik(c) for z = 0, 1: (..., B, n_children, 2)
        lik = msg.unflatten(-2, (-1, C)).prod(-2)  # children independent given the parent: (..., B, n_parents, 2)
        lik = lik / lik.sum(-1, keepdim=True)  # normalised, so a deep tree cannot underflow
        post.append(lik[..., 1])  # (..., B, n_parents)
    return post[::-1]


def hltm_init(depth, C, hid, g, emb=None):
    """Weights of the tree-shaped network, bottom level first: W (n_nodes, width, C * fan_in_per_child), b (n, width);
    nn.Linear's default uniform init, one Linear per latent. Every block has hid nodes but the root's, which has emb
    (default hid): the embedding NT-Xent normalises."""
    Ws, bs = [], []
    for level in reversed(range(depth)):
        fan_in, width = C * (1 if level == depth - 1 else hid), (emb or hid) if level == 0 else hid
        bound = 1 / math.sqrt(fan_in)
        Ws.append((2 * torch.rand(C ** level, width, fan_in, generator=g) - 1) * bound)
        bs.append((2 * torch.rand(C ** level, width, generator=g) - 1) * bound)
    return Ws, bs


def hltm_nets(args, seeds, copies=1):
    """The networks of `seeds` (one init each, from seed + 1000), the whole list `copies` times over, stacked: Ws[l]
    (R, n, width, fan_in), R = copies * len(seeds), network r trained on tree r % len(seeds)."""
    nets = [hltm_init(args.depth, args.children, args.hid, generator(s + 1000), args.emb) for s in seeds] * copies
    return [[torch.stack(p) for p in zip(*level)] for level in zip(*nets)]


def hltm_forward(Ws, bs, x):
    """Pre-activations at every latent's place, root level first: [(..., B, 1, hid), ..., (..., B, C^(D-1), hid)];
    x (..., B, C^D) the leaves, one network per leading index of the weights."""
    h = x.float()[..., None]  # (..., B, C^D, 1): the leaves
    hs = []
    for W, b in zip(Ws, bs):
        inputs = torch.relu(h).flatten(-2).unflatten(-1, (W.shape[-3], -1))  # (..., B, n, C * width): its children
        h = torch.einsum("...bni,...noi->...bno", inputs, W) + b[..., None, :, :]  # (..., B, n, hid)
        hs.append(h)
    return hs[::-1]


def abs_corr(z, h):
    """|Pearson correlation| between z (..., B, n) and each of its hid nodes h (..., B, n, hid): (..., n, hid)."""
    zc, hc = z.double() - z.double().mean(-2, keepdim=True), h.double() - h.double().mean(-3, keepdim=True)
    cov = (zc[..., None] * hc).mean(-3)  # (..., n, hid)
    std = zc.pow(2).mean(-2).sqrt()[..., None] * hc.pow(2).mean(-3).sqrt()  # (..., n, hid)
    return cov.abs() / std.clamp_min(1e-12)  # a dead node (std 0) has correlation 0


def best_abs_corr(z, h):
    """Per latent, the best |Pearson correlation| between z (..., B, n) and any of its hid nodes h (..., B, n, hid)."""
    return abs_corr(z, h).amax(-1)


def hltm_node_corrs(Ws, bs, z_eval):
    """|corr(z_mu, node)| of every node at every non-leaf latent's place, root level first: [(..., 1, hid), ...]."""
    with torch.no_grad():
        hs = hltm_forward(Ws, bs, z_eval[-1])
    return [abs_corr(z, h) for z, h in zip(z_eval[:-1], hs)]


def authors_nce(f, f_pos, f_neg, tau):
    """The `nce` loss of the authors' ssl/hltm code: minus the softmax probability of the positive against ONE
    negative, on batch-mean squared distances of normalised outputs, -exp(-d+/tau) / (exp(-d+/tau) + exp(-d-/tau)).
    f: (..., N, C), one loss per leading index."""
    f, f_pos, f_neg = (F.normalize(v, dim=-1) for v in (f, f_pos, f_neg))
    d_pos, d_neg = ((f - f_pos) ** 2).mean((-2, -1)), ((f - f_neg) ** 2).mean((-2, -1))  # nn.MSELoss: batch and nodes
    return -torch.sigmoid((d_neg - d_pos) / tau)


def hltm_train(deltas, args, seeds, shares, log_at=(), z_eval=None):
    """SimCLR on the trees deltas[l] (T, n), one per seed, as one batch: for each latent of `shares` (level, index)
    a network per tree from the seed's init (hltm_nets), trained on pairs whose views share that latent -- the root
    (0, 0) for SimCLR, a latent of --control-level for the control. NT-Xent (2N - 2 negatives per view) on the root
    block's output, or with --loss nce the authors' loss (one negative, a tree with a fresh root). Networks of one tree
    see the same anchors. Returns the weights (R, ...), each network's level correlations at the steps of log_at on
    z_eval, and the final losses (R,)."""
    Ws, bs = hltm_nets(args, seeds, len(shares))
    params = [p.requires_grad_() for p in Ws + bs]
    g, T, hist, loss = generator(seeds[0] + 2000), len(seeds), [], torch.full((len(shares) * len(seeds),), math.nan)
    z_eval = [z.repeat(len(shares), 1, 1) for z in z_eval or []]  # (R, n_eval, C^l): network r's tree is r % T
    for step in range(args.steps + 1):
        if step in log_at:
            hist.append(torch.stack([c.amax(-1).mean(-1) for c in hltm_node_corrs(Ws, bs, z_eval)], -1))  # (R, depth)
        if step == args.steps:
            break
        z1 = hltm_sample(deltas, torch.randint(0, 2, (T, args.batch), generator=g), g)
        x = [z1[-1].repeat(len(shares), 1, 1), torch.cat([hltm_view(deltas, z1, shared, g)[-1] for shared in shares])]
        if args.loss == "nce":  # and a negative: a tree with a fresh root
            root = torch.randint(0, 2, (T, args.batch), generator=g)
            x.append(hltm_sample(deltas, root, g)[-1].repeat(len(shares), 1, 1))
        f = hltm_forward(Ws, bs, torch.cat(x, -2))[0][..., 0, :].split(args.batch, -2)  # (R, N, emb) per view, one pass
        loss = authors_nce(*f, args.tau) if args.loss == "nce" else nt_xent(*f, args.tau)
        finite(loss, step, "--lr")
        grads = torch.autograd.grad(loss.sum(), params)  # each network's own gradient: the losses share no weight
        with torch.no_grad():
            for p, grad in zip(params, grads):
                p -= args.lr * grad
    return [W.detach() for W in Ws], [b.detach() for b in bs], hist, loss.detach()


def hltm_moved(Ws, bs, init):
    """How far training moved each level's weights and biases, root level first: ||theta - theta_0|| / ||theta_0||,
    (R, depth)."""
    sq = lambda ps: sum(p.pow(2).flatten(1).sum(1) for p in ps)  # (R,)
    return torch.stack([(sq([W - W0, b - b0]) / sq([W0, b0])).sqrt()
                        for W, b, W0, b0 in zip(Ws, bs, *init)][::-1], -1)


def hltm_trees(args, seeds):
    """Each seed's tree, stacked: the deltas [(T, C^(l+1))], the evaluation latents [(T, n_eval, C^l)] and the
    Bayes ceiling of every level (T, depth)."""
    trees = []
    for seed in seeds:
        g = generator(seed)
        deltas = hltm_deltas(args.depth, args.children, args.delta_lo, args.delta_hi, g)
        trees.append((deltas, hltm_sample(deltas, torch.randint(0, 2, (args.n_eval,), generator=g), g)))
    deltas, z_eval = ([torch.stack(v) for v in zip(*part)] for part in zip(*trees))
    post = hltm_posterior(deltas, z_eval[-1])
    ceiling = torch.stack([best_abs_corr(z, p[..., None]).mean(-1) for z, p in zip(z_eval[:-1], post)], -1)
    return deltas, z_eval, ceiling


def hltm_dead(Ws, bs, x):
    """Per network, whether it is dead: its normalised embedding is the same for every input (every ReLU below the root
    is off, or the root block ignores them), so NT-Xent's gradient is 0 and it can never train. (R,)"""
    with torch.no_grad():
        return F.normalize(hltm_forward(Ws, bs, x)[0][..., 0, :], dim=-1).std(-2).amax(-1) < 1e-6


def run_hltm(args):
    print(f"tree: depth {args.depth}, {args.children} children, |delta| ~ U[{args.delta_lo}, {args.delta_hi}], "
          f"{args.children ** args.depth} leaves; "
          + ("NT-Xent" if args.loss == "nt-xent" else "the authors' one-negative nce loss")
          + f", tau {args.tau}, batch {args.batch}, SGD lr {args.lr}, {args.steps} steps")
    return {"main": hltm_main, "width": hltm_width_sweep}[args.part](args)


def hltm_main(args):
    S, t0 = args.seeds, time.time()
    log_at = sorted(set(range(0, args.steps + 1, args.log_every)) | {args.steps})
    shared = (args.control_level, 0)  # the latent the control's two views share
    print(f"network: {args.hid} nodes per latent, {args.emb or args.hid} at the root; control: the views share "
          f"latent 0 of level {shared[0]} ({args.children ** (args.depth - shared[0])} leaves under it), not the root")
    seeds = [args.seed + s for s in range(S)]
    deltas, z_eval, ceiling = hltm_trees(args, seeds)
    Ws, bs, hist, loss = hltm_train(deltas, args, seeds, [(0, 0), shared], log_at, z_eval)  # SimCLR 0..S-1, control S..
    init, z2 = hltm_nets(args, seeds, 2), [z.repeat(2, 1, 1) for z in z_eval]
    # every node's |corr| with its latent, at init and trained: [(latents * seeds, hid)] per level
    corrs = [hltm_node_corrs(*w, z2) for w in (init, (Ws, bs))]
    nodes = {key: [c[rows].flatten(0, 1) for c in corrs[k]] for key, k, rows in
             [("init", 0, slice(S)), ("simclr", 1, slice(S)), ("control", 1, slice(S, None))]}
    with torch.no_grad():  # the embedding (the root block) against the latent the control shares
        emb_shared = [best_abs_corr(z2[shared[0]][..., :1], hltm_forward(*w, z2[-1])[0])[:, 0]
                      for w in (init, (Ws, bs))]
    dead, moved = hltm_dead(Ws, bs, z2[-1]), hltm_moved(Ws, bs, init)
    runs = [dict(seed=seed, ceiling=ceiling[s].tolist(), loss=loss[s].item(), loss_control=loss[S + s].item(),
                 history=[dict(step=t, corr=h[s].tolist()) for t, h in zip(log_at, hist)],
                 control=[dict(step=t, corr=h[S + s].tolist()) for t, h in zip(log_at, hist)],
                 dead=bool(dead[s]), moved=moved[s].tolist(), moved_control=moved[S + s].tolist(),
                 root_vs_shared=dict(init=emb_shared[0][s].item(), trained=emb_shared[1][s].item(),
                                     control=emb_shared[1][S + s].item())) for s, seed in enumerate(seeds)]
    two = lambda xs: " ".join(f"{c:.2f}" for c in xs)
    for r in runs:
        print(f"seed {r['seed']}: best |corr| per level (root first) init {two(r['history'][0]['corr'])} -> trained "
              f"{two(r['history'][-1]['corr'])} | control {two(r['control'][-1]['corr'])}; root block vs the shared "
              "latent %.2f -> %.2f | %.2f" % tuple(r["root_vs_shared"].values()) + "; weights moved "
              + " ".join(f"{m:.0%}" for m in r["moved"]) + " | control "
              + " ".join(f"{m:.0%}" for m in r["moved_control"])
              + (", DEAD" if r["dead"] else ""))
    print(f"{2 * S} networks, {time.time() - t0:.0f}s")
    summary = hltm_tables(args, runs, nodes)
    draw = lambda plt: plot_hltm(plt, args, runs, nodes, summary["table"])
    return dict(config=vars(args), runs=runs, **summary), draw


def hltm_tables(args, runs, nodes):
    """The tables of hltm_main: per level SimCLR against its init, the control and the Bayes ceiling; the embedding
    against the control's shared latent; Theorem 5's lucky node against the control."""
    live, table, luck = [r for r in runs if not r["dead"]], [], []
    for l in range(args.depth):
        col = dict(init=[r["history"][0]["corr"][l] for r in live], trained=[r["history"][-1]["corr"][l] for r in live],
                   control=[r["control"][-1]["corr"][l] for r in live], ceiling=[r["ceiling"][l] for r in live],
                   moved=[r["moved"][l] for r in live], moved_control=[r["moved_control"][l] for r in live])
        table.append(dict(level=l, latents=args.children ** l, **{k: mean_std(v) for k, v in col.items()}))
        # Theorem 5's "lucky node": does the node that ends best start best? The null is the control, trained as
        # far from the same init: how often its best node stays the one best at init
        c0, c1, cc = (nodes[k][l] for k in ("init", "simclr", "control"))  # (latents * seeds, hid)
        luck.append(dict(level=l, latents=len(c0), kept=(c0.argmax(1) == c1.argmax(1)).double().mean().item(),
                         kept_control=(c0.argmax(1) == cc.argmax(1)).double().mean().item(),
                         corr=float(np.corrcoef(c0.flatten(), c1.flatten())[0, 1]),
                         corr_control=float(np.corrcoef(c0.flatten(), cc.flatten())[0, 1])))
    shared_rows = {k: mean_std([r["root_vs_shared"][k] for r in live]) for k in ("init", "trained", "control")}
    print(f"\nbest |corr(z_mu, node)| per level, mean ± std over the {len(live)} of {args.seeds} networks that are not "
          f"dead (level 0 = root; level {args.depth - 1} sits just above the leaves); the control's views share "
          f"latent 0 of level {args.control_level}; moved: ||W - W_0|| / ||W_0|| of the level's weights and biases")
    print_table(["level", "latents", "init", "SimCLR", f"control: shares a level-{args.control_level} latent",
                 "Bayes ceiling", "moved: SimCLR / control"],
                [[t["level"], t["latents"], *("%.3f ± %.3f" % t[k] for k in ("init", "trained", "control", "ceiling")),
                  "%.0f%% / %.0f%%" % (100 * t["moved"][0], 100 * t["moved_control"][0])] for t in table])
    print("\nthe root block (the embedding) against the latent the control shares, best |corr|: "
          + ", ".join(f"{name} %.3f ± %.3f" % shared_rows[k]
                      for name, k in (("init", "init"), ("SimCLR", "trained"), ("control", "control"))))
    print(f"\nluck: how often the trained best node of a latent is the one best at init, and the Pearson correlation "
          f"of init and trained |corr| over all nodes of every latent, {args.seeds} seeds; the null is the control, "
          f"trained from the same init")
    print_table(["level", "latents x seeds", "best node kept: SimCLR / control",
                 "corr(init, trained): SimCLR / control"],
                [[d["level"], d["latents"], f"{d['kept']:.2f} / {d['kept_control']:.2f}",
                  f"{d['corr']:.2f} / {d['corr_control']:.2f}"] for d in luck])
    return dict(table=table, root_vs_shared=shared_rows, luck=luck)


def plot_hltm(plt, args, runs, nodes, table):
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    live = [r for r in runs if not r["dead"]]
    for l in range(args.depth):
        colour = f"C{l}"
        steps = [h["step"] for h in runs[0]["history"]]
        ax[0].plot(steps, np.mean([[h["corr"][l] for h in r["history"]] for r in live], 0), "-", color=colour,
                   label=f"level {l}")
        ax[0].plot(steps, np.mean([[h["corr"][l] for h in r["control"]] for r in live], 0), ":", color=colour)
        ax[0].plot(steps[-1] * (1.03 + 0.025 * l), table[l]["ceiling"][0], "<", color=colour, ms=7, clip_on=False)
        if l < args.depth - 1:  # the bottom level has nothing left to learn (its init sits at the ceiling)
            c0, c1 = nodes["init"][l], nodes["simclr"][l]  # (latents, hid)
            ax[1].scatter(c0.flatten(), c1.flatten(), s=5, color=colour, alpha=0.4, label=f"level {l}")
            best = c0.argmax(1, keepdim=True)  # each latent's luckiest node at init
            ax[1].scatter(c0.gather(1, best), c1.gather(1, best), s=22, color=colour, edgecolors="k")
    ax[0].set(xlabel="SGD step", ylabel="best |corr(z, node)|",
              title=f"HLTM: solid SimCLR, \u25c0 Bayes ceiling,\ndotted control (views share a level-"
                    f"{args.control_level} latent)")
    ax[0].legend(fontsize=8, ncol=2)
    ax[1].plot([0, 1], [0, 1], color="gray", lw=0.8)
    ax[1].set(xlabel="|corr(z, node)| at init", ylabel="|corr(z, node)|, trained",
              title=f"every node above the bottom level, {args.seeds} seeds,\nSimCLR (ringed: best at init)")
    ax[1].legend(fontsize=8, markerscale=3)
    return fig


def hltm_width_sweep(args):
    """Theorem 5's lucky node needs enough nodes per latent: the same trees, networks with each of --hids nodes per
    latent below the root, and the root block -- the embedding -- at --emb nodes (default --hid) for every width."""
    rows, sweep, t0, emb = [], [], time.time(), args.emb or args.hid
    seeds = [args.seed + s for s in range(args.seeds)]
    deltas, z_eval, ceiling = hltm_trees(args, seeds)
    below = list(range(1, args.depth - 1))  # below the root, above the bottom level (whose init is its ceiling)
    for hid in args.hids:
        a = argparse.Namespace(**{**vars(args), "hid": hid, "emb": emb})
        Ws, bs, hist, loss = hltm_train(deltas, a, seeds, [(0, 0)], (0, args.steps), z_eval)
        dead = hltm_dead(Ws, bs, z_eval[-1])
        sweep += [dict(hid=hid, seed=seed, init=hist[0][s].tolist(), trained=hist[-1][s].tolist(),
                       ceiling=ceiling[s].tolist(), loss=loss[s].item(), dead=bool(dead[s]))
                  for s, seed in enumerate(seeds)]
        c = [r for r in sweep if r["hid"] == hid and not r["dead"]]
        cells = lambda f: pm([f(r) for r in c]) if c else "-"
        rows.append([hid, f"{args.seeds - len(c)}/{args.seeds}", cells(lambda r: r["init"][0]),
                     cells(lambda r: r["trained"][0]), cells(lambda r: r["trained"][0] - r["init"][0])]
                    + ([cells(lambda r: np.mean([r["init"][l] for l in below])),
                        cells(lambda r: np.mean([r["trained"][l] - r["init"][l] for l in below]))] if below else []))
        print(f"hid {hid}: {time.time() - t0:.0f}s")
    ceil = mean_std(ceiling[:, 0].tolist())
    print(f"\nbest |corr(z_mu, node)|, mean ± std over the trees whose network is not dead ({args.seeds} trees, the "
          f"same for every width; root block {emb} nodes); Bayes ceiling at the root {ceil[0]:.3f} ± {ceil[1]:.3f}")
    span = (f"levels {below[0]}-{below[-1]}" if len(below) > 1 else f"level {below[0]}") if below else ""
    print_table(["nodes per latent", "dead", "root: init", "root: SimCLR", "root: gain"]
                + ([f"{span}: init", f"{span}: gain"] if below else []), rows)
    return dict(config=vars(args), sweep=sweep), lambda plt: plot_hltm_width(plt, args, sweep, ceil, emb)


def plot_hltm_width(plt, args, sweep, ceil, emb):
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for key, style in [("init", "o:"), ("trained", "s-")]:
        m = [mean_std([r[key][0] for r in sweep if r["hid"] == hid and not r["dead"]] or [np.nan]) for hid in args.hids]
        ax.errorbar(args.hids, [v[0] for v in m], [v[1] for v in m], fmt=style, capsize=3,
                    label="root, " + ("init" if key == "init" else "SimCLR") + ", live networks")
    for hid in args.hids:
        dead = sum(r["dead"] for r in sweep if r["hid"] == hid)
        if dead:
            ax.annotate(f"{dead} dead", (hid, 0.05), ha="center", fontsize=7)
    ax.axhline(ceil[0], color="gray", ls="--", label="Bayes ceiling")
    ax.set(xscale="log", xlabel="nodes per latent below the root", ylabel="best |corr(z_root, node)|", ylim=(0, 1),
           title=f"HLTM width sweep, {args.seeds} trees, root block {emb} nodes")
    ax.legend(fontsize=8)
    return fig


# =====================================================================================================
# Main
# =====================================================================================================


def die(message, code=2):
    """A user mistake or an environment failure: one line on stderr, what was wrong and what to do, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def raised(args, argv):
    """The number flags typed on the command line, with their values: what to lower when a float overflows or the
    memory runs out."""
    typed = dict.fromkeys(t[2:].split("=")[0].replace("-", "_") for t in argv if t.startswith("--"))
    value = lambda v: " ".join(map(str, v)) if isinstance(v, list) else v
    flags = [f"--{k.replace('_', '-')} {value(getattr(args, k))}" for k in typed if k not in ("seed", "threads")
             and isinstance(getattr(args, k, None), (int, float, list)) and not isinstance(getattr(args, k), bool)]
    return ", ".join(flags) or "the sizes"


def main(argv=None):
    """Run one experiment, write its summary.json, then its figure. Every way it can stop is one line on stderr with
    what to do: diverged, a float overflowed, out of memory, a write failed (exit 2), Ctrl-C or SIGTERM (exit 130)."""
    argv = sys.argv[1:] if argv is None else argv
    for stream in (sys.stdout, sys.stderr):  # a path that is not UTF-8 prints escaped, whatever the terminal takes;
        if hasattr(stream, "reconfigure"):  # each line out at once, also into a pipe (| tee log), not in 8 KB blocks
            stream.reconfigure(errors="backslashreplace", line_buffering=True)
    args = get_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0, saved = time.time(), None
    in_main_thread = threading.current_thread() is threading.main_thread()  # where Python runs signal handlers
    stops = {s: signal.signal(s, signal.default_int_handler)  # SIGTERM as Ctrl-C; Ctrl-C no longer quiet (the imports)
             for s in (signal.SIGINT, signal.SIGTERM)} if in_main_thread else {}
    try:
        print(f"toy_theory.py {args.cmd}: summary and figure to {args.out}", flush=True)  # stdout full: said now
        summary, draw = {"cnn": run_cnn, "clusters": run_clusters, "covariance": run_covariance,
                         "hltm": run_hltm}[args.cmd](args)
        summary["seconds"] = time.time() - t0
        text = json.dumps(strict_json(summary), indent=1, allow_nan=False)
        write_atomic(os.path.join(args.out, "summary.json"), lambda f: f.write(text.encode()))
        saved = os.path.join(args.out, "summary.json")
        print(f"\n{args.cmd}: {summary['seconds']:.1f}s, summary -> {saved}")
        plt = pyplot()
        if plt is not None:  # after the summary, so that a failing figure cannot lose it
            fig = draw(plt)
            fig.tight_layout()
            write_atomic(args.fig, lambda f: fig.savefig(f, format="png", dpi=90))
            plt.close(fig)
            print("figure:", args.fig)
        sys.stdout.flush()
    except KeyboardInterrupt:
        die(f"interrupted; {args.cmd} saves its summary when it ends, so run it again" if saved is None else
            f"interrupted while drawing the figure; the summary is saved, {saved}", 130)
    except FloatingPointError as e:
        die(f"{e} (the run diverged)")
    except (MemoryError, RuntimeError) as e:  # torch's allocator, and a number too large for a float32, raise these
        what = "out of memory" if isinstance(e, MemoryError) or "allocate" in str(e) else (
            "a number overflowed" if "overflow" in str(e) else None)
        if what is None:
            raise
        die(f"{what} ({str(e)[:120]}): lower {raised(args, argv)}")
    except OSError as e:  # a write failed: a full disk, ulimit -f, a folder gone, stdout full or a closed pipe
        kept = f"; the summary is saved, {saved}" if saved else "; nothing was saved"
        if e.filename is not None:
            die(f"cannot write {e.filename} ({e.strerror}){kept}: free space there or give another --out / --fig")
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that Python's flush at exit stays quiet
        if isinstance(e, BrokenPipeError):  # stdout's reader left: one line, quiet as Unix tools are
            die(f"the output pipe closed before the run ended (| head?){kept}; send the output to a file or to less "
                "instead")
        die(f"cannot write to standard output ({e.strerror}){kept}: send it to a file or device with room")
    finally:
        for s, handler in stops.items():
            signal.signal(s, handler)
    return summary


if __name__ == "__main__":
    main()
