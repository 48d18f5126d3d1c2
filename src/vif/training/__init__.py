"""Training VIF (full fine-tune, LoRA or VIF-only) with the transformers Trainer, from one recipe.

    from vif.training import train
    result = train("recipes/llava-1.5-7b-vif.yaml")       # or a dict
    result.output_dir, result.vif_adapter, result.metrics

See :func:`train` for the recipe schema and docs/training.md for the commands.
"""

from .api import TrainResult, check, train
from .data import TrainingDataError
from .recipe import Recipe, RecipeError, load_recipe

__all__ = ["Recipe", "RecipeError", "TrainResult", "TrainingDataError", "check", "load_recipe", "train"]
