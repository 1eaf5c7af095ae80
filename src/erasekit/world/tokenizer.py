"""Build the world's CLIP BPE tokenizer files (``vocab.json`` + ``merges.txt``).

The files follow OpenAI CLIP's byte-level BPE format exactly (256 byte symbols, the same with
``</w>``, learned merges, then ``<|startoftext|>``/``<|endoftext|>``), so
``transformers.CLIPTokenizer`` reads them unchanged. Merges are learned by plain BPE on the
world's word list until every world word is a single token; ties are broken
lexicographically, so the files are reproducible byte for byte.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import lru_cache
from pathlib import Path

from .vocab import all_words

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """Learn BPE merges until each word is a single symbol (deterministic)."""
    b2u = bytes_to_unicode()
    seqs = []
    for w in sorted(set(words)):
        sym = [b2u[b] for b in w.encode("utf-8")]
        sym[-1] = sym[-1] + "</w>"
        seqs.append(sym)
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for s in seqs:
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += 1
        if not pairs:
            return merges
        best = max(pairs.items(), key=lambda kv: (kv[1], tuple(-ord(c) for c in kv[0][0] + " " + kv[0][1])))[0]
        merges.append(best)
        joined = best[0] + best[1]
        for i, s in enumerate(seqs):
            out, j = [], 0
            while j < len(s):
                if j + 1 < len(s) and (s[j], s[j + 1]) == best:
                    out.append(joined)
                    j += 2
                else:
                    out.append(s[j])
                    j += 1
            seqs[i] = out


def build_vocab(words: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return the vocabulary (token -> id) and the ranked merges, for ``words`` (default: the
    shipped model's word list, ``all_words()``)."""
    b2u = bytes_to_unicode()
    base = list(b2u.values())
    tokens = base + [t + "</w>" for t in base]
    merges = learn_merges(all_words() if words is None else words)
    tokens += [a + b for a, b in merges]
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_tokenizer_files(folder: str | Path, words: list[str] | None = None) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` into ``folder``; returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab(words)
    vp, mp = folder / "vocab.json", folder / "merges.txt"
    vp.write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    mp.write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vp, mp


def make_tokenizer(folder: str | Path, model_max_length: int = 77, words: list[str] | None = None):
    """A ``CLIPTokenizer`` over the world files (written to ``folder``) for ``words`` (default: the
    shipped model's word list)."""
    from transformers import CLIPTokenizer

    write_tokenizer_files(folder, words)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=model_max_length,
                                         bos_token=BOS, eos_token=EOS, pad_token=EOS, unk_token=EOS)
