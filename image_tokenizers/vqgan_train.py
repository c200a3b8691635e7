"""Training the VQGAN tokenizer as taming-transformers does (`VQLPIPSWithDiscriminator`).

Loss of the autoencoder (Taming Transformers, Esser et al. CVPR 2021, Eq. 4-7):
    L = |x - x_rec|_1 + w_p * LPIPS(x, x_rec)          (rec. term of Eq. 4, perceptual loss Sec. 3.1)
      + codebook_weight * L_vq                          (Eq. 4, computed in the quantizer)
      + lambda * disc_factor * L_G,  L_G = -E[D(x_rec)] (Eq. 5/6 with taming's hinge GAN)
    lambda = ||grad_GL[L_rec]|| / (||grad_GL[L_G]|| + 1e-4) * disc_weight (Eq. 7; GL = decoder's last layer)
and of the PatchGAN discriminator the hinge loss 0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(x_rec))]).
The GAN terms switch on after `disc_start` steps, as taming's `adopt_weight`.

LPIPS: the `lpips` package ships its linear heads, but its VGG16 backbone comes from
torchvision's download cache. The perceptual term is on when `vgg16-397923af.pth` is in the torch hub
checkpoint folder (and perceptual_weight > 0); `tokenizer.train.vgg16_weights` (download, a URL or a PATH,
bench/weights.py) puts it there when asked. Nothing is downloaded otherwise.

Deviations from taming, for CPU budgets (none changes the loss):
- Before `disc_start` the discriminator is neither run nor updated (taming runs it and multiplies
  its terms by 0; only its BatchNorm running statistics differ, which a train-mode D never reads).
- The discriminator step reuses the generator step's reconstruction (detached) instead of a second
  forward pass with the just-updated autoencoder.

Optional training aids for small budgets (all off by default, i.e. taming's procedure; none changes the
model or its forward pass, so the weights stay a taming VQModel):
- `codebook_init="kmeans"`: the codebook starts as k-means centroids of the encoder's outputs on training
  images (instead of taming's uniform(-1/K, 1/K), where most codes are never the nearest one).
- `dead_code_every=N`: every N steps, codes that no position chose during those steps restart at random
  encoder outputs of the current batch (as in Dhariwal et al. 2020 Jukebox, Sec. 3.2; Zeghidour et al. 2021
  SoundStream, Sec. 3.3), so that the codebook stays in use.
- `lr_schedule="cosine"`: the learning rate decays from lr to lr * lr_min_ratio along a half cosine.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import VGG16_Weights

from bench.train import Steps, TrainingError, lr_factor, run_steps
from image_tokenizers.vqmodel import VQModel, images_to_unit
from bench.weights import Weights, hub_checkpoints, place_in_hub, resolve

# torchvision's file for VGG16_Weights.IMAGENET1K_V1, the backbone `lpips.LPIPS(net="vgg")` loads
VGG16_WEIGHTS = Weights("tokenizer.train.vgg16_weights", VGG16_Weights.IMAGENET1K_V1.url,
                        "torchvision's VGG16 ImageNet weights")
VGG16_FILE = VGG16_WEIGHTS.file_name


@dataclass
class VQGANTrainConfig:
    steps: int  # optimizer steps of the autoencoder (and of the discriminator after disc_start)
    batch_size: int  # images per step
    lr: float  # Adam learning rate of both optimizers (taming: base_lr * batch_size * gpus)
    disc_start: int  # step from which the GAN terms are on (taming's disc_start / adopt_weight)
    disc_weight: float  # scale of the adaptive GAN weight, Eq. 7 (taming: 0.8 for f16 models)
    codebook_weight: float  # weight of the VQ loss, Eq. 4 (taming: 1.0)
    perceptual_weight: float  # weight of LPIPS when its VGG weights are cached locally (taming: 1.0)
    seed: int  # seeds batch order and discriminator init
    disc_ndf: int = 64  # discriminator width (taming: 64)
    disc_num_layers: int = 3  # stride-2 conv layers of the PatchGAN (taming: 3)
    disc_factor: float = 1.0  # GAN term multiplier once on (taming: 1.0)
    log_every: int = 10  # steps between calls of the `log` callback
    codebook_init: str = "random"  # "random" (taming's uniform) | "kmeans" (of encoder outputs at step 0)
    kmeans_images: int = 1024  # training images whose encoder outputs the k-means init clusters
    kmeans_iters: int = 20  # Lloyd iterations of the k-means init
    dead_code_every: int = 0  # > 0: every this many steps, restart codes unused in them (0: never)
    lr_schedule: str = "constant"  # "constant" (taming) | "cosine" (half-cosine decay over `steps`)
    lr_min_ratio: float = 0.0  # with "cosine": the final lr as a fraction of `lr`
    vgg16_weights: str | None = None  # LPIPS's backbone: null (hub cache only) | download | URL | PATH
    ckpt_every: int = 100  # resumable checkpoint every N steps (how often, not what is trained: not in the key)

    def __post_init__(self) -> None:
        if self.codebook_init not in ("random", "kmeans"):
            raise ValueError(f"codebook_init={self.codebook_init!r} is not 'random' or 'kmeans'")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule={self.lr_schedule!r} is not 'constant' or 'cosine'")
        if self.ckpt_every < 1:
            raise ValueError(f"tokenizer.train.ckpt_every={self.ckpt_every} must be at least 1")


# ---- LPIPS availability ----------------------------------------------------------------------

def vgg16_weights_path() -> str:
    return str(hub_checkpoints() / VGG16_FILE)


def provide_vgg16(value: str | None) -> None:
    """Put the file `tokenizer.train.vgg16_weights` names where LPIPS's torchvision backbone looks for it."""
    path = resolve(value, VGG16_WEIGHTS)
    if path is not None:
        place_in_hub(path, VGG16_WEIGHTS)


def lpips_available() -> bool:
    """Whether LPIPS can run with real weights without a download (include it in cache keys)."""
    try:
        import lpips  # noqa: F401
    except ImportError:
        return False
    return os.path.isfile(vgg16_weights_path())


def build_lpips() -> nn.Module | None:
    """The VGG LPIPS of Zhang et al. 2018 (as taming's), or None when its backbone is not on disk."""
    if not lpips_available():
        return None
    import lpips

    net = lpips.LPIPS(net="vgg", verbose=False).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


# ---- discriminator ---------------------------------------------------------------------------

class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator of pix2pix, as taming's (BatchNorm, LeakyReLU(0.2), 4x4 kernels).

    Output: one logit per overlapping patch, (B, 1, h', w'). Names (`main.k.weight`) are taming's."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        kw, padw = 4, 1
        # convs followed by BatchNorm carry no bias (BatchNorm's shift replaces it)
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, kw, stride=2, padding=padw), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, kw, stride=2, padding=padw, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        layers += [nn.Conv2d(ndf * prev, ndf * mult, kw, stride=1, padding=padw, bias=False),
                   nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True),
                   nn.Conv2d(ndf * mult, 1, kw, stride=1, padding=padw)]
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, 1, h', w')


def weights_init(m: nn.Module) -> None:
    """DCGAN init, as taming: conv weights N(0, 0.02), BatchNorm scale N(1, 0.02) and shift 0."""
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.constant_(m.bias, 0)


# ---- losses ----------------------------------------------------------------------------------

def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge discriminator loss (Lim & Ye 2017), taming's default GAN loss."""
    return 0.5 * (torch.mean(F.relu(1.0 - logits_real)) + torch.mean(F.relu(1.0 + logits_fake)))


def adopt_weight(weight: float, step: int, threshold: int, value: float = 0.0) -> float:
    """`weight` from step `threshold` on, `value` before (taming's warm-up switch for the GAN)."""
    return value if step < threshold else weight


def calculate_adaptive_weight(nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                              disc_weight: float) -> torch.Tensor:
    """lambda of Eq. 7 (Taming Transformers): balances the GAN gradient against the reconstruction one
    at the decoder's last layer, clamped to [0, 1e4], detached, times disc_weight."""
    nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(d_weight, 0.0, 1e4).detach() * disc_weight


class VQLPIPSWithDiscriminator(nn.Module):
    """taming's VQGAN loss: L1 (+ LPIPS) reconstruction, VQ loss, adaptive-weight hinge GAN."""

    def __init__(self, cfg: VQGANTrainConfig, in_channels: int = 3):
        super().__init__()
        self.cfg = cfg
        self.perceptual_loss = build_lpips() if cfg.perceptual_weight > 0 else None
        self.discriminator = NLayerDiscriminator(in_channels, cfg.disc_ndf, cfg.disc_num_layers)

    @property
    def uses_lpips(self) -> bool:
        return self.perceptual_loss is not None

    def generator_loss(self, codebook_loss: torch.Tensor, x: torch.Tensor, x_rec: torch.Tensor, step: int,
                       last_layer: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Autoencoder objective (taming's optimizer_idx == 0)."""
        rec_loss = torch.abs(x - x_rec)  # (B, 3, H, W) L1, Eq. 4 Taming Transformers
        p_loss = torch.zeros((), device=x.device)
        if self.perceptual_loss is not None:
            p_loss = self.perceptual_loss(x, x_rec)  # (B, 1, 1, 1) LPIPS, Sec. 3.1 Taming Transformers
            rec_loss = rec_loss + self.cfg.perceptual_weight * p_loss
        nll_loss = torch.mean(rec_loss)
        disc_factor = adopt_weight(self.cfg.disc_factor, step, self.cfg.disc_start)
        g_loss = torch.zeros((), device=x.device)
        d_weight = torch.zeros((), device=x.device)
        if disc_factor > 0:
            g_loss = -torch.mean(self.discriminator(x_rec))  # generator hinge term, Eq. 5 Taming Transformers
            d_weight = calculate_adaptive_weight(nll_loss, g_loss, last_layer, self.cfg.disc_weight)  # Eq. 7
        loss = nll_loss + d_weight * disc_factor * g_loss + self.cfg.codebook_weight * codebook_loss.mean()
        return loss, {"total_loss": loss.item(), "quant_loss": codebook_loss.item(),
                      "rec_loss": torch.abs(x - x_rec).mean().item(), "p_loss": p_loss.mean().item(),
                      "nll_loss": nll_loss.item(), "g_loss": g_loss.item(), "d_weight": d_weight.item(),
                      "disc_factor": disc_factor}

    def discriminator_loss(self, x: torch.Tensor, x_rec: torch.Tensor, step: int
                           ) -> tuple[torch.Tensor, dict[str, float]]:
        """Discriminator objective (taming's optimizer_idx == 1): hinge loss on real vs reconstructed."""
        logits_real = self.discriminator(x.detach())
        logits_fake = self.discriminator(x_rec.detach())
        d_loss = adopt_weight(self.cfg.disc_factor, step, self.cfg.disc_start) * hinge_d_loss(logits_real, logits_fake)
        return d_loss, {"disc_loss": d_loss.item(), "logits_real": logits_real.mean().item(),
                        "logits_fake": logits_fake.mean().item()}


# ---- training loop ---------------------------------------------------------------------------

LOSS_KEYS = ("total_loss", "rec_loss", "p_loss", "quant_loss", "nll_loss", "g_loss", "d_weight", "disc_loss")


def encoder_outputs(model: VQModel, x: torch.Tensor) -> torch.Tensor:
    """Pre-quantization vectors quant_conv(encoder(x)) as rows: (B * h * w, D)."""
    h = model.quant_conv(model.encoder(x))  # (B, D, h, w)
    return h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])  # (B*L, D)


def nearest_code(z: torch.Tensor, codes: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Index of the nearest row of codes (K, D) for every row of z (N, D), in chunks: (N,)."""
    return torch.cat([torch.cdist(z[i:i + chunk], codes).argmin(1) for i in range(0, len(z), chunk)])


@torch.no_grad()
def kmeans_codebook(model: VQModel, images: torch.Tensor, cfg: VQGANTrainConfig, g: torch.Generator,
                    device: str) -> None:
    """Set the codebook to k-means centroids (Lloyd, k-means++-free: random distinct rows to start) of the
    encoder outputs of `cfg.kmeans_images` random training images. Empty clusters restart at random rows."""
    was_training = model.training
    model.eval()
    pick = torch.randperm(len(images), generator=g)[:cfg.kmeans_images]
    z = torch.cat([encoder_outputs(model, images_to_unit(images[pick[i:i + 256]]).to(device))
                   for i in range(0, len(pick), 256)])  # (N*L, D)
    k = model.cfg.n_embed
    if len(z) < k:
        raise ValueError(f"codebook_init=kmeans needs at least n_embed={k} encoder outputs, got {len(z)}")
    codes = z[torch.randperm(len(z), generator=g)[:k].to(z.device)].clone()  # (K, D)
    for _ in range(cfg.kmeans_iters):
        assign = nearest_code(z, codes)  # (N*L,)
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(codes).index_add_(0, assign, z)
        empty = counts == 0
        codes = torch.where(empty[:, None], codes, sums / counts.clamp_min(1)[:, None])
        if empty.any():
            codes[empty] = z[torch.randint(len(z), (int(empty.sum()),), generator=g).to(z.device)]
    model.quantize.embedding.weight.data.copy_(codes)
    model.train(was_training)


@torch.no_grad()
def restart_dead_codes(model: VQModel, usage: torch.Tensor, z: torch.Tensor, opt: torch.optim.Optimizer,
                       g: torch.Generator) -> int:
    """Codes with usage 0 restart at random rows of z (the batch's encoder outputs, (B*L, D)); their Adam
    moments are cleared so that stale steps do not push them away. Returns the number of restarted codes."""
    dead = (usage == 0).nonzero().flatten()
    if len(dead) == 0:
        return 0
    weight = model.quantize.embedding.weight
    rows = torch.randint(len(z), (len(dead),), generator=g).to(z.device)
    weight.data[dead] = z[rows].detach().to(weight.dtype)
    for moment in ("exp_avg", "exp_avg_sq"):
        state = opt.state.get(weight, {})
        if moment in state:
            state[moment][dead] = 0.0
    return len(dead)


def learning_rate(cfg: VQGANTrainConfig, step: int) -> float:
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return cfg.lr * lr_factor(step, 0, cfg.steps - 1, cfg.lr_min_ratio)  # no warm-up; the last step at the floor


class VQGANTraining(Steps):
    """taming's two-optimizer VQGAN training (autoencoder, then discriminator once the GAN is on) as steps of the
    shared loop (bench.train.run_steps), with the training aids (k-means init at step 0, dead-code restarts)."""
    what = "tokenizer"
    owner = "tokenizer"

    def __init__(self, model: VQModel, images: torch.Tensor, cfg: VQGANTrainConfig, device: str):
        self.model, self.images, self.cfg, self.device = model, images, cfg, device
        with torch.random.fork_rng(devices=[]):  # seeded D init without disturbing the caller's RNG
            torch.manual_seed(cfg.seed)
            self.loss_fn = VQLPIPSWithDiscriminator(cfg, model.cfg.in_channels)
        model.to(device).train()
        self.loss_fn.to(device).train()
        if self.loss_fn.perceptual_loss is not None:
            self.loss_fn.perceptual_loss.eval()
        self.disc = self.loss_fn.discriminator
        self.opt_ae = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
        self.opt_disc = torch.optim.Adam(self.disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
        self.last_layer = model.decoder.conv_out.weight  # taming's get_last_layer()
        self.g = torch.Generator().manual_seed(cfg.seed)
        # the init and restarts draw from their own stream, so the batch order is the same with or without them
        self.g_codes = torch.Generator().manual_seed(cfg.seed + 1)
        self.usage = torch.zeros(model.cfg.n_embed, dtype=torch.long, device=device)
        self.restarted = 0
        self.order, self.pos = torch.randperm(len(images), generator=self.g), 0
        self.tail = max(1, cfg.steps // 10)  # the returned losses average the last tenth of training
        self.sums = dict.fromkeys(LOSS_KEYS, 0.0)
        self.seconds = 0.0

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "discriminator": self.disc.state_dict(),
                "opt_ae": self.opt_ae.state_dict(), "opt_disc": self.opt_disc.state_dict(),
                "batch_gen": self.g.get_state(), "code_gen": self.g_codes.get_state(), "order": self.order,
                "pos": self.pos, "usage": self.usage.cpu(), "restarted": self.restarted, "sums": dict(self.sums),
                "seconds": self.seconds}

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.disc.load_state_dict(state["discriminator"])
        self.opt_ae.load_state_dict(state["opt_ae"])
        self.opt_disc.load_state_dict(state["opt_disc"])
        self.g.set_state(state["batch_gen"])
        self.g_codes.set_state(state["code_gen"])
        self.order, self.pos, self.restarted = state["order"], state["pos"], state["restarted"]
        self.usage = state["usage"].to(self.device)
        self.sums, self.seconds = dict(state["sums"]), state["seconds"]

    def next_batch(self) -> torch.Tensor:
        """The next batch of epoch-wise permutations, in [-1, 1] on the device: (B, 3, H, W)."""
        n, bs = len(self.images), self.cfg.batch_size
        if self.pos + bs > n:  # new epoch; the incomplete remainder is dropped
            self.order, self.pos = torch.randperm(n, generator=self.g), 0
        idx = self.order[self.pos:self.pos + bs]
        self.pos += bs
        return images_to_unit(self.images[idx]).to(self.device)

    def autoencoder_step(self, x: torch.Tensor, step: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, float]]:
        """One autoencoder update: (encoder outputs h (B, D, h, w), codes (B, h, w), x_rec, stats)."""
        # D's parameters are frozen so that the GAN term trains only the generator
        self.disc.requires_grad_(False)
        h = self.model.quant_conv(self.model.encoder(x))  # (B, D, h, w): model(x) written out to see z and the codes
        z_q, qloss, codes = self.model.quantize(h)
        x_rec = self.model.decode(z_q)  # (B, 3, H, W)
        ae_loss, stats = self.loss_fn.generator_loss(qloss, x, x_rec, step, self.last_layer)
        for group in self.opt_ae.param_groups:
            group["lr"] = learning_rate(self.cfg, step)
        self.opt_ae.zero_grad(set_to_none=True)
        ae_loss.backward()
        self.opt_ae.step()
        self.disc.requires_grad_(True)
        return h, codes, x_rec, stats

    def count_and_restart(self, step: int, h: torch.Tensor, codes: torch.Tensor) -> None:
        """Code usage since the last restart; every dead_code_every steps the unused codes restart."""
        n_embed = self.model.cfg.n_embed
        self.usage += torch.bincount(codes.flatten(), minlength=n_embed)
        if (step + 1) % self.cfg.dead_code_every == 0 and step + 1 < self.cfg.steps:
            z = h.detach().permute(0, 2, 3, 1).reshape(-1, h.shape[1])  # (B*L, D)
            self.restarted += restart_dead_codes(self.model, self.usage, z, self.opt_ae, self.g_codes)
            self.usage.zero_()

    def discriminator_step(self, x: torch.Tensor, x_rec: torch.Tensor, step: int, stats: dict[str, float]) -> None:
        """One discriminator update once the GAN is on (before, taming's factor 0 makes it a no-op)."""
        stats.update(disc_loss=0.0, logits_real=0.0, logits_fake=0.0)
        if adopt_weight(self.cfg.disc_factor, step, self.cfg.disc_start) > 0:
            d_loss, d_stats = self.loss_fn.discriminator_loss(x, x_rec, step)
            self.opt_disc.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_disc.step()
            stats.update(d_stats)

    def step(self, step: int) -> tuple[dict[str, float], dict[str, str]]:
        t0 = time.time()
        if step == 0 and self.cfg.codebook_init == "kmeans":
            kmeans_codebook(self.model, self.images, self.cfg, self.g_codes, self.device)
        x = self.next_batch()
        h, codes, x_rec, stats = self.autoencoder_step(x, step)
        if self.cfg.dead_code_every > 0:
            self.count_and_restart(step, h, codes)
        self.discriminator_step(x, x_rec, step, stats)
        if not all(math.isfinite(stats[k]) for k in LOSS_KEYS):
            raise TrainingError(f"VQGAN training diverged at step {step + 1}: {stats}")
        if step >= self.cfg.steps - self.tail:
            for k in LOSS_KEYS:
                self.sums[k] += stats[k]
        self.seconds += time.time() - t0
        logged = step % self.cfg.log_every == 0 or step == self.cfg.steps - 1
        record = {f"tokenizer/{k}": float(v) for k, v in stats.items()} if logged else {}
        return record, {"rec": f"{stats['rec_loss']:.4f}", "q": f"{stats['quant_loss']:.4f}",
                        "g": f"{stats['g_loss']:.3f}", "d": f"{stats['disc_loss']:.3f}"}

    def result(self) -> dict[str, float]:
        out = {k: self.sums[k] / self.tail for k in LOSS_KEYS}
        out["lpips"] = 1.0 if self.loss_fn.uses_lpips else 0.0
        out["restarted_codes"] = float(self.restarted)
        out["seconds"] = self.seconds
        return out


def train_vqgan(model: VQModel, images: torch.Tensor, cfg: VQGANTrainConfig, device: str = "cpu",
                log: Callable[[dict[str, float], int], None] | None = None, progress: bool = True,
                work_dir: Path | None = None, stop_after: int | None = None) -> dict[str, float]:
    """Train `model` in place on uint8 images (N, 3, H, W); returns the losses averaged over the
    last tenth of the steps, plus {"lpips": 1.0 if the perceptual term was on else 0.0}.

    Batches are drawn from epoch-wise permutations of a torch.Generator seeded with cfg.seed, and
    the discriminator is initialised under the same seed, so a CPU run is deterministic given the
    model's initial weights. A resumable checkpoint goes to work_dir/tokenizer.ckpt every cfg.ckpt_every
    steps (a temporary folder when work_dir is None) and a rerun resumes from it, equal to an uninterrupted
    run; stop_after ends the run early after that many steps (tests of resume). The model ends in eval mode."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != model.cfg.in_channels:
        raise ValueError(f"train_vqgan expects uint8 (N, {model.cfg.in_channels}, H, W) images, "
                         f"got {images.dtype} {tuple(images.shape)}")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError(f"tokenizer.train: steps={cfg.steps} and batch_size={cfg.batch_size} must be >= 1")
    task = VQGANTraining(model, images, cfg, device)
    with contextlib.ExitStack() as stack:
        folder = Path(work_dir) if work_dir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        folder.mkdir(parents=True, exist_ok=True)
        run_steps(task, cfg.steps, folder / "tokenizer.ckpt", {"arch": asdict(model.cfg), "unit": task.what},
                  ckpt_every=cfg.ckpt_every, log_fn=log, stop_after=stop_after, progress=progress)
    model.eval()
    return task.result()
