"""A deterministic, Civitai-shaped catalog of models and images for the local server.

It reproduces the shapes and quirks of the real API that the crawler and the filters must cope with:
several model types and base models, NSFW levels, versions without downloadable files, images without
`meta`, `meta.Size` differing from the stored file size (hires upscale), LoRA tags inside prompts,
resources referenced by hash (some unknown to the API), HTML descriptions, old and new stats fields,
unknown extra keys. Everything derives from one seed, so every run serves the same catalog.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

TYPES = [("Checkpoint", 0.40), ("LORA", 0.42), ("TextualInversion", 0.06), ("LoCon", 0.04), ("Controlnet", 0.03),
         ("VAE", 0.02), ("Hypernetwork", 0.03)]
BASE_MODELS = [("SD 1.5", 0.50), ("SDXL 1.0", 0.34), ("Pony", 0.07), ("SD 2.1", 0.04), ("Flux.1 D", 0.05)]
SAMPLERS = [("Euler a", 0.22), ("DPM++ 2M Karras", 0.25), ("DPM++ SDE Karras", 0.12), ("Euler", 0.08), ("DDIM", 0.06),
            ("DPM++ 2M", 0.06), ("UniPC", 0.05), ("Heun", 0.03), ("LMS", 0.03), ("DPM2 a", 0.02), ("DPM2", 0.02),
            ("PNDM", 0.02), ("DPM++ 2M SDE Karras", 0.03), ("Restart", 0.01)]
SIZES = {"SD 1.5": [(512, 512), (512, 768), (768, 512), (512, 912), (640, 960), (576, 832)],
         "SDXL 1.0": [(1024, 1024), (832, 1216), (1216, 832), (896, 1152), (768, 1344)]}
SUBJECTS = ["castle", "portrait of a woman", "old man", "cyberpunk city", "forest", "dragon", "cat", "mountain lake",
            "space station", "samurai", "flower garden", "robot", "sports car", "lighthouse", "bowl of ramen",
            "knight in armor", "village street", "waterfall", "astronaut", "fox", "desert ruins", "sailing ship"]
STYLES = ["photorealistic", "anime", "oil painting", "watercolor", "3d render", "pixel art", "comic", "cinematic",
          "fantasy art", "concept art", "ink sketch", "low poly"]
MODIFIERS = ["masterpiece", "best quality", "highly detailed", "8k", "soft lighting", "golden hour", "volumetric fog",
             "sharp focus", "depth of field", "dramatic sky", "studio lighting", "intricate", "vibrant colors"]
NEGATIVES = ["lowres", "bad anatomy", "bad hands", "blurry", "watermark", "jpeg artifacts", "worst quality",
             "extra fingers", "text", "deformed"]
NAME_HEADS = ["Dream", "Real", "Anime", "Epic", "Mystic", "Neon", "Pastel", "Photon", "Vivid", "Ink", "Toon", "Noir",
              "Aurora", "Retro", "Crystal", "Velvet", "Cosmic", "Rustic"]
NAME_TAILS = ["Mix", "Diffusion", "Vision", "Art", "Shaper", "XL", "Style", "Realism", "Blend", "Craft"]
NSFW_IMAGE_LEVELS = [("None", 0.86), ("Soft", 0.08), ("Mature", 0.04), ("X", 0.02)]
BROWSING_LEVEL = {"None": 1, "Soft": 2, "Mature": 4, "X": 8}
EPOCH = datetime(2023, 1, 1, tzinfo=timezone.utc)


@dataclass
class CatalogSpec:
    """How big a catalog to generate, and how often each quirk appears."""

    num_models: int = 300
    images_per_version: tuple[int, int] = (4, 14)
    seed: int = 0
    p_no_meta: float = 0.12  # images the API serves without generation metadata
    p_upscaled: float = 0.30  # stored file larger than meta.Size (hires fix)
    p_version_without_files: float = 0.06
    p_unknown_checkpoint_hash: float = 0.06  # meta "Model hash" the hash endpoint does not know
    p_nsfw_model: float = 0.08
    p_legacy_stats: float = 0.15  # older responses: favoriteCount / ratingCount / rating
    p_malformed_meta: float = 0.01  # meta a tool wrote wrongly: "Size": "1024x", "steps": "twenty"
    p_odd_size: float = 0.01  # a generation size that is not a multiple of 8
    extra_keys: list[str] = field(default_factory=lambda: ["ADetailer model", "Hires upscaler", "Version"])


def _pick(rng: random.Random, weighted: list[tuple[Any, float]]):
    return rng.choices([v for v, _ in weighted], weights=[w for _, w in weighted])[0]


def _hex(*parts: Any) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


def _iso(rng: random.Random) -> str:
    moment = EPOCH + timedelta(minutes=rng.randrange(0, 60 * 24 * 900))
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _stats(rng: random.Random, legacy: bool) -> dict[str, Any]:
    downloads = int(rng.lognormvariate(6.5, 1.8))
    up = int(downloads * rng.uniform(0.005, 0.08))
    if legacy:
        return {"downloadCount": downloads, "favoriteCount": up // 2, "commentCount": rng.randrange(0, 60),
                "ratingCount": up // 3, "rating": round(rng.uniform(3.0, 5.0), 2)}
    return {"downloadCount": downloads, "thumbsUpCount": up, "thumbsDownCount": int(up * rng.uniform(0, 0.15)),
            "commentCount": rng.randrange(0, 60), "tippedAmountCount": rng.randrange(0, 400)}


def _description(rng: random.Random, name: str, kind: str, base: str, subjects: list[str], style: str) -> str:
    paragraphs = [f"<p><strong>{name}</strong> is a {kind.lower()} trained for {base}.</p>",
                  f"<p>Best for <em>{style}</em> images of {', '.join(subjects)}.</p>"]
    if rng.random() < 0.5:
        paragraphs.append("<h3>Recommended settings</h3><ul><li>Sampler: DPM++ 2M Karras</li>"
                          f"<li>CFG: {rng.choice([5, 6, 7])} &amp; steps {rng.choice([20, 25, 30])}</li></ul>")
    if rng.random() < 0.3:
        paragraphs.append("<p>Please don&#39;t re-upload. <a href=\"https://example.invalid/support\">Support</a></p>")
    return "".join(paragraphs) if rng.random() > 0.03 else ""


def _prompt(rng: random.Random, subjects: list[str], style: str, lora_tag: str | None) -> str:
    subject = rng.choice(subjects)
    words = [style, f"{'an' if subject[0] in 'aeiou' else 'a'} {subject}", *rng.sample(MODIFIERS, rng.randint(2, 5))]
    if rng.random() < 0.3:
        words[2] = f"({words[2]}:1.{rng.randint(1, 4)})"
    if lora_tag:
        words.insert(rng.randrange(0, len(words) + 1), lora_tag)
    return ", ".join(words)


class Catalog:
    """Models (with versions and files), images (with meta) and the hash index, generated from a spec."""

    def __init__(self, spec: CatalogSpec | None = None):
        self.spec = spec or CatalogSpec()
        self.models: list[dict[str, Any]] = []
        self.images: list[dict[str, Any]] = []
        self.versions: dict[int, dict[str, Any]] = {}  # version id -> version (with modelId and model summary)
        self.by_hash: dict[str, int] = {}  # any hash (upper-case) -> version id
        self._generate()
        self.images_by_version: dict[int, list[int]] = {}
        for index, image in enumerate(self.images):
            for version_id in image["modelVersionIds"]:
                self.images_by_version.setdefault(version_id, []).append(index)

    # --------------------------------------------------------------------------------------- models
    def _generate(self) -> None:
        rng = random.Random(self.spec.seed)
        for index in range(self.spec.num_models):
            self.models.append(self._model(rng, 10_000 + 37 * index))
        checkpoints = {b: [v for v in self.versions.values() if v["model"]["type"] == "Checkpoint"
                           and v["baseModel"] == b and v["files"]] for b in SIZES}
        image_id = 5_000_000
        for model in self.models:
            for version in model["modelVersions"]:
                low, high = self.spec.images_per_version
                for _ in range(rng.randint(low, high)):
                    image_id += rng.randint(1, 9)
                    self.images.append(self._image(rng, image_id, model, version, checkpoints))
        self.images.sort(key=lambda image: image["id"])

    def _model(self, rng: random.Random, model_id: int) -> dict[str, Any]:
        kind = _pick(rng, TYPES)
        name = f"{rng.choice(NAME_HEADS)}{rng.choice(NAME_TAILS)}" + (f" {rng.randint(2, 9)}" if rng.random() < .4 else "")
        subjects = rng.sample(SUBJECTS, 3)
        style = rng.choice(STYLES)
        nsfw = rng.random() < self.spec.p_nsfw_model
        base = _pick(rng, BASE_MODELS)
        model = {
            "id": model_id, "name": name, "type": kind, "nsfw": nsfw, "nsfwLevel": rng.choice([4, 8, 16]) if nsfw else 1,
            "description": _description(rng, name, kind, base, subjects, style),
            "poi": False, "minor": False, "allowNoCredit": rng.random() < 0.7,
            "allowCommercialUse": rng.choice([["Image"], ["Image", "Rent"], []]),
            "stats": _stats(rng, rng.random() < self.spec.p_legacy_stats),
            "creator": {"username": f"creator_{rng.randrange(1, 400):03d}", "image": None},
            "tags": [style.replace(" ", ""), *[s.split()[-1] for s in subjects]],
            "modelVersions": [],
            "_style": style, "_subjects": subjects,  # kept for image generation, removed when served
        }
        for v in range(rng.choice([1, 1, 1, 2, 2, 3])):
            version_id = model_id * 10 + v
            version_base = base if rng.random() < 0.9 else _pick(rng, BASE_MODELS)
            files = [] if rng.random() < self.spec.p_version_without_files else [self._file(rng, version_id, kind)]
            version = {"id": version_id, "modelId": model_id, "name": f"v{v + 1}.0", "baseModel": version_base,
                       "baseModelType": "Standard", "createdAt": _iso(rng), "files": files, "images": [],
                       "trainedWords": [name.split()[0].lower()] if kind == "LORA" else [],
                       "downloadUrl": f"https://civitai.com/api/download/models/{version_id}" if files else None,
                       "stats": {"downloadCount": model["stats"]["downloadCount"] // (v + 1)}}
            model["modelVersions"].append(version)
            self.versions[version_id] = {**version, "model": {"name": name, "type": kind, "nsfw": nsfw, "poi": False}}
            for file in files:
                for value in file["hashes"].values():
                    self.by_hash[value.upper()] = version_id
        return model

    @staticmethod
    def _file(rng: random.Random, version_id: int, kind: str) -> dict[str, Any]:
        sha = _hex("file", version_id).upper()
        size_kb = rng.uniform(1.9e6, 6.9e6) if kind == "Checkpoint" else rng.uniform(9e3, 2.3e5)
        return {"id": version_id + 7, "name": f"model_{version_id}.safetensors", "type": "Model", "sizeKB": round(size_kb, 3),
                "primary": True, "pickleScanResult": "Success", "virusScanResult": "Success",
                "metadata": {"format": "SafeTensor", "fp": rng.choice(["fp16", "fp32"]),
                             "size": rng.choice(["pruned", "full"])},
                "hashes": {"AutoV1": sha[:8], "AutoV2": sha[:10], "SHA256": sha, "CRC32": _hex("crc", version_id)[:8].upper(),
                           "BLAKE3": _hex("blake", version_id).upper()},
                "downloadUrl": f"https://civitai.com/api/download/models/{version_id}"}

    # --------------------------------------------------------------------------------------- images
    def _image(self, rng: random.Random, image_id: int, model: dict, version: dict, checkpoints: dict) -> dict[str, Any]:
        base = version["baseModel"]
        level = _pick(rng, NSFW_IMAGE_LEVELS) if not model["nsfw"] else rng.choice(["Mature", "X"])
        size = rng.choice(SIZES.get(base, SIZES["SD 1.5"]))
        scale = rng.choice([1.5, 2.0]) if rng.random() < self.spec.p_upscaled else 1.0
        version_ids = [version["id"]]
        meta = None
        if rng.random() >= self.spec.p_no_meta:
            meta, used_checkpoint = self._meta(rng, model, version, size, checkpoints.get(base, []))
            if used_checkpoint and used_checkpoint != version["id"]:
                version_ids.append(used_checkpoint)
        image = {
            "id": image_id, "url": f"https://image.civitai.com/xG1nkqKTMzGDvpLrqFT7WA/{_hex('img', image_id)[:36]}/width={int(size[0] * scale)}/{image_id}.jpeg",
            "hash": _hex("blur", image_id)[:28].replace("0", "U").replace("1", "e"),  # BlurHash-like placeholder
            "width": int(size[0] * scale), "height": int(size[1] * scale),
            "nsfwLevel": level, "nsfw": level != "None", "browsingLevel": BROWSING_LEVEL[level],
            "createdAt": _iso(rng), "postId": image_id // 3, "username": f"user_{rng.randrange(1, 900):04d}",
            "baseModel": base, "modelVersionIds": version_ids,
            "stats": {"cryCount": rng.randrange(0, 5), "laughCount": rng.randrange(0, 5), "likeCount": rng.randrange(0, 300),
                      "dislikeCount": 0, "heartCount": rng.randrange(0, 120), "commentCount": rng.randrange(0, 12)},
            "meta": meta,
        }
        if rng.random() < 0.2:
            image["type"] = "image"  # a key the crawler has never been told about
        return image

    def _meta(self, rng: random.Random, model: dict, version: dict, size: tuple[int, int],
              checkpoints: list[dict]) -> tuple[dict[str, Any], int | None]:
        is_lora = model["type"] in ("LORA", "LoCon")
        lora_weight = rng.choice([0.6, 0.7, 0.8, 1.0])
        lora_name = model["name"].replace(" ", "_")
        prompt = _prompt(rng, model["_subjects"], model["_style"], f"<lora:{lora_name}:{lora_weight}>" if is_lora else None)
        if is_lora:  # the checkpoint the LoRA ran on; sometimes one the hash endpoint does not know
            if checkpoints and rng.random() >= self.spec.p_unknown_checkpoint_hash:
                checkpoint = rng.choice(checkpoints)
                checkpoint_hash, checkpoint_name, used = (checkpoint["files"][0]["hashes"]["AutoV2"],
                                                          self.versions[checkpoint["id"]]["model"]["name"], checkpoint["id"])
            else:
                checkpoint_hash, checkpoint_name, used = _hex("unknown", model["id"])[:10], "privateMerge_v3", None
        else:
            files = version["files"]
            checkpoint_hash = files[0]["hashes"]["AutoV2"] if files else _hex("gone", version["id"])[:10]
            checkpoint_name, used = model["name"], version["id"]
        meta: dict[str, Any] = {
            "Size": f"{size[0]}x{size[1]}", "seed": rng.randrange(0, 2**32), "steps": rng.choice([20, 25, 28, 30, 35, 40]),
            "sampler": _pick(rng, SAMPLERS), "cfgScale": rng.choice([4, 5, 6, 7, 7.5, 8, 9]), "clipSkip": rng.choice([1, 2]),
            "prompt": prompt, "negativePrompt": ", ".join(rng.sample(NEGATIVES, rng.randint(2, 6))),
            "Model": checkpoint_name.replace(" ", "_"), "Model hash": checkpoint_hash.lower() if rng.random() < .5 else checkpoint_hash,
            "resources": [{"name": checkpoint_name.replace(" ", "_"), "type": "model", "hash": checkpoint_hash.lower()}],
        }
        if is_lora and version["files"]:
            lora_hash = version["files"][0]["hashes"]["AutoV2"].lower()
            meta["resources"].append({"name": lora_name, "type": "lora", "weight": lora_weight, "hash": lora_hash})
            meta["civitaiResources"] = [{"type": "lora", "modelVersionId": version["id"], "weight": lora_weight}]
        if rng.random() < 0.25:
            meta["steps"] = str(meta["steps"])  # some tools write numbers as strings
        if rng.random() < self.spec.p_odd_size:
            meta["Size"] = f"{size[0] - 4}x{size[1] + 2}"
        if rng.random() < self.spec.p_malformed_meta:
            meta.update(rng.choice([{"Size": f"{size[0]}x"}, {"steps": "twenty"}, {"cfgScale": "7,5"},
                                    {"prompt": ["a", "list"]}]))
        for key in self.spec.extra_keys:
            if rng.random() < 0.2:
                meta[key] = {"ADetailer model": "face_yolov8n.pt", "Hires upscaler": "4x-UltraSharp",
                             "Version": "v1.7.0"}[key]
        return meta, used

    # -------------------------------------------------------------------------------------- serving
    @staticmethod
    def served_model(model: dict[str, Any]) -> dict[str, Any]:
        """A model as the API serves it (private generation hints removed)."""
        return {k: v for k, v in model.items() if not k.startswith("_")}

    def images_for(self, model_id: int | None = None, version_id: int | None = None) -> list[dict[str, Any]]:
        """Images of a model or a version (every image listing one of its versions), newest id first."""
        if version_id is not None:
            indices = self.images_by_version.get(version_id, [])
        elif model_id is not None:
            model = next((m for m in self.models if m["id"] == model_id), None)
            indices = sorted({i for v in (model or {}).get("modelVersions", []) for i in self.images_by_version.get(v["id"], [])})
        else:
            indices = range(len(self.images))
        return [self.images[i] for i in sorted(indices, key=lambda i: -self.images[i]["id"])]
