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
    _check_beam_arguments(num_beams, num_beam_groups, diversity_penalty, max_new_tokens)
    prompt, prompt_mask = _one_prompt(input_ids, attention_mask)
    eos_ids = _token_ids(eos_token_id)
    if pad_token_id is None and eos_ids:
        pad_token_id = eos_ids[0]  # as `generate` does when a model has no pad token
    group_size = num_beams // num_beam_groups
    groups = [GroupHypotheses(group_size) for _ in range(num_beam_groups)]
    sequences, mask = prompt.expand(num_beams, -1), prompt_mask.expand(num_beams, -1)
    beam_scores = torch.full((num_beams,), UNREACHED_SCORE, device=prompt.device)
    beam_scores[::group_size] = 0.0
    log_probs, cache = _prefill(model, prompt, prompt_mask, num_beams)
    for step in range(max_new_tokens):
        tokens, rows, beam_scores = _choose_tokens(log_probs, beam_scores, sequences, groups, diversity_penalty,
                                                   eos_ids, pad_token_id, prompt.shape[1])
        sequences = torch.cat([sequences[rows], tokens[:, None]], dim=1)
        mask = torch.cat([mask[rows], mask.new_ones(num_beams, 1)], dim=1)
        if all(group.done for group in groups) or step == max_new_tokens - 1:
            break
        _reorder_cache(cache, rows)
        log_probs, cache = _forward(model, tokens[:, None], mask, cache)
    best = _finalize(sequences, beam_scores, groups, prompt.shape[1])
    return _pad_rows(best, prompt.shape[1] + max_new_tokens, eos_ids, pad_token_id)


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
    if attention_mask is None:
        return input_ids, torch.ones_like(input_ids)
    attention_mask = attention_mask.reshape(1, -1).to(input_ids.device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask of shape {tuple(attention_mask.shape)} does not match input_ids "
                         f"{tuple(input_ids.shape)}; pass the mask the tokenizer returned with these ids")
    return input_ids, attention_mask.long()


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


def _prefill(model, prompt: torch.Tensor, prompt_mask: torch.Tensor, num_beams: int):
    """Run the prompt once and copy its log-probs and cache to every beam (all beams share the prompt)."""
    log_probs, cache = _forward(model, prompt, prompt_mask, None)
    _reorder_cache(cache, torch.zeros(num_beams, dtype=torch.long, device=prompt.device))
    return log_probs.expand(num_beams, -1), cache


def _reorder_cache(cache, rows: torch.Tensor) -> None:
    """Make cache row i hold the past of beam `rows[i]`."""
    if cache is None:
        return
    if not hasattr(cache, "reorder_cache"):
        raise TypeError(f"cannot reorder a KV cache of type {type(cache).__name__}; the model must return a "
                        "transformers Cache (e.g. DynamicCache) or None as past_key_values")
    cache.reorder_cache(rows)


# ------------------------------------------------------------------------------------------- one step

def _choose_tokens(log_probs, beam_scores, sequences, groups: list[GroupHypotheses], diversity_penalty: float,
                   eos_ids: tuple[int, ...], pad_token_id: int | None, prompt_len: int):
    """One step for all groups in order: (next token, source beam, running score) for every beam."""
    num_beams, group_size = log_probs.shape[0], groups[0].size
    tokens = torch.zeros(num_beams, dtype=torch.long, device=log_probs.device)
    rows = torch.zeros_like(tokens)
    scores = beam_scores.clone()
    for g, group in enumerate(groups):
        beams = slice(g * group_size, (g + 1) * group_size)
        if group.done:
            # a done group idles on pad tokens copied from its first beam, as in 4.x; later groups still see them
            tokens[beams], rows[beams], scores[beams] = pad_token_id, g * group_size, 0.0
            continue
        penalised = hamming_penalty(log_probs[beams], tokens[:g * group_size], diversity_penalty)
        kept = _beam_step(penalised + beam_scores[beams, None], sequences[beams], group, eos_ids, prompt_len)
        scores[beams] = torch.tensor([score for score, _, _ in kept], device=scores.device)
        tokens[beams] = torch.tensor([token for _, token, _ in kept], device=tokens.device)
        rows[beams] = torch.tensor([g * group_size + row for _, _, row in kept], device=rows.device)
    return tokens, rows, scores


def hamming_penalty(log_probs: torch.Tensor, earlier_tokens: torch.Tensor, diversity_penalty: float) -> torch.Tensor:
    """`log_probs` minus `diversity_penalty` × how often each token is among `earlier_tokens` (this step's picks)."""
    if earlier_tokens.numel() == 0:
        return log_probs
    vocab_size = log_probs.shape[-1]
    counts = torch.bincount(earlier_tokens, minlength=vocab_size)[:vocab_size]  # a pad id past the vocab is no token
    return log_probs - diversity_penalty * counts.to(log_probs.dtype)


def _beam_step(candidate_scores: torch.Tensor, group_sequences: torch.Tensor, group: GroupHypotheses,
               eos_ids: tuple[int, ...], prompt_len: int) -> list[tuple[float, int, int]]:
    """Ordinary beam search inside one group (4.4x `BeamSearchScorer.process`): the (score, token, row) kept."""
    group_size, vocab_size = candidate_scores.shape
    # twice the group (one more per extra eos id) so that group_size candidates remain after removing eos ones
    k = min(max(2, 1 + len(eos_ids)) * group_size, candidate_scores.numel())
    top_scores, top_indices = torch.topk(candidate_scores.flatten(), k)
    generated_len = group_sequences.shape[1] + 1 - prompt_len
    kept = []
    for rank, (score, index) in enumerate(zip(top_scores.tolist(), top_indices.tolist())):
        row, token = divmod(index, vocab_size)
        if token in eos_ids:
            if rank < group_size:  # 4.x finishes only eos candidates ranked inside the group's top group_size
                group.add(group_sequences[row], score, generated_len)
            continue
        kept.append((score, token, row))
        if len(kept) == group_size:
            break
    if len(kept) < group_size:
        raise ValueError(f"only {len(kept)} of the top {k} candidates are not eos {eos_ids}; a group of "
                         f"{group_size} beams needs a vocabulary with more non-eos tokens")
    group.done = group.done or group.is_done(top_scores[0].item(), generated_len)
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
    cuda_devices = [model.device] if model.device.type == "cuda" else []
    # a private RNG stream: reruns repeat exactly, and the caller's random state is left as it was
    with torch.random.fork_rng(devices=cuda_devices), torch.no_grad():
        torch.manual_seed(seed)
        # top_k=0: only temperature and top_p shape the distribution (generate's default top_k=50 would cut the tail)
        output = model.generate(**batch, do_sample=True, num_return_sequences=num_samples, top_k=0,
                                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                pad_token_id=_pad_id(tokenizer))
    texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [texts[i:i + num_samples] for i in range(0, len(texts), num_samples)]


def diverse_candidates(model, tokenizer, prompt: str, *, num_beams: int, num_beam_groups: int,
                       diversity_penalty: float, max_new_tokens: int) -> list[str]:
    """`num_beams` completions of one chat-formatted prompt from diverse beam search, best first."""
    input_ids = torch.tensor([chat_prompt(tokenizer, prompt)], device=model.device)
    eos_token_id = model.generation_config.eos_token_id
    sequences = diverse_beam_search(model, input_ids, num_beams=num_beams, num_beam_groups=num_beam_groups,
                                    diversity_penalty=diversity_penalty, max_new_tokens=max_new_tokens,
                                    eos_token_id=eos_token_id if eos_token_id is not None else tokenizer.eos_token_id,
                                    pad_token_id=_pad_id(tokenizer))
    return tokenizer.batch_decode(sequences[:, input_ids.shape[1]:], skip_special_tokens=True)
