"""Helpers several test files share: run directories written directly, and copies of this project's tree.

Fixtures live in ``conftest.py``; plain functions that build files live here, once.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import cache
from pathlib import Path

import tomli_w
import torch

from fedllm.accounting import Mechanism, epsilon_of_mechanisms
from fedllm.config import config_hash, from_dict, to_toml
from fedllm.ledger import Ledger, make_entry
from fedllm.metrics import ClientRound, RoundRecord, RunMetrics, write
from fedllm.model import minilm_path
from fedllm.signing import load_or_create_key, public_openssh, sign

# ---------------------------------------------------------------------------------------------- run directories

RUN_ID = "run-42"
MECH = Mechanism(noise_multiplier=1.0, sample_rate=0.02, steps=10, max_grad_norm=1.0)
NO_MECH = Mechanism(noise_multiplier=0.0, sample_rate=0.0, steps=0, max_grad_norm=0.0)
CLIENTS = ("alpha", "beta", "gamma")


@cache
def rounds_epsilon(accountant: str, n: int, delta: float) -> float:
    return epsilon_of_mechanisms(accountant, [MECH] * n, delta)


def write_run(
    out: Path,
    *,
    clients: tuple[str, ...] = CLIENTS,
    rounds: int = 3,
    rounds_planned: int | None = None,
    budget: float = 8.0,
    dp: bool = True,
    accountant: str = "prv",
    delta: float = 1e-5,
    refuse_from: dict[str, int] | None = None,
    fail_round: dict[str, int] | None = None,
    late_round: dict[str, int] | None = None,
    epsilon_scale: float = 1.0,
    stopped_early: str | None = None,
    config_extra: dict | None = None,
) -> Path:
    """A run directory as the coordinator and clients leave it: ledgers, keys, config.toml, metrics.json.

    ``refuse_from``: a client refuses every round from that one on. ``fail_round``: a client reserves that
    round, then fails (no coordinator row; its own budget still counts the reservation). ``late_round``: a
    client trains that round but answers too late (its own trained row; the coordinator has none and records
    it as dropped). ``epsilon_scale``
    makes every client under-report epsilon consistently (its own ledger and signature agree with the lie).
    """
    refuse_from, fail_round, late_round = refuse_from or {}, fail_round or {}, late_round or {}
    raw = {
        "name": "audit-test",
        "rounds": rounds_planned or rounds,
        "num_clients": len(clients),
        "clients": [{"id": c} for c in clients],
        "model": {"name": "tiny-bert"},
        "data": {"source": "synthetic", "partition": "iid"},
        "privacy": {"enabled": dp, "epsilon": budget, "delta": delta, "accountant": accountant},
    }
    cfg = from_dict(raw)
    out.mkdir(parents=True, exist_ok=True)
    text = to_toml(cfg)
    if config_extra:
        text = tomli_w.dumps({**tomllib.loads(text), **config_extra})
    (out / "config.toml").write_text(text)
    chash = config_hash(cfg) if not config_extra else hashlib.sha256(text.encode()).hexdigest()
    metrics = RunMetrics(run_id=RUN_ID, scenario="audit-test", dp=dp, rounds_planned=rounds_planned or rounds)
    metrics.initial_accuracy, metrics.initial_loss = 0.25, 1.4
    metrics.stopped_early = stopped_early
    keys = {c: load_or_create_key(out / "clients" / c / "node_key") for c in clients}
    spent = dict.fromkeys(clients, 0)
    with Ledger(out / "ledger.sqlite") as coord:
        own = {c: Ledger(out / "clients" / c / "ledger.sqlite") for c in clients} if dp else {}
        for r in range(1, rounds + 1):
            record = RoundRecord(round=r, accuracy=0.3 + 0.1 * r, loss=1.2 - 0.1 * r)
            for c in clients:
                common = {"run_id": RUN_ID, "round": r, "client_id": c, "delta": delta, "config_hash": chash}
                if not dp:
                    e = make_entry(
                        **common,
                        status="trained",
                        mechanism=Mechanism(0.0, 0.02, 10, math.inf),
                        accountant="none",
                        epsilon=math.inf,
                        budget_epsilon=math.inf,
                        model_hash="m",
                    )
                    coord.append(
                        replace(e, signer=public_openssh(keys[c]), signature=sign(keys[c], e.signed_payload()))
                    )
                    record.clients[c] = ClientRound(status="trained", examples=100, delta=delta)
                    continue
                dp_common = {**common, "accountant": accountant, "budget_epsilon": budget}
                if r in (fail_round.get(c), late_round.get(c)):
                    spent[c] += 1
                    eps = rounds_epsilon(accountant, spent[c], delta) * epsilon_scale
                    for status in ("reserved", "failed" if r == fail_round.get(c) else "trained"):
                        own[c].append(make_entry(**dp_common, status=status, mechanism=MECH, epsilon=eps))
                    record.clients[c] = ClientRound(status="dropped")
                    continue
                if r >= refuse_from.get(c, rounds + 1):
                    eps = rounds_epsilon(accountant, spent[c], delta) * epsilon_scale if spent[c] else 0.0
                    own[c].append(make_entry(**dp_common, status="refused", mechanism=NO_MECH, epsilon=eps))
                    e = make_entry(**dp_common, status="refused", mechanism=NO_MECH, epsilon=eps)
                    record.clients[c] = ClientRound(status="refused", epsilon=eps, budget_epsilon=budget, delta=delta)
                else:
                    spent[c] += 1
                    eps = rounds_epsilon(accountant, spent[c], delta) * epsilon_scale
                    for status in ("reserved", "trained"):
                        own[c].append(make_entry(**dp_common, status=status, mechanism=MECH, epsilon=eps))
                    e = make_entry(**dp_common, status="trained", mechanism=MECH, epsilon=eps, model_hash=f"m{r}")
                    record.clients[c] = ClientRound(
                        status="trained", examples=500, loss=1.0, epsilon=eps, budget_epsilon=budget, delta=delta
                    )
                coord.append(replace(e, signer=public_openssh(keys[c]), signature=sign(keys[c], e.signed_payload())))
            record.aggregated = sum(1 for v in record.clients.values() if v.status == "trained")
            metrics.rounds.append(record)
        for ledger in own.values():
            ledger.close()
    write(metrics, out / "metrics.json")
    return out


# ---------------------------------------------------------------------------------------------- project copies

ROOT = Path(__file__).resolve().parents[1]
# What never belongs in a copy of the project: environments, caches, run records (all gitignored anyway).
COPY_IGNORE = shutil.ignore_patterns(
    ".venv*", ".git", "__pycache__", "*.egg-info", "runs", "build", ".*_cache", ".hypothesis", ".whl", ".gl"
)


def project_copy(dest: Path, edits: Mapping[str, Callable[[str], str]] = {}) -> Path:
    """This project's tree copied to ``dest``, each file in ``edits`` rewritten by its function: a coordinator's
    bundle of "the same release" with a change of its own."""
    shutil.copytree(ROOT, dest, ignore=COPY_IGNORE)
    for rel, edit in edits.items():
        path = dest / rel
        before = path.read_text()
        after = edit(before)
        assert after != before, f"the edit of {rel} changed nothing"
        path.write_text(after)
    return dest


def bundle_hash(tree: Path) -> str:
    """sha256 of the bundle ``flwr run TREE`` submits (the same build function)."""
    from flwr.cli.build import build_fab_from_disk

    return hashlib.sha256(build_fab_from_disk(tree)).hexdigest()


def node_profile(site: Path, node_lines: str = "") -> Path:
    """A node profile in the issue-10 schema (epsilon 3), with placeholder files where it names them."""
    for name in ("records.csv", "node_key", "ca.crt"):
        (site / name).write_text("text,label\nloan,finance\n")
    (site / "profile.toml").write_text(
        '[institution]\nid = "st-marys"\n[data]\npath = "records.csv"\ndeclared_examples = 120\n'
        "[privacy]\nepsilon = 3.0\ndelta = 1e-5\nplanned_rounds = 2\n[training]\nlocal_steps = 5\nbatch_size = 16\n"
        f'[node]\nkey = "node_key"\nca = "ca.crt"\nstate_dir = "state"\n{node_lines}'
    )
    return site / "profile.toml"


# ---------------------------------------------------------------------------------------------- model checkpoints

_SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
_CONFIGS: dict[str, dict] = {
    "bert": _SMALL,
    "roberta": {**_SMALL, "type_vocab_size": 1},
    "electra": {**_SMALL, "embedding_size": 32},
    # DeBERTa-v3's layout: relative attention, no absolute position embedding.
    "deberta-v2": {
        **_SMALL,
        "relative_attention": True,
        "position_biased_input": False,
        "pos_att_type": ["p2c", "c2p"],
        "share_att_key": True,
        "norm_rel_ebd": "layer_norm",
        "position_buckets": 16,
    },
    "distilbert": {"dim": 32, "n_layers": 2, "n_heads": 2, "hidden_dim": 64},
}


def make_checkpoint(family: str, out: Path, *, masked_lm: bool = False, seed: int = 0) -> Path:
    """A tiny random ``family`` encoder in ``out`` (config, safetensors, the MiniLM tokenizer).

    ``masked_lm`` saves it as a pretraining checkpoint (weights under the family's prefix, e.g.
    ``roberta.embeddings...``, plus an LM head), the layout of checkpoints published on the hub.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its bar on stderr is not the command's output tests read
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    config = AutoConfig.for_model(
        family, vocab_size=tokenizer.vocab_size, max_position_embeddings=128, pad_token_id=0, **_CONFIGS[family]
    )
    torch.manual_seed(seed)
    model = (AutoModelForMaskedLM if masked_lm else AutoModel).from_config(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def make_strategy(
    ledger,
    run_dir: Path,
    initial: list,
    *,
    num_clients: int = 2,
    clients_per_round: int = 2,
    min_clients: int = 1,
    **kwargs,
):
    """A ``BudgetAwareFedAvg`` with its recorder on ``run_dir`` (no checkpoint), as the ServerApp builds it."""
    from fedllm.metrics import RunMetrics
    from fedllm.run.recorder import Recorder
    from fedllm.run.rundir import RunDir
    from fedllm.strategy import BudgetAwareFedAvg, Selection

    metrics = RunMetrics(run_id="r", scenario="t", dp=True, rounds_planned=2)
    return BudgetAwareFedAvg(
        initial_arrays=initial,
        selection=Selection(num_clients, clients_per_round, min_clients),
        recorder=Recorder(RunDir(run_dir), ledger, metrics, "c"),
        **kwargs,
    )


# One client, 1 round of tiny-bert full fine-tuning, 200 canaries, 40 guesses: a setting that memorises, so an
# empirical audit has something to find when the noise is missing (tests/system/test_empirical_run.py).
EMPIRICAL_SCENARIO = """
name = "empirical-tiny"
rounds = 1
num_clients = 1
seed = 0

[model]
name = "tiny-bert"
mode = "full"
max_length = 32

[data]
source = "synthetic"
partition = "iid"
max_examples = 200
test_fraction = 0.1
max_central_test = 50

[training]
local_steps = 200
batch_size = 16
learning_rate = 5e-3

[privacy]
epsilon = 0.25  # small: a noise-free run clears it by a wide margin (29 of 40 right suffice; seen 34-40)
delta = 1e-5

[secure_aggregation]
enabled = false  # one client: the final model is its own, undiluted by averaging (run to run stable)

[empirical_audit]
enabled = true
canaries = 200
guesses = 40
"""
