"""The Flower ServerApp, for ``flwr run .``: the run's config comes from Flower's ``run_config``."""

from flwr.serverapp import ServerApp

from fedllm.coordinator import main_for

app = ServerApp()
app.main()(main_for(None))
