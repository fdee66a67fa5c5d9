"""gembed: contrastive text and code embedding models in JAX/Flax.

`gembed.load(MODEL_DIR)` returns an `Embedder`; the heavy modules load on first use. Importing
gembed adds its XLA:CPU settings to XLA_FLAGS (`gembed.xla_cpu_flags`).
"""
from gembed.xla_cpu_flags import add_tuned_flags

add_tuned_flags()


def load(model_dir):
    """The `Embedder` of a model folder (see CONTRACT.md "Model folder")."""
    from gembed.embedder import Embedder
    from gembed.model_folder import read_model_folder

    import jax

    folder = read_model_folder(model_dir)
    return Embedder(folder.model_config, jax.device_put(folder.params), folder.tokenizer,
                    folder.max_length, folder.task_prompts)


__all__ = ["load"]
