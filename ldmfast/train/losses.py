"""First-stage training losses (Rombach et al. 2022, appendix G; Esser et al. 2021, section 3.1).

The autoencoder objective is a reconstruction term (L1 plus an LPIPS-style perceptual distance,
Zhang et al. 2018), a patch-based adversarial term (a PatchGAN discriminator, Isola et al. 2017,
with the hinge loss) weighted adaptively so that its gradient at the decoder's last layer has
the size of the reconstruction's (Esser et al. eq. 7), switched on after ``disc_start`` steps,
and the regulariser: a small KL penalty towards N(0, I) for ``AutoencoderKL`` or the
codebook/commitment loss for ``VQModel``.

The perceptual distance needs pretrained VGG-16 features and LPIPS' learned linear heads. Nothing
is downloaded: ``LPIPS.from_file(path)`` reads them from a local file, and without one the
perceptual term is off (logged once).
"""
from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("ldmfast")

__all__ = ["LPIPS", "NLayerDiscriminator", "hinge_d_loss", "hinge_g_loss", "adaptive_weight",
           "AutoencoderLoss", "DiscriminatorPair"]


# ------------------------------------------------------------------------------- perceptual

# (in, out) of VGG-16's 13 convolutions; "M" is a 2x2 max-pool. Indices into ``features`` follow
# torchvision's ``vgg16().features`` (conv, relu, ..., pool), so its state dict loads as is.
_VGG16 = [(3, 64), (64, 64), "M", (64, 128), (128, 128), "M", (128, 256), (256, 256),
          (256, 256), "M", (256, 512), (512, 512), (512, 512), "M", (512, 512), (512, 512),
          (512, 512)]
# LPIPS reads the activations after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
_TAPS = (3, 8, 15, 22, 29)
_TAP_CHANNELS = (64, 128, 256, 512, 512)


class _Linear(nn.Module):
    """LPIPS' per-layer head: a non-negative 1x1 conv to one channel (key ``model.1.weight``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(0.0), nn.Conv2d(channels, 1, 1, bias=False))

    def forward(self, x):
        return self.model(x)


class LPIPS(nn.Module):
    """d(x, y) = sum_l mean_hw || w_l * (phi_l(x) / |phi_l(x)| - phi_l(y) / |phi_l(y)|) ||^2
    (Zhang et al. 2018, eq. 1) with VGG-16 features phi_l, for images in [-1, 1] -> (B, 1, 1, 1).

    State-dict keys: ``features.<i>.*`` (torchvision's VGG-16) and ``lin<l>.model.1.weight``
    (the LPIPS heads); ``from_file`` also accepts the ``lpips`` package's full module layout
    (``net.slice<k>.<i>.*``). The network is frozen."""

    def __init__(self):
        super().__init__()
        layers = []
        for item in _VGG16:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(item[0], item[1], 3, padding=1), nn.ReLU(inplace=False)]
        self.features = nn.Sequential(*layers)
        for i, c in enumerate(_TAP_CHANNELS):
            self.add_module(f"lin{i}", _Linear(c))
        # ImageNet statistics of [-1, 1] images (LPIPS' ScalingLayer)
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1),
                             persistent=False)
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_file(cls, path) -> "LPIPS":
        """Pretrained weights from a local ``.safetensors``/``.pth`` file (see the class doc)."""
        if not os.path.isfile(path):
            raise ValueError(f"LPIPS weights file {path!r} does not exist (nothing is downloaded)")
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        out = {}
        for k, v in sd.items():
            if k.startswith("net.slice"):  # lpips.LPIPS: net.slice<k>.<index in features>.*
                k = "features." + k.split(".", 2)[2]
            out[k] = v
        model = cls()
        missing, unexpected = model.load_state_dict(
            {k: v for k, v in out.items() if k.startswith(("features.", "lin"))}, strict=False)
        if missing:
            raise ValueError(f"LPIPS weights file {path!r} lacks {len(missing)} tensors, "
                             f"e.g. {missing[:3]}")
        return model

    def train(self, mode: bool = True):
        return super().train(False)  # always frozen, whatever the parent module does

    def forward(self, x, y):
        x = (x - self.shift) / self.scale
        y = (y - self.shift) / self.scale
        total = 0.0
        tap = 0
        for i, layer in enumerate(self.features):
            x, y = layer(x), layer(y)
            if i == _TAPS[tap]:
                fx = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                fy = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
                head = getattr(self, f"lin{tap}")
                total = total + head((fx - fy) ** 2).mean(dim=(2, 3), keepdim=True)
                tap += 1
                if tap == len(_TAPS):
                    break
        return total


# ---------------------------------------------------------------------------- discriminator

class NLayerDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): stride-2 4x4 convs with BatchNorm and LeakyReLU(0.2), then a
    stride-1 layer and a one-channel 4x4 conv, giving one logit per overlapping patch.
    ``main`` indices follow taming-transformers' layout."""

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        seq = [nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2 ** n, 8)
            seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, 2, 1, bias=False),
                    nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        prev, mult = mult, min(2 ** n_layers, 8)
        seq += [nn.Conv2d(ndf * prev, ndf * mult, 4, 1, 1, bias=False),
                nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True),
                nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
        self.main = nn.Sequential(*seq)
        # DCGAN initialisation (Radford et al. 2016), as taming's weights_init
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


def hinge_d_loss(logits_real, logits_fake):
    """Discriminator hinge loss: (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))]) / 2."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake):
    """The generator's side of the hinge game: -E[D(G(z))]."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss, g_loss, last_layer, max_weight: float = 1e4):
    """lambda = ||grad_L rec|| / (||grad_L g|| + 1e-4), clipped to [0, max_weight] and
    detached, with L the decoder's last layer (Esser et al. 2021, eq. 7)."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = g_rec.norm() / (g_adv.norm() + 1e-4)
    return w.clamp(0.0, max_weight).detach()


class AutoencoderLoss(nn.Module):
    """The first-stage objective, as CompVis' ``LPIPSWithDiscriminator`` (KL) and
    ``VQLPIPSWithDiscriminator`` (VQ).

    ``generator_loss(x, recon, reg, step, last_layer)`` -> (loss, logs) for the autoencoder
    (``reg``: the posterior for KL, the codebook loss for VQ); ``discriminator_loss(x, recon,
    step)`` -> (loss, logs) for ``self.discriminator``. For KL the reconstruction term is the
    Gaussian negative log-likelihood with one learned log-variance, summed over pixels and
    averaged over the batch, as the original; for VQ it is the mean.
    """

    def __init__(self, kind: str = "kl", disc_start: int = 0, kl_weight: float = 1e-6,
                 codebook_weight: float = 1.0, pixel_weight: float = 1.0,
                 perceptual_weight: float = 1.0, perceptual_path: str | None = None,
                 disc_weight: float = 0.5, disc_factor: float = 1.0, disc_layers: int = 3,
                 disc_channels: int = 64, logvar_init: float = 0.0, in_channels: int = 3,
                 pixel_loss: str = "l1"):
        super().__init__()
        if kind not in ("kl", "vq"):
            raise ValueError(f"AutoencoderLoss: kind {kind!r} is not 'kl' or 'vq'")
        if pixel_loss not in ("l1", "l2"):
            raise ValueError(f"AutoencoderLoss: pixel_loss {pixel_loss!r} is not 'l1' or 'l2'")
        self.kind = kind
        self.pixel_loss = pixel_loss
        self.disc_start, self.disc_weight, self.disc_factor = disc_start, disc_weight, disc_factor
        self.kl_weight, self.codebook_weight = kl_weight, codebook_weight
        self.pixel_weight = pixel_weight
        self.perceptual = None
        if perceptual_weight > 0 and perceptual_path:
            self.perceptual = LPIPS.from_file(perceptual_path)
            log.info("perceptual loss: LPIPS weights from %s", perceptual_path)
        elif perceptual_weight > 0:
            log.info("perceptual loss is off: no LPIPS weights file given "
                     "(--lpips PATH; nothing is downloaded)")
        self.perceptual_weight = perceptual_weight if self.perceptual is not None else 0.0
        if kind == "kl":
            self.logvar = nn.Parameter(torch.full((), float(logvar_init)))
        self.discriminator = NLayerDiscriminator(in_channels, disc_channels, disc_layers)

    def state_dict(self, *args, **kwargs):
        # the frozen perceptual network is data, not state: keep it out of training checkpoints
        sd = super().state_dict(*args, **kwargs)
        return type(sd)((k, v) for k, v in sd.items() if not k.startswith("perceptual."))

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        keep = {k: v for k, v in self.perceptual.state_dict().items()} if self.perceptual else {}
        state = dict(state_dict)
        state.update({f"perceptual.{k}": v for k, v in keep.items()})
        return super().load_state_dict(state, strict=strict, assign=assign)

    def disc_active(self, step: int) -> bool:
        return self.disc_factor > 0 and step >= self.disc_start

    def reconstruction(self, x, recon):
        """Per-pixel |x - recon| (or its square, ``pixel_loss="l2"``) plus the weighted
        perceptual distance (broadcast per image)."""
        d = x - recon
        rec = self.pixel_weight * (d.abs() if self.pixel_loss == "l1" else d * d)
        if self.perceptual is not None:
            rec = rec + self.perceptual_weight * self.perceptual(x.contiguous(), recon.contiguous())
        return rec

    def generator_loss(self, x, recon, reg, step: int, last_layer=None):
        rec = self.reconstruction(x, recon)
        logs = {"l1": (x - recon).abs().mean().detach()}
        if self.kind == "kl":
            nll = (rec / torch.exp(self.logvar) + self.logvar).sum() / x.shape[0]
            kl = reg.kl().sum() / x.shape[0]
            loss = nll + self.kl_weight * kl
            logs.update(nll=nll.detach(), kl=kl.detach(), logvar=self.logvar.detach())
        else:
            nll = rec.mean()
            loss = nll + self.codebook_weight * reg.mean()
            logs.update(nll=nll.detach(), codebook=reg.detach().mean())
        if self.disc_active(step):
            # the generator's pass leaves no gradient in the discriminator's parameters
            d = self.discriminator
            d.requires_grad_(False)
            try:
                g = hinge_g_loss(d(recon.contiguous()))
            finally:
                d.requires_grad_(True)
            if self.training and last_layer is not None:
                w = adaptive_weight(nll, g, last_layer) * self.disc_weight
            else:
                w = torch.tensor(0.0, device=x.device)
            loss = loss + w * self.disc_factor * g
            logs.update(g_loss=g.detach(), d_weight=w)
        logs["loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(self, x, recon, step: int, pair=None):
        """Hinge loss of the discriminator on real images and detached reconstructions; None
        before ``disc_start``. ``pair`` (default ``DiscriminatorPair(self.discriminator)``)
        maps (real, fake) to their logits in one call, so that a DDP wrapper of it sees one
        forward per backward."""
        if not self.disc_active(step):
            return None, {}
        pair = pair if pair is not None else DiscriminatorPair(self.discriminator)
        real, fake = pair(x.detach(), recon.detach())
        loss = self.disc_factor * hinge_d_loss(real, fake)
        return loss, {"d_loss": loss.detach(), "logits_real": real.mean().detach(),
                      "logits_fake": fake.mean().detach()}


class DiscriminatorPair(nn.Module):
    """Logits of real and fake images in separate passes (so BatchNorm normalises fakes as in
    the generator's pass) inside one forward."""

    def __init__(self, discriminator: nn.Module):
        super().__init__()
        self.discriminator = discriminator

    def forward(self, real, fake):
        return self.discriminator(real.contiguous()), self.discriminator(fake.contiguous())
