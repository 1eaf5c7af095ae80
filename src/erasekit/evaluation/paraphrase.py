"""Paraphrase prompts for the embedded world: asking for world concepts as a new user would.

The world model and its text encoder learned a handful of caption templates
(:data:`erasekit.world.vocab.TEMPLATES`), and the closed-form methods erase over templates of
the same shape (:func:`erasekit.world.vocab.erase_templates`). Prompt sets written in those
templates flatter both. The frames below are a second grammar, written for evaluation only and
kept disjoint from both: once the world's concept words are masked, no frame equals a training
caption's or an erase template's sentence (``tests/test_paraphrase.py`` checks it). They vary
word order, use clauses, fillers, questions and requests, and put colour, texture and
background before and after the shape.

Every frame names all four axes, like the templated sets, so the same scores apply. The world
tokenizer's context is 20 tokens and words it never saw cost a token per few letters, so each
frame fits in 18 content tokens whatever concept words fill it (every world word is one token).

These frames were written before any edit was measured on them and are not to be tuned to make
an edit look good; changing them changes what every paraphrase figure means (bump
:data:`GRAMMAR_VERSION`). A retrained world model must keep them out of its training captions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

#: recorded in metrics.json with every paraphrase figure
GRAMMAR_VERSION = "1"

#: Sentence frames; slots {shape}, {colour}, {texture}, {background} take one world word each.
#: Articles ("a") are corrected to "an" before a vowel after filling.
FRAMES: tuple[str, ...] = (
    "could you draw a {texture} {colour} {shape} on {background}?",
    "i'd like a {colour} {shape}, {texture}, on {background}",
    "what i want is a {colour} {texture} {shape} on {background}",
    "{background} background, and on it one {colour} {texture} {shape}",
    "draw me a {shape}: {colour}, {texture}, {background} behind",
    "is there a {colour} {texture} {shape} against {background}?",
    "the {shape} is {colour} and {texture}; the background is {background}",
    "{colour} and {texture} is the {shape} i need, on {background}",
    "show me one {texture} {shape} coloured {colour} over {background}",
    "just a {colour} {shape} with {texture} fill, {background} background",
    "make a {shape}. {colour}. {texture}. {background} background.",
    "paint the {shape} {colour}, {texture}, on {background}",
    "a {shape} please: {texture}, {colour}, on {background}",
    "can i get a {texture} {colour} {shape} on {background}?",
    "{background} behind a {colour} {shape} that is {texture}",
    "i'm after a {shape} in {texture} {colour} on a {background} background",
)


def _articles(text: str) -> str:
    """'a' before a vowel becomes 'an' (and 'an' before a consonant 'a')."""
    return re.sub(r"\b(a|an)( +)([a-z])", lambda m: ("an" if m.group(3) in "aeiou" else "a") + m.group(2) + m.group(3),
                  text)


def paraphrase(words: Mapping[str, str], frame: int) -> str:
    """Frame ``frame`` (an index into :data:`FRAMES`, taken modulo their number) filled with
    ``words``: one word per axis (shape, colour, texture, background), canonical or a synonym."""
    return _articles(FRAMES[frame % len(FRAMES)].format(**words))


def _masked_words() -> set[str]:
    from ..world.vocab import CONCEPTS, GENERIC_NOUNS

    out = set(GENERIC_NOUNS)
    for values in CONCEPTS.values():
        for canon, syns in values.items():
            out.add(canon)
            out.update(syns)
    return out


def frame_of(text: str) -> tuple[str, ...]:
    """A sentence's frame: lower-case words without punctuation, "an" read as "a", and every world
    concept word (any axis, canonical or synonym, and the generic nouns) masked as "*".

    Two prompts with the same frame differ only in which concepts they name; comparing frames is
    how the paraphrase grammar is kept disjoint from the training and erase templates."""
    masked = _masked_words()
    words = re.findall(r"[a-z0-9']+", text.lower().replace("{}", " * "))
    return tuple("*" if w in masked or w == "*" else ("a" if w == "an" else w) for w in words)


def frames() -> set[tuple[str, ...]]:
    """The frames of this grammar (for a training grammar to stay clear of)."""
    fill = {"shape": "star", "colour": "red", "texture": "striped", "background": "grass"}
    return {frame_of(paraphrase(fill, i)) for i in range(len(FRAMES))}
