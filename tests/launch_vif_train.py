"""Runs several ``vif train`` commands in one ``accelerate launch`` (tests/test_distributed.py).

    accelerate launch --config_file CONFIG --num_processes 2 tests/launch_vif_train.py STEPS.json

STEPS.json is a list of steps, run in order by every process:

* ``{"train": [args of `vif train`]}``: one real ``vif train`` (``vif.cli.main``);
* ``{"copy": [src, dst]}``: process 0 copies a checkpoint folder, the others wait;
* ``{"env": {name: value}}``: changes variables that ``accelerate launch`` exported from its
  config, for the runs that follow (e.g. ``FSDP_SHARDING_STRATEGY``, read afresh by every run's
  accelerator);
* ``{"engine": {name: value}}``: switches to another accelerate config: every ``ACCELERATE_*``
  and ``FSDP_*`` variable is replaced by the given ones, which the test computed with
  accelerate's own launch code for that config (``test_distributed.accelerate_env``).

Every run builds its own ``TrainingArguments`` and ``Trainer``, which set up accelerate's state
afresh from those variables, so a run sees what a launch of its own would show it. What the runs
share is the two processes and their gloo process group: one launch for every engine saves the
start of two Python processes (importing torch, transformers, DeepSpeed) per run.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import torch

START = time.time()
ENGINE_PREFIXES = ("ACCELERATE_", "FSDP_")

torch.set_num_threads(1)


def use_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def skip_shm_comm_build() -> None:
    # DeepSpeed's CPU accelerator would JIT-compile a shared-memory all-reduce kernel on first use
    # (2-3 minutes on two cores, once per machine); gloo does the same job for these tiny tensors.
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def switch_engine(variables: dict[str, str]) -> None:
    for name in [n for n in os.environ if n.startswith(ENGINE_PREFIXES)]:
        del os.environ[name]
    os.environ.update(variables)
    if use_deepspeed():
        skip_shm_comm_build()


if use_deepspeed():
    skip_shm_comm_build()

from vif.cli import main  # noqa: E402

print(f"launch_vif_train: imports {time.time() - START:.1f} s", flush=True)
for step in json.loads(open(sys.argv[1]).read()):
    if "env" in step:
        os.environ.update(step["env"])
    elif "engine" in step:
        switch_engine(step["engine"])
    elif "copy" in step:
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        if int(os.environ.get("RANK", "0")) == 0:
            shutil.copytree(*step["copy"])
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
    else:
        assert main(["train", *step["train"]]) == 0
        if "deepspeed" in sys.modules:
            # Each run of a real `vif train` is its own process; here the next run must not load
            # its model under the ZeRO-3 config that the last run's TrainingArguments registered.
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
    print(f"launch_vif_train: {next(iter(step))} done at {time.time() - START:.1f} s", flush=True)
print("launch_vif_train: done", flush=True)
