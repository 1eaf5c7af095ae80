"""Bad input: each a one-line erasekit error, nothing written."""

import json

import pytest
import torch

import erasekit
from erasekit.concepts import ConceptSpec, load_concepts
from erasekit.edits import PatchError, load_patch
from erasekit.errors import ErasekitError, InvalidInputError
from erasekit.solvers import SolveError
from tiny import tiny_sd, tiny_sdxl


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_sd(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("kwargs, match", [
    ({"target": "   "}, "empty"),
    ({"target": ""}, "empty"),
    ({"target": "star", "anchor": "Star"}, "itself as anchor"),
    ({"target": "star", "preserve": ("star",)}, "both erased and preserved"),
    ({"target": "star", "synonyms": ("pentagram",), "neighbours": ("pentagram",)}, "both erased and preserved"),
])
def test_bad_concepts(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        ConceptSpec(**kwargs)


def test_unknown_method_and_setting(sd):
    with pytest.raises(InvalidInputError, match="unknown method"):
        erasekit.erase(sd, "star", method="nope")
    with pytest.raises(InvalidInputError, match="no setting"):
        erasekit.erase(sd, "star", method="uce", lamb=1)


def test_non_finite_weights_are_a_clear_error(sd):
    name, mod = next((n, m) for n, m in sd.unet.named_modules() if n.endswith("attn2.to_k"))
    saved = mod.weight.detach().clone()
    with torch.no_grad():
        mod.weight[0, 0] = float("nan")
    try:
        with pytest.raises(SolveError, match="non-finite"):
            erasekit.erase(sd, "star", method="uce")
    finally:
        with torch.no_grad():
            mod.weight.copy_(saved)


def test_truncated_and_hand_edited_patches(sd, tmp_path):
    patch = erasekit.erase(sd, "star", method="uce")
    patch.save(tmp_path / "p")
    data = (tmp_path / "p" / "edit.safetensors").read_bytes()
    (tmp_path / "p" / "edit.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PatchError, match="truncated"):
        load_patch(tmp_path / "p")

    patch.save(tmp_path / "q")
    m = json.loads((tmp_path / "q" / "edit.json").read_text())
    m["config"]["lam"] = 123
    (tmp_path / "q" / "edit.json").write_text(json.dumps(m))
    with pytest.raises(PatchError, match="edited"):
        load_patch(tmp_path / "q")
    (tmp_path / "q" / "edit.json").write_text("{not json")
    with pytest.raises(PatchError, match="not valid JSON"):
        load_patch(tmp_path / "q")
    with pytest.raises(PatchError, match="does not exist"):
        load_patch(tmp_path / "missing")


def test_patch_for_another_model(sd, tmp_path):
    other = tiny_sd(tmp_path / "tok2", seed=1)
    patch = erasekit.erase(sd, "star", method="uce")
    before = {k: v.clone() for k, v in other.unet.state_dict().items()}
    with pytest.raises(PatchError, match="made for model"):
        patch.apply(other)
    assert all(torch.equal(v, before[k]) for k, v in other.unet.state_dict().items())
    patch.apply(other, force=True)
    patch.revert(other)
    assert all(torch.equal(v, before[k]) for k, v in other.unet.state_dict().items())


def test_sdxl_patch_on_sd_pipeline(sd, tmp_path):
    xl = tiny_sdxl(tmp_path / "tok3")
    patch = erasekit.erase(xl, "star", method="uce")
    with pytest.raises(PatchError, match="sdxl pipeline but the pipeline is sd"):
        patch.apply(sd)
    with pytest.raises(PatchError, match="sdxl pipeline"):
        patch.apply(sd, force=True)


def test_guard_fitted_on_another_model_or_family(sd, tmp_path):
    """SAFREE's edit carries the concept's embeddings of the model it was fitted on: on an SDXL pipeline's
    edit, or another SD model's, it is refused in one line (a prompt-only guard stays portable)."""
    xl = tiny_sdxl(tmp_path / "tok4")
    with pytest.raises(PatchError, match="sdxl pipeline but the pipeline is sd"):
        erasekit.erase(xl, "star", method="safree").apply(sd)
    other = tiny_sd(tmp_path / "tok5", seed=1)
    guard = erasekit.erase(other, "star", method="safree")
    with pytest.raises(PatchError, match="made for model"):
        guard.apply(sd)
    guard.apply(sd, force=True)
    guard.revert(sd)
    erasekit.erase(other, "star", method="negative-prompt").apply(sd).revert(sd)


def test_save_refuses_existing_folder_and_leaves_nothing_on_failure(sd, tmp_path):
    patch = erasekit.erase(sd, "star", method="uce")
    (tmp_path / "p").mkdir()
    with pytest.raises(ErasekitError, match="already exists"):
        patch.save(tmp_path / "p")
    with pytest.raises(ErasekitError, match="does not exist"):
        patch.save(tmp_path / "missing" / "p")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p"]


def test_concept_files(tmp_path, sd):
    (tmp_path / "c.txt").write_text("# styles\nstar\n\nheart  # shape\n")
    assert [c.target for c in load_concepts(tmp_path / "c.txt")] == ["star", "heart"]
    (tmp_path / "c.csv").write_text("target,anchor,synonyms\nstar,shape,pentagram;asterisk\nheart,,\n")
    cs = load_concepts(tmp_path / "c.csv")
    assert cs[0].anchor == "shape" and cs[0].synonyms == ("pentagram", "asterisk") and cs[1].anchor == ""
    (tmp_path / "c.json").write_text(json.dumps(["star", {"target": "heart", "preserve": ["circle"]}]))
    cs = load_concepts(tmp_path / "c.json")
    assert cs[1].preserve == ("circle",)
    (tmp_path / "bad.json").write_text(json.dumps([{"name": "x"}]))
    with pytest.raises(InvalidInputError, match="unknown concept field"):
        load_concepts(tmp_path / "bad.json")
    for bad in ({"target": "star", "preserve": 3}, {"target": "star", "synonyms": True},
                {"target": "star", "neighbours": {"heart": 1}}):
        (tmp_path / "typed.json").write_text(json.dumps([bad]))
        with pytest.raises(InvalidInputError, match="must be a list of phrases"):
            load_concepts(tmp_path / "typed.json")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(InvalidInputError, match="no concept"):
        load_concepts(tmp_path / "empty.txt")
    # a thousand concepts load and erase in one closed-form solve
    (tmp_path / "many.txt").write_text("\n".join(f"concept{i:04d}" for i in range(1000)))
    many = load_concepts(tmp_path / "many.txt")
    assert len(many) == 1000
    patch = erasekit.erase(sd, many, method="uce")
    assert len(patch.manifest["concepts"]) == 1000
