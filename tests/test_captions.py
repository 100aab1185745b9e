"""Open-Sora 1.2's prompt cleaning: minidit.text.captions against the official `text_preprocessing` (v1.2.0,
with ftfy and BeautifulSoup), whose outputs tests/reference/generate_captions.py stored. Strings: exact."""

import json

import pytest
from conftest import ROOT

from minidit.text.captions import clean_caption, clean_once

STORED = json.loads((ROOT / "tests" / "fixtures" / "captions.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("prompt", STORED["cleaned"])
def test_cleaning_equals_the_official(prompt):
    assert clean_caption(prompt) == STORED["cleaned"][prompt]


def test_the_second_pass_matters():
    """The official script cleans twice; once is not always the same (removed phrases leave punctuation that the
    second pass strips)."""
    changed = [p for p in STORED["cleaned"] if clean_once(p) != STORED["cleaned"][p]]
    assert changed, "no stored prompt tells one pass from two: add one"
