"""A projector whose outputs live in the LLM's input-embedding space, aligned to it by CTC over the LLM's vocabulary.

After LegoSLM (Ma et al., 2025): an MLP maps each pooled encoder frame to a vector h_t; its score for a token v is
h_t . E_v against the LLM's frozen (tied) input embeddings E, plus a learned blank, trained with CTC on the
transcript's LLM tokens. The LLM then receives the posterior-weighted mix of the embeddings,
    e_t = sum_v p_t(v) E_v + p_t(blank) b,
which sits on the embedding manifold the LLM was trained on, plus a low-rank "prosody" path from the frames
(zero at initialisation) that carries what the text does not (speaking rate, pitch, loudness: the emotion task).
One output per input frame: the audio span keeps its length, which the token reducers need. An optional context
(``context_layers`` > 0: a few narrow pre-norm Transformer layers over the clip's h_t, padding masked out, added
back to h_t through a projection that starts at zero) lets each position see its neighbours before it is scored,
as the BiLSTM or Transformer heads of frozen-feature ASR do (SUPERB); at initialisation it is the frame-wise MLP
exactly, and 0 is the MLP alone.

An optional ``UtteranceSummary`` (``summary_tokens`` > 0) adds a few vectors for the whole utterance, built from
statistics of all its frames (mean, spread, frame-to-frame change, length) and mixed from the LLM's embeddings like
the per-frame outputs: how it is said rather than what. They go where a prompt asks for them (``<audio_summary>``,
after the audio), outside the audio span, so the token reducers never remove them, and they leave the per-frame
path, which carries the words, untouched.

The vocabulary is the LLM token ids that occur in the training transcripts (``vocab_ids``), saved with the weights.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn


class VocabProjector(nn.Module):
    """Frames (B, T, D_in) -> LLM-space embeddings (B, T, D_llm), with CTC logits over ``vocab_ids`` + blank.

    Args:
        input_dim: width of a pooled encoder frame.
        llm_dim: the LLM's embedding width.
        vocab_ids: the LLM token ids the head can emit (K of them); the blank is index K.
        hidden: width of the MLP's hidden layer.
        prosody_rank: rank of the residual frame path (0: none).
        embedding_std: standard deviation of the LLM's token embeddings (initial scale of the blank vectors).
        summary_tokens: vectors of the utterance summary (0: none, ``summarize`` returns None).
        summary_hidden: width of the summary's frame features.
        context_layers: Transformer layers over the MLP's outputs before they are scored (0: none).
        context_heads: attention heads of each context layer (must divide ``context_width``).
        context_width: width of the context layers (projected from and back to ``llm_dim``).
    """

    def __init__(self, input_dim: int, llm_dim: int, vocab_ids: torch.Tensor | list[int], hidden: int = 1024,
                 prosody_rank: int = 64, embedding_std: float = 0.13, summary_tokens: int = 0,
                 summary_hidden: int = 256, context_layers: int = 0, context_heads: int = 4,
                 context_width: int = 256) -> None:
        super().__init__()
        vocab_ids = torch.as_tensor(vocab_ids, dtype=torch.long)
        if vocab_ids.ndim != 1 or len(vocab_ids) == 0 or len(torch.unique(vocab_ids)) != len(vocab_ids):
            raise ValueError(f"vocab_ids must be a non-empty 1-D list of distinct token ids, got {len(vocab_ids)}")
        if hidden < 1 or prosody_rank < 0:
            raise ValueError(f"need hidden >= 1 and prosody_rank >= 0, got {hidden} and {prosody_rank}")
        if not isinstance(summary_tokens, int) or summary_tokens < 0:
            raise ValueError(f"summary_tokens must be an int >= 0 (0: no utterance summary), got {summary_tokens!r}")
        if not isinstance(context_layers, int) or context_layers < 0:
            raise ValueError(f"context_layers must be an int >= 0 (0: frame-wise MLP only), got {context_layers!r}")
        if context_layers and (context_width < 1 or context_heads < 1 or context_width % context_heads):
            raise ValueError(f"context_heads must divide context_width, got {context_heads} and {context_width}")
        self.register_buffer("vocab_ids", vocab_ids)
        self.mlp = nn.Sequential(nn.Linear(input_dim, hidden), nn.GELU(), nn.Linear(hidden, llm_dim))
        self.context = None
        if context_layers:
            layer = nn.TransformerEncoderLayer(context_width, context_heads, dim_feedforward=2 * context_width,
                                               dropout=0.1, activation="gelu", batch_first=True, norm_first=True)
            self.context = nn.ModuleDict({
                "into": nn.Linear(llm_dim, context_width),
                "layers": nn.TransformerEncoder(layer, context_layers, enable_nested_tensor=False),
                "out": nn.Linear(context_width, llm_dim)})
            nn.init.zeros_(self.context["out"].weight)
            nn.init.zeros_(self.context["out"].bias)
        self.blank_key = nn.Parameter(torch.randn(llm_dim) * embedding_std)  # scores the blank
        self.blank_embedding = nn.Parameter(torch.randn(llm_dim) * embedding_std)  # what the LLM gets for it
        self.prosody = None
        if prosody_rank:
            self.prosody = nn.Sequential(nn.Linear(input_dim, prosody_rank, bias=False),
                                         nn.Linear(prosody_rank, llm_dim, bias=False))
            nn.init.zeros_(self.prosody[1].weight)
        self.summary = None
        if summary_tokens:
            self.add_summary(summary_tokens, summary_hidden)

    @property
    def blank(self) -> int:
        """Index of the blank in the logits' last axis."""
        return len(self.vocab_ids)

    def logits(self, frames: torch.Tensor, embeddings: torch.Tensor, mask: torch.Tensor | None = None
               ) -> torch.Tensor:
        """CTC logits (B, T, K + 1) of ``frames`` (B, T, D_in) against the LLM's ``embeddings`` (V, D_llm);
        ``mask`` (B, T) marks the valid frames (None: all), which is all the context layers attend to."""
        hidden = self.mlp(frames)  # (B, T, D_llm)
        if self.context is not None:
            padding = None if mask is None else ~mask.bool()
            seen = self.context["layers"](self.context["into"](hidden), src_key_padding_mask=padding)  # (B, T, W)
            hidden = hidden + self.context["out"](seen)  # (B, T, D_llm)
        keys = torch.cat([embeddings[self.vocab_ids].to(hidden.dtype), self.blank_key.unsqueeze(0)])  # (K+1, D)
        return hidden @ keys.T  # (B, T, K+1)

    def forward(self, frames: torch.Tensor, embeddings: torch.Tensor, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """LLM inputs (B, T, D_llm) and the CTC logits (B, T, K + 1) they were mixed from (``mask``: see
        ``logits``)."""
        logits = self.logits(frames, embeddings, mask)
        values = torch.cat([embeddings[self.vocab_ids].to(logits.dtype), self.blank_embedding.unsqueeze(0)])
        mixed = torch.softmax(logits, dim=-1) @ values  # (B, T, D_llm)
        if self.prosody is not None:
            mixed = mixed + self.prosody(frames)
        return mixed, logits

    def add_summary(self, tokens: int, hidden: int = 256) -> None:
        """Give the projector a freshly initialised ``UtteranceSummary`` of ``tokens`` vectors."""
        input_dim, llm_dim = self.mlp[0].in_features, self.mlp[-1].out_features
        self.summary = UtteranceSummary(input_dim, llm_dim, tokens, hidden)

    def summarize(self, frames: torch.Tensor, mask: torch.Tensor, embeddings: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The utterance summary (B, n, D_llm) of ``frames`` (B, T, D_in) with ``mask`` (B, T) and its logits over
        the LLM's vocabulary (B, n, V), or None without a summary."""
        return None if self.summary is None else self.summary(frames, mask, embeddings)


class UtteranceSummary(nn.Module):
    """A few "words" about a whole utterance, how it is said: statistics pooling over its frames, an MLP, and, as
    the per-frame path does for what is said, a posterior-weighted mix of the LLM's own token embeddings.

    Per frame a small feature h_t; over the valid frames their mean, standard deviation and mean absolute change
    from one frame to the next (a speaking-rate cue), and the log of the frame count; an MLP maps these to
    ``tokens`` query vectors q_i, whose scores against the LLM's (tied) input embeddings E, l_i = q_i . E_v, give
    the vectors the LLM reads, e_i = softmax(l_i) . E: on the embedding manifold the LLM knows, so the summary can
    name a word ("angry", "slow"); the LLM still has to be taught to read it (LoRA). Trained by cross-entropy of
    l_0 against a word the training data names for the clip (its emotion label), and by the LM loss.

    Args:
        input_dim: width of a (pooled) encoder frame.
        llm_dim: the LLM's embedding width.
        tokens: vectors produced.
        hidden: width of the per-frame feature.
    """

    def __init__(self, input_dim: int, llm_dim: int, tokens: int = 1, hidden: int = 256) -> None:
        super().__init__()
        if tokens < 1 or hidden < 1:
            raise ValueError(f"need tokens >= 1 and hidden >= 1, got {tokens} and {hidden}")
        self.tokens, self.llm_dim = tokens, llm_dim
        self.frame = nn.Sequential(nn.LayerNorm(input_dim), nn.Linear(input_dim, hidden), nn.GELU())
        self.out = nn.Sequential(nn.Linear(3 * hidden + 1, 2 * hidden), nn.GELU(),
                                 nn.Linear(2 * hidden, tokens * llm_dim))
        self.stats_norm = nn.LayerNorm(3 * hidden + 1)

    def logits(self, frames: torch.Tensor, mask: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """Scores (B, tokens, V) of every LLM token for each summary vector; (B, T, D_in) frames, (B, T) mask,
        (V, D_llm) embeddings."""
        features = self.frame(frames)  # (B, T, H)
        weight = mask.unsqueeze(-1).to(features.dtype)  # (B, T, 1)
        count = weight.sum(dim=1).clamp(min=1.0)  # (B, 1)
        mean = (features * weight).sum(dim=1) / count  # (B, H)
        spread = (((features - mean.unsqueeze(1)) ** 2 * weight).sum(dim=1) / count + 1e-5).sqrt()  # (B, H)
        pairs = weight[:, 1:] * weight[:, :-1]  # (B, T-1, 1): both frames valid
        change = ((features[:, 1:] - features[:, :-1]).abs() * pairs).sum(dim=1) / pairs.sum(dim=1).clamp(min=1.0)
        stats = self.stats_norm(torch.cat([mean, spread, change, count.log()], dim=-1))  # (B, 3H + 1)
        queries = self.out(stats).reshape(len(frames), self.tokens, self.llm_dim)  # (B, tokens, D_llm)
        return queries @ embeddings.to(queries.dtype).T  # (B, tokens, V)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor, embeddings: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The summary vectors (B, tokens, D_llm) and their logits (B, tokens, V)."""
        logits = self.logits(frames, mask, embeddings)
        return torch.softmax(logits, dim=-1) @ embeddings.to(logits.dtype), logits


def ctc_text(sentence: str) -> str:
    """What the CTC head spells: lower case, words and apostrophes only, single spaces."""
    return " ".join(re.sub(r"[^a-z' ]+", " ", sentence.lower()).split())


def ctc_token_ids(tokenizer: Any, sentence: str) -> list[int]:
    """LLM token ids of ``ctc_text(sentence)``, every word in its space-led form."""
    return tokenizer(" " + ctc_text(sentence), add_special_tokens=False).input_ids


def ctc_loss(logits: torch.Tensor, lengths: torch.Tensor, targets: list[torch.Tensor], blank: int) -> torch.Tensor:
    """Mean CTC loss per target token.

    Args:
        logits: (B, T, K + 1) from ``VocabProjector.logits``.
        lengths: (B,) valid frames per row.
        targets: per row, the transcript as indices into the projector's vocabulary (not LLM ids).
        blank: the blank index.
    """
    log_probs = torch.log_softmax(logits.float(), dim=-1).transpose(0, 1)  # (T, B, K+1)
    target_lengths = torch.tensor([len(t) for t in targets])
    flat = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long)
    total = nn.functional.ctc_loss(log_probs, flat, lengths.cpu(), target_lengths, blank=blank, reduction="sum",
                                   zero_infinity=True)
    return total / max(1, int(target_lengths.sum()))


def ctc_greedy(logits: torch.Tensor, lengths: torch.Tensor, vocab_ids: torch.Tensor, blank: int) -> list[list[int]]:
    """Best-path decoding: per row, the LLM token ids left after merging repeats and dropping blanks."""
    best = logits.argmax(dim=-1)  # (B, T)
    decoded = []
    for row, length in zip(best, lengths.tolist()):
        path = row[:length]
        keep = torch.ones_like(path, dtype=torch.bool)
        keep[1:] = path[1:] != path[:-1]
        tokens = path[keep & (path != blank)]
        decoded.append(vocab_ids[tokens].tolist())
    return decoded


@torch.no_grad()
def ctc_log_likelihoods(logits: torch.Tensor, lengths: torch.Tensor, hypotheses: list[list[list[int] | None]],
                        blank: int) -> torch.Tensor:
    """log p(hypothesis | audio) under the CTC head per target token, for several hypotheses per clip.

    Args:
        logits: (B, T, K + 1) CTC logits.
        lengths: (B,) valid positions per row.
        hypotheses: per row, N hypotheses as indices into the head's vocabulary; None (a token the head cannot
            emit) or an empty list scores -inf.
        blank: the blank index.
    Returns:
        (B, N) the summed CTC log-likelihood of each hypothesis divided by its length (-inf where it cannot be
        emitted, also when it needs more positions than the clip has).
    """
    rows = len(hypotheses)
    width = max((len(row) for row in hypotheses), default=0)
    scores = torch.full((rows, width), -math.inf)
    pairs = [(row, index, target) for row, candidates in enumerate(hypotheses)
             for index, target in enumerate(candidates) if target]
    if not pairs:
        return scores
    which = torch.tensor([row for row, _, _ in pairs])  # (P,) the clip of each scored hypothesis
    log_probs = torch.log_softmax(logits.float(), dim=-1)[which].transpose(0, 1)  # (T, P, K+1)
    target_lengths = torch.tensor([len(target) for _, _, target in pairs])  # (P,)
    nll = nn.functional.ctc_loss(log_probs, torch.tensor([t for _, _, target in pairs for t in target]),
                                 lengths.cpu()[which], target_lengths, blank=blank, reduction="none",
                                 zero_infinity=False)  # (P,), inf where a hypothesis cannot be emitted
    scores[which, torch.tensor([index for _, index, _ in pairs])] = -nll / target_lengths
    return scores
