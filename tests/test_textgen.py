"""Text generation backends and description rewriting, checked against hand-worked values and a local server."""
from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from helpers import models, textgen

from chat_servers import echo_server, send_json  # noqa: F401  (echo_server is a fixture)

# Hand count over the three prompts below (stop words, weights and the <lora:...> tag removed):
# castle 3, dramatic 2, sunset 2, then clouds / fog / hill / sky 1 each → alphabetical: clouds, fog.
PROMPTS = ["a castle at sunset, (masterpiece:1.2), <lora:oldtown:0.7>",
           "castle on a hill, sunset, dramatic clouds",
           "(castle:1.3) in the fog, dramatic sky, BREAK detailed"]
OLDTOWN = {"model_version_id": 7, "model_name": "OldTown Mix", "model_type": "LORA", "base_model": "SD 1.5",
           "description_html": "<p><b>OldTown</b> for towns &amp; castles</p>", "sample_prompts": PROMPTS,
           "tags": ["architecture", "Landscape", "landscape"]}
OLDTOWN_TEXT = ("OldTown Mix is a LoRA for SD 1.5. It is suited to prompts about castle, dramatic, sunset, clouds and "
                "fog. It is tagged architecture and landscape.")
PLAIN = {"model_version_id": 8, "model_name": "PlainCheck", "model_type": "Checkpoint", "base_model": "SDXL 1.0",
         "description_html": "", "sample_prompts": [], "tags": []}


def _model(version_id: int, name: str) -> dict:
    return {**OLDTOWN, "model_version_id": version_id, "model_name": name}


# ------------------------------------------------------------------------------------------------ template

def test_prompt_words_drop_lora_tags_weights_and_stop_words():
    assert textgen.prompt_words("(Castle:1.2), <lora:old_town:0.7> at [sunset:0.9], masterpiece, 8k") == [
        "castle", "sunset"]


def test_template_describes_a_model_from_its_fields_deterministically():
    generator = textgen.TemplateGenerator()
    messages = textgen.describe_model_messages(OLDTOWN)
    first, second = generator.generate([messages]), generator.generate([messages])
    assert first == second == [OLDTOWN_TEXT]
    assert "oldtown" not in first[0].lower().replace("oldtown mix", "") and "1.2" not in first[0]


def test_template_without_prompts_or_tags_still_gives_a_valid_description():
    text, = textgen.TemplateGenerator().generate([textgen.describe_model_messages(PLAIN)])
    assert text == ("PlainCheck is a checkpoint for SDXL 1.0. "
                    "Its page gives no sample prompts or description to say more.")
    assert textgen.validate_description(text) is None


def test_template_falls_back_to_description_words_when_there_are_no_prompts():
    model = {**PLAIN, "description_html": "<p>Great for <em>castles</em> and castles at night.</p>"}
    text, = textgen.TemplateGenerator().generate([textgen.describe_model_messages(model)])
    assert text.endswith("Its description mentions castles, great and night.")


def test_template_needs_its_fields_and_a_known_task():
    generator = textgen.TemplateGenerator()
    with pytest.raises(ValueError, match="template backend needs a 'template_fields'"):
        generator.generate([[{"role": "user", "content": "describe OldTown"}]])
    with pytest.raises(ValueError, match="task 'haiku' is not one of: describe_model"):
        generator.generate([[{"role": "user", "content": "x", "template_fields": {"task": "haiku"}}]])


def test_make_generator_names_the_known_backends():
    assert textgen.make_generator("template").name == "template"
    with pytest.raises(ValueError, match="'llama' is not one of: template, transformers, openai"):
        textgen.make_generator("llama")


# ------------------------------------------------------------------------------------ html and validation

def test_html_to_text_strips_tags_unescapes_and_collapses_whitespace():
    html = ("<h3>Old&nbsp;Town</h3><p><strong>Best</strong> for <em>castles &amp; towns</em>.<br>Don&#39;t\n"
            "re-upload.</p><ul><li>CFG 7</li><li>20 steps</li></ul><script>alert(1)</script>")
    assert textgen.html_to_text(html) == "Old Town Best for castles & towns. Don't re-upload. CFG 7 20 steps"
    assert textgen.html_to_text("") == ""


@pytest.mark.parametrize("text,reason", [
    ("", "empty"), ("   \n", "empty"), ("A LoRA for castles.", "too short (19 < 40 chars)"),
    ("x" * 601, "too long (601 > 600 chars)"), ("<p>OldTown Mix is a LoRA for castles at sunset.</p>", "contains HTML"),
    ("OldTown Mix is a LoRA for castles &amp; towns at sunset.", "contains HTML"),
    (OLDTOWN_TEXT, None), ("Use it with <lora:oldtown:0.7> for castles at sunset and dusk.", None),
    ("NeonMix is for anime. Highly detailed, highly detailed, highly detailed, highly detailed.",
     "repetitive ('highly detailed highly' 3 times)"),
    ("Model: NeonMix\nType: Checkpoint\nBase model: SD 1.5\nSample prompts: a ship", "echoes the instruction")])
def test_validate_description(text, reason):
    assert textgen.validate_description(text) == reason


def test_describe_model_messages_instruct_and_carry_template_fields():
    system, user = textgen.describe_model_messages({**OLDTOWN, "sample_prompts": [f"p{i}" for i in range(8)]})
    assert system["role"] == "system" and "no HTML" in system["content"] and "NSFW" in system["content"]
    assert "OldTown Mix" in user["content"] and "2-3 sentences" in user["content"] and "- p4" in user["content"]
    assert "- p5" not in user["content"]
    fields = user["template_fields"]
    assert fields["task"] == "describe_model" and fields["description_text"] == "OldTown for towns & castles"
    assert fields["sample_prompts"] == ["p0", "p1", "p2", "p3", "p4"]
    with pytest.raises(ValueError, match="lacks tags"):
        textgen.describe_model_messages({k: v for k, v in OLDTOWN.items() if k != "tags"})


# ----------------------------------------------------------------------------------- rewrite_descriptions

class ScriptedGenerator(textgen.TextGenerator):
    """Returns fixed replies in order, recording the conversations and sampling arguments it was given."""

    name = "scripted"

    def __init__(self, replies: list[str]):
        self.replies, self.calls = replies, []

    def generate(self, messages_batch, *, max_new_tokens=128, temperature=0.0, seed=0):
        self.calls.append((messages_batch, max_new_tokens, temperature, seed))
        return self.replies[:len(messages_batch)]


def test_rewrite_keeps_valid_outputs_and_falls_back_to_the_template_for_invalid_ones():
    good = "Castle Mix is a checkpoint that paints old castles at sunset in warm colours."
    generator = ScriptedGenerator([good, "<p>castles</p>", "  "])
    records = textgen.rewrite_descriptions([_model(1, "Castle Mix"), OLDTOWN, _model(3, "Third")], generator,
                                           temperature=0.7, seed=3)
    assert generator.calls[0][1:] == (160, 0.7, 3)
    assert records[0] == {"model_version_id": 1, "description": good, "backend": "scripted", "stand_in": False,
                          "valid": True, "reason": None, "fallback": False}
    assert records[1] == {"model_version_id": 7, "description": OLDTOWN_TEXT, "backend": "scripted",
                          "stand_in": False, "valid": False, "reason": "too short (14 < 40 chars)", "fallback": True}
    assert records[2]["fallback"] and records[2]["reason"] == "empty"
    assert records[2]["description"].startswith("Third is a LoRA for SD 1.5.")


def test_rewrite_with_the_template_is_labelled_a_stand_in():
    record, = textgen.rewrite_descriptions([OLDTOWN], textgen.TemplateGenerator())
    assert record == {"model_version_id": 7, "description": OLDTOWN_TEXT, "backend": "template", "stand_in": True,
                      "valid": True, "reason": None, "fallback": False}


def test_rewrite_refuses_a_generator_that_drops_replies():
    with pytest.raises(RuntimeError, match="scripted returned 1 replies for 2 conversations"):
        textgen.rewrite_descriptions([OLDTOWN, PLAIN], ScriptedGenerator([OLDTOWN_TEXT]))


# ------------------------------------------------------------------------------------------------- openai

KEY = "sk-test-0123456789abcdef"
COMPLETION = {"id": "c1", "object": "chat.completion",
              "choices": [{"index": 0, "message": {"role": "assistant", "content": f" {OLDTOWN_TEXT}\n"},
                           "finish_reason": "stop"}]}


@pytest.fixture
def chat_server():
    """A local chat-completions server answering from a script of (status, headers, body); records requests."""
    script: list[tuple[int, dict, str]] = []
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append({"path": self.path, "authorization": self.headers.get("Authorization"), "body": body})
            status, headers, text = script.pop(0)
            send_json(self, status, text.replace("{auth}", str(self.headers.get("Authorization"))).encode(), headers)

        def log_message(self, *args):  # keep pytest output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", script, received
    server.shutdown()
    server.server_close()


def test_openai_backend_retries_429_sends_the_key_and_never_keeps_it(chat_server, monkeypatch):
    base_url, script, received = chat_server
    monkeypatch.setenv("T2IBOOK_TEST_KEY", KEY)
    script += [(429, {"Retry-After": "0"}, '{"error": "slow down"}'), (200, {}, json.dumps(COMPLETION))]
    generator = textgen.make_generator("openai", base_url=base_url + "/", model="gpt-test",
                                       api_key_env="T2IBOOK_TEST_KEY", backoff_base=0.01)
    messages = textgen.describe_model_messages(OLDTOWN)
    started = time.monotonic()
    assert generator.generate([messages], max_new_tokens=50, seed=4) == [OLDTOWN_TEXT]
    assert time.monotonic() - started < 5  # Retry-After: 0 was honoured instead of a long backoff
    assert len(received) == 2 and all(r["path"] == "/v1/chat/completions" for r in received)
    assert received[1]["authorization"] == f"Bearer {KEY}"
    assert received[1]["body"] == {"model": "gpt-test", "messages": textgen.chat_messages(messages),
                                   "max_tokens": 50, "temperature": 0.0, "seed": 4}
    assert all("template_fields" not in m for m in received[1]["body"]["messages"])
    assert generator.name == "openai:gpt-test" and not generator.is_stand_in
    for exposed in (generator.name, repr(generator), str(vars(generator))):
        assert KEY not in exposed


def test_openai_backend_sends_no_authorization_without_a_key(chat_server, monkeypatch):
    base_url, script, received = chat_server
    monkeypatch.delenv("T2IBOOK_TEST_KEY", raising=False)
    script.append((200, {}, json.dumps(COMPLETION)))
    generator = textgen.OpenAICompatibleGenerator(base_url, "local", api_key_env="T2IBOOK_TEST_KEY")
    assert generator.generate([[{"role": "user", "content": "hi"}]]) == [OLDTOWN_TEXT]
    assert received[0]["authorization"] is None


def test_openai_backend_names_a_client_error_without_leaking_the_key(chat_server, monkeypatch):
    base_url, script, received = chat_server
    monkeypatch.setenv("T2IBOOK_TEST_KEY", KEY)
    script.append((400, {}, '{"error": "bad key {auth}"}'))  # some servers echo the key back
    generator = textgen.OpenAICompatibleGenerator(base_url, "gpt-test", api_key_env="T2IBOOK_TEST_KEY",
                                                  backoff_base=0.01)
    with pytest.raises(RuntimeError, match="HTTP 400") as error:
        generator.generate([[{"role": "user", "content": "hi"}]])
    assert "bad key Bearer ***" in str(error.value) and KEY not in str(error.value)
    assert len(received) == 1  # a 400 is not retried


def test_openai_backend_gives_up_after_its_retries(chat_server):
    base_url, script, received = chat_server
    script += [(503, {}, "busy")] * 3
    generator = textgen.OpenAICompatibleGenerator(base_url, "gpt-test", max_retries=2, backoff_base=0.001)
    with pytest.raises(RuntimeError, match="after 3 attempts; last problem: HTTP 503: busy"):
        generator.generate([[{"role": "user", "content": "hi"}]])
    assert len(received) == 3


def test_openai_backend_retries_refused_connections():
    generator = textgen.OpenAICompatibleGenerator("http://127.0.0.1:9", "gpt-test", timeout=2, max_retries=1,
                                                  backoff_base=0.001)
    with pytest.raises(RuntimeError, match="after 2 attempts; last problem: ConnectionError"):
        generator.generate([[{"role": "user", "content": "hi"}]])


def test_backoff_honours_a_numeric_retry_after_and_grows_otherwise():
    generator = textgen.OpenAICompatibleGenerator("http://127.0.0.1:9", "gpt-test", backoff_base=1.0)
    assert generator._backoff(0, "3") == 3.0
    assert 0.5 <= generator._backoff(0, None) <= 1.5 and 4.0 <= generator._backoff(3, None) <= 12.0
    assert generator._backoff(2, "Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date already past: retry now


def _chats(words):
    return [[{"role": "system", "content": "shout it"}, {"role": "user", "content": word}] for word in words]


def test_openai_backend_keeps_requests_in_flight_and_returns_replies_in_order(echo_server):
    base_url, state = echo_server
    words = [f"word{i}" for i in range(12)] + ["word3"]  # one conversation twice: asked once
    generator = textgen.OpenAICompatibleGenerator(base_url, "gpt-test", concurrency=4)
    assert generator.generate(_chats(words), seed=1) == [word.upper() for word in words]
    assert len(state["asked"]) == 12 and 1 < state["most_in_flight"] <= 4
    assert generator.stats["requests"] == 12 and generator.stats["cached"] == 0
    one_at_a_time = textgen.OpenAICompatibleGenerator(base_url, "gpt-test", concurrency=1)
    state["most_in_flight"] = 0
    assert one_at_a_time.generate(_chats(words[:3])) == ["WORD0", "WORD1", "WORD2"] and state["most_in_flight"] == 1
    with pytest.raises(ValueError, match="concurrency must be at least 1"):
        textgen.OpenAICompatibleGenerator(base_url, "gpt-test", concurrency=0)


def test_openai_replies_are_cached_as_they_arrive_so_a_failed_run_resumes_without_asking_twice(echo_server,
                                                                                                tmp_path, monkeypatch):
    base_url, state = echo_server
    monkeypatch.setenv("T2IBOOK_TEST_KEY", KEY)
    cache = tmp_path / "textgen_cache" / "openai.jsonl"
    words = [f"word{i}" for i in range(8)]
    state["refuse"].add("word5")  # the endpoint fails on one conversation: the run stops there
    first = textgen.OpenAICompatibleGenerator(base_url, "gpt-test", api_key_env="T2IBOOK_TEST_KEY", concurrency=2,
                                              cache=cache)
    with pytest.raises(RuntimeError, match="HTTP 400"):
        first.generate(_chats(words), temperature=0.7, seed=3)
    saved = [json.loads(line) for line in cache.read_text().splitlines()]
    answered = {row["reply"] for row in saved}
    assert answered and "WORD5" not in answered and KEY not in cache.read_text()
    # the rerun (a new process, the endpoint healthy again) asks only for what is not in the cache
    state["refuse"].clear()
    before = len(state["asked"])
    again = textgen.OpenAICompatibleGenerator(base_url, "gpt-test", api_key_env="T2IBOOK_TEST_KEY", cache=cache)
    assert again.generate(_chats(words), temperature=0.7, seed=3) == [word.upper() for word in words]
    asked_again = state["asked"][before:]
    assert sorted(asked_again) == sorted(set(words) - {row["reply"].lower() for row in saved})
    assert again.stats["cached"] == len(saved) and again.stats["requests"] == len(asked_again)
    # other settings are other requests; the same ones are all read back
    third = textgen.OpenAICompatibleGenerator(base_url, "gpt-test", cache=cache)
    assert third.generate(_chats(words), temperature=0.7, seed=3) == [word.upper() for word in words]
    assert third.stats["requests"] == 0 and third.stats["cached"] == 8
    assert third.generate(_chats(words[:1]), temperature=0.7, seed=4) == ["WORD0"] and third.stats["requests"] == 1


def test_a_notebooks_endpoint_generator_caches_in_the_run_folder_and_needs_its_endpoint(tiny_ctx):
    generator = textgen.generator_for(tiny_ctx, "openai", "http://127.0.0.1:9/v1", "gpt-test")
    assert generator.cache.path == tiny_ctx.runs_dir / "textgen_cache" / "openai.jsonl"
    assert textgen.generator_for(tiny_ctx, "template").is_stand_in
    with pytest.raises(ValueError, match="backend 'openai' needs endpoint and endpoint_model"):
        textgen.generator_for(tiny_ctx, "openai", "", "gpt-test")


# ------------------------------------------------------------------------------------------- transformers

@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    models.build_tiny_llama(folder, seed=0)
    return textgen.make_generator("transformers", model_path=str(folder), batch_size=2)


def test_transformers_backend_batches_and_is_deterministic_when_greedy(tiny_llama):
    batch = [textgen.describe_model_messages(OLDTOWN), textgen.describe_model_messages(PLAIN),
             [{"role": "user", "content": "a photo of a cat"}]]
    first = tiny_llama.generate(batch, max_new_tokens=6)
    assert len(first) == 3 and all(isinstance(reply, str) for reply in first)
    assert tiny_llama.generate(batch, max_new_tokens=6) == first
    # left padding with its attention mask: a conversation's reply does not depend on its batch neighbours
    assert [tiny_llama.generate([messages], max_new_tokens=6)[0] for messages in batch] == first
    assert all("<|im_start|>" not in reply and "a photo of a cat" not in reply for reply in first)
    assert tiny_llama.name.startswith("transformers:") and not tiny_llama.is_stand_in


def test_transformers_backend_batches_conversations_of_similar_length(tiny_llama, monkeypatch):
    short, long = [{"role": "user", "content": "a cat"}], textgen.describe_model_messages(OLDTOWN)
    widths, generate = [], tiny_llama.model.generate

    def recording(**batch):
        widths.append(tuple(batch["input_ids"].shape))
        return generate(**batch)

    monkeypatch.setattr(tiny_llama.model, "generate", recording)
    replies = tiny_llama.generate([long, short, long, short], max_new_tokens=4)
    # the two short chats share a batch, so neither long one pads them out to its width
    assert len(widths) == 2 and widths[0][1] < widths[1][1] and widths[0][0] == widths[1][0] == 2
    assert replies[0] == replies[2] and replies[1] == replies[3]  # and each reply returns to its own place
    assert replies[1] == tiny_llama.generate([short], max_new_tokens=4)[0]


def test_transformers_backend_ignores_template_fields_and_seeds_sampling(tiny_llama):
    with_fields = textgen.describe_model_messages(OLDTOWN)
    assert tiny_llama.generate([with_fields], max_new_tokens=6) == tiny_llama.generate(
        [textgen.chat_messages(with_fields)], max_new_tokens=6)
    assert "template_fields" in with_fields[-1]  # the caller's conversation is left untouched
    sampled = [tiny_llama.generate([with_fields], max_new_tokens=6, temperature=1.0, seed=s) for s in (1, 1)]
    assert sampled[0] == sampled[1]


def test_transformers_backend_continues_a_final_assistant_message(tiny_llama):
    chat = [{"role": "user", "content": "Write what a person types to an image assistant."}]
    opened = chat + [{"role": "assistant", "content": "I've attached a picture"}]
    rendered = tiny_llama.tokenizer.apply_chat_template(opened, tokenize=False, continue_final_message=True)
    assert rendered.endswith("I've attached a picture")  # the assistant's turn is left open, not closed
    reply = tiny_llama.generate([opened, chat], max_new_tokens=5)
    assert reply[0].startswith("I've attached a picture") and len(reply[0]) > len("I've attached a picture")
    assert not reply[1].startswith("I've attached")  # its batch neighbour is answered as usual
    assert textgen.opening(opened) == "I've attached a picture" and textgen.opening(chat) == ""


def test_openai_backend_refuses_to_continue_a_message(chat_server):
    url, _, received = chat_server
    generator = textgen.make_generator("openai", base_url=url, model="m")
    with pytest.raises(ValueError, match="does not do; use the transformers backend"):
        generator.generate([[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "I've"}]])
    assert received == []  # refused before any request
