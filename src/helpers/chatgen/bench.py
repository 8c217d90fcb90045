"""ChatGenBench (ChatGen, Sec. 3): freestyle chats role-played from DABench demonstrations, filtered and split.

Each DABench record (prompt, negative prompt, model, arguments, and the image they made) becomes one or more
chats: an LLM plays an everyday person (`ROLES`) who wants roughly that image and writes what they would type
to an image assistant — one message ("single"), one message with the demonstration's image attached as a
reference ("multimodal"), or a wish refined over 2–4 turns ("history"). The demonstration is the target.

The chats then pass four filters (length, colloquialism with spaCy, an optional LLM judge, BERTScore
near-duplicate removal per model), and each model's most distinct ~20% of chats become the test split. A
model with more than `few_shot_max` training chats is evaluated in the "supervised" setting, else "few-shot".

On the tiny profile the text generator is the deterministic template backend: it cannot role-play, so
`template_chat` rewrites the prompt into casual sentences instead, and every such sample says `stand_in=True`.
"""
from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from tqdm.auto import tqdm

from ..manifest import atomic_write_text, write_jsonl
from ..textgen import TextGenerator, prompt_words
from . import INPUT_TYPES, SETTINGS, TARGET_FIELDS, ChatSample, target_from_record

# ------------------------------------------------------------------------------------------------ roles

# Everyday people, each written to read after "I'm ...". Varied in age, work, mood and hobby so that the chats
# vary in voice, not only in subject.
ROLES = (
    "a nurse finishing a night shift", "a retired sailor", "a ten-year-old who loves dinosaurs",
    "a busy mother of three", "a high-school art teacher", "a first-year college student",
    "a baker who opens the shop at five", "a long-haul truck driver", "a grandmother learning to use her tablet",
    "a software developer on a lunch break", "a wedding planner", "a farmer with a small dairy herd",
    "a tattoo artist looking for ideas", "a librarian in a small town", "a teenager who plays video games all weekend",
    "a museum tour guide", "a physiotherapist", "a taxi driver waiting for a fare", "a beekeeper",
    "a history buff who reads about castles", "a retired postman", "a barista at a busy café",
    "a primary-school teacher planning a lesson", "a hobby gardener", "a bus driver", "a fisherman from the coast",
    "a stay-at-home dad", "a science-fiction fan", "a veterinarian", "a carpenter", "a hairdresser",
    "a marathon runner", "a pharmacist", "a zookeeper", "a chef at a noodle bar", "a real-estate agent",
    "a florist preparing for Valentine's Day", "a night-shift security guard", "a dental hygienist",
    "a flight attendant between trips", "a graduate student writing a thesis", "a car mechanic",
    "a yoga instructor", "a birdwatcher", "a small-business owner making a flyer", "a plumber",
    "a comic-book collector", "a kindergarten teacher", "a hiker planning a mountain trip", "an accountant",
    "an electrician", "an amateur astronomer", "an elderly man who paints watercolors on Sundays",
    "an eight-year-old who wants a birthday card", "an office manager decorating the break room",
    "an exchange student far from home", "an indie game developer", "a food-delivery courier", "an architect",
    "an aspiring novelist", "an animal-shelter volunteer", "an engineer who builds bridges",
    "a lighthouse keeper's grandson", "a genealogy hobbyist tracing her family tree",
    "a camping enthusiast", "a board-game designer", "a hospital receptionist", "a ballet dancer",
    "a police officer on desk duty", "a firefighter", "a social worker", "a sheep farmer",
    "a shy teenager who draws in the margins of her notebook", "a surfer", "a dog groomer",
    "a music teacher", "a church choir member", "a rock climber", "a cruise-ship cook",
    "a newly retired accountant with time to spare", "a new dad who can't sleep", "a journalist on a deadline",
    "a wine-bar owner", "a botanist", "a train conductor", "a cosplayer planning a costume",
    "a blogger who writes about travel", "a teenager making a poster for a school play", "a cyclist",
    "a gamer who loves fantasy RPGs", "a pastry student", "a wildlife photographer between trips",
    "a city-council clerk", "a school bus mechanic", "a janitor at a university", "a street-food vendor",
    "a podcaster who needs cover art", "a construction worker", "a pet-shop owner", "a hotel concierge",
    "a jazz pianist", "a knitting-club organiser", "a widower who misses the seaside",
    "a twelve-year-old who loves space",
    "a film student", "a call-centre worker", "a supermarket cashier", "a delivery-van driver",
    "a bookshop owner", "a nanny", "a park ranger", "a potter", "a sommelier", "a tailor",
    "a translator who works from home", "a volunteer firefighter", "a lifeguard", "a scout leader",
)

# ------------------------------------------------------------------------------------------- role-play

ROLEPLAY_SYSTEM = ("You write realistic test data: the messages ordinary people type to an AI image assistant. "
                   "You stay in the character you are given, write plain everyday English in that person's voice, "
                   "and never use prompt-engineering jargon.")
_AVOID = ("- No prompt jargon: no 'masterpiece', 'best quality', '8k', 'highly detailed', no weights like "
          "(word:1.2), no model, sampler, steps or CFG names.")
_EXAMPLE = ("Tone, with an unrelated subject. Not like this: \"cozy cottage, snowy forest, warm window light, 8k, "
            "masterpiece\". Like this: \"Could you draw me a little cottage in a snowy forest? I'd like the windows "
            "glowing warm, as if somebody's home.\"")
_TASKS = {
    "single": (
        "Write the one message this person would type to an image assistant to ask for roughly this picture.",
        "- Full sentences in their own words and voice, 1 to 4 sentences, like a chat message.",
        "- Say what the picture shows and the look and mood the prompt asks for, but do not copy its comma list.",
        _AVOID, _EXAMPLE,
        "Reply with the message only: no quotes, no name, no explanation."),
    "multimodal": (
        "This person attaches a picture to their message: the very image this prompt made. Write the one message "
        "they would type with it to ask for roughly this picture.",
        "- The message must refer to the attached picture (for example \"like the picture I attached, but ...\") "
        "and say in their own words what they want from it.",
        "- Full sentences in their own words and voice, 1 to 4 sentences, like a chat message.",
        _AVOID, _EXAMPLE,
        "Reply with the message only: no quotes, no name, no explanation."),
    "history": (
        "Write a short chat in which this person asks an image assistant for roughly this picture, but not all at "
        "once: they start with a rough wish and refine it over 2 to 4 messages (for example first the subject, "
        "then the style, then the mood or the details).",
        "- Between their messages the assistant answers in one short sentence (a question or a confirmation).",
        "- The chat ends with the person's last message.",
        "- Everyday words in the person's voice.",
        _AVOID, _EXAMPLE,
        'Answer with JSON only, in this form: {"turns": [{"role": "user", "content": "..."}, '
        '{"role": "assistant", "content": "..."}, {"role": "user", "content": "..."}]}'),
}


def roleplay_messages(record: dict[str, Any], role: str, input_type: str) -> list[dict[str, str]]:
    """System + user instruction asking an LLM to play `role` and write the chat for this demonstration."""
    _check_type(input_type)
    user = "\n".join([*_picture_lines(record, role), "", *_TASKS[input_type]])
    return [{"role": "system", "content": ROLEPLAY_SYSTEM}, {"role": "user", "content": user}]


HISTORY_WRITING = ("one_call", "by_turn")
# what each of a history chat's user turns adds when the chat is written one message at a time ("by_turn")
_TURN_ASPECTS = ("only the main thing they want to see, in a rough first wish",
                 "the style or kind of picture they have in mind",
                 "the mood, the light or a detail they care about",
                 "something they would rather not see in it, or a last touch")


def _picture_lines(record: dict[str, Any], role: str) -> list[str]:
    instruction, api = record["instruction"], record["api"]
    return [f"Play this person: {role}.",
            "They want a picture. The picture they have in mind was made from the Stable Diffusion prompt below. "
            "They have never seen the prompt: it only tells you what the picture shows.",
            f"  prompt: {instruction['prompt']}",
            f"  what the picture avoids: {instruction.get('negative_prompt') or '(nothing in particular)'}",
            f"  the kind of tool that made it: {api.get('model_description') or api['model']}"]


def _transcript(messages: Sequence[dict[str, str]]) -> str:
    return "\n".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages)


def check_history_writing(history_writing: str) -> str:
    if history_writing not in HISTORY_WRITING:
        raise ValueError(f"history_writing={history_writing!r}: use 'one_call' (a whole chat per reply, as ChatGen) "
                         "or 'by_turn' (one message per reply, for a small LLM)")
    return history_writing


def next_turn_messages(record: dict[str, Any], role: str, chat: Sequence[dict[str, str]], turn: int,
                       user_turns: int) -> list[dict[str, str]]:
    """System + instruction asking an LLM for one message of a history chat written turn by turn: the person's
    `turn`-th message (1-based) of `user_turns`, or, after a person's message, the assistant's short answer."""
    if chat and chat[-1]["role"] == "user":
        task = ["You are now the image assistant in this chat:", _transcript(chat), "",
                "Answer the person's last message in one short sentence: a question about what else they would like, "
                "or a confirmation. Reply with the sentence only."]
        return [{"role": "system", "content": "You are a friendly AI image assistant who answers in one short "
                                              "sentence."}, {"role": "user", "content": "\n".join(task)}]
    aspect = _TURN_ASPECTS[min(turn, len(_TURN_ASPECTS)) - 1]
    so_far = [f"They tell an image assistant what they want bit by bit, over {user_turns} messages.",
              *(["The chat so far:", _transcript(chat)] if chat else []),
              f"Write their message number {turn}: {aspect}.",
              "- 1 or 2 sentences in their own everyday words, like a chat message.", _AVOID,
              "Reply with the message only: no quotes, no name, no explanation."]
    return [{"role": "system", "content": ROLEPLAY_SYSTEM},
            {"role": "user", "content": "\n".join([*_picture_lines(record, role), "", *so_far])}]


def history_by_turn(items: Sequence[tuple[dict[str, Any], str]], generator: TextGenerator, *, seed: int,
                    temperature: float, user_tokens: int = 64,
                    assistant_tokens: int = 32) -> list[tuple[str, tuple[list | None, Refusal | None]]]:
    """History chats written one message per LLM call, for a model too small to write a whole chat in the asked-for
    form: round by round, every chat's next user message (the subject first, then the style, the mood, what to
    leave out) and, between them, the assistant's one-sentence answer, each round in one batched call.

    `items`: (record, role) per chat; each chat gets 2–4 user turns, drawn from the seed and the record id.
    Returns, per chat, (every reply written for it, `parse_roleplay`-style (messages, None) or (None, why not)).
    A message is at most `user_tokens` / `assistant_tokens` long, so a 4-turn chat stays within the length filter.
    """
    turns = [random.Random(f"{seed}/{record['id']}/turns").randint(*HISTORY_USER_TURNS) for record, _ in items]
    chats: list[list[dict[str, str]]] = [[] for _ in items]
    written: list[list[str]] = [[] for _ in items]
    failed: list[Refusal | None] = [None] * len(items)
    for step in range(2 * max(turns, default=0) - 1):  # user, assistant, user, …, user
        turn = step // 2 + 1
        speaking = "user" if step % 2 == 0 else "assistant"
        active = [i for i in range(len(items)) if failed[i] is None and turn <= turns[i]
                  and (speaking == "user" or turn < turns[i])]
        if not active:
            continue
        texts = generator.generate([next_turn_messages(items[i][0], items[i][1], chats[i], turn, turns[i])
                                    for i in active], temperature=temperature, seed=seed + step,
                                   max_new_tokens=user_tokens if speaking == "user" else assistant_tokens)
        if len(texts) != len(active):
            raise RuntimeError(f"{generator.name} returned {len(texts)} replies for {len(active)} messages")
        for i, text in zip(active, texts):
            written[i].append(text)
            content, why = _one_message(text, speaking)
            if content is None:
                failed[i] = Refusal(f"{speaking} turn {turn}: {why.kind}", why[len(why.kind):].lstrip(": "))
                continue
            chats[i].append({"role": speaking, "content": content})
    return [("\n---\n".join(texts), (None, why) if why is not None else _normalise(chat, "history"))
            for texts, chat, why in zip(written, chats, failed)]


def _one_message(text: str, speaking: str) -> tuple[str | None, Refusal | None]:
    """One chat message from an LLM's reply: the person's (read like a single-message chat) or the assistant's
    (its first line, without a speaker label)."""
    if speaking == "user":
        message, why = parse_roleplay(text, "single")
        return (message[0]["content"], None) if message is not None else (None, why)
    first = next((line for line in (text or "").splitlines() if line.strip()), "")
    label = _SPEAKER.match(first)
    content = _clean_content(label.group(2) if label else first)
    return (content, None) if content else (None, Refusal("empty reply"))


_FENCE = re.compile(r"```[a-zA-Z]*\s*\n?(.*?)```", re.S)
_JSON_START = re.compile(r"[\[{]\s*[\[{\"]")
_SPEAKER = re.compile(r"^\s*[*_]*(user|me|person|human|customer|assistant|ai|bot|image assistant)[*_]*\s*:"
                      r"[*_]*\s*(.*)$", re.I)  # "User: ...", "**Assistant:** ..."
_USER_NAMES = {"user", "me", "person", "human", "customer"}
_ASSISTANT_NAMES = {"assistant", "ai", "bot", "image assistant", "gpt", "model"}
_LEAD_IN = re.compile(r"^(sure|okay|ok|here|certainly|of course)\b[^\n]*:\s*\n", re.I)
_LABEL = re.compile(r"^\s*(message|user message|chat message)\s*:\s*", re.I)
# words that point at the attached picture ("the photo I sent", "this image", "I attached"), not at any picture
_IMAGE_WORDS = re.compile(r"\b(attach\w*|upload\w*|sent|sending|reference|enclosed|above|"
                          r"this (picture|image|photo|pic|one|shot|snapshot)|"
                          r"(the|my) (picture|image|photo|pic|snapshot)s? (i|you|here))\b", re.I)
HISTORY_USER_TURNS = (2, 4)  # a history chat refines the wish over this many user turns


class Refusal(str):
    """Why a reply or record gave no chat: the full reason as the string, its stable `kind` as an attribute.

    The kind names the rule that was broken ("unknown speaker"), the detail says where ("'narrator' in turn 2"),
    so reports can count refusals by kind while a reader of one refusal still sees the detail.
    """
    kind: str

    def __new__(cls, kind: str, detail: str = "") -> "Refusal":
        text = super().__new__(cls, f"{kind}: {detail}" if detail else kind)
        text.kind = kind
        return text


def parse_roleplay(text: str, input_type: str) -> tuple[list[dict[str, str]] | None, Refusal | None]:
    """(messages, None) from an LLM's role-play reply, or (None, why not) with the `Refusal`'s kind and detail.

    Reads JSON turns (a list, or {"turns"|"messages": [...]}, inside code fences or not), "User: ... /
    Assistant: ..." transcripts, and for one-message types also plain text. Messages end with the user's turn.
    """
    _check_type(input_type)
    body = (text or "").strip()
    if not body:
        return None, Refusal("empty reply")
    fenced = _FENCE.search(body)
    body = (fenced.group(1) if fenced else body).strip()
    turns, problem = _json_turns(body)
    if problem:
        return None, problem
    if turns is None:
        turns = _transcript_turns(body)
    if turns is None:
        if input_type == "history":
            return None, Refusal("history reply has neither JSON turns nor 'User:' / 'Assistant:' lines")
        turns = [{"role": "user", "content": _LEAD_IN.sub("", body, count=1)}]
    return _normalise(turns, input_type)


def _json_turns(body: str) -> tuple[list | None, Refusal | None]:
    """Turns from the first JSON value in `body`; (None, None) when there is none, (None, why) when it is broken."""
    start = _JSON_START.search(body)
    if not start:
        return None, None
    try:
        value, _ = json.JSONDecoder().raw_decode(body[start.start():])
    except json.JSONDecodeError as error:
        return None, Refusal("unparseable JSON", f"{error.msg} at character {error.pos}")
    if isinstance(value, dict):
        listed = next((value[k] for k in ("turns", "messages", "chat", "conversation") if k in value), None)
        text = next((value[k] for k in ("message", "content", "text") if isinstance(value.get(k), str)), None)
        if listed is None and text is None:
            return None, Refusal("JSON object has no turns", f"keys {', '.join(sorted(value)) or 'none'}")
        value = listed if listed is not None else [{"role": "user", "content": text}]
    if not isinstance(value, list):
        return None, Refusal("JSON turns are not a list", f"a {type(value).__name__}")
    turns = []
    for number, item in enumerate(value, 1):
        if isinstance(item, dict) and len(item) == 1 and isinstance(next(iter(item.values())), str):
            (speaker, content), = item.items()  # {"user": "..."}
        elif isinstance(item, dict):
            speaker = next((item[k] for k in ("role", "speaker", "from", "author") if k in item), None)
            content = next((item[k] for k in ("content", "text", "message", "value") if k in item), None)
        else:
            return None, Refusal("a turn is not an object with role and content",
                                 f"turn {number} is a {type(item).__name__}")
        if not isinstance(speaker, str) or not isinstance(content, str):
            return None, Refusal("a turn lacks a role or a text content", f"turn {number}")
        turns.append({"role": speaker, "content": content})
    return turns, None


def _transcript_turns(body: str) -> list[dict] | None:
    """Turns from "User: ..." / "Assistant: ..." lines (continuation lines join the turn above), or None."""
    turns: list[dict] = []
    for line in body.splitlines():
        match = _SPEAKER.match(line)
        if match:
            turns.append({"role": match.group(1), "content": match.group(2)})
        elif turns and line.strip():
            turns[-1]["content"] += " " + line.strip()
    return turns or None


def _normalise(turns: list[dict], input_type: str) -> tuple[list[dict[str, str]] | None, Refusal | None]:
    messages: list[dict[str, str]] = []
    for number, turn in enumerate(turns, 1):
        speaker = turn["role"].strip().lower()
        role = "user" if speaker in _USER_NAMES else "assistant" if speaker in _ASSISTANT_NAMES else None
        if role is None:
            return None, Refusal("unknown speaker", f"{turn['role']!r} in turn {number}")
        content = _clean_content(turn["content"])
        if not content:
            continue
        if messages and messages[-1]["role"] == role:  # two messages in a row from one side read as one turn
            messages[-1]["content"] += " " + content
        else:
            messages.append({"role": role, "content": content})
    while messages and messages[0]["role"] == "assistant":  # an assistant greeting before the wish adds nothing
        messages.pop(0)
    if not messages:
        return None, Refusal("no user message")
    if messages[-1]["role"] != "user":
        return None, Refusal("missing final user turn (the chat ends with the assistant)")
    user_turns = sum(m["role"] == "user" for m in messages)
    if input_type == "history":
        low, high = HISTORY_USER_TURNS
        if not low <= user_turns <= high:
            return None, Refusal(f"history needs {low}-{high} user turns", f"got {user_turns}")
    elif len(messages) > 1:
        return None, Refusal(f"{input_type} input needs one user message", f"got {len(messages)} turns")
    if input_type == "multimodal" and not _IMAGE_WORDS.search(messages[-1]["content"]):
        return None, Refusal("multimodal message does not refer to the attached picture")
    return messages, None


def _clean_content(content: str) -> str:
    content = _LABEL.sub("", " ".join(content.split()))
    if len(content) >= 2 and content[0] == content[-1] and content[0] in "\"'“”":
        content = content[1:-1].strip()
    return content.strip("“”").strip()


# --------------------------------------------------------------------------------------- template stand-in

_EXTRA_NETWORK = re.compile(r"<[^<>]*>")  # <lora:name:0.7>: not words of the prompt
_WEIGHT = re.compile(r":\s*-?\d*\.?\d+\s*(?=[)\]]|$)")  # "(castle:1.2)" → "(castle)"
_BRACKETS = re.compile(r"[()\[\]{}]|\\")
_SPLIT = re.compile(r",|;|\n|\bBREAK\b|\|")
_AN = re.compile(r"\ba (?=[aeio])")  # "a astronaut" → "an astronaut" (not u: "a unicorn")
_BOORU = {"1girl": "a girl", "1boy": "a boy", "2girls": "two girls", "2boys": "two boys", "solo": "",
          "multiple girls": "several girls", "multiple boys": "several boys"}
_SUBJECT_START = re.compile(r"^(a|an|the|one|two|three|four|several|some|portrait of)\b|\b(of|in|on|at|with)\b")
# negative-prompt tags a person would actually say, in their words
_EVERYDAY_NEGATIVES = {"blurry": "blurriness", "watermark": "watermarks", "text": "writing on it",
                       "bad hands": "weird hands", "extra fingers": "extra fingers", "deformed": "anything deformed",
                       "bad anatomy": "odd-looking bodies", "jpeg artifacts": "blocky smudges", "ugly": "anything ugly",
                       "signature": "signatures", "cropped": "cut-off edges", "extra limbs": "extra arms or legs"}
_OPENERS = ("Hi, I'm {role}.", "Hello! I'm {role}, so bear with me.", "Hey there. I'm {role} and I have an idea.",
            "Hi! I'm {role}, and I'd love your help.", "Good evening. I'm {role}.")
_REQUESTS = ("Could you make me a picture of {subject}{style}?", "I'd love an image of {subject}{style}.",
             "Can you draw {subject}{style} for me?", "I'm after a picture showing {subject}{style}.")
_MULTIMODAL_REQUESTS = (
    "I attached a picture I really like. Could you make me something like it, with {subject}{style}?",
    "Have a look at the image I attached. I want one like that, showing {subject}{style}.",
    "Something like the picture I attached, please, but make sure it shows {subject}{style}.")
_DETAILS = ("I'd like {details}.", "It should have {details}.", "Please add {details}.",
            "Oh, and {details} would be great.")
_NEGATIVES = ("Please, no {negatives}.", "And I don't want {negatives}.")
_REPLIES = ("Sure! Anything else you'd like in it?", "Got it. Any particular look or mood?",
            "Okay, I can do that. Should I change anything?", "Nice idea! Any more details?")


def prompt_phrases(prompt: str) -> list[str]:
    """The prompt's comma-separated phrases in plain words: extra-network tags, attention weights, brackets and
    quality boilerplate ("masterpiece", "8k", "(best quality:1.2)") removed; booru tags like "1girl" spelled out."""
    text = _BRACKETS.sub(" ", _WEIGHT.sub("", _EXTRA_NETWORK.sub(" ", prompt)))
    phrases = []
    for piece in _SPLIT.split(text):
        phrase = " ".join(_WEIGHT.sub("", piece).replace("_", " ").split()).lower()
        phrase = _BOORU.get(phrase, phrase)
        # a phrase of only stop words and quality boilerplate says nothing a person would ask for
        if phrase and prompt_words(phrase) and phrase not in phrases:
            phrases.append(_AN.sub("an ", phrase))
    return phrases


def _join(words: Sequence[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def _style(phrases: Sequence[str]) -> str:
    if not phrases:
        return ""
    joined = " and ".join(phrases)
    return f" in {'an' if joined[0] in 'aeio' else 'a'} {joined} style"


def template_chat(record: dict[str, Any], role: str, input_type: str, rng: random.Random) -> list[dict[str, str]]:
    """Deterministic stand-in for role-play: the demonstration's prompt as casual sentences from `role`.

    The first phrase that names a thing ("a knight in armor", "portrait of a woman") is the subject; phrases before
    it are the style; the rest are details. Nothing here is an LLM: samples made this way carry `stand_in=True`.
    """
    _check_type(input_type)
    phrases = prompt_phrases(record["instruction"]["prompt"])
    if not phrases:
        raise ValueError(f"record {record.get('id')}: prompt {record['instruction']['prompt']!r} has no words left "
                         "once weights and quality boilerplate are removed; drop the record before role-play")
    at = next((i for i, p in enumerate(phrases) if _SUBJECT_START.search(p)), 0)
    subject, style, details = phrases[at], _style(phrases[:at]), phrases[at + 1:]
    negatives = [_EVERYDAY_NEGATIVES[p.strip().lower()] for p in _SPLIT.split(record["instruction"].get(
        "negative_prompt") or "") if p.strip().lower() in _EVERYDAY_NEGATIVES]
    opener = rng.choice(_OPENERS).format(role=role)
    avoid = []  # the sentence about what they do not want, said half of the time
    if negatives and rng.random() < 0.5:
        avoid.append(rng.choice(_NEGATIVES).format(negatives=_join(rng.sample(negatives, min(2, len(negatives))))))
    if input_type in ("single", "multimodal"):
        requests = _REQUESTS if input_type == "single" else _MULTIMODAL_REQUESTS
        said = [opener, rng.choice(requests).format(subject=subject, style=style)]
        if details:
            said.append(rng.choice(_DETAILS).format(details=_join(details)))
        return [{"role": "user", "content": " ".join(said + avoid)}]
    # history: the subject first; the style, the details (long lists in two halves) and the dislikes come later
    later = [f"Oh, and make it{style}."] if style else []
    halves = [details] if len(details) <= 2 else [details[:math.ceil(len(details) / 2)],
                                                   details[math.ceil(len(details) / 2):]]
    later += [rng.choice(_DETAILS).format(details=_join(half)) for half in halves if half]
    later = later + avoid or [f"Keep it simple: just {subject}, nothing fancy."]
    first = " ".join([opener, rng.choice(_REQUESTS).format(subject=subject, style="")])
    messages = [{"role": "user", "content": first}]
    for chunk in _chunks(later, min(HISTORY_USER_TURNS[1] - 1, len(later))):
        messages += [{"role": "assistant", "content": rng.choice(_REPLIES)},
                     {"role": "user", "content": " ".join(chunk)}]
    return messages


def _chunks(items: list, count: int) -> list[list]:
    """`items` split in order into `count` non-empty runs (the earlier runs take the remainder)."""
    size, extra = divmod(len(items), count)
    runs, start = [], 0
    for index in range(count):
        end = start + size + (index < extra)
        runs.append(items[start:end])
        start = end
    return runs


# ----------------------------------------------------------------------------------------------- samples

def make_samples(records: Sequence[dict[str, Any]], generator: TextGenerator, *,
                 per_record_types: int | Sequence[str] = 1, seed: int = 0,
                 image_key_for: Callable[[dict[str, Any]], str | None] | None = None,
                 max_new_tokens: dict[str, int] | None = None, temperature: float = 0.9,
                 rejected: list[dict[str, Any]] | None = None, history_writing: str = "one_call",
                 multimodal_openings: Sequence[str] = ()) -> list[ChatSample]:
    """Role-played chats for `records`, one per record and input type.

    `per_record_types`: an int k gives record i the k types INPUT_TYPES[i], INPUT_TYPES[i+1], ... (cycling, so
    the types stay balanced), or a list of type names gives every record those. Roles are drawn with
    `random.Random(seed)`. `image_key_for(record)` names the reference image of a multimodal chat. With the
    template backend (`generator.is_stand_in`) the chats come from `template_chat`; otherwise from the LLM at
    `temperature`. Chats that could not be made (a reply `parse_roleplay` rejects; a prompt with no words for the
    template) are left out and, if `rejected` is a list, appended to it with the reason. `history_writing`:
    "one_call" (the LLM writes a whole history chat in one reply, as ChatGen does) or "by_turn" (one call per
    message, `history_by_turn`, for an LLM too small for the first). `multimodal_openings`: for an LLM that
    forgets the attached picture, each multimodal message starts with one of these (drawn per record) and the LLM
    continues it (`TextGenerator`: a final assistant message is continued); the sample's notes say which.
    """
    check_history_writing(history_writing)
    plan = _plan(records, per_record_types, seed)
    if image_key_for is None and any(t == "multimodal" for _, t, _ in plan):
        raise ValueError("multimodal chats need image_key_for(record) -> the image-cache key of the demonstration's "
                         "image; pass it, or leave 'multimodal' out of per_record_types")
    replies: list[str | None] = [None] * len(plan)  # the LLM's raw text, kept for the rejection report
    openings: list[str | None] = [None] * len(plan)  # the opening a multimodal message was started with, if any
    parsed: list[tuple[list | None, Refusal | None]] = [(None, None)] * len(plan)
    if generator.is_stand_in:
        for i, (record, input_type, role) in enumerate(tqdm(plan, desc="template chats", unit="chat")):
            try:
                parsed[i] = (template_chat(record, role, input_type, random.Random(f"{seed}/{record['id']}/"
                                                                                   f"{input_type}")), None)
            except ValueError as error:  # a prompt that is all boilerplate: nothing to say
                parsed[i] = (None, Refusal("template: prompt has no words left", str(error)))
    else:
        tokens = {"single": 160, "multimodal": 160, "history": 400, **(max_new_tokens or {})}
        for input_type in INPUT_TYPES:
            # one generate call per type: each type has its own reply length
            where = [i for i, (_, t, _) in enumerate(plan) if t == input_type]
            if not where:
                continue
            if input_type == "history" and history_writing == "by_turn":
                for i, (text, result) in zip(where, history_by_turn(
                        [(plan[i][0], plan[i][2]) for i in where], generator, seed=seed, temperature=temperature)):
                    replies[i], parsed[i] = text, result
                continue
            conversations = [roleplay_messages(plan[i][0], plan[i][2], input_type) for i in where]
            if input_type == "multimodal" and multimodal_openings:
                for i, conversation in zip(where, conversations):
                    openings[i] = _opening(plan[i][0], multimodal_openings, seed)
                    conversation.append({"role": "assistant", "content": openings[i]})
            texts = generator.generate(conversations, max_new_tokens=tokens[input_type], temperature=temperature,
                                       seed=seed)
            if len(texts) != len(where):
                raise RuntimeError(f"{generator.name} returned {len(texts)} replies for {len(where)} chats")
            for i, text in tqdm(zip(where, texts), total=len(where), desc=f"parsing {input_type} chats"):
                replies[i], parsed[i] = text, parse_roleplay(text, input_type)
    samples = []
    for (record, input_type, role), reply, (messages, reason), lead in zip(plan, replies, parsed, openings):
        if messages is None:
            if rejected is not None:
                rejected.append({"dabench_record_id": record["id"], "input_type": input_type, "role": role,
                                 "reply": reply, "reason": str(reason), "kind": reason.kind,
                                 **({"opening": lead} if lead else {})})
            continue
        samples.append(ChatSample(
            id=f"{record['id']}-{input_type}", dabench_id=int(record["image_id"]), input_type=input_type, role=role,
            messages=messages, target=target_from_record(record),
            image_key=image_key_for(record) if input_type == "multimodal" else None,
            backend=generator.name, stand_in=generator.is_stand_in,
            notes={"dabench_record_id": record["id"], "dabench_split": record.get("split"),
                   **({"opening": lead} if lead else {})}))
    return samples


def _opening(record: dict[str, Any], openings: Sequence[str], seed: int) -> str:
    """The opening one record's multimodal message starts with, drawn from its seed and record id."""
    return openings[random.Random(f"{seed}/{record['id']}/opening").randrange(len(openings))]


def _plan(records: Sequence[dict], per_record_types: int | Sequence[str], seed: int) -> list[tuple[dict, str, str]]:
    """(record, input type, role) for every chat to write, in order."""
    if isinstance(per_record_types, int):
        if not 1 <= per_record_types <= len(INPUT_TYPES):
            raise ValueError(f"per_record_types={per_record_types}: give 1..{len(INPUT_TYPES)} types per record, "
                             f"or a list of names from {INPUT_TYPES}")
        types_of = lambda i: [INPUT_TYPES[(i + j) % len(INPUT_TYPES)] for j in range(per_record_types)]  # noqa: E731
    else:
        for name in per_record_types:
            _check_type(name)
        types_of = lambda i: list(per_record_types)  # noqa: E731
    rng = random.Random(seed)
    return [(record, input_type, rng.choice(ROLES)) for i, record in enumerate(records) for input_type in types_of(i)]


def _check_type(input_type: str) -> None:
    if input_type not in INPUT_TYPES:
        raise ValueError(f"input_type {input_type!r} is not one of {INPUT_TYPES}")


def user_text(sample: ChatSample) -> str:
    """What the person typed: the user turns, one per line (assistant turns are not the person's words)."""
    return "\n".join(m["content"] for m in sample.messages if m["role"] == "user")


_WORDS = re.compile(r"[^\W_]+(?:['’][^\W_]+)*")


def word_count(sample: ChatSample) -> int:
    """Words in the person's turns."""
    return len(_WORDS.findall(user_text(sample)))


# ---------------------------------------------------------------------------------------------- filters

Dropped = list[tuple[ChatSample, str]]  # (sample, "filter: reason")


def length_filter(samples: Iterable[ChatSample], min_words: int = 5,
                  max_words: int = 200) -> tuple[list[ChatSample], Dropped]:
    """Keep chats whose user turns hold `min_words`..`max_words` words in all."""
    kept, dropped = [], []
    for sample in samples:
        words = word_count(sample)
        if words < min_words:
            dropped.append((sample, f"length: too short ({words} < {min_words} words)"))
        elif words > max_words:
            dropped.append((sample, f"length: too long ({words} > {max_words} words)"))
        else:
            kept.append(sample)
    return kept, dropped


def load_spacy(name: str | None = None):
    """The small English spaCy pipeline (default: the PyPI mirror of en_core_web_sm); see `models.load_spacy`."""
    from ..models import load_spacy as load

    return load(name) if name else load()


# first- and second-person pronouns: a person talking to an assistant says "I", "me", "you", "my"
_SPEAKER_PRONOUNS = frozenset("i me my mine myself we us our ours you your yours yourself".split())
_SPEECH_POS = frozenset({"VERB", "AUX", "PRON", "INTJ"})  # a comma piece with none of these is a bare phrase
MIN_VERBS_PER_SENTENCE = 0.5
MAX_EXCLAMATION_WORDS = 3  # sentences this short do not count as sentences
MIN_SPEAKER_PRONOUNS = 1
MAX_BARE_SHARE = 0.6
MIN_LIST_PIECES = 4
MAX_PROMPT_OVERLAP = 0.8


def colloquial_measures(text: str, prompt: str, nlp) -> dict[str, float]:
    """The numbers `colloquial_filter` judges on, from one spaCy parse of the person's `text`."""
    return _measures(nlp(text), prompt)


def _measures(doc, prompt: str) -> dict[str, float]:
    # short exclamations ("Hi!", "Thanks a lot!") are not requests: they count neither for nor against
    sentences = max(1, sum(sum(not t.is_punct for t in sentence) > MAX_EXCLAMATION_WORDS for sentence in doc.sents))
    verbs = sum(t.pos_ in ("VERB", "AUX") for t in doc)
    pronouns = sum(t.lower_ in _SPEAKER_PRONOUNS for t in doc)
    pieces, piece = [], []
    for token in doc:  # comma pieces within the text (newlines and semicolons split too)
        if token.text in {",", ";"} or token.is_space or token.is_sent_start and piece:
            pieces.append(piece)
            piece = []
        if not (token.is_punct or token.is_space):
            piece.append(token)
    pieces = [p for p in [*pieces, piece] if p]
    bare = sum(not any(t.pos_ in _SPEECH_POS for t in p) for p in pieces)
    prompt_vocabulary = set(re.findall(r"[a-z]+", _WEIGHT.sub("", _EXTRA_NETWORK.sub(" ", prompt.lower()))))
    content = [t.lower_ for t in doc if t.is_alpha and not t.is_stop and t.lower_ not in _SPEAKER_PRONOUNS]
    overlap = sum(w in prompt_vocabulary for w in content) / len(content) if content else 0.0
    return {"sentences": sentences, "verbs_per_sentence": verbs / sentences, "speaker_pronouns": pronouns,
            "list_pieces": len(pieces), "bare_share": bare / len(pieces) if pieces else 0.0, "prompt_overlap": overlap}


def colloquial_verdict(measures: dict[str, float], *, min_verbs_per_sentence: float = MIN_VERBS_PER_SENTENCE,
                       min_speaker_pronouns: int = MIN_SPEAKER_PRONOUNS, max_bare_share: float = MAX_BARE_SHARE,
                       min_list_pieces: int = MIN_LIST_PIECES,
                       max_prompt_overlap: float = MAX_PROMPT_OVERLAP) -> str | None:
    """None when the measures read as speech, else the first rule that fails."""
    m = measures
    if m["verbs_per_sentence"] < min_verbs_per_sentence:
        return (f"too few verbs ({m['verbs_per_sentence']:.2f} per sentence < {min_verbs_per_sentence}): "
                "reads like a tag list")
    if m["speaker_pronouns"] < min_speaker_pronouns:
        return "no I/me/you/my: nobody is talking to the assistant"
    if m["list_pieces"] >= min_list_pieces and m["bare_share"] > max_bare_share:
        return (f"comma list: {m['bare_share']:.0%} of {m['list_pieces']} comma-separated pieces are bare phrases "
                f"(> {max_bare_share:.0%})")
    if m["prompt_overlap"] > max_prompt_overlap:
        return (f"copies the prompt: {m['prompt_overlap']:.0%} of its content words come from it "
                f"(> {max_prompt_overlap:.0%})")
    return None


def colloquial_filter(samples: Iterable[ChatSample], nlp, *, min_verbs_per_sentence: float = MIN_VERBS_PER_SENTENCE,
                      min_speaker_pronouns: int = MIN_SPEAKER_PRONOUNS, max_bare_share: float = MAX_BARE_SHARE,
                      min_list_pieces: int = MIN_LIST_PIECES,
                      max_prompt_overlap: float = MAX_PROMPT_OVERLAP) -> tuple[list[ChatSample], Dropped]:
    """Keep chats that read as speech, not as a T2I prompt (spaCy `nlp`, e.g. `load_spacy()`).

    Over the person's turns, in this order:
    1. verbs (VERB/AUX) per sentence >= `min_verbs_per_sentence`: requests are clauses; tag lists have no verb
       (sentences of at most MAX_EXCLAMATION_WORDS words, "Hi!", are not counted);
    2. at least `min_speaker_pronouns` of I/me/my/we/you/your: people address the assistant about themselves;
    3. with >= `min_list_pieces` comma pieces, at most `max_bare_share` of them bare (no verb, pronoun or
       interjection): "vibrant colors, volumetric fog, 8k" is a list, "I want red, blue and gold" is not;
    4. at most `max_prompt_overlap` of the content words (spaCy non-stop words) taken from the prompt's vocabulary:
       a chat that only wraps the prompt ("Generate: ...") says nothing in its own words.
    The measures are stored in `sample.notes["colloquial"]` of each returned sample.
    """
    samples = list(samples)
    rules = dict(min_verbs_per_sentence=min_verbs_per_sentence, min_speaker_pronouns=min_speaker_pronouns,
                 max_bare_share=max_bare_share, min_list_pieces=min_list_pieces, max_prompt_overlap=max_prompt_overlap)
    kept, dropped = [], []
    docs = nlp.pipe([user_text(s) for s in samples])
    for sample, doc in tqdm(zip(samples, docs), total=len(samples), desc="colloquial filter", unit="chat"):
        measures = _measures(doc, sample.target["prompt"])
        sample = replace(sample, notes={**sample.notes, "colloquial": measures})
        reason = colloquial_verdict(measures, **rules)
        if reason is None:
            kept.append(sample)
        else:
            dropped.append((sample, f"colloquial: {reason}"))
    return kept, dropped


JUDGE_SYSTEM = "You check test data for a benchmark of image assistants. Answer with one word: yes or no."


def judge_messages(sample: ChatSample) -> list[dict[str, str]]:
    """The judge's question: is the person's part natural speech, and does it ask for the target picture?"""
    transcript = "\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in sample.messages)
    attached = "\n(The person also attached the target picture itself.)" if sample.input_type == "multimodal" else ""
    user = (f"A person chatted with an image assistant:\n{transcript}{attached}\n\n"
            f"The picture they should get was made from this prompt: {sample.target['prompt']}\n\n"
            "Does the person write natural everyday sentences (not a list of prompt keywords), and do they ask for "
            "roughly that picture? Answer yes or no.")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]


def parse_verdict(text: str) -> bool | None:
    """True for yes, False for no, None when the answer says neither (or both) plainly."""
    answer = (text or "").strip().lower()
    first = re.match(r"[\W_]*(yes|no)\b", answer)
    if first:
        return first.group(1) == "yes"
    found = set(re.findall(r"\b(yes|no)\b", answer))
    return (found == {"yes"}) if len(found) == 1 else None


def judge_filter(samples: Iterable[ChatSample], generator: TextGenerator, *,
                 max_new_tokens: int = 8) -> tuple[list[ChatSample], Dropped]:
    """Keep chats an LLM judge calls natural and on target; a reply that is neither yes nor no drops the chat."""
    if generator.is_stand_in:
        raise ValueError(f"{generator.name} is a template stand-in and cannot judge chats; use a 'transformers' or "
                         "'openai' generator, or skip judge_filter on the tiny profile")
    samples = list(samples)
    replies = generator.generate([judge_messages(s) for s in samples], max_new_tokens=max_new_tokens,
                                 temperature=0.0)
    if len(replies) != len(samples):
        raise RuntimeError(f"{generator.name} returned {len(replies)} verdicts for {len(samples)} chats")
    kept, dropped = [], []
    for sample, reply in zip(samples, replies):
        verdict = parse_verdict(reply)
        sample = replace(sample, notes={**sample.notes, "judge": reply.strip()[:200]})
        if verdict is True:
            kept.append(sample)
        elif verdict is False:
            dropped.append((sample, "judge: answered no"))
        else:
            dropped.append((sample, f"judge: unparseable verdict {reply.strip()[:60]!r}"))
    return kept, dropped


def _by_model(samples: Sequence[ChatSample]) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for index, sample in enumerate(samples):
        groups[sample.target["model"]].append(index)
    return groups


def dedupe(samples: Iterable[ChatSample], scorer, threshold: float = 0.8) -> tuple[list[ChatSample], Dropped]:
    """Drop a chat whose BERTScore F1 with an earlier kept chat of the same target model exceeds `threshold`.

    `scorer` is a `BertScorer` (MiniLM); the person's turns are compared. Order decides which copy survives.
    """
    samples = list(samples)
    drop: dict[int, str] = {}
    for indices in tqdm(_by_model(samples).values(), desc="dedupe per model", unit="model"):
        if len(indices) < 2:
            continue
        similarity = scorer.pairwise_f1([user_text(samples[i]) for i in indices])
        kept_here: list[int] = []
        for a, index in enumerate(indices):
            closest = max(kept_here, key=lambda b: similarity[a, b], default=None)
            if closest is not None and similarity[a, closest] > threshold:
                drop[index] = (f"dedupe: near-duplicate of {samples[indices[closest]].id} "
                               f"(BERTScore F1 {similarity[a, closest]:.3f} > {threshold})")
            else:
                kept_here.append(a)
    kept = [s for i, s in enumerate(samples) if i not in drop]
    return kept, [(samples[i], reason) for i, reason in sorted(drop.items())]


def rejected_table(rejected: Iterable[dict[str, Any]]):
    """Role-play replies the parser refused (make_samples' `rejected`), one row per kind of refusal and input
    type: the count and the shortest reply as an example. Rows are grouped by the `Refusal` kind, so that
    "history needs 2-4 user turns: got 1" and "…: got 5" share a row (a row without a kind groups by its reason)."""
    import pandas as pd

    columns = ["reason", "input_type", "chats", "example"]
    rows = [{"reason": r.get("kind") or r["reason"], "input_type": r["input_type"],
             "reply": " ".join((r.get("reply") or "").split())} for r in rejected]
    if not rows:
        return pd.DataFrame(columns=columns)
    table = (pd.DataFrame(rows).groupby(["reason", "input_type"], sort=False)
             .agg(chats=("reply", "size"), example=("reply", lambda replies: min(replies, key=len)[:160]))
             .reset_index())
    return table.sort_values(["chats", "reason", "input_type"], ascending=[False, True, True],
                             kind="stable").reset_index(drop=True)[columns]


def dropped_table(dropped: Dropped):
    """Dropped chats as a table: id, input type, filter, reason (for the notebook)."""
    import pandas as pd

    rows = [{"id": s.id, "input_type": s.input_type, "filter": reason.split(":", 1)[0],
             "reason": reason.split(":", 1)[-1].strip()} for s, reason in dropped]
    return pd.DataFrame(rows, columns=["id", "input_type", "filter", "reason"])


# ------------------------------------------------------------------------------------ splits and settings

def split_by_model(samples: Iterable[ChatSample], scorer, test_share: float = 0.2) -> list[ChatSample]:
    """Per target model, its most distinct chats go to test, the rest to train.

    Distinctness = lowest mean BERTScore F1 (MiniLM, person's turns) to the model's other chats. A model with n >= 2
    chats gives max(1, round(n * test_share)) of them to test (at most n - 1); a model with one chat stays in train.
    Copies are returned with `split` set and the mean F1 in `notes["mean_f1_to_model"]`.
    """
    if not 0 < test_share < 1:
        raise ValueError(f"test_share={test_share} must lie strictly between 0 and 1 (0.2 in ChatGen)")
    samples = list(samples)
    result = list(samples)
    for indices in tqdm(_by_model(samples).values(), desc="split per model", unit="model"):
        if len(indices) < 2:
            result[indices[0]] = replace(samples[indices[0]], split="train")
            continue
        similarity = scorer.pairwise_f1([user_text(samples[i]) for i in indices])
        n = len(indices)
        mean_f1 = (similarity.sum(1) - similarity.diagonal()) / (n - 1)
        test_count = min(n - 1, max(1, round(n * test_share)))
        test = set(sorted(range(n), key=lambda a: (mean_f1[a], a))[:test_count])
        for a, index in enumerate(indices):
            result[index] = replace(samples[index], split="test" if a in test else "train",
                                    notes={**samples[index].notes, "mean_f1_to_model": float(mean_f1[a])})
    return result


FEW_SHOT_MAX = 5  # a configuration of this book, not a number taken from the paper


def assign_settings(samples: Iterable[ChatSample], few_shot_max: int = FEW_SHOT_MAX) -> list[ChatSample]:
    """Copies with `setting`: "supervised" when the target model has more than `few_shot_max` training chats,
    else "few-shot" (both splits of a model share its setting)."""
    samples = list(samples)
    train_counts = Counter(s.target["model"] for s in samples if s.split == "train")
    return [replace(s, setting=SETTINGS[0] if train_counts[s.target["model"]] > few_shot_max else SETTINGS[1])
            for s in samples]


# ------------------------------------------------------------------------------------------ statistics, io

def bench_statistics(samples: Iterable[ChatSample]):
    """Table-3-style counts per split and setting: chats, models, chats per input type, mean words and user turns
    per chat; a last row sums over everything."""
    import pandas as pd

    rows = [{"split": s.split, "setting": s.setting, "model": s.target["model"], "input_type": s.input_type,
             "words": word_count(s), "turns": sum(m["role"] == "user" for m in s.messages)} for s in samples]
    columns = ["samples", "models", *INPUT_TYPES, "words_per_chat", "turns_per_chat"]
    if not rows:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame(rows)

    def summary(part) -> dict[str, Any]:
        counts = part["input_type"].value_counts()
        return {"samples": len(part), "models": part["model"].nunique(),
                **{t: int(counts.get(t, 0)) for t in INPUT_TYPES},
                "words_per_chat": round(part["words"].mean(), 1), "turns_per_chat": round(part["turns"].mean(), 2)}

    order = {name: i for i, name in enumerate(["train", "test", *SETTINGS])}
    groups = sorted(frame.groupby(["split", "setting"]), key=lambda g: tuple(order.get(k, 99) for k in g[0]))
    table = pd.DataFrame([summary(part) for _, part in groups] + [summary(frame)],
                         index=pd.MultiIndex.from_tuples([key for key, _ in groups] + [("all", "all")],
                                                         names=["split", "setting"]))
    return table[columns]


BENCH_FILE = "chatgenbench.jsonl"


def to_dataset(samples: Iterable[ChatSample]):
    """A `datasets.Dataset`: messages as a list of {role, content}; target and notes as JSON strings (mixed types)."""
    import datasets

    rows = [{**s.to_dict(), "target": json.dumps(s.target, sort_keys=True),
             "notes": json.dumps(s.notes, sort_keys=True), "image_key": s.image_key or ""} for s in samples]
    return datasets.Dataset.from_list(rows)


def save_bench(samples: Iterable[ChatSample], folder: Path | str) -> dict[str, int]:
    """`chatgenbench.jsonl` (every field, read back by `load_bench`) plus parquet per split and a dataset card."""
    import shutil

    samples = list(samples)
    folder = Path(folder)
    write_jsonl(folder / BENCH_FILE, (s.to_dict() for s in samples))
    shutil.rmtree(folder / "data", ignore_errors=True)
    counts = {}
    for split in ("train", "test"):
        part = [s for s in samples if s.split == split]
        counts[split] = len(part)
        if part:
            # the file name carries a hash of the rows: `datasets` caches on file names
            digest = hashlib.sha256("".join(s.id for s in part).encode()).hexdigest()[:12]
            path = folder / "data" / f"{split}-{digest}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            to_dataset(part).to_parquet(str(path))
    atomic_write_text(folder / "README.md", _dataset_card(samples, counts))
    return counts


def load_bench(folder: Path | str) -> list[ChatSample]:
    """The samples `save_bench` wrote to `folder`."""
    path = Path(folder) / BENCH_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; build the bench with save_bench(samples, {str(folder)!r})")
    return [ChatSample.from_dict(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def _dataset_card(samples: list[ChatSample], counts: dict[str, int]) -> str:
    backends = sorted({s.backend for s in samples})
    stand_in = any(s.stand_in for s in samples)
    splits = "\n".join(f"    - split: {split}\n      path: data/{split}-*.parquet" for split in counts if counts[split])
    return f"""---
configs:
- config_name: default
  data_files:
{splits}
---

# ChatGenBench (rebuilt by the T2I Agent Book)

Freestyle chats role-played from DABench demonstrations as ChatGen (Sec. 3) describes: an LLM plays an everyday
person who wants the demonstration's image; the target is the demonstration's prompt, negative prompt, model and
arguments ({', '.join(TARGET_FIELDS)}). Input types: {', '.join(INPUT_TYPES)}.

- chat writer: {', '.join(backends) or '(none)'}{
    ' — a deterministic template stand-in, not an LLM' if stand_in else ''}
- filters: length, colloquialism (spaCy), optional LLM judge, BERTScore (MiniLM) near-duplicates per model
- split: per model, the most distinct chats (lowest mean BERTScore F1) go to test
- settings: {', '.join(SETTINGS)} by the model's number of training chats

| split | chats |
|---|---|
{chr(10).join(f'| {k} | {v} |' for k, v in counts.items())}

Fields: `id`, `dabench_id`, `input_type`, `role`, `messages` (list of role/content), `target` (JSON), `image_key`
(multimodal: the reference image's cache key), `split`, `setting`, `backend`, `stand_in`, `notes` (JSON).
"""


# ------------------------------------------------------------------------------------------ notebook 10

def multimodal_records(records: Sequence[dict[str, Any]], per_record_types: int | Sequence[str],
                       seed: int) -> list[dict[str, Any]]:
    """The records `make_samples` will turn into multimodal chats (their images are drawn first, in batches)."""
    return [record for record, input_type, _ in _plan(records, per_record_types, seed) if input_type == "multimodal"]


def reference_images(records: Sequence[dict[str, Any]], catalog, executor) -> dict[Any, str]:
    """Image-cache keys of the demonstrations' own images (their API call, prompts and seed), drawn once."""
    from ..t2i import Request, validate

    requests = [Request(validate(r["api"], catalog).api, r["instruction"]["prompt"],
                        r["instruction"]["negative_prompt"], int(r.get("seed") or 0) % 2**32) for r in records]
    keys: dict[int, str] = {}
    for indices, generated in executor.generate_in_blocks(requests):  # only the keys are kept, block after block
        keys.update((i, item.key) for i, item in zip(indices, generated))
    return {record["id"]: keys[i] for i, record in enumerate(records)}


def run_stage(folder: Path, ctx, records: Sequence[dict[str, Any]], generator, *, per_record_types: int,
              limit: int, min_words: int, max_words: int, dedup_threshold: float, test_share: float,
              few_shot_max: int, judge: bool, max_side: int | None, batch_size: int,
              history_writing: str = "one_call", multimodal_openings: Sequence[str] = (),
              max_sampling_steps: int | None = None) -> dict[str, Any]:
    """Notebook 10: role-played chats → filters → near-duplicate removal → split by model → settings → saved bench."""
    from ..models import load_spacy, resolve
    from ..scorers.bertscore import BertScorer
    from ..t2i import Executor, ModelCatalog

    folder = Path(folder)
    check_history_writing(history_writing)  # before any image is drawn
    catalog = ModelCatalog.from_records(records)
    chosen = list(records)
    random.Random(ctx.seed).shuffle(chosen)
    chosen = chosen[:limit or None]
    executor = Executor.for_run(ctx, catalog, max_side=max_side, batch_size=batch_size,
                                max_sampling_steps=max_sampling_steps)
    keys = reference_images(multimodal_records(chosen, per_record_types, ctx.seed), catalog, executor)
    rejected: list[dict[str, Any]] = []
    samples = make_samples(chosen, generator, per_record_types=per_record_types, seed=ctx.seed,
                           image_key_for=lambda record: keys[record["id"]], rejected=rejected,
                           history_writing=history_writing, multimodal_openings=multimodal_openings)
    kept, dropped = length_filter(samples, min_words, max_words)
    kept, more = colloquial_filter(kept, load_spacy(resolve("spacy", ctx)))
    dropped += more
    if judge:
        kept, more = judge_filter(kept, generator)
        dropped += more
    scorer = BertScorer(resolve("text_similarity", ctx), device=ctx.device)
    kept, more = dedupe(kept, scorer, dedup_threshold)
    dropped += more
    final = assign_settings(split_by_model(kept, scorer, test_share), few_shot_max)
    counts = save_bench(final, folder / "bench")
    bench_statistics(final).to_csv(folder / "statistics.csv")
    dropped_table(dropped).to_csv(folder / "dropped.csv", index=False)
    # every refused reply with its reason, so a reader can see what the LLM wrote (rejected_table counts them)
    write_jsonl(folder / "rejected.jsonl", rejected)
    return {"records": len(chosen), "chats_made": len(samples), "chats_rejected": len(rejected),
            "dropped_by_filters": len(dropped), "reference_images": len(keys),
            "images_drawn": executor.stats["generated"], **{f"{split}_samples": n for split, n in counts.items()}}
