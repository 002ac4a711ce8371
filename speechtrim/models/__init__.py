"""speechtrim's own speech LLM (``SpeechLM``, built from a ``SpeechLMConfig``) and its trainable parts.

Nothing here reaches into transformers internals; that is :mod:`speechtrim.hf`'s job.
"""

from speechtrim.models.vocab_projector import VocabProjector, ctc_greedy, ctc_loss

__all__ = ["VocabProjector", "ctc_greedy", "ctc_loss"]
