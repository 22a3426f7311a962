"""Balancing policies: small frozen configurations a ``moebal.Router`` runs (see ``base``)."""
from moebal.policies.aux_loss import AuxLoss
from moebal.policies.base import Policy, RouteContext
from moebal.policies.entropy_loss import EntropyLoss
from moebal.policies.expert_choice import ExpertChoice
from moebal.policies.expert_threshold import ExpertThreshold
from moebal.policies.hashing import HashRouting
from moebal.policies.importance import ImportanceLoss, LoadLoss
from moebal.policies.linear_assignment import LinearAssignment
from moebal.policies.loss_free import LossFree
from moebal.policies.remoe import ReMoE
from moebal.policies.top_p import TopP

__all__ = [
    "Policy", "RouteContext", "AuxLoss", "LossFree", "LinearAssignment", "EntropyLoss", "ImportanceLoss", "LoadLoss",
    "HashRouting", "TopP", "ReMoE", "ExpertChoice", "ExpertThreshold",
]
