"""The model card (``README.md`` of an exported model): what a reader of the model needs to trust it.

Every privacy number comes from the same place as ``fedllm report``: the coordinator's ledger (what the
clients signed), with the audit verdict beside it, so a card can never show an epsilon the ledger does not
hold. The ledger's head hash pins the card to one exact ledger: a later edit of any row changes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedllm.ledger import read_entries
from fedllm.report.cells import never_sampled_text
from fedllm.report.facts import build_report
from fedllm.run.rundir import RunDir


def _num(x: Any, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}g}"
    return str(x)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return [*lines, ""]


def card_facts(run_dir: Path) -> dict[str, Any]:
    """The card's facts, separately from their rendering, so tests can check them against the ledger."""
    report = build_report(Path(run_dir))
    ledger = RunDir(run_dir).ledger_path
    entries = read_entries(ledger) if ledger.is_file() else []
    return {
        "report": report,
        "ledger_head": entries[-1].hash if entries else None,
        "ledger_rows": len(entries),
        "neighbouring": sorted({e.neighbouring for e in entries}),
        "sampling": sorted({e.sampling for e in entries}),
    }


_COVERS = """\
- **Covered:** each single training example of each client (*sample-level* differential privacy, per
  client). Anyone who holds this model, or saw any update a client sent, learns about one example of that
  client at most what the client's (epsilon, delta) below allows. All rounds of the run are composed into
  that one epsilon.
- **Not covered:** a person with k examples in one client's data is protected only at about k x epsilon
  (group privacy); properties of a client's data set as a whole (its label mix, its size); anything the
  coordinator saw in clear (which client took part in which round; per-client metrics if
  `share_client_metrics` or `federated_evaluation` was on); the central test set the coordinator evaluated
  on; the base model and its pretraining data; the label names.
- **Conditions:** the bound assumes the mechanism ran as recorded. The audit verdict above recomputes every
  epsilon from the ledger independently; an empirical audit can only give a lower bound, never a proof.
  See docs/privacy.md of fedllm for the full statement and the trust model."""


_HEAD_CODE = """\
**Loading needs `trust_remote_code=True`.** This model was trained in fedllm's `{mode}` mode: {trained},
on the encoder's last hidden states averaged over the real tokens (the attention mask) and scaled to length
1 (L2). No class that ships with `transformers` pools and normalises that way, so this directory carries its
own model code, about 60 lines that import only
`torch` and `transformers`: `configuration_fedllm_head.py` (the settings) and `modeling_fedllm_head.py` (the
model: the stock encoder built with `AutoModel.from_config` from `feature_encoder` in `config.json`, the
mean over the mask, the L2 normalisation, then {hidden}). `trust_remote_code=True` tells `transformers` to
run these two files; read them first, and check them against the SHA-256 below (also in `config.json` as
`fedllm_code_sha256`). `fedllm predict` runs fedllm's own copy of this code, and refuses the directory if
the files differ from it.

| file | SHA-256 |
|---|---|"""


def _head_shape(hidden: int) -> str:
    return "a linear layer" if not hidden else f"one hidden ReLU layer of width {hidden} and a linear layer"


def render_model_card(run_dir: Path, provenance: dict[str, Any]) -> str:
    """Markdown with YAML front matter (the Hugging Face model-card convention)."""
    facts = card_facts(run_dir)
    report = facts["report"]
    run, audit = report["run"], report["audit"]
    dp = bool(run["dp"])
    labels = provenance["labels"]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-classification",
        "tags: [fedllm, federated-learning, differential-privacy]",
        "---",
        "",
        f"# {run['scenario'] or 'fedllm'} text classifier (federated, {'DP-SGD' if dp else 'NOT private'})",
        "",
        f"Trained by fedllm: {run['num_clients']} clients, federated averaging over {run['rounds_completed']}"
        f" round(s){' with SecAgg+' if run['secure_aggregation'] else ''}, "
        + ("each client running DP-SGD on its own data." if dp else "**without differential privacy**."),
        "",
        "## Model",
        "",
        *_table(
            ["", ""],
            [
                ["base model", f"`{provenance['base_model']}`"],
                ["fine-tuning", f"{provenance['mode']} ({provenance['format']} export)"],
                ["max input tokens", provenance["max_length"]],
                ["labels", ", ".join(f"{i}: {name}" for i, name in enumerate(labels))],
                ["run id", provenance["run_id"]],
                ["checkpoint round", provenance["round"]],
                ["config hash", f"`{provenance['config_hash']}`"],
            ],
        ),
        "## Data",
        "",
        f"Source `{run['data']['source']}`, split among the clients by `{run['data']['partition']}`"
        + (f" (alpha {run['data']['alpha']})" if run["data"]["partition"] == "dirichlet" else "")
        + f"; {len(labels)} classes. No client's rows left its node; only DP-noised model updates did.",
        "",
        "## Privacy",
        "",
    ]
    if dp:
        lines += [
            f"Accountant: `{run['accountant']}`; neighbouring relation: {', '.join(facts['neighbouring']) or '-'}"
            f" (one example added or removed); sampling: {', '.join(facts['sampling']) or '-'}; per-example"
            f" clipping norm {_num(run['max_grad_norm'])}.",
            "",
        ]
    else:
        lines += ["This run was the non-private baseline: epsilon is infinite for every client.", ""]
    lines += _table(
        ["client", "final epsilon", "delta", "budget epsilon", "rounds trained"],
        [
            [
                c["id"],
                _num(c["final_epsilon"]) if dp else "inf",
                _num(c["delta"]),
                _num(c["budget_epsilon"]),
                c["rounds_trained"],
            ]
            for c in report["clients"]
        ],
    )
    never = never_sampled_text(report)
    lines += [never, ""] if never else []
    lines += [
        f"Ledger: {facts['ledger_rows']} rows, head hash `{facts['ledger_head'] or '-'}`.",
        "",
        f"Audit verdict (`fedllm audit`): **{audit['verdict']}**",
        "",
        "### What the guarantee covers",
        "",
        _COVERS,
        "",
        "## Accuracy per round (central test set)",
        "",
    ]
    initial = report["initial"]
    rows = (
        [["0 (initial)", _num(initial["accuracy"]), _num(initial["loss"])]] if initial["accuracy"] is not None else []
    )
    rows += [[r["round"], _num(r["accuracy"]), _num(r["loss"])] for r in report["rounds"]]
    lines += _table(["round", "accuracy", "loss"], rows)
    lines += ["## Use", ""]
    if "code_sha256" in provenance:
        mode = provenance["mode"]
        trained = (
            "the encoder stayed frozen and only a small head was trained"
            if mode == "head"
            else "a small head was trained first, then LoRA adapters on the encoder with it (merged into the"
            " encoder's weights here)"
        )
        lines += [_HEAD_CODE.format(hidden=_head_shape(provenance.get("head_hidden", 0)), mode=mode, trained=trained)]
        lines += [""]
        lines += [f"| `{name}` | `{digest}` |" for name, digest in provenance["code_sha256"].items()]
        lines += [""]
    lines += ["```python"]
    if "code_sha256" in provenance:
        lines += [
            "from transformers import pipeline",
            'classify = pipeline("text-classification", model="DIR", trust_remote_code=True)',
            "# or AutoModelForSequenceClassification / AutoTokenizer .from_pretrained(DIR, trust_remote_code=True):",
            "# the tokenizer needs it too, since transformers reads config.json to pick it",
        ]
    elif provenance["format"] == "adapter":
        lines += [
            "from peft import AutoPeftModelForSequenceClassification",
            "from transformers import AutoTokenizer, pipeline",
            f'model = AutoPeftModelForSequenceClassification.from_pretrained("DIR", num_labels={len(labels)})',
            'classify = pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained("DIR"))',
        ]
    else:
        lines += [
            "from transformers import pipeline",
            'classify = pipeline("text-classification", model="DIR")',
        ]
    lines += ['classify("some text", truncation=True)', "```", "", 'or `fedllm predict DIR --text "some text"`.', ""]
    return "\n".join(lines)
