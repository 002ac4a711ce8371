"""Joint CTC/LLM decoding: the LLM's beam hypotheses, the best by the LLM and the CTC head together.

Hybrid CTC/attention ASR systems score each hypothesis with both models; here the LLM proposes (beam search,
every finished beam returned) and the speech LLM's CTC head over the LLM vocabulary (``VocabProjector``) weighs in:
``(1 - w) * LLM log-prob per token + w * CTC log-likelihood per token``. The text is always one the LLM generated.
Used by ``SpeechLM.generate(..., ctc_weight=)``, the held-out evaluation of ``train-embedded`` and ``speechtrim
bench --beams N --ctc-weight W``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Decoding:
    """How transcripts are decoded.

    Args:
        num_beams: beams of the LLM's search (1: greedy).
        ctc_weight: > 0 chooses among the beams with the CTC head (needs ``num_beams`` >= 2 and a CTC head).
    """

    num_beams: int = 1
    ctc_weight: float = 0.0

    def __post_init__(self) -> None:
        check_decoding(self.num_beams, self.ctc_weight)

    @property
    def greedy(self) -> bool:
        """Whether this is plain greedy decoding."""
        return self.num_beams == 1

    def as_dict(self) -> dict[str, Any]:
        """``{"num_beams": N, "ctc_weight": w}``, as results record it."""
        return {"num_beams": self.num_beams, "ctc_weight": float(self.ctc_weight)}


def check_decoding(beams: int, ctc_weight: float) -> None:
    """Refuse (ValueError) decoding settings nothing can run: beams < 1, a CTC weight outside [0, 1], or a CTC
    weight without beams to choose among."""
    if not isinstance(beams, int) or isinstance(beams, bool) or beams < 1:
        raise ValueError(f"beams must be an int >= 1 (1: greedy), got {beams!r}")
    if not 0.0 <= ctc_weight <= 1.0:
        raise ValueError(f"the CTC weight must be in [0, 1] (0: the LLM alone), got {ctc_weight}")
    if ctc_weight > 0 and beams < 2:
        raise ValueError(f"a CTC weight ({ctc_weight}) chooses among beam hypotheses: use 2 or more beams, or "
                         "weight 0 for greedy decoding")


@torch.no_grad()
def rescored_generate(llm: nn.Module, tokenizer: Any, projector: nn.Module, inputs_embeds: torch.Tensor,
                      attention_mask: torch.Tensor, ctc_logits: torch.Tensor, ctc_lengths: torch.Tensor,
                      max_new_tokens: int, ctc_weight: float, **generate_kwargs: Any) -> list[str]:
    """Beam search with ``llm.generate`` and, per row, the beam with the best joint LLM + CTC score, as text.

    A hypothesis the head cannot spell (empty, or a token outside its vocabulary) loses to one it can; when it can
    spell none, the LLM's best beam is returned. The hypotheses are spelled as the head is trained
    (``ctc_token_ids``).

    Args:
        llm: the causal LM (any reducer attached to it applies to the search).
        tokenizer: its tokenizer.
        projector: the ``VocabProjector`` whose head made ``ctc_logits`` (its ``vocab_ids`` and ``blank``).
        inputs_embeds: (B, T, D) the prompts, left-padded.
        attention_mask: (B, T).
        ctc_logits: (B, T_ctc, K + 1) the CTC head's logits of each row's whole audio.
        ctc_lengths: (B,) valid CTC positions per row.
        max_new_tokens: most tokens generated per hypothesis.
        ctc_weight: w in (0, 1].
        generate_kwargs: passed to ``generate``; ``num_beams`` >= 2 required, no sampling.
    """
    from speechtrim.models.vocab_projector import ctc_log_likelihoods, ctc_token_ids

    beams = int(generate_kwargs.get("num_beams", 1))
    if beams < 2 or generate_kwargs.get("do_sample"):
        raise ValueError(f"ctc_weight > 0 rescores beam hypotheses: pass num_beams >= 2 (got {beams}) and no "
                         "sampling")
    if not 0.0 < ctc_weight <= 1.0:
        raise ValueError(f"ctc_weight must be in (0, 1] to rescore, got {ctc_weight}")
    generate_kwargs.update(num_return_sequences=beams, output_scores=True, return_dict_in_generate=True,
                           do_sample=False)
    if tokenizer.pad_token_id is not None:
        generate_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    output = llm.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                          **generate_kwargs)
    texts = [text.strip() for text in tokenizer.batch_decode(output.sequences, skip_special_tokens=True)]
    rows = inputs_embeds.shape[0]
    llm_scores = output.sequences_scores.float().view(rows, beams).cpu()  # per token (length_penalty 1)
    index = {int(token): position for position, token in enumerate(projector.vocab_ids.tolist())}

    def spelled(text: str) -> list[int] | None:
        ids = ctc_token_ids(tokenizer, text)
        return [index[i] for i in ids] if ids and all(i in index for i in ids) else None

    hypotheses = [[spelled(texts[row * beams + k]) for k in range(beams)] for row in range(rows)]
    ctc = ctc_log_likelihoods(ctc_logits.detach().float().cpu(), ctc_lengths.cpu(), hypotheses,
                              projector.blank)  # (rows, beams)
    joint = (1 - ctc_weight) * llm_scores + ctc_weight * ctc
    spellable = torch.isfinite(ctc).any(dim=1)
    best = torch.where(spellable, joint.argmax(dim=1), llm_scores.argmax(dim=1))
    return [texts[row * beams + int(best[row])] for row in range(rows)]


__all__ = ["Decoding", "check_decoding", "rescored_generate"]
