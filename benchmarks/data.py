"""Real benchmark data, offline: text and labelled sets from the gensim wheel's ``test/test_data``; speech from
espeak-ng.

Sources (all read from the ``gensim`` wheel with :mod:`zipfile`; gensim is never installed or imported):

* :func:`eval_text` -- **evaluation** text: the English Wikipedia slice
  ``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`` (~100 articles), markup stripped to prose.
* :func:`calibration_text` -- **calibration** text: ``lee_background.cor``, 300 ABC news articles (Lee corpus).
  Different source from the evaluation text; ``tests/test_integration_bench.py`` checks they share no long line.
* :func:`lee50` (``lee.cor`` + ``similarities0-1.txt``), :func:`polarity` (``pang_lee_polarity.cor``),
  :func:`wordsim353` (``wordsim353.tsv``), :func:`simlex999` (``simlex999.txt``): labelled encoder sets.
* :func:`speech_set` (in :mod:`benchmarks.speech`, re-exported here): news sentences spoken by espeak-ng voices.

Everything is cached under ``$HF_COMPRESS_CACHE/data`` (default ``~/.cache/hf_compress/data``).
"""

from __future__ import annotations

import bz2
import functools
import html
import io
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hf_compress.evaluation import encode_plain, tokenizer_bos  # re-exported (one implementation)

GENSIM_SPECS = ("gensim==4.4.0", "gensim")  # pinned first (stable files), any version as fallback
TEST_DATA = "gensim/test/test_data/"
WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def cache_dir() -> Path:
    """``$HF_COMPRESS_CACHE/data`` or ``~/.cache/hf_compress/data`` (created)."""
    root = Path(os.environ.get("HF_COMPRESS_CACHE") or Path.home() / ".cache" / "hf_compress")
    path = root / "data"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@functools.lru_cache(maxsize=1)
def gensim_wheel() -> Path:
    """Path of the cached gensim wheel, downloaded once with ``pip download --no-deps``."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(exist_ok=True)
    found = sorted(wheels.glob("gensim-*.whl"))
    if found:
        return found[-1]
    errors = []
    for spec in GENSIM_SPECS:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                               "-q", "-d", str(wheels), spec], capture_output=True, text=True)
        found = sorted(wheels.glob("gensim-*.whl"))
        if found:
            return found[-1]
        errors.append(f"{spec}: {proc.stderr.strip()[-400:]}")
    raise RuntimeError("benchmarks.data: could not download the gensim wheel (needs PyPI access once; or put a "
                       f"gensim-*.whl into {wheels}).\n" + "\n".join(errors))


def gensim_file(name: str) -> bytes:
    """Raw bytes of ``gensim/test/test_data/<name>`` read from the wheel."""
    with zipfile.ZipFile(gensim_wheel()) as zf:
        try:
            return zf.read(TEST_DATA + name)
        except KeyError:
            raise FileNotFoundError(f"benchmarks.data: {name!r} is not in {gensim_wheel().name}") from None


def gensim_text(name: str) -> str:
    """``gensim/test/test_data/<name>`` decoded as UTF-8, or as cp1252 where it is not UTF-8 (``lee.cor``)."""
    raw = gensim_file(name)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252")


def _cached(name: str, build: Any) -> str:
    path = cache_dir() / name
    if not path.exists():
        _write_atomic(path, build().encode("utf-8"))
    return path.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------- Wikipedia markup
_SKIP_SECTIONS = re.compile(r"^(see also|references|notes|footnotes|external links|further reading|bibliography|"
                            r"sources|citations|works cited|notes and references|primary sources|secondary sources)$",
                            re.I)
_DROP_LINK_NS = ("file:", "image:", "category:", "media:")


def _remove_nested(text: str, open_: str, close: str) -> str:
    """Remove every (possibly nested) ``open_ ... close`` span."""
    out, depth, i, start = [], 0, 0, 0
    n, lo, lc = len(text), len(open_), len(close)
    while i < n:
        if text.startswith(open_, i):
            if depth == 0:
                out.append(text[start:i])
            depth += 1
            i += lo
        elif depth and text.startswith(close, i):
            depth -= 1
            i += lc
            if depth == 0:
                start = i
        else:
            i += 1
    if depth == 0:
        out.append(text[start:])
    return "".join(out)


def _link(match: re.Match) -> str:
    target, _, label = match.group(1).partition("|")
    if target.strip().lower().startswith(_DROP_LINK_NS):
        return ""
    if not label and ":" in target:  # interwiki / interlanguage link without a label
        return ""
    return (label.split("|")[-1] if label else target).strip()


def strip_wiki_markup(wikitext: str) -> str:
    """Plain prose paragraphs of one article: drops templates, tables, refs, comments, headings, lists, files,
    categories and the reference-like sections; ``[[a|b]]`` -> ``b``, ``[url label]`` -> ``label``."""
    t = html.unescape(wikitext)
    t = re.sub(r"<!--.*?-->", "", t, flags=re.S)
    t = re.sub(r"<ref[^>/]*/>", "", t)
    t = re.sub(r"<ref[^>]*>.*?</ref>", "", t, flags=re.S)
    t = re.sub(r"<(math|gallery|timeline|code|pre|syntaxhighlight|score|chem|imagemap)[^>]*>.*?</\1>", "", t,
               flags=re.S | re.I)
    t = _remove_nested(t, "{{", "}}")
    t = _remove_nested(t, "{|", "|}")
    for _ in range(4):  # innermost links first, so captions with links inside file links resolve
        t = re.sub(r"\[\[([^\[\]]*)\]\]", _link, t)
    t = re.sub(r"\[\[|\]\]", "", t)
    t = re.sub(r"\[(?:https?:)?//[^\s\]]+\s*([^\]]*)\]", r"\1", t)
    t = re.sub(r"<[^>]+>", "", t)
    t = re.sub(r"'{2,}", "", t)
    t = re.sub(r"__[A-Z]+__", "", t)
    paragraphs, skipping = [], False
    for line in t.split("\n"):
        s = line.strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1", s)
        if heading:
            skipping = bool(_SKIP_SECTIONS.match(heading.group(2)))
            continue
        if skipping or not s or s[0] in "*#:;|!{}=" or s.lower().startswith("#redirect"):
            continue
        s = re.sub(r"\(\s*[,;]?\s*\)", "", s)  # "( )" left behind by removed templates
        s = re.sub(r"\s+([,.;:])", r"\1", s)
        s = re.sub(r"\s{2,}", " ", s).strip()
        if len(s.split()) >= 8 and s[-1] in ".!?\"'":
            paragraphs.append(s)
    return "\n".join(paragraphs)


def wiki_articles() -> list[tuple[str, str]]:
    """``(title, prose)`` of every main-namespace, non-redirect article of the Wikipedia slice with prose left."""
    raw = bz2.decompress(gensim_file(WIKI_FILE))
    out = []
    for _, elem in ET.iterparse(io.BytesIO(raw)):
        if elem.tag.rsplit("}", 1)[-1] != "page":
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: child for child in elem.iter()}
        ns, text = fields.get("ns"), fields.get("text")
        if ns is not None and ns.text == "0" and text is not None and text.text and "redirect" not in fields:
            prose = strip_wiki_markup(text.text)
            if prose:
                out.append((fields["title"].text or "", prose))
        elem.clear()
    return out


def eval_text() -> str:
    """Evaluation text (perplexity): Wikipedia prose, articles separated by blank lines (~2.6 MB)."""
    return _cached("enwiki_prose.txt", lambda: "\n\n".join(prose for _, prose in wiki_articles()) + "\n")


def calibration_text() -> str:
    """Calibration text: the 300 ABC news articles of ``lee_background.cor``, one article per line (~360 KB)."""
    return _cached("lee_background.txt", lambda: gensim_text("lee_background.cor").strip() + "\n")


def calibration_batches(tokenizer: Any, n_samples: int = 32, seq_len: int = 256, seed: int = 0) -> list[torch.Tensor]:
    """``n_samples`` windows ``[1, seq_len]`` (int64) drawn at seeded random offsets from :func:`calibration_text`.

    If the tokenizer prepends BOS by default, each window is BOS + ``seq_len - 1`` text tokens. Deterministic.
    """
    if n_samples < 1 or seq_len < 2:
        raise ValueError(f"calibration_batches: need n_samples >= 1 and seq_len >= 2, got {n_samples}, {seq_len}")
    bos = tokenizer_bos(tokenizer)
    body = seq_len - (bos is not None)
    ids = torch.tensor(encode_plain(tokenizer, calibration_text()), dtype=torch.long)
    if ids.numel() <= body:
        raise ValueError(f"calibration_batches: calibration text has {ids.numel()} tokens, "
                         f"fewer than seq_len={seq_len}")
    starts = np.random.default_rng(seed).integers(0, ids.numel() - body, size=n_samples)
    out = []
    for s in starts.tolist():
        window = ids[s:s + body]
        if bos is not None:
            window = torch.cat([torch.tensor([bos]), window])
        out.append(window.unsqueeze(0))
    return out


# ---------------------------------------------------------------------------------------------- labelled sets
def lee50() -> tuple[list[str], np.ndarray]:
    """Lee50: 50 news documents and the symmetric 50x50 human similarity matrix (float64, diagonal 1)."""
    docs = [d.strip() for d in gensim_text("lee.cor").splitlines() if d.strip()]
    rows = [[float(x) for x in line.split()] for line in gensim_text("similarities0-1.txt").splitlines()
            if line.strip()]
    upper = np.triu(np.asarray(rows, dtype=np.float64))
    sim = upper + np.triu(upper, 1).T
    if len(docs) != 50 or sim.shape != (50, 50):
        raise ValueError(f"lee50: expected 50 docs and a 50x50 matrix, got {len(docs)} and {sim.shape}")
    return docs, sim


def polarity() -> tuple[list[str], np.ndarray]:
    """Pang & Lee sentence polarity sample: 200 lowercased movie-review sentences, labels int64 (1 = positive)."""
    sents, labels = [], []
    for line in gensim_text("pang_lee_polarity.cor").splitlines():
        label, _, text = line.strip().partition(" ")
        if label in ("__label__pos", "__label__neg"):
            sents.append(text.strip())
            labels.append(int(label == "__label__pos"))
    return sents, np.asarray(labels, dtype=np.int64)


def _word_pairs(name: str) -> list[tuple[str, str, float]]:
    out = []
    for line in gensim_text(name).splitlines():
        parts = line.strip().split("\t")
        if line.startswith("#") or len(parts) < 3:
            continue
        out.append((parts[0], parts[1], float(parts[2])))
    return out


def wordsim353() -> list[tuple[str, str, float]]:
    """WordSim353: 353 ``(word1, word2, human score 0-10)``."""
    return _word_pairs("wordsim353.tsv")


def simlex999() -> list[tuple[str, str, float]]:
    """SimLex-999: 999 ``(word1, word2, human score 0-10)``."""
    return _word_pairs("simlex999.txt")


from .speech import Utterance, load_audio, news_sentences, speech_set  # noqa: E402  (re-exported)

__all__ = ["Utterance", "cache_dir", "calibration_batches", "calibration_text", "encode_plain", "eval_text",
           "gensim_file", "gensim_text", "lee50", "load_audio", "news_sentences", "polarity", "simlex999", "speech_set",
           "strip_wiki_markup", "tokenizer_bos", "wordsim353"]


def speech_calibration_batches(processor: Any, utterances: list[Any], seq_len: int,
                               start_only: bool = False) -> list[dict[str, torch.Tensor]]:
    """Whisper calibration batches from speech *train* utterances: one ``{"input_features": [1, mels, 3000],
    "decoder_input_ids": [1, <= seq_len]}`` (the reference transcript) per utterance. ``start_only``: the decoder
    gets only ``<|startoftranscript|>`` ``[1, 1]`` (enough to calibrate the encoder)."""
    from . import speech

    start = torch.tensor([[processor.tokenizer.convert_tokens_to_ids("<|startoftranscript|>")]])
    out = []
    for u in utterances:
        feats = processor.feature_extractor(speech.load_audio(u.path), sampling_rate=16000, return_tensors="pt")
        ids = start if start_only else processor.tokenizer(u.text, return_tensors="pt")["input_ids"][:, :seq_len]
        out.append({"input_features": feats.input_features, "decoder_input_ids": ids})
    return out
