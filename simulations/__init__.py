"""Built-in scenarios. This folder installs as the package ``fedllm.scenarios`` (see pyproject.toml), so the
TOML files ship with every install and :func:`fedllm.config.scenario_path` finds them by name."""
