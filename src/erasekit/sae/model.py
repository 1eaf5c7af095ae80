"""A TopK sparse autoencoder (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

``z = TopK(ReLU(W_enc (s·x − b_dec) + b_enc))`` and ``x̂ = (W_dec z + b_dec) / s``, where ``s`` is a fixed
input scale (set once from the data so activations have mean squared norm ``d``) and the decoder's
latent directions (rows of ``W_dec``, shape (n_latents, d)) have unit norm. Dead latents (not fired for
``dead_tokens`` tokens) are trained by the AuxK loss: the residual is reconstructed from the ``aux_k``
largest pre-activations of dead latents, weighted 1/32.

BatchTopK (Bussmann et al. 2024; SAeUron trains this way): while training, the ``k × batch`` largest
pre-activations of the whole batch are kept, so a token may use more or fewer than k latents. At
inference a token is encoded on its own, with the global threshold ``threshold`` (a running mean of
the smallest activation each training batch kept): ``z = pre · [pre > threshold]``. The official
SAeUron code instead keeps BatchTopK at inference, which makes a token's code depend on the other
images of the batch (METHODS.md §4.1 [obs]); ours does not.

Why our own and not a library's: sae-lens (6.x) was read first. Its trainer is built around
language-model hook points and requires transformer-lens, datasets, plotly and nltk; training it on
arbitrary activation tensors (a UNet block's output per image and step) means working around its
activation store. dictionary-learning (0.1.0 on PyPI) pins nnsight < 0.4 and pulls in wandb, umap-learn,
circuitsvis, datasets and plotly, most of it for its activation buffer that reads a language model
through nnsight, which we would not use. The
TopK/BatchTopK SAE with AuxK is small (this module) and tested against a synthetic sparse dictionary it
must recover (tests/test_sae.py); its training loop is ``sae/train.py``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidInputError
from ..io import atomic_dir

WEIGHTS = "sae.safetensors"
CONFIG = "config.json"
RECORD = "training.json"
FORMAT = "erasekit.TopKSAE"


class TopKSAE(nn.Module):
    """TopK SAE over ``d_in``-dimensional tokens with ``n_latents`` latents, ``k`` active per token."""

    def __init__(self, d_in: int, n_latents: int, k: int, meta: dict[str, Any] | None = None,
                 batch_topk: bool = False) -> None:
        super().__init__()
        if not 1 <= k <= n_latents:
            raise InvalidInputError(f"k={k} must lie between 1 and n_latents={n_latents}")
        self.d_in, self.n_latents, self.k, self.batch_topk = d_in, n_latents, k, bool(batch_topk)
        self.meta: dict[str, Any] = dict(meta or {})  # site, model fingerprint, ...: stored in config.json
        self.W_enc = nn.Parameter(torch.zeros(d_in, n_latents))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(torch.zeros(n_latents, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("scale", torch.ones(()))
        if self.batch_topk:  # the inference threshold (only BatchTopK SAEs have one)
            self.register_buffer("threshold", torch.zeros(()))

    # -- initialisation -------------------------------------------------------------------------
    @torch.no_grad()
    def init_from(self, x: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Gao et al.'s init: random unit-norm decoder, encoder its transpose, ``b_dec`` the (scaled)
        data mean; ``scale`` so the scaled data has mean squared norm ``d_in``."""
        x = x.float()
        self.scale.fill_(float((self.d_in / x.pow(2).sum(-1).mean().clamp_min(1e-12)).sqrt()))
        w = torch.randn(self.n_latents, self.d_in, generator=generator)
        self.W_dec.copy_(w / w.norm(dim=-1, keepdim=True))
        self.W_enc.copy_(self.W_dec.T)
        self.b_enc.zero_()
        self.b_dec.copy_((x * self.scale).mean(0))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Give every latent's decoder direction unit norm (call after each optimiser step)."""
        self.W_dec.div_(self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_grads(self) -> None:
        """Drop the gradient component along each decoder direction (it only changes the norm)."""
        if self.W_dec.grad is not None:
            g, w = self.W_dec.grad, self.W_dec
            g.sub_((g * w).sum(-1, keepdim=True) * w)

    # -- forward --------------------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """ReLU(W_enc(s·x − b_dec) + b_enc): the dense, non-negative latent activations."""
        return torch.relu((x * self.scale - self.b_dec) @ self.W_enc + self.b_enc)

    def topk(self, acts: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """Keep the ``k`` largest entries of each row, zero the rest."""
        vals, idx = acts.topk(self.k if k is None else k, dim=-1)
        return torch.zeros_like(acts).scatter(-1, idx, vals)

    def batch_topk_codes(self, acts: torch.Tensor) -> torch.Tensor:
        """BatchTopK: keep the ``k × rows`` largest entries of the whole (rows, n_latents) batch."""
        flat = acts.reshape(-1)
        vals, idx = flat.topk(min(self.k * acts.shape[0], flat.numel()))
        return torch.zeros_like(flat).scatter(0, idx, vals).reshape(acts.shape)

    def train_codes(self, acts: torch.Tensor) -> torch.Tensor:
        """The codes training sees: per-token TopK, or BatchTopK over the batch."""
        return self.batch_topk_codes(acts) if self.batch_topk else self.topk(acts)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(..., d_in) activations -> (..., n_latents) sparse codes: at most k nonzeros per token (TopK), or
        the pre-activations above the learned threshold (BatchTopK); each token encoded on its own."""
        pre = self.pre_acts(x)
        if self.batch_topk:
            return pre * (pre > self.threshold)
        return self.topk(pre)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(..., n_latents) codes -> (..., d_in) activations, in the input's units."""
        return (z @ self.W_dec + self.b_dec) / self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def losses(self, x: torch.Tensor, dead: torch.Tensor | None = None, aux_k: int = 256,
               aux_coef: float = 1 / 32) -> dict[str, torch.Tensor]:
        """Normalised MSE (of the scaled data), the AuxK loss over the ``dead`` latents (bool mask) and
        the codes; ``loss`` is their weighted sum."""
        xs = x * self.scale
        pre = torch.relu((xs - self.b_dec) @ self.W_enc + self.b_enc)
        z = self.train_codes(pre)
        recon = z @ self.W_dec + self.b_dec
        var = (xs - xs.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
        mse = (recon - xs).pow(2).sum(-1).mean() / var
        aux = torch.zeros((), device=x.device)
        n_dead = int(dead.sum()) if dead is not None else 0
        if n_dead:
            resid = (xs - recon).detach()
            masked = pre.masked_fill(~dead, 0.0)
            z_aux = self.topk(masked, min(aux_k, n_dead))
            e_hat = z_aux @ self.W_dec
            rvar = (resid - resid.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
            aux = (e_hat - resid).pow(2).sum(-1).mean() / rvar
            aux = torch.nan_to_num(aux, nan=0.0)
        return {"loss": mse + aux_coef * aux, "mse": mse, "aux": aux, "z": z}

    def check_for(self, adapter: Any, site: str | None, d_in: int | None = None) -> None:
        """One-line InvalidInputError unless this SAE was trained at ``site`` (a full module name; None: any
        site) of ``adapter``'s base model (by the fingerprint it recorded, when it recorded one) on tokens of
        width ``d_in`` (when given)."""
        trained_site = self.meta.get("site")
        if site is not None and trained_site is not None and trained_site != site:
            raise InvalidInputError(f"this SAE was trained at site {trained_site!r}, not {site!r}; train one for "
                                    f"{site!r} or use its own site")
        want = self.meta.get("model_fingerprint")
        have = adapter.fingerprint() if want is not None and hasattr(adapter, "fingerprint") else None
        if want is not None and have is not None and want != have:
            raise InvalidInputError(f"this SAE was trained for another model (fingerprint {want}, this model's is "
                                    f"{have}); train an SAE on this model")
        if d_in is not None and d_in != self.d_in:
            raise InvalidInputError(f"this SAE takes {self.d_in}-channel activations but the site gives {d_in}; "
                                    "train an SAE for this site")

    # -- carried inside other files (an edit) ---------------------------------------------------
    def to_tensors(self, prefix: str = "sae.") -> dict[str, torch.Tensor]:
        """The SAE's tensors (float32, CPU) under ``prefix``, for an edit to carry."""
        return {prefix + n: t.detach().to("cpu", torch.float32).contiguous() for n, t in self.state_dict().items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any], prefix: str = "sae.") -> TopKSAE:
        """The SAE an edit carries: ``config`` as :meth:`config` wrote it, the tensors under ``prefix``."""
        sae = cls(int(config["d_in"]), int(config["n_latents"]), int(config["k"]), config.get("meta"),
                  batch_topk=bool(config.get("batch_topk", False)))
        own = {n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)}
        if set(own) != set(sae.state_dict()):
            raise InvalidInputError(f"the edit's SAE tensors ({', '.join(sorted(own)) or 'none'}) do not match its SAE "
                                    "config; re-create the edit")
        sae.load_state_dict({n: t.float() for n, t in own.items()})
        return sae.eval()

    def digest(self) -> str:
        """sha256 (16 hex digits) of the config and every tensor: names an SAE independent of its folder."""
        import hashlib

        h = hashlib.sha256(json.dumps({k: v for k, v in self.config().items() if k != "meta"}, sort_keys=True).encode())
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    # -- persistence ----------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        out = {"format": FORMAT, "d_in": self.d_in, "n_latents": self.n_latents, "k": self.k, "meta": self.meta}
        if self.batch_topk:
            out["batch_topk"] = True
        return out

    def save(self, path: str | Path, record: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
        """Write ``sae.safetensors``, ``config.json`` and (given) ``training.json`` into the folder ``path``,
        atomically."""
        from safetensors.torch import save_file

        tensors = {n: t.detach().cpu().contiguous() for n, t in self.state_dict().items()}
        with atomic_dir(path, overwrite=overwrite) as tmp:
            save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FORMAT})
            (tmp / CONFIG).write_text(json.dumps(self.config(), indent=2, sort_keys=True) + "\n")
            if record is not None:
                (tmp / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> TopKSAE:
        """The SAE saved in the folder ``path``; a one-line InvalidInputError when it is not one."""
        p = Path(path)
        hint = "pass a folder written by erasekit's SAE trainer"
        if not p.is_dir():
            raise InvalidInputError(f"SAE folder {p} does not exist or is not a folder; {hint}")
        try:
            cfg = json.loads((p / CONFIG).read_text())
            if not isinstance(cfg, dict) or cfg.get("format") != FORMAT:
                raise ValueError("not an erasekit TopK SAE config")
            d, n, k = (cfg[key] for key in ("d_in", "n_latents", "k"))
            if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (d, n, k)) or k > n:
                raise ValueError("d_in, n_latents, k must be positive integers with k <= n_latents")
            meta = cfg.get("meta") or {}
            batch_topk = cfg.get("batch_topk", False)
            if not isinstance(batch_topk, bool):
                raise TypeError("batch_topk must be true or false")
        except FileNotFoundError:
            raise InvalidInputError(f"SAE folder {p} has no {CONFIG}; {hint}") from None
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise InvalidInputError(f"SAE folder {p}: {CONFIG} is unreadable ({_one_line(e)}); {hint}") from None
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(p / WEIGHTS))
        except FileNotFoundError:
            raise InvalidInputError(f"SAE folder {p} has no {WEIGHTS}; {hint}") from None
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise InvalidInputError(f"SAE folder {p}: {WEIGHTS} is corrupt ({_one_line(e)}); {hint}") from None
        sae = cls(d, n, k, meta, batch_topk=batch_topk)
        expected = {name: tuple(t.shape) for name, t in sae.state_dict().items()}
        got = {name: tuple(t.shape) for name, t in tensors.items()}
        if got != expected:
            diff = sorted(set(expected) ^ set(got)) or [nm for nm in expected if expected[nm] != got[nm]]
            raise InvalidInputError(f"SAE folder {p}: {WEIGHTS} does not match {CONFIG} (tensor {diff[0]}: expected "
                                    f"{expected.get(diff[0])}, found {got.get(diff[0])}); {hint}")
        if not all(t.dtype.is_floating_point and bool(torch.isfinite(t).all()) for t in tensors.values()):
            raise InvalidInputError(f"SAE folder {p}: {WEIGHTS} holds non-float or non-finite values; {hint}")
        sae.load_state_dict({n_: t.float() for n_, t in tensors.items()})
        return sae.to(device)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200] or type(e).__name__


def load_record(path: str | Path) -> dict[str, Any] | None:
    """The training record saved with an SAE, or None when there is none."""
    f = Path(path) / RECORD
    return json.loads(f.read_text()) if f.is_file() else None


@torch.no_grad()
def metrics(sae: TopKSAE, x: torch.Tensor, batch: int = 8192) -> dict[str, float]:
    """Fraction of variance explained (1 − MSE/Var, over all dimensions), mean L0 and the fraction of
    latents that fire on no token of ``x``."""
    err = torch.zeros(())
    l0 = 0.0
    fired = torch.zeros(sae.n_latents, dtype=torch.bool)
    x = x.float()
    mean = x.mean(0)
    var = (x - mean).pow(2).sum()
    for i in range(0, len(x), batch):
        xb = x[i:i + batch].to(sae.W_enc.device)
        z = sae.encode(xb)
        err += (sae.decode(z) - xb).pow(2).sum().cpu()
        nz = z > 0
        l0 += float(nz.sum())
        fired |= nz.any(0).cpu()
    return {"fve": float(1 - err / var.clamp_min(1e-12)), "l0": l0 / max(len(x), 1),
            "dead_fraction": float(1 - fired.float().mean()), "mse": float(err / (len(x) * x.shape[-1]))}
