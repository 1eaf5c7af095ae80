"""What the text-prompt guards share: the guard prompt written from the erased concepts (the
negative prompt, SLD's safety concept), checked against the text encoder's context."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..concepts import ConceptSpec
from ..errors import InvalidInputError


@dataclass(frozen=True)
class GuardPromptConfig:
    """How a guard writes its prompt from the erased concepts."""

    template: str = field(default="{}", metadata={
        "help": "how each concept phrase is written into the guard's prompt ({} = phrase)", "each_contains": "{}"})
    synonyms: bool = field(default=True, metadata={"help": "also name each concept's synonyms"})
    separator: str = field(default=", ", metadata={"help": "text between the named phrases"})


def guard_prompt(adapter: Any, cfg: GuardPromptConfig, concepts: list[ConceptSpec], what: str) -> str:
    """The concepts' phrases (synonyms too, with ``cfg.synonyms``) through ``cfg.template``, joined by
    ``cfg.separator``; one line when the result does not fit the text encoder's context."""
    phrases = [p for c in concepts for p in (c.erase_phrases if cfg.synonyms else (c.target,))]
    prompt = cfg.separator.join(" ".join(cfg.template.replace("{}", p).split()) for p in dict.fromkeys(phrases))
    try:
        adapter.check_length([prompt])
    except InvalidInputError:
        raise InvalidInputError(f"the {what} ({prompt[:40]!r}...) is longer than the text encoder reads; erase "
                                "fewer concepts at once or drop synonyms (--set synonyms=false)") from None
    return prompt
