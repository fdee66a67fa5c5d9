"""gembed: contrastive text and code embedding models in JAX/Flax.

`gembed.load(MODEL_DIR)` returns an `Embedder`; the heavy modules load on first use.
"""


def load(model_dir):
    """The `Embedder` of a model folder (see CONTRACT.md "Model folder")."""
    from gembed.embedder import Embedder
    from gembed.model_folder import read_model_folder

    import jax

    folder = read_model_folder(model_dir)
    return Embedder(folder.model_config, jax.device_put(folder.params), folder.tokenizer,
                    folder.max_length, folder.task_prompts)


__all__ = ["load"]
