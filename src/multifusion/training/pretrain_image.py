"""Self-supervised pretraining of the HNF image trunk (stage ``pretrain_image``) with BYOL.

    pool = pretrain_pool(prepared, cfg.data.unlabeled, cfg.data)     # multifusion.data.unlabeled
    result = pretrain_trunk(pool.images, cfg, log=...)               # -> PretrainResult(stem, losses, ...)
    save_trunk("models/image_trunk", result.stem, card)              # multifusion.training.trunk

BYOL (Grill et al., NeurIPS 2020): an online network (trunk -> projector -> predictor) learns
to predict, from one view of a micrograph, the projection a slowly moving average of itself
(the target: trunk -> projector, EMA of the online weights) gives another view. No negatives,
so it holds at the small batches 2 CPU cores allow; the issue (29) names BYOL and MoCo as the
safest methods on small images, and a 15-epoch SimSiam probe on NCM bought little.

The trunk is the model's own stem (``HierarchicalPatchEmbed(...).stem``, built from the same
``hnf.*`` and ``data.image_size``), so its state dict loads into ``model.embed.stem`` as is.
Its representation is the stem's deepest map, globally pooled: what the model's global token
reads (B, global_dim).

Views (:func:`two_views`). Each view is a random flip / rot90 (micrographs have no canonical
orientation), a shift at the stored resolution (reflect-pad by ``pretrain.shift`` px and crop
back: no re-sampling, so the texture's scale in pixels is kept), and mild Gaussian noise
(detector noise). Deliberately absent: brightness / contrast jitter and resized crops, the
usual BYOL/SimCLR views. On NCM at 64 px grey level and texture scale are the evidence: the
resized crop alone cost ResNet-18 0.40 top-1 and the former jitter defaults 0.46 (NOTES.md,
"Training recipe on real micrographs"); a pretext task that made the trunk invariant to
them would teach it to discard exactly that evidence.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from multifusion.core.config import AugmentConfig, Config, PretrainConfig
from multifusion.core.optim import adamw, optimizer_step, warmup_cosine
from multifusion.core.runtime import seed_everything
from multifusion.data.dataset import augment_batch, normalize, to_unit
from multifusion.model.patch_embed import HierarchicalPatchEmbed
from multifusion.training.trunk import trunk_args

Log = Callable[[int, dict[str, float]], None]  # (epoch, {"loss": ..., "momentum": ..., "lr": ...})


class TrunkEncoder(nn.Module):
    """The HNF stem and its pooled output: x (B, 1, S, S) -> (B, out_dim)."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        args = trunk_args(cfg)
        if args["stem"] == "linear":
            raise ValueError("hnf.stem linear has no trunk to pretrain; set hnf.stem to graph, pyramid or conv, or pretrain.enabled: false")
        embed = HierarchicalPatchEmbed(args["image_size"], args["patch_sizes"], args["dim"], args["stem"], args["stem_width"],
                                       args["stem_depth"])
        self.kind = args["stem"]
        self.stem = embed.stem
        self.out_dim = embed.global_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv":
            return self.stem(x).mean(dim=(2, 3))  # (B, dim, g, g) -> (B, dim)
        _, deepest = self.stem(x)  # graph: (B, w, g, g); pyramid: (B, 8w, S/32, S/32)
        return deepest.mean(dim=(2, 3))  # (B, out_dim)


def mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """BYOL's projector / predictor: Linear -> BatchNorm -> ReLU -> Linear. (B, d_in) -> (B, d_out)."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, d_out))


class BYOL(nn.Module):
    """Online trunk + projector + predictor; target trunk + projector (EMA, no gradients)."""

    def __init__(self, encoder: TrunkEncoder, hidden: int, projection: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = mlp(encoder.out_dim, hidden, projection)
        self.predictor = mlp(projection, hidden, projection)
        self.target_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.target_projector = copy.deepcopy(self.projector).requires_grad_(False)

    def online_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def forward(self, v1: torch.Tensor, v2: torch.Tensor) -> torch.Tensor:
        """Two views (B, 1, S, S) each -> the symmetric BYOL loss (scalar, in [0, 8])."""
        p1 = self.predictor(self.projector(self.encoder(v1)))  # (B, P)
        p2 = self.predictor(self.projector(self.encoder(v2)))  # (B, P)
        with torch.no_grad():
            z1 = self.target_projector(self.target_encoder(v1))  # (B, P)
            z2 = self.target_projector(self.target_encoder(v2))  # (B, P)
        return (regression_loss(p1, z2) + regression_loss(p2, z1)).mean()

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """target <- momentum * target + (1 - momentum) * online (BatchNorm statistics copied)."""
        for online, target in ((self.encoder, self.target_encoder), (self.projector, self.target_projector)):
            for p_o, p_t in zip(online.parameters(), target.parameters()):
                p_t.lerp_(p_o, 1.0 - momentum)
            for b_o, b_t in zip(online.buffers(), target.buffers()):
                b_t.copy_(b_o)


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(p, z) per row: (B, P), (B, P) -> (B,)."""
    return 2.0 - 2.0 * F.cosine_similarity(p, z.detach(), dim=-1)


def target_momentum(base: float, step: int, total: int) -> float:
    """BYOL's schedule: base at step 0, cosine up to 1 at the last step."""
    return 1.0 - (1.0 - base) * (math.cos(math.pi * step / max(1, total)) + 1.0) / 2.0


def shift_crop(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Per image, reflect-pad by ``shift`` px and crop S x S at a random offset: a crop at the
    stored resolution (pixels moved, never re-sampled). x (B, 1, S, S) -> (B, 1, S, S)."""
    if shift <= 0:
        return x
    B, _, S, _ = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), mode="reflect")  # (B, 1, S+2s, S+2s)
    oy = torch.randint(0, 2 * shift + 1, (B,), generator=gen, device=x.device)
    ox = torch.randint(0, 2 * shift + 1, (B,), generator=gen, device=x.device)
    ar = torch.arange(S, device=x.device)
    rows = (oy[:, None] + ar)[:, :, None]  # (B, S, 1)
    cols = (ox[:, None] + ar)[:, None, :]  # (B, 1, S)
    batch = torch.arange(B, device=x.device)[:, None, None]  # (B, 1, 1)
    return padded[batch, 0, rows, cols].unsqueeze(1)  # (B, 1, S, S)


def view(x: torch.Tensor, pretrain: PretrainConfig, gen: torch.Generator) -> torch.Tensor:
    """One random view of a batch in [0, 1] (B, 1, S, S), normalised for the model (see the
    module docstring for why these transforms and no others)."""
    dihedral_noise = AugmentConfig(flips=True, rot90=True, crop_scale=1.0, brightness=0.0, contrast=0.0, noise=pretrain.noise,
                                   info_bar=0.0)
    return normalize(augment_batch(shift_crop(x, pretrain.shift, gen), dihedral_noise, gen))


def two_views(x: torch.Tensor, pretrain: PretrainConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent views of x (B, 1, S, S) in [0, 1]."""
    return view(x, pretrain, gen), view(x, pretrain, gen)


def epoch_batches(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A shuffled epoch in batches; the last partial batch dropped when a full one exists
    (BatchNorm needs 2+ images), the whole pool as one batch when it is smaller than one."""
    order = rng.permutation(n)
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


@dataclass
class PretrainResult:
    stem: nn.Module                              # the online trunk's stem: what train loads
    losses: list[float] = field(default_factory=list)   # mean loss per epoch
    step_losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0


def pretrain_trunk(images: np.ndarray, cfg: Config, log: Log | None = None, max_steps: int | None = None,
                   device: str | torch.device = "cpu") -> PretrainResult:
    """BYOL on uint8 images (N, S, S) for ``cfg.pretrain.epochs`` epochs (or ``max_steps``
    optimizer steps, for tests); deterministic in ``cfg.seed`` on CPU."""
    pretrain = cfg.pretrain
    seed_everything(cfg.seed)
    model = BYOL(TrunkEncoder(cfg), pretrain.hidden_dim, pretrain.projection_dim).to(device)
    rng = np.random.default_rng(cfg.seed)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    steps_per_epoch = len(epoch_batches(len(images), pretrain.batch_size, rng))
    total = steps_per_epoch * pretrain.epochs if max_steps is None else max_steps
    optimizer = adamw(model, pretrain)  # reads .lr and .weight_decay; no decay on biases and norms
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(min(pretrain.warmup_epochs * steps_per_epoch, total // 2), total))
    data = torch.from_numpy(np.array(images))  # (N, S, S) uint8, a writable copy (images may be a read-only mmap)
    result, step, started = PretrainResult(stem=model.encoder.stem), 0, time.perf_counter()
    model.train()
    for epoch in range(pretrain.epochs if max_steps is None else 10**9):
        if step >= total:
            break
        epoch_loss, count = 0.0, 0
        for batch in epoch_batches(len(images), pretrain.batch_size, rng):
            if step >= total:
                break
            x = to_unit(data[torch.from_numpy(batch)].unsqueeze(1).to(device))  # (B, 1, S, S) in [0, 1]
            v1, v2 = two_views(x, pretrain, gen)
            loss = model(v1, v2)
            optimizer_step(loss, optimizer, scheduler, model.online_parameters(), 0.0)
            momentum = target_momentum(pretrain.momentum, step, total)
            model.update_target(momentum)
            step += 1
            result.step_losses.append(float(loss.detach()))
            epoch_loss, count = epoch_loss + result.step_losses[-1] * len(batch), count + len(batch)
        result.losses.append(epoch_loss / max(count, 1))
        if log is not None:
            log(epoch, {"loss": result.losses[-1], "momentum": momentum, "lr": scheduler.get_last_lr()[0]})
    result.seconds, result.steps = time.perf_counter() - started, step
    return result
