"""`source_model_config`: a ModelConfig that no gin binding can alter.

ModelConfig is gin-configurable, so fields an importer leaves unset would take whatever a gin
config parsed earlier in the process binds (e.g. a model gin file's output_sizes). An imported
architecture must be the source's alone: every field is passed explicitly.
"""
import dataclasses

from gembed.model import ModelConfig


def source_model_config(**fields) -> ModelConfig:
    """ModelConfig of `fields`, the class defaults for the rest, ignoring gin bindings."""
    defaults = {field.name: field.default for field in dataclasses.fields(ModelConfig)}
    return ModelConfig(**{**defaults, **fields})
