"""Whisper-style English text normalisation and corpus word error rate.

``normalize_english`` is transformers' ``EnglishTextNormalizer`` (lower-casing, brackets and fillers removed,
contractions and titles expanded, numbers written as digits, punctuation dropped). Its British -> American spelling
table normally comes from a hub file (``normalizer.json`` of the openai/whisper-* repos); transformers ships no copy
and no installed package here has one, so offline the table is the one found, in order, at
``$SPEECHTRIM_SPELLING_JSON``, in an installed ``openai-whisper`` (``whisper/normalizers/english.json``), or else
empty: then "colour" and "color" stay different words, which matters only when a reference and a transcript differ
in UK/US spelling.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

import jiwer

from speechtrim.assets.cache import package_file

logger = logging.getLogger(__name__)

SPELLING_ENV = "SPEECHTRIM_SPELLING_JSON"


@functools.lru_cache(maxsize=4)
def _spelling_table(env_path: str | None) -> dict[str, str]:
    if env_path:
        path = Path(env_path).expanduser()
        if not path.is_file():
            raise ValueError(f"${SPELLING_ENV} points to {path}, which does not exist; fix the path or unset it")
        return dict(json.loads(path.read_text(encoding="utf-8")))
    try:
        path = package_file("openai-whisper", "whisper/normalizers/english.json", "pip install openai-whisper")
    except FileNotFoundError:
        logger.info("no English spelling table found; normalising without British->American spelling mapping")
        return {}
    return dict(json.loads(path.read_text(encoding="utf-8")))


@functools.lru_cache(maxsize=4)
def _normalizer(env_path: str | None):
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    return EnglishTextNormalizer(_spelling_table(env_path))


def normalize_english(text: str) -> str:
    """Whisper's English normalisation: "Mr. Smith's 2nd, colour!" -> "mister smith is 2nd colour".

    Args:
        text: a transcript or reference.
    """
    if not isinstance(text, str):
        raise ValueError(f"normalize_english wants a str, got {type(text).__name__}; decode token ids first")
    return _normalizer(os.environ.get(SPELLING_ENV) or None)(text).strip()


def wer(references: list[str], hypotheses: list[str], normalize: bool = True) -> float:
    """Corpus word error rate: (substitutions + deletions + insertions) / reference words, over all pairs.

    A pair whose reference is empty (after normalisation) adds its hypothesis words as insertions.

    Args:
        references: ground-truth texts.
        hypotheses: system outputs, one per reference.
        normalize: apply ``normalize_english`` to both sides first.
    """
    if isinstance(references, str) or isinstance(hypotheses, str):
        raise ValueError("wer wants lists of strings; wrap a single text as [text]")
    if len(references) != len(hypotheses):
        raise ValueError(
            f"got {len(references)} references but {len(hypotheses)} hypotheses; pass one of each per clip"
        )
    if normalize:
        references = [normalize_english(text) for text in references]
        hypotheses = [normalize_english(text) for text in hypotheses]
    kept = [(ref, hyp) for ref, hyp in zip(references, hypotheses) if ref.split()]
    insertions = sum(len(hyp.split()) for ref, hyp in zip(references, hypotheses) if not ref.split())
    if not kept:
        raise ValueError("every reference is empty (after normalisation); WER needs at least one reference word")
    result = jiwer.process_words([ref for ref, _ in kept], [hyp for _, hyp in kept])
    words = result.hits + result.substitutions + result.deletions
    return (result.substitutions + result.deletions + result.insertions + insertions) / words


def wer_counts(references: list[str], hypotheses: list[str], normalize: bool = True) -> tuple[list[int], list[int]]:
    """Per pair: word edits (substitutions + deletions + insertions) and reference words, so that
    ``sum(edits) / sum(words)`` is ``wer(references, hypotheses)`` (a pair with an empty reference counts its
    hypothesis words as insertions against 0 words)."""
    if len(references) != len(hypotheses):
        raise ValueError(f"got {len(references)} references but {len(hypotheses)} hypotheses")
    edits, words = [], []
    for reference, hypothesis in zip(references, hypotheses):
        if normalize:
            reference, hypothesis = normalize_english(reference), normalize_english(hypothesis)
        if not reference.split():
            edits.append(len(hypothesis.split()))
            words.append(0)
            continue
        result = jiwer.process_words(reference, hypothesis)
        edits.append(result.substitutions + result.deletions + result.insertions)
        words.append(result.hits + result.substitutions + result.deletions)
    return edits, words
