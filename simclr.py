"""
SimCLR with an autoencoder projection head: one file, read top to bottom.

    python simclr.py                                          # embedded 'shapes' data, no download, ~6 min CPU
    python simclr.py --dataset stl10 --head ae --act sigmoid  # the paper's best head (needs internet + a GPU)
    python simclr.py --dataset stl10 --head ae --act sigmoid --recipe paper   # ... with the paper's protocol
    python simclr.py --dry-run                                # every stage for a couple of steps, in seconds
    python simclr.py --show-augs augs.png                     # look at what the network is asked to match
    python simclr.py --bench                                  # img/s: this pipeline vs the classic DataLoader one
    python simclr.py --label-fractions 0.01,0.1,1             # few labels: SimCLR against supervised from scratch

Papers:
  SimCLR: Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", arXiv:2002.05709
  AE head: Schliebitz et al., "An Empirical Study on Improving SimCLR's Nonlinear Projection Head using
           Pretrained Autoencoder Embeddings", arXiv:2408.14514 (we call it "the paper" below)

What happens when you run it:
  1. the images are loaded once into one uint8 tensor on the training device (no DataLoader in the hot path);
  2. (head ae) a 4-layer MLP autoencoder is trained on them and cached; its 512->d embedding layer (--ae-dim) is the
     first layer of the projection head, frozen;
  3. a ResNet is trained with the NT-Xent loss on two augmented views of every image, the augmentations done
     in batches on the device, each image with its own random parameters (SGD, a linear warm-up, then cosine);
  4. the frozen backbone is evaluated with a linear probe and a weighted kNN, next to two baselines (a linear
     probe on raw pixels and on a randomly initialised backbone), so you can see what SimCLR learned;
  5. the run draws its curves (curves.png) and, for 8 test images, their nearest training images by SimCLR's
     features and by a random backbone's (neighbours.png); with --label-fractions, the probes and supervised
     training from scratch are compared on a few labels (label_efficiency.png).

Result: `python simclr.py` reaches 77.5 +- 1.9% linear / 46.9 +- 2.1% kNN top-1 on the embedded shapes over 3 seeds
(a random-init ResNet18: 53.1 / 30.5%), in 5 min 47 s on a 2-core CPU. Fashion-MNIST on one H200 (one seed, the recipe
before warm-up): 90.0% linear with the frozen autoencoder head, 87.3% with the MLP head. All figures: README.md.
"""
import argparse
import copy
import datetime
import gzip
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
import torchvision
import torchvision.transforms.v2  # not imported by "import torchvision"

# ----------------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------------

# Per-dataset defaults. For the paper's datasets, image size and batch size are the paper's (Sec. 4 of
# 2408.14514), 150 pre-training epochs and 100 autoencoder epochs as in the paper. 'shapes' is sized for a
# 2-core CPU: ResNet18 with the ImageNet stem (~8x cheaper than the CIFAR stem at 32 px), 5000 training images,
# crops of at least 30% (a crop keeps part of the shape), tau 0.2, batch 64 (on a CPU, more steps beat bigger
# batches; the recipe's lr is then 0.15, and 0.3 learned slower) and 20 epochs: about 6 minutes on a 2-core CPU with
# bf16, in which SimCLR clearly beats a random-init backbone in both linear and kNN accuracy (README, "Results").
# Keys not given fall back to the flags' global defaults.
DATASETS = {
    "shapes":        dict(img=32, batch=64, epochs=20, ae_epochs=10, n=(5000, 2000),
                          arch="resnet18", stem="imagenet", tau=0.2, crop_min=0.3),
    "stl10":         dict(img=96, batch=500, epochs=150, ae_epochs=100),
    "cifar10":       dict(img=32, batch=1280, epochs=150, ae_epochs=100),
    "cifar100":      dict(img=32, batch=1280, epochs=150, ae_epochs=100),
    "imagenette":    dict(img=128, batch=392, epochs=150, ae_epochs=100),
    "fgvc-aircraft": dict(img=128, batch=666, epochs=150, ae_epochs=100),
    "fashion-mnist": dict(img=28, batch=512, epochs=100, ae_epochs=100),
    "folder":        dict(img=96, batch=256, epochs=100, ae_epochs=100),
}

# The two recipes (--recipe). Values here win over DATASETS; flags typed on the command line win over both. 'simclr'
# trains from scratch as SimCLR does (Sec. B.1 of SimCLR: a linear warm-up, then cosine decay; its official code
# leaves BatchNorm and biases out of weight decay), with SGD + momentum in place of LARS and a square-root
# learning-rate rule: B.1's 0.075 sqrt(B) (with LARS, preferred there for small batches and short runs) re-anchored
# here at 0.3 for B = 256, where it meets the linear rule: 0.3 sqrt(B / 256). Without the warm-up, the linear rule's
# 0.6 at Fashion-MNIST's batch of 512 sat at the loss of a collapsed embedding, ln(2N - 1); with it, 0.42 learned more
# steadily than 0.6 (README, "The first steps"). 'paper' is the protocol of 2408.14514 (Sec. 4, and its code):
# ResNet34 from ImageNet weights with torchvision's 7x7 stem and maxpool at every image size, the linear rule 0.3 B /
# 256, no warm-up, weight decay on every parameter, tau 0.5, STL10's 5k labelled images only, and its probe (--eval
# paper).
RECIPES = {
    "simclr": dict(lr_scaling="sqrt", decay_norm_and_bias=False),
    "paper": dict(lr_scaling="linear", decay_norm_and_bias=True, pretrained=True, arch="resnet34", stem="imagenet",
                  tau=0.5, crop_min=0.08, warmup_epochs=0, eval="paper", stl10_pretrain="train"),
}
ARCHS = ("resnet18", "resnet34", "resnet50")
ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # keep "(default: per dataset)" where the help already says it
        return action.help if "default" in action.help else super()._get_help_string(action)


def build_parser():
    """Every flag once, with its default in its help, in the groups that --help shows. Each *_flags(a) below declares
    one group's flags, `a` being that group's add_argument."""
    p = argparse.ArgumentParser(description="SimCLR with an optional autoencoder projection head (arXiv:2408.14514).",
                                formatter_class=HelpWithDefaults, allow_abbrev=False)
    for title, add_flags in [("data", data_flags),
                             ("augmentations (Sec. 3 of SimCLR; the paper's values)", augmentation_flags),
                             ("model: backbone f, projection head g, autoencoder", model_flags),
                             ("optimisation (Sec. B.1 of SimCLR; Sec. 4 of the paper)", optimisation_flags),
                             ("evaluation", evaluation_flags),
                             ("few labels and pictures", few_labels_and_pictures_flags),
                             ("run: device, precision, processes, output", run_flags),
                             ("benchmark", bench_flags)]:
        add_flags(p.add_argument_group(title).add_argument)
    return p


def data_flags(a):
    a("--dataset", default="shapes", help=f"one of: {', '.join(DATASETS)}")
    a("--data-dir", default="data", help="where datasets are read from (and downloaded to)")
    a("--no-download", action="store_true", help="never download; fail with a list of the files to put in place")
    a("--stl10-pretrain", default=None, choices=("train+unlabeled", "train"),
      help="STL10 images used for pre-training: the standard protocol, or only the 5k labelled ones as in the paper "
           "(default: train+unlabeled; recipe paper: train)")
    a("--img-size", type=int, default=None, help="image side in pixels (default: per dataset, see DATASETS)")
    a("--data-on", default="auto", choices=("auto", "device", "host"),
      help="where the uint8 images live: on the training device, or in host memory with each batch copied over; "
           "auto: on the device when they take at most half of its free memory")


def augmentation_flags(a):
    a("--crop-min", type=float, default=None, help="smallest crop area of RandomResizedCrop (default: 0.08; shapes 0.3)")
    a("--jitter-prob", type=float, default=0.8, help="probability of colour jitter (0.8, 0.8, 0.8, 0.2)")
    a("--gray-prob", type=float, default=0.2, help="probability of grayscale")
    a("--blur-prob", type=float, default=0.5, help="probability of Gaussian blur (kernel ~10%% of the image)")
    a("--show-augs", default=None, metavar="FILE.png", help="save a grid of images and their two views, then exit")


def model_flags(a):
    a("--arch", default=None, help=f"backbone, one of: {', '.join(ARCHS)} (default: resnet34; shapes: resnet18)")
    a("--stem", default=None, choices=("auto", "imagenet", "cifar"),
      help="auto: ImageNet's 7x7 stem and maxpool with --pretrained or for images over 64 px, else a 3x3 stride-1 "
           "stem without maxpool (default: auto; shapes: imagenet)")
    a("--pretrained", action="store_true",
      help="start from torchvision's ImageNet weights, as the paper did (implied by --recipe paper)")
    a("--head", default="mlp", choices=("mlp", "ae"), help="projection head: random MLP, or AE embedding first")
    a("--act", default="relu", choices=tuple(ACTIVATIONS), help="activation between the two head layers")
    a("--proj-hidden", type=int, default=None,
      help="hidden width h of the MLP head (default: 512; the ae head's hidden width is the embedding's, --ae-dim)")
    a("--proj-out", type=int, default=128, help="output width of the projection head")
    a("--ae-dim", type=int, default=None,
      help="width d of the autoencoder's embedding, the ae head's hidden width (the paper: 128, 256 or 512; "
           "default: 512)")
    a("--no-freeze", action="store_true", help="let the AE embedding train (ablation; frozen by default)")
    a("--ae-epochs", type=int, default=None, help="autoencoder epochs (default: per dataset)")
    a("--ae-dir", default="runs/autoencoders", help="cache of trained autoencoders, one per dataset, d and seed")


def optimisation_flags(a):
    a("--recipe", default="simclr", choices=tuple(RECIPES),
      help="simclr: from scratch, with a linear warm-up and BatchNorm and biases out of weight decay; paper: the "
           "protocol of 2408.14514 (ImageNet weights, no warm-up, its probe; see RECIPES)")
    a("--epochs", type=int, default=None, help="pre-training epochs (default: per dataset)")
    a("--batch-size", type=int, default=None, help="N images per step, 2N views (default: per dataset)")
    a("--lr", type=float, default=None,
      help="peak learning rate (default: recipe simclr: 0.3 * sqrt(batch / 256); recipe paper: 0.3 * batch / 256)")
    a("--warmup-epochs", type=float, default=None,
      help="linear warm-up of the learning rate, stepped every step (default: recipe simclr: a tenth of the run, "
           "at most 10 epochs; recipe paper: 0)")
    a("--momentum", type=float, default=0.9, help="SGD momentum")
    a("--wd", type=float, default=1e-5, help="weight decay")
    a("--lr-min-ratio", type=float, default=1 / 50, help="cosine schedule ends at lr * this")
    a("--tau", type=float, default=None, help="NT-Xent temperature (default: 0.5, the paper's; shapes: 0.2)")


def evaluation_flags(a):
    a("--eval", default=None, choices=("standard", "paper"),
      help="standard: L-BFGS probe on the train split's features, top-1 on the test split; paper: the paper's SGD "
           "probe on a 70/10/20 split of the test split's features (default: standard; recipe paper: paper)")
    a("--probe-steps", type=int, default=200, help="L-BFGS iterations of the linear probe")
    a("--knn-every", type=int, default=5, help="kNN monitor every this many epochs (0: only at the end)")
    a("--knn-k", type=int, default=200, help="neighbours of the weighted kNN")
    a("--no-baselines", action="store_true", help="skip the raw-pixel and random-init baselines")


def few_labels_and_pictures_flags(a):
    a("--label-fractions", default=None, metavar="F,F,...",
      help="what pre-training buys with few labels: for each fraction of the train labels (in (0, 1], e.g. "
           "0.01,0.1,1), the probes trained on a class-balanced seeded draw of that many, next to the random-init "
           "backbone's probe and supervised training from scratch on the same labels (results.json, "
           "label_efficiency.png; standard protocol only; default: off)")
    a("--labels-per-class", default=None, metavar="K,K,...",
      help="the same with exactly K labelled train images of every class, in place of --label-fractions "
           "(default: off)")
    a("--label-draws", type=int, default=3,
      help="draws of every label set smaller than the train split (mean +- std over them; the whole split: one)")
    a("--sup-steps", type=int, default=500,
      help="SGD steps of the supervised-from-scratch baseline, batch min(256, labels): the same budget for every "
           "label set")
    a("--show-neighbours", default=None, metavar="FILE.png",
      help="save 8 test images with their 8 nearest train images by SimCLR's h and by a random-init backbone's h "
           "(every run writes it as neighbours.png): at the end of the run, or with --resume DIR of DIR's last "
           "checkpoint, then exit without training or evaluating")


def run_flags(a):
    a("--device", default=None, help="cuda, mps or cpu (default: cuda if available, else mps, else cpu)")
    a("--precision", default="auto", choices=("auto", "bf16", "fp32"),
      help="auto: bf16 autocast on CUDA and on CPUs with native bf16 (AVX512-BF16, AMX; not for tiny images), "
           "fp32 elsewhere")
    a("--compile", default="auto", choices=("auto", "on", "off"),
      help="torch.compile the augmentation and the model; auto: on for CUDA except --dry-run, off elsewhere "
           "(falls back to eager with a warning if compiling fails)")
    a("--seed", type=int, default=0, help="seed of everything random")
    a("--out", default=None, help="output directory (default: runs/<dataset>-<head>-<act>-<time>)")
    a("--resume", default=None, metavar="DIR", help="continue the run saved in DIR")
    a("--dry-run", action="store_true", help="run every stage for a couple of steps on a few images")
    a("--subset", type=int, default=None,
      help="a seeded, class-stratified draw of N images from every labelled split (and as large a share of STL10's "
           "unlabeled images), for quick experiments")
    a("--no-sync-bn", action="store_true",
      help="under torchrun: BatchNorm statistics per process instead of over the global batch")


def bench_flags(a):
    a("--bench", action="store_true", help="measure img/s of this pipeline against the classic DataLoader one, "
                                           "write bench.json to --out, then exit (no training)")
    a("--bench-steps", type=int, default=20,
      help="timed steps per stage of --bench, after warm-up (the classic stages: at least 16 per worker)")
    a("--workers", type=int, default=None,
      help="DataLoader worker processes of the classic pipeline in --bench (default: the CPU cores this process "
           "may use)")
    a("--peak-tflops", type=float, default=None,
      help="the device's dense bf16 peak, for the MFU of --bench (default: known for H100, H200, A100)")


def die(msg):
    """A user mistake: say what was wrong and what to do, exit non-zero, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# What every numeric flag must be, checked before anything runs: (flag, test, the rule in words).
NUMBER_RULES = [
    ("epochs", lambda v: v >= 0, ">= 0"), ("ae_epochs", lambda v: v >= 0, ">= 0"),
    ("batch_size", lambda v: v >= 2, "at least 2: NT-Xent needs at least one negative per anchor"),
    ("lr", lambda v: v > 0, "> 0"), ("warmup_epochs", lambda v: v >= 0, ">= 0"),
    ("momentum", lambda v: 0 <= v < 1, "in [0, 1)"), ("wd", lambda v: v >= 0, ">= 0"),
    ("lr_min_ratio", lambda v: 0 <= v <= 1, "in [0, 1]"), ("tau", lambda v: v > 0, "> 0 (the paper uses 0.5)"),
    ("crop_min", lambda v: 0 < v <= 1, "in (0, 1]"), ("jitter_prob", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("gray_prob", lambda v: 0 <= v <= 1, "in [0, 1]"), ("blur_prob", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("img_size", lambda v: v >= 8, "at least 8"), ("proj_hidden", lambda v: v >= 1, ">= 1"),
    ("proj_out", lambda v: v >= 1, ">= 1"), ("ae_dim", lambda v: v >= 1, ">= 1"),
    ("probe_steps", lambda v: v >= 1, ">= 1"),
    ("knn_k", lambda v: v >= 1, ">= 1"), ("knn_every", lambda v: v >= 0, ">= 0 (0: only at the end)"),
    ("subset", lambda v: v >= 2, "at least 2"), ("bench_steps", lambda v: v >= 1, ">= 1"),
    ("workers", lambda v: v >= 0, ">= 0"), ("peak_tflops", lambda v: v > 0, "> 0"),
    ("label_draws", lambda v: 1 <= v <= 1000, "in 1..1000"), ("sup_steps", lambda v: v >= 1, ">= 1"),
]


def check_numbers(args):
    for key, ok, rule in NUMBER_RULES:
        v = getattr(args, key)
        if v is not None and not (math.isfinite(v) and ok(v)):
            die(f"--{key.replace('_', '-')} must be {rule} (got {v})")


def number_list(text, flag, kind, ok, rule):
    """A comma-separated flag ('0.01,0.1,1') -> its sorted distinct values, each checked by ok."""
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        die(f"{flag} takes comma-separated {'integers' if kind is int else 'numbers'}, e.g. "
            f"{'10,100' if kind is int else '0.01,0.1,1'} (got {text!r})")
    bad = [v for v in values if not (math.isfinite(v) and ok(v))]
    if bad:
        die(f"{flag} values must be {rule} (got {bad[0]})")
    return sorted(set(values))


def resolve_args(args):
    """Values computed from flags, in one place."""
    check_numbers(args)  # before --dry-run replaces some of them
    if args.dataset not in DATASETS:
        die(f"unknown dataset '{args.dataset}'; choose one of: {', '.join(DATASETS)}")
    recipe, d = RECIPES[args.recipe], DATASETS[args.dataset]
    pick = lambda key, default: (getattr(args, key) if getattr(args, key) is not None  # typed, else recipe,
                                 else recipe[key] if key in recipe else d.get(key, default))  # else dataset
    args.arch, args.stem, args.tau = pick("arch", "resnet34"), pick("stem", "auto"), pick("tau", 0.5)
    args.crop_min, args.eval = pick("crop_min", 0.08), pick("eval", "standard")
    args.stl10_pretrain = pick("stl10_pretrain", "train+unlabeled")
    args.pretrained = args.pretrained or recipe.get("pretrained", False)
    args.decay_norm_and_bias = recipe["decay_norm_and_bias"]
    if args.arch not in ARCHS:
        die(f"unknown arch '{args.arch}'; choose one of: {', '.join(ARCHS)}")
    if args.label_fractions is not None and args.labels_per_class is not None:
        die("--label-fractions and --labels-per-class exclude each other: give fractions of the train labels, or "
            "counts per class")
    args.label_amounts = (  # the label sets of the few-labels stage: fractions, or counts per class; [] when off
        number_list(args.label_fractions, "--label-fractions", float, lambda v: 0 < v <= 1, "in (0, 1]")
        if args.label_fractions is not None else number_list(args.labels_per_class, "--labels-per-class", int,
                                                             lambda v: v >= 1, "at least 1")
        if args.labels_per_class is not None else [])
    if args.show_neighbours is not None and (not args.show_neighbours.lower().endswith(".png")
                                             or os.path.isdir(args.show_neighbours)):
        die(f"--show-neighbours {args.show_neighbours}: give the name of a .png file to write")
    if args.label_amounts and args.eval == "paper":  # its probe trains on the test split: no train labels to draw
        die("--label-fractions / --labels-per-class train the probes on train-split labels (the standard protocol); "
            "--eval paper (also set by --recipe paper) trains its probe on the test split. Add --eval standard.")
    args.img_size = args.img_size or d["img"]
    args.batch_size = args.batch_size or d["batch"]
    args.epochs = args.epochs if args.epochs is not None else d["epochs"]
    args.ae_epochs = args.ae_epochs if args.ae_epochs is not None else d["ae_epochs"]
    if args.dry_run:
        args.batch_size, args.epochs, args.ae_epochs, args.probe_steps, args.sup_steps = 16, 1, 1, 5, 2
        args.subset = args.subset or 64
    B = args.batch_size  # the linear rule of SimCLR's B.1, or the square-root one re-anchored at 0.3 for B = 256
    args.lr = args.lr or (0.3 * B / 256 if recipe["lr_scaling"] == "linear" else 0.3 * math.sqrt(B / 256))
    # SimCLR warms up for 10 epochs of 100 or more; a short run warms up for a tenth of its length
    args.warmup_epochs = pick("warmup_epochs", min(10.0, args.epochs / 10))
    if args.stem == "auto":  # ImageNet weights come with their stem: a 3x3 conv1 would start from random weights
        args.stem = "imagenet" if args.pretrained or args.img_size > 64 else "cifar"
    if args.head == "mlp" and args.no_freeze:
        die("--no-freeze only applies to --head ae (the MLP head has nothing frozen)")
    if args.head == "mlp" and args.ae_dim is not None:
        die("--ae-dim only applies to --head ae (the MLP head's hidden width is --proj-hidden)")
    if args.head == "ae" and args.proj_hidden is not None:  # it was d before --ae-dim existed: never ignore it
        die(f"--proj-hidden is the MLP head's hidden width; the ae head's is the width d of the autoencoder's "
            f"embedding: use --ae-dim {args.proj_hidden}")
    # one width per head: h of the MLP head, or d of the autoencoder whose embedding is the ae head's first layer
    args.proj_hidden = (args.proj_hidden or 512) if args.head == "mlp" else None
    args.ae_dim = (args.ae_dim or 512) if args.head == "ae" else None
    if args.head == "ae" and args.arch == "resnet50":
        die("--head ae needs a 512-d backbone (resnet18/34): the AE's hidden layer is 512 wide, resnet50 gives "
            "2048 features. Use --arch resnet34 or --head mlp.")
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if args.precision == "auto":  # bf16 where the hardware computes it natively. On CPUs, oneDNN's bf16 backward
        # of a stride-2 convolution on a 1x1 feature map returns garbage weight gradients (torch 2.14, AVX512-BF16):
        # images that small for the stem (16 px or less for the ImageNet stem, 4 for the CIFAR stem) stay in fp32
        cpu_bf16 = cpu_has_bf16() and args.img_size > (16 if args.stem == "imagenet" else 4)
        args.precision = "bf16" if args.device.startswith("cuda") or (args.device == "cpu" and cpu_bf16) else "fp32"
    args.compile = args.compile == "on" or (args.compile == "auto" and args.device.startswith("cuda")
                                            and not args.dry_run)  # compiling takes minutes, a dry run seconds
    args.workers = args.workers if args.workers is not None else len(os.sched_getaffinity(0))
    if args.out is None:
        args.out = os.path.join("runs", ("bench-" if args.bench else "") +
                                f"{args.dataset}-{args.head}-{args.act}-{time.strftime('%Y%m%d-%H%M%S')}")
    return args


def cpu_has_bf16():
    """Whether this CPU computes bf16 dot products natively; without that, autocast to bf16 is slower than fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:  # not Linux
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_for(device, precision):
    """Precision in one place: bf16 autocast (convolutions and matmuls in bf16, the rest in fp32), or plain fp32.
    On a CPU with AVX512-BF16, bf16 made ResNet18's training step 1.4x (ImageNet stem, 32 px) to 2x (CIFAR stem,
    28 px) faster."""
    if precision == "fp32" or device.type not in ("cuda", "cpu"):
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds the CUDA generators too


def rng_state():
    return dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def set_rng_state(s):
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def write_atomic(path, write):
    """write(f) into a temporary file of this process's own next to `path`, then rename it to `path`: a run killed
    mid-write leaves the previous file intact, and processes writing the same file at once never see a half-written
    one (the last rename wins)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the write failed
            os.remove(tmp)


def save_atomic(obj, path):
    write_atomic(path, lambda f: torch.save(obj, f))


def write_results(results, out):
    """results.json, rewritten as soon as each number exists: a run stopped later keeps what it measured."""
    write_atomic(os.path.join(out, "results.json"), lambda f: f.write(json.dumps(results, indent=2).encode()))


def trim_metrics(path, epoch):
    """Keep the metrics.jsonl lines of epochs up to the checkpoint's. An epoch's line is appended just before its
    checkpoint is saved; a run killed between the two (or mid-line) would otherwise log that epoch twice.
    Returns how many lines were dropped."""
    if not os.path.exists(path):
        return 0
    kept, dropped = [], 0
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["epoch"] <= epoch:
                    kept.append(line.rstrip("\n") + "\n")
                    continue
            except (ValueError, KeyError, TypeError):  # a line cut short by the kill
                pass
            dropped += 1
    write_atomic(path, lambda f: f.write("".join(kept).encode()))
    return dropped


# ----------------------------------------------------------------------------------------------------------
# Data: every dataset becomes uint8 tensors (N, 3, H, W) held on the training device
# ----------------------------------------------------------------------------------------------------------

SHAPE_NAMES = ("circle", "square", "triangle", "star", "cross", "ring", "ellipse", "crescent", "half-disc", "L")


def shape_mask(u, v, cls):
    """Inside-test of shape SHAPE_NAMES[cls] in its own coordinates u, v (about [-1, 1]); a bool tensor like u."""
    rho, phi = torch.sqrt(u * u + v * v), torch.atan2(v, u)
    shape = SHAPE_NAMES[cls]
    if shape == "circle":
        return rho < 1
    if shape == "square":
        return torch.maximum(u.abs(), v.abs()) < 0.8
    if shape == "triangle":  # equilateral, with apothem 0.5 (polar form of a regular polygon)
        sector = 2 * math.pi / 3
        return rho * torch.cos(torch.remainder(phi, sector) - sector / 2) < 0.5
    if shape == "star":
        return rho < 0.6 + 0.4 * torch.cos(5 * phi)  # five-pointed
    if shape == "cross":
        return ((u.abs() < 0.28) | (v.abs() < 0.28)) & (torch.maximum(u.abs(), v.abs()) < 0.95)
    if shape == "ring":
        return (rho < 1) & (rho > 0.6)
    if shape == "ellipse":
        return u * u + (v / 0.45) ** 2 < 1
    if shape == "crescent":
        return (rho < 1) & ((u - 0.5) ** 2 + v * v > 0.75 ** 2)
    if shape == "half-disc":
        return (rho < 1) & (v < 0.1)
    return ((u > -0.8) & (u < -0.3) & (v.abs() < 0.9)) | ((v > 0.4) & (v < 0.9) & (u.abs() < 0.8))  # "L"


# What the two views of an image share, beyond its class, is what SimCLR learns first. A unique random colour
# per image, random clutter strokes or a random rotation (none of which the augmentations change) let it match
# views without looking at the shape (the colour shortcut of Sec. 3 of SimCLR); we measured kNN accuracy staying
# flat for 9 epochs with rotated shapes. So shapes are upright and colours come from a small palette: the
# shared nuisance is one of 30 colour pairs, and telling 64 images apart needs the shape.
PALETTE = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.8, 0.2], [0.2, 0.3, 0.9], [0.9, 0.9, 0.2], [0.9, 0.9, 0.9],
                        [0.1, 0.1, 0.1]])


def make_shapes(n, size, seed):
    """The embedded dataset: 10 shape classes at random position and scale, in palette colours, with pixel noise.
    Generated from `seed` in seconds, no files, no per-image Python. Returns uint8 (n, 3, size, size), labels (n,)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=g)
    S = 2 * size  # drawn at twice the size and average-pooled: anti-aliased edges
    lin = (torch.arange(S) + 0.5) / S * 2 - 1
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")  # (S, S) pixel centres in [-1, 1]
    xs, ys = [], torch.randint(0, len(SHAPE_NAMES), (n,), generator=g)
    for start in range(0, n, 1000):  # chunks keep memory small
        y = ys[start:start + 1000]
        m = len(y)
        cx, cy = ((rand(2, m, 1, 1) - 0.5) * 0.6).unbind(0)  # centre
        radius = 0.45 + 0.3 * rand(m, 1, 1)  # half-width in image units (7-12 px of 32): after the ImageNet
        # stem's 4x downsampling a shape still covers several cells of the 8x8 feature map
        u, v = (gx - cx) / radius, (gy - cy) / radius  # (m, S, S): the shape's own coordinates
        inside = torch.zeros(m, S, S, dtype=torch.bool)
        for cls in range(len(SHAPE_NAMES)):
            idx = (y == cls).nonzero().squeeze(1)
            inside[idx] = shape_mask(u[idx], v[idx], cls)
        fg_i = torch.randint(0, len(PALETTE), (m,), generator=g)
        bg_i = (fg_i + torch.randint(1, len(PALETTE), (m,), generator=g)) % len(PALETTE)  # never the shape's colour
        img = torch.where(inside.unsqueeze(1), PALETTE[fg_i].view(m, 3, 1, 1), PALETTE[bg_i].view(m, 3, 1, 1))
        img = F.avg_pool2d(img, 2) + 0.03 * torch.randn(m, 3, size, size, generator=g)  # (m, 3, size, size)
        xs.append((img.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.cat(xs), ys


FASHION_MNIST_LOCAL = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist package

# Where each dataset's files must be when torchvision cannot download them (paths under --data-dir).
EXPECTED_FILES = {
    "stl10": "stl10_binary/{train_X,train_y,test_X,test_y,unlabeled_X}.bin  (from stl10_binary.tar.gz)",
    "cifar10": "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}  (from cifar-10-python.tar.gz)",
    "cifar100": "cifar-100-python/{train,test,meta}  (from cifar-100-python.tar.gz)",
    "imagenette": "imagenette2-160/{train,val}/<wnid>/*.JPEG  (from imagenette2-160.tgz)",
    "fgvc-aircraft": "fgvc-aircraft-2013b/data/{images/*.jpg,images_manufacturer_{trainval,test}.txt,manufacturers.txt}",
    "fashion-mnist": "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte  (un-gzipped)",
    "folder": "train/<class>/*.png|jpg and test/<class>/*.png|jpg",
}


def open_torchvision(cls, root, name, download, **kw):
    """Construct a torchvision dataset; a failed download or missing file says which files go where."""
    try:
        return cls(root, download=download, **kw)
    except Exception as e:  # URLError, RuntimeError("Dataset not found"), checksum errors...
        die(f"could not load {name} from '{root}' ({type(e).__name__}: {e}).\n"
            f"Without internet, put the files at {os.path.join(root, EXPECTED_FILES[name])} "
            f"and run with --no-download.")


def pil_to_uint8(ds, size, banner=0):
    """Decode a PIL dataset once: drop `banner` bottom rows, resize the short side, centre-crop. (N, 3, size, size)"""
    xs, ys, small = [], [], 0
    for img, label in ds:
        img = img.convert("RGB")  # grayscale, palette and RGBA images become RGB
        small += min(img.size) < size
        if banner:
            img = img.crop((0, 0, img.width, img.height - banner))  # FGVC-Aircraft's copyright banner
        t = torchvision.transforms.functional.pil_to_tensor(img)  # (3, H, W) uint8
        t = torchvision.transforms.v2.functional.resize(t, size, antialias=True)
        xs.append(torchvision.transforms.v2.functional.center_crop(t, size))
        ys.append(label)
    if small:
        print(f"note: {small} of {len(ys)} images are smaller than {size}px and were upscaled; "
              f"pass a smaller --img-size to keep them at their own resolution")
    if not xs:
        die("the dataset holds no images")
    return torch.stack(xs), torch.tensor(ys)


def load_dataset(name, root, size, download=True, stl10_pretrain="train+unlabeled", seed=0, subset=None,
                 shapes_n=DATASETS["shapes"]["n"]):
    """Returns dict(pretrain, train_x, train_y, test_x, test_y, classes) with uint8 images (N, 3, size, size). The
    labelled train images are the first rows of the pre-training images: train_x is a view of pretrain, one tensor
    in memory. With `subset`, a seeded class-stratified draw of `subset` images from each labelled split (and the
    same fraction of STL10's unlabeled images)."""
    if name == "shapes":
        n_train, n_test = (subset, subset) if subset else shapes_n
        train_x, train_y = make_shapes(n_train, size, seed=seed)
        test_x, test_y = make_shapes(n_test, size, seed=seed + 10_000)  # another seed: unseen images
        return dict(pretrain=train_x, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, classes=10)
    d = read_dataset(name, root, size, download, stl10_pretrain)
    if subset:
        g = torch.Generator().manual_seed(seed)
        n_train = len(d["train_y"])
        for split in ("train", "test"):
            idx = stratified(d[f"{split}_y"], subset, g)
            d[f"{split}_x"], d[f"{split}_y"] = d[f"{split}_x"][idx], d[f"{split}_y"][idx]
        if d["unlabeled"] is not None:  # the same fraction of the unlabeled images
            keep = round(len(d["unlabeled"]) * len(d["train_y"]) / n_train)
            d["unlabeled"] = d["unlabeled"][torch.randperm(len(d["unlabeled"]), generator=g)[:keep].sort().values]
    if d["train_x"].shape[-1] != size:  # e.g. --img-size 64 on CIFAR: resize once here, not in every step
        rs = lambda x: torchvision.transforms.v2.functional.resize(x, [size, size], antialias=True)
        d = {k: rs(v) if k.endswith("_x") or (k == "unlabeled" and v is not None) else v for k, v in d.items()}
    unlabeled = d.pop("unlabeled")
    d["pretrain"] = d["train_x"] if unlabeled is None else torch.cat([d["train_x"], unlabeled])
    d["train_x"] = d["pretrain"][:len(d["train_y"])]
    return d


def stratified(y, n, g):
    """Sorted indices of a random draw of n of the labels y (all of them if n >= len(y)) in which every class keeps
    its share, up to rounding (largest remainders)."""
    if n >= len(y):
        return torch.arange(len(y))
    classes, counts = y.unique(return_counts=True)
    quota = counts * n / len(y)
    take = quota.floor().long()
    take[(quota - take).argsort(descending=True, stable=True)[:n - int(take.sum())]] += 1
    idx = [torch.nonzero(y == c).squeeze(1)[torch.randperm(int(count), generator=g)[:k]]
           for c, count, k in zip(classes, counts, take)]
    return torch.cat(idx).sort().values


def read_dataset(name, root, size, download, stl10_pretrain):
    """One of the paper's datasets (or Fashion-MNIST, or a folder) from disk: dict(train_x, train_y, test_x, test_y,
    classes, unlabeled), uint8 (N, 3, H, W), `unlabeled` None but for STL10's extra pre-training images."""
    D = torchvision.datasets
    if name in ("cifar10", "cifar100"):
        cls = D.CIFAR10 if name == "cifar10" else D.CIFAR100
        tr, te = (open_torchvision(cls, root, name, download, train=t) for t in (True, False))
        to_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()  # (N, 32, 32, 3) -> (N, 3, 32, 32)
        return dict(train_x=to_t(tr.data), train_y=torch.tensor(tr.targets), test_x=to_t(te.data),
                    test_y=torch.tensor(te.targets), classes=len(tr.classes), unlabeled=None)
    if name == "stl10":
        tr, te = (open_torchvision(D.STL10, root, name, download, split=s) for s in ("train", "test"))
        unlabeled = None
        if stl10_pretrain == "train+unlabeled":  # the standard protocol; the paper used train only
            unlabeled = torch.from_numpy(open_torchvision(D.STL10, root, name, download, split="unlabeled").data)
        return dict(train_x=torch.from_numpy(tr.data), train_y=torch.from_numpy(tr.labels).long(),  # (N, 3, 96, 96)
                    test_x=torch.from_numpy(te.data), test_y=torch.from_numpy(te.labels).long(), classes=10,
                    unlabeled=unlabeled)
    if name == "fashion-mnist":
        raw = os.path.join(root, "FashionMNIST", "raw")
        if os.path.isdir(FASHION_MNIST_LOCAL):  # use the Debian package's files when they are there
            os.makedirs(raw, exist_ok=True)
            for f in os.listdir(FASHION_MNIST_LOCAL):
                dst = os.path.join(raw, f.removesuffix(".gz"))
                if f.endswith(".gz") and not os.path.exists(dst):
                    with gzip.open(os.path.join(FASHION_MNIST_LOCAL, f)) as src:
                        write_atomic(dst, lambda out: shutil.copyfileobj(src, out))
        tr, te = (open_torchvision(D.FashionMNIST, root, name, download, train=t) for t in (True, False))
        gray3 = lambda a: a.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()  # (N, 28, 28) -> (N, 3, 28, 28)
        return dict(train_x=gray3(tr.data), train_y=tr.targets, test_x=gray3(te.data), test_y=te.targets,
                    classes=10, unlabeled=None)
    if name not in ("imagenette", "fgvc-aircraft", "folder"):
        die(f"unknown dataset '{name}'; choose one of: {', '.join(DATASETS)}")
    # JPEGs take minutes to decode: once, into a cache that later runs (and the other torchrun processes) read
    key = f"{name}-{size}px" if name != "folder" else f"folder-{size}px-{folder_key(root)}"
    cache = os.path.join(root, key + ".pt")
    d = read_cache(cache)
    if d is not None:
        return d
    if name == "imagenette":
        tr, te = (open_torchvision(D.Imagenette, root, name, download, split=s, size="160px")
                  for s in ("train", "val"))
    elif name == "fgvc-aircraft":
        tr, te = (open_torchvision(D.FGVCAircraft, root, name, download, split=s,
                                   annotation_level="manufacturer") for s in ("trainval", "test"))
    else:
        tr, te = load_folder(root)
    banner = 20 if name == "fgvc-aircraft" else 0
    (train_x, train_y), (test_x, test_y) = pil_to_uint8(tr, size, banner), pil_to_uint8(te, size, banner)
    d = dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, classes=len(tr.classes), unlabeled=None)
    try:
        save_atomic(d, cache)
    except OSError as e:  # a read-only data directory
        print(f"note: could not cache the decoded images at {cache} ({e}); the next run decodes them again")
    return d


def folder_key(root):
    """What a folder's cache is keyed by: its path, number of files and newest modification time, so that adding,
    removing or changing an image makes a new cache."""
    n, newest = 0, 0.0
    for split in ("train", "test"):
        for dirpath, _, files in os.walk(os.path.join(root, split)):
            for f in files:
                n, newest = n + 1, max(newest, os.stat(os.path.join(dirpath, f)).st_mtime)
    return hashlib.sha1(f"{os.path.abspath(root)}|{n}|{newest}".encode()).hexdigest()[:12]


def read_cache(path):
    """The decoded images cached at `path`, or None when there are none or they cannot be read (a file cut short, or
    written by another version of this file): then they are decoded again."""
    if not os.path.exists(path):
        return None
    try:
        d = torch.load(path)
        if {"train_x", "train_y", "test_x", "test_y", "classes", "unlabeled"} <= set(d):
            return d
        why = "written by another version of simclr.py"
    except Exception as e:  # EOFError, RuntimeError, UnpicklingError...
        why = f"{type(e).__name__}: {str(e)[:100]}"
    print(f"note: the cache {path} cannot be read ({why}); decoding the images again")
    return None


def load_folder(root):
    """`--dataset folder`: root/train/<class>/* and root/test/<class>/*, read with torchvision's ImageFolder."""
    for split in ("train", "test"):
        if not os.path.isdir(os.path.join(root, split)):
            die(f"--dataset folder needs {os.path.join(root, split)}/<class>/<images>; "
                f"set --data-dir to the folder that holds train/ and test/")
    for split in ("train", "test"):
        if not any(e.is_dir() for e in os.scandir(os.path.join(root, split))):
            die(f"--dataset folder: {os.path.join(root, split)} holds no class folders; "
                f"expected {os.path.join(root, split)}/<class>/<images>")
    try:
        tr, te = (torchvision.datasets.ImageFolder(os.path.join(root, s)) for s in ("train", "test"))
    except (FileNotFoundError, RuntimeError) as e:
        die(f"--dataset folder: {e}")
    if len(tr.classes) < 2:
        die(f"--dataset folder: {root}/train has {len(tr.classes)} class folder(s); a classifier needs at least 2")
    if tr.classes != te.classes:
        die(f"--dataset folder: train/ classes {tr.classes} differ from test/ classes {te.classes}")
    return tr, te


# ----------------------------------------------------------------------------------------------------------
# Augmentations, in batches on the device (Sec. 3 and Appendix A of SimCLR), each image with its own parameters.
# Every op below matches torchvision.transforms.v2.functional on the same parameters (test_simclr.py checks).
# ----------------------------------------------------------------------------------------------------------

def crop_params(N, H, W, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), device="cpu"):
    """RandomResizedCrop.make_params for N images at once: 10 tries of (area, log-ratio), first valid one wins,
    else the centre-crop fallback. Returns top, left, height, width, each (N,) long."""
    area = H * W * torch.empty(N, 10, device=device).uniform_(*scale)
    aspect = torch.exp(torch.empty(N, 10, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    w, h = torch.sqrt(area * aspect).round().long(), torch.sqrt(area / aspect).round().long()  # (N, 10)
    ok = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = ok.int().argmax(1, keepdim=True)  # (N, 1): first valid try (0 when none is)
    w, h, found = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1), ok.any(1)  # (N,) each
    in_ratio = W / H  # fallback, as torchvision: the largest centred crop whose ratio is inside `ratio`
    fw = W if in_ratio <= max(ratio) else int(round(H * max(ratio)))
    fh = H if in_ratio >= min(ratio) else int(round(W / min(ratio)))
    w, h = torch.where(found, w, fw), torch.where(found, h, fh)
    top = (torch.rand(N, device=device) * (H - h + 1)).long()
    left = (torch.rand(N, device=device) * (W - w + 1)).long()
    top, left = torch.where(found, top, (H - h) // 2), torch.where(found, left, (W - w) // 2)
    return top, left, h, w


def resized_crop(x, top, left, h, w, size, flip):
    """Crop each image to its box, resize to size x size (bilinear) and mirror where `flip`: one grid_sample.
    Output pixel k reads input coordinate left + (k + 0.5) * w / size - 0.5, clamped to the box, which is
    exactly what F.interpolate(bilinear, align_corners=False) does on the cropped image."""
    N, _, H, W = x.shape
    k = torch.arange(size, device=x.device) + 0.5
    def coords(start, length, full):  # (N, size) normalised grid coordinates along one axis
        c = start[:, None] + k * (length[:, None] / size) - 0.5
        c = torch.minimum(torch.maximum(c, start[:, None].float()), (start + length - 1)[:, None].float())
        return (2 * c + 1) / full - 1  # pixel -> [-1, 1], align_corners=False
    gx, gy = coords(left, w, W), coords(top, h, H)
    gx = torch.where(flip[:, None], gx.flip(1), gx)
    # (N, S, S, 2): the (x, y) input coordinate of every output pixel
    grid = torch.stack([gx[:, None, :].expand(N, size, size), gy[:, :, None].expand(N, size, size)], -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)  # (N, 3, S, S)


def gray(x):
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # (N, 1, H, W), ITU-R 601 luma


def blend(x, f, target):
    """f x + (1 - f) target, clipped to [0, 1]; f is per image, (N,) or (N, 1, 1, 1)."""
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * target).clamp(0, 1)


def adjust_hue(x, f):
    """Rotate the hue by f turns (|f| <= 0.5): RGB -> HSV, shift H, HSV -> RGB. HSV keeps max = V and
    max - min = V S, so only H needs computing and each channel comes back in closed form."""
    r, g, b = x.unbind(1)
    v, delta = x.amax(1), x.amax(1) - x.amin(1)  # (N, H, W)
    dd = torch.where(delta == 0, 1, delta)
    h = torch.where(v == r, (g - b) / dd, torch.where(v == g, 2 + (b - r) / dd, 4 + (r - g) / dd))  # in sixths
    h = torch.remainder(h + 6 * f.view(-1, 1, 1), 6).unsqueeze(1)  # (N, 1, H, W)
    n = 5 - 2 * torch.arange(3, device=x.device).view(1, 3, 1, 1)  # 5, 3, 1 for R, G, B (made on the device)
    k = torch.remainder(n + h, 6)
    return v.unsqueeze(1) - delta.unsqueeze(1) * torch.minimum(k, 4 - k).clamp(0, 1)  # (N, 3, H, W)


def color_jitter(x, factors, order):
    """ColorJitter with per-image factors (N, 4) = brightness, contrast, saturation, hue, applied in a
    per-image random order (N, 4) (a permutation of 0..3), as torchvision's ColorJitter does per image.
    The hue rotation costs several times a blend, and every image applies it exactly once: so it runs once, on
    the whole batch, between the blends each image applies before its hue and those it applies after
    (a blend with f = 1 leaves an image exactly as it is). Six cheap blends and one hue instead of four of each."""
    hue_at = (order == 3).int().argmax(1)  # (N,) the step at which each image rotates its hue

    def blends(x, steps, active):
        for step in steps:
            op = order[:, step].view(-1, 1, 1, 1)  # which op each image applies at this step
            f = torch.where(active(step), factors.gather(1, order[:, step:step + 1]).squeeze(1), 1.0)  # (N,)
            g = gray(x)  # blend towards black (brightness), the mean grey level (contrast), the grey image (saturation)
            x = blend(x, f, torch.where(op == 0, 0, torch.where(op == 1, g.mean((1, 2, 3), keepdim=True), g)))
        return x

    x = blends(x, range(3), lambda step: step < hue_at)  # brightness / contrast / saturation before the hue
    x = adjust_hue(x, factors[:, 3])
    return blends(x, range(1, 4), lambda step: step > hue_at)  # and after it


def gaussian_blur(x, sigma, kernel_size):
    """Per-image sigma (N,), separable Gaussian with reflect padding, as torchvision's gaussian_blur."""
    N, C, H, W = x.shape
    i = torch.arange(kernel_size, device=x.device) - kernel_size // 2
    k = torch.exp(-0.5 * (i / sigma[:, None]) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (N*C, K), one kernel per channel
    pad = kernel_size // 2
    y = x.reshape(1, N * C, H, W)  # images as channels, so one grouped conv blurs them all
    y = F.pad(y, (pad, pad, pad, pad), mode="reflect")  # (1, N*C, H+2p, W+2p)
    y = F.conv2d(y, k.view(N * C, 1, 1, -1), groups=N * C)  # along x
    y = F.conv2d(y, k.view(N * C, 1, -1, 1), groups=N * C)  # along y
    return y.view(N, C, H, W)  # (1, N*C, H, W) -> (N, C, H, W)


def blur_kernel(size):
    return int(0.1 * size) // 2 * 2 + 1  # odd, ~10% of the image side (Appendix A of SimCLR)


def augment(x, crop_min=0.08, jitter_prob=0.8, gray_prob=0.2, blur_prob=0.5):
    """The SimCLR view: x (N, 3, H, W) floats in [0, 1] -> a random view of each image, same shape.
    RandomResizedCrop -> flip -> ColorJitter(0.8, 0.8, 0.8, 0.2) w.p. 0.8 -> grayscale w.p. 0.2
    -> GaussianBlur(kernel ~10% of the side, sigma in [0.1, 2]) w.p. 0.5 (Appendix A of SimCLR)."""
    N, _, H, W = x.shape
    dev = x.device
    coin = lambda p: (torch.rand(N, device=dev) < p).view(-1, 1, 1, 1)
    top, left, h, w = crop_params(N, H, W, scale=(crop_min, 1.0), device=dev)
    x = resized_crop(x, top, left, h, w, H, flip=torch.rand(N, device=dev) < 0.5)
    u = torch.rand(N, 4, device=dev)  # brightness, contrast, saturation in [1-0.8, 1+0.8], hue in [-0.2, 0.2]
    factors = torch.cat([0.2 + 1.6 * u[:, :3], -0.2 + 0.4 * u[:, 3:]], 1)  # (N, 4)
    order = torch.rand(N, 4, device=dev).argsort(1)  # a random permutation per image
    x = torch.where(coin(jitter_prob), color_jitter(x, factors, order), x)
    x = torch.where(coin(gray_prob), gray(x).expand_as(x), x)
    kernel = blur_kernel(H)
    if kernel >= 3:
        sigma = 0.1 + 1.9 * torch.rand(N, device=dev)
        x = torch.where(coin(blur_prob), gaussian_blur(x, sigma, kernel), x)
    return x


def flip_and_crop(x, pad):
    """The standard supervised augmentation (the CIFAR recipe of He et al. 2016, arXiv:1512.03385 Sec. 4.2: pad 4
    px of 32, a random crop of the original size, a horizontal flip w.p. 0.5), for the supervised baseline. In a
    batch on the device through resized_crop at scale 1: x (N, 3, H, H) floats -> same shape. The padding reflects
    the border where He et al. add zeros: no black frame for the network to learn."""
    N, _, H, _ = x.shape
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")  # (N, 3, H + 2 pad, H + 2 pad)
    top, left = torch.randint(0, 2 * pad + 1, (2, N), device=x.device)
    side = torch.full((N,), H, device=x.device)
    return resized_crop(x, top, left, side, side, H, flip=torch.rand(N, device=x.device) < 0.5)  # (N, 3, H, H)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_STATS = {}  # per device: copying constants from the host in every step would make the CPU wait for the GPU


def normalize(x):
    """uint8 or [0, 1] images -> the standardised input the ResNet expects."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x
    if x.device not in _STATS:
        _STATS[x.device] = (torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1),
                            torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1))
    mean, std = _STATS[x.device]
    return (x - mean) / std


def where_data_fits(nbytes, device, data_on="auto"):
    """'device' or 'host': where the uint8 images live while training. auto: on the device when they take at most
    half of its free memory (the rest is for the model's activations), else in host memory."""
    if data_on == "auto":
        data_on = "host" if device.type == "cuda" and nbytes > torch.cuda.mem_get_info(device)[0] / 2 else "device"
    return data_on


def to_device(x, device):
    """A batch of uint8 images onto the training device. Images too big for the GPU stay in host memory (--data-on
    host): each batch is gathered there, pinned and copied without making the CPU wait (non_blocking)."""
    if x.device == device:
        return x
    return (x.pin_memory() if device.type == "cuda" else x).to(device, non_blocking=True)


# ----------------------------------------------------------------------------------------------------------
# Model: ResNet backbone f, autoencoder, projection head g (z = g(h), h = f(x))
# ----------------------------------------------------------------------------------------------------------

def make_backbone(arch, stem, pretrained=False):
    """torchvision ResNet with fc removed: x (N, 3, H, W) -> h (N, 512 or 2048). With `pretrained` and the ImageNet
    stem every layer holds ImageNet weights; with the CIFAR stem, conv1 is a new random 3x3 conv."""
    weights = "DEFAULT" if pretrained else None
    try:
        net = getattr(torchvision.models, arch)(weights=weights)
    except Exception as e:
        die(f"could not get torchvision's ImageNet weights for {arch} ({e}); run without --pretrained (implied by "
            f"--recipe paper) or put the weights file in {torch.hub.get_dir()}/checkpoints/")
    if stem == "cifar":  # small images: 3x3 stride-1 conv, no maxpool (as in SimCLR's CIFAR experiments)
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


class AutoEncoder(nn.Module):
    """The paper's 4-layer MLP autoencoder (pythae Encoder_AE_MLP / Decoder_AE_MLP):
    3HW -> 512 (ReLU) -> d [embedding] -> 512 (ReLU) -> 3HW (Sigmoid)."""

    def __init__(self, in_dim, d):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(in_dim, 512), nn.ReLU())
        self.embedding = nn.Linear(512, d)  # <- transplanted into the projection head
        self.decoder = nn.Sequential(nn.Linear(d, 512), nn.ReLU(), nn.Linear(512, in_dim), nn.Sigmoid())

    def forward(self, x):  # x (N, 3HW) in [0, 1]
        return self.decoder(self.embedding(self.encoder(x)))


def projection_head(feat_dim, hidden, out, act, embedding=None, freeze=True):
    """g(h) = W2 act(W1 h): Linear(feat_dim, hidden) -> act -> Linear(hidden, out). With `embedding` (the
    autoencoder's 512 -> d layer) W1 is a copy of it, frozen unless freeze=False (Sec. 3 of the paper), and the
    hidden width is its d (`hidden` is not used)."""
    if embedding is None:
        first = nn.Linear(feat_dim, hidden)
    else:
        if embedding.in_features != feat_dim:
            raise ValueError(f"the AE embedding takes {embedding.in_features} inputs but the backbone gives "
                             f"{feat_dim} features; use a 512-d backbone (resnet18/34)")
        first = copy.deepcopy(embedding)
        first.requires_grad_(not freeze)
    return nn.Sequential(first, ACTIVATIONS[act](), nn.Linear(first.out_features, out))


class SimCLR(nn.Module):
    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):
        return self.head(self.backbone(x))  # z = g(f(x))


def sync_batchnorm(model, device):
    """Global BatchNorm under torchrun (Sec. 2.3 of SimCLR): every BatchNorm normalises with the mean and variance of
    the global batch. With per-process statistics the two views of an image (always on the same process) share
    statistics that their negatives from other processes do not, a cue the loss can use, and results would depend
    on the number of GPUs. torch's SyncBatchNorm runs on GPUs only; on CPUs (gloo) SyncBatchNormCPU does the same."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = SyncBatchNormCPU  # the same parameters and buffers, another forward
    return model


class SyncBatchNormCPU(nn.BatchNorm2d):
    """BatchNorm2d over the global batch for CPU processes: the per-channel mean and variance from one all_reduce
    of sums, with gradient (the backward of an all_reduce sums the gradients of every process)."""

    def forward(self, x):  # x (n, C, H, W), this process's part of the global batch
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)  # eval mode: the running statistics
        C = x.shape[1]
        xf = x.float()
        count = torch.full((1,), xf.numel() / C, dtype=torch.float32)  # values per channel here
        with warnings.catch_warnings():  # (its FutureWarning points to a private module, as in nt_xent)
            warnings.simplefilter("ignore", FutureWarning)
            sums = dist_nn.all_reduce(torch.cat([xf.sum((0, 2, 3)), xf.square().sum((0, 2, 3)), count]))  # (2C+1,)
        n = sums[-1]
        mean = sums[:C] / n
        var = sums[C:2 * C] / n - mean.square()  # biased: what the batch is normalised with
        with torch.no_grad():  # running statistics as BatchNorm keeps them (unbiased variance)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
            self.num_batches_tracked += 1
        y = (xf - mean.view(1, C, 1, 1)) * torch.rsqrt(var + self.eps).view(1, C, 1, 1)
        return (y * self.weight.view(1, C, 1, 1) + self.bias.view(1, C, 1, 1)).to(x.dtype)


AE_SAVE_EVERY_S = 300  # between checkpoints of the autoencoder stage


def train_autoencoder(images, d, epochs, device, batch=100, lr=1e-4, ckpt=None, log=print):
    """The paper's AE recipe: MSE on flattened pixels in [0, 1], Adam 1e-4, ReduceLROnPlateau(patience 10,
    factor 0.5) on the validation loss of a 90/10 split (seed 42), batch 100, best-validation weights.
    With `ckpt` (a path) the stage continues from there when restarted, and saves itself after its last
    epoch and every AE_SAVE_EVERY_S seconds (the checkpoint holds the weights, Adam's state and the best weights:
    up to ~0.8 GB at 128 px, too much to write every epoch)."""
    N, device = len(images), torch.device(device)
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(42)).to(images.device)
    n_val = max(1, N // 10)
    val, train = perm[:n_val], perm[n_val:]
    flat = lambda idx: to_device(images[idx], device).float().flatten(1).div(255)  # (B, 3HW), one batch at a time
    ae = AutoEncoder(images[0].numel(), d).to(device)
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=10, factor=0.5)
    best, best_state, start = float("inf"), copy.deepcopy(ae.state_dict()), 0
    if ckpt and os.path.exists(ckpt):
        try:
            c = torch.load(ckpt, map_location="cpu", weights_only=False)  # RNG states must stay on the CPU
            ae.load_state_dict(c["ae"]), opt.load_state_dict(c["opt"]), sched.load_state_dict(c["sched"])
            best, start, train = c["best"], c["epoch"], c["order"].to(images.device)
            best_state = c["best_state"] if c["best_state"] is not None else copy.deepcopy(c["ae"])
            set_rng_state(c["rng"])
        except Exception as e:
            die(f"cannot resume the autoencoder from {ckpt}: the file is corrupt or from another model "
                f"({type(e).__name__}). Delete it to retrain the autoencoder.")
        log(f"autoencoder: resumed {ckpt} at epoch {start}")
    last_save = time.time()
    for epoch in range(start, epochs):
        ae.train()
        for i in range(0, len(train), batch):
            x = flat(train[i:i + batch])
            loss = F.mse_loss(ae(x), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        ae.eval()
        with torch.no_grad():
            val_loss = sum(F.mse_loss(ae(flat(val[i:i + 1000])), flat(val[i:i + 1000]), reduction="sum").item()
                           for i in range(0, n_val, 1000)) / (n_val * images[0].numel())
        sched.step(val_loss)
        improved = val_loss < best
        if improved:
            best, best_state = val_loss, copy.deepcopy(ae.state_dict())
        if epoch % 10 == 0 or epoch == epochs - 1:
            log(f"autoencoder epoch {epoch + 1}/{epochs}: val MSE {val_loss:.5f} (best {best:.5f})")
        train = train[torch.randperm(len(train), device=train.device)]  # reshuffle for the next epoch
        if ckpt and (epoch == epochs - 1 or time.time() - last_save > AE_SAVE_EVERY_S):
            save_atomic(dict(ae=ae.state_dict(), opt=opt.state_dict(), sched=sched.state_dict(), best=best,
                             best_state=None if improved else best_state,  # None: the weights saved as "ae"
                             epoch=epoch + 1, order=train, rng=rng_state()), ckpt)
            last_save = time.time()
    ae.load_state_dict(best_state)
    return ae, best


# ----------------------------------------------------------------------------------------------------------
# NT-Xent loss, Eq. (1) of SimCLR
# ----------------------------------------------------------------------------------------------------------

def nt_xent(z1, z2, tau, rank=0, world=1):
    """Mean over all 2N anchors of -log( exp(sim(z_i, z_j)/tau) / sum_{k != i} exp(sim(z_i, z_k)/tau) ),
    where (i, j) are the two views of one image and sim is the cosine similarity. z1, z2: (N, D).

    Under torchrun (world > 1) z1, z2 are this rank's N/world rows: all ranks' rows are gathered *with
    gradient*, so the negatives are the global 2N views as in SimCLR, and the rank returns its own anchors' share
    of the global mean (the shares sum to the global loss; the gradient of each embedding is the global one)."""
    n = z1.shape[0]
    if world > 1:  # (its FutureWarning points to a private module; this public one is the documented autograd gather)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            z1, z2 = torch.cat(dist_nn.all_gather(z1)), torch.cat(dist_nn.all_gather(z2))  # (N, D) each
    N = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2N, D), fp32 even under autocast
    mine = torch.arange(rank * n, (rank + 1) * n, device=z.device)
    anchors = torch.cat([mine, mine + N])  # this rank's rows of z: (2n,)
    logits = z[anchors] @ z.T / tau  # (2n, 2N)
    self_mask = anchors[:, None] == torch.arange(2 * N, device=z.device)  # (2n, 2N); k != i: not its own negative
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = (anchors + N) % (2 * N)  # (2n,): view i <-> view i + N
    return F.cross_entropy(logits, positives, reduction="sum") / (2 * N)


# ----------------------------------------------------------------------------------------------------------
# Evaluation: frozen backbone in eval mode, un-augmented images
# ----------------------------------------------------------------------------------------------------------

RAW_PIXELS_MAX = 32  # the raw-pixel baseline's side: N x 3HW floats at 128 px would take 1.9 GB for Imagenette


def pixel_features(images, device, side=RAW_PIXELS_MAX, batch=1024):
    """The raw-pixel baseline's features: uint8 images (N, 3, H, W) -> values in [0, 1], area-averaged down to
    side x side when larger, flattened: (N, 3 min(H, side)^2) on `device`."""
    feats = []
    for i in range(0, len(images), batch):
        x = to_device(images[i:i + batch], device).float() / 255
        feats.append((F.adaptive_avg_pool2d(x, side) if x.shape[-1] > side else x).flatten(1))
    return torch.cat(feats)


@torch.no_grad()
def extract_features(backbone, images, batch=512):
    """h = f(x) for uint8 images (N, 3, H, W) -> (N, D), in fp32 (not under the training's bf16 autocast: the
    probe sees exact features), BatchNorm in eval mode."""
    was_training = backbone.training
    backbone.eval()
    feats = []
    device = next(backbone.parameters()).device
    for i in range(0, len(images), batch):
        feats.append(backbone(normalize(to_device(images[i:i + batch], device))).float())
    backbone.train(was_training)
    return torch.cat(feats)


def linear_probe(train_h, train_y, test_h, test_y, classes, steps=200, wd=1e-4):
    """Multinomial logistic regression on standardised features, full-batch L-BFGS from zero (deterministic);
    returns top-1 accuracy on the test features."""
    mean, std = train_h.mean(0), train_h.std(0) + 1e-6
    Xtr, Xte = (train_h - mean) / std, (test_h - mean) / std
    clf = nn.Linear(Xtr.shape[1], classes).to(Xtr.device)
    nn.init.zeros_(clf.weight), nn.init.zeros_(clf.bias)
    opt = torch.optim.LBFGS(clf.parameters(), lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(clf(Xtr), train_y) + wd * clf.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return (clf(Xte).argmax(1) == test_y).float().mean().item()


@torch.no_grad()
def nearest(query_h, pool_h, k):
    """The k rows of pool_h most cosine-similar to each row of query_h, most similar first: (similarities,
    indices), each (Q, k)."""
    return (F.normalize(query_h, dim=1) @ F.normalize(pool_h, dim=1).T).topk(min(k, len(pool_h)), dim=1)


@torch.no_grad()
def knn_top1(train_h, train_y, test_h, test_y, classes, k=200, T=0.1):
    """Weighted kNN monitor (Wu et al. 2018): cosine similarity, the k nearest train features vote with
    weight exp(sim / T)."""
    correct = 0
    for i in range(0, len(test_h), 1024):
        sim, idx = nearest(test_h[i:i + 1024], train_h, k)  # (b, k)
        votes = torch.zeros(len(sim), classes, device=sim.device)
        votes.scatter_add_(1, train_y[idx], (sim / T).exp())  # (b, classes)
        correct += (votes.argmax(1) == test_y[i:i + 1024]).sum().item()
    return correct / len(test_h)


def paper_probe(train_h, train_y, val_h, val_y, test_h, test_y, classes, epochs=50, batch=32, lr=1e-3, seed=42):
    """The paper's linear probe (Sec. 4 of 2408.14514, as its code does it): each split z-scored with its own
    statistics; a linear layer (torch's default init) trained by plain SGD (lr 1e-3, no momentum, no weight decay),
    batch 32, 50 epochs, ReduceLROnPlateau(factor 0.1, patience 10) on the epoch's training loss; the epoch with the
    lowest validation loss is tested. Returns top-1 accuracy on the test features."""
    zscore = lambda h: (h - h.mean(0)) / (h.std(0) + 1e-6)
    train_h, val_h, test_h = zscore(train_h), zscore(val_h), zscore(test_h)
    g = torch.Generator().manual_seed(seed)
    clf = nn.Linear(train_h.shape[1], classes)
    bound = 1 / math.sqrt(train_h.shape[1])  # nn.Linear's default init, drawn from our own generator
    with torch.no_grad():
        clf.weight.uniform_(-bound, bound, generator=g), clf.bias.uniform_(-bound, bound, generator=g)
    clf = clf.to(train_h.device)
    opt = torch.optim.SGD(clf.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=10)
    best, best_state = float("inf"), None
    for epoch in range(epochs):
        order, loss_sum = torch.randperm(len(train_h), generator=g).to(train_h.device), 0
        with torch.enable_grad():
            for i in range(0, len(order), batch):
                idx = order[i:i + batch]
                loss = F.cross_entropy(clf(train_h[idx]), train_y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum = loss_sum + loss.detach() * len(idx)  # a device tensor: no sync per step
        sched.step(loss_sum.item() / len(order))
        with torch.no_grad():
            val_loss = F.cross_entropy(clf(val_h), val_y).item()
        if val_loss < best:
            best, best_state = val_loss, copy.deepcopy(clf.state_dict())
    clf.load_state_dict(best_state)
    with torch.no_grad():
        return (clf(test_h).argmax(1) == test_y).float().mean().item()


def evaluate(train_h, train_y, test_h, test_y, classes, protocol="standard", probe_steps=200, knn_k=200,
             batch=None):
    """Linear and kNN top-1 (fractions). 'standard': trained on the train split's features, measured on the test
    split's. 'paper' (Sec. 4 of the paper): the test features of the first test images that fill whole batches of
    `batch` (the paper extracts them with drop_last), split 70/10/20 with seed 42; the paper's probe trains on the
    70%, selects its epoch on the 10% and is measured on the 20% (the kNN: neighbours from the 70%, measured on the
    20%)."""
    if protocol == "standard":
        return dict(linear_top1=linear_probe(train_h, train_y, test_h, test_y, classes, probe_steps),
                    knn_top1=knn_top1(train_h, train_y, test_h, test_y, classes, knn_k))
    n = len(test_h) // batch * batch if batch and len(test_h) >= batch else len(test_h)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(42)).to(test_h.device)
    a, b = int(0.7 * n), int(0.8 * n)
    (tr_h, tr_y), (va_h, va_y), (te_h, te_y) = ((test_h[i], test_y[i]) for i in (perm[:a], perm[a:b], perm[b:]))
    return dict(linear_top1=paper_probe(tr_h, tr_y, va_h, va_y, te_h, te_y, classes),
                knn_top1=knn_top1(tr_h, tr_y, te_h, te_y, classes, knn_k))


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------

def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


def two_views(x, aug, channels_last=False):
    """uint8 images (b, 3, H, W) on the device -> (2b, 3, H, W): two augmented views of each, standardised.
    Rows i and i + b are the positive pair of NT-Xent."""
    x = x.float() / 255
    with torch.no_grad():
        views = normalize(torch.cat([augment(x, **aug), augment(x, **aug)]))  # (2b, 3, H, W)
    return views.contiguous(memory_format=torch.channels_last) if channels_last else views


def param_groups(model, wd, decay_norm_and_bias=False):
    """The optimizer's parameter groups: weight decay on the convolution and linear weights only, not on BatchNorm's
    scale and shift nor on any bias (SimCLR's official code; solo-learn leaves out every 1-D parameter alike), unless
    decay_norm_and_bias (the paper decays everything). Frozen parameters (a frozen AE embedding) are in no group."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_norm_and_bias:
        return [dict(params=params, weight_decay=wd)]
    return [dict(params=[p for p in params if p.ndim > 1], weight_decay=wd),  # conv (4-D) and linear (2-D) weights
            dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0)]  # BatchNorm weights, biases


def lr_at(step, total, warmup, peak, final):
    """The learning rate of step `step` (from 0) of `total`: a linear warm-up to `peak` over the first `warmup` steps,
    then a cosine decay (without restarts) from `peak` to `final` at step `total` (Sec. B.1 of SimCLR)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)  # 0 -> 1 over the steps after the warm-up
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * progress))


def sgd_step(model, views, opt, tau, amp=nullcontext, rank=0, world=1):
    """One SimCLR update on 2b views: z = g(f(views)), NT-Xent, backward, SGD step.
    Returns the loss as a device tensor: reading it (.item()) would make the CPU wait for the GPU."""
    b = len(views) // 2
    with amp():
        z = model(views)  # (2b, out)
    loss = nt_xent(z[:b], z[b:], tau, rank, world)  # this rank's share of the global loss
    opt.zero_grad(set_to_none=True)
    (loss * world).backward()  # DDP averages over ranks; the shares sum: gradient of the global loss
    opt.step()
    return loss.detach()


def try_compile(fn, example, name, model=None, amp=nullcontext, log=print):
    """torch.compile(fn), compiled now by one call on `example` (forward and backward when it returns a tensor
    that needs a gradient); if compiling fails (no Triton, an op Inductor cannot handle...) say so and return fn.
    The trial call leaves no trace: the RNG streams are forked and `model`'s weights, BatchNorm statistics and
    gradients are put back."""
    log(f"torch.compile: compiling {name} (once; this can take a minute or two)")
    compiled = torch.compile(fn)
    saved = {k: v.clone() for k, v in model.state_dict().items()} if model is not None else None
    try:
        with torch.random.fork_rng(devices=[example.device] if example.device.type == "cuda" else []):
            for f in (fn, compiled):  # eager first: a first call fills caches (normalize's constants) that would
                with amp():           # otherwise change under the compiled call and make it compile twice
                    out = f(example)
                if out.requires_grad:
                    out.float().square().mean().backward()
    except Exception as e:  # compile errors surface at the first call, as many different exception types
        log(f"warning: torch.compile failed ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); "
            f"running without it")
        compiled = fn
    if model is not None:
        model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)
    return compiled


def step_functions(step_fn, model, example, args, amp, log=print):
    """What one SimCLR step calls: make_views (uint8 (b, 3, H, W) -> standardised views (2b, 3, H, W)) and the
    model call step_fn, both torch.compile'd when args.compile (each falls back to eager on its own). Also returns
    which of the two really were compiled."""
    channels_last = example.device.type == "cuda"  # what cuDNN's convolutions prefer, with bf16
    aug = dict(crop_min=args.crop_min, jitter_prob=args.jitter_prob, gray_prob=args.gray_prob,
               blur_prob=args.blur_prob)
    eager_views = lambda x: two_views(x, aug, channels_last)
    make_views, compiled_fn = eager_views, step_fn
    if args.compile:  # fuses the augmentation's many elementwise passes into a few kernels, and the model's
        # (under torchrun each rank compiles; should it fail on some ranks only, they would run different code)
        make_views = try_compile(eager_views, example, "the augmentation", log=log)
        views = torch.zeros(2 * len(example), *example.shape[1:], device=example.device)  # (2b, 3, H, W)
        compiled_fn = try_compile(step_fn, views.contiguous(memory_format=torch.channels_last) if channels_last
                                  else views, "the model", model=model, amp=amp, log=log)
    return make_views, compiled_fn, dict(augmentation=make_views is not eager_views, model=compiled_fn is not step_fn)


PROGRESS_EVERY_S = 60  # between progress lines inside an epoch


def train(model, images, args, out, evaluate_knn=None, start_epoch=0, opt_state=None, rank=0, world=1, log=print):
    """SimCLR pre-training: SGD with momentum; the learning rate set before every step by lr_at (warm-up, then
    cosine to lr/50). Under torchrun each rank augments its own B/world images of every global batch of B."""
    device = next(model.parameters()).device  # the images may live in host memory (--data-on host)
    amp = autocast_for(device, args.precision)
    N, B, b = len(images), args.batch_size, args.batch_size // world
    steps_per_epoch = N // B if not args.dry_run else min(2, N // B)
    opt = torch.optim.SGD(param_groups(model, args.wd, args.decay_norm_and_bias), lr=args.lr,
                          momentum=args.momentum, **({"fused": True} if device.type == "cuda" else {}))
    if opt_state:
        opt.load_state_dict(opt_state)
    total_steps, warmup_steps = args.epochs * steps_per_epoch, round(args.warmup_epochs * steps_per_epoch)
    lr = lambda step: lr_at(step, total_steps, warmup_steps, args.lr, args.lr * args.lr_min_ratio)
    step_fn = model
    if world > 1:  # gradients are averaged over ranks by DistributedDataParallel
        step_fn = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.index is not None
                                                      else None)
    make_views, step_fn, _ = step_functions(step_fn, model, to_device(images[:b], device), args, amp, log)
    t_start = time.time()
    for epoch in range(start_epoch, args.epochs):
        model.train()
        t0, t_shown, loss_sum = time.time(), time.time(), torch.zeros((), device=device)
        first_bad = torch.full((), -1, device=device)  # first step with a non-finite loss, found without a sync
        # the same order on every rank (a function of seed and epoch alone); each rank takes its slice of a batch
        perm = torch.randperm(N, generator=torch.Generator().manual_seed(args.seed * 100_003 + epoch))
        perm = perm.to(images.device)  # the indices go where the images are
        for step in range(steps_per_epoch):
            x = to_device(images[perm[step * B + rank * b:step * B + (rank + 1) * b]], device)  # (b, 3, H, W) uint8
            for group in opt.param_groups:
                group["lr"] = lr(epoch * steps_per_epoch + step)
            loss = sgd_step(step_fn, make_views(x), opt, args.tau, amp, rank, world)
            loss_sum += loss  # no host sync inside the epoch
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), step, first_bad)
            if time.time() - t_shown > PROGRESS_EVERY_S:  # a long epoch (a CPU, a big dataset) still shows life
                step_s = (time.time() - t0) / (step + 1)  # the loss is read once per epoch: no sync here
                steps_left = steps_per_epoch - step - 1 + (args.epochs - epoch - 1) * steps_per_epoch
                log(f"  epoch {epoch + 1}: step {step + 1}/{steps_per_epoch} | {B / step_s:.0f} img/s | "
                    f"eta {fmt_time(step_s * steps_left)}")
                t_shown = time.time()
        if world > 1:
            dist.all_reduce(loss_sum)  # shares -> global loss
        loss = loss_sum.item() / steps_per_epoch
        if not math.isfinite(loss):
            bad = epoch * steps_per_epoch + int(first_bad) + 1
            die(f"loss became {loss} at step {bad} (epoch {epoch + 1}, lr {lr(bad - 1):.4g}); try a "
                f"smaller --lr or a larger --tau. The last good checkpoint, if any, is {out}/checkpoint.pt.")
        dt = time.time() - t0
        m = dict(epoch=epoch + 1, loss=loss, lr=opt.param_groups[0]["lr"], img_per_s=steps_per_epoch * B / dt,
                 epoch_s=dt)
        if evaluate_knn and args.knn_every and (epoch + 1) % args.knn_every == 0 and rank == 0:
            m["knn_top1"] = evaluate_knn(model.backbone)
        eta = (time.time() - t_start) / (epoch + 1 - start_epoch) * (args.epochs - epoch - 1)
        knn = f" | knn {100 * m['knn_top1']:.1f}%" if "knn_top1" in m else ""
        log(f"epoch {epoch + 1}/{args.epochs} | loss {loss:.4f} | lr {m['lr']:.4f} | "
            f"{m['img_per_s']:.0f} img/s{knn} | eta {fmt_time(eta)}")
        rngs = [rng_state()]  # every rank's RNG, so that each rank resumes its own augmentation stream
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state())
        if rank != 0:
            continue  # only rank 0 writes files
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(m) + "\n")
        save_atomic(dict(model=model.state_dict(), optimizer=opt.state_dict(), epoch=epoch + 1, rng=rngs,
                         config=vars(args)), os.path.join(out, "checkpoint.pt"))
    return model


# ----------------------------------------------------------------------------------------------------------
# Few labels and pictures: what SimCLR buys with few labels, and what it learned, to look at
# ----------------------------------------------------------------------------------------------------------

# Few labels (--label-fractions): SimCLR's semi-supervised question (Sec. 6 and Table 7 of SimCLR: class-balanced
# draws of 1% and 10% of the labels), asked of the frozen backbone (SimCLR fine-tuned it), next to supervised
# training from scratch on the same labels.

def label_draw(y, amount, per_class, seed, draw):
    """Sorted indices of one draw of labelled train images from the labels y: a fraction `amount` of them (never
    fewer images than classes), every class keeping its share up to rounding (stratified), or with per_class exactly
    `amount` images of every class. The generator is seeded by (seed, draw) alone, so draw d of a small label set is a
    subset of draw d of a larger one (the same shuffle of each class, cut shorter): differences between label
    sets are not differences between draws."""
    g = torch.Generator().manual_seed(1000 * seed + draw)  # --label-draws is at most 1000: no two seeds meet
    classes = y.unique()
    if not per_class:
        return stratified(y, max(len(classes), round(amount * len(y))), g)
    idx = [torch.nonzero(y == c).squeeze(1)[torch.randperm(int((y == c).sum()), generator=g)[:amount]]
           for c in classes]
    return torch.cat(idx).sort().values


def supervised_from_scratch(train_x, train_y, test_x, test_y, classes, arch, stem, steps, seed, device,
                            precision="fp32", batch=256):
    """The supervised baseline: the same backbone (random init from `seed`) and a linear layer on h, trained
    together with cross-entropy on the labelled uint8 images train_x (n, 3, H, H) for a fixed number of steps (not
    epochs: the same budget for every number of labels), each step min(batch, n) of them drawn without
    replacement under flip_and_crop. SGD, momentum 0.9, lr 0.05 per 128 images (scaled linearly with the batch,
    Goyal et al. 2017, arXiv:1706.02677) after a linear warm-up over the first tenth of the steps (Goyal et al.),
    then cosine decay to 0 (lr_at); weight decay 5e-4 on conv and linear weights (Zagoruyko & Komodakis 2016,
    arXiv:1605.07146); bf16 autocast as the pre-training. He et al.'s 0.1 per 128 (arXiv:1512.03385 Sec. 4.2)
    diverged at this budget: on shapes with all 5,000 labels and 500 steps, train accuracy 37%, against 99.9% at
    0.05 with the warm-up (README, "Few labels"). Returns top-1 on test_x, in eval mode."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the caller's RNG untouched
        torch.manual_seed(seed)  # the init, the batches and the crops: one run per seed
        backbone = make_backbone(arch, stem).to(device)
        fc = nn.Linear(2048 if arch == "resnet50" else 512, classes).to(device)
        net, amp = nn.Sequential(backbone, fc).train(), autocast_for(device, precision)
        n = len(train_y)
        b = min(batch, n)
        peak = 0.05 * b / 128
        opt = torch.optim.SGD(param_groups(net, 5e-4), lr=peak, momentum=0.9)
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, steps, steps // 10, peak, 0.0)
            idx = torch.randperm(n)[:b]
            x = to_device(train_x[idx.to(train_x.device)], device).float() / 255  # (b, 3, H, H) in [0, 1]
            x = normalize(flip_and_crop(x, pad=x.shape[-1] // 8))  # 4 px of 32, as He et al.
            with amp():
                loss = F.cross_entropy(net(x), train_y[idx.to(train_y.device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        return (fc(extract_features(backbone, test_x)).argmax(1) == test_y).float().mean().item()


# Pictures. matplotlib is optional (STYLE: only torch, torchvision and numpy are required): without it the plots
# are skipped with a note; the neighbour grid needs only torchvision's save_image.

def save_plot(path, panels, log=print):
    """A row of line charts into the PNG `path`, small (90 dpi). panels: dicts of title, xlabel, logx and lines,
    each line (label, xs, ys, yerr or None). Returns whether it was drawn."""
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot, no GUI backend, no global state
    except ImportError:
        log(f"note: {os.path.basename(path)} not drawn: matplotlib is not installed (pip install matplotlib)")
        return False
    legend = any(len(p["lines"]) > 1 for p in panels)  # to the right of the chart, never over its lines
    fig = Figure(figsize=(3.4 * len(panels) + 2.2 * legend, 2.8), layout="constrained")
    for ax, p in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for label, xs, ys, yerr in p["lines"]:
            ax.errorbar(xs, ys, yerr=yerr, label=label, marker="o", markersize=3, capsize=2)
        ax.set(title=p["title"], xlabel=p["xlabel"], xscale="log" if p.get("logx") else "linear")
        ax.grid(alpha=0.3)
        if len(p["lines"]) > 1:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=90))
    return True


def plot_curves(metrics_path, png, log=print):
    """curves.png: the loss, the learning rate and the kNN monitor against the epoch, from metrics.jsonl (which a
    resumed run continues, each epoch once: trim_metrics)."""
    if not os.path.exists(metrics_path):
        log(f"note: no epoch was trained, so no {os.path.basename(png)}")
        return
    with open(metrics_path) as f:
        m = [json.loads(line) for line in f]
    epochs, knn = [r["epoch"] for r in m], [r for r in m if "knn_top1" in r]
    save_plot(png, [dict(title="NT-Xent loss", xlabel="epoch", lines=[("", epochs, [r["loss"] for r in m], None)]),
                    dict(title="learning rate (end of epoch)", xlabel="epoch",
                         lines=[("", epochs, [r["lr"] for r in m], None)]),
                    dict(title="kNN monitor, top-1 %" if knn else "kNN monitor: off (--knn-every)", xlabel="epoch",
                         lines=[("", [r["epoch"] for r in knn], [100 * r["knn_top1"] for r in knn], None)])], log)


def plot_label_efficiency(rows, methods, png, log=print):
    """label_efficiency.png: each method's top-1 (mean +- std over the draws) against the number of labels."""
    save_plot(png, [dict(title="top-1 on the test split (%)", xlabel="labelled train images", logx=True,
                         lines=[(name, [r["labels"] for r in rows], [100 * r[k]["mean"] for r in rows],
                                 [100 * r[k]["std"] for r in rows]) for k, name in methods.items()])], log)


def neighbour_grid(query, simclr_nb, random_nb):
    """The tiles of the neighbour picture, one row per query: the query, a gap, its neighbours by SimCLR's h, a gap,
    its neighbours by the random-init backbone's h. query (Q, 3, H, W), *_nb (Q, k, 3, H, W), floats in [0, 1]
    -> (Q (2k + 3), 3, H, W), for save_image(nrow=2k + 3)."""
    gap = torch.ones_like(query)[:, None]  # (Q, 1, 3, H, W): white, as save_image's padding below
    return torch.cat([query[:, None], gap, simclr_nb, gap, random_nb], 1).flatten(0, 1)  # (Q, 2k+3, ...) -> rows


# ----------------------------------------------------------------------------------------------------------
# Benchmark (--bench): our pipeline against the classic one, in one process, on the same model and batch
# ----------------------------------------------------------------------------------------------------------

def classic_transform(size, crop_min=0.08, jitter_prob=0.8, gray_prob=0.2, blur_prob=0.5):
    """The same SimCLR augmentation the way most repositories write it: torchvision v2, one image at a time."""
    T = torchvision.transforms.v2
    ops = [T.RandomResizedCrop(size, scale=(crop_min, 1.0), antialias=True), T.RandomHorizontalFlip(),
           T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=jitter_prob), T.RandomGrayscale(gray_prob)]
    kernel = blur_kernel(size)
    if kernel >= 3:
        ops.append(T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=blur_prob))
    return T.Compose(ops + [T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class TwoViews(torch.utils.data.Dataset):
    """Classic input pipeline: DataLoader workers make two views of each uint8 (3, H, W) image on the CPU."""

    def __init__(self, images, transform):
        self.images, self.transform = images, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), self.transform(self.images[i])


# Dense bf16 tensor-core peaks from the vendors' datasheets (TFLOP/s, no sparsity), for model FLOP utilisation.
# Only cards whose figure we are sure of; the most specific name first. Others: pass --peak-tflops.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "H200": 989, "A100": 312}


def peak_tflops(device, given=None):
    if given or device.type != "cuda":
        return given  # no honest single figure for a CPU: the bench reports achieved FLOP/s only
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def step_flops(model, views, tau, amp):
    """FLOPs of one forward + backward of the SimCLR step (convolutions and matmuls, as FlopCounterMode counts),
    on a copy of the model so that nothing is trained or recorded."""
    model = copy.deepcopy(model)
    with FlopCounterMode(display=False) as counter:
        with amp():
            z = model(views)  # (2b, out)
        b = len(views) // 2
        nt_xent(z[:b], z[b:], tau).backward()
    return counter.get_total_flops()


def classic_window(workers, bench_steps):
    """(warm-up steps, timed steps) of the classic rows. DataLoader workers take batches in turn and start
    together, so with w workers the batches come in bursts of w, and each worker keeps 2 queued (prefetch_factor
    2). A window shorter than a burst times the queue, not the workers: on an H200, 16 workers and a 35 + 10 step
    window timed the classic pipeline at the train step's own 23k img/s, where the workers alone made 3.5-6k. So
    the warm-up drains the first queue (4w + 3 steps) and the clock runs whole bursts, at least 16 of them."""
    if workers == 0:  # the main process makes each batch when asked: no queue
        return 3, bench_steps
    return 4 * workers + 3, -(-max(bench_steps, 16 * workers) // workers) * workers  # a multiple of w


def bench(model, images, args, device, log=print):
    """Images/s of (a) our pipeline, (b) the classic DataLoader pipeline feeding the same step, and (c) each stage
    alone. Every stage is timed over args.bench_steps steps after warm-up (the classic ones over whole bursts of
    their workers: classic_window), with the device synchronised."""
    amp = autocast_for(device, args.precision)
    B, cuda = args.batch_size, device.type == "cuda"
    opt = torch.optim.SGD(param_groups(model, args.wd, args.decay_norm_and_bias), lr=args.lr, momentum=args.momentum,
                          **({"fused": True} if cuda else {}))
    make_views, step_fn, compiled = step_functions(model, model, images[:B], args, amp, log)
    batch = lambda i: images[torch.randint(len(images), (B,), device=device)]  # (B, 3, H, W) uint8
    fixed_views = make_views(batch(0))  # (2B, 3, H, W): the train step alone reuses one batch of views

    def timed(name, fn, warmup=3, steps=args.bench_steps):
        for i in range(warmup):
            fn(i)
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for i in range(steps):
            fn(i)
        if cuda:
            torch.cuda.synchronize(device)
        ms = 1000 * (time.perf_counter() - t0) / steps
        log(f"bench: {name:<44} {ms:9.1f} ms/step {1000 * B / ms:9.0f} img/s")
        return dict(ms_per_step=ms, img_per_s=1000 * B / ms)

    model.train()
    rows = dict(ours=timed("(a) ours: augment + train step", lambda i: sgd_step(step_fn, make_views(batch(i)),
                                                                                 opt, args.tau, amp)),
                augment=timed("(c) ours: augmentation alone", lambda i: make_views(batch(i))),
                train_step=timed("(c) train step alone (fixed views)",
                                 lambda i: sgd_step(step_fn, fixed_views, opt, args.tau, amp)))
    # Steady state: sampling with replacement never ends an epoch (no pause while workers restart), and
    # classic_window sizes warm-up and clock so that the batches the workers keep queued don't count as speed.
    warmup, steps = classic_window(args.workers, args.bench_steps)
    sampler = torch.utils.data.RandomSampler(range(len(images)), replacement=True,
                                             num_samples=B * (2 * (warmup + steps) + 4 * args.workers))
    loader = iter(torch.utils.data.DataLoader(
        TwoViews(images.cpu(), classic_transform(images.shape[-1], args.crop_min, args.jitter_prob, args.gray_prob,
                                                 args.blur_prob)), batch_size=B, sampler=sampler,
        num_workers=args.workers, pin_memory=cuda))

    def classic_views(i):
        v1, v2 = next(loader)  # (B, 3, H, W) each, standardised on the CPU by the workers
        views = torch.cat([v.to(device, non_blocking=True) for v in (v1, v2)])  # (2B, 3, H, W); pinned: async
        return views.contiguous(memory_format=torch.channels_last) if cuda else views

    rows["classic"] = timed(f"(b) classic: {args.workers} DataLoader workers + step",
                            lambda i: sgd_step(step_fn, classic_views(i), opt, args.tau, amp), warmup, steps)
    rows["classic_loader"] = timed("(c) classic: DataLoader alone", classic_views, warmup, steps)
    flops = step_flops(model, fixed_views, args.tau, amp)
    peak = peak_tflops(device, args.peak_tflops)
    tflops = flops * 1000 / rows["ours"]["ms_per_step"] / 1e12  # achieved by our whole step
    result = dict(rows=rows, speedup=rows["ours"]["img_per_s"] / rows["classic"]["img_per_s"],
                  augment_share=rows["augment"]["ms_per_step"] / rows["ours"]["ms_per_step"],
                  flops_per_step=flops, achieved_tflops=tflops, peak_bf16_tflops=peak,
                  mfu=tflops / peak if peak else None,
                  device=torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)",
                  torch=torch.__version__, date=time.strftime("%Y-%m-%d"), compiled=compiled,
                  workers=args.workers, classic_warmup=warmup, classic_steps=steps, batch=B,
                  img_size=images.shape[-1], arch=args.arch, stem=args.stem, precision=args.precision,
                  dataset=args.dataset, steps=args.bench_steps)
    mfu = f", MFU {100 * result['mfu']:.1f}% of {peak} TFLOP/s bf16" if peak else ""
    log(f"bench: ours / classic = {result['speedup']:.2f}x; augmentation = {100 * result['augment_share']:.1f}% "
        f"of our step; {flops / 1e9:.1f} GFLOP per step, {tflops:.3f} TFLOP/s achieved{mfu}")
    return result


# ----------------------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------------------

def parse_args(argv):
    """The flags, with the values computed from them (resolve_args); with --resume, the saved run's config, which the
    flags typed now must match."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.resume:
        return resolve_args(args)
    cfg_path = os.path.join(args.resume, "config.json")
    if not os.path.exists(cfg_path):
        die(f"--resume {args.resume}: no config.json there; is it a run directory?")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg.setdefault("warmup_epochs", 0.0)  # a run saved before --recipe existed: no warm-up, weight decay on every
    cfg.setdefault("decay_norm_and_bias", True)  # parameter, as it started
    # a run saved before --ae-dim existed: its --proj-hidden was also the ae head's width d
    cfg.setdefault("ae_dim", cfg.get("proj_hidden") if cfg.get("head") == "ae" else None)
    if cfg["ae_dim"] is not None:
        cfg["proj_hidden"] = None  # the ae head has no h of its own
    typed = explicit_flags(parser, argv) - {"resume", "device", "out", "show_neighbours"}
    saved = {k: v for k, v in cfg.items() if k in vars(args) and k not in typed}  # the flags not typed
    given = resolve_args(argparse.Namespace(**{**vars(args), **saved, "resume": None, "out": args.resume}))
    differ = [f"--{k.replace('_', '-')}: saved {cfg.get(k)!r}, given {getattr(given, k)!r}"
              for k in sorted(typed) if cfg.get(k) != getattr(given, k)]
    if differ:
        die("--resume with flags that differ from the saved run:\n  " + "\n  ".join(differ))
    return argparse.Namespace(**{**vars(given), **cfg, "resume": args.resume, "out": args.resume,  # flags newer
                                 "device": args.device or cfg["device"],  # than the run: their defaults
                                 "show_neighbours": args.show_neighbours})


def explicit_flags(parser, argv):
    """The flags the user typed (as dests), to compare a --resume against the saved config."""
    typed = {a.split("=")[0] for a in argv if a.startswith("--")}
    return {act.dest for act in parser._actions if typed & set(act.option_strings)}


def setup(args):
    """Device and processes, in one place, and the seed. torchrun sets RANK / WORLD_SIZE / LOCAL_RANK.
    Returns (device, rank, world)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(args.device)
    if world > 1:
        if args.batch_size % world:
            die(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        # a long timeout: the other processes wait while rank 0 decodes the data and trains the autoencoder
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=3))
    if not args.resume and not args.bench and rank == 0 and os.path.exists(os.path.join(args.out, "config.json")):
        die(f"{args.out} already holds a run; continue it with --resume {args.out} or choose another --out")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    seed_everything(args.seed)
    return device, rank, world


def prepare_data(args, device, rank, world, log=print):
    """The images, once into memory, then onto the device (or kept in host memory when they do not fit):
    dict(images, train_x, train_y, test_x, test_y, classes). The labelled train images are the first pre-training
    images: train_x is a view of `images`, one copy."""
    t0 = time.time()
    if rank != 0:
        dist.barrier()  # rank 0 first: it downloads, un-gzips and decodes into the caches the others then read
    data = load_dataset(args.dataset, args.data_dir, args.img_size, download=not args.no_download,
                        stl10_pretrain=args.stl10_pretrain, seed=args.seed, subset=args.subset)
    if world > 1 and rank == 0:
        dist.barrier()
    data_on = where_data_fits(data["pretrain"].nbytes + data["test_x"].nbytes, device, args.data_on)
    try:
        images = data["pretrain"].to(device) if data_on == "device" else data["pretrain"]
        test_x = data["test_x"].to(device) if data_on == "device" else data["test_x"]
    except torch.OutOfMemoryError:
        die(f"the images do not fit on {device}; run with --data-on host (or auto) to keep them in host memory")
    n_train = len(data["train_y"])
    log(f"data: {args.dataset}, {len(images)} pre-training / {n_train} train / {len(test_x)} test images "
        f"of {args.img_size}px, {data['classes']} classes, {(images.nbytes + test_x.nbytes) / 2 ** 30:.2f} GiB "
        + (f"on {device}" if data_on == "device" else f"in host memory, each batch copied to {device}")
        + f" ({time.time() - t0:.1f}s)")
    if len(images) < args.batch_size:
        die(f"--batch-size {args.batch_size} is larger than the {len(images)} pre-training images")
    smallest = int(data["train_y"].unique(return_counts=True)[1].min())
    if args.labels_per_class and max(args.label_amounts) > smallest:
        die(f"--labels-per-class {max(args.label_amounts)}: the smallest class has {smallest} train images")
    return dict(images=images, train_x=images[:n_train], train_y=data["train_y"].to(device), test_x=test_x,
                test_y=data["test_y"].to(device), classes=data["classes"])


def show_augs(images, args, log=print):
    """--show-augs: 8 images (top row) and two augmented views of each (rows 2 and 3), into one PNG."""
    x = images[:8].float() / 255
    grid = torch.cat([x, augment(x, args.crop_min, args.jitter_prob, args.gray_prob, args.blur_prob),
                      augment(x, args.crop_min, args.jitter_prob, args.gray_prob, args.blur_prob)])
    os.makedirs(os.path.dirname(os.path.abspath(args.show_augs)), exist_ok=True)
    grid = F.interpolate(grid, scale_factor=max(1, 96 // args.img_size), mode="nearest")  # small: enlarge
    torchvision.utils.save_image(grid, args.show_augs, nrow=8, padding=2)
    log(f"saved {args.show_augs}: originals (top row) and two augmented views (rows 2 and 3)")


def open_run_dir(args):
    """The output directory, with the whole config saved in it (not for --bench, nor again for --resume)."""
    os.makedirs(args.out, exist_ok=True)
    if not args.resume and not args.bench:
        try:  # "x": created by this run only, even when another run was started with the same --out
            with open(os.path.join(args.out, "config.json"), "x") as f:
                json.dump(vars(args), f, indent=2)
        except FileExistsError:
            die(f"{args.out} already holds a run; continue it with --resume {args.out} or choose another --out")


def autoencoder_embedding(images, args, device, rank, world, log=print):
    """The ae head's first layer: the 512 -> d embedding of an autoencoder trained on the images (train_autoencoder),
    read from the cache in --ae-dir when it holds one of this dataset, d and seed. Under torchrun rank 0 trains it
    and the other processes receive its embedding."""
    # the seed too: it draws the AE's initial weights (and, for shapes, the images), so a run's result does not
    # depend on which seed happened to fill the cache first
    tag = f"{args.dataset}-{args.img_size}px-d{args.ae_dim}-e{args.ae_epochs}-s{args.seed}"
    tag += (f"-n{args.subset}" if args.subset else "") + ("-train" if args.dataset == "stl10" and
                                                           args.stl10_pretrain == "train" else "")
    if args.dataset == "folder":
        tag += "-" + os.path.abspath(args.data_dir).strip("/").replace("/", "_")
    ae_path = os.path.join(args.ae_dir, f"ae-{tag}.pt")
    ae = AutoEncoder(images[0].numel(), args.ae_dim)
    if os.path.exists(ae_path) and not args.dry_run:
        ae.load_state_dict(torch.load(ae_path, map_location="cpu"))
        log(f"autoencoder: reusing {ae_path}")
    elif rank == 0:  # trained once; under torchrun the other processes receive its embedding below
        ae, mse = train_autoencoder(images, args.ae_dim, args.ae_epochs, device, log=log,
                                    ckpt=os.path.join(args.out, "ae_checkpoint.pt"))
        log(f"autoencoder: best validation MSE {mse:.5f}")
        if not args.dry_run:
            os.makedirs(args.ae_dir, exist_ok=True)
            save_atomic(ae.state_dict(), ae_path)
    if world > 1:
        ae = ae.to(device)
        for p in ae.embedding.parameters():
            dist.broadcast(p.data, src=0)  # rank 0's embedding, to every process
    return ae.embedding


def build_model(args, embedding, device, world):
    """z = g(f(x)): the backbone f and the projection head g (its first layer the AE embedding for --head ae), with
    global BatchNorm under torchrun, on the device."""
    backbone = make_backbone(args.arch, args.stem, args.pretrained)
    feat_dim = 2048 if args.arch == "resnet50" else 512
    head = projection_head(feat_dim, args.proj_hidden, args.proj_out, args.act, embedding, not args.no_freeze)
    model = SimCLR(backbone, head)
    if world > 1 and not args.no_sync_bn:
        model = sync_batchnorm(model, device)
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def run_bench(model, images, args, device, world, log=print):
    """--bench: bench's table, into bench.json in --out."""
    if world > 1:
        die("--bench runs in one process: start it with python, not torchrun")
    result = bench(model, images, args, device, log)
    with open(os.path.join(args.out, "bench.json"), "w") as f:
        json.dump(result, f, indent=2)
    log(f"wrote {os.path.join(args.out, 'bench.json')}")
    return result


def resume_checkpoint(model, args, rank, world, log=print):
    """With --resume, the saved run's model weights and this process's RNG states, read from its checkpoint.pt.
    Returns (the epoch to start from, the optimizer's state or None)."""
    start_epoch, opt_state = 0, None
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    if args.resume and os.path.exists(ckpt_path):
        try:  # everything is read and checked before anything is used: never a half-loaded run
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # RNG states must stay on the CPU
            model.load_state_dict(ckpt["model"])
            start_epoch, opt_state = ckpt["epoch"], ckpt["optimizer"]
            if len(ckpt["rng"]) != world:  # every process has its own augmentation stream
                n = len(ckpt["rng"])
                die(f"{ckpt_path} was saved by {n} process(es) and is resumed by {world}; resume it with " +
                    (f"torchrun --nproc_per_node {n}" if n > 1 else "python, not torchrun"))
            set_rng_state(ckpt["rng"][rank])
        except Exception as e:
            die(f"cannot resume from {ckpt_path}: the file is corrupt or from another model "
                f"({type(e).__name__}: {str(e)[:300]}). Delete it to restart the run from scratch.")
        log(f"resumed {ckpt_path} at epoch {start_epoch}")
    if args.resume and rank == 0:
        dropped = trim_metrics(os.path.join(args.out, "metrics.jsonl"), start_epoch)
        if dropped:
            log(f"metrics.jsonl: dropped {dropped} line(s) written after the checkpoint of epoch {start_epoch}")
    return start_epoch, opt_state


def feature_cache(model, train_x, test_x, args, device):
    """features(name): the (train_h, test_h) of the trained backbone ("simclr") or of a random-init one
    ("random_init"), each extracted once, when first needed."""
    h = {}

    def features(name):
        if name not in h:
            f = model.backbone
            if name == "random_init":
                torch.manual_seed(args.seed + 1)  # its weights: the same whichever stage asks first
                f = make_backbone(args.arch, args.stem, args.pretrained).to(device)
            h[name] = extract_features(f, train_x), extract_features(f, test_x)
        return h[name]
    return features


def pretrain(model, data, args, start_epoch, opt_state, rank, world, log=print):
    """SimCLR pre-training (train), with a kNN monitor on the train and test images. Returns its seconds."""
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"SimCLR: {args.arch} ({args.stem} stem{', ImageNet weights' if args.pretrained else ''}) + {args.head} head "
        f"({args.act}, {'frozen' if args.head == 'ae' and not args.no_freeze else 'trained'}), "
        f"{n_params / 1e6:.1f}M trainable parameters, {args.epochs} epochs of batch {args.batch_size}, tau {args.tau}, "
        f"{args.precision}" + (f", {world} processes with {'per-process' if args.no_sync_bn else 'global'} "
                               f"BatchNorm" if world > 1 else ""))
    log(f"recipe {args.recipe}: SGD (momentum {args.momentum}), lr {args.lr:.3g} after {args.warmup_epochs:g} "
        f"epochs of linear warm-up, cosine to {args.lr * args.lr_min_ratio:.3g}; weight decay {args.wd:g} on "
        f"{'every parameter' if args.decay_norm_and_bias else 'conv and linear weights (not BatchNorm, not biases)'}")
    if args.pretrained and args.stem == "cifar":
        log("note: --stem cifar replaces the ImageNet 7x7 conv1 with a random 3x3 conv (re-initialised); the other "
            "layers keep their ImageNet weights")
    knn = lambda f: knn_top1(extract_features(f, data["train_x"]), data["train_y"],
                             extract_features(f, data["test_x"]), data["test_y"], data["classes"], args.knn_k)
    t0 = time.time()
    train(model, data["images"], args, args.out, knn, start_epoch, opt_state, rank, world, log)
    return time.time() - t0


def evaluate_with_baselines(features, data, args, device, train_s, random_name, log=print):
    """The frozen backbone's linear and kNN top-1, next to the raw-pixel and random-init baselines, into results.json
    as soon as each number exists; then the table. Returns the results."""
    evaluate_h = lambda h_train, h_test: evaluate(h_train, data["train_y"], h_test, data["test_y"], data["classes"],
                                                  args.eval, args.probe_steps, args.knn_k, args.batch_size)
    results = dict(evaluate_h(*features("simclr")), eval_protocol=args.eval, pretrain_seconds=train_s)
    write_results(results, args.out)
    rows = [(f"SimCLR {args.arch}, {args.head} head ({args.act})", results)]
    if not args.no_baselines:
        pixels = lambda x: pixel_features(x, device)  # (N, 3 s^2), s = min(image side, 32)
        baselines = [("raw_pixels", f"raw pixels ({min(args.img_size, RAW_PIXELS_MAX)}px)",
                      lambda: evaluate_h(pixels(data["train_x"]), pixels(data["test_x"]))),
                     ("random_init", random_name, lambda: evaluate_h(*features("random_init")))]
        for i, (key, name, run) in enumerate(baselines):
            try:
                results[key] = run()
            except (torch.OutOfMemoryError, MemoryError) as e:  # a skipped baseline, never a lost run
                results[key] = dict(skipped=f"out of memory ({type(e).__name__})")
                log(f"note: the {name} baseline ran out of memory; skipped")
            write_results(results, args.out)
            rows.insert(i, (name, results[key]))
    print(f"\ntop-1 on the {'test split' if args.eval == 'standard' else '20% of the test split (the paper protocol)'}:"
          f"{'linear':>12}{'kNN':>9}")
    for name, r in rows:
        print(f"  {name:<44}" + (f"{r['skipped']:>17}" if "skipped" in r else
                                 f"{100 * r['linear_top1']:>6.1f}%{100 * r['knn_top1']:>8.1f}%"))
    return results


def pictures(features, data, args, random_name, log=print):
    """Every run's pictures, into its output directory: curves.png, and neighbours.png (also to --show-neighbours):
    8 test images, each of its own class while there are 8 classes (with more, stratified's rounding picks the
    first ones) and drawn within its class with the seed, each with its 8 nearest train images by cosine
    similarity of SimCLR's h, then of the random-init backbone's h."""
    plot_curves(os.path.join(args.out, "metrics.jsonl"), os.path.join(args.out, "curves.png"), log)
    train_x, test_x, test_y = data["train_x"], data["test_x"], data["test_y"]
    q = stratified(test_y.cpu(), 8, torch.Generator().manual_seed(args.seed))
    as_float = lambda x: x.cpu().float() / 255  # uint8 -> [0, 1], on the host, where save_image writes from
    neighbours = [as_float(train_x[nearest(h_test[q.to(h_test.device)], h_train, 8)[1].to(train_x.device)])
                  for h_train, h_test in map(features, ("simclr", "random_init"))]  # (8, k, 3, H, W) each
    tiles = neighbour_grid(as_float(test_x[q.to(test_x.device)]), *neighbours)  # (8 (2k + 3), 3, H, W)
    if tiles.shape[-1] > 64:  # large images: a picture of about a thousand pixels across, not thousands
        tiles = torchvision.transforms.v2.functional.resize(tiles, [64, 64], antialias=True)  # (8 (2k+3), 3, 64, 64)
    paths = [os.path.join(args.out, "neighbours.png")] + ([args.show_neighbours] if args.show_neighbours else [])
    for path in paths:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_atomic(path, lambda f: torchvision.utils.save_image(tiles, f, format="png", padding=2, pad_value=1,
                                                                  nrow=2 * neighbours[0].shape[1] + 3))
    log(f"saved {' and '.join(paths)}: each row a test image, then its nearest train images by SimCLR's h, then by "
        f"the {random_name}'s")


def label_efficiency(features, data, args, device, random_name, results, log=print):
    """The few-labels stage (--label-fractions / --labels-per-class). For every label set and draw (label_draw):
    SimCLR's linear probe and kNN and the random-init backbone's probe, trained on the features of the drawn images
    (already extracted for the whole train split), and supervised_from_scratch on the same images; each measured on
    the whole test split. results.json gets every number as soon as it exists; then the table and
    label_efficiency.png."""
    train_x, train_y, test_x, test_y, classes = (data[k] for k in ("train_x", "train_y", "test_x", "test_y", "classes"))
    per_class, y = args.labels_per_class is not None, train_y.cpu()
    methods = dict(simclr_linear="SimCLR linear", simclr_knn="SimCLR kNN", random_init_linear=f"{random_name} linear",
                   supervised=f"supervised ({args.sup_steps} steps)")
    (h_train, h_test), (r_train, r_test) = features("simclr"), features("random_init")
    table = results["label_efficiency"] = dict(unit="labels per class" if per_class else "fraction of the labels",
                                               sup_steps=args.sup_steps, rows=[])
    name = lambda amount: f"{amount}/class" if per_class else f"{100 * amount:g}%"
    for amount in args.label_amounts:
        n = len(label_draw(y, amount, per_class, args.seed, 0))
        row = dict(amount=amount, labels=n, draws=1 if n == len(y) else args.label_draws)  # the whole split: once
        table["rows"].append(row)
        for d in range(row["draws"]):
            t0 = time.time()
            idx = label_draw(y, amount, per_class, args.seed, d).to(h_train.device)
            labels = train_y[idx]
            run = dict(simclr_linear=linear_probe(h_train[idx], labels, h_test, test_y, classes, args.probe_steps),
                       simclr_knn=knn_top1(h_train[idx], labels, h_test, test_y, classes, args.knn_k),
                       random_init_linear=linear_probe(r_train[idx], labels, r_test, test_y, classes, args.probe_steps),
                       supervised=supervised_from_scratch(train_x[idx.to(train_x.device)], labels, test_x, test_y,
                                                          classes, args.arch, args.stem, args.sup_steps,
                                                          1000 * args.seed + d, device, args.precision))
            for key, acc in run.items():  # mean and sample std over the draws so far
                runs = row.get(key, dict(runs=[]))["runs"] + [acc]
                row[key] = dict(mean=float(np.mean(runs)), std=float(np.std(runs, ddof=1)) if len(runs) > 1 else 0.0,
                                runs=runs)
            write_results(results, args.out)
            log(f"few labels: {name(amount)} ({n} images), draw {d + 1}/{row['draws']}: " +
                ", ".join(f"{methods[k]} {100 * v:.1f}%" for k, v in run.items()) + f" ({time.time() - t0:.0f}s)")
    pm = lambda r: f"{100 * r['mean']:.1f} +- {100 * r['std']:.1f}" if len(r["runs"]) > 1 else f"{100 * r['mean']:.1f}"
    print(f"\nfew labels: top-1 on the test split, mean +- std over the draws (%)\n  {'labels':<10}{'images':>8}"
          f"{'draws':>6}" + "".join(f"{v:>{max(16, len(v) + 2)}}" for v in methods.values()))
    for row in table["rows"]:
        print(f"  {name(row['amount']):<10}{row['labels']:>8}{row['draws']:>6}" +
              "".join(f"{pm(row[k]):>{max(16, len(v) + 2)}}" for k, v in methods.items()))
    plot_label_efficiency(table["rows"], methods, os.path.join(args.out, "label_efficiency.png"), log)
    return table


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    device, rank, world = setup(args)
    log = print if rank == 0 else (lambda *a, **k: None)  # under torchrun, rank 0 speaks for all
    data = prepare_data(args, device, rank, world, log)
    if args.show_augs:
        return show_augs(data["images"], args, log)
    if rank == 0:
        open_run_dir(args)
    embedding = autoencoder_embedding(data["images"], args, device, rank, world, log) if args.head == "ae" else None
    seed_everything(args.seed)  # the same initial weights whether the AE was trained now or read from the cache
    model = build_model(args, embedding, device, world)
    seed_everything(args.seed + rank)  # each rank draws its own augmentations
    if args.bench:
        return run_bench(model, data["images"], args, device, world, log)
    start_epoch, opt_state = resume_checkpoint(model, args, rank, world, log)
    features = feature_cache(model, data["train_x"], data["test_x"], args, device)
    random_name = f"{'ImageNet-init' if args.pretrained else 'random-init'} {args.arch}"
    if args.resume and args.show_neighbours:  # a look at a saved run: its pictures, no training, no evaluation
        if start_epoch == 0:
            die(f"--show-neighbours: {args.resume} has no checkpoint of a trained epoch yet, so nothing to show")
        return pictures(features, data, args, random_name, log)
    train_s = pretrain(model, data, args, start_epoch, opt_state, rank, world, log)
    if world > 1:
        dist.destroy_process_group()
        if rank != 0:
            return None  # evaluation runs once, on rank 0
    torch.save(model.backbone.state_dict(), os.path.join(args.out, "backbone.pt"))
    results = evaluate_with_baselines(features, data, args, device, train_s, random_name, log)
    pictures(features, data, args, random_name, log)
    if args.label_amounts:
        label_efficiency(features, data, args, device, random_name, results, log)
    print(f"outputs in {args.out}/")
    return results


if __name__ == "__main__":
    main()
