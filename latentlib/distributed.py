"""The processes of a distributed run: who this process is, its device, what only the
main process does, work split across processes, and inference on a sharded model.

A run started by ``torchrun`` or ``accelerate launch`` has ``WORLD_SIZE``, ``RANK`` and
``LOCAL_RANK`` in its environment; every function here reads them, so it also works
before the process group exists, and does nothing special in a single process. The
process group is joined through ``accelerate`` (:func:`init`), the same state the
training loop's ``Accelerator`` uses.

Rules the rest of the library follows:

- **Devices.** Each process loads onto its own device (:func:`device`: ``cuda:LOCAL_RANK``
  with GPUs, else the CPU), never ``cuda`` (which is ``cuda:0`` on every rank).
- **Writes.** Only the main process writes an artifact (:func:`on_main`); the others
  wait for it and get its result, or an error naming what failed on the main process,
  instead of waiting forever for a collective the main process never reaches.
- **Agreement.** A step that can fail on one process only (its weights are missing, a
  file is unreadable there) is followed by :func:`check_all_ranks`, so every process
  stops with the same message naming the processes that failed.
- **Work split.** Inference over a list (evaluation, teacher rollouts) runs a share per
  process and gathers the results in the list's order (:func:`map_sharded`).
- **Sharded models.** A model whose layers are sharded with FSDP2 runs inference inside
  :func:`gathered`: every sharded group is all-gathered once, kept whole for the block,
  and resharded at its end; it is saved from :func:`whole_state_dict`. Inside it a forward needs no collective, so processes may run
  different numbers of generation steps (different prompts finish at different steps).
  The cost is a whole copy of the weights per process for the duration of the block
  (what one-process inference needs anyway); the alternative, keeping sharded forwards
  and every process's step count equal, would all-gather every layer at every generated
  token. A training step does the same (:func:`training_step`), and reduce-scatters the
  step's gradients once at its end, for the reason in :mod:`latentlib.training.parallel`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["world", "rank", "local_rank", "is_main", "is_distributed", "device", "init", "barrier", "broadcast",
           "on_main", "main_first", "check_all_ranks", "RankFailedError", "map_sharded", "all_mean",
           "register_root", "root_of", "is_sharded", "gathered", "whole_state_dict", "local_bytes",
           "collective_forwards", "require_gathered", "training_step"]

T = TypeVar("T")


class RankFailedError(RuntimeError):
    """A step failed on some processes of a distributed run; every process raises it."""


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def world() -> int:
    """Number of processes of the run (1 without a launcher)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return _env_int("WORLD_SIZE", 1)


def rank() -> int:
    """This process's rank (0 without a launcher)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def local_rank() -> int:
    """This process's index on its machine (its GPU)."""
    return _env_int("LOCAL_RANK", 0)


def is_main() -> bool:
    return rank() == 0


def is_distributed() -> bool:
    """Several processes, with their process group joined (joins it if the launcher
    started several and nobody has yet)."""
    if world() <= 1:
        return False
    init()
    return True


def device() -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` when GPUs are visible, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def init() -> None:
    """Joins the process group of a multi-process launch through ``accelerate`` (gloo on
    CPUs, NCCL on GPUs; sets this process's GPU). Nothing for one process."""
    if _env_int("WORLD_SIZE", 1) <= 1 or (dist.is_available() and dist.is_initialized()):
        return
    from accelerate import PartialState

    PartialState(cpu=not torch.cuda.is_available())


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast(obj: T, src: int = 0) -> T:
    """``obj`` of process ``src`` on every process (picklable; small objects only)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def on_main(fn: Callable[..., T], *args, what: str = "writing an artifact", **kwargs) -> T:
    """Runs ``fn`` on the main process only; the others wait and get its result
    (broadcast, so it should be small). If it fails, the main process re-raises its
    error and the others raise :class:`RankFailedError` saying so."""
    if not is_distributed():
        return fn(*args, **kwargs)
    result, error = None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - reported to the other processes, then re-raised
            error = e
    status = broadcast(("ok", result) if error is None else ("failed", _describe(error)))
    if error is not None:
        raise error
    if status[0] != "ok":
        raise RankFailedError(f"the main process (rank 0) failed {what}: {status[1]}; nothing was written by "
                              "this process: fix the error above and re-run the same command (it resumes)")
    return status[1]


@contextlib.contextmanager
def main_first(what: str = "preparing a shared file") -> Iterator[None]:
    """The body runs on the main process first, then on the others (e.g. the main process
    fills a cache the others then read). A failure on the main process stops the others
    with :class:`RankFailedError` instead of letting them run the body."""
    if not is_distributed():
        yield
        return
    if is_main():
        try:
            yield
        except BaseException as e:
            broadcast(("failed", _describe(e)))
            raise
        broadcast(("ok", None))
    else:
        status = broadcast(None)
        if status[0] != "ok":
            raise RankFailedError(f"the main process (rank 0) failed {what}: {status[1]}")
        yield


def check_all_ranks(error: BaseException | None, what: str, fix: str = "") -> None:
    """Every process reports whether ``what`` worked on it; if it failed anywhere, every
    process raises one :class:`RankFailedError` naming the processes (rank, host) that
    failed and why, and ``fix``. A process that failed re-raises from its own error."""
    if not is_distributed():
        if error is not None:
            raise error
        return
    mine = None if error is None else (rank(), socket.gethostname(), _describe(error))
    reports: list = [None] * world()
    dist.all_gather_object(reports, mine)
    failed = [r for r in reports if r is not None]
    if not failed:
        return
    where = "; ".join(f"rank {r} on {host}: {msg}" for r, host, msg in failed)
    ok = world() - len(failed)
    message = (f"{what} failed on {len(failed)} of {world()} processes ({ok} succeeded): {where}. "
               f"{fix or 'Make the same files available to every process (a shared filesystem or the same paths on every machine)'}; "
               "nothing was trained or written")
    if error is not None:
        raise RankFailedError(message) from error
    raise RankFailedError(message)


def map_sharded(items: Sequence, fn: Callable[[list], list], *, to_main_only: bool = False) -> list | None:
    """``fn`` on this process's share of ``items`` (every ``world()``-th item from its
    rank on, so slow and fast items spread evenly), the results gathered back in the
    order of ``items``. ``fn(share) -> results`` returns one picklable result per item
    (CPU tensors, not GPU ones). ``to_main_only``: only the main process receives the
    results (the others get None), for large results."""
    if not is_distributed():
        return list(fn(list(items)))
    n, w, r = len(items), world(), rank()
    local = list(fn([items[i] for i in range(r, n, w)]))
    if len(local) != len(range(r, n, w)):
        raise ValueError(f"fn returned {len(local)} results for {len(range(r, n, w))} items: one per item")
    parts: list | None = [None] * w if (not to_main_only or is_main()) else None
    if to_main_only:
        dist.gather_object(local, parts, dst=0)
    else:
        dist.all_gather_object(parts, local)
    if parts is None:
        return None
    out: list = [None] * n
    for src, part in enumerate(parts):
        out[src::w] = part
    return out


def all_mean(values: dict[str, float]) -> dict[str, float]:
    """Per key, the mean over the processes that have the key (metrics of a step)."""
    if not is_distributed():
        return dict(values)
    parts: list = [None] * world()
    dist.all_gather_object(parts, dict(values))
    keys = list(dict.fromkeys(k for p in parts for k in p))
    return {k: sum(p[k] for p in parts if k in p) / sum(k in p for p in parts) for k in keys}


# ---------------------------------------------------------------------------- sharded models

# roots whose groups are gathered right now (inside `gathered`)
_GATHERED: set[int] = set()

# model -> the module whose FSDP groups hold its parameters (the training step that wraps
# the model and the modules trained with it); weak, so a model's sharding dies with it
_ROOTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register_root(model: nn.Module, root: nn.Module) -> None:
    """Records that ``model``'s parameters are sharded in ``root``'s FSDP groups (``root``
    contains ``model``; the training loop registers its step module)."""
    _ROOTS[model] = root


def root_of(model: nn.Module) -> nn.Module:
    return _ROOTS.get(model, model)


def _fsdp_modules(module: nn.Module) -> list:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return []
    return [m for m in root_of(module).modules() if isinstance(m, FSDPModule)]


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` (or the step it was trained in) has FSDP2-sharded parameters."""
    return bool(_fsdp_modules(module))


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[nn.Module]:
    """Inference on whole parameters: every FSDP2 group holding ``module``'s parameters
    (and those of the modules trained with it) is all-gathered once on entry (a
    collective: every process enters together) and resharded on exit; in between,
    forwards run no collective. A module without sharded parameters, or already
    gathered, is left as it is."""
    with _whole(module, train=False) as m:
        yield m


@contextlib.contextmanager
def training_step(module: nn.Module) -> Iterator[nn.Module]:
    """One training step (forward and backward inside) on whole parameters: every FSDP2
    group is all-gathered once on entry; the forward and backward then run no
    collective, however many passes through the layers the data asks for; on a normal
    exit each group's gradient of the step is reduce-scattered once (the mean over the
    processes, every trained parameter, used or not) and the group resharded. On an
    exception the step's gradients are dropped. Collectives happen in one fixed order,
    the same on every process. For a module without sharded parameters: nothing."""
    with _whole(module, train=True) as m:
        yield m


@contextlib.contextmanager
def _whole(module: nn.Module, *, train: bool) -> Iterator[nn.Module]:
    groups = _fsdp_modules(module)
    root = id(root_of(module))
    if not groups or root in _GATHERED:
        yield module
        return
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

    _lazy_init(module)
    _GATHERED.add(root)
    saved = []
    for m in groups:  # root_of(module).modules() order: the same on every process
        state = m._get_fsdp_state()
        param_groups = list(state._fsdp_param_groups)
        saved.append((m, state._auto_reshard_after_forward, [g.post_forward_mesh_info for g in param_groups],
                      [(g.reshard_after_backward, g.reduce_grads, g.all_reduce_grads, g.reduce_scatter_unused_params)
                       for g in param_groups]))
        m.set_reshard_after_forward(False, recurse=False)
        if train:
            m.set_reshard_after_backward(False, recurse=False)
            m.set_requires_gradient_sync(False, recurse=False)  # the backward only accumulates
        m.unshard()
    ok = False
    try:
        yield module
        ok = True
    finally:
        _GATHERED.discard(root)
        for m, auto, infos, flags in saved:
            state = m._get_fsdp_state()
            for g, (after_backward, reduce, all_reduce, unused) in zip(state._fsdp_param_groups, flags):
                if train and ok:  # the step's gradients, reduce-scattered once
                    g.reduce_grads = g.all_reduce_grads = g.reduce_scatter_unused_params = True
                    g.post_backward()
                    g.finalize_backward()
                elif train:
                    for p in g.fsdp_params:
                        p.unsharded_accumulated_grad = None
                        if hasattr(p, "_unsharded_param"):
                            p._unsharded_param.grad = None
                g._training_state = TrainingState.IDLE
                g.reshard_after_backward, g.reduce_grads, g.all_reduce_grads = after_backward, reduce, all_reduce
                g.reduce_scatter_unused_params = unused
            m.reshard()
            state._auto_reshard_after_forward = auto
            for g, info in zip(state._fsdp_param_groups, infos):
                g.post_forward_mesh_info = info


def collective_forwards(module: nn.Module) -> bool:
    """Whether every forward of ``module``'s layers is a collective right now: its
    parameters are sharded and not gathered (:func:`gathered`, :func:`training_step`)."""
    return is_sharded(module) and id(root_of(module)) not in _GATHERED


def require_gathered(module: nn.Module, what: str) -> None:
    """Refuses ``what`` (generation: each process takes its own number of steps) on a
    sharded model outside :func:`gathered`, where it would hang on the first step one
    process does not take."""
    if collective_forwards(module):
        raise RuntimeError(f"{what} on a model sharded with FSDP outside latentlib.distributed.gathered(model): every "
                           "forward would be a collective and processes stop at different steps; wrap the call in "
                           "`with latentlib.distributed.gathered(model):` (every process enters it together)")


def _lazy_init(module: nn.Module) -> None:
    """FSDP2 finds its root at the first forward, which must be the root's; inference
    calls the model's parts directly, so the root is initialised here first (FSDP2 has no
    public call for it)."""
    root = root_of(module)
    if hasattr(root, "_get_fsdp_state"):
        root._get_fsdp_state()._lazy_init()


def whole_state_dict(module: nn.Module, *, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """``module``'s state with whole tensors, for saving. Sharded parameters are gathered
    (one all-gather per tensor: every process must call this) and arrive as CPU tensors
    on the main process, the other processes get ``{}``; an unsharded module's tensors
    are its own (no copy). ``trainable_only``: only parameters with ``requires_grad``
    (under every name they have, e.g. a tied head's too). Names of one tensor (tied
    weights) get one gathered tensor, as in the module, so ``save_pretrained`` drops the
    tied copy as it does for a one-process model."""
    from torch.distributed.tensor import DTensor

    state = module.state_dict()
    if trainable_only:
        trainable = {name for name, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trainable}
    if not is_sharded(module):
        return state
    # one gathered copy per parameter, so that tied names stay tied (the head is not saved twice); which
    # names are one parameter is read from the module (the same on every process, so every process
    # gathers the same tensors in the same order), not from storage (a process's shard may be empty)
    owner = {name: id(t) for name, t in [*module.named_parameters(remove_duplicate=False),
                                         *module.named_buffers(remove_duplicate=False)]}
    out, whole = {}, {}
    for name, value in state.items():
        key = owner.get(name, name)
        if key not in whole:
            full = value.full_tensor() if isinstance(value, DTensor) else value
            whole[key] = full.detach().to("cpu", copy=True) if is_main() else None
        if is_main():
            out[name] = whole[key]
    return out


def local_bytes(module: nn.Module) -> int:
    """Bytes of parameters this process holds (its shard of a sharded parameter)."""
    from torch.distributed.tensor import DTensor

    seen, total = set(), 0
    for p in module.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        t = p.to_local() if isinstance(p, DTensor) else p
        total += t.numel() * t.element_size()
    return total
