"""The caption cleaning that DeepFloyd IF introduced and Open-Sora 1.2 applies to every prompt before T5.

Open-Sora's inference script runs `text_preprocessing` on each prompt (after adding its aesthetic-score suffix),
which is this cleaning applied twice. It lower-cases, removes URLs, HTML, handles and CJK characters, unifies
dashes and quotes, drops ids, file names and shop phrases, and tidies punctuation and spaces. T5's vocabulary is
case-sensitive, so for ordinary prompts the lower-casing is what changes the model's input most.

Two steps of the original use libraries that minidit does without:
- BeautifulSoup's text extraction: here tags are removed with a pattern and entities are unescaped (the same for
  well-formed HTML; malformed HTML can differ);
- ftfy's repair of mis-decoded text (mojibake): not applied, prompts are taken to be correct Unicode.
The steps are the original's, in its order; tests/test_captions.py compares the result with the original
function on prompts that exercise each step.
"""

import html
import re
import urllib.parse

_CJK = "\u31c0-\u31ef\u31f0-\u31ff\u3200-\u32ff\u3300-\u33ff\u3400-\u4dbf\u4dc0-\u4dff\u4e00-\u9fff"
_DASHES = ("\u002d\u058a\u05be\u1400\u1806\u2010-\u2015\u2e17\u2e1a\u2e3a\u2e3b\u2e40\u301c\u3030\u30a0"
           "\ufe31\ufe32\ufe58\ufe63\uff0d")
_URL = r"[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)"
_FILE_TYPES = "png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4"

# (pattern, replacement), applied in order after lower-casing; the comment says what each one removes
_BEFORE_HTML = [
    (r"<person>", "person"),
    (rf"\b((?:https?:(?:\/{{1,3}}|[a-zA-Z0-9%])|{_URL}))", ""),  # URLs
    (rf"\b((?:www:(?:\/{{1,3}}|[a-zA-Z0-9%])|{_URL}))", ""),
]
_AFTER_HTML = [
    (r"@[\w\d]+\b", ""),  # @handles
    (rf"[{_CJK}]+", ""),  # CJK strokes, letters and ideographs
    (rf"[{_DASHES}]+", "-"),  # every kind of dash
    (r"[`´«»“”¨]", '"'),  # quotes
    (r"[‘’]", "'"),
    (r"&quot;?", ""),  # leftover entities
    (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IP addresses
    (r"\d:\d\d\s+$", ""),  # article ids
    (r"\\n", " "),  # a literal backslash-n
    (r"#\d{1,3}\b", ""),  # #123
    (r"#\d{5,}\b", ""),  # #12345...
    (r"\b\d{6,}\b", ""),  # 123456...
    (rf"[\S]+\.(?:{_FILE_TYPES})", ""),  # file names
    (r"[\"\']{2,}", '"'),  # runs of quotes
    (r"[\.]{2,}", " "),  # runs of dots
    (r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\\/\*]{1,}", " "),  # stray punctuation
    (r"\s+\.\s+", " "),  # a lone dot
]
_AFTER_CLEAN = [
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""),  # product codes: jc6640
    (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""),  # jc6640vc
    (r"\b\d+[a-zA-Z]+\d+\b", ""),  # 6640vc231
    (r"(worldwide\s+)?(free\s+)?shipping", ""),  # shop phrases
    (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""),
    (rf"\b(?:{_FILE_TYPES})(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),  # j2d1a2a...
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),  # dimensions: 1920x1080
    (r"\b\s+\:\s+", ": "),  # spaces around colons
    (r"(\D[,\./])\b", r"\1 "),  # a space after punctuation that touches a word
    (r"\s+", " "),
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"),  # enclosing quotes
    (r"^[\'\_,\-\:;]", ""),  # leading and trailing punctuation
    (r"[\'\_,\-\:\-\+]$", ""),
    (r"^\.\S+$", ""),
]


def _apply(rules: list[tuple[str, str]], text: str) -> str:
    for pattern, replacement in rules:
        text = re.sub(pattern, replacement, text)
    return text


def _unescape(text: str) -> str:
    return html.unescape(html.unescape(text)).strip()


def clean_once(caption: str) -> str:
    text = urllib.parse.unquote_plus(str(caption)).strip().lower()
    text = _apply(_BEFORE_HTML, text)
    text = html.unescape(re.sub(r"<[^<>]*>", "", text))  # the text of the HTML, as BeautifulSoup gives it
    text = _apply(_AFTER_HTML, text)
    if len(re.findall(r"[-_]", text)) > 3:  # this-is-my-cute-cat, this_is_my_cute_cat
        text = re.sub(r"[-_]", " ", text)
    text = _apply(_AFTER_CLEAN, _unescape(text))
    return text.strip()


def clean_caption(caption: str) -> str:
    """Open-Sora's `text_preprocessing`: the cleaning, twice."""
    return clean_once(clean_once(caption))
