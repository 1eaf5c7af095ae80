"""RECE's own pieces: the closed-form adversarial embedding and what each round achieves."""

import torch

import erasekit
from erasekit.methods.rece import adversarial_embeddings
from tiny import tiny_sd


def test_adversarial_embedding_is_the_ridge_optimum():
    g = torch.Generator().manual_seed(0)
    d, gamma = 12, 0.3
    cur = {f"l{i}": torch.randn(7 + i, d, generator=g, dtype=torch.float64) for i in range(3)}
    orig = {n: w + 0.1 * torch.randn(w.shape, generator=g, dtype=torch.float64) for n, w in cur.items()}
    c = torch.randn(5, d, generator=g, dtype=torch.float64)
    adv = adversarial_embeddings(cur, orig, c, gamma).requires_grad_(True)
    loss = sum(((adv @ cur[n].T - c @ orig[n].T) ** 2).sum() for n in cur) + gamma * (adv ** 2).sum()
    (grad,) = torch.autograd.grad(loss, adv)
    assert grad.abs().max() < 1e-9 * (1 + float(adv.abs().max()))


def test_rounds_close_the_gap_they_find_and_attack_the_bare_phrase_by_default(tmp_path):
    pipe = tiny_sd(tmp_path)
    spec = erasekit.ConceptSpec("star", preserve=("circle",))
    templates = ("{}", "a photo of a {}", "a {} on grass")
    bare = erasekit.erase(pipe, spec, method="rece", templates=templates, rounds=2)
    every = erasekit.erase(pipe, spec, method="rece", templates=templates, rounds=2, adv_on_templates=True)
    for patch in (bare, every):
        assert len(patch.manifest["rounds"]) == 2
        for r in patch.manifest["rounds"]:
            # the adversarial rows regenerate the concept's K/V under the weights they were found for,
            # and no longer do once the round has erased them
            assert r["recovery_gap_before"] < 0.5 * r["recovery_gap_after"], r
    assert any(not torch.equal(bare.deltas[k], every.deltas[k]) for k in bare.deltas)
    assert bare.manifest["config"]["adv_on_templates"] is False
