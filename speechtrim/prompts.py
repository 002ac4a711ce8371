"""Instruction prompts of the embedded speech LLM's tasks; ``<audio>`` marks where the audio embeddings go."""

from __future__ import annotations

from collections.abc import Sequence

ASR_PROMPT = "Transcribe the audio into text.\n<audio>"

# Bellver-Soler et al. (2025), Annex B, adapted to a chat template: the user turn holds the transcription, the audio
# and the candidate emotions; the assistant turn starts with the answer's prefix. ``<audio_summary>`` asks for the
# embedded model's utterance summary (how it is said); every other model drops it, leaving the paper's text.
EMOTION_PROMPT = (
    "Transcription: {transcription}\nAudio: <audio><audio_summary>\nWhat is the emotion of the speaker?\n"
    "The possible emotions are: {emotions}.\n"
)
EMOTION_ANSWER_PREFIX = "The emotion of the audio is:"


def emotion_prompt(transcription: str | None, emotions: Sequence[str]) -> str:
    """The Annex B prompt for one clip (an empty transcription when none is known)."""
    return EMOTION_PROMPT.format(transcription=transcription or "", emotions=", ".join(emotions))
