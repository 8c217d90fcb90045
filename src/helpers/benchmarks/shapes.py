"""Random-weight models of the paper's shapes ("full") or the book's tiny ones, built from configs in memory.

Speed does not depend on the weights, so a 7B Llama or an SD 1.5 UNet with random weights times like the
published checkpoints, and nothing has to be downloaded.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..models import TINY_SD_UNET, TINY_VAE, TINY_VAE_FACTOR

LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
LLAMA_TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD15_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SD_TINY_UNET = dict(TINY_SD_UNET, sample_size=64 // TINY_VAE_FACTOR)  # the book's tiny pipeline at 64 px
SD_TINY_VAE = dict(TINY_VAE, sample_size=64)
SD_TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=77, projection_dim=32)
IMAGE_SIZE = {"full": 512, "tiny": 64}

CLIP_B16 = dict(vision=dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072,
                            num_hidden_layers=12, num_attention_heads=12),
                text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                          max_position_embeddings=77), projection_dim=512)
CLIP_TINY = dict(vision=dict(image_size=64, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4),
                 text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           max_position_embeddings=77), projection_dim=32)
BERT_BASE_MED = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                     vocab_size=30524, max_position_embeddings=512, hidden_act="gelu", layer_norm_eps=1e-12,
                     pad_token_id=0)
BERT_TINY_MED = dict(BERT_BASE_MED, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     vocab_size=1000, max_position_embeddings=64)


# BLIP-2 with Flan-T5-XL (Salesforce/blip2-flan-t5-xl), AGFSync's VQA model: EVA ViT-g/14, Q-Former, T5-XL
BLIP2_VIT_G = dict(image_size=224, patch_size=14, hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                   num_attention_heads=16)
BLIP2_QFORMER = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     vocab_size=30522)
FLAN_T5_XL = dict(model_type="t5", vocab_size=32128, d_model=2048, d_kv=64, d_ff=5120, num_layers=24,
                  num_decoder_layers=24, num_heads=32, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
BLIP2_TINY_VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4)
BLIP2_TINY_QFORMER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=64)
T5_TINY = dict(model_type="t5", d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4)


@contextmanager
def built_on(device: str, dtype: torch.dtype):
    """Inside: modules are created on `device` in `dtype` (seed 0), so a full-size model never passes through an
    fp32 copy on the CPU; the default dtype is restored afterwards."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def _check(size: str) -> None:
    if size not in ("tiny", "full"):
        raise ValueError(f"size={size!r} must be 'tiny' (CPU, seconds) or 'full' (the paper's shapes, a GPU)")


def causal_lm(size: str, device: str, dtype: torch.dtype):
    """A Llama-7B-shaped (or tiny) causal LM with random weights, built directly on `device` in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    _check(size)
    config = LlamaConfig(**(LLAMA_7B if size == "full" else LLAMA_TINY), bos_token_id=1, eos_token_id=2,
                         pad_token_id=0, tie_word_embeddings=False)
    with built_on(device, dtype):
        model = LlamaForCausalLM(config)
    return model.eval()


def sd15_pipeline(size: str, device: str, dtype: torch.dtype):
    """An SD 1.5-shaped StableDiffusionPipeline (UNet, VAE, CLIP text encoder) with random weights."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..models import train_clip_tokenizer

    _check(size)
    tokenizer = train_clip_tokenizer()
    text = SD15_TEXT if size == "full" else dict(SD_TINY_TEXT, vocab_size=len(tokenizer))
    with built_on(device, dtype):  # built in the target dtype: no fp32 copy of a full-size UNet on the way
        text_encoder = CLIPTextModel(CLIPTextConfig(**text, bos_token_id=tokenizer.bos_token_id,
                                                    eos_token_id=tokenizer.eos_token_id))
        vae = AutoencoderKL(**(SD15_VAE if size == "full" else SD_TINY_VAE))
        unet = UNet2DConditionModel(**(SD15_UNET if size == "full" else SD_TINY_UNET))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def random_lora(pipeline, folder, rank: int, seed: int) -> str:
    """Save a LoRA of random rank-`rank` factors for `pipeline` to `folder` (diffusers' single-file format) and return
    the file's path. It adapts the attention of the UNet and of the text encoder, the layers most Civitai LoRAs train,
    and is built from the layer shapes alone, so no second copy of a full-size model is made."""
    from diffusers.utils import convert_state_dict_to_diffusers

    generator = torch.Generator().manual_seed(seed)

    def factors(model, targets: tuple[str, ...]) -> dict[str, torch.Tensor]:
        layers = {}  # peft's key names (lora_A: rank × in, lora_B: out × rank), small enough to keep activations sane
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.endswith(targets):
                layers[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) / 32
                layers[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) / 32
        return convert_state_dict_to_diffusers(layers)

    type(pipeline).save_lora_weights(
        folder, unet_lora_layers=factors(pipeline.unet, (".to_q", ".to_k", ".to_v", ".to_out.0")),
        text_encoder_lora_layers=factors(pipeline.text_encoder, (".q_proj", ".k_proj", ".v_proj", ".out_proj")))
    return str(Path(folder) / "pytorch_lora_weights.safetensors")


def blip2_vqa(size: str, device: str, dtype: torch.dtype):
    """A `VqaScorer` on a BLIP-2 Flan-T5-XL-shaped model (or the book's tiny T5 one) with random weights."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessorPil

    from ..models import train_llm_tokenizer
    from ..scorers.vqa import VqaScorer

    _check(size)
    full = size == "full"
    tokenizer = train_llm_tokenizer(seed=0)
    vision = BLIP2_VIT_G if full else BLIP2_TINY_VISION
    processor = Blip2Processor(image_processor=BlipImageProcessorPil(size={"height": vision["image_size"],
                                                                           "width": vision["image_size"]}),
                               tokenizer=tokenizer, num_query_tokens=32 if full else 4)  # adds the <image> token
    text = dict(FLAN_T5_XL if full else T5_TINY, vocab_size=max(32128 if full else 0, len(tokenizer)),
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                decoder_start_token_id=tokenizer.pad_token_id)
    config = Blip2Config(vision_config=vision, qformer_config=dict(
        BLIP2_QFORMER if full else BLIP2_TINY_QFORMER, vocab_size=30522 if full else len(tokenizer)),
        text_config=text, num_query_tokens=processor.num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids(processor.image_token.content))
    with built_on(device, dtype):
        model = Blip2ForConditionalGeneration(config)
    return VqaScorer(model.eval(), processor, "random:blip2")


def unified_reward_scorers(size: str, device: str, dtype: torch.dtype, batch_size: int) -> dict[str, Any]:
    """CLIP ViT-B/16, ImageReward (BLIP ViT-L/16 + BERT-base) and HPS v2 (OpenCLIP ViT-H/14), as the book's scorers."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor

    from ..device import place
    from ..models import train_clip_tokenizer
    from ..scorers.hps import VIT_H_14, HpsScorer, clip_config, tiny_open_clip_config
    from ..scorers.image_reward import TINY_VISION, ImageRewardModel, ImageRewardScorer, blip_configs, \
        train_bert_tokenizer
    from ..scoring import ClipScorer

    _check(size)
    full = size == "full"
    clip_tokenizer, bert_tokenizer = train_clip_tokenizer(), train_bert_tokenizer()
    torch.manual_seed(0)
    shapes = CLIP_B16 if full else CLIP_TINY
    special = {"bos_token_id": clip_tokenizer.bos_token_id, "eos_token_id": clip_tokenizer.eos_token_id}
    text_config = dict(shapes["text"], vocab_size=49408 if full else len(clip_tokenizer), **special)
    clip_model = CLIPModel(CLIPConfig(text_config=text_config,
                                      vision_config=dict(shapes["vision"], projection_dim=shapes["projection_dim"]),
                                      projection_dim=shapes["projection_dim"]))
    side = shapes["vision"]["image_size"]
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": side},
                                                                    crop_size={"height": side, "width": side}),
                              tokenizer=clip_tokenizer)
    clip = ClipScorer.from_parts(place(clip_model, device, dtype), processor, "random:clip", device, batch_size)
    open_clip = VIT_H_14 if full else tiny_open_clip_config(len(clip_tokenizer))
    hps_model = CLIPModel(clip_config(open_clip, clip_tokenizer))
    hps = HpsScorer(model=place(hps_model, device, dtype), tokenizer=clip_tokenizer, weights_id="random:hps",
                    image_size=open_clip["vision_cfg"]["image_size"],
                    context_length=open_clip["text_cfg"]["context_length"], device=device, batch_size=batch_size)
    med = BERT_BASE_MED if full else dict(BERT_TINY_MED, vocab_size=len(bert_tokenizer),
                                          bos_token_id=bert_tokenizer.bos_token_id,
                                          sep_token_id=bert_tokenizer.sep_token_id)
    vision_config, text_config = blip_configs(med, None if full else TINY_VISION)
    reward = ImageRewardScorer(model=place(ImageRewardModel(vision_config, text_config), device, dtype),
                               tokenizer=bert_tokenizer, weights_id="random:image_reward",
                               image_size=vision_config.image_size, device=device, batch_size=batch_size)
    return {"clip": clip, "hps": hps, "image_reward": reward}
