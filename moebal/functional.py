"""moebal.functional: the pure functions every layer is built from (no module state)."""
from moebal.assignment import balanced_assignment
from moebal.dispatch import combine, dispatch
from moebal.routing import (
    loss_free_update,
    router_z_loss,
    sequence_aux_loss,
    switch_aux_loss,
    topk_routing,
)

__all__ = [
    "topk_routing",
    "switch_aux_loss",
    "sequence_aux_loss",
    "router_z_loss",
    "loss_free_update",
    "balanced_assignment",
    "dispatch",
    "combine",
]
