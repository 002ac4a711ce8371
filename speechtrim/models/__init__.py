"""Model components that do not touch transformers internals (the speech LLM's trainable parts)."""

from speechtrim.models.vocab_projector import VocabProjector, ctc_greedy, ctc_loss

__all__ = ["VocabProjector", "ctc_greedy", "ctc_loss"]
