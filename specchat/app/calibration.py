"""The pass costs behind ``--budget auto`` and ``--draft-batch auto``: which saved calibration a
loaded pipeline uses (its settings key), where it is kept, and measuring it when there is none."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from specchat.app.config import RunConfig
from specchat.common.errors import SpecchatError, reason
from specchat.common.paths import config_file
from specchat.common.system import measurement_identity
from specchat.engine.autobudget.costmodel import Calibration, CostModelTuner, calibrated_choices, load_calibration, save_calibration
from specchat.engine.autobudget.measure import measure_calibration
from specchat.model.placement import resolve_quant
from specchat.sources.resolve import Progress
from specchat.weights.precision import dtype_name

if TYPE_CHECKING:
    from specchat.app.loader import Pipeline


def prepare_costs(pipeline: Pipeline, config: RunConfig, progress: Progress, calibrate: bool = True) -> None:
    """Give a freshly loaded engine its cost owner's calibration source (the saved one for these
    settings, else measured now and saved) and what its settings need at once: the calibration
    for ``--budget auto`` (unless ``calibrate`` is False), the saved step costs (if any) for
    ``--draft-batch auto``."""
    if pipeline.draft is None:
        return
    costs, key = pipeline.engine.costs, calibration_key(pipeline, config)
    costs.provider = lambda max_depth, width: load_calibration(calibration_file(), key) or _measure(pipeline, key, max_depth, width, progress)
    if config.budget is None and calibrate:
        costs.ensure(pipeline.engine.target, pipeline.engine.draft, config.max_depth, config.generation().width)
    elif config.draft_batch is None:  # auto width without a saved calibration: width 8
        costs.use(load_calibration(calibration_file(), key))


def _measure(pipeline: Pipeline, key: str, max_depth: int, width: int, progress: Progress) -> Calibration:
    """Measure these settings' pass costs now (growth timed at ``width``; auto width rescales online) and save them."""
    progress("measuring pass times for --budget auto (once for these settings; `specchat setup` does it too)")
    engine = pipeline.engine
    calibration = measure_calibration(engine.target, engine.draft, max_depth, width, progress=progress)
    try:
        save_calibration(calibration_file(), key, calibration)
    except (OSError, SpecchatError) as exc:  # the measurement is still good for this run
        progress(f"cannot save the calibration to {calibration_file()} ({reason(exc)}); it is measured again next run")
        return calibration
    progress(f"calibration saved to {calibration_file()}")
    return calibration


def calibration_key(pipeline: Pipeline, config: RunConfig) -> str:
    """What the measured costs depend on: models, precisions, placement, threads, growth width,
    the processor and the code."""
    return (
        f"{pipeline.target_name} quant={resolve_quant(config.quant)} dtype={dtype_name(pipeline.compute_dtype)} "
        f"{'' if pipeline.device.type == 'cpu' else f'device={_device_label(pipeline.device)} '}"
        f"offload={pipeline.offload.mode}:{pipeline.offload.resident_layers}"
        f"{f'+{pipeline.offload.host_layers}' if pipeline.offload.host_layers else ''} "
        f"{f'store={config.store} ' if config.store and pipeline.offload.mode == 'ssd' else ''}"  # another disk, other times
        f"draft={pipeline.draft_name} {config.draft_quant} batch={config.generation().width} depth={config.max_depth} "
        f"threads={torch.get_num_threads()} {measurement_identity()}"
    )


def _device_label(device: torch.device) -> str:
    """The accelerator by model: another GPU has other pass times."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def calibrated_budgets(method: str = "specexec", max_depth: int = 32) -> list[dict[str, str]]:
    """Each saved calibration (its settings key) with the budget ``auto`` would start at, and why."""
    return calibrated_choices(calibration_file(), method, max_depth)


def calibration_file() -> Path:
    """Kept with the config: the costs belong to this machine and these settings."""
    return config_file().parent / "calibration.json"


def ensure_calibration(pipeline: Pipeline, config: RunConfig, progress: Progress, force: bool = False) -> Calibration:
    """The engine's calibration: the saved one for these settings, else (or with ``force``) measured now and saved."""
    costs, width = pipeline.engine.costs, config.generation().width
    if force:
        costs.use(_measure(pipeline, calibration_key(pipeline, config), config.max_depth, width, progress))
    return costs.ensure(pipeline.engine.target, pipeline.engine.draft, config.max_depth, width)


def calibrate_for_setup(pipeline: Pipeline, settings: RunConfig, progress: Progress) -> None:
    """Measure the cost model of a pipeline loaded as `run` will load it, and say what --budget auto would choose."""
    calibration = ensure_calibration(pipeline, settings, progress, force=True)
    table = ", ".join(f"{k} tokens {s:.2f}s" for k, s in sorted(calibration.target_s.items()))
    progress(f"target pass: {table}")
    tuner = CostModelTuner(calibration, "specexec", settings.max_depth)
    progress(f"--budget auto starts at {tuner.explain()}")
