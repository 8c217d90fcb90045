"""Beam search, diverse beam search and sampling: hand-worked fakes, a brute-force oracle and transformers' own."""
import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from helpers import generation, models

# fixed next-token probabilities for the fake model: ln(0.5 / 0.3) = 0.51 is the penalty at which a second group
# stops following the first group's token 0 and takes token 1
PROBS = [0.5, 0.3, 0.1, 0.06, 0.04]


class TableLM(torch.nn.Module):
    """Next-token logits from a [position, last token, vocab] table; keeps no KV cache."""

    def __init__(self, logits_table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", logits_table)

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        return SimpleNamespace(logits=self.table[position_ids, input_ids], past_key_values=None)


def fixed_lm(probs=PROBS) -> TableLM:
    """Same next-token distribution whatever came before."""
    return TableLM(torch.tensor(probs).log().expand(8, len(probs), -1).clone())


def new_tokens(model, prompt, **options) -> list[list[int]]:
    sequences = generation.diverse_beam_search(model, torch.tensor(prompt), **options)
    assert sequences[:, :len(prompt)].tolist() == [prompt] * len(sequences)
    return sequences[:, len(prompt):].tolist()


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("generation") / "llm"
    models.build_tiny_llama(folder, seed=0)
    return models.load_causal_lm(str(folder))


@pytest.fixture(scope="module")
def prompt_ids(tiny_llm):
    _, tokenizer = tiny_llm
    return torch.tensor([generation.chat_prompt(tokenizer, "oil painting of a robot at night")])


# ------------------------------------------------------------------------------------------- hand-worked

@pytest.mark.parametrize("penalty, second_group_token", [(0.0, 0), (0.4, 0), (0.6, 1)])
def test_second_group_leaves_the_first_groups_token_once_the_penalty_outweighs_the_gap(penalty, second_group_token):
    # group 2 scores token 0 as ln 0.5 - penalty and token 1 as ln 0.3: it moves to token 1 once penalty > 0.51
    rows = new_tokens(fixed_lm(), [4], num_beams=2, num_beam_groups=2, diversity_penalty=penalty, max_new_tokens=1)
    assert rows == [[0], [second_group_token]]


def test_every_group_takes_the_best_token_no_earlier_group_took_when_the_penalty_is_huge():
    rows = new_tokens(fixed_lm(), [4], num_beams=5, num_beam_groups=5, diversity_penalty=100.0, max_new_tokens=2)
    assert rows == [[0, 0], [1, 1], [2, 2], [3, 3], [4, 4]]


def test_hypotheses_of_all_groups_are_ranked_together_by_penalised_score():
    # group 1 takes 0 (ln .5 = -0.69) and 1 (ln .3 = -1.20); group 2, penalised 0.3 on both, takes 0 (-0.99) and
    # 1 (-1.50) rather than 2 (ln .1 = -2.30); one ranking over both groups interleaves them (not g1, g1, g2, g2)
    rows = new_tokens(fixed_lm(), [4], num_beams=4, num_beam_groups=2, diversity_penalty=0.3, max_new_tokens=1)
    assert rows == [[0], [0], [1], [1]]


def test_hamming_penalty_counts_each_earlier_pick():
    log_probs = torch.zeros(2, 4)
    penalised = generation.hamming_penalty(log_probs, torch.tensor([1, 1, 3]), 0.5)
    assert penalised.tolist() == [[0.0, -1.0, 0.0, -0.5]] * 2


def test_a_beam_that_emits_eos_is_finished_and_padded_after_it():
    # eos = 0, pad = 4. Step 1: eos ranks first, so [prompt] finishes with ln .5 / 1 = -0.69; beams 1 and 2 run on.
    # Step 2: [1, eos] finishes with (ln .3 + ln .5) / 2 = -0.95; the group holds 2 hypotheses and its best candidate
    # cannot beat -0.95 at length 2, so it is done. Output: the two hypotheses, eos appended, then padding.
    rows = new_tokens(fixed_lm(), [3], num_beams=2, num_beam_groups=1, diversity_penalty=0.0, max_new_tokens=3,
                      eos_token_id=0, pad_token_id=4)
    assert rows == [[0, 4], [1, 0]]


def test_beam_search_finds_the_true_best_sequences_by_exhaustive_search():
    # independent oracle: with num_beams >= vocab ** depth nothing is pruned, so beam search must return every
    # continuation of length 3, ordered by summed log-probability (all have the same length). The table depends on
    # the position too: a pure bigram table gives exact ties (0→0→1→0 and 0→1→0→0 use the same transitions).
    torch.manual_seed(0)
    table = torch.randn(4, 3, 3) * 2
    log_probs = table.log_softmax(-1)
    continuations = list(itertools.product(range(3), repeat=3))

    def total(tokens):
        return sum(log_probs[position, a, b].item() for position, (a, b) in enumerate(zip((0, *tokens), tokens)))

    expected = sorted(continuations, key=total, reverse=True)
    found = generation.beam_search(TableLM(table), torch.tensor([0]), num_beams=27, max_new_tokens=3)
    assert [tuple(row) for row in found[:, 1:].tolist()] == expected


def test_bad_arguments_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match="num_beams=4 must be a positive multiple of num_beam_groups=3"):
        generation.diverse_beam_search(fixed_lm(), torch.tensor([1]), num_beams=4, num_beam_groups=3,
                                       diversity_penalty=1.0, max_new_tokens=2)
    with pytest.raises(ValueError, match="not one prompt"):
        generation.beam_search(fixed_lm(), torch.tensor([[1], [2]]), num_beams=2, max_new_tokens=2)


# ------------------------------------------------------------------------------------------- tiny Llama

def test_diverse_beam_search_returns_num_beams_distinct_sequences(tiny_llm, prompt_ids):
    model, _ = tiny_llm
    # one beam per group and a penalty far above any log-prob gap: every group starts with its own first token,
    # and without eos every beam runs the full length
    sequences = generation.diverse_beam_search(model, prompt_ids, num_beams=4, num_beam_groups=4,
                                               diversity_penalty=100.0, max_new_tokens=6)
    assert sequences.shape == (4, prompt_ids.shape[1] + 6)
    assert torch.equal(sequences[:, :prompt_ids.shape[1]], prompt_ids.expand(4, -1))
    assert len({tuple(row) for row in sequences[:, prompt_ids.shape[1]:].tolist()}) == 4


def _compare_with_transformers(model, prompt_ids, num_beams, max_new_tokens, eos_token_id, pad_token_id):
    ours = generation.beam_search(model, prompt_ids, num_beams=num_beams, max_new_tokens=max_new_tokens,
                                  eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    theirs = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), num_beams=num_beams,
                            num_return_sequences=num_beams, do_sample=False, max_new_tokens=max_new_tokens,
                            early_stopping=False, length_penalty=1.0, eos_token_id=eos_token_id,
                            pad_token_id=pad_token_id)
    assert ours.tolist() == theirs.tolist(), f"eos {eos_token_id}"
    return ours


def test_one_group_without_penalty_is_transformers_beam_search(tiny_llm, prompt_ids):
    model, tokenizer = tiny_llm
    _compare_with_transformers(model, prompt_ids, 3, 8, tokenizer.eos_token_id, tokenizer.pad_token_id)


def test_beams_that_end_early_match_transformers_too(tiny_llm, prompt_ids):
    """Each token the free best beam emits, used as eos, so some beams finish early and get padded."""
    model, tokenizer = tiny_llm
    free = _compare_with_transformers(model, prompt_ids, 4, 9, tokenizer.eos_token_id, tokenizer.pad_token_id)
    finished = 0
    for eos_token_id in sorted(set(free[:, prompt_ids.shape[1]:].flatten().tolist())):
        ours = _compare_with_transformers(model, prompt_ids, 4, 9, eos_token_id, tokenizer.pad_token_id)
        finished += bool((ours[:, prompt_ids.shape[1]:] == eos_token_id).any())
    assert finished, "no choice of eos finished a beam, so the early-finish path went untested"


def test_left_padding_does_not_change_the_result(tiny_llm, prompt_ids):
    model, tokenizer = tiny_llm
    options = dict(num_beams=4, num_beam_groups=2, diversity_penalty=0.5, max_new_tokens=6,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    padded = torch.cat([torch.full((1, 3), tokenizer.pad_token_id), prompt_ids], dim=1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(prompt_ids)], dim=1)
    plain = generation.diverse_beam_search(model, prompt_ids, **options)
    left_padded = generation.diverse_beam_search(model, padded, mask, **options)
    assert (left_padded[:, :3] == tokenizer.pad_token_id).all()
    assert torch.equal(left_padded[:, 3:], plain)


def test_a_batch_of_prompts_gives_each_prompt_its_own_search(tiny_llm):
    """Prompts of three lengths, left-padded, share each step and the KV cache, and each gets its one-prompt result."""
    model, tokenizer = tiny_llm
    prompts = [generation.chat_prompt(tokenizer, text) for text in
               ["a cat", "oil painting of a robot at night", "a red bicycle leaning on a wall in the rain, film grain"]]
    batch = generation._left_padded(prompts, tokenizer.pad_token_id, model.device)
    width = batch["input_ids"].shape[1]
    options = dict(num_beams=4, num_beam_groups=2, diversity_penalty=0.5, max_new_tokens=7,
                   pad_token_id=tokenizer.pad_token_id)
    free = generation.diverse_beam_search_batch(model, **batch, eos_token_id=tokenizer.eos_token_id, **options)
    emitted = sorted({token for rows in free for token in rows[:, width:].flatten().tolist()})
    for eos_token_id in [tokenizer.eos_token_id, *emitted[:2]]:  # tokens the search emits: some beams finish
        together = generation.diverse_beam_search_batch(model, **batch, eos_token_id=eos_token_id, **options)
        for prompt, rows in zip(prompts, together):
            alone = generation.diverse_beam_search(model, torch.tensor([prompt]), eos_token_id=eos_token_id, **options)
            assert (rows[:, :width - len(prompt)] == tokenizer.pad_token_id).all()
            assert rows[:, width - len(prompt):].tolist() == alone.tolist(), f"eos {eos_token_id}"


def test_a_prompt_whose_groups_are_done_leaves_the_batch_and_the_others_go_on():
    """Token 4 (eos) is likely only where the short prompt's first two answer tokens go (positions 2 and 3): its
    groups are done after two steps, while the long prompt's beams run to the end."""
    eos_likely, eos_unlikely = [0.04, 0.03, 0.02, 0.01, 0.9], [0.5, 0.3, 0.1, 0.09, 0.01]
    table = torch.tensor([eos_likely if position in (1, 2) else eos_unlikely for position in range(12)]).log()
    model = TableLM(table[:, None, :].expand(-1, 5, -1).clone())
    short, long = [1, 2], [1, 2, 3, 0]
    options = dict(num_beams=4, num_beam_groups=2, diversity_penalty=0.5, max_new_tokens=5, eos_token_id=4,
                   pad_token_id=4)
    batch = generation._left_padded([short, long], 4, "cpu")
    rows_per_forward = []
    model.register_forward_pre_hook(lambda _, args, kwargs: rows_per_forward.append(len(kwargs["input_ids"])),
                                    with_kwargs=True)
    together = generation.diverse_beam_search_batch(model, **batch, **options)
    assert rows_per_forward == [2, 8, 4, 4, 4]  # the prompts once, both prompts' beams, then the long one's alone
    short_alone = generation.diverse_beam_search(model, torch.tensor(short), **options)
    long_alone = generation.diverse_beam_search(model, torch.tensor(long), **options)
    assert short_alone.shape[1] - len(short) < 5 == long_alone.shape[1] - len(long)  # finished early / ran on
    assert together[0][:, 2:].tolist() == short_alone.tolist() and together[1].tolist() == long_alone.tolist()


class EosAtPositions(torch.nn.Module):
    """The tiny Llama (with its KV cache), but eos gets +20 logits where the next token's position is listed."""

    def __init__(self, model, eos_token_id: int, positions: set[int]):
        super().__init__()
        self.model, self.eos_token_id, self.positions = model, eos_token_id, positions

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, use_cache=use_cache)
        logits = output.logits.clone()
        boosted = torch.tensor([int(p) + 1 in self.positions for p in position_ids[:, -1]])
        logits[boosted, -1, self.eos_token_id] += 20.0
        return SimpleNamespace(logits=logits, past_key_values=output.past_key_values)


def test_a_finished_prompt_leaves_the_kv_cache_and_the_others_decode_on_unchanged(tiny_llm):
    model, tokenizer = tiny_llm
    short, long = (generation.chat_prompt(tokenizer, text) for text in ["a cat", "oil painting of a robot at night"])
    eos = tokenizer.eos_token_id
    # eos is likely for the short prompt's first two answer tokens only: the long prompt's start further on
    boosted = EosAtPositions(model, eos, {len(short), len(short) + 1})
    assert len(long) > len(short) + 2
    options = dict(num_beams=4, num_beam_groups=2, diversity_penalty=0.5, max_new_tokens=6, eos_token_id=eos,
                   pad_token_id=tokenizer.pad_token_id)
    rows_per_forward = []
    boosted.register_forward_pre_hook(lambda _, args, kwargs: rows_per_forward.append(len(kwargs["input_ids"])),
                                      with_kwargs=True)
    batch = generation._left_padded([short, long], tokenizer.pad_token_id, model.device)
    together = generation.diverse_beam_search_batch(boosted, **batch, **options)
    assert rows_per_forward == [2, 8, 4, 4, 4, 4]  # both prompts' beams until the short one's groups are done
    width = batch["input_ids"].shape[1]
    short_alone = generation.diverse_beam_search(boosted, torch.tensor([short]), **options)
    long_alone = generation.diverse_beam_search(boosted, torch.tensor([long]), **options)
    assert short_alone.shape[1] - len(short) < 6 == long_alone.shape[1] - len(long)
    assert together[0][:, width - len(short):].tolist() == short_alone.tolist()
    assert together[1][:, width - len(long):].tolist() == long_alone.tolist()


def test_hamming_penalty_of_several_prompts_counts_each_prompts_own_picks():
    log_probs = torch.zeros(2, 3, 4)
    penalised = generation.hamming_penalty(log_probs, torch.tensor([[1, 1], [3, 9]]), 0.5)  # 9: a pad id past the vocab
    assert penalised.tolist() == [[[0.0, -1.0, 0.0, 0.0]] * 3, [[0.0, 0.0, 0.0, -0.5]] * 3]


def test_diverse_candidates_decode_one_completion_per_beam(tiny_llm):
    model, tokenizer = tiny_llm
    texts = generation.diverse_candidates(model, tokenizer, "a cat", num_beams=4, num_beam_groups=2,
                                          diversity_penalty=1.0, max_new_tokens=5)
    assert len(texts) == 4 and all(isinstance(text, str) for text in texts)
    assert not any("<|im_start|>" in text for text in texts)


def test_sample_candidates_are_reproducible_per_seed(tiny_llm):
    model, tokenizer = tiny_llm
    prompts = ["a cat", "an oil painting of a dragon at sunset"]  # different lengths: left padding in the batch
    rng_before = torch.get_rng_state()
    first = generation.sample_candidates(model, tokenizer, prompts, num_samples=3, max_new_tokens=8, seed=0)
    again = generation.sample_candidates(model, tokenizer, prompts, num_samples=3, max_new_tokens=8, seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before), "sampling must not move the caller's random state"
    assert first == again
    assert [len(texts) for texts in first] == [3, 3]
    assert all(isinstance(text, str) for texts in first for text in texts)
    assert math.prod(len(set(texts)) for texts in first) > 1, "random sampling should not repeat one completion"


def test_proposals_decode_prompts_of_similar_length_together_and_keep_the_prompts_order(tiny_llm, monkeypatch):
    from helpers.candidates import propose

    model, tokenizer = tiny_llm
    agent = SimpleNamespace(model=model, tokenizer=tokenizer)
    prompts = ["a portrait of an old sailor with a pipe, dramatic light", "a cat",
               "a watercolor map of an imaginary island with mountains", "a dog"]
    options = dict(num_beams=2, num_beam_groups=2, diversity_penalty=1.0, max_new_tokens=5, batch_size=2,
                   progress=False)
    batches = []

    def recording(method):
        def record(model, tokenizer, batch, **kwargs):
            batches.append(batch)
            return method(model, tokenizer, batch, **kwargs)
        return record

    for name in ("sample_candidates", "diverse_candidates_batch"):
        monkeypatch.setattr(generation, name, recording(getattr(generation, name)))
    texts = propose(agent, prompts, num_samples=2, **options)
    assert batches == [["a cat", "a dog"], [prompts[0], prompts[2]]] * 2  # sampling, then beams
    assert [len(found) for found in texts] == [4] * 4
    for prompt, found in zip(prompts, texts):  # beams are deterministic: each prompt's own, after its 2 samples
        assert found[2:] == generation.diverse_candidates(model, tokenizer, prompt, num_beams=2, num_beam_groups=2,
                                                          diversity_penalty=1.0, max_new_tokens=5)
    assert propose(agent, prompts, num_samples=2, **options) == texts  # each sampled batch keeps its seed
