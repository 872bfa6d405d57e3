"""Offline sentiment loaders read the real files shipped in the vaderSentiment sdist."""

import pytest

from peft_fish_ird.offline_data import load_hutto, split


@pytest.fixture(scope="module")
def movie():
    return load_hutto("movie")


def test_movie_sentences_are_the_pang_lee_set_without_neutral_rows(movie):
    assert len(movie) == 10568  # 10,605 rated sentences minus 37 with valence exactly 0
    assert 0.45 < sum(r.label for r in movie) / len(movie) < 0.55
    assert movie[0].text.startswith("The Rock is destined")
    assert movie[0].label == 1


def test_tweets_load_with_binary_labels():
    tweets = load_hutto("tweets")
    assert len(tweets) > 4000 and {r.label for r in tweets} == {0, 1}


def test_splits_are_disjoint_and_seeded(movie):
    a = split(movie, {"train": 100, "selection": 50, "test": 50}, seed=1)
    b = split(movie, {"train": 100, "selection": 50, "test": 50}, seed=1)
    assert a == b
    texts = [set(r.text for r in a[k]) for k in a]
    assert not (texts[0] & texts[2]) and not (texts[1] & texts[2])


def test_unknown_set_and_oversized_split_are_refused(movie):
    with pytest.raises(ValueError, match="choose one of"):
        load_hutto("books")
    with pytest.raises(ValueError, match="has"):
        split(movie, {"train": 10**6})
