"""Text generation for data building: one interface, three backends, and the description-rewriting stage.

DiffAgent rewrites each model's Civitai description into a short, uniform summary with an LLM. The same
`TextGenerator.generate(messages_batch)` call runs on a deterministic template (the tiny profile's stand-in,
labelled as such in every record), a local causal LM through `transformers`, or an OpenAI-compatible endpoint.
"""
from __future__ import annotations

import abc
import os
import random
import re
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, Callable

import requests
from tqdm.auto import tqdm

from .http import RETRY_STATUS, backoff_delay

TEMPLATE_FIELDS = "template_fields"  # extra key on a conversation's last message; only the template reads it


class TextGenerator(abc.ABC):
    """A chat model: one reply per conversation (a list of {"role", "content"} dicts)."""

    name: str  # provenance label written into records, e.g. "template", "transformers:<path>", "openai:<model>"
    is_stand_in: bool = False  # True only where the text is composed without a language model

    @abc.abstractmethod
    def generate(self, messages_batch: list[list[dict]], *, max_new_tokens: int = 128, temperature: float = 0.0,
                 seed: int = 0) -> list[str]:
        """One reply string per conversation in `messages_batch`, in order. A conversation that ends with an
        assistant message asks for that message to be continued (a reply opening); the reply then starts with it.
        Backends that cannot continue a message refuse such a conversation."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def opening(messages: list[dict]) -> str:
    """The reply opening a conversation asks to be continued: its final message's text if that is the assistant's,
    else ""."""
    return messages[-1]["content"] if messages and messages[-1].get("role") == "assistant" else ""


def chat_messages(messages: list[dict]) -> list[dict]:
    """The conversation without the template backend's hint, as a chat template or an API expects it."""
    return [{k: v for k, v in message.items() if k != TEMPLATE_FIELDS} for message in messages]


# ------------------------------------------------------------------------------------------------ template

# Function words, plus the quality boilerplate nearly every Stable Diffusion prompt carries: without them every
# model would be "suited to masterpiece, best and quality", which tells a reader nothing.
STOP_WORDS = frozenset("""
a an the and or but nor of in on at to for from by with without into onto over under above below near
is are was were be been being am it its it's this that these those there here as so very too not no
he she they them his her their him we you your our my me i up out off down than then while when where
who whom which what how also just only own same such both each few more most other some any all can will
masterpiece best quality high highly detailed detail details ultra hd hdr uhd 4k 8k 16k 32k realistic
absurdres highres resolution intricate sharp focus professional official break score_9 score_8_up
score_7_up lora embedding please model models trained train image images use using used recommended
settings setting sampler cfg steps version support
""".split())
TOP_KEYWORDS = 5  # keywords named in the template's description
TOP_TAGS = 5  # tags named in the template's description
_EXTRA_NETWORK = re.compile(r"<[^<>]*>")  # <lora:name:0.7>, <lyco:...>, <hypernet:...>: not words of the prompt
_WEIGHT = re.compile(r":\s*-?\d*\.?\d+\s*(?=[)\]])")  # "(castle:1.2)" → "(castle)"
_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*")
_MODEL_KINDS = {"Checkpoint": "checkpoint", "LORA": "LoRA", "LoCon": "LoCon", "Controlnet": "ControlNet",
                "TextualInversion": "textual-inversion embedding", "Hypernetwork": "hypernetwork", "VAE": "VAE"}


def prompt_words(text: str) -> list[str]:
    """Lower-cased content words of a prompt: extra-network tags, attention weights and stop words removed."""
    text = _WEIGHT.sub("", _EXTRA_NETWORK.sub(" ", text.lower()))
    return [w for w in _WORD.findall(text) if len(w) > 1 and not w.isdigit() and w not in STOP_WORDS]


def top_keywords(texts: list[str], k: int = TOP_KEYWORDS) -> list[str]:
    """The `k` most frequent content words over `texts`; ties broken alphabetically so the result is stable."""
    counts = Counter(w for text in texts for w in prompt_words(text))
    return sorted(counts, key=lambda w: (-counts[w], w))[:k]


def _join(words: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _describe_model(fields: dict[str, Any]) -> str:
    """2–3 sentences from the model's name, type, base model, sample-prompt keywords and tags."""
    missing = [k for k in ("model_name", "model_type", "base_model") if not fields.get(k)]
    if missing:
        raise ValueError(f"template task 'describe_model' needs {', '.join(missing)} in template_fields; "
                         f"got keys {sorted(fields)}")
    kind = _MODEL_KINDS.get(fields["model_type"], fields["model_type"])
    sentences = [f"{fields['model_name']} is a {kind} for {fields['base_model']}."]
    if keywords := top_keywords(fields.get("sample_prompts") or []):
        sentences.append(f"It is suited to prompts about {_join(keywords)}.")
    elif keywords := top_keywords([fields.get("description_text") or ""]):
        sentences.append(f"Its description mentions {_join(keywords)}.")
    else:
        sentences.append("Its page gives no sample prompts or description to say more.")
    tags = list(dict.fromkeys(t.strip().lower() for t in fields.get("tags") or [] if t.strip()))[:TOP_TAGS]
    if tags:
        sentences.append(f"It is tagged {_join(tags)}.")
    return " ".join(sentences)


TEMPLATES: dict[str, Callable[[dict[str, Any]], str]] = {"describe_model": _describe_model}


class TemplateGenerator(TextGenerator):
    """Deterministic stand-in: fills a template from the `template_fields` on each conversation's last message."""

    name = "template"
    is_stand_in = True

    def generate(self, messages_batch: list[list[dict]], *, max_new_tokens: int = 128, temperature: float = 0.0,
                 seed: int = 0) -> list[str]:
        """One filled template per conversation; sampling arguments are accepted and ignored (nothing is sampled)."""
        return [self._fill(messages) for messages in messages_batch]

    @staticmethod
    def _fill(messages: list[dict]) -> str:
        fields = messages[-1].get(TEMPLATE_FIELDS) if messages else None
        if not fields:
            raise ValueError(f"the template backend needs a {TEMPLATE_FIELDS!r} dict on the last message (it cannot "
                             "read the text); build the conversation with a helper such as describe_model_messages, "
                             "or use the 'transformers' or 'openai' backend")
        task = fields.get("task")
        if task not in TEMPLATES:
            raise ValueError(f"template task {task!r} is not one of: {', '.join(TEMPLATES)}")
        return TEMPLATES[task](fields)


# ---------------------------------------------------------------------------------------------- transformers

class TransformersGenerator(TextGenerator):
    """A local causal LM: chat template, length-sorted left-padded batches, only the new text returned.

    Decoding goes through `helpers.speed.greedy_decode`, the agent's path: batches of similar length, and on a
    GPU a static KV cache with CUDA graphs (`decode_settings` overrides that choice).
    """

    def __init__(self, model_path: str, device: str = "cpu", dtype=None, batch_size: int = 8,
                 decode_settings=None):
        from .models import load_causal_lm

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.name = f"transformers:{model_path}"
        self.batch_size = batch_size
        self.decode_settings = decode_settings  # a helpers.speed.DecodeSettings; None: DecodeSettings.auto
        self.model, self.tokenizer = load_causal_lm(model_path, device, dtype)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def generate(self, messages_batch: list[list[dict]], *, max_new_tokens: int = 128, temperature: float = 0.0,
                 seed: int = 0) -> list[str]:
        """Greedy when `temperature` is 0, else sampling, each batch seeded by `seed` and its place in length order.

        Under a multi-process launch the batches are shared out whole (the main process's conversations, batched
        as one process batches them, with one static cache width), so each process decodes its share and the
        replies, sampled ones too, do not depend on how many processes there are.
        """
        import dataclasses

        import torch

        from .distributed import broadcast_from_main, map_sharded
        from .speed import DecodeSettings, greedy_decode, length_buckets

        messages_batch = broadcast_from_main(messages_batch)
        openings = [opening(m) for m in messages_batch]
        # a final assistant message is continued in place (the chat template leaves its turn open); the template
        # already writes any BOS token, so the tokenizer adds no special tokens of its own
        prompts = [self.tokenizer(self.tokenizer.apply_chat_template(
                       chat_messages(m), tokenize=False, add_generation_prompt=not lead,
                       continue_final_message=bool(lead)), add_special_tokens=False)["input_ids"]
                   for m, lead in zip(messages_batch, openings)]
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {}
        settings = dataclasses.replace(self.decode_settings or DecodeSettings.auto(self.model.device),
                                       batch_size=self.batch_size)
        def here(share: list[tuple[int, list[int]]]) -> list[list[list[int]]]:
            found = []
            with tqdm(total=sum(len(batch) for _, batch in share), desc="generating", unit="chat") as bar:
                for number, batch in share:
                    if sampling:  # a batch's samples depend on its own seed, not on what was decoded before it
                        torch.manual_seed(seed * 1_000_003 + number)
                    tokens = greedy_decode(self.model, prompts, pad_id=self.tokenizer.pad_token_id,
                                           max_new_tokens=max_new_tokens, settings=settings, progress=bar.update,
                                           batches=[batch], **sampling)
                    found.append([tokens[i] for i in batch])
            return found

        batches = length_buckets([len(p) for p in prompts], self.batch_size)
        tokens: list[list[int]] = [[] for _ in prompts]
        for batch, found in zip(batches, map_sharded(here, list(enumerate(batches)))):
            for index, row in zip(batch, found):
                tokens[index] = row
        return [(lead + text).strip() if lead else text.strip()
                for lead, text in zip(openings, self.tokenizer.batch_decode(tokens, skip_special_tokens=True))]


# ------------------------------------------------------------------------------------------------- openai

_JITTER = random.Random()  # jitter only spreads retries in time; it never touches generated text


class ReplyCache:
    """Append-only JSON lines of request key → reply text, each reply fsynced as it arrives: a stage that asks a
    hosted LLM tens of thousands of times (AGFSync's questions, ChatGen's role-play) resumes after a crash or a
    rerun without paying for a reply twice, and gets the same text back. A torn last line is skipped on read."""

    def __init__(self, path: str | Path):
        from .manifest import read_jsonl_rows

        self.path = Path(path)
        self.replies: dict[str, str] = {row["key"]: row["reply"] for row in read_jsonl_rows(self.path)
                                        if "key" in row and "reply" in row}

    def get(self, key: str) -> str | None:
        return self.replies.get(key)

    def put(self, key: str, reply: str) -> None:
        from .manifest import append_jsonl

        append_jsonl(self.path, [{"key": key, "reply": reply}])
        self.replies[key] = reply


class OpenAICompatibleGenerator(TextGenerator):
    """POST {base_url}/chat/completions; retries 429/5xx and dropped connections with backoff and jitter.

    `generate` keeps up to `concurrency` requests in flight (one at a time, a hosted model's ~1–3 s per reply makes
    AGFSync's ~50,000 question lists a day or two of waiting) and, with a `cache` file (`ReplyCache`), reads back
    the replies it already has and stores each new one as it arrives. The API key is read from the environment at
    each request and never stored, logged, cached or put into `name`.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60,
                 max_retries: int = 4, backoff_base: float = 1.0, backoff_max: float = 60.0, concurrency: int = 8,
                 cache: str | Path | None = None):
        if concurrency < 1:
            raise ValueError(f"concurrency must be at least 1 (requests in flight), got {concurrency}")
        self.name = f"openai:{model}"
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.api_key_env = api_key_env  # the variable's name, not its value
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.concurrency = concurrency
        self.cache = None if cache is None else ReplyCache(cache)
        self.stats = Counter()  # requests (sent and answered) and cached (replies read back) across calls
        self._local = threading.local()  # one HTTP session per thread: requests' Session is not thread-safe

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r}, model={self.model!r})"

    @property
    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def request_key(self, messages: list[dict], max_new_tokens: int, temperature: float, seed: int) -> str:
        """What a reply is cached under: the endpoint, the model and the request body (never the key)."""
        from .manifest import sha256_json

        return sha256_json({"url": self.base_url, "model": self.model, "messages": chat_messages(messages),
                            "max_tokens": max_new_tokens, "temperature": temperature, "seed": seed})

    def generate(self, messages_batch: list[list[dict]], *, max_new_tokens: int = 128, temperature: float = 0.0,
                 seed: int = 0) -> list[str]:
        """One reply per conversation, in order: cached ones read back, the rest requested `concurrency` at a time
        (a conversation that comes twice is asked once), each cached as it arrives. Under a multi-process launch,
        where every process runs every stage, the requests are split across the processes: each is asked once."""
        from .distributed import broadcast_from_main, map_sharded

        settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
        for messages in messages_batch:
            self._check_no_opening(messages)  # before any request goes out
        keys = [self.request_key(messages, **settings) for messages in messages_batch]
        # the main process's view of the cache holds for every process, so that all of them split the same work
        replies: dict[str, str] = broadcast_from_main(
            {key: found for key in dict.fromkeys(keys)
             if (found := self.cache.get(key) if self.cache is not None else None) is not None})
        todo: dict[str, int] = {}  # each missing reply's first conversation, in order
        for i, key in enumerate(keys):
            if key not in replies:
                todo.setdefault(key, i)
        self.stats["cached"] += sum(key in replies for key in keys)
        fresh = map_sharded(lambda share: self._ask(share, messages_batch, keys, settings), list(todo.values()))
        replies.update(zip(todo, fresh))
        if self.cache is not None:  # the other processes' replies too (they wrote them), so none is asked again
            self.cache.replies.update(zip(todo, fresh))
        return [replies[key] for key in keys]

    def _ask(self, share: list[int], messages_batch: list[list[dict]], keys: list[str],
             settings: dict[str, Any]) -> list[str]:
        """This process's requests, `concurrency` in flight, each reply cached as it arrives; in `share`'s order."""
        answers: dict[int, str] = {}
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="openai")
        try:
            with tqdm(total=len(share), desc=self.name, unit="chat", disable=not share) as bar:
                futures = {pool.submit(self.complete, messages_batch[i], **settings): i for i in share}
                for future in as_completed(futures):
                    i = futures[future]
                    answers[i] = future.result()
                    if self.cache is not None:
                        self.cache.put(keys[i], answers[i])
                    self.stats["requests"] += 1
                    bar.update()
        finally:  # on a failure, what is queued is dropped; replies already in are in the cache
            pool.shutdown(wait=True, cancel_futures=True)
        return [answers[i] for i in share]

    def _check_no_opening(self, messages: list[dict]) -> None:
        if opening(messages):
            raise ValueError(f"{self.name}: the conversation ends with an assistant message to continue (a reply "
                             "opening), which the OpenAI chat API does not do; use the transformers backend, or "
                             "leave the opening out (notebook 10: multimodal_opening empty)")

    def complete(self, messages: list[dict], *, max_new_tokens: int = 128, temperature: float = 0.0,
                 seed: int = 0) -> str:
        """`choices[0].message.content` of one chat completion (not cached)."""
        self._check_no_opening(messages)
        body = {"model": self.model, "messages": chat_messages(messages), "max_tokens": max_new_tokens,
                "temperature": temperature, "seed": seed}
        return self._reply_text(self._post(f"{self.base_url}/chat/completions", body))

    def _post(self, url: str, body: dict) -> dict:
        problem = ""
        for attempt in range(self.max_retries + 1):
            key = os.environ.get(self.api_key_env)
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            retry_after = None
            try:
                response = self._session.post(url, json=body, headers=headers, timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as error:
                problem = type(error).__name__
            else:
                if response.status_code == 200:
                    return response.json()
                text = _redact(response.text, key)[:200]
                if response.status_code not in RETRY_STATUS:
                    raise RuntimeError(f"{url} answered HTTP {response.status_code}: {text}")
                problem, retry_after = f"HTTP {response.status_code}: {text}", response.headers.get("Retry-After")
            if attempt < self.max_retries:
                time.sleep(self._backoff(attempt, retry_after))
        raise RuntimeError(f"giving up on {url} after {self.max_retries + 1} attempts; last problem: {problem}")

    def _backoff(self, attempt: int, retry_after: str | None) -> float:
        return backoff_delay(attempt, retry_after, self.backoff_base, self.backoff_max, _JITTER)

    @staticmethod
    def _reply_text(reply: dict) -> str:
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise RuntimeError(f"reply has no choices[0].message.content: {str(reply)[:200]}") from None
        return (content or "").strip()  # a refusal may carry content null: the validator then says "empty"


def _redact(text: str, secret: str | None) -> str:
    """`text` with `secret` masked: some servers echo the key back in their error messages."""
    return text.replace(secret, "***") if secret else text


# ------------------------------------------------------------------------------------------------ factory

BACKENDS: dict[str, type[TextGenerator]] = {"template": TemplateGenerator, "transformers": TransformersGenerator,
                                            "openai": OpenAICompatibleGenerator}


def generator_for(ctx, backend: str, endpoint: str = "", endpoint_model: str = "") -> TextGenerator:
    """A notebook's text generator: the template stand-in, the profile's agent LLM (transformers), or an
    OpenAI-compatible endpoint whose replies are cached in the run folder (`textgen_cache/openai.jsonl`), so a
    stage stopped midway, or run again, does not ask twice."""
    if backend == "openai" and not (endpoint and endpoint_model):
        raise ValueError(f"backend 'openai' needs endpoint and endpoint_model, got {endpoint!r} and "
                         f"{endpoint_model!r}; e.g. endpoint https://api.openai.com/v1, endpoint_model gpt-4o-mini")
    options = {"transformers": lambda: {"model_path": ctx.model_path("agent_llm"), "device": ctx.device},
               "openai": lambda: {"base_url": endpoint, "model": endpoint_model,
                                  "cache": ctx.runs_dir / "textgen_cache" / "openai.jsonl"}}.get(backend, dict)()
    return make_generator(backend, **options)


def make_generator(backend: str, **options) -> TextGenerator:
    """The generator for `backend` ("template", "transformers" or "openai"), built with `options`."""
    if backend not in BACKENDS:
        raise ValueError(f"text backend {backend!r} is not one of: {', '.join(BACKENDS)}")
    return BACKENDS[backend](**options)


# ---------------------------------------------------------------------------------- description rewriting

class _TextExtractor(HTMLParser):
    """Collects text nodes; block-level tags become spaces so words of adjacent paragraphs stay apart."""

    BLOCKS = frozenset("p br div li ul ol h1 h2 h3 h4 h5 h6 tr td th table blockquote pre hr".split())
    SKIP = frozenset({"script", "style"})

    def __init__(self):
        super().__init__(convert_charrefs=True)  # entities (&amp; &#39; &nbsp;) arrive already unescaped
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self._skipping += 1
        if tag in self.BLOCKS:
            self.parts.append(" ")

    def handle_endtag(self, tag):
        if tag in self.SKIP and self._skipping:
            self._skipping -= 1
        if tag in self.BLOCKS:
            self.parts.append(" ")

    def handle_data(self, data):
        if not self._skipping:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """Plain text of an HTML fragment: tags stripped, entities unescaped, whitespace collapsed."""
    extractor = _TextExtractor()
    extractor.feed(html or "")
    extractor.close()
    return " ".join("".join(extractor.parts).split())


DESCRIBE_SYSTEM = ("You write short, neutral descriptions of Stable Diffusion models for a model catalog. "
                   "Answer in plain English: no HTML, no markdown, no NSFW content.")
DESCRIBE_FIELDS = ("model_name", "model_type", "base_model", "description_html", "sample_prompts", "tags")
SAMPLE_PROMPTS = 5  # sample prompts shown to the writer
DESCRIPTION_CHARS = 1000  # creator's text kept in the instruction: keeps small local models within their context
PROMPT_CHARS = 300  # per sample prompt in the instruction (real Civitai prompts run to thousands of characters)


def describe_model_messages(model: dict) -> list[dict]:
    """System + user instruction asking for a 2–3 sentence description; the template's fields ride on the last."""
    missing = [k for k in DESCRIBE_FIELDS if k not in model]
    if missing:
        raise ValueError(f"model record lacks {', '.join(missing)}; describe_model_messages needs "
                         f"{', '.join(DESCRIBE_FIELDS)}")
    text = html_to_text(model["description_html"] or "")
    prompts = list(model["sample_prompts"] or [])[:SAMPLE_PROMPTS]
    tags = list(model["tags"] or [])
    user = "\n".join([
        f"Model: {model['model_name']}", f"Type: {model['model_type']}", f"Base model: {model['base_model']}",
        f"Tags: {', '.join(tags) or '(none)'}", f"Creator's description: {text[:DESCRIPTION_CHARS] or '(none)'}",
        "Sample prompts:", *(f"- {p[:PROMPT_CHARS]}" for p in prompts or ["(none)"]), "",
        "In 2-3 sentences, describe neutrally what this model is good at. Plain English text only: "
        "no HTML, no markdown, no NSFW content."])
    fields = {"task": "describe_model", "model_name": model["model_name"], "model_type": model["model_type"],
              "base_model": model["base_model"], "description_text": text, "sample_prompts": prompts, "tags": tags}
    return [{"role": "system", "content": DESCRIBE_SYSTEM}, {"role": "user", "content": user, TEMPLATE_FIELDS: fields}]


_HTML = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*(\s[^<>]*)?/?>|&(#\d+|#x[0-9a-fA-F]+|[a-zA-Z]+);")


def validate_description(text: str, min_chars: int = 40, max_chars: int = 600) -> str | None:
    """None when `text` is a usable description, else why not ("empty", "too short (12 < 40 chars)", ...)."""
    text = (text or "").strip()
    if not text:
        return "empty"
    if len(text) < min_chars:
        return f"too short ({len(text)} < {min_chars} chars)"
    if len(text) > max_chars:
        return f"too long ({len(text)} > {max_chars} chars)"
    if _HTML.search(text):
        return "contains HTML"
    if any(marker in text for marker in _ECHO_MARKERS):
        return "echoes the instruction"
    words = re.findall(r"[a-z0-9']+", text.lower())
    trigrams = Counter(zip(words, words[1:], words[2:]))
    if trigrams and max(trigrams.values()) >= _MAX_TRIGRAM_REPEATS:
        phrase, count = trigrams.most_common(1)[0]
        return f"repetitive ({' '.join(phrase)!r} {count} times)"
    return None


# Small models often loop ("highly detailed, highly detailed, ...") or copy the prompt's field labels back.
_MAX_TRIGRAM_REPEATS = 3
_ECHO_MARKERS = ("Sample prompts:", "Creator's description:", "Base model:")


def rewrite_descriptions(models: list[dict], generator: TextGenerator, *, max_new_tokens: int = 160,
                         temperature: float = 0.0, seed: int = 0, min_chars: int = 40,
                         max_chars: int = 600) -> list[dict]:
    """One record per model; outputs that fail validation are replaced by the template's, marked `fallback`."""
    conversations = [describe_model_messages(m) for m in models]
    outputs = generator.generate(conversations, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    if len(outputs) != len(models):
        raise RuntimeError(f"{generator.name} returned {len(outputs)} replies for {len(models)} conversations")
    reasons = [validate_description(o, min_chars, max_chars) for o in outputs]
    # the template cannot replace itself: its own invalid output is kept, marked invalid
    redo = [i for i, r in enumerate(reasons) if r is not None and not generator.is_stand_in]
    fallbacks = dict(zip(redo, TemplateGenerator().generate([conversations[i] for i in redo])))
    return [{"model_version_id": model["model_version_id"], "description": fallbacks.get(i, (output or "").strip()),
             "backend": generator.name, "stand_in": generator.is_stand_in, "valid": reason is None,
             "reason": reason, "fallback": i in fallbacks}
            for i, (model, output, reason) in enumerate(zip(models, outputs, reasons))]
