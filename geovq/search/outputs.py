"""What a search leaves in --out, from its trials (driver.study_rows):

    study.journal           the Optuna studies themselves, one per method (driver.open_storage): the record a
                            resume and every file below are made from
    trials.csv              every trial: status, validation PSNR, bits, K, d, epochs, the sampled values
    best.yaml               per method its best validation configuration (under --pareto, its Pareto front);
                            `geovq sweep DATASET --tuned DIR` runs each `tuned:` record
    importances.json        Optuna's parameter importances per method (fANOVA on the stored study's completed
                            trials), also per VAE variant so that the TDC settings get theirs
    figures/val_psnr.png    validation PSNR against trial number, with the running best
    figures/pareto.png      (--pareto) validation PSNR against bits per image, and each method's front
    tb/METHOD/NNN/          TensorBoard HParams, one run per trial: `tensorboard --logdir DIR/tb`
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from geovq.io import atomic_path, write_json, write_text
from geovq.report.hparams import finite
from geovq.search.space import Study
from geovq.search.trial import BITS, EPOCH, EPOCH_METRIC, OBJECTIVE

FIXED_COLUMNS = ["method", "number", "trial_id", "status", OBJECTIVE, BITS, "K", "token_dim", EPOCH,
                 "epochs_trained", EPOCH_METRIC, "seconds"]
TAIL_COLUMNS = ["unit", "vae_key", "error"]


def finished(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "finished" and finite(r["metrics"].get(OBJECTIVE))]


def write_outputs(out: Path, rows: list[dict], studies: dict[str, Study], header: dict[str, Any],
                  seed: int, stored: dict[str, Any]) -> dict[str, Any]:
    """Every output file; returns best.yaml's content."""
    write_trials_csv(out / "trials.csv", rows)
    best = best_configurations(rows, header)
    write_text(out / "best.yaml", "# Best validation configuration per method (geovq tune); `geovq sweep "
               f"{header['dataset']} --tuned {out}` runs each `tuned:` record on test, over seeds.\n"
               + yaml.safe_dump(best, sort_keys=False))
    write_json(out / "importances.json", importances(stored, studies, seed))
    trial_figure(out / "figures" / "val_psnr.png", rows)
    if header.get("pareto"):
        pareto_figure(out / "figures" / "pareto.png", rows)
    write_hparams(out / "tb", rows)
    return best


def write_trials_csv(path: Path, rows: list[dict]) -> None:
    values = sorted({k for r in rows for k in r["values"]})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIXED_COLUMNS + values + TAIL_COLUMNS)
    writer.writeheader()
    for r in rows:
        m, c = r["metrics"], r["candidate"]
        writer.writerow({"method": r["method"], "number": r["number"], "trial_id": r["trial_id"], "status": r["status"],
                         **{k: m.get(k) for k in (OBJECTIVE, EPOCH, "epochs_trained", EPOCH_METRIC, "seconds",
                                                  "unit", "vae_key")},
                         BITS: c.bits if c else None, "K": c.n_codes if c else None,
                         "token_dim": c.token_dim if c else None, **r["values"], "error": r["error"]})
    write_text(path, buf.getvalue())


def pareto_front(rows: list[dict]) -> list[dict]:
    """Finished trials that no other beats on both validation PSNR (higher) and bits (fewer), by bits."""
    done = finished(rows)
    front = [r for r in done if not any(
        o["metrics"][OBJECTIVE] >= r["metrics"][OBJECTIVE] and o["candidate"].bits <= r["candidate"].bits
        and (o["metrics"][OBJECTIVE] > r["metrics"][OBJECTIVE] or o["candidate"].bits < r["candidate"].bits)
        for o in done)]
    return sorted(front, key=lambda r: r["candidate"].bits)


def _entry(r: dict) -> dict[str, Any]:
    return {"val_psnr": float(r["metrics"][OBJECTIVE]), "bits_per_image": r["candidate"].bits, "trial": r["number"],
            "values": {k: _plain(v) for k, v in sorted(r["values"].items())},
            "tuned": _plain(r["candidate"].record())}


def best_configurations(rows: list[dict], header: dict[str, Any]) -> dict[str, Any]:
    by_method: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_method[r["method"]].append(r)
    methods: dict[str, Any] = {}
    for method, rs in by_method.items():
        done = finished(rs)
        counts = {"trials": len(rs), "finished": len(done),
                  "epochs_trained": sum(int(r["metrics"].get("epochs_trained") or 0) for r in rs)}
        if header.get("pareto"):
            methods[method] = {"front": [_entry(r) for r in pareto_front(rs)], **counts}
        elif done:
            methods[method] = {**_entry(max(done, key=lambda r: r["metrics"][OBJECTIVE])), **counts}
        else:
            methods[method] = None  # no trial finished
    return {**header, "methods": methods}


def importances(stored: dict[str, Any], studies: dict[str, Study], seed: int) -> dict[str, Any]:
    """{method: {group: {parameter: importance}}}: fANOVA (seeded) on the stored study's completed trials (their
    validation PSNR, the first objective), over the parameters that every trial of the group has and that vary
    within it; groups: all (the stored study itself), and each VAE variant (its trials, copied as they are
    stored into a study of their own). A group with fewer than 3 completed trials or no varying parameter gets the
    reason instead. `stored`: {method: optuna.Study} of the methods that have one."""
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances
    from optuna.trial import TrialState

    from geovq.search.space import VAE_PARAM

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out: dict[str, Any] = {}
    for method, study in studies.items():
        if method not in stored:
            continue
        full = stored[method]
        done = [t for t in full.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if finite(t.values[0])]
        groups = {"all": (full, done)}
        for variant in sorted({t.params.get(VAE_PARAM) for t in done} - {None}):
            trials = [t for t in done if t.params.get(VAE_PARAM) == variant]
            subset = optuna.create_study(directions=full.directions)
            subset.add_trials(trials)
            groups[f"vae={variant}"] = (subset, trials)
        out[method] = {}
        for group, (source, trials) in groups.items():
            if len(trials) < 3:
                out[method][group] = f"{len(trials)} finished trial(s): too few to rank parameters"
                continue
            common = set.intersection(*(set(t.params) for t in trials))
            varying = sorted(k for k in common if len({json.dumps(t.params[k]) for t in trials}) > 1)
            if not varying:
                out[method][group] = "no parameter varies among these trials"
                continue
            try:
                ranked = get_param_importances(source, evaluator=FanovaImportanceEvaluator(seed=seed), params=varying,
                                               target=lambda t: t.values[0])
            except (RuntimeError, ValueError) as e:
                out[method][group] = f"not computed: {e}"
                continue
            out[method][group] = {k: round(float(v), 4) for k, v in ranked.items()}
    return out


def trial_figure(path: Path, rows: list[dict]) -> None:
    """Validation PSNR against trial number per method: finished trials as dots, the running best as a step
    line; trials stopped by ASHA (or failed) as ticks on the bottom edge."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    methods = sorted({r["method"] for r in rows})
    colours = plt.get_cmap("tab10").colors
    for i, method in enumerate(methods):
        rs = [r for r in rows if r["method"] == method and r["number"] is not None]
        done = sorted(finished(rs), key=lambda r: r["number"])
        colour = colours[i % len(colours)]
        if done:
            xs, ys = [r["number"] for r in done], [r["metrics"][OBJECTIVE] for r in done]
            ax.plot(xs, ys, "o", color=colour, label=method, alpha=0.8)
            best = [max(ys[: j + 1]) for j in range(len(ys))]
            ax.step(xs, best, where="post", color=colour, alpha=0.6)
        others = [r["number"] for r in rs if r not in done]
        if others:
            ax.plot(others, [0.0] * len(others), "|", color=colour, markersize=12, transform=ax.get_xaxis_transform(),
                    label=f"{method}: stopped/failed")
    ax.set_xlabel("trial (proposal order)")
    ax.set_ylabel("validation PSNR at the bit budget (dB)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    _save(fig, path)


def pareto_figure(path: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    colours = plt.get_cmap("tab10").colors
    for i, method in enumerate(sorted({r["method"] for r in rows})):
        rs = [r for r in rows if r["method"] == method]
        done = finished(rs)
        colour = colours[i % len(colours)]
        ax.plot([r["candidate"].bits for r in done], [r["metrics"][OBJECTIVE] for r in done], "o", color=colour,
                alpha=0.35)
        front = pareto_front(rs)
        ax.step([r["candidate"].bits for r in front], [r["metrics"][OBJECTIVE] for r in front], "-o", where="post",
                color=colour, label=f"{method} (front)")
    ax.set_xlabel("bits per image")
    ax.set_ylabel("validation PSNR (dB)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_hparams(root: Path, rows: list[dict]) -> None:
    """TensorBoard HParams: one run per trial (tb/METHOD/NNN) with its method, status and sampled values, its
    objective, bits and epochs trained, and its per-epoch validation PSNR."""
    from geovq.report.hparams import HParamsRun, write_hparams as write_runs

    runs = []
    for r in rows:
        if r["number"] is None:
            continue
        m = r["metrics"]
        metrics = {OBJECTIVE: m.get(OBJECTIVE), BITS: r["candidate"].bits if r["candidate"] else None,
                   "epochs_trained": m.get("epochs_trained")}
        runs.append(HParamsRun(f"{r['method']}/{r['number']:03d}",
                               {"method": r["method"], "status": r["status"], "vae": "", **r["values"]}, metrics,
                               [(EPOCH_METRIC, epoch, value) for epoch, value in epoch_history(r)]))
    write_runs(root, runs, [OBJECTIVE, BITS, "epochs_trained"])


def epoch_history(r: dict) -> list[tuple[int, float]]:
    """(epoch, validation PSNR) of the trial's model up to the last epoch the trial reached."""
    m = r["metrics"]
    path = m.get("history")
    if not path or not Path(path).exists() or m.get(EPOCH) is None:
        return []
    history = json.loads(Path(path).read_text())
    return [(int(e), v) for e, v in sorted(history.items(), key=lambda kv: int(kv[0])) if int(e) <= m[EPOCH]]


def _plain(value: Any) -> Any:
    """YAML-safe plain values (tuples to lists, numpy scalars to Python)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value
