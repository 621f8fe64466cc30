"""The privacy audit: a privacy officer's independent check of a finished (or stopped) run.

Kept empty on purpose (importers name the submodule). :mod:`fedllm.audit.verify` is the entry point
(``audit(run_dir, tolerance)``); :mod:`fedllm.audit.findings` holds the finding kinds, verdicts and result
types; :mod:`fedllm.audit.crosscheck` compares the coordinator's ledger with each client's own and checks
signatures; :mod:`fedllm.audit.spend` recomputes every client's spend and checks it against its budget.
The one-run empirical audit lives beside it: the bound (:mod:`fedllm.audit.empirical_bound`) and result
(:mod:`fedllm.audit.empirical_result`) import nothing of the engine; canaries
(:mod:`fedllm.audit.canaries`), the adversary (:mod:`fedllm.audit.empirical_attack`) and the re-run of a
run's config (:mod:`fedllm.audit.empirical_rerun`) do. The command is :mod:`fedllm.cli.audit`.
"""
