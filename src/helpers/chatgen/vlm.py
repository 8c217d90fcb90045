"""The multimodal chat model ChatGen reads: a LLaVA-style VLM (CLIP vision encoder projected into the LM).

ChatGen's inputs may carry a reference image. The paper profile loads a real image-text-to-text model with
`AutoModelForImageTextToText` + `AutoProcessor`; the tiny and small profiles build one with transformers' own
`LlavaConfig` + `LlavaForConditionalGeneration`, so every profile runs the same code:

* vision tower: a CLIP ViT from config with random weights; projector: LLaVA's two-layer MLP, random;
* language model: the weights of a causal LM folder (the tiny Llama, or SmolLM2 in the small profile), copied in,
  with one new token `<image>` whose embedding row is added by `resize_token_embeddings` (mean-resized);
* image tokens: the chat template writes one `<image>` per image in the user turn; the `LlavaProcessor` expands it
  to `image_seq_length` = (image_size / patch_size)² copies (CLS dropped: `vision_feature_select_strategy=
  "default"` with `num_additional_image_tokens=1`, as llava-1.5), and the model scatters the projected patch
  features of layer `vision_feature_layer=-2` into those positions.

The tiny VLM sees nothing: its vision weights are random. It exists so that image inputs, batching, SFT and
save/load go through the real LLaVA code path; the book says so wherever it shows its outputs.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..device import place
from ..distributed import link_main_output
from ..speed import fitting_batches

IMAGE_TOKEN = "<image>"
# ChatML as in helpers.models.CHAT_TEMPLATE (text turns render identically), plus image parts: a user turn's content
# may be a list of {"type": "image"} / {"type": "text", "text": ...} parts; images come first, one <image> each.
VLM_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    "{% for part in parts if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}{{ '<|im_end|>' }}"
    "{% endgeneration %}"
    "{% else %}{% for part in parts if part['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for part in parts if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}{{ '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
VLM_NOTE = ("Random-weight stand-in for a vision-language model, built by helpers.chatgen.vlm (seed {seed}): a "
            "LLaVA model whose CLIP vision tower ({layers} layers, patch {patch}, {size} px) and projector are random, "
            "and whose language model is copied from `{llm}` plus one new `<image>` token. It runs the real "
            "image-text-to-text code path; it does not understand images, and its outputs carry no meaning.")


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_tiny_vlm(folder: str | Path, llm_folder: str | Path, seed: int = 0, image_size: int = 32,
                   patch_size: int = 8) -> dict[str, Any]:
    """A LLaVA model (random CLIP vision tower + projector, LM copied from `llm_folder`) with its processor."""
    from transformers import (AutoModelForCausalLM, AutoTokenizer, CLIPImageProcessorPil, CLIPVisionConfig,
                              LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}; the vision tower "
                         "cuts the image into whole patches")
    folder, llm_folder = Path(folder), Path(llm_folder)
    tokenizer = AutoTokenizer.from_pretrained(llm_folder)
    missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in tokenizer.get_vocab()]
    if missing:
        raise ValueError(f"the tokenizer in {llm_folder} lacks the ChatML tokens {missing} that the VLM chat template "
                         "writes; use a ChatML model (the tiny Llama, SmolLM2) or adapt VLM_CHAT_TEMPLATE")
    language_model = AutoModelForCausalLM.from_pretrained(llm_folder, dtype=torch.float32)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    torch.manual_seed(seed)
    # the new row (input and output) is drawn around the old embeddings' mean, so it is on their scale (asked for
    # here, so transformers' notice that it does so is not shown)
    from ..config import errors_only

    with errors_only("transformers"):
        language_model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    tokenizer.chat_template = VLM_CHAT_TEMPLATE

    # its config would otherwise record the absolute folder it was loaded from, so the saved file differed per clone
    language_model.config.name_or_path = llm_folder.name
    num_patches = (image_size // patch_size) ** 2
    vision_config = CLIPVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=32,
                                     intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     projection_dim=32)
    config = LlavaConfig(vision_config=vision_config, text_config=language_model.config,
                         image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_seq_length=num_patches,
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    # the LM part is the causal LM itself: same module class (AutoModel of the same config), same weights
    model.model.language_model.load_state_dict(language_model.base_model.state_dict())
    model.lm_head.load_state_dict(language_model.get_output_embeddings().state_dict())
    model.generation_config = language_model.generation_config

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=VLM_CHAT_TEMPLATE, image_token=IMAGE_TOKEN)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    note = VLM_NOTE.format(seed=seed, layers=vision_config.num_hidden_layers, patch=patch_size, size=image_size,
                           llm=llm_folder.name)
    (folder / "README.md").write_text(
        "---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\n"
        "tags: [t2i-agent-book, tiny, random-weights, llava]\n---\n\n# tiny LLaVA vision-language model\n\n"
        f"{note}\n")
    return {"parameters": _count(model), "vision_parameters": _count(model.model.vision_tower),
            "projector_parameters": _count(model.model.multi_modal_projector),
            "language_parameters": _count(model.model.language_model) + (
                0 if config.tie_word_embeddings else _count(model.lm_head)),
            "image_size": image_size, "image_seq_length": num_patches, "image_token_id": config.image_token_index,
            "vocab_size": len(tokenizer)}


# ------------------------------------------------------------------------------------------- conversations

def multimodal_messages(messages: Sequence[Mapping[str, Any]], image=None) -> list[dict[str, Any]]:
    """Chat turns in the parts format processors read; `image` (PIL) goes first in the last user turn."""
    converted = []
    for message in messages:
        content = message["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else [dict(p) for p in content]
        converted.append({"role": message["role"], "content": parts})
    if image is not None:
        users = [i for i, m in enumerate(converted) if m["role"] == "user"]
        if not users:
            raise ValueError("an image needs a user turn to go in; the messages have none")
        converted[users[-1]]["content"].insert(0, {"type": "image", "image": image})
    return converted


def _text_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Chat turns with text content only (parts joined), for a text-only model."""
    return [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else
             "".join(p.get("text", "") for p in m["content"] if p.get("type") == "text")} for m in messages]


def _as_batch(messages, images) -> tuple[list, list, bool]:
    """(conversations, images, whether one conversation was given) from one chat or a list of chats."""
    single = bool(messages) and isinstance(messages[0], Mapping)
    conversations = [messages] if single else list(messages)
    if images is None:
        images = [None] * len(conversations)
    elif single:
        images = [images]
    images = list(images)
    if len(images) != len(conversations):
        raise ValueError(f"{len(images)} images for {len(conversations)} conversations; pass one image (or None) "
                         "per conversation")
    return conversations, images, single


def sft_batch(processor, conversations: Sequence[Sequence[Mapping[str, Any]]], images=None):
    """Processor inputs plus `labels`: the assistant replies' tokens (their <|im_end|> included), -100 elsewhere."""
    conversations, images, _ = _as_batch(conversations, images)
    if any(not c or c[-1]["role"] != "assistant" for c in conversations):
        raise ValueError("every SFT conversation must end with the assistant's reply (the tokens the loss is on)")
    batch = processor.apply_chat_template([multimodal_messages(c, i) for c, i in zip(conversations, images)],
                                          tokenize=True, return_dict=True, return_tensors="pt",
                                          return_assistant_tokens_mask=True, processor_kwargs={"padding": True})
    assistant = batch.pop("assistant_masks").bool() & batch["attention_mask"].bool()
    batch["labels"] = batch["input_ids"].masked_fill(~assistant, -100)
    return batch


# ------------------------------------------------------------------------------------------- the chat model

class ChatModel:
    """A chat model behind one `generate(messages, images)`: a causal LM (text only) or an image-text-to-text model."""

    def __init__(self, model, tokenizer, processor=None, path: str = ""):
        self.model, self.tokenizer, self.processor, self.path = model, tokenizer, processor, path
        # decoder-only models continue a batch from its right edge: pad on the left
        self.tokenizer.padding_side = "left"

    @property
    def is_multimodal(self) -> bool:
        return self.processor is not None

    @property
    def device(self) -> torch.device:
        return self.model.device

    def inputs(self, conversations: Sequence[Sequence[Mapping[str, Any]]], images: Sequence[Any]) -> dict:
        """Model inputs for a batch of chats, ready for the assistant's reply."""
        if self.is_multimodal:
            batch = self.processor.apply_chat_template(
                [multimodal_messages(c, i) for c, i in zip(conversations, images)], add_generation_prompt=True,
                tokenize=True, return_dict=True, return_tensors="pt", processor_kwargs={"padding": True})
            return batch.to(self.device, dtype=self.model.dtype)  # dtype applies to pixel values only
        texts = [self.tokenizer.apply_chat_template(_text_messages(c), add_generation_prompt=True, tokenize=False)
                 for c in conversations]
        # the chat template already writes any BOS token; adding special tokens again would double it
        batch = self.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        return {key: value.to(self.device) for key, value in batch.items()}

    @torch.no_grad()
    def generate(self, messages, images=None, max_new_tokens: int = 64, do_sample: bool = False,
                 batch_size: int = 8, **generate_kwargs) -> str | list[str]:
        """The assistant's reply to one chat (a str) or to each chat of a list (list of str).

        `images`: one PIL image or None per chat (a single image for a single chat); it goes into the last user
        turn. A text-only model ignores images, with a warning.
        """
        conversations, images, single = _as_batch(messages, images)
        if not self.is_multimodal and any(image is not None for image in images):
            warnings.warn(f"{self.path or 'this model'} is a text-only causal LM; "
                          f"{sum(i is not None for i in images)} image(s) ignored", stacklevel=2)
            images = [None] * len(conversations)
        pad_token_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else \
            self.tokenizer.eos_token_id
        def reply(part: list[int]) -> list[str]:
            batch = self.inputs([conversations[i] for i in part], [images[i] for i in part])
            output = self.model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                         pad_token_id=pad_token_id, **generate_kwargs)
            return self.tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)

        # batches of `batch_size`, in halves where the GPU runs out of memory
        replies, _ = fitting_batches(reply, list(range(len(conversations))), batch_size, "chat replies")
        return replies[0] if single else replies


def is_image_text_to_text(path: str | Path) -> bool:
    """Whether the model at `path` takes images (an image-text-to-text architecture with a vision config)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    config = AutoConfig.from_pretrained(path)
    return config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and \
        getattr(config, "vision_config", None) is not None


def language_tower(path: str | Path, output: str | Path) -> str:
    """The causal LM inside a chat model: `path` itself when it is a causal LM; for an image-text-to-text model (a
    LLaVA), its language model and LM head saved in `output` as a plain causal LM with the chat model's tokenizer.

    ChatGen-Evo's stage 2 adds its ModelTokens to the model stage 1 trained, which reads the chat as text. Under a
    multi-process launch every process calls this together.
    """
    if not is_image_text_to_text(path):
        return str(path)
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    chat_model = AutoModelForImageTextToText.from_pretrained(path, dtype="auto")  # a 7B copy stays in bf16/fp16
    inner = getattr(getattr(chat_model, "model", None), "language_model", None)
    if inner is None:
        raise ValueError(f"{path}: a {type(chat_model).__name__} keeps no `model.language_model`; stage 2 needs the "
                         "text model of a LLaVA-style chat model (or give a causal LM)")
    causal = AutoModelForCausalLM.from_config(chat_model.config.text_config, dtype=chat_model.dtype)
    causal.get_decoder().load_state_dict(inner.state_dict())  # strict: every weight has its place
    causal.get_output_embeddings().load_state_dict(chat_model.get_output_embeddings().state_dict())
    output = Path(output)
    causal.save_pretrained(output)  # under a launch transformers writes it on the main process only
    AutoProcessor.from_pretrained(path).tokenizer.save_pretrained(output)
    link_main_output(output)  # so every process finds the weights it is about to load (a collective)
    return str(output)


def load_chat_model(path: str | Path, device: str = "cpu", dtype: torch.dtype | None = None) -> ChatModel:
    """A ChatModel from a causal LM folder / hub id (text only) or an image-text-to-text one (uses its processor)."""
    if is_image_text_to_text(path):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype or torch.float32)
        processor = AutoProcessor.from_pretrained(path)
        return ChatModel(place(model, device), processor.tokenizer, processor, str(path))
    from ..models import load_causal_lm

    model, tokenizer = load_causal_lm(str(path), device=device, dtype=dtype)
    return ChatModel(model, tokenizer, None, str(path))
