"""Evaluation harness: metrics on constructed cases with known answers, intervals, cache, report."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from erasekit.errors import InvalidInputError
from erasekit.evaluation import ImageCache, bootstrap, evaluate, harmonic, parse_seeds
from erasekit.evaluation.report import render_report
from erasekit.world.render import render
from erasekit.world.vocab import AXES, CONCEPTS, Labels, find_axis


class RenderPipe:
    """A stand-in generator that draws exactly what the prompt asks (random where it is silent),
    except that ``replace`` maps one value to another: a perfect eraser of that value."""

    def __init__(self, replace=None):
        self.replace = replace or {}
        self.calls = 0
        self.fail_after = None
        self.erasekit_fingerprint = "render-pipe"
        self.scheduler = object()

    def __call__(self, prompts, generator, num_inference_steps, guidance_scale, output_type="np"):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        images = []
        for text, g in zip(prompts, generator):
            seed = int(g.initial_seed())
            rng = np.random.default_rng(seed)
            lab = {a: list(CONCEPTS[a])[rng.integers(len(CONCEPTS[a]))] for a in AXES}
            for w in re.findall(r"[a-z]+", text):
                hit = find_axis(w)
                if hit:
                    lab[hit[0]] = hit[1]
            lab = {a: self.replace.get(v, v) for a, v in lab.items()}
            images.append(render(Labels(**lab), seed).astype(np.float32) / 255)
        return type("Out", (), {"images": np.stack(images)})()


def run_eval(pipe, tmp_path, seeds=range(32), concept="star"):
    return evaluate(pipe, concept, seeds=seeds, cache=ImageCache(tmp_path / "cache"),
                    sampling={"num_inference_steps": 1, "guidance_scale": 1.0})


def test_never_and_always_drawing_generators(tmp_path):
    always = run_eval(RenderPipe(), tmp_path).concepts[0].metrics
    never = run_eval(RenderPipe(replace={"star": "circle"}), tmp_path / "b").concepts[0].metrics
    assert always["efficacy_original"]["value"] == pytest.approx(1.0, abs=0.04)
    assert never["efficacy_original"]["value"] == pytest.approx(0.0, abs=0.04)
    assert never["generality_original"]["value"] == pytest.approx(0.0, abs=0.04)
    assert always["generality_original"]["value"] == pytest.approx(1.0, abs=0.04)
    assert always["specificity_neighbours_original"]["value"] >= 0.95
    assert always["specificity_unrelated_original"]["value"] >= 0.95
    # no patch: patched == original, so no drop, identical features, H of a non-eraser is 0
    assert always["efficacy_drop"]["value"] == 0 and always["feature_distance"]["value"] == 0
    assert always["harmonic"] == pytest.approx(0.0, abs=0.05)
    assert never["harmonic"] > 0.9


def test_collateral_reads_the_other_axes_of_the_erased_concepts_prompts(tmp_path):
    clean = run_eval(RenderPipe(replace={"star": "circle"}), tmp_path).concepts[0].metrics
    # an eraser that also paints everything blue: colour is wrong unless blue was asked (1 in 8)
    sloppy = run_eval(RenderPipe(replace={"star": "circle", **{c: "blue" for c in CONCEPTS["colour"]}}),
                      tmp_path / "b").concepts[0].metrics
    assert clean["specificity_collateral_original"]["value"] >= 0.95
    expected = (1 / 8 + 1 + 1) / 3  # mean over colour, texture, background
    assert sloppy["specificity_collateral_original"]["value"] == pytest.approx(expected, abs=0.08)
    assert set(clean) >= {"specificity_collateral_patched", "specificity_collateral_drop"}
    # H stays MACE's: efficacy, generality and the mean of neighbours and unrelated, not collateral
    m = sloppy
    spec = (m["specificity_neighbours_original"]["value"] + m["specificity_unrelated_original"]["value"]) / 2
    assert m["harmonic_original"] == pytest.approx(
        harmonic(m["efficacy_original"]["value"], spec, m["generality_original"]["value"]))


def test_bootstrap_intervals_cover_the_truth():
    rng = np.random.default_rng(0)
    covered = 0
    for i in range(200):
        x = rng.random(100) < 0.3
        e = bootstrap(x, n_boot=500, seed=i)
        covered += e.low <= 0.3 <= e.high
    assert 0.90 <= covered / 200 <= 0.99
    e = bootstrap([1.0] * 10)  # 10 of 10: not [1, 1] but Wilson's [n / (n + z^2), 1]
    assert e.value == e.high == 1.0 and e.low == pytest.approx(10 / (10 + 1.959964**2))


def test_harmonic_score():
    assert harmonic(0.0, 1.0, 0.0) == 1.0
    assert harmonic(1.0, 1.0, 0.0) == 0.0
    assert harmonic(0.5, 0.5, 0.5) == pytest.approx(0.5)
    assert harmonic(0.2, 0.9) == pytest.approx(2 / (1 / 0.8 + 1 / 0.9))


def test_cache_hits_skip_generation_and_give_the_same_numbers(tmp_path):
    pipe = RenderPipe()
    first = run_eval(pipe, tmp_path)
    calls = pipe.calls
    assert calls > 0 and first.cost["cache_misses"] > 0
    second = run_eval(pipe, tmp_path)
    assert pipe.calls == calls and second.cost["cache_misses"] == 0
    assert json.dumps(first.concepts[0].metrics, sort_keys=True) == json.dumps(second.concepts[0].metrics, sort_keys=True)


def test_interrupted_run_keeps_finished_images(tmp_path):
    pipe = RenderPipe()
    pipe.fail_after = 2
    with pytest.raises(KeyboardInterrupt):
        run_eval(pipe, tmp_path)
    assert len(list((tmp_path / "cache").rglob("*.png"))) > 0
    pipe.fail_after = None
    res = run_eval(pipe, tmp_path)
    assert res.cost["cache_hits"] > 0


def test_bad_input(tmp_path):
    with pytest.raises(InvalidInputError, match="cannot recognise 'zebra'.*shape: circle"):
        run_eval(RenderPipe(), tmp_path, concept="zebra")
    with pytest.raises(InvalidInputError, match="empty"):
        run_eval(RenderPipe(), tmp_path, seeds=[])
    with pytest.raises(InvalidInputError, match="empty"):
        parse_seeds(" , ")
    assert parse_seeds("0-3,9") == [0, 1, 2, 3, 9]


def test_report_has_every_section(tmp_path):
    res = run_eval(RenderPipe(replace={"star": "circle"}), tmp_path, seeds=range(16))
    html = render_report(res)
    for needle in ("id='summary'", "id='concept-star'", "set-target", "set-generality", "set-neighbours",
                   "set-unrelated", "id='cost'", "Efficacy", "Specificity", "Generality", "Harmonic score",
                   "FID / KID", "data:image/png;base64,"):
        assert needle in html, needle


def test_demo_runs_end_to_end(tmp_path, monkeypatch):
    """The demo, on its own image cache (never the user's ~/.cache/erasekit): every image it makes
    lands there; templated and paraphrase figures reach metrics.json, the report and the terminal."""
    from typer.testing import CliRunner

    from erasekit.cli import app
    from erasekit.evaluation.cache import default_cache_dir

    monkeypatch.setenv("ERASEKIT_CACHE", str(tmp_path / "cache"))
    assert default_cache_dir() == tmp_path / "cache" / "images"
    out = tmp_path / "demo"
    r = CliRunner().invoke(app, ["demo", "--seeds", "0-3", "-o", str(out)])  # 4 seeds x 8 sets, before and after
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    c = metrics["concepts"][0]
    assert c["metrics"]["efficacy_original"]["n"] == 4 and c["paraphrase_metrics"]["efficacy_original"]["n"] == 4
    assert set(c["families"]) == {"templated", "paraphrase"}
    made = metrics["cost"]["cache_misses"]
    assert made > 0 and len(list((tmp_path / "cache" / "images").rglob("*.png"))) == made
    html = (out / "report.html").read_text()
    assert "family-paraphrase" in html and "set-paraphrase-target" in html
    assert (out / "report.html").stat().st_size > 10_000 and (out / "patch" / "edit.json").is_file()
    assert "report:" in r.output and "paraphrase" in r.output


def test_eval_cli_refuses_existing_run_and_foreign_patch(tmp_path, world_pipe):
    from typer.testing import CliRunner

    from erasekit.cli import app

    (tmp_path / "run").mkdir()
    r = CliRunner().invoke(app, ["eval", "--concept", "star", "-o", str(tmp_path / "run")])
    assert r.exit_code != 0 and "already exists" in r.output
    r = CliRunner().invoke(app, ["eval", "--concept", "zebra", "-o", str(tmp_path / "run2")])
    assert r.exit_code != 0 and "cannot recognise" in r.output and not (tmp_path / "run2").exists()
    r = CliRunner().invoke(app, ["eval", "--concept", "star", "--fid-features", "pixels", "-o", str(tmp_path / "run3")])
    assert r.exit_code != 0 and "unknown FID feature space" in r.output and not (tmp_path / "run3").exists()


def test_eval_cli_unrelated_file_errors_are_one_line(tmp_path):
    from typer.testing import CliRunner

    from erasekit.cli import app

    (tmp_path / "empty.txt").write_text("# only a note\n\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait on a table\n".encode("latin-1"))
    (tmp_path / "ok.txt").write_text("a red car\na bowl of soup\n")
    cases = [("missing.txt", "does not exist"), ("empty.txt", "holds no prompt"), ("latin1.txt", "is not UTF-8"),
             ("ok.txt", "for open-vocabulary judges")]  # the world judge reads its own unrelated axes
    for name, msg in cases:
        run = tmp_path / f"run-{name}"
        r = CliRunner().invoke(app, ["eval", "-c", "star", "--unrelated-file", str(tmp_path / name), "-o", str(run)])
        assert r.exit_code == 2 and msg in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1 and not run.exists()


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_report_renders_in_headless_chromium(tmp_path):
    res = run_eval(RenderPipe(replace={"star": "circle"}), tmp_path, seeds=range(16))
    page = tmp_path / "report.html"
    page.write_text(render_report(res))
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2400",
                    page.as_uri()], check=True, timeout=120, capture_output=True)
    assert shot.stat().st_size > 20_000


def test_evaluate_scores_hook_edits_and_prompt_sets_from_outside(tmp_path, world_pipe):
    """A hook edit (negative prompt) is scored by the same code as a weight edit, and prompt sets
    given from outside, as text or as prompt embeddings (what an attack hands over), replace the
    judge's sets; embeddings of the same prompts give the same images as the text."""
    import erasekit
    from erasekit.adapters import get_adapter
    from erasekit.evaluation.prompts import PromptSet
    from erasekit.world.vocab import CONCEPTS

    seeds = list(range(6))
    neg = erasekit.erase(world_pipe, "star", method="negative-prompt")
    res = evaluate(world_pipe, "star", patch=neg, seeds=seeds, cache=ImageCache(tmp_path / "c"), paraphrase=False)
    m = res.concepts[0].metrics
    assert {"efficacy_patched", "specificity_neighbours_patched", "harmonic"} <= set(m)
    assert res.settings["edits"] == [{"method": "negative-prompt", "kind": "hook", "digest": neg.digest}]
    assert not getattr(world_pipe, "_erasekit_stack", None)

    prompts = tuple(f"a {c} star on a sky background" for c in list(CONCEPTS["colour"])[:6])
    labels = tuple({"shape": "star", "colour": c, "background": "sky"} for c in list(CONCEPTS["colour"])[:6])
    text = PromptSet("target", prompts, labels)
    embedded = PromptSet("target", tuple("<learned>" for _ in prompts), labels,
                         embeddings=get_adapter(world_pipe).encode(list(prompts)))
    a = evaluate(world_pipe, "star", seeds=seeds, cache=ImageCache(tmp_path / "d"), prompt_sets={"star": {"target": text}})
    b = evaluate(world_pipe, "star", seeds=seeds, cache=ImageCache(tmp_path / "e"),
                 prompt_sets={"star": {"target": embedded}})
    assert np.array_equal(a.concepts[0].images["target"]["original"], b.concepts[0].images["target"]["original"])
    assert a.concepts[0].metrics["efficacy_original"]["value"] >= 0.8
    assert set(a.concepts[0].images) == {"target"}
    with pytest.raises(InvalidInputError, match="one prompt per seed"):
        evaluate(world_pipe, "star", seeds=range(3), cache=ImageCache(tmp_path / "f"), prompt_sets={"star": {"target": text}})
    with pytest.raises(InvalidInputError, match="no 'target' set"):
        evaluate(world_pipe, "star", seeds=seeds, cache=ImageCache(tmp_path / "f"), prompt_sets={"star": {"other": text}})


def test_concepts_an_edit_erases_together_are_not_each_others_neighbours(tmp_path, world_pipe):
    """A joint edit of star and heart is not charged for erasing heart when star is measured: heart (by
    any synonym) leaves star's neighbour and unrelated prompts, on both prompt families, and every other
    prompt stays as it was; an erased value of another axis is not drawn on that axis; a star-only edit
    keeps heart."""
    import erasekit
    from erasekit.concepts import make_concepts
    from erasekit.evaluation.prompts import world_prompt_sets
    from erasekit.world.vocab import CONCEPTS

    spec = make_concepts("star")[0]
    full = world_prompt_sets(spec, "shape", "star", 14)
    assert {lab["shape"] for lab in full["neighbours"].labels} == set(CONCEPTS["shape"]) - {"star"}
    heart_syn = CONCEPTS["shape"]["heart"][0]
    for family in ("templated", "paraphrase"):
        whole = world_prompt_sets(spec, "shape", "star", 14, family=family)
        cut = world_prompt_sets(spec, "shape", "star", 14, family=family, exclude=[heart_syn, "star"])
        for name in ("neighbours", "unrelated"):
            assert {lab["shape"] for lab in cut[name].labels} == set(CONCEPTS["shape"]) - {"star", "heart"}
        assert cut["target"] == whole["target"] and cut["generality"] == whole["generality"]
        red = world_prompt_sets(spec, "shape", "star", 14, family=family, exclude=["red"])
        assert "red" in {lab["colour"] for lab in whole["target"].labels}  # so that the next line tests something
        for name in red:
            assert "red" not in {lab["colour"] for lab in red[name].labels}
        kept = [i for i, lab in enumerate(whole["target"].labels) if lab["colour"] != "red"]
        assert [red["target"].prompts[i] for i in kept] == [whole["target"].prompts[i] for i in kept]
    every = world_prompt_sets(spec, "shape", "star", 4, exclude=list(CONCEPTS["shape"]))
    assert set(every) == {"target", "generality"}  # nothing left to keep: no neighbour or unrelated set
    assert every["generality"] == world_prompt_sets(spec, "shape", "star", 4)["generality"]
    assert world_prompt_sets(spec, "shape", "star", 14, exclude=[]) == full  # nothing excluded: the same sets

    joint = erasekit.erase(world_pipe, ["star", "heart"], method="negative-prompt")
    alone = erasekit.erase(world_pipe, "star", method="negative-prompt")
    seeds = range(7)
    kw = {"seeds": seeds, "cache": ImageCache(tmp_path / "c"), "paraphrase": True,
          "sampling": {"num_inference_steps": 2}}
    rj = evaluate(world_pipe, "star", patch=joint, **kw)
    ra = evaluate(world_pipe, "star", patch=alone, **kw)
    for name in ("neighbours", "unrelated", "paraphrase/neighbours"):
        assert not any("heart" in p or heart_syn in p for p in rj.concepts[0].prompts[name]), name
    assert any("heart" in p for p in ra.concepts[0].prompts["neighbours"])
    assert rj.concepts[0].prompts["target"] == ra.concepts[0].prompts["target"]
    assert rj.settings["not_neighbours"]["concepts"] == {"star": {"shape": ["heart"]}}
    assert "not_neighbours" not in ra.settings
    # exclude= names concepts the caller treats as erased; the measured concept itself is never left out
    rx = evaluate(world_pipe, "star", patch=alone, exclude=["heart", "star", "zebra"], **kw)
    assert rx.concepts[0].prompts["neighbours"] == rj.concepts[0].prompts["neighbours"]
    assert rx.settings["not_neighbours"]["concepts"] == {"star": {"shape": ["heart"]}}


def test_exclusions_ignore_blanks_and_the_measured_concepts_own_words(tmp_path):
    from erasekit.world.vocab import CONCEPTS

    kw = {"seeds": range(4), "cache": ImageCache(tmp_path / "c"), "paraphrase": False,
          "sampling": {"num_inference_steps": 1, "guidance_scale": 1.0}}
    circle_syn = CONCEPTS["shape"]["circle"][0]
    plain = evaluate(RenderPipe(), "circle", **kw)
    # a blank entry is no wildcard, and an entry that names the measured concept (by a synonym) is its own
    same = evaluate(RenderPipe(), "circle", exclude=["", "  ", [circle_syn, "heart"]], **kw)
    assert "not_neighbours" not in same.settings
    assert same.concepts[0].prompts["neighbours"] == plain.concepts[0].prompts["neighbours"]
    # a phrase with its synonyms is one concept: heart by a synonym is left out
    heart = evaluate(RenderPipe(), "circle", exclude=[[CONCEPTS["shape"]["heart"][0]]], **kw)
    assert heart.settings["not_neighbours"]["concepts"] == {"circle": {"shape": ["heart"]}}
