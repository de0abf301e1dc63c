"""Text metrics of generated answers against references: BLEU-4, ROUGE-1/2/L and exact match.

Computed as LLaMA-Factory's ``do_predict`` (and ChatGLM's p-tuning before it) computes them, so the
figures compare with theirs:

- BLEU-4: nltk's ``sentence_bleu`` over **characters** (a Chinese character is roughly a word, and no
  segmenter's choices enter the score), uniform 1-4-gram weights, ``SmoothingFunction().method3``
  (NIST geometric smoothing, so a short answer missing 4-grams is not scored 0);
- ROUGE-1/2/L: ``rouge_chinese.Rouge`` F-scores over **jieba words** (English splits into words,
  Chinese into dictionary words). As in ``rouge_chinese`` (and LLaMA-Factory), ROUGE-1/2 count
  distinct n-grams; ROUGE-L is the longest common subsequence of the whole texts;
- exact match: the texts equal after stripping surrounding white space.

Every score is in 0..100 (x100), per example and as the mean over examples. An empty prediction or
reference (nothing but white space) scores 0 for ROUGE, as in LLaMA-Factory; exact match still holds
when both are empty.
"""

from __future__ import annotations

import logging
from typing import Sequence

METRIC_NAMES = ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "exact_match")
# Digits kept per score (LLaMA-Factory rounds to 4 as well): stable JSON, no float noise in diffs.
DIGITS = 4


def _jieba():
    import jieba

    # jieba logs "Building prefix dict..." on first use: nothing a user of predict needs to read.
    jieba.setLogLevel(logging.CRITICAL)
    return jieba


def words(text: str) -> list[str]:
    """The jieba words of ``text`` that ROUGE compares (white space dropped)."""
    return [w for w in _jieba().cut(text) if w.strip()]


def bleu4(prediction: str, reference: str) -> float:
    """Sentence BLEU-4 over characters with smoothing method 3, x100 (0 for an empty side)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    if not prediction or not reference:
        return 0.0
    return 100.0 * sentence_bleu([list(reference)], list(prediction),
                                 smoothing_function=SmoothingFunction().method3)


def rouge(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F-scores over jieba words, x100 (all 0 when either side has no word)."""
    hypothesis, target = words(prediction), words(reference)
    if not hypothesis or not target:
        return {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    from rouge_chinese import Rouge

    scores = Rouge().get_scores(" ".join(hypothesis), " ".join(target))[0]
    return {name: 100.0 * scores[name]["f"] for name in ("rouge-1", "rouge-2", "rouge-l")}


def example_metrics(prediction: str, reference: str) -> dict[str, float]:
    """BLEU-4, ROUGE-1/2/L and exact match of one prediction, each 0..100."""
    scores = {"bleu-4": bleu4(prediction, reference), **rouge(prediction, reference),
              "exact_match": 100.0 if prediction.strip() == reference.strip() else 0.0}
    return {name: round(scores[name], DIGITS) for name in METRIC_NAMES}


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Per-example and mean BLEU-4, ROUGE-1/2/L and exact match (0..100) of paired texts.

    Returns ``{"count": n, "mean": {metric: value}, "examples": [{metric: value}, ...]}``, the examples
    in the order given; with no pairs the means are None (there is nothing to average).
    """
    if len(predictions) != len(references):
        raise ValueError(f"text_metrics: {len(predictions)} predictions but {len(references)} references")
    examples = [example_metrics(p, r) for p, r in zip(predictions, references)]
    mean = {name: (round(sum(e[name] for e in examples) / len(examples), DIGITS) if examples else None)
            for name in METRIC_NAMES}
    return {"count": len(examples), "mean": mean, "examples": examples}
