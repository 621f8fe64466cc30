"""Empirical privacy audit from one training run: a lower bound on epsilon to set beside the accountant's.

Why: the epsilon a client reports is an *upper* bound, and it holds only if the code does what the
accountant assumes (Gaussian noise of the stated size at every step, Poisson sampling, clipping). Nothing
in the ledger can show that the noise was really added: the accountant is told the noise multiplier, it
does not measure it. A one-run audit measures the other side. It hides m canaries in one client's data,
each included by an independent fair coin, lets the run train once, and asks an adversary to tell which
canaries were in. Whatever the adversary gets right beyond chance is turned into a *lower* bound on the
epsilon of the mechanism that actually ran. A lower bound above the reported epsilon proves (at the stated
confidence) that the implementation leaks more than it claims; a lower bound below it proves nothing about
privacy, it only fails to find a bug (``docs/privacy.md``, "Empirical audit").

Method: Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023,
arXiv:2305.08846 (cited below as [SNJ23]; numbers of sections and results are those of arXiv v1; the implementation
reproduces the bounds the paper prints, see tests/test_empirical.py):

1. canaries x_1..x_m; S_i in {-1, +1} by fair coins; the training set holds the x_i with S_i = +1
   ([SNJ23], the auditing game: canaries are added or removed independently);
2. train once; the adversary scores every canary from what it sees and guesses T_i = +1 for the k_+
   highest scores, T_i = -1 for the k_- lowest, and abstains (T_i = 0) on the rest;
3. with r = k_+ + k_- guesses of which v are correct, the largest epsilon at which an (epsilon, delta)-DP
   mechanism would make v or more correct guesses with probability below 1 - confidence is the lower bound
   (:func:`p_value`, :func:`epsilon_lower_bound`).

Adversaries: only the **black-box** one is implemented: it sees the final global model (what every
institution and anyone the model is shared with sees) and scores a canary by minus its loss. A white-box
adversary would score the audited client's own updates; under secure aggregation nobody outside the node
ever sees those, so it would have to run inside the client, and it is left out (``docs/privacy.md``).

Secrecy of the coins: the canary texts and labels follow from ``empirical_audit.seed`` (the adversary may
know them; the paper's adversary does), the coins come from the operating system's CSPRNG and are written
only to ``DIR/empirical/canaries.json`` (the auditor's) and, as the list of included rows, to the audited
client's own folder. Nothing about them is in ``config.toml`` or in any message to the coordinator.
"""

from __future__ import annotations

import json
import math
import os
import secrets
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedllm.errors import ConfigError, FedllmError

if TYPE_CHECKING:
    import torch

    from fedllm.client import NodeAssets
    from fedllm.config import FederationConfig
    from fedllm.runspec import RunSpec

AUDIT_DIR = "empirical"  # DIR/empirical/: the auditor's files (and a re-run, when `fedllm audit --empirical` makes one)
SECRET_FILE = "canaries.json"  # DIR/empirical/canaries.json: every canary and its coin
RESULT_FILE = "result.json"  # DIR/empirical/result.json: scores, guesses and the bound
CLIENT_FILE = "canaries.json"  # DIR/clients/<id>/canaries.json: the included canaries only (the client's extra rows)
RERUN_DIR = "rerun"  # DIR/empirical/rerun/: the run's config re-run with canaries
ADVERSARIES = ("black-box",)
EMPIRICAL_VIOLATION = "empirical privacy violation"  # the audit finding's kind

# ---------------------------------------------------------------------------------------------- the bound


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """An upper bound on P[at least v of r guesses are correct] when the mechanism is (epsilon, delta)-DP.

    [SNJ23] Corollary 5.4, the (eps, delta) form of their main theorem, as coded in their Appendix D
    (``p_value_DP_audit``): with
    q = e^eps / (1 + e^eps) (the accuracy of eps-DP randomized response) and
    f(w) = P[Binomial(r, q) >= w],

        P[W >= v]  <=  f(v) + 2 m delta * max_{i = 1..v} (f(v - i) - f(v)) / i,

    where W is the number of correct guesses. The first term is the pure-DP bound (delta = 0: W is
    stochastically dominated by Binomial(r, q), the paper's main theorem); the second is how the paper
    pays for delta, summed over the m canaries (not the r guesses), which is why it grows with m.
    Capped at 1.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if not (epsilon >= 0 and 0 <= delta <= 1):
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    from scipy.stats import binom

    q = 1.0 / (1.0 + math.exp(-epsilon)) if epsilon < 700 else 1.0
    tail = float(binom.sf(v - 1, r, q))  # f(v)
    alpha = 0.0
    if v > 0 and delta > 0:
        # f(v - i) - f(v) = P[v > Binomial(r, q) >= v - i] = sum_{j=1..i} pmf(v - j)
        gaps = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))
        alpha = max(0.0, float(np.max(gaps / np.arange(1, v + 1))))
    return min(1.0, tail + 2.0 * m * delta * alpha)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest epsilon that v correct guesses out of r rule out at ``confidence``: eps such that
    ``p_value(m, r, v, eps, delta) < 1 - confidence``.

    The search of [SNJ23] Appendix D (``get_eps_audit``): the p-value grows with epsilon, so an upper end
    is found by steps of 1 and the crossing is bisected 30 times; the lower end is returned, so the answer
    errs on the side of a smaller (weaker) bound. 0 when even epsilon = 0 is not rejected, i.e. when the
    guesses are no better than chance at this confidence.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    beta = 1.0 - confidence
    lo, hi = 0.0, 1.0
    if p_value(m, r, v, lo, delta) >= beta:
        return 0.0
    while p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, hi + 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


# ---------------------------------------------------------------------------------------------- canaries

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


@dataclass(frozen=True)
class Canary:
    """One audit row: a sentence no real data set contains, with a label drawn at random.

    Random labels make a canary informative: the model can only fit it by memorising it, so a low loss
    on it is evidence that it was trained on.
    """

    text: str
    label: int


def make_canaries(m: int, num_labels: int, seed: int, words: int = 8) -> tuple[Canary, ...]:
    """m distinct sentences of pronounceable nonsense words, labels uniform over ``num_labels``.

    A pure function of (m, num_labels, seed): the candidate set is public, as in [SNJ23]; only the coins
    are secret. Nonsense words split into rare word pieces, so canaries share little with real text and
    barely with each other: memorising one does not help guess another.
    """
    from fedllm.data import _rng

    rng = _rng(seed, "empirical-canaries")
    seen: set[str] = set()
    out: list[Canary] = []
    while len(out) < m:
        sentence = " ".join(
            "".join(rng.choice(list(_CONSONANTS)) + rng.choice(list(_VOWELS)) for _ in range(int(rng.integers(2, 4))))
            for _ in range(words)
        )
        if sentence in seen:
            continue
        seen.add(sentence)
        out.append(Canary(sentence, int(rng.integers(num_labels))))
    return tuple(out)


def draw_coins(m: int) -> list[bool]:
    """Independent fair coins from the OS CSPRNG: nobody, not even who knows the seed, can predict them."""
    return [secrets.randbits(1) == 1 for _ in range(m)]


def audited_client(config: FederationConfig) -> str:
    return config.empirical_audit.client or config.clients[0].id


def guess_counts(config: FederationConfig) -> tuple[int, int]:
    """(k_+, k_-): how many canaries the adversary calls "in" (lowest loss) and "out" (highest loss).

    Fixed by the config before the run: choosing k after seeing the scores would be a multiple test and
    void the confidence.
    """
    a = config.empirical_audit
    k = a.guesses if a.guesses is not None else max(1, round(a.guess_fraction * a.canaries))
    k_in = round(k * a.in_share)
    return k_in, k - k_in


# ---------------------------------------------------------------------------------------------- files


def _write_json(path: Path, data: Any, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    if private:
        os.chmod(tmp, 0o600)
    tmp.replace(path)


def prepare(spec: RunSpec) -> None:
    """Before the run: canaries, secret coins, and the audited client's extra rows. Idempotent (a resumed
    run keeps its canaries and coins: new coins mid-run would void the audit)."""
    cfg = spec.config
    a = cfg.empirical_audit
    if not a.enabled:
        return
    secret_path = spec.out_dir / AUDIT_DIR / SECRET_FILE
    client = audited_client(cfg)
    if secret_path.is_file():
        secret = json.loads(secret_path.read_text(encoding="utf-8"))
    else:
        from fedllm.runspec import federation_data

        labels = len(federation_data(cfg).label_names)
        canaries = make_canaries(a.canaries, labels, a.seed)
        coins = draw_coins(a.canaries)
        secret = {
            "client": client,
            "seed": a.seed,
            "canaries": [{**asdict(c), "included": inc} for c, inc in zip(canaries, coins, strict=True)],
        }
        _write_json(secret_path, secret, private=True)
    included = [c for c in secret["canaries"] if c["included"]]
    _write_json(
        spec.client_dir(client) / CLIENT_FILE,
        {"texts": [c["text"] for c in included], "labels": [c["label"] for c in included]},
        private=True,
    )


def client_assets(config: FederationConfig, client_id: str, state_dir: Path) -> NodeAssets | None:
    """The audited client's data with its included canaries added; None for every other client (and when
    no audit is configured), which leaves :class:`fedllm.client.FedClient` on its usual data."""
    if not config.empirical_audit.enabled or client_id != audited_client(config):
        return None
    return _canary_assets(config, client_id, str(state_dir / CLIENT_FILE))


@lru_cache(maxsize=8)
def _canary_assets(config: FederationConfig, client_id: str, path: str) -> NodeAssets:
    """Cached like the client's own assets: the node tokenizes once per run, not once per round."""
    from fedllm.client import _assets, assets_for
    from fedllm.data import TextDataset

    try:
        extra = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(
            f"empirical_audit: client '{client_id}' is audited but {path} is missing (the run was not prepared"
            " by fedllm.empirical.prepare)"
        ) from None
    base = _assets(config, client_id)
    train = base.split.train
    train = TextDataset(train.texts + tuple(extra["texts"]), train.labels + tuple(int(x) for x in extra["labels"]))
    return assets_for(config, replace(base.split, train=train), base.num_labels)


# ---------------------------------------------------------------------------------------------- scoring


def canary_log_probs(model: torch.nn.Module, texts: list[str], config: FederationConfig) -> np.ndarray:
    """The black-box adversary's view: the model's log-probability of every label for each canary (m x C).

    The canaries go in as any client row would: tokens, or (head mode) the frozen encoder's features.
    """
    import torch

    from fedllm.data import TextDataset
    from fedllm.features import node_dataset
    from fedllm.model import pick_device
    from fedllm.training import collate_for, logits_of

    data = node_dataset(config.model, TextDataset(tuple(texts), (0,) * len(texts)))
    batch_of = collate_for(data)
    device = pick_device(config.training.device)
    model.to(device).eval()
    out = []
    batch = config.training.eval_batch_size
    with torch.no_grad():
        for start in range(0, len(data), batch):
            *inputs, _ = (
                t.to(device) for t in batch_of([data[i] for i in range(start, min(start + batch, len(data)))])
            )
            out.append(torch.log_softmax(logits_of(model, inputs), dim=-1).cpu())
    model.train()
    return torch.cat(out).numpy().astype(float)


def black_box_scores(log_probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Membership score: log p(y_i | x_i) minus the mean of log p(y_i | x) over all m canaries x.

    The plain loss is a poor score here: on nonsense text a model predicts much the same label for every
    canary, so the canaries whose random label happens to be that one have a low loss whether or not they
    were trained on. Subtracting, per label, the average over all candidates (which the adversary knows,
    and which does not depend on the coins) leaves what training on x_i itself did to its label. Any
    function of the released model and the public candidates is a valid adversary for [SNJ23].
    """
    own = log_probs[np.arange(len(labels)), labels]
    return own - log_probs.mean(axis=0)[labels]


def guess(scores: np.ndarray, k_in: int, k_out: int) -> np.ndarray:
    """T in {-1, 0, +1}^m: +1 for the k_in highest scores, -1 for the k_out lowest, 0 (abstain) otherwise."""
    order = np.argsort(-scores, kind="stable")
    t = np.zeros(len(scores), dtype=int)
    t[order[:k_in]] = 1
    if k_out:
        t[order[len(scores) - k_out :]] = -1
    return t


# ---------------------------------------------------------------------------------------------- result


@dataclass(frozen=True)
class EmpiricalResult:
    """One audited client's outcome. ``theoretical_epsilon`` is the epsilon the client reported in the run
    the canaries were in (None: non-private); ``reference_epsilon`` that of the original run, when the
    audit re-ran its config."""

    client: str
    adversary: str
    canaries: int  # m
    included: int
    guesses_in: int  # k_+
    guesses_out: int  # k_-
    correct: int  # v
    confidence: float
    delta: float
    lower_bound: float
    theoretical_epsilon: float | None
    dp: bool
    run_dir: str
    reference_epsilon: float | None = None
    reference_run: str | None = None

    @property
    def guesses(self) -> int:
        return self.guesses_in + self.guesses_out

    @property
    def violation(self) -> bool:
        """The bound exceeds what the client reported: at ``confidence``, the mechanism is not as private as
        its accountant says. A non-private run claims nothing, so it cannot be violated."""
        return self.theoretical_epsilon is not None and self.lower_bound > self.theoretical_epsilon

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "guesses": self.guesses, "violation": self.violation}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmpiricalResult:
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in names})

    def describe(self) -> str:
        theory = "∞ (non-private)" if self.theoretical_epsilon is None else f"{self.theoretical_epsilon:.4f}"
        return (
            f"client {self.client}: empirical lower bound epsilon >= {self.lower_bound:.4f} at"
            f" {self.confidence:.0%} confidence ({self.correct} of {self.guesses} guesses correct, {self.canaries}"
            f" canaries, {self.adversary} adversary); reported epsilon {theory}"
        )


def _reported_epsilon(ledger_path: Path, client: str) -> float | None:
    """The client's epsilon after its last trained round (0 when it never trained: nothing was released)."""
    from fedllm.audit import NON_PRIVATE, read_entries

    rows = [e for e in read_entries(ledger_path) if e.client_id == client]
    if any(e.accountant == NON_PRIVATE for e in rows):
        return None
    trained = [e for e in rows if e.status == "trained"]
    return float(trained[-1].epsilon) if trained else 0.0


def finish(spec: RunSpec) -> EmpiricalResult | None:
    """After the run: the adversary scores every canary on the final global model, guesses, and the guesses
    become a bound. None when the audit is off or no round completed (there is no model to attack)."""
    from fedllm import checkpoint
    from fedllm.model import build_model, set_trainable
    from fedllm.runspec import federation_data

    cfg = spec.config
    a = cfg.empirical_audit
    if not a.enabled or not (spec.out_dir / "checkpoint.npz").is_file():
        return None
    secret = json.loads((spec.out_dir / AUDIT_DIR / SECRET_FILE).read_text(encoding="utf-8"))
    canaries = secret["canaries"]
    coins = np.array([bool(c["included"]) for c in canaries])
    model = build_model(cfg.model, len(federation_data(cfg).label_names))
    set_trainable(model, checkpoint.load(spec.out_dir / "checkpoint.npz").arrays)
    labels = np.array([int(c["label"]) for c in canaries])
    log_probs = canary_log_probs(model, [c["text"] for c in canaries], cfg)
    scores = black_box_scores(log_probs, labels)
    k_in, k_out = guess_counts(cfg)
    t = guess(scores, k_in, k_out)
    correct = int(np.sum((t == 1) & coins) + np.sum((t == -1) & ~coins))
    client = secret["client"]
    delta = cfg.client_privacy(client).delta
    result = EmpiricalResult(
        client=client,
        adversary=a.adversary,
        canaries=len(canaries),
        included=int(coins.sum()),
        guesses_in=k_in,
        guesses_out=k_out,
        correct=correct,
        confidence=a.confidence,
        delta=delta,
        lower_bound=epsilon_lower_bound(len(canaries), k_in + k_out, correct, delta, a.confidence),
        theoretical_epsilon=_reported_epsilon(spec.ledger_path, client) if cfg.privacy.enabled else None,
        dp=cfg.privacy.enabled,
        run_dir=str(spec.out_dir),
    )
    _write_json(
        spec.out_dir / AUDIT_DIR / RESULT_FILE,
        {
            **result.to_dict(),
            "scores": [
                {
                    "loss": float(-log_probs[i, labels[i]]),
                    "score": float(scores[i]),
                    "included": bool(coins[i]),
                    "guess": int(t[i]),
                }
                for i in range(len(canaries))
            ],
        },
        private=True,  # it holds the coins
    )
    return result


def load_result(run_dir: Path) -> EmpiricalResult | None:
    path = Path(run_dir) / AUDIT_DIR / RESULT_FILE
    if not path.is_file():
        return None
    try:
        return EmpiricalResult.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as exc:
        raise FedllmError(f"{path}: unreadable empirical audit result ({exc})") from exc


def audit_run(run_dir: Path, verbose: bool = False) -> EmpiricalResult:
    """``fedllm audit DIR --empirical``: the run's own empirical result, or, for a run trained without
    canaries, a re-run of its ``config.toml`` with canaries into ``DIR/empirical/rerun/``.

    The re-run is a new run (its data holds the included canaries, so its sample rate and noise differ a
    little): its bound is compared with the epsilon it reported itself, and the original run's epsilon for
    the same client is recorded beside it as ``reference_epsilon``.
    """
    from fedllm.config import from_dict, read_toml, validate
    from fedllm.runspec import RunSpec
    from fedllm.simulation import simulate

    run_dir = Path(run_dir)
    existing = load_result(run_dir)
    if existing is not None:
        return existing
    config_path = run_dir / "config.toml"
    if not config_path.is_file():
        raise FedllmError(f"{run_dir}: no config.toml; an empirical audit re-runs the run's config")
    cfg = from_dict(read_toml(config_path), source=str(config_path))
    cfg = replace(cfg, empirical_audit=replace(cfg.empirical_audit, enabled=True))
    validate(cfg, str(config_path))
    rerun = (run_dir / AUDIT_DIR / RERUN_DIR).resolve()
    result = load_result(rerun)
    if result is None:
        if (rerun / "ledger.sqlite").exists():
            raise FedllmError(f"{rerun}: an earlier empirical re-run did not finish; remove it and try again")
        simulate(RunSpec(config=cfg, out_dir=rerun), verbose=verbose)
        result = load_result(rerun)
    if result is None:
        raise FedllmError(f"{rerun}: the empirical re-run completed no round; nothing to audit")
    reference = _reported_epsilon(run_dir / "ledger.sqlite", result.client) if cfg.privacy.enabled else None
    result = replace(result, reference_epsilon=reference, reference_run=str(run_dir))
    _write_json(run_dir / AUDIT_DIR / RESULT_FILE, result.to_dict())
    return result
