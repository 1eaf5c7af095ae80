"""FID/KID against a folder of real images: reading the folder, cropping, streaming, the figures'
direction, and eval's wiring (metrics.json, report, CLI)."""

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from erasekit.errors import InvalidInputError
from erasekit.evaluation import ImageCache, evaluate
from erasekit.evaluation.metrics import distribution_distances, reference_distances
from erasekit.evaluation.metrics.fidelity import load_reference, reference_features, reference_files
from erasekit.evaluation.report import render_report
from erasekit.world.render import render
from erasekit.world.vocab import AXES, CONCEPTS, Labels
from test_evaluation import RenderPipe
from test_metrics import DetectorJudge, FeatureJudge, _images


def _folder(path, images):
    path.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(path / f"{i:04d}.png")
    return path


def _renders(n, seed):
    rng = np.random.default_rng(seed)
    labs = [Labels(**{a: list(CONCEPTS[a])[rng.integers(len(CONCEPTS[a]))] for a in AXES}) for _ in range(n)]
    return np.stack([render(lab, 1000 * seed + i) for i, lab in enumerate(labs)])


def test_reference_fid_orders_sets_and_matches_the_in_memory_fid(tmp_path):
    ref = _images(100, n=30, seed=2)
    files = reference_files(_folder(tmp_path / "ref", ref))
    near, far = _images(100, n=24), _images(180, n=24, seed=1)
    r = reference_distances(FeatureJudge(), files, {"original": near, "patched": far})
    assert r["original"]["fid"] < r["patched"]["fid"] and r["original"]["kid"] < r["patched"]["kid"]
    assert r["fid_change"] == pytest.approx(r["patched"]["fid"] - r["original"]["fid"]) and r["fid_change"] > 0
    assert r["n_reference"] == 30 and r["original"]["n_images"] == 24 and r["resized_to"] == [8, 8]
    # lossless PNGs at the generated size come back unchanged: the same FID as the in-memory sets
    assert r["original"]["fid"] == pytest.approx(distribution_distances(FeatureJudge(), ref, near)["fid"], rel=1e-6)
    # and so does the set measured after the reset that keeps the reference features
    assert r["patched"]["fid"] == pytest.approx(distribution_distances(FeatureJudge(), ref, far)["fid"], rel=1e-6)
    # streamed a few images at a time: the same figures (only the features are kept)
    small = reference_distances(FeatureJudge(), files, {"original": near, "patched": far}, chunk=7)
    for v in ("original", "patched"):
        assert small[v]["fid"] == pytest.approx(r[v]["fid"], rel=1e-6)
        assert small[v]["kid"] == pytest.approx(r[v]["kid"], rel=1e-6)


def test_references_are_centre_cropped_to_the_generated_aspect_and_resized(tmp_path):
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, :10, 0] = 255  # red | green | blue thirds
    wide[:, 10:20, 1] = 255
    wide[:, 20:, 2] = 255
    Image.fromarray(wide).save(tmp_path / "wide.png")
    out = load_reference(tmp_path / "wide.png", 4, 4)
    assert out.shape == (4, 4, 3) and out.dtype == np.uint8
    assert (out[..., 1] > 200).all() and (out[..., 0] < 60).all() and (out[..., 2] < 60).all()
    tall = np.ascontiguousarray(wide.transpose(1, 0, 2))  # red / green / blue bands, top to bottom
    Image.fromarray(tall).convert("L").convert("RGB").save(tmp_path / "tall.jpg")
    out = load_reference(tmp_path / "tall.jpg", 6, 12)  # wider than tall: a band across the middle
    assert out.shape == (6, 12, 3)
    grey = np.asarray(Image.fromarray(tall).convert("L"), float)
    assert abs(out[..., 0].mean() - grey[10:20].mean()) < 12


def test_16_bit_grey_transparent_and_rotated_references_read_as_they_look(tmp_path):
    grey = np.full((6, 6), 32768, np.uint16)  # mid-grey in 16 bits: not clipped to white
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    assert abs(int(load_reference(tmp_path / "grey16.png", 6, 6).mean()) - 128) <= 1
    rgba = np.zeros((6, 6, 4), np.uint8)
    rgba[..., 0] = 255  # red under a fully transparent alpha: white, as a viewer shows it
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    assert (load_reference(tmp_path / "clear.png", 6, 6) == 255).all()
    tall = np.zeros((12, 4, 3), np.uint8)
    tall[:6] = 255  # white top half
    im = Image.fromarray(tall)
    exif = im.getexif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to show
    im.save(tmp_path / "rotated.jpg", exif=exif, quality=100)
    shown = load_reference(tmp_path / "rotated.jpg", 4, 12)  # shown 12 wide, 4 tall: no crop needed
    assert shown.shape == (4, 12, 3) and shown[:, :4].mean() < 60 and shown[:, -4:].mean() > 200


def test_bad_reference_folders_fail_in_one_line(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        reference_files(tmp_path / "nope")
    (tmp_path / "one").mkdir()
    Image.fromarray(_images(100, n=1)[0]).save(tmp_path / "one" / "a.png")
    (tmp_path / "one" / "notes.txt").write_text("not an image")
    with pytest.raises(InvalidInputError, match="holds 1 image"):
        reference_files(tmp_path / "one")
    with pytest.raises(InvalidInputError, match="not the file"):
        reference_files(tmp_path / "one" / "a.png")
    (tmp_path / "one" / "b.png").write_bytes(b"this is no png")
    with pytest.raises(InvalidInputError, match=r"could not read the reference image .*b\.png"):
        reference_files(tmp_path / "one")
    # a damaged file whose header reads: caught where it is decoded, still in one line
    whole = (tmp_path / "one" / "a.png").read_bytes()
    (tmp_path / "one" / "b.png").write_bytes(whole[: len(whole) // 2])
    files = reference_files(tmp_path / "one")
    with pytest.raises(InvalidInputError, match=r"could not decode the reference image .*b\.png"):
        reference_features(FeatureJudge(), files, 8, 8)
    good = _folder(tmp_path / "good", _images(100, n=3))
    # a detector has no features: skipped, not a crash
    r = reference_distances(DetectorJudge(), reference_files(good), {"original": _images(100, n=3)})
    assert "no image features" in r["skipped"]


def test_the_world_judge_ranks_rendered_images_close_and_broken_ones_far(tmp_path):
    from erasekit.evaluation import get_judge

    judge = get_judge("world-classifier")
    files = reference_files(_folder(tmp_path / "renders", _renders(48, seed=1)))
    other_renders = _renders(32, seed=2)
    r = reference_distances(judge, files, {"renders": other_renders, "inverted": 255 - other_renders,
                                           "noise": _images(128, n=32, seed=3).repeat(4, 1).repeat(4, 2)})
    assert r["renders"]["fid"] < r["inverted"]["fid"] and r["renders"]["fid"] < r["noise"]["fid"]
    assert "fid_change" not in r  # only for an original and a patched set


def test_eval_adds_reference_fid_to_metrics_report_and_settings(tmp_path):
    ref = _folder(tmp_path / "ref", _renders(24, seed=4))
    res = evaluate(RenderPipe(), "star", seeds=range(12), cache=ImageCache(tmp_path / "cache"),
                   sampling={"num_inference_steps": 1, "guidance_scale": 1.0}, reference_images=ref)
    r = res.concepts[0].metrics["reference_fid"]
    assert r["prompt_sets"] == ["unrelated"] and r["n_reference"] == 24 and r["original"]["n_images"] == 12
    assert r["fid_change"] == 0 and np.isfinite(r["original"]["fid"])  # no patch: the same images
    assert "reference_fid" not in (res.concepts[0].paraphrase or {})  # the templated family only
    assert res.settings["reference_images"] == {"folder": str(ref), "n": 24}
    json.dumps(res.settings)
    html = render_report(res)
    assert "FID / KID vs 24 reference images (unrelated prompts, 12 images each" in html


def test_eval_refuses_reference_images_it_cannot_use_before_generating(tmp_path):
    from erasekit.evaluation.judge_nudenet import NudeNetJudge

    pipe = RenderPipe()
    ref = _folder(tmp_path / "ref", _images(100, n=3))
    with pytest.raises(InvalidInputError, match="no image features.*--fid-features inception"):
        evaluate(pipe, "nudity", seeds=range(2), judge=NudeNetJudge(detector=lambda im: []),
                 cache=ImageCache(tmp_path / "c"), reference_images=ref)
    with pytest.raises(InvalidInputError, match="does not exist"):
        evaluate(pipe, "star", seeds=range(2), cache=ImageCache(tmp_path / "c"), reference_images=tmp_path / "x")
    with pytest.raises(InvalidInputError, match="at least 2 seeds"):
        evaluate(pipe, "star", seeds=[0], cache=ImageCache(tmp_path / "c"), reference_images=ref)
    assert pipe.calls == 0


def test_eval_never_measures_the_target_images_against_the_references(tmp_path):
    from erasekit.evaluation.prompts import PromptSet

    ref = _folder(tmp_path / "ref", _renders(6, seed=6))
    target = PromptSet("target", tuple("a red star" for _ in range(4)),
                       tuple({"shape": "star", "colour": "red"} for _ in range(4)))
    res = evaluate(RenderPipe(), "star", seeds=range(4), cache=ImageCache(tmp_path / "c"), paraphrase=False,
                   sampling={"num_inference_steps": 1, "guidance_scale": 1.0}, reference_images=ref,
                   prompt_sets={"star": {"target": target}})
    r = res.concepts[0].metrics["reference_fid"]
    assert "no unrelated prompt set" in r["skipped"] and "original" not in r
    assert "no unrelated prompt set" in render_report(res)


def test_cli_eval_checks_the_reference_folder_first(tmp_path):
    from erasekit.cli import app

    res = CliRunner().invoke(app, ["eval", "--concept", "star", "-o", str(tmp_path / "run"), "--reference-images",
                                   str(tmp_path / "missing")])
    assert res.exit_code != 0 and "does not exist" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "run").exists()
    ref = _folder(tmp_path / "ref", _renders(8, seed=5))
    res = CliRunner().invoke(app, ["eval", "--concept", "star", "--seeds", "0-3", "--no-paraphrase", "-o",
                                   str(tmp_path / "run"), "--reference-images", str(ref)],
                             env={"ERASEKIT_CACHE": str(tmp_path / "cache")})
    assert res.exit_code == 0, res.output
    assert "FID to 8 reference images (unrelated prompts, 4 images)" in " ".join(res.output.split())
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["concepts"][0]["metrics"]["reference_fid"]["n_reference"] == 8
