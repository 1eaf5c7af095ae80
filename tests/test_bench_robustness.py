"""benchmarks/world_robustness.py: runs of method or attack subsets into one folder add up to one CSV."""

import csv

from benchmod import load_bench


def _bench():
    return load_bench("world_robustness")


def test_a_second_run_adds_its_rows_and_replaces_only_the_pairs_it_measured(tmp_path):
    merge = _bench().merge_rows
    path = tmp_path / "world_robustness_star.csv"
    first = [{"method": "esd", "attack": "textual-inversion", "post": 0.8, "p_neighbours_kept": 0.9},
             {"method": "esd", "attack": "concept-arithmetic", "post": 0.3, "p_neighbours_kept": 0.9}]
    merge(path, first)
    second = [{"method": "esd", "attack": "concept-arithmetic", "post": 0.1},  # measured again: replaces
              {"method": "esd", "attack": "p4d", "post": 0.0}]
    merge(path, second)
    got = {(r["method"], r["attack"]): r for r in csv.DictReader(open(path))}
    assert set(got) == {("esd", "textual-inversion"), ("esd", "concept-arithmetic"), ("esd", "p4d")}
    assert float(got["esd", "textual-inversion"]["post"]) == 0.8  # the first run's row is kept
    assert float(got["esd", "concept-arithmetic"]["post"]) == 0.1 and got["esd", "p4d"]["p_neighbours_kept"] == ""
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_runs_writing_into_one_folder_at_once_keep_each_others_rows(tmp_path):
    """The README runs the token searches as two processes into one --out: each merge is read-modify-write,
    so without the folder lock one run's rows could vanish under the other's."""
    import multiprocessing

    path = tmp_path / "world_robustness_star.csv"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_merge_many, args=(path, i)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    got = {(r["method"], r["attack"]) for r in csv.DictReader(open(path))}
    assert got == {(f"m{i}", f"a{j}") for i in range(4) for j in range(25)}
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def _merge_many(path, i):
    merge = _bench().merge_rows
    for j in range(25):
        merge(path, [{"method": f"m{i}", "attack": f"a{j}", "post": 0.5}])


def test_the_goal_is_judged_over_every_attack_in_the_folder():
    """A run of some attacks cannot declare the goal met: the verdict reads every row of the folder's CSV
    (strings, as read back) and needs every registered attack."""
    goal = _bench().goal_lines
    attacks = ["textual-inversion", "concept-arithmetic", "p4d"]
    held = [{"method": "esd", "attack": a, "post": "0.0", "drop_neighbours_kept": "0.01"} for a in attacks[1:]]
    assert goal(held, ["esd"], attacks) == [
        "esd                worst post-attack 0.00 over 2 attack(s), largest drop +0.01: not settled: not yet "
        "attacked with textual-inversion"]
    broken = held + [{"method": "esd", "attack": "textual-inversion", "post": "0.38", "drop_neighbours_kept": "0.0"}]
    assert goal(broken, ["esd"], attacks)[0].endswith("worst post-attack 0.38 over 3 attack(s), largest drop +0.01: misses")
    all_held = held + [{"method": "esd", "attack": "textual-inversion", "post": "0.19", "drop_neighbours_kept": ""}]
    assert goal(all_held, ["esd"], attacks)[0].endswith(": MEETS")
    costly = [dict(r, drop_neighbours_kept="0.06") for r in all_held]
    assert goal(costly, ["esd", "uce"], attacks) == [goal(costly, ["esd"], attacks)[0]]  # uce: no rows, no line
    assert goal(costly, ["esd"], attacks)[0].endswith(": misses")
    unmeasured = all_held[:-1] + [dict(all_held[-1], post="nan")]
    assert goal(unmeasured, ["esd"], attacks)[0].endswith(": misses")  # NaN is not under the bar, in any order
    assert goal(unmeasured[::-1], ["esd"], attacks)[0].endswith(": misses")


def test_rows_at_other_settings_stay_in_the_csv_but_not_in_the_verdict(tmp_path):
    """Another run with other settings measured another patch: its rows are kept, not replaced, and the
    verdict at the current settings reads only its own rows (an old CSV's rows have no settings)."""
    bench = _bench()
    path = tmp_path / "world_robustness_star.csv"
    attacks = ["textual-inversion", "p4d"]
    eta4, eta1 = bench.settings_key({"negative_guidance": 4.0}), bench.settings_key({"negative_guidance": 1.0})
    assert eta4 != eta1 and bench.settings_key({"templates": ("{}",), "a": 1}) == '{"a": 1, "templates": ["{}"]}'
    bench.merge_rows(path, [{"method": "esd", "attack": a, "post": 0.9, "drop_neighbours_kept": 0.0} for a in attacks])
    bench.merge_rows(path, [{"method": "esd", "attack": a, "settings": eta1, "post": 0.5} for a in attacks])
    bench.merge_rows(path, [{"method": "esd", "attack": a, "settings": eta4, "post": 0.1} for a in attacks])
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == 6  # three settings (one unrecorded) x two attacks
    line = bench.goal_lines(rows, ["esd"], attacks, {"esd": eta4})[0]
    assert line.endswith("worst post-attack 0.10 over 2 attack(s), largest drop +0.00: MEETS "
                         "(4 row(s) at other settings not judged)"), line
    assert bench.goal_lines(rows, ["esd"], attacks, {"esd": bench.settings_key({})}) == [
        "esd                not settled: 6 row(s) in the CSV are at other settings, none at these"]
    assert bench.goal_lines(rows, ["esd"], attacks)[0].endswith(": misses")  # without settings: every row
