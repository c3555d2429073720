"""The served model: a MAPEX model as an MLflow pyfunc, with its input contract.

What ``mlflow models serve`` (``mapex serve``) and ``mlflow.pyfunc.load_model`` run. The registered
versions' model code imports :class:`MapexPyfunc` as ``mapex_core.tracking.MapexPyfunc``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel


def signature() -> Any:
    """A signature with no input schema (the input contract validates dicts of arrays) and the
    ``output`` param: without a params schema MLflow drops ``params`` before ``predict`` sees them."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec

    return ModelSignature(inputs=None, outputs=None, params=ParamSchema([ParamSpec("output", "string", "default")]))



def task_contract(model_dir: str | Path) -> dict[str, Any]:
    """The input contract (:class:`~mapex_core.contract.InputContract`) of the task model in ``model_dir``."""
    from mapex_core.contract import InputContract
    from mapex_core.model.heads import load_task_model

    return InputContract.of(load_task_model(model_dir)).to_dict()



class MapexPyfunc(PythonModel):
    """MLflow pyfunc of a MAPEX model loaded from safetensors + JSON, with its input contract.

    Input (``{"inputs": {...}}`` over REST): a dict modality -> array ``(B, C, H, W)`` of physical
    values (S2 reflectance x 1e4, S1 dB) in the band order of :mod:`mapex_core.modalities`;
    normalisation is applied inside with the model's statistics
    (:class:`~mapex_core.contract.InputContract`). A request that breaks the contract raises an
    ``MlflowException`` (HTTP 400) saying what was expected.

    Output: ``{"probabilities": (B, K), "classes": [...]}`` for classification;
    ``{"mask": (B, H, W), "classes": [...]}`` for segmentation (``params={"output":
    "probabilities"}`` gives ``(B, K, H, W)`` instead); ``{"embeddings": (B, dim)}`` (mean-pooled
    encoder tokens) for ``mapex-pretrained``.
    """

    # predict takes a dict of arrays: no type-hint schema (MLflow would read hints as rows and warn)
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from mapex_core._env import SERVING_MMAP_THRESHOLD, return_freed_memory
        from mapex_core.contract import InputContract
        from mapex_core.model import load_model
        from mapex_core.model.heads import load_task_model

        if "task_model" in context.artifacts:
            self.model = load_task_model(context.artifacts["task_model"])
            self.contract = InputContract.of(self.model)
        else:
            self.model = load_model(context.artifacts["encoder"])
            self.contract = None
        self.model.eval()
        return_freed_memory(SERVING_MMAP_THRESHOLD)  # a serving process: activations go back to the OS

    def _bad_request(self, msg: str) -> MlflowException:
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        return MlflowException(msg, error_code=INVALID_PARAMETER_VALUE)

    def _encoder_inputs(self, model_input: Any) -> dict[str, np.ndarray]:
        cfg = self.model.config
        if not isinstance(model_input, dict) or not model_input or set(model_input) - set(cfg.modalities):
            raise self._bad_request(f"inputs must be an object with some of the modalities {cfg.modalities}")
        from mapex_core.contract import normalize

        arrays = {}
        for m, x in model_input.items():
            a = np.asarray(x, dtype=np.float32)
            if a.ndim != 4 or a.shape[1] != cfg.in_chans[m]:
                raise self._bad_request(f"{m}: expected (B, {cfg.in_chans[m]}, H, W), got {tuple(a.shape)}")
            arrays[m] = a
        return {m: np.nan_to_num(a, nan=0.0) for m, a in normalize(arrays, cfg.normalization).items()}

    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201 - untyped: MLflow reads hints as a schema
        import torch

        from mapex_core.contract import ContractError

        if self.contract is None:
            arrays = self._encoder_inputs(model_input)
            with torch.inference_mode():
                tokens = self.model.encode({m: torch.from_numpy(a) for m, a in arrays.items()}).tokens
            return {"embeddings": tokens.mean(1).numpy()}
        try:
            arrays = self.contract.normalize(self.contract.validate(model_input))
        except ContractError as exc:
            raise self._bad_request(str(exc)) from None
        output = (params or {}).get("output", "default")
        if output not in ("default", "probabilities"):
            raise self._bad_request(f"params.output must be 'default' or 'probabilities', got {output!r}")
        with torch.inference_mode():
            logits = self.model({m: torch.from_numpy(a) for m, a in arrays.items()}).float()
            probs = self.model.spec.probabilities(logits)  # (B, K) or (B, K, H, W)
        classes = self.contract.classes
        if self.model.spec.per_pixel and output == "default":  # segmentation answers a mask of class ids
            return {"mask": probs.argmax(1).numpy().astype(np.int32), "classes": classes}
        return {"probabilities": probs.numpy(), "classes": classes}

