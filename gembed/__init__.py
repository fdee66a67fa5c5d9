"""gembed: contrastive text and code embedding models in JAX/Flax.

`gembed.load(MODEL_DIR)` returns an `Embedder`. Importing gembed changes nothing outside it (no
environment variables, no logging configuration); the CLI applies its XLA:CPU tuning itself
(`gembed.xla_cpu_flags`).
"""
from gembed import checkpoint, model_folder, workdir
from gembed.embedder import Embedder
from gembed.errors import GembedUserError


def load(path, matmul_precision: str | None = None) -> Embedder:
    """The `Embedder` of a model folder; a training CKPT (a workdir, one of its step folders, or a
    soup) is accepted too and read with the max length the run trained with. `matmul_precision`
    ("auto", "float32", "bfloat16"; None: the model's, "auto" unless set in training) chooses the
    matmul inputs (`gembed.model.matmul_precision`): "float32" for values exact to float32."""
    if model_folder.is_model_folder(path):
        return Embedder.of(model_folder.read_model_folder(path), matmul_precision)
    if checkpoint.holds_checkpoints(path):
        return Embedder.of(workdir.read_checkpoint_model(path), matmul_precision)
    raise GembedUserError(
        f"{path}: neither a model folder (no {model_folder.CONFIG_FILE}) nor a training checkpoint; "
        f"{model_folder.MAKE_ONE}, or name a `gembed train` workdir.")


__all__ = ["Embedder", "load"]
