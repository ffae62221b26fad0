"""Simulated federated training: sites are slices of a device mesh (outermost axis `site`).

An algorithm is `init` + a round function (FedJAX style); client work is one per-site function
run with `jax.shard_map` over the `site` axis, aggregated with named collectives.
"""

from jmtl.federated.fedopt import FedOptState, init, make_round

__all__ = ["FedOptState", "init", "make_round"]
