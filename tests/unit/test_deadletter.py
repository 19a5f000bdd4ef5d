"""Dead-letter copies within the real service's limits, which the emulator does not enforce."""

import json

from consumerd.policy.deadletter import FOLDED, MAX_ATTRIBUTES, MAX_VALUE_BYTES, copy_attributes, copy_size, cut_utf8

OURS = {
    "consumerd_error": "ValueError: " + "é" * 2000,  # 4,000+ bytes of non-ASCII: cut by bytes, not characters
    "consumerd_outcome": "error",
    "consumerd_task": "t",
    "consumerd_original_message_id": "1",
    "consumerd_subscription": "projects/p/subscriptions/s",
    "consumerd_attempt": "5",
}


def test_every_value_fits_1024_bytes_on_a_character_boundary():
    copy = copy_attributes({"a": "b"}, OURS)
    error = copy["consumerd_error"]
    assert len(error.encode()) <= MAX_VALUE_BYTES and error.startswith("ValueError: é")
    assert len(error.encode()) >= MAX_VALUE_BYTES - 1  # as much as fits
    assert cut_utf8("x\ud800y") == "x?y"  # a lone surrogate cannot be published: replaced
    assert cut_utf8("short") == "short"


def test_an_original_with_too_many_attributes_keeps_100_and_folds_the_rest():
    original = {f"k{i:03}": f"v{i}" for i in range(150)}
    copy = copy_attributes(original, OURS)
    assert len(copy) == MAX_ATTRIBUTES
    assert all(key in copy for key in OURS)
    kept = [k for k in copy if k.startswith("k")]
    assert kept == [f"k{i:03}" for i in range(len(kept))]  # the first ones, in order
    folded = json.loads(copy[FOLDED])
    assert list(folded) == [f"k{i:03}" for i in range(len(kept), 150)]
    assert len(copy[FOLDED].encode()) <= MAX_VALUE_BYTES


def test_94_original_attributes_still_fit_without_folding():
    original = {f"k{i}": "v" for i in range(94)}
    copy = copy_attributes(original, OURS)
    assert len(copy) == 100 and FOLDED not in copy


def test_our_attributes_win_over_an_original_of_the_same_name():
    copy = copy_attributes({"consumerd_task": "spoofed", "x": "1"}, OURS)
    assert copy["consumerd_task"] == "t" and copy["x"] == "1"


def test_copy_size_counts_data_keys_and_values_in_bytes():
    assert copy_size(b"12345", {"é": "ab"}) == 5 + 2 + 2
