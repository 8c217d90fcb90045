"""BERTScore (Zhang et al., 2020) on all-MiniLM-L6-v2 token embeddings, for prompt similarity and ChatGen's dedup.

Each token is matched to its most similar token in the other text (cosine of contextual embeddings); precision
averages over the candidate's tokens, recall over the reference's. As in the `bert-score` package's defaults:
no idf weighting, no baseline rescaling, and [CLS]/[SEP] are never averaged over — but, as there, they stay
available as match targets (`match_special_tokens=False` drops them entirely). Padding never counts. Scores on
this encoder are not comparable with published BERTScores on roberta-large.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn


def greedy_match(candidate: torch.Tensor, reference: torch.Tensor, candidate_counts: torch.Tensor | None = None,
                 reference_counts: torch.Tensor | None = None) -> tuple[float, float, float]:
    """(precision, recall, F1) of greedy cosine matching between token embeddings (n_cand, d) and (n_ref, d).

    `*_counts` (bool per token, default all) marks the tokens averaged over; the others can still be matched.
    """
    candidate_counts = torch.ones(len(candidate), dtype=torch.bool) if candidate_counts is None else candidate_counts
    reference_counts = torch.ones(len(reference), dtype=torch.bool) if reference_counts is None else reference_counts
    if not candidate_counts.any() or not reference_counts.any():
        return 0.0, 0.0, 0.0  # nothing to match: an empty text shares no tokens with anything
    cosine = nn.functional.normalize(candidate.float(), dim=-1) @ nn.functional.normalize(reference.float(), dim=-1).T
    precision = cosine.max(dim=1).values[candidate_counts].mean().item()
    recall = cosine.max(dim=0).values[reference_counts].mean().item()
    return precision, recall, f1(precision, recall)


def f1(precision, recall):
    """Harmonic mean 2PR / (P + R), 0 where P + R = 0 (works on floats and arrays)."""
    total = np.asarray(precision + recall, dtype=np.float64)
    product = np.asarray(2 * precision * recall, dtype=np.float64)
    result = np.divide(product, total, out=np.zeros_like(total), where=total != 0)
    return float(result) if result.ndim == 0 else result


class BertScorer:
    """Loads the encoder once; `score` pairs candidates with references, `pairwise_f1` compares a list with itself."""

    def __init__(self, source: str | Path | None = None, num_layers: int | None = None, device: str = "cpu",
                 match_special_tokens: bool = True):
        from transformers import AutoModel, AutoTokenizer

        from ..device import place
        from ..models import minilm_path

        self.source = str(source or minilm_path())
        self.tokenizer = AutoTokenizer.from_pretrained(self.source)
        self.model = place(AutoModel.from_pretrained(self.source, dtype=torch.float32), device)
        depth = self.model.config.num_hidden_layers
        if num_layers is not None and not 1 <= num_layers <= depth:
            raise ValueError(f"num_layers={num_layers} but {self.source} has layers 1..{depth}; pick one of those")
        self.num_layers = num_layers or depth  # default: the last layer
        self.match_special_tokens = match_special_tokens

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per text: L2-normalised token embeddings (n, d) without padding, and which of them count (not special)."""
        embedded = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                                   return_special_tokens_mask=True, return_tensors="pt")
            special = batch.pop("special_tokens_mask").bool()
            hidden = self.model(**batch.to(self.model.device), output_hidden_states=True).hidden_states[self.num_layers]
            hidden = nn.functional.normalize(hidden.float(), dim=-1).cpu()
            for states, real, is_special in zip(hidden, batch["attention_mask"].bool().cpu(), special):
                keep = real if self.match_special_tokens else real & ~is_special
                embedded.append((states[keep], ~is_special[keep]))
        return embedded

    def score(self, candidates: Sequence[str], references: Sequence[str],
              batch_size: int = 64) -> dict[str, np.ndarray]:
        """BERTScore precision, recall and F1 of each candidate against the reference at the same index."""
        if len(candidates) != len(references):
            raise ValueError(f"got {len(candidates)} candidates for {len(references)} references; pair them one to one")
        pairs = [greedy_match(c, r, c_counts, r_counts) for (c, c_counts), (r, r_counts)
                 in zip(self.embed(candidates, batch_size), self.embed(references, batch_size))]
        columns = np.array(pairs, dtype=np.float64).reshape(-1, 3).T
        return dict(zip(("precision", "recall", "f1"), columns))

    def pairwise_f1(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """n × n BERTScore F1 between every two texts (symmetric; each text is embedded once)."""
        embedded = self.embed(texts, batch_size)
        padded = nn.utils.rnn.pad_sequence([e for e, _ in embedded], batch_first=True)  # (n, L, d)
        real = nn.utils.rnn.pad_sequence([torch.ones(len(e), dtype=torch.bool) for e, _ in embedded], batch_first=True)
        counts = nn.utils.rnn.pad_sequence([c for _, c in embedded], batch_first=True)  # padding → False
        num_counted = counts.sum(1).clamp(min=1)
        precision = torch.zeros(len(texts), len(texts))
        # rows in chunks so the (rows, n, L, L) cosine block stays around 64 MB
        rows = max(1, 2**24 // max(1, len(texts) * padded.shape[1] ** 2))
        for start in range(0, len(texts), rows):
            cosine = torch.einsum("ild,jmd->ijlm", padded[start:start + rows], padded)
            cosine = cosine.masked_fill(~real[None, :, None, :], -2.0)  # padding in the reference never wins a max
            best = cosine.max(-1).values * counts[start:start + rows, None, :]  # only counted candidate tokens add
            precision[start:start + rows] = best.sum(-1) / num_counted[start:start + rows, None]
        precision *= counts.any(1)[:, None] & counts.any(1)[None, :]  # an empty text scores 0 against everything
        # recall of i against j is the precision of j against i
        return f1(precision.numpy().astype(np.float64), precision.T.numpy().astype(np.float64))
