"""A sweep's trials on Ray Tune (:func:`raykfe.sweep.run_sweep` builds the grid, prepares the shared
stages and writes the tables; this module only runs the trials).

Each trial is a raykfe job (in-process, on the sweep's shared stages) that reports its validation
accuracy every fine-tuning epoch, so that ASHA can stop weak trials early, and its final figures
once. Trials reuse finished trials' processes (``reuse_actors``: no new Python + torch each).
"""

from __future__ import annotations

import os

from ray import tune
from ray.tune.schedulers import ASHAScheduler

__all__ = ["run_trials"]

_KEYS = ("method", "target", "lr", "epochs", "weight_decay")


def _trial(config: dict, setup: dict) -> None:
    """One Tune trial: a raykfe job on the shared stages, reporting val_acc every epoch."""
    import torch

    from ..backend import LocalBackend
    from ..pipeline import run_job
    from ..sweep import family_of, trial_config

    torch.set_num_threads(max(1, int(setup["threads"])))
    cfg = trial_config(config, setup)
    shared = [setup["base_uri"]]
    if setup["share"]:
        shared.insert(0, setup["families"][family_of(config["method"], cfg.stats.conv_mode)])

    def on_epoch(rec: dict) -> None:
        tune.report({"val_acc": rec["val_acc"], "epoch": rec["epoch"], "finished": False})

    # per-epoch reports feed ASHA; without it each would only cost a round trip through the Tune driver
    job = run_job(cfg, LocalBackend(on_epoch=on_epoch if setup.get("asha", True) else None), log=lambda m: None, shared=shared)
    m = job.metrics
    tune.report({
        "val_acc": m["pruned"]["val_acc"], "test_acc": m["pruned"]["test_acc"],
        "test_acc_before_finetune": m["pruned"]["test_acc_before_finetune"], "macs": m["pruned"]["macs"],
        "params": m["pruned"]["params"], "macs_reduction": m["macs_reduction"], "params_reduction": m["params_reduction"],
        "reused_stages": ",".join(m.get("reused_stages", [])),
        "uri": cfg.output.uri, "finished": True, "epoch": config["epochs"],
    })


def run_trials(cfg, grid: list[dict], setup: dict) -> list[tuple[dict, dict, BaseException | None]]:
    """Run every trial of ``grid`` on Ray Tune (ASHA when ``setup["asha"]``); per trial its settings,
    its last reported metrics and its error (None when it finished or was stopped by ASHA)."""
    s, uri = cfg.sweep, setup["uri"]
    trainable = tune.with_resources(tune.with_parameters(_trial, setup=setup), {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial})
    space = {k: tune.grid_search(sorted({t[k] for t in grid}, key=[t[k] for t in grid].index)) for k in _KEYS}
    scheduler = None
    if setup["asha"]:
        scheduler = ASHAScheduler(
            time_attr="training_iteration", metric="val_acc", mode="max", max_t=max(t["epochs"] for t in grid) + 1,
            grace_period=s.grace_period, reduction_factor=s.reduction_factor,
        )
    storage = None
    if "://" not in uri or uri.startswith("file://"):
        storage = os.path.abspath(uri[7:] if uri.startswith("file://") else uri)
    tuner = tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=s.max_concurrent, num_samples=1, reuse_actors=True),
        run_config=tune.RunConfig(
            name=f"raykfe-sweep-{cfg.name}", storage_path=os.path.join(storage, "tune") if storage else None,
            verbose=1 if cfg.progress else 0,
        ),
    )
    return [({k: r.config[k] for k in _KEYS}, r.metrics or {}, r.error) for r in tuner.fit()]
