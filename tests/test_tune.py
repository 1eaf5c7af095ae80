"""erasekit tune: grids parsed and checked before any fit, the rules, and a real choice on the world."""

import json

import pytest
from typer.testing import CliRunner

from erasekit.errors import InvalidInputError
from erasekit.methods import get_method
from erasekit.tune import candidates, parse_grid, plan, rank_key, within


def test_grids_are_typed_checked_and_expanded_in_order():
    uce = get_method("uce").Config
    grid = parse_grid(uce, ["erase_scale=1,6", "token=last,all"])
    assert grid == {"erase_scale": [1.0, 6.0], "token": ["last", "all"]}
    cands = candidates(uce(), grid)
    assert [s for s, _ in cands] == [{"erase_scale": 1.0, "token": "last"}, {"erase_scale": 1.0, "token": "all"},
                                     {"erase_scale": 6.0, "token": "last"}, {"erase_scale": 6.0, "token": "all"}]
    assert cands[3][1].erase_scale == 6.0 and cands[3][1].token == "all" and cands[3][1].lam == uce().lam
    # a list-valued setting separates its candidates with ';' (its own items take ',' or '|')
    tpl = parse_grid(uce, ["templates={}|a photo of {};a {}"])
    assert tpl == {"templates": [("{}", "a photo of {}"), ("a {}",)]}
    for pairs, msg in ((["nope=1,2"], "unknown setting"), (["erase_scale"], "key=value1,value2"),
                       (["erase_scale=,"], "has no values"), (["erase_scale=a,b"], "expected float"),
                       (["erase_scale=1", "erase_scale=2"], "given twice"), ([], "no --grid")):
        with pytest.raises(InvalidInputError, match=msg):
            parse_grid(uce, pairs)
    with pytest.raises(InvalidInputError, match="out of range"):  # every candidate checked before any fit
        candidates(uce(), {"erase_scale": [1.0, -2.0]})
    with pytest.raises(InvalidInputError, match="at most 64"):
        candidates(uce(), {"erase_scale": list(range(9)), "lam": list(range(8))})
    with pytest.raises(InvalidInputError, match="non-empty list"):
        candidates(uce(), {"erase_scale": []})
    with pytest.raises(InvalidInputError, match="lists 6.0 twice"):
        candidates(uce(), {"erase_scale": [6.0, 1.0, 6.0]})
    assert len(candidates(uce(), {"erase_scale": (v for v in (1.0, 2.0))})) == 2  # a generator is read once
    with pytest.raises(InvalidInputError, match="--grid erase_scale=a: expected float"):
        parse_grid(uce, ["erase_scale=a"])


def test_plan_builds_and_checks_every_candidate_before_any_fit():
    from erasekit.concepts import make_concepts

    esd = get_method("esd")
    # settings that must agree with each other: the second candidate is refused before the first is fitted
    with pytest.raises(InvalidInputError, match="trajectory_reuse needs xt_from=frozen"):
        plan(esd, esd.Config(xt_from="trained"), {"trajectory_reuse": [1, 2]}, make_concepts("star"))
    ac = get_method("ablating-concepts")
    with pytest.raises(InvalidInputError, match="anchor"):
        plan(ac, ac.Config(), {"lr": [1e-4]}, make_concepts("star"))
    ok = plan(esd, esd.Config(), {"lr": [1e-4, 5e-4]}, make_concepts(["star", "heart"]), separately=True)
    assert [m.config.lr for _, m in ok] == [1e-4, 5e-4]


def _rec(h, detected, nd, ud):
    figs = {"star": {"H": h, "detected_after": detected, "neighbours_drop": nd, "unrelated_drop": ud}}
    return {"mean": {"H": h, "detected_after": detected}, "within_max_drop": within(figs, 0.05)}


def test_rules_rank_candidates_as_documented():
    a, b, c = _rec(0.80, 0.10, 0.00, 0.00), _rec(0.85, 0.05, 0.10, 0.00), _rec(0.70, 0.20, 0.05, 0.01)
    # equal detections (common at 16 seeds) go to the higher H under the detection rule
    assert rank_key(_rec(0.9, 0.0, 0.0, 0.0), "detection") > rank_key(_rec(0.8, 0.0, 0.0, 0.0), "detection")
    # h: the highest H, whatever it costs
    assert max((a, b, c), key=lambda r: rank_key(r, "h")) is b
    # detection: b drops 10 points of neighbours, so it may not be chosen; a detects less than c
    assert rank_key(b, "detection") is None and not b["within_max_drop"] and c["within_max_drop"]
    assert rank_key(a, "detection") > rank_key(c, "detection")
    # a drop of exactly max_drop is allowed; a missing drop (no such prompt set) does not disqualify
    assert within({"x": {"neighbours_drop": 0.05, "unrelated_drop": None}}, 0.05)
    assert not within({"x": {"neighbours_drop": 0.0501, "unrelated_drop": 0.0}}, 0.05)


def test_tune_chooses_the_candidate_that_erases_and_returns_its_edit(world_pipe, tmp_path):
    import erasekit
    from erasekit.evaluation import ImageCache

    from erasekit.concepts import make_concepts

    uce = get_method("uce")
    base = uce.Config(**uce.world_settings(make_concepts("star")))
    seen = []
    res = erasekit.tune(world_pipe, "star", "uce", {"erase_scale": [0.0, 6.0]}, config=base, seeds=range(100, 102),
                        cache=ImageCache(tmp_path / "cache"), sampling={"num_inference_steps": 6},
                        on_candidate=lambda i, n, r: seen.append((i, n)))
    assert seen == [(0, 2), (1, 2)] and len(res.candidates) == 2
    off, on = (c["figures"]["star"] for c in res.candidates)
    assert off["detected_after"] > on["detected_after"]  # erase_scale 0 erases nothing
    assert res.chosen == 1 and res.candidates[1]["mean"]["H"] > res.candidates[0]["mean"]["H"]
    assert res.edit is not None and res.edit.digest == res.candidates[1]["edit_digests"]["star"]
    assert res.edit.digest == erasekit.erase(world_pipe, "star", "uce", config=base, erase_scale=6.0).digest
    d = json.loads(res.to_json())
    assert d["chosen_settings"] == {"erase_scale": 6.0} and d["seeds"] == [100, 101] and "held_out" in d
    assert "edits" not in d and d["rule"] == "h" and d["separately"] is False
    with pytest.raises(InvalidInputError, match="unknown rule"):
        erasekit.tune(world_pipe, "star", "uce", {"erase_scale": [1.0]}, rule="best")
    with pytest.raises(InvalidInputError, match="seed range is empty"):
        erasekit.tune(world_pipe, "star", "uce", {"erase_scale": [1.0]}, seeds=[])
    with pytest.raises(InvalidInputError, match="not uce's"):
        erasekit.tune(world_pipe, "star", "uce", {"erase_scale": [1.0]}, config=get_method("rece").Config())


def test_cli_tune_writes_every_candidate_and_the_chosen_edit(tmp_path):
    from erasekit.cli import app
    from erasekit.edits import load_edit

    env = {"ERASEKIT_CACHE": str(tmp_path / "cache")}
    run = CliRunner().invoke(app, ["tune", "--method", "uce", "-c", "star", "--grid", "erase_scale=0,6",
                                   "--seeds", "100-101", "-o", str(tmp_path / "t")], env=env)
    assert run.exit_code == 0, run.output
    text = " ".join(run.output.split())
    assert "[1/2] erase_scale=0.0" in text and "chose highest mean H (erase_scale=6.0)" in text
    d = json.loads((tmp_path / "t" / "tune.json").read_text())
    assert d["chosen"] == 1 and d["base"]["lam"] == get_method("uce").Config().lam
    assert load_edit(tmp_path / "t" / "edit").digest == d["candidates"][1]["edit_digests"]["star"]
    # bad input: one line, before the model loads, nothing written
    for args, msg in ((["--grid", "erase_scale=1,-1"], "out of range"), (["--grid", "nope=1"], "unknown setting"),
                      (["--grid", "erase_scale=1", "--rule", "best"], "--rule"),
                      (["--grid", "erase_scale=1", "--max-drop", "2"], "--max-drop"), ([], "no --grid"),
                      (["--grid", "erase_scale=1", "-o", str(tmp_path / "t")], "already exists"),
                      (["--grid", "erase_scale=1,2", "--set", "erase_scale=3"], "by --set and by --grid"),
                      (["--method", "esd", "--grid", "trajectory_reuse=1,2", "--set", "xt_from=trained"],
                       "needs xt_from=frozen"),
                      (["--grid", "erase_scale=1", "-c", "zebra"], "zebra"),
                      (["--grid", "erase_scale=1", "--rule", "robust"], "name the attacks with --attack"),
                      (["--grid", "erase_scale=1", "--attack", "nope"], "nope")):
        out = tmp_path / "bad"
        argv = ["tune", "-c", "star", *args] + ([] if "-o" in args else ["-o", str(out)])
        r = CliRunner().invoke(app, argv, env=env)
        assert r.exit_code == 2 and msg in " ".join(r.output.split()) and "Traceback" not in r.output, (args, r.output)
        assert not out.exists()


class _Fake:
    """Stands in for evaluate(): figures by the fitted edit's erase_scale and the concept."""

    def __init__(self, table):
        self.table, self.calls = table, []

    def __call__(self, pipe, specs, patch, **kw):
        self.calls.append(([s.target for s in specs], patch.manifest["config"]["erase_scale"], kw))
        concepts = []
        for s in specs:
            h, det, nd, *post = self.table[patch.manifest["config"]["erase_scale"], s.target]
            rob = {a: {"success": {"all": {"post_attack": {"value": v}}}} for a, v in zip(("uda", "ca"), post)}
            fam = {"H": {"value": h}, "detected_after": {"value": det}, "neighbours_kept": {"value": 1 - nd},
                   "unrelated_kept": {"value": 1.0}}
            metrics = {"specificity_neighbours_drop": {"value": nd}, "specificity_unrelated_drop": {"value": 0.0}}
            concepts.append(type("C", (), {"concept": s.target, "metrics": metrics, "robustness": rob,
                                           "families": lambda self, fam=fam: {"templated": fam}})())
        return type("R", (), {"concepts": concepts})()


def test_separate_fits_average_per_concept_and_the_detection_rule_can_choose_none(world_pipe, monkeypatch, tmp_path):
    import erasekit
    import erasekit.evaluation

    table = {(1.0, "star"): (0.6, 0.2, 0.0), (1.0, "heart"): (0.9, 0.0, 0.0),
             (6.0, "star"): (0.9, 0.0, 0.0), (6.0, "heart"): (0.7, 0.1, 0.1)}
    fake = _Fake(table)
    monkeypatch.setattr(erasekit.evaluation, "evaluate", fake)
    res = erasekit.tune(world_pipe, ["star", "heart"], "uce", {"erase_scale": [1.0, 6.0]}, separately=True,
                        seeds=range(3), cache=tmp_path / "c")
    # one edit per concept, each measured on its own, on the templated family only, at the given seeds
    assert [c[:2] for c in fake.calls] == [(["star"], 1.0), (["heart"], 1.0), (["star"], 6.0), (["heart"], 6.0)]
    assert all(kw["paraphrase"] is False and kw["seeds"] == [0, 1, 2] for _, _, kw in fake.calls)
    assert [c["mean"]["H"] for c in res.candidates] == [pytest.approx(0.75), pytest.approx(0.80)]
    assert res.chosen == 1 and set(res.edits) == {"star", "heart"} and res.edit is None
    assert res.edits["star"].concepts == ["star"] and res.edits["heart"].concepts == ["heart"]
    # detection within 0.05: 6.0 drops 10 points of heart's neighbours, so 1.0 (mean detection 0.10)
    det = erasekit.tune(world_pipe, ["star", "heart"], "uce", {"erase_scale": [1.0, 6.0]}, separately=True,
                        seeds=range(3), cache=tmp_path / "c", rule="detection")
    assert det.chosen == 0 and [c["within_max_drop"] for c in det.candidates] == [True, False]
    none = erasekit.tune(world_pipe, ["star", "heart"], "uce", {"erase_scale": [6.0]}, separately=True,
                         seeds=range(3), cache=tmp_path / "c", rule="detection")
    assert none.chosen is None and none.edits == {} and "loosen max_drop" in none.reason


def test_cli_tune_exits_1_when_no_candidate_qualifies(monkeypatch, tmp_path):
    import erasekit.evaluation
    from erasekit.cli import app

    monkeypatch.setattr(erasekit.evaluation, "evaluate", _Fake({(6.0, "star"): (0.7, 0.1, 0.2)}))
    r = CliRunner().invoke(app, ["tune", "-c", "star", "--grid", "erase_scale=6", "--rule", "detection",
                                 "--seeds", "100-101", "-o", str(tmp_path / "t")],
                           env={"ERASEKIT_CACHE": str(tmp_path / "cache")})
    assert r.exit_code == 1 and "chose nothing" in r.output
    d = json.loads((tmp_path / "t" / "tune.json").read_text())
    assert d["chosen"] is None and d["edit_folders"] == {} and not (tmp_path / "t" / "edit").exists()


def test_the_robust_rule_ranks_by_the_worst_attack(world_pipe, monkeypatch, tmp_path):
    import erasekit
    import erasekit.evaluation

    # 1.0 erases more but falls to the second attack; 6.0 holds both; 8.0 holds best but drops neighbours
    table = {(1.0, "star"): (0.9, 0.0, 0.0, 0.1, 0.6), (6.0, "star"): (0.8, 0.1, 0.0, 0.2, 0.3),
             (8.0, "star"): (0.7, 0.0, 0.2, 0.0, 0.0)}
    fake = _Fake(table)
    monkeypatch.setattr(erasekit.evaluation, "evaluate", fake)
    res = erasekit.tune(world_pipe, "star", "uce", {"erase_scale": [1.0, 6.0, 8.0]}, rule="robust",
                        attacks=["unlearndiffatk", "concept-arithmetic"], attack_seeds=[0, 1], cache=tmp_path / "c")
    assert fake.calls[0][2]["attacks"] == ["unlearndiffatk", "concept-arithmetic"]
    assert fake.calls[0][2]["attack_seeds"] == [0, 1]
    assert [c["mean"]["worst_post_attack"] for c in res.candidates] == [0.6, 0.3, 0.0]
    assert res.chosen == 1 and "worst post-attack" in res.reason
    assert erasekit.tune(world_pipe, "star", "uce", {"erase_scale": [1.0, 6.0, 8.0]}, cache=tmp_path / "c").chosen == 0
    with pytest.raises(InvalidInputError, match="name the attacks"):
        erasekit.tune(world_pipe, "star", "uce", {"erase_scale": [1.0]}, rule="robust")
