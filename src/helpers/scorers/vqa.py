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
from torch import nn

from ..device import place
from .base import local_weight_files, precision_id, rgb, weights_id

PROMPT = "Question: {question} Answer:"
# TIFA's BLIP-2 prompts (Hu et al., 2023): the multiple-choice one lists the choices, the free one does not
TIFA_CHOICE_PROMPT = "Answer the multiple-choice question. Question: {question} Choices: {choices} Answer:"
TIFA_FREE_PROMPT = "Answer the question. Question: {question} Answer:"
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
        # a decoder-only model answers after the last position, so padding must go on the left (OPT pads right); an
        # encoder-decoder one (Flan-T5) reads the prompt padded on the right, as it was trained
        processor.tokenizer.padding_side = "right" if model.config.is_encoder_decoder else "left"

    def _embedded(self, images: Sequence[Image.Image], texts: Sequence[str]) -> tuple[dict[str, Any], Any]:
        """The text model's inputs for one text per image, the query outputs in the image-token slots.

        Pairs that share an image (the same object, as when one image gets all its prompt's questions) send it
        through the vision tower and the Q-Former once; only the text model runs once per text.
        """
        first_seen: dict[int, int] = {}
        which = [first_seen.setdefault(id(image), len(first_seen)) for image in images]
        unique = list({id(image): image for image in images}.values())
        # the processor prepends the image tokens to every text, whatever the number of images
        inputs = self.processor(images=rgb(unique), text=list(texts), return_tensors="pt",
                                padding=True).to(self.model.device)
        model = self.model
        features = model.get_image_features(pixel_values=inputs["pixel_values"].to(model.dtype),
                                            return_dict=True).pooler_output  # (images, query tokens, text width)
        features = features[torch.tensor(which, device=features.device)]
        # what Blip2ForConditionalGeneration does with the query outputs, for already-encoded images
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        slots = (inputs["input_ids"] == model.config.image_token_index).unsqueeze(-1)
        embeds = embeds.masked_scatter(slots, features.to(embeds.dtype))
        text_inputs = {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]}
        return text_inputs, inputs

    @torch.no_grad()
    def yes_probability(self, images: Sequence[Image.Image], questions: Sequence[str]) -> np.ndarray:
        """P("yes") for each (image, question) pair: softmax over the yes-mass and no-mass of the first token."""
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images for {len(questions)} questions; pass one image per question")
        if not questions:
            return np.zeros(0)
        text_inputs, inputs = self._embedded(images, [PROMPT.format(question=q) for q in questions])
        if not self.model.config.is_encoder_decoder:
            text_inputs["input_ids"] = inputs["input_ids"]
        # one greedy step with raw logits: the same call serves decoder-only and encoder-decoder text models
        out = self.model.language_model.generate(**text_inputs, max_new_tokens=1, do_sample=False, num_beams=1,
                                                 output_logits=True, return_dict_in_generate=True)
        logits = out.logits[0].float()
        # several spellings per word: compare the summed probability mass of each word (log-sum-exp of logits)
        pair = torch.stack([logits[:, self.yes_ids].logsumexp(-1), logits[:, self.no_ids].logsumexp(-1)], -1)
        return pair.softmax(-1)[:, 0].cpu().numpy()

    @torch.no_grad()
    def choice_log_likelihoods(self, images: Sequence[Image.Image], questions: Sequence[str],
                               choices: Sequence[Sequence[str]]) -> list[np.ndarray]:
        """For each (image, question), the mean log-probability per token of each of its choices as the answer.

        Multiple-choice questions (TIFA's) are answered by the choice the model finds likeliest, per token so that a
        long choice is not penalised for its length. A decoder-only text model reads "Question: … Answer:" once per
        question and each choice's tokens from its cached keys and values; an encoder-decoder one encodes the prompt
        once per question and decodes each choice from it.
        """
        if not len(images) == len(questions) == len(choices):
            raise ValueError(f"got {len(images)} images, {len(questions)} questions and {len(choices)} choice lists; "
                             "pass one of each per question")
        if any(not options for options in choices):
            raise ValueError("every question needs at least one choice; got an empty choice list")
        if not questions:
            return []
        prompts = [PROMPT.format(question=q) for q in questions]
        scores = (self._choice_scores_seq2seq(images, prompts, choices) if self.model.config.is_encoder_decoder
                  else self._choice_scores_causal(images, prompts, choices))
        out, at = [], 0
        for options in choices:
            out.append(scores[at:at + len(options)])
            at += len(options)
        return out

    def _choice_scores_causal(self, images, prompts, choices) -> np.ndarray:
        """Each (image, question) prompt runs through the text model once; every choice continues from its cached
        keys and values. A question with a choice whose tokens do not extend the prompt's (a tokenizer that merges
        across the space) runs "prompt choice" whole instead."""
        flat = [(q, str(choice)) for q, options in enumerate(choices) for choice in options]
        prompt_ids = [self.processor.tokenizer(prompt)["input_ids"] for prompt in prompts]
        continuations = [self._continuation(prompt_ids[q], prompts[q], choice) for q, choice in flat]
        whole = {q for (q, _), ids in zip(flat, continuations) if ids is None}
        scores = np.zeros(len(flat))
        rows = [r for r, (q, _) in enumerate(flat) if q in whole]
        if rows:
            scores[rows] = self._choice_scores_whole([(images[flat[r][0]], prompts[flat[r][0]], flat[r][1])
                                                      for r in rows])
        rows = [r for r, (q, _) in enumerate(flat) if q not in whole]
        if rows:
            cached = sorted({flat[r][0] for r in rows})
            position = {q: i for i, q in enumerate(cached)}
            scores[rows] = self._choice_scores_from_prefix([images[q] for q in cached], [prompts[q] for q in cached],
                                                           [position[flat[r][0]] for r in rows],
                                                           [continuations[r] for r in rows])
        return scores

    def _continuation(self, prompt_ids: list[int], prompt: str, choice: str) -> list[int] | None:
        """The tokens "prompt choice" adds to the prompt's, or None where they do not extend them."""
        full = self.processor.tokenizer(f"{prompt} {choice}")["input_ids"]
        return full[len(prompt_ids):] if full[:len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids) else None

    def _choice_scores_from_prefix(self, images, prompts, owner: list[int], continuations: list[list[int]]):
        language_model, pad = self.model.language_model, self.processor.tokenizer.pad_token_id
        text_inputs, _ = self._embedded(images, prompts)  # left padding: every prompt ends in the last column
        prefix = language_model(**text_inputs, use_cache=True)
        index = torch.tensor(owner, device=prefix.logits.device)
        cache = prefix.past_key_values
        cache.batch_select_indices(index)  # one copy of the question's keys and values per choice
        width = max(len(ids) for ids in continuations)
        tokens = torch.tensor([ids + [pad] * (width - len(ids)) for ids in continuations], device=index.device)
        counted = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids in continuations],
                               device=index.device)
        mask = torch.cat([text_inputs["attention_mask"][index], counted], 1)
        logits = language_model(input_ids=tokens, attention_mask=mask, past_key_values=cache).logits
        # token j of a choice is predicted after token j − 1; its first token after the prompt's last one
        logits = torch.cat([prefix.logits[index, -1:], logits[:, :-1]], 1).float()
        log_probs = logits.log_softmax(-1).gather(-1, tokens[..., None])[..., 0] * counted
        return (log_probs.sum(-1) / counted.sum(-1)).cpu().numpy()

    def _choice_scores_whole(self, flat) -> np.ndarray:
        tokenizer = self.processor.tokenizer
        answered = [f"{prompt} {choice}" for _, prompt, choice in flat]
        lengths = []
        for (_, prompt, _), full in zip(flat, answered):
            prompt_ids, full_ids = tokenizer(prompt)["input_ids"], tokenizer(full)["input_ids"]
            shared = next((i for i, (a, b) in enumerate(zip(prompt_ids, full_ids)) if a != b),
                          min(len(prompt_ids), len(full_ids)))
            lengths.append(max(1, len(full_ids) - shared))  # the choice's tokens: those after the shared prefix
        text_inputs, inputs = self._embedded([image for image, _, _ in flat], answered)
        logits = self.model.language_model(**text_inputs).logits.float()  # left padding: every text ends last
        log_probs = logits[:, :-1].log_softmax(-1).gather(-1, inputs["input_ids"][:, 1:, None])[..., 0]
        return np.array([log_probs[row, -n:].mean().item() for row, n in enumerate(lengths)])

    def _choice_scores_seq2seq(self, images, prompts, choices) -> np.ndarray:
        """The encoder reads each (image, question) once; its output is repeated for the decoder, once per choice."""
        from transformers.modeling_outputs import BaseModelOutput

        tokenizer, language_model = self.processor.tokenizer, self.model.language_model
        text_inputs, _ = self._embedded(images, prompts)
        encoded = language_model.get_encoder()(**text_inputs).last_hidden_state
        per_question = torch.tensor([len(options) for options in choices], device=encoded.device)
        flat = [str(c) for options in choices for c in options]
        # padded on the right whatever the tokenizer's side: the decoder reads the choice from its first position
        labels = nn.utils.rnn.pad_sequence([torch.tensor(ids) for ids in tokenizer(flat)["input_ids"]],
                                           batch_first=True, padding_value=-100).to(self.model.device)
        logits = language_model(encoder_outputs=BaseModelOutput(last_hidden_state=encoded.repeat_interleave(
                                    per_question, 0)),
                                attention_mask=text_inputs["attention_mask"].repeat_interleave(per_question, 0),
                                labels=labels).logits.float()
        counted = labels != -100
        log_probs = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * counted
        return (log_probs.sum(-1) / counted.sum(-1).clamp(min=1)).cpu().numpy()

    def choose(self, images: Sequence[Image.Image], questions: Sequence[str],
               choices: Sequence[Sequence[str]]) -> list[str]:
        """The likeliest choice for each (image, question) (`choice_log_likelihoods`)."""
        return [options[int(np.argmax(scores))] for options, scores
                in zip(choices, self.choice_log_likelihoods(images, questions, choices))]

    @torch.no_grad()
    def free_form_answers(self, images: Sequence[Image.Image], questions: Sequence[str],
                          choices: Sequence[Sequence[str]] | None = None, max_new_tokens: int = 30,
                          num_beams: int = 5) -> list[str]:
        """BLIP-2's own answer to each (image, question), as TIFA asks it: with the choices listed in the prompt
        where `choices` is given (TIFA's multiple-choice prompt), else the free question; beam search with TIFA's
        BLIP-2 settings (LAVIS's defaults: 5 beams, up to 30 new tokens)."""
        if len(images) != len(questions) or (choices is not None and len(choices) != len(questions)):
            raise ValueError(f"got {len(images)} images and {len(choices) if choices is not None else 'no'} choice "
                             f"lists for {len(questions)} questions; pass one image (and choice list) per question")
        if not questions:
            return []
        texts = ([TIFA_FREE_PROMPT.format(question=q) for q in questions] if choices is None else
                 [TIFA_CHOICE_PROMPT.format(question=q, choices=", ".join(map(str, c)))
                  for q, c in zip(questions, choices)])
        text_inputs, inputs = self._embedded(images, texts)
        if not self.model.config.is_encoder_decoder:
            text_inputs["input_ids"] = inputs["input_ids"]
        tokenizer = self.processor.tokenizer
        sequences = self.model.language_model.generate(**text_inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                                       num_beams=num_beams, pad_token_id=tokenizer.pad_token_id)
        if not self.model.config.is_encoder_decoder:  # a decoder-only model returns the prompt before the answer
            sequences = sequences[:, inputs["input_ids"].shape[1]:]
        return [text.strip() for text in tokenizer.batch_decode(sequences, skip_special_tokens=True)]

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
    return VqaScorer(place(model, device), processor, precision_id(vqa_weights_id(source), dtype))


def vqa_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype BLIP-2 answers in for a run in `dtype`: bf16 as the run (the precision `t2ibook bench` times it
    in), fp32 instead of fp16, in which Flan-T5's activations overflow."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def load_vqa_on_use(source: str | Path, device: str = "cpu", dtype: torch.dtype | None = None):
    """`load_vqa(source)` deferred to its first use (`LoadedOnUse`); its weights id is known at once, so a run whose
    answers are all cached never loads BLIP-2, and the blocks of a long run share one copy."""
    from .base import LoadedOnUse

    return LoadedOnUse(lambda: load_vqa(source, device, dtype), precision_id(vqa_weights_id(source), dtype))


def load_vqa_for_run(ctx):
    """The run's BLIP-2 (`models.resolve("vqa")`) on its device, in `vqa_dtype`, loaded on its first use."""
    from ..models import resolve

    return load_vqa_on_use(resolve("vqa", ctx), ctx.device, vqa_dtype(ctx.dtype))


def vqa_weights_id(source: str | Path) -> str:
    """The id a VqaScorer from `source` caches its answers under (read without loading the model)."""
    return weights_id(source, *local_weight_files(source))


def build_tiny_vqa(folder: Path, seed: int = 0, text_model: str = "llama") -> dict[str, Any]:
    """Tiny BLIP-2 (ViT, Q-Former, random init) + processor, saved as an HF folder.

    `text_model`: "llama" (decoder-only, the profiles' stand-in) or "t5" (encoder-decoder, like the paper's
    Flan-T5 BLIP-2; the tests use it so that both answering paths run).
    """
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessorPil,
                              GenerationConfig)

    from ..models import _count_parameters, _model_card, train_llm_tokenizer

    folder, image_size, num_query_tokens = Path(folder), 32, 4
    tokenizer = train_llm_tokenizer(seed=seed)
    processor = Blip2Processor(image_processor=BlipImageProcessorPil(size={"height": image_size, "width": image_size}),
                               tokenizer=tokenizer, num_query_tokens=num_query_tokens)  # adds the <image> token
    image_token_id = tokenizer.convert_tokens_to_ids(processor.image_token.content)
    if text_model == "llama":
        text = dict(model_type="llama", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    elif text_model == "t5":
        text = dict(model_type="t5", vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                    num_decoder_layers=2, num_heads=4, eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    else:
        raise ValueError(f"text_model={text_model!r}: use 'llama' (decoder-only) or 't5' (encoder-decoder)")
    config = Blip2Config(
        vision_config=dict(image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, initializer_range=0.02),
        qformer_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            vocab_size=len(tokenizer), max_position_embeddings=64),
        text_config=text, num_query_tokens=num_query_tokens, image_token_index=image_token_id)
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id,
                                               decoder_start_token_id=text.get("decoder_start_token_id"))
    processor.save_pretrained(folder)
    yes_share = calibrate_yes_no(model, processor, seed)
    model.save_pretrained(folder)
    _model_card(folder, f"BLIP-2 (ViT + Q-Former + {'Llama' if text_model == 'llama' else 'T5'} text model)", seed,
                f"{num_query_tokens} query tokens, {image_size} px images. Random weights, except that its yes/no "
                "answer rows are set so that the answer turns on the image: about half the answers are yes.")
    return {"parameters": _count_parameters(model), "vocab_size": len(tokenizer), "num_query_tokens": num_query_tokens,
            "calibration_yes_share": yes_share}


CALIBRATION_QUESTIONS = ("is there a dog?", "is the sky blue?", "is there a red car?", "are there two people?",
                         "is it night?", "is there a river between the hills?")


def calibration_styles(seed: int, per_style: int = 8, size: int = 32) -> list[list[Image.Image]]:
    """Seeded pictures like a tiny random pipeline's, in styles: colour blobs on a 2–32 cell grid, smoothly enlarged,
    of random brightness and contrast, under none, some or strong pixel noise (one list of pictures per style)."""
    rng = np.random.default_rng(seed)
    styles = []
    for cells in (2, 4, 8, 32):
        for noise in (0, 30, 60):
            pictures = []
            for _ in range(per_style):
                grid = rng.normal(rng.uniform(80, 180), rng.uniform(10, 80), size=(cells, cells, 3))
                blobs = Image.fromarray(grid.clip(0, 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
                pixels = np.asarray(blobs, dtype=np.float64) + rng.normal(0, noise, size=(size, size, 3))
                pictures.append(Image.fromarray(pixels.clip(0, 255).astype(np.uint8)))
            styles.append(pictures)
    return styles


# Only the sign of the yes–no margin sets AGFSync's VQA score, so a small spread (P(yes) about 0.35–0.65) is
# enough; with the ridge term it keeps the two rows' norm near 2 (the others' is 0.1): larger rows magnify float noise
# (padding widths) in every softmax of the text model, and tilt every position's next token towards yes or no.
RIDGE = 1e-4  # × the mean eigenvalue of the hidden states' Gram matrix
SPREAD = 0.3  # standard deviation of the fitted margin, in logits


def margin_shift(hidden_states: torch.Tensor, margins: torch.Tensor, spread: float) -> torch.Tensor:
    """The vector `a` of `calibrate_yes_no`, from the last hidden states (question, style, picture, h) and the
    yes–no margins (question, style, picture) they gave."""
    style_means = hidden_states.mean(2, keepdim=True)
    within = (hidden_states - style_means).flatten(0, 2)
    between = (style_means - hidden_states.mean((1, 2), keepdim=True)).flatten(0, 2)
    _, values, vectors = torch.linalg.svd(between, full_matrices=False)
    style_directions = vectors[values > 0.05 * values[0]]
    within = within - within @ style_directions.T @ style_directions
    direction = torch.linalg.svd(within, full_matrices=False).Vh[0]
    z = (hidden_states @ direction).flatten(1)  # (question, every picture)
    target = spread * (z - z.median(1, keepdim=True).values) / z.std()
    # ridge least squares: a short shift that fits well, rather than a long one that fits exactly
    x, y = 2 * hidden_states.flatten(0, 2), target.flatten() - margins.flatten()
    gram = x.T @ x
    ridge = RIDGE * gram.trace() / len(gram) * torch.eye(len(gram), dtype=gram.dtype)
    return torch.linalg.solve(gram + ridge, x.T @ y)


@torch.no_grad()
def calibrate_yes_no(model, processor, seed: int, spread: float = SPREAD) -> float:
    """Make a random-weight BLIP-2's yes/no answers turn on the picture; returns the share of yes after.

    With random weights P(yes) sits at one value (about 0.49) whatever the picture, so AGFSync's VQA score — the
    share of questions answered yes, P(yes) > 0.5 — is the same for every image, and its preference pairs hinge on
    rounding. Here the "yes" rows of the output layer move by a vector `a` and the "no" rows by −a, so the yes–no
    margin gains 2a·h (h: the text model's last hidden state). `a` is fitted by least squares so that the margin
    follows the direction in which h varies most between pictures of one style (`calibration_styles`) once the
    directions that tell styles apart are removed, centred on each question and scaled to `spread`: about half the
    answers are yes whatever the style of the pictures scored, and different pictures get different answers.
    """
    scorer = VqaScorer(model, processor, "calibration")
    head = model.language_model.get_output_embeddings()
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda module, args, output: captured.append(args[0][:, -1].double()))
    styles = calibration_styles(seed)
    pictures = [picture for style in styles for picture in style]
    try:
        margins, hidden = [], []
        for question in CALIBRATION_QUESTIONS:
            captured.clear()
            p = torch.as_tensor(scorer.yes_probability(pictures, [question] * len(pictures)), dtype=torch.float64)
            margins.append(torch.logit(p).view(len(styles), -1))
            hidden.append(torch.cat(captured).view(len(styles), len(styles[0]), -1))
    finally:
        hook.remove()
    shift = margin_shift(torch.stack(hidden), torch.stack(margins), spread)
    shift = shift.to(head.weight.dtype)
    head.weight[scorer.yes_ids] += shift
    head.weight[scorer.no_ids] -= shift
    answers = np.concatenate([scorer.yes_probability(pictures, [q] * len(pictures)) for q in CALIBRATION_QUESTIONS])
    return round(float((answers > 0.5).mean()), 4)
