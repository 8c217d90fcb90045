"""AGFSync's data side (An et al., 2024, Sec. 3): from an empty folder to a Diffusion-DPO preference dataset.

The stages, each a pure function here:
1. prompts: an LLM writes T2I prompts in 12 categories from a few in-context examples (`generate_prompts`),
   near-duplicates are removed with MiniLM (`dedupe_prompts`) and counted per category (`category_counts`);
2. questions: an LLM turns each prompt into yes-answer questions about its elements (`build_qa`);
3. candidates: N images per prompt, all but the first drawn from a noised text embedding (`noise_text_embeddings`);
4. scores: VQA (share of questions a VQA model answers "yes"), CLIP (γ = 100) and aesthetic, each on 0–100,
   weighted 0.35 / 0.55 / 0.10 (`agfsync_score`); best and worst candidate form a pair (`select_pair`);
5. the pairs become a `datasets.Dataset` with images (`preference_dataset`).

The tiny profile's text backend is a template that cannot follow instructions, so prompt writing and question
writing have deterministic stand-ins (`stand_in_prompts`, `template_qa`); every row they produce says so
(`stand_in: True`).
"""
from __future__ import annotations

import itertools
import json
import math
import random
import re
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import numpy as np

from .manifest import sha256_json
from .scoring import AGFSYNC_CLIP_GAMMA, AGFSYNC_WEIGHTS, clip_score, weighted_score
from .textgen import STOP_WORDS, TextGenerator

# ------------------------------------------------------------------------------------------ categories

CATEGORIES = ("natural landscapes", "cities and architecture", "people", "animals", "plants", "food and beverages",
              "sports and fitness", "art and culture", "technology and industry", "everyday objects",
              "transportation", "abstract and conceptual art")

# Written for this book. Each category mixes one very short prompt with one long, scene-like prompt (40+ words),
# because the LLM copies the length distribution it is shown. Commas separate a subject (first) from details:
# the stand-in recombines exactly those pieces.
IN_CONTEXT_EXAMPLES: dict[str, tuple[str, ...]] = {
    "natural landscapes": (
        "a frozen waterfall at dawn",
        "rolling green hills under a stormy sky, golden hour, wide angle photograph",
        "a lonely pine tree on a rocky island, calm lake, morning mist, minimalist composition",
        "desert dunes with rippled sand, long shadows, hot orange light",
        "a vast mountain valley seen from a high ridge, a silver river winding between dark forests, snow on the "
        "distant peaks, thin clouds drifting over the pass, a small wooden cabin with smoke rising from its chimney, "
        "late afternoon light, ultra wide landscape photograph"),
    "cities and architecture": (
        "a glass skyscraper reflecting sunset clouds",
        "a narrow cobblestone street in an old town, flower boxes on the windows, early morning",
        "a brutalist concrete library, symmetrical facade, overcast sky, architectural photography",
        "a futuristic city at night, neon signs, rain on the pavement, cyberpunk style",
        "an aerial view of a dense harbor city at blue hour, three white ferries crossing the bay, red tiled roofs "
        "climbing the hillside, a round stone lighthouse on the pier, warm windows in every house, streetlights just "
        "switching on, tilt-shift miniature effect"),
    "people": (
        "portrait of an elderly fisherman smiling",
        "a young woman reading a book on a park bench, autumn leaves, soft natural light",
        "two children flying a kite on a windy beach, candid photograph",
        "a jazz singer on a smoky stage, spotlight, black and white film photo",
        "a busy street market in the late afternoon, a woman in a yellow raincoat choosing oranges from a wooden "
        "crate, a vendor laughing behind the counter, an old man carrying a basket of bread, warm light, shallow "
        "depth of field, documentary photograph"),
    "animals": (
        "a red fox asleep in snow",
        "a herd of elephants crossing a muddy river at sunset, telephoto shot",
        "a tiny hummingbird hovering next to a purple flower, macro photograph, blurred background",
        "a golden retriever puppy wearing a blue scarf, studio portrait",
        "an old gray wolf standing on a snowy ridge under a full moon, breath steaming in the cold air, three ravens "
        "circling above the pine trees, blue shadows on the snow, the wolf staring into the camera, cinematic "
        "wildlife photograph, sharp fur detail"),
    "plants": (
        "a single sunflower in a field",
        "a potted monstera plant next to a bright window, minimalist interior, soft daylight",
        "cherry blossom branches over a quiet canal, pink petals on the water",
        "close-up of a fern unfurling, morning dew, macro lens",
        "an overgrown greenhouse full of tropical plants, large banana leaves pressing against the cracked glass "
        "roof, orchids hanging in woven baskets, a rusty watering can on a stone table, shafts of sunlight through "
        "humid air, lush green tones, botanical illustration style"),
    "food and beverages": (
        "a stack of blueberry pancakes",
        "a steaming bowl of ramen with a soft boiled egg, chopsticks on the side, overhead shot",
        "iced coffee in a tall glass on a marble table, condensation drops, cafe photography",
        "a rustic loaf of sourdough bread on a wooden board, flour dusting, warm kitchen light",
        "a festive dinner table seen from above, a roasted chicken on a white ceramic plate in the center, bowls of "
        "green salad and red tomatoes, two glasses of red wine, candles burning beside a round loaf of bread, linen "
        "napkins, warm cozy lighting, food magazine photograph"),
    "sports and fitness": (
        "a surfer riding a huge wave",
        "a basketball player dunking in an empty gym, dramatic lighting, motion blur",
        "a woman doing yoga on a cliff at sunrise, calm ocean below",
        "marathon runners crossing a bridge, crowd cheering, sports photograph",
        "a professional cyclist racing down a winding mountain road, wearing a red jersey and a white helmet, "
        "spectators waving flags along the roadside, a team car following close behind, pine forest on both sides, "
        "low angle action shot, crisp afternoon light"),
    "art and culture": (
        "a marble statue in a museum hall",
        "a traditional tea ceremony, a woman in a kimono pouring tea, quiet tatami room",
        "a street mural of a giant whale painted on a brick wall, vibrant colors",
        "an orchestra performing in a grand concert hall, golden balconies, wide shot",
        "a lively folk festival in a village square, dancers in embroidered costumes spinning in a circle, a band "
        "playing violins and an accordion on a wooden stage, paper lanterns strung between the houses, children "
        "watching from the steps, oil painting in an impressionist style"),
    "technology and industry": (
        "a robot arm welding a car frame",
        "rows of servers in a blue lit data center, long corridor, symmetrical composition",
        "a vintage computer on a wooden desk, green text on the screen, office from the 1980s",
        "an offshore wind farm at dusk, white turbines on the sea, aerial view",
        "inside a modern electronics factory, a worker in a white clean suit inspecting a circuit board under a "
        "magnifying lamp, robotic arms assembling smartphones along a conveyor belt, cool fluorescent lighting, glass "
        "partitions, sharp industrial photograph with a shallow depth of field"),
    "everyday objects": (
        "a cracked coffee mug on a windowsill",
        "a pair of worn leather boots by the door, muddy floor, morning light",
        "an open notebook with a fountain pen and a pair of glasses, top view",
        "a red umbrella leaning against a gray wall, rainy day, minimalist photo",
        "a cluttered wooden desk in a small bedroom, an old brass alarm clock next to a stack of paperback books, a "
        "green desk lamp casting warm light, a half-finished cup of tea, a potted cactus, scattered colored pencils, "
        "cozy still life photograph"),
    "transportation": (
        "a red double-decker bus in London",
        "a steam locomotive crossing a stone viaduct, white smoke, autumn valley",
        "a small sailboat on a calm turquoise sea, seen from above",
        "a vintage motorcycle parked outside a roadside diner at night, neon glow",
        "a busy international airport at sunrise, a large passenger jet taking off from the runway, two smaller "
        "planes waiting on the taxiway, a yellow fuel truck driving past the terminal, heat shimmer over the tarmac, "
        "long telephoto photograph, clear morning sky"),
    "abstract and conceptual art": (
        "the sound of silence, visualized",
        "floating geometric shapes in pastel colors, soft shadows, 3d render",
        "a clock melting into a staircase that leads nowhere, surreal digital art",
        "swirling ink in water, blue and gold, high speed photograph",
        "a conceptual artwork about time, an hourglass where the falling sand turns into a flock of small birds, a "
        "cracked mirror reflecting a different season in each shard, muted colors on a white background, minimalist "
        "composition, fine art print on paper"),
}


def _check_category(category: str) -> None:
    if category not in CATEGORIES:
        raise ValueError(f"category {category!r} is not one of: {', '.join(CATEGORIES)}")


# ------------------------------------------------------------------------------------ prompt generation

def prompt_messages(category: str, examples: Sequence[str], count: int) -> list[dict]:
    """A chat asking an LLM for `count` new, varied T2I prompts about `category`, one per line."""
    if count < 1:
        raise ValueError(f"count must be at least 1, got {count}")
    if not examples:
        raise ValueError(f"no in-context examples for {category!r}; pass IN_CONTEXT_EXAMPLES[{category!r}]")
    shown = "\n".join(f"- {example}" for example in examples)
    system = ("You write prompts for a text-to-image model. A good prompt names what is in the picture, how the "
              "things look and where they are, and may add lighting, camera or art style.")
    user = (f"Category: {category}\n\nExample prompts in this category:\n{shown}\n\n"
            f"Write {count} new prompts in the category \"{category}\". Make them differ from each other and from "
            "the examples in subject, setting and style; mix short prompts of a few words with long ones describing "
            "a whole scene. Answer with the prompts only, one per line, without numbering, quotes or comments.")
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


_LIST_MARKER = re.compile(r"^\s*(?:[-*•–]+\s*|\(?#?\d{1,3}\s*[.):\]]\s*|prompt\s*\d*\s*[:.-]\s*)+", re.IGNORECASE)
_CHATTER = re.compile(r"^(?:(?:sure|certainly|of course|okay|ok|here (?:are|is)|i hope|let me know|feel free|"
                      r"sorry|i cannot|i can't|i'm sorry|as an ai)\b|note:)", re.IGNORECASE)
_QUOTES = "\"'“”‘’`"


def parse_prompts(text: str, min_words: int = 3, max_words: int = 60) -> list[str]:
    """Prompts from an LLM reply: numbering, bullets, quotes and markdown stripped; chatter, headers, fragments
    (< `min_words`) and over-long lines (> `max_words`, past what CLIP's 77 tokens hold) dropped."""
    prompts = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line or line.startswith("```") or line.endswith(":") or _CHATTER.match(line):
            continue
        line = _LIST_MARKER.sub("", line).replace("**", "").replace("__", "").strip()
        line = line.strip(_QUOTES).strip().rstrip(",;").strip().strip(_QUOTES).strip()
        words = len(line.split())
        if min_words <= words <= max_words:
            prompts.append(line)
    return prompts


def _pieces(prompt: str) -> list[str]:
    return [piece.strip() for piece in prompt.split(",") if piece.strip()]


def stand_in_prompts(category: str, count: int, seed: int = 0,
                     examples: Sequence[str] | None = None) -> list[str]:
    """Deterministic stand-in for the LLM: `count` new prompts, each one example's subject (its text before the
    first comma) followed by 1–3 details (comma pieces) drawn from the category's examples with a seeded RNG.

    No language model is involved: the prompts only recombine the examples, and say nothing new.
    """
    examples = list(IN_CONTEXT_EXAMPLES[category] if examples is None else examples)
    split = [_pieces(example) for example in examples]
    subjects = [pieces[0] for pieces in split if pieces]
    details = list(dict.fromkeys(piece for pieces in split for piece in pieces[1:]))
    if not subjects or not details:
        raise ValueError(f"the stand-in needs examples with at least one comma for {category!r} (subject, detail); "
                         f"got {examples!r}")
    rng = random.Random(f"{seed}:{category}")  # str seeds hash with SHA-512: stable across runs and platforms
    seen = {example.lower() for example in examples}
    prompts: list[str] = []
    for _ in range(50 * count):  # the combinations run out for small example sets; stop instead of looping forever
        if len(prompts) == count:
            break
        subject = rng.choice(subjects)
        pool = [d for d in details if d not in subject]
        prompt = ", ".join([subject, *rng.sample(pool, min(len(pool), rng.randint(1, 3)))])
        if prompt.lower() not in seen:
            seen.add(prompt.lower())
            prompts.append(prompt)
    return prompts


def generate_prompts(generator: TextGenerator, per_category: int, seed: int = 0, temperature: float = 1.0, *,
                     categories: Sequence[str] = CATEGORIES,
                     examples: Mapping[str, Sequence[str]] = IN_CONTEXT_EXAMPLES, per_request: int = 20,
                     max_new_tokens: int | None = None) -> list[dict]:
    """Up to `per_category` prompts per category as rows {category, prompt, backend, stand_in}.

    An LLM is asked for `per_request` prompts per conversation, the examples shuffled differently in each so that
    repeated requests differ even under one seed. Replies are parsed, copies of an example, of a category's name or
    of an earlier prompt (ignoring case) are dropped, and each category keeps its first `per_category`; a category
    the LLM under-fills simply has fewer rows (`category_counts` shows it). A stand-in generator
    (`generator.is_stand_in`, the template backend) cannot follow the instruction, so `stand_in_prompts` writes those
    rows, marked `stand_in: True`.
    """
    if per_category < 1 or per_request < 1:
        raise ValueError(f"per_category ({per_category}) and per_request ({per_request}) must be at least 1")
    for category in categories:
        _check_category(category)
    if generator.is_stand_in:
        return [{"category": category, "prompt": prompt, "backend": generator.name, "stand_in": True}
                for category in categories
                for prompt in stand_in_prompts(category, per_category, seed, examples[category])]
    conversations, asked_for = [], []
    for category in categories:
        for request in range(math.ceil(per_category / per_request)):
            shown = list(examples[category])
            random.Random(f"{seed}:{category}:{request}").shuffle(shown)
            conversations.append(prompt_messages(category, shown, per_request))
            asked_for.append(category)
    replies = generator.generate(conversations, max_new_tokens=max_new_tokens or 48 * per_request,
                                 temperature=temperature, seed=seed)
    if len(replies) != len(conversations):
        raise RuntimeError(f"{generator.name} returned {len(replies)} replies for {len(conversations)} conversations")
    # an example or a category's own name (a small LLM echoes the "Category:" line) is not a new prompt
    seen = {example.lower() for category in categories for example in examples[category]}
    seen |= {category.lower() for category in (*CATEGORIES, *categories)}
    collected: dict[str, list[str]] = {category: [] for category in categories}
    for category, reply in zip(asked_for, replies):
        for prompt in parse_prompts(reply):
            if prompt.lower() not in seen and len(collected[category]) < per_category:
                seen.add(prompt.lower())
                collected[category].append(prompt)
    return [{"category": category, "prompt": prompt, "backend": generator.name, "stand_in": False}
            for category in categories for prompt in collected[category]]


# ------------------------------------------------------------------------------------------------ dedup

def dedupe_prompts(prompts: Sequence[str | Mapping[str, Any]], encoder, threshold: float = 0.9,
                   batch_size: int = 256) -> tuple[list, list[dict]]:
    """Greedy near-duplicate removal: in order, a prompt is dropped when its cosine similarity (normalised MiniLM
    embeddings) to any earlier *kept* prompt is ≥ `threshold`.

    `prompts` are strings or rows with a "prompt" key. Returns (kept items, dropped) where each dropped entry is
    the row (or {"prompt": text}) plus "duplicate_of" (the most similar kept prompt) and "similarity".
    Exact: the comparison is done in blocks of `batch_size`, each against everything kept before it.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold {threshold} must lie in (0, 1]; AGFSync-style dedup uses 0.9")
    texts = [item if isinstance(item, str) else item["prompt"] for item in prompts]
    if not texts:
        return [], []
    embeddings = np.asarray(encoder.encode(texts, normalize_embeddings=True, show_progress_bar=False,
                                           convert_to_numpy=True), dtype=np.float32)
    kept: list[int] = []
    dropped: list[dict] = []
    for start in range(0, len(texts), batch_size):
        block = embeddings[start:start + batch_size]
        against_kept = block @ embeddings[kept].T if kept else np.zeros((len(block), 0), np.float32)
        within = block @ block.T
        kept_before_block = len(kept)
        for offset in range(len(block)):
            kept_in_block = [k - start for k in kept[kept_before_block:]]
            similarities = np.concatenate([against_kept[offset], within[offset, kept_in_block]])
            if similarities.size and similarities.max() >= threshold:
                best = int(similarities.argmax())
                item = prompts[start + offset]
                dropped.append({**({"prompt": item} if isinstance(item, str) else item),
                                "duplicate_of": texts[kept[best]], "similarity": float(similarities[best])})
            else:
                kept.append(start + offset)
    return [prompts[i] for i in kept], dropped


def category_counts(rows: Sequence[Mapping[str, Any]], kept: Sequence[Mapping[str, Any]] | None = None):
    """Prompts per category (paper Table 3): `generated`, and with `kept` also `kept` after dedup; a total row."""
    import pandas as pd

    order = list(CATEGORIES) + sorted({r["category"] for r in rows} - set(CATEGORIES))
    table = pd.DataFrame({"generated": Counter(r["category"] for r in rows)}, index=order).fillna(0).astype(int)
    if kept is not None:
        table["kept"] = pd.Series(Counter(r["category"] for r in kept)).reindex(order).fillna(0).astype(int)
        table["dropped"] = table["generated"] - table["kept"]
    table.loc["total"] = table.sum()
    table.index.name = "category"
    return table


# ------------------------------------------------------------------------------------------- QA pairs

ELEMENT_TYPES = ("object", "human", "animal", "food", "activity", "attribute", "counting", "color", "material",
                 "spatial", "location", "shape", "other")

# two worked examples, shown to the LLM as earlier turns of the chat (a 135M model follows turns far better than an
# example embedded in one instruction); the tests check that each passes validate_qa in full
QA_EXAMPLES: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("two ducks swimming under a wooden bridge",
     (("Are there ducks?", "animal"), ("Are there two ducks?", "counting"), ("Are the ducks swimming?", "activity"),
      ("Is there a bridge?", "object"), ("Is the bridge made of wood?", "material"),
      ("Are the ducks under the bridge?", "spatial"))),
    ("a little girl in a yellow raincoat holding a red umbrella on a city street",
     (("Is there a girl?", "human"), ("Is the girl little?", "attribute"),
      ("Is the girl wearing a raincoat?", "object"), ("Is the raincoat yellow?", "color"),
      ("Is the girl holding an umbrella?", "activity"), ("Is the umbrella red?", "color"),
      ("Is the girl on a city street?", "location"))),
)


def qa_lines(questions: Sequence[tuple[str, str]]) -> str:
    """The reply format: one JSON object {"question", "answer": "yes", "element_type"} per line."""
    return "\n".join(json.dumps({"question": q, "answer": "yes", "element_type": t}) for q, t in questions)


def qa_messages(prompt: str) -> list[dict]:
    """A chat asking an LLM for questions whose answer is "yes" for an image that follows `prompt`, one JSON
    object per line: {"question", "answer": "yes", "element_type"}. The instruction and the element types sit in
    the system message; QA_EXAMPLES follow as user / assistant turns, then the prompt as the last user turn."""
    system = ("You turn an image description into simple yes/no questions, one per element of the description, "
              "so that a visual question answering model can check an image against it. Write one question for "
              "every object, person, animal, food, action, attribute, count, colour, material, position, place and "
              "shape the description states, each answered \"yes\" by a faithful image. Element types: "
              f"{', '.join(ELEMENT_TYPES)}. Answer with JSON objects only, one per line, in the format shown.")
    messages = [{"role": "system", "content": system}]
    for example, questions in QA_EXAMPLES:
        messages += [{"role": "user", "content": f"Description: {example}"},
                     {"role": "assistant", "content": qa_lines(questions)}]
    return messages + [{"role": "user", "content": f"Description: {prompt}"}]


_BULLET = re.compile(r"(?:[-*•]\s*|\d{1,3}[.)]\s*)?")
_SEPARATORS = re.compile(r"[ \t,]*")


def parse_qa(text: str) -> list[dict]:
    """Objects from an LLM reply: a JSON array, or objects one after another, each on one line or spread over
    several (pretty-printed); code fences, bullets and separating commas are tolerated. A non-empty line that does
    not start a JSON object becomes {"unparsed": line} so validation can count it."""
    text = (text or "").strip()
    try:
        whole = json.loads(re.sub(r"^```\w*\s*|\s*```$", "", text))
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, list):
        return [item if isinstance(item, dict) else {"unparsed": json.dumps(item)} for item in whole]
    decoder, items, pos = json.JSONDecoder(), [], 0
    while pos < len(text):
        end = text.find("\n", pos)
        end = len(text) if end < 0 else end
        raw = text[pos:end]
        line = raw.strip()
        if not line or line.startswith("```") or line in ("[", "]", "],"):
            pos = end + 1
            continue
        body = _BULLET.match(text, pos + len(raw) - len(raw.lstrip())).end()  # where the line's content starts
        item = None
        if text.startswith("{", body):
            try:
                item, stop = decoder.raw_decode(text, body)
            except json.JSONDecodeError:
                item = None
        if isinstance(item, dict):
            items.append(item)
            pos = _SEPARATORS.match(text, stop).end()  # the rest of its last line is read as a line of its own
        else:
            items.append({"unparsed": line})
            pos = end + 1
    return items


# why a question is dropped; one short label each, so they can be counted
DROP_REASONS = ("not JSON", "missing field", "no question mark", "answer not yes", "unknown element type",
                "too short", "too long", "off prompt", "duplicate")
_QA_WORDS = frozenset("is are does do there this image scene show shown made look looks any".split())


def _stem(word: str) -> str:
    """Crude singular: enough to match "dogs" with "dog" and "glasses" with "glass"."""
    for suffix, replacement in (("ies", "y"), ("ses", "s"), ("xes", "x"), ("ches", "ch"), ("s", "")):
        if word.endswith(suffix) and len(word) > len(suffix) + 2 and not word.endswith("ss"):
            return word[: -len(suffix)] + replacement
    return word


def _content_stems(text: str) -> set[str]:
    return {_stem(w) for w in re.findall(r"[a-z0-9]+(?:-[a-z]+)*", text.lower())
            if w not in STOP_WORDS and w not in _QA_WORDS}


# names LLMs often use for an element type in place of ELEMENT_TYPES' own (plurals are handled separately)
ELEMENT_TYPE_SYNONYMS = {"person": "human", "people": "human", "colour": "color", "count": "counting",
                         "number": "counting", "quantity": "counting", "action": "activity", "place": "location",
                         "position": "spatial", "spatial relation": "spatial", "size": "attribute"}


def element_type_name(name: str) -> str:
    """`name` lower-cased and mapped onto ELEMENT_TYPES where it is a synonym or plural of one ("Person" → "human",
    "colours" → "color", "objects" → "object"); anything else is returned lower-cased, for validation to reject."""
    name = " ".join(name.split()).lower()
    for candidate in (name, name[:-1] if name.endswith("s") else None):
        if candidate in ELEMENT_TYPES:
            return candidate
        if candidate in ELEMENT_TYPE_SYNONYMS:
            return ELEMENT_TYPE_SYNONYMS[candidate]
    return name


def validate_qa(items: Sequence[Mapping[str, Any]], prompt: str, min_words: int = 3,
                max_words: int = 25) -> tuple[list[dict], list[dict]]:
    """(valid, dropped). Valid items are {"question", "answer": "yes", "element_type"} (answer and type lower-cased);
    each dropped entry is {"item", "reason" (one of DROP_REASONS), "detail"}.

    A question must end with "?", be answered "yes", carry a type from ELEMENT_TYPES, have `min_words`–`max_words`
    words, share at least one content word with the prompt ("off prompt" catches questions about things the prompt
    never mentions) and not repeat an earlier question (case and spacing ignored).
    """
    prompt_stems = _content_stems(prompt)
    valid, dropped, asked = [], [], set()

    def drop(item, reason, detail=""):
        dropped.append({"item": dict(item), "reason": reason, "detail": detail})

    for item in items:
        if "unparsed" in item:
            drop(item, "not JSON", str(item["unparsed"])[:80])
            continue
        fields = {key: item.get(key) for key in ("question", "answer", "element_type")}
        missing = [key for key, value in fields.items() if not isinstance(value, str) or not value.strip()]
        if missing:
            drop(item, "missing field", ", ".join(missing))
            continue
        question = " ".join(fields["question"].split())
        answer = fields["answer"].strip().lower().rstrip(".!")
        element_type = element_type_name(fields["element_type"])
        words = len(question.split())
        if not question.endswith("?"):
            drop(item, "no question mark", question)
        elif answer != "yes":
            drop(item, "answer not yes", repr(fields["answer"]))
        elif element_type not in ELEMENT_TYPES:
            drop(item, "unknown element type", repr(fields["element_type"]))
        elif words < min_words:
            drop(item, "too short", f"{words} < {min_words} words")
        elif words > max_words:
            drop(item, "too long", f"{words} > {max_words} words")
        elif not _content_stems(question) & prompt_stems:
            drop(item, "off prompt", question)
        elif question.lower() in asked:
            drop(item, "duplicate", question)
        else:
            asked.add(question.lower())
            valid.append({"question": question, "answer": "yes", "element_type": element_type})
    return valid, dropped


# --- the template stand-in for question writing: a small lexicon and positional rules, no parser, no LLM ---

_NOUNS: dict[str, str] = {}
for _type, _words in {
    "human": "woman man girl boy child person people fisherman singer player vendor worker cyclist surfer runner "
             "dancer astronaut chef spectator crowd musician knight student baby farmer soldier doctor teacher king "
             "queen family couple",
    "animal": "fox elephant hummingbird bird puppy dog cat wolf raven horse cow sheep fish whale owl eagle deer bear "
              "lion tiger rabbit duck butterfly bee frog monkey penguin dolphin kitten squirrel goat turtle snake "
              "dragon retriever",
    "food": "pancake ramen egg coffee bread loaf chicken salad tomato wine tea cake apple orange banana pizza soup "
            "cheese burger sushi noodle rice cookie chocolate strawberry blueberry lemon croissant donut pie sandwich "
            "milk juice beer",
    "location": "forest beach desert valley mountain field street city town village market kitchen museum hall gym "
                "park lake ocean sea island harbor bay airport runway factory greenhouse library bedroom office room "
                "garden square diner canal cliff hillside meadow cave jungle",
    "object": "waterfall hill tree pine sky cloud dune sand shadow river cabin chimney smoke snow skyscraper window "
              "flower building house lighthouse pier roof ferry bench book kite basket crate counter umbrella boot "
              "door notebook pen glasses mug windowsill clock lamp cup cactus pencil desk bus locomotive viaduct "
              "sailboat boat motorcycle car jet plane truck terminal bicycle train bridge road scarf jersey helmet "
              "flag wall mural statue kimono lantern violin accordion robot server computer screen turbine "
              "smartphone sunflower plant monstera blossom branch petal fern leaf orchid table plate bowl glass "
              "candle napkin chopsticks board wave ball basketball hourglass mirror staircase moon sun stage "
              "raincoat ridge peak",
}.items():
    for _word in _words.split():
        _NOUNS[_word] = _type
_COMPOUNDS = {("circuit", "board"): "object", ("ice", "cream"): "food", ("watering", "can"): "object",
              ("conveyor", "belt"): "object", ("alarm", "clock"): "object", ("wind", "farm"): "object"}
_IRREGULAR = {"people": "people", "children": "child", "men": "man", "women": "woman", "leaves": "leaf",
              "wolves": "wolf", "knives": "knife", "geese": "goose", "mice": "mouse", "fish": "fish",
              "sheep": "sheep", "glasses": "glasses", "chopsticks": "chopsticks", "series": "series"}
_PLURAL_ONLY = frozenset({"glasses", "chopsticks", "people"})
_MASS = frozenset("snow sand smoke coffee tea wine bread salad ramen rice milk juice beer chocolate soup cheese "
                  "sky".split())
_COLORS = frozenset("red orange yellow green blue purple pink brown black white gray grey golden silver turquoise "
                    "violet beige".split())
_MATERIALS = {"wooden": "wood", "wood": "wood", "stone": "stone", "glass": "glass", "metal": "metal",
              "metallic": "metal", "leather": "leather", "marble": "marble", "brass": "brass", "concrete": "concrete",
              "ceramic": "ceramic", "paper": "paper", "steel": "steel", "brick": "brick", "plastic": "plastic",
              "linen": "linen", "woolen": "wool", "wool": "wool", "iron": "iron"}
_SHAPES = frozenset("round square circular triangular rectangular spherical oval spiral hexagonal".split())
_ATTRIBUTES = frozenset("small tiny large huge giant big tall short old elderly young ancient vintage modern rusty "
                        "cracked worn muddy steaming frozen empty busy dense lonely futuristic wet broken fluffy shiny "
                        "bright narrow sandy snowy rocky potted overgrown single roasted festive cluttered open "
                        "sleepy happy".split())
_NUMBERS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}
_RELATIONS = ("in front of", "on top of", "next to", "on", "under", "beneath", "below", "above", "over", "behind",
              "beside", "near", "inside", "in", "against")
_STYLES = ("oil painting", "watercolor painting", "watercolor", "pencil sketch", "sketch", "digital art", "3d render",
           "pixel art", "illustration", "photograph", "photo", "anime")
_TIMES = ("sunset", "sunrise", "dawn", "dusk", "night")
_ING_NOUNS = frozenset("building painting ceiling clothing morning evening lighting ring king string thing spring "
                       "wing ceiling railing wedding pudding dumpling sibling ceiling awning".split())
_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_JARGON = re.compile(r"\b(?:depth of field|field of view|golden hour|blue hour|wide angle|close-up)\b")


def _singular(word: str) -> str | None:
    """The lexicon form of `word` ("ferries" → "ferry"), or None when it is no noun the stand-in knows."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    for candidate in (word, _stem(word), word[:-1] if word.endswith("s") else word):
        if candidate in _NOUNS:
            return candidate
    return None


def _heads(words: list[str]) -> list[dict]:
    """Known nouns in one comma-free chunk; a noun directly followed by another known noun is a modifier
    ("coffee mug", "park bench"), so only the last of a run counts."""
    heads = []
    for i, word in enumerate(words):
        pair = tuple(words[i - 1:i + 1]) if i else ()
        noun = " ".join(pair) if pair in _COMPOUNDS else _singular(word)
        if noun is None or (i + 1 < len(words) and _singular(words[i + 1])):
            continue
        kind = _COMPOUNDS[pair] if pair in _COMPOUNDS else _NOUNS[noun]
        heads.append({"at": i, "noun": noun, "surface": " ".join(pair) if pair in _COMPOUNDS else word,
                      "plural": (word != noun or noun in _PLURAL_ONLY) and noun not in _MASS,
                      "type": kind})
    return heads


def _the(head: dict) -> tuple[str, str]:
    """("Are", "the dogs") or ("Is", "the dog")."""
    return ("Are", f"the {head['surface']}") if head["plural"] else ("Is", f"the {head['noun']}")


def _there(head: dict) -> str:
    if head["plural"]:
        return f"Are there {head['surface']}?"
    if head["noun"] in _MASS:
        return f"Is there {head['noun']}?"
    article = "an" if head["noun"][0] in "aeiou" else "a"
    return f"Is there {article} {head['noun']}?"


def _relation_at(words: list[str], i: int) -> str | None:
    for relation in _RELATIONS:  # longest first, so "next to" wins over "to" and "on top of" over "on"
        parts = relation.split()
        if words[i:i + len(parts)] == parts:
            return relation
    return None


def template_qa(prompt: str) -> list[dict]:
    """Deterministic stand-in for the QA-writing LLM: yes-questions from a small lexicon and positional rules.

    Known nouns give "Is there a …?" (typed object / human / animal / food / location); a colour, material, shape,
    size-or-state word or number right before a noun gives a color / material / shape / attribute / counting
    question; an "-ing" word right after a person or animal gives an activity question; "on / under / next to / …"
    between two nouns of one comma-separated chunk gives a spatial question about the chunk's first noun; a style
    ("oil painting", "photograph") or a time of day ("at night") gives an "other" question. Words outside the
    lexicon are ignored, so short or unusual prompts yield few questions.
    """
    questions: list[dict] = []

    def ask(question: str, element_type: str) -> None:
        if question.lower() not in {q["question"].lower() for q in questions}:
            questions.append({"question": question, "answer": "yes", "element_type": element_type})

    lowered = _JARGON.sub(" ", prompt.lower())
    for chunk in re.split(r"[,;.:!?]", lowered):
        words = _WORD.findall(chunk)
        heads = _heads(words)
        for head in heads:
            ask(_there(head), head["type"])
            verb, subject = _the(head)
            compound = True  # known nouns right before the head ("coffee mug") belong to it
            for j in range(head["at"] - 1, max(head["at"] - 4, -1), -1):  # modifiers: up to three words before
                word = words[j]
                if compound and _singular(word) and word not in _MATERIALS:
                    continue
                compound = False
                if word in _NUMBERS and head["plural"]:
                    ask(f"Are there {word} {head['surface']}?", "counting")
                elif word in _COLORS:
                    ask(f"{verb} {subject} {word}?", "color")
                elif word in _MATERIALS and word != head["noun"]:
                    ask(f"{verb} {subject} made of {_MATERIALS[word]}?", "material")
                elif word in _SHAPES:
                    ask(f"{verb} {subject} {word}?", "shape")
                elif word in _ATTRIBUTES:
                    ask(f"{verb} {subject} {word}?", "attribute")
                else:
                    break  # anything else ("choosing" in "raincoat choosing oranges") ends the noun phrase
            following = words[head["at"] + 1:]
            if head["type"] in ("human", "animal") and following and following[0].endswith("ing") \
                    and following[0] not in _ING_NOUNS and len(following[0]) > 4:
                phrase = [following[0]]
                for k in range(1, min(len(following), 5)):  # the verb's object, up to a relation or "and"
                    if _relation_at(following, k) or following[k] == "and":
                        break
                    phrase.append(following[k])
                while phrase[-1] in ("a", "an", "the"):
                    phrase.pop()
                ask(f"{verb} {subject} {' '.join(phrase)}?", "activity")
        subjects = [h for h in heads if h["type"] != "location"]
        i = 0
        while i < len(words):
            relation = _relation_at(words, i)
            if relation is None:
                i += 1
                continue
            end = i + len(relation.split())
            before = [h for h in subjects if h["at"] < i]
            after = [h for h in heads if end <= h["at"] < end + 4]
            if before and after and not (after[0]["type"] == "location" and relation in ("in", "inside")):
                verb, subject = _the(before[0])
                ask(f"{verb} {subject} {relation} the {after[0]['surface']}?", "spatial")
            i = end
    for style in _STYLES:
        if re.search(rf"\b{style}\b", lowered):
            article = "an" if style[0] in "aeiou" else "a"
            ask(f"Is this {article} {style}?" if style not in ("anime", "pixel art", "digital art")
                else f"Is this {style}?", "other")
            break
    for time in _TIMES:
        if re.search(rf"\bat {time}\b", lowered):
            ask(f"Is it {time}?", "other")
    return questions


def build_qa(rows: Sequence[Mapping[str, Any]], generator: TextGenerator, min_questions: int = 5, *,
             max_new_tokens: int = 384, temperature: float = 0.0, seed: int = 0) -> tuple[list[dict], dict]:
    """Valid yes-questions for each prompt row; prompts with fewer than `min_questions` valid ones are dropped.

    Returns (kept rows, each the input row plus "questions", "qa_backend", "qa_stand_in"; report of counts:
    prompts, kept, dropped_prompts, questions_kept, questions_dropped and one count per drop reason). A stand-in
    generator writes its questions with `template_qa`; they go through the same validation.
    """
    if generator.is_stand_in:
        items = [template_qa(row["prompt"]) for row in rows]
    else:
        replies = generator.generate([qa_messages(row["prompt"]) for row in rows], max_new_tokens=max_new_tokens,
                                     temperature=temperature, seed=seed)
        if len(replies) != len(rows):
            raise RuntimeError(f"{generator.name} returned {len(replies)} replies for {len(rows)} prompts")
        items = [parse_qa(reply) for reply in replies]
    kept, reasons = [], Counter()
    questions_kept = 0
    for row, row_items in zip(rows, items):
        valid, dropped = validate_qa(row_items, row["prompt"])
        reasons.update(d["reason"] for d in dropped)
        if len(valid) >= min_questions:
            kept.append({**row, "questions": valid, "qa_backend": generator.name,
                         "qa_stand_in": generator.is_stand_in})
            questions_kept += len(valid)
    report = {"prompts": len(rows), "kept": len(kept), "dropped_prompts": len(rows) - len(kept),
              "questions_kept": questions_kept, "questions_dropped": sum(reasons.values()),
              **{f"dropped: {reason}": reasons[reason] for reason in DROP_REASONS}}
    return kept, report


# --------------------------------------------------------------------------------------------- scores

PAPER_WEIGHTS = AGFSYNC_WEIGHTS  # VQA 0.35, CLIP 0.55, aesthetic 0.10 (paper Sec. 3), all on 0–100 scales
# The authors' released code scores candidates with CLIP 0.85 and aesthetic 0.15 and no VQA term, and adds the
# scores without first bringing them to a common scale; the book follows the paper and keeps these for comparison.
RELEASED_CODE_WEIGHTS = (0.0, 0.85, 0.15)


def vqa_score(yes_probabilities) -> float:
    """AGFSync's VQA score of one image: 100 × the share of its questions answered "yes" (P(yes) > 0.5)."""
    p = np.asarray(yes_probabilities, dtype=np.float64)
    if p.size == 0:
        raise ValueError("vqa_score needs at least one question's P(yes); got none")
    if np.any((p < 0) | (p > 1)) or not np.all(np.isfinite(p)):
        raise ValueError(f"P(yes) values must lie in [0, 1]; got {p.tolist()}")
    return float(100.0 * np.mean(p > 0.5))


def clip_100(cosine):
    """AGFSync's CLIP score: γ · max(cos, 0) with γ = 100 (helpers.scoring.clip_score with weight 1)."""
    return clip_score(cosine, weight=1.0, scale=AGFSYNC_CLIP_GAMMA)


def aesthetic_100(laion_score):
    """The LAION aesthetic predictor's score on AGFSync's 0–100 scale: 10 × score.

    AGFSync scores aesthetics with VILA, whose output lies in [0, 1] and is multiplied by 100. VILA is
    TensorFlow-only, so the book uses the LAION MLP, whose scores lie on a 1–10 scale: dividing by 10 puts them in
    [0.1, 1] like VILA's, and ×100 gives 10–100. The map is a plain rescaling (no clipping, no shift of 1 to 0),
    so the few LAION scores slightly outside 1–10 stay slightly outside 10–100, and rankings are unchanged.
    """
    return 100.0 * np.asarray(laion_score, dtype=np.float64) / 10.0


def agfsync_score(vqa, clip, aesthetic, weights: Sequence[float] = PAPER_WEIGHTS):
    """w_vqa · VQA + w_clip · CLIP + w_aes · aesthetic, each on 0–100 (vqa_score, clip_100, aesthetic_100)."""
    return weighted_score(vqa, clip, aesthetic, weights)


def select_pair(scores: Sequence[float]) -> tuple[int, int] | None:
    """(winner, loser) = (argmax, argmin) of one prompt's candidate scores, ties going to the lowest index;
    None when every score is equal (no preference to learn)."""
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or values.size < 2:
        raise ValueError(f"select_pair needs the scores of at least two candidates; got {values.tolist()}")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"scores must be finite; got {values.tolist()}")
    if values.max() == values.min():
        return None
    return int(values.argmax()), int(values.argmin())  # numpy returns the first of tied extremes


def pairs_from_scores(table, prompt: str = "prompt_id", candidate: str = "candidate", score: str = "score",
                      metrics: Sequence[str] = ("vqa", "clip", "aesthetic")):
    """One row per prompt with a pair: chosen/rejected candidate, score and per-metric scores (`select_pair`)."""
    import pandas as pd

    rows = []
    for prompt_id, group in table.groupby(prompt, sort=False):
        pair = select_pair(group[score].to_numpy()) if len(group) > 1 else None
        if pair is None:
            continue
        chosen, rejected = group.iloc[pair[0]], group.iloc[pair[1]]
        row = {prompt: prompt_id, f"chosen_{candidate}": chosen[candidate],
               f"rejected_{candidate}": rejected[candidate],
               "chosen_score": float(chosen[score]), "rejected_score": float(rejected[score])}
        for metric in (m for m in metrics if m in group):
            row[f"chosen_{metric}"], row[f"rejected_{metric}"] = float(chosen[metric]), float(rejected[metric])
        rows.append(row)
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- noise

def noise_text_embeddings(embeddings, sigma: float = 0.1, generator=None, pooled=None):
    """Candidates' text embeddings with N(0, σ²) noise added to every candidate except index 0.

    `embeddings` is (N, seq, dim), one row per candidate image of one prompt; `pooled` (N, dim), SDXL's pooled
    embedding, is treated the same way. Candidate 0 is copied exactly, so one image per prompt shows what the
    un-noised prompt gives. Noise is drawn in float32 on `generator`'s device (CPU when None) and cast, so a
    seeded generator gives the same noise on any device. Returns new tensors (a pair when `pooled` is given);
    the inputs are not modified.
    """
    import torch

    if sigma < 0:
        raise ValueError(f"sigma must be >= 0 (AGFSync uses 0.1); got {sigma}")
    if embeddings.ndim != 3:
        raise ValueError(f"embeddings must be (N candidates, seq, dim); got shape {tuple(embeddings.shape)}")
    if pooled is not None and (pooled.ndim != 2 or pooled.shape[0] != embeddings.shape[0]):
        raise ValueError(f"pooled must be (N={embeddings.shape[0]}, dim); got shape {tuple(pooled.shape)}")
    device = generator.device if generator is not None else torch.device("cpu")

    def noised(tensor):
        out = tensor.clone()
        if tensor.shape[0] > 1:
            noise = torch.randn(tuple(tensor[1:].shape), generator=generator, device=device, dtype=torch.float32)
            out[1:] = (tensor[1:].float() + sigma * noise.to(tensor.device)).to(tensor.dtype)
        return out

    noised_embeddings = noised(embeddings)
    return noised_embeddings if pooled is None else (noised_embeddings, noised(pooled))


# ------------------------------------------------------------------------------------- preference dataset

PREFERENCE_COLUMNS = ("prompt", "category", "chosen", "rejected", "chosen_score", "rejected_score", "chosen_vqa",
                      "rejected_vqa", "chosen_clip", "rejected_clip", "chosen_aesthetic", "rejected_aesthetic")


def preference_features(extra=None):
    """The dataset schema: two Image columns, strings for prompt and category, float64 for every score."""
    from datasets import Features, Image, Value

    columns = {name: Value("float64") for name in PREFERENCE_COLUMNS[4:]}  # every score column
    return Features({"prompt": Value("string"), "category": Value("string"), "chosen": Image(),
                     "rejected": Image(), **columns, **(extra or {})})


def preference_dataset(rows: Sequence[Mapping[str, Any]]):
    """A `datasets.Dataset` of preference pairs for Diffusion-DPO.

    Each row needs PREFERENCE_COLUMNS: `chosen` / `rejected` are PIL images or image file paths, scores are on
    0–100. Extra keys become extra columns with inferred types. Images are stored PNG-encoded inside the dataset,
    so `save_to_disk` / `load_from_disk` (and parquet) carry them.
    """
    from datasets import Dataset

    if not rows:
        raise ValueError("no preference rows; every prompt's scores were equal or no prompt was scored")
    missing = [name for name in PREFERENCE_COLUMNS if name not in rows[0]]
    if missing:
        raise ValueError(f"preference rows lack {', '.join(missing)}; each row needs: {', '.join(PREFERENCE_COLUMNS)}")
    extra_names = [key for key in rows[0] if key not in PREFERENCE_COLUMNS]
    extra = Dataset.from_list([{k: row[k] for k in extra_names} for row in rows]).features if extra_names else {}
    columns = {name: [row[name] for row in rows] for name in [*PREFERENCE_COLUMNS, *extra_names]}
    made = Dataset.from_dict(columns, features=preference_features(dict(extra)))
    # datasets fingerprints the in-memory table, image file paths included, so the saved state.json would differ
    # between two clones of the book; the fingerprint is taken from the rows' content instead
    return Dataset(made.data, info=made.info, fingerprint=_rows_fingerprint(rows))


def _rows_fingerprint(rows: Sequence[Mapping[str, Any]]) -> str:
    """A 16-hex fingerprint of preference rows: an image file by its name (the image cache's names are content
    keys), a PIL image by its pixels, every other value as JSON."""
    import hashlib
    from pathlib import Path

    from PIL import Image as PILImage

    from .manifest import sha256_json

    def portable(name: str, item: Any) -> Any:
        if isinstance(item, PILImage.Image):
            return [item.mode, list(item.size), hashlib.sha256(item.tobytes()).hexdigest()]
        return Path(item).name if name in ("chosen", "rejected") else item

    return sha256_json([{name: portable(name, item) for name, item in row.items()}
                        for row in rows])[:16]


# ------------------------------------------------------------------------------- conversion efficiency

def _threshold_pairs(thresholds) -> list[tuple[float, float]]:
    if isinstance(thresholds, Mapping):
        if set(thresholds) != {"vqa", "aesthetic"}:
            raise ValueError(f"thresholds as a mapping needs exactly the keys 'vqa' and 'aesthetic'; "
                             f"got {sorted(thresholds)}")
        return [(float(v), float(a)) for v, a in itertools.product(thresholds["vqa"], thresholds["aesthetic"])]
    return [(float(v), float(a)) for v, a in thresholds]


def conversion_efficiency(table, thresholds, prompt: str = "prompt_id", score: str = "score", vqa: str = "vqa",
                          aesthetic: str = "aesthetic"):
    """Share of prompts that become training data (paper Fig. 7), AGFSync against DreamSync-style filtering.

    `table` has one row per image: `prompt`, the combined `score`, `vqa` and `aesthetic` (0–100 scales).
    AGFSync converts every prompt whose candidates' scores are not all equal (a best/worst pair exists);
    DreamSync converts a prompt only if at least one image reaches VQA ≥ θ_vqa and aesthetic ≥ θ_aes.
    `thresholds` is a list of (θ_vqa, θ_aes) pairs or {"vqa": [...], "aesthetic": [...]} (every combination).
    Returns a tidy DataFrame: method, theta_vqa, theta_aesthetic, prompts, converted, share (0–1); AGFSync's row
    repeats for each threshold so both methods plot on the same axes.
    """
    import pandas as pd

    missing = [c for c in (prompt, score, vqa, aesthetic) if c not in table]
    if missing:
        raise ValueError(f"table lacks column(s) {', '.join(missing)}; it has {', '.join(map(str, table.columns))}")
    groups = table.groupby(prompt, sort=False)
    prompts = groups.ngroups
    agfsync_converted = int((groups[score].agg(lambda s: s.max() > s.min())).sum())
    rows = []
    for theta_vqa, theta_aesthetic in _threshold_pairs(thresholds):
        passes = (table[vqa] >= theta_vqa) & (table[aesthetic] >= theta_aesthetic)
        dreamsync_converted = int(passes.groupby(table[prompt]).any().sum())
        for method, converted in (("AGFSync", agfsync_converted), ("DreamSync", dreamsync_converted)):
            rows.append({"method": method, "theta_vqa": theta_vqa, "theta_aesthetic": theta_aesthetic,
                         "prompts": prompts, "converted": converted, "share": converted / prompts if prompts else
                         math.nan})
    return pd.DataFrame(rows)


def plot_conversion_efficiency(efficiency):
    """Share of prompts converted against θ_vqa: one DreamSync line per θ_aes, AGFSync as a dashed reference."""
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    dreamsync = efficiency[efficiency["method"] == "DreamSync"]
    for theta_aesthetic, group in dreamsync.groupby("theta_aesthetic"):
        group = group.sort_values("theta_vqa")
        axes.plot(group["theta_vqa"], 100 * group["share"], marker="o",
                  label=f"DreamSync-style, aesthetic ≥ {theta_aesthetic:g}")
    agfsync = efficiency[efficiency["method"] == "AGFSync"]
    if len(agfsync):
        axes.axhline(100 * agfsync["share"].iloc[0], color="black", linestyle="--",
                     label="AGFSync (any unequal scores)")
    axes.set(xlabel="VQA threshold θ_vqa (0–100)", ylabel="prompts converted (%)", ylim=(-2, 102),
             title="Conversion efficiency: prompts that yield training data")
    axes.legend(fontsize=8)
    figure.tight_layout()
    return figure


# ------------------------------------------------------------------------------------------ notebook 12

def candidate_requests(prompt_rows: Sequence[Mapping[str, Any]], api: Mapping[str, Any], *, num_candidates: int = 8,
                       text_noise: float = 0.1, seed: int = 0) -> tuple[list, list[dict]]:
    """N requests per prompt with distinct seeds; σ-noise on the text embedding for every candidate but the first."""
    from .t2i import Request

    requests, owners = [], []
    for row in prompt_rows:
        for candidate in range(num_candidates):
            image_seed = int(sha256_json([seed, row["prompt_id"], candidate])[:8], 16)
            requests.append(Request(dict(api), row["prompt"], "", image_seed, text_noise if candidate else 0.0))
            owners.append({"prompt_id": row["prompt_id"], "category": row["category"], "prompt": row["prompt"],
                           "candidate": candidate, "seed": image_seed, "text_noise": text_noise if candidate else 0.0})
    return requests, owners


VQA_IMAGES_PER_BATCH = 16  # images per BLIP-2 call; each brings all its questions (AGFSync: ~8)


def vqa_scores(generated, questions: Sequence[Sequence[str]], ctx, images_per_batch: int = VQA_IMAGES_PER_BATCH,
               scorer=None, cache=None) -> list[float]:
    """AGFSync's VQA score per image (its prompt's questions), each P(yes) cached like any other score.

    Only images with an unanswered question are asked, several images per BLIP-2 call, each image encoded once
    for all its questions; under a multi-process launch the images are split across processes. The model is
    loaded only when something is left to ask (or passed in as `scorer`). `cache`: the run's `ScoreCache`, if one is
    open already (at paper scale the file holds millions of rows: read it once per stage, not once per scorer).
    """
    from .scorers.vqa import load_vqa_for_run
    from .scoring import ScoreCache, cached_answers

    cache = cache if cache is not None else ScoreCache.shared(ctx.runs_dir / "image_cache" / "scores.jsonl")
    names = [vqa_names(asked) for asked in questions]
    if scorer is None:
        scorer = load_vqa_for_run(ctx)
    probabilities = cached_answers(
        generated, questions, names, scorer.weights_id, cache, desc="VQA", images_per_batch=images_per_batch,
        model=scorer, answer=lambda model, images, asked: model.yes_probability(images, asked).tolist())
    return [vqa_score(row) for row in probabilities]


def vqa_names(questions: Sequence[str]) -> list[str]:
    """The score-cache names of an image's VQA answers, one per question."""
    return [f"vqa:{sha256_json(q)[:16]}" for q in questions]


def score_images(generated, owners: Sequence[Mapping[str, Any]], questions_by_prompt: Mapping[str, Sequence[str]],
                 ctx, weights: Sequence[float] = PAPER_WEIGHTS, *, run=None, vqa=None):
    """Per-image VQA, CLIP (γ = 100) and aesthetic on 0–100 and their weighted sum, as a DataFrame. `run` (a
    `ScoringRun` with clip and aesthetic) and `vqa` (a BLIP-2 scorer) are loaded here unless given."""
    import pandas as pd

    from .scoring import DIFFAGENT_CLIP_WEIGHT, ScoringRun

    run = run if run is not None else ScoringRun.for_run(ctx, ("clip", "aesthetic"))
    raw = run.score(generated, [o["prompt"] for o in owners])
    table = pd.DataFrame(list(owners))
    table["key"] = [g.key for g in generated]
    table["vqa"] = vqa_scores(generated, [questions_by_prompt[o["prompt_id"]] for o in owners], ctx, scorer=vqa,
                              cache=run.cache)
    table["clip"] = raw["clip"].to_numpy() / DIFFAGENT_CLIP_WEIGHT  # 100·2.5·max(cos,0) → AGFSync's 100·max(cos,0)
    table["aesthetic"] = aesthetic_100(raw["aesthetic"].to_numpy())
    table["score"] = agfsync_score(table["vqa"], table["clip"], table["aesthetic"], weights)
    return table


def generate_and_score_images(executor, requests, owners: Sequence[Mapping[str, Any]],
                              questions_by_prompt: Mapping[str, Sequence[str]], ctx,
                              weights: Sequence[float] = PAPER_WEIGHTS, block_size: int | None = None,
                              keep: Callable[[int], bool] | None = None, spare: Collection[str] = ()):
    """`score_images(executor.generate(requests), owners, …)` one block of requests at a time
    (`scoring.score_in_blocks`), the scorers loaded once for all blocks (BLIP-2 only if a question is unanswered).

    `keep` (request index → whether its image stays): the images not kept leave the image cache once their VQA,
    CLIP and aesthetic scores are cached, and a rerun draws only those with a score missing
    (`scoring.score_then_remove`, with `spare`); the count is in `executor.stats["removed_once_scored"]`. None
    keeps them all.
    """
    from .scorers.vqa import load_vqa_for_run
    from .scoring import ScoringRun, score_in_blocks, score_then_remove

    run = ScoringRun.for_run(ctx, ("clip", "aesthetic"))
    vqa = load_vqa_for_run(ctx)

    def score_block(indices, generated):
        return score_images(generated, [owners[i] for i in indices], questions_by_prompt, ctx, weights, run=run,
                            vqa=vqa)
    if keep is None:
        return score_in_blocks(executor, requests, score_block, block_size)
    keys = [executor.key(request) for request in requests]

    def scored(i: int) -> bool:
        names = vqa_names(questions_by_prompt[owners[i]["prompt_id"]])
        return run.scored(keys[i]) and all(run.cache.get(keys[i], name, vqa.weights_id) is not None
                                           for name in names)
    return score_then_remove(executor, requests, score_block, scored=scored, keep=keep, block_size=block_size,
                             keys=keys, spare=spare)


def pair_rows(table, image_for, weights: Sequence[float] = PAPER_WEIGHTS) -> list[dict]:
    """Preference rows (winner = argmax, loser = argmin of the weighted score); `image_for(key)` gives each
    winner's and loser's image: a PIL image (`ImageCache.get`) or, to keep memory flat at paper scale, the path
    of its PNG (`str(ImageCache.path(key))`), which `preference_dataset` reads when it is saved or used."""
    table = table.assign(score=agfsync_score(table["vqa"], table["clip"], table["aesthetic"], weights))
    pairs = pairs_from_scores(table, candidate="key")
    info = table.drop_duplicates("prompt_id").set_index("prompt_id")
    return [{"prompt": info.loc[p.prompt_id, "prompt"], "category": info.loc[p.prompt_id, "category"],
             "chosen": image_for(p.chosen_key), "rejected": image_for(p.rejected_key),
             **{c: getattr(p, c) for c in PREFERENCE_COLUMNS[4:]}} for p in pairs.itertuples()]


def split_prompts(qa_rows: Sequence[Mapping[str, Any]], eval_share: float, seed: int = 0, *,
                  qa_report: Mapping[str, int] | None = None, min_questions: int | None = None) -> list[dict]:
    """Number the prompts that have questions (p00000, p00001 …) and hold out round(eval_share × n) of them at
    random (`seed`) as "eval" prompts for notebook 13; the rest are "train". Each row's questions become two lists,
    "questions" and "element_types".

    Raises ValueError, with build_qa's drop counts (`qa_report`), when no training prompt is left: then there is
    nothing to draw candidates for, and the usual cause is an LLM too small to write the questions in the format.
    """
    if not 0 <= eval_share < 1:
        raise ValueError(f"eval_share must lie in [0, 1), got {eval_share}")
    order = list(range(len(qa_rows)))
    random.Random(seed).shuffle(order)
    held_out = set(order[:round(eval_share * len(order))])
    prompts = [{**row, "prompt_id": f"p{i:05d}", "split": "eval" if i in held_out else "train",
                "questions": [q["question"] for q in row["questions"]],
                "element_types": [q["element_type"] for q in row["questions"]]} for i, row in enumerate(qa_rows)]
    if not any(p["split"] == "train" for p in prompts):
        report = dict(qa_report or {})
        reasons = ", ".join(f"{k.removeprefix('dropped: ')} {v}" for k, v in report.items()
                            if k.startswith("dropped: ") and v) or "none"
        raise ValueError(
            f"no training prompt is left: {len(qa_rows)} of {report.get('prompts', '?')} prompts kept at least "
            f"{min_questions if min_questions is not None else 'the minimum of'} valid questions, and "
            f"{len(held_out)} of them are held out (eval_share={eval_share}). Questions dropped by reason: {reasons}. "
            "Lower min_questions, ask for more prompts (per_category), or write the questions with a stronger LLM "
            "(backend openai).")
    return prompts


def run_preferences_stage(folder, ctx, generator, *, per_category: int, dedup_threshold: float, min_questions: int,
                          num_candidates: int, text_noise: float, eval_share: float, architecture: str,
                          max_side: int | None, batch_size: int, thresholds: Mapping[str, Sequence[float]],
                          max_sampling_steps: int | None = None):
    """Notebook 12: prompts → dedup → QA → candidates → scores → best/worst pairs as an HF dataset."""
    from pathlib import Path

    from .manifest import append_jsonl
    from .models import load_text_encoder, resolve
    from .t2i import Executor, ModelCatalog, default_api

    folder = Path(folder)
    rows = generate_prompts(generator, per_category, seed=ctx.seed)
    kept, dropped = dedupe_prompts(rows, load_text_encoder(resolve("text_similarity", ctx), ctx.device),
                                   dedup_threshold)
    category_counts(rows, kept).to_csv(folder / "category_counts.csv")
    qa_rows, qa_report = build_qa(kept, generator, min_questions, seed=ctx.seed)
    prompts = split_prompts(qa_rows, eval_share, ctx.seed, qa_report=qa_report, min_questions=min_questions)
    for name in ("prompts.jsonl", "dropped_prompts.jsonl"):
        (folder / name).unlink(missing_ok=True)
    append_jsonl(folder / "prompts.jsonl", prompts)
    append_jsonl(folder / "dropped_prompts.jsonl", dropped)
    catalog = ModelCatalog.from_records([])
    train = [p for p in prompts if p["split"] == "train"]
    requests, owners = candidate_requests(train, default_api(catalog.base(architecture)),
                                          num_candidates=num_candidates, text_noise=text_noise, seed=ctx.seed)
    executor = Executor.for_run(ctx, catalog, max_side=max_side, batch_size=batch_size,
                                max_sampling_steps=max_sampling_steps)
    table = generate_and_score_images(executor, requests, owners, {p["prompt_id"]: p["questions"] for p in prompts},
                                      ctx)
    table.to_csv(folder / "candidates.csv", index=False)
    # the winners' and losers' PNGs, embedded as they are when the dataset is saved (a writer batch at a time)
    pairs = pair_rows(table, lambda key: str(executor.cache.path(key)))
    preference_dataset(pairs).save_to_disk(str(folder / "preferences"))
    conversion_efficiency(table, thresholds).to_csv(folder / "conversion_efficiency.csv", index=False)
    return {"prompts_generated": len(rows), "prompts_after_dedup": len(kept), "prompts_with_qa": len(qa_rows),
            "train_prompts": len(train), "eval_prompts": len(prompts) - len(train), "images": len(requests),
            "images_drawn": executor.stats["generated"], "pairs": len(pairs), **qa_report}
