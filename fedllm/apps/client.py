"""One ClientApp factory: for ``fedllm simulate``, for ``flwr run .`` and for a deployed node's own runner.

Kept light: deployment may import it for every message. On a deployed node every decision below is the
node profile's, never the submitted run config's.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.clientapp import ClientApp

from fedllm.client import client_for
from fedllm.config import ClientSettings
from fedllm.profile import NODE_CONFIG_KEY, load_profile
from fedllm.run.spec import RunSpec, ShippedSpec, spec_from_run_config
from fedllm.secure_aggregation import secagg_mod


def node_settings(context: Context, spec: RunSpec | None = None) -> ClientSettings:
    """Asked per message (Flower builds mods before the run's config exists): the profile's, where there is
    one. A deployed node follows its own profile, so a coordinator can neither switch masking off for it nor
    lower its minimum of peers; a simulated node follows the scenario."""
    if NODE_CONFIG_KEY in context.node_config:
        return load_profile(str(context.node_config[NODE_CONFIG_KEY])).settings
    cfg = (spec or spec_from_run_config(context.run_config)).config
    partition = int(context.node_config.get("partition-id", 0))
    return cfg.client_settings(cfg.clients[partition].id)


def client_app(spec: RunSpec | None = None) -> ClientApp:
    """The ClientApp for a run whose spec the simulation already holds, or one rebuilt per message from
    Flower's ``run_config`` (``flwr run .``, deployed nodes)."""

    # The closures below hold the spec only through this: Flower pickles the app with every message it sends a
    # Ray worker, and a 10,000-client spec would cross (and be rebuilt) each time.
    shipped = ShippedSpec(spec) if spec is not None else None

    def spec_of(context: Context) -> RunSpec:
        return shipped.spec if shipped is not None else spec_from_run_config(context.run_config)

    def client_fn(context: Context):
        return client_for(spec_of(context), context).to_client()

    def settings(context: Context) -> ClientSettings:
        return node_settings(context, shipped.spec if shipped is not None else None)

    return ClientApp(
        client_fn=client_fn,
        mods=[
            secagg_mod(
                lambda context: settings(context).require_secure_aggregation,
                lambda context: settings(context).min_secagg_peers,
            )
        ],
    )


app = client_app()
