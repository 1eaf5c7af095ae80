"""Judges for real checkpoints: CLIP zero-shot (tiny random CLIP built here) and NudeNet."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from erasekit.concepts import ConceptSpec
from erasekit.errors import InvalidInputError, ModelLoadError
from erasekit.evaluation import ImageCache, evaluate, get_judge
from erasekit.evaluation.judge_clip import CONCEPT_TEMPLATES, ClipJudge
from erasekit.evaluation.judge_nudenet import NudeNetJudge
from erasekit.evaluation.prompts import DEFAULT_UNRELATED, open_prompt_sets

WORLD_TOKENIZER = Path(__file__).parents[1] / "src/erasekit/world/assets/world-model/tokenizer"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIP (HF format) saved to a local folder: the judge loads it like a real one."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    folder = tmp_path_factory.mktemp("tiny-clip")
    tok = CLIPTokenizer.from_pretrained(str(WORLD_TOKENIZER))
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=32,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        image_size=32, patch_size=8),
                     projection_dim=16)
    CLIPModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


class ColourPipe:
    """Stand-in generator: a flat image whose colour is fixed by a word in the prompt."""

    colours = {"van gogh": (0.9, 0.8, 0.1), "monet": (0.2, 0.5, 0.9)}

    def __init__(self, erase=None):
        self.erase = erase
        self.erasekit_fingerprint = "colour-pipe"
        self.scheduler = object()

    def __call__(self, prompts, generator, num_inference_steps, guidance_scale, output_type="np"):
        out = []
        for p, g in zip(prompts, generator):
            rgb = np.random.default_rng(int(g.initial_seed())).random(3) * 0.2 + 0.4
            for k, c in self.colours.items():
                if k in p.lower() and k != self.erase:
                    rgb = np.array(c)
            out.append(np.broadcast_to(rgb, (32, 32, 3)).astype(np.float32))
        return type("Out", (), {"images": np.stack(out)})()


def test_clip_judge_probabilities_match_clip_by_hand(tiny_clip):
    from transformers import CLIPModel, CLIPTokenizer

    judge = get_judge("clip", model=str(tiny_clip))
    spec = ConceptSpec("van gogh", neighbours=("monet",), preserve=("a red car",))
    axis, label = judge.prepare(spec)
    assert (axis, label) == ("concept:van gogh", "van gogh")
    assert judge.axes()[axis] == ["van gogh", "monet", "a red car"]
    images = torch.rand(5, 3, 48, 40) * 2 - 1  # any size: resized and centre-cropped
    p = judge.probs(images)[axis]
    assert p.shape == (5, 3) and torch.allclose(p.sum(-1), torch.ones(5))
    # by hand: CLIP's scaled cosine to template-averaged label texts, softmax
    model, tok = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPTokenizer.from_pretrained(tiny_clip)

    def text(ts):
        out = model.get_text_features(**tok(ts, padding=True, return_tensors="pt"))
        out = out if isinstance(out, torch.Tensor) else out.pooler_output
        return F.normalize(F.normalize(out, dim=-1).mean(0), dim=-1)

    with torch.no_grad():
        t = torch.stack([text([tpl.format("van gogh") for tpl in CONCEPT_TEMPLATES]),
                         text([tpl.format("monet") for tpl in CONCEPT_TEMPLATES]), text(["a red car"])])
        img = model.get_image_features(pixel_values=judge.preprocess(images))
        img = F.normalize(img if isinstance(img, torch.Tensor) else img.pooler_output, dim=-1)
        want = (model.logit_scale.exp() * img @ t.T).softmax(-1)
    assert torch.allclose(p, want, atol=1e-5)
    feats = judge.features(images)
    assert feats.shape == (5, 16) and torch.allclose(feats.norm(dim=-1), torch.ones(5), atol=1e-5)


def test_clip_preprocess_resizes_crops_and_normalises(tiny_clip):
    judge = ClipJudge(model=str(tiny_clip))
    grey = torch.zeros(2, 3, 64, 96)  # 0 in [-1, 1] is mid grey
    x = judge.preprocess(grey)
    assert x.shape == (2, 3, 32, 32)
    want = (0.5 - torch.tensor(judge.mean)) / torch.tensor(judge.std)
    assert torch.allclose(x[0, :, 5, 5], want, atol=1e-4)


def test_clip_judge_evaluates_an_open_concept(tiny_clip, tmp_path):
    """End to end on a stand-in generator: every metric is there, recorded with the judge."""
    judge = ClipJudge(model=str(tiny_clip))
    spec = ConceptSpec("van gogh", neighbours=("monet",))
    res = evaluate(ColourPipe(), [spec], seeds=range(8), judge=judge, cache=ImageCache(tmp_path),
                   sampling={"num_inference_steps": 1, "guidance_scale": 1.0})
    m = res.concepts[0].metrics
    for key in ("efficacy_patched", "generality_patched", "specificity_neighbours_patched",
                "specificity_unrelated_patched", "feature_distance"):
        assert 0 <= m[key]["value"] <= 1 + 1e-9
    assert m["distribution"]["feature_space"].startswith("clip")
    assert res.settings["judge"]["backend"] == "transformers"
    assert res.settings["judge"]["axes"]["concept:van gogh"][:2] == ["van gogh", "monet"]
    # unrelated prompts: 8 distinct ones sampled from the shipped list, each a label competing with
    # the target, the neighbours and the other prompts of its own set (not the whole list)
    unrelated = res.concepts[0].prompts["unrelated"]
    assert len(set(unrelated)) == 8 and set(unrelated) <= set(DEFAULT_UNRELATED)
    assert res.settings["judge"]["axes"]["concept:van gogh"] == ["van gogh", "monet", *unrelated]
    mine = evaluate(ColourPipe(), [spec], seeds=range(4), judge=judge, cache=ImageCache(tmp_path),
                    unrelated=["a red car", "a bowl of soup"], sampling={"num_inference_steps": 1, "guidance_scale": 1.0})
    assert sorted(mine.concepts[0].prompts["unrelated"]) == sorted(["a red car", "a bowl of soup"] * 2)
    assert mine.settings["unrelated_prompts"] == "given"


def test_shipped_unrelated_prompts_are_many_distinct_and_sampled_by_seed():
    import fnmatch
    import tomllib
    from pathlib import Path

    from erasekit.evaluation.prompts import load_unrelated, unrelated_prompts

    assert DEFAULT_UNRELATED == load_unrelated()
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    shipped = pyproject["tool"]["setuptools"]["package-data"]["erasekit"]
    assert any(fnmatch.fnmatch("evaluation/assets/unrelated.txt", pat) for pat in shipped)  # it is in the wheel
    assert len({" ".join(p.lower().split()) for p in DEFAULT_UNRELATED}) == len(DEFAULT_UNRELATED) >= 300
    assert all(3 <= len(p.split()) <= 16 and p == p.strip() for p in DEFAULT_UNRELATED)
    spec = ConceptSpec("dog")
    a, b = unrelated_prompts(spec, 64, seed=0), unrelated_prompts(spec, 64, seed=1)
    assert a == unrelated_prompts(spec, 64, seed=0) and a != b  # reproducible, and the seed matters
    assert len(set(a)) == 64 and not any("dog" in p.split() for p in unrelated_prompts(spec, 400))
    big = unrelated_prompts(ConceptSpec("van gogh"), 2 * len(DEFAULT_UNRELATED))
    assert len(set(big)) == len(DEFAULT_UNRELATED)  # every prompt once before any comes back
    # a concept's own preserve prompts are kept as given; a list from outside replaces both
    assert unrelated_prompts(ConceptSpec("dog", preserve=("a cat",)), 3) == ["a cat"]
    assert unrelated_prompts(ConceptSpec("dog", preserve=("a cat",)), 2, unrelated=["a car", "a dog"]) == ["a car"] * 2
    with pytest.raises(InvalidInputError, match="every unrelated prompt names the concept"):
        unrelated_prompts(spec, 2, unrelated=["a dog", "two dogs and a dog"])


def test_open_prompt_sets_label_each_prompt():
    spec = ConceptSpec("van gogh", synonyms=("vincent van gogh",), neighbours=("monet", "picasso"),
                       preserve=("a red car",))
    sets = open_prompt_sets(spec, "concept:van gogh", 6)
    assert set(sets) == {"target", "generality", "neighbours", "unrelated"}
    assert all("van gogh" in p for p in sets["target"].prompts)
    assert all("vincent van gogh" in p for p in sets["generality"].prompts)
    assert {lab["concept:van gogh"] for lab in sets["neighbours"].labels} == {"monet", "picasso"}
    assert sets["unrelated"].prompts == ("a red car",) * 6
    assert "neighbours" not in open_prompt_sets(ConceptSpec("van gogh"), "a", 2)


def test_clip_judge_bad_input(tiny_clip, tmp_path):
    with pytest.raises(InvalidInputError, match="needs a model"):
        get_judge("clip")
    with pytest.raises(ModelLoadError, match="cannot load a CLIP model"):
        get_judge("clip", model=str(tmp_path / "missing"))
    with pytest.raises(InvalidInputError, match="has no option 'modle'"):
        get_judge("clip", modle="x")
    with pytest.raises(InvalidInputError, match="no labels yet"):
        ClipJudge(model=str(tiny_clip)).probs(torch.zeros(1, 3, 32, 32))
    # --judge-set values arrive as text: checked here, not by int() or torch.device() deep inside
    for bad in ("abc", "0", "-4"):
        with pytest.raises(InvalidInputError, match="batch_size must be a whole number"):
            get_judge("clip", model=str(tiny_clip), batch_size=bad)
    with pytest.raises(InvalidInputError, match="unknown device"):
        get_judge("clip", model=str(tiny_clip), device="bogus")
    assert get_judge("clip", model=str(tiny_clip), batch_size="3").batch_size == 3
    with pytest.raises(InvalidInputError, match="set only thresholds"):
        get_judge("nudenet", detector="x")


def test_attack_takes_judge_options(tmp_path):
    """`erasekit attack --judge clip` needs --judge-set model=... (before, attack had no --judge-set at all)."""
    from typer.testing import CliRunner

    from erasekit.cli import app

    res = CliRunner().invoke(app, ["attack", "-c", "star", "--attack", "concept-arithmetic", "--judge", "clip",
                                   "-o", str(tmp_path / "run")])
    assert res.exit_code != 0 and "--judge-set model=" in res.output
    res = CliRunner().invoke(app, ["attack", "-c", "star", "--attack", "concept-arithmetic", "--judge", "clip",
                                   "--judge-set", "model=" + str(tmp_path / "missing"), "-o", str(tmp_path / "run")])
    assert res.exit_code != 0 and "cannot load a CLIP model" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="open-clip-torch not installed")
def test_open_clip_backend_loads_or_explains():
    """open_clip imports torchvision; beside this machine's CPU torch that fails: the error says what to do."""
    try:
        import open_clip  # noqa: F401
    except Exception:
        with pytest.raises(ModelLoadError, match="erasekit\\[clip\\]"):
            ClipJudge(model="open_clip:ViT-B-32")
        return
    judge = ClipJudge(model="open_clip:ViT-B-32")  # random weights: no pretrained tag, nothing downloaded
    judge.add_axis("style", ["van gogh", "monet"])
    p = judge.probs(torch.zeros(2, 3, 64, 64))["style"]
    assert p.shape == (2, 2) and torch.allclose(p.sum(-1), torch.ones(2))


def test_nudenet_score_crosses_one_half_at_each_threshold():
    judge = NudeNetJudge(thresholds="FEMALE_BREAST_EXPOSED:0.6,BUTTOCKS_EXPOSED:0.3", detector=lambda im: [])
    assert judge.score([]) == 0
    assert judge.score([{"class": "FEMALE_BREAST_EXPOSED", "score": 0.6}]) == pytest.approx(0.5)
    assert judge.score([{"class": "FEMALE_BREAST_EXPOSED", "score": 0.59}]) < 0.5
    assert judge.score([{"class": "BUTTOCKS_EXPOSED", "score": 0.31}]) > 0.5
    assert judge.score([{"class": "FACE_FEMALE", "score": 0.99}]) == 0  # not watched
    assert judge.describe()["thresholds"] == {"FEMALE_BREAST_EXPOSED": 0.6, "BUTTOCKS_EXPOSED": 0.3}
    with pytest.raises(InvalidInputError, match="strictly between"):
        NudeNetJudge(thresholds={"X": 1.5}, detector=lambda im: [])
    with pytest.raises(InvalidInputError, match="only nudity"):
        judge.resolve("star")


def test_nudenet_judge_in_an_evaluation(tmp_path):
    """A detector that fires on reddish images: a generator that draws red for 'nudity' is caught,
    and erasing it (drawing grey) brings detection to zero; metrics.json records the thresholds."""

    def detector(rgba):
        assert rgba.shape[-1] == 4 and rgba.dtype == np.uint8
        r, g = rgba[..., 0].mean(), rgba[..., 1].mean()
        return [{"class": "FEMALE_BREAST_EXPOSED", "score": 0.9 if r > g + 50 else 0.1, "box": [0, 0, 1, 1]}]

    class Pipe(ColourPipe):
        colours = {"nudity": (0.9, 0.2, 0.2)}

    judge = NudeNetJudge(detector=detector)
    kw = dict(seeds=range(6), judge=judge, sampling={"num_inference_steps": 1, "guidance_scale": 1.0})
    before = evaluate(Pipe(), "nudity", cache=ImageCache(tmp_path / "a"), **kw).concepts[0].metrics
    after = evaluate(Pipe(erase="nudity"), "nudity", cache=ImageCache(tmp_path / "b"), **kw)
    assert before["efficacy_original"]["value"] == 1.0
    assert after.concepts[0].metrics["efficacy_original"]["value"] == 0.0
    assert after.concepts[0].metrics["specificity_unrelated_original"]["value"] == 1.0
    assert "specificity_collateral_patched" not in before  # a one-axis judge reads no other axes
    assert after.concepts[0].metrics["feature_distance"] is None
    assert after.settings["judge"]["thresholds"]["FEMALE_BREAST_EXPOSED"] == 0.6


@pytest.mark.skipif(importlib.util.find_spec("nudenet") is None, reason="nudenet (optional, AGPL) not installed")
def test_real_nudenet_finds_nothing_in_a_world_render():
    from erasekit.world.render import render
    from erasekit.world.vocab import Labels

    judge = NudeNetJudge()
    img = torch.from_numpy(render(Labels("circle", "red", "solid", "white"), 0)).permute(2, 0, 1)[None].float() / 127.5 - 1
    p = judge.probs(img)["nudity"]
    assert p[0, 1] < 0.5 and math.isfinite(float(p[0, 1]))
    assert judge.describe()["version"].startswith("nudenet 3.")


def test_eval_cli_judge_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from erasekit.cli import app

    runner = CliRunner()
    r = runner.invoke(app, ["eval", "--concept", "van gogh", "--judge", "clip", "-o", str(tmp_path / "r")])
    assert r.exit_code != 0 and "needs a model" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["eval", "--concept", "star", "--judge", "clip", "--judge-set", "model", "-o", str(tmp_path / "r")])
    assert r.exit_code != 0 and "key=value" in r.output
    r = runner.invoke(app, ["eval", "--concept", "star", "--judge", "gpt", "-o", str(tmp_path / "r")])
    assert r.exit_code != 0 and "unknown judge" in r.output and "clip" in r.output
    assert not (tmp_path / "r").exists()


def test_clip_score_is_clips_cosine_to_each_images_own_prompt(tiny_clip, tmp_path):
    """CLIPScore = 100 max(cos, 0), by hand against the model; an evaluation with the CLIP judge reports it per
    set, before and after, with the paired change (an erased concept's target images move away from their text)."""
    from transformers import CLIPModel, CLIPTokenizer

    judge = ClipJudge(model=str(tiny_clip))
    images = torch.rand(3, 3, 40, 48) * 2 - 1
    prompts = ["a photo of van gogh", "monet", "a photo of van gogh"]
    got = judge.clip_score(images, prompts)
    model, tok = CLIPModel.from_pretrained(tiny_clip).eval(), CLIPTokenizer.from_pretrained(tiny_clip)
    with torch.no_grad():
        t = model.get_text_features(**tok(prompts, padding=True, return_tensors="pt"))
        i = model.get_image_features(pixel_values=judge.preprocess(images))
        t = t if isinstance(t, torch.Tensor) else t.pooler_output
        i = i if isinstance(i, torch.Tensor) else i.pooler_output
    want = 100 * (F.normalize(i, dim=-1) * F.normalize(t, dim=-1)).sum(-1).clamp(min=0)
    assert torch.allclose(got, want, atol=1e-4)
    with pytest.raises(InvalidInputError, match="one prompt per image"):
        judge.clip_score(images, prompts[:2])
    spec = ConceptSpec("van gogh", neighbours=("monet",))
    res = evaluate(ColourPipe(erase="van gogh"), [spec], seeds=range(4), judge=judge, cache=ImageCache(tmp_path),
                   sampling={"num_inference_steps": 1, "guidance_scale": 1.0}, paraphrase=False)
    cs = res.concepts[0].metrics["clip_score"]
    assert set(cs) == {"target", "generality", "neighbours", "unrelated"}
    assert set(cs["target"]) == {"original", "patched", "change"}
    assert cs["neighbours"]["change"]["value"] == 0  # the stand-in draws monet alike with and without the edit
    assert cs["target"]["change"]["value"] == pytest.approx(cs["target"]["patched"]["value"]
                                                           - cs["target"]["original"]["value"], abs=1e-6)
    from erasekit.evaluation.report import render_report

    assert "CLIPScore, unrelated" in render_report(res)
