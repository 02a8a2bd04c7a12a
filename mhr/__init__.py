"""mhr: Multi-Head Adapter Routing (MHR) and Polytropon LoRA skill inventories, in plain torch.

A skill inventory of K LoRA adapters, each split into h heads, is mixed per task by a routing table.
This package holds the layers, their injection into Hugging Face models, materialization of a task's
ordinary LoRA, the bundle format shared by training and serving, and export to PEFT.
"""

from mhr.adapter import LoRA
from mhr.bundle import Bundle, Task, TaskKind, backbone_fingerprint
from mhr.bundle_check import BundleError
from mhr.config import ConfigError, MHRConfig
from mhr.export_peft import PeftFormatError, export_peft, import_peft
from mhr.functional import routing_weights, uniform_weights
from mhr.inject import (
    InjectionError,
    dense_lora,
    find_targets,
    inject,
    load_lora,
    mhr_layers,
    remove,
    set_mode,
    start_average,
    use_tasks,
)
from mhr.layer import FrozenLinear, MHRLinear, Mode
from mhr.materialize import SkillInventory

__all__ = [
    "Bundle",
    "BundleError",
    "PeftFormatError",
    "Task",
    "TaskKind",
    "backbone_fingerprint",
    "export_peft",
    "import_peft",
    "ConfigError",
    "InjectionError",
    "LoRA",
    "MHRConfig",
    "FrozenLinear",
    "MHRLinear",
    "Mode",
    "SkillInventory",
    "dense_lora",
    "find_targets",
    "inject",
    "load_lora",
    "mhr_layers",
    "remove",
    "routing_weights",
    "set_mode",
    "start_average",
    "uniform_weights",
    "use_tasks",
]
