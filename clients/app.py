"""The Flower ClientApp, for ``flwr run .``: kept light, since deployment imports it for every message."""

from flwr.app import Context
from flwr.clientapp import ClientApp

from fedllm.runspec import spec_from_run_config


def client_fn(context: Context):
    from fedllm.client import client_for

    return client_for(spec_from_run_config(context.run_config), context).to_client()


app = ClientApp(client_fn=client_fn)
