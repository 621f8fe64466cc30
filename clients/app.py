"""The Flower ClientApp, for ``flwr run .``: kept light, since deployment imports it for every message."""

from flwr.app import Context
from flwr.clientapp import ClientApp

from fedllm.runspec import spec_from_run_config
from fedllm.secure_aggregation import secagg_mod


def client_fn(context: Context):
    from fedllm.client import client_for

    return client_for(spec_from_run_config(context.run_config), context).to_client()


def requires_secure_aggregation(context: Context) -> bool:
    """Asked per message (Flower builds mods before the run's config exists); a node's profile decides.

    A deployed node follows its own profile (default: required), never the submitted run config, so a
    coordinator cannot switch masking off for it; a simulated node follows the scenario.
    """
    from fedllm.profile import NODE_CONFIG_KEY, load_profile

    if NODE_CONFIG_KEY in context.node_config:
        return load_profile(str(context.node_config[NODE_CONFIG_KEY])).require_secure_aggregation
    return spec_from_run_config(context.run_config).config.secure_aggregation.enabled


app = ClientApp(client_fn=client_fn, mods=[secagg_mod(requires_secure_aggregation)])
