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


def signature(model_dir: str | Path | None = None) -> Any:
    """The MLflow signature of the MAPEX model in ``model_dir`` (``None``: the ``output`` param only).

    Inputs: one named tensor per modality the model takes, ``(-1, C, H, W)`` float32 (physical
    values, ``C`` bands in :mod:`mapex_core.modalities` order, ``H = W`` the chip size). Outputs:
    ``probabilities`` ``(-1, K)`` float32 (classification) or ``mask`` ``(-1, H, W)`` int32
    (segmentation; ``params={"output": "probabilities"}`` answers ``(-1, K, H, W)`` float32
    instead), with ``classes`` ``(K,)``; ``embeddings`` ``(-1, dim)`` for ``mapex-pretrained``
    (which takes any subset of its modalities). The ``output`` param is declared: without a params
    schema MLflow drops ``params`` before ``predict`` sees them.

    MLflow's own enforcement of these tensor specs is off (``is_signature_from_type_hint`` in
    ``MLmodel``): it would refuse the compact base64 arrays (:func:`mapex_core.contract.decode_array`)
    and answer its own messages instead of the contract's, which checks all of this and more
    (:class:`~mapex_core.contract.InputContract`). The schema shows the input; the model checks it.
    A tensor spec cannot be optional in MLflow 3.17.2 (``TensorSpec.required`` is always true), so
    the encoder's schema lists every modality although it takes any subset.

    Raises:
        FileNotFoundError, ValueError: ``model_dir`` is not a readable MAPEX model folder (names the file).
    """
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ParamSchema, ParamSpec, Schema, TensorSpec

    params = ParamSchema([ParamSpec("output", "string", "default")])
    if model_dir is None:
        return ModelSignature(inputs=None, outputs=None, params=params)
    from mapex_core.model.serialization import read_config
    from mapex_core.tasks import get_task

    d = Path(model_dir)
    f32 = np.dtype(np.float32)
    if (d / "task.json").is_file():
        from mapex_core.model.heads import check_task_folder

        cfg, task = check_task_folder(d)  # no weights loaded
        wanted = task.get("input_modalities") or cfg.modalities
        mods = [m for m in cfg.modalities if m in wanted]  # the order TaskModel feeds them
        k, size = len(task["class_names"]), cfg.img_size
        head = (TensorSpec(np.dtype(np.int32), (-1, size, size), "mask") if get_task(task["task"]).per_pixel
                else TensorSpec(f32, (-1, k), "probabilities"))
        outputs = Schema([head, TensorSpec(np.dtype(str), (k,), "classes")])
    else:
        cfg = read_config(d / "config.json")
        mods = list(cfg.modalities)
        outputs = Schema([TensorSpec(f32, (-1, cfg.dim), "embeddings")])
    inputs = Schema([TensorSpec(f32, (-1, cfg.in_chans[m], cfg.img_size, cfg.img_size), m) for m in mods])
    sig = ModelSignature(inputs=inputs, outputs=outputs, params=params)
    sig._is_signature_from_type_hint = True  # MLflow passes the inputs through; the contract checks them
    return sig


def input_example(chips: str | Path | list[str | Path] | None, modalities: list[str], chip_size: int,
                  n: int = 1, root: str | Path = ".") -> dict[str, np.ndarray] | None:
    """``n`` real chips of a chip store as a request's inputs: modality -> ``(n, C, H, W)`` float32
    physical values, what a client sends (the first chips in which every one of ``modalities`` is
    present with no nodata).

    MLflow checks an input example against the signature when it logs the model, and the signature
    lists every modality: a store that lacks one gives no example (``mapex-pretrained`` takes
    modalities no single store holds).

    Args:
        chips: a chip store, or several (the first one that gives an example); relative to ``root``.

    Returns:
        ``None`` when there is no store (none given, or not on this machine), its chips are not
        ``chip_size`` pixels, it lacks one of ``modalities`` or has no chip without nodata.

    Raises:
        ValueError: a store that exists but is not a readable chip store (names it).
    """
    if isinstance(chips, list):
        return next((ex for c in chips if (ex := input_example(c, modalities, chip_size, n, root)) is not None), None)
    if not chips or not modalities or not (Path(root) / chips).exists():
        return None
    from mapex_core.data.dataset import ChipStore

    store = ChipStore.open(Path(root) / chips, normalize=False, in_memory=False)  # physical values, NaN = nodata
    if any(m not in store.modalities for m in modalities) or store.chip_size != chip_size:
        return None
    picked: dict[str, list[np.ndarray]] = {m: [] for m in modalities}
    for i in range(len(store)):
        item = store[i]  # modality -> (C, H, W) of the modalities present
        if all(m in item and bool(np.isfinite(item[m].numpy()).all()) for m in modalities):
            for m in modalities:
                picked[m].append(item[m].numpy())
            if len(picked[modalities[0]]) == n:
                break
    if not picked[modalities[0]]:
        return None
    return {m: np.stack(a).astype(np.float32) for m, a in picked.items()}  # (n, C, H, W)


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
        """Load the model; a task model gets a :class:`~mapex_core.tracking.batching.Batcher` (its settings
        from ``MAPEX_SERVE_MAX_BATCH`` and ``MAPEX_SERVE_MAX_WAIT_MS``; a max batch of 1 turns it off)."""
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
        # concurrent requests share forwards on one thread (MAPEX_SERVE_MAX_BATCH=1: each its own, in its thread)
        from mapex_core.tracking.batching import Batcher, batch_threads_from_env, settings_from_env

        max_batch, max_wait_ms = settings_from_env()
        self.batcher = (Batcher(self._forward, max_batch, max_wait_ms, batch_threads=batch_threads_from_env())
                        if self.contract is not None and max_batch > 1 else None)

    def _forward(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """The task model's probabilities ``(N, K)`` or ``(N, K, H, W)`` for normalised inputs ``(N, C, H, W)``."""
        import torch

        with torch.inference_mode():
            logits = self.model({m: torch.from_numpy(a) for m, a in arrays.items()}).float()
            return self.model.spec.probabilities(logits).numpy()

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
        from contextlib import nullcontext

        import torch

        from mapex_core.contract import ContractError

        if self.contract is None:
            arrays = self._encoder_inputs(model_input)
            with torch.inference_mode():
                tokens = self.model.encode({m: torch.from_numpy(a) for m, a in arrays.items()}).tokens
            return {"embeddings": tokens.mean(1).numpy()}
        batcher = getattr(self, "batcher", None)
        with batcher.request() if batcher is not None else nullcontext(self._forward) as forward:
            try:  # checked in this request's thread: a bad request fails alone, before it joins a batch
                arrays = self.contract.normalize(self.contract.validate(model_input))
            except ContractError as exc:
                raise self._bad_request(str(exc)) from None
            output = (params or {}).get("output", "default")
            if output not in ("default", "probabilities"):
                raise self._bad_request(f"params.output must be 'default' or 'probabilities', got {output!r}")
            probs = forward(arrays)  # (B, K) or (B, K, H, W): this request's rows
        classes = self.contract.classes
        if self.model.spec.per_pixel and output == "default":  # segmentation answers a mask of class ids
            return {"mask": probs.argmax(1).astype(np.int32), "classes": classes}
        return {"probabilities": probs, "classes": classes}

