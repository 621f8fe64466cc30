"""``fedllm audit DIR --empirical``: the run's own empirical result, or a re-run of its config with canaries.

A run trained without canaries cannot be audited empirically after the fact; its ``config.toml`` can be
re-run with them into ``DIR/empirical/rerun/``. The re-run is a new run (its data holds the included
canaries, so its sample rate and noise differ a little): its bound is compared with the epsilon it reported
itself, and the original run's epsilon for the same client is recorded beside it as ``reference_epsilon``.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from fedllm.audit.empirical_attack import reported_epsilon
from fedllm.audit.empirical_result import EmpiricalResult
from fedllm.audit.empirical_store import load_result, save_result
from fedllm.config import from_dict, validate
from fedllm.errors import FedllmError
from fedllm.run import lifecycle
from fedllm.run.rundir import RunDir
from fedllm.run.spec import RunSpec


def audit_run(run_dir: Path, verbose: bool = False) -> EmpiricalResult:
    """The stored result of ``run_dir``, else one from a re-run of its config (stored in ``run_dir`` too)."""
    run_dir = Path(run_dir)
    existing = load_result(run_dir)
    if existing is not None:
        return existing
    run = RunDir(run_dir)
    if not run.config_path.is_file():
        raise FedllmError(f"{run_dir}: no {run.config_path.name}; an empirical audit re-runs the run's config")
    cfg = from_dict(run.read_config_data(), source=str(run.config_path))
    cfg = replace(cfg, empirical_audit=replace(cfg.empirical_audit, enabled=True))
    validate(cfg, str(run.config_path))
    rerun = run.empirical_rerun_dir.resolve()
    result = load_result(rerun)
    if result is None:
        if RunDir(rerun).ledger_path.exists():
            raise FedllmError(f"{rerun}: an earlier empirical re-run did not finish; remove it and try again")
        lifecycle.simulate(RunSpec(config=cfg, out_dir=rerun), verbose=verbose)
        result = load_result(rerun)
    if result is None:
        raise FedllmError(f"{rerun}: the empirical re-run completed no round; nothing to audit")
    reference = reported_epsilon(run.ledger_path, result.client) if cfg.privacy.enabled else None
    result = replace(result, reference_epsilon=reference, reference_run=str(run_dir))
    save_result(run_dir, result)
    return result
