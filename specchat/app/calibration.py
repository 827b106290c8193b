"""The pass costs behind ``--budget auto`` and ``--draft-batch auto``: which saved calibration a
loaded pipeline uses (its settings key), where it is kept, and measuring it when there is none."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from specchat.app.config import RunConfig
from specchat.common.paths import config_file
from specchat.engine.autobudget.costmodel import Calibration, CostModelTuner, load_calibration, save_calibration
from specchat.engine.autobudget.measure import measure_calibration
from specchat.model.placement import resolve_quant
from specchat.sources.resolve import Progress
from specchat.weights.precision import dtype_name

if TYPE_CHECKING:
    from specchat.app.loader import Pipeline


def prepare_costs(pipeline: Pipeline, config: RunConfig, progress: Progress) -> None:
    """Give a freshly loaded engine the costs its settings need: measured or loaded for
    ``--budget auto``, the saved step costs (if any) for ``--draft-batch auto``."""
    if pipeline.draft is None:
        return
    if config.budget is None:
        ensure_calibration(pipeline, config, progress)
    elif config.draft_batch is None:  # auto width without a saved calibration: width 8
        pipeline.engine.calibration = load_calibration(calibration_file(), calibration_key(pipeline, config))


def calibration_key(pipeline: Pipeline, config: RunConfig) -> str:
    """What the measured costs depend on: models, precisions, placement, threads, growth width."""
    from specchat import __version__

    return (
        f"{pipeline.target_name} quant={resolve_quant(config.quant)} dtype={dtype_name(pipeline.compute_dtype)} "
        f"{'' if pipeline.device.type == 'cpu' else f'device={_device_label(pipeline.device)} '}"
        f"offload={pipeline.offload.mode}:{pipeline.offload.resident_layers}"
        f"{f'+{pipeline.offload.host_layers}' if pipeline.offload.host_layers else ''} "
        f"{f'store={config.store} ' if config.store and pipeline.offload.mode == 'ssd' else ''}"  # another disk, other times
        f"draft={pipeline.draft_name} {config.draft_quant} batch={config.generation().draft_batch} depth={config.max_depth} "
        f"threads={torch.get_num_threads()} specchat={__version__}"
    )


def _device_label(device: torch.device) -> str:
    """The accelerator by model: another GPU has other pass times."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


def calibration_file() -> Path:
    """Kept with the config: the costs belong to this machine and these settings."""
    return config_file().parent / "calibration.json"


def ensure_calibration(pipeline: Pipeline, config: RunConfig, progress: Progress, force: bool = False) -> Calibration:
    """The engine's calibration: the saved one for these settings, else measured now and saved."""
    key = calibration_key(pipeline, config)
    calibration = None if force else load_calibration(calibration_file(), key)
    if calibration is None:
        progress("measuring pass times for --budget auto (once for these settings; `specchat setup` does it too)")
        engine = pipeline.engine
        growth_width = config.generation().draft_batch  # growth is timed at the fixed width; auto width rescales online
        calibration = measure_calibration(engine.target, engine.draft, config.max_depth, growth_width, progress=progress)
        save_calibration(calibration_file(), key, calibration)
        progress(f"calibration saved to {calibration_file()}")
    pipeline.engine.calibration = calibration
    pipeline.engine.tuners.clear()
    return calibration


def calibrate_for_setup(pipeline: Pipeline, settings: RunConfig, progress: Progress) -> None:
    """Measure the cost model of a pipeline loaded as `run` will load it, and say what --budget auto would choose."""
    calibration = ensure_calibration(pipeline, replace(settings, budget=None), progress, force=True)
    table = ", ".join(f"{k} tokens {s:.2f}s" for k, s in sorted(calibration.target_s.items()))
    progress(f"target pass: {table}")
    tuner = CostModelTuner(calibration, "specexec", settings.max_depth)
    progress(f"--budget auto starts at {tuner.explain()}")
