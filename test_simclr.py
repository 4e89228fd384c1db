"""Tests for simclr.py and toy_theory.py:  python -m pytest -q test_simclr.py

Unit tests compare each piece against an independent reference (a naive loop, torchvision's functional op,
a closed form, files written here in the real on-disk formats); smoke tests run the scripts end to end."""
import collections
import copy
import dataclasses
import functools
import importlib.util
import gzip
import io
import itertools
import json
import math
import os
import pathlib
import pickle
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2.functional as TF
from PIL import Image

import simclr
import toy_theory

HAS_MPL = importlib.util.find_spec("matplotlib") is not None  # optional: the plots are skipped without it

HERE = os.path.dirname(os.path.abspath(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))


# ---------------------------------------------------------------- helpers


@pytest.fixture
def refused(capsys):
    """refused(argv or a function): simclr.main(argv), or the function, stops with exit code 2 (or `code`) and its one
    line on stderr, which it returns; no traceback."""
    def run(what, code=2):
        with pytest.raises(SystemExit) as e:
            what() if callable(what) else simclr.main(what)
        assert e.value.code == code
        err = capsys.readouterr().err
        assert "Traceback" not in err
        return err
    return run


def run_script(*args, timeout=300):
    r = subprocess.run([sys.executable, *args], cwd=HERE, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


TINY = ["--subset", "96", "--batch-size", "16", "--arch", "resnet10", "--img-size", "16", "--probe-steps", "5",
        "--no-baselines", "--knn-every", "0"]


def saved_config(path, *argv):
    """config.json as a run started with argv saves it, without running it."""
    (path / "config.json").write_text(json.dumps(vars(simclr.parse_args([*argv, "--out", str(path)]))))


CPU = simclr.types.SimpleNamespace(device=torch.device("cpu"), rank=0, world=1, log=lambda *a: None)  # setup()'s


# ---------------------------------------------------------------- Part 1: augmentation, against torchvision's ops


def images(n=6, size=20, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def per_image(fn, x, *params):
    return torch.stack([fn(x[i], *[p[i].item() for p in params]) for i in range(len(x))])


def ks_distance(a, b):
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs of samples a and b."""
    a, b = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    at = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, at, "right") / len(a) - np.searchsorted(b, at, "right") / len(b)).max()


def assert_same_distribution(a, b, what, alpha=1e-6):
    """Samples a and b pass the two-sample KS test at level alpha (its asymptotic critical value; conservative for
    discrete values): two samples of one distribution fail it about once in a million seeds."""
    n, m = len(a), len(b)
    d, critical = ks_distance(a, b), math.sqrt(-math.log(alpha / 2) / 2 * (n + m) / (n * m))
    assert d <= critical, f"{what}: KS distance {d:.4f} > {critical:.4f}"


def assert_frequency(hits, p, what):
    """hits, a bool sample, is Bernoulli(p): its count within 5 standard deviations of n p (1 in 1.7 million)."""
    n, k = len(hits), int(hits.sum())
    assert abs(k - n * p) <= 5 * math.sqrt(n * p * (1 - p)), f"{what}: {k} of {n}, expected {n * p:.0f}"


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's ImageNet weights' transforms
JITTER_OPS = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)  # color_jitter's order


@pytest.mark.parametrize("op,lo,hi", [(0, 0.2, 1.8), (1, 0.2, 1.8), (2, 0.2, 1.8), (3, -0.5, 0.5)])
def test_color_jitter_each_op_matches_torchvision(op, lo, hi):
    """color_jitter (what augment calls) with one op's factor drawn over its whole range and the others neutral
    (1, and hue 0): at whichever step of the random order the op comes, it is torchvision's op."""
    x = images(8)
    x[0] = x[0, :1]  # a grey image (hue undefined) and a saturated corner case
    x[1, :, :5] = torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1)
    f = lo + (hi - lo) * torch.rand(8, generator=torch.Generator().manual_seed(1))
    factors = torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(8, 1)  # (8, 4)
    factors[:, op] = f
    others = [o for o in range(4) if o != op]
    orders = [others[:i % 4] + [op] + others[i % 4:] for i in range(4)]  # the op at step 0, 1, 2, 3
    order = torch.tensor(orders + [o[::-1] for o in orders])  # (8, 4): and at 3, 2, 1, 0, the others reversed
    torch.testing.assert_close(simclr.color_jitter(x, factors, order), per_image(JITTER_OPS[op], x, f),
                               atol=2e-5, rtol=0)


def test_color_jitter_random_order_matches_torchvision_sequence():
    x, N = images(10), 10
    g = torch.Generator().manual_seed(2)
    factors = torch.tensor([0.2, 0.2, 0.2, -0.2]) + torch.rand(N, 4, generator=g) * torch.tensor([1.6] * 3 + [0.4])
    order = torch.rand(N, 4, generator=g).argsort(1)
    expected = []
    for i in range(N):
        y = x[i]
        for op in order[i]:
            y = JITTER_OPS[op](y, factors[i, op].item())
        expected.append(y)
    torch.testing.assert_close(simclr.color_jitter(x, factors, order), torch.stack(expected), atol=5e-5, rtol=0)


def test_gray_matches_torchvision():
    x = images()
    torch.testing.assert_close(simclr.gray(x).expand_as(x), TF.rgb_to_grayscale(x, num_output_channels=3))


@pytest.mark.parametrize("kernel", [3, 9])
def test_gaussian_blur_matches_torchvision(kernel):
    x = images(5, size=24)
    sigma = 0.1 + 1.9 * torch.rand(5, generator=torch.Generator().manual_seed(3))
    expected = per_image(lambda im, s: TF.gaussian_blur(im, [kernel, kernel], [s, s]), x, sigma)
    torch.testing.assert_close(simclr.gaussian_blur(x, sigma, kernel), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [32, 20])
def test_resized_crop_and_its_flip_match_torchvision(size):
    x = images(6, size=32)
    top, left = torch.tensor([0, 5, 31, 10, 0, 3]), torch.tensor([0, 7, 0, 20, 13, 3])
    h, w = torch.tensor([32, 11, 1, 22, 7, 29]), torch.tensor([32, 9, 32, 12, 19, 29])
    flip = torch.tensor([False, True, False, True, True, False])
    expected = []
    for i in range(6):
        y = TF.resized_crop(x[i], top[i].item(), left[i].item(), h[i].item(), w[i].item(), [size, size],
                            antialias=False)
        expected.append(TF.horizontal_flip(y) if flip[i] else y)
    torch.testing.assert_close(simclr.resized_crop(x, top, left, h, w, size, flip), torch.stack(expected),
                               atol=1e-5, rtol=0)


def test_crop_params_follow_torchvision_distribution():
    """The crop box's top, left, height and width, its margins below and to the right, its area and its aspect ratio,
    and top against left (each as a fraction of its room: one draw for both moves them together), each against
    torchvision's RandomResizedCrop.make_params over 10,000 draws (two-sample KS tests); first, the top
    and left at their first and last offsets as often as offsets uniform on their room (a sampler that never reaches
    the last offset moves the KS distance only a little)."""
    H, W, n = 32, 40, 10_000
    torch.manual_seed(0)
    top, left, h, w = simclr.crop_params(n, H, W)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    ref, dummy = torchvision.transforms.v2.RandomResizedCrop(32), [torch.zeros(3, H, W)]
    theirs = [ref.make_params(dummy) for _ in range(n)]
    stats = lambda t, l, h, w: dict(top=t, left=l, height=h, width=w, bottom=H - h - t, right=W - w - l, area=h * w,
                                    aspect=w / h, top_minus_left=t / (H - h + 1) - l / (W - w + 1))
    ours = stats(*(v.numpy() for v in (top, left, h, w)))
    theirs = stats(*(np.array([p[k] for p in theirs]) for k in ("top", "left", "height", "width")))
    for name, start, room in (("top", top, H - h), ("left", left, W - w)):  # each offset uniform on 0..room
        p = 1 / (room + 1).double()  # a given offset's chance: its hits' count has mean sum p, variance sum p (1 - p)
        for end, hits in (("first", start == 0), ("last", start == room)):
            assert abs(hits.sum() - p.sum()) <= 5 * (p * (1 - p)).sum().sqrt(), f"{name} at its {end} offset"
    for name in ours:
        assert_same_distribution(ours[name], theirs[name], name)


def test_crop_params_fallback_is_torchvision_centre_crop():
    # no crop of area 100% with aspect ratio in [2, 3] fits a square image: both fall back to a centre crop
    ours = simclr.crop_params(3, 30, 30, scale=(1.0, 1.0), ratio=(2.0, 3.0))
    ref = torchvision.transforms.v2.RandomResizedCrop(30, scale=(1.0, 1.0), ratio=(2.0, 3.0))
    p = ref.make_params([torch.zeros(3, 30, 30)])
    for t, key in zip(ours, ("top", "left", "height", "width")):
        assert (t == p[key]).all(), key


def test_augment_gives_two_different_valid_views():
    x = images(16, size=32)
    torch.manual_seed(0)
    v1, v2 = simclr.augment(x), simclr.augment(x)
    assert v1.shape == x.shape and v1.min() >= 0 and v1.max() <= 1 + 1e-6  # blur may round up by an ulp
    assert not torch.allclose(v1, v2)
    torch.manual_seed(0)
    assert torch.equal(simclr.augment(x), v1)  # each view is a function of the seed alone


def test_augment_draws_every_ops_parameters_as_torchvision_does(monkeypatch):
    """What augment() hands each op, over 20,000 images of 20 px (blur kernel 3), recorded by stand-ins for the ops:
    the flip, jitter, grayscale and blur coins at their probabilities; ColorJitter's four factors and the blur's sigma
    against torchvision's make_params (two-sample KS tests); the jitter's order a random permutation of each image,
    every one of the 24 as often as in ColorJitter's fn_idx (a hit missing from each by 5 standard deviations)."""
    seen = {k: [] for k in ("flip", "factors", "order", "sigma")}

    def crop(x, top, left, ch, cw, size, flip):
        seen["flip"].append(flip)
        return x

    def jitter(x, factors, order):
        seen["factors"].append(factors), seen["order"].append(order)
        return x + 1  # the stand-ins mark what they return: 1 jittered + 2 grey + 4 blurred

    def blur(x, sigma, kernel):
        seen["sigma"].append(sigma)
        return x + 4
    for name, op in dict(resized_crop=crop, color_jitter=jitter, gray=lambda x: x[:, :1] + 2,
                         gaussian_blur=blur).items():
        monkeypatch.setattr(simclr, name, op)
    torch.manual_seed(0)
    marks = torch.cat([simclr.augment(torch.zeros(5000, 3, 20, 20))[:, 0, 0, 0] for _ in range(4)]).long()  # (20000,)
    ours = {k: torch.cat(v).numpy() for k, v in seen.items()}
    coins = dict(flip=(ours["flip"] > 0, 0.5), jitter=((marks & 1).numpy() > 0, 0.8),
                 grayscale=((marks & 2).numpy() > 0, 0.2), blur=((marks & 4).numpy() > 0, 0.5))
    for what, (hits, p) in coins.items():
        assert_frequency(hits, p, what)
    for a, b in itertools.combinations(coins, 2):  # drawn apart: both at once as often as the product says
        assert_frequency(coins[a][0] & coins[b][0], coins[a][1] * coins[b][1], f"{a} and {b}")
    cj, gb, dummy = (torchvision.transforms.v2.ColorJitter(0.8, 0.8, 0.8, 0.2),
                     torchvision.transforms.v2.GaussianBlur(3, sigma=(0.1, 2.0)), [torch.zeros(3, 20, 20)])
    theirs = [cj.make_params(dummy) for _ in range(10_000)]
    factors = ("brightness", "contrast", "saturation", "hue")
    for i, factor in enumerate(factors):
        assert_same_distribution(ours["factors"][:, i], [p[f"{factor}_factor"] for p in theirs], factor)
    for i, j in itertools.combinations(range(4), 2):  # drawn apart: one uniform for two factors moves them together
        assert_same_distribution(ours["factors"][:, i] - ours["factors"][:, j],
                                 [p[f"{factors[i]}_factor"] - p[f"{factors[j]}_factor"] for p in theirs],
                                 f"{factors[i]} - {factors[j]}")
    assert_same_distribution(ours["sigma"], [gb.make_params(dummy)["sigma"][0] for _ in range(20_000)], "sigma")
    count = lambda orders: collections.Counter(map(tuple, np.asarray(orders).tolist()))
    ours_n, theirs_n = count(ours["order"]), count([p["fn_idx"].numpy() for p in theirs])
    for perm in itertools.permutations(range(4)):
        a, b, p = ours_n[perm] / 20_000, theirs_n[perm] / 10_000, 1 / 24
        assert abs(a - b) <= 5 * math.sqrt(p * (1 - p) * (1 / 20_000 + 1 / 10_000)), (perm, a, b)


def test_augment_takes_uint8_images_as_their_float_values():
    """augment() of uint8 images is augment() of the same images as ToTensor's floats in [0, 1], on the same seed
    (grid_sample, its first op, refuses uint8 with a message about 'Byte')."""
    x = (images(8, size=24) * 255).round().to(torch.uint8)
    torch.manual_seed(0)
    ours = simclr.augment(x)
    torch.manual_seed(0)
    assert ours.dtype == torch.float32 and torch.equal(ours, simclr.augment(x.float() / 255))


def test_classic_transform_and_two_views_agree_in_their_deterministic_corner():
    """With every random op switched off and the crop forced to the whole image, the classic per-image pipeline
    and ours both return the standardised image or its mirror: same crop, flip and normalisation."""
    x = torch.randint(0, 256, (3, 20, 20), dtype=torch.uint8)
    off = dict(crop_min=1.0, jitter_prob=0, gray_prob=0, blur_prob=0)
    ref = (x.float() / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    classic = simclr.classic_transform(20, **off)
    seen = set()
    for _ in range(20):
        for pipeline, out in (("classic", classic(x)), ("ours", simclr.two_views(x[None], simclr.HParams(**off))[0])):
            flipped = torch.allclose(out, ref.flip(-1), atol=1e-5)
            assert flipped or torch.allclose(out, ref, atol=1e-5)
            seen.add((pipeline, flipped))
    assert len(seen) == 4  # each pipeline gives both mirrored and unmirrored views


def test_two_views_gives_image_i_two_different_views_at_rows_i_and_i_plus_n():
    """Rows i and i + N are two views of image i, drawn apart: with the default augmentation they differ for every
    image (one view twice would leave NT-Xent nothing to learn); with the colour ops off, any crop, flip or blur of an
    image of one colour is that colour, so both rows are image i's colour, standardised by hand."""
    x = (images(8, size=20) * 255).to(torch.uint8)
    torch.manual_seed(0)
    v = simclr.two_views(x, simclr.HParams())  # (16, 3, 20, 20)
    assert ((v[:8] - v[8:]).flatten(1).abs().amax(1) > 0.1).all()
    colours = torch.randint(0, 256, (8, 3), generator=torch.Generator().manual_seed(1))
    flat = colours[:, :, None, None].expand(8, 3, 20, 20).to(torch.uint8)
    v = simclr.two_views(flat, simclr.HParams(jitter_prob=0, gray_prob=0))
    ref = (colours / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)  # (8, 3)
    for half in (v[:8], v[8:]):
        torch.testing.assert_close(half, ref[:, :, None, None].expand_as(half).float(), atol=1e-5, rtol=0)


# ---------------------------------------------------------------- Part 1: model, autoencoder, projection head


def tiny_model(head="ae", act="relu", freeze=True):
    torch.manual_seed(0)
    ae = simclr.AutoEncoder(3 * 16 * 16, 64)
    backbone = simclr.make_backbone("resnet18", "cifar")
    emb = ae.embedding if head == "ae" else None
    return ae, simclr.SimCLR(backbone, simclr.projection_head(512, 64 if emb is None else emb, 32, act, freeze))


@pytest.fixture
def fake_imagenet_weights(monkeypatch):
    """A stand-in for torchvision's resnet18 with substitute 'ImageNet' weights (no download), a seeded state dict:
    torchvision's ResNet with one block per stage (resnet10's layers, half the time of resnet18's on a CPU)."""
    stand_in = lambda: torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    torch.manual_seed(7)
    substitute = stand_in().state_dict()

    def resnet18(weights=None):
        net = stand_in()
        if weights is not None:
            net.load_state_dict(substitute)
        return net
    monkeypatch.setattr(torchvision.models, "resnet18", resnet18)
    return substitute


def test_make_backbone_state_dict_loads_into_torchvision_resnet34():
    sd = simclr.make_backbone("resnet34", "imagenet").state_dict()
    missing, unexpected = torchvision.models.resnet34().load_state_dict(sd, strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    sd = simclr.make_backbone("resnet10", "imagenet").state_dict()  # resnet18 with the first block of each stage
    missing, unexpected = torchvision.models.resnet18().load_state_dict(sd, strict=False)
    assert unexpected == [] and {k.split(".")[0] + "." + k.split(".")[1] for k in missing} == {
        "fc.weight", "fc.bias", "layer1.1", "layer2.1", "layer3.1", "layer4.1"}


def test_make_backbone_pretrained_keeps_the_imagenet_stem_at_32px(fake_imagenet_weights, tmp_path, capsys):
    """ImageNet weights come with their 7x7 stride-2 conv1 and maxpool at every image size (the paper kept them at
    32 px); only a typed --stem cifar replaces conv1, and the run says so."""
    args = simclr.resolve_args(simclr.build_parser().parse_args(
        ["--dataset", "cifar10", "--arch", "resnet18", "--pretrained", "--out", str(tmp_path / "a")]))
    assert args.img_size == 32 and args.stem == "imagenet"
    net = simclr.make_backbone(args.arch, args.stem, args.pretrained)
    assert net.conv1.kernel_size == (7, 7) and net.conv1.stride == (2, 2)
    assert isinstance(net.maxpool, torch.nn.MaxPool2d)
    for k, v in net.state_dict().items():
        assert torch.equal(v, fake_imagenet_weights[k]), k
    simclr.main([*TINY, "--arch", "resnet18", "--pretrained", "--stem", "cifar", "--epochs", "0",  # weights: resnet18
                 "--out", str(tmp_path / "b")])
    assert "re-initialised" in capsys.readouterr().out


def test_autoencoder_is_the_papers_four_layer_mlp():
    ae = simclr.AutoEncoder(3 * 8 * 8, 128)
    linears = [m for m in ae.modules() if isinstance(m, torch.nn.Linear)]
    assert [(l.in_features, l.out_features) for l in linears] == [(192, 512), (512, 128), (128, 512), (512, 192)]
    out = ae(torch.rand(5, 192))
    assert out.shape == (5, 192) and out.min() >= 0 and out.max() <= 1  # sigmoid output


def test_train_autoencoder_reduces_reconstruction_error():
    x, _ = simclr.make_shapes(300, 8, seed=0)
    torch.manual_seed(0)
    ae0 = simclr.AutoEncoder(3 * 8 * 8, 32)
    flat = x.float().flatten(1) / 255
    mse0 = F.mse_loss(ae0(flat), flat).item()
    ae, best = simclr.train_autoencoder(x, 32, epochs=20, device="cpu", lr=1e-3, log=lambda s: None)
    assert best < 0.5 * mse0


def test_train_autoencoder_resumes_bit_identical(tmp_path):
    x, _ = simclr.make_shapes(200, 8, seed=0)
    quiet = lambda s: None
    train = lambda epochs, ckpt: simclr.train_autoencoder(
        x, 16, epochs, "cpu", lr=1e-3, log=quiet, **(simclr.autoencoder_checkpoint(ckpt, epochs, quiet) if ckpt else {}))
    torch.manual_seed(0)
    whole, _ = train(4, None)
    torch.manual_seed(0)
    train(2, str(tmp_path / "ae.pt"))  # "killed" after two epochs
    torch.manual_seed(123)  # whatever the process did meanwhile, the RNG state comes from the checkpoint
    resumed, _ = train(4, str(tmp_path / "ae.pt"))
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_train_autoencoder_keeps_the_best_epoch_and_halves_the_lr_after_ten_epochs_without_progress(monkeypatch,
                                                                                                    one_thread):
    """The paper's schedule and checkpoint: ReduceLROnPlateau(patience 10, factor 0.5) on the validation loss, and the
    weights of the epoch of lowest validation loss returned. With the validation losses imposed (epoch 2 the best,
    every later one worse), the lr halves after the 11th epoch without progress, epoch 13, and the weights returned
    are epoch 2's, not the last epoch's."""
    scores, real = iter([3.0, 1.0] + [2.0] * 12), F.mse_loss  # the validation MSE of each of 14 epochs
    monkeypatch.setattr(F, "mse_loss", lambda input, target, reduction="mean": real(input, target) if
                        reduction == "mean" else torch.tensor(next(scores) * target.numel()))
    epochs = []  # (weights, lr) after each epoch, as save() is handed them

    def save(s):
        epochs.append(({k: v.clone() for k, v in s["ae"].state_dict().items()}, s["opt"].param_groups[0]["lr"]))
    x = torch.randint(0, 256, (40, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ae, best = simclr.train_autoencoder(x, 8, 14, "cpu", lr=1e-3, save=save, log=lambda s: None)
    assert [lr for _, lr in epochs] == pytest.approx([1e-3] * 12 + [5e-4] * 2, rel=1e-12) and best == 1.0
    assert all(torch.equal(v, epochs[1][0][k]) for k, v in ae.state_dict().items())
    assert not all(torch.equal(v, epochs[-1][0][k]) for k, v in ae.state_dict().items())


def test_train_autoencoder_trains_on_nine_tenths_in_a_new_order_each_epoch_and_validates_on_the_rest(monkeypatch,
                                                                                                     one_thread):
    """Given no validation images, the paper's 90/10 split of the images (torch's random_split, seed 42): every epoch
    trains on each image of the 90% once, in an order of its own, and validates on the 10%, never trained on."""
    x = torch.randint(0, 256, (40, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x[:, 0, 0, 0] = torch.arange(40)  # each image's number, in its first pixel
    seen, real_ae = [], simclr.AutoEncoder

    class Watched(real_ae):
        def forward(self, flat):  # (B, 3HW) in [0, 1]: whether it trains, and the images' numbers
            seen.append((self.training, (flat[:, 0] * 255).round().long().tolist()))
            return super().forward(flat)
    monkeypatch.setattr(simclr, "AutoEncoder", Watched)
    simclr.train_autoencoder(x, 8, 3, "cpu", batch=8, log=lambda s: None)
    fit, val = (sorted(s.indices) for s in torch.utils.data.random_split(
        range(40), [0.9, 0.1], generator=torch.Generator().manual_seed(42)))
    epochs, trained = [], []  # (the images trained on in order, those validated on) of each epoch
    for training, numbers in seen:
        trained += numbers if training else []
        if not training:
            epochs.append((trained, numbers))
            trained = []
    assert len(epochs) == 3 and all(sorted(t) == fit and sorted(v) == val for t, v in epochs)
    assert len({tuple(t) for t, _ in epochs}) == 3


@pytest.mark.parametrize("freeze", [True, False])
def test_projection_head_takes_the_ae_embedding_its_width_and_frozen_still(freeze):
    ae, model = tiny_model(freeze=freeze)
    first = model.head[0]
    assert torch.equal(first.weight, ae.embedding.weight) and torch.equal(first.bias, ae.embedding.bias)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=1e-5)
    x = torch.rand(4, 3, 16, 16)
    z = model(simclr.normalize(torch.cat([simclr.augment(x), simclr.augment(x)])))
    simclr.nt_xent(z[:4], z[4:], 0.5).backward()
    opt.step()
    after = model.state_dict()
    emb_same = torch.equal(after["head.0.weight"], before["head.0.weight"]) and \
        torch.equal(after["head.0.bias"], before["head.0.bias"])
    assert emb_same == freeze
    assert not torch.equal(after["head.2.weight"], before["head.2.weight"])  # the output layer trains
    assert not torch.equal(after["backbone.conv1.weight"], before["backbone.conv1.weight"])  # so does f


@pytest.mark.parametrize("act", sorted(simclr.ACTIVATIONS))
@pytest.mark.parametrize("head", ["mlp", "ae"])
def test_projection_head_every_activation_builds_and_runs(head, act):
    _, model = tiny_model(head, act)
    assert isinstance(model.head[1], simclr.ACTIVATIONS[act])
    z = model(torch.rand(2, 3, 16, 16))
    assert z.shape == (2, 32) and torch.isfinite(z).all()


def test_projection_head_refuses_an_ae_embedding_of_the_wrong_width():
    with pytest.raises(ValueError, match="512-d backbone"):
        simclr.projection_head(2048, simclr.AutoEncoder(12, 64).embedding, 32, "relu")


# ---------------------------------------------------------------- Part 1: NT-Xent


def naive_nt_xent(z1, z2, tau):
    """Eq. (1) of SimCLR written one anchor at a time, in float64."""
    z = torch.cat([z1, z2]).double()
    N2 = len(z)
    total = 0
    for i in range(N2):
        j = (i + N2 // 2) % N2  # the other view of the same image
        sim = lambda a, b: torch.dot(z[a], z[b]) / (z[a].norm() * z[b].norm())
        num = torch.exp(sim(i, j) / tau)
        den = sum(torch.exp(sim(i, k) / tau) for k in range(N2) if k != i)
        total = total - torch.log(num / den)
    return total / N2


@pytest.mark.parametrize("N,D,tau", [(2, 3, 0.5), (5, 8, 0.1), (7, 4, 1.0)])
def test_nt_xent_matches_naive_loop_values_and_gradients(N, D, tau):
    g = torch.Generator().manual_seed(N)
    a, b = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
    z1, z2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss = simclr.nt_xent(z1, z2, tau)
    loss.backward()
    r1, r2 = a.double().requires_grad_(), b.double().requires_grad_()
    ref = naive_nt_xent(r1, r2, tau)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(z1.grad.double(), r1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(z2.grad.double(), r2.grad, rtol=1e-4, atol=1e-6)


def test_nt_xent_closed_form_for_orthonormal_pairs():
    # two identical views, all images orthogonal: every anchor sees cos 1 to its positive, 0 to 2N-2 negatives
    N, tau = 6, 0.5
    z = torch.eye(N)
    expected = math.log(1 + (2 * N - 2) * math.exp(-1 / tau))
    assert simclr.nt_xent(z, z, tau).item() == pytest.approx(expected, rel=1e-6)


def test_nt_xent_is_fp32_and_finite_for_bf16_inputs():
    z1, z2 = torch.randn(8, 16).bfloat16(), torch.randn(8, 16).bfloat16()
    loss = simclr.nt_xent(z1, z2, 0.05)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ---------------------------------------------------------------- Part 1: training


def small_simclr():
    """A SimCLR model small enough for a step in milliseconds, with BatchNorm, a bias and a head."""
    torch.manual_seed(3)
    backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    return simclr.SimCLR(backbone, simclr.projection_head(6, 8, 4, "relu"))


def test_param_groups_leave_batchnorm_and_biases_undecayed_and_frozen_weights_out():
    ae, model = tiny_model("ae", freeze=True)
    decay, no_decay = simclr.param_groups(model, wd=1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0
    ids = lambda ps: {id(p) for p in ps}
    bn = [p for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) for p in m.parameters()]
    biases = [m.bias for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias.requires_grad]
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
               and m.weight.requires_grad]
    assert ids(no_decay["params"]) == ids(bn + biases) and ids(decay["params"]) == ids(weights)
    frozen = ids([model.head[0].weight, model.head[0].bias])
    assert not frozen & (ids(decay["params"]) | ids(no_decay["params"]))
    assert len(decay["params"]) + len(no_decay["params"]) == sum(p.requires_grad for p in model.parameters())
    (everything,) = simclr.param_groups(model, wd=1e-4, decay_norm_and_bias=True)  # the paper's recipe
    assert ids(everything["params"]) == ids(p for p in model.parameters() if p.requires_grad)


def test_lr_at_follows_warmup_and_cosine_also_across_a_resume(tmp_path, monkeypatch):
    """The lr of every step against the closed form: linear warm-up to the peak over W steps, then cosine from the
    peak to peak/50 at the last step T. A run stopped after its first epoch and resumed continues the same curve."""
    peak, W, T = 0.1, 6, 18  # TINY: 96 images in batches of 16 = 6 steps an epoch; 3 epochs
    closed = [peak * (s + 1) / W if s < W else  # the peak at step W - 1 only, peak / 50 at the last step
              peak / 50 + (peak - peak / 50) * (1 + math.cos(math.pi * (s - W + 1) / (T - W))) / 2 for s in range(T)]
    assert sum(abs(lr - peak) < 1e-12 for lr in closed) == 1 and closed[-1] == pytest.approx(peak / 50)
    assert [simclr.lr_at(s, 4, 0, 1.0, 0.0) for s in range(4)] == pytest.approx([1, 0.75, 0.25, 0])  # no warm-up
    used, real_step, real_save = [], simclr.sgd_step, simclr.save_atomic

    def recording_step(model, views, opt, *a, **k):
        used.append([g["lr"] for g in opt.param_groups])
        return real_step(model, views, opt, *a, **k)

    class Stop(Exception):
        pass

    def save_then_stop(obj, path):  # the run dies right after its first checkpoint
        real_save(obj, path)
        raise Stop
    monkeypatch.setattr(simclr, "sgd_step", recording_step)
    flags = [*TINY, "--epochs", "3", "--lr", str(peak), "--warmup-epochs", "1"]
    simclr.main([*flags, "--out", str(tmp_path / "whole")])
    assert all(len(set(lrs)) == 1 for lrs in used)  # every parameter group steps with the same lr
    assert [lrs[0] for lrs in used] == pytest.approx(closed, rel=1e-12)
    monkeypatch.setattr(simclr, "save_atomic", save_then_stop)
    with pytest.raises(Stop):
        simclr.main([*flags, "--out", str(tmp_path / "stopped")])
    monkeypatch.setattr(simclr, "save_atomic", real_save)
    used.clear()
    simclr.main(["--resume", str(tmp_path / "stopped")])
    assert [lrs[0] for lrs in used] == pytest.approx(closed[6:], rel=1e-12)  # epochs 2 and 3


def test_train_copies_batches_from_host_memory_and_trains_on_them(monkeypatch):
    """A GPU run with its images in host memory copies each batch over (to_device). On a CPU the copy is a no-op, so
    to_device is made to invert (and count) what it copies: the run trains on what it returns, every batch."""
    import argparse
    hp = simclr.HParams(epochs=2, batch_size=8, lr=0.1, warmup_epochs=0.5, lr_min_ratio=0.02, crop_min=0.3)
    images = simclr.make_shapes(32, 8, seed=0)[0]
    runs = []
    for copy in (False, True):  # the inverted images as they are; the images, inverted by the "copy" to the device
        copies, real = [], simclr.to_device
        monkeypatch.setattr(simclr, "to_device", (lambda x, d: copies.append(len(x)) or 255 - x) if copy else real)
        torch.manual_seed(0)
        model = small_simclr()
        simclr.train(model, images if copy else 255 - images, hp, log=lambda s: None)
        runs.append(model.state_dict())
    assert copies == [8] * 8  # 2 epochs of 4 batches, each through to_device, and trained on what it returned
    for k, v in runs[0].items():
        assert torch.equal(v, runs[1][k]), k
    monkeypatch.undo()
    moved = simclr.to_device(images[:8], torch.device("meta"))  # the real copy, to a device other than the images'
    assert moved.device.type == "meta" and moved.shape == images[:8].shape and moved.dtype == torch.uint8


def test_train_steps_on_two_different_views_of_each_image_in_a_seeded_order_new_each_epoch(monkeypatch, one_thread):
    """Every step of train() hands f two different random views of each of its N images (rows i and i + N: one view
    twice would leave NT-Xent nothing to learn), and every epoch visits each image once, in an order of its own drawn
    from hp.seed alone: another epoch, another order; another state of the global RNG (the augmentations'), the same."""
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images[:, 0, 0, 0] = torch.arange(32)  # each image's number, in its first pixel

    real = simclr.two_views

    def run(seed, global_seed):
        visited, views = [], []
        monkeypatch.setattr(simclr, "two_views", lambda x, hp: visited.extend(x[:, 0, 0, 0].tolist()) or real(x, hp))
        model = small_simclr()
        model.backbone.register_forward_pre_hook(lambda module, args: views.append(args[0]))
        torch.manual_seed(global_seed)
        simclr.train(model, images, simclr.HParams(epochs=3, batch_size=8, lr=0.1, warmup_epochs=0, seed=seed),
                     log=lambda s: None)
        return [visited[32 * e:32 * (e + 1)] for e in range(3)], views
    orders, views = run(seed=0, global_seed=0)
    assert len(views) == 12 and all(((v[:8] - v[8:]).flatten(1).abs().amax(1) > 0).all() for v in views)  # (16, ...)
    assert all(sorted(order) == list(range(32)) for order in orders) and len(set(map(tuple, orders))) == 3
    assert run(seed=0, global_seed=1)[0] == orders and run(seed=1, global_seed=0)[0] != orders


def test_pretrain_with_the_machinery_off_trains_part1s_weights_bit_for_bit(tmp_path, one_thread):
    """What `python simclr.py` trains, Part 2's loop with its machinery off (one process, fp32, no compile, recipe
    simclr), ends with the weights of Part 1's train() from the same start, images and seed, to the bit: the views
    and the epochs' orders that Part 1's tests check are those of Part 2's loop too."""
    flags = [*TINY, "--epochs", "2", "--precision", "fp32", "--warmup-epochs", "1"]
    simclr.main([*flags, "--out", str(tmp_path / "run")])
    args = simclr.parse_args([*flags, "--out", str(tmp_path / "run")])
    hp = simclr.HParams(**{f.name: getattr(args, f.name) for f in dataclasses.fields(simclr.HParams)})
    torch.manual_seed(0)
    model = simclr.SimCLR(simclr.make_backbone(args.arch, args.stem), simclr.projection_head(512, 512, 128, "relu"))
    torch.manual_seed(0)  # in the memory layout simclr_on_shapes() trains in, as Part 2 does
    simclr.train(model.to(memory_format=torch.channels_last), simclr.make_shapes(96, 16, seed=0)[0], hp,
                 log=lambda s: None)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["model"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k


# ---------------------------------------------------------------- Part 1: evaluation


def test_linear_probe_and_knn_top1_separate_separable_data_and_fail_on_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (600,), generator=g)
    centres = torch.randn(3, 20, generator=g) * 4
    h = centres[y] + torch.randn(600, 20, generator=g)
    assert simclr.linear_probe(h[:400], y[:400], h[400:], y[400:], 3) > 0.97
    assert simclr.knn_top1(h[:400], y[:400], h[400:], y[400:], 3, k=20) > 0.97
    noise = torch.randn(600, 20, generator=g)  # labels independent of features: chance level
    assert simclr.linear_probe(noise[:400], y[:400], noise[400:], y[400:], 3) < 0.5


def test_linear_probe_standardises_by_the_train_features_and_its_l2_term_holds_the_weights_alone():
    """The test features are standardised with the train features' mean and std: a test split of one class is
    classified as well as a mixed one (its own mean would move it to the train split's centre, inside the other
    class). The L2 term penalises the weights, not the bias: so strong that the weights vanish, the bias alone fits
    the train split's class frequencies and every image gets the majority class (half of this test split)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(2, 10, generator=g) * 2

    def draw(n0, n1):
        y = torch.cat([torch.zeros(n0), torch.ones(n1)]).long()
        return centres[y] + torch.randn(len(y), 10, generator=g), y
    (h, y), (test_h, test_y) = draw(360, 40), draw(100, 100)  # train: 90% of class 0, its mean near class 0's
    assert simclr.linear_probe(h, y, test_h, test_y, 2) > 0.97
    assert simclr.linear_probe(h, y, test_h[test_y == 1], test_y[test_y == 1], 2) > 0.97
    assert simclr.linear_probe(h, y, test_h, test_y, 2, wd=100) == 0.5


def test_knn_top1_weighs_each_vote_by_exp_of_its_similarity_over_the_temperature():
    """The k = 3 neighbours of a query of class 0: one of class 0 at cosine 0.99, two of class 1 at cosine 0.5. Class 0
    gets exp(0.99 / T), class 1 2 exp(0.5 / T): the closed form's winner at T = 0.1 (class 0) and at T = 1 (class 1)
    is knn_top1's. Plain votes, or weights that ignore T, give one of the two wrong."""
    unit = lambda cos, sign=1: [cos, sign * math.sqrt(1 - cos ** 2)]
    train_h, train_y = torch.tensor([unit(0.99), unit(0.5), unit(0.5, -1)]), torch.tensor([0, 1, 1])
    winner = lambda T: int(2 * math.exp(0.5 / T) > math.exp(0.99 / T))
    assert [winner(0.1), winner(1.0)] == [0, 1]
    for T in (0.1, 1.0):
        top1 = simclr.knn_top1(train_h, train_y, torch.tensor([[1.0, 0.0]]), torch.tensor([0]), 2, k=3, temperature=T)
        assert top1 == (winner(T) == 0)


def test_extract_features_uses_eval_mode_and_restores_train_mode():
    net = simclr.make_backbone("resnet18", "cifar")
    net.train()
    x = (torch.rand(6, 3, 16, 16) * 255).to(torch.uint8)
    f1 = simclr.extract_features(net, x, batch=2)
    f2 = simclr.extract_features(net, x, batch=6)  # eval mode: features do not depend on the batch
    torch.testing.assert_close(f1, f2, atol=1e-5, rtol=1e-5)
    assert net.training


def test_nearest_matches_a_brute_force_loop_over_all_pairs():
    g = torch.Generator().manual_seed(0)
    q, pool = torch.randn(5, 7, generator=g).double(), torch.randn(40, 7, generator=g).double()
    sim, idx = simclr.nearest(q, pool, 8)
    for i in range(5):
        cos = [(q[i] @ pool[j] / (q[i].norm() * pool[j].norm())).item() for j in range(40)]
        order = sorted(range(40), key=lambda j: -cos[j])[:8]
        assert idx[i].tolist() == order
        assert sim[i].tolist() == pytest.approx([cos[j] for j in order], abs=1e-12)
    assert simclr.nearest(q, pool[:3], 8)[1].shape == (5, 3)  # fewer than k in the pool: all of them


# ---------------------------------------------------------------- Part 1: the embedded data, a run end to end


def test_make_shapes_is_deterministic_balanced_and_varied():
    x, y = simclr.make_shapes(500, 32, seed=3)
    x2, y2 = simclr.make_shapes(500, 32, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == (500, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.bincount(y, minlength=10).min() > 25
    assert x.float().std(0).mean() > 30  # position, colour and clutter vary from image to image


RUN_PART1 = """
import json, sys
src = open("simclr.py").read()
ns = {"__name__": "part1"}
exec(compile(src[:src.index("\\n# Part 2")], "part1", "exec"), ns)  # the text above the '# Part 2' banner, alone
seen, real_train = {}, ns["train"]
ns["train"] = lambda model, images, hp, **k: seen.update(vars(hp)) or real_train(model, images, hp, **k)
r = ns["simclr_on_shapes"](epochs=1, n=(128, 64), head="ae", act="sigmoid", device="cpu", log=lambda s: None)
print(json.dumps(dict(results=r, hp=seen)))
"""


def test_simclr_on_shapes_runs_part1_alone_with_the_command_lines_hyper_parameters(tmp_path):
    """The tutorial core (simclr.py above '# Part 2') runs in a fresh interpreter with nothing below it: it trains
    an autoencoder, pre-trains on shapes and probes. It imports only the standard library, torch, torchvision and
    numpy, and its run uses the hyper-parameters that `python simclr.py` resolves for shapes."""
    import ast
    src = open(os.path.join(HERE, "simclr.py")).read()
    core = src[:src.index("\n# Part 2")]
    assert len(core.splitlines()) <= 650
    imported = {(a.name if isinstance(n, ast.Import) else n.module).split(".")[0]
                for n in ast.walk(ast.parse(core)) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    assert imported - sys.stdlib_module_names <= {"torch", "torchvision", "numpy"}
    out = json.loads(run_script("-c", RUN_PART1).splitlines()[-1])
    assert all(0 <= v <= 1 for r in out["results"].values() for v in r.values()) and len(out["results"]) == 2
    cli = vars(simclr.parse_args(["--epochs", "1", "--out", str(tmp_path)]))
    assert out["hp"] == {k: cli[k] for k in out["hp"]}


def test_simclr_py_every_function_fits_on_a_screen():
    """No function of simclr.py longer than 80 lines: a reader sees each one whole, on one screen."""
    import ast
    tree = ast.parse(open(os.path.join(HERE, "simclr.py")).read())
    lengths = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    assert {name: n for name, n in lengths.items() if n > 80} == {}


# ---------------------------------------------------------------- Part 2: command line


@pytest.mark.parametrize("argv,message", [
    (["--dataset", "mnist2"], "argument --dataset: invalid choice: 'mnist2'"),
    (["--arch", "vgg16"], "argument --arch: invalid choice: 'vgg16'"),
    (["--batch-size", "1"], "argument --batch-size: must be at least 2"),
    (["--tau", "0"], "argument --tau: must be > 0 (got 0.0)"),
    (["--head", "ae", "--arch", "resnet50"], "512-d backbone"),
    (["--no-freeze"], "--no-freeze only applies to --head ae"),
    (["--ae-dim", "128"], "--ae-dim only applies to --head ae"),
    (["--head", "ae", "--proj-hidden", "128"], "use --ae-dim 128"),  # the ae head's width is d: never ignored
    (["--head", "ae", "--ae-dim", "0"], "argument --ae-dim: must be in 1..65536 (got 0)"),
    (["--batch-size", "1", "--dry-run"], "argument --batch-size: must be at least 2"),  # before --dry-run sets it
    (["--epochs", "-3", "--dry-run"], "argument --epochs: must be >= 0 (got -3)"),
    (["--epochs", "2.5"], "argument --epochs: takes integers (got '2.5')"),
    (["--lr", "nan"], "argument --lr: must be > 0 (got nan)"),
    (["--lr", "inf"], "argument --lr: must be > 0 (got inf)"),
    (["--crop-min", "0"], "argument --crop-min: must be in (0, 1]"),
    (["--blur-prob", "1.5"], "argument --blur-prob: must be in [0, 1]"),
    (["--momentum", "1"], "argument --momentum: must be in [0, 1)"),
    (["--img-size", "0"], "argument --img-size: must be in 8..1024"),
    (["--warmup-epochs", "-1"], "argument --warmup-epochs: must be in [0, 10000]"),
    (["--warmup-epochs", "1e308"], "argument --warmup-epochs: must be in [0, 10000]"),
    (["--knn-k", "0"], "argument --knn-k: must be >= 1"),
    (["--label-fractions", "0.1", "--labels-per-class", "5"], "--labels-per-class: not allowed with argument --lab"),
    (["--label-fractions", "0"], "argument --label-fractions: must be in (0, 1] (got 0.0)"),
    (["--label-fractions", "0.1,1.5"], "argument --label-fractions: must be in (0, 1] (got 1.5)"),
    (["--label-fractions", "0.1,,1"], "argument --label-fractions: takes comma-separated numbers"),
    (["--labels-per-class", "2.5"], "argument --labels-per-class: takes comma-separated integers"),
    (["--labels-per-class", "0,10"], "argument --labels-per-class: must be at least 1 (got 0)"),
    (["--label-fractions", "0.1", "--recipe", "paper"], "add --eval standard"),
    (["--label-draws", "0"], "argument --label-draws: must be in 1..1000"),
    (["--sup-steps", "0"], "argument --sup-steps: must be >= 1"),
    (["--labels-per-class", ""], "argument --labels-per-class: takes comma-separated integers"),
    (["--show-neighbours", "nb.jpg"], "argument --show-neighbours: give the name of a .png file (got 'nb.jpg')"),
    (["--labels-per-class", "10,1000", "--subset", "100"], "--labels-per-class 1000: the smallest class has"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--seed", "-1"], "argument --seed: must be in 0..4294967295 (got -1)"),
    (["--seed", "4294967296"], "argument --seed: must be in 0..4294967295 (got 4294967296)"),
    (["--img-size", "100000"], "argument --img-size: must be in 8..1024 (got 100000)"),
    (["--proj-out", "10000000000"], "argument --proj-out: must be in 1..65536"),
    (["--device", "tpu"], "--device tpu: not a device; use cuda, cuda:N, mps or cpu"),
    (["--device", "mps"], "--device mps: this machine has no such device; use --device cpu"),
    (["--resume", ""], "argument --resume: give the name of a folder (got '')"),
    (["--ae-epochs", "5"], "--ae-epochs only applies to --head ae"),
    (["--ae-dir", "{dir}"], "--ae-dir only applies to --head ae"),
    (["--out", ""], "argument --out: give the name of a folder (got '')"),
    (["--out", "{file}"], "is a file, not a folder"),
    (["--out", "{file}/run"], "argument --out: {file} is a file, not a folder"),
    (["--show-augs", "augs.txt"], "argument --show-augs: give the name of a .png or .jpg or .jpeg file (got 'augs.txt')"),
    (["--show-augs", "{dir}"], "give the name of a .png or .jpg or .jpeg file"),
    (["--show-augs", "{dir}/.png"], "give the name of a .png or .jpg or .jpeg file"),
    (["--head", "ae", "--ae-dir", ""], "argument --ae-dir: give the name of a folder (got '')"),
    (["--show-neighbours", "{file}/nb.png"], "--show-neighbours"),
    (["--head", "ae", "--ae-dir", "{file}"], "--ae-dir"),
    (["--dataset", "cifar10", "--data-dir", "{file}"], "argument --data-dir: {file} is a file, not a folder"),
    (["--eval", "paper", "--subset", "3", "--batch-size", "2"], "--eval paper splits 2 test images 70/10/20"),
    (["--lr", "-inf"], "argument --lr: must be > 0 (got -inf)"),  # a value, not a flag: argparse's rule is -1 or -.5
    (["--lr", "-1e5"], "argument --lr: must be > 0 (got -100000.0)"),
    (["--lr", "1e308"], "argument --lr: must be at most 3.4e+38, float32's largest (got 1e+308)"),  # SGD overflowed
    (["--wd", "1e39"], "argument --wd: must be at most 3.4e+38, float32's largest (got 1e+39)"),
    (["--out", "{link}"], "argument --out: {link} is a link to {dir}/nowhere, which does not exist: create that"),
    (["--out", "{link}/run"], "argument --out: {link} is a link to {dir}/nowhere, which does not exist"),
])
def test_main_refuses_bad_flags_in_one_line(argv, message, refused, tmp_path):
    """Every flag's rule, every path the run will write, the device: each refused before anything heavy runs, in one
    line with what to do, exit 2, no traceback."""
    (tmp_path / "a_file").write_text("not a folder")
    (tmp_path / "a_link").symlink_to(tmp_path / "nowhere")  # os.makedirs would say "File exists"
    fill = lambda s: s.format(file=tmp_path / "a_file", dir=tmp_path, link=tmp_path / "a_link")
    argv = [fill(a) for a in argv]
    assert fill(message) in refused(argv + ([] if "--out" in argv else ["--out", str(tmp_path / "run")]))


def test_resolve_args_recipes_resolve_to_their_sources_and_typed_flags_win(tmp_path):
    resolve = lambda *argv: simclr.resolve_args(simclr.build_parser().parse_args([*argv, "--out", str(tmp_path)]))
    a = resolve("--dataset", "cifar10")  # simclr recipe, from scratch
    assert (a.pretrained, a.stem, a.eval, a.decay_norm_and_bias) == (False, "cifar", "standard", False)
    assert a.warmup_epochs == 10 and a.lr == pytest.approx(0.3 * (1280 / 256) ** 0.5)  # 150 epochs: SimCLR's 10
    assert resolve("--epochs", "20").warmup_epochs == 2  # a short run: a tenth of it
    p = resolve("--dataset", "stl10", "--recipe", "paper")  # Sec. 4 of 2408.14514
    assert (p.pretrained, p.arch, p.stem, p.warmup_epochs, p.eval, p.stl10_pretrain, p.tau, p.crop_min) == \
        (True, "resnet34", "imagenet", 0, "paper", "train", 0.5, 0.08)
    assert p.decay_norm_and_bias and p.lr == pytest.approx(0.3 * 500 / 256) and p.epochs == 150
    assert resolve("--recipe", "paper").lr == pytest.approx(0.3 * 64 / 256)
    s = resolve()  # the first run: SHAPES' own rate at its batch, the square-root rule from there
    assert (s.arch, s.lr, s.epochs, s.crop_min, resolve("--batch-size", "256").lr) == ("resnet10", 0.012, 7, 0.5, 0.024)
    assert resolve("--recipe", "paper", "--eval", "standard", "--warmup-epochs", "2").eval == "standard"
    assert resolve("--device", "cuda").precision == "bf16" and resolve("--recipe", "paper", "--device",
                                                                        "cuda").precision == "fp32"  # the paper's


def test_resolve_args_sizes_a_folder_for_a_cpu_only_on_a_cpu(tmp_path, refused):
    make_folder(tmp_path / "large", size=(200, 150))
    folder = lambda *argv: simclr.parse_args(["--dataset", "folder", "--data-dir", str(tmp_path / "large"), *argv,
                                              "--out", str(tmp_path / "out")])
    cpu, gpu = folder("--device", "cpu"), folder("--device", "cuda")
    assert (cpu.arch, cpu.stem, cpu.img_size, cpu.batch_size, cpu.epochs, cpu.lr) == ("resnet10", "imagenet", 32, 64,
                                                                                      20, 0.012)
    assert (gpu.arch, gpu.stem, gpu.img_size, gpu.batch_size, gpu.epochs) == ("resnet34", "imagenet", 96, 256, 100)
    assert (folder("--device", "cpu", "--arch", "resnet34").arch, folder("--device", "cpu", "--epochs", "10").epochs) \
        == ("resnet34", 10)  # typed flags win
    assert "no ImageNet weights for resnet10" in refused(["--arch", "resnet10", "--pretrained"])


@pytest.mark.parametrize("img,stem", [(32, "imagenet"), (17, "imagenet"), (16, "imagenet"), (8, "cifar")])
def test_resolve_args_precision_auto_picks_bf16_only_where_its_gradients_hold(img, stem, tmp_path, monkeypatch):
    """--precision auto on a CPU: fp32 without native bf16; with it, bf16 autocast except for images so small that a
    stride-2 conv sees a 1x1 map (16 px or less with the ImageNet stem), where oneDNN's bf16 backward gives garbage
    weight gradients at random. On a CPU with native bf16, where auto picks bf16, its weight gradients agree with fp32
    ones up to bf16 rounding."""
    native = simclr.cpu_has_bf16()  # this CPU's, before the stand-ins below
    precision = lambda native: monkeypatch.setattr(simclr, "cpu_has_bf16", lambda: native) or simclr.resolve_args(
        simclr.build_parser().parse_args(["--img-size", str(img), "--stem", stem, "--device", "cpu", "--out",
                                          str(tmp_path)])).precision
    assert precision(False) == "fp32"
    assert precision(True) == ("fp32" if (img, stem) == (16, "imagenet") else "bf16")
    if not native or precision(True) == "fp32":
        return  # the gradients below are those of oneDNN's native bf16 kernels, which this CPU lacks
    torch.manual_seed(0)
    net = simclr.make_backbone("resnet18", stem)
    x = torch.randn(16, 3, img, img)
    grads = {}
    for p in ["fp32"] + ["bf16"] * 6:  # bf16 six times: the bad kernel goes wrong at random
        net.zero_grad()
        with simclr.autocast_for(torch.device("cpu"), p)():
            h = net(x)
        h.float().square().mean().backward()
        for name, w in net.named_parameters():
            grads.setdefault(name, []).append(w.grad.clone())
    for name, (g32, *g16s) in grads.items():  # bf16 rounding through 18 layers: up to ~0.5 of the norm here; the
        for g16 in g16s:  # garbage measured 10^2 to 10^36 times the gradient
            assert (g16 - g32).norm() <= g32.norm(), name


def test_resolve_args_runs_a_folder_of_small_images_at_their_own_size(tmp_path):
    make_folder(tmp_path / "small", size=(8, 8))
    make_folder(tmp_path / "large", size=(200, 150))
    side = lambda d: simclr.parse_args(["--dataset", "folder", "--data-dir", str(tmp_path / d), "--out",
                                        str(tmp_path / "out")]).img_size
    assert side("small") == 8 and side("large") == 32  # the median side, at most the default (on a CPU: 32)


# ---------------------------------------------------------------- Part 2: runs that can stop, and resume


def test_parse_args_resume_with_different_flags_names_them(tmp_path, refused):
    saved_config(tmp_path, "--tau", "0.5", "--epochs", "3")
    err = refused(["--resume", str(tmp_path), "--tau", "0.2"])
    assert "--tau: saved 0.5, given 0.2" in err and "drop these flags, or start a new run" in err


def test_parse_args_resume_checks_typed_flags_against_the_saved_run_not_the_defaults(tmp_path, refused):
    """--no-freeze is valid for the saved --head ae run: it must not be refused as if --head were the default mlp."""
    saved_config(tmp_path, "--head", "ae", "--no-freeze", "--tau", "0.5")
    err = refused(["--resume", str(tmp_path), "--no-freeze", "--tau", "0.2"])
    assert "only applies" not in err
    assert "--tau: saved 0.5, given 0.2" in err and "--no-freeze" not in err


@pytest.mark.parametrize("saved,typed,named", [
    (["--head", "mlp"], ["--head", "ae"], "--head: saved 'mlp', given 'ae'"),  # its saved --proj-hidden is not typed
    (["--head", "ae", "--arch", "resnet34"], ["--arch", "resnet50"], "--arch: saved 'resnet34', given 'resnet50'"),
    (["--recipe", "paper", "--standardize"], ["--recipe", "simclr"], "--recipe: saved 'paper', given 'simclr'")])
def test_parse_args_resume_with_a_flag_that_decides_which_others_apply_names_it(tmp_path, refused, saved, typed, named):
    """A new --head, --arch or --recipe is a different run: the message names it, not a saved value the user never
    typed (the ae head refusing the MLP run's saved --proj-hidden)."""
    saved_config(tmp_path, *saved)
    err = refused(["--resume", str(tmp_path), *typed])
    assert named in err and "drop these flags, or start a new run" in err


def test_parse_args_resume_names_a_typed_flag_that_the_saved_run_excludes_not_its_config(tmp_path, refused):
    saved_config(tmp_path, "--label-fractions", "0.1")
    err = refused(["--resume", str(tmp_path), "--labels-per-class", "5"])
    assert "argument --labels-per-class: not allowed with argument --label-fractions" in err and "config" not in err


def test_parse_args_gpu_run_resumed_on_the_cpu_takes_the_cpus_precision_and_no_compile(tmp_path, monkeypatch):
    saved_config(tmp_path, "--device", "cuda")  # resolved for a GPU: bf16, compiled
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["precision"], cfg["compile"]) == ("bf16", True)
    for native, expected in ((False, "fp32"), (True, "bf16")):  # a CPU without and with native bf16
        monkeypatch.setattr(simclr, "cpu_has_bf16", lambda: native)
        args = simclr.parse_args(["--resume", str(tmp_path), "--device", "cpu"])
        assert (args.device, args.precision, args.compile) == ("cpu", expected, False)
    saved_config(tmp_path, "--device", "cuda", "--precision", "fp32")
    assert simclr.parse_args(["--resume", str(tmp_path), "--device", "cpu"]).precision == "fp32"  # fp32 stays fp32


@pytest.mark.parametrize("text,message", [('{"argv": ["--tau", "0.5", "--epo', "JSONDecodeError"),  # cut short
                                          ('[1, 2]', "TypeError"), ('{"tau": 0.5}', "KeyError: 'argv'"),
                                          (None, "FileNotFoundError")])
def test_parse_args_refuses_a_config_that_cannot_be_read(tmp_path, refused, text, message):
    if text is not None:
        (tmp_path / "config.json").write_text(text)
    err = refused(["--resume", str(tmp_path)])
    assert f"{tmp_path / 'config.json'} cannot be read" in err and message in err


@pytest.mark.parametrize("edit,message", [(["--epochs", "three"], "argument --epochs: takes integers (got 'three')"),
                                          (["--head", "cnn"], "argument --head: invalid choice: 'cnn'"),
                                          (["--lr", "-1"], "argument --lr: must be > 0 (got -1.0)"),
                                          (["--no-such-flag"], "unrecognized arguments: --no-such-flag")])
def test_parse_args_checks_a_saved_command_line_by_its_flags_rules(tmp_path, refused, edit, message):
    """A resume parses the run's saved command line again: a hand edit of it meets its flag's rule, in one line that
    names the config.json."""
    saved_config(tmp_path, "--epochs", "3")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(cfg, argv=cfg["argv"] + edit)))
    assert f"{tmp_path / 'config.json'}: its command line: {message}" in refused(["--resume", str(tmp_path)])


@pytest.mark.parametrize("key,value,message", [
    ("img_size", None, "its img_size is None, its command line gives 16"),
    ("no_download", "yes", "its no_download is 'yes', its command line gives False"),
    ("label_amounts", 5, "its label_amounts is 5, its command line gives []"),
    ("decay_norm_and_bias", True, "its decay_norm_and_bias is True, its command line gives False"),
    ("label_amounts", "delete", "it has no label_amounts")])
def test_parse_args_refuses_config_values_its_command_line_does_not_give(tmp_path, refused, key, value, message):
    """config.json holds the run's command line and every value resolved from it: a value that its command line does
    not give (a hand edit, a missing one) is refused, not resumed with."""
    saved_config(tmp_path, *TINY, "--epochs", "0")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop(key) if value == "delete" else cfg.update({key: value})
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    err = refused(["--resume", str(tmp_path)])
    assert message in err and "edited by hand? Put back what its command line gives." in err  # not: a new run


def test_parse_args_refuses_a_config_of_another_version_naming_what_it_lacks(tmp_path, refused):
    """A config.json without a flag of this simclr.py (an older version wrote it) is refused, never half-resumed."""
    saved_config(tmp_path, "--epochs", "1")
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["ae_dim"], cfg["workers"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    err = refused(["--resume", str(tmp_path)])
    assert "config.json: it has no ae_dim" in err and "another version" in err


def test_parse_args_refuses_a_resume_into_another_out_folder(tmp_path, refused):
    saved_config(tmp_path, "--epochs", "3")
    assert "goes on in its own folder; drop --out" in refused(["--resume", str(tmp_path), "--out", str(tmp_path / "elsewhere")])
    assert not (tmp_path / "elsewhere").exists()


def test_open_run_dir_refuses_a_folder_holding_another_run(tmp_path, refused):
    (tmp_path / "config.json").write_text("{}")
    assert "already holds a run" in refused(["--out", str(tmp_path)])


def test_open_run_dir_two_runs_never_share_a_folder(tmp_path, refused):
    import fcntl
    saved_config(tmp_path, *TINY, "--epochs", "1")
    with open(tmp_path / ".lock", "w") as held:  # as another run of the folder holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert "is in use by another run of simclr.py" in refused(["--resume", str(tmp_path)])
    assert "linear_top1" in simclr.main(["--resume", str(tmp_path)])  # the lock went with its holder


def test_write_atomic_failing_inside_torch_save_is_an_os_error_naming_the_file(tmp_path):
    """On a full disk torch.save's zip writer raises a RuntimeError while handling the OSError: the OSError is what
    the run reports (and main turns into one line); no temporary file stays."""
    import errno

    def full(f):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")
    with pytest.raises(OSError) as e:
        simclr.write_atomic(str(tmp_path / "checkpoint.pt"), full)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "checkpoint.pt")
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError):  # a RuntimeError of its own is not a disk's
        simclr.write_atomic(str(tmp_path / "x.pt"), lambda f: (_ for _ in ()).throw(RuntimeError("bug")))


def test_write_atomic_writes_with_the_umask_for_others_sharing_the_folder(tmp_path):
    """The mode a plain open() would give under the process's umask (mkstemp's is 0600): simclr imported under umask
    027, then again under 002, in a process of its own (one: each start imports torch, seconds on 2 cores)."""
    code = ("import importlib, os, sys, simclr\n"
            "for umask, name in ((0o027, 'a'), (0o002, 'b')):\n"
            "    os.umask(umask)\n"
            "    importlib.reload(simclr)  # reads the umask as an import does\n"
            "    simclr.write_atomic(os.path.join(sys.argv[1], name), lambda f: f.write(b'x'))\n")
    run_script("-c", code, str(tmp_path))
    assert [os.stat(tmp_path / name).st_mode & 0o777 for name in "ab"] == [0o640, 0o664]


def test_write_atomic_on_a_full_disk_names_the_file_and_leaves_the_previous_one_whole(tmp_path, monkeypatch, refused):
    import errno
    path = tmp_path / "results.json"
    path.write_text("the previous results")

    def full(f):
        f.write(b"half of it")
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError) as e:
        simclr.write_atomic(str(path), full)
    assert e.value.filename == str(path) and path.read_text() == "the previous results"
    assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left behind
    real = simclr.write_atomic
    monkeypatch.setattr(simclr, "write_atomic", lambda p, w: real(p, full if p.endswith("config.json") else w))
    assert "config.json: No space left on device; free some space" in refused([*TINY, "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run" / "config.json").exists()  # the folder takes a new run once there is space


@pytest.mark.parametrize("edit", [None, dict(epoch=5), dict(epoch=1.0), dict(metrics=[]), dict(metrics={})])
def test_resume_checkpoint_refuses_a_corrupt_checkpoint_naming_the_file(tmp_path, refused, edit):
    """Bytes that are no checkpoint, and a checkpoint whose epoch is not one of the run's (5 of 1, a float) or whose
    metrics are not one line per trained epoch: refused before any training, not resumed past its end."""
    out = tmp_path / "run"
    simclr.main([*TINY, "--epochs", "1", "--out", str(out)])  # in-process: the suite stays fast
    if edit is None:
        (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    else:
        torch.save({**torch.load(out / "checkpoint.pt", weights_only=False), **edit}, out / "checkpoint.pt")
    err = refused(["--resume", str(out)])
    assert "checkpoint.pt" in err and "corrupt" in err


def test_resume_checkpoint_with_another_number_of_processes_says_so(tmp_path, refused):
    out = tmp_path / "run"
    simclr.main([*TINY, "--epochs", "1", "--out", str(out)])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    ckpt["rng"] = ckpt["rng"] * 2  # as if saved by 2 processes
    torch.save(ckpt, out / "checkpoint.pt")
    err = refused(["--resume", str(out)])
    assert "corrupt" not in err
    assert "saved by 2 process(es) and is resumed by 1" in err and "torchrun --nproc_per_node 2" in err


def test_autoencoder_checkpoint_is_written_at_the_end_and_every_few_minutes(tmp_path, monkeypatch):
    x, _ = simclr.make_shapes(200, 8, seed=0)
    saves = []
    monkeypatch.setattr(simclr, "save_atomic", lambda obj, path: saves.append(obj))
    quiet = lambda s: None
    ckpt = lambda name, epochs: simclr.autoencoder_checkpoint(str(tmp_path / name), epochs, quiet)
    simclr.train_autoencoder(x, 16, 5, "cpu", lr=1e-3, log=quiet, **ckpt("ae.pt", 5))
    assert [s["epoch"] for s in saves] == [5]  # not every epoch
    monkeypatch.setattr(simclr, "AE_SAVE_EVERY_S", -1)
    saves.clear()
    simclr.train_autoencoder(x, 16, 3, "cpu", lr=1e-3, log=quiet, **ckpt("ae2.pt", 3))
    assert [s["epoch"] for s in saves] == [1, 2, 3]


def test_main_killed_run_resumes_bit_identical(tmp_path):
    """A run SIGKILLed after its first epoch's checkpoint, then resumed, ends with exactly the weights of the
    same run left alone (model, optimizer, scheduler and every RNG are restored)."""
    flags = TINY + ["--epochs", "3"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    threads = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # this process's: the same sums
    p = subprocess.Popen([sys.executable, "simclr.py", *flags, "--out", str(killed)], cwd=HERE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=threads)

    def kill_at_the_first_checkpoint():
        while not (killed / "checkpoint.pt").exists() and p.poll() is None:
            time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
    killer = threading.Thread(target=kill_at_the_first_checkpoint)
    killer.start()
    simclr.main([*flags, "--out", str(whole)])  # the run left alone, here, while the other starts (seconds of imports)
    killer.join()
    assert p.wait() == -signal.SIGKILL, p.stderr.read()
    saved = torch.load(killed / "checkpoint.pt", weights_only=False)["epoch"]
    assert saved < 3, "the kill came too late"
    with open(killed / "metrics.jsonl", "a") as f:  # as if killed after logging the next epoch, mid-line
        f.write(json.dumps(dict(epoch=saved + 1, loss=0.0)) + '\n{"epoch": ')
    simclr.main(["--resume", str(killed)])
    metrics = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    resumed = metrics(killed)
    assert [m["epoch"] for m in resumed] == [1, 2, 3]  # each epoch once
    assert [m["loss"] for m in resumed] == [m["loss"] for m in metrics(whole)]
    a = torch.load(whole / "checkpoint.pt", weights_only=False)
    b = torch.load(killed / "checkpoint.pt", weights_only=False)
    assert a["epoch"] == b["epoch"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert json.loads((whole / "results.json").read_text())["linear_top1"] == \
        json.loads((killed / "results.json").read_text())["linear_top1"]
    # the pre-training time of the whole run, not of its last stretch
    assert json.loads((killed / "results.json").read_text())["pretrain_seconds"] >= sum(m["epoch_s"] for m in resumed)


@pytest.fixture(scope="module")
def stopped_runs(tmp_path_factory):
    """Two runs of simclr.py started together (each start imports torch, seconds on 2 cores) and stopped as a user
    stops them: one by SIGTERM after its first checkpoint, one by closing its output pipe after a line of training
    (as | head), as soon as the line comes (stdout not a terminal: buffered unless the script says otherwise).
    {name: (its folder, stderr, exit code)}; "ended_before_its_line": whether the piped run had been evaluated."""
    tmp = tmp_path_factory.mktemp("stopped")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    start = lambda name, epochs, stdout: subprocess.Popen(
        [sys.executable, "simclr.py", *TINY, "--epochs", epochs, "--out", str(tmp / name)], cwd=HERE, stdout=stdout,
        stderr=subprocess.PIPE, text=True, env=env)
    runs = dict(sigterm=start("sigterm", "50", subprocess.DEVNULL), pipe=start("pipe", "2", subprocess.PIPE))
    try:
        while "epoch 1/2" not in runs["pipe"].stdout.readline():
            assert runs["pipe"].poll() is None, runs["pipe"].stderr.read()
        ended = (tmp / "pipe" / "results.json").exists()  # evaluated: the line came out with the last ones
        runs["pipe"].stdout.close()
        while not (tmp / "sigterm" / "checkpoint.pt").exists() and runs["sigterm"].poll() is None:
            time.sleep(0.02)
        runs["sigterm"].send_signal(signal.SIGTERM)
        return dict({name: (tmp / name, p.communicate(timeout=120)[1], p.returncode) for name, p in runs.items()},
                    ended_before_its_line=ended)
    finally:  # a failure above leaves no run going on through the tests that follow
        for p in runs.values():
            if p.poll() is None:
                p.kill()


def test_main_on_sigterm_says_where_the_run_stands_and_how_to_continue(stopped_runs):
    _, err, code = stopped_runs["sigterm"]
    assert code == 130 and "Traceback" not in err, err
    assert "of 50 epochs. Continue with: python simclr.py --resume" in err


@pytest.mark.parametrize("script,stage,argv", [("simclr", "build_model", [*TINY, "--epochs", "1"]),
                                               ("toy_theory", "run_clusters", ["clusters", "--quick"])])
def test_main_ctrl_c_while_torch_loads_stops_quietly_then_main_takes_ctrl_c_over(script, stage, argv, tmp_path,
                                                                                 monkeypatch):
    """Ctrl-C in the seconds `import torch` takes (here a torch that presses it): the script stops by the signal, as
    Unix tools do (exit 130 in the shell), with no traceback from inside torch; main() makes Ctrl-C Python's
    KeyboardInterrupt again, which it ends in its one line."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGINT)\n")
    r = subprocess.run([sys.executable, f"{script}.py", "--help"], cwd=HERE, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(tmp_path)), timeout=60)
    assert (r.returncode, r.stderr) == (-signal.SIGINT, "")
    module, handlers = sys.modules[script], []
    monkeypatch.setattr(module, stage, lambda *a: handlers.append(signal.getsignal(signal.SIGINT)) or (
        _ for _ in ()).throw(KeyboardInterrupt))
    quiet = signal.signal(signal.SIGINT, signal.SIG_DFL)  # as the imports leave it
    try:
        with pytest.raises(SystemExit) as e:
            module.main([*argv, "--out", str(tmp_path / "run")])
        assert signal.getsignal(signal.SIGINT) is signal.SIG_DFL  # given back
    finally:
        signal.signal(signal.SIGINT, quiet)
    assert (handlers, e.value.code) == ([signal.default_int_handler], 130)


def test_main_on_a_closed_output_pipe_ends_in_one_line_with_the_resume_command(stopped_runs):
    """| head: the pipe closes after a line of training, which came when it was printed (| tee shows progress)."""
    out, err, code = stopped_runs["pipe"]
    assert not stopped_runs["ended_before_its_line"]
    assert code == 2 and "Traceback" not in err, err
    assert f"the output pipe closed before the run ended (| head?); send the output to a file or to less, then " \
           f"continue with: python simclr.py --resume {out}" in err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A run of one epoch, finished, for tests to copy and edit."""
    out = tmp_path_factory.mktemp("finished") / "run"
    simclr.main([*TINY, "--epochs", "1", "--tau", "0.2", "--out", str(out)])
    return out


@pytest.mark.parametrize("edit,named", [(["--tau", "0.3"], "its tau is 0.2, config.json gives 0.3"),
                                        (["--epochs", "0"], "its epochs is 1, config.json gives 0"),
                                        (["--head", "ae"], "its head is 'mlp', config.json gives 'ae'")])
def test_parse_args_names_each_setting_a_checkpoint_was_saved_with_that_config_json_no_longer_gives(
        finished_run, tmp_path, refused, edit, named):
    """config.json edited whole (its command line and its values agree), or a checkpoint of another run (an mlp
    run's in an ae run's folder): the checkpoint holds its run's config, the resume names each difference before it
    reads or rewrites anything, and does not call an intact checkpoint corrupt."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    saved_config(run, *TINY, "--epochs", "1", "--tau", "0.2", *edit)
    files = {f: (run / f).read_bytes() for f in ("checkpoint.pt", "metrics.jsonl", "results.json")}
    err = refused(["--resume", str(run)])
    assert f"{run / 'checkpoint.pt'}: " in err and named in err and "put them back in config.json" in err
    assert "corrupt" not in err and files == {f: (run / f).read_bytes() for f in files}


def test_parse_args_takes_a_checkpoint_saved_before_a_new_lr_after_divergence(finished_run, tmp_path, refused):
    """The one setting a resume may change, --lr or --tau after a stop on divergence, is appended to the command line
    in config.json: the checkpoint saved before it is still the run's, on this resume and the next; a config.json
    whose command line was edited otherwise is not."""
    import shutil
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "diverged.json").write_text("{}")  # as end_of_epoch marks a stop on a non-finite loss
    assert simclr.parse_args(["--resume", str(run), "--lr", "0.01"]).lr == 0.01
    assert simclr.parse_args(["--resume", str(run)]).lr == 0.01 and not (run / "diverged.json").exists()
    saved_config(run, *TINY, "--epochs", "1", "--tau", "0.2", "--lr", "0.01", "--epochs", "0")
    assert "its epochs is 1, config.json gives 0" in refused(["--resume", str(run)])


def test_parse_args_names_a_setting_the_autoencoder_checkpoint_was_saved_with(tmp_path, refused):
    """The autoencoder stage's checkpoint carries the run's config too: config.json edited while the stage ran (its
    --ae-dim) stops the resume, naming it, before the stage reads the checkpoint."""
    run, flags = tmp_path / "run", ["--head", "ae", "--ae-epochs", "1", "--ae-dir", str(tmp_path / "ae")]
    args = simclr.parse_args([*flags, "--ae-dim", "64", "--out", str(run)])
    os.makedirs(run)
    simclr.autoencoder_embedding(dict(pool=torch.zeros(6, 3, 8, 8, dtype=torch.uint8), val_x=None), args, CPU)
    saved_config(run, *flags, "--ae-dim", "32")
    err = refused(lambda: simclr.parse_args(["--resume", str(run)]))
    assert f"{run / 'ae_checkpoint.pt'}: its ae_dim is 64, config.json gives 32. The checkpoint holds" in err


def test_main_resumes_a_moved_run_in_its_new_folder_and_rewrites_a_hand_edited_results_json(finished_run, tmp_path):
    """A run folder moved (or copied) resumes where it now is, not in the folder its command line names; a finished
    run's resume evaluates again and writes its numbers over a results.json edited by hand."""
    import shutil
    moved = tmp_path / "moved run"
    shutil.copytree(finished_run, moved)
    results = json.loads((moved / "results.json").read_text())
    (moved / "results.json").write_text(json.dumps(dict(results, linear_top1=0.99)))
    before = {f: os.stat(finished_run / f).st_mtime_ns for f in os.listdir(finished_run)}
    simclr.main(["--resume", str(moved)])
    assert json.loads((moved / "results.json").read_text()) == results
    assert {f: os.stat(finished_run / f).st_mtime_ns for f in os.listdir(finished_run)} == before


@pytest.mark.parametrize("resume", [False, True])
def test_open_run_dir_removes_the_temporary_files_of_writes_a_kill_cut_short(tmp_path, resume):
    """A SIGKILL during write_atomic leaves its temporary file (a checkpoint's: ~90 MB): the next run in the folder,
    new or resumed, removes it once it holds the folder's lock; other files stay."""
    import contextlib
    (tmp_path / "checkpoint.pt.k2x_9q0a.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "notes.tmp").write_text("the user's")
    args = simclr.types.SimpleNamespace(out=str(tmp_path), resume=str(tmp_path) if resume else None, bench=False)
    with contextlib.ExitStack() as stack:
        simclr.open_run_dir(args, stack)
    assert sorted(os.listdir(tmp_path)) == [".lock", "notes.tmp"]


def test_main_prints_a_resume_command_that_the_shell_reads_back_whatever_the_folder_name(tmp_path, monkeypatch,
                                                                                       refused):
    import shlex
    out = tmp_path / "my run\n'2'"
    monkeypatch.setattr(simclr, "build_model", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))  # Ctrl-C
    command = shlex.split(refused([*TINY, "--epochs", "1", "--out", str(out)], code=130).split("Continue with: ")[1])
    assert command == ["python", "simclr.py", "--resume", str(out)]
    assert simclr.parse_args(command[2:]).out == str(out)


ALLOCATOR_FAILS = RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 55050240000 bytes. "
                               "Error code 12 (Cannot allocate memory)")  # torch's CPU allocator, word for word


@pytest.mark.parametrize("stage,failure,message", [
    ("build_model", ALLOCATOR_FAILS,  # --proj-hidden 65536 --proj-out 65536, or ulimit -v: after config.json
     "out of memory (tried to allocate 55050240000 bytes): start a new run with a smaller --batch-size (16), "
     "--img-size (16) or head (--proj-hidden 512, --proj-out 128); or continue this one where more memory is free: "
     "python simclr.py --resume {out}\n"),
    ("load_dataset", ALLOCATOR_FAILS,  # --img-size 512 on Fashion-MNIST: its resize, before the run is saved
     "out of memory (tried to allocate 55050240000 bytes): start a new run with a smaller --batch-size (16), "
     "--img-size (16) or head (--proj-hidden 512, --proj-out 128)\n"),
    ("build_model", MemoryError(), "out of memory: start a new run with a smaller --batch-size (16)"),  # Python's
    ("build_model", torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total "
                                           "capacity of 79.19 GiB"), "out of memory (Tried to allocate 20.00 GiB)"),
    ("build_model", lambda: torch.zeros(1).add_(torch.ones(1), alpha=1e308),  # a rate that float32 cannot hold
     "a number overflowed (value cannot be converted to type float without overflow): lower --lr ({lr:g}) or --wd"),
    ("build_model", OSError(27, "File too large", "checkpoint.pt"),  # EFBIG: past ulimit -f
     "checkpoint.pt: File too large; raise the file size limit (ulimit -f), then continue with: python simclr.py "
     "--resume {out}")])
def test_main_out_of_memory_an_overflow_or_a_file_size_limit_end_in_one_line_with_what_to_change(
        tmp_path, monkeypatch, refused, stage, failure, message):
    """Each stage's failure, raised where it would come (a real allocation would take the machine's memory): one line
    with what to lower, and the command that continues the run once it is saved; any other error is a bug's
    traceback."""
    def fail(*a, **k):
        if isinstance(failure, BaseException):
            raise failure
        failure()
    monkeypatch.setattr(simclr, stage, fail)
    out = tmp_path / "run"
    lr = 0.012 * math.sqrt(16 / 64)  # the rate TINY runs at: SHAPES' 0.012 at N = 64, by the square-root rule at N = 16
    assert message.format(out=out, lr=lr) in refused([*TINY, "--epochs", "1", "--out", str(out)])
    monkeypatch.setattr(simclr, stage, lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # not a user's: its traceback
        simclr.main([*TINY, "--epochs", "1", "--out", str(tmp_path / "other")])


@pytest.mark.parametrize("data_on,hint", [("auto", True), ("host", False)])
def test_main_out_of_memory_on_a_gpu_offers_to_keep_the_images_in_host_memory(tmp_path, monkeypatch, refused,
                                                                               data_on, hint):
    """The images moved onto the GPU (--data-on auto or device) and its memory runs out: the line also offers
    --data-on host; when they are already there, it does not."""
    monkeypatch.setattr(simclr, "setup", lambda args: CPU)  # as a CUDA machine's, on this one
    monkeypatch.setattr(simclr, "prepare_data", lambda *a: (_ for _ in ()).throw(
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")))
    err = refused([*TINY, "--device", "cuda", "--data-on", data_on, "--out", str(tmp_path / "run")])
    assert err.startswith("error: out of memory (Tried to allocate 2.00 GiB)")
    assert ("or keep the images in host memory (--data-on host)" in err) == hint


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_main_on_a_full_standard_output_ends_in_one_line(tmp_path):
    """stdout on a full device: one line that says so, not "error: : No space left on device" nor Python's complaint
    at exit; PYTHONUNBUFFERED unset, as most users run."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    with open("/dev/full", "w") as full:
        r = subprocess.run([sys.executable, "simclr.py", "--dry-run", "--show-augs", str(tmp_path / "a.png")],
                           cwd=HERE, stdout=full, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
    assert (r.returncode, r.stderr) == (2, "error: cannot write to standard output (No space left on device); send it "
                                           "to a file or device with room\n")


def test_main_prints_a_path_that_is_not_utf8(tmp_path, capsys):
    """A file name of bytes that are not UTF-8 (Python reads 0xff as the surrogate \\udcff) prints escaped, not as a
    UnicodeEncodeError on a strict UTF-8 stdout (pytest's is one)."""
    png = str(tmp_path / "\udcff.png")
    simclr.main(["--dry-run", "--show-augs", png])
    assert "\\udcff.png" in capsys.readouterr().out and os.path.exists(png)


# ---------------------------------------------------------------- Part 2: devices, precision, torch.compile


def test_setup_refuses_a_saved_device_this_machine_lacks_saying_how_to_continue(tmp_path, refused):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    saved_config(tmp_path, "--device", "cuda")
    assert f"--resume {tmp_path} --device cpu continues the run here" in refused(["--resume", str(tmp_path)])


def test_try_compile_falls_back_to_eager_and_leaves_no_trace(monkeypatch):
    """A compiler that fails at the first call (as Inductor does without Triton) gives back the eager function
    with a warning; a trial that succeeds leaves the weights, BatchNorm statistics, gradients and RNG as they were."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, 3, 5, 5)

    def broken(fn):
        def call(*a):
            raise RuntimeError("Cannot find a working triton installation")
        return call

    logs = []
    monkeypatch.setattr(torch, "compile", broken)
    assert simclr.try_compile(model, x, "the model", model=model, log=logs.append) is model
    assert "torch.compile failed" in logs[-1] and "triton" in logs[-1]
    monkeypatch.setattr(torch, "compile", functools.partial)  # "compiles" to a partial that calls fn
    rng = torch.get_rng_state()
    compiled = simclr.try_compile(lambda v: model(v + torch.randn_like(v)), x, "the model", model=model,
                                  log=logs.append)
    assert not any("failed" in line for line in logs[2:]) and isinstance(compiled, functools.partial)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # running_mean, running_var, num_batches_tracked included
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)


# ---------------------------------------------------------------- Part 2: multi-GPU


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gather_part(rank, world, path):
    """global_forward on this process's half of a batch of z: the loss and the gradients of its rows."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    n = 8 // world
    a = z1[rank * n:(rank + 1) * n].clone().requires_grad_()
    b = z2[rank * n:(rank + 1) * n].clone().requires_grad_()
    z = simclr.global_forward(lambda views: views, rank, world)(torch.cat([a, b]))  # (16, 5): the global batch
    loss = simclr.nt_xent(z[:8], z[8:], 0.3)
    loss.backward()
    torch.save(dict(loss=loss.detach(), ga=a.grad, gb=b.grad), os.path.join(path, f"gather{rank}.pt"))


STEP_HP = dict(lr=0.5, momentum=0.9, wd=0.1, decay_norm_and_bias=False)


GLOBAL_VIEWS = torch.randn(2 * 8, 3, 6, 6, generator=torch.Generator().manual_seed(4))  # rows i, i + 8: a pair


def _step_part(rank, world, path):
    """Two training steps (DDP, global BatchNorm, the gathered NT-Xent) on this process's half of GLOBAL_VIEWS."""
    import argparse
    model = simclr.sync_batchnorm(small_simclr(), torch.device("cpu"))
    forward = torch.nn.parallel.DistributedDataParallel(model)
    opt = simclr.optimizer(model, argparse.Namespace(**STEP_HP))
    n = 8 // world
    views = torch.cat([GLOBAL_VIEWS[rank * n:(rank + 1) * n], GLOBAL_VIEWS[8 + rank * n:8 + (rank + 1) * n]])
    for _ in range(2):  # the second step uses the momentum of the first
        simclr.sgd_step(simclr.global_forward(forward, rank, world), views, opt, 0.5)
    torch.save(model.state_dict(), os.path.join(path, f"step{rank}.pt"))


def _sync_bn_part(rank, world, path):
    """sync_batchnorm's BatchNorm on this process's half of a batch: its output, gradients, running statistics."""
    x = torch.randn(6, 3, 4, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1  # the global batch
    n = 6 // world
    net = simclr.sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3)), torch.device("cpu"))
    torch.manual_seed(1)
    torch.nn.init.uniform_(net[0].weight), torch.nn.init.uniform_(net[0].bias)
    mine = x[rank * n:(rank + 1) * n].clone().requires_grad_()
    out = net(mine)
    (out * torch.arange(out.numel()).view_as(out)).sum().backward()  # this rank's share of a global loss
    torch.save(dict(kind=type(net[0]).__name__, out=out.detach(), gx=mine.grad, gw=net[0].weight.grad,
                    gb=net[0].bias.grad, mean=net[0].running_mean, var=net[0].running_var),
               os.path.join(path, f"bn{rank}.pt"))


def _main_part(rank, world, path):
    """simclr.main as one of `world` torchrun processes (their variables set), recording what it trained."""
    calls, real = [], simclr.train_autoencoder
    simclr.train_autoencoder = lambda *a, **k: calls.append(rank) or real(*a, **k)
    models, real_build = [], simclr.build_model
    simclr.build_model = lambda *a: models.append(real_build(*a)) or models[-1]
    losses, real_nt_xent = [], simclr.nt_xent  # each step's NT-Xent: the size of its batch and its value
    simclr.nt_xent = lambda z1, z2, tau: losses.append((len(z1), real_nt_xent(z1, z2, tau))) or losses[-1][1]
    simclr.main([*TINY, "--head", "ae", "--ae-epochs", "1", "--epochs", "1", "--out", os.path.join(path, "run"),
                 "--ae-dir", os.path.join(path, "ae")])
    bn = sorted({type(m).__name__ for m in models[0].modules() if "BatchNorm" in type(m).__name__})
    trained = {k: v for k, v in models[0].state_dict().items() if k.startswith(("backbone.conv1.", "head.2."))}
    torch.save(dict(ae_trained=calls, bn=bn, embedding=models[0].head[0].weight.detach(), trained=trained,
                    losses=[(n, loss.item()) for n, loss in losses]), os.path.join(path, f"main{rank}.pt"))


def _two_process_worker(path, port):
    """One of 2 gloo processes that torchrun starts (see the end of this file): the three pieces of multi-process
    training, then simclr.main under torchrun's variables (one launch for all: each process start imports torch and
    torchvision, seconds on 2 cores)."""
    import torch.distributed as dist
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)  # two processes on two cores
    store = dist.TCPStore("127.0.0.1", port, world, is_master=rank == 0)  # rank 0's: tcp:// would seek torchrun's
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    for part in (_gather_part, _step_part, _sync_bn_part):
        part(rank, world, path)
    dist.destroy_process_group()
    _main_part(rank, world, path)  # simclr's own init_process_group, from torchrun's variables


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The folder of _two_process_worker's results, each file written by one rank, and stdout.txt, what the two
    processes printed, as `torchrun --nproc_per_node 2` starts them."""
    path = tmp_path_factory.mktemp("two_processes")
    stdout = run_script("-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                        __file__, str(path), str(free_port()))
    (path / "stdout.txt").write_text(stdout)
    return path


def test_global_forward_gives_every_process_the_global_loss_and_its_gradient(two_processes):
    """2 gloo processes, each with half of the batch: each computes the single-process loss of the whole batch, and
    gets world x the matching rows of its gradient (the gather's backward sums the processes' gradients; DDP's mean
    divides it back). A gather without gradient gives the wrong gradients here."""
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 5, generator=g).requires_grad_(), torch.randn(8, 5, generator=g).requires_grad_()
    loss = naive_nt_xent(z1, z2, 0.3)
    loss.backward()
    for rank in range(2):
        r = torch.load(two_processes / f"gather{rank}.pt")
        assert r["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
        torch.testing.assert_close(r["ga"], 2 * z1.grad[rank * 4:(rank + 1) * 4].float(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(r["gb"], 2 * z2.grad[rank * 4:(rank + 1) * 4].float(), rtol=1e-4, atol=1e-6)


def test_sgd_step_of_two_processes_is_the_step_of_one_on_the_global_batch(two_processes):
    """One training step of 2 gloo processes (DDP, global BatchNorm, the gathered NT-Xent), each on its half of the
    batch, ends with the weights and BatchNorm statistics of the same step in one process on the whole batch."""
    import argparse
    model = small_simclr()
    opt = simclr.optimizer(model, argparse.Namespace(**STEP_HP))
    for _ in range(2):
        simclr.sgd_step(model, GLOBAL_VIEWS, opt, 0.5)
    for rank in range(2):
        got = torch.load(two_processes / f"step{rank}.pt")
        for k, v in model.state_dict().items():
            torch.testing.assert_close(got[k].to(v.dtype), v, rtol=1e-5, atol=1e-6, msg=f"{k}, rank {rank}")


def test_sync_batchnorm_on_cpu_processes_equals_batchnorm_on_the_global_batch(two_processes):
    """2 gloo processes, each with half of a batch: outputs, input gradients and running statistics equal one
    nn.BatchNorm2d on the whole batch, and the summed weight gradients equal its weight gradient."""
    x = (torch.randn(6, 3, 4, 5, generator=torch.Generator().manual_seed(0)) * 3 + 1).requires_grad_()
    bn = torch.nn.BatchNorm2d(3)
    torch.manual_seed(1)
    torch.nn.init.uniform_(bn.weight), torch.nn.init.uniform_(bn.bias)
    out = bn(x)
    weights = torch.arange(out[:3].numel()).view_as(out[:3])
    (torch.cat([out[:3] * weights, out[3:] * weights])).sum().backward()
    r = [torch.load(two_processes / f"bn{i}.pt") for i in range(2)]
    assert r[0]["kind"] == "SyncBatchNormCPU"
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    close(torch.cat([r[0]["out"], r[1]["out"]]), out.detach())
    close(torch.cat([r[0]["gx"], r[1]["gx"]]), x.grad)
    close(r[0]["gw"] + r[1]["gw"], bn.weight.grad)
    close(r[0]["gb"] + r[1]["gb"], bn.bias.grad)
    for i in range(2):
        close(r[i]["mean"], bn.running_mean)
        close(r[i]["var"], bn.running_var)


def test_main_under_torchrun_trains_one_model_on_the_global_loss_with_global_bn_and_one_autoencoder(two_processes):
    """simclr.main as 2 gloo processes (batch 16, 8 images each): every step's NT-Xent is that of the 16 images, the
    same value in both (the gathered loss, not each process's own), and after the epoch both hold the same weights,
    first layer to last (DDP's averaged gradients: without it each would step on its own half); rank 0 alone trains
    the autoencoder, whose embedding both use; BatchNorm is global."""
    r = [torch.load(two_processes / f"main{i}.pt") for i in range(2)]
    assert len(r[0]["losses"]) == 6 and {n for n, _ in r[0]["losses"] + r[1]["losses"]} == {16}  # 96 images / 16
    assert [loss for _, loss in r[0]["losses"]] == pytest.approx([loss for _, loss in r[1]["losses"]], rel=1e-6)
    for k, v in r[0]["trained"].items():
        torch.testing.assert_close(r[1]["trained"][k], v, rtol=1e-6, atol=1e-7, msg=k)
    assert r[0]["ae_trained"] == [0] and r[1]["ae_trained"] == []  # rank 1 received rank 0's embedding
    assert torch.equal(r[0]["embedding"], r[1]["embedding"])
    assert r[0]["bn"] == r[1]["bn"] == ["SyncBatchNormCPU"]  # by default: SimCLR's global BN


def test_main_under_torchrun_logs_once_and_evaluates_once(two_processes):
    """Two processes started by torchrun: rank 0 alone logs and evaluates, into the run's results.json."""
    stdout = (two_processes / "stdout.txt").read_text()
    assert "2 processes, global BatchNorm" in stdout  # SyncBatchNorm by default (Sec. 2.2 of SimCLR)
    assert stdout.count("\nepoch 1/1 |") == 1 and stdout.count("top-1 on the test split") == 1
    assert json.loads((two_processes / "run" / "results.json").read_text())["linear_top1"] >= 0


# ---------------------------------------------------------------- Part 2: datasets


@pytest.fixture
def no_checksums(monkeypatch):
    """torchvision checks MD5 sums of the real archives; our tiny files are the real format, not the real files."""
    for mod in (torchvision.datasets.cifar, torchvision.datasets.stl10):
        monkeypatch.setattr(mod, "check_integrity", lambda *a, **k: True)


def random_uint8(*shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def write_cifar(base, name):
    """CIFAR's python pickles in `base`, 3 random images a file; returns the images of each file."""
    base.mkdir(parents=True, exist_ok=True)
    key = "labels" if name == "cifar10" else "fine_labels"
    files = ([f"data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else ["train"])
    imgs = {}
    for i, fname in enumerate(files + ["test_batch" if name == "cifar10" else "test"]):
        data = random_uint8(3, 3 * 32 * 32, seed=i)  # rows are CHW-flattened 32x32 images
        imgs[fname] = data
        with open(base / fname, "wb") as f:
            pickle.dump({"data": data, key: [i % 2, 1, 0]}, f)
    meta = ("batches.meta", "label_names") if name == "cifar10" else ("meta", "fine_label_names")
    with open(base / meta[0], "wb") as f:
        pickle.dump({meta[1]: [f"c{i}" for i in range(100)]}, f)
    return imgs


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_load_dataset_cifar_from_python_pickles(tmp_path, no_checksums, name):
    imgs = write_cifar(tmp_path / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"), name)
    files = list(imgs)[:-1]
    d = simclr.load_dataset(name, str(tmp_path), 32, download=False)
    assert d["train_x"].shape == (3 * len(files), 3, 32, 32)
    assert torch.equal(d["train_x"][0], torch.from_numpy(imgs[files[0]][0].reshape(3, 32, 32)))
    assert torch.equal(d["test_x"][2], torch.from_numpy(imgs[list(imgs)[-1]][2].reshape(3, 32, 32)))
    assert d["train_y"][:3].tolist() == [0, 1, 0]
    assert d["pretrain"].data_ptr() == d["train_x"].data_ptr() and len(d["pretrain"]) == len(d["train_x"])


def write_stl10(base):
    """STL10's binary files in `base`: 2 train, 3 test and 4 unlabeled random images; returns them per split."""
    base.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for i, split in enumerate(["train", "test", "unlabeled"]):
        x = random_uint8(2 + i, 3, 96, 96, seed=i)
        arrays[split] = x
        np.transpose(x, (0, 1, 3, 2)).tofile(base / f"{split}_X.bin")  # STL10 stores images column-major
        if split != "unlabeled":
            np.array([1, 10, 3, 4][:2 + i], dtype=np.uint8).tofile(base / f"{split}_y.bin")  # labels 1..10
    return arrays


@pytest.mark.parametrize("pretrain", ["train+unlabeled", "train"])
def test_load_dataset_stl10_from_binary_files(tmp_path, no_checksums, pretrain):
    arrays = write_stl10(tmp_path / "stl10_binary")
    d = simclr.load_dataset("stl10", str(tmp_path), 96, download=False, stl10_pretrain=pretrain)
    assert torch.equal(d["train_x"], torch.from_numpy(arrays["train"]))
    assert torch.equal(d["test_x"], torch.from_numpy(arrays["test"]))
    assert d["train_y"].tolist() == [0, 9]
    assert len(d["pretrain"]) == (2 + 4 if pretrain == "train+unlabeled" else 2)
    assert d["train_x"].data_ptr() == d["pretrain"].data_ptr()  # one tensor in memory: train_x is its first rows
    if pretrain == "train+unlabeled":
        assert torch.equal(d["pretrain"][2:], torch.from_numpy(arrays["unlabeled"]))
        d = simclr.load_dataset("stl10", str(tmp_path), 96, download=False, stl10_pretrain=pretrain, subset=1)
        assert len(d["train_x"]) == 1 and len(d["pretrain"]) == 1 + 2  # half the train split: half the unlabeled


def write_idx(path, arr):
    """The MNIST idx format: big-endian magic (0x0803 images / 0x0801 labels), dimensions, then bytes."""
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape))
        f.write(arr.tobytes())


def test_load_dataset_fashion_mnist_from_idx_files_as_three_channels(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    imgs = random_uint8(4, 28, 28)
    for prefix in ("train", "t10k"):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", imgs)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.array([3, 1, 4, 1], dtype=np.uint8))
    d = simclr.load_dataset("fashion-mnist", str(tmp_path), 28, download=False)
    assert d["train_x"].shape == (4, 3, 28, 28)
    for c in range(3):
        assert torch.equal(d["train_x"][:, c], torch.from_numpy(imgs))
    assert d["test_y"].tolist() == [3, 1, 4, 1]


def test_load_dataset_refuses_fashion_mnist_images_and_labels_of_two_splits(tmp_path, refused):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 6), ("t10k", 4)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", random_uint8(n, 28, 28))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(4, dtype=np.uint8))  # t10k's labels for both
    load = lambda: simclr.load_dataset("fashion-mnist", str(tmp_path), 28, download=False)
    assert "its train split holds 6 images but 4 labels" in refused(load)


def test_load_dataset_names_a_fashion_mnist_file_cut_short_or_rebuilds_it_from_debians_copy(tmp_path, monkeypatch, refused):
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    imgs, labels = random_uint8(4, 28, 28), np.array([3, 1, 4, 1], dtype=np.uint8)
    debian = tmp_path / "debian"
    debian.mkdir()
    for prefix in ("train", "t10k"):
        for kind, arr in (("images-idx3", imgs), ("labels-idx1", labels)):
            write_idx(raw / f"{prefix}-{kind}-ubyte", arr)
            with open(raw / f"{prefix}-{kind}-ubyte", "rb") as f, gzip.open(debian / f"{prefix}-{kind}-ubyte.gz", "wb") as g:
                g.write(f.read())
    cut = raw / "train-images-idx3-ubyte"
    whole = cut.read_bytes()
    monkeypatch.setattr(simclr, "FASHION_MNIST_LOCAL", str(tmp_path / "no-such-package"))
    for size in (500, 6):  # a copy cut short in its values, and in its header
        cut.write_bytes(whole[:size])
        assert f"{cut} is cut short" in refused(lambda: simclr.load_dataset("fashion-mnist", str(tmp_path / "data"), 28,
                                                                          download=False))
    monkeypatch.setattr(simclr, "FASHION_MNIST_LOCAL", str(debian))  # Debian's package is there: copied again
    assert torch.equal(simclr.load_dataset("fashion-mnist", str(tmp_path / "data"), 28)["train_x"][:, 0],
                       torch.from_numpy(imgs))


@pytest.mark.parametrize("header,values,problem", [
    (bytes([0, 0, 8, 1]) + (4).to_bytes(4, "big"), bytes([3, 1, 4]), "is cut short (11 bytes, not 12)"),
    (bytes([0, 0, 8, 1]) + (4).to_bytes(4, "big"), bytes([3, 1, 4, 1, 5]), "is longer than its header says"),
    (bytes([0, 0, 8, 1]) + (0).to_bytes(4, "big"), b"", "holds no items"),
    (bytes([0, 0, 8, 0]), b"", "is not an idx file of 1-d bytes (it starts 00000800, not 00000801)"),
    (bytes([0, 0, 13, 1]) + (4).to_bytes(4, "big"), bytes(16), "is not an idx file of 1-d bytes"),
    (b"", b"\0\0", "is cut short inside its header")])  # a download that stopped at once
def test_load_dataset_says_what_is_wrong_with_a_fashion_mnist_label_file(tmp_path, refused, header, values, problem):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", random_uint8(4, 28, 28))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.array([3, 1, 4, 1], dtype=np.uint8))
    (raw / "train-labels-idx1-ubyte").write_bytes(header + values)
    load = lambda: simclr.load_dataset("fashion-mnist", str(tmp_path), 28, download=False)
    assert f"{raw / 'train-labels-idx1-ubyte'} {problem}" in refused(load)


@pytest.mark.parametrize("images,labels,problem", [
    (np.array([3, 1, 4, 1], dtype=np.uint8), random_uint8(4, 28, 28),
     "is not an idx file of 3-d bytes (it starts 00000801, not 00000803) (a labels file?)"),
    (random_uint8(4, 784), np.array([3, 1, 4, 1], dtype=np.uint8),
     "is not an idx file of 3-d bytes (it starts 00000802")])
def test_load_dataset_names_a_fashion_mnist_images_file_of_another_rank(tmp_path, refused, images, labels, problem):
    """The images and labels files swapped, or images flattened: the file is named, not torchvision's "x should have
    3 dimension instead of 1"."""
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    load = lambda: simclr.load_dataset("fashion-mnist", str(tmp_path), 28, download=False)
    assert f"{raw / 'train-images-idx3-ubyte'} {problem}" in refused(load)


def test_load_dataset_refuses_labels_outside_the_datasets_classes(tmp_path, refused):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, labels in (("train", [3, 255, 4, 1]), ("t10k", [3, 1, 4, 1])):
        write_idx(raw / f"{prefix}-images-idx3-ubyte", random_uint8(4, 28, 28))
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.array(labels, dtype=np.uint8))
    load = lambda: simclr.load_dataset("fashion-mnist", str(tmp_path), 28, download=False)
    assert "train labels hold 255, outside 0..9" in refused(load)


def read_idx_gz(path):
    """The idx format read with numpy alone (not torchvision): magic (0, 0, 8, ndim), big-endian dims, bytes."""
    with gzip.open(path) as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims).copy()


FASHION_MNIST_FILES = [os.path.join(simclr.FASHION_MNIST_LOCAL, f"{split}-{kind}-ubyte.gz")
                       for split in ("train", "t10k") for kind in ("images-idx3", "labels-idx1")]


@pytest.mark.skipif(not all(map(os.path.exists, FASHION_MNIST_FILES)),
                    reason="the real Fashion-MNIST files (apt-get install dataset-fashion-mnist) are not here")
def test_load_dataset_real_fashion_mnist_and_raw_pixels_reach_the_published_baseline(tmp_path):
    d = simclr.load_dataset("fashion-mnist", str(tmp_path), 28, download=False)
    assert d["train_x"].shape == (60000, 3, 28, 28) and d["test_x"].shape == (10000, 3, 28, 28)
    for ours, path in zip((d["train_x"][:, 1], d["train_y"], d["test_x"][:, 2], d["test_y"]), FASHION_MNIST_FILES):
        assert torch.equal(ours.long(), torch.from_numpy(read_idx_gz(path)).long()), path
    assert torch.bincount(d["train_y"]).tolist() == [6000] * 10  # the dataset is balanced: 6,000 per class
    # Logistic regression on raw pixels scores ~84% on Fashion-MNIST (the dataset's own benchmark); on 20k
    # training images our probe must come close (the README's full-data run measured 83.8%)
    pixels = lambda x: x[:, 0].float().flatten(1) / 255  # (N, 784): the three channels are equal
    acc = simclr.linear_probe(pixels(d["train_x"][:20000]), d["train_y"][:20000], pixels(d["test_x"]),
                              d["test_y"], 10, steps=100)
    assert 0.80 < acc < 0.88, acc


def save_rgb(path, colour, size=(40, 30)):
    Image.new("RGB", size, colour).save(path)


def test_load_dataset_imagenette_from_wnid_folders(tmp_path):
    for split in ("train", "val"):
        for wnid, colour in (("n01440764", (255, 0, 0)), ("n02102040", (0, 0, 255))):
            d = tmp_path / "imagenette2-160" / split / wnid
            d.mkdir(parents=True)
            save_rgb(d / "a.JPEG", colour)
    d = simclr.load_dataset("imagenette", str(tmp_path), 24, download=False)
    assert d["train_x"].shape == (2, 3, 24, 24) and d["classes"] == 2
    assert d["train_y"].tolist() == [0, 1]
    assert d["train_x"][0, 0].float().mean() > 200 and d["train_x"][1, 2].float().mean() > 200  # red, blue
    assert os.path.exists(tmp_path / "imagenette-24px.pt")  # decoded once, cached


def test_load_dataset_the_papers_imagenette_is_the_full_size_one(tmp_path, refused):
    """The paper's code reads datasets.Imagenette(size="full"): imagenette2/, not the 160 px imagenette2-160/, and
    resizes each image whole to a square (its Resize((img, img)))."""
    for split in ("train", "val"):
        for wnid, colour in (("n01440764", (255, 0, 0)), ("n02102040", (0, 0, 255))):
            d = tmp_path / "imagenette2" / split / wnid
            d.mkdir(parents=True)
            image = Image.new("RGB", (80, 60), colour)
            image.paste((0, 255, 0), (0, 0, 10, 60))  # a stripe at the left edge, which a centre crop would cut off
            image.save(d / "a.JPEG")
    d = simclr.load_dataset("imagenette", str(tmp_path), 24, download=False, paper=True)
    assert d["train_x"].shape == (2, 3, 24, 24) and os.path.exists(tmp_path / "imagenette-24px-paper.pt")
    decoded = TF.pil_to_tensor(Image.open(tmp_path / "imagenette2" / "train" / "n01440764" / "a.JPEG"))
    assert torch.equal(d["train_x"][0], TF.resize(decoded, [24, 24], antialias=True))  # resized whole to a square
    err = refused(lambda: simclr.load_dataset("imagenette", str(tmp_path), 24, download=False))
    assert "imagenette2-160" in err  # the 160 px files are not there: recipe simclr's loading says which to put


def test_load_dataset_fgvc_aircraft_manufacturer_labels_and_banner_crop(tmp_path):
    data = tmp_path / "fgvc-aircraft-2013b" / "data"
    (data / "images").mkdir(parents=True)
    (data / "manufacturers.txt").write_text("Boeing\nAirbus\n")
    for split, ids in (("trainval", ["001", "002"]), ("test", ["003"])):
        lines = []
        for i, img_id in enumerate(ids):
            im = Image.new("RGB", (60, 60), (0, 0, 255))
            im.paste((255, 0, 0), (0, 40, 60, 60))  # the bottom 20 rows: the "copyright banner"
            im.save(data / "images" / f"{img_id}.jpg", quality=95)
            lines.append(f"{img_id} {['Boeing', 'Airbus'][i % 2]}")
        (data / f"images_manufacturer_{split}.txt").write_text("\n".join(lines) + "\n")
    d = simclr.load_dataset("fgvc-aircraft", str(tmp_path), 16, download=False)
    assert d["train_y"].tolist() == [0, 1] and d["classes"] == 2
    assert d["train_x"][:, 0].float().max() < 60  # no red left: the banner was cut off before resizing


def test_load_dataset_folder_converts_grayscale_and_rgba(tmp_path):
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
        Image.new("L", (50, 40), 128).save(tmp_path / split / "cat" / "a.png")
        Image.new("RGBA", (30, 30), (0, 255, 0, 128)).save(tmp_path / split / "dog" / "b.png")
    d = simclr.load_dataset("folder", str(tmp_path), 20, download=False)
    assert d["train_x"].shape == (2, 3, 20, 20) and d["classes"] == 2
    assert d["train_y"].tolist() == [0, 1]


def make_folder(root, n=3, size=(12, 10)):
    for split in ("train", "test"):
        for c, colour in (("a", (250, 0, 0)), ("b", (0, 0, 250))):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", size, tuple(max(0, v - 20 * i) for v in colour)).save(root / split / c / f"{i}.png")


def test_load_dataset_folder_names_and_skips_images_it_cannot_decode_and_scales_deep_ones(tmp_path, monkeypatch,
                                                                                        capsys):
    make_folder(tmp_path, n=1)
    a = tmp_path / "train" / "a"
    Image.fromarray(np.full((10, 12), 32896, dtype=np.uint16)).save(a / "deep.png")  # 16-bit grey, half the range
    Image.fromarray(np.full((10, 12), 0.25, dtype=np.float32)).save(a / "float.tiff")  # floats in [0, 1]
    (a / "text.png").write_text("not an image")
    Image.new("RGB", (12, 10), (9, 9, 9)).save(a / "cut.jpg")
    (a / "cut.jpg").write_bytes((a / "cut.jpg").read_bytes()[:200])  # a JPEG cut short
    Image.new("RGB", (60, 60)).save(tmp_path / "train" / "b" / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # over 2,000 pixels: a decompression bomb
    d = simclr.load_dataset("folder", str(tmp_path), 8, download=False)
    note = [l for l in capsys.readouterr().out.splitlines() if "cannot be decoded" in l][0]
    assert "skipped 3 of 7 images" in note and ("text.png" in note or "cut.jpg" in note or "bomb.png" in note)
    values = sorted(d["train_x"].float().mean((1, 2, 3)).tolist())  # kept: float, a/0 and b/0 (83.3), deep
    assert len(values) == 4 and values[0] == pytest.approx(64, abs=1) and values[3] == pytest.approx(128, abs=1)


def test_load_dataset_names_a_class_whose_train_images_all_fail_to_decode(tmp_path, refused):
    make_folder(tmp_path, n=2)
    for f in (tmp_path / "train" / "b").iterdir():
        f.write_bytes(b"")  # zero-byte images
    assert "no train image of class 'b' can be decoded" in refused(lambda: simclr.load_dataset("folder", str(tmp_path), 8))


def test_load_dataset_says_so_of_a_folder_that_cannot_be_read(tmp_path, monkeypatch, refused):
    make_folder(tmp_path)
    def denied(path):
        raise PermissionError(13, "Permission denied", str(path))
    monkeypatch.setattr(simclr.os, "scandir", denied)
    assert "Permission denied" in refused(lambda: simclr.load_dataset("folder", str(tmp_path), 8))


@pytest.mark.parametrize("layout,message", [({"train": [], "test": []}, "Couldn't find any class folder"),
                                            ({"train": ["cat"], "test": ["cat"]}, "at least 2"),
                                            ({"train": ["cat", "dog"], "test": ["cat", "dog/"]},
                                             ("the classes dog.", "put images into every class folder, or remove "
                                              "the empty ones"))])
def test_load_dataset_refuses_an_empty_or_one_class_folder(tmp_path, layout, message, refused):
    """No class folders, one class, a class folder without an image (written "dog/"): each named, with what to do."""
    for split, classes in layout.items():
        (tmp_path / split).mkdir()
        for c in classes:
            (tmp_path / split / c).mkdir()
            if not c.endswith("/"):
                Image.new("RGB", (8, 8)).save(tmp_path / split / c / "a.png")
    err = refused(lambda: simclr.load_dataset("folder", str(tmp_path), 8))
    assert all(m in err for m in ([message] if isinstance(message, str) else message))


@pytest.mark.parametrize("link,target,reached", [
    ("train/a/loop", "..", "train"), ("test/b", "../train/b", "train/b"), ("train/b", "../elsewhere", None),
    ("train/b/gone.png", "nowhere.png", None)])
def test_load_dataset_folder_follows_links_but_refuses_a_folder_reached_twice(tmp_path, refused, monkeypatch, link,
                                                                           target, reached):
    """A link back up (train/a/loop -> ..: its images read again at every depth, all as class a) or a test class
    linked to the train one: refused, naming the link; a class folder linked to images elsewhere loads, and so does a
    class with a link to nothing (skipped as an image that cannot be decoded)."""
    import shutil
    make_folder(tmp_path)
    if os.path.isdir(tmp_path / link):  # the class folder the link replaces
        shutil.move(tmp_path / link, tmp_path / "elsewhere")
    os.symlink(target, tmp_path / link)
    load = lambda: simclr.load_dataset("folder", str(tmp_path), 8, download=False)
    if reached is None:
        assert load()["train_y"].tolist() == [0, 0, 0, 1, 1, 1]
    else:
        monkeypatch.setattr(simclr.torchvision.datasets, "ImageFolder", None)  # refused before its own walk
        assert f"{tmp_path / link} is {tmp_path / reached} again, through a link; remove the link" in refused(load)


def test_load_dataset_upscales_images_smaller_than_the_side_with_a_note(tmp_path, capsys):
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (10, 12)).save(tmp_path / split / c / "x.png")
    d = simclr.load_dataset("folder", str(tmp_path), 32, download=False)
    assert d["train_x"].shape == (2, 3, 32, 32)
    assert "smaller than 32px" in capsys.readouterr().out


def test_load_dataset_skips_an_image_whose_resize_would_exceed_pils_bound_naming_it(tmp_path, monkeypatch, capsys):
    """PIL bounds the pixels of a file (a 1 x 400,000 PNG is a few hundred bytes) but resizing its short side to 96 px
    would make 11 GB: the bound holds for the resize too, and the image is skipped and named."""
    make_folder(tmp_path)
    Image.new("RGB", (4000, 1)).save(tmp_path / "train" / "a" / "thin.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10 ** 6)  # resized to 32 px: 32 x 32 x 4000 pixels
    d = simclr.load_dataset("folder", str(tmp_path), 32, download=False)
    assert len(d["train_y"]) == 6
    assert "thin.png (4000x1 px, resized to 32 px on its short side, would be 0.0123 GB)" in capsys.readouterr().out


def test_load_dataset_caches_a_folder_by_its_files_and_rebuilds_a_corrupt_cache(tmp_path, monkeypatch, capsys):
    make_folder(tmp_path)
    decoded = []
    real = simclr.pil_to_uint8
    monkeypatch.setattr(simclr, "pil_to_uint8", lambda *a: decoded.append(1) or real(*a))
    first = simclr.load_dataset("folder", str(tmp_path), 8, download=False)
    again = simclr.load_dataset("folder", str(tmp_path), 8, download=False)
    assert len(decoded) == 2 and torch.equal(first["test_x"], again["test_x"])  # train + test once: then the cache
    (cache,) = [f for f in os.listdir(tmp_path) if f.endswith(".pt")]
    (tmp_path / cache).write_bytes(b"cut short")
    rebuilt = simclr.load_dataset("folder", str(tmp_path), 8, download=False)
    assert len(decoded) == 4 and torch.equal(rebuilt["train_x"], first["train_x"])
    out = capsys.readouterr().out
    assert cache in out and "cannot be read" in out
    Image.new("RGB", (12, 10), (0, 250, 0)).save(tmp_path / "train" / "a" / "new.png")  # a file added: a new key
    assert len(simclr.load_dataset("folder", str(tmp_path), 8, download=False)["train_y"]) == 7
    assert len(decoded) == 6


CONCURRENT_LOAD = """
import sys, hashlib, simclr
simclr.FASHION_MNIST_LOCAL = sys.argv[2]
h = hashlib.sha1()
for name in ("fashion-mnist", "folder"):
    d = simclr.load_dataset(name, sys.argv[1] + ("/folder" if name == "folder" else ""), 8, download=False)
    for k in ("train_x", "train_y", "test_x", "test_y"):
        h.update(d[k].numpy().tobytes())
print(h.hexdigest())
"""


def write_debian_fashion(gz, n):
    """Debian's dataset-fashion-mnist package as it lies on disk: the four idx files gzipped into the folder gz, each
    split n random images and their labels. Returns gz."""
    gz.mkdir()
    for prefix in ("train", "t10k"):
        for kind, arr in (("images-idx3", random_uint8(n, 28, 28)), ("labels-idx1", np.arange(n) % 10)):
            write_idx(gz / "idx", arr.astype(np.uint8))
            with open(gz / "idx", "rb") as src, gzip.open(gz / f"{prefix}-{kind}-ubyte.gz", "wb") as dst:
                dst.write(src.read())
    os.remove(gz / "idx")
    return gz


def test_load_dataset_writes_cut_short_leave_no_half_file_where_a_reader_looks(tmp_path, monkeypatch, capsys):
    """A write that stops half-way (a kill, a full disk; here the copy raises after half its bytes): neither the
    un-gzipped Fashion-MNIST file nor a folder's decoded cache is left half-written at its name, where the next
    reader (or another process now) would take it whole; the next load writes them whole."""
    gz = write_debian_fashion(tmp_path / "gz", 4)
    monkeypatch.setattr(simclr, "FASHION_MNIST_LOCAL", str(gz))
    make_folder(tmp_path / "data" / "folder", n=2)

    def half_then_full_disk(src, dst, *a):  # half the bytes written, then ENOSPC
        data = src.read()
        dst.write(data[:len(data) // 2])
        raise OSError(28, "No space left on device")

    def save_half(obj, f, *a, **k):  # torch.save into f, cut off the same way
        whole = io.BytesIO()
        real_save(obj, whole)
        whole.seek(0)
        half_then_full_disk(whole, f)
    real_save, raw, folder = torch.save, tmp_path / "data" / "FashionMNIST" / "raw", tmp_path / "data" / "folder"
    with monkeypatch.context() as m:
        m.setattr(simclr.shutil, "copyfileobj", half_then_full_disk)  # the un-gzipping
        m.setattr(torch, "save", save_half)  # the decoded cache
        with pytest.raises(OSError):
            simclr.load_dataset("fashion-mnist", str(tmp_path / "data"), 28, download=False)
        simclr.load_dataset("folder", str(folder), 8, download=False)  # a cache it cannot write: a note
    assert "could not cache the decoded images" in capsys.readouterr().out
    assert os.listdir(raw) == [] and [f for f in os.listdir(folder) if f.endswith(".pt")] == []
    assert len(simclr.load_dataset("fashion-mnist", str(tmp_path / "data"), 28, download=False)["train_y"]) == 4
    simclr.load_dataset("folder", str(folder), 8, download=False)
    assert len([f for f in os.listdir(folder) if f.endswith(".pt")]) == 1


def test_load_dataset_in_processes_sharing_one_data_directory_all_succeed(tmp_path):
    """Two processes (one per core) started together on an empty --data-dir: each un-gzips Fashion-MNIST and decodes
    (and caches) a folder dataset; neither fails, both load the same data, no temporary file is left. (That no reader
    can meet a half-written file is the test above: these small files pass here even written in place.)"""
    gz = write_debian_fashion(tmp_path / "gz", 300)
    make_folder(tmp_path / "data" / "folder", n=20, size=(64, 48))
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_LOAD, str(tmp_path / "data"), str(gz)], cwd=HERE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 2, [err for _, err in outs]
    assert len({out for out, _ in outs}) == 1
    assert not [f for f in os.listdir(tmp_path / "data" / "FashionMNIST" / "raw") if f.endswith(".tmp")]


@pytest.mark.parametrize("name,write", [("cifar10", lambda base: write_cifar(base, "cifar10")),
                                        ("cifar100", lambda base: write_cifar(base, "cifar100")), ("stl10", write_stl10)])
def test_load_dataset_without_download_says_which_files_go_where(tmp_path, no_checksums, refused, name, write):
    """Without its files and without download: one line naming the dataset, the folder and torchvision's reason,
    then where the files go, writing nothing; files written in the real format where it says then load."""
    err = refused(lambda: simclr.load_dataset(name, str(tmp_path / "data"), 32, download=False))
    assert err.startswith(f"error: could not load {name} from '{tmp_path / 'data'}' (") and err.count("\n") == 2
    assert err.strip().endswith("and run with --no-download.") and not os.listdir(tmp_path)
    write(pathlib.Path(err.split("put the files at ")[1].split("/{")[0]))  # the folder it names
    assert len(simclr.load_dataset(name, str(tmp_path / "data"), 32, download=False)["test_y"]) == 3


def test_stratified_draws_keep_each_class_share_and_hold_every_smaller_draw():
    """Every size n of a draw from unbalanced labels: each class within one image of its share, and the draw of n + 1
    images holds the draw of n (largest remainders break this: a class can lose an image as n grows)."""
    g = lambda: torch.Generator().manual_seed(5)
    for y in (torch.tensor([0] * 7 + [1] * 5 + [2] * 3 + [3] * 2), simclr.make_shapes(300, 8, seed=0)[1]):
        counts, prev = torch.bincount(y), set()
        for n in range(1, len(y) + 1):
            idx = set(simclr.stratified(y, n, g()).tolist())
            share = torch.bincount(y[sorted(idx)], minlength=len(counts)) - counts * n / len(y)
            assert len(idx) == n and prev <= idx and share.abs().max() < 1 + 1e-9, n
            prev = idx


def test_stratified_subset_is_seeded_and_the_right_size():
    y = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)  # sorted by class, like Imagenette's folders
    idx = simclr.stratified(y, 50, torch.Generator().manual_seed(0))
    assert len(idx) == 50 and len(set(idx.tolist())) == 50
    assert torch.bincount(y[idx]).tolist() == [30, 15, 5]  # each class keeps its share
    assert torch.equal(idx, simclr.stratified(y, 50, torch.Generator().manual_seed(0)))
    assert not torch.equal(idx, simclr.stratified(y, 50, torch.Generator().manual_seed(1)))
    odd = simclr.stratified(torch.tensor([0, 0, 1, 1, 2, 2, 2]), 4, torch.Generator().manual_seed(0))
    assert sorted(torch.bincount(torch.tensor([0, 0, 1, 1, 2, 2, 2])[odd], minlength=3).tolist()) == [1, 1, 2]


def test_pil_to_uint8_resizes_images_to_a_square_for_the_paper():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    ds = [(img, 0)]
    square = simclr.pil_to_uint8(ds, 16, square=True)[0][0]
    t = TF.pil_to_tensor(img)
    assert torch.equal(square, TF.resize(t, [16, 16], antialias=True))  # the whole image, aspect not kept
    assert torch.equal(simclr.pil_to_uint8(ds, 16)[0][0], TF.center_crop(TF.resize(t, 16, antialias=True), 16))


def test_where_data_fits_keeps_data_too_big_for_the_gpu_in_host_memory(monkeypatch):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (10 * 2 ** 30, 80 * 2 ** 30))  # 10 GiB free
    gpu = torch.device("cuda", 0)
    assert simclr.where_data_fits(4 * 2 ** 30, gpu) == "device"
    assert simclr.where_data_fits(6 * 2 ** 30, gpu) == "host"  # more than half the free memory
    assert simclr.where_data_fits(6 * 2 ** 30, gpu, "device") == "device"  # as asked
    assert simclr.where_data_fits(10 ** 12, torch.device("cpu")) == "device"  # the CPU's memory is the host's


def test_prepare_data_the_papers_imagenette_validates_on_a_tenth_of_its_val_split(tmp_path):
    """The paper's code loads Imagenette's "val" split for its validation set (every other dataset's comes from the
    train split): SimCLR pre-trains on 90% of the train images and validates on random_split(val, [0.9, 0.1], seed
    42)[1], standardised with the test split's statistics, as calculate_dataset_stats unwraps that Subset."""
    for split in ("train", "val"):
        for i in range(20):
            d = tmp_path / "imagenette2" / split / ("n01440764", "n02102040")[i % 2]
            d.mkdir(parents=True, exist_ok=True)
            pixels = np.random.default_rng(i + 100 * (split == "val")).integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(d / f"{i}.JPEG")
    args = simclr.parse_args(["--dataset", "imagenette", "--data-dir", str(tmp_path), "--no-download", "--recipe",
                              "paper", "--standardize", "--img-size", "16", "--batch-size", "2", "--out",
                              str(tmp_path / "run")])
    data = simclr.prepare_data(args, CPU)
    split = lambda n: [torch.tensor(s.indices) for s in torch.utils.data.random_split(
        range(n), [0.9, 0.1], generator=torch.Generator().manual_seed(42))]
    assert torch.equal(data["images"], data["train_x"][split(20)[0]])
    assert torch.equal(data["val_x"], data["test_x"][split(20)[1]]) and len(data["val_x"]) == 2
    def standardized(x, by):  # per channel, the mean over `by`'s images of each one's mean and (n - 1) std
        b = by.double().numpy() / 255
        m, s = (torch.from_numpy(np.mean(f(b, axis=(2, 3)), 0))[:, None, None]
                for f in (np.mean, functools.partial(np.std, ddof=1)))
        return ((x.double() / 255 - m) / s).float()
    for split, by in (("images", "train_x"), ("train_x", "train_x"), ("val_x", "test_x"), ("test_x", "test_x")):
        torch.testing.assert_close(data["prep"][split](data[split]), standardized(data[split], data[by]), atol=1e-5,
                                   rtol=0, msg=split)  # the train split's whole 20 images, the test split's its own


def test_main_images_in_host_memory_give_the_same_run_as_on_the_device(tmp_path):
    runs = {}
    for where in ("device", "host"):
        out = tmp_path / where
        res = simclr.main([*TINY, "--epochs", "2", "--data-on", where, "--head", "ae", "--ae-epochs", "2",
                           "--ae-dir", str(tmp_path / where / "ae"), "--out", str(out)])
        runs[where] = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]
        runs[where].append(res["linear_top1"])
    assert runs["host"] == runs["device"]


# ---------------------------------------------------------------- Part 2: the paper's protocol


def test_paper_probe_separates_separable_data_fails_on_noise_and_sees_the_raw_features():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (700,), generator=g)
    h = torch.randn(3, 20, generator=g)[y] * 2 + torch.randn(700, 20, generator=g)
    split = lambda h: (h[:500], y[:500], h[500:600], y[500:600], h[600:], y[600:])
    acc = simclr.paper_probe(*split(h), 3)
    assert acc > 0.95
    toward_0 = 3 * h[:500][y[:500] == 0].mean(0)  # moves every test feature toward class 0: per-split z-scoring
    shifted = torch.cat([h[:600], h[600:] + toward_0])  # would undo it; the paper's code (raw features) does not
    assert simclr.paper_probe(*split(shifted), 3) < acc - 0.2
    assert simclr.paper_probe(*split(torch.randn(700, 20, generator=g)), 3) < 0.5


def test_paper_probe_whose_validation_loss_is_never_finite_tests_nothing():
    h, y = torch.randn(20, 4, generator=torch.Generator().manual_seed(0)), torch.arange(20) % 2
    assert math.isnan(simclr.paper_probe(h, y, h * float("nan"), y, h, y, 2, epochs=2))  # no epoch to pick


def test_paper_probe_steps_its_plateau_on_the_last_batch_loss(monkeypatch):
    """The paper's probe logs train_loss per step, which Lightning hands ReduceLROnPlateau at the end of each epoch:
    the last batch's loss (here a batch of 4 of 100 images), not the epoch's mean."""
    events, real_ce = [], F.cross_entropy

    class Plateau(torch.optim.lr_scheduler.ReduceLROnPlateau):
        def step(self, metrics):
            events.append(("plateau", float(metrics)))
            return super().step(metrics)
    monkeypatch.setattr(torch.optim.lr_scheduler, "ReduceLROnPlateau", Plateau)
    monkeypatch.setattr(F, "cross_entropy", lambda logits, y: events.append(
        ("train" if torch.is_grad_enabled() else "val", real_ce(logits, y).item(), len(y))) or real_ce(logits, y))
    g = torch.Generator().manual_seed(0)
    h, y = torch.randn(140, 8, generator=g), torch.randint(0, 3, (140,), generator=g)
    simclr.paper_probe(h[:100], y[:100], h[100:120], y[100:120], h[120:], y[120:], 3, epochs=4)
    plateaus = [i for i, e in enumerate(events) if e[0] == "plateau"]
    assert len(plateaus) == 4
    for i in plateaus:
        last, epoch = events[i - 1], [e for e in events[max(0, i - 5):i] if e[0] == "train"]
        assert last[0] == "train" and last[2] == 4 and events[i][1] == pytest.approx(last[1], rel=1e-6)
        assert len(epoch) == 4 and events[i][1] != pytest.approx(sum(e[1] * e[2] for e in epoch) / 100, rel=1e-3)


def test_paper_probe_tests_the_epoch_of_lowest_validation_loss(monkeypatch):
    """Validation losses scripted lowest at epoch 3 of 6: the probe's top-1 is that of a 3-epoch run (the training
    does not depend on them), not the 6th epoch's."""
    g = torch.Generator().manual_seed(0)
    h, y = torch.randn(140, 8, generator=g), torch.randint(0, 3, (140,), generator=g)
    real_ce = F.cross_entropy

    def probe(val_losses):
        script = iter(val_losses)
        monkeypatch.setattr(F, "cross_entropy", lambda logits, t: real_ce(logits, t) if torch.is_grad_enabled() else
                            torch.tensor(next(script)))
        return simclr.paper_probe(h[:100], y[:100], h[100:120], y[100:120], h[120:], y[120:], 3, epochs=len(val_losses),
                                  lr=0.5)
    third, sixth = probe([3, 2, 1]), probe([6, 5, 4, 3, 2, 1])
    assert probe([3, 2, 1, 2, 3, 4]) == third != sixth


@pytest.mark.parametrize("n,batch", [(1010, 100), (10_000, 512)])
def test_evaluate_paper_splits_the_whole_batches_of_the_test_features_70_10_20(monkeypatch, n, batch):
    """The paper's loader drops the last batch of the test features (1000 of 1010 at batch 100, Fashion-MNIST's 9728
    of 10,000 at 512), and its random_split(seed 42) cuts those 70/10/20, flooring each part and adding the remainder
    from the first part on: at 9728, 6810 / 973 / 1945 (int(0.7 n) and int(0.8 n) would give 6809 / 973 / 1946)."""
    seen = {}
    monkeypatch.setattr(simclr, "paper_probe", lambda *a: seen.update(probe=[t[:, 0].long().tolist() for t in a[:6:2]])
                        or 0.0)
    monkeypatch.setattr(simclr, "knn_top1", lambda *a, **k: seen.update(knn=[t[:, 0].long().tolist() for t in a[:3:2]])
                        or 0.0)
    h, y = torch.arange(n).float()[:, None], torch.randint(0, 2, (n,))  # each feature row: its image's number
    simclr.evaluate(h, y, h, y, 2, protocol="paper", batch=batch)
    theirs = [s.indices for s in torch.utils.data.random_split(range(n // batch * batch), [0.7, 0.1, 0.2],
                                                                generator=torch.Generator().manual_seed(42))]
    assert seen["probe"] == theirs and seen["knn"] == [theirs[0], theirs[2]]
    assert [len(t) for t in theirs] == ([700, 100, 200] if n == 1010 else [6810, 973, 1945])  # worked by hand above


def test_validation_loss_is_the_nt_xent_of_identical_views_over_whole_batches(one_thread):
    """Two identical views of each image, batch by batch, the mean over the whole batches (the paper's val loader
    drops the last; fewer images than a batch are one batch); the model in eval mode and back in train mode after."""
    import argparse
    model = small_simclr().train()
    val_x = torch.randint(0, 256, (5, 3, 6, 6), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    got = [simclr.validation_loss(model, val_x, argparse.Namespace(batch_size=b, tau=0.5), lambda x: x.float() / 255)
           for b in (3, 2, 8)]  # batches of 3 (and 2, dropped); of 2, 2 (and 1, dropped); of all 5
    assert model.training
    model.eval()
    with torch.no_grad():
        loss = lambda x: float(naive_nt_xent(*[model(x.float() / 255)] * 2, 0.5))
        assert got[0] == pytest.approx(loss(val_x[:3]), rel=1e-6)
        assert got[1] == pytest.approx((loss(val_x[:2]) + loss(val_x[2:4])) / 2, rel=1e-6)
        assert got[2] == pytest.approx(loss(val_x), rel=1e-6)


def test_main_recipe_paper_runs_the_papers_protocol(tmp_path, fake_imagenet_weights, monkeypatch, capsys):
    """--recipe paper as the authors' code: fp32; each view through the backbone alone (BatchNorm sees N images, not
    2N); ToTensor's [0, 1] inputs, or with --standardize each split's own statistics; 90% of the train split trained
    on, the backbone of the epoch of lowest validation loss on the other 10% evaluated."""
    seen, real = [], simclr.make_backbone

    def watched(*a, **k):  # records the training inputs of conv1: their batch size and value range
        net = real(*a, **k)
        net.conv1.register_forward_pre_hook(lambda m, x: seen.append((m.training, x[0].detach().clone())))
        return net
    monkeypatch.setattr(simclr, "make_backbone", watched)
    scores, real_val = iter([2.0, 1.0, 1.0]), simclr.validation_loss  # epoch 2 the best: the first of a tie, not last
    monkeypatch.setattr(simclr, "validation_loss", lambda *a: (real_val(*a), next(scores))[1])
    epochs, real_save = [], simclr.save_atomic  # each epoch's backbone, from its checkpoint
    monkeypatch.setattr(simclr, "save_atomic", lambda obj, path: (epochs.append(
        {k[9:]: v.clone() for k, v in obj["model"].items() if k.startswith("backbone.")})
        if path.endswith("checkpoint.pt") else None, real_save(obj, path))[1])
    flags = [*TINY, "--epochs", "3", "--recipe", "paper", "--arch", "resnet18", "--knn-every", "0"]
    simclr.main([*flags, "--out", str(tmp_path / "unit")])
    monkeypatch.setattr(simclr, "validation_loss", real_val)
    printed = capsys.readouterr().out
    cfg = json.loads((tmp_path / "unit" / "config.json").read_text())
    assert cfg["precision"] == "fp32" and "87 pre-training + 9 validation" in printed  # random_split: 86.4 / 9.6
    train_inputs = [x for training, x in seen if training]
    assert {len(x) for x in train_inputs} == {16} and min(x.min() for x in train_inputs) >= 0 and \
        max(x.max() for x in train_inputs) <= 1 + 1e-5  # N views of 16 px, ToTensor's values
    assert "evaluating the backbone of epoch 2" in printed and len(epochs) == 3
    lrs, opt = [], torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg["lr"])  # Lightning's schedule:
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3, eta_min=cfg["lr"] / 50)  # once an epoch
    for _ in range(3):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    metrics = [json.loads(line) for line in (tmp_path / "unit" / "metrics.jsonl").read_text().splitlines()]
    assert [m["lr"] for m in metrics] == pytest.approx(lrs, rel=1e-9)  # the lr of each epoch's last step
    for saved in (torch.load(tmp_path / "unit" / "backbone.pt"),  # the backbone evaluated: epoch 2's, kept in the
                  torch.load(tmp_path / "unit" / "checkpoint.pt", weights_only=False)["best_backbone"]):  # checkpoint
        assert all(torch.equal(saved[k], epochs[1][k]) for k in saved)
        assert not all(torch.equal(saved[k], epochs[2][k]) for k in saved)
    simclr.main(["--resume", str(tmp_path / "unit"), "--show-neighbours", str(tmp_path / "nb.png")])  # the same epoch
    assert "evaluating the backbone of epoch 2" in capsys.readouterr().out
    seen.clear()
    simclr.main([*flags, "--epochs", "1", "--standardize", "--eval", "standard", "--label-fractions", "1",
                 "--sup-steps", "1", "--out", str(tmp_path / "standardized")])  # one epoch shows every input
    # STANDARDIZE as calculate_dataset_stats: per channel the mean of each image's mean and (n - 1) std; the train
    # split's for its 90% and its 10% (the Subset unwrapped), the test split's its own
    stats = lambda x: [np.mean(f(x / 255, axis=(2, 3)), 0) for f in (np.mean, functools.partial(np.std, ddof=1))]
    standardized = lambda x, m, s: torch.from_numpy((x / 255 - m[:, None, None]) / s[:, None, None]).float()
    train_x, test_x = (simclr.make_shapes(96, 16, seed=s)[0].numpy().astype(np.float64) for s in (0, 10_000))
    val = torch.utils.data.random_split(range(96), [0.9, 0.1], generator=torch.Generator().manual_seed(42))[1].indices
    val_inputs = [x for training, x in seen if not training and len(x) == len(val)][0]  # the first validation loss
    torch.testing.assert_close(val_inputs, standardized(train_x[val], *stats(train_x)), atol=1e-5, rtol=0)
    test_inputs = [x for training, x in seen if not training and len(x) == 96][-1]  # the last: the supervised test's
    torch.testing.assert_close(test_inputs, standardized(test_x, *stats(test_x)), atol=1e-5, rtol=0)


def test_main_recipe_paper_evaluates_the_best_epoch_across_a_resume(tmp_path, fake_imagenet_weights, monkeypatch,
                                                                     capsys):
    """The paper's code evaluates the epoch of lowest validation loss; its backbone travels in checkpoint.pt, so that
    a run stopped after its best epoch and resumed for a worse one evaluates the best epoch's weights."""
    scores, real_val = iter([2.0, 1.0, 3.0]), simclr.validation_loss  # epoch 2 the best
    monkeypatch.setattr(simclr, "validation_loss", lambda *a: (real_val(*a), next(scores))[1])
    epochs, real_save = [], simclr.save_atomic  # each epoch's backbone, from its checkpoint; the run stops after two

    class Stop(Exception):
        pass

    def save(obj, path):
        real_save(obj, path)
        if path.endswith("checkpoint.pt"):
            epochs.append({k[9:]: v.clone() for k, v in obj["model"].items() if k.startswith("backbone.")})
            if len(epochs) == 2:
                raise Stop
    monkeypatch.setattr(simclr, "save_atomic", save)
    with pytest.raises(Stop):
        simclr.main([*TINY, "--epochs", "3", "--recipe", "paper", "--arch", "resnet18", "--out", str(tmp_path / "run")])
    simclr.main(["--resume", str(tmp_path / "run")])
    assert "evaluating the backbone of epoch 2" in capsys.readouterr().out and len(epochs) == 3
    saved = torch.load(tmp_path / "run" / "backbone.pt")
    assert all(torch.equal(saved[k], epochs[1][k]) for k in saved)
    assert not all(torch.equal(saved[k], epochs[2][k]) for k in saved)


def test_main_recipe_paper_trains_the_autoencoder_on_the_90_percent_and_validates_on_the_10(tmp_path, monkeypatch,
                                                                                             fake_imagenet_weights):
    """The paper's autoencoder sees the split SimCLR sees (split_vision_dataset, seed 42): it trains on the 90% that
    SimCLR pre-trains on and validates on the 10% of SimCLR's validation loss, not on a 90/10 split of the 90%."""
    seen, data, real_ae, real_prepare = {True: [], False: []}, {}, simclr.AutoEncoder, simclr.prepare_data

    class Watched(real_ae):
        def forward(self, x):
            seen[self.training].append((x * 255).round().to(torch.uint8))
            return super().forward(x)
    monkeypatch.setattr(simclr, "AutoEncoder", Watched)
    monkeypatch.setattr(simclr, "prepare_data", lambda *a, **k: data.update(real_prepare(*a, **k)) or data)
    simclr.main([*TINY, "--arch", "resnet18", "--epochs", "1", "--recipe", "paper", "--head", "ae", "--ae-epochs", "1",
                 "--ae-dim", "32", "--ae-dir", str(tmp_path / "ae"), "--out", str(tmp_path / "run")])  # resnet18: weights
    rows = lambda x: sorted(bytes(r.tolist()) for r in x.flatten(1).cpu())  # the images, in any order
    assert rows(torch.cat(seen[True])) == rows(data["images"]) and len(data["images"]) == 87
    assert rows(torch.cat(seen[False])) == rows(data["val_x"]) and len(data["val_x"]) == 9


def test_main_optimizer_decays_what_the_recipe_says(tmp_path, fake_imagenet_weights):
    """The optimizer a run trains with (its saved state): two groups with the simclr recipe, conv and linear weights
    decayed and the rest not; one group, every parameter decayed, with the paper's."""
    groups = {}
    for recipe in ("simclr", "paper"):
        simclr.main([*TINY, "--epochs", "1", "--recipe", recipe, "--eval", "standard", "--arch", "resnet18",
                     "--out", str(tmp_path / recipe)])
        saved = torch.load(tmp_path / recipe / "checkpoint.pt", weights_only=False)["optimizer"]["param_groups"]
        groups[recipe] = [(g["weight_decay"], len(g["params"])) for g in saved]
    # the stand-in resnet18 (one block per stage): conv1, 2 per block, 3 downsampling convolutions (weights only),
    # as many BatchNorms (weight and bias); the head: 2 linear layers (weight and bias)
    assert groups["simclr"] == [(1e-5, 12 + 2), (0.0, 24 + 2)] and groups["paper"] == [(1e-5, 12 + 24 + 4)]


# ---------------------------------------------------------------- Part 2: the stages of a run


def test_autoencoder_cache_names_differ_by_every_setting_that_changes_the_autoencoder():
    """The images the autoencoder sees (dataset, size, subset, STL10's split, the paper's squared 90%) and its weights
    (d, epochs, seed): each changes the cache's name, so no run reuses another's autoencoder."""
    base = ["--head", "ae", "--dataset", "stl10"]
    variants = [[], ["--img-size", "64"], ["--subset", "100"], ["--stl10-pretrain", "train"], ["--ae-dim", "256"],
                ["--ae-epochs", "3"], ["--seed", "1"], ["--recipe", "paper", "--stl10-pretrain", "train"],
                ["--dataset", "cifar10"]]
    tags = [simclr.autoencoder_cache(simclr.parse_args([*base, *v])) for v in variants]
    assert len(set(tags)) == len(tags), tags
    assert tags[0] == simclr.autoencoder_cache(simclr.parse_args(base))  # and the same settings, the same name


def test_autoencoder_embedding_reuses_a_cache_of_its_own_seed_only(tmp_path, capsys):
    """The seed draws the AE's initial weights (and the shapes images): a cached AE is reused by its own seed only,
    so a run's result does not depend on which seed filled the cache first."""
    def reused(seed, out):
        simclr.main([*TINY, "--head", "ae", "--ae-epochs", "1", "--epochs", "0", "--seed", str(seed),
                     "--ae-dir", str(tmp_path / "ae"), "--out", str(tmp_path / out)])
        return "autoencoder: reusing" in capsys.readouterr().out
    assert [reused(0, "a"), reused(1, "b"), reused(0, "c")] == [False, False, True]
    assert len(os.listdir(tmp_path / "ae")) == 2


def test_autoencoder_embedding_names_a_corrupt_cache_and_trains_again(tmp_path, capsys):
    flags = [*TINY, "--head", "ae", "--ae-epochs", "1", "--epochs", "0", "--ae-dir", str(tmp_path / "ae")]
    simclr.main([*flags, "--out", str(tmp_path / "a")])
    (cache,) = (tmp_path / "ae").iterdir()
    cache.write_bytes(b"not an autoencoder")
    capsys.readouterr()
    simclr.main([*flags, "--out", str(tmp_path / "b")])
    assert f"the cached autoencoder {cache} cannot be read" in capsys.readouterr().out
    torch.load(cache)  # written again, whole


def test_autoencoder_embedding_cache_of_a_folder_with_a_long_path_has_a_short_name(tmp_path):
    deep = tmp_path / ("d" * 200) / ("e" * 200)
    make_folder(deep, size=(8, 8))
    args = simclr.parse_args(["--dataset", "folder", "--data-dir", str(deep), "--head", "ae", "--ae-epochs", "1",
                              "--ae-dir", str(tmp_path / "ae"), "--out", str(tmp_path / "run")])
    os.makedirs(args.out)
    simclr.autoencoder_embedding(dict(pool=torch.zeros(6, 3, 8, 8, dtype=torch.uint8), val_x=None), args, CPU)
    assert all(len(f) < 100 for f in os.listdir(tmp_path / "ae"))


def test_pretrain_long_epochs_show_progress_with_an_eta(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(simclr, "PROGRESS_EVERY_S", -1)  # a line after every step instead of every minute
    simclr.main(["--dry-run", "--no-baselines", "--out", str(tmp_path / "run")])
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("  epoch 1: step")]
    assert [l.split("|")[0].strip() for l in lines] == ["epoch 1: step 1/2", "epoch 1: step 2/2"]
    assert all("img/s" in l and "eta " in l for l in lines)
    assert lines[-1].endswith("eta 0m00s")  # after the last step of the last epoch no step is left, at any speed


def test_pretrain_stops_a_diverged_run_that_resumes_with_the_smaller_lr_it_advises(tmp_path, refused):
    """A loss gone to nan stops the run (no results), says where, and advises a --resume with a smaller --lr that
    --resume then accepts (other changed flags are still refused): the run continues and ends."""
    out = tmp_path / "run"
    err = refused([*TINY, "--epochs", "2", "--lr", "1e30", "--out", str(out)])
    assert "nan in epoch 1 (lr" in err and not (out / "results.json").exists()  # the loss or the weights
    advice = err[err.index("python simclr.py --resume"):].split()[2:6]  # --resume DIR --lr 1e+29
    assert advice[:3] == ["--resume", str(out), "--lr"] and float(advice[3]) == pytest.approx(1e29)
    assert "--epochs: saved 2, given 3" in refused(["--resume", str(out), "--lr", "0.01", "--epochs", "3"])
    assert "linear_top1" in simclr.main(["--resume", str(out), "--lr", "0.01"])
    assert json.loads((out / "config.json").read_text())["lr"] == 0.01 and not (out / "diverged.json").exists()


def test_pretrain_stops_when_weights_are_no_longer_finite(tmp_path, refused, monkeypatch):
    """BatchNorm's running variance gone to inf while the loss still looks fine: the run stops and says which."""
    real_step = simclr.sgd_step

    def step(model, *a, **k):
        loss = real_step(model, *a, **k)
        model.backbone.bn1.running_var.fill_(float("inf"))
        return loss
    monkeypatch.setattr(simclr, "sgd_step", step)
    assert "backbone.bn1.running_var became inf or nan" in refused([*TINY, "--epochs", "2", "--out", str(tmp_path / "run")])


def test_pretrain_warns_of_a_loss_stuck_at_ln_2n_minus_1_after_the_warm_up(tmp_path, capsys, monkeypatch):
    """Every view alike (a collapsed embedding) gives NT-Xent = ln(2N - 1) exactly: the run says so."""
    run = lambda out: simclr.main([*TINY, "--epochs", "2", "--warmup-epochs", "1", "--out", str(tmp_path / out)])
    run("learning")
    printed = capsys.readouterr().out
    assert "SimCLR needs a few hundred steps" in printed and "collapsed" not in printed
    monkeypatch.setattr(simclr, "nt_xent", lambda z1, z2, tau: (z1.sum() * 0 + math.log(2 * len(z1) - 1)).float())
    run("collapsed")
    warnings = [l for l in capsys.readouterr().out.splitlines() if "collapsed embedding" in l]
    assert len(warnings) == 1 and "all epoch 2" in warnings[0]  # after the warm-up only


def test_pixel_features_are_block_means_at_most_32px():
    x = torch.randint(0, 256, (5, 3, 96, 96), dtype=torch.uint8)
    blocks = x.float().div(255).view(5, 3, 32, 3, 32, 3).mean((3, 5))  # 3x3 block means: (5, 3, 32, 32)
    torch.testing.assert_close(simclr.pixel_features(x, torch.device("cpu"), batch=2), blocks.flatten(1))
    small = torch.randint(0, 256, (4, 3, 28, 28), dtype=torch.uint8)
    assert torch.equal(simclr.pixel_features(small, torch.device("cpu")), small.float().flatten(1) / 255)


def test_evaluate_with_baselines_writes_results_first_and_skips_a_baseline_out_of_memory(tmp_path, monkeypatch,
                                                                                          capsys, refused):
    def no_memory(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(simclr, "pixel_features", no_memory)
    res = simclr.main([*TINY[:-3], "--epochs", "1", "--out", str(tmp_path / "a")])  # TINY with the baselines
    assert res["raw_pixels"] == {"skipped": "out of memory (OutOfMemoryError)"} and "linear_top1" in res["random_init"]
    assert json.loads((tmp_path / "a" / "results.json").read_text()) == json.loads(json.dumps(res))
    assert "raw pixels (16px)" in capsys.readouterr().out

    def crash(*a, **k):
        raise KeyboardInterrupt  # Ctrl-C during the baselines
    monkeypatch.setattr(simclr, "make_backbone", lambda *a, real=simclr.make_backbone: (
        crash() if crashes.append(1) or len(crashes) > 1 else real(*a)))
    crashes = []
    err = refused([*TINY[:-3], "--epochs", "1", "--out", str(tmp_path / "b")], code=130)
    assert f"holds 1 of 1 epochs. Continue with: python simclr.py --resume {tmp_path / 'b'}" in err
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    assert 0 <= saved["linear_top1"] <= 1 and "random_init" not in saved  # SimCLR's own numbers were kept
    handler, running = signal.getsignal(signal.SIGINT), []  # parse_args reads the checkpoint before main's handler
    monkeypatch.setattr(simclr, "run", lambda *a, real=simclr.run: running.append(1) or real(*a))
    monkeypatch.setattr(simclr.torch, "load", lambda *a, real=torch.load, **k: (  # a second Ctrl-C while it counts
        running and os.kill(os.getpid(), signal.SIGINT), real(*a, **k))[1])
    assert "holds 1 of 1 epochs" in refused(["--resume", str(tmp_path / "b")], code=130)
    assert signal.getsignal(signal.SIGINT) is handler  # and Ctrl-C is Ctrl-C again after main


# ---------------------------------------------------------------- Part 2: few labels


def test_label_draw_is_stratified_deterministic_nested_and_differs_between_draws():
    y = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)[torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    draw = lambda amount, seed=0, d=0, per_class=False: simclr.label_draw(y, amount, per_class, seed, d)
    a = draw(0.1)
    assert len(set(a.tolist())) == 100 and torch.bincount(y[a]).tolist() == [60, 30, 10]  # each class its share
    assert torch.bincount(y[draw(7, per_class=True)]).tolist() == [7, 7, 7]  # exactly K of every class
    assert torch.equal(a, draw(0.1))  # seeded: the same draw every time
    assert not torch.equal(a, draw(0.1, d=1)) and not torch.equal(a, draw(0.1, seed=1))  # other draws differ
    assert set(draw(0.02).tolist()) < set(a.tolist())  # nested: 1% of draw 0 is inside 10% of draw 0
    assert len(draw(0.001)) == 3 and torch.equal(draw(1.0), torch.arange(1000))
    shapes = simclr.make_shapes(5000, 8, seed=0)[1]  # close fractions on shapes' labels: nested too
    assert set(simclr.label_draw(shapes, 0.1332, False, 0, 0).tolist()) < \
        set(simclr.label_draw(shapes, 0.1334, False, 0, 0).tolist())


def test_flip_and_crop_is_a_crop_of_the_reflect_padded_image_flipped_or_not():
    x, pad, H = images(300, size=8), 2, 8
    torch.manual_seed(0)
    out = simclr.flip_and_crop(x, pad)
    padded = TF.pad(x, [pad] * 4, padding_mode="reflect")  # torchvision's reflect padding, not the code's F.pad
    seen = set()
    for i in range(len(x)):  # every offset and flip, searched: exactly one reproduces the output
        found = [(t, l, f) for t in range(2 * pad + 1) for l in range(2 * pad + 1) for f in (False, True)
                 if torch.allclose(out[i], padded[i, :, t:t + H, l:l + H].flip(-1) if f else
                                   padded[i, :, t:t + H, l:l + H], atol=1e-5)]
        assert len(found) == 1, i
        seen.add(found[0])
    assert len(seen) == (2 * pad + 1) ** 2 * 2  # every offset, with and without the flip, is drawn


def colour_classes(y, g, size=16):
    """uint8 images whose class is their colour, under pixel noise: unchanged by flips and crops."""
    colour = torch.tensor([[1.0, 0.1, 0.1], [0.1, 1.0, 0.1], [0.1, 0.1, 1.0]])[y]  # (n, 3)
    x = 0.6 * colour[:, :, None, None] + 0.4 * torch.rand(len(y), 3, size, size, generator=g)
    return (x * 255).to(torch.uint8)


def test_supervised_from_scratch_learns_a_separable_problem_and_fails_on_noise(monkeypatch):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (48 + 90,), generator=g)  # 48 labelled images, 90 test images
    run = lambda x: simclr.supervised(x[:48], y[:48], x[48:], y[48:], 3, "resnet10", "imagenet", steps=20, seed=0,
                                      device="cpu")
    state = torch.get_rng_state()
    xc = colour_classes(y, g)
    lrs, real_step = [], torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda opt, *a: lrs.append(opt.param_groups[0]["lr"]) or
                        real_step(opt, *a))
    acc = run(xc)
    peak = 0.05 * 48 / 128  # 0.05 per 128 images, scaled to the batch of 48; warm-up over 2 steps, cosine to 0
    closed = [peak * (s + 1) / 2 if s < 2 else peak * (1 + math.cos(math.pi * (s - 1) / 18)) / 2 for s in range(20)]
    assert lrs == pytest.approx(closed, rel=1e-12, abs=1e-15)
    monkeypatch.undo()
    assert acc > 0.95
    assert torch.equal(torch.get_rng_state(), state)  # seeded on its own: the caller's RNG untouched
    assert run(xc) == acc  # and the seed decides the run
    assert run((torch.rand(len(y), 3, 16, 16, generator=g) * 255).to(torch.uint8)) < 0.55  # noise: chance is 1/3


def test_supervised_fine_tunes_every_weight_from_init_on_the_batches_of_its_from_scratch_pair(monkeypatch, one_thread):
    """Fine-tuning starts from the weights it is given and trains every one of them (no frozen backbone), on the very
    batches and crops that the from-scratch run of the same seed trains on: the two runs differ in their start only."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (36,), generator=g)
    x = colour_classes(y, g, size=8)
    torch.manual_seed(5)
    init = simclr.make_backbone("resnet18", "imagenet").state_dict()  # SimCLR's weights, for the test
    runs, real_backbone, real_crop = [], simclr.make_backbone, simclr.flip_and_crop

    def backbone(*a, **k):  # the net, its weights when it first trains, and the crops of its run
        run = dict(net=real_backbone(*a, **k), crops=[])

        def first_forward(module, args):  # returns None: a pre-hook's return value would replace the input
            if "start" not in run:
                run["start"] = copy.deepcopy(module.state_dict())
        run["net"].register_forward_pre_hook(first_forward)
        runs.append(run)
        return run["net"]
    monkeypatch.setattr(simclr, "make_backbone", backbone)
    monkeypatch.setattr(simclr, "flip_and_crop", lambda *a, **k: runs[-1]["crops"].append(real_crop(*a, **k)) or
                        runs[-1]["crops"][-1])
    for weights in (init, None):
        simclr.supervised(x[:24], y[:24], x[24:], y[24:], 3, "resnet18", "imagenet", steps=2, seed=0, device="cpu",
                          init=weights)
    tuned, scratch = runs
    assert all(torch.equal(v, init[k]) for k, v in tuned["start"].items())
    assert not any(torch.equal(p, init[k]) for k, p in tuned["net"].named_parameters())  # every weight trained
    assert not all(torch.equal(v, init[k]) for k, v in scratch["start"].items())
    assert len(tuned["crops"]) == 2 and all(torch.equal(a, b) for a, b in zip(tuned["crops"], scratch["crops"]))


def test_label_efficiency_table_and_pictures_with_and_without_matplotlib(tmp_path, monkeypatch, capsys, one_thread):
    flags = [*TINY, "--epochs", "2", "--knn-every", "1", "--label-fractions", "0.1,1", "--label-draws", "2",
             "--sup-steps", "2"]
    out = tmp_path / "run"
    seen = []  # the labels each supervised run was given, the weights it started from, and its other arguments
    sup = simclr.supervised
    monkeypatch.setattr(simclr, "supervised", lambda x, y, *a, **k: seen.append(
        (x.clone(), y.clone(), k["init"], a[2:], k["prep"], k["test_prep"])) or sup(x, y, *a, **k))
    res = simclr.main([*flags, "--out", str(out)])
    rows = res["label_efficiency"]["rows"]
    assert [(r["amount"], r["labels"], r["draws"]) for r in rows] == [(0.1, 10, 2), (1.0, 96, 1)]
    for r in rows:
        for key in ("simclr_linear", "simclr_knn", "random_init_linear", "simclr_finetuned", "supervised"):
            runs = r[key]["runs"]
            assert len(runs) == r["draws"] and all(0 <= v <= 1 for v in runs)
            assert r[key]["mean"] == pytest.approx(np.mean(runs))
            assert r[key]["std"] == pytest.approx(np.std(runs, ddof=1) if len(runs) > 1 else 0.0)
    data = simclr.load_dataset("shapes", "data", 16, seed=0, subset=96)  # TINY's data, drawn again independently
    backbone = torch.load(out / "backbone.pt")
    assert [run[2] is None for run in seen] == [False, True] * 3  # fine-tuned, then from scratch, each draw
    assert all(torch.equal(run[2][k], backbone[k]) for run in seen[::2] for k in backbone)  # SimCLR's weights
    for tuned, scratch in zip(seen[::2], seen[1::2]):  # the same images, labels, steps, seed and the rest
        assert torch.equal(tuned[0], scratch[0]) and torch.equal(tuned[1], scratch[1]) and tuned[3:] == scratch[3:]
    assert [run[3][4] for run in seen[::2]] == [0, 1, 0]  # seed 1000 * --seed + draw: each draw of a set its own
    for (x, y, *_), d in zip(seen[::2], (0, 1)):  # each draw of 10% got exactly its own images and labels
        idx = simclr.label_draw(data["train_y"], 0.1, False, 0, d)
        assert torch.equal(x, data["train_x"][idx]) and torch.equal(y, data["train_y"][idx])
    assert not torch.equal(seen[0][0], seen[2][0]) and len(seen[4][1]) == 96  # two draws, then every label
    assert rows[1]["simclr_linear"]["mean"] == res["linear_top1"]  # all the labels: the run's own probe
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(res))
    for f in ("neighbours.png", *(["curves.png", "label_efficiency.png"] if HAS_MPL else [])):
        Image.open(out / f).verify()
    assert Image.open(out / "neighbours.png").size == (19 * 18 + 2, 8 * 18 + 2)  # 8 rows of 1 + gap + 8 + gap + 8
    grid = torch.from_numpy(np.array(Image.open(out / "neighbours.png").convert("RGB"))).permute(2, 0, 1)  # (3, H, W)
    for r, i in enumerate(simclr.stratified(data["test_y"], 8, torch.Generator().manual_seed(0))):  # column 0
        assert torch.equal(grid[:, 2 + 18 * r:18 * (r + 1), 2:18], data["test_x"][i])  # each query, to the bit
    assert "supervised (2 steps)" in capsys.readouterr().out
    # --show-neighbours of a saved run: the same picture, without training or evaluating again
    before = {f: (out / f).read_bytes() for f in ("metrics.jsonl", "results.json")}
    simclr.main(["--resume", str(out), "--show-neighbours", str(tmp_path / "look" / "nb.png")])
    assert (tmp_path / "look" / "nb.png").read_bytes() == (out / "neighbours.png").read_bytes()
    assert before == {f: (out / f).read_bytes() for f in before}
    # without matplotlib: a note for each plot, the run goes on, the neighbours are still drawn
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # "import matplotlib..." now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    capsys.readouterr()
    simclr.main([*TINY, "--epochs", "1", "--label-fractions", "1", "--sup-steps", "1", "--out", str(tmp_path / "bare")])
    notes = [l for l in capsys.readouterr().out.splitlines() if "matplotlib is not installed" in l]
    assert [n.split()[1] for n in notes] == ["curves.png", "label_efficiency.png"]
    assert sorted(f for f in os.listdir(tmp_path / "bare") if f.endswith(".png")) == ["neighbours.png"]


# ---------------------------------------------------------------- Part 2: pictures


def test_plot_curves_draws_every_line_of_metrics(tmp_path, monkeypatch):
    lines = [dict(epoch=e, loss=5 - e, lr=0.1 * e, **(dict(knn_top1=0.1 * e) if e % 2 == 0 else {})) for e in (1, 2, 3, 4)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    drawn = {}
    monkeypatch.setattr(simclr, "save_plot", lambda path, panels, *a, **k: drawn.update(path=path, panels=panels))
    simclr.plot_curves(str(tmp_path / "metrics.jsonl"), "c.png")
    (_, *loss), (_, *lr), (_, *knn) = (lines[0] for lines in drawn["panels"].values())
    assert loss == [[1, 2, 3, 4], [4, 3, 2, 1], None] and lr[1] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert knn[0] == [2, 4] and knn[1] == pytest.approx([20, 40])


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib is not installed")
def test_save_plot_draws_each_panel_with_its_title_and_lines(tmp_path, monkeypatch):
    import matplotlib.figure
    figures = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: figures.append(fig))
    simclr.save_plot(str(tmp_path / "p.png"), {"one": [("a", [1, 2], [3, 4], None)],
                                               "two": [("b", [1, 10], [5, 6], [1, 1]), ("c", [1, 10], [7, 8], None)]},
                     "images", logx=True)
    one, two = figures[0].axes
    assert [one.get_title(), two.get_title(), one.get_xlabel(), two.get_xscale()] == ["one", "two", "images", "log"]
    assert [len(one.lines), len(two.containers), one.get_legend()] == [1, 2, None]  # a legend where lines are several
    assert [t.get_text() for t in two.get_legend().get_texts()] == ["b", "c"]


def test_show_augs_writes_a_grid_of_the_8_images_it_makes(tmp_path, monkeypatch):
    png = tmp_path / "augs.png"
    simclr.main(["--dry-run", "--show-augs", str(png), "--out", str(tmp_path / "run")])
    im = Image.open(png)
    assert im.size[0] > im.size[1] > 0  # 8 columns, 3 rows
    made = []  # the shapes it generates: the 8 it draws (and 8 test images), not the 7,000 of a run
    monkeypatch.setattr(simclr, "make_shapes", lambda n, *a, f=simclr.make_shapes, **k: made.append(n) or f(n, *a, **k))
    simclr.main(["--show-augs", str(png)])
    assert made == [8, 8]
    simclr.main(["--dry-run", "--show-augs", str(tmp_path / "augs.JPG"), "--out", str(tmp_path / "run")])
    assert Image.open(tmp_path / "augs.JPG").format == "JPEG" and sorted(os.listdir(tmp_path)) == [
        "augs.JPG", "augs.png"]  # no temporary file left


# ---------------------------------------------------------------- Part 2: the benchmark


def test_step_flops_match_the_closed_form():
    """A linear 'backbone' of in -> D on 2b views: forward 2(2b)(in)D, weight gradient the same (the input needs
    no gradient), and NT-Xent's (2b, D) @ (D, 2b) similarity matrix 3 x 2(2b)^2 D (forward + two gradients)."""
    b, H, D = 4, 5, 7
    n_in = 3 * H * H
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(n_in, D))
    views = torch.randn(2 * b, 3, H, H)
    expected = 2 * (2 * b) * n_in * D * 2 + 3 * 2 * (2 * b) ** 2 * D
    assert simclr.step_flops(model, views, 0.5, simclr.nullcontext) == expected
    assert model[1].weight.grad is None  # counted on a copy


def dataloader_model_rate(workers, warmup, steps, p, c):
    """Steps/s that a window of warmup + steps measures on a model of torch's DataLoader: batch k is made by
    worker k % w, handed over in order, each taking w / p s of its worker (p batches/s in all); at most 2w batches
    are asked for and not yet taken (prefetch_factor 2); all workers start at 0. A step takes its batch (waiting
    for it if need be) and then 1/c s. In steady state the rate is min(p, c)."""
    n = warmup + steps
    finish, busy_until = [0.0] * n, [0.0] * workers
    for k in range(min(2 * workers, n)):
        finish[k] = busy_until[k % workers] = busy_until[k % workers] + workers / p
    t = t0 = 0.0
    for i in range(n):
        if i == warmup:
            t0 = t
        t = max(t, finish[i])  # wait for batch i
        k = i + 2 * workers  # its slot asks for batch k now
        if k < n:
            finish[k] = busy_until[k % workers] = max(busy_until[k % workers], t) + workers / p
        t += 1 / c
    return steps / (t - t0)


def test_classic_window_measures_the_workers_not_their_queue():
    """The classic rows of --bench must time the workers' steady rate min(p, c), whatever the workers' speed p
    against the step's c. The window used before (2w + 3 warm-up, --bench-steps timed) gives, in the H200 case
    (16 workers, 10 steps, workers at 15% of the step's pace), the step's own speed, as that machine measured."""
    assert dataloader_model_rate(16, 2 * 16 + 3, 10, 0.15, 1.0) == pytest.approx(1.0)  # the old window's error
    for workers in (1, 2, 3, 16, 64):
        for bench_steps in (1, 10, 37, 1000):
            for ratio in (0.02, 0.15, 0.5, 0.85, 0.95, 1.0, 1.2, 3.0):
                rate = dataloader_model_rate(workers, *simclr.classic_window(workers, bench_steps), ratio, 1.0)
                assert rate == pytest.approx(min(ratio, 1.0), rel=0.02), (workers, bench_steps, ratio)
    assert simclr.classic_window(0, 7) == (3, 7)  # no workers: no queue to drain


def test_bench_times_every_row_over_its_own_steps(tmp_path, monkeypatch):
    """bench() on a clock that ticks 1 s a reading: each row's time is the 1 s between its two readings over the steps
    it timed (--bench-steps for ours; for the classic rows, whole bursts of the workers: 16 for one), and its img/s,
    the speed-up and the augmentation's share follow in closed form; bench.json holds the same."""
    ticks = iter(range(10 ** 6))
    monkeypatch.setattr(simclr, "time", simclr.types.SimpleNamespace(
        perf_counter=lambda: next(ticks), time=time.time, strftime=time.strftime))
    out = tmp_path / "bench"
    r = simclr.main(["--bench", "--bench-steps", "2", "--subset", "64", "--batch-size", "16", "--img-size", "16",
                     "--workers", "1", "--out", str(out)])
    for row, steps in dict(ours=2, augment=2, train_step=2, classic=16, classic_loader=16).items():
        assert r["rows"][row] == pytest.approx(dict(ms_per_step=1000 / steps, img_per_s=16 * steps)), row
    assert (r["speedup"], r["augment_share"]) == pytest.approx((2 / 16, 1.0))
    # the run these flags start: 7 epochs of 64 // 16 steps at (a)'s 0.5 s, and a kNN monitor after epoch 5 that
    # extracts the features as the evaluation does, timed at 1 s; the evaluation: features + probes (2 s) for SimCLR
    # and the random-init backbone, and the raw pixels' probes (1 s)
    assert (r["pretrain_s"], r["evaluate_s"], r["run_s"]) == (7 * 4 * 0.5 + 1, 2 * 2 + 1, 20)
    assert r["flops_per_step"] > 0 and r["mfu"] is None  # no peak figure for a CPU
    assert r["compiled"] == {"augmentation": False, "model": False}  # --compile auto: CUDA only
    assert json.loads((out / "bench.json").read_text()) == r and not (out / "config.json").exists()


# ---------------------------------------------------------------- Part 2: main, end to end


@pytest.mark.parametrize("extra", [["--head", "mlp", "--arch", "resnet34", "--stem", "imagenet"],
                                   ["--head", "ae", "--act", "sigmoid"]])
def test_main_dry_run_end_to_end_writes_every_output(tmp_path, extra, capsys):
    """Every stage for a couple of steps, every output written: into --out, or without it into a temporary folder
    that the dry run names with its files, then removes."""
    out = tmp_path / "run"
    ae_dir = ["--ae-dir", str(tmp_path / "ae")] if "ae" in extra else []  # an autoencoder flag: ae head only
    outputs = ("config.json", "metrics.jsonl", "checkpoint.pt", "backbone.pt", "results.json", "neighbours.png",
               *(["curves.png"] if HAS_MPL else []))
    if "ae" in extra:
        simclr.main(["--dry-run", *ae_dir, *extra])
        stdout = capsys.readouterr().out
        written, temporary = re.search(r"dry run: wrote (.*) \(.* MB\) into (.*), now removed", stdout).groups()
        assert set(written.split(", ")) >= set(outputs) and not os.path.exists(temporary)
        assert not (tmp_path / "ae").exists()  # nor is a dry run's autoencoder cached
        return
    simclr.main(["--dry-run", "--out", str(out), *ae_dir, *extra])
    stdout = capsys.readouterr().out
    assert "raw pixels" in stdout and "random-init" in stdout and "SimCLR" in stdout
    for f in outputs:
        assert (out / f).exists(), f
    res = json.loads((out / "results.json").read_text())
    for r in (res, res["raw_pixels"], res["random_init"]):
        assert 0 <= r["linear_top1"] <= 1 and 0 <= r["knn_top1"] <= 1
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert {"model", "optimizer", "epoch", "rng", "config"} <= set(ckpt)
    if "resnet34" in extra:
        sd = torch.load(out / "backbone.pt")
        missing, unexpected = torchvision.models.resnet34().load_state_dict(sd, strict=False)
        assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []


# ================================================================ toy_theory.py

@pytest.fixture
def one_thread():
    """Tiny tensors: extra threads only add contention on a shared CPU (40x slower measured on 2 busy cores)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ---- cnn: the data model of Cao et al. 2022 / Zhang & Cao 2024 -------------------------------------------------


def test_cnn_data_snr_and_noise_orthogonality():
    d, snr, sigma_p, n = 150, 0.2, 1.5, 4000
    g = torch.Generator().manual_seed(0)
    mu = toy_theory.cnn_mu(d, snr, sigma_p)
    assert math.isclose(mu.norm().item() / (sigma_p * math.sqrt(d)), snr, rel_tol=1e-12)
    y = toy_theory.cnn_labels(n, g)
    X = toy_theory.cnn_data(y, mu, sigma_p, g)  # (n, 2, d)
    assert X.shape == (n, 2, d)
    is_sig = torch.isclose(X, y[:, None, None] * mu).all(-1)  # (n, 2): which patch equals y * mu
    assert (is_sig.sum(1) == 1).all(), "exactly one signal patch per sample"
    xi = X[~is_sig]  # (n, d): the noise patches
    u = (mu / mu.norm()).numpy()
    assert np.abs(xi.numpy() @ u).max() < 1e-10, "noise must be orthogonal to mu"
    # covariance sigma_p^2 (I - u u^T): trace sigma_p^2 (d - 1)
    emp = (xi ** 2).sum(1).mean().item()
    assert abs(emp / (sigma_p ** 2 * (d - 1)) - 1) < 0.02
    assert abs(y.mean().item()) < 0.05  # labels balanced


def test_cnn_forward_matches_naive_loop():
    g = torch.Generator().manual_seed(1)
    m, q, d = 3, 3, 7
    W = torch.randn(2, 2 * m, d, generator=g, dtype=torch.float64)  # two networks, batched
    X = torch.randn(5, 2, d, generator=g, dtype=torch.float64)
    out = toy_theory.cnn_f(W, X, q, m)  # (2, 5): both networks on the same samples
    assert torch.allclose(toy_theory.cnn_f(W[1], X, q, m), out[1], rtol=1e-12)
    for k in range(2):
        for i in range(5):
            ref = 0.0
            for j, sign in [(0, 1.0), (1, -1.0)]:
                for r in range(m):
                    for p in range(2):
                        ref += sign / m * max(0.0, float(W[k, j * m + r] @ X[i, p])) ** q
            assert math.isclose(out[k, i].item(), ref, rel_tol=1e-10, abs_tol=1e-12)


def test_stratified_labels_follow_the_binomial_and_cover_one_class_sets(one_thread):
    """Over S sets the count of +1 labels takes each value k as often as S C(n, k) / 2^n allows (to within one set),
    so at n = 2 half the sets hold one class only; the reference counts all 2^n label vectors."""
    import itertools
    g = torch.Generator().manual_seed(0)
    for n, S in [(2, 8), (3, 8), (4, 16), (5, 6), (20, 5)]:
        ys = [toy_theory.stratified_labels(n, j, S, g) for j in range(S)]
        assert all(set(y.tolist()) <= {-1.0, 1.0} and len(y) == n for y in ys)
        counts = np.bincount([int((y > 0).sum()) for y in ys], minlength=n + 1)
        if n <= 5:
            law = np.bincount([sum(v) for v in itertools.product([0, 1], repeat=n)], minlength=n + 1) / 2 ** n
            assert np.all(np.abs(counts - S * law) <= 1), (n, counts, S * law)
    assert [int((y > 0).sum()) for y in (toy_theory.stratified_labels(2, j, 8, g) for j in range(8))] == [0, 0, 1, 1, 1, 1, 2, 2]
    orders = {tuple(toy_theory.stratified_labels(4, 3, 8, g).tolist()) for _ in range(20)}
    assert len(orders) > 1  # the positives sit at random places, not first


def test_train_logistic_is_gradient_descent_until_the_tolerance(one_thread):
    """Against GD written here on W with the closed-form gradient of log(1 + exp(-y f)), f = F_{+1} - F_{-1} with
    ReLU^q: the same weights after every step, the stop at the first step whose loss is below tol, and two networks
    trained as one batch each as if alone (one stops at its tolerance, the other goes on)."""
    g = torch.Generator().manual_seed(3)
    m, q, d, n, eta = 2, 3, 6, 5, 0.05

    def reference(W, X, y, steps):  # numpy GD on W itself, one network
        Wn, Xn, yn, losses = W.numpy().copy(), X.numpy(), y.numpy(), []
        sign = np.array([1.0] * m + [-1.0] * m)
        for _ in range(steps):
            pre = Xn @ Wn.T  # (n, 2, 2m)
            f = (np.maximum(pre, 0) ** q).sum(1) @ sign / m
            losses.append(np.mean(np.log1p(np.exp(-yn * f))))
            coef = -yn / (1 + np.exp(yn * f)) / n  # d loss / d f_i
            grad = np.einsum("i,ipr,ipd->rd", coef, q * np.maximum(pre, 0) ** (q - 1), Xn) * sign[:, None] / m
            Wn = Wn - eta * grad
        return Wn, losses

    sets = []
    for _ in range(2):  # patches y_i mu and xi_i, mu a random direction: the data model's structure, nothing more
        y = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0], dtype=torch.float64)
        mu = torch.randn(d, generator=g, dtype=torch.float64)
        sets.append((0.5 * torch.randn(2 * m, d, generator=g, dtype=torch.float64), toy_theory.cnn_data(y, mu, 1.0, g), y, mu))
    W, X, y, mu = (torch.stack(v) for v in zip(*sets))
    losses = [reference(W[k], X[k], y[k], 61)[1] for k in range(2)]
    assert all(a > b for a, b in zip(losses[0], losses[0][1:41]))
    tol = losses[0][40] * (1 + 1e-9)  # network 0 must stop at step 40, the first step below it
    stops = [next((t for t, loss in enumerate(ls) if loss < tol), 60) for ls in losses]
    assert stops[0] == 40 and stops[1] != 40  # network 1 stops at its own step
    W_out, loss, steps = toy_theory.train_logistic(W, X, y, mu, q, m, eta, 60, tol)
    assert steps.tolist() == stops
    for k in range(2):
        assert math.isclose(loss[k].item(), losses[k][stops[k]], rel_tol=1e-9)
        np.testing.assert_allclose(W_out[k].numpy(), reference(W[k], X[k], y[k], stops[k])[0], rtol=1e-9, atol=1e-12)


def test_pretraining_stops_once_the_loss_is_below_log_n0_minus_drop(one_thread):
    """The stop rule reads the InfoNCE loss alone: at the step returned the loss (a naive loop here) is below
    log n0 - drop, one step earlier it is not; run to a fixed cap it goes on."""
    g = torch.Generator().manual_seed(1)
    n0, d, drop, tau = 40, 30, 0.1, 1.0
    mu = toy_theory.cnn_mu(d, 0.6, 1.0)
    y = toy_theory.cnn_labels(n0, g)
    X, Xp = toy_theory.cnn_data(y, mu, 1.0, g), toy_theory.cnn_data(y, mu, 1.0, g)
    eta = 0.4 * tau / (2 * mu.norm().item() ** 2)
    W0 = 1e-6 * torch.randn(6, d, generator=g, dtype=torch.float64)

    def naive_info_nce(W):
        h, hp = (X.sum(1) @ W.T).numpy(), (Xp.sum(1) @ W.T).numpy()
        logits = h @ hp.T / tau
        return np.mean([np.log(np.exp(logits[i]).sum()) - logits[i, i] for i in range(n0)])

    W, cos, stop = toy_theory.pretrain_linear_cnn(X, Xp, mu, W0, tau, eta, 500, drop)
    assert 0 < stop < 500 and len(cos) == stop + 1
    assert naive_info_nce(W) < math.log(n0) - drop
    W_before, _, _ = toy_theory.pretrain_linear_cnn(X, Xp, mu, W0, tau, eta, stop - 1, drop)
    assert naive_info_nce(W_before) >= math.log(n0) - drop
    assert cos[-1] > 0.9  # n0 SNR^2 = 14 at d = 30: the power iteration found +-mu


def test_top_direction_and_tiny_filters_against_numpy(one_thread):
    """The PCA control's direction is numpy's top right singular vector of s = x(1) + x(2), from either Gram matrix;
    |cos(w, mu)| of float32 filters too small to square in float32 (--pre-sigma0 1e-30) is that of the same filters
    at scale 1."""
    g = torch.Generator().manual_seed(5)
    mu = toy_theory.cnn_mu(40, 0.5, 1.0)
    for n0 in (10, 60):  # fewer samples than d, and more
        X = toy_theory.cnn_data(toy_theory.cnn_labels(n0, g), mu, 1.0, g)
        v = toy_theory.top_direction(X).numpy()
        ref = np.linalg.svd(X.sum(1).numpy())[2][0]
        assert abs(abs(v @ ref) - 1) < 1e-9 and abs(np.linalg.norm(v) - 1) < 1e-9
    W = torch.randn(6, 40, generator=g, dtype=torch.float64)
    cos = np.mean(np.abs(W.numpy() @ mu.numpy()) / (np.linalg.norm(W.numpy(), axis=1) * mu.norm().item()))
    assert math.isclose(toy_theory.mean_abs_cos((1e-30 * W).float(), mu), cos, rel_tol=1e-5)


def test_the_pretraining_step_reads_the_unlabelled_pairs_not_mu(one_thread):
    """shared_energy: mean s . s' by hand, floored at mean ||s||^2 / d; over many draws its mean is ||mu||^2."""
    X = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)  # s = (1, 2)
    assert toy_theory.shared_energy(X, torch.tensor([[[2.0, 0.0], [0.0, 2.0]]], dtype=torch.float64)) == 6.0
    assert toy_theory.shared_energy(X, torch.tensor([[[3.0, 0.0], [0.0, -1.0]]], dtype=torch.float64)) == 2.5  # floor
    g, d = torch.Generator().manual_seed(0), 50
    mu = toy_theory.cnn_mu(d, 0.5, 1.0)  # ||mu||^2 = 12.5
    est = []
    for _ in range(200):
        y = toy_theory.cnn_labels(100, g)
        est.append(toy_theory.shared_energy(toy_theory.cnn_data(y, mu, 1.0, g), toy_theory.cnn_data(y, mu, 1.0, g)))
    assert abs(np.mean(est) - 12.5) < 4 * np.std(est) / np.sqrt(len(est)), np.mean(est)  # unbiased
    assert np.std(est) > 0.1  # a noisy estimate, not mu's norm read back


def test_filter_response_and_first_crossing_against_closed_forms(one_thread):
    mu = torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)
    W = torch.tensor([[1.0, 1.0, 0.0], [-3.0, 0.0, 4.0], [0.5, 0.0, 0.0001]], dtype=torch.float64)
    # |<w, mu>| / (sigma_p ||P w||): 2 / (0.5 * 1), 6 / (0.5 * 4), 1 / (0.5 * 1e-4); median 4
    assert math.isclose(toy_theory.filter_response(W, mu, 0.5), 4.0, rel_tol=1e-12)
    # 0.5 at n = 4, 0.1 at n = 16: 0.25 is 5/8 of the way in log n, n = 4 * 4^(5/8)
    assert math.isclose(toy_theory.first_crossing([2, 4, 16], [0.5, 0.5, 0.1], 0.25), 4 * 4 ** 0.625, rel_tol=1e-12)
    assert toy_theory.first_crossing([2, 4], [0.5, 0.3], 0.25) is None


def _cnn_cells(args, snr, n, n0, sets):
    """Supervised, SimCLR, share-nothing and PCA networks on `sets` labelled sets of size n, as cnn_main builds them."""
    cells = [dict(snr=snr, n=n, set=j, init=None, method="supervised") for j in range(sets)]
    for j in range(sets):
        cells += [dict(snr=snr, n=n, set=j, init=W, method=method, n0=n0, **info)
                  for method, (W, info) in toy_theory.cnn_pretrain(args, snr, n0, args.seed + j).items()]
    return toy_theory.cnn_cells(args, cells, sets)


def test_cnn_pretraining_beats_supervised_and_the_share_nothing_control(one_thread):
    """d = 200, SNR 0.25, n = 4 labels: n SNR^q = 0.06 (harmful for supervised), n0 SNR^2 = 300 * 0.0625 = 19. SimCLR
    aligns its filters with +-mu and fine-tunes to a small error; so does PCA's top direction (mu is the top-variance
    direction of this data); SimCLR on views that share nothing aligns far less and loses to SimCLR at this n."""
    args = toy_theory.get_args(["cnn", "--d", "200", "--n-test", "1000", "--seeds", "2"])
    cells = _cnn_cells(args, 0.25, 4, 300, 2)
    err = {m: np.mean([c["err"] for c in cells if c["method"] == m]) for m in ("supervised", "simclr", "share-nothing", "pca")}
    cos = {m: np.mean([c["cos"] for c in cells if c["method"] == m]) for m in ("simclr", "share-nothing", "pca")}
    assert err["supervised"] > 0.3, err  # supervised memorises the noise
    assert err["simclr"] < 0.05 and err["pca"] < 0.05, err  # pre-train + fine-tune generalises from 4 labels
    assert err["share-nothing"] > err["simclr"] + 0.05, err
    assert cos["simclr"] > 0.9 and cos["pca"] > 0.9 and cos["share-nothing"] < cos["simclr"] - 0.3, cos
    assert all(c["loss"] < args.loss_tol for c in cells)  # every network fits its labels


def test_cnn_main_pretrains_once_per_set_and_trains_every_method_on_the_same_labelled_set(monkeypatch, one_thread):
    """One pre-training per (n0, set) shared by every n; supervised training and each pre-training's fine-tuning see
    the same labelled set (the networks GD receives, compared here), whatever the SNR; the networks reported capped
    are those GD ran to --steps."""
    calls, pretrain = [], toy_theory.cnn_pretrain
    monkeypatch.setattr(toy_theory, "cnn_pretrain", lambda *a: calls.append(a[1:]) or pretrain(*a))
    seen, train = [], toy_theory.train_logistic
    monkeypatch.setattr(toy_theory, "train_logistic", lambda W, X, *a: seen.append(X) or train(W, X, *a))
    args = toy_theory.get_args(["cnn", "--d", "30", "--steps", "50", "--loss-tol", "0.693", "--pre-steps", "3", "--n-test",
                                "20", "--seeds", "2", "--snrs", "0.25", "--ft-snr", "0.5", "--n0-snr2s", "10", "--ns", "2", "4"])
    summary, _ = toy_theory.cnn_main(args)
    assert calls == [(0.5, 40, 0), (0.5, 40, 1)]
    cells = summary["supervised"] + summary["finetuned"]
    for n, X in zip([2, 4], seen):  # one batch per n, in the order of cnn_cells' cells
        batch = [c for c in cells if c["n"] == n]
        assert len(batch) == len(X) == 2 * 2 + 2 * 3
        for j in range(2):
            same = [X[i] for i, c in enumerate(batch) if c["set"] == j and c["snr"] == 0.5]
            assert len(same) == 4 and all(torch.equal(same[0], x) for x in same[1:])
    key = lambda c: (c["method"], c["snr"], c["n"], c["set"])
    capped = {key(c) for c in cells if c["steps"] == args.steps}  # GD stops early only below --loss-tol
    assert {key(c) for c in summary["capped"]} == capped and 0 < len(capped) < len(cells)


def test_cnn_scaling_aligns_with_n0_snr2_and_fine_tunes_where_it_aligns(tmp_path, one_thread):
    """--part scaling end to end (--quick: d = 100, n0 = 25 and 100, n0 SNR^2 = 1 and 16): the pre-trained filters
    align with mu more at n0 SNR^2 = 16 than at 1 for every n0 (the power iteration's signal), and there fine-tuning
    reaches a small error, also where supervised training on the same labels does not."""
    s = toy_theory.main(["cnn", "--part", "scaling", "--quick", "--out", str(tmp_path)])
    assert (tmp_path / "summary.json").exists() and {c["n0"] for c in s["cells"]} == {25, 100}
    mean = lambda key, **kv: np.mean([c[key] for c in s["cells"] if all(math.isclose(c[k], v) for k, v in kv.items())])
    for n0 in (25, 100):
        assert mean("cos", n0=n0, n0_snr2=16) > mean("cos", n0=n0, n0_snr2=1) + 0.1
        assert mean("err", n0=n0, n0_snr2=16) < 0.05
    assert mean("err_sup", n0=100, n0_snr2=16) > 0.3  # SNR 0.4: n SNR^3 = 1.3, too few labels for supervised alone


# ---- covariance: Theorem 3 of Tian et al. 2020 -------------------------------------------------------------------


def test_covariance_operator_identity_exact():
    """-grad_W E_emp[L_simp] == 4 W Cov_z0[E_aug x | z0] under the empirical distribution, to float64 round-off.
    The right-hand side is computed here independently with numpy (np.cov), not with toy_theory's helper."""
    rng = np.random.default_rng(0)
    N, K, D, out = 9, 4, 10, 6
    Xa = rng.normal(size=(N, K, D)) + rng.normal(size=(N, 1, D))  # per-latent mean + augmentation noise
    W = torch.tensor(rng.normal(size=(out, D)), requires_grad=True)
    loss = toy_theory.l_simp_of_outputs(torch.tensor(Xa) @ W.T)
    (grad,) = torch.autograd.grad(loss, W)
    xbar = Xa.mean(1)  # (N, D)
    cov = np.cov(xbar.T, bias=True)  # (D, D), 1/N normalisation: the empirical distribution of z0
    rhs = 4 * W.detach().numpy() @ cov
    np.testing.assert_allclose(-grad.numpy(), rhs, rtol=1e-10, atol=1e-12)


def test_l_simp_of_a_linear_net_matches_naive_loop():
    rng = np.random.default_rng(1)
    N, K, D = 3, 2, 4
    Xa = rng.normal(size=(N, K, D))
    W = rng.normal(size=(2, D))
    f = lambda x: W @ x
    pos = np.mean([np.sum((f(Xa[i, k]) - f(Xa[i, k2])) ** 2) for i in range(N) for k in range(K) for k2 in range(K)])
    neg = np.mean([np.sum((f(Xa[i, k]) - f(Xa[j, k2])) ** 2)
                   for i in range(N) for k in range(K) for j in range(N) for k2 in range(K)])
    got = toy_theory.l_simp_of_outputs(torch.tensor(Xa) @ torch.tensor(W).T).item()
    assert math.isclose(got, pos - neg, rel_tol=1e-12)


def test_covariance_operator_layer_by_layer_relu_mlp():
    """Theorem 3 for a 3-layer bias-free ReLU net: -grad_{W_l} E_emp[L_simp] == 4 V_z0[Kbar_l] vec(W_l) at every layer.
    The right-hand side is built here in numpy, one sample at a time: K_l(x)[o, i, j] = J_l(x)[o, i] a_{l-1}(x)[j]
    from the ReLU gates, then V as an explicit (n_l n_{l-1})^2 covariance matrix."""
    rng = np.random.default_rng(5)
    N, K, sizes = 7, 3, [6, 5, 4, 3]
    Xa = rng.normal(size=(N, K, sizes[0])) + rng.normal(size=(N, 1, sizes[0]))
    Wn = [rng.normal(size=(o, i)) / np.sqrt(i) for i, o in zip(sizes, sizes[1:])]
    Ws = [torch.tensor(W, requires_grad=True) for W in Wn]
    X = torch.tensor(Xa)
    f = torch.relu(torch.relu(X @ Ws[0].T) @ Ws[1].T) @ Ws[2].T  # (N, K, 3), written out, not toy_theory.relu_mlp
    grads = torch.autograd.grad(toy_theory.l_simp_of_outputs(f), Ws)
    for l in range(3):
        Kbar = np.zeros((N, sizes[l + 1] * sizes[l], sizes[-1]))  # (N, P, out): K_l as the paper writes it
        for i in range(N):
            for k in range(K):
                a = [Xa[i, k]]
                for W in Wn:
                    a.append(W @ (np.maximum(a[-1], 0) if len(a) > 1 else a[-1]))  # pre-activations, a[0] = x
                J = np.eye(sizes[-1])
                for m in range(2, l, -1):  # back through W_m and the gate of layer m's input
                    J = J @ Wn[m] @ np.diag((a[m] > 0).astype(float))
                inp = a[l] if l == 0 else np.maximum(a[l], 0)
                Kbar[i] += np.einsum("oi,j->ijo", J, inp).reshape(-1, sizes[-1]) / K
        Kc = Kbar - Kbar.mean(0)
        V = sum(Kc[i] @ Kc[i].T for i in range(N)) / N  # (P, P)
        rhs = (4 * V @ Wn[l].reshape(-1)).reshape(Wn[l].shape)
        np.testing.assert_allclose(-grads[l].numpy(), rhs, rtol=1e-9, atol=1e-12)
        ours = toy_theory.covariance_operator([torch.tensor(W) for W in Wn], X, l)
        np.testing.assert_allclose(ours.numpy(), rhs, rtol=1e-9, atol=1e-12)
        assert np.abs(rhs).max() > 1e-3  # not a vacuous 0 == 0


def test_object_only_nt_xent_matches_enumeration():
    """The object-only bound against NT-Xent (naive loop) on every one of the 2^N batch compositions."""
    import itertools
    N, tau = 4, 0.5
    for cos, codes in [(0.0, [[1.0, 0.0], [0.0, 1.0]]), (-1.0, [[1.0, 0.0], [-1.0, 0.0]])]:
        losses = [_nt_xent_naive([codes[o] for o in objs], [codes[o] for o in objs], tau)
                  for objs in itertools.product([0, 1], repeat=N)]
        assert math.isclose(toy_theory.object_only_nt_xent(N, tau, cos), np.mean(losses), rel_tol=1e-12)


def test_conv_covariance_operator_is_theorem_3_for_the_conv_net(one_thread):
    """For the conv net of Fig. 3, h_c(x) = <K_c(x), w_c> (against conv_h), and -grad_w E_emp[L_simp] (autograd on the
    pooled code) equals 4 V_z0[Kbar_c] w_c built here in numpy from the windows, one filter at a time."""
    g = torch.Generator().manual_seed(6)
    L, C, width, N, K = 9, 4, 3, 3, 5
    Xa = torch.randn(N, K, 1, L, generator=g, dtype=torch.float64) + torch.randn(N, 1, 1, L, generator=g, dtype=torch.float64)
    W = torch.randn(C, width, generator=g, dtype=torch.float64, requires_grad=True)
    h = torch.relu(torch.nn.functional.conv1d(Xa.flatten(0, 1), W[:, None])).sum(-1)  # (N K, C), written out here
    Kc = toy_theory.conv_connection(W.detach(), Xa.flatten(0, 1))
    np.testing.assert_allclose(torch.einsum("bcw,cw->bc", Kc, W.detach()).numpy(), h.detach().numpy(), rtol=1e-12)
    (grad,) = torch.autograd.grad(toy_theory.l_simp_of_outputs(h.unflatten(0, (N, K))), W)
    Xn, Wn = Xa.numpy()[:, :, 0], W.detach().numpy()
    rhs = np.zeros((C, width))
    for c in range(C):
        Kbar = np.zeros((N, width))
        for i in range(N):
            for k in range(K):
                for p in range(L - width + 1):
                    window = Xn[i, k, p:p + width]
                    Kbar[i] += (window @ Wn[c] > 0) * window / K
        Kcen = Kbar - Kbar.mean(0)
        rhs[c] = 4 * (Kcen.T @ Kcen / N) @ Wn[c]
    np.testing.assert_allclose(-grad.numpy(), rhs, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(toy_theory.conv_covariance_operator(W.detach(), Xa).numpy(), rhs, rtol=1e-9, atol=1e-12)
    assert np.abs(rhs).max() > 1e-2  # not a vacuous 0 == 0


def test_translated_objects_hold_one_object_at_every_position_with_equal_odds(one_thread):
    g = torch.Generator().manual_seed(11)
    L, B = 7, 6000
    obj = torch.randint(0, 2, (B,), generator=g)
    X = toy_theory.translated_objects(obj, L, 0.0, g)[:, 0]  # (B, L), no noise
    assert torch.all(X.sum(1) == 2) and torch.all((X == 0) | (X == 1))
    first = X.argmax(1)  # the first 1
    assert torch.all(X[torch.arange(B), first + 1 + obj] == 1)  # "11": the next place; "101": two along
    for o in (0, 1):
        counts = torch.bincount(first[obj == o], minlength=L).double()
        places = L - 1 - o  # "11" fits at L - 1 places, "101" at L - 2
        assert torch.all(counts[places:] == 0) and counts[:places].min() > 0.8 * counts[:places].mean()


def test_covariance_selectivity_grows_and_the_independent_object_control_does_not(tmp_path, one_thread):
    """The same net, init and stream of views: with the object shared by the two views filters grow selective, with
    an independent object in the positive view they do not, and the first NT-Xent step follows Theorem 3's operator
    only in the first case."""
    args = toy_theory.get_args(["covariance", "--steps", "300", "--log-every", "300", "--seeds", "1",
                                "--fig", str(tmp_path / "c.png")])
    s, _ = toy_theory.run_covariance(args)
    shared, control = (s["runs"][0][k]["history"] for k in ("shared", "control"))
    assert shared[-1]["selectivity"] > shared[0]["selectivity"] + 0.05, shared
    assert control[-1]["selectivity"] < control[0]["selectivity"] + 0.02, control
    assert s["runs"][0]["step_cos"]["shared"] > 0.5 > s["runs"][0]["step_cos"]["control"], s["runs"][0]["step_cos"]
    assert all(t["rel_err"] < 1e-12 for t in s["theorem3"]) and len(s["theorem3"]) == 5


# ---- clusters: Calder & Lee 2025 ---------------------------------------------------------------------------------


def _gaussian_nce_naive(z1, z2, tau):
    N = len(z1)
    total = 0.0
    for i in range(N):
        logits = [-(z1[i] - z2[j]) ** 2 / tau for j in range(N)]
        mx = max(logits)
        total += -(logits[i] - mx - math.log(sum(math.exp(l - mx) for l in logits)))
    return total / N


def test_gaussian_nce_matches_naive_loop():
    g = torch.Generator().manual_seed(2)
    z1, z2 = torch.randn(7, 1, generator=g, dtype=torch.float64), torch.randn(7, 1, generator=g, dtype=torch.float64)
    got = toy_theory.gaussian_nce(z1, z2, 0.3).item()
    assert math.isclose(got, _gaussian_nce_naive(z1[:, 0].tolist(), z2[:, 0].tolist(), 0.3), rel_tol=1e-10)


def test_clusters_trivial_embedding_loss_no_worse_than_clustered(one_thread):
    g = torch.Generator().manual_seed(0)
    X, lab = toy_theory.clusters(30, 0.8, g)  # N = 120, k = 97 is coprime to 120
    X1, X2 = toy_theory.augment_diag(X, g), toy_theory.augment_diag(X, g)
    u = toy_theory.u_coord(X)
    tau = 0.1
    for c in [0.1, 0.3, 1.0]:
        mono = [toy_theory.rank_embedding(V, u, c, 1) for V in (X1, X2, X)]
        scr = [toy_theory.rank_embedding(V, u, c, 97) for V in (X1, X2, X)]
        assert torch.equal(mono[0], mono[1]) and torch.equal(scr[0], scr[1]), "rank embeddings are augmentation-invariant"
        l_mono = _gaussian_nce_naive(mono[0][:, 0].tolist(), mono[1][:, 0].tolist(), tau)
        l_scr = _gaussian_nce_naive(scr[0][:, 0].tolist(), scr[1][:, 0].tolist(), tau)
        assert l_scr <= l_mono + 1e-9  # no worse (in fact equal: same multiset of latents)
        # the collapse embedding ignores clusters, the monotone one keeps them
        assert toy_theory.fisher_ratio(scr[2], lab) < 0.1 < 1.0 < toy_theory.fisher_ratio(mono[2], lab)
        # collapsing each cluster to a point is strictly worse: loss >= mean log(cluster group size) > 0
        centre_u = torch.tensor([0.0, -1.0, 0.0, 1.0], dtype=torch.float64)[lab]
        zc = (c * len(X) / 2 * (centre_u + 1))[:, None]
        assert _gaussian_nce_naive(zc[:, 0].tolist(), zc[:, 0].tolist(), tau) > l_scr
    # the trained-or-not embedding's pairs, permuted across clusters, keep their loss exactly
    z1, z2 = torch.randn(len(X), 1, generator=g, dtype=torch.float64), torch.randn(len(X), 1, generator=g, dtype=torch.float64)
    perm = torch.randperm(len(X), generator=g)
    assert math.isclose(toy_theory.gaussian_nce(z1, z2, tau).item(), toy_theory.gaussian_nce(z1[perm], z2[perm], tau).item(),
                        rel_tol=1e-12)


def _nt_xent_naive(z1, z2, tau):
    """NT-Xent over 2N views, one anchor at a time, in plain Python: normalise, skip the anchor itself."""
    views = [[x / math.sqrt(sum(x * x for x in v)) for x in v] for v in z1 + z2]
    N, total = len(z1), 0.0
    for i in range(2 * N):
        sims = {j: sum(a * b for a, b in zip(views[i], views[j])) / tau for j in range(2 * N) if j != i}
        total += -sims[(i + N) % (2 * N)] + math.log(sum(math.exp(s) for s in sims.values()))
    return total / (2 * N)


def test_toy_nt_xent_matches_naive_loop():
    g = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(2, 6, 3, generator=g, dtype=torch.float64), torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    assert math.isclose(toy_theory.nt_xent(z1[0], z2[0], 0.2).item(), _nt_xent_naive(z1[0].tolist(), z2[0].tolist(), 0.2),
                        rel_tol=1e-10)
    batched = toy_theory.nt_xent(z1, z2, 0.2)  # (2,): one loss per run
    for k in range(2):
        assert math.isclose(batched[k].item(), _nt_xent_naive(z1[k].tolist(), z2[k].tolist(), 0.2), rel_tol=1e-10)


def test_clusters_circle_equally_spaced_ignores_the_order(one_thread):
    """Part (a) on the circle: equally spaced angles, by rank(u) or scrambled, give the same NT-Xent (naive loop),
    lower than the 3 groups collapsed to 3 points; the scrambled one carries no group information."""
    g = torch.Generator().manual_seed(0)
    X, lab = toy_theory.clusters(20, 0.8, g)  # N = 80, k = 97 is coprime to 80
    groups = toy_theory.invariant_groups(lab)
    centre_x1_minus_x2 = torch.tensor([0, -2, 0, 2])  # of the centres (1, 1), (-1, 1), (-1, -1), (1, -1)
    assert torch.equal(groups, (centre_x1_minus_x2[lab] + 2) // 2)  # groups: u of the centre, in increasing order
    X1, X2 = toy_theory.augment_diag(X, g), toy_theory.augment_diag(X, g)
    u = toy_theory.u_coord(X)
    mono = [toy_theory.circle_embedding(V, u, 1) for V in (X1, X2)]
    scr = [toy_theory.circle_embedding(V, u, 97) for V in (X1, X2)]
    assert torch.allclose(mono[0].norm(dim=1), torch.ones(80, dtype=torch.float64))
    l_mono, l_scr = (_nt_xent_naive(a.tolist(), b.tolist(), 0.2) for a, b in (mono, scr))
    assert math.isclose(l_mono, l_scr, rel_tol=1e-9)
    three = [[math.cos(2 * math.pi / 3 * c), math.sin(2 * math.pi / 3 * c)] for c in groups.tolist()]
    assert _nt_xent_naive(three, three, 0.2) > l_mono + 0.1
    assert toy_theory.fisher_ratio(scr[0], groups) < 0.05 < 1.0 < toy_theory.fisher_ratio(mono[0], groups)


def test_circle_measures_against_closed_forms(one_thread):
    """The angle Fisher ratio of an affine image of u on an arc is u's own ratio, whatever the arc's length and
    where it sits (across the cut at +-pi too), as long as the rest of the circle is its widest empty arc;
    uniformity against a direct double loop."""
    g = torch.Generator().manual_seed(7)
    u = torch.randn(60, generator=g, dtype=torch.float64)
    groups = (u > -0.5).long() + (u > 0.6).long()
    ref = toy_theory.fisher_ratio(u, groups)
    for length, start in [(0.5, 0.0), (2.0, -1.0), (4.0, 2.5)]:  # radians; the last crosses pi
        theta = start + length * (u - u.min()) / (u.max() - u.min())
        z = torch.stack([theta.cos(), theta.sin()], 1)
        assert math.isclose(toy_theory.angle_fisher(z, groups), ref, rel_tol=1e-9), (length, start)
        assert toy_theory.unwrapped_angle(z).max() < length + 1e-9
    N = 12
    theta = torch.arange(N, dtype=torch.float64) * 2 * math.pi / N
    z = torch.stack([theta.cos(), theta.sin()], 1)
    ref = np.log(np.mean([np.exp(-2 * np.sum((z[i].numpy() - z[j].numpy()) ** 2))
                          for i in range(N) for j in range(N) if i != j]))
    assert math.isclose(toy_theory.uniformity(z), ref, rel_tol=1e-12)


def test_no_cluster_control_keeps_v_and_the_group_sizes(one_thread):
    """The control redraws u uniform on u's range and keeps v = (x_1 + x_2)/sqrt 2, which the augmentation moves;
    its bins are contiguous in u with the groups' sizes."""
    g = torch.Generator().manual_seed(8)
    X, lab = toy_theory.clusters(30, 0.8, g)
    groups = toy_theory.invariant_groups(lab)
    Xc, bins = toy_theory.no_cluster_control(X, groups, g)
    v = lambda Z: (Z[:, 0] + Z[:, 1]) / math.sqrt(2)
    uc, u = toy_theory.u_coord(Xc), toy_theory.u_coord(X)
    assert torch.allclose(v(Xc), v(X), atol=1e-12)
    assert uc.min() >= u.min() and uc.max() <= u.max()
    assert torch.equal(torch.bincount(bins), torch.bincount(groups))
    order = torch.argsort(uc)
    assert torch.all(bins[order][1:] >= bins[order][:-1])  # contiguous in u
    # uniform: a Kolmogorov-Smirnov distance well inside what 120 uniform draws give
    cdf = (torch.sort(uc).values - u.min()) / (u.max() - u.min())
    assert (cdf - torch.arange(1, 121, dtype=torch.float64) / 120).abs().max() < 0.15


def test_train_on_circle_is_one_sgd_run_per_row(one_thread):
    """The batched trainer against nn.Linear layers and torch.optim.SGD written here, one net per row: the same
    init (nn.Linear's uniform +-1/sqrt(fan in), drawn from the seed), the same views (that seed's stream, shared by
    its rows), the same angles after 30 steps; and within 150 steps the latents come to depend on u alone, the
    coordinate the augmentation keeps (10-NN over the groups above 0.9), for the clusters and the control."""
    args = toy_theory.get_args(["clusters", "--steps", "30", "--hidden", "16"])
    X, lab = toy_theory.clusters(10, 0.8, torch.Generator().manual_seed(0))
    groups = toy_theory.invariant_groups(lab)
    Xc, bins = toy_theory.no_cluster_control(X, groups, torch.Generator().manual_seed(1))
    hist, _ = toy_theory.train_on_circle(torch.stack([X, Xc]), [groups, bins], args, [3, 3], {30})
    g = torch.Generator().manual_seed(3)
    unif = lambda fan_in, *shape: (2 * torch.rand(*shape, generator=g) - 1) / math.sqrt(fan_in)
    nets = [torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.LeakyReLU(0.2), torch.nn.Linear(16, 2)) for _ in range(2)]
    init = [unif(2, 16, 2), unif(2, 16), unif(16, 2, 16), unif(16, 2)]
    with torch.no_grad():
        for net in nets:
            for p, w in zip(net.parameters(), init):
                p.copy_(w)
    opts = [torch.optim.SGD(net.parameters(), lr=args.lr) for net in nets]
    for _ in range(30):
        noise = torch.randn(2 * len(X), 1, generator=g)
        for net, opt, XX in zip(nets, opts, (X, Xc)):
            z = net(XX.float().repeat(2, 1) + noise)  # (2N, 2): both views
            opt.zero_grad()
            toy_theory.nt_xent(z[:len(X)], z[len(X):], args.tau).backward()  # a 2-D call: checked against a naive loop
            opt.step()
    for net, XX, h in zip(nets, (X, Xc), hist):
        with torch.no_grad():
            z = F.normalize(net(XX.float()), dim=1)
        np.testing.assert_allclose(torch.atan2(z[:, 1], z[:, 0]).numpy(), h[-1]["angle"], atol=1e-4)
    args = toy_theory.get_args(["clusters", "--steps", "150"])
    X, lab = toy_theory.clusters(50, 0.8, torch.Generator().manual_seed(0))
    groups = toy_theory.invariant_groups(lab)
    Xc, bins = toy_theory.no_cluster_control(X, groups, torch.Generator().manual_seed(1))
    hist, _ = toy_theory.train_on_circle(torch.stack([X, Xc]), [groups, bins], args, [0, 0], {0, 150})
    for h in hist:
        assert h[-1]["knn"] > 0.9 and h[-1]["knn"] > h[0]["knn"] + 0.05, (h[0]["knn"], h[-1]["knn"])


def test_fisher_ratio_against_closed_form():
    z = torch.tensor([0.0, 2.0, 10.0, 12.0], dtype=torch.float64)[:, None]
    lab = torch.tensor([0, 0, 1, 1])
    # between: 2 * (5^2) * 2 = 100; within: 4 * 1 = 4
    assert math.isclose(toy_theory.fisher_ratio(z, lab), 25.0)


# ---- hltm: the hierarchical latent tree model of Tian et al. 2020, Sec. 6 ------------------------------------------


def test_hltm_sampler_correlations_are_products_of_edge_deltas():
    """For a binary symmetric channel corr(parent, child) = delta, so corr(root, leaf) = product of the deltas on
    the path: the closed form against the empirical correlation of 200k samples."""
    g = torch.Generator().manual_seed(0)
    deltas = toy_theory.hltm_deltas(3, 2, 0.3, 0.9, g)
    z = toy_theory.hltm_sample(deltas, torch.randint(0, 2, (200_000,), generator=g), g)
    root, leaves = z[0][:, 0].double(), z[-1].double()
    for leaf in range(8):
        path = [deltas[l][leaf >> (2 - l)] for l in range(3)]  # ancestors of leaf: leaf // 4, leaf // 2, leaf
        expected = math.prod(d.item() for d in path)
        got = np.corrcoef(root.numpy(), leaves[:, leaf].numpy())[0, 1]
        assert abs(got - expected) < 0.015, (leaf, got, expected)
    other = toy_theory.hltm_deltas(3, 2, 0.3, 0.9, g)  # two trees as one batch: each keeps its own correlations
    z = toy_theory.hltm_sample([torch.stack(d) for d in zip(deltas, other)], torch.randint(0, 2, (2, 50_000), generator=g), g)
    for t, tree in enumerate((deltas, other)):
        for leaf in (0, 5):
            expected = math.prod(tree[l][leaf >> (2 - l)].item() for l in range(3))
            got = np.corrcoef(z[0][t, :, 0].double().numpy(), z[-1][t, :, leaf].double().numpy())[0, 1]
            assert abs(got - expected) < 0.03, (t, leaf, got, expected)


def test_hltm_view_shares_one_latent_and_is_a_draw_of_the_model():
    """The control's view keeps latent 1 of level 2 exactly; the roots of the two views then correlate by the
    product of the path's deltas, squared (root -> z_s -> root'), and the view alone has the model's correlations."""
    g = torch.Generator().manual_seed(5)
    deltas = toy_theory.hltm_deltas(3, 2, 0.3, 0.9, g)
    z = toy_theory.hltm_sample(deltas, torch.randint(0, 2, (200_000,), generator=g), g)
    v = toy_theory.hltm_view(deltas, z, (2, 1), g)
    assert torch.equal(v[2][:, 1], z[2][:, 1]) and [t.shape for t in v] == [t.shape for t in z]
    corr = lambda a, b: np.corrcoef(a.double().numpy(), b.double().numpy())[0, 1]
    path = deltas[0][0].item() * deltas[1][1].item()  # root -> latent 0 of level 1 -> latent 1 of level 2
    assert abs(corr(z[0][:, 0], v[0][:, 0]) - path ** 2) < 0.015
    assert abs(corr(z[2][:, 0], v[2][:, 0]) - (deltas[1][0].item() * deltas[1][1].item()) ** 2) < 0.015  # sibling
    for leaf in range(8):  # the view's own root-leaf correlations: those of the model
        expected = math.prod(deltas[l][leaf >> (2 - l)].item() for l in range(3))
        assert abs(corr(v[0][:, 0], v[-1][:, leaf]) - expected) < 0.015, leaf


def test_hltm_posterior_matches_brute_force_enumeration():
    """Belief propagation against summing the joint over every configuration of a depth-2 binary tree."""
    import itertools
    g = torch.Generator().manual_seed(1)
    deltas = toy_theory.hltm_deltas(2, 2, 0.2, 0.9, g)
    p_same = lambda d: (1 + d.item()) / 2
    leaves_all = torch.tensor(list(itertools.product([0, 1], repeat=4)))  # (16, 4)
    post = toy_theory.hltm_posterior(deltas, leaves_all)
    for row, x in enumerate(leaves_all.tolist()):
        joint = {}  # (root, a, b) -> P(root, a, b, x)
        for r, a, b in itertools.product([0, 1], repeat=3):
            p = 0.5
            for child, parent, d in ((a, r, deltas[0][0]), (b, r, deltas[0][1])):
                p *= p_same(d) if child == parent else 1 - p_same(d)
            for leaf, parent, d in zip(x, (a, a, b, b), deltas[1]):
                p *= p_same(d) if leaf == parent else 1 - p_same(d)
            joint[r, a, b] = p
        root_post = sum(v for (r, _, _), v in joint.items() if r == 1) / sum(joint.values())
        assert math.isclose(post[0][row, 0].item(), root_post, rel_tol=1e-12)
        for j in range(2):  # latent j at level 1 given only its own two leaves (the root summed out)
            p_sub = [0.0, 0.0]  # P(z_j = val, its two leaves), val = 0, 1
            for val, r in itertools.product([0, 1], repeat=2):
                p = 0.5 * (p_same(deltas[0][j]) if val == r else 1 - p_same(deltas[0][j]))
                for leaf, d in zip(x[2 * j:2 * j + 2], deltas[1][2 * j:2 * j + 2]):
                    p *= p_same(d) if leaf == val else 1 - p_same(d)
                p_sub[val] += p
            assert math.isclose(post[1][row, j].item(), p_sub[1] / sum(p_sub), rel_tol=1e-12)


def test_hltm_forward_matches_one_linear_per_latent():
    """The tree-shaped network against one Linear per latent, written here; two networks stacked as one batch give
    each its own."""
    g = torch.Generator().manual_seed(2)
    depth, C, hid = 3, 2, 4
    nets = [toy_theory.hltm_init(depth, C, hid, g) for _ in range(2)]
    x = torch.randint(0, 2, (2, 5, C ** depth), generator=g)
    stacked = toy_theory.hltm_forward(*([torch.stack(p) for p in zip(*part)] for part in zip(*nets)), x)
    for k, (Ws, bs) in enumerate(nets):
        hs = toy_theory.hltm_forward(Ws, bs, x[k])
        out = {(depth, j): x[k][:, j:j + 1].float() for j in range(C ** depth)}  # (level, index) -> pre-activation
        for i, level in enumerate(reversed(range(depth))):  # bottom-up, as the weights are stored
            for j in range(C ** level):
                inputs = torch.cat([torch.relu(out[level + 1, j * C + c]) for c in range(C)], 1)
                out[level, j] = inputs @ Ws[i][j].T + bs[i][j]
                assert torch.allclose(hs[level][:, j], out[level, j], atol=1e-6)
                assert torch.allclose(stacked[level][k, :, j], out[level, j], atol=1e-6)


def test_best_abs_corr_matches_numpy():
    g = torch.Generator().manual_seed(3)
    z = torch.randint(0, 2, (300, 2), generator=g)
    h = torch.randn(300, 2, 3, generator=g) + 2 * z[:, :, None] * torch.tensor([0.0, -1.0, 0.3])
    h[:, 1, 2] = 1.0  # a dead node: correlation 0, not NaN
    got = toy_theory.best_abs_corr(z, h)
    for i in range(2):
        ref = [abs(np.corrcoef(z[:, i].numpy(), h[:, i, k].numpy())[0, 1]) for k in range(3 if i == 0 else 2)]
        assert math.isclose(got[i].item(), max(ref), rel_tol=1e-9)


def test_abs_corr_every_node_matches_numpy():
    g = torch.Generator().manual_seed(4)
    z = torch.randint(0, 2, (200, 3), generator=g)
    h = torch.randn(200, 3, 4, generator=g) + z[:, :, None] * torch.tensor([0.5, -2.0, 0.0, 1.0])
    got = toy_theory.abs_corr(z, h)
    for i in range(3):
        for k in range(4):
            ref = abs(np.corrcoef(z[:, i].numpy(), h[:, i, k].numpy())[0, 1])
            assert math.isclose(got[i, k].item(), ref, rel_tol=1e-9)


def test_hltm_width_sweep_trains_each_width_on_the_same_trees(monkeypatch, one_thread):
    """Every width on the same trees, the root block -- the embedding -- at --hid nodes whatever the width; with 3
    nodes per latent every network's root correlation rises with training, and none passes the Bayes ceiling."""
    widths, train = [], toy_theory.hltm_train
    monkeypatch.setattr(toy_theory, "hltm_train",
                        lambda deltas, a, *rest: widths.append((a.hid, a.emb)) or train(deltas, a, *rest))
    args = toy_theory.get_args(["hltm", "--part", "width", "--hids", "1", "3", "--depth", "3", "--seeds", "3",
                                "--steps", "300", "--n-eval", "2048"])
    sweep = toy_theory.hltm_width_sweep(args)[0]["sweep"]
    assert widths == [(1, 10), (3, 10)] and [r["hid"] for r in sweep] == [1, 1, 1, 3, 3, 3]
    for a, b in zip(sweep[:3], sweep[3:]):  # seed by seed: the same tree, so the same Bayes ceiling
        assert a["seed"] == b["seed"] and a["ceiling"] == b["ceiling"]
    for r in sweep:
        assert r["hid"] == 1 or r["trained"][0] > r["init"][0] + 0.03, r
        assert max(r["trained"]) <= max(r["ceiling"]) + 0.05  # 2048 samples: sampling error ~0.02


def test_hltm_root_block_has_emb_nodes_and_a_dead_network_is_found(one_thread):
    g = torch.Generator().manual_seed(9)
    Ws, bs = toy_theory.hltm_init(3, 2, 1, g, emb=7)
    x = torch.randint(0, 2, (64, 8), generator=g)
    hs = toy_theory.hltm_forward(Ws, bs, x)
    assert [h.shape for h in hs] == [(64, 1, 7), (64, 2, 1), (64, 4, 1)]
    assert not toy_theory.hltm_dead(Ws, bs, x)
    with torch.no_grad():  # every ReLU below the root off: the embedding is its bias, the same for every input
        Ws[1].zero_()
        bs[1].fill_(-1.0)
    assert toy_theory.hltm_dead(Ws, bs, x)


def test_authors_nce_matches_their_formula(one_thread):
    """luckmatters ssl/hltm: pos = MSE(f, f_pos), neg = MSE(f, f_neg) of normalised outputs, loss =
    -exp(-pos/T) / (exp(-pos/T) + exp(-neg/T)); written here in numpy."""
    g = torch.Generator().manual_seed(10)
    f, fp, fn = (torch.randn(5, 3, generator=g, dtype=torch.float64) for _ in range(3))
    nf, nfp, nfn = (v.numpy() / np.linalg.norm(v.numpy(), axis=1, keepdims=True) for v in (f, fp, fn))
    pos, neg, T = np.mean((nf - nfp) ** 2), np.mean((nf - nfn) ** 2), 0.3
    ref = -np.exp(-pos / T) / (np.exp(-pos / T) + np.exp(-neg / T))
    assert math.isclose(toy_theory.authors_nce(f, fp, fn, T).item(), ref, rel_tol=1e-12)


@pytest.fixture(scope="module")
def hltm_depth4():
    """hltm_main on 2 depth-4 trees, 400 steps: SimCLR and its control (views sharing a level-3 latent) per tree."""
    args = toy_theory.get_args(["hltm", "--depth", "4", "--steps", "400", "--log-every", "400", "--n-eval", "4096",
                                "--seeds", "2"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return toy_theory.hltm_main(args)[0]["runs"]
    finally:
        torch.set_num_threads(threads)


def test_hltm_simclr_learns_the_root_without_labels(hltm_depth4):
    """Theorems 5-6 in numbers: trained on pairs sharing the root, the root block's best node correlates with z_root
    far more than at init and than the control, whose pairs share a latent just above the leaves, and never beats
    the Bayes ceiling; the control's embedding instead learns the latent it shares, which SimCLR's does not."""
    for r in hltm_depth4:
        init, trained, control = r["history"][0]["corr"][0], r["history"][-1]["corr"][0], r["control"][-1]["corr"][0]
        assert trained > init + 0.05 and trained > control + 0.1, (init, trained, control)
        assert trained < r["ceiling"][0] + 0.01
        shared = r["root_vs_shared"]
        assert shared["control"] > shared["trained"] + 0.1 and shared["control"] > shared["init"] + 0.1, shared


def test_hltm_control_trains_as_far_as_simclr(hltm_depth4):
    """A control that could fail: its weights move at every level by a good part of SimCLR's (pairs that share
    nothing have an expected gradient of about 0 and move theirs by well under 1%)."""
    for r in hltm_depth4:
        assert all(c > 0.01 and c > 0.5 * m for m, c in zip(r["moved"], r["moved_control"])), r

# ---- flags, and each subcommand end to end with --quick -----------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["hltm", "--depth", "0"], "--depth must be at least 1 (got 0)"),
    (["hltm", "--delta-lo", "0.9", "--delta-hi", "0.5"], "need 0 <= --delta-lo <= --delta-hi <= 1 (got 0.9, 0.5)"),
    (["hltm", "--batch", "1"], "--batch must be at least 2 (got 1)"),
    (["hltm", "--hids", "2", "0"], "--hids must be at least 1 (got 0)"),
    (["hltm", "--control-level", "0"], "--control-level must be at least 1 (got 0)"),
    (["hltm", "--depth", "3", "--control-level", "4"], "--control-level 4 is below the leaves (level --depth = 3)"),
    (["covariance", "--log-every", "0"], "--log-every must be at least 1 (got 0)"),
    (["cnn", "--seeds", "0"], "--seeds must be at least 1 (got 0)"),
    (["cnn", "--seed", "-1"], "--seed must be at least 0 (got -1)"),
    (["clusters", "--threads", "0"], "--threads must be at least 1 (got 0)"),
    (["cnn", "--d", "0"], "--d must be at least 2 (got 0)"),
    (["covariance", "--width", "17"], "--width 17 is longer than the signal, --L 16"),
    (["cnn", "--tau", "0"], "--tau must be above 0 (got 0.0)"),
    (["clusters", "--lr", "inf"], "--lr must be a finite number (got inf)"),
    (["clusters", "--lr", "-inf"], "--lr must be a finite number (got -inf)"),  # a value, not a flag (argparse's
    (["clusters", "--lr", "-1e5"], "--lr must be above 0 (got -100000.0)"),  # rule takes only -1 and -.5 as one)
    (["cnn", "--snrs", "0.1", "nan"], "--snrs must be a finite number (got nan)"),
    (["cnn", "--n-test", "0"], "--n-test must be at least 1 (got 0)"),
    (["clusters", "--hidden", "0"], "--hidden must be at least 1 (got 0)"),
    (["cnn", "--q", "1"], "--q must be at least 3 (got 1)"),
    (["cnn", "--level", "0.5"], "--level must be below 0.5"),
    (["cnn", "--n0-snr2s", "0.01"], "gives n0 = 1 unlabelled samples; InfoNCE needs at least 2"),
    (["clusters", "--k-scramble", "4"], "--k-scramble 4 must be coprime to N = 4 x --per-cluster = 200"),
    (["cnn", "--fig", "x.txt"], "--fig x.txt: the figure is written as a PNG, so the name must end in .png"),
    (["cnn", "--out", "README.md"], "--out README.md: exists and is a file, not a folder"),
    (["hltm", "--fig", "README.md/h.png"], "--fig README.md/h.png: README.md is a file, not a folder"),
    (["cnn", "--fig", "figs/.png"], "--fig figs/.png: the figure is written as a PNG, so the name must end in .png"),
    (["cnn", "--out", ""], "--out : is empty"),
    (["cnn", "--out", "/proc/toy_out"], "--out /proc/toy_out: cannot write there"),  # os.access: yes, as root
    (["cnn", "--threads", "100000"], "cores; give at most that"),
    (["hltm", "--hid", "1"], "--hid 1 gives a root block (the embedding NT-Xent normalises) of 1 node"),
    (["hltm", "--emb", "1"], "--emb must be at least 2 (got 1)"),
    (["covariance", "--filters", "1"], "--filters must be at least 2 (got 1)"),
    (["cnn", "--pre-sigma0", "1e-300"], "--pre-sigma0 must be at least 1e-30 (got 1e-300)"),
    (["hltm", "--n-eval", "2"], "--n-eval must be at least 64 (got 2)")])
def test_toy_theory_bad_flags_exit_with_a_message(argv, message, refused):
    assert message in refused(lambda: toy_theory.get_args(argv))


def test_toy_theory_refuses_an_output_path_before_any_computation(monkeypatch, refused):
    monkeypatch.setattr(toy_theory, "run_cnn", lambda args: pytest.fail("ran with an unwritable --out"))
    out = os.path.join(HERE, "README.md", "runs")
    assert "is a file, not a folder" in refused(lambda: toy_theory.main(["cnn", "--out", out]))


def test_toy_theory_paths_expand_home_and_a_value_typed_twice_counts_once(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # --out=~/x: the shell leaves ~ after = to the program
    args = toy_theory.get_args(["cnn", "--out=~/x", "--fig=~/f.png", "--snrs", "0.5", "0.25", "0.5"])
    assert (args.out, args.fig, args.snrs) == (str(tmp_path / "x"), str(tmp_path / "f.png"), [0.5, 0.25])


@pytest.mark.parametrize("how", ["diverged", "sigterm", "out of memory"])
def test_toy_theory_stops_in_one_line_and_saves_nothing_half(how, tmp_path, monkeypatch, refused):
    """A run that diverges (a real one: cnn at --eta 100), SIGTERM (as Ctrl-C) and torch's CPU allocator failing each
    end in one line on stderr with their exit code, no summary.json, and SIGTERM's handler given back."""
    def interrupt(args):
        if how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 800000000000 bytes")
    if how != "diverged":
        monkeypatch.setattr(toy_theory, "run_clusters", interrupt)
    argv = ["cnn", "--quick", "--eta", "100"] if how == "diverged" else ["clusters", "--quick"]
    handler = signal.getsignal(signal.SIGTERM)
    err = refused(lambda: toy_theory.main(argv + ["--out", str(tmp_path)]), code=130 if how == "sigterm" else 2)
    assert len(err.splitlines()) == 1, err
    assert {"diverged": "lower --eta (the run diverged)", "sigterm": "interrupted; clusters saves its summary when it "
            "ends", "out of memory": "out of memory (DefaultCPUAllocator"}[how] in err
    assert not (tmp_path / "summary.json").exists() and signal.getsignal(signal.SIGTERM) is handler


def test_toy_theory_quick_keeps_the_flags_typed_beside_it():
    args = toy_theory.get_args(["cnn", "--quick", "--d", "50", "--seeds", "3"])
    assert (args.d, args.seeds, args.ns) == (50, 3, [2, 16])  # typed values win, the rest is --quick's
    args = toy_theory.get_args(["hltm", "--quick", "--depth", "4"])
    assert (args.depth, args.steps) == (4, 200)
    assert toy_theory.get_args(["hltm", "--quick"]).depth == 3


@pytest.mark.parametrize("cmd", ["cnn", "clusters", "covariance", "hltm"])
def test_toy_theory_quick_runs_end_to_end(cmd, tmp_path, one_thread):
    """Each subcommand with --quick, in-process (the script's own startup is the next test's)."""
    s = toy_theory.main([cmd, "--quick", "--out", str(tmp_path)])
    with open(tmp_path / "summary.json") as f:
        saved = json.load(f)
    assert saved["config"]["cmd"] == cmd and saved["seconds"] > 0 and s["seconds"] == saved["seconds"]
    assert (tmp_path / f"{cmd}.png").exists() == HAS_MPL
    assert sys.stdout.line_buffering  # each line out as printed, also into a pipe (| tee log)


def test_toy_theory_smoke(tmp_path):
    """As a script: a --quick run exits 0 and writes its summary (bad flags: in-process, above)."""
    start = lambda out: subprocess.Popen([sys.executable, "toy_theory.py", "clusters", "--quick", "--out", str(out)],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
    whole, p = start(tmp_path), start(tmp_path / "piped")  # side by side: each start imports torch
    p.stdout.readline()  # as | head -1: one line read, then the pipe closed
    p.stdout.close()
    err = whole.communicate(timeout=120)[1]
    assert whole.returncode == 0, err[-2000:]
    with open(tmp_path / "summary.json") as f:  # strict JSON: Python's Infinity for an infinite Fisher ratio is not
        summary = json.load(f, parse_constant=lambda c: pytest.fail(f"summary.json holds {c}"))
    assert summary["config"]["cmd"] == "clusters" and "inf" in json.dumps(summary)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # no temporary file left
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 2 and "the output pipe closed before the run ended" in err and "Traceback" not in err


def test_toy_theory_refuses_sizes_that_cannot_fit_with_the_largest_that_does(refused):
    """A --depth whose 2^depth leaves cannot fit is refused before anything is allocated, with the largest --depth that
    fits; that one is accepted and one more refused (the same for --d)."""
    for flag, value in [("--depth", "40"), ("--d", "1000000000")]:
        cmd = ["hltm", "--quick"] if flag == "--depth" else ["cnn", "--quick"]
        err = refused(lambda: toy_theory.get_args(cmd + [flag, value]))
        assert "GiB of memory, more than this machine's" in err, err
        limit = int(err.split(f"{flag} at most ")[1].split(",")[0])
        assert toy_theory.get_args(cmd + [flag, str(limit)])
        refused(lambda: toy_theory.get_args(cmd + [flag, str(limit + 1)]))


@pytest.mark.parametrize("cmd", ["clusters", "covariance"])
def test_toy_theory_an_overflowing_rate_ends_in_one_line(cmd, tmp_path, refused, one_thread):
    """--lr 1e300: a float32 overflow (torch's SGD: 'value cannot be converted to type float without overflow') or a
    loss gone to nan, each one line with the flag to lower, exit 2."""
    err = refused(lambda: toy_theory.main([cmd, "--quick", "--lr", "1e300", "--out", str(tmp_path)]))
    assert len(err.splitlines()) == 1 and "lower --lr" in err, err


def test_toy_theory_saves_the_summary_before_the_figure(monkeypatch, tmp_path, refused):
    """A figure that fails (a plotting error, a full disk) cannot lose the summary: it is written first."""
    if not HAS_MPL:
        pytest.skip("matplotlib: no figure to fail")
    monkeypatch.setattr(toy_theory, "plot_clusters", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device", "f.png")))
    err = refused(lambda: toy_theory.main(["clusters", "--quick", "--steps", "2", "--out", str(tmp_path)]))
    assert "cannot write f.png (No space left on device); the summary is saved" in err, err
    assert json.loads((tmp_path / "summary.json").read_text())["config"]["cmd"] == "clusters"


def test_toy_theory_refuses_an_out_that_is_a_link_to_nothing(tmp_path, refused):
    os.symlink(tmp_path / "gone", tmp_path / "link")
    assert "is a link to nothing" in refused(lambda: toy_theory.get_args(["cnn", "--out", str(tmp_path / "link")]))


def _toy_script(args, tmp_path, stdout=subprocess.PIPE, **kw):
    """toy_theory.py as a script, --quick and 2 steps of clusters (seconds), started: its Popen (bytes)."""
    cmd = [sys.executable, os.path.join(HERE, "toy_theory.py"), "clusters", "--quick", "--steps", "2"] + args
    return subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, cwd=tmp_path,
                            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **kw.pop("env", {})}, **kw)


def test_toy_theory_write_failures_end_in_one_line(tmp_path):
    """ulimit -f (as a full disk: the write of summary.json fails) and stdout to /dev/full each end in one line naming
    what could not be written, exit 2, no traceback and no temporary file left."""
    import resource
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (2000, 2000))  # summary.json is longer
    big = _toy_script(["--out", "out"], tmp_path, preexec_fn=limit)
    with open("/dev/full", "w") as full:
        to_full = _toy_script(["--out", "full"], tmp_path, stdout=full)  # side by side: each start imports torch
    err = big.communicate(timeout=120)[1].decode()
    assert big.returncode == 2 and len(err.splitlines()) == 1 and "cannot write out/summary.json (File too large)" in err, err
    assert os.listdir(tmp_path / "out") == []
    err = to_full.communicate(timeout=120)[1].decode()
    assert to_full.returncode == 2 and err == "error: cannot write to standard output (No space left on device); " \
        "nothing was saved: send it to a file or device with room\n", err


def test_toy_theory_prints_a_path_that_is_not_utf8(tmp_path):
    """An --out whose name is not UTF-8, under a strict UTF-8 terminal: the run ends normally, the name escaped."""
    out = os.fsencode(tmp_path) + b"/r\xffn"
    p = _toy_script([b"--out", out], tmp_path, env={"PYTHONIOENCODING": "utf-8:strict"})
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0 and rb"r\udcffn/summary.json" in stdout, stderr[-2000:]
    assert os.path.exists(out + b"/summary.json")


if __name__ == "__main__":  # torchrun --nproc_per_node 2 test_simclr.py DIR PORT: one process of two_processes
    _two_process_worker(sys.argv[1], int(sys.argv[2]))
