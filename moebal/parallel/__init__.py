"""moebal.parallel: scale-out on ``torch.distributed`` (NCCL or gloo).

- Expert parallelism: :func:`expert_parallel` shards the experts of every ``moebal.MoE``
  in a model over a process group or the ``ep`` dim of a ``DeviceMesh`` — 2-D meshes
  ``(dp, ep)`` replicate the shards over ``dp`` (:func:`init_expert_mesh` builds one,
  checked on every rank first; :class:`ExpertParallel` replaces ``moe.experts``; rows
  travel with ``all_to_all_single``); :func:`sync_gradients` averages gradients the way
  data parallelism does, without mixing expert shards, and leaves FSDP2-managed
  parameters (``fully_shard`` over :func:`fsdp_mesh`) alone.
- Checkpoints: an expert-parallel model's ``state_dict()`` holds the expert weights as
  global DTensors (``Shard(0)`` over ``ep``), so ``torch.distributed.checkpoint`` saves it
  once and loads it at another ``ep`` size or into the plain model in one process;
  :func:`optimizer_state_dict` / :func:`load_optimizer_state_dict` do the same for the
  optimizer's per-parameter state.
- Data-parallel balancing: :func:`set_balance_group` makes routers sum their loss-free
  and global-batch counts over the data-parallel group (bit-identical biases on every
  rank); :class:`GlobalBatchBalance` accumulates ``AuxLoss(variant="global_batch")`` counts
  over the micro-batches of a step and reports the step's exact loss.
- BASE across ranks: :class:`TokenShuffle` runs a layer on tokens shuffled across ranks
  by a seeded permutation and restores their order exactly.
- :func:`all_to_all` (differentiable, uneven splits) and :func:`check_same_config` are
  the building blocks.
"""
from moebal.parallel.balance import GlobalBatchBalance, set_balance_group
from moebal.parallel.collectives import all_to_all, check_same_config
from moebal.parallel.expert_parallel import ExpertParallel, expert_parallel, expert_parameters, sync_gradients
from moebal.parallel.optim_state import load_optimizer_state_dict, optimizer_state_dict
from moebal.parallel.mesh import ExpertMesh, fsdp_mesh, init_expert_mesh, resolve_expert_mesh
from moebal.parallel.shuffle import TokenShuffle, TokenShufflePlan, shuffle_permutation

__all__ = [
    "ExpertParallel",
    "expert_parallel",
    "sync_gradients",
    "expert_parameters",
    "ExpertMesh",
    "init_expert_mesh",
    "resolve_expert_mesh",
    "fsdp_mesh",
    "optimizer_state_dict",
    "load_optimizer_state_dict",
    "set_balance_group",
    "GlobalBatchBalance",
    "TokenShuffle",
    "TokenShufflePlan",
    "shuffle_permutation",
    "all_to_all",
    "check_same_config",
]
