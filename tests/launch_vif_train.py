"""Runs several ``vif train`` commands in one ``accelerate launch`` (tests/test_distributed.py).

    accelerate launch --config_file CONFIG --num_processes 2 tests/launch_vif_train.py STEPS.json

STEPS.json is a list of steps, run in order by every process:
``{"train": [args of `vif train`]}``, ``{"copy": [src, dst]}`` (process 0 copies a
checkpoint folder, the others wait) or ``{"env": {name: value}}`` (the variables
``accelerate launch`` exported from its config, changed for the runs that follow; e.g.
``FSDP_SHARDING_STRATEGY``, read afresh by every run's accelerator). One launch for several runs saves the ~10 s start of
two Python processes per run; each run is the real ``vif train`` (``vif.cli.main``).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import torch

START = time.time()

torch.set_num_threads(1)

if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
    # DeepSpeed's CPU accelerator would JIT-compile a shared-memory all-reduce kernel on first use
    # (2-3 minutes on two cores, once per machine); gloo does the same job for these tiny tensors.
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

from vif.cli import main  # noqa: E402

print(f"launch_vif_train: imports {time.time() - START:.1f} s", flush=True)
for step in json.loads(open(sys.argv[1]).read()):
    if "env" in step:
        os.environ.update(step["env"])
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
