"""The forms Civitai files take, written from the tiny models, so that the paper profile's loading paths can be
tested offline: a checkpoint as one original-layout (LDM / SGM) `.safetensors` file, SD 1.5 or SDXL, and a LoRA in
kohya's layout.

The checkpoint layout is the one diffusers' `single_file_utils` reads back (`convert_ldm_unet_checkpoint`,
`convert_ldm_vae_checkpoint`, `convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`), written out here from
the model configs.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
               "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _resnet(rest: str, names: dict[str, str]) -> str:
    layer, _, tail = rest.partition(".")
    return f"{names.get(layer, layer)}.{tail}"


def unet_key(key: str, config: dict) -> str:
    per = config["layers_per_block"] + 1  # LDM numbers a block's resnets (and its down/upsampler) in one run
    up_attention = [kind.startswith("CrossAttn") for kind in config["up_block_types"]]
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",  # SDXL
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
    for name, ldm in fixed.items():
        if key.startswith(name + "."):
            return ldm + key[len(name):]
    if match := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        index = block * per + layer + 1
        return (f"input_blocks.{index}.0.{_resnet(rest, UNET_RESNET)}" if kind == "resnets"
                else f"input_blocks.{index}.1.{rest}")
    if match := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{(int(match[1]) + 1) * per}.0.op.{match[2]}"
    if match := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        kind, layer, rest = match[1], int(match[2]), match[3]
        return (f"middle_block.{2 * layer}.{_resnet(rest, UNET_RESNET)}" if kind == "resnets"
                else f"middle_block.1.{rest}")
    if match := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
        index = block * per + layer
        return (f"output_blocks.{index}.0.{_resnet(rest, UNET_RESNET)}" if kind == "resnets"
                else f"output_blocks.{index}.1.{rest}")
    if match := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        block = int(match[1])
        return f"output_blocks.{block * per + per - 1}.{2 if up_attention[block] else 1}.conv.{match[2]}"
    raise KeyError(f"no LDM name for UNet weight {key}")


def vae_key(key: str, config: dict) -> str:
    blocks = len(config["block_out_channels"])
    for side in ("encoder", "decoder"):
        if not key.startswith(side + "."):
            continue
        rest = key[len(side) + 1:]
        if rest.startswith("conv_norm_out."):
            return f"{side}.norm_out.{rest[len('conv_norm_out.'):]}"
        if match := re.match(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
            level = int(match[2]) if match[1] == "down" else blocks - 1 - int(match[2])
            return f"{side}.{match[1]}.{level}.block.{match[3]}.{_resnet(match[4], {'conv_shortcut': 'nin_shortcut'})}"
        if match := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", rest):
            return f"{side}.down.{match[1]}.downsample.conv.{match[2]}"
        if match := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", rest):
            return f"{side}.up.{blocks - 1 - int(match[1])}.upsample.conv.{match[2]}"
        if match := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
            return f"{side}.mid.block_{int(match[1]) + 1}.{_resnet(match[2], {'conv_shortcut': 'nin_shortcut'})}"
        if match := re.match(r"mid_block\.attentions\.0\.(.*)\.(weight|bias)", rest):
            return f"{side}.mid.attn_1.{VAE_ATTENTION[match[1]]}.{match[2]}"
        return key
    return key  # quant_conv, post_quant_conv


def open_clip_weights(text_encoder: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A CLIPTextModelWithProjection's weights in OpenCLIP's layout (SDXL's second text encoder): one in_proj per
    attention, resblocks, ln_final, and the text projection transposed."""
    layer_names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}
    weights = {k.removeprefix("text_model."): v for k, v in text_encoder.items()}
    out = {"positional_embedding": weights.pop("embeddings.position_embedding.weight"),
           "token_embedding.weight": weights.pop("embeddings.token_embedding.weight"),
           "ln_final.weight": weights.pop("final_layer_norm.weight"),
           "ln_final.bias": weights.pop("final_layer_norm.bias"),
           "text_projection": weights.pop("text_projection.weight").T}
    layers = sorted({int(k.split(".")[2]) for k in weights if k.startswith("encoder.layers.")})
    for i in layers:
        at = f"encoder.layers.{i}."
        for kind in ("weight", "bias"):
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(
                [weights.pop(f"{at}self_attn.{p}_proj.{kind}") for p in "qkv"])
        for name, open_clip in layer_names.items():
            for kind in ("weight", "bias"):
                out[f"transformer.resblocks.{i}.{open_clip}.{kind}"] = weights.pop(f"{at}{name}.{kind}")
    if weights:
        raise KeyError(f"no OpenCLIP name for {sorted(weights)}")
    return out


def write_ldm_checkpoint(pipeline_folder: Path, target: Path) -> Path:
    """`pipeline_folder` (a diffusers SD 1.5 or SDXL folder) as one original-layout `.safetensors` file at `target`."""
    folder = Path(pipeline_folder)
    merged: dict[str, torch.Tensor] = {}
    unet_config = json.loads((folder / "unet" / "config.json").read_text())
    for key, value in load_file(folder / "unet" / "diffusion_pytorch_model.safetensors").items():
        merged["model.diffusion_model." + unet_key(key, unet_config)] = value
    vae_config = json.loads((folder / "vae" / "config.json").read_text())
    for key, value in load_file(folder / "vae" / "diffusion_pytorch_model.safetensors").items():
        name = vae_key(key, vae_config)
        if ".attn_1." in name and name.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's VAE attention is made of 1×1 convolutions
        merged["first_stage_model." + name] = value
    xl = (folder / "text_encoder_2").is_dir()
    first = "conditioner.embedders.0.transformer." if xl else "cond_stage_model.transformer."
    for key, value in load_file(folder / "text_encoder" / "model.safetensors").items():
        # an original checkpoint names the CLIP text model's weights text_model.*, as transformers 4 saved them
        merged[first + ("" if key.startswith("text_model.") else "text_model.") + key] = value
    if xl:
        for key, value in open_clip_weights(load_file(folder / "text_encoder_2" / "model.safetensors")).items():
            merged["conditioner.embedders.1.model." + key] = value
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in merged.items()}, target)
    return target


def write_kohya_lora(diffusers_lora: Path, target: Path, rank: int) -> Path:
    """A diffusers-format LoRA file (`build_tiny_lora`) in the kohya layout most Civitai LoRAs have:
    `lora_unet_<module path with _>` and `lora_te_text_model_<…>` names, lora_down/lora_up weights and an alpha per
    module (alpha = rank: scale 1, as the diffusers file has)."""
    layers = load_file(diffusers_lora)
    two_encoders = any(key.startswith("text_encoder_2.") for key in layers)  # SDXL: lora_te1_ and lora_te2_
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if two_encoders else "lora_te_",
                "text_encoder_2": "lora_te2_"}
    written: dict[str, torch.Tensor] = {}
    for key, value in layers.items():
        part, rest = key.split(".", 1)
        module, _, kind = rest.rpartition(".lora.") if ".lora." in rest else rest.rpartition(".lora_linear_layer.")
        if part != "unet" and not module.startswith("text_model."):
            module = "text_model." + module  # the CLIP text model's module path as kohya's scripts name it
        name = prefixes[part] + module.replace(".", "_")
        written[f"{name}.lora_{kind.removesuffix('.weight')}.weight"] = value
        written[f"{name}.alpha"] = torch.tensor(float(rank))
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in written.items()}, target)
    return target
