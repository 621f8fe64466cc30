"""Reports: what a run (or a folder of runs) shows people who were not there.

One concept per module: ``facts`` (the data of a run's ``report.json``), ``curve`` (accuracy against
epsilon over several runs of one scenario), ``svg`` (the charts), ``cells`` (the table cells both renderings
print), ``html`` and ``markdown`` (the two renderings) and ``write`` (the files). The commands live in
``fedllm.cli.report`` and ``fedllm.cli.compare``.
"""
