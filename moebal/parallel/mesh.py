"""Where the experts live: the expert-parallel and data-parallel groups of a ``DeviceMesh``.

Shape legend: W ranks of the mesh, P ranks of the expert-parallel (``ep``) dim, Q ranks of
the data-parallel (``dp``) dim, W = P·Q.

An MoE job is two-dimensional: the experts are sharded over the ``ep`` dim (tokens travel
with all-to-all inside an ``ep`` group) and replicated over the ``dp`` dim; everything else
(router, shared experts, attention, norms) is replicated over all W ranks.
:class:`ExpertMesh` names the groups each kind of state is reduced over:

============================== ======================= ===================================
state                           reduced over            why
============================== ======================= ===================================
expert weights' gradients       ``dp`` group            each ``ep`` group's backward already
                                                        summed its P ranks' tokens
non-expert gradients            all W ranks (``world``)  replicated everywhere
loss-free / global-batch counts all W ranks (``world``)  the router is replicated everywhere
token all-to-all                ``ep`` group
============================== ======================= ===================================

A 1-D mesh or a plain process group is expert parallelism alone (Q = 1). A 2-D mesh has
named dims (``("dp", "ep")`` by default; the names are arguments). :func:`init_expert_mesh`
builds the mesh after checking that every rank asks for the same one: torch's
``init_device_mesh`` creates its groups collectively, so a rank asking for another shape
would leave the others waiting inside it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from moebal.parallel.collectives import check_same_config, require_initialized

__all__ = ["ExpertMesh", "init_expert_mesh", "resolve_expert_mesh", "fsdp_mesh"]


@dataclass(frozen=True, eq=False)
class ExpertMesh:
    """The groups of an expert-parallel job (build it with :func:`resolve_expert_mesh`).

    ``mesh`` is a DeviceMesh whose dims are ``(dp, ep)`` or ``(ep,)`` (one built from the
    group when the user passed a process group); ``ep_dim``/``dp_dim`` are the indices of
    those dims in it (``dp_dim`` None when there is no data-parallel dim).
    """

    mesh: object  # DeviceMesh
    ep_dim: int
    dp_dim: int | None
    ep_group: object
    dp_group: object | None
    world_group: object
    ep_size: int
    dp_size: int
    ep_rank: int
    dp_rank: int

    @property
    def world_size(self) -> int:
        """W = P·Q, the ranks every replicated parameter lives on."""
        return self.ep_size * self.dp_size

    def describe(self) -> dict:
        """What every rank must agree on (compared at setup by ``check_same_config``)."""
        return {
            "mesh.ranks": self.mesh.mesh.tolist(),
            "mesh.dim_names": tuple(self.mesh.mesh_dim_names or ()),
            "mesh.device_type": self.mesh.device_type,
            "mesh.ep_dim": self.ep_dim,
            "mesh.dp_dim": self.dp_dim,
        }

    def __repr__(self) -> str:
        return f"ExpertMesh(ep={self.ep_size}, dp={self.dp_size}, mesh={self.mesh})"


def _is_mesh(obj) -> bool:
    from torch.distributed.device_mesh import DeviceMesh

    return isinstance(obj, DeviceMesh)


def _device_type(group) -> str:
    return "cuda" if dist.get_backend(group) == "nccl" else "cpu"


def _covers_world(mesh) -> bool:
    return sorted(mesh.mesh.flatten().tolist()) == list(range(dist.get_world_size()))


def resolve_expert_mesh(mesh_or_group=None, ep_dim: str = "ep", dp_dim: str = "dp") -> ExpertMesh:
    """The :class:`ExpertMesh` of a DeviceMesh (1-D, or 2-D with dims named ``dp_dim`` and
    ``ep_dim``), a process group, or None (the default group). Runs no collective when the
    mesh spans the whole job (a 2-D mesh over part of it flattens into a new group)."""
    require_initialized("expert parallelism")
    if mesh_or_group is None:
        mesh_or_group = dist.group.WORLD
    if not _is_mesh(mesh_or_group):
        if not isinstance(mesh_or_group, dist.ProcessGroup):
            raise TypeError(
                f"mesh_or_group must be a DeviceMesh, a ProcessGroup or None, got {type(mesh_or_group).__name__}"
            )
        from torch.distributed.device_mesh import DeviceMesh

        group = mesh_or_group
        mesh = DeviceMesh.from_group(group, _device_type(group), mesh_dim_names=(ep_dim,))
        return _build(mesh, 0, None, group, None, group)
    mesh = mesh_or_group
    if mesh.ndim == 1:
        group = mesh.get_group(0)
        return _build(mesh, 0, None, group, None, group)
    if mesh.ndim != 2:
        raise ValueError(f"mesh must be 1-D (ep) or 2-D (dp, ep), got a {mesh.ndim}-D mesh {mesh}")
    names = tuple(mesh.mesh_dim_names or ())
    for arg, name in (("ep_dim", ep_dim), ("dp_dim", dp_dim)):
        if name not in names:
            raise ValueError(f"{arg}={name!r} is not a dim of the mesh, whose dims are named {names}")
    if ep_dim == dp_dim:
        raise ValueError(f"ep_dim and dp_dim must differ, got {ep_dim!r} for both")
    world = dist.group.WORLD if _covers_world(mesh) else mesh._flatten().get_group()
    return _build(mesh, names.index(ep_dim), names.index(dp_dim), mesh.get_group(ep_dim), mesh.get_group(dp_dim), world)


def _build(mesh, ep_dim, dp_dim, ep_group, dp_group, world_group) -> ExpertMesh:
    return ExpertMesh(
        mesh=mesh, ep_dim=ep_dim, dp_dim=dp_dim, ep_group=ep_group, dp_group=dp_group, world_group=world_group,
        ep_size=dist.get_world_size(ep_group), dp_size=1 if dp_group is None else dist.get_world_size(dp_group),
        ep_rank=dist.get_rank(ep_group), dp_rank=0 if dp_group is None else dist.get_rank(dp_group),
    )


def init_expert_mesh(ep: int, dp: int = 1, device_type: str | None = None, mesh_dim_names=("dp", "ep")):
    """A ``(dp, ep)`` DeviceMesh over all ranks (``(ep,)`` when ``dp == 1``), checked first.

    Every rank must pass the same arguments; one ``all_gather_object`` on the default group
    compares them before ``init_device_mesh`` creates any group, so a rank that asks for
    another mesh gets the same ``ValueError`` on every rank instead of a hang. ``ep * dp``
    must equal the world size. ``device_type`` defaults to ``"cuda"`` under NCCL, else
    ``"cpu"``.
    """
    require_initialized("init_expert_mesh")
    for arg, value in (("ep", ep), ("dp", dp)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    names = tuple(mesh_dim_names)
    if len(names) != 2 or len(set(names)) != 2:
        raise ValueError(f"mesh_dim_names must be two distinct names (dp, ep), got {mesh_dim_names!r}")
    device_type = device_type or _device_type(None)
    check_same_config(
        {"ep": ep, "dp": dp, "device_type": device_type, "mesh_dim_names": names},
        None, "init_expert_mesh: the requested mesh",
    )
    world = dist.get_world_size()
    if ep * dp != world:
        raise ValueError(f"ep * dp must equal the world size {world}, got ep={ep}, dp={dp}")
    from torch.distributed.device_mesh import init_device_mesh

    if dp == 1:
        return init_device_mesh(device_type, (ep,), mesh_dim_names=(names[1],))
    return init_device_mesh(device_type, (dp, ep), mesh_dim_names=names)


def fsdp_mesh(mesh):
    """The 1-D mesh over all ranks of ``mesh``: where FSDP2's ``fully_shard`` of the
    non-expert modules belongs (their gradients are averaged over every rank)."""
    if mesh.ndim == 1:
        return mesh
    return mesh._flatten()
