"""UnlearnDiffAtk: a discrete prefix per attacked image, optimised on the vocabulary simplex through the
edited model's denoising loss on the concept image, with an early stop on the judge. Tiny pipelines
prove the code paths (both families, a hook edit, seeding, replay, pre-attack successes, early stop);
the world checks that it lifts success against UCE's erasure of star and records its objective."""

import numpy as np
import pytest
import torch

import erasekit
from erasekit.adapters import get_adapter
from erasekit.attacks import Adversarial, attack
from erasekit.attacks.artefact import ids_to_vectors
from erasekit.attacks.base import AttackContext, Item
from erasekit.attacks.unlearndiffatk import (UDA_WORLD, UnlearnDiffAtk, UnlearnDiffAtkConfig, prefix_room,
                                             project_simplex, timestep_schedule, vocabulary)
from erasekit.errors import InvalidInputError
from erasekit.methods import get_method
from tiny import RuleJudge, assert_replays, tiny_sd, tiny_sdxl, uce_edit

#: settings that run UnlearnDiffAtk in seconds on a tiny pipeline
TINY = {"prefix_k": 2, "timesteps": 2, "iterations": 2}
SAMPLING = {"num_inference_steps": 1, "guidance_scale": 2.0}


StubJudge = RuleJudge  # reads star where its rule says so


def never(images):
    return [False] * len(images)


def always(images):
    return [True] * len(images)


class NovelJudge(StubJudge):
    """Reads the concept in every image except those of its first two calls (the unedited and the edited
    model's images in ``attack``): whatever the attack makes of its own succeeds."""

    def __init__(self):
        super().__init__(self._novel)
        self.calls, self.seen = 0, set()

    def _novel(self, images):
        self.calls += 1
        keys = [img.numpy().tobytes() for img in images]
        if self.calls <= 2:
            self.seen.update(keys)
            return [False] * len(images)
        return [k not in self.seen for k in keys]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this module: two threads on two shared cores stall each other badly (every
    tiny op waits for a descheduled thread), which made a tiny attack a hundred times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return {"sd": tiny_sd(tmp_path_factory.mktemp("tok")), "sdxl": tiny_sdxl(tmp_path_factory.mktemp("tok"))}


def test_simplex_projection_schedule_and_vocabulary(tiny):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 50, generator=g) * torch.tensor([0.01, 0.1, 1.0, 3.0, 0.001, 10.0])[:, None]
    p = project_simplex(a)
    assert bool((p >= 0).all()) and bool((p <= 1).all())
    assert torch.allclose(p.sum(-1), torch.ones(6), atol=1e-3)
    # the exact Euclidean projection (sort-based) agrees with the bisection
    s, _ = a.sort(-1, descending=True)
    css = s.cumsum(-1) - 1
    ks = torch.arange(1, 51)
    rho = ((s - css / ks) > 0).sum(-1)
    tau = css.gather(-1, (rho - 1)[:, None]) / rho[:, None]
    assert torch.allclose(p, (a - tau).clamp(min=0), atol=1e-4)
    u = torch.full((2, 40), 1 / 40)
    assert torch.equal(project_simplex(u), u)  # already on the simplex: unchanged
    assert timestep_schedule(1000, 50) == list(range(10, 1000, 20))
    assert timestep_schedule(1000, 10) == list(range(50, 1000, 100))
    ids = vocabulary(get_adapter(tiny["sd"]))
    tok = tiny["sd"].tokenizer
    assert tok.bos_token_id not in ids.tolist() and tok.eos_token_id not in ids.tolist()
    assert len(ids) == len(tok) - len(set(tok.all_special_ids))


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_uda_on_tiny_pipelines_is_seeded_and_replays(family, tiny, tmp_path):
    pipe = tiny[family]
    edit = uce_edit(pipe)
    runs = [attack(pipe, "star", UnlearnDiffAtk(**TINY), patch=edit, seeds=range(2), sets=("target",),
                   cache=tmp_path / "c", sampling=SAMPLING, judge=StubJudge(never), seed=3) for _ in range(2)]
    r, again = runs
    adv = r.adversarial
    assert adv.prompts == [f"<adv-{i}> {it.prompt}" for i, it in enumerate(r.items)] and adv.seeds == [0, 1]
    assert adv.token_ids == again.adversarial.token_ids and adv.prompts == again.adversarial.prompts
    assert all(torch.equal(a, b) for n in adv.tokens for a, b in zip(adv.tokens[n], again.adversarial.tokens[n]))
    assert np.array_equal(r.attacked_images, again.attacked_images)
    adapter = get_adapter(pipe)
    special = set(pipe.tokenizer.all_special_ids)
    for name, ids in adv.token_ids.items():
        assert len(ids) == TINY["prefix_k"] and not special & set(ids)
        assert all(torch.equal(a, b) for a, b in zip(adv.tokens[name], ids_to_vectors(adapter, ids)))
    assert len(adv.tokens["<adv-0>"]) == len(adapter.text_encoders())
    # the judge never reads the concept: every item runs the whole schedule, with its objective recorded
    rec = r.record
    assert rec["attacked"] == 2 and rec["stopped_early"] == 0 and rec["timesteps"] == timestep_schedule(1000, 2)
    for item in rec["items"]:
        assert item["timesteps_run"] == 2 and len(item["objective_by_t"]) == 2
        assert len(item["objective_probe"]) == 3 and item["objective_first"] > 0
    assert r.cost["unet_calls"] > 0
    # the artefact saves, loads and replays the attacked images
    (tmp_path / "run").mkdir()
    adv.save(tmp_path / "run")
    back = Adversarial.load(tmp_path / "run")
    assert back.token_ids == adv.token_ids and back.prompts == adv.prompts and back.seeds == adv.seeds
    with torch.no_grad():
        assert torch.equal(back.encode(adapter, back.prompts).embeds, adv.encode(adapter, adv.prompts).embeds)
    assert_replays(pipe, edit, back, r, SAMPLING)


def test_uda_skips_pre_attack_successes_and_stops_early(tiny, tmp_path):
    pipe = tiny["sd"]
    edit = uce_edit(pipe)
    kw = dict(patch=edit, seeds=range(2), sets=("target",), cache=tmp_path / "c", sampling=SAMPLING)
    # the edited model already draws the concept: nothing is attacked, the prompts stay as they are
    r = attack(pipe, "star", UnlearnDiffAtk(**TINY), judge=StubJudge(always), **kw)
    assert r.adversarial.prompts == [it.prompt for it in r.items] and not r.adversarial.tokens
    assert r.record["attacked"] == 0 and r.detected_post.all()
    # the first prefix the judge is asked about succeeds: one timestep per item, and the replay succeeds too
    r = attack(pipe, "star", UnlearnDiffAtk(**dict(TINY, timesteps=3)), judge=NovelJudge(), **kw)
    assert r.record["stopped_early"] == 2
    assert [it["stopped_at_t"] for it in r.record["items"]] == [timestep_schedule(1000, 3)[0]] * 2
    assert all(it["timesteps_run"] == 1 for it in r.record["items"])
    assert r.detected_post.all() and not any(it.detected_pre for it in r.items)


def test_uda_attacks_through_a_hook_edit(tiny, tmp_path):
    pipe = tiny["sd"]
    neg = get_method("negative-prompt")().fit(get_adapter(pipe), [erasekit.ConceptSpec("star")])
    r = attack(pipe, "star", UnlearnDiffAtk(**TINY, early_stop=False), patch=neg, seeds=range(1), sets=("target",),
               cache=tmp_path / "c", sampling=SAMPLING, judge=StubJudge(never))
    assert r.record["attacked"] == 1 and len(r.adversarial.token_ids["<adv-0>"]) == TINY["prefix_k"]
    # each step's guarded prediction is one guided UNet call on two rows (the guard acts in the loss)
    steps = TINY["timesteps"] * TINY["iterations"]
    assert r.cost["unet_rows"] >= 2 * steps


def test_world_settings_are_valid_and_cpu_sized():
    cfg = UnlearnDiffAtkConfig(**UDA_WORLD)
    assert cfg.timesteps * cfg.iterations <= 400 and cfg.prefix_k <= 4  # world prompts take up to 14 of 20 tokens
    assert UnlearnDiffAtk.world_settings() == UDA_WORLD
    defaults = UnlearnDiffAtkConfig()
    assert (defaults.prefix_k, defaults.iterations, defaults.timesteps, defaults.lr, defaults.weight_decay) == \
        (5, 40, 50, 0.01, 0.1)


def test_bad_settings_are_one_line(world_pipe):
    for bad, match in (({"iterations": 0}, "iterations must be at least 1"),
                       ({"timesteps": 0}, "timesteps must be at least 1"),
                       ({"prefix_k": 0}, "prefix_k"), ({"lr": 0.0}, "lr"), ({"steps": 3}, "no setting")):
        with pytest.raises(InvalidInputError, match=match) as e:
            UnlearnDiffAtk(**bad)
        assert "\n" not in str(e.value)
    long = "an image of a pink star with a striped texture over a white background"  # 14 of the world's 20 tokens
    ctx = AttackContext(get_adapter(world_pipe), erasekit.ConceptSpec("star"), "shape", "star", None,
                        [Item(long, 0, "target", None)], {})
    with pytest.raises(InvalidInputError, match="prefix_k to at most 18") as e:  # no prompt could carry 19
        UnlearnDiffAtk(prefix_k=19).check(ctx)
    assert "\n" not in str(e.value)
    UnlearnDiffAtk(prefix_k=18).check(ctx)  # fits a shorter prompt: checked, not refused
    assert prefix_room(ctx.adapter, long, 5) == 4 and prefix_room(ctx.adapter, long + " " + long, 5) == 0


@pytest.mark.slow
def test_uda_lifts_success_against_uce_on_the_world(world_pipe, tmp_path):
    """Against UCE's erasure of star (world settings, seeds 0-3): more attacked images show a star than
    the edited model's own images do; each attacked item's record holds its objective's path (the
    sampled loss per timestep and, on fixed (t, noise) probes, the plain prompt's loss followed by the
    argmax prefix's after each timestep). The probe path does not reliably fall on the world (the
    straight-through gradient is too noisy to find the few helpful tokens): success comes from the
    early stop's checks, one candidate prefix per timestep."""
    edit = uce_edit(world_pipe)
    r = attack(world_pipe, "star", UnlearnDiffAtk(**UDA_WORLD), patch=edit, seeds=range(4), sets=("target",),
               cache=tmp_path / "c")
    assert r.detected_post.mean() > np.mean([it.detected_pre for it in r.items])
    assert all(r.detected_post[i] for i, it in enumerate(r.items) if it.detected_pre)
    for item in r.record["items"]:
        if item["attacked"]:
            assert len(item["objective_probe"]) == item["timesteps_run"] + 1 == len(item["objective_by_t"]) + 1
            assert all(np.isfinite(item["objective_probe"])) and item["objective_first"] > 0
