"""The paraphrase family of real checkpoints (CLIP and NudeNet judges): phrasings no method fits on."""

import dataclasses
import re

import numpy as np

from erasekit.attacks import REGISTRY as ATTACKS
from erasekit.attacks.textual_inversion import TEMPLATES as TI_TEMPLATES
from erasekit.concepts import ConceptSpec
from erasekit.evaluation import ImageCache, evaluate
from erasekit.evaluation.judge_clip import CONCEPT_TEMPLATES
from erasekit.evaluation.judge_nudenet import NudeNetJudge
from erasekit.evaluation.prompts import (
    OPEN_FRAMES,
    PARAPHRASE_TEMPLATES,
    TARGET_TEMPLATES,
    open_paraphrase_sets,
    open_prompt_sets,
)
from erasekit.methods import REGISTRY as METHODS


def _frame(template: str) -> str:
    """A template's sentence frame: lower case, no punctuation, no articles, the slot as '*'."""
    words = re.sub(r"[^\w{}* ]", " ", template.lower().replace("{}", " * ")).split()
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def _fitted_templates() -> set[str]:
    """Every template erasekit's methods and attacks fit or search on by default, and the templated sets."""
    out = set(TARGET_TEMPLATES) | set(PARAPHRASE_TEMPLATES) | set(CONCEPT_TEMPLATES) | set(TI_TEMPLATES)
    for cls in [*METHODS.values(), *ATTACKS.values()]:
        for f in dataclasses.fields(cls.Config):
            if f.name == "templates" and f.default is not dataclasses.MISSING:
                out |= set(f.default)
    return out


def test_open_frames_are_disjoint_from_every_fitted_and_templated_phrasing():
    fitted = {_frame(t) for t in _fitted_templates()}
    assert len(fitted) >= 10  # the methods' and attacks' templates were found
    assert len({_frame(f) for f in OPEN_FRAMES}) == len(OPEN_FRAMES)
    assert not {_frame(f) for f in OPEN_FRAMES} & fitted
    # the check can fail: a frame that is a fitted template up to articles and punctuation is caught
    assert _frame("A photo of the {}.") in fitted and _frame("{}") in fitted


def test_open_paraphrase_sets_frame_the_same_phrases_with_the_same_labels():
    spec = ConceptSpec("van gogh", synonyms=("vincent van gogh",), neighbours=("monet", "picasso"))
    n = 16
    plain, para = open_prompt_sets(spec, "concept:van gogh", n), open_paraphrase_sets(spec, "concept:van gogh", n)
    assert set(para) == set(plain) == {"target", "generality", "neighbours", "unrelated"}
    templated = {p for ps in plain.values() for p in ps.prompts}
    for name, ps in para.items():
        assert len(ps.prompts) == n and not set(ps.prompts) & templated
        assert sorted(lab["concept:van gogh"] for lab in ps.labels) == \
            sorted(lab["concept:van gogh"] for lab in plain[name].labels)  # the judge's candidates are unchanged
    assert all("van gogh" in p for p in para["target"].prompts)
    assert len(set(para["target"].prompts)) == len(OPEN_FRAMES)  # every frame used
    assert all("vincent van gogh" in p for p in para["generality"].prompts)
    assert {lab["concept:van gogh"] for lab in para["generality"].labels} == {"van gogh"}
    assert {lab["concept:van gogh"] for lab in para["neighbours"].labels} == {"monet", "picasso"}
    for p, lab in zip(para["neighbours"].prompts, para["neighbours"].labels):
        assert lab["concept:van gogh"] in p
    # the unrelated prompts are the templated set's, framed, each labelled with its own words
    for p, q, lab in zip(para["unrelated"].prompts, plain["unrelated"].prompts, para["unrelated"].labels):
        assert q in p and p != q and lab["concept:van gogh"] == q
    # a concept's preserve prompts (as given, not sampled) are cycled to one per seed, as in the templated set
    kept = ConceptSpec("dog", preserve=("a cat", "a red car", "a bowl of soup"))
    framed, templ = open_paraphrase_sets(kept, "concept:dog", 8), open_prompt_sets(kept, "concept:dog", 8)
    assert len(framed["unrelated"].prompts) == 8
    assert [lab["concept:dog"] for lab in framed["unrelated"].labels] == list(templ["unrelated"].prompts)
    # a given unrelated list is framed too
    mine = open_paraphrase_sets(ConceptSpec("dog"), "concept:dog", 4, unrelated=["a red car"])
    assert all("a red car" in p for p in mine["unrelated"].prompts)


class ColourPipe:
    """Stand-in generator: flat colour fixed by a word in the prompt (see tests/test_judges.py)."""

    colours = {"van gogh": (0.9, 0.8, 0.1), "monet": (0.2, 0.5, 0.9)}

    def __init__(self):
        self.erasekit_fingerprint = "colour-pipe"
        self.scheduler = object()
        self.seen: list[str] = []

    def __call__(self, prompts, generator, num_inference_steps, guidance_scale, output_type="np"):
        self.seen.extend(prompts)
        out = []
        for p, g in zip(prompts, generator):
            rgb = np.random.default_rng(int(g.initial_seed())).random(3) * 0.2 + 0.4
            for k, c in self.colours.items():
                if k in p.lower():
                    rgb = np.array(c)
            out.append(np.broadcast_to(rgb, (32, 32, 3)).astype(np.float32))
        return type("Out", (), {"images": np.stack(out)})()


def test_an_open_evaluation_scores_the_paraphrase_family_and_says_what_it_is(tmp_path):
    """On a real checkpoint's judge the paraphrase family is measured by default (it was not before: only the
    world judge had one, so specificity on real models rested on the phrasings the edits were fitted on)."""

    def detector(rgba):  # fires on yellowish images: the stand-in draws "van gogh" yellow
        r, g, b = rgba[0, 0, :3] / 255
        return [{"class": "BUTTOCKS_EXPOSED", "score": 0.9}] if r > 0.8 and g > 0.7 else []

    judge = NudeNetJudge(detector=detector)
    spec = ConceptSpec("nudity", synonyms=("van gogh",))
    pipe = ColourPipe()
    sampling = {"num_inference_steps": 1, "guidance_scale": 1.0}
    res = evaluate(pipe, [spec], seeds=range(8), judge=judge, cache=ImageCache(tmp_path), sampling=sampling)
    c = res.concepts[0]
    assert c.paraphrase is not None
    assert "clip_score" not in c.metrics  # a detector reads no text
    assert c.paraphrase["generality_original"]["value"] == 1.0  # the synonym drawn in every frame
    assert set(c.prompts) >= {"paraphrase/target", "paraphrase/generality", "paraphrase/unrelated"}
    assert all(p in pipe.seen for p in c.prompts["paraphrase/generality"])
    assert "OPEN_FRAMES" in res.settings["prompt_families"]["paraphrase"]
    para = open_paraphrase_sets(spec, "nudity", 4)
    labelled = NudeNetJudge(detector=detector).paraphrase_sets(spec, "nudity", "nudity", 4)
    assert [ps.prompts for ps in labelled.values()] == [ps.prompts for ps in para.values()]
    assert {lab["nudity"] for lab in labelled["target"].labels} == {"nudity"}
    assert {lab["nudity"] for lab in labelled["unrelated"].labels} == {"safe"}
    off = evaluate(ColourPipe(), [spec], seeds=range(8), judge=judge, cache=ImageCache(tmp_path), sampling=sampling,
                   paraphrase=False)
    assert off.concepts[0].paraphrase is None and "paraphrase" not in off.settings["prompt_families"]

