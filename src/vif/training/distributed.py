"""The engine a training run is sharded with, and the places where VIF steps in for it.

`vif train` runs on the transformers ``Trainer``, so ``accelerate launch --config_file ...``
chooses the engine: plain DDP, FSDP (full-shard or shard-grad-op) or DeepSpeed ZeRO-2 / -3.
Left alone, each of them loses something of VIF's. Every fix below says what goes wrong
without it; each is tested with two processes on CPU (tests/test_distributed.py).

1. accelerate turns FSDP on only for accelerator devices: on CPU an FSDP config silently
   trains with plain DDP (every rank holds the whole optimiser). :func:`enable_fsdp_on_cpu`.
2. FSDP renames parameters (``_fsdp_wrapped_module.`` inside the name), so choosing the VIF
   module's learning rate by name would silently give it the LLM's. :func:`canonical_name`.
3. With FSDP's sharded state dicts the Trainer never calls ``_save``, so no VIF adapter would be
   written, and reading the live (sharded) modules gives fragments. :func:`gather_vif_state`
   (the VIF module alone, for every checkpoint) and :func:`gather_full_state` (everything, at the
   end); PEFT then needs :func:`unwrapped_module_names`, or it writes an empty LoRA adapter.
4. On resume, the Trainer's FSDP route restores none of Adam's moments (it loads into a template
   taken from the fresh optimiser, which has none), without a word; the resumed run then drifts
   from the uninterrupted one. :func:`load_sharded_optimizer` reads the same files again through
   torch.distributed.checkpoint's ``get/set_optimizer_state_dict``.
5. Posterior noise: every rank starts from the same RNG state, so with the global RNG the two
   halves of a global batch drew the same noise, and a 2-process run differed from the 1-process
   run with the same global batch. The trainer seeds each sample's noise from (seed, step,
   sample index) instead (:func:`sample_seeds`), which makes runs independent of the process count.

6. ZeRO-3 loads the model inside ``deepspeed.zero.Init`` (the Trainer's arguments exist before
   the weights load), and transformers' ZeRO-3 loader records every checkpoint-key renaming it
   knows, not only those that matched; ``save_pretrained`` reverts them all and wrote LLaVA's
   language model as ``language_model.model.model.*``. :func:`keep_used_key_conversions`.
   (The same loading draws random weights before the checkpoint overwrites them, so the seed for
   LoRA's and the VIF module's initialisation is set after loading, in ``build_trainer``.)

(The seventh, the model output's ``vif`` field dropped by wrappers that rebuild the output, is
handled where the output is read, in :meth:`VIFTrainer.compute_loss`.)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

# Prefixes that wrappers put into parameter names: FSDP1 and its activation-checkpoint wrapper
# anywhere in the name, torch.compile's and DDP's / DeepSpeed's only at the start.
_INNER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
_OUTER_PREFIXES = ("_orig_mod.", "module.")
FSDP_OPTIMIZER_DIR = (
    "optimizer_0"  # where the Trainer (through accelerate) writes the sharded optimiser state
)


def canonical_name(name: str) -> str:
    """A parameter name as the unwrapped model spells it (wrapper prefixes removed)."""
    for prefix in _INNER_PREFIXES:
        name = name.replace(prefix, "")
    changed = True
    while changed:
        changed = False
        for prefix in _OUTER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def engine_name(accelerator: Any) -> str:
    """``"single" | "ddp" | "fsdp" | "deepspeed"``: how the Trainer's accelerator runs the model."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "fsdp"
    if kind == DistributedType.DEEPSPEED:
        return "deepspeed"
    if kind == DistributedType.NO:
        return "single"
    return "ddp"


def fsdp_requested() -> bool:
    """Whether ``accelerate launch`` was given an FSDP config (it exports ``ACCELERATE_USE_FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_checkpoints_layers() -> bool:
    """Whether the FSDP config turns on FSDP's own activation checkpointing (``fsdp_activation_checkpointing``)."""
    return fsdp_requested() and os.environ.get("FSDP_ACTIVATION_CHECKPOINTING", "false").lower() == "true"


def deepspeed_requested() -> bool:
    """Whether ``accelerate launch`` was given a DeepSpeed config (it exports ``ACCELERATE_USE_DEEPSPEED``)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def device_arguments(recipe_deepspeed: str | None) -> dict[str, Any]:
    """``TrainingArguments`` fields that pick the device and process-group backend.

    On CPU, accelerate runs DeepSpeed (``DS_ACCELERATOR=cpu``) only with ``use_cpu`` off, and then
    needs the backend named: without one it sets up no process group of its own and every
    process believes it is alone (DeepSpeed then refuses the batch size).
    """
    from .recipe import RecipeError

    if torch.cuda.is_available():
        return {"use_cpu": False}
    if deepspeed_requested():
        return {"use_cpu": False, "ddp_backend": "gloo"}
    if recipe_deepspeed is not None:
        raise RecipeError(
            "deepspeed: a DeepSpeed JSON in the recipe needs GPUs (torchrun); on CPU launch with "
            "accelerate launch --config_file recipes/accelerate_zero2.yaml and DS_ACCELERATOR=cpu instead."
        )
    return {"use_cpu": True}


# -----------------------------------------------------------------------------
# 1. FSDP on CPU


def enable_fsdp_on_cpu(accelerator: Any) -> bool:
    """Turns FSDP on where accelerate fell back to DDP because the processes run on CPU.

    accelerate enables FSDP only for accelerator devices (its state checks for ``MULTI_GPU``,
    ``MULTI_XPU``, ...); with ``MULTI_CPU`` it ignores the FSDP config and wraps the model in DDP.
    This sets the same state accelerate sets on a GPU, from the same ``FSDP_*`` variables that
    ``accelerate launch`` exported. Two CPU-specific settings: the device is plain ``cpu`` (FSDP1
    refuses the indexed ``cpu:0`` accelerate would pass as ``device_id``), and
    ``sync_module_states`` is off (its broadcast needs an accelerator; every process loaded the
    same checkpoint and seeded the VIF module alike, which the tests check).
    Returns True when it switched the engine.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if not fsdp_requested() or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables, as accelerate does
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    plugin.sync_module_states = False
    cpu = torch.device("cpu")
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    state.device = cpu
    partial = PartialState()
    partial.distributed_type, partial.device = DistributedType.FSDP, cpu
    return True


def set_fsdp_wrap_classes(plugin: Any, base: nn.Module) -> None:
    """Names the backbone's layer classes for FSDP's transformer-based wrap policy.

    accelerate takes them from the wrapped model's ``_no_split_modules``; the trainer wraps the
    VIFModel, which has none, so without this FSDP would make the whole model one unit (and
    gather all of it at once). The VIF module is never named: it stays in the root unit.
    """
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    if (
        plugin.auto_wrap_policy is transformer_auto_wrap_policy
        and plugin.transformer_cls_names_to_wrap is None
    ):
        present = {type(m).__name__ for m in base.modules()}
        names = getattr(base, "_no_split_modules", None) or []
        plugin.transformer_cls_names_to_wrap = sorted(n for n in names if n in present)


def check_fsdp_wrapping(model: nn.Module) -> None:
    """Refuses an FSDP wrap that puts part of the VIF module into its own FSDP unit.

    VIF's hooks call the attender's methods directly (not through a wrapped forward), so its
    parameters must live in the root unit, which FSDP gathers for the whole forward. A
    transformer-based wrap policy (the shipped configs) only wraps the backbone's layers.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for unit in FSDP.fsdp_modules(model):
        if unit is model:
            continue
        names = [canonical_name(n) for n, _ in unit.named_parameters()]
        if any(n.startswith("vif_module.") or ".vif_module." in n for n in names):
            raise ValueError(
                "the FSDP wrap policy puts part of the VIF module into its own FSDP unit; use "
                "fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP (as recipes/accelerate_fsdp_*.yaml do)."
            )


# -----------------------------------------------------------------------------
# 3. Gathering sharded weights for saving


def _fsdp_root(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    if not isinstance(model, FSDP):
        raise TypeError(f"expected the FSDP-wrapped model, got {type(model).__name__}")
    return model


def gather_vif_state(model: nn.Module, vif_module: nn.Module) -> dict[str, torch.Tensor]:
    """The VIF module's full weights (CPU tensors, keys as ``vif_module.state_dict()``), on every rank.

    ``model`` is the FSDP-wrapped training model. Only the root FSDP unit is gathered (the VIF
    module lives there, see :func:`check_fsdp_wrapping`), not the backbone's layers.
    """
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(_fsdp_root(model), recurse=False, writeback=False):
        return {k: v.detach().to("cpu", copy=True) for k, v in vif_module.state_dict().items()}


def gather_full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state dict, gathered on rank 0 (other ranks get ``{}``); keys unwrapped.

    Every rank must call it (it is a collective). On an accelerator the gathered tensors go to
    CPU as they arrive, so rank 0's GPU never holds the whole model.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    on_cpu = next(model.parameters()).device.type == "cpu"
    # On CPU every rank gathers (offloading to "cpu" from "cpu" is refused by FSDP1); only rank 0 writes.
    options = StateDictOptions(full_state_dict=True, cpu_offload=not on_cpu)
    state = get_model_state_dict(model, options=options)
    if on_cpu and dist.get_rank() != 0:
        return {}
    return {canonical_name(k): v for k, v in state.items()}


@contextlib.contextmanager
def unwrapped_module_names(peft_model: nn.Module) -> Iterator[None]:
    """Inside the block, ``peft_model.named_modules()`` yields names without FSDP's wrapper segments.

    PEFT picks the adapter's weights out of a state dict by the names of its LoRA modules. FSDP
    wraps each decoder layer, which puts ``_fsdp_wrapped_module.`` (and with activation
    checkpointing ``_checkpoint_wrapped_module.``) inside those names; PEFT only strips a wrapper
    around the whole model, matches nothing, and writes an empty adapter. The gathered state
    dict's keys are unwrapped, so PEFT must see unwrapped module names while it saves.
    """
    wrapped = peft_model.named_modules

    def named_modules(*args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Module]]:
        for name, module in wrapped(*args, **kwargs):
            yield canonical_name(name), module

    peft_model.named_modules = named_modules  # this instance only, for the block
    try:
        yield
    finally:
        del peft_model.named_modules


# -----------------------------------------------------------------------------
# 4. The sharded optimiser state


def load_sharded_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Restores the sharded optimiser state the Trainer saved (torch.distributed.checkpoint), each rank its share.

    ``get_optimizer_state_dict`` builds the template with every state entry (it initialises
    Adam's moments first); a template taken from a fresh optimiser has none, and a load into it
    restores nothing without a word.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    inner = unwrap_optimizer(optimizer)
    # The template has this run's keys and shapes; load fills it in place.
    state = {"optimizer": get_optimizer_state_dict(model, inner)}
    dcp.load(state, checkpoint_id=str(directory), planner=DefaultLoadPlanner(allow_partial_load=True))
    set_optimizer_state_dict(model, inner, state["optimizer"])


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimiser inside accelerate's wrapper."""
    from accelerate.optimizer import AcceleratedOptimizer

    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_state_elements(optimizer: Any) -> int:
    """Elements of Adam's first-moment buffers that this process holds.

    A sharded engine (FSDP, ZeRO) holds about 1 / processes of them; DDP holds all. This is how
    the tests (and ``engine.json``) tell a really sharded run from a silent fallback to DDP.
    """
    inner = optimizer
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    return sum(int(s["exp_avg"].numel()) for s in inner.state.values() if "exp_avg" in s)


# -----------------------------------------------------------------------------
# 5. Per-sample noise


def sample_seeds(seed: int, step: int, indices: list[int] | torch.Tensor) -> list[int]:
    """One 63-bit seed per sample from (run seed, optimiser step, dataset index).

    The same sample at the same step gets the same noise however the global batch is split
    over processes and micro-batches, and a resumed run draws what the uninterrupted one drew.
    """
    indices = [int(i) for i in (indices.tolist() if torch.is_tensor(indices) else indices)]
    return [
        int(np.random.SeedSequence([seed, step, i]).generate_state(1, np.uint64)[0] >> np.uint64(1))
        for i in indices
    ]


# -----------------------------------------------------------------------------
# 6. Loading under ZeRO-3


def keep_used_key_conversions(model: nn.Module) -> None:
    """Keeps on ``model`` only the checkpoint-key renamings that renamed a key when it was loaded.

    transformers records the renamings it applied on load (LLaVA: ``language_model.model.*`` ->
    ``model.language_model.*``, ...) and ``save_pretrained`` reverts them, so a saved model has its
    checkpoint's keys. Outside ZeRO-3 it records the renamings that matched; its ZeRO-3 loader
    records all it knows, legacy ones included, and reverting one that never applied renamed
    LLaVA's language model to ``language_model.model.model.*``, which loads as missing weights.
    """
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        model._weight_conversions = [c for c in conversions if not hasattr(c, "was_used") or c.was_used()]
