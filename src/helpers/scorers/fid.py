"""Fréchet distance between real and generated images with torchmetrics' `FrechetInceptionDistance`.

Paper profile: the standard Inception-v3 pool features (2048-d; needs `torch-fidelity`, which downloads the
Inception weights once). Offline: CLIP image embeddings from a local CLIP folder. The two are different metrics
on different scales; a table says which features it used.
"""
from __future__ import annotations

import hashlib
import importlib.util
import itertools
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..distributed import is_main_process
from .base import in_fitting_batches, pixels_in_threads, pooled

INCEPTION = "inception"


class ClipFeatureExtractor(nn.Module):
    """CLIP image embeddings as FID features; takes uint8 (N, 3, H, W) tensors, as torchmetrics passes them."""

    def __init__(self, source: str | Path, device: str = "cpu"):
        super().__init__()
        from ..models import load_clip

        self.clip, processor = load_clip(str(source), device)
        image_processor = processor.image_processor
        crop = getattr(image_processor, "crop_size", None) or image_processor.size
        self.size = (crop["height"], crop["width"]) if "height" in crop else (crop["shortest_edge"],) * 2
        self.register_buffer("mean", torch.tensor(image_processor.image_mean).view(1, 3, 1, 1).to(device))
        self.register_buffer("std", torch.tensor(image_processor.image_std).view(1, 3, 1, 1).to(device))
        self.num_features = int(self.clip.config.projection_dim)  # torchmetrics reads this to size its statistics

    def train(self, mode: bool = True) -> "ClipFeatureExtractor":
        # torchmetrics' Metric starts in training mode and would switch CLIP's dropout on; features stay eval-mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images in [0, 255], got {images.dtype}; convert with (x * 255).byte()")
        pixels = images.to(self.mean.device, torch.float32) / 255
        # resize the whole image (no crop) so every pixel counts, as Inception's FID resize does
        pixels = nn.functional.interpolate(pixels, size=self.size, mode="bicubic", antialias=True).clamp(0, 1)
        pixels = ((pixels - self.mean) / self.std).to(self.clip.dtype)
        return pooled(self.clip.get_image_features(pixel_values=pixels)).float()


def fid_metric(feature: str | Path = INCEPTION, device: str = "cpu"):
    """A torchmetrics FrechetInceptionDistance on Inception-v3 (2048-d) or on the CLIP at path/hub id `feature`."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if str(feature) != INCEPTION:
        return FrechetInceptionDistance(feature=ClipFeatureExtractor(feature, device)).to(device)
    if importlib.util.find_spec("torch_fidelity") is None:
        raise ModuleNotFoundError("feature='inception' needs the Inception-v3 weights from torch-fidelity: run "
                                  "`pip install torch-fidelity`, or pass a CLIP folder as `feature` to work offline")
    return FrechetInceptionDistance(feature=2048).to(device)


def as_uint8(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """RGB images resized to size × size, as one uint8 (N, 3, size, size) tensor."""
    arrays = [np.asarray(image.convert("RGB").resize((size, size), Image.BICUBIC)) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


class FeatureRows:
    """FID feature rows by image key (float32, as the network gives them), and the FIDs of any subsets of them:
    what `FidFeatures` holds once it has embedded images, or rows from anywhere else."""

    def __init__(self, by_key: dict[str, np.ndarray] | None = None, holds_rows: bool = True):
        self.by_key: dict[str, np.ndarray | None] = {} if by_key is None else by_key  # None: a row kept elsewhere
        self.holds_rows = holds_rows

    def has(self, key: str) -> bool:
        """Whether the image `key`'s row is known (embedded by this object or read from the store)."""
        return key in self.by_key

    def _check_known(self, keys: Sequence[str]) -> None:
        missing = [key for key in keys if key not in self.by_key]
        if missing:
            raise KeyError(f"no FID features for {len(missing)} image(s), e.g. {missing[0]!r}: embed them first "
                           "(call this object with the images and their keys)")
        if not self.holds_rows:
            raise RuntimeError("this process knows which images have FID features but holds no rows (they are held "
                               "by the main process only: rows_on_main_only=True); compute FIDs on the main process")

    def rows(self, keys: Sequence[str], dtype=np.float64) -> np.ndarray:
        """The rows of images embedded before, by key (no pixels needed). float32 holds them exactly, in half the
        memory (~3 GB for ChatGen's ~400,000 Inception rows); `frechet_distance` computes in float64 either way."""
        self._check_known(keys)
        return np.stack([self.by_key[key] for key in keys]).astype(dtype, copy=False) if keys else np.zeros((0, 0))

    def moments(self, keys: Sequence[str], chunk: int = 4096) -> FeatureMoments:
        """The `FeatureMoments` of the images `keys`' rows, `chunk` rows at a time: FID of a set of any size in
        the memory of one chunk, where `rows(keys)` would copy the whole set."""
        self._check_known(keys)
        return FeatureMoments.of((self.by_key[key] for key in keys), chunk)


class FidFeatures(FeatureRows):
    """The features FID compares, from the very network torchmetrics' FID runs (Inception-v3 pool, or a CLIP's
    image embeddings), one float64 row per image. With keys, an image already embedded is not embedded again, so a
    stage computes each image's features once and any number of FIDs over subsets from them. Under a
    multi-process launch the images still to embed are split across processes and every process gets every row,
    or, with `rows_on_main_only`, only the main process keeps them and the others know which images have one (`has`),
    which is all that deciding what to draw needs (notebook 11: ~3.3 GB fewer per process at paper scale);
    `extracted` counts the images this process embedded.

    `image_size`: each image is resized to this square first (None: the network's own input size).
    With a `store` folder the rows also go to disk, under the features' identity (the network's weights and
    `image_size`), one file per call that embedded something: a rerun, or a stage that removed its images once
    scored (`ScoringRun.generate_and_score(keep=…, also=…)`), reads them back instead of the pixels.
    """

    def __init__(self, feature: str | Path = INCEPTION, device: str = "cpu", image_size: int | None = 299,
                 batch_size: int = 32, store: str | Path | None = None, rows_on_main_only: bool = False):
        self.extractor = fid_metric(feature, device).inception
        # None: the network's own input side (Inception's 299, a CLIP's crop), so no detail is lost on the way in
        image_size = image_size or max(getattr(self.extractor, "size", (299,)))
        super().__init__(holds_rows=not rows_on_main_only or is_main_process())
        self.device, self.image_size, self.batch_size = device, image_size, batch_size
        self.extracted = 0
        self.features_id = f"{features_identity(feature)}-{image_size}px"
        self.store = None if store is None else Path(store) / self.features_id.replace("/", "--")
        self._read_files: set[str] = set()
        self._read_store()

    def _read_store(self) -> None:
        """Rows from store files not read yet (a file is written whole, then renamed into place)."""
        if self.store is None or not self.store.is_dir():
            return
        for path in sorted(self.store.glob("*.npz")):
            if path.name not in self._read_files:
                with np.load(path, allow_pickle=False) as saved:  # each array is read only when asked for
                    keys = saved["keys"].tolist()
                    self.by_key.update(zip(keys, saved["rows"]) if self.holds_rows else dict.fromkeys(keys))
                self._read_files.add(path.name)

    def _write_store(self, keys: Sequence[str], rows: Sequence[np.ndarray]) -> None:
        if self.store is None or not keys or not is_main_process():  # every process holds the same rows; one writes
            return
        self.store.mkdir(parents=True, exist_ok=True)
        name = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:20] + ".npz"
        part = self.store / f".{name}.part"
        with open(part, "wb") as handle:
            np.savez(handle, keys=np.array(list(keys)), rows=np.stack(rows))
        os.replace(part, self.store / name)
        self._read_files.add(name)

    def _embed(self, images: Sequence[Image.Image]) -> list[np.ndarray]:
        @torch.no_grad()
        def features(batch, _):
            found = self.extractor(pixels_in_threads(lambda chunk: as_uint8(chunk, self.image_size), batch).to(
                self.device))
            return found.reshape(len(batch), -1)
        # kept as the network gives them (float32), so the store holds them exactly; FID reads float64
        rows = in_fitting_batches(self, features, images)
        self.extracted += len(images)
        return rows

    def __call__(self, images: Sequence, keys: Sequence[str] | None = None) -> np.ndarray | None:
        """One float64 row per image (PIL images, or anything with a `.image`, such as `t2i.Generated`); with keys,
        `add` then `rows(keys)`, and None on a process that holds no rows (`rows_on_main_only`)."""
        if keys is not None:
            self.add(images, keys)
            return self.rows(keys) if self.holds_rows else None
        rows = self._embed_sharded(images, list(range(len(images))))
        return np.stack(rows).astype(np.float64) if images else np.zeros((0, 0))

    def add(self, images: Sequence, keys: Sequence[str]) -> None:
        """Embeds the images whose keys have no row yet (a key twice in one call once) and keeps their rows, on disk
        too with a store. Returns nothing, so a loop that only fills the rows (`ScoringRun.generate_and_score`'s
        `also`) builds no float64 copy of each block's rows to throw away."""
        from ..distributed import broadcast_from_main

        if len(keys) != len(images):
            raise ValueError(f"got {len(keys)} keys for {len(images)} images; pass one key per image (or none)")
        # the main process's view decides what is left to embed, so every process enters the sharded call with the
        # same list; a row it knows that this one does not was written to the store since this one read it
        known = broadcast_from_main([key in self.by_key for key in keys])
        todo = sorted({keys[i]: i for i in reversed(range(len(keys))) if not known[i]}.values())
        if any(known[i] and keys[i] not in self.by_key for i in range(len(keys))):
            self._read_store()
        new = dict(zip((keys[i] for i in todo), self._embed_sharded(images, todo)))
        self._write_store(list(new), list(new.values()))
        self.by_key.update(new if self.holds_rows else dict.fromkeys(new))

    def _embed_sharded(self, images: Sequence, indices: list[int]) -> list[np.ndarray]:
        """The rows of `images[i]` for i in `indices`, in that order, split across the processes of a launch."""
        from ..distributed import map_sharded
        from ..t2i import decoded

        return map_sharded(lambda share: self._embed(decoded([images[i] for i in share])), indices,
                           chunk=self.batch_size)


def features_identity(feature: str | Path) -> str:
    """What FID features are computed with: Inception-v3 (torch-fidelity's weights), or a CLIP's weights
    (a hash of a local folder's files; a hub id as is)."""
    from .base import local_weight_files, weights_id

    if str(feature) == INCEPTION:
        return "inception-v3-fid"
    return "clip-" + weights_id(feature, *local_weight_files(feature))


class FeatureMoments:
    """All FID needs from one set of feature rows: their count, sum and sum of outer products, in float64, as
    torchmetrics' FID keeps them. Built a chunk of rows at a time and added up (`+`), so the FID of a set of
    hundreds of thousands of images never holds the set's rows at once, in either precision: 2048-d Inception
    rows take 32 MB of moments, where 400,000 of them take 3.3 GB as float32 and 6.6 GB as float64."""

    def __init__(self, dim: int):
        self.count = 0
        self.total = np.zeros(dim)
        self.outer = np.zeros((dim, dim))

    @classmethod
    def of(cls, rows, chunk: int = 4096) -> "FeatureMoments":
        """The moments of `rows`: an array (one row per image), or any iterable of rows, read `chunk` at a time."""
        if isinstance(rows, np.ndarray):
            if rows.ndim != 2:
                raise ValueError(f"expected one row of features per image, got an array of shape {rows.shape}")
            blocks = (rows[start:start + chunk] for start in range(0, len(rows), chunk))
        else:
            blocks = _stacked(rows, chunk)
        moments: FeatureMoments | None = None
        for block in blocks:
            moments = (moments or cls(block.shape[1])).add(block)
        return moments or cls(0)

    def add(self, block: np.ndarray) -> "FeatureMoments":
        """Adds a (rows, dim) block of feature rows (any float dtype; summed in float64) and returns self."""
        block = np.asarray(block, dtype=np.float64)
        if block.ndim != 2 or block.shape[1] != len(self.total):
            raise ValueError(f"expected rows of {len(self.total)} features, got an array of shape {block.shape}")
        self.count += len(block)
        self.total += block.sum(0)
        self.outer += block.T @ block
        return self

    def __add__(self, other: "FeatureMoments") -> "FeatureMoments":
        """The moments of both sets together (a new object; an empty side adds nothing)."""
        return FeatureMoments.summed([self, other])

    @classmethod
    def summed(cls, sets: Sequence["FeatureMoments"]) -> "FeatureMoments":
        """The moments of all `sets` together, in one new object (not one per addition, as `+` makes them)."""
        parts = [moments for moments in sets if moments.count]
        dims = list(dict.fromkeys(len(moments.total) for moments in parts))
        if len(dims) > 1:
            raise ValueError(f"cannot add moments of {' and of '.join(map(str, dims))} features")
        added = cls(dims[0] if dims else len(sets[0].total) if sets else 0)
        for moments in parts:
            added.count += moments.count
            added.total += moments.total
            added.outer += moments.outer
        return added

    def __sub__(self, part: "FeatureMoments") -> "FeatureMoments":
        """The moments of this set without `part`, rows it holds (a new object): a set that lacks a few rows of a
        larger one is that one's sums less theirs, instead of all of its own rows read again."""
        if part.count > self.count or (part.count and len(part.total) != len(self.total)):
            raise ValueError(f"cannot take {part.count} rows of {len(part.total)} features out of {self.count} rows "
                             f"of {len(self.total)}: pass rows the set holds")
        left = FeatureMoments(len(self.total))
        left.count = self.count - part.count
        if part.count:  # an empty part (of any width) takes nothing away
            left.total, left.outer = self.total - part.total, self.outer - part.outer
        else:
            left.total, left.outer = self.total.copy(), self.outer.copy()
        return left

    def __len__(self) -> int:
        return self.count

    def mean_and_covariance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 mean and unbiased covariance, (Σxxᵀ − n μμᵀ) / (n − 1)."""
        mean = torch.from_numpy(self.total / self.count)
        outer = torch.from_numpy(self.outer)
        return mean, (outer - self.count * torch.outer(mean, mean)) / (self.count - 1)


def _stacked(rows, chunk: int):
    """(chunk, dim) arrays of up to `chunk` rows each, from any iterable of rows."""
    iterator = iter(rows)
    while taken := list(itertools.islice(iterator, chunk)):
        yield np.stack(taken)


def frechet_distance(real, generated) -> float:
    """FID from two feature sets, each an array (rows = images) or its `FeatureMoments`, ≥ 2 images each, as
    torchmetrics computes it: float64 means, unbiased covariances,
    ‖μ_r − μ_g‖² + Tr(Σ_r) + Tr(Σ_g) − 2 Σ √eig(Σ_r Σ_g)."""
    for side, rows in (("real", real), ("generated", generated)):
        if len(rows) < 2:
            raise ValueError(f"FID needs at least 2 images per set (a covariance), got {len(rows)} {side}_images; "
                             "pass more images")
    (mu1, sigma1), (mu2, sigma2) = (
        (rows if isinstance(rows, FeatureMoments) else FeatureMoments.of(np.asarray(rows))).mean_and_covariance()
        for rows in (real, generated))
    return float((mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * root_trace(sigma1, sigma2))


def root_trace(sigma1: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """Σ √eig(Σ₁Σ₂), the trace of the product's matrix square root, for covariances Σ₁, Σ₂.

    When either is positive definite (a set of more images than features, as any paper-scale set), say Σ₁ = L Lᵀ,
    Σ₁Σ₂ is similar to the symmetric Lᵀ Σ₂ L (= L⁻¹ Σ₁Σ₂ L), whose eigenvalues a symmetric solver finds, real and
    ≥ 0 up to rounding: for 2048 × 2048 Inception covariances ~2.3× (one core) to ~3.7× (two) faster than the
    general eigenvalues of Σ₁Σ₂ torchmetrics takes, which remain for two singular covariances (fewer images than
    features, as in the tiny profile). Either way the same value, to rounding."""
    for first, second in ((sigma1, sigma2), (sigma2, sigma1)):
        factor, info = torch.linalg.cholesky_ex(first)
        if int(info) == 0:
            return torch.linalg.eigvalsh(factor.T @ second @ factor).clamp(min=0).sqrt().sum()
    return torch.linalg.eigvals(sigma1 @ sigma2).sqrt().real.sum()


def fid_score(real_images: Sequence[Image.Image], generated_images: Sequence[Image.Image],
              feature: str | Path = INCEPTION, batch_size: int = 32, device: str = "cpu",
              image_size: int = 299) -> float:
    """FID between two image sets (each ≥ 2 images), on Inception-v3 features or those of a CLIP `feature`."""
    features = FidFeatures(feature, device, image_size, batch_size)
    return frechet_distance(features(real_images), features(generated_images))
