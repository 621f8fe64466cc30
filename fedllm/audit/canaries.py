"""Empirical privacy audit from one training run: the canaries, their secret coins, and how they reach the
audited client.

Why: the epsilon a client reports is an *upper* bound, and it holds only if the code does what the
accountant assumes (Gaussian noise of the stated size at every step, Poisson sampling, clipping). Nothing
in the ledger can show that the noise was really added: the accountant is told the noise multiplier, it
does not measure it. A one-run audit measures the other side. It hides m canaries in one client's data,
each included by an independent fair coin, lets the run train once, and asks an adversary to tell which
canaries were in. Whatever the adversary gets right beyond chance is turned into a *lower* bound on the
epsilon of the mechanism that actually ran (:mod:`fedllm.audit.empirical_bound`). A lower bound above the
reported epsilon proves (at the stated confidence) that the implementation leaks more than it claims; a
lower bound below it proves nothing about privacy, it only fails to find a bug (``docs/privacy.md``,
"Empirical audit").

Method: Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run", NeurIPS 2023,
arXiv:2305.08846 ([SNJ23]):

1. canaries x_1..x_m; S_i in {-1, +1} by fair coins; the training set holds the x_i with S_i = +1
   ([SNJ23], the auditing game: canaries are added or removed independently) (this module);
2. train once; the adversary scores every canary from what it sees and guesses T_i = +1 for the k_+
   highest scores, T_i = -1 for the k_- lowest, and abstains (T_i = 0) on the rest
   (:mod:`fedllm.audit.empirical_attack`);
3. the number of correct guesses becomes the bound (:mod:`fedllm.audit.empirical_bound`).

Adversaries: only the **black-box** one is implemented: it sees the final global model (what every
institution and anyone the model is shared with sees) and scores a canary by its loss. A white-box
adversary would score the audited client's own updates; under secure aggregation nobody outside the node
ever sees those, so it would have to run inside the client, and it is left out (``docs/privacy.md``).

Secrecy of the coins: the canary texts and labels follow from ``empirical_audit.seed`` (the adversary may
know them; the paper's adversary does), the coins come from the operating system's CSPRNG and are written
only to ``DIR/empirical/canaries.json`` (the auditor's) and, as the included rows, to the audited client's
own folder as plain extra training rows (``extra_rows.jsonl``, :class:`fedllm.run.rundir.ClientDir`). The
client appends whatever extra rows its folder holds and never learns it is audited; nothing about the coins
is in ``config.toml`` or in any message to the coordinator.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass
from typing import Any

from fedllm.config import FederationConfig
from fedllm.data.federation import federation_data
from fedllm.data.partition import rng as rng_for
from fedllm.files import PRIVATE_MODE, atomic_write_json, atomic_write_text
from fedllm.run.rundir import ClientDir, RunDir
from fedllm.run.spec import RunSpec

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
    rng = rng_for(seed, "empirical-canaries")
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


def read_secret(run_dir: RunDir) -> dict[str, Any]:
    """The auditor's file: the audited client, the seed, and every canary with its coin."""
    return json.loads(run_dir.empirical_secret_path.read_text(encoding="utf-8"))


def prepare(spec: RunSpec) -> None:
    """Before the run: canaries, secret coins, and the audited client's extra rows. Idempotent (a resumed
    run keeps its canaries and coins: new coins mid-run would void the audit)."""
    cfg = spec.config
    a = cfg.empirical_audit
    if not a.enabled:
        return
    run_dir = RunDir(spec.out_dir)
    client = audited_client(cfg)
    label_names = federation_data(cfg).label_names
    if run_dir.empirical_secret_path.is_file():
        secret = read_secret(run_dir)
    else:
        canaries = make_canaries(a.canaries, len(label_names), a.seed)
        coins = draw_coins(a.canaries)
        secret = {
            "client": client,
            "seed": a.seed,
            "canaries": [{**asdict(c), "included": inc} for c, inc in zip(canaries, coins, strict=True)],
        }
        atomic_write_json(run_dir.empirical_secret_path, secret, indent=1, mode=PRIVATE_MODE)
    # The client gets the included canaries as ordinary rows (text, label name), nothing more: no coin, no
    # excluded canary, no sign that these rows are an audit's.
    rows = [{"text": c["text"], "label": label_names[int(c["label"])]} for c in secret["canaries"] if c["included"]]
    atomic_write_text(
        ClientDir(spec.client_dir(client)).extra_rows_path,
        "".join(json.dumps(row) + "\n" for row in rows),
        mode=PRIVATE_MODE,
    )
