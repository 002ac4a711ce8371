"""``ctc_compress``: CTC compression of the audio embeddings before the LLM (Gaido et al., 2021), at a fixed ratio.

Gaido et al. average the runs of consecutive frames that a CTC head gives the same label (blank included), so the
output length follows the content. Here the pairs most likely to carry one label are merged first, as many as the
ratio asks per span: the probability that two adjacent tokens carry the same label under the head's posteriors,
sum_v p_t(v) p_t+1(v), is high inside a run of one token or of blanks and low across a label change, so at the
ratio where the runs are exhausted this is their compression, and the count stays a function of the length and
the ratio (what a serving engine needs). Needs a CTC head over the LLM's vocabulary (the embedded SpeechLM's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


from speechtrim.ops.merge import same_span_pairs
from speechtrim.ops.plan import Plan
from speechtrim.reducers.base import REDUCERS
from speechtrim.reducers.pre_llm import PreLLMReducer, merge_per_span
from speechtrim.reduction import LayerStep


@REDUCERS.register("ctc_compress")
@dataclass
class CTCCompress(PreLLMReducer):
    """Merge the adjacent audio tokens most likely to share a CTC label (plain means of each run)."""

    needs_ctc_head: ClassVar[bool] = True

    def plan(self, step: LayerStep) -> Plan:
        if step.audio_logits is None:
            raise ValueError(f"{self.name} needs CTC logits over the LLM's vocabulary: the model has no CTC head "
                             "(speechtrim's SpeechLM with projector='vocab', as the embedded model, has one)")
        probs = step.audio_logits.float().softmax(dim=-1)  # (B, T, K+1)
        same = (probs[:, :-1] * probs[:, 1:]).sum(dim=-1)  # (B, T-1): P(same label)
        same = same.masked_fill(~same_span_pairs(step.span_id), float("-inf"))
        return merge_per_span(same, step.span_id, step.ratio)


__all__ = ["CTCCompress"]
