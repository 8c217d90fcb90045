"""Smoke test of a profile's models: the agent LLM writes, the T2I pipeline draws, CLIP compares."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .models import load_causal_lm, load_clip, load_sd_pipeline


def generate_reply(model, tokenizer, prompt: str, max_new_tokens: int) -> dict[str, Any]:
    """Greedy chat reply to `prompt` (through the tokenizer's chat template) on the model's device."""
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True).to(model.device)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    return {"prompt_tokens": int(inputs["input_ids"].shape[1]), "new_tokens": int(new_tokens.numel()),
            "reply": tokenizer.decode(new_tokens, skip_special_tokens=True)}


def draw(pipeline, prompt: str, seeds: list[int], steps: int):
    """One batched pipeline call, one generator per seed, so image i depends only on seed i."""
    generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
    return pipeline([prompt] * len(seeds), num_inference_steps=steps, generator=generators).images


def clip_cosines(model, processor, images, prompt: str) -> list[float]:
    """Cosine similarity between each image and the prompt in CLIP space."""
    inputs = processor(text=[prompt], images=images, return_tensors="pt", padding=True).to(model.device)
    with torch.inference_mode():
        image = model.get_image_features(pixel_values=inputs["pixel_values"].to(model.dtype))
        text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    image = getattr(image, "pooler_output", image)
    text = getattr(text, "pooler_output", text)
    cos = torch.nn.functional.cosine_similarity(image.float(), text.float())
    return [round(float(c), 6) for c in cos]


def run_smoke_test(folder: Path, paths: dict[str, str], device: str, dtype, prompt: str, steps: int,
                   new_tokens: int, seeds: list[int]) -> dict[str, Any]:
    """Load each model on `device`, run it once, save `smoke.json` and the images; return counts."""
    folder = Path(folder)
    results: dict[str, Any] = {"device": device, "dtype": str(dtype).replace("torch.", ""), "prompt": prompt}
    with tqdm(total=3, desc="smoke test") as bar:
        model, tokenizer = load_causal_lm(paths["agent_llm"], device, dtype)
        results["agent_llm"] = {"device": str(model.device), **generate_reply(model, tokenizer, prompt, new_tokens)}
        del model
        bar.update()
        pipeline = load_sd_pipeline(paths["t2i_pipeline"], device, dtype)
        images = draw(pipeline, prompt, seeds, steps)
        results["t2i_pipeline"] = {"device": str(pipeline.device), "steps": steps, "seeds": seeds,
                                   "size": list(images[0].size)}
        del pipeline
        bar.update()
        clip, processor = load_clip(paths["clip"], device, dtype)
        results["clip"] = {"device": str(clip.device), "cosine": clip_cosines(clip, processor, images, prompt)}
        bar.update()
    for seed, image in zip(seeds, images):
        image.save(folder / f"image_seed{seed}.png")
    (folder / "smoke.json").write_text(json.dumps(results, indent=2) + "\n")
    return {"images": len(images), "reply_tokens": results["agent_llm"]["new_tokens"]}


def load_smoke_results(folder: Path):
    """(results dict, images in seed order) written by `run_smoke_test`."""
    from PIL import Image

    results = json.loads((Path(folder) / "smoke.json").read_text())
    images = [Image.open(Path(folder) / f"image_seed{s}.png") for s in results["t2i_pipeline"]["seeds"]]
    return results, images
