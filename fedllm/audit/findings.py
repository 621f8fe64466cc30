"""What an audit can find and what it concludes: finding kinds, verdicts, and the result types.

Every finding is one line that starts with the kind of problem (``epsilon edited``, ``row deleted``,
``rows reordered``, ``signature from another key``, ``budget raised``, ``budget exceeded``,
``epsilon mismatch``, ``empirical privacy violation``, ...) and names the ledger, row and client.

Three verdicts, because "nothing wrong was found" is not "everything was checked": ``clean`` (exit 0),
``violations`` (any finding, exit 1) and ``unverified`` (no finding, but some client the run lists did not
hand over its own ledger and key, exit 3). A coordinator that withholds the client ledgers can make its own
ledger say anything self-consistent (cut rounds included), so such a run is never called clean.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # an annotation only: the ledger module loads the accountants (Opacus, torch)
    from fedllm.ledger import LedgerEntry

DEFAULT_TOLERANCE = 0.05
# The run's own accountant recomputed from the same records is the same computation: it must agree to this.
SAME_ACCOUNTANT_RTOL = 1e-6
NON_PRIVATE = "none"
# Past this many clients, a line that names clients names the first few and counts the rest (``id_list``).
SHOWN_IDS = 5

# The kinds of finding; each message starts with one of these.
EPSILON_EDITED = "epsilon edited"
EPSILON_MISMATCH = "epsilon mismatch"
ROW_DELETED = "row deleted"
ROWS_REORDERED = "rows reordered"
ROW_EDITED = "row edited"
ROW_UNKNOWN_TO_CLIENT = "row not in client ledger"
MECHANISM_EDITED = "mechanism edited"
SIGNATURE_OTHER_KEY = "signature from another key"
SIGNATURE_INVALID = "signature invalid"
SIGNATURE_MISSING = "signature missing"
BUDGET_RAISED = "budget raised"
BUDGET_CHANGED = "budget changed"
BUDGET_EXCEEDED = "budget exceeded"
SETTINGS_CHANGED = "settings changed"
CONFIG_EDITED = "config edited"

# Verdicts, and the exit status of ``fedllm audit`` for each (2 is the CLI's usage/input error).
CLEAN = "clean"
VIOLATIONS = "violations"
UNVERIFIED = "unverified"
EXIT_STATUS = {CLEAN: 0, VIOLATIONS: 1, UNVERIFIED: 3}


@dataclass(frozen=True)
class ClientAudit:
    """One client's numbers as the audit sees them; ``None`` where there is nothing to compute."""

    client: str
    private: bool
    accountant: str
    rounds_trained: int
    # The client's spend as recorded: its own ledger's last row of the run where that ledger is there (it
    # holds rounds a cut coordinator ledger lacks), else the coordinator ledger's last trained row; never
    # the lower of the two.
    reported_epsilon: float | None
    recomputed_epsilon: float | None  # the same spend, the run's accountant
    dp_accounting_epsilon: float | None  # the same spend, Google dp-accounting PLD
    budget: float | None
    delta: float | None
    ok: bool


@dataclass
class AuditResult:
    run_dir: Path
    run_ids: list[str]
    private: bool
    accountant: str
    tolerance: float
    clients: list[ClientAudit] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)  # clients whose own ledger or key was not handed over
    gaps: list[str] = field(default_factory=list)  # one line per missing piece: which client, which file
    flagged: list[str] = field(default_factory=list)  # clients some finding concerns

    @property
    def status(self) -> str:
        """``violations`` when anything was found; else ``unverified`` when a client's records are missing."""
        if self.findings:
            return VIOLATIONS
        return UNVERIFIED if self.unverified else CLEAN

    @property
    def ok(self) -> bool:
        """Clean: no finding and nothing left unchecked."""
        return self.status == CLEAN

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS[self.status]

    def verdict(self) -> str:
        withheld = f"no own ledger or no key from client(s) {id_list(self.unverified)}"
        if self.findings:
            kinds = "; ".join(sorted({f.split(":", 1)[0] for f in self.findings}))
            also = f" (also unverified: {withheld})" if self.unverified else ""
            return f"{len(self.findings)} finding(s): {kinds}{also}"
        if self.unverified:
            return f"unverified: {withheld}; the coordinator's record of them could not be checked"
        return "clean: every check passed"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (JSON has no infinity: infinite epsilons and budgets become ``null``)."""
        return {
            "run_dir": str(self.run_dir),
            "run_ids": self.run_ids,
            "ok": self.ok,
            "status": self.status,
            "verdict": self.verdict(),
            "private": self.private,
            "accountant": self.accountant,
            "tolerance": self.tolerance,
            "same_accountant_rtol": SAME_ACCOUNTANT_RTOL,
            "clients": [{k: _json_num(v) for k, v in asdict(c).items()} for c in self.clients],
            "findings": list(self.findings),
            "notes": list(self.notes),
            "unverified": list(self.unverified),
            "gaps": list(self.gaps),
        }


def _json_num(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Findings:
    """Collects one-line findings and remembers which clients they concern."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.bad_clients: set[str] = set()

    def add(self, kind: str, message: str, client: str | None = None) -> None:
        line = f"{kind}: {message}"
        if line not in self.lines:
            self.lines.append(line)
        if client is not None:
            self.bad_clients.add(client)


def findings_of_kind(result: AuditResult, kinds: Iterable[str]) -> list[str]:
    """The findings that start with one of ``kinds``; convenient for reports and tests."""
    prefixes = tuple(f"{k}:" for k in kinds)
    return [f for f in result.findings if f.startswith(prefixes)]


# ---------------------------------------------------------------------------------------------- wording


def rel_close(a: float, b: float, rtol: float) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12)


def fmt(x: float | None, digits: int = 4) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    return f"{x:.{digits}f}"


def id_list(ids: Sequence[str], shown: int = SHOWN_IDS) -> str:
    """``a, b, c``; past ``shown`` ids, the first ``shown`` and ``and N more``. A run of 10,000 registered
    clients of which 20 took part must not print 9,980 ids in one line; the full list stays in
    ``AuditResult.unverified`` (and the JSON)."""
    head = ", ".join(ids[:shown])
    rest = len(ids) - shown
    return f"{head} and {rest} more" if rest > 0 else head


def row_name(e: LedgerEntry) -> str:
    return f"row seq {e.seq} (client {e.client_id}, round {e.round})"
