"""The Flower ClientApp (``fedllm.apps.client:app``), for ``flwr run .`` and for a deployed node's own runner.

Kept light: deployment may import it for every message. On a deployed node every decision below is the
node profile's, never the submitted run config's.
"""

from flwr.app import Context
from flwr.clientapp import ClientApp

from fedllm.config import ClientSettings
from fedllm.runspec import spec_from_run_config
from fedllm.secure_aggregation import secagg_mod


def client_fn(context: Context):
    from fedllm.client import client_for

    return client_for(spec_from_run_config(context.run_config), context).to_client()


def node_settings(context: Context) -> ClientSettings:
    """Asked per message (Flower builds mods before the run's config exists): the profile's, where there is one.

    A deployed node follows its own profile, so a coordinator can neither switch masking off for it nor
    lower its minimum of peers; a simulated node follows the scenario.
    """
    from fedllm.profile import NODE_CONFIG_KEY, load_profile

    if NODE_CONFIG_KEY in context.node_config:
        return load_profile(str(context.node_config[NODE_CONFIG_KEY])).settings
    spec = spec_from_run_config(context.run_config)
    partition = int(context.node_config.get("partition-id", 0))
    return spec.config.client_settings(spec.config.clients[partition].id)


def requires_secure_aggregation(context: Context) -> bool:
    return node_settings(context).require_secure_aggregation


def min_secagg_peers(context: Context) -> int:
    return node_settings(context).min_secagg_peers


app = ClientApp(client_fn=client_fn, mods=[secagg_mod(requires_secure_aggregation, min_secagg_peers)])
