"""BLIP-2 yes/no answers: AGFSync's VQA score (the share of generated questions an image answers "yes" to).

The paper uses `Salesforce/blip2-flan-t5-xl`. The tiny stand-in is the same `Blip2ForConditionalGeneration` class
built from a tiny config with a decoder-only (Llama) text model, so both text-model kinds go through one code path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..device import place
from .base import local_weight_files, rgb, weights_id

PROMPT = "Question: {question} Answer:"
# Spellings the first answer token can take: plain, after a space (byte BPE "Ġyes"), sentencepiece ("▁yes").
YES_VARIANTS = ("yes", " yes")
NO_VARIANTS = ("no", " no")


def answer_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """First token ids of the "yes" and "no" spellings; ids both words share (a bare space) are dropped."""
    def first_ids(variants):
        return {tokenizer.encode(v, add_special_tokens=False)[0] for v in variants}

    yes, no = first_ids(YES_VARIANTS), first_ids(NO_VARIANTS)
    yes, no = sorted(yes - no), sorted(no - yes)
    if not yes or not no:
        raise ValueError(f"the tokenizer cannot tell 'yes' from 'no' by their first token (yes ids {yes}, no ids "
                         f"{no}); use a BLIP-2 checkpoint whose vocabulary splits the two words differently")
    return yes, no


class VqaScorer:
    """Asks BLIP-2 yes/no questions about images; the probability of "yes" comes from the first answer token."""

    name = "vqa"

    def __init__(self, model, processor, weights: str):
        self.model, self.processor, self.weights_id = model, processor, weights
        self.yes_ids, self.no_ids = answer_token_ids(processor.tokenizer)
        if not model.config.is_encoder_decoder:
            # a decoder-only model answers after the last position, so padding must go on the left (OPT pads right)
            processor.tokenizer.padding_side = "left"

    @torch.no_grad()
    def yes_probability(self, images: Sequence[Image.Image], questions: Sequence[str]) -> np.ndarray:
        """P("yes") for each (image, question) pair: softmax over the yes-mass and no-mass of the first token.

        Pairs that share an image (the same object, as when one image gets all its prompt's questions) send it
        through the vision tower and the Q-Former once; only the text model runs once per question.
        """
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images for {len(questions)} questions; pass one image per question")
        if not questions:
            return np.zeros(0)
        first_seen: dict[int, int] = {}
        which = [first_seen.setdefault(id(image), len(first_seen)) for image in images]
        unique = list({id(image): image for image in images}.values())
        # the processor prepends the image tokens to every question, whatever the number of images
        inputs = self.processor(images=rgb(unique), text=[PROMPT.format(question=q) for q in questions],
                                return_tensors="pt", padding=True).to(self.model.device)
        model = self.model
        features = model.get_image_features(pixel_values=inputs["pixel_values"].to(model.dtype),
                                            return_dict=True).pooler_output  # (images, query tokens, text width)
        features = features[torch.tensor(which, device=features.device)]
        # what Blip2ForConditionalGeneration.generate does with the query outputs, for already-encoded images
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        slots = (inputs["input_ids"] == model.config.image_token_index).unsqueeze(-1)
        embeds = embeds.masked_scatter(slots, features.to(embeds.dtype))
        text_inputs = {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]}
        if not model.config.is_encoder_decoder:
            text_inputs["input_ids"] = inputs["input_ids"]
        # one greedy step with raw logits: the same call serves decoder-only and encoder-decoder text models
        out = model.language_model.generate(**text_inputs, max_new_tokens=1, do_sample=False, num_beams=1,
                                            output_logits=True, return_dict_in_generate=True)
        logits = out.logits[0].float()
        # several spellings per word: compare the summed probability mass of each word (log-sum-exp of logits)
        pair = torch.stack([logits[:, self.yes_ids].logsumexp(-1), logits[:, self.no_ids].logsumexp(-1)], -1)
        return pair.softmax(-1)[:, 0].cpu().numpy()

    def answers(self, images: Sequence[Image.Image], questions: Sequence[str]) -> list[bool]:
        """True where the model answers "yes" (P(yes) > 0.5)."""
        return [bool(p > 0.5) for p in self.yes_probability(images, questions)]

    def vqa_score(self, image: Image.Image, questions: Sequence[str]) -> float:
        """AGFSync's VQA score: 100 × the share of `questions` answered "yes" for one image (batched)."""
        if not questions:
            raise ValueError("vqa_score needs at least one question about the image; got none")
        answered = self.answers([image] * len(questions), questions)
        return 100.0 * sum(answered) / len(answered)


def load_vqa(source: str | Path, device: str = "cpu", dtype: torch.dtype | None = None) -> VqaScorer:
    """A VqaScorer from a BLIP-2 folder or hub id (paper: Salesforce/blip2-flan-t5-xl)."""
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(str(source))
    model = Blip2ForConditionalGeneration.from_pretrained(str(source), dtype=dtype or torch.float32)
    # Recent BLIP-2 code puts the query outputs where the text holds image tokens; without them the image is ignored.
    if model.config.image_token_index is None or processor.num_query_tokens is None:
        raise ValueError(f"{source} predates BLIP-2's image tokens (image_token_index="
                         f"{model.config.image_token_index}, num_query_tokens={processor.num_query_tokens}); "
                         "use a current revision of the checkpoint")
    return VqaScorer(place(model, device), processor, vqa_weights_id(source))


def vqa_weights_id(source: str | Path) -> str:
    """The id a VqaScorer from `source` caches its answers under (read without loading the model)."""
    return weights_id(source, *local_weight_files(source))


def build_tiny_vqa(folder: Path, seed: int = 0) -> dict[str, Any]:
    """Tiny BLIP-2 (ViT, Q-Former, Llama text model, random init) + processor, saved as an HF folder."""
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessorPil,
                              GenerationConfig)

    from ..models import _count_parameters, _model_card, train_llm_tokenizer

    folder, image_size, num_query_tokens = Path(folder), 32, 4
    tokenizer = train_llm_tokenizer(seed=seed)
    processor = Blip2Processor(image_processor=BlipImageProcessorPil(size={"height": image_size, "width": image_size}),
                               tokenizer=tokenizer, num_query_tokens=num_query_tokens)  # adds the <image> token
    image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token.content)
    text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    config = Blip2Config(
        vision_config=dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, initializer_range=0.02),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=len(tokenizer), max_position_embeddings=64),
        text_config=text, num_query_tokens=num_query_tokens, image_token_index=image_token_id)
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    _model_card(folder, "BLIP-2 (ViT + Q-Former + Llama text model)", seed,
                f"{num_query_tokens} query tokens, {image_size} px images; answers yes/no at random.")
    return {"parameters": _count_parameters(model), "vocab_size": len(tokenizer), "num_query_tokens": num_query_tokens}
