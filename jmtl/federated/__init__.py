"""Simulated federated training: sites are slices of a device mesh (outermost axis `site`).

An algorithm is `init` + a round function (FedJAX style); client work is one per-site function
run with `jax.shard_map` over the `site` axis, aggregated with named collectives
(`algorithm`); aggregation rules (`aggregation`), uplink compression (`compression`),
client-level differential privacy (`privacy`), partitioning (`partition`), the sites of a
config (`sites`) and the `jmtl federated` job (`loop`).
"""

from jmtl.federated.algorithm import ClientState, ServerState, init, make_round

__all__ = ["ClientState", "ServerState", "init", "make_round"]
