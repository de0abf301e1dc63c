"""BLEU-4, ROUGE-1/2/L and exact match against values computed by hand (the n-grams are listed in
each test), for Chinese and English, so a change of tokenisation, smoothing or scale fails here."""

import math

import pytest

from baichuan_finetune.evaluation.metrics import example_metrics, text_metrics, words


def test_chinese_scores_equal_the_hand_computed_values():
    prediction, reference = "北京是中国的首都", "中国的首都是北京"
    # ROUGE compares jieba words.
    assert words(prediction) == ["北京", "是", "中国", "的", "首都"]
    assert words(reference) == ["中国", "的", "首都", "是", "北京"]
    scores = example_metrics(prediction, reference)
    # BLEU-4 over characters, both 8 long (brevity penalty 1):
    # 1-grams 8/8; 2-grams 北京 中国 国的 的首 首都 = 5/7; 3-grams 中国的 国的首 的首都 = 3/6;
    # 4-grams 中国的首 国的首都 = 2/5.
    assert scores["bleu-4"] == pytest.approx(100 * (1 * 5 / 7 * 3 / 6 * 2 / 5) ** 0.25, abs=1e-3)
    assert scores["rouge-1"] == pytest.approx(100.0, abs=1e-3)  # the same five words
    # bigrams 北京是 是中国 中国的 的首都 vs 中国的 的首都 首都是 是北京: 2 of 4 each way.
    assert scores["rouge-2"] == pytest.approx(50.0, abs=1e-3)
    # longest common subsequence 中国 的 首都: 3 of 5 each way.
    assert scores["rouge-l"] == pytest.approx(60.0, abs=1e-3)
    assert scores["exact_match"] == 0.0


def test_short_chinese_answer_is_smoothed_and_penalised_for_brevity():
    # 4 characters against 7: 1-grams 苹 果 很 = 3/4, 2-grams 苹果 果很 = 2/3, 3-grams 苹果很 = 1/2,
    # 4-grams 0/1, which smoothing method 3 (NIST) counts as 1 / (2 * 1); brevity penalty exp(1 - 7/4).
    scores = example_metrics("苹果很甜", "这个苹果很好吃")
    expected = math.exp(1 - 7 / 4) * (3 / 4 * 2 / 3 * 1 / 2 * 1 / 2) ** 0.25
    assert scores["bleu-4"] == pytest.approx(100 * expected, abs=1e-3)


def test_english_scores_equal_the_hand_computed_values():
    prediction, reference = "the cat is on the mat", "the cat sat on the mat"
    assert words(prediction) == ["the", "cat", "is", "on", "the", "mat"]
    scores = example_metrics(prediction, reference)
    # ROUGE-1/2 count distinct n-grams (rouge_chinese, as LLaMA-Factory uses it): 1-grams
    # {the cat is on mat} vs {the cat sat on mat}: 4 of 5; 2-grams the-cat on-the the-mat: 3 of 5.
    assert scores["rouge-1"] == pytest.approx(80.0, abs=1e-3)
    assert scores["rouge-2"] == pytest.approx(60.0, abs=1e-3)
    # LCS the cat on the mat: 5 of 6 words each way.
    assert scores["rouge-l"] == pytest.approx(100 * 5 / 6, abs=1e-3)
    # BLEU over characters, 21 against 22 (brevity penalty exp(1 - 22/21)); only the n-grams touching
    # "is" differ from the reference's "sat": 1-grams 'i' misses: 20/21; 2-grams " i" "is" "s ": 17/20;
    # 3-grams "t i" " is" "is " "s o": 15/19; 4-grams "at i" "t is" " is " "is o" "s on": 13/18.
    expected = math.exp(1 - 22 / 21) * (20 / 21 * 17 / 20 * 15 / 19 * 13 / 18) ** 0.25
    assert scores["bleu-4"] == pytest.approx(100 * expected, abs=1e-3)


def test_exact_match_ignores_surrounding_white_space_and_empty_answers_score_zero():
    assert example_metrics(" 北京 \n", "北京")["exact_match"] == 100.0
    assert example_metrics("北京", "北京。")["exact_match"] == 0.0
    empty = example_metrics("", "北京")
    assert empty == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0, "exact_match": 0.0}


def test_text_metrics_gives_each_example_and_the_mean():
    result = text_metrics(["北京是中国的首都", "the cat is on the mat"], ["中国的首都是北京", "the cat is on the mat"])
    assert result["count"] == 2
    assert result["examples"][1] == {"bleu-4": 100.0, "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0,
                                     "exact_match": 100.0}
    assert result["mean"]["rouge-l"] == pytest.approx((60.0 + 100.0) / 2, abs=1e-3)
    assert result["mean"]["exact_match"] == 50.0
    assert text_metrics([], [])["mean"]["bleu-4"] is None
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        text_metrics(["a", "b"], ["a"])
