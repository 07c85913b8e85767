"""How the training loop runs on several processes: DDP through ``accelerate``, or FSDP2.

What was tried, and why it is done this way (``torch`` 2.13, ``accelerate`` 1.15, two
CPU processes with gloo; the experiments are the tests in ``tests/test_distributed.py``):

- **DDP around the model**, as ``accelerator.prepare(model)`` makes it, does not fit the
  engine. :func:`latentlib.recurrence.latent_forward` calls the decoder once per chunk
  and the LM head once, through ``model.get_decoder()`` and
  ``model.get_output_embeddings()``, never the model's own ``forward``: called on the DDP
  wrapper it fails (``'DistributedDataParallel' object has no attribute
  'get_input_embeddings'``), and called on the wrapped model the reducer never sees a
  forward, so the gradients are silently not all-reduced (measured: each process kept its
  own).
- **FSDP2 with the model as its root** (what ``accelerate``'s FSDP2 preparation does)
  fails the same way: the root's parameters (embeddings, final norm, head) are gathered
  by the root's ``forward``, which the engine never calls (``aten.embedding.default got
  mixed torch.Tensor and DTensor``). ``accelerate`` also leaves FSDP off for CPU
  processes (``MULTI_CPU``), so its FSDP path cannot run on this project's machines.
- **What fits:** one module, :class:`TrainingStep`, holds the model and the modules
  trained with it (an injector, a projection head) and its ``forward(batch)`` is the
  whole loss. A DDP wrapper then sees one forward per backward however many chunks the
  engine runs inside it (a parameter used by several chunks has one gradient
  accumulator, so its reducer hook fires once), and an FSDP2 root on it holds the
  embeddings, head and injector.
- **FSDP2's per-call sharding** (each layer gathered around each of its calls and its
  gradient reduce-scattered after each call's backward) then gives the right gradients
  while every process runs the same chunks (Coconut's aligned thoughts), but hangs as
  soon as the processes' shares hold different numbers of thought columns (Switch-GRPO's
  rollouts, SWITCH's blocks, Coconut with ``uniform_prob``): the per-call all-gathers no
  longer pair up (seen: rank 0 in a layer's all-gather, rank 1 already in the loss's
  all-reduce). Padding the shorter process with passes that change nothing fixed the
  forward, but the backward's per-call reduce-scatters and prefetching all-gathers follow
  each process's own autograd graph and interleaved differently (seen: rank 0 in a
  prefetch all-gather, rank 1 in a reduce-scatter).

So: **DDP** (the default under ``torchrun``, or ``accelerate launch`` with
``configs/accelerate/ddp.yaml``) is ``accelerator.prepare(TrainingStep, optimizer)``:
accelerate's DDP, whose reducer all-reduces gradients in buckets (25 MB by default)
overlapped with the backward, with accelerate's mixed precision and gradient scaling.

**FSDP** (``configs/accelerate/fsdp2.yaml``, or ``ACCELERATE_USE_FSDP=true`` with
``FSDP_VERSION=2``) is torch's own ``fully_shard`` applied here, following accelerate's
FSDP plugin: the layer classes it names (``fsdp_transformer_layer_cls_to_wrap``; by
default the model's own decoder layer class from ``_no_split_modules``, e.g.
``Qwen3DecoderLayer`` or ``LlamaDecoderLayer``) are sharded one by one, everything else
in the root group on the step module, with the plugin's mixed precision policy (bf16)
and CPU offload. Nothing is left replicated, so nothing needs a separate all-reduce.
A training step gathers every group once when it starts and reduce-scatters each
group's gradient once when its backward is done (:func:`latentlib.distributed.training_step`):
inside the step no forward or backward is a collective, so processes may run different
numbers of passes, and the collectives come in one fixed order. Between steps every
parameter, gradient and optimizer state is sharded (measured: half the parameter bytes
per process on 2 processes); during a step each process holds the whole parameters in
the compute dtype, what DDP holds for them, while gradients and AdamW's moments stay
sharded (with AdamW they are most of training memory: 16 bytes per trained parameter
against 2 for a bf16 weight). Communication is one all-gather and one reduce-scatter
per step whatever the number of thought passes, where per-call sharding would gather
every layer twice per pass. ``fsdp_reshard_after_forward`` therefore has no effect.
FSDP version 1 is refused (it flattens the parameters, which the engine's direct calls
of the decoder and the head cannot see).

The engine's features under both: the latent multi-pass forward, checkpointed chunks
and deferred weight gradients (:mod:`latentlib.deferred_grads`) all work, since every
pass of a step sees whole weights (the gathered gradients equal the one-process ones to
1e-7, ``tests/test_distributed.py``).

A model sharded by FSDP stays sharded when training ends (FSDP2 cannot be undone), its
step module registered with :func:`latentlib.distributed.register_root`: inference on it
runs inside :func:`latentlib.distributed.gathered`, saving goes through
:func:`latentlib.distributed.whole_state_dict`, and a later training call (the next
curriculum stage) reuses the same sharding.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from latentlib import distributed

__all__ = ["TrainingStep", "Parallel", "setup", "wants_fsdp", "trainable_named"]


class TrainingStep(nn.Module):
    """The model and the modules trained with it as submodules; ``forward(batch)`` is the
    whole loss (``loss_fn(model, batch) -> (loss, metrics)``), so that a distributed
    wrapper sees one forward per backward."""

    def __init__(self, modules: dict[str, nn.Module]):
        super().__init__()
        self.parts = nn.ModuleDict(modules)
        self.loss_fn: Callable | None = None
        no_split = getattr(modules["model"], "_no_split_modules", None)
        if no_split:
            self._no_split_modules = list(no_split)  # the decoder layer class, as accelerate looks for it

    def forward(self, batch):
        return self.loss_fn(self.parts["model"], batch)


def trainable_named(modules: dict[str, nn.Module]) -> list[tuple[str, nn.Parameter]]:
    """``("<module>.<parameter>", parameter)`` for every trainable parameter, each once,
    in a fixed order (the checkpoint's names)."""
    seen, out = set(), []
    for prefix, m in modules.items():
        for name, p in m.named_parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append((f"{prefix}.{name}", p))
    return out


def wants_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP or \
        os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _fsdp_plugin(accelerator):
    """accelerate's FSDP plugin: the accelerator's (GPU), or one read from the same
    environment (``FSDP_*``, as ``accelerate launch`` sets it) where accelerate does not
    make one (CPU processes)."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None:
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()
        if accelerator.mixed_precision != "no":
            plugin.set_mixed_precision(accelerator.mixed_precision)
    if plugin.fsdp_version != 2:
        raise ValueError(f"the accelerate FSDP configuration asks for FSDP version {plugin.fsdp_version}; latentlib "
                         "shards with FSDP2 (version 1 flattens parameters, which the engine's direct calls of the "
                         "decoder and the head cannot see): set fsdp_version: 2 in the config "
                         "(configs/accelerate/fsdp2.yaml) or FSDP_VERSION=2")
    return plugin


def _layer_classes(plugin, model: nn.Module) -> set[type]:
    names = plugin.transformer_cls_names_to_wrap or list(getattr(model, "_no_split_modules", None) or [])
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    found = {type(m).__name__: type(m) for m in model.modules()}
    missing = [n for n in names if n not in found]
    if missing or not names:
        layers = sorted({n for n in found if n.endswith(("DecoderLayer", "Block", "Layer"))})
        raise ValueError(f"FSDP: the layer class(es) {missing or names} to shard are not in this model; its layer "
                         f"classes are {layers}: set fsdp_transformer_layer_cls_to_wrap to one of them (or leave it "
                         "out to use the model's own decoder layer class)")
    return {found[n] for n in names}


def _shard(step: TrainingStep, accelerator) -> str:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    plugin = _fsdp_plugin(accelerator)
    model = step.parts["model"]
    classes = _layer_classes(plugin, model)
    mp = plugin.mixed_precision_policy
    if mp is not None and mp.param_dtype == torch.float16:
        raise ValueError("FSDP with fp16 needs gradient scaling, which this loop does not do: use bf16 "
                         "(mixed_precision: bf16)")
    if mp is not None and mp.param_dtype is not None:
        # FSDP2 needs one dtype per group among trained parameters; keep fp32 master weights
        for p in step.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    kwargs = {"reshard_after_forward": bool(plugin.reshard_after_forward), "mp_policy": mp or MixedPrecisionPolicy()}
    if plugin.cpu_offload is not None and type(plugin.cpu_offload).__name__ == "CPUOffloadPolicy":
        kwargs["offload_policy"] = plugin.cpu_offload
    layers = [m for m in step.modules() if type(m) in classes]
    for layer in layers:
        fully_shard(layer, **kwargs)
    root_kwargs = {k: v for k, v in kwargs.items() if k != "reshard_after_forward"}
    fully_shard(step, **root_kwargs)
    distributed.register_root(model, step)
    distributed._lazy_init(model)
    names = sorted({c.__name__ for c in classes})
    return (f"FSDP2: {len(layers)} {'/'.join(names)} layers sharded one by one, the rest in the root group; "
            f"mixed precision {mp.param_dtype if mp is not None and mp.param_dtype is not None else 'off'}; "
            "parameters gathered once per step, gradients reduce-scattered once per step")


@dataclass
class Parallel:
    """What the loop calls: the step module (maybe wrapped), the optimizer, how to
    backward and clip."""

    kind: str  # "single", "ddp" or "fsdp"
    step: nn.Module  # TrainingStep, or its DDP wrapper
    inner: TrainingStep
    optimizer: torch.optim.Optimizer  # the optimizer whose state is checkpointed
    stepper: object  # what .step()/.zero_grad() are called on (accelerate's wrapper under DDP)
    accelerator: object
    note: str = ""  # what was set up, printed once by the main process
    params: list = field(default_factory=list)  # trainable parameters (after sharding)

    def scope(self):
        """Around one step's forward and backward: under FSDP the parameters are gathered
        once for the step and the step's gradients reduce-scattered once at its end
        (:func:`latentlib.distributed.training_step`)."""
        if self.kind == "fsdp":
            return distributed.training_step(self.inner.parts["model"])
        return contextlib.nullcontext()

    def forward(self, loss_fn, batch):
        self.inner.loss_fn = loss_fn
        try:
            return self.step(batch)
        finally:
            self.inner.loss_fn = None

    def backward(self, loss):
        if self.kind == "ddp":  # accelerate's (its gradient scaling under fp16)
            self.accelerator.backward(loss)
        else:
            loss.backward()

    def clip(self, max_norm: float) -> float:
        if self.kind == "ddp":
            norm = self.accelerator.clip_grad_norm_(self.params, max_norm)
        else:  # FSDP: torch's clipping reduces the norm of sharded gradients over the processes
            norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)


def _step_for(modules: dict[str, nn.Module], sharded: bool) -> TrainingStep:
    model = modules["model"]
    if sharded:
        step = distributed.root_of(model)
        if not isinstance(step, TrainingStep) or set(step.parts.keys()) != set(modules) or any(
                step.parts[k] is not m for k, m in modules.items()):
            raise ValueError("this model is already sharded with FSDP together with other modules than "
                             f"{sorted(modules)}: train it with the same extra modules as before, or load it anew")
        return step
    return TrainingStep(modules)


def setup(modules: dict[str, nn.Module], make_optimizer: Callable[[list], torch.optim.Optimizer],
          optimizer: torch.optim.Optimizer | None = None) -> Parallel:
    """Places ``modules`` (``{"model": model, **extra}``) on this process's device and
    prepares them for one process, DDP or FSDP (see the module docstring).
    ``make_optimizer(params)`` builds the optimizer over the trainable parameters as they
    are after sharding; ``optimizer``: one to continue with instead (its parameters must
    be the modules' current ones)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    distributed.init()
    model = modules["model"]
    sharded = distributed.is_sharded(model)
    extra_trainable = any(p.requires_grad for k, m in modules.items() if k != "model" for p in m.parameters())
    # an injector or head may go unused in a step (a batch without thoughts): DDP must look for unused parameters
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=extra_trainable)])
    world = accelerator.num_processes
    fsdp = world > 1 and (sharded or wants_fsdp(accelerator))
    if not sharded:
        for m in modules.values():
            m.to(accelerator.device)
    step = _step_for(modules, sharded)
    note = ""
    if fsdp and not sharded:
        note = _shard(step, accelerator)
    params = [p for _, p in trainable_named(modules)]
    if not params:
        raise ValueError("nothing to train: no parameter has requires_grad=True")
    if optimizer is not None:
        current = {id(p) for p in params}
        if any(id(p) not in current for g in optimizer.param_groups for p in g["params"]):
            raise ValueError("the optimizer given to continue with holds parameters that are not the model's current "
                             "ones (FSDP replaces them when it shards the model): pass the optimizer the previous "
                             "training call returned (TrainResult.optimizer)")
        opt = optimizer
    else:
        opt = make_optimizer(params)
    if fsdp:
        return Parallel("fsdp", step, step, opt, opt, accelerator, note, params)
    if world > 1:
        wrapped, stepper = accelerator.prepare(step, opt)
        note = (f"DDP through accelerate on {world} processes: gradients all-reduced in buckets during the backward"
                + (", looking for unused parameters (extra trained modules)" if extra_trainable else ""))
        return Parallel("ddp", wrapped, step, opt, stepper, accelerator, note, params)
    return Parallel("single", step, step, opt, opt, accelerator, "", params)
