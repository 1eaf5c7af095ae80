"""UCE's token policies against float64 references of the official scripts, written here from the
encoder outputs alone (no erasekit row or solver code):

- ``token="all"``: the original ``train-scripts/train_erase.py`` (``edit_model``, commits 18287f6
  and bd5fb51 of rohitgandikota/unified-concept-editing): erase rows from each prompt's last
  subject token to the end (EOT and padding included), the pair cut to ``L - max(last, last_guide)``
  rows so they align; every row of each preserve prompt; ``['']`` preserved when there is no
  preserve list; ``preserve_scale`` 0.1.
- ``token="last"``: the current ``trainscripts/uce_sd_erase.py``: last subject token rows only,
  ``preserve_scale`` 1.
- ``token="from_last"``: erasekit 0.1's ``all`` (erase rows as ``all``; preserve rows up to EOT;
  nothing added without a preserve list; ``preserve_scale`` 1).

Both build ``W = (lam W0 + s_e sum W0 g c^T + s_p sum W0 p p^T)(lam I + s_e sum c c^T + s_p sum p p^T)^-1``
from sums (not means).
"""

from __future__ import annotations

import pytest
import torch

import erasekit
from erasekit.adapters import get_adapter
from erasekit.concepts import ConceptSpec
from erasekit.errors import InvalidInputError
from erasekit.methods.uce import UCEConfig
from tiny import tiny_sd

F64 = torch.float64
LAM, S_E = 0.5, 1.0

#: erase/anchor pairs with every length relation: guide shorter, longer, equal, and the empty guide
CONCEPTS = [ConceptSpec("red star", anchor="circle"), ConceptSpec("heart", anchor="a blue square"),
            ConceptSpec("cross", anchor="")]
PRESERVE = ("triangle", "a green circle on a grass background")


def _with_preserve(specs: list[ConceptSpec], preserve: tuple[str, ...]) -> list[ConceptSpec]:
    return [ConceptSpec(s.target, anchor=s.anchor, preserve=preserve) for s in specs]


def _last(length: int) -> int:
    """Index of the last subject token: attention_mask.sum() - 2 (0 = SOT for '')."""
    return max(int(length) - 2, 0)


def reference(pipe, specs: list[ConceptSpec], token: str) -> dict[str, torch.Tensor]:
    """Official closed form per "unet.<module>.weight", in float64, as the scripts build it."""
    ad = get_adapter(pipe)
    erase = [s.target for s in specs]
    # the original swaps a '' guide for ' ' (same tokens); the current script encodes '' as is
    guide = [(" " if s.anchor == "" and token == "all" else s.anchor) for s in specs]
    keep = list(dict.fromkeys(p for s in specs for p in s.preserve))
    s_p = 0.1 if token == "all" else 1.0
    if token == "all" and not keep:
        keep = [""]
    e, g = ad.encode(erase), ad.encode(guide)
    big_l = e.embeds.shape[1]
    cs, gs = [], []
    for i in range(len(erase)):
        fi, fn = _last(e.lengths[i]), _last(g.lengths[i])
        if token == "last":
            cs.append(e.embeds[i, fi:fi + 1])
            gs.append(g.embeds[i, fn:fn + 1])
        else:  # old_emb[fi : L - max(0, far - fi)], new_emb[fn : L - max(0, far - fn)]
            far = max(fi, fn)
            cs.append(e.embeds[i, fi:big_l - max(0, far - fi)])
            gs.append(g.embeds[i, fn:big_l - max(0, far - fn)])
            assert len(cs[-1]) == len(gs[-1]) == big_l - far
    c, v = torch.cat(cs).to(F64), torch.cat(gs).to(F64)
    ps = []
    if keep:
        p_enc = ad.encode(keep)
        for i in range(len(keep)):
            if token == "all":
                ps.append(p_enc.embeds[i])  # all L rows, padding included
            elif token == "last":
                j = _last(p_enc.lengths[i])
                ps.append(p_enc.embeds[i, j:j + 1])
            else:
                ps.append(p_enc.embeds[i, : int(p_enc.lengths[i])])
    p = torch.cat(ps).to(F64) if ps else torch.zeros(0, c.shape[1], dtype=F64)
    out = {}
    for name, mod in ad.modules("cross_attn_kv").items():
        w0 = mod.weight.detach().to("cpu", F64)
        mat1 = LAM * w0 + S_E * (w0 @ v.T) @ c + s_p * (w0 @ p.T) @ p
        mat2 = LAM * torch.eye(w0.shape[1], dtype=F64) + S_E * c.T @ c + s_p * p.T @ p
        out[f"{name}.weight"] = torch.linalg.solve(mat2, mat1.T).T - w0  # mat2 is symmetric
    return out


def relative_differences(pipe, specs: list[ConceptSpec], token: str) -> dict[str, float]:
    patch = erasekit.erase(pipe, specs, method="uce", token=token)
    ref = reference(pipe, specs, token)
    assert set(patch.deltas) == set(ref)
    return {k: float((patch.deltas[k].to(F64) - r).norm() / r.norm()) for k, r in ref.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_sd(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("token", ["all", "last", "from_last"])
@pytest.mark.parametrize("preserve", [(), PRESERVE], ids=["no-preserve", "preserve"])
@pytest.mark.parametrize("model", ["tiny", "world"])
def test_uce_matches_official_closed_form(request, model, token, preserve):
    pipe = request.getfixturevalue("tiny" if model == "tiny" else "world_pipe")
    diffs = relative_differences(pipe, _with_preserve(CONCEPTS, preserve), token)
    assert max(diffs.values()) < 1e-6, diffs


def test_all_differs_from_from_last(tiny):
    """'all' (original) and 'from_last' (erasekit 0.1) share erase rows but not the preserve set."""
    for preserve in ((), PRESERVE):
        specs = _with_preserve(CONCEPTS, preserve)
        a = erasekit.erase(tiny, specs, method="uce", token="all").deltas
        b = erasekit.erase(tiny, specs, method="uce", token="from_last").deltas
        assert any((a[k] - b[k]).norm() > 1e-3 * a[k].norm() for k in a)


def test_preserve_scale_default_follows_token_policy(tiny):
    assert UCEConfig(token="all").effective_preserve_scale == 0.1
    assert UCEConfig(token="last").effective_preserve_scale == 1.0
    assert UCEConfig(token="from_last").effective_preserve_scale == 1.0
    assert UCEConfig(token="all", preserve_scale=1.0).effective_preserve_scale == 1.0
    # an explicit 0.1 on 'all' is the default; an explicit 1.0 is not
    kw = dict(method="uce", token="all", preserve="triangle")
    d0 = erasekit.erase(tiny, "star", **kw).deltas
    d1 = erasekit.erase(tiny, "star", preserve_scale=0.1, **kw).deltas
    d2 = erasekit.erase(tiny, "star", preserve_scale=1.0, **kw).deltas
    assert all(torch.equal(d0[k], d1[k]) for k in d0)
    assert any(not torch.allclose(d0[k], d2[k]) for k in d0)
    with pytest.raises(InvalidInputError, match="token"):
        erasekit.erase(tiny, "star", method="uce", token="every")


@pytest.mark.parametrize("token", ["all", "from_last"])
def test_rece_accepts_the_token_policies(tiny, token):
    patch = erasekit.erase(tiny, "star", method="rece", uce_token=token, rounds=1)
    assert patch.deltas and all(torch.isfinite(d).all() for d in patch.deltas.values())
