"""
SimCLR with an autoencoder projection head: one file, read top to bottom.

    python simclr.py                                          # embedded 'shapes' data, no download, minutes on a CPU
    python simclr.py --dataset stl10 --head ae --act sigmoid  # the paper's best head (needs internet + a GPU)
    python simclr.py --dataset stl10 --head ae --act sigmoid --recipe paper   # ... with the paper's protocol
    python simclr.py --dry-run                                # every stage for a couple of steps, in seconds
    python simclr.py --show-augs augs.png                     # look at what the network is asked to match
    python simclr.py --bench                                  # img/s: this pipeline vs the classic DataLoader one
    python simclr.py --label-fractions 0.01,0.1,1             # few labels: SimCLR probed, fine-tuned, and from scratch

Papers:
  SimCLR: Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", arXiv:2002.05709
  AE head: Schliebitz et al., "An Empirical Study on Improving SimCLR's Nonlinear Projection Head using
           Pretrained Autoencoder Embeddings", arXiv:2408.14514 ("the paper" below)

Part 1 is the algorithm and runs on its own: augmentation, model (backbone f, autoencoder, projection head g), NT-Xent,
the training loop, evaluation, the embedded data, and simclr_on_shapes(), a run end to end on one device. A reader can
stop at its end. Part 2 is the machinery behind the command line: exact resume, devices and precision, multi-GPU,
datasets at scale, the paper's protocol, few labels, pictures, the benchmark, and main().

What it measured, each figure with its command and hardware: README.md.
"""
import copy
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass

if __name__ == "__main__":  # Ctrl-C while torch loads: a quiet stop (exit 130), not a traceback; main() takes over
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2  # not imported by "import torchvision"

# ==========================================================================================================
# Part 1: SimCLR
# ==========================================================================================================

@dataclass
class HParams:
    """SimCLR's hyper-parameters, in one place, with the papers' defaults: SimCLR's (Sec. 2.3, App. A and B.1) and the
    autoencoder-head paper's (Sec. 4 of 2408.14514) where SimCLR leaves a value open. train() reads every one."""
    epochs: int = 100  # passes over the pre-training images
    batch_size: int = 256  # N images per step, 2N views
    lr: float = 0.3  # the peak learning rate: 0.3 at N = 256 by both of SimCLR's scaling rules (App. B.1)
    warmup_epochs: float = 10  # linear warm-up, then cosine decay (Sec. 2.3)
    lr_min_ratio: float = 1 / 50  # the cosine ends at lr / 50 (the paper's; SimCLR's ends at 0)
    momentum: float = 0.9  # SGD with momentum, in place of LARS (made for batches of thousands)
    wd: float = 1e-5  # weight decay (the paper's)
    decay_norm_and_bias: bool = False  # decay BatchNorm's scale and shift and the biases too (the paper's code)
    tau: float = 0.5  # the NT-Xent temperature (the paper's)
    crop_min: float = 0.08  # the smallest crop area of RandomResizedCrop (App. A)
    jitter_prob: float = 0.8  # colour jitter (0.8, 0.8, 0.8, 0.2), applied with this probability (App. A)
    gray_prob: float = 0.2  # grayscale
    blur_prob: float = 0.5  # Gaussian blur
    seed: int = 0  # draws the order of every epoch


# ----------------------------------------------------------------------------------------------------------
# Augmentation (Sec. 3 and Appendix A of SimCLR). First as most code writes it, one image at a time on the CPU;
# then the same in batches on the device, each image with its own random parameters. Every batched op matches
# torchvision.transforms.v2.functional on the same parameters (test_simclr.py checks each).
# ----------------------------------------------------------------------------------------------------------

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def blur_kernel(size):
    # odd, ~10% of the image side (Appendix A of SimCLR): 3 at 32 px, where the paper blurs (SimCLR's CIFAR runs do
    # not, App. B.9); none below 20 px
    return int(0.1 * size) // 2 * 2 + 1


def classic_transform(size, crop_min=0.08, jitter_prob=0.8, gray_prob=0.2, blur_prob=0.5):
    """The SimCLR view of one uint8 image (3, H, W), written with torchvision's transforms, one image at a time: the
    specification that augment() below computes in batches."""
    v2 = torchvision.transforms.v2
    ops = [v2.RandomResizedCrop(size, scale=(crop_min, 1.0), antialias=True), v2.RandomHorizontalFlip(),
           v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=jitter_prob), v2.RandomGrayscale(gray_prob)]
    if blur_kernel(size) >= 3:
        ops.append(v2.RandomApply([v2.GaussianBlur(blur_kernel(size), sigma=(0.1, 2.0))], p=blur_prob))
    return v2.Compose(ops + [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def crop_params(N, H, W, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), device="cpu"):
    """RandomResizedCrop.make_params for N images at once: 10 tries of (area, log-ratio), the first valid one wins,
    else the centre-crop fallback. Returns top, left, height, width of each crop box, each (N,) long."""
    area = H * W * torch.empty(N, 10, device=device).uniform_(*scale)
    aspect = torch.exp(torch.empty(N, 10, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1])))
    cw, ch = torch.sqrt(area * aspect).round().long(), torch.sqrt(area / aspect).round().long()  # (N, 10)
    ok = (cw > 0) & (cw <= W) & (ch > 0) & (ch <= H)
    pick = ok.int().argmax(1, keepdim=True)  # (N, 1): the first valid try (0 when none is)
    cw, ch, found = cw.gather(1, pick).squeeze(1), ch.gather(1, pick).squeeze(1), ok.any(1)  # (N,) each
    in_ratio = W / H  # fallback, as torchvision: the largest centred crop whose ratio is inside `ratio`
    fw = W if in_ratio <= max(ratio) else int(round(H * max(ratio)))
    fh = H if in_ratio >= min(ratio) else int(round(W / min(ratio)))
    cw, ch = torch.where(found, cw, fw), torch.where(found, ch, fh)
    top = (torch.rand(N, device=device) * (H - ch + 1)).long()
    left = (torch.rand(N, device=device) * (W - cw + 1)).long()
    top, left = torch.where(found, top, (H - ch) // 2), torch.where(found, left, (W - cw) // 2)
    return top, left, ch, cw


def resized_crop(x, top, left, ch, cw, size, flip):
    """Crop each image to its box (ch x cw at top, left), resize to size x size (bilinear) and mirror where `flip`:
    one grid_sample. Output pixel i reads input coordinate left + (i + 0.5) cw / size - 0.5, clamped to the box,
    which is exactly what F.interpolate(bilinear, align_corners=False) does on the cropped image."""
    N, _, H, W = x.shape
    centre = torch.arange(size, device=x.device) + 0.5  # (size,): output pixel centres

    def coords(start, length, full):  # (N, size) normalised grid coordinates along one axis
        c = start[:, None] + centre * (length[:, None] / size) - 0.5
        c = torch.minimum(torch.maximum(c, start[:, None].float()), (start + length - 1)[:, None].float())
        return (2 * c + 1) / full - 1  # pixel -> [-1, 1], align_corners=False
    gx, gy = coords(left, cw, W), coords(top, ch, H)
    gx = torch.where(flip[:, None], gx.flip(1), gx)
    # (N, size, size, 2): the (x, y) input coordinate of every output pixel
    grid = torch.stack([gx[:, None, :].expand(N, size, size), gy[:, :, None].expand(N, size, size)], -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)  # (N, 3, size, size)


def gray(x):
    return (0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)  # (N, 1, H, W), ITU-R 601 luma


def blend(x, factor, target):
    """factor x + (1 - factor) target, clipped to [0, 1]; factor is per image, (N,) or (N, 1, 1, 1)."""
    factor = factor.view(-1, 1, 1, 1)
    return (factor * x + (1 - factor) * target).clamp(0, 1)


def adjust_hue(x, turns):
    """Rotate the hue by `turns` (per image, (N,), |turns| <= 0.5): RGB -> HSV, shift H, HSV -> RGB. HSV keeps
    max = V and max - min = V S, so only H needs computing and each channel comes back in closed form."""
    r, g, b = x.unbind(1)
    v, delta = x.amax(1), x.amax(1) - x.amin(1)  # (N, H, W)
    dd = torch.where(delta == 0, 1, delta)
    hue = torch.where(v == r, (g - b) / dd, torch.where(v == g, 2 + (b - r) / dd, 4 + (r - g) / dd))  # in sixths
    hue = torch.remainder(hue + 6 * turns.view(-1, 1, 1), 6).unsqueeze(1)  # (N, 1, H, W)
    shift = 5 - 2 * torch.arange(3, device=x.device).view(1, 3, 1, 1)  # 5, 3, 1 sixths for R, G, B
    pos = torch.remainder(shift + hue, 6)  # (N, 3, H, W): each channel's place on the hue circle
    return v.unsqueeze(1) - delta.unsqueeze(1) * torch.minimum(pos, 4 - pos).clamp(0, 1)  # (N, 3, H, W)


def color_jitter(x, factors, order):
    """ColorJitter with per-image factors (N, 4) = brightness, contrast, saturation, hue, applied in a per-image
    random order (N, 4) (a permutation of 0..3), as torchvision's ColorJitter does per image. Every image rotates
    its hue exactly once, so the (costly) hue runs once on the whole batch, between the blends each image applies
    before it and those it applies after (a blend with f = 1 leaves an image as it is)."""
    hue_at = (order == 3).int().argmax(1)  # (N,) the slot of the order at which each image rotates its hue

    def blends(x, slots, active):
        for slot in slots:
            op = order[:, slot].view(-1, 1, 1, 1)  # which op each image applies in this slot
            # (N,): 1 (no change) where this slot is the image's hue, or on the other side of it
            factor = torch.where(active(slot), factors.gather(1, order[:, slot:slot + 1]).squeeze(1), 1.0)
            x_gray = gray(x)  # blend towards black (brightness), the mean grey (contrast), the grey image (saturation)
            target = torch.where(op == 1, x_gray.mean((1, 2, 3), keepdim=True), x_gray)
            x = blend(x, factor, torch.where(op == 0, 0, target))
        return x

    x = blends(x, range(3), lambda slot: slot < hue_at)  # brightness / contrast / saturation before the hue
    x = adjust_hue(x, factors[:, 3])
    return blends(x, range(1, 4), lambda slot: slot > hue_at)  # and after it


def gaussian_blur(x, sigma, kernel_size):
    """Per-image sigma (N,), separable Gaussian with reflect padding, as torchvision's gaussian_blur."""
    N, C, H, W = x.shape
    i = torch.arange(kernel_size, device=x.device) - kernel_size // 2
    w = torch.exp(-0.5 * (i / sigma[:, None]) ** 2)
    w = (w / w.sum(1, keepdim=True)).repeat_interleave(C, 0)  # (N*C, K): one kernel's weights per channel
    pad = kernel_size // 2
    x = x.reshape(1, N * C, H, W)  # images as channels, so one grouped conv blurs them all
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")  # (1, N*C, H+2p, W+2p)
    x = F.conv2d(x, w.view(N * C, 1, 1, -1), groups=N * C)  # along x
    x = F.conv2d(x, w.view(N * C, 1, -1, 1), groups=N * C)  # along y
    return x.view(N, C, H, W)  # (1, N*C, H, W) -> (N, C, H, W)


def augment(x, crop_min=0.08, jitter_prob=0.8, gray_prob=0.2, blur_prob=0.5):
    """The SimCLR view: images x (N, 3, H, W), uint8 or floats in [0, 1] -> a random view of each, floats in [0, 1].
    RandomResizedCrop -> flip -> ColorJitter(0.8, 0.8, 0.8, 0.2) w.p. 0.8 -> grayscale w.p. 0.2
    -> GaussianBlur(kernel ~10% of the side, sigma in [0.1, 2]) w.p. 0.5 (Appendix A of SimCLR)."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x  # ToTensor's scaling: every op below works in [0, 1]
    N, _, H, W = x.shape
    dev = x.device
    coin = lambda p: (torch.rand(N, device=dev) < p).view(-1, 1, 1, 1)
    top, left, ch, cw = crop_params(N, H, W, scale=(crop_min, 1.0), device=dev)
    x = resized_crop(x, top, left, ch, cw, H, flip=torch.rand(N, device=dev) < 0.5)
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


def normalize(x, mean=IMAGENET_MEAN, std=IMAGENET_STD):
    """uint8 or [0, 1] images (N, 3, H, W) -> the standardised input the ResNet expects (ImageNet's statistics).
    Python numbers, not tensors: on a GPU no constant is copied from the host in every step."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x
    return torch.stack([(x[:, c] - m) / s for c, (m, s) in enumerate(zip(mean, std))], 1)


def to_device(x, device):
    """A batch onto the training device. From host memory it goes through pinned memory, so that the copy does not
    make the CPU wait (non_blocking)."""
    if x.device == device:
        return x
    return (x.pin_memory() if device.type == "cuda" else x).to(device, non_blocking=True)


def augment_kwargs(hp):
    """augment's keyword arguments, from the hyper-parameters."""
    return dict(crop_min=hp.crop_min, jitter_prob=hp.jitter_prob, gray_prob=hp.gray_prob, blur_prob=hp.blur_prob)


def two_views(x, hp, prep=normalize):
    """uint8 images (N, 3, H, W) -> (2N, 3, H, W): two augmented views of each, standardised (prep). Rows i and i + N
    are the two views of image i, the positive pair of NT-Xent."""
    with torch.no_grad():  # the augmentation is input, not model: no gradient flows through it
        return prep(torch.cat([augment(x, **augment_kwargs(hp)), augment(x, **augment_kwargs(hp))]))


# ----------------------------------------------------------------------------------------------------------
# Model: backbone f, autoencoder, projection head g; h = f(x), z = g(h)
# ----------------------------------------------------------------------------------------------------------

def make_backbone(arch, stem, pretrained=False):
    """torchvision ResNet with fc removed: x (N, 3, H, W) -> h (N, 512 or 2048). resnet10 is torchvision's ResNet
    with one residual block per stage, half of resnet18 (He et al. 2016, Table 1), sized for a CPU. With `pretrained`
    and the ImageNet stem every layer holds ImageNet weights; with the CIFAR stem, conv1 is a new random 3x3 conv."""
    if arch == "resnet10":
        if pretrained:
            raise ValueError("torchvision has no ImageNet weights for resnet10")
        net = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1])
    else:
        net = getattr(torchvision.models, arch)(weights="DEFAULT" if pretrained else None)
    if stem == "cifar":  # small images: 3x3 stride-1 conv, no maxpool (as in SimCLR's CIFAR experiments, App. B.9)
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


def val_split(n):
    """(train, val): indices of a 90/10 split of n images, torch's random_split with seed 42 as the paper's code
    splits a train split (drawn on the CPU, so the same split on every device)."""
    fit, val = (torch.tensor(s.indices, dtype=torch.long) for s in torch.utils.data.random_split(
        range(n), [0.9, 0.1], generator=torch.Generator().manual_seed(42)))
    return (fit, val) if len(val) else (fit[:-1], fit[-1:])  # under 10 images: one still validates


def train_autoencoder(images, d, epochs, device, val_images=None, batch=100, lr=1e-4, resume=None, save=None,
                      log=print):
    """The paper's autoencoder recipe (as its code runs it) on uint8 images (n, 3, H, W):
    MSE on flattened pixels in [0, 1], Adam, ReduceLROnPlateau(patience 10, factor 0.5) on the validation loss of
    val_images (default: a 90/10 split of the images, seed 42); the best validation epoch's weights. Returns
    (autoencoder, its validation MSE). The whole state is the dict s: resume(s) may load a saved one into it before
    the first epoch, and save(s) is called after every epoch."""
    device = torch.device(device)
    if val_images is None:
        perm, val = val_split(len(images))
        val_images = images[val.to(images.device)]  # a tenth, copied once
    else:
        perm = torch.randperm(len(images))
    flat = lambda x: to_device(x, device).float().flatten(1) / 255  # (B, 3HW) in [0, 1]
    ae = AutoEncoder(images[0].numel(), d).to(device)
    opt = torch.optim.Adam(ae.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=10, factor=0.5)
    s = dict(ae=ae, opt=opt, sched=sched, epoch=0, perm=perm, best=float("inf"), best_epoch=0,
             best_state=copy.deepcopy(ae.state_dict()))
    if resume:
        resume(s)
    for epoch in range(s["epoch"], epochs):
        ae.train()
        for idx in s["perm"].to(images.device).split(batch):
            x = flat(images[idx])
            loss = F.mse_loss(ae(x), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        ae.eval()
        with torch.no_grad():
            val_loss = sum(F.mse_loss(ae(x), x, reduction="sum").item() for x in map(flat, val_images.split(1000)))
        val_loss /= val_images.numel()
        sched.step(val_loss)
        if val_loss < s["best"]:
            s.update(best=val_loss, best_epoch=epoch + 1, best_state=copy.deepcopy(ae.state_dict()))
        if epoch % 10 == 0 or epoch == epochs - 1:
            log(f"autoencoder epoch {epoch + 1}/{epochs}: val MSE {val_loss:.5f} (best {s['best']:.5f})")
        s.update(epoch=epoch + 1, perm=s["perm"][torch.randperm(len(s["perm"]))])  # reshuffled for the next
        if save:
            save(s)
    ae.load_state_dict(s["best_state"])
    return ae, s["best"]


ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def projection_head(feat_dim, hidden, out, act, freeze=True):
    """g(h) = W2 act(W1 h), no BatchNorm (the paper's heads). `hidden` is W1: either the width of a new random
    Linear(feat_dim, hidden), or the autoencoder's embedding layer (an nn.Linear(512, d)), copied and frozen unless
    freeze=False (Sec. 3 of the paper); then the hidden width is its d."""
    if isinstance(hidden, int):
        w1 = nn.Linear(feat_dim, hidden)
    else:
        if hidden.in_features != feat_dim:
            raise ValueError(f"the AE embedding takes {hidden.in_features} inputs but the backbone gives "
                             f"{feat_dim} features; use a 512-d backbone (resnet18/34)")
        w1 = copy.deepcopy(hidden)
        w1.requires_grad_(not freeze)
    return nn.Sequential(w1, ACTIVATIONS[act](), nn.Linear(w1.out_features, out))


class SimCLR(nn.Module):
    def __init__(self, backbone, head):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x):  # x (2N, 3, H, W)
        return self.head(self.backbone(x))  # (2N, 128): z = g(h), h = f(x)


# ----------------------------------------------------------------------------------------------------------
# NT-Xent loss, Eq. (1) of SimCLR
# ----------------------------------------------------------------------------------------------------------

def nt_xent(z1, z2, tau):
    """The mean over all 2N views i of -log( exp(sim(z_i, z_j)/tau) / sum_{k != i} exp(sim(z_i, z_k)/tau) ), where j
    is the other view of i's image and sim the cosine similarity. z1, z2: (N, out), row n of each from image n."""
    N = len(z1)
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2N, out) fp32: sgd_step calls this outside autocast
    sim = z @ z.T / tau  # (2N, 2N): every view against every view
    sim = sim.masked_fill(torch.eye(2 * N, dtype=torch.bool, device=z.device), float("-inf"))  # k != i
    positives = (torch.arange(2 * N, device=z.device) + N) % (2 * N)  # view i's partner: i + N (mod 2N)
    return F.cross_entropy(sim, positives)


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------

def param_groups(model, wd, decay_norm_and_bias=False):
    """The optimizer's parameter groups: weight decay on the convolution and linear weights only, not on BatchNorm's
    scale and shift nor on any bias (SimCLR's official code), unless decay_norm_and_bias (the paper decays
    everything). Frozen parameters (a frozen AE embedding) are in no group."""
    params = [p for p in model.parameters() if p.requires_grad]
    if decay_norm_and_bias:
        return [dict(params=params, weight_decay=wd)]
    return [dict(params=[p for p in params if p.ndim > 1], weight_decay=wd),  # conv (4-D) and linear (2-D) weights
            dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0)]  # BatchNorm weights, biases


def optimizer(model, hp):
    """SGD with momentum (SimCLR uses LARS, made for batches of thousands). fused: one kernel for every weight."""
    fused = {"fused": True} if next(model.parameters()).device.type == "cuda" else {}
    return torch.optim.SGD(param_groups(model, hp.wd, hp.decay_norm_and_bias), lr=hp.lr, momentum=hp.momentum,
                           **fused)


def lr_at(step, total, warmup, peak, final):
    """The learning rate of step `step` (from 0) of `total`: a linear warm-up over the first `warmup` steps that
    reaches `peak` at its last one, then a cosine decay (without restarts) that reaches `final` at the last step
    (Sec. 2.3 of SimCLR, whose cosine ends at 0; train() ends it at lr * lr_min_ratio)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    start = max(warmup - 1, 0)  # the step at the peak, where the cosine starts
    progress = (step - start) / max(1, total - 1 - start)  # 0 -> 1
    return final + (peak - final) * 0.5 * (1 + math.cos(math.pi * progress))


def epoch_perm(n, seed, epoch):
    """The order in which epoch `epoch` visits n images: a function of the seed and the epoch alone, drawn on the CPU
    (the same order on every device). 100_003, a prime above any epoch count: no two (seed, epoch) share an order."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def train(model, images, hp, log=print):
    """SimCLR pre-training (Algorithm 1 of SimCLR) of model = SimCLR(f, g) on uint8 images (n, 3, H, W) with the
    hyper-parameters hp (an HParams): each step two views of each of N images, h = f(x), z = g(h), NT-Xent, an SGD
    step at the learning rate lr_at gives it. One log line per epoch."""
    device = next(model.parameters()).device  # the images may be elsewhere: each batch goes to the model
    N, steps = hp.batch_size, len(images) // hp.batch_size  # the last, partial batch of an epoch is dropped
    opt = optimizer(model, hp)
    total, warmup, final = hp.epochs * steps, round(hp.warmup_epochs * steps), hp.lr * hp.lr_min_ratio
    for epoch in range(hp.epochs):
        model.train()
        t0, losses, perm = time.time(), [], epoch_perm(len(images), hp.seed, epoch).to(images.device)
        for step in range(steps):
            x = to_device(images[perm[step * N:(step + 1) * N]], device)  # (N, 3, H, W) uint8: a batch of N images
            views = two_views(x, hp)  # (2N, 3, H, W): two augmented views of each; rows i and i + N: image i
            h = model.backbone(views)  # (2N, 512): the representation h = f(x)
            z = model.head(h)  # (2N, 128): the projection z = g(h)
            loss = nt_xent(z[:N], z[N:], hp.tau)  # each view must pick out its partner among the 2N - 1 others
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch * steps + step, total, warmup, hp.lr, final)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())  # on the device: reading it now would make the CPU wait for the GPU
        loss = torch.stack(losses).mean().item()  # (steps,) -> the epoch's mean, read once
        log(f"epoch {epoch + 1}/{hp.epochs} | loss {loss:.4f} | lr {opt.param_groups[0]['lr']:.4f} | "
            f"{steps * N / (time.time() - t0):.0f} img/s")
    return model


# ----------------------------------------------------------------------------------------------------------
# Evaluation: the frozen backbone in eval mode, on un-augmented images
# ----------------------------------------------------------------------------------------------------------

@torch.no_grad()
def extract_features(backbone, images, batch=512, prep=normalize):
    """h = f(x) for uint8 images (n, 3, H, W) -> (n, 512) (resnet50: 2048), in fp32 (no autocast: the probe sees exact
    features), BatchNorm in eval mode (its running statistics, not the batch's)."""
    was_training = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    h = torch.cat([backbone(prep(to_device(x, device))).float() for x in images.split(batch)])
    backbone.train(was_training)
    return h


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
def knn_top1(train_h, train_y, test_h, test_y, classes, k=200, temperature=0.1):
    """Weighted kNN monitor (Wu et al. 2018, arXiv:1805.01978): cosine similarity, the k nearest train features vote
    with weight exp(sim / temperature)."""
    correct = 0
    for i in range(0, len(test_h), 1024):
        sim, idx = nearest(test_h[i:i + 1024], train_h, k)  # (b, k)
        votes = torch.zeros(len(sim), classes, device=sim.device)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())  # (b, classes)
        correct += (votes.argmax(1) == test_y[i:i + 1024]).sum().item()
    return correct / len(test_h)


def probes(train_h, train_y, test_h, test_y, classes, probe_steps=200, knn_k=200):
    """The standard linear protocol: the probe and the kNN trained on the train split's features train_h, top-1 on
    the test split's test_h."""
    return dict(linear_top1=linear_probe(train_h, train_y, test_h, test_y, classes, probe_steps),
                knn_top1=knn_top1(train_h, train_y, test_h, test_y, classes, knn_k))


# ----------------------------------------------------------------------------------------------------------
# Data: 'shapes', generated in seconds, no download
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


# What the two views of an image share beyond its class is what SimCLR learns first (the colour shortcut of Sec. 3 of
# SimCLR): a unique colour, clutter or a rotation per image would let it match views without looking at the shape.
# So shapes are upright, and colours come from a small palette: its 30 (shape, background) pairs are fewer than the
# 64 images of a batch, so telling them apart needs the shape.
PALETTE = torch.tensor([[0.9, 0.2, 0.2], [0.2, 0.8, 0.2], [0.2, 0.3, 0.9], [0.9, 0.9, 0.2], [0.9, 0.9, 0.9],
                        [0.1, 0.1, 0.1]])


def make_shapes(n, size, seed):
    """The embedded dataset: 10 shape classes at random position and scale, in palette colours, with pixel noise.
    Generated from `seed` in seconds, no files, no per-image Python. Returns uint8 (n, 3, size, size), labels (n,)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.rand(*shape, generator=gen)
    S = 2 * size  # drawn at twice the size and average-pooled: anti-aliased edges
    lin = (torch.arange(S) + 0.5) / S * 2 - 1
    gy, gx = torch.meshgrid(lin, lin, indexing="ij")  # (S, S) pixel centres in [-1, 1]
    xs, ys = [], torch.randint(0, len(SHAPE_NAMES), (n,), generator=gen)
    for start in range(0, n, 1000):  # chunks keep memory small
        y = ys[start:start + 1000]
        m = len(y)
        cx, cy = ((rand(2, m, 1, 1) - 0.5) * 0.6).unbind(0)  # centre
        radius = 0.45 + 0.3 * rand(m, 1, 1)  # 7-12 px of 32: several cells of the ImageNet stem's 8x8 feature map
        u, v = (gx - cx) / radius, (gy - cy) / radius  # (m, S, S): the shape's own coordinates
        inside = torch.zeros(m, S, S, dtype=torch.bool)
        for cls in range(len(SHAPE_NAMES)):
            idx = (y == cls).nonzero().squeeze(1)
            inside[idx] = shape_mask(u[idx], v[idx], cls)
        fg_i = torch.randint(0, len(PALETTE), (m,), generator=gen)
        bg_i = (fg_i + torch.randint(1, len(PALETTE), (m,), generator=gen)) % len(PALETTE)  # never the shape's colour
        img = torch.where(inside.unsqueeze(1), PALETTE[fg_i].view(m, 3, 1, 1), PALETTE[bg_i].view(m, 3, 1, 1))
        img = F.avg_pool2d(img, 2) + 0.03 * torch.randn(m, 3, size, size, generator=gen)  # (m, 3, size, size)
        xs.append((img.clamp(0, 1) * 255).round().to(torch.uint8))
    return torch.cat(xs), ys


# ----------------------------------------------------------------------------------------------------------
# SimCLR end to end, on one device
# ----------------------------------------------------------------------------------------------------------

# What `python simclr.py` uses for 'shapes', sized for a laptop's CPU: ResNet10 with the ImageNet stem (it shrinks the
# 32 px image 4x before the first block, unlike the CIFAR stem), crops of at least half the image (a crop keeps most
# of the shape), tau 0.2, batch 64, and a peak rate of 0.012, below App. B.1's rule (0.15 at N = 64): in a run of a few
# hundred steps it learns faster (README, The first run). n: train and test images.
SHAPES = dict(img=32, batch=64, epochs=7, lr=0.012, ae_epochs=10, n=(5000, 2000), arch="resnet10", stem="imagenet",
              tau=0.2, crop_min=0.5)


def simclr_on_shapes(epochs=SHAPES["epochs"], head="mlp", act="relu", n=SHAPES["n"], device=None, seed=0, log=print):
    """SimCLR on the embedded shapes, end to end: the images, (head ae) the autoencoder whose frozen embedding is the
    head's first layer, pre-training, then the linear probe and kNN of the frozen backbone, next to a randomly
    initialised one. The hyper-parameters are those of `python simclr.py`. Returns {"simclr": {linear_top1, knn_top1},
    "random_init": {...}}."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    (train_x, train_y), (test_x, test_y) = make_shapes(n[0], SHAPES["img"], seed), make_shapes(n[1], SHAPES["img"],
                                                                                                  seed + 10_000)
    hp = HParams(epochs=epochs, batch_size=SHAPES["batch"], lr=SHAPES["lr"], seed=seed, tau=SHAPES["tau"],
                 warmup_epochs=min(HParams.warmup_epochs, epochs / 10), crop_min=SHAPES["crop_min"])  # a tenth warms up
    hidden = 512  # the MLP head's width, or the embedding of an autoencoder trained on the same images
    if head == "ae":
        hidden = train_autoencoder(train_x, 512, SHAPES["ae_epochs"], device, log=log)[0].embedding
    model = SimCLR(make_backbone(SHAPES["arch"], SHAPES["stem"]), projection_head(512, hidden, 128, act))
    model = model.to(device, memory_format=torch.channels_last)  # (N, H, W, C) in memory: faster convolutions
    train(model, train_x.to(device), hp, log=log)
    random_init = make_backbone(SHAPES["arch"], SHAPES["stem"]).to(device)
    results = {name: probes(extract_features(f, train_x), train_y.to(device), extract_features(f, test_x),
                            test_y.to(device), 10)
               for name, f in (("simclr", model.backbone), ("random_init", random_init))}
    for name, r in results.items():
        log(f"{name:<12} linear {100 * r['linear_top1']:.1f}%  kNN {100 * r['knn_top1']:.1f}%")
    return results


# ==========================================================================================================
# Part 2: the machinery. The command line, exact resume, devices, multi-GPU, datasets at scale, the paper's
# protocol, few labels, pictures, the benchmark and main(), each under its own banner.
# ==========================================================================================================
# Part 2's own imports: Part 1 needs none of them.
import argparse, contextlib, datetime, errno, fcntl, functools, gzip, hashlib  # noqa: E401, E402
import json, os, re, shlex, shutil, sys, tempfile, threading, types  # noqa: E401, E402

import numpy as np  # noqa: E402

import PIL.Image  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.nn.functional as dist_nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

# ----------------------------------------------------------------------------------------------------------
# Command line: every flag once, with its rule and its default; the values computed from the flags, in one place
# ----------------------------------------------------------------------------------------------------------

# Per dataset: the paper's image side and batch (Sec. 4 of 2408.14514), its 150 pre-training and 100 autoencoder
# epochs (100 pre-training epochs for the datasets it does not use), and Part 1's shapes.
DATASETS = {
    "shapes":        SHAPES,
    "stl10":         dict(img=96, batch=500, epochs=150, ae_epochs=100),
    "cifar10":       dict(img=32, batch=1280, epochs=150, ae_epochs=100),
    "cifar100":      dict(img=32, batch=1280, epochs=150, ae_epochs=100),
    "imagenette":    dict(img=128, batch=392, epochs=150, ae_epochs=100),
    "fgvc-aircraft": dict(img=128, batch=666, epochs=150, ae_epochs=100),
    "fashion-mnist": dict(img=28, batch=512, epochs=100, ae_epochs=100),
    "folder":        dict(img=96, batch=256, epochs=100, ae_epochs=100),
}
# --dataset folder on a CPU: the first run's model and rate, at most 32 px, for a run of minutes on a laptop
FOLDER_ON_CPU = dict(img=32, batch=64, epochs=20, lr=SHAPES["lr"], arch="resnet10", stem="imagenet")

# --recipe: its values win over DATASETS, flags typed on the command line over both (README, Recipes).
# simclr: from scratch as SimCLR trains (Sec. 2.3: linear warm-up, cosine decay; its code: no weight decay on
# BatchNorm and biases), SGD + momentum for LARS, lr 0.3 sqrt(N / 256): B.1's square-root rule 0.075 sqrt(N),
# re-anchored to meet the linear rule at N = 256.
# paper: the protocol of 2408.14514 as its code runs it (Sec. 4): the values below, lr 0.3 N / 256 with the cosine
# stepped once an epoch, ToTensor's [0, 1] inputs (or --standardize), each view through the backbone alone, 90% of the
# train split pre-trained on (the autoencoder too) and the epoch of lowest NT-Xent on the other 10% evaluated.
RECIPES = {
    "simclr": dict(lr_scaling="sqrt", decay_norm_and_bias=False),
    "paper": dict(lr_scaling="linear", decay_norm_and_bias=True, pretrained=True, arch="resnet34", stem="imagenet",
                  tau=0.5, crop_min=0.08, warmup_epochs=0, eval="paper", stl10_pretrain="train", precision="fp32"),
}

# The paper's code validates on 10% of the train split, but Imagenette's on 10% of its "val" split, the test images
# (split_vision_dataset in its dataset.py loads Imagenette's "val" for the split "val").
PAPER_VALIDATES_ON_TEST = ("imagenette",)

# Flags that apply to one value of another flag only (else they would be ignored), and why.
ONLY_FOR = dict(standardize=("recipe", "paper", "recipe simclr standardises with ImageNet's statistics"),
                ae_epochs=("head", "ae", "the MLP head has no autoencoder"), ae_dir=("head", "ae", "nor its cache"),
                ae_dim=("head", "ae", "the MLP head's hidden width is --proj-hidden"),
                no_freeze=("head", "ae", "the MLP head has nothing frozen"),
                proj_hidden=("head", "mlp", "the ae head's width is its AE's d: use --ae-dim {}"))


def die(msg, code=2):
    """A user mistake, or a run that cannot go on: what was wrong and what to do, exit 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


FLOAT32_MAX = torch.finfo(torch.float32).max


def number(kind, ok, rule, many=False):
    """An argparse type: a finite number of `kind` (a float within float32's range) for which ok(value) holds, else
    refused with `rule`; with `many`, a comma-separated list of them, sorted and distinct."""
    def parse(text):
        try:
            values = [kind(v) for v in (text.split(",") if many else [text])]
        except ValueError:
            raise argparse.ArgumentTypeError(f"takes {'comma-separated ' if many else ''}"
                                             f"{'integers' if kind is int else 'numbers'} (got {text!r})")
        bad = [v for v in values if not (math.isfinite(v) and ok(v))]
        if bad:
            raise argparse.ArgumentTypeError(f"must be {rule} (got {bad[0]})")
        big = [v for v in values if kind is float and abs(v) > FLOAT32_MAX]  # the steps are float32's: 1e308 overflows
        if big:
            raise argparse.ArgumentTypeError(f"must be at most {FLOAT32_MAX:.3g}, float32's largest (got {big[0]:g})")
        return sorted(set(values)) if many else values[0]
    return parse


POSITIVE, NONNEGATIVE = number(float, lambda v: v > 0, "> 0"), number(float, lambda v: v >= 0, ">= 0")
PROBABILITY, COUNT = number(float, lambda v: 0 <= v <= 1, "in [0, 1]"), number(int, lambda v: v >= 1, ">= 1")
NONNEGATIVE_INT, WIDTH = number(int, lambda v: v >= 0, ">= 0"), number(int, lambda v: 1 <= v <= 65536, "in 1..65536")


def path(exts=()):
    """An argparse type: a folder, or with `exts` a file with one of those extensions; refused before anything runs
    when it cannot be one (an empty name, another extension, a file where a folder must be)."""
    def parse(text):
        kind = " or ".join(exts) + " file" if exts else "folder"
        name = os.path.basename(text)
        if not text or exts and (os.path.splitext(name)[1].lower() not in exts or os.path.isdir(text)):
            raise argparse.ArgumentTypeError(f"give the name of a {kind} (got {text!r})")
        folder = os.path.abspath(os.path.dirname(text) if exts else text)
        while not os.path.lexists(folder):  # the nearest that exists: a file there stops every folder below it
            folder = os.path.dirname(folder)
        if not os.path.exists(folder):  # a link to nothing: os.makedirs would say only "File exists"
            raise argparse.ArgumentTypeError(f"{folder} is a link to {os.readlink(folder)}, which does not exist: "
                                             f"create that, or give another {kind}")
        if not os.path.isdir(folder):
            raise argparse.ArgumentTypeError(f"{folder} is a file, not a folder: give the name of a {kind}")
        return text
    return parse


class HelpWithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # keep "(default: per dataset)" where the help says it; no "(default: None)"
        return action.help if "default" in action.help or action.default is None else super()._get_help_string(action)


def build_parser():
    """Every flag once, with its rule (its type) and its default (HParams' where it has one), in --help's groups."""
    p = argparse.ArgumentParser(description="SimCLR with an optional autoencoder projection head (arXiv:2408.14514).",
                                formatter_class=HelpWithDefaults, allow_abbrev=False)
    p.error = die  # a bad flag: its rule in one line, exit 2 (not the usage of every flag)
    p._negative_number_matcher = re.compile(r"-\.?\d|-(inf|nan)", re.I)  # --lr -inf, -1e5: a value its rule refuses
    a = p.add_argument_group("data").add_argument
    a("--dataset", default="shapes", choices=tuple(DATASETS), help="the images to learn from")
    a("--data-dir", type=path(), default="data", help="where datasets are read from (and downloaded to)")
    a("--no-download", action="store_true", help="never download; fail with a list of the files to put in place")
    a("--stl10-pretrain", choices=("train+unlabeled", "train"), help="default: train+unlabeled; recipe paper: train")
    a("--img-size", type=number(int, lambda v: 8 <= v <= 1024, "in 8..1024"), help="default: per dataset; folder: "
      "its images' median side, at most 96")
    a("--data-on", default="auto", choices=("auto", "device", "host"), help="where the images live (auto: the "
      "device if they take at most half its free memory)")
    a = p.add_argument_group("augmentations (App. A of SimCLR; the paper's values)").add_argument
    a("--crop-min", type=number(float, lambda v: 0 < v <= 1, "in (0, 1]"), help="smallest crop area (default: 0.08)")
    a("--jitter-prob", type=PROBABILITY, default=HParams.jitter_prob, help="probability of colour jitter")
    a("--gray-prob", type=PROBABILITY, default=HParams.gray_prob, help="probability of grayscale")
    a("--blur-prob", type=PROBABILITY, default=HParams.blur_prob, help="probability of Gaussian blur")
    a("--show-augs", metavar="FILE.png", type=path((".png", ".jpg", ".jpeg")), help="save 8 images, 2 views each; exit")
    a = p.add_argument_group("model: backbone f, projection head g, autoencoder").add_argument
    a("--arch", choices=("resnet10", "resnet18", "resnet34", "resnet50"), help="backbone (default: resnet34; shapes, "
      "and folder on a CPU: resnet10)")
    a("--stem", choices=("auto", "imagenet", "cifar"), help="default: auto, imagenet with --pretrained or over 64 px")
    a("--pretrained", action="store_true", help="start from torchvision's ImageNet weights (recipe paper: on)")
    a("--head", default="mlp", choices=("mlp", "ae"), help="projection head: random MLP, or AE embedding first")
    a("--act", default="relu", choices=tuple(ACTIVATIONS), help="activation between the two head layers")
    a("--proj-hidden", type=WIDTH, help="hidden width of the MLP head (default: 512)")
    a("--proj-out", type=WIDTH, default=128, help="output width of the projection head")
    a("--ae-dim", type=WIDTH, help="width d of the AE embedding, the ae head's hidden width (default: 512)")
    a("--no-freeze", action="store_true", help="let the AE embedding train (ablation; frozen by default)")
    a("--ae-epochs", type=NONNEGATIVE_INT, help="autoencoder epochs (default: per dataset)")
    a("--ae-dir", type=path(), help="cache of trained autoencoders (default: runs/autoencoders)")
    a = p.add_argument_group("optimisation (Sec. 2.3 and App. B.1 of SimCLR; Sec. 4 of the paper)").add_argument
    a("--recipe", default="simclr", choices=tuple(RECIPES), help="simclr: from scratch as SimCLR; paper: 2408.14514's")
    a("--epochs", type=NONNEGATIVE_INT, help="pre-training epochs (default: per dataset)")
    a("--batch-size", type=number(int, lambda v: v >= 2, "at least 2: NT-Xent needs a negative per view"),
      help="N images per step, 2N views (default: per dataset)")
    a("--lr", type=POSITIVE, help="peak learning rate (default: 0.3 sqrt(N / 256); recipe paper: 0.3 N / 256)")
    a("--warmup-epochs", type=number(float, lambda v: 0 <= v <= 10_000, "in [0, 10000]"), help="linear warm-up "
      "(default: a tenth of the run, at most 10 epochs; recipe paper: 0)")
    a("--momentum", type=number(float, lambda v: 0 <= v < 1, "in [0, 1)"), default=HParams.momentum, help="of SGD")
    a("--wd", type=NONNEGATIVE, default=HParams.wd, help="weight decay")
    a("--lr-min-ratio", type=PROBABILITY, default=HParams.lr_min_ratio, help="the cosine ends at lr * this")
    a("--tau", type=POSITIVE, help="NT-Xent temperature (default: 0.5, the paper's; shapes: 0.2)")
    a("--standardize", action="store_true", help="recipe paper: each split's channel statistics, not ToTensor's")
    a = p.add_argument_group("evaluation").add_argument
    a("--eval", choices=("standard", "paper"), help="paper: the paper's probe on a split of the test split (default: "
      "standard; recipe paper: paper)")
    a("--probe-steps", type=COUNT, default=200, help="L-BFGS iterations of the linear probe")
    a("--knn-every", type=NONNEGATIVE_INT, default=5, help="kNN monitor every this many epochs (0: at the end only)")
    a("--knn-k", type=COUNT, default=200, help="neighbours of the weighted kNN")
    a("--no-baselines", action="store_true", help="skip the raw-pixel and random-init baselines")
    few = p.add_argument_group("few labels and pictures")
    a, either = few.add_argument, few.add_mutually_exclusive_group().add_argument  # fractions, or counts per class
    either("--label-fractions", type=number(float, lambda v: 0 < v <= 1, "in (0, 1]", many=True), metavar="F,F,...",
      help="train on these fractions of the labels, e.g. 0.01,0.1,1 (default: off)")
    either("--labels-per-class", type=number(int, lambda v: v >= 1, "at least 1", many=True), metavar="K,K,...",
      help="train on K labels of every class (default: off)")
    a("--label-draws", type=number(int, lambda v: 1 <= v <= 1000, "in 1..1000"), default=3, help="draws per label set")
    a("--sup-steps", type=COUNT, default=500, help="SGD steps of fine-tuning and of training from scratch")
    a("--show-neighbours", metavar="FILE.png", type=path((".png",)), help="neighbours.png here too (--resume: only it)")
    a = p.add_argument_group("run: device, precision, processes, output").add_argument
    a("--device", help="cuda, mps or cpu (default: cuda if available, else mps, else cpu)")
    a("--precision", choices=("auto", "bf16", "fp32"), help="default: auto, bf16 on CUDA and native-bf16 CPUs")
    a("--compile", default="auto", choices=("auto", "on", "off"), help="torch.compile (auto: on CUDA, not dry runs)")
    a("--seed", type=number(int, lambda v: 0 <= v < 2 ** 32, "in 0..4294967295"), default=HParams.seed,
      help="seeds the weights, the augmentations and the epochs' order")
    a("--out", type=path(), help="output directory (default: runs/<dataset>-<head>-<act>-<time>)")
    a("--resume", metavar="DIR", type=path(), help="continue the run saved in DIR")
    a("--dry-run", action="store_true", help="run every stage for a couple of steps on a few images")
    a("--subset", type=number(int, lambda v: v >= 2, "at least 2"), help="draw this many images of each split")
    a("--no-sync-bn", action="store_true", help="under torchrun: BatchNorm statistics per process, not global")
    a = p.add_argument_group("benchmark").add_argument
    a("--bench", action="store_true", help="img/s of this pipeline and the classic one, into --out/bench.json")
    a("--bench-steps", type=COUNT, default=20, help="timed steps per stage of --bench, after warm-up")
    a("--workers", type=NONNEGATIVE_INT, help="DataLoader workers of the classic pipeline (default: the cores)")
    a("--peak-tflops", type=POSITIVE, help="the device's bf16 peak, for the MFU (default: known for H100, H200, A100)")
    return p


def resolve_args(args):
    """The values computed from the flags, in one place: a typed flag wins over its recipe, a recipe over DATASETS,
    DATASETS over HParams."""
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    recipe, ds = RECIPES[args.recipe], DATASETS[args.dataset]
    if args.dataset == "folder" and args.device == "cpu":
        ds = {**ds, **FOLDER_ON_CPU}
    for key, default in dict(arch="resnet34", stem="auto", tau=HParams.tau, crop_min=HParams.crop_min, eval="standard",
                             precision="auto", stl10_pretrain="train+unlabeled", epochs=None).items():
        if getattr(args, key) is None:
            setattr(args, key, recipe.get(key, ds.get(key, default)))
    for flag, (key, value, why) in ONLY_FOR.items():  # a flag that would be ignored is refused
        if getattr(args, flag) not in (None, False) and getattr(args, key) != value:
            die(f"--{flag.replace('_', '-')} only applies to --{key} {value} ({why.format(getattr(args, flag))})")
    args.label_amounts = args.label_fractions or args.labels_per_class or []  # the few-labels stage's label sets
    if args.label_amounts and args.eval == "paper":
        die("--label-fractions / --labels-per-class draw train-split labels, which --eval paper (set by --recipe "
            "paper) does not probe on: add --eval standard")
    if args.head == "ae" and args.arch == "resnet50":
        die("--head ae needs a 512-d backbone for its AE, not resnet50's 2048-d: use --arch resnet34 or --head mlp")
    args.pretrained = args.pretrained or recipe.get("pretrained", False)
    if args.pretrained and args.arch == "resnet10":
        die("--pretrained (or --recipe paper): torchvision has no ImageNet weights for resnet10; use --arch resnet18, "
            "resnet34 or resnet50")
    args.decay_norm_and_bias = recipe["decay_norm_and_bias"]
    if args.img_size is None:
        args.img_size = folder_image_side(args.data_dir, ds["img"]) if args.dataset == "folder" else ds["img"]
    args.batch_size = args.batch_size or ds["batch"]
    args.ae_epochs = ds["ae_epochs"] if args.ae_epochs is None else args.ae_epochs
    if args.dry_run:
        args.batch_size, args.epochs, args.ae_epochs, args.probe_steps, args.sup_steps = 16, 1, 1, 5, 2
        args.subset = args.subset or 64
    if args.show_augs:  # the 8 images it draws, no more
        args.subset = 8
    if args.head == "ae":  # one width per head: d of the AE whose embedding is the ae head's first layer
        args.ae_dir, args.ae_dim = args.ae_dir or "runs/autoencoders", args.ae_dim or 512
    else:  # or the MLP's hidden width
        args.ae_epochs, args.proj_hidden = None, args.proj_hidden or 512
    N = args.batch_size  # SimCLR's B.1: the linear rule, or the square-root one (RECIPES), from a dataset's own rate
    lr0, N0 = (ds["lr"], ds["batch"]) if "lr" in ds and args.recipe == "simclr" else (HParams.lr, 256)
    args.lr = args.lr or lr0 * (N / N0 if recipe["lr_scaling"] == "linear" else math.sqrt(N / N0))
    if args.warmup_epochs is None:  # SimCLR warms up 10 epochs of 100 or more; a shorter run, a tenth of its epochs
        args.warmup_epochs = recipe.get("warmup_epochs", min(float(HParams.warmup_epochs), args.epochs / 10))
    if args.stem == "auto":  # ImageNet weights come with their stem: a 3x3 conv1 would start from random weights
        args.stem = "imagenet" if args.pretrained or args.img_size > 64 else "cifar"
    if args.precision == "auto":  # bf16 where the hardware computes it; not on a CPU where a stride-2 conv sees a 1x1
        tiny = args.img_size <= (16 if args.stem == "imagenet" else 4)  # map: oneDNN's bf16 backward is wrong (README)
        bf16 = args.device.startswith("cuda") or args.device == "cpu" and cpu_has_bf16() and not tiny
        args.precision = "bf16" if bf16 else "fp32"
    args.compile = args.compile == "on" or (args.compile == "auto" and args.device.startswith("cuda")
                                            and not args.dry_run)  # compiling takes minutes, a dry run seconds
    if args.workers is None:  # the cores this process may use (macOS lacks sched_getaffinity)
        args.workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if args.out is None:  # a dry run's: a temporary folder, removed at its end
        stamp = f"{args.dataset}-{args.head}-{args.act}-{time.strftime('%Y%m%d-%H%M%S')}"
        args.out = (os.path.join(tempfile.gettempdir(), f"{DRY_RUN}{stamp}-{os.getpid()}") if args.dry_run else
                    os.path.join("runs", ("bench-" if args.bench else "") + stamp))
    return args


DRY_RUN = "simclr-dry-run-"  # the name of a dry run's temporary --out


def forget_dry_run(out, log=print):
    """A dry run's outputs, named with their sizes, then removed: it showed that every stage runs, and keeps nothing."""
    files = sorted((os.path.getsize(os.path.join(d, f)), os.path.relpath(os.path.join(d, f), out))
                   for d, _, fs in os.walk(out) for f in fs if f != ".lock")
    log(f"dry run: wrote {', '.join(name for _, name in files)} ({sum(n for n, _ in files) / 2 ** 20:.1f} MB) into "
        f"{out}, now removed (--out DIR keeps them)")
    shutil.rmtree(out, ignore_errors=True)


RESUME_MAY_TYPE = {"resume", "out", "device", "show_neighbours"}  # name no setting: a resume may type them
MACHINE = {"precision", "compile", "workers"}  # resolved from the machine: a resume elsewhere resolves them anew


def differences(saved, args, source, ignore=frozenset()):
    """Each setting in which a saved config (a dict) differs from the run's args, resolved from `source`, named."""
    return [f"its {k} is {saved[k]!r}, {source} gives {v!r}" if k in saved else f"it has no {k}"
            for k, v in vars(args).items() if k not in MACHINE | RESUME_MAY_TYPE | ignore and saved.get(k, ...) != v]


def parse_args(argv):
    """The flags and the values computed from them; args.argv is the command line with the resolved --out and --device
    (and a folder's image side). --resume DIR parses DIR's saved one again, by every flag's rule, with the flags typed
    now; refused: a typed flag that changes a setting (but a new --lr or --tau after a stop on a non-finite loss), a
    config.json its command line does not give, a checkpoint saved with other settings."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume is None:
        args = resolve_args(args)
        folder = ["--img-size", str(args.img_size)] if args.dataset == "folder" else []
        args.argv = [*argv, "--out", args.out, "--device", args.device, *folder]
        return args
    cfg_path = os.path.join(args.resume, "config.json")
    if args.out is not None and os.path.abspath(args.out) != os.path.abspath(args.resume):
        die(f"--resume {args.resume} --out {args.out}: a resumed run goes on in its own folder; drop --out")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
        saved = [str(a) for a in cfg["argv"]]
    except (OSError, ValueError, KeyError, TypeError) as e:  # none, cut short, not an object, without argv
        die(f"--resume {args.resume}: {cfg_path} cannot be read ({type(e).__name__}: {e}); is it a run's folder?")
    parser.error = lambda msg: die(f"{cfg_path}: its command line: {msg}")  # every rule, as when it started
    old = resolve_args(parser.parse_args(saved))
    edited = differences(cfg, old, "its command line")
    if edited:
        die(f"{cfg_path}: {'; '.join(edited[:3])}: edited by hand? Put back what its command line gives. "
            "Written by another version of simclr.py? Start a new run")
    words = {a.split("=")[0] for a in argv}  # the flags typed now
    typed = {act.dest for act in parser._actions if words & set(act.option_strings)} - RESUME_MAY_TYPE
    diverged = os.path.join(args.resume, "diverged.json")  # after a stop on divergence, a new --lr or --tau may follow
    retune = typed & {"lr", "tau"} if os.path.exists(diverged) else set()
    old_raw = parser.parse_args(saved)
    parser.error = die  # the saved command line passed its rules: what breaks one now is a flag typed now
    new = parser.parse_args(saved + argv)
    changed = lambda new, old: [k for k in sorted(typed - retune) if getattr(new, k) != getattr(old, k)]
    # a flag the run was started with, typed with another value, is named as typed: resolved, it could first refuse
    # another flag of the saved run (--recipe simclr its --standardize)
    differ = [k for k in changed(new, old_raw) if getattr(old_raw, k) not in (None, False)]
    if not differ:
        new = resolve_args(new)
        differ = changed(new, old)
    if differ:
        die("--resume with flags that differ from the saved run:\n  " + "\n  ".join(
            f"--{k.replace('_', '-')}: saved {getattr(old, k)!r}, given {getattr(new, k)!r}" for k in differ) +
            f"\nA resume continues the run as {cfg_path} holds it: drop these flags, or start a new run with them")
    new.out = args.resume  # the folder as it is named now, which may have been moved or copied
    new.argv = saved + [a for k in sorted(retune) for a in (f"--{k}", repr(getattr(new, k)))]
    for stage in ("ae_checkpoint.pt", "checkpoint.pt"):  # before anything is read or rewritten
        check_saved_config(os.path.join(args.resume, stage), new)
    if retune:  # the run goes on from its last good checkpoint with the new values, saved in its config
        write_json(vars(new), cfg_path)
        os.remove(diverged)
    return new


# ----------------------------------------------------------------------------------------------------------
# Runs that can stop: files written whole or not at all, and an exact resume
# ----------------------------------------------------------------------------------------------------------

UMASK = os.umask(0o22)  # the process's umask, read (set and put back) once
os.umask(UMASK)
AE_SAVE_EVERY_S = 300  # between checkpoints of the autoencoder stage (up to ~0.8 GB at 128 px: not every epoch)


def rng_state():  # torch's generators draw every random number of a run
    return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])


def write_atomic(path, write):
    """write(f) to a temporary file, renamed to `path` once whole: no reader, nor a run killed mid-write, sees half."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp's 0600 would hide the file from the others sharing the folder
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # a full disk, a read-only folder: name the file, not the temporary one
        cause = e if isinstance(e, OSError) else e.__context__  # torch.save's zip writer: a RuntimeError after it
        if not isinstance(cause, OSError):
            raise
        raise OSError(cause.errno, cause.strerror, path) from e
    finally:
        if os.path.exists(tmp):  # the write failed
            os.remove(tmp)


def save_atomic(obj, path):
    write_atomic(path, lambda f: torch.save(obj, f))


def write_json(obj, path):
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def write_metrics(history, out):  # metrics.jsonl: a line per trained epoch, rewritten whole at each checkpoint
    lines = "".join(json.dumps(m) + "\n" for m in history)
    write_atomic(os.path.join(out, "metrics.jsonl"), lambda f: f.write(lines.encode()))


def resume_command(args, *flags):
    """The command that continues the run in args.out, each word quoted for the shell (a folder with spaces)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    start = ["torchrun", "--nproc_per_node", str(world)] if world > 1 else ["python"]
    return shlex.join([*start, "simclr.py", "--resume", args.out, *flags])


def open_run_dir(args, stack):
    """Create --out and lock it for the whole run (the lock goes with the process, even killed); a new run refuses a
    folder with a run. Under the lock no other run writes here: the temporary files of killed writes are removed."""
    os.makedirs(args.out, exist_ok=True)
    lock = stack.enter_context(open(os.path.join(args.out, ".lock"), "w"))
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        die(f"{args.out} is in use by another run of simclr.py; wait for it to end, or choose another --out")
    if not args.resume and not args.bench and os.path.exists(os.path.join(args.out, "config.json")):
        die(f"{args.out} already holds a run; continue it with: {resume_command(args)}, or choose another --out")
    for name in os.listdir(args.out):
        if re.fullmatch(r".+\.\w{8}\.tmp", name):  # write_atomic's temporary: mkstemp's 8 random characters
            os.remove(os.path.join(args.out, name))


def peek(path):
    """A checkpoint's contents, its tensors mapped from the file and not read; {} when it has none that can be read."""
    with contextlib.suppress(Exception):
        c = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return c if isinstance(c, dict) else {}
    return {}


def check_saved_config(path, args):
    """A checkpoint holds its run's config: one that differs from args (a config.json edited since, another run's
    checkpoint) stops the resume, naming each difference; an unreadable one is left to its stage's load."""
    c = peek(path).get("config")
    if not isinstance(c, dict):
        return
    saved = c.get("argv") or []
    ok = saved and args.argv[:len(saved)] == saved
    retuned = {"lr", "tau"} & {a[2:] for a in args.argv[len(saved)::2]} if ok else set()
    differ = differences(c, args, "config.json", retuned | {"argv"})
    if differ:
        die(f"{path}: {'; '.join(differ)}. The checkpoint holds the values it was saved with: put them back in "
            "config.json (edited by hand?), or, if the checkpoint comes from another run, delete it to start this "
            "stage again")


def save_checkpoint(path, state, rngs=None, **extra):
    """A stage's state (modules, optimizers, schedulers by their state dicts; values as they are) and RNG states."""
    save_atomic(dict({k: v.state_dict() if hasattr(v, "state_dict") else v for k, v in state.items()},
                     rng=rngs or [rng_state()], **extra), path)


def load_checkpoint(path, state, what, rank=0, check=lambda c: None):
    """`state` and this process's RNG from `path` if it exists (and whether it does); a file that cannot be read, or
    that check(checkpoint) refuses, stops the run in one line."""
    if not os.path.exists(path):
        return False
    try:
        c = torch.load(path, map_location="cpu", weights_only=False)  # RNG states must stay on the CPU
        check(c)
        for k, v in state.items():
            if hasattr(v, "load_state_dict"):
                v.load_state_dict(c[k])
            else:
                state[k] = c[k]
        torch.set_rng_state(c["rng"][rank]["torch"])
        if c["rng"][rank]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(c["rng"][rank]["cuda"])
    except Exception as e:  # cut short, another model's, not a checkpoint of this simclr.py
        die(f"cannot resume {what} from {path}: the file is corrupt or from another model ({type(e).__name__}: "
            f"{str(e)[:300]}). Delete it to start {what} again.")
    return True


def resume_checkpoint(model, args, proc):
    """The run's training state (model, optimizer, epochs trained, their metrics, the paper's best backbone); with
    --resume, checkpoint.pt's, and metrics.jsonl rewritten from it (a killed run may lack a line)."""
    state = dict(model=model, optimizer=optimizer(model, args), epoch=0, metrics=[], best_backbone=None)
    path = os.path.join(args.out, "checkpoint.pt")

    def check(c):
        if not (type(c["epoch"]) is int and 0 <= c["epoch"] <= args.epochs and len(c["metrics"]) == c["epoch"]):
            raise ValueError(f"epoch {c['epoch']!r} of {args.epochs} with {len(c['metrics'])} epochs' metrics")
        if len(c["rng"]) != proc.world:  # every process has its own augmentation stream
            die(f"{path} was saved by {len(c['rng'])} process(es) and is resumed by {proc.world}; resume it with " +
                (f"torchrun --nproc_per_node {len(c['rng'])}" if len(c["rng"]) > 1 else "python, not torchrun"))
    if args.resume and load_checkpoint(path, state, "the run", proc.rank, check):
        proc.log(f"resumed {path} at epoch {state['epoch']}")
    if args.resume and proc.rank == 0:
        write_metrics(state["metrics"], args.out)
    return state


def autoencoder_checkpoint(path, epochs, log=print, **extra):
    """train_autoencoder's resume(s) and save(s): its state s in `path` (with `extra`: the run's config) after the last
    epoch and every AE_SAVE_EVERY_S seconds; a restarted stage ends as one never stopped."""
    last_save = [time.time()]

    def resume(s):
        if load_checkpoint(path, s, "the autoencoder"):
            log(f"autoencoder: resumed {path} at epoch {s['epoch']}")

    def save(s):
        if s["epoch"] == epochs or time.time() - last_save[0] > AE_SAVE_EVERY_S:
            save_checkpoint(path, s, **extra)
            last_save[0] = time.time()
    return dict(resume=resume, save=save)


# ----------------------------------------------------------------------------------------------------------
# Devices, precision and torch.compile
# ----------------------------------------------------------------------------------------------------------

def setup(args):
    """This process: its device (checked), rank and world (torchrun's RANK, WORLD_SIZE), log (rank 0's), the seed."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        die(f"--device {args.device}: not a device; use cuda, cuda:N, mps or cpu")
    if not dict(cuda=torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count(),
                mps=torch.backends.mps.is_available(), cpu=True).get(device.type, False):
        die(f"--device {args.device}: this machine has no such device; " +
            (f"{resume_command(args, '--device', 'cpu')} continues the run here" if args.resume else
             "use --device cpu"))
    if world > 1:
        if args.recipe == "paper" or args.bench:  # the paper's code: one device, each view's own BatchNorm statistics
            die(f"{'--bench runs' if args.bench else '--recipe paper trains'} in one process, as the paper's code: "
                "start it with python, not torchrun")
        if args.batch_size % world:
            die(f"--batch-size {args.batch_size} must be divisible by the {world} processes")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        # a long timeout: the other processes wait while rank 0 decodes the data and trains the autoencoder
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=3))
    torch.backends.cudnn.benchmark = device.type == "cuda"
    torch.manual_seed(args.seed)
    return types.SimpleNamespace(device=device, rank=rank, world=world, log=print if rank == 0 else lambda *a: None)


def cpu_has_bf16():
    """Whether this CPU computes bf16 dot products natively; without that, autocast to bf16 is slower than fp32."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:  # not Linux: False
        return any(flag in f.read() for flag in ("avx512_bf16", "amx_bf16"))
    return False


def autocast_for(device, precision):
    """Precision in one place: bf16 autocast (convolutions and matmuls in bf16, the rest in fp32), or plain fp32."""
    if precision == "fp32" or device.type not in ("cuda", "cpu"):
        return nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def try_compile(fn, example, name, model=None, amp=nullcontext, log=print):
    """torch.compile(fn), compiled now by a call (and a backward) on `example`, or fn with a warning if that fails.
    The trial leaves no trace: the RNG forked; `model`'s weights, BatchNorm statistics and gradients put back."""
    log(f"torch.compile: compiling {name} (once; this can take a minute or two)")
    compiled = torch.compile(fn)
    saved = copy.deepcopy(model.state_dict()) if model is not None else None
    try:
        with torch.random.fork_rng(devices=[example.device] if example.device.type == "cuda" else []):
            for f in (fn, compiled):
                with amp():
                    out = f(example)
                if out.requires_grad:
                    out.float().square().mean().backward()
    except Exception as e:  # compile errors surface at the first call, as many different exception types
        log(f"warning: torch.compile failed ({type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}); "
            "running without it")
        compiled = fn
    if model is not None:
        model.load_state_dict(saved)
        model.zero_grad(set_to_none=True)
    return compiled


def channels_last(x):
    """Images (N, C, H, W) in the (N, H, W, C) memory layout of the model's weights, where oneDNN's and cuDNN's
    convolutions are fastest; on other devices (MPS) as they are."""
    return x.contiguous(memory_format=torch.channels_last) if x.device.type in ("cuda", "cpu") else x


def step_functions(forward, model, example, args, amp, log=print, prep=normalize):
    """What each step calls, views_fn (uint8 (N, 3, H, W) -> (2N, 3, H, W)) and forward, each compiled with --compile
    or falling back to eager on its own; and which were."""
    eager = lambda x: channels_last(two_views(x, args, prep))
    views_fn, compiled = eager, forward
    if args.compile:  # fuses the augmentation's many elementwise passes into a few kernels, and the model's
        views_fn = try_compile(eager, example, "the augmentation", log=log)
        views = channels_last(torch.zeros(2 * len(example), *example.shape[1:], device=example.device))  # (2N, 3, H, W)
        compiled = try_compile(forward, views, "the model", model=model, amp=amp, log=log)
    return views_fn, compiled, dict(augmentation=views_fn is not eager, model=compiled is not forward)


# ----------------------------------------------------------------------------------------------------------
# Multi-GPU (torchrun): every process augments its share of each batch; the loss and BatchNorm see the global batch
# ----------------------------------------------------------------------------------------------------------

def global_forward(forward, rank, world):
    """forward(views) -> z of the global batch (2N, out), view 1 of every process's images then view 2, with gradient:
    NT-Xent sees every process's negatives (Sec. 2.2 of SimCLR), and DDP's mean gradient is the global loss's."""
    def gather(z):  # (n, D) -> (world n, D): its rows at its offset, zeros elsewhere, summed over the processes
        return dist_nn.all_reduce(F.pad(z, (0, 0, rank * len(z), (world - rank - 1) * len(z))))  # backward: a sum
    return lambda views: torch.cat([gather(z) for z in forward(views).chunk(2)])


def sync_batchnorm(model, device):
    """Global BatchNorm under torchrun (Sec. 2.2 of SimCLR: per-process statistics are a cue the loss can use); torch's
    SyncBatchNorm is GPU-only, on CPUs (gloo) SyncBatchNormCPU."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for m in model.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = SyncBatchNormCPU  # the same parameters and buffers, another forward
    return model


class SyncBatchNormCPU(nn.BatchNorm2d):
    """BatchNorm2d over the global batch for CPU processes: the per-channel mean and variance from one all_reduce."""

    def forward(self, x):  # x (n, C, H, W), this process's part of the global batch
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)  # eval mode: the running statistics
        C, xf = x.shape[1], x.float()
        count = torch.full((1,), xf.numel() / C, dtype=torch.float32)  # values per channel here
        sums = dist_nn.all_reduce(torch.cat([xf.sum((0, 2, 3)), xf.square().sum((0, 2, 3)), count]))  # (2C + 1,)
        n = sums[-1]
        mean, mean_sq = (sums[:-1] / n).view(2, C)  # E[x], E[x^2] per channel
        var = mean_sq - mean.square()  # biased: what the batch is normalised with
        with torch.no_grad():  # running statistics as BatchNorm keeps them (unbiased variance)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
            self.num_batches_tracked += 1
        y = (xf - mean.view(1, C, 1, 1)) * torch.rsqrt(var + self.eps).view(1, C, 1, 1)
        return (y * self.weight.view(1, C, 1, 1) + self.bias.view(1, C, 1, 1)).to(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# Datasets at scale: every dataset becomes uint8 tensors (n, 3, H, W), decoded once, on the device when they fit
# ----------------------------------------------------------------------------------------------------------

FASHION_MNIST_LOCAL = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist package
EXPECTED_FILES = {  # where each dataset's files go under --data-dir when torchvision cannot download them
    "stl10": "stl10_binary/{train_X,train_y,test_X,test_y,unlabeled_X}.bin  (from stl10_binary.tar.gz)",
    "cifar10": "cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}  (from cifar-10-python.tar.gz)",
    "cifar100": "cifar-100-python/{train,test,meta}  (from cifar-100-python.tar.gz)",
    "imagenette": "imagenette2-160/{train,val}/<wnid>/*.JPEG  (from imagenette2-160.tgz; --recipe paper: the "
                  "full-size imagenette2/, from imagenette2.tgz)",
    "fgvc-aircraft": "fgvc-aircraft-2013b/data/{images/*.jpg,images_manufacturer_{trainval,test}.txt,"
                     "manufacturers.txt}",
    "fashion-mnist": "FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte  (un-gzipped)",
    "folder": "train/<class>/*.png|jpg and test/<class>/*.png|jpg",
}


def load_dataset(name, root, size, download=True, stl10_pretrain="train+unlabeled", seed=0, subset=None,
                 paper=False):
    """dict(pretrain, train_x, train_y, test_x, test_y, classes) of uint8 images (n, 3, size, size), train_x the first
    rows of pretrain; `subset`: a stratified draw of that many per split; `paper`: the paper's (square) images."""
    if name == "shapes":
        train_x, train_y = make_shapes(subset or SHAPES["n"][0], size, seed=seed)
        test_x, test_y = make_shapes(subset or SHAPES["n"][1], size, seed=seed + 10_000)  # another seed: unseen
        return dict(pretrain=train_x, train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, classes=10)
    data = read_dataset(name, root, size, download, stl10_pretrain, paper)
    unlabeled, n_train, C = data.pop("unlabeled"), len(data["train_y"]), data["classes"]
    for split in ("train", "test"):  # else the run would stop after training
        x, y = data[f"{split}_x"], data[f"{split}_y"]
        if len(x) != len(y):  # two files, each whole, of two splits (or two downloads)
            die(f"--dataset {name}: its {split} split holds {len(x)} images but {len(y)} labels: put the files of one "
                f"split at {os.path.join(root, EXPECTED_FILES[name])}")
        if ((y < 0) | (y >= C)).any():
            die(f"--dataset {name}: its {split} labels hold {int(y[(y < 0) | (y >= C)][0])}, outside 0..{C - 1}: put "
                f"its own label files in {root}")
    if subset:
        gen = torch.Generator().manual_seed(seed)
        for split in ("train", "test"):
            idx = stratified(data[f"{split}_y"], subset, gen)
            data[f"{split}_x"], data[f"{split}_y"] = data[f"{split}_x"][idx], data[f"{split}_y"][idx]
        if unlabeled is not None:  # STL10's unlabeled images: the train split's share of them
            keep = round(len(unlabeled) * len(data["train_y"]) / n_train)
            unlabeled = unlabeled[torch.randperm(len(unlabeled), generator=gen)[:keep].sort()[0]]
    if data["train_x"].shape[-1] != size:  # e.g. --img-size 64 on CIFAR: resized once here, not in every step
        rs = lambda x: None if x is None else torchvision.transforms.v2.functional.resize(x, [size] * 2, antialias=True)
        data["train_x"], data["test_x"], unlabeled = rs(data["train_x"]), rs(data["test_x"]), rs(unlabeled)
    pretrain = data["train_x"] if unlabeled is None else torch.cat([data["train_x"], unlabeled])
    return dict(data, pretrain=pretrain, train_x=pretrain[:len(data["train_y"])])


def stratified(y, n, gen, floor=0):
    """Sorted indices of a seeded draw of n of the labels y in which every class keeps its share (and at least `floor`
    images): image k (from 0) of class c's shuffle comes at (k + 1/2) / count_c, the Sainte-Lague order, so that a
    class is within one image of its share and a larger draw holds every smaller one."""
    classes, counts = y.unique(return_counts=True)
    shuffled = [torch.nonzero(y == c).squeeze(1)[torch.randperm(int(m), generator=gen)]
                for c, m in zip(classes, counts)]
    at = torch.cat([torch.where(torch.arange(int(m)) < floor, -1.0, (torch.arange(int(m)) + 0.5) / m) for m in counts])
    return torch.cat(shuffled)[at.argsort(stable=True)[:n]].sort().values


def read_dataset(name, root, size, download, stl10_pretrain, paper=False):
    """A dataset from its files: dict(train_x, train_y, test_x, test_y, classes, unlabeled: STL10's extra or None)."""
    def tv(cls, **kw):  # a torchvision dataset; a failed download or a missing file says which files go where
        try:
            return cls(root, download=download, **kw)
        except Exception as e:  # URLError, RuntimeError("Dataset not found"), checksum errors...
            die(f"could not load {name} from '{root}' ({type(e).__name__}: {e}).\nWithout internet, put the files at "
                f"{os.path.join(root, EXPECTED_FILES[name])} and run with --no-download.")
    D, t = torchvision.datasets, torch.as_tensor
    keys = ("train_x", "train_y", "test_x", "test_y", "classes", "unlabeled")
    if name in ("cifar10", "cifar100"):
        tr, te = (tv(D.CIFAR10 if name == "cifar10" else D.CIFAR100, train=b) for b in (True, False))
        x, y, unlabeled = lambda ds: t(ds.data).permute(0, 3, 1, 2).contiguous(), lambda ds: t(ds.targets), None
    elif name == "stl10":  # the standard protocol pre-trains on train + unlabeled, the paper on train only
        tr, te = (tv(D.STL10, split=s) for s in ("train", "test"))
        x, y = lambda ds: t(ds.data), lambda ds: t(ds.labels).long()  # (n, 3, 96, 96)
        unlabeled = t(tv(D.STL10, split="unlabeled").data) if stl10_pretrain == "train+unlabeled" else None
    elif name == "fashion-mnist":
        raw = os.path.join(root, "FashionMNIST", "raw")
        for f in (f"{s}-{k}-ubyte" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")):
            path = os.path.join(raw, f)
            problem = idx_problem(path, int(f[-7])) if os.path.exists(path) else "is missing"  # idx3: 3 dims
            if problem and os.path.isdir(FASHION_MNIST_LOCAL):  # Debian's package: un-gzipped once into --data-dir
                os.makedirs(raw, exist_ok=True)
                with gzip.open(os.path.join(FASHION_MNIST_LOCAL, f + ".gz")) as src:
                    write_atomic(path, lambda out: shutil.copyfileobj(src, out))
            elif problem and os.path.exists(path):
                die(f"{path} {problem}; delete it, then put the right file there, whole, or run without --no-download")
        tr, te = (tv(D.FashionMNIST, train=b) for b in (True, False))
        x = lambda ds: ds.data.unsqueeze(1).expand(-1, 3, -1, -1).contiguous()  # (n, 28, 28) -> (n, 3, 28, 28)
        y, unlabeled = lambda ds: ds.targets, None
    if name in ("cifar10", "cifar100", "stl10", "fashion-mnist"):  # arrays: (n, 3, H, W) uint8 at once
        return dict(zip(keys, (x(tr), y(tr), x(te), y(te), 100 if name == "cifar100" else 10, unlabeled)))
    # JPEGs take minutes to decode: once, into a cache that later runs (and the other torchrun processes) read
    cache = os.path.join(root, f"{name}-{size}px" + ("-paper" if paper else "") +
                         (f"-{folder_key(root)}" if name == "folder" else "") + ".pt")
    if os.path.exists(cache):
        try:
            data = torch.load(cache)
            return {k: data[k] for k in keys}
        except Exception as e:  # cut short (EOFError, UnpicklingError...), another version's (KeyError)
            print(f"note: the cache {cache} cannot be read ({type(e).__name__}: {str(e)[:100]}); decoding again")
    tr, te = ([tv(D.Imagenette, split=s, size="full" if paper else "160px") for s in ("train", "val")]
              if name == "imagenette" else
              [tv(D.FGVCAircraft, split=s, annotation_level="manufacturer") for s in ("trainval", "test")]
              if name == "fgvc-aircraft" else load_folder(root))
    banner = 20 if name == "fgvc-aircraft" else 0  # the paper crops FGVC-Aircraft's copyright banner off
    (train_x, train_y), (test_x, test_y) = (pil_to_uint8(ds, size, banner, paper) for ds in (tr, te))
    missing = [c for i, c in enumerate(tr.classes) if not (train_y == i).any()]
    if missing:  # every image of the class failed to decode: a probe would be trained without it
        die(f"--dataset {name}: no train image of class {missing[0]!r} can be decoded ({len(missing)} such classes); "
            f"mend or remove its images")
    data = dict(zip(keys, (train_x, train_y, test_x, test_y, len(tr.classes), None)))
    try:
        save_atomic(data, cache)
    except OSError as e:  # a read-only data directory
        print(f"note: could not cache the decoded images at {cache} ({e}); the next run decodes them again")
    return data


def idx_problem(path, ndim):
    """What is wrong with an idx file of `ndim` dimensions (bytes 0, 0, 8, ndim, each dimension a big-endian uint32,
    then a byte per value), or '' when it holds the items and every byte its header promises."""
    with open(path, "rb") as f:
        head = f.read(4 + 4 * ndim)
    magic, size = bytes([0, 0, 8, ndim]), os.path.getsize(path)
    if not magic.startswith(head[:4]):  # Fashion-MNIST's images are (n, 28, 28), its labels (n,)
        swapped = {b"\x01": " (a labels file?)", b"\x03": " (an images file?)"}.get(head[3:4], "")
        return f"is not an idx file of {ndim}-d bytes (it starts {head[:4].hex()}, not {magic.hex()}){swapped}"
    if len(head) < 4 + 4 * ndim:
        return "is cut short inside its header"
    dims = [int.from_bytes(head[i:i + 4], "big") for i in range(4, len(head), 4)]
    expected = len(head) + math.prod(dims)
    if size != expected:
        return f"is {'cut short' if size < expected else 'longer than its header says'} ({size} bytes, not {expected})"
    return "" if dims[0] else "holds no items"


def pil_to_uint8(ds, size, banner=0, square=False):
    """RGB PIL images into (n, 3, size, size) uint8 and labels: `banner` bottom rows dropped, the short side resized
    and centre-cropped (`square`: resized whole, as the paper's code does); one that cannot be decoded or whose resize
    would exceed PIL's bound on pixels is skipped and named."""
    TF, xs, ys, small, bad = torchvision.transforms.v2.functional, [], [], 0, []
    for i in range(len(ds)):
        try:
            img, label = ds[i]
            pixels = size * size * max(img.size) / min(img.size)  # of the resize below (PIL's bound counts the file's)
            if not square and pixels > (PIL.Image.MAX_IMAGE_PIXELS or math.inf):
                raise PIL.Image.DecompressionBombError(f"{img.width}x{img.height} px, resized to {size} px on its "
                                                       f"short side, would be {3 * pixels / 1e9:.3g} GB")
        except Exception as e:  # cut short, not an image, a decompression bomb: skipped and named
            bad.append(f"{ds.samples[i][0] if hasattr(ds, 'samples') else f'image {i}'} ({e})")
            continue
        small += min(img.size) < size
        t = TF.pil_to_tensor(img)[:, :img.height - banner]  # (3, H, W) uint8
        xs.append(TF.center_crop(TF.resize(t, [size, size] if square else size, antialias=True), size))
        ys.append(label)
    if bad:
        print(f"note: skipped {len(bad)} of {len(ds)} images that cannot be decoded (or are too large), e.g. {bad[0]}")
    if small:
        print(f"note: {small} of {len(ys)} images are smaller than {size}px, upscaled (a lower --img-size keeps them)")
    if not xs:
        die("the dataset holds no images that can be decoded" + (f", e.g. {bad[0]}" if bad else ""))
    return torch.stack(xs), torch.tensor(ys)


def open_image(path):
    """ImageFolder's loader, with 16/32-bit and float images scaled to 8 bits first (PIL's conversion clips them)."""
    with open(path, "rb") as f:
        img = PIL.Image.open(f)
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # integers by 16 bits' range, floats in [0, 1] by 255
            a = np.asarray(img, dtype=np.float64)
            a = a / 257 if img.mode != "F" else a * 255 if a.max() <= 1 else a
            img = PIL.Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))
        return img.convert("RGB")  # grayscale, palette and RGBA images too


def folder_image_side(root, largest):
    """--dataset folder without --img-size: the median short side of (up to 1,000 of) its train images, at most
    `largest`, so that small images are not upscaled into a slow run that learns nothing new."""
    sides = []
    for path in folder_files(root, ("train",))[:1000]:  # PIL reads the header only; what is not an image, loading names
        with contextlib.suppress(Exception), PIL.Image.open(path) as img:
            sides.append(min(img.size))
    return max(8, min(largest, int(np.median(sides)))) if sides else largest


def folder_files(root, splits=("train", "test")):
    """The files under root/<split>, links followed as ImageFolder follows them; a folder reached twice stops the run:
    a link back up (cat/loop -> ..) reads its images again and again, a test class linked to a train one tests on it."""
    seen, files = {}, []
    for split in splits:
        for dirpath, _, names in os.walk(os.path.join(root, split), followlinks=True):
            real = os.path.realpath(dirpath)
            if real in seen:
                die(f"--dataset folder: {dirpath} is {seen[real]} again, through a link; remove the link")
            seen[real] = dirpath
            files += [os.path.join(dirpath, f) for f in names]
    return files


def folder_key(root):
    """A folder's cache key: its path, number of files and newest modification time (a changed image: a new cache)."""
    files = folder_files(root)
    newest = max((os.stat(f).st_mtime for f in files if os.path.exists(f)), default=0.0)  # not a link to nothing
    return hashlib.sha1(f"{os.path.abspath(root)}|{len(files)}|{newest}".encode()).hexdigest()[:12]


def load_folder(root):
    """--dataset folder: root/train/<class>/* and root/test/<class>/*, read with torchvision's ImageFolder."""
    try:
        tr, te = (torchvision.datasets.ImageFolder(os.path.join(root, s), loader=open_image) for s in ("train", "test"))
    except OSError as e:  # no such folder, no class folder, one without an image it reads, one that cannot be read
        die(f"--dataset folder: {e}. --data-dir needs train/<class>/<images> and test/<class>/<images>: put images "
            "into every class folder, or remove the empty ones")
    if len(tr.classes) < 2 or tr.classes != te.classes:
        die(f"--dataset folder: train/ holds the classes {tr.classes}, test/ {te.classes}; a classifier needs the same "
            "classes, at least 2, in both")
    return tr, te


def where_data_fits(nbytes, device, data_on="auto"):
    """'device' or 'host' for the uint8 images; auto: the device when they take at most half its free memory."""
    if data_on == "auto":  # the other half is for the model's activations
        data_on = "host" if device.type == "cuda" and nbytes > torch.cuda.mem_get_info(device)[0] / 2 else "device"
    return data_on


def prepare_data(args, proc):
    """dict(images, train_x, train_y, val_x, test_x, test_y, classes, prep, pool) on the device or in host memory:
    images, what SimCLR pre-trains on; val_x, the paper's validation images (else None); prep, each split's input
    preparation; pool, the pre-training images before the paper's 90% was cut (recipe simclr's autoencoder's)."""
    t0, device = time.time(), proc.device
    if proc.rank != 0:
        dist.barrier()  # rank 0 first: it downloads, un-gzips and decodes into the caches the others then read
    data = load_dataset(args.dataset, args.data_dir, args.img_size, not args.no_download, args.stl10_pretrain,
                        args.seed, args.subset, paper=args.recipe == "paper")
    if proc.world > 1 and proc.rank == 0:
        dist.barrier()
    on_device = where_data_fits(data["pretrain"].nbytes + data["test_x"].nbytes, device, args.data_on) == "device"
    images, test_x = (data[k].to(device) if on_device else data[k] for k in ("pretrain", "test_x"))
    pool, train_x, val_x = images, images[:len(data["train_y"])], None
    if args.recipe == "paper":  # the paper's code: 90% of the train split pre-trained on, 10% for the validation loss
        (fit, val), held_out = val_split(len(pool)), pool
        if args.dataset in PAPER_VALIDATES_ON_TEST:  # its 10% of the split it loads as "val": the test images
            val, held_out = val_split(len(test_x))[1], test_x
        images, val_x = images[fit.to(images.device)], held_out[val.to(held_out.device)]
    proc.log(f"data: {args.dataset}, {len(images)} pre-training" + (f" + {len(val_x)} validation" if args.recipe ==
             "paper" else "") + f" / {len(train_x)} train / {len(test_x)} test images of {args.img_size}px, "
             f"{data['classes']} classes, {(images.nbytes + test_x.nbytes) / 2 ** 30:.2f} GiB " +
             (f"on {device}" if on_device else f"in host memory, copied to {device}") + f" ({time.time() - t0:.1f}s)")
    n, a, b = paper_split(len(test_x), args.batch_size)
    smallest = int(data["train_y"].unique(return_counts=True)[1].min())
    if len(images) < args.batch_size and not args.show_augs:  # --show-augs shows 8 and trains on none
        die(f"--batch-size {args.batch_size} is larger than the {len(images)} pre-training images")
    if args.eval == "paper" and min(a, b - a, n - b) < 1:
        die(f"--eval paper splits {n} test images 70/10/20 and one part is empty; it needs at least 7 (or use "
            f"--eval standard)")
    if args.labels_per_class and max(args.label_amounts) > smallest:
        die(f"--labels-per-class {max(args.label_amounts)}: the smallest class has {smallest} train images")
    return dict(images=images, val_x=val_x, train_x=train_x, test_x=test_x, pool=pool, classes=data["classes"],
                train_y=data["train_y"].to(device), test_y=data["test_y"].to(device),
                prep=input_preps(args, pool, test_x))


def input_preps(args, pool, test_x):
    """Each split's input preparation: ImageNet's statistics (recipe simclr), ToTensor's [0, 1] (recipe paper), or with
    --standardize the paper's per-channel mean of each image's mean and std over a whole split (it unwraps Subsets)."""
    if args.recipe != "paper":
        return dict.fromkeys(("images", "val_x", "train_x", "test_x"), normalize)
    unit = functools.partial(normalize, mean=(0, 0, 0), std=(1, 1, 1))  # ToTensor's values as they are

    def stats(x):  # per image and channel over H x W, 1,000 images (b, 3, H, W) at a time; then their mean
        m, s = (sum(f(b.double() / 255, (2, 3)).sum(0) for b in x.split(1000)) / len(x)
                for f in (torch.mean, torch.std))
        return functools.partial(normalize, mean=m.tolist(), std=s.tolist())
    train, test = (stats(pool), stats(test_x)) if args.standardize else (unit, unit)
    val = test if args.dataset in PAPER_VALIDATES_ON_TEST else train
    return dict(images=train, val_x=val, train_x=train, test_x=test)


# ----------------------------------------------------------------------------------------------------------
# The paper's protocol (--eval paper): its probe, on a split of the test set's features
# ----------------------------------------------------------------------------------------------------------

def paper_probe(train_h, train_y, val_h, val_y, test_h, test_y, classes, epochs=50, batch=32, lr=1e-3, seed=42):
    """The paper's linear probe as its code runs it (Sec. 4 of 2408.14514): nn.Linear on the raw features (its
    FeatureDataset hands f(x) to it), plain SGD, ReduceLROnPlateau(factor 0.1, patience 10) on the last batch's
    training loss, the epoch of lowest validation loss tested. Returns its test top-1."""
    gen = torch.Generator().manual_seed(seed)
    clf = nn.Linear(train_h.shape[1], classes)
    bound = 1 / math.sqrt(train_h.shape[1])  # nn.Linear's default init, drawn from our own generator
    for p in clf.parameters():
        nn.init.uniform_(p, -bound, bound, generator=gen)
    clf = clf.to(train_h.device)
    opt = torch.optim.SGD(clf.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=10)
    best, top1 = float("inf"), float("nan")  # a probe whose validation loss is never finite tests nothing
    for epoch in range(epochs):
        with torch.enable_grad():
            for idx in torch.randperm(len(train_h), generator=gen).to(train_h.device).split(batch):
                loss = F.cross_entropy(clf(train_h[idx]), train_y[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        sched.step(loss.item())  # what Lightning hands it: the last step's logged train_loss, not the epoch's mean
        with torch.no_grad():
            val_loss = F.cross_entropy(clf(val_h), val_y).item()
            if val_loss < best:  # tested now: the weights the paper's code would reload at the end
                best, top1 = val_loss, (clf(test_h).argmax(1) == test_y).float().mean().item()
    return top1


def paper_split(n, batch=None):
    """(n, a, b): the n test images filling whole batches (the paper's loader drops the last), cut 70/10/20 at a, b as
    the paper's random_split cuts them: each part floored, the remainder added one by one from the first part on."""
    n = (n // batch * batch or n) if batch else n
    parts = [math.floor(n * f) for f in (0.7, 0.1, 0.2)]
    for i in range(n - sum(parts)):
        parts[i % 3] += 1
    return n, parts[0], parts[0] + parts[1]


def evaluate(train_h, train_y, test_h, test_y, classes, protocol="standard", probe_steps=200, knn_k=200, batch=None):
    """Linear and kNN top-1: 'standard', Part 1's probes; 'paper' (Sec. 4 of the paper), its probe and the kNN on the
    test features split 70/10/20 with seed 42, trained on the 70%, the epoch picked on the 10%, tested on the 20%."""
    if protocol == "standard":
        return probes(train_h, train_y, test_h, test_y, classes, probe_steps, knn_k)
    n, a, b = paper_split(len(test_h), batch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(42)).to(test_h.device)
    (tr_h, tr_y), (va_h, va_y), (te_h, te_y) = ((test_h[i], test_y[i]) for i in (perm[:a], perm[a:b], perm[b:]))
    return dict(linear_top1=paper_probe(tr_h, tr_y, va_h, va_y, te_h, te_y, classes),
                knn_top1=knn_top1(tr_h, tr_y, te_h, te_y, classes, knn_k))


# ----------------------------------------------------------------------------------------------------------
# The stages of a run: the autoencoder, the model, pre-training with the machinery, evaluation
# ----------------------------------------------------------------------------------------------------------

def autoencoder_cache(args):
    """The autoencoder's file in --ae-dir, named by every setting that changes the images it sees or its weights."""
    key = [args.dataset, args.img_size, args.ae_dim, args.ae_epochs, args.seed, args.subset, args.recipe == "paper",
           args.stl10_pretrain * (args.dataset == "stl10"), os.path.abspath(args.data_dir) * (args.dataset == "folder")]
    name = f"ae-{args.dataset}-d{args.ae_dim}-{hashlib.sha1(repr(key).encode()).hexdigest()[:12]}.pt"
    return os.path.join(args.ae_dir, name)


def autoencoder_embedding(data, args, proc):
    """The ae head's first layer: the embedding of an autoencoder trained on the train split (recipe paper: on SimCLR's
    90%) by rank 0 and sent to all, or read from its cache in --ae-dir."""
    images, val_images = (data["pool"], None) if data["val_x"] is None else (data["images"], data["val_x"])
    ae, path, log, cached = AutoEncoder(images[0].numel(), args.ae_dim), autoencoder_cache(args), proc.log, False
    if os.path.exists(path) and not args.dry_run:  # a dry run trains a tiny one of its own, never cached
        try:
            ae.load_state_dict(torch.load(path, map_location="cpu"))
            cached = True
            log(f"autoencoder: reusing {path}")
        except Exception as e:  # cut short, or not an autoencoder of this shape
            log(f"note: the cached autoencoder {path} cannot be read ({type(e).__name__}); training it again")
    if not cached and proc.rank == 0:
        ckpt = autoencoder_checkpoint(os.path.join(args.out, "ae_checkpoint.pt"), args.ae_epochs, log,
                                      config=vars(args))
        ae, mse = train_autoencoder(images, args.ae_dim, args.ae_epochs, proc.device, val_images, log=log, **ckpt)
        log(f"autoencoder: best validation MSE {mse:.5f}")
        try:
            if not args.dry_run:
                os.makedirs(args.ae_dir, exist_ok=True)
                save_atomic(ae.state_dict(), path)
        except OSError as e:  # the run has its autoencoder: only the cache is lost
            log(f"note: could not cache the autoencoder at {path} ({e.strerror}); the next run trains it again")
    if proc.world > 1:
        ae = ae.to(proc.device)
        for p in ae.embedding.parameters():
            dist.broadcast(p.data, src=0)  # rank 0's embedding, to every process
    return ae.embedding


def build_model(args, embedding, proc):
    """z = g(f(x)) on the device, with global BatchNorm under torchrun."""
    try:
        backbone = make_backbone(args.arch, args.stem, args.pretrained)
    except Exception as e:  # no internet for the weights
        die(f"could not get torchvision's ImageNet weights for {args.arch} ({e}); run without --pretrained (implied "
            f"by --recipe paper) or put the weights file in {torch.hub.get_dir()}/checkpoints/")
    hidden = args.proj_hidden if embedding is None else embedding
    head = projection_head(2048 if args.arch == "resnet50" else 512, hidden, args.proj_out, args.act,
                           freeze=not args.no_freeze)
    model = SimCLR(backbone, head)
    model = (sync_batchnorm(model, proc.device) if proc.world > 1 and not args.no_sync_bn else model).to(proc.device)
    return model.to(memory_format=torch.channels_last) if proc.device.type in ("cuda", "cpu") else model


def sgd_step(forward, views, opt, tau, amp=nullcontext):
    """Part 1's step for any forward (views -> z: compiled, under DDP and gathered, each view alone) and precision:
    z, NT-Xent (fp32, outside autocast), backward, SGD step. Returns the loss on the device."""
    with amp():
        z = forward(views)  # (2N, out), the global batch's under torchrun
    N = len(z) // 2
    loss = nt_xent(z[:N], z[N:], tau)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


PROGRESS_EVERY_S = 60  # between progress lines inside an epoch


def fmt_time(s):
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m" if s >= 3600 else f"{int(s // 60)}m{int(s % 60):02d}s"


def pretrain(data, args, proc, state):
    """Part 1's train() with the machinery: bf16 autocast, torch.compile, DDP with each process's share of a batch and
    the global loss, the paper's recipe, a resumed state, progress inside long epochs, end_of_epoch after each. With
    all of it off, Part 1's weights bit for bit (a test checks). Returns the pre-training seconds."""
    model, opt, device, world, log = state["model"], state["optimizer"], proc.device, proc.world, proc.log
    amp = autocast_for(device, args.precision)
    images = data["images"][:2 * args.batch_size] if args.dry_run else data["images"]  # a dry run: two steps
    N, steps = args.batch_size, len(images) // args.batch_size
    forward = model if world == 1 else nn.parallel.DistributedDataParallel(  # averages the processes' gradients
        model, device_ids=None if device.index is None else [device.index])
    if args.recipe == "paper":  # the paper's code passes each view through the backbone on its own: BatchNorm's
        whole = forward          # statistics are those of one view's batch, not of the 2N views together
        forward = lambda views: torch.cat([whole(half) for half in views.chunk(2)])  # (2N, out)
    views_fn, forward, _ = step_functions(forward, model, to_device(images[:N // world], device), args, amp, log,
                                          data["prep"]["images"])
    forward = global_forward(forward, proc.rank, world) if world > 1 else forward
    final, warmup = args.lr * args.lr_min_ratio, args.warmup_epochs
    if args.recipe == "paper":  # the paper's CosineAnnealingLR(T_max=epochs), stepped once an epoch (Lightning's)
        lr_of = lambda epoch, step: lr_at(epoch, args.epochs + 1, round(warmup), args.lr, final)
    else:  # Part 1's: every step
        lr_of = lambda epoch, step: lr_at(epoch * steps + step, args.epochs * steps, round(warmup * steps), args.lr,
                                          final)
    trained, bn = sum(p.numel() for p in model.parameters() if p.requires_grad), "per-process" * args.no_sync_bn
    log(f"SimCLR: {args.arch} ({args.stem} stem{', ImageNet weights' if args.pretrained else ''}), {args.head} head "
        f"({args.act}), {trained / 1e6:.1f}M trained parameters; recipe {args.recipe}: {args.epochs} epochs of batch "
        f"{N}, lr {args.lr:.3g}, tau {args.tau}, {args.precision}" +
        (f", {world} processes, {bn or 'global'} BatchNorm" if world > 1 else ""))
    if args.pretrained and args.stem == "cifar":
        log("note: --stem cifar replaces the ImageNet 7x7 conv1 with a random 3x3 conv (re-initialised)")
    if args.epochs * steps < 300 and not args.dry_run:
        log(f"note: {args.epochs} epochs of {steps} steps: SimCLR needs a few hundred steps or more to learn much; "
            "raise --epochs or lower --batch-size")
    start, t_start, seconds = state["epoch"], time.time(), state["metrics"][-1]["pretrain_s"] if state["metrics"] else 0
    for epoch in range(start, args.epochs):
        model.train()
        t0 = t_shown = time.time()
        perm, losses = epoch_perm(len(images), args.seed, epoch).to(images.device), []
        for step in range(steps):
            x = to_device(images[perm[step * N:(step + 1) * N].chunk(world)[proc.rank]], device)  # (N / world, 3, H, W)
            for group in opt.param_groups:
                group["lr"] = lr_of(epoch, step)
            losses.append(sgd_step(forward, views_fn(x), opt, args.tau, amp))
            if time.time() - t_shown > PROGRESS_EVERY_S:  # a long epoch still shows life
                step_s, t_shown = (time.time() - t0) / (step + 1), time.time()
                log(f"  epoch {epoch + 1}: step {step + 1}/{steps} | {N / step_s:.0f} img/s | eta "
                    f"{fmt_time(step_s * (steps - step - 1 + (args.epochs - epoch - 1) * steps))}")
        losses, dt = torch.stack(losses), time.time() - t0  # (steps,), read once an epoch
        m = dict(epoch=epoch + 1, loss=losses.mean().item(), lr=opt.param_groups[0]["lr"], img_per_s=steps * N / dt,
                 epoch_s=dt, pretrain_s=seconds + time.time() - t_start)
        end_of_epoch(losses, m, state, data, args, proc)
        eta = fmt_time((time.time() - t_start) / (epoch + 1 - start) * (args.epochs - epoch - 1))
        knn = f" | knn {100 * m['knn_top1']:.1f}%" if "knn_top1" in m else ""
        log(f"epoch {epoch + 1}/{args.epochs} | loss {m['loss']:.4f} | lr {m['lr']:.4f} | {m['img_per_s']:.0f} img/s"
            f"{knn} | eta {eta}")
    return state["metrics"][-1]["pretrain_s"] if state["metrics"] else 0.0


def end_of_epoch(losses, m, state, data, args, proc):
    """After an epoch: a stop on a non-finite loss or weight, a warning on a collapsed embedding, the paper's validation
    loss (the best epoch's backbone kept), the kNN monitor; then checkpoint.pt and metrics.jsonl."""
    model, epoch = state["model"], m["epoch"] - 1
    bad = [k for k, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if not math.isfinite(m["loss"]) or bad:  # stop; the folder keeps its last good checkpoint
        if proc.rank == 0:  # its mark: a resume may then take a new --lr or --tau
            write_json(dict(epoch=epoch + 1, lr=m["lr"]), os.path.join(args.out, "diverged.json"))
        what = f"{', '.join(bad[:3])} became inf or nan" if bad else f"the loss became {m['loss']}"
        kept = f"the checkpoint of epoch {epoch}" if epoch else "no checkpoint (the run starts again)"
        die(f"{what} in epoch {epoch + 1} (lr {m['lr']:.4g}). {args.out} keeps {kept}; continue with a smaller learning"
            f" rate or a larger temperature: {resume_command(args, '--lr', f'{args.lr / 10:.3g}')} (or --tau "
            f"{2 * args.tau:g})")
    collapsed = math.log(2 * args.batch_size - 1)  # NT-Xent when every view looks alike
    if epoch + 1 > args.warmup_epochs and losses.min() > collapsed - 0.01:
        proc.log(f"warning: the loss stayed at ln(2N - 1) = {collapsed:.3f} all epoch {epoch + 1}: a collapsed "
                 "embedding, every view alike to the model; a smaller --lr or a longer --warmup-epochs may help")
    if data["val_x"] is not None:  # the paper's code evaluates the epoch of lowest validation loss
        m["val_loss"] = validation_loss(model, data["val_x"], args, data["prep"]["val_x"])
        if m["val_loss"] < min((h["val_loss"] for h in state["metrics"]), default=math.inf):
            state["best_backbone"] = copy.deepcopy(model.backbone.state_dict())
    if args.knn_every and m["epoch"] % args.knn_every == 0 and proc.rank == 0:  # the kNN monitor
        train_h, test_h = (extract_features(model.backbone, data[k], prep=data["prep"][k])
                           for k in ("train_x", "test_x"))
        m["knn_top1"] = knn_top1(train_h, data["train_y"], test_h, data["test_y"], data["classes"], args.knn_k)
    rngs = [rng_state()]  # every process's RNG, so that each resumes its own augmentation stream
    if proc.world > 1:
        rngs = [None] * proc.world
        dist.all_gather_object(rngs, rng_state())
    state["metrics"].append(m)
    state["epoch"] = m["epoch"]
    if proc.rank == 0:
        save_checkpoint(os.path.join(args.out, "checkpoint.pt"), state, rngs, config=vars(args))
        write_metrics(state["metrics"], args.out)


@torch.no_grad()
def validation_loss(model, val_x, args, prep):
    """The paper's validation loss: NT-Xent of identical un-augmented views in eval mode, the mean over whole batches
    (its loader drops the last; fewer images than a batch are one)."""
    model.eval()
    device, n = next(model.parameters()).device, paper_split(len(val_x), args.batch_size)[0]
    z = [model(prep(to_device(x, device))) for x in val_x[:n].split(args.batch_size)]  # each (N, out)
    model.train()
    return sum(nt_xent(zb, zb, args.tau).item() for zb in z) / len(z)


def load_best_epoch(state, log):
    """Recipe paper: the backbone of the epoch of lowest validation NT-Xent, which the paper's code evaluates."""
    if state["best_backbone"] is not None:
        state["model"].backbone.load_state_dict(state["best_backbone"])
        best = min(state["metrics"], key=lambda m: m["val_loss"])
        log(f"evaluating the backbone of epoch {best['epoch']}, of the lowest validation NT-Xent "
            f"({best['val_loss']:.4f})")


RAW_PIXELS_MAX = 32  # the raw-pixel baseline's side: n x 3HW floats at 128 px would take 1.9 GB for Imagenette


def pixel_features(images, device, side=RAW_PIXELS_MAX, batch=1024):
    """The raw-pixel baseline: uint8 (n, 3, H, W) -> [0, 1], area-averaged to side x side: (n, 3 min(H, side)^2)."""
    x = [to_device(x, device).float() / 255 for x in images.split(batch)]
    return torch.cat([(F.adaptive_avg_pool2d(b, side) if b.shape[-1] > side else b).flatten(1) for b in x])


def feature_cache(model, data, args, device):
    """features(name): (train_h, test_h) of the trained backbone ("simclr"), a random-init one ("random_init") or the
    raw pixels ("raw_pixels"), each computed once, when first asked for."""
    @functools.cache
    def features(name):
        if name == "raw_pixels":
            return tuple(pixel_features(data[k], device) for k in ("train_x", "test_x"))
        f = model.backbone
        if name == "random_init":
            torch.manual_seed(args.seed + 1)  # its weights: the same whichever stage asks first
            f = make_backbone(args.arch, args.stem, args.pretrained).to(device)
        return tuple(extract_features(f, data[k], prep=data["prep"][k]) for k in ("train_x", "test_x"))
    return features


def random_init_name(args):
    return f"{'ImageNet-init' if args.pretrained else 'random-init'} {args.arch}"


def evaluate_with_baselines(features, data, args, train_s, log=print):
    """Linear and kNN top-1 of SimCLR's backbone, then of raw pixels and a random-init backbone, into results.json as
    each comes; a baseline that runs out of memory is skipped, not the run."""
    path, names = os.path.join(args.out, "results.json"), {} if args.no_baselines else dict(
        raw_pixels=f"raw pixels ({min(args.img_size, RAW_PIXELS_MAX)}px)", random_init=random_init_name(args))
    evaluate_h = lambda h: evaluate(h[0], data["train_y"], h[1], data["test_y"], data["classes"], args.eval,
                                    args.probe_steps, args.knn_k, args.batch_size)
    results = dict(evaluate_h(features("simclr")), eval_protocol=args.eval, pretrain_seconds=train_s)
    write_json(results, path)
    for key, name in names.items():
        try:
            results[key] = evaluate_h(features(key))
        except (torch.OutOfMemoryError, MemoryError) as e:
            results[key] = dict(skipped=f"out of memory ({type(e).__name__})")
            log(f"note: the {name} baseline ran out of memory; skipped")
        write_json(results, path)
    print(f"\ntop-1 on the {'test split' if args.eval == 'standard' else '20% of the test split (the paper protocol)'}:"
          f"{'linear':>12}{'kNN':>9}")
    for name, r in [(name, results[k]) for k, name in names.items()] + [
            (f"SimCLR {args.arch}, {args.head} head ({args.act})", results)]:
        print(f"  {name:<44}" + (f"{r['skipped']:>17}" if "skipped" in r else
                                 f"{100 * r['linear_top1']:>6.1f}%{100 * r['knn_top1']:>8.1f}%"))
    return results


# ----------------------------------------------------------------------------------------------------------
# Few labels (--label-fractions): SimCLR's semi-supervised question (Sec. 6 and Table 7), next to training from scratch
# ----------------------------------------------------------------------------------------------------------

def label_draw(y, amount, per_class, seed, draw):
    """Sorted indices of one seeded draw of labelled images: a fraction `amount` of y, stratified (at least one per
    class), or with per_class `amount` of each class. Draw d of a smaller set is inside draw d of a larger one."""
    gen = torch.Generator().manual_seed(1000 * seed + draw)  # --label-draws is at most 1000: no two seeds meet
    classes = len(y.unique())
    n = amount * classes if per_class else max(classes, round(amount * len(y)))
    return stratified(y, n, gen, floor=amount if per_class else 1)


def flip_and_crop(x, pad):
    """The standard supervised augmentation (He et al. 2016, arXiv:1512.03385 Sec. 4.2): a random crop of the padded
    image and a horizontal flip w.p. 0.5, on x (N, 3, H, H). Reflect padding, not zeros: no black frame to learn."""
    N, _, H, _ = x.shape
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect")  # (N, 3, H + 2 pad, H + 2 pad)
    top, left = torch.randint(0, 2 * pad + 1, (2, N), device=x.device)
    side = torch.full((N,), H, device=x.device)
    return resized_crop(x, top, left, side, side, H, flip=torch.rand(N, device=x.device) < 0.5)  # (N, 3, H, H)


def supervised(train_x, train_y, test_x, test_y, classes, arch, stem, steps, seed, device, precision="fp32",
               batch=256, init=None, prep=normalize, test_prep=None):
    """Top-1 on test_x of a backbone + linear layer trained end to end with cross-entropy on labelled uint8 images, from
    scratch or from the weights `init`, by one recipe for both (flip and crop, SGD, warm-up and cosine), `steps` steps
    whatever the number of images: not SimCLR's fine-tuning (App. B.5: Nesterov, no weight decay or warm-up, epochs)."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # the caller's RNG untouched
        torch.manual_seed(seed)  # the init, the batches and the crops: one run per seed
        backbone = make_backbone(arch, stem)
        if init is not None:
            backbone.load_state_dict(init)
        net = nn.Sequential(backbone, nn.Linear(2048 if arch == "resnet50" else 512, classes)).to(device).train()
        amp, N = autocast_for(device, precision), min(batch, len(train_y))
        peak = 0.05 * N / 128  # lr 0.05 per 128 images; weight decay 5e-4 (Zagoruyko & Komodakis, arXiv:1605.07146)
        opt = torch.optim.SGD(param_groups(net, 5e-4), lr=peak, momentum=0.9)
        for step in range(steps):
            for group in opt.param_groups:  # linear warm-up over a tenth (Goyal et al., arXiv:1706.02677), cosine
                group["lr"] = lr_at(step, steps, steps // 10, peak, 0.0)
            idx = torch.randperm(len(train_y))[:N]
            x = to_device(train_x[idx.to(train_x.device)], device).float() / 255  # (N, 3, H, H) in [0, 1]
            x = prep(flip_and_crop(x, pad=x.shape[-1] // 8))  # 4 px of 32, as He et al.
            with amp():
                loss = F.cross_entropy(net(x), train_y[idx.to(train_y.device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    logits = extract_features(net, test_x, prep=test_prep or prep)  # (n, classes); test_prep: the test split's own
    return (logits.argmax(1) == test_y).float().mean().item()


def label_efficiency(features, data, args, device, results, backbone, log=print):
    """For every label set and draw: SimCLR's probes and the random-init probe on the drawn images, and `supervised`
    on them fine-tuned from SimCLR and from scratch (the same steps and seed); into results.json as each exists."""
    train_x, train_y, test_x, test_y, classes = (data[k] for k in ("train_x", "train_y", "test_x", "test_y", "classes"))
    per_class, y, weights = args.labels_per_class is not None, train_y.cpu(), backbone.state_dict()  # supervised copies
    (train_h, test_h), (r_train, r_test) = features("simclr"), features("random_init")
    methods = dict(simclr_linear="SimCLR linear", simclr_knn="SimCLR kNN",
                   random_init_linear=f"{random_init_name(args)} linear",
                   simclr_finetuned=f"SimCLR fine-tuned ({args.sup_steps} steps)",
                   supervised=f"supervised ({args.sup_steps} steps)")
    table = results["label_efficiency"] = dict(unit="labels per class" if per_class else "fraction of the labels",
                                               sup_steps=args.sup_steps, rows=[])
    name = lambda amount: f"{amount}/class" if per_class else f"{100 * amount:g}%"
    for amount in args.label_amounts:
        n = len(label_draw(y, amount, per_class, args.seed, 0))
        row = dict(amount=amount, labels=n, draws=1 if n == len(y) else args.label_draws)  # the whole split: once
        table["rows"].append(row)
        for draw in range(row["draws"]):
            t0, idx = time.time(), label_draw(y, amount, per_class, args.seed, draw).to(train_h.device)
            labels = train_y[idx]
            run = dict(simclr_linear=linear_probe(train_h[idx], labels, test_h, test_y, classes, args.probe_steps),
                       simclr_knn=knn_top1(train_h[idx], labels, test_h, test_y, classes, args.knn_k),
                       random_init_linear=linear_probe(r_train[idx], labels, r_test, test_y, classes, args.probe_steps))
            for key, init in (("simclr_finetuned", weights), ("supervised", None)):
                run[key] = supervised(train_x[idx.to(train_x.device)], labels, test_x, test_y, classes, args.arch,
                                      args.stem, args.sup_steps, 1000 * args.seed + draw, device, args.precision,
                                      init=init, prep=data["prep"]["train_x"], test_prep=data["prep"]["test_x"])
            for key, acc in run.items():  # mean and sample std over the draws so far
                runs = row.get(key, dict(runs=[]))["runs"] + [acc]
                row[key] = dict(mean=float(np.mean(runs)), std=float(np.std(runs, ddof=len(runs) > 1)), runs=runs)
            write_json(results, os.path.join(args.out, "results.json"))
            log(f"few labels: {name(amount)} ({n} images), draw {draw + 1}/{row['draws']}: " +
                ", ".join(f"{methods[k]} {100 * v:.1f}%" for k, v in run.items()) + f" ({time.time() - t0:.0f}s)")
    pm = lambda r: f"{100 * r['mean']:.1f}" + (f" +- {100 * r['std']:.1f}" if len(r["runs"]) > 1 else "")
    width, rows = {k: max(16, len(v) + 2) for k, v in methods.items()}, table["rows"]
    print(f"\nfew labels: top-1 on the test split, mean +- std over the draws (%)\nfine-tuned and from scratch: one "
          f"supervised recipe (not SimCLR's App. B.5), {args.sup_steps} steps of batch min(256, n) at every label set, "
          f"so the epochs differ\n  {'labels':<10}{'images':>8}{'draws':>6}{'epochs':>8}" +
          "".join(f"{v:>{width[k]}}" for k, v in methods.items()))
    for row in rows:
        epochs = args.sup_steps * min(256, row["labels"]) / row["labels"]  # supervised()'s batch: min(256, n)
        print(f"  {name(row['amount']):<10}{row['labels']:>8}{row['draws']:>6}{epochs:>8.1f}" +
              "".join(f"{pm(row[k]):>{width[k]}}" for k in methods))
    save_plot(os.path.join(args.out, "label_efficiency.png"), {"top-1 on the test split (%)": [
        (label, [r["labels"] for r in rows], [100 * r[k]["mean"] for r in rows], [100 * r[k]["std"] for r in rows])
        for k, label in methods.items()]}, "labelled train images", logx=True, log=log)


# ----------------------------------------------------------------------------------------------------------
# Pictures: the augmentations, the curves, the nearest neighbours (matplotlib optional: without it, a note per plot)
# ----------------------------------------------------------------------------------------------------------

def show_augs(images, args, log=print):
    """--show-augs: 8 images (top row) and two augmented views of each (rows 2 and 3), into one PNG."""
    x = images[:8].float() / 255
    grid = torch.cat([x, augment(x, **augment_kwargs(args)), augment(x, **augment_kwargs(args))])
    os.makedirs(os.path.dirname(os.path.abspath(args.show_augs)), exist_ok=True)
    grid = F.interpolate(grid, scale_factor=max(1, 96 // args.img_size), mode="nearest")  # small: enlarge
    fmt = "png" if args.show_augs.lower().endswith(".png") else "jpeg"
    write_atomic(args.show_augs, lambda f: torchvision.utils.save_image(grid, f, format=fmt, nrow=8, padding=2))
    log(f"saved {args.show_augs}: originals (top row) and two augmented views (rows 2 and 3)")


def save_plot(path, panels, xlabel, logx=False, log=print):
    """Line charts side by side into the PNG `path`, panels {title: [(label, xs, ys, yerr or None), ...]}."""
    try:
        from matplotlib.figure import Figure  # the object API: no pyplot, no GUI backend, no global state
    except ImportError:
        return log(f"note: {os.path.basename(path)} not drawn: matplotlib is not installed (pip install matplotlib)")
    legend = any(len(lines) > 1 for lines in panels.values())  # to the right of the chart, never over its lines
    fig = Figure(figsize=(3.4 * len(panels) + 2.2 * legend, 2.8), layout="constrained")
    for ax, (title, lines) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels.items()):
        for label, xs, ys, yerr in lines:
            ax.errorbar(xs, ys, yerr=yerr, label=label, marker="o", markersize=3, capsize=2)
        ax.set(title=title, xlabel=xlabel, xscale="log" if logx else "linear")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=90))


def plot_curves(metrics_path, png, log=print):
    """curves.png: the loss, the learning rate and the kNN monitor against the epoch, from metrics.jsonl."""
    if not os.path.exists(metrics_path):
        return log(f"note: no epoch was trained, so no {os.path.basename(png)}")
    with open(metrics_path) as f:
        m = [json.loads(line) for line in f]
    knn = [r for r in m if "knn_top1" in r]
    line = lambda key, rows, scale=1: [("", [r["epoch"] for r in rows], [r[key] * scale for r in rows], None)]
    save_plot(png, {"NT-Xent loss": line("loss", m), "learning rate (end of epoch)": line("lr", m),
                    ("kNN monitor, top-1 %" if knn else "kNN monitor: off (--knn-every)"): line("knn_top1", knn, 100)},
              "epoch", log=log)


def pictures(features, data, args, log=print):
    """curves.png, and neighbours.png (and --show-neighbours): 8 test images, one per class while there are 8, each
    with its 8 nearest train images by cosine similarity of SimCLR's h, then of the random-init backbone's h."""
    plot_curves(os.path.join(args.out, "metrics.jsonl"), os.path.join(args.out, "curves.png"), log)
    q = stratified(data["test_y"].cpu(), 8, torch.Generator().manual_seed(args.seed))
    pick = lambda x, idx: x[idx.to(x.device)].cpu().float() / 255  # uint8 -> [0, 1], on the host, for save_image
    query = pick(data["test_x"], q)[:, None]  # (8, 1, 3, H, W)
    simclr_nb, random_nb = (pick(data["train_x"], nearest(test_h[q.to(test_h.device)], train_h, 8)[1])
                            for train_h, test_h in map(features, ("simclr", "random_init")))  # (8, k, 3, H, W)
    gap = torch.ones_like(query)  # white, as save_image's padding
    tiles = torch.cat([query, gap, simclr_nb, gap, random_nb], 1)  # (8, 2k + 3, 3, H, W): a row per query
    if tiles.shape[-1] > 64:  # large images: a picture of about a thousand pixels across, not thousands
        tiles = torchvision.transforms.v2.functional.resize(tiles, [64, 64], antialias=True)  # (8, 2k + 3, 3, 64, 64)
    paths = [os.path.join(args.out, "neighbours.png")] + ([args.show_neighbours] if args.show_neighbours else [])
    for path in paths:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        write_atomic(path, lambda f: torchvision.utils.save_image(tiles.flatten(0, 1), f, format="png", padding=2,
                                                                  pad_value=1, nrow=tiles.shape[1]))
    log(f"saved {' and '.join(paths)}: each row a test image, then its nearest train images by SimCLR's h, then by "
        f"the {random_init_name(args)}'s")


# ----------------------------------------------------------------------------------------------------------
# Benchmark (--bench): our pipeline against the classic one, in one process, on the same model and batch
# ----------------------------------------------------------------------------------------------------------

def classic_views(images, transform):
    """The classic pipeline, in each DataLoader worker: two views of each uint8 image, one at a time on the CPU."""
    return [torch.stack([transform(x) for x in images]) for _ in range(2)]


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' datasheets, for model FLOP utilisation: only
# cards whose figure we are sure of, the most specific name first (others: --peak-tflops); a CPU: achieved FLOP/s only.
PEAK_BF16_TFLOPS = {"H100 PCIe": 756, "H100 NVL": 835, "H100": 989, "H200": 989, "A100": 312}


def step_flops(model, views, tau, amp):
    """FLOPs of one sgd_step (its SGD update counts none), as FlopCounterMode counts them, on a copy of the model."""
    model = copy.deepcopy(model)
    with FlopCounterMode(display=False) as counter:
        sgd_step(model, views, torch.optim.SGD(model.parameters(), lr=0.0), tau, amp)
    return counter.get_total_flops()


def classic_window(workers, bench_steps):
    """(warm-up, timed) steps of the classic rows: w workers deliver in bursts of w with 2 batches queued each, so
    the warm-up drains that queue (4w + 3 steps) and the clock runs whole bursts, at least 16."""
    burst = max(workers, 1)  # no workers: the main process makes each batch when asked, no queue, bursts of 1
    return 4 * workers + 3, -(-max(bench_steps, 16 * workers) // burst) * burst  # a multiple of the burst


def bench(model, data, args, device, log=print):
    """Images/s of (a) our pipeline, (b) the classic DataLoader one into the same step, (c) each stage; and the time the
    run these flags start would take here, from (a) and the evaluation timed once: bench.json."""
    images, N, cuda = data["images"], args.batch_size, device.type == "cuda"
    amp, opt = autocast_for(device, args.precision), optimizer(model, args)
    views_fn, forward, compiled = step_functions(model, model, to_device(images[:N], device), args, amp, log)
    ours = lambda: views_fn(to_device(images[torch.randint(len(images), (N,), device=images.device)], device))
    fixed_views = ours()  # (2N, 3, H, W): the train step alone reuses one batch
    step = lambda views: sgd_step(forward, views, opt, args.tau, amp)
    sync = lambda: torch.cuda.synchronize(device) if cuda else None

    def timed(fn, warmup=0, steps=1):  # seconds per call of fn after its warm-up calls, and its last result
        for _ in range(warmup):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            out = fn()
        sync()
        return (time.perf_counter() - t0) / steps, out

    def row(name, fn, warmup=3, steps=args.bench_steps):  # a row of the table, logged as soon as it is timed
        ms = 1000 * timed(fn, warmup, steps)[0]
        log(f"bench: {name:<44} {ms:9.1f} ms/step {1000 * N / ms:9.0f} img/s")
        return dict(ms_per_step=ms, img_per_s=1000 * N / ms)

    model.train()
    rows = dict(ours=row("(a) ours: augment + train step", lambda: step(ours())),
                augment=row("(c) ours: augmentation alone", ours),
                train_step=row("(c) train step alone (fixed views)", lambda: step(fixed_views)))
    warmup, steps = classic_window(args.workers, args.bench_steps)  # the workers' queue is not their speed
    sampler = torch.utils.data.RandomSampler(images, replacement=True, num_samples=2 ** 62)  # endless: no restart
    loader = iter(torch.utils.data.DataLoader(
        images.cpu(), batch_size=N, sampler=sampler, num_workers=args.workers, pin_memory=cuda, collate_fn=
        functools.partial(classic_views, transform=classic_transform(images.shape[-1], **augment_kwargs(args)))))
    classic = lambda: channels_last(torch.cat([v.to(device, non_blocking=True) for v in next(loader)]))  # (2N, 3, H, W)
    rows["classic"] = row(f"(b) classic: {args.workers} DataLoader workers + step", lambda: step(classic()),
                          warmup, steps)
    rows["classic_loader"] = row("(c) classic: DataLoader alone", classic, warmup, steps)
    flops = step_flops(model, fixed_views, args.tau, amp)
    device_name = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)
    tflops = flops * 1000 / rows["ours"]["ms_per_step"] / 1e12  # achieved by our whole step
    result = dict(rows=rows, speedup=rows["ours"]["img_per_s"] / rows["classic"]["img_per_s"],
                  augment_share=rows["augment"]["ms_per_step"] / rows["ours"]["ms_per_step"], flops_per_step=flops,
                  achieved_tflops=tflops, peak_bf16_tflops=peak, mfu=tflops / peak if peak else None, batch=N,
                  device=device_name, torch=torch.__version__, date=time.strftime("%Y-%m-%d"), compiled=compiled,
                  classic_warmup=warmup, classic_steps=steps, img_size=images.shape[-1], steps=args.bench_steps,
                  **{k: getattr(args, k) for k in ("workers", "arch", "stem", "precision", "dataset")})
    mfu = f", MFU {100 * result['mfu']:.1f}% of {peak} TFLOP/s bf16" if peak else ""
    log(f"bench: ours / classic = {result['speedup']:.2f}x; augmentation = {100 * result['augment_share']:.1f}% "
        f"of our step; {flops / 1e9:.1f} GFLOP per step, {tflops:.3f} TFLOP/s achieved{mfu}")
    extract = lambda: [extract_features(model.backbone, data[k], prep=data["prep"][k]) for k in ("train_x", "test_x")]
    probe = lambda h: probes(h[0], data["train_y"], h[1], data["test_y"], data["classes"], args.probe_steps, args.knn_k)
    features_s, h = timed(extract)  # the evaluation costs the same on this untrained backbone as on a trained one
    probes_s = timed(lambda: probe(h))[0]
    pixels = lambda: probe([pixel_features(data[k], device) for k in ("train_x", "test_x")])  # the raw pixels' probes
    pixels_s = 0 if args.no_baselines else timed(pixels)[0]
    monitors = args.epochs // args.knn_every if args.knn_every else 0  # each kNN monitor extracts the features
    pretrain_s = args.epochs * (len(images) // N) * rows["ours"]["ms_per_step"] / 1000 + monitors * features_s
    evaluate_s = (features_s + probes_s) * (1 + (not args.no_baselines)) + pixels_s  # random-init costs as SimCLR
    result.update(pretrain_s=pretrain_s, evaluate_s=evaluate_s, run_s=pretrain_s + evaluate_s)
    log(f"bench: the run these flags start ({args.epochs} epochs of {len(images) // N} steps) would take about "
        f"{fmt_time(result['run_s'])} here once its data is ready: {fmt_time(pretrain_s)} of pre-training at "
        f"{rows['ours']['img_per_s']:.0f} img/s, {fmt_time(evaluate_s)} of evaluation"
        + (" (few labels not counted)" if args.label_amounts else ""))
    write_json(result, os.path.join(args.out, "bench.json"))
    log(f"wrote {os.path.join(args.out, 'bench.json')}")
    return result


# ----------------------------------------------------------------------------------------------------------
# main: the stages of a run, in order
# ----------------------------------------------------------------------------------------------------------

def main(argv=None):
    """The command line: a run's stages (run), and every way it can stop in one line with what to do: a mistake, a
    file that cannot be written or read, memory run out (exit 2), Ctrl-C or SIGTERM (exit 130, how to continue)."""
    for stream in (sys.stdout, sys.stderr):  # a path that is not UTF-8 prints escaped, whatever the terminal takes;
        if hasattr(stream, "reconfigure"):  # each line out at once, also into a pipe (| tee log), not in 8 KB blocks
            stream.reconfigure(errors="backslashreplace", line_buffering=True)
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except OSError as e:  # --resume: a config.json that cannot be rewritten with a new --lr or --tau
        die(f"{e.filename or ''}: {e.strerror or e}")
    in_main_thread = threading.current_thread() is threading.main_thread()
    stops = {s: signal.signal(s, signal.default_int_handler)  # SIGTERM as Ctrl-C; Ctrl-C no longer quiet (the imports)
             for s in (signal.SIGINT, signal.SIGTERM)} if in_main_thread else {}
    saved = lambda: os.path.exists(os.path.join(args.out, "config.json")) and not (args.show_augs or args.bench)
    then = lambda: f", then continue with: {resume_command(args)}" if saved() else ""
    try:
        with contextlib.ExitStack() as stack:  # what run holds open (the folder's lock) is let go however it ends
            results = run(args, stack)
            sys.stdout.flush()  # a full stdout fails here, not in Python's flush at exit
            return results
    except KeyboardInterrupt:
        for sig in stops:  # a second Ctrl-C while the checkpoint is read: this message still, not a traceback
            signal.signal(sig, signal.SIG_IGN)
        if not saved():
            die("interrupted before a run was saved; start it again", 130)
        done = peek(os.path.join(args.out, "checkpoint.pt")).get("epoch", 0)  # unreadable: none, as a resume says
        die(f"interrupted; {args.out} holds {done} of {args.epochs} epochs. Continue with: {resume_command(args)}", 130)
    except OSError as e:  # a full disk, a file-size limit, a read-only folder, a file that cannot be read, stdout
        if e.filename is None:  # stdout: a closed pipe (| head), a full device; Python would say it again at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            die("the output pipe closed before the run ended (| head?); send the output to a file or to less" + then()
                if isinstance(e, BrokenPipeError) else
                f"cannot write to standard output ({e.strerror}); send it to a file or device with room{then()}")
        todo = {errno.ENOSPC: "; free some space", errno.EDQUOT: "; free some space",
                errno.EFBIG: "; raise the file size limit (ulimit -f)"}.get(e.errno, "")
        die(f"{e.filename}: {e.strerror or e}{todo}{then()}")
    except (MemoryError, OverflowError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        text = " ".join(str(e).split())
        if isinstance(e, MemoryError) or re.search("out of memory|allocate memory", text, re.I):
            asked = re.search(r"tried to allocate [\d.]+ ?\w+", text, re.I)  # CPU: in bytes; CUDA: in GiB
            width = f"--proj-hidden {args.proj_hidden}" if args.head == "mlp" else f"--ae-dim {args.ae_dim}"
            host = args.device.startswith("cuda") and args.data_on != "host"
            host = ", or keep the images in host memory (--data-on host)" if host else ""
            die(f"out of memory{f' ({asked[0]})' if asked else ''}: start a new run with a smaller --batch-size "
                f"({args.batch_size}), --img-size ({args.img_size}) or head ({width}, --proj-out {args.proj_out})"
                f"{host}" + (f"; or continue this one where more memory is free: {resume_command(args)}"
                             if saved() else ""))
        if isinstance(e, OverflowError) or "overflow" in text:
            die(f"a number overflowed ({text[:150]}): lower --lr ({args.lr:g}) or --wd ({args.wd:g})")
        raise
    finally:
        for sig, handler in stops.items():
            signal.signal(sig, handler)


def run(args, stack):
    """A run's stages: the data, the autoencoder, the model, pre-training, evaluation, pictures, few labels."""
    proc = setup(args)
    if args.dataset == "folder" and args.device == "cpu":
        proc.log(f"note: --dataset folder on a CPU: {args.arch}, {args.img_size}px, batch {args.batch_size}, "
                 f"{args.epochs} epochs, a run of minutes; the full-size model: --arch resnet34 --img-size 96 "
                 "--batch-size 256 --epochs 100, on a GPU")
    if proc.rank == 0 and not args.show_augs:
        open_run_dir(args, stack)
        if os.path.basename(args.out).startswith(DRY_RUN):
            stack.callback(forget_dry_run, args.out, proc.log)
    data = prepare_data(args, proc)
    if args.show_augs:
        return show_augs(data["images"], args, proc.log)
    if proc.rank == 0 and not (args.resume or args.bench):
        write_json(vars(args), os.path.join(args.out, "config.json"))
    embedding = autoencoder_embedding(data, args, proc) if args.head == "ae" else None
    torch.manual_seed(args.seed)  # the same initial weights whether the AE was trained now or read from the cache
    model = build_model(args, embedding, proc)
    torch.manual_seed(args.seed + proc.rank)  # each process draws its own augmentations
    if args.bench:
        return bench(model, data, args, proc.device, proc.log)
    state, features = resume_checkpoint(model, args, proc), feature_cache(model, data, args, proc.device)
    if args.resume and args.show_neighbours:  # a look at a saved run: its pictures, no training, no evaluation
        if state["epoch"] == 0:
            die(f"--show-neighbours: {args.resume} has no checkpoint of a trained epoch yet, so nothing to show")
        load_best_epoch(state, proc.log)
        return pictures(features, data, args, proc.log)
    train_s = pretrain(data, args, proc, state)
    if proc.world > 1:
        dist.destroy_process_group()
        if proc.rank != 0:
            return None  # evaluation runs once, on rank 0
    load_best_epoch(state, proc.log)
    save_atomic(model.backbone.state_dict(), os.path.join(args.out, "backbone.pt"))
    results = evaluate_with_baselines(features, data, args, train_s, proc.log)
    pictures(features, data, args, proc.log)
    if args.label_amounts:
        label_efficiency(features, data, args, proc.device, results, model.backbone, proc.log)
    if not os.path.basename(args.out).startswith(DRY_RUN):
        print(f"outputs in {args.out}/")
    return results


if __name__ == "__main__":
    main()
