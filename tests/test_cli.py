"""Bad input: a short error naming the bad value, exit code 2, no traceback, no run directory."""

import logging
import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from geovq.cli import app

runner = CliRunner()


@pytest.mark.parametrize("args, message", [
    (["sweep", "imagenet"], "unknown dataset 'imagenet'; valid: digits, mnist"),
    (["sweep", "digits", "--methods", "kmeans,magic"], "unknown method 'magic'; valid: vqvae"),
    (["sweep", "digits", "--codebook-sizes", "16,1"], "K=1 must be >= 2"),
    (["sweep", "digits", "--methods", "kmeans", "--codebook-sizes", "1000000"],
     "K=1000000 exceeds the 20128 training latents"),
    (["sweep", "digits", "--codebook-sizes", "100"], "got K=100, nearest valid: 64 or 128"),
    (["sweep", "digits", "--gq-beta", "-1"], "gq beta=-1.0 must be >= 0"),
    (["sweep", "digits", "--vae", "tdc", "--tdc-bits", "6", "--codebook-sizes", "16"],
     "--vae tdc targets 6 bits per token, but K=16 codes carry 4"),
    (["sweep", "digits", "--vae", "plain,fancy"], "--vae 'fancy' is unknown; valid: plain, tdc"),
    (["sweep", "digits", "--grouping", "diagonal"], "--grouping 'diagonal' is unknown"),
    (["sweep", "digits", "--codebook-sizes", "sixteen"], "'sixteen' must be a comma list of integers"),
    (["sweep", "digits", "--epochs", "-3"], "--epochs -3 must be >= 0"),
    (["sweep", "digits", "--max-concurrent", "0"], "--max-concurrent 0 must be >= 1 (or left out"),
    (["sweep", "digits", "--token-dim", "3"], "--token-dim 3 must divide the latent channels C=8"),
    (["sweep", "digits", "--token-dim", "0"], "--token-dim 0 must divide the latent channels C=8"),  # not d = C
    (["sweep", "mnist", "--data-root", "__missing__"], "__missing__"),
    (["sweep", "digits", "--codebook-sizes", "16,64,16"], "--codebook-sizes lists 16 twice; give each value once"),
    (["sweep", "digits", "--methods", "kmeans,gq,kmeans"], "--methods lists kmeans twice"),
    (["sweep", "digits", "--vae", "plain,tdc,plain"], "--vae lists plain twice"),
    (["sweep", "digits", "--data-root", "/tmp"], "digits is embedded and reads no data root"),
    (["sweep", "digits", "--methods", "kmeans", "--gq-beta", "0.5"], "--gq-beta is given, but gq is not among"),
    (["sweep", "digits", "--geodesic-quadrature", "trapezium"], "quadrature 'trapezium' is unknown"),
    (["sweep", "digits", "--address", "nowhere"], "--address 'nowhere' is not a Ray cluster address"),
    (["sweep", "digits", "--methods", "kmeans", "--kmeans-tol", "nan"], "kmeans tol=nan must be a number"),
    (["sweep", "digits", "--set", "train.lr=abc"], "--set train.lr='abc' must be float"),
    (["sweep", "digits", "--set", "train.lr=-1"], "--set train.lr: -1.0 must be > 0"),
    (["sweep", "digits", "--set", "train.seed=3"], "--set train.seed: unknown training setting 'train.seed'; valid: "),
    (["sweep", "digits", "--set", "trunk.image_size=8"], "--set trunk.image_size: unknown trunk setting; valid: "
                                                          "trunk.hidden"),
    (["sweep", "digits", "--set", "train.lr"], "--set 'train.lr' must be KEY=VALUE"),
    (["sweep", "digits", "--token-dim", "4", "--set", "trunk.latent_channels=6"],
     "--token-dim 4 must divide the latent channels C=6"),  # a --set value held to the sweep's rules
    (["sweep", "digits", "--methods", "vqvae,fsq,kmeans", "--seeds", "100000"],  # 3 K × (2 end to end + 1 × 2 VAEs)
     "--seeds 100000 plans 1,200,000 units (100000 seeds × 12 units each); a sweep plans at most 10,000"),
])
def test_bad_input_is_a_one_line_error_with_exit_code_2(tmp_path, args, message):
    out = tmp_path / "run"
    result = runner.invoke(app, args + ["--out", str(out)])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_out_naming_an_existing_file_is_refused(tmp_path):
    existing = tmp_path / "results.txt"
    existing.write_text("keep me\n")
    result = runner.invoke(app, ["sweep", "digits", "--out", str(existing)])
    assert result.exit_code == 2 and f"--out {existing} is an existing file" in result.output
    assert existing.read_text() == "keep me\n" and "Traceback" not in result.output


def test_config_replays_a_recorded_configuration_with_the_typed_options_and_settings_on_top(tmp_path):
    import yaml

    from conftest import tiny_config
    from geovq.config import SweepConfig
    from geovq.distributed.sweep import resolve_runs

    recorded = tiny_config(["vqvae", "kmeans"], [16, 64], method_params={"kmeans": {"tol": 1e-3}})
    recorded.gpus_per_trial = 0.0  # as a CPU machine recorded it
    path = tmp_path / "config.yaml"
    path.write_text(recorded.to_yaml())
    base = SweepConfig.load(path)
    (same,) = resolve_runs({"digits": tmp_path / "a"}, None, {}, base)
    assert same.cfg.identity() == recorded.identity() and same.cfg.methods == recorded.methods
    assert same.cfg.gpus_per_trial is None  # the machine's, resolved again
    (changed,) = resolve_runs({"digits": tmp_path / "b"}, None,
                              {"seeds": 2, "method_params": {"kmeans": {"max_iter": 50}}}, base,
                              ("train.lr=5e-4", "trunk.hidden=24", "tdc.factor=1.02", "vq.commitment=0.5"))
    cfg = changed.cfg
    assert cfg.seeds == 2 and cfg.method_params["kmeans"] == {"tol": 1e-3, "max_iter": 50}
    assert (cfg.train.lr, cfg.trunk.hidden, cfg.tdc.factor, cfg.vq.commitment) == (5e-4, 24, 1.02, 0.5)
    assert cfg.train.epochs == recorded.train.epochs and cfg.codebook_sizes == [16, 64]  # the rest as recorded
    written = yaml.safe_load(cfg.to_yaml())  # what config.yaml will hold, so a resume must give the same
    assert written["train"]["lr"] == 5e-4 and written["trunk"]["hidden"] == 24
    from geovq.config import changed_options

    named = " ".join(changed_options(recorded, cfg))  # a resume with other settings is refused, naming them
    for key in ("train.lr", "trunk.hidden", "tdc.factor", "vq.commitment"):
        assert key in named, named


@pytest.mark.parametrize("extra, message", [
    (["--quick"], "--config replays a configuration as it was resolved; drop --quick"),
    (["--tiny"], "drop --tiny"),
])
def test_config_refuses_presets_and_another_dataset(tmp_path, extra, message):
    from conftest import tiny_config

    path = tmp_path / "config.yaml"
    path.write_text(tiny_config(["kmeans"]).to_yaml())
    for args, expected in ((["sweep", "digits", "--config", str(path), *extra], message),
                           (["sweep", "mnist", "--config", str(path)], "is a digits configuration; run it as "
                                                                       f"`geovq sweep digits --config {path}`")):
        result = runner.invoke(app, args + ["--out", str(tmp_path / "run")])
        assert result.exit_code == 2 and expected in result.output, result.output
        assert not (tmp_path / "run").exists()


def test_planned_units_are_counted_before_any_is_planned():
    from dataclasses import replace

    from conftest import tiny_config
    from geovq.stages.units import plan_units

    configs = [replace(tiny_config(["vqvae", "kmeans", "gq"], [16, 64], vaes=["plain", "tdc"]), seeds=3),
               tiny_config(["kmeans"], [4, 16, 64, 256]), replace(tiny_config(["vqvae"], [16]), seeds=5)]
    for cfg in configs:
        assert cfg.planned_units == len(plan_units(cfg))
    assert configs[0].planned_units == 3 * 2 * (1 + 2 + 2)


def test_images_smaller_than_the_ssim_window_are_refused_before_training(tmp_path):
    import numpy as np

    for side, refused in ((4, True), (8, True), (12, False)):
        data = tmp_path / f"images{side}.npz"
        np.savez(data, images=np.random.default_rng(0).integers(0, 256, (400, side, side), dtype=np.uint8))
        out = tmp_path / f"run{side}"
        # an empty --methods stops a valid configuration right after the image-size rule, before Ray
        result = runner.invoke(app, ["sweep", "npz", "--data-root", str(data), "--tiny", "--codebook-sizes", "16",
                                     "--out", str(out)] + (["--methods", "kmeans"] if refused else ["--seeds", "0"]))
        assert result.exit_code == 2 and "Traceback" not in result.output and not out.exists(), result.output
        if refused:
            assert f"image size {side}×{side} is below SSIM's 11×11 px window" in result.output
        else:
            assert "--seeds 0 must be >= 1" in result.output


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder nobody may write: a read-only tmpfs for root (which ignores permission bits), mode 555 otherwise."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.getuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("root without the right to mount: no read-only folder can be made here")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


@pytest.mark.parametrize("command", [["sweep", "digits", "--tiny"], ["tune", "digits", "--trials", "1"]])
def test_an_out_folder_that_cannot_be_written_is_refused_before_ray_starts(read_only_folder, command):
    out = read_only_folder / "run"
    t0 = time.time()
    result = runner.invoke(app, command + ["--out", str(out)])
    assert result.exit_code == 2, result.output
    assert f"--out {out} cannot be written: {read_only_folder} is on a read-only filesystem" in result.output
    assert "Traceback" not in result.output and time.time() - t0 < 10


def test_a_space_that_is_not_a_regular_file_is_refused_without_reading_it(tmp_path):
    fifo = tmp_path / "space.yaml"
    os.mkfifo(fifo)  # reading it would block until a writer came
    result = runner.invoke(app, ["tune", "digits", "--space", str(fifo), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and f"search space {fifo} is not a regular file" in result.output
    assert not (tmp_path / "o").exists()


def test_unreadable_data_root(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # exists but is neither a readable folder nor a file (root can read any folder)
    result = runner.invoke(app, ["sweep", "mnist", "--data-root", str(fifo), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "not a readable folder" in result.output
    assert not (tmp_path / "run").exists()


def test_console_script_help_is_fast_and_lazy():
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", "import sys; from geovq.cli import app; "
                           "assert 'torch' not in sys.modules and 'ray' not in sys.modules"], capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    proc = subprocess.run([sys.executable, "-m", "geovq.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "sweep" in proc.stdout
    assert time.time() - t0 < 10  # generous for a loaded CI box; bench-free sanity bound


def test_sweep_help_lists_options_derived_from_quantizer_signatures():
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "geovq.cli", "sweep", "--help"],
                          capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    for option, text in [("--gq-beta", "importance weights"), ("--geodesic-k", "graph neighbours per node"),
                         ("--kmeans-max-iter", "Lloyd sweeps at most"), ("--wasserstein-max-points", "")]:
        assert option in proc.stdout and text in proc.stdout
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "torch" not in imported and "ray" not in imported  # what keeps --help under two seconds


def test_real_console_script_bad_input_has_no_traceback(tmp_path):
    proc = subprocess.run(["geovq", "sweep", "nope", "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "unknown dataset 'nope'" in proc.stderr and "Traceback" not in proc.stderr


def test_console_script_exit_keeps_codes_output_and_exit_handlers(tmp_path):
    # main() leaves by os._exit (no module teardown): what atexit would run must still run, the streams must
    # be flushed, and the app's exit codes must survive
    script = "import atexit; from geovq.cli import main; atexit.register(print, 'exit handler ran'); main()"
    ok = subprocess.run([sys.executable, "-c", script, "--help"], capture_output=True, text=True)
    assert ok.returncode == 0 and "sweep" in ok.stdout and ok.stdout.rstrip().endswith("exit handler ran")
    bad = subprocess.run([sys.executable, "-c", script, "report", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stdout == "exit handler ran\n"
    assert bad.stderr.startswith("Error: ") and len(bad.stderr.splitlines()) == 1


def test_rays_token_auth_notice_is_dropped_and_its_warning_kept():
    """Ray's own functions log both messages: the notice that token authentication is on (the default) is
    dropped without --verbose and shown with it; the warning that it is off always reaches the console."""
    from ray._private.authentication import authentication_token_setup as auth

    from geovq.cli import _quiet_ray

    class Keep(logging.Handler):  # Ray's loggers do not propagate to the root logger that caplog watches
        def __init__(self) -> None:
            super().__init__(logging.WARNING)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    kept = Keep()
    auth.logger.addHandler(kept)
    try:
        _quiet_ray(verbose=False)
        auth._warn_token_auth_enabled()
        auth._warn_token_auth_disabled()
        assert ["disabled" in m for m in kept.messages] == [True]
        kept.messages.clear()
        _quiet_ray(verbose=True)
        auth._warn_token_auth_enabled()
        assert ["enabled" in m for m in kept.messages] == [True]
    finally:
        auth.logger.removeHandler(kept)
        _quiet_ray(verbose=True)  # leave Ray's loggers as found for the other tests


def test_console_lines_are_printed_between_the_live_progress_bars(monkeypatch):
    import io

    from ray.experimental import tqdm_ray

    from geovq.cli import BarSafeHandler

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    calls: list[str] = []

    class Bars:  # Ray's bar manager, recording what the handler asks of it
        def hide_bars(self) -> None:
            calls.append("hide")

        def unhide_bars(self) -> None:
            calls.append("unhide")

    monkeypatch.setattr(tqdm_ray, "instance", lambda: Bars())
    record = logging.LogRecord("geovq", logging.INFO, __file__, 1, "[3/25] digits/kmeans finished", None, None)
    for stream, expected in ((Terminal(), ["hide", "unhide"]), (io.StringIO(), [])):  # a log file: no bars
        monkeypatch.setattr(sys, "stderr", stream)
        calls.clear()
        handler = BarSafeHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("geovq: %(message)s"))
        handler.emit(record)
        assert calls == expected and stream.getvalue() == "geovq: [3/25] digits/kmeans finished\n"


def test_config_alone_names_the_dataset_and_no_dataset_at_all_is_one_line(tmp_path):
    from geovq.config import resolve_config

    # an MNIST configuration whose data root holds no MNIST: the sweep went on with the dataset the file records
    cfg = resolve_config("mnist", (1, 28, 28), ["kmeans"], [16], 1, None, False, None, tiny=True,
                         data_root=tmp_path / "nowhere")
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    for args, expected in (
            (["--config", str(tmp_path / "config.yaml")], f"mnist not found or incomplete in {tmp_path / 'nowhere'}"),
            ([], "give a DATASET (digits, mnist, fashion, cifar10 or npz), or --config with a run's config.yaml"),
            (["--config", str(tmp_path / "none.yaml")], f"--config {tmp_path / 'none.yaml'} is not a file")):
        result = runner.invoke(app, ["sweep", *args, "--out", str(tmp_path / "run")])
        assert result.exit_code == 2 and expected in result.output and len(result.output.strip().splitlines()) == 1
        assert not (tmp_path / "run").exists()
