"""Candidate API calls from the agent LLM: sampling, beam search and diverse (group) beam search.

DiffAgent's RRHF stage ranks several candidate answers per prompt; the candidates come from sampling and from
diverse beam search (Vijayakumar et al. 2016, "Diverse Beam Search"). transformers 5 no longer ships group beam
search offline (it moved to a hub repository that needs `trust_remote_code`), so `diverse_beam_search` rebuilds
the algorithm transformers 4.4x ran for `generate(num_beams=B, num_beam_groups=G, diversity_penalty=λ)`:

* the B beams form G groups of B // G; at each step the groups choose their tokens in order, and group g's
  log-probabilities lose λ · (how often each token was chosen at this step by groups 0..g-1) — Hamming diversity;
  the penalised scores are what the beams accumulate, so they also rank the final hypotheses;
* inside a group it is ordinary beam search: the top 2 × group size candidates, eos candidates ranked inside the
  top group size become finished hypotheses (kept per group, best group size of them), the rest continue;
* a finished hypothesis scores sum_logprobs / generated_len (length penalty 1.0), where generated_len counts the
  new tokens including the eos — `BeamHypotheses.add(generated_len=...)` of the 4.4x releases; older 4.x releases
  divided by the hypothesis length instead (prompt included, eos not);
* a group is done (`early_stopping=False`) when it holds group size hypotheses and the best candidate of the step,
  divided by the current generated length, cannot beat the worst of them;
* at the end the running beams of unfinished groups join their group's hypotheses, and all groups' hypotheses are
  ranked together by score (4.4x `finalize` pools the groups); the best B are returned, an eos appended where it
  fits and shorter rows padded with the pad token.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

UNREACHED_SCORE = -1e9  # 4.x's start score for all but a group's first beam, so step 1 expands one beam per group


@dataclass
class GroupHypotheses:
    """A beam group's best `size` finished sequences, scored sum_logprobs / generated_len (4.4x `BeamHypotheses`)."""

    size: int
    beams: list[tuple[float, torch.Tensor]] = field(default_factory=list)
    worst_score: float = 1e9
    done: bool = False

    def add(self, tokens: torch.Tensor, sum_logprobs: float, generated_len: int) -> None:
        """Keep `tokens` while there is room or when it beats the worst kept hypothesis."""
        score = sum_logprobs / generated_len
        if len(self.beams) < self.size or score > self.worst_score:
            self.beams.append((score, tokens))
            if len(self.beams) > self.size:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.beams))
                del self.beams[ranked[0][1]]
                self.worst_score = ranked[1][0]
            else:
                self.worst_score = min(score, self.worst_score)

    def is_done(self, best_sum_logprobs: float, generated_len: int) -> bool:
        """Full, and the best candidate at its current length cannot beat the worst kept hypothesis."""
        return len(self.beams) >= self.size and self.worst_score >= best_sum_logprobs / generated_len


# ------------------------------------------------------------------------------------------- beam search

@torch.no_grad()
def diverse_beam_search(model, input_ids, attention_mask=None, *, num_beams: int, num_beam_groups: int,
                        diversity_penalty: float, max_new_tokens: int, eos_token_id=None,
                        pad_token_id=None) -> torch.LongTensor:
    """[num_beams, seq_len] sequences (prompt included, best first) from diverse beam search on one prompt."""
    prompt, prompt_mask = _one_prompt(input_ids, attention_mask)
    return diverse_beam_search_batch(model, prompt, prompt_mask, num_beams=num_beams, num_beam_groups=num_beam_groups,
                                     diversity_penalty=diversity_penalty, max_new_tokens=max_new_tokens,
                                     eos_token_id=eos_token_id, pad_token_id=pad_token_id)[0]


@torch.no_grad()
def diverse_beam_search_batch(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                              num_beams: int, num_beam_groups: int, diversity_penalty: float, max_new_tokens: int,
                              eos_token_id=None, pad_token_id=None) -> list[torch.LongTensor]:
    """Diverse beam search on a left-padded batch of prompts [batch, width]: per prompt, the sequences
    `diverse_beam_search` gives its row of the batch alone ([num_beams, seq_len], padded prompt included).

    One forward pass per step serves every beam of every prompt still searching (a 7B model's decoding step
    costs about the same for 4 rows as for 128); a prompt leaves the batch as soon as all its groups are done.
    """
    _check_beam_arguments(num_beams, num_beam_groups, diversity_penalty, max_new_tokens)
    prompts, prompt_mask = _prompt_batch(input_ids, attention_mask)
    eos_ids = _token_ids(eos_token_id)
    if pad_token_id is None and eos_ids:
        pad_token_id = eos_ids[0]  # as `generate` does when a model has no pad token
    group_size, width = num_beams // num_beam_groups, prompts.shape[1]
    searches = [[GroupHypotheses(group_size) for _ in range(num_beam_groups)] for _ in range(len(prompts))]
    beams_of = torch.arange(len(prompts), device=prompts.device).repeat_interleave(num_beams)
    sequences, mask = prompts[beams_of], prompt_mask[beams_of]
    beam_scores = torch.full((len(sequences),), UNREACHED_SCORE, device=prompts.device)
    beam_scores[::group_size] = 0.0
    # the prompts run once; every beam starts from a copy of its prompt's log-probs and cache
    log_probs, cache = _forward(model, prompts, prompt_mask, None)
    log_probs = log_probs[beams_of]
    _reorder_cache(cache, beams_of)
    active, results = list(range(len(prompts))), [None] * len(prompts)
    for step in range(max_new_tokens):
        tokens, rows, beam_scores = _choose_tokens(log_probs, beam_scores, sequences, [searches[p] for p in active],
                                                   diversity_penalty, eos_ids, pad_token_id, width)
        sequences = torch.cat([sequences[rows], tokens[:, None]], dim=1)
        mask = torch.cat([mask[rows], mask.new_ones(len(rows), 1)], dim=1)
        staying = []
        for j, p in enumerate(active):
            block = slice(j * num_beams, (j + 1) * num_beams)
            if step == max_new_tokens - 1 or all(group.done for group in searches[p]):
                best = _finalize(sequences[block], beam_scores[block], searches[p], width)
                results[p] = _pad_rows(best, width + max_new_tokens, eos_ids, pad_token_id)
            else:
                staying.append(j)
        if not staying:
            break
        if len(staying) < len(active):  # finished prompts leave the batch, and their rows the cache
            kept = torch.cat([torch.arange(j * num_beams, (j + 1) * num_beams, device=rows.device) for j in staying])
            rows, tokens, sequences, mask, beam_scores = rows[kept], tokens[kept], sequences[kept], mask[kept], \
                beam_scores[kept]
            active = [active[j] for j in staying]
        _reorder_cache(cache, rows)
        log_probs, cache = _forward(model, tokens[:, None], mask, cache)
    return results


def beam_search(model, input_ids, attention_mask=None, *, num_beams: int, max_new_tokens: int, eos_token_id=None,
                pad_token_id=None) -> torch.LongTensor:
    """Plain beam search: diverse beam search with one group and no penalty."""
    return diverse_beam_search(model, input_ids, attention_mask, num_beams=num_beams, num_beam_groups=1,
                               diversity_penalty=0.0, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                               pad_token_id=pad_token_id)


def _check_beam_arguments(num_beams: int, num_beam_groups: int, diversity_penalty: float,
                          max_new_tokens: int) -> None:
    if num_beams < 1 or num_beam_groups < 1 or num_beams % num_beam_groups:
        raise ValueError(f"num_beams={num_beams} must be a positive multiple of num_beam_groups={num_beam_groups}; "
                         "pick num_beam_groups among the divisors of num_beams")
    if diversity_penalty < 0:
        raise ValueError(f"diversity_penalty={diversity_penalty} would pull groups together; use 0 (plain beam "
                         "search per group) or a positive value")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be at least 1")


def _one_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompt and its mask as [1, prompt_len] tensors."""
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids of shape {tuple(input_ids.shape)} is not one prompt; pass [prompt_len] or "
                         "[1, prompt_len] and call once per prompt")
    return _prompt_batch(input_ids, None if attention_mask is None else attention_mask.reshape(1, -1))


def _prompt_batch(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts and their mask as [batch, width] tensors."""
    if input_ids.dim() != 2 or input_ids.shape[0] < 1:
        raise ValueError(f"input_ids of shape {tuple(input_ids.shape)} is not a batch of prompts; pass "
                         "[batch, width], left-padded, with the attention_mask the tokenizer returned")
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not match input_ids "
                         f"{tuple(input_ids.shape)}; pass the mask the tokenizer returned with these ids")
    return input_ids, attention_mask.to(input_ids.device).long()


def _token_ids(token_id) -> tuple[int, ...]:
    """`None`, one id or several ids (a model may stop on several eos tokens) as a tuple."""
    if token_id is None:
        return ()
    return (int(token_id),) if isinstance(token_id, int) else tuple(int(t) for t in token_id)


# ------------------------------------------------------------------------------------------- model calls

def _forward(model, tokens: torch.Tensor, attention_mask: torch.Tensor, cache):
    """Next-token log-probs of every row (float32, as 4.x computed them) and the grown KV cache."""
    # positions count only real tokens, so a left-padded prompt is placed exactly like an unpadded one
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -tokens.shape[1]:]
    output = model(input_ids=tokens, attention_mask=attention_mask, position_ids=positions, past_key_values=cache,
                   use_cache=True)
    return torch.log_softmax(output.logits[:, -1, :].float(), dim=-1), output.past_key_values


def _reorder_cache(cache, rows: torch.Tensor) -> None:
    """Make cache row i hold the past of beam `rows[i]`."""
    if cache is None:
        return
    if not hasattr(cache, "reorder_cache"):
        raise TypeError(f"cannot reorder a KV cache of type {type(cache).__name__}; the model must return a "
                        "transformers Cache (e.g. DynamicCache) or None as past_key_values")
    cache.reorder_cache(rows)


# ------------------------------------------------------------------------------------------- one step

def _choose_tokens(log_probs, beam_scores, sequences, searches: list[list[GroupHypotheses]],
                   diversity_penalty: float, eos_ids: tuple[int, ...], pad_token_id: int | None, prompt_len: int):
    """One step for every prompt's groups, in group order: (next token, source row, running score) for every beam.

    Rows are prompt-major (prompt j owns rows j * num_beams ...). Each group is chosen for all prompts at once (one
    top-k and one copy to the host per group and step), then its eos bookkeeping runs per prompt.
    """
    num_prompts, num_groups, group_size = len(searches), len(searches[0]), searches[0][0].size
    num_beams, vocab_size = num_groups * group_size, log_probs.shape[-1]
    device = log_probs.device
    log_probs, scores = log_probs.view(num_prompts, num_beams, vocab_size), beam_scores.view(num_prompts, num_beams)
    tokens = torch.zeros(num_prompts, num_beams, dtype=torch.long, device=device)
    rows = torch.zeros_like(tokens)
    new_scores = scores.clone()
    # twice the group (one more per extra eos id) so that group_size candidates remain after removing eos ones
    k = min(max(2, 1 + len(eos_ids)) * group_size, group_size * vocab_size)
    generated_len = sequences.shape[1] + 1 - prompt_len
    for g in range(num_groups):
        beams = slice(g * group_size, (g + 1) * group_size)
        penalised = hamming_penalty(log_probs[:, beams], tokens[:, :g * group_size], diversity_penalty)
        top_scores, top_indices = torch.topk((penalised + scores[:, beams, None]).flatten(1), k)
        picks = []
        for j, (groups, prompt_scores, prompt_indices) in enumerate(
                zip(searches, top_scores.tolist(), top_indices.tolist())):
            group = groups[g]
            if group.done:
                # a done group idles on pad tokens copied from its first beam, as in 4.x; later groups still see them
                picks.append([(0.0, pad_token_id, 0)] * group_size)
                continue
            group_sequences = sequences[j * num_beams + g * group_size:j * num_beams + (g + 1) * group_size]
            picks.append(_beam_step(prompt_scores, prompt_indices, vocab_size, group_sequences, group, eos_ids,
                                    generated_len))
        new_scores[:, beams] = torch.tensor([[score for score, _, _ in kept] for kept in picks], device=device)
        tokens[:, beams] = torch.tensor([[token for _, token, _ in kept] for kept in picks], device=device)
        rows[:, beams] = torch.tensor([[j * num_beams + g * group_size + row for _, _, row in kept]
                                       for j, kept in enumerate(picks)], device=device)
    return tokens.flatten(), rows.flatten(), new_scores.flatten()


def hamming_penalty(log_probs: torch.Tensor, earlier_tokens: torch.Tensor, diversity_penalty: float) -> torch.Tensor:
    """`log_probs` minus `diversity_penalty` × how often each token is among `earlier_tokens` (this step's picks).

    One prompt: log_probs [beams, vocab], earlier_tokens [picks]; several: [prompts, beams, vocab] and
    [prompts, picks], each prompt penalised by its own picks.
    """
    if earlier_tokens.numel() == 0:
        return log_probs
    vocab_size = log_probs.shape[-1]
    picks = earlier_tokens.reshape(-1, earlier_tokens.shape[-1])
    is_token = picks < vocab_size  # a pad id past the vocab is no token
    counts = torch.zeros(len(picks), vocab_size, dtype=log_probs.dtype, device=log_probs.device)
    counts.scatter_add_(1, picks.where(is_token, 0), is_token.to(log_probs.dtype))
    counts = counts.reshape(*earlier_tokens.shape[:-1], 1, vocab_size) if earlier_tokens.dim() > 1 else counts[0]
    return log_probs - diversity_penalty * counts


def _beam_step(top_scores: list[float], top_indices: list[int], vocab_size: int, group_sequences: torch.Tensor,
               group: GroupHypotheses, eos_ids: tuple[int, ...], generated_len: int) -> list[tuple[float, int, int]]:
    """Ordinary beam search inside one group (4.4x `BeamSearchScorer.process`) on the step's top candidates
    (flattened [beam, token] indices, best first): the (score, token, row) kept."""
    group_size = group.size
    kept = []
    for rank, (score, index) in enumerate(zip(top_scores, top_indices)):
        row, token = divmod(index, vocab_size)
        if token in eos_ids:
            if rank < group_size:  # 4.x finishes only eos candidates ranked inside the group's top group_size
                group.add(group_sequences[row], score, generated_len)
            continue
        kept.append((score, token, row))
        if len(kept) == group_size:
            break
    if len(kept) < group_size:
        raise ValueError(f"only {len(kept)} of the top {len(top_scores)} candidates are not eos {eos_ids}; a group "
                         f"of {group_size} beams needs a vocabulary with more non-eos tokens")
    group.done = group.done or group.is_done(top_scores[0], generated_len)
    return kept


# ------------------------------------------------------------------------------------------- output

def _finalize(sequences: torch.Tensor, beam_scores: torch.Tensor, groups: list[GroupHypotheses],
              prompt_len: int) -> list[torch.Tensor]:
    """Add unfinished groups' running beams as hypotheses; all groups' hypotheses, best first."""
    group_size = groups[0].size
    for g, group in enumerate(groups):
        if not group.done:
            for row in range(g * group_size, (g + 1) * group_size):
                group.add(sequences[row], beam_scores[row].item(), sequences.shape[1] - prompt_len)
    # 4.x sorts ascending and pops from the end: among equal scores the later hypothesis comes first
    ranked = sorted((beam for group in groups for beam in group.beams), key=lambda beam: beam[0])[::-1]
    return [tokens for _, tokens in ranked[:len(sequences)]]


def _pad_rows(rows: list[torch.Tensor], max_length: int, eos_ids: tuple[int, ...],
              pad_token_id: int | None) -> torch.LongTensor:
    """Rows of one width: each hypothesis, then eos where it fits (finished ones end there), then pad."""
    lengths = [len(row) for row in rows]
    width = min(max(lengths) + 1, max_length)
    if min(lengths) != max(lengths) and pad_token_id is None:
        raise ValueError("hypotheses of different lengths need a pad_token_id (or an eos_token_id to pad with)")
    padded = torch.full((len(rows), width), pad_token_id if pad_token_id is not None else 0, dtype=torch.long,
                        device=rows[0].device)
    for i, row in enumerate(rows):
        padded[i, :len(row)] = row
        if len(row) < width:
            padded[i, len(row)] = eos_ids[0]
    return padded


# ------------------------------------------------------------------------------------------- text in, text out

SYSTEM_PROMPT = ("Choose a Stable Diffusion model and its parameters for the user's prompt. Answer with one JSON "
                 "object: model, type, base_model, width, height, sampling_method, sampling_steps, cfg_scale.")


def user_message(prompt: str) -> list[dict[str, str]]:
    """The conversation the agent sees for a T2I prompt (system instruction + user turn); SFT and RRHF share it."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": prompt}]


def chat_prompt(tokenizer, prompt: str) -> list[int]:
    """Token ids of `prompt` as the agent's conversation in the chat template, ready for the assistant's reply."""
    text = tokenizer.apply_chat_template(user_message(prompt), add_generation_prompt=True, tokenize=False)
    # the chat template already writes any BOS token; adding special tokens again would double it
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _left_padded(token_lists: list[list[int]], pad_token_id: int, device) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask with padding on the left, where a decoder-only model does not continue."""
    from .speed import left_pad

    return left_pad(token_lists, max(len(tokens) for tokens in token_lists), pad_token_id, device)


def _pad_id(tokenizer) -> int:
    """The tokenizer's pad id, else its eos id (padding is masked out, so any id works)."""
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_token_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token before batching")
    return pad_token_id


def sample_candidates(model, tokenizer, prompts: list[str], *, num_samples: int, max_new_tokens: int,
                      temperature: float = 1.0, top_p: float = 1.0, seed: int = 0) -> list[list[str]]:
    """`num_samples` sampled completions per chat-formatted prompt; the same `seed` gives the same candidates."""
    if num_samples < 1 or temperature <= 0:
        raise ValueError(f"num_samples={num_samples} must be >= 1 and temperature={temperature} > 0; for one "
                         "deterministic answer use beam_search")
    batch = _left_padded([chat_prompt(tokenizer, p) for p in prompts], _pad_id(tokenizer), model.device)
    from .config import private_seed

    # a private RNG stream: reruns repeat exactly, and the caller's random state is left as it was
    with private_seed(seed, model.device), torch.no_grad():
        # top_k=0: only temperature and top_p shape the distribution (generate's default top_k=50 would cut the tail)
        output = model.generate(**batch, do_sample=True, num_return_sequences=num_samples, top_k=0,
                                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                pad_token_id=_pad_id(tokenizer))
    texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [texts[i:i + num_samples] for i in range(0, len(texts), num_samples)]


def diverse_candidates(model, tokenizer, prompt: str, *, num_beams: int, num_beam_groups: int,
                       diversity_penalty: float, max_new_tokens: int) -> list[str]:
    """`num_beams` completions of one chat-formatted prompt from diverse beam search, best first."""
    return diverse_candidates_batch(model, tokenizer, [prompt], num_beams=num_beams, num_beam_groups=num_beam_groups,
                                    diversity_penalty=diversity_penalty, max_new_tokens=max_new_tokens)[0]


def diverse_candidates_batch(model, tokenizer, prompts: Sequence[str], *, num_beams: int, num_beam_groups: int,
                             diversity_penalty: float, max_new_tokens: int) -> list[list[str]]:
    """Per chat-formatted prompt, `num_beams` completions from diverse beam search, best first; the prompts share
    every decoding step (prompts of similar length waste the least on padding)."""
    batch = _left_padded([chat_prompt(tokenizer, p) for p in prompts], _pad_id(tokenizer), model.device)
    eos_token_id = model.generation_config.eos_token_id
    found = diverse_beam_search_batch(model, batch["input_ids"], batch["attention_mask"], num_beams=num_beams,
                                      num_beam_groups=num_beam_groups, diversity_penalty=diversity_penalty,
                                      max_new_tokens=max_new_tokens,
                                      eos_token_id=eos_token_id if eos_token_id is not None else tokenizer.eos_token_id,
                                      pad_token_id=_pad_id(tokenizer))
    width = batch["input_ids"].shape[1]
    return [tokenizer.batch_decode(sequences[:, width:], skip_special_tokens=True) for sequences in found]
