"""moebal.functional: the pure functions every layer is built from (no module state)."""
from moebal.assignment import balanced_assignment
from moebal.dispatch import combine, dispatch
from moebal.entropy import global_entropy, local_entropy
from moebal.policies.expert_choice import expert_choice
from moebal.hash_table import balanced_hash_table, bucket_counts, ngram_buckets
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
    "local_entropy",
    "global_entropy",
    "balanced_assignment",
    "expert_choice",
    "balanced_hash_table",
    "ngram_buckets",
    "bucket_counts",
    "dispatch",
    "combine",
]
