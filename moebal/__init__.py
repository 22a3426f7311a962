"""moebal: Mixture-of-Experts routing and load balancing for PyTorch."""
from moebal import functional, parallel, stats, testing
from moebal.layer import MoE
from moebal.soft_moe import SoftMoE, SoftMoEStats
from moebal.multitask import ExpertNorm, MultiGateMoE, MultiGateStats, MultiTaskMeter
from moebal.plan import DispatchPlan
from moebal.replay import RoutingRecord, record_routing, replay_routing
from moebal.policies import (
    EntropyLoss, ExpertChoice, ExpertThreshold, HashRouting, ImportanceLoss, LoadLoss, Policy, ReMoE, TopP,
)
from moebal.router import AuxLoss, LinearAssignment, LossFree, Router, Routing, update_biases
from moebal.stats import BalanceStats
from moebal.hf import swap_ffn  # transformers itself is imported lazily, only when used
from moebal.training import aux_loss, balance_report, register_bias_update_hook
from moebal.decode import prepare_decode, release_decode

__version__ = "0.1.0"

__all__ = [
    "MoE",
    "prepare_decode",
    "release_decode",
    "SoftMoE",
    "SoftMoEStats",
    "MultiGateMoE",
    "MultiGateStats",
    "MultiTaskMeter",
    "ExpertNorm",
    "Router",
    "Routing",
    "AuxLoss",
    "LossFree",
    "LinearAssignment",
    "EntropyLoss",
    "ImportanceLoss",
    "LoadLoss",
    "HashRouting",
    "TopP",
    "ReMoE",
    "ExpertChoice",
    "ExpertThreshold",
    "Policy",
    "update_biases",
    "record_routing",
    "replay_routing",
    "RoutingRecord",
    "swap_ffn",
    "aux_loss",
    "balance_report",
    "register_bias_update_hook",
    "BalanceStats",
    "DispatchPlan",
    "functional",
    "parallel",
    "stats",
    "testing",
]
