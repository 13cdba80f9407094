"""What a user sees when things go wrong: exit codes a script can trust, one clear line, nothing misleading."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from consoles import sigint_at_default
from geovq.cli import app

runner = CliRunner()
#: one trial at a time (see conftest.tiny_config)
SMALL = ["sweep", "digits", "--tiny", "--vae", "plain", "--methods", "vqvae,kmeans,gq", "--no-prior", "--max-concurrent",
         "1"]


# The interrupted sweep: its units one at a time, 10 epochs each, so that a Ctrl-C after the first finished one
# lands while others are still to run (at --tiny's 2 epochs, two at a time, they finish within a second of each
# other)
INTERRUPTIBLE = SMALL + ["--epochs", "10"]
UNIT_LINE = re.compile(r"geovq: \[\d+/\d+\] digits/")  # the driver's line for a finished job


def geovq(*args: str, preexec_fn=sigint_at_default, **kwargs) -> subprocess.Popen:
    """The real console script in its own process group, as a terminal runs it (Ctrl-C reaches the group)."""
    return subprocess.Popen(["geovq", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, preexec_fn=preexec_fn, **kwargs)


def sigint_ignored() -> None:
    """A child's `preexec_fn`: SIGINT ignored, as a script's background job (`geovq sweep … &`) has it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def read_lines(proc: subprocess.Popen) -> tuple[list[str], threading.Thread]:
    """The process's output lines, appended to the list by a thread as they arrive."""
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return lines, reader


def finished_units(run: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in run.glob("units/*/row.json")}


def test_sigint_exits_130_with_one_line_and_the_same_command_finishes_without_repeating(ray_local, tmp_path):
    run = tmp_path / "run"
    proc = geovq(*INTERRUPTIBLE, "--out", str(run))
    lines, reader = read_lines(proc)  # read as they come: a unit's files are on disk before the driver logs its line
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        # some units done (a finished VAE alone is not a unit), others still running, and the driver has said so
        if finished_units(run) and any(UNIT_LINE.search(line) for line in list(lines)):
            break
        time.sleep(0.5)
    assert proc.poll() is None, "".join(lines)
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)
    reader.join(timeout=30)
    output = "".join(lines)
    assert proc.returncode == 130, output
    interrupted = [line for line in lines if "interrupted:" in line]
    assert len(interrupted) == 1 and "re-run the same command to resume" in interrupted[0], output
    done, planned = map(int, re.search(r"(\d+) of (\d+) units finished", interrupted[0]).groups())
    assert 1 <= done < planned == 6
    assert "Traceback" not in output and "Tuner.restore" not in output
    # Output into a pipe (a log) has no carriage-return bar redraws; the per-job lines are its progress
    assert "it/s" not in output and UNIT_LINE.search(output), output
    assert not (run / "report.md").exists() and not (run / "results.json").exists()  # no report posing as whole
    kept = finished_units(run)
    assert len(kept) == done

    # the same command, in this process on the session's Ray (a sweep's cluster is not part of what it is)
    result = runner.invoke(app, [*INTERRUPTIBLE, "--out", str(run), "--address",
                                 ray_local.get_runtime_context().gcs_address])
    assert result.exit_code == 0, result.output
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in kept.items())  # no finished unit repeated
    assert len(finished_units(run)) == planned and (run / "report.md").exists()
    assert "PARTIAL" not in (run / "report.md").read_text()


def test_sigterm_stops_a_sweep_like_ctrl_c(ray_local, tmp_path):
    # `kill`, `timeout` and job schedulers send SIGTERM, to the driver alone; Ray's own handler (which ray.init
    # installs when it connects, too) would dump a stack and say nothing of what was kept. The sweep joins the
    # session's Ray rather than starting one of its own. Started as a script's background job, which ignores
    # SIGINT: SIGTERM must stop it all the same (it once did nothing there: it was passed on as SIGINT).
    proc = geovq(*SMALL, "--address", ray_local.get_runtime_context().gcs_address, "--out", str(tmp_path / "run"),
                 preexec_fn=sigint_ignored)
    lines, reader = read_lines(proc)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not any("jobs to run" in line for line in lines):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    reader.join(timeout=30)
    output = "".join(lines)
    assert proc.returncode == 130, output
    (line,) = [line for line in lines if "interrupted:" in line]
    assert "0 of 6 units finished and are kept; re-run the same command to resume" in line
    assert "Traceback" not in output and "SIGTERM received" not in output


def test_a_second_sweep_on_a_run_directory_in_use_is_refused_naming_the_holder(ray_local, tmp_path):
    from geovq.io import directory_lock

    run = tmp_path / "run"
    run.mkdir()
    with directory_lock(run):  # held as a running sweep holds it
        result = runner.invoke(app, SMALL + ["--out", str(run)])
    assert result.exit_code == 2, result.output
    assert f"{run} is in use by another geovq command (PID {os.getpid()})" in result.output
    assert "Traceback" not in result.output and not (run / "config.yaml").exists()


def test_a_report_into_a_folder_in_use_is_refused_naming_the_holder(tmp_path):
    from geovq.io import directory_lock

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("dataset: digits\n")  # a run directory, as a sweep starts it
    with directory_lock(run):  # held as a running sweep holds it
        result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 2, result.output
    assert f"{run} is in use by another geovq command (PID {os.getpid()})" in result.output
    assert "Traceback" not in result.output and not (run / "report.md").exists()


def test_a_trial_larger_than_the_cluster_is_refused_before_anything_is_written(ray_local, tmp_path):
    result = runner.invoke(app, SMALL + ["--cpus-per-trial", "64", "--out", str(tmp_path / "run")])
    assert result.exit_code == 2, result.output
    assert "--cpus-per-trial 64 exceeds the cluster's 2 CPUs" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()  # no config.yaml, no sweep.log


def test_unreachable_address_fails_fast_before_writing_anything(tmp_path):
    t0 = time.time()
    proc = subprocess.run(["geovq", *SMALL, "--address", "127.0.0.1:1", "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=60)
    assert time.time() - t0 < 30
    assert proc.returncode == 2, proc.stderr
    assert "cannot reach the Ray cluster at --address 127.0.0.1:1" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def finished_run(ray_local, tmp_path_factory):
    run = tmp_path_factory.mktemp("finished") / "run"
    result = runner.invoke(app, SMALL + ["--out", str(run)])
    assert result.exit_code == 0, result.output
    return run


def damage_file(path: Path, damage: str) -> None:
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "foreign pickle":
        import pickle

        path.write_bytes(pickle.dumps(os.system))  # would run code if unpickled unsafely
    else:
        path.write_bytes(np.random.default_rng(0).bytes(4096))


@pytest.mark.parametrize("damage", ["truncated", "foreign pickle", "random bytes"])
def test_a_damaged_checkpoint_is_refused_by_its_loader_naming_the_file(finished_run, tmp_path, damage):
    from geovq.errors import GeovqError
    from geovq.training.checkpoint import load_model

    (vae,) = finished_run.glob("vae/*")
    model = tmp_path / "model.pt"
    shutil.copy(vae / "model.pt", model)
    assert not load_model(model, "vae").training  # the intact copy loads
    damage_file(model, damage)
    with pytest.raises(GeovqError) as refused:
        load_model(model, "vae")
    message = str(refused.value)
    assert f"{model} is not a readable geovq checkpoint" in message and "delete it" in message
    assert "weights_only=False" not in message and len(message.splitlines()) == 1


@pytest.fixture(scope="module")
def damaged_rerun(finished_run, tmp_path_factory):
    """One re-run of a copy of the finished run with two damaged files, each in a unit left unscored (so that the
    re-run must load it): the K=16 VQ-VAE's checkpoint truncated, and the K=16 k-means unit's quantizer file
    random bytes (its test codes deleted, so that the encode stage must load it). One sweep for two failure
    paths: each Tune experiment costs seconds of worker start-up."""
    run = tmp_path_factory.mktemp("damaged") / "run"
    shutil.copytree(finished_run, run)
    vqvae, kmeans = (next(run.glob(f"units/{method}-*K16-*")) for method in ("vqvae", "kmeans"))
    for unit in (vqvae, kmeans):
        (unit / "row.json").unlink()
    damage_file(vqvae / "model.pt", "truncated")  # every damage gives the loader's one error (the test above)
    (kmeans / "quantizer.npz").write_bytes(np.random.default_rng(1).bytes(2048))
    (kmeans / "codes_test.npy").unlink()
    result = runner.invoke(app, SMALL + ["--out", str(run)])
    return SimpleNamespace(run=run, vqvae=vqvae, kmeans=kmeans, result=result)


def test_a_corrupt_checkpoint_in_a_sweep_fails_its_unit_with_one_line_naming_the_file(damaged_rerun):
    run, result, model = damaged_rerun.run, damaged_rerun.result, damaged_rerun.vqvae / "model.pt"
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "weights_only=False" not in result.output
    (line,) = [line for line in result.output.splitlines() if "failed:" in line and damaged_rerun.vqvae.name in line]
    assert f"{model} is not a readable geovq checkpoint" in line and "delete it" in line
    trace = Path(re.search(r"full traceback: (\S+)\)", line).group(1))
    assert trace.parent == run / "errors" and "Traceback" in trace.read_text()  # copied into the run directory
    assert "2 of 6 units failed or were not run (4 finished and are kept)" in result.output


def test_units_on_a_failed_vae_are_named_not_run_and_the_others_finish(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (vae,) = run.glob("vae/*")
    for name in ("ceiling.json", "model.pt"):  # not trained yet: it resumes from its state.pt, corrupt here
        (vae / name).unlink()
    (vae / "state.pt").write_bytes(np.random.default_rng(2).bytes(4096))
    waiting = []
    for method in ("kmeans", "gq", "vqvae"):  # two units on that VAE and the VQ-VAE, to be re-scored
        unit = next(run.glob(f"units/{method}-*K16-*"))
        (unit / "row.json").unlink()
        waiting.append(unit.name)
    result = runner.invoke(app, SMALL + ["--out", str(run)])
    assert result.exit_code == 1, result.output
    assert f"{vae.name} failed: {vae / 'state.pt'} is not a readable training resume point" in result.output
    for name in waiting[:2]:
        (line,) = [line for line in result.output.splitlines() if f"digits/{name}" in line]
        assert f"digits/{name} was not run: its VAE {vae.name} failed" in line
        assert not (run / "units" / name / "row.json").exists()
    assert (run / "units" / waiting[2] / "row.json").exists()  # needs no VAE: it ran
    assert "2 of 6 units failed or were not run (4 finished and are kept)" in result.output
    assert "Traceback" not in result.output


def test_a_corrupt_quantizer_file_names_the_file_and_no_unsafe_hint(damaged_rerun):
    run, unit, result = damaged_rerun.run, damaged_rerun.kmeans, damaged_rerun.result
    assert result.exit_code == 1, result.output
    (line,) = [line for line in result.output.splitlines() if "failed:" in line and unit.name in line]
    assert f"{unit / 'quantizer.npz'} is not a readable geovq quantizer file" in line
    assert "pickle" not in result.output and "Traceback" not in result.output
    (unit / "quantizer.npz").unlink()  # as the message says: delete it, and the unit is fitted again
    from geovq.config import SweepConfig
    from geovq.stages.common import no_progress
    from geovq.stages.rundir import RunDir
    from geovq.stages.run import run_unit
    from geovq.stages.units import Unit

    again = Unit.from_dict(json.loads((unit / "unit.json").read_text()))
    row = run_unit(RunDir(run), SweepConfig.load(run / "config.yaml"), again, torch.device("cpu"), no_progress)
    assert row.unit == unit.name and (unit / "quantizer.npz").exists() and (unit / "codes_test.npy").exists()


def test_a_killed_worker_is_one_line_and_the_report_is_marked_partial(plugin_sweep):
    from geovq.report.tables import markdown_report
    from geovq.stages.plan import RunPlan

    run, _, failed = plugin_sweep  # crash-q's fit killed its worker; toy-q, beside it, finished
    (line,) = failed.lines
    assert line.startswith("crash-q-plain-K16-d4-seed0-") and "its worker process died" in line
    assert (run.root / "errors" / f"{line.split(' ')[0]}.txt").exists()
    plan = RunPlan.load(run.root)
    assert (plan.finished(), len(plan.units)) == (1, 2)
    assert markdown_report([], [], "", 1, 2).startswith("# geovq results (PARTIAL: 1 of 2 units finished)")


def test_shared_results_carry_no_home_directory(finished_run):
    home = str(Path.home())
    for name in ("results.json", "results.csv", "report.md"):
        assert home not in (finished_run / name).read_text(), name
    rows = json.loads((finished_run / "results.json").read_text())
    assert all(r["lpips"] is not None or "hub cache" in r["lpips_reason"] for r in rows)
    assert "data_root: null" in (finished_run / "config.yaml").read_text()  # digits reads none


def test_rerun_with_a_subset_keeps_the_whole_run_in_its_configuration(finished_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    result = runner.invoke(app, ["sweep", "digits", "--tiny", "--vae", "plain", "--methods", "kmeans",
                                 "--codebook-sizes", "16", "--no-prior", "--max-concurrent", "1", "--out", str(run)])
    assert result.exit_code == 0, result.output
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["methods"] == ["vqvae", "kmeans", "gq"] and cfg["codebook_sizes"] == [16, 64]


def test_npz_data_root_that_is_not_an_archive_gets_no_unsafe_hint(tmp_path):
    text = tmp_path / "data.npz"
    text.write_text("not an archive\n")
    result = runner.invoke(app, ["sweep", "npz", "--data-root", str(text), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "cannot read" in result.output
    assert "pickle" not in result.output and "Traceback" not in result.output


def test_a_trial_worker_stopped_by_ray_prints_no_traceback_but_other_hidden_errors_still_show():
    # Ray stops a phase's idle trial workers by SIGTERM, whose handler raises SystemExit wherever Python is; in a
    # weakref callback or __del__ Python printed it as "Exception ignored ... Traceback", forwarded to the console
    script = """
import sys
from geovq.distributed.trial import quiet_stop_hook
sys.unraisablehook = quiet_stop_hook if sys.argv[1] == "hook" else sys.__unraisablehook__

class Stopped:
    def __init__(self, error):
        self.error = error
    def __del__(self):
        raise self.error

Stopped(SystemExit(1))
Stopped(ValueError("a real bug"))
print("alive")
"""
    runs = {mode: subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=60)
            for mode in ("hook", "default")}
    assert all(run.returncode == 0 and run.stdout == "alive\n" for run in runs.values())
    default, hooked = runs["default"].stderr, runs["hook"].stderr
    assert "SystemExit" in default and "ValueError: a real bug" in default  # what the console showed before
    assert "SystemExit" not in hooked and "ValueError: a real bug" in hooked and "Exception ignored" in hooked
