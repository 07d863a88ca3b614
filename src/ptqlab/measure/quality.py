"""Perplexity and KL divergence from the baseline, on the same non-overlapping token windows.

Perplexity, two protocols (PPL_PROTOCOLS). `gptq`, the protocol of GPTQ and the transformers docs with stride =
context: the evaluation text is tokenized once; window i is tokens [i*C, (i+1)*C) for C = the context (2,048);
the model sees each window on its own and predicts tokens 2..C of it from the tokens before them, so every token
except each window's first is scored exactly once; an incomplete last window is dropped. `llama.cpp`, the protocol
of its `perplexity` tool, so that figures compare with its published ones: windows of 512, each window's first
token replaced by BOS where the tokenizer adds one, and only the second half of each window scored (the model
always has at least C/2 tokens of context). Perplexity = exp(mean NLL over scored tokens).

KL divergence (as llama.cpp's `--kl-divergence` reports it): at every scored position, KL(P_base || P_variant)
of the next-token distributions; we report mean, median, 99th and 99.9th percentiles, maximum, and top-1 agreement
(how often the variant's most likely token is the baseline's: llama.cpp's "same top p"). Beside it, as llama.cpp
does, Δp: the probability the variant gives the token that actually comes next minus the baseline's, per position
(mean and percentiles), which says whether the variant loses confidence in the right answer, not only how its
distribution moved. The baseline's distributions are stored once, compactly, as
its top-k log-probabilities plus the log of the mass outside them; KL is then computed between the two
distributions coarsened to those k tokens + "everything else". That is a lower bound of the full-vocabulary
KL (coarsening never increases KL) and tight when the top k hold nearly all the mass, as they do for LMs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ptqlab.errors import PtqlabError
from ptqlab.models import model_device
from ptqlab.output import atomic_file
from ptqlab.progress import track


def make_windows(n_tokens: int, context: int, max_windows: int | None = None) -> list[tuple[int, int]]:
    """Non-overlapping [start, end) windows of `context` tokens; the first `max_windows` if given."""
    if context < 2:
        raise PtqlabError(f"--ppl-context {context}: a window needs at least 2 tokens")
    count = n_tokens // context
    if max_windows is not None:
        count = min(count, max_windows)
    if count == 0:
        raise PtqlabError(f"the evaluation text has {n_tokens} tokens, fewer than one window of {context}: use a smaller --ppl-context or a longer text")
    return [(i * context, (i + 1) * context) for i in range(count)]


@dataclass(frozen=True)
class PplProtocol:
    """How a window is scored: which positions, and what stands in its first place."""

    name: str
    context: int
    """The default window length (capped by the model's context)."""
    second_half: bool
    """Score only the second half of each window (llama.cpp), else every token but the first."""
    bos: bool
    """Replace each window's first token by BOS, where the tokenizer adds one (llama.cpp)."""

    def first(self, context: int) -> int:
        """The position whose logits predict the first scored token."""
        return context // 2 if self.second_half else 0

    def describe(self, context: int, bos_id: int | None) -> dict:
        """The protocol as the report prints it beside every perplexity."""
        first = self.first(context)
        return {"name": self.name, "windows": "non-overlapping (stride = context)", "context": context, "stride": context,
                "scored": (f"tokens {first + 2}..{context} of each window (the second half)" if self.second_half
                           else "every token but each window's first"),
                "bos": (f"each window starts with BOS (token {bos_id})" if bos_id is not None
                        else "as tokenized (no BOS inserted)"),
                "level": "tokens"}


PPL_PROTOCOLS = {p.name: p for p in (PplProtocol("gptq", 2048, second_half=False, bos=False),
                                     PplProtocol("llama.cpp", 512, second_half=True, bos=True))}


def ppl_protocol(name: str) -> PplProtocol:
    if name not in PPL_PROTOCOLS:
        raise PtqlabError(f"unknown --ppl-protocol {name!r}: use one of {', '.join(PPL_PROTOCOLS)}")
    return PPL_PROTOCOLS[name]


def tokens_digest(token_ids: torch.Tensor, windows: list[tuple[int, int]], first: int = 0, bos_id: int | None = None) -> str:
    """Identifies exactly which tokens were scored, so KL is only ever computed on the same positions."""
    h = hashlib.sha256()
    if first or bos_id is not None:  # the default protocol keeps the digests written before protocols existed
        h.update(f"first={first};bos={bos_id};".encode())
    for start, end in windows:
        h.update(f"{start}:{end};".encode())  # the same tokens cut into other windows are other positions
        h.update(token_ids[start:end].to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


# Below this, a remaining probability mass is float32 rounding noise of the top-k log-probs, not signal.
REST_FLOOR = 1e-10


def rest_mass(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """1 - sum(exp(top-k log-probs)) in float64, at least 0: the probability outside the top k."""
    return (1.0 - topk_logprobs.double().exp().sum(-1)).clamp(min=0.0)


@dataclass
class TopK:
    """The baseline's next-token distributions at every scored position, compactly, and the log-probability it gives
    the token that comes next (for Δp; None in files written before it was kept)."""

    ids: torch.Tensor  # [positions, k] int32, most likely first
    logprobs: torch.Tensor  # [positions, k] float32
    digest: str
    target_logprobs: torch.Tensor | None = None  # [positions] float32

    def save(self, path: Path) -> None:
        tensors = {"ids": self.ids.contiguous(), "logprobs": self.logprobs.contiguous()}
        if self.target_logprobs is not None:
            tensors["target_logprobs"] = self.target_logprobs.contiguous()
        with atomic_file(path) as tmp:
            save_file(tensors, tmp, metadata={"digest": self.digest})

    @classmethod
    def load(cls, path: Path) -> TopK:
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            digest = f.metadata()["digest"]
        tensors = load_file(path)
        return cls(tensors["ids"], tensors["logprobs"], digest, tensors.get("target_logprobs"))


def coarse_kl(base_ids: torch.Tensor, base_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(base || variant) per position over the base's top-k tokens + one bucket for the rest. [positions]"""
    p_log = base_logprobs.double()
    q_log = logprobs.gather(-1, base_ids.long()).double()
    p_rest, q_rest = rest_mass(base_logprobs), rest_mass(q_log)
    # p log(p/q) for the "everything else" bucket, with 0 log 0 = 0 and q floored at float32 noise level.
    rest = torch.xlogy(p_rest, p_rest) - torch.xlogy(p_rest, q_rest.clamp(min=REST_FLOOR))
    kl = (p_log.exp() * (p_log - q_log)).sum(-1) + rest
    return kl.clamp(min=0.0)  # >= 0 mathematically; clamp rounding noise


def standard_error(values: list[float]) -> float | None:
    """Standard error of the mean of `values` (None for fewer than two). Over windows, not tokens: neighbouring
    tokens' losses are correlated, equal windows of a text are close to independent samples."""
    if len(values) < 2:
        return None
    return float(torch.tensor(values, dtype=torch.float64).std() / len(values) ** 0.5)


def perplexity_change(window_nll: list[float], base_window_nll: list[float]) -> tuple[float, float | None]:
    """Perplexity change in percent against the baseline on the same windows, and its standard error (paired: the
    per-window difference of mean NLL, so the text's own variation cancels)."""
    diff = [a - b for a, b in zip(window_nll, base_window_nll)]
    mean = sum(diff) / len(diff)
    se = standard_error(diff)
    ratio = float(torch.tensor(mean, dtype=torch.float64).exp())
    return 100 * (ratio - 1), None if se is None else 100 * ratio * se


@dataclass
class QualityResult:
    nll_sum: float
    tokens: int
    windows: int
    context: int
    kl: torch.Tensor | None  # [positions] float64
    top1_agreement: float | None
    topk: TopK
    window_nll: list[float]  # mean NLL of each window
    delta_p: torch.Tensor | None = None  # [positions] float64: p_variant(next token) - p_baseline(next token)
    protocol: dict | None = None  # PplProtocol.describe(); None: the default (gptq) protocol

    @property
    def perplexity(self) -> float:
        return float(torch.tensor(self.nll_sum / self.tokens, dtype=torch.float64).exp())

    def summary(self) -> dict:
        se = standard_error(self.window_nll)
        out = {
            "perplexity": {"value": self.perplexity, "nll_mean": self.nll_sum / self.tokens, "tokens_scored": self.tokens,
                           "windows": self.windows, "context": self.context, "window_nll": self.window_nll,
                           "stderr": None if se is None else self.perplexity * se,
                           "protocol": self.protocol or PPL_PROTOCOLS["gptq"].describe(self.context, None)},
            "kl": None,
        }
        if self.kl is not None:
            out["kl"] = {
                "mean": float(self.kl.mean()), "median": float(self.kl.median()),
                "p99": float(torch.quantile(self.kl, 0.99)), "p99_9": float(torch.quantile(self.kl, 0.999)),
                "max": float(self.kl.max()), "top1_agreement_pct": 100.0 * self.top1_agreement,
                "positions": int(self.kl.numel()), "topk": int(self.topk.ids.shape[1]),
            }
        out["delta_p"] = None if self.delta_p is None else delta_p_summary(self.delta_p)
        return out


DELTA_P_PERCENTILES = (0.1, 1, 5, 10, 25, 50, 75, 90, 95, 99, 99.9)
"""The percentiles of Δp reported, llama.cpp's set."""


def delta_p_summary(delta_p: torch.Tensor) -> dict:
    """Δp per position (probability units) -> mean, its standard error, min, max and percentiles, in percent."""
    values = delta_p.double()
    quantiles = torch.quantile(values, torch.tensor([q / 100 for q in DELTA_P_PERCENTILES], dtype=torch.float64))
    return {"mean_pct": 100 * float(values.mean()),
            "stderr_pct": 100 * float(values.std() / values.numel() ** 0.5) if values.numel() > 1 else None,
            "min_pct": 100 * float(values.min()), "max_pct": 100 * float(values.max()),
            "percentiles_pct": {f"p{q:g}".replace(".", "_"): 100 * float(v) for q, v in zip(DELTA_P_PERCENTILES,
                                                                                          quantiles)},
            "positions": int(values.numel())}


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    token_ids: torch.Tensor,
    windows: list[tuple[int, int]],
    baseline: TopK | None = None,
    topk: int = 32,
    quiet: bool = False,
    protocol: PplProtocol = PPL_PROTOCOLS["gptq"],
    bos_id: int | None = None,
) -> QualityResult:
    """Score every window once: NLL for perplexity, KL and top-1 agreement against `baseline` if given. `bos_id`
    replaces each window's first token where the protocol asks for it (the caller knows whether the tokenizer adds
    BOS)."""
    device = model_device(model)
    context = windows[0][1] - windows[0][0]
    first = protocol.first(context)
    bos_id = bos_id if protocol.bos else None
    digest = tokens_digest(token_ids, windows, first, bos_id)
    if baseline is not None and baseline.digest != digest:
        raise PtqlabError("the baseline's stored distributions were computed on other tokens (another tokenizer, text or "
                          "window setting): benchmark the baseline again with the same settings")
    nll_sum, count, agree, offset = 0.0, 0, 0, 0
    kls, top_ids, top_logprobs, window_nll, target_logprobs, delta_p = [], [], [], [], [], []
    state = {"ppl": float("nan")}
    for start, end in track(windows, "perplexity", total=len(windows), quiet=quiet, status=lambda _: f"ppl {state['ppl']:.3f}"):
        ids = token_ids[start:end].to(device).unsqueeze(0)
        if bos_id is not None:
            ids = ids.clone()
            ids[0, 0] = bos_id
        # [C-1-first, vocab]: the predictions of tokens first+2..C
        logprobs = model(ids).logits[0, first:-1].float().log_softmax(-1)
        targets = ids[0, first + 1:]
        target = logprobs.gather(-1, targets.unsqueeze(-1))[:, 0]
        target_logprobs.append(target.cpu())
        window = float(-target.double().sum())
        window_nll.append(window / targets.numel())
        nll_sum += window
        count += targets.numel()
        state["ppl"] = float(torch.tensor(nll_sum / count).exp())
        values, indices = logprobs.topk(topk, dim=-1)
        top_ids.append(indices.to(torch.int32).cpu())
        top_logprobs.append(values.cpu())
        if baseline is not None:
            n = targets.numel()
            b_ids, b_logprobs = baseline.ids[offset:offset + n].to(device), baseline.logprobs[offset:offset + n].to(device)
            kls.append(coarse_kl(b_ids, b_logprobs, logprobs).cpu())
            agree += int((indices[:, 0] == b_ids[:, 0].long()).sum())
            if baseline.target_logprobs is not None:
                base = baseline.target_logprobs[offset:offset + n].double()
                delta_p.append(target.cpu().double().exp() - base.exp())
            offset += n
    own = TopK(torch.cat(top_ids), torch.cat(top_logprobs), digest, torch.cat(target_logprobs))
    kl = torch.cat(kls) if baseline is not None else None
    return QualityResult(nll_sum, count, len(windows), context, kl, None if kl is None else agree / count, own, window_nll,
                         torch.cat(delta_p) if delta_p else None, protocol.describe(context, bos_id))
