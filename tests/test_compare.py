"""erasekit compare: several edits on the same prompts and seeds, and differences paired image by image."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from erasekit.errors import InvalidInputError


@pytest.fixture(scope="module")
def edits(world_pipe):
    import erasekit

    return {"uce": erasekit.erase(world_pipe, "star", "uce", erase_scale=6.0),
            "guard": erasekit.erase(world_pipe, "star", "negative-prompt"),
            "joint": erasekit.erase(world_pipe, ["star", "heart"], "negative-prompt")}


def test_compare_pairs_each_edit_with_the_baseline_image_by_image(world_pipe, edits, tmp_path):
    import erasekit
    from erasekit.evaluation import ImageCache, evaluate
    from erasekit.compare import render_compare
    from erasekit.evaluation.stats import bootstrap_diff

    cache = ImageCache(tmp_path / "c")
    three = {"guard": [edits["guard"]], "uce": edits["uce"], "joint": edits["joint"]}
    fast = {"num_inference_steps": 3}  # the pairing is under test, not the erasure
    res = erasekit.compare(world_pipe, "star", three, seeds=range(4), cache=cache, sampling=fast)
    assert res.baseline == "guard" and [(r["family"], r["edit"]) for r in res.rows] == [
        (f, e) for f in ("templated", "paraphrase") for e in ("(unedited)", "guard", "uce", "joint")]
    assert [(d["family"], d["edit"], d["baseline"]) for d in res.diffs] == [
        (f, e, "guard") for f in ("templated", "paraphrase") for e in ("uce", "joint")]
    # each edit's figures are what eval gives for it alone (its images come from the cache)
    alone = evaluate(world_pipe, "star", patch=edits["uce"], seeds=range(4), cache=cache, paraphrase=False,
                     sampling=fast, exclude=["heart"])
    assert res.rows[2]["detected"] == alone.concepts[0].families()["templated"]["detected_after"]  # uce's row
    # the joint edit erases heart too: heart leaves every edit's neighbours, so all are on the same prompts
    outs = {n: res.results[n].concepts[0].outcomes for n in three}
    for fam in ("templated", "paraphrase"):
        for key in outs["guard"][fam]:
            assert outs["uce"][fam][key]["prompts"] == outs["guard"][fam][key]["prompts"] == \
                outs["joint"][fam][key]["prompts"], (fam, key)
        assert not any("heart" in p for p in outs["uce"][fam]["neighbours_kept"]["prompts"])
    # the difference is uce minus guard image by image, its interval resampling prompts with their seeds
    for fam in ("templated", "paraphrase"):
        for key, o in outs["uce"][fam].items():
            b = outs["guard"][fam][key]
            d = next(x for x in res.diffs if x["edit"] == "uce" and x["family"] == fam)[key]
            want = bootstrap_diff(o["patched"], b["patched"], clusters=o["clusters"]).as_dict()
            assert d["value"] == pytest.approx(np.mean(o["patched"] - b["patched"]))
            assert d["ci95"] == pytest.approx(want["ci95"]), (fam, key)
            assert d["excludes_zero"] == (d["ci95"][0] > 0 or d["ci95"][1] < 0)
    assert all("value" in d[k] for d in res.diffs for k in ("detected", "neighbours_kept", "unrelated_kept"))
    json.loads(res.to_json())
    page = render_compare(res)
    assert page.count("<h3>") == 4 and "paraphrase prompts" in page  # two families, two tables each
    assert page.count("class='sig'") == sum(bool(d[k].get("excludes_zero")) for d in res.diffs for k in d
                                             if isinstance(d[k], dict))
    d = res.diffs[0]["detected"]
    flipped = erasekit.compare(world_pipe, "star", {"guard": edits["guard"], "uce": edits["uce"], "joint": edits["joint"]},
                               seeds=range(4), cache=cache, paraphrase=False, baseline="uce", sampling=fast)
    assert flipped.diffs[0]["edit"] == "guard" and flipped.diffs[0]["detected"]["value"] == pytest.approx(-d["value"])


def test_compare_refuses_what_it_cannot_compare(world_pipe, edits):
    import erasekit

    with pytest.raises(InvalidInputError, match="at least two"):
        erasekit.compare(world_pipe, "star", {"uce": edits["uce"]})
    with pytest.raises(InvalidInputError, match="baseline 'x'"):
        erasekit.compare(world_pipe, "star", {"a": edits["uce"], "b": edits["guard"]}, baseline="x")
    with pytest.raises(InvalidInputError, match="unedited"):
        erasekit.compare(world_pipe, "star", {"(unedited)": edits["uce"], "b": edits["guard"]})
    with pytest.raises(InvalidInputError, match="give an edit"):
        erasekit.compare(world_pipe, "star", {"a": edits["uce"], "b": "star-edit"})


def test_cli_compare_names_edits_and_prints_paired_differences(world_pipe, edits, tmp_path):
    from erasekit.cli import _named_patches, app

    edits["uce"].save(tmp_path / "star-uce")
    edits["guard"].save(tmp_path / "g")
    assert _named_patches([str(tmp_path / "star-uce"), f"both={tmp_path / 'star-uce'}+{tmp_path / 'g'}"]) == {
        "star-uce": [tmp_path / "star-uce"], "both": [tmp_path / "star-uce", tmp_path / "g"]}
    for bad, msg in ((["a=x", "a=y"], "named 'a'"), (["=x"], "NAME=FOLDER"), (["a="], "NAME=FOLDER")):
        with pytest.raises(InvalidInputError, match=msg):
            _named_patches(bad)
    env = {"ERASEKIT_CACHE": str(tmp_path / "cache")}
    r = CliRunner().invoke(app, ["compare", "-p", str(tmp_path / "star-uce"), "-p", f"guard={tmp_path / 'g'}",
                                 "-c", "star", "--seeds", "0-1", "--no-paraphrase", "-o", str(tmp_path / "cmp")],
                           env=env)
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "difference from 'star-uce', paired by image" in text and "guard" in text
    d = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert d["names"] == ["star-uce", "guard"] and d["diffs"][0]["edit"] == "guard"
    page = (tmp_path / "cmp" / "compare.html").read_text()
    assert "difference from star-uce, image by image" in page and "<td>guard</td>" in page
    assert page.count("<tr><td>guard</td>") == 2  # its figures and its difference
    for args, msg in ((["-p", str(tmp_path / "g")], "at least two edits"),
                      (["-p", str(tmp_path / "g"), "-p", f"u={tmp_path / 'star-uce'}", "--baseline", "z"], "--baseline"),
                      (["-p", str(tmp_path / "g"), "-p", f"u={tmp_path / 'nope'}"], "nope")):
        r = CliRunner().invoke(app, ["compare", "-c", "star", "-o", str(tmp_path / "bad"), *args], env=env)
        assert r.exit_code == 2 and msg in " ".join(r.output.split()) and "Traceback" not in r.output, r.output
        assert not (tmp_path / "bad").exists()
