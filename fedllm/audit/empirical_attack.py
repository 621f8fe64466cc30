"""The black-box adversary of the one-run empirical audit, and the run's result.

After the run, the adversary scores every canary on the final global model (what every institution and
anyone the model is shared with sees), guesses which canaries were trained on, and the count of correct
guesses becomes a lower bound on epsilon (:mod:`fedllm.audit.empirical_bound`), stored with the run as an
:class:`~fedllm.audit.empirical_result.EmpiricalResult`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fedllm.audit.canaries import guess_counts, read_secret
from fedllm.audit.empirical_bound import epsilon_lower_bound
from fedllm.audit.empirical_result import EmpiricalResult
from fedllm.audit.empirical_store import save_result
from fedllm.audit.findings import NON_PRIVATE
from fedllm.config import FederationConfig
from fedllm.data.federation import federation_data
from fedllm.data.records import TextDataset
from fedllm.features import node_dataset
from fedllm.ledger import read_entries
from fedllm.model import build_model, pick_device, set_trainable
from fedllm.run.rundir import RunDir
from fedllm.run.spec import RunSpec
from fedllm.training import collate_for, logits_of


def canary_log_probs(model: torch.nn.Module, texts: list[str], config: FederationConfig) -> np.ndarray:
    """The black-box adversary's view: the model's log-probability of every label for each canary (m x C).

    The canaries go in as any client row would: tokens, or (head mode) the frozen encoder's features.
    """
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


def reported_epsilon(ledger_path: Path, client: str) -> float | None:
    """The client's epsilon after its last trained round (0 when it never trained: nothing was released)."""
    rows = [e for e in read_entries(ledger_path) if e.client_id == client]
    if any(e.accountant == NON_PRIVATE for e in rows):
        return None
    trained = [e for e in rows if e.status == "trained"]
    return float(trained[-1].epsilon) if trained else 0.0


def finish(spec: RunSpec) -> EmpiricalResult | None:
    """After the run: the adversary scores every canary on the final global model, guesses, and the guesses
    become a bound. None when the audit is off or no round completed (there is no model to attack)."""
    cfg = spec.config
    a = cfg.empirical_audit
    run_dir = RunDir(spec.out_dir)
    if not a.enabled or not run_dir.checkpoint_path.is_file():
        return None
    secret = read_secret(run_dir)
    canaries = secret["canaries"]
    coins = np.array([bool(c["included"]) for c in canaries])
    model = build_model(cfg.model, len(federation_data(cfg).label_names))
    set_trainable(model, run_dir.read_checkpoint().arrays)
    labels = np.array([int(c["label"]) for c in canaries])
    log_probs = canary_log_probs(model, [c["text"] for c in canaries], cfg)
    scores = black_box_scores(log_probs, labels)
    k_in, k_out = guess_counts(cfg)
    t = guess(scores, k_in, k_out)
    correct = int(np.sum((t == 1) & coins) + np.sum((t == -1) & ~coins))
    client = secret["client"]
    delta = cfg.client_settings(client).delta
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
        theoretical_epsilon=reported_epsilon(run_dir.ledger_path, client) if cfg.privacy.enabled else None,
        dp=cfg.privacy.enabled,
        run_dir=str(spec.out_dir),
    )
    scored = [
        {
            "loss": float(-log_probs[i, labels[i]]),
            "score": float(scores[i]),
            "included": bool(coins[i]),
            "guess": int(t[i]),
        }
        for i in range(len(canaries))
    ]
    save_result(run_dir.root, result, scored)
    return result
