"""Great Expectations validation of the per-chip metadata table.

The suite checks, per chip: band value ranges per sensor (each band's min and max inside the
sensor's valid range), nodata fraction, no band without a valid pixel, CRS and transform
present, chip shape, label validity, and no duplicate chips (ids or content). It runs as a GX checkpoint whose action writes the Data
Docs HTML; chips that fail any expectation form the quarantine list (chip id -> failed
expectations). The run fails when the failed share exceeds ``max_failed_share``.

GX is imported inside the functions: it is the heaviest import of the stack (~3 s).
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mapex_core.errors import MapexError
from mapex_core.io import atomic_write_json
from mapex_core.modalities import get_modality

IGNORE_INDEX = -1


@dataclass
class ValidationParams:
    """Thresholds of the chip validation (``validation`` section of ``params.yaml``)."""

    max_nodata: float = 0.5
    max_failed_share: float = 0.1


@dataclass
class ValidationReport:
    """Outcome of one validation run."""

    success: bool
    chips: int
    failed_share: float
    max_failed_share: float
    quarantine: dict[str, list[str]] = field(default_factory=dict)
    expectations: list[dict[str, Any]] = field(default_factory=list)
    docs: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ValidationFailed(MapexError, RuntimeError):
    """More chips failed validation than allowed; carries the report."""

    def __init__(self, report: ValidationReport, where: str) -> None:
        self.report = report
        super().__init__(
            f"{where}: {len(report.quarantine)} of {report.chips} chips "
            f"({report.failed_share:.1%}) failed validation, more than the allowed "
            f"{report.max_failed_share:.1%}; see {report.docs or 'the report'}"
        )


def label_summary(labels: np.ndarray | None, label_type: str) -> pd.DataFrame:
    """Per-chip ``label_min``, ``label_max`` and (masks) ``label_valid_frac``."""
    if labels is None or label_type == "none":
        return pd.DataFrame(index=range(0))
    flat = labels.reshape(labels.shape[0], -1).astype(np.float64)
    out = pd.DataFrame({"label_min": flat.min(1), "label_max": flat.max(1)})
    if label_type == "mask":
        out["label_valid_frac"] = (flat != IGNORE_INDEX).mean(1)
    return out


def _prepare(table: pd.DataFrame, modalities: list[str]) -> pd.DataFrame:
    """The GX input: absent modalities become nulls, a transform check column is added."""
    df = table.copy()
    for m in modalities:
        absent = ~df[f"present_{m}"].astype(bool)
        cols = [c for c in df.columns if c.startswith(f"{m}_") and c.endswith(("_min", "_max"))]
        mins = [f"{m}_{b}_min" for b in get_modality(m).band_names]
        df[f"empty_bands_{m}"] = np.where(absent, 0, df[mins].isna().sum(axis=1))  # all-NaN bands
        df.loc[absent, cols + [f"nodata_frac_{m}"]] = np.nan
    df["crs"] = df["crs"].map(lambda v: v if isinstance(v, str) and v else None)
    df["transform_ok"] = [
        bool(t is not None and len(t) == 6 and np.all(np.isfinite(t)) and t[0] != 0 and t[4] != 0)
        for t in df["transform"]
    ]
    return df.drop(columns=["transform"])


def build_expectations(modalities: list[str], chip_size: int, label_type: str, num_classes: int,
                       max_nodata: float) -> list[Any]:
    """The expectation list of the chip suite."""
    import great_expectations.expectations as gxe

    exp: list[Any] = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        gxe.ExpectColumnValuesToBeUnique(column="chip_id"),
        gxe.ExpectColumnValuesToBeUnique(column="content_hash"),
        gxe.ExpectColumnValuesToNotBeNull(column="crs"),
        gxe.ExpectColumnValuesToBeInSet(column="transform_ok", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="height", value_set=[chip_size]),
        gxe.ExpectColumnValuesToBeInSet(column="width", value_set=[chip_size]),
    ]
    for m in modalities:
        spec = get_modality(m)
        lo, hi = spec.valid_range
        exp.append(gxe.ExpectColumnValuesToBeBetween(column=f"nodata_frac_{m}", min_value=0.0, max_value=max_nodata))
        exp.append(gxe.ExpectColumnValuesToBeBetween(column=f"empty_bands_{m}", min_value=0, max_value=0))
        for band in spec.band_names:
            exp.append(gxe.ExpectColumnValuesToBeBetween(column=f"{m}_{band}_min", min_value=lo, max_value=hi))
            exp.append(gxe.ExpectColumnValuesToBeBetween(column=f"{m}_{band}_max", min_value=lo, max_value=hi))
    if label_type == "multilabel":
        exp.append(gxe.ExpectColumnValuesToBeBetween(column="label_min", min_value=0, max_value=1))
        exp.append(gxe.ExpectColumnValuesToBeBetween(column="label_max", min_value=0, max_value=1))
    elif label_type in ("mask", "class"):
        low = IGNORE_INDEX if label_type == "mask" else 0
        exp.append(gxe.ExpectColumnValuesToBeBetween(column="label_min", min_value=low, max_value=num_classes - 1))
        exp.append(gxe.ExpectColumnValuesToBeBetween(column="label_max", min_value=low, max_value=num_classes - 1))
    return exp


def validate_table(
    table: pd.DataFrame,
    modalities: list[str],
    chip_size: int,
    label_type: str = "none",
    num_classes: int = 0,
    params: ValidationParams | None = None,
    docs_dir: str | Path | None = None,
    name: str = "chips",
) -> ValidationReport:
    """Run the chip suite over a metadata table as a GX checkpoint.

    Args:
        table: per-chip metadata (``ChipWriter.table()`` or ``ChipStore.metadata()``), plus the
            ``label_*`` columns of :func:`label_summary` when labelled.
        modalities: stored modalities.
        chip_size: expected chip height and width.
        label_type: ``multilabel``, ``class``, ``mask`` or ``none``.
        num_classes: number of classes.
        params: thresholds.
        docs_dir: where the Data Docs site goes (replaced); ``None`` = no HTML.
        name: suite / asset name shown in the Data Docs.
    """
    import logging

    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # not one INFO line per run
    p = params or ValidationParams()
    df = _prepare(table, modalities)
    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    actions = []
    if docs_dir is not None:
        docs = Path(docs_dir).resolve()
        shutil.rmtree(docs, ignore_errors=True)
        ctx.add_data_docs_site("local", {
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
        actions.append(UpdateDataDocsAction(name="data_docs", site_names=["local"]))
    batch_def = (ctx.data_sources.add_pandas("mapex").add_dataframe_asset(name=name)
                 .add_batch_definition_whole_dataframe("all"))
    # the whole list at construction: adding expectations one by one to a registered suite re-serialises
    # the suite into the store after each one (quadratic: ~0.3 s for the ~45 expectations of an S1+S2 store)
    suite = ctx.suites.add(gx.ExpectationSuite(
        name=f"{name}_suite",
        expectations=build_expectations(modalities, chip_size, label_type, num_classes, p.max_nodata)))
    vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"{name}_validation", data=batch_def, suite=suite))
    checkpoint = ctx.checkpoints.add(gx.Checkpoint(
        name=f"{name}_checkpoint", validation_definitions=[vd], actions=actions,
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["index", "chip_id"]},
    ))
    result = checkpoint.run(batch_parameters={"dataframe": df})

    quarantine: dict[str, list[str]] = {}
    summary = []
    for run in result.run_results.values():
        for r in run.results:
            cfg = r.expectation_config
            column = cfg.kwargs.get("column")
            label = f"{cfg.type}({column})" if column else cfg.type
            rows = r.result.get("unexpected_index_list") or []
            if cfg.type == "expect_column_values_to_be_unique":  # keep the first of each duplicate
                seen: set[Any] = set()
                dup_rows = []
                for row in sorted(rows, key=lambda d: d["index"]):
                    key = df.loc[df["index"] == row["index"], column].iloc[0]
                    if key in seen:
                        dup_rows.append(row)
                    seen.add(key)
                rows = dup_rows
            for row in rows:
                quarantine.setdefault(str(row["chip_id"]), []).append(label)
            summary.append({"expectation": label, "success": bool(r.success), "unexpected": len(rows)})
    table_failed = [s for s in summary if not s["success"] and s["expectation"].startswith("expect_table")]
    share = len(quarantine) / max(len(df), 1)
    docs_index = str(Path(docs_dir) / "index.html") if docs_dir is not None else None
    return ValidationReport(
        success=share <= p.max_failed_share and not table_failed,
        chips=len(df), failed_share=share, max_failed_share=p.max_failed_share,
        quarantine=quarantine, expectations=summary, docs=docs_index,
    )


def write_report(report: ValidationReport, path: str | Path) -> Path:
    """Write the report (with the quarantine list) as JSON, atomically."""
    return atomic_write_json(path, report.to_dict())


def validate_store(path: str | Path, params: ValidationParams | None = None,
                   reports_dir: str | Path = "reports") -> ValidationReport:
    """Re-run the suite over an existing chip store; writes Data Docs and the report JSON.

    Reports go to ``reports_dir/validation/<store name>/``; the store itself is not changed.
    """
    from mapex_core.data.dataset import ChipStore

    store = ChipStore.open(path, include_quarantined=True, normalize=False)
    table = store.metadata()
    labels = label_summary(store.labels, store.label_type)
    table = pd.concat([table.reset_index(drop=True), labels.reset_index(drop=True)], axis=1)
    out = Path(reports_dir) / "validation" / Path(path).name.removesuffix(".zarr")
    report = validate_table(table, store.stored_modalities, int(store.ds.attrs["chip_size"]),
                            store.label_type, len(store.class_names or []), params,
                            docs_dir=out / "data_docs", name=Path(path).name.removesuffix(".zarr").replace(".", "_"))
    write_report(report, out / "validation.json")
    return report
