"""SPEED's row policy: the official code erases every token after SOT for nudity and the last subject
token otherwise (``token=auto``); both are reachable as settings."""

import torch
from tiny import tiny_sd

import erasekit
from erasekit.solvers import DTYPE


def test_nudity_takes_every_row_after_sot_as_the_official_code_does(tmp_path):
    pipe = tiny_sd(tmp_path)
    plain = dict(prior_filter=False, augment=0, constraints=False, retain_scale=0.7)
    auto = erasekit.erase(pipe, "nudity", method="speed", **plain)
    every = erasekit.erase(pipe, "nudity", method="speed", token="all", **plain)
    last = erasekit.erase(pipe, "nudity", method="speed", token="last", **plain)
    assert auto.manifest["erase_rows"] == "all" and last.manifest["erase_rows"] == "last"
    a, b, c = auto.tensors(), every.tensors(), last.tensors()
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.allclose(a[k], c[k]) for k in a)

    # by hand (no IPF, DPA or IEC; no retain prompts, so the null prompt's rows 1.. are retained):
    # dW = W0 (C_AE - C_EE) P (C_EE P + alpha I)^-1 with C_EE = E^T E and C_AE = A^T E over rows 1..L-1
    def rows(prompt):
        ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids)[0][0].to(DTYPE)

    e, anchor, null = rows("nudity")[1:], rows("")[1:], rows("")[1:]
    d = e.shape[-1]
    c_ee, c_ae = e.T @ e, anchor.T @ e
    evals, evecs = torch.linalg.eigh(null.T @ null / len(null))
    keep = evecs[:, evals < 0.1]
    p = keep @ keep.T
    m = torch.linalg.inv(c_ee @ p + 0.7 * torch.eye(d, dtype=DTYPE))
    for name, delta in a.items():
        w0 = dict(pipe.unet.named_parameters())[name.removeprefix("unet.")].detach().to(DTYPE)
        want = w0 @ (c_ae - c_ee) @ p @ m
        assert torch.allclose(delta.to(DTYPE), want, atol=1e-4 * float(want.abs().max()) + 1e-6), name


def test_several_prompts_are_averaged_as_the_official_code_averages_concepts(tmp_path):
    """C_EE and C_AE are means over erase prompts (the official code: over concepts, each one prompt) of the
    per-prompt sums over rows, so alpha means the same whatever the number of templates."""
    from erasekit.methods.closed_form import pairs

    pipe = tiny_sd(tmp_path)
    templates = ("{}", "a photo of {}", "an image of {}")
    plain = dict(prior_filter=False, augment=0, constraints=False, retain_scale=0.7, templates=templates)
    edit = erasekit.erase(pipe, "nudity", method="speed", **plain)

    def rows(prompt):
        ids = pipe.tokenizer([prompt], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            return pipe.text_encoder(ids)[0][0].to(DTYPE)[1:]

    er, an = pairs([erasekit.ConceptSpec("nudity")], templates)
    assert len(er) == 3
    c_ee = sum(rows(e).T @ rows(e) for e in er) / len(er)
    c_ae = sum(rows(a).T @ rows(e) for e, a in zip(er, an)) / len(er)
    null = rows("")
    d = null.shape[-1]
    evals, evecs = torch.linalg.eigh(null.T @ null / len(null))
    p = evecs[:, evals < 0.1] @ evecs[:, evals < 0.1].T
    m = torch.linalg.inv(c_ee @ p + 0.7 * torch.eye(d, dtype=DTYPE))
    for name, delta in edit.tensors().items():
        w0 = dict(pipe.unet.named_parameters())[name.removeprefix("unet.")].detach().to(DTYPE)
        want = w0 @ (c_ae - c_ee) @ p @ m
        assert torch.allclose(delta.to(DTYPE), want, atol=1e-4 * float(want.abs().max()) + 1e-6), name


def test_other_concepts_keep_the_last_subject_token(tmp_path):
    pipe = tiny_sd(tmp_path)
    auto = erasekit.erase(pipe, "star", method="speed")
    last = erasekit.erase(pipe, "star", method="speed", token="last")
    assert auto.manifest["erase_rows"] == "last"
    assert all(torch.equal(auto.tensors()[k], last.tensors()[k]) for k in auto.tensors())
