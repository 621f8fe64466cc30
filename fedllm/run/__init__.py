"""A run: its directory (:mod:`fedllm.run.rundir`), what both apps know of it (:mod:`fedllm.run.spec`), its
lifecycle (:mod:`fedllm.run.lifecycle`) and the order its records are saved in (:mod:`fedllm.run.recorder`).

Kept empty on purpose: importing :mod:`fedllm.run.rundir` must not pull in the engine.
"""
