"""What every scorer shares: fetching a weights file from a folder or the hub, and a weights identity."""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, Sequence

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # pragma: no cover
    import torch


class ImageScorer(Protocol):
    """Scores images (optionally against their prompts). `weights_id` names the weights for the score cache."""

    name: str
    weights_id: str

    def score(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> np.ndarray: ...


class LoadedOnUse:
    """A model loaded the first time one of its attributes is used, under a weights id known without loading it:
    blocks of a long run share one copy, and a run whose answers are all cached never loads it."""

    def __init__(self, load, weights_id: str):
        self._load, self._model, self.weights_id = load, None, weights_id

    @property
    def loaded(self) -> bool:
        return self._model is not None

    def __getattr__(self, name: str):
        if name.startswith("_"):  # never load for private or dunder look-ups (copy, pickle)
            raise AttributeError(name)
        if self._model is None:
            self._model = self._load()
        return getattr(self._model, name)


def is_local(source: str | Path) -> bool:
    return Path(source).exists()


def fetch(source: str | Path, filename: str) -> Path:
    """`filename` inside a local folder, or downloaded once from hub repo `source` (paper profile)."""
    if is_local(source):
        path = Path(source) / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; the folder {source} does not hold a {filename}")
        return path
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(str(source), filename))


def weights_id(source: str | Path, *files: Path) -> str:
    """A short identity for the weights: the hub id, or a hash of the local files (so retrained weights differ)."""
    if not is_local(source):
        return str(source)
    digest = hashlib.sha256()
    for path in sorted(Path(f) for f in files):
        digest.update(path.name.encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return f"{Path(source).name}@{digest.hexdigest()[:16]}"


def precision_id(ident: str, dtype: "torch.dtype | None") -> str:
    """A scorer's cache identity: its weights' `ident`, with the dtype it computes in where that is not float32
    (bf16 moves CLIP, HPS and ImageReward scores by up to ~0.02 and can flip a VQA answer), so the score cache never
    hands a bf16 value to a float32 run or back. float32 scorers keep the bare weights id every cache held so far."""
    import torch

    if dtype is None or dtype == torch.float32:
        return ident
    return f"{ident}#{str(dtype).removeprefix('torch.')}"


def rgb(images: Sequence[Image.Image]) -> list[Image.Image]:
    """Every image as RGB (scorers are trained on RGB; PNGs may carry alpha)."""
    return [image.convert("RGB") for image in images]


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")


def local_weight_files(source: str | Path) -> list[Path]:
    """Every weights file under a local folder, sub-folders included (for `weights_id`); none for a hub id."""
    if not is_local(source):
        return []
    return sorted(p for p in Path(source).rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file())


def pooled(output):
    """The tensor from `get_image_features` / `get_text_features` (transformers 5 wraps it in an output object)."""
    return getattr(output, "pooler_output", output)


# OpenAI CLIP's pixel statistics; ImageReward and HPS both normalise with them.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def local_file(source: str | Path, filename: str) -> Path | None:
    """`filename` in local folder `source` when it is there, else None (optional files never go to the hub)."""
    path = Path(source) / filename
    return path if is_local(source) and path.is_file() else None


# threads that turn images into a scorer's pixels (PIL's resize and numpy's arithmetic run without the GIL):
# up to 8, the cores shared by the processes of a launch on this machine
PREPROCESS_WORKERS = max(1, min(8, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))
_preprocess_pool = None


def chunks_in_threads(fn, items: Sequence, workers: int | None = None) -> list:
    """`fn(chunk)` for consecutive chunks of `items`, one chunk per thread (up to `workers`, by default
    PREPROCESS_WORKERS), results in chunk order; a plain call when there is one worker or one item."""
    from concurrent.futures import ThreadPoolExecutor

    global _preprocess_pool
    workers = PREPROCESS_WORKERS if workers is None else workers
    if workers <= 1 or len(items) < 2:
        return [fn(items)]
    if _preprocess_pool is None or _preprocess_pool._max_workers < workers:
        _preprocess_pool = ThreadPoolExecutor(max(workers, PREPROCESS_WORKERS), thread_name_prefix="preprocess")
    size = -(-len(items) // workers)
    return list(_preprocess_pool.map(fn, [items[start:start + size] for start in range(0, len(items), size)]))


def pixels_in_threads(transform, images: Sequence, workers: int | None = None) -> "torch.Tensor":
    """`transform(images)` (one row per image, a tensor) over chunks of `images` in threads, rows in order.

    A scorer's preprocessing (resize, crop, normalise) is ~3 ms per 512 px image on one CPU thread, more than the
    GPU needs to score it; every image is transformed on its own, so the result equals one call."""
    import torch

    return torch.cat(chunks_in_threads(transform, images, workers))


def in_fitting_batches(owner, score_batch, images: Sequence, prompts: Sequence[str] | None = None) -> list:
    """`score_batch(images, prompts)` (a tensor, one value or row per image) over batches of at most
    `owner.batch_size` images; the rows as float32 numpy, in input order (prompts None: `score_batch` gets None).

    A batch that runs out of accelerator memory is scored again in halves, and `owner.batch_size` keeps the size
    that fitted for later calls (`speed.fitting_batches`): the paper recipe's batches are sized for an 80 GB GPU."""
    from ..speed import fitting_batches

    if prompts is not None and len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; pass one prompt per image")

    def batch(indices: list[int]) -> list:
        found = score_batch([images[i] for i in indices], None if prompts is None else [prompts[i] for i in indices])
        return list(found.detach().float().cpu().numpy())
    rows, owner.batch_size = fitting_batches(batch, range(len(images)), owner.batch_size,
                                             f"{getattr(owner, 'name', type(owner).__name__)} scoring")
    return rows


def normalize(pixels: "torch.Tensor", mean=CLIP_MEAN, std=CLIP_STD) -> "torch.Tensor":
    """(B, 3, H, W) pixels in [0, 1] → normalised with per-channel mean and std."""
    import torch

    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def resize_center_crop(images: Sequence[Image.Image], size: int) -> "torch.Tensor":
    """torchvision's Resize(size, bicubic) + CenterCrop(size) on PIL images: (B, 3, size, size) in [0, 1]."""
    import torch

    tensors = []
    for image in rgb(images):
        width, height = image.size
        # torchvision truncates the long side (int(size * long / short)); match it rather than round()
        new_size = (size, int(size * height / width)) if width <= height else (int(size * width / height), size)
        if new_size != image.size:
            image = image.resize(new_size, Image.BICUBIC)
        left, top = int(round((new_size[0] - size) / 2.0)), int(round((new_size[1] - size) / 2.0))
        image = image.crop((left, top, left + size, top + size))
        tensors.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))
    return torch.stack(tensors)


def load_checkpoint(path: Path) -> dict:
    """A torch checkpoint of plain tensors, read on the CPU without running pickled code."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


@contextmanager
def skip_weight_init():
    """Build a model without random init (its weights are loaded right after; saves seconds on ViT-L/H)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers: plain init, only slower
        yield
        return
    with no_init_weights():
        yield


def load_checked(model, mapped: dict, original_name, what: str, missing_hint: str, shape_hint: str) -> None:
    """`model.load_state_dict(mapped)` after checks whose errors name keys as the original checkpoint spells them."""
    expected = model.state_dict()
    missing = sorted({original_name(key) for key in expected if key not in mapped})
    if missing:
        raise KeyError(f"the {what} lacks {len(missing)} needed keys, e.g. {missing[:3]}; {missing_hint}")
    misshapen = [f"{original_name(key)}: {tuple(mapped[key].shape)} ≠ {tuple(value.shape)}"
                 for key, value in expected.items() if mapped[key].shape != value.shape]
    if misshapen:
        raise ValueError(f"{what} does not fit the configured architecture ({len(misshapen)} keys): "
                         f"{misshapen[:3]}; {shape_hint}")
    model.load_state_dict(mapped, strict=True)
