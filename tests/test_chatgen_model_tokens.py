"""ChatGen-Evo stage 2 (ModelTokens) on a tiny random Llama: the freeze, learning, greedy selection, save/load."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import models
from helpers.chatgen import TASK_PREFIXES, ChatSample
from helpers.chatgen.model_tokens import (ModelTokenHead, context_ids, model_selection_loss, select_model,
                                          select_models, selection_batch, selection_example, selection_messages,
                                          train_model_tokens)

MODEL_NAMES = ["AnimeMix v2", "RealPhoto XL", "OilCanvas v1"]
# the toy task: one word in the chat decides the model
KEYWORDS = {"AnimeMix v2": "anime", "RealPhoto XL": "photo", "OilCanvas v1": "painting"}
OPENERS = ["please make me", "i would love", "can you draw", "show me", "my friend wants"]
SUBJECTS = ["a cat", "a castle", "a dragon", "a robot"]


def toy_examples() -> list[dict]:
    examples = []
    for i, opener in enumerate(OPENERS):
        for model, word in KEYWORDS.items():
            subject = SUBJECTS[i % len(SUBJECTS)]
            examples.append({"messages": [{"role": "user", "content": f"{opener} {word} of {subject}"}],
                             "prompt": f"{subject}, best quality", "model": model})
    return examples


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    models.build_tiny_llama(folder, seed=0)
    return folder


@pytest.fixture
def lm(llama_folder):
    return models.load_causal_lm(str(llama_folder))


def tied_lm(llama_folder):
    """The tiny Llama's architecture with tied input/output embeddings (SmolLM2 ties them)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(llama_folder)
    config.tie_word_embeddings = True
    torch.manual_seed(1)
    model = LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model, AutoTokenizer.from_pretrained(llama_folder)


def test_last_hidden_state_is_what_lm_head_reads(lm):
    """The head's premise: hidden_states[-1] is the normed state that lm_head turns into the LM's logits."""
    model, tokenizer = lm
    batch = tokenizer(["a photo of a cat"], return_tensors="pt")
    with torch.no_grad():
        output = model(**batch, output_hidden_states=True)
        assert torch.allclose(model.lm_head(output.hidden_states[-1]), output.logits, atol=1e-6)


def test_context_format(lm):
    model, tokenizer = lm
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "an anime cat"}]
    shown = selection_messages(messages, "a cat, anime")
    assert shown[:2] == messages[:2] and messages[-1]["content"] == "an anime cat"  # input left untouched
    assert shown[-1]["content"] == f"{TASK_PREFIXES['model']} an anime cat\nPrompt: a cat, anime"
    text = tokenizer.decode(context_ids(tokenizer, {"messages": messages, "prompt": "a cat, anime"}))
    assert text.endswith("Prompt: a cat, anime<|im_end|>\n<|im_start|>assistant\n")
    sample = ChatSample(id="s1", dabench_id=1, input_type="single", role="a sailor", messages=messages,
                        target={"prompt": "p", "negative_prompt": "", "model": "RealPhoto XL", "type": "Checkpoint",
                                "base_model": "SD 1.5", "sampling_method": "Euler", "sampling_steps": 20,
                                "cfg_scale": 7, "width": 512, "height": 512})
    assert selection_example(sample) == {"messages": messages, "prompt": "p", "model": "RealPhoto XL"}
    with pytest.raises(ValueError, match="end with the user"):
        selection_messages(messages[:2], "p")


def test_head_rows_and_logits(lm):
    model, tokenizer = lm
    head = ModelTokenHead(model, MODEL_NAMES, tokenizer)
    weight = model.lm_head.weight
    assert head.rows.shape == (3, weight.shape[1]) and head.vocab_size == weight.shape[0] == len(tokenizer)
    for name, row in zip(MODEL_NAMES, head.rows):  # init="names": mean LM-head row of the name's tokens
        ids = tokenizer(name, add_special_tokens=False)["input_ids"]
        assert torch.allclose(row, weight[ids].mean(0))
    assert len({tuple(r.tolist()) for r in head.rows}) == 3
    mean_head = ModelTokenHead(model, MODEL_NAMES, init="mean")
    assert torch.allclose(mean_head.rows, weight.mean(0).expand(3, -1))
    assert all(not p.requires_grad for p in model.parameters()) and head.rows.requires_grad
    assert [name for name, p in head.named_parameters() if p.requires_grad] == ["rows"]

    batch = selection_batch(head, tokenizer, toy_examples()[:4])
    with torch.no_grad():
        logits = head(batch["input_ids"], batch["attention_mask"])
        output = model(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                       position_ids=(batch["attention_mask"].cumsum(-1) - 1).clamp(min=0))
    assert logits.shape == (4, batch["input_ids"].shape[1], head.vocab_size + 3)
    assert torch.equal(logits[..., :head.vocab_size], output.logits)  # the vocabulary part is the LM's own
    assert torch.allclose(logits[..., head.vocab_size:], output.hidden_states[-1] @ head.rows.T, atol=1e-6)
    loss = model_selection_loss(head, batch)
    expected = torch.nn.functional.cross_entropy(logits[:, -1], batch["labels"] + head.vocab_size)
    assert torch.allclose(loss, expected)


def test_the_loss_from_two_vocabulary_numbers_is_the_cross_entropy_over_every_logit():
    """Hand-worked: hidden e0, model logits m = [3, 0.5, -1], vocabulary logits [1, 2, 0] (logsumexp, max 2)."""
    rows = torch.zeros(3, 4)
    rows[:, 0] = torch.tensor([3.0, 0.5, -1.0])
    lse = math.log(math.e ** 1 + math.e ** 2 + 1)
    features = torch.tensor([[1.0, 0, 0, 0, lse, 2.0]] * 2 + [[1.0, 0, 0, 0, lse, 3.5]])
    got = ModelTokenHead.selection_from_features(SimpleNamespace(rows=rows), features, torch.tensor([0, 1, 0]))
    every = math.log(sum(math.e ** v for v in (1, 2, 0, 3, 0.5, -1)))
    # per row: every - 3, every - 0.5 and (the same vocabulary sum) every - 3
    assert got["loss"].item() == pytest.approx(((every - 3) * 2 + every - 0.5) / 3, rel=1e-6)
    # row 0: 3 beats the vocabulary's 2 and is the right model; row 1: the wrong model; row 2: the vocabulary's 3.5
    # wins, so greedy decoding writes a word first, though the model logits alone pick the right model
    assert got["accuracy"].item() == pytest.approx(1 / 3) and got["model_accuracy"].item() == pytest.approx(2 / 3)


def test_training_features_give_the_full_logits_loss_and_accuracy(lm):
    """On the tiny LM, with rows that win for some contexts and not others: the loss and accuracies from
    `context_features` equal those from the [vocab_size + models] logits greedy decoding reads."""
    model, tokenizer = lm
    examples = toy_examples()
    head = ModelTokenHead(model, MODEL_NAMES, tokenizer)
    batch = selection_batch(head, tokenizer, examples)
    with torch.no_grad():
        features = head.context_features(batch["input_ids"], batch["attention_mask"])
        hidden = features[:, :-2]
        # each model's row: the mean hidden state of its examples, scaled so the model token wins some contexts
        for index, name in enumerate(MODEL_NAMES):
            mine = [i for i, e in enumerate(examples) if e["model"] == name]
            head.rows[index] = hidden[mine].mean(0) * 6.0 / hidden[mine].mean(0).norm()
    assert features.shape == (len(examples), head.hidden_size + 2)
    got = head.selection_from_features(features, batch["labels"])
    with torch.no_grad():
        logits = head(batch["input_ids"], batch["attention_mask"], logits_to_keep=1)[:, -1]
        target = batch["labels"] + head.vocab_size
        accuracy = (logits.argmax(-1) == target).float().mean().item()
        model_accuracy = (logits[:, head.vocab_size:].argmax(-1) == batch["labels"]).float().mean().item()
        assert got["loss"].item() == pytest.approx(model_selection_loss(head, batch).item(), rel=1e-5)
    assert 0 < accuracy < 1  # both cases are there
    assert (got["accuracy"].item(), got["model_accuracy"].item()) == pytest.approx((accuracy, model_accuracy))
    got["loss"].backward()
    assert head.rows.grad is not None and head.rows.grad.abs().sum() > 0


def test_bad_inputs(lm):
    model, tokenizer = lm
    with pytest.raises(ValueError, match="distinct"):
        ModelTokenHead(model, ["A", "A"], tokenizer)
    with pytest.raises(ValueError, match="pass the tokenizer"):
        ModelTokenHead(model, MODEL_NAMES)
    head = ModelTokenHead(model, MODEL_NAMES, tokenizer)
    bad = dict(toy_examples()[0], model="NoSuchModel")
    with pytest.raises(ValueError, match="NoSuchModel.*known models"):
        selection_batch(head, tokenizer, [bad])


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_the_freeze(llama_folder, tied):
    """After training, every LM tensor is bit-identical (tied embeddings and lm_head included); only rows moved."""
    model, tokenizer = tied_lm(llama_folder) if tied else models.load_causal_lm(str(llama_folder))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    head = ModelTokenHead(model, MODEL_NAMES, tokenizer)
    rows_before = head.rows.detach().clone()
    train_model_tokens(head, tokenizer, toy_examples(), steps=4, lr=0.05, batch_size=4, seed=0)
    after = model.state_dict()
    assert after.keys() == before.keys() and {"lm_head.weight", "model.embed_tokens.weight"} <= set(after)
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert changed == []
    assert all(p.grad is None for p in model.parameters())  # no gradient ever reached the LM
    assert not torch.equal(head.rows.detach(), rows_before)
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_toy_task_reaches_full_accuracy(lm):
    model, tokenizer = lm
    examples = toy_examples()
    head = ModelTokenHead(model, MODEL_NAMES, tokenizer)
    log = train_model_tokens(head, tokenizer, examples, steps=120, lr=0.05, batch_size=8, seed=0)
    losses = [row["loss"] for row in log]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) / 10 < 0.2 * sum(losses[:5]) / 5
    assert log[-1]["accuracy"] == 1.0 and log[-1]["model_accuracy"] == 1.0
    targets = [e["model"] for e in examples]
    assert select_models(head, tokenizer, examples, batch_size=5) == targets
    # trained rows win over every vocabulary token, so greedy decoding stops at once, writing nothing
    assert select_models(head, tokenizer, examples, max_new_tokens=4, return_written=True) == \
        [(t, "") for t in targets]
    assert select_model(head, tokenizer, examples[1]) == targets[1]


def test_training_runs_each_context_through_the_frozen_lm_once_when_examples_repeat(lm, monkeypatch):
    """15 examples, 12 steps of 4: the LM reads each context once (15 rows, not ~48), and the rows train as they
    do when every step runs the LM again (the reuse switched off)."""
    from helpers.chatgen import model_tokens

    model, tokenizer = lm
    rows_read = []
    model.register_forward_pre_hook(lambda _, args, kwargs: rows_read.append(len(kwargs["input_ids"])),
                                    with_kwargs=True)
    reused = ModelTokenHead(model, MODEL_NAMES, tokenizer)
    log = train_model_tokens(reused, tokenizer, toy_examples(), steps=12, lr=0.05, batch_size=4, seed=0,
                             progress=False)
    assert sum(rows_read) == len(toy_examples()) == 15
    rows_read.clear()
    monkeypatch.setattr(model_tokens, "FEATURE_CACHE_BYTES", 0)
    every_step = ModelTokenHead(model, MODEL_NAMES, tokenizer)
    again = train_model_tokens(every_step, tokenizer, toy_examples(), steps=12, lr=0.05, batch_size=4, seed=0,
                               progress=False)
    assert 40 < sum(rows_read) <= 48  # every step reads its 4 contexts (one repeated inside a batch, once)
    assert [row["loss"] for row in log] == pytest.approx([row["loss"] for row in again], abs=1e-5)
    assert torch.allclose(reused.rows, every_step.rows, atol=1e-5)
    assert not torch.equal(reused.rows, ModelTokenHead(model, MODEL_NAMES, tokenizer).rows)  # they did train


def greedy_oracle(head, tokenizer, context, max_new_tokens):
    """Independent greedy decoding: full forward each step, one context, no cache, no padding.

    Returns (model name, text written before the model token, number of tokens written)."""
    ids = context_ids(tokenizer, context)
    vocab_size, written = head.vocab_size, []
    for step in range(max_new_tokens + 1):
        with torch.no_grad():
            logits = head(torch.tensor([ids]))[0, -1]
        best = int(logits.argmax())
        if best >= vocab_size:
            return head.model_names[best - vocab_size], tokenizer.decode(written), len(written)
        if step == max_new_tokens or best == tokenizer.eos_token_id:
            return head.model_names[int(logits[vocab_size:].argmax())], tokenizer.decode(written), len(written)
        written.append(best)
        ids.append(best)


def test_greedy_selection_matches_an_oracle(lm):
    """Batched, cached greedy decoding over vocabulary + model tokens stops at the first model token."""
    model, tokenizer = lm
    contexts = [{"messages": e["messages"], "prompt": e["prompt"]} for e in toy_examples()[:6]]
    head = ModelTokenHead(model, MODEL_NAMES, tokenizer)
    base_rows = head.rows.detach().clone()
    steps_seen, names_seen = set(), set()
    # scaling the rows moves the step where a model token first wins: never (forced at the end), after 1-2
    # tokens, or at once
    for scale in (1.0, 4.0, 4.5, 12.0):
        with torch.no_grad():
            head.rows.copy_(base_rows * scale)
        expected = [greedy_oracle(head, tokenizer, c, 3) for c in contexts]
        got = select_models(head, tokenizer, contexts, max_new_tokens=3, batch_size=4, return_written=True)
        assert got == [(name, text) for name, text, _ in expected]
        assert select_model(head, tokenizer, contexts[0], max_new_tokens=3) == got[0][0]
        steps_seen |= {count for _, _, count in expected}
        names_seen |= {name for name, _ in got}
        # max_new_tokens=0: the argmax over the model-token rows at the next position
        with torch.no_grad():
            direct = [MODEL_NAMES[int(head(torch.tensor([context_ids(tokenizer, c)]))[0, -1, head.vocab_size:]
                                      .argmax())] for c in contexts]
        assert select_models(head, tokenizer, contexts) == direct
    assert {0, 3} < steps_seen <= {0, 1, 2, 3}, steps_seen  # stopped at once, midway, and forced at the end
    assert len(names_seen) >= 2 and names_seen <= set(MODEL_NAMES)


def test_a_selection_batch_that_runs_out_of_memory_is_decoded_again_in_halves(lm, monkeypatch, caplog):
    """The same choices and texts as batches that fit; the first batch of 4 fails once, and the rest keep to 2.
    Out of memory is simulated: the head fails on more than 2 rows at once."""
    from helpers.chatgen import model_tokens

    model, tokenizer = lm
    contexts = [{"messages": e["messages"], "prompt": e["prompt"]} for e in toy_examples()[:6]]
    head = ModelTokenHead(model, MODEL_NAMES, tokenizer)
    fitting = select_models(head, tokenizer, contexts, max_new_tokens=3, batch_size=2, return_written=True)
    choose, rows = model_tokens._greedy_choice, []

    def too_many(head, input_ids, *args):
        rows.append(len(input_ids))
        if len(input_ids) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return choose(head, input_ids, *args)
    monkeypatch.setattr(model_tokens, "_greedy_choice", too_many)
    assert select_models(head, tokenizer, contexts, max_new_tokens=3, batch_size=4, return_written=True) == fitting
    assert rows == [4, 2, 2, 2]  # batches of 4 and 2 by length: the 4 failed, then ran as 2 + 2; the 2 fitted
    assert "ChatGen model selection ran out of accelerator memory with 4 rows" in caplog.text


def test_save_load_round_trip(lm, llama_folder, tmp_path):
    model, tokenizer = lm
    examples = toy_examples()
    head = ModelTokenHead(model, MODEL_NAMES, tokenizer)
    train_model_tokens(head, tokenizer, examples, steps=10, lr=0.05, batch_size=8, seed=0)
    head.save(tmp_path / "tokens")
    assert {p.name for p in (tmp_path / "tokens").iterdir()} == {"model_tokens.safetensors", "model_tokens.json",
                                                                 "README.md"}
    loaded, loaded_tokenizer = ModelTokenHead.load(tmp_path / "tokens", llama_folder)
    assert loaded.model_names == MODEL_NAMES and torch.equal(loaded.rows, head.rows)
    assert loaded.rows.requires_grad and all(not p.requires_grad for p in loaded.model.parameters())
    for max_new_tokens in (0, 2):
        assert select_models(loaded, loaded_tokenizer, examples, max_new_tokens=max_new_tokens,
                             return_written=True) == \
            select_models(head, tokenizer, examples, max_new_tokens=max_new_tokens, return_written=True)


def test_a_saved_head_names_a_local_base_model_relative_to_itself_so_the_run_folder_can_move(llama_folder, tmp_path):
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(llama_folder, run / "lm")
    model, tokenizer = models.load_causal_lm(str(run / "lm"))
    head = ModelTokenHead(model, MODEL_NAMES, tokenizer)
    with torch.no_grad():
        head.rows.add_(0.5)  # rows unlike a fresh head's
    head.save(run / "tokens")
    meta = json.loads((run / "tokens" / "model_tokens.json").read_text())
    assert meta["base_model"] == "../lm"  # no absolute path of this machine in the saved files
    assert str(tmp_path) not in (run / "tokens" / "README.md").read_text()
    run.rename(tmp_path / "moved")
    loaded, _ = ModelTokenHead.load(tmp_path / "moved" / "tokens")  # the base model found from the head's folder
    assert torch.equal(loaded.rows, head.rows)
    assert Path(loaded.model.config._name_or_path).resolve() == (tmp_path / "moved" / "lm").resolve()
    meta["base_model"] = ""
    (tmp_path / "moved" / "tokens" / "model_tokens.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="names no base model; pass base_model_path"):
        ModelTokenHead.load(tmp_path / "moved" / "tokens")



def test_a_head_on_a_bf16_lm_keeps_fp32_rows_and_trains_them(llama_folder):
    """Stage 2 loads the frozen LM on the run's device in its dtype (bf16 on a GPU, here on the CPU): the rows stay
    fp32, the features they train on are fp32, and the rows move while the LM does not."""
    head, tokenizer = ModelTokenHead.from_base(llama_folder, MODEL_NAMES, "cpu", torch.bfloat16)
    assert {p.dtype for p in head.model.parameters()} == {torch.bfloat16} and head.rows.dtype == torch.float32
    examples = toy_examples()
    features = head.context_features(torch.tensor([context_ids(tokenizer, examples[0])]))
    assert features.dtype == torch.float32 and features.shape == (1, head.hidden_size + 2)
    frozen = {name: p.detach().clone() for name, p in head.model.named_parameters()}
    rows = head.rows.detach().clone()
    log = train_model_tokens(head, tokenizer, examples, steps=3, lr=1e-2, batch_size=4, progress=False)
    assert all(math.isfinite(row["loss"]) for row in log) and not torch.equal(head.rows.detach(), rows)
    assert all(torch.equal(p, frozen[name]) for name, p in head.model.named_parameters())
