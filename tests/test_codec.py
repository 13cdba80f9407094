"""geovq.Codec and its entropy-coding layer: round trips, the fixed-length fallback, refused files (issue 28)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geovq.codec import BLOCK, HEADER_BYTES, VERSION, CodeCoder, Header, unit_tag
from geovq.errors import GeovqError
from geovq.models.priors.base import CodeGrid
from test_priors import make_prior

GRID = CodeGrid(3, 3, 2, 16)  # T = 18 codes of K = 16


def random_prior(kind: str):
    """The prior tests' small untrained prior, its weights scaled up so that its distributions are far from
    uniform."""
    prior = make_prior(kind, GRID)
    with torch.no_grad():
        for p in prior.parameters():
            p.mul_(4.0)
    return prior


def random_codes(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, GRID.n_codes, (n, GRID.tokens))


@pytest.mark.parametrize("kind", ["transformer", "pixelcnn"])
def test_range_coded_files_round_trip_and_cost_what_the_prior_says(kind):
    prior = random_prior(kind)
    coder = CodeCoder(GRID.n_codes, GRID.tokens, unit_tag("unit-a"), prior, kind)
    # codes drawn from the prior itself, so that its probabilities are the ones that matter
    codes = prior.sample(40, generator=torch.Generator().manual_seed(3)).numpy()
    files = coder.encode(codes)
    np.testing.assert_array_equal(coder.decode(files), codes)
    with torch.no_grad():
        estimate = prior.token_nll(torch.as_tensor(codes)).sum(1).numpy() / math.log(2)  # bits per image
    payload_bits = np.array([8 * (len(f) - HEADER_BYTES) for f in files])
    # a range coder's stream costs at most its information content plus its flush (≤ 32 bits, ≤ 8 bits lost to
    # the probability quantization over 18 symbols)
    assert (payload_bits <= estimate + 33).all(), (payload_bits - estimate).max()
    assert payload_bits.mean() < GRID.tokens * math.log2(GRID.n_codes)  # below fixed length on its own codes


def test_any_codes_round_trip_even_those_the_prior_thinks_unlikely_with_a_bar_over_the_images():
    bars = []

    class Bar:  # a tqdm-like factory's bar, recording what it was told
        def __init__(self, total: int, desc: str) -> None:
            self.total, self.desc, self.n = total, desc, 0
            bars.append(self)

        def update(self, n: int) -> None:
            self.n += n

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            pass

    coder = CodeCoder(GRID.n_codes, GRID.tokens, unit_tag("unit-a"), random_prior("transformer"), "transformer")
    codes = random_codes(25)
    np.testing.assert_array_equal(coder.decode(coder.encode(codes, Bar), progress=Bar), codes)
    assert [(b.desc, b.total, b.n) for b in bars] == [("compress (images)", 25, 25), ("decompress (images)", 25, 25)]


def test_without_a_prior_codes_are_stored_at_fixed_length():
    for k in (16, 10, 2):  # K = 10: ceil(T·log2 K / 8) bytes, not T·ceil(log2 K) bits
        coder = CodeCoder(k, GRID.tokens, unit_tag("unit-a"))
        codes = np.random.default_rng(k).integers(0, k, (30, GRID.tokens))
        files = coder.encode(codes)
        assert {len(f) for f in files} == {HEADER_BYTES + math.ceil(GRID.tokens * math.log2(k) / 8)}
        assert all(f[4] == 0 for f in files)  # the header says: fixed length
        np.testing.assert_array_equal(coder.decode(files), codes)


def test_a_truncated_foreign_or_newer_file_is_refused_in_one_line():
    tag = unit_tag("unit-a")
    coder = CodeCoder(GRID.n_codes, GRID.tokens, tag, random_prior("transformer"), "transformer")
    fixed = CodeCoder(GRID.n_codes, GRID.tokens, tag)
    (good,) = coder.encode(random_codes(1))
    (plain,) = fixed.encode(random_codes(1))
    other = CodeCoder(GRID.n_codes, GRID.tokens, unit_tag("unit-b"))
    cases = [
        (coder, b"\x89PNG\r\n\x1a\n", "f is not a geovq compressed image"),
        (coder, good[:5], "f is not a geovq compressed image"),
        (coder, bytes([0xA0 | (VERSION + 1)]) + good[1:], f"format version {VERSION + 1}, newer than this geovq"),
        (coder, bytes([0xA0 | (VERSION - 1)]) + good[1:], f"format version {VERSION - 1}, whose prior probabilities"),
        (fixed, plain[:-1], "f is truncated or padded"),
        (coder, good[:HEADER_BYTES + 2], "f: "),  # a payload cut short: it fails to decode, or fails the check
    ]
    for decoder, blob, message in cases:
        with pytest.raises(GeovqError, match=message) as err:
            decoder.decode([blob], ["f"])
        assert "\n" not in str(err.value)
    with pytest.raises(GeovqError, match="was written by another unit"):
        other.decode([plain], ["f"])
    with pytest.raises(GeovqError, match="holds fixed-length codes; this codec reads the transformer prior's"):
        coder.decode([plain], ["f"])
    # among files decoded a block at a time, the damaged one is the one named
    files = coder.encode(random_codes(BLOCK + 4, seed=9))
    files[BLOCK + 2] = files[BLOCK + 2][:HEADER_BYTES + 2]
    names = [f"img{i}.gvq" for i in range(len(files))]
    with pytest.raises(GeovqError, match=f"^img{BLOCK + 2}.gvq: "):
        coder.decode(files, names)
    np.testing.assert_array_equal(coder.decode(files[:BLOCK + 2], names), random_codes(BLOCK + 4, seed=9)[:BLOCK + 2])


@pytest.mark.parametrize("kind", ["transformer", "pixelcnn"])
@pytest.mark.parametrize("grid", [GRID, CodeGrid(7, 7, 1, 256), CodeGrid(8, 8, 1, 256)], ids=["T18", "T49", "T64"])
def test_an_images_probabilities_do_not_depend_on_its_block_to_the_last_bit(kind, grid):
    """What decoding relies on: an image's probabilities come out bit for bit the same whichever row of a block it
    is coded in and beside whichever images (a decoder's blocks are not the encoder's), and they are the prior's
    own distributions (its teacher-forced forward's, to float precision)."""
    prior = make_prior(kind, grid)
    with torch.no_grad():
        for p in prior.parameters():
            p.mul_(4.0)
    coder = CodeCoder(grid.n_codes, grid.tokens, unit_tag("u"), prior, kind)
    rows = np.random.default_rng(2).integers(0, grid.n_codes, (2 * BLOCK, grid.tokens))
    first = coder.block_probabilities(rows[:BLOCK])  # image 0 in row 0 of a full block
    elsewhere = rows[BLOCK:].copy()
    elsewhere[BLOCK - 3] = rows[0]  # the same image in row 13, among other images
    assert np.array_equal(coder.block_probabilities(elsewhere)[BLOCK - 3], first[0])
    assert np.array_equal(coder.block_probabilities(rows[:1])[0], first[0])  # alone, in a block padded with zeros
    with torch.no_grad():
        forward = torch.softmax(prior.eval().logits(torch.as_tensor(rows[:BLOCK])).double(), -1).numpy()
    np.testing.assert_allclose(first, forward, rtol=0, atol=1e-5)
    assert not np.array_equal(first[0], first[1])  # the images' distributions differ: the check above has teeth


def test_a_decoder_whose_arithmetic_differs_is_caught_by_the_check_not_returned():
    tag = unit_tag("unit-a")
    prior = random_prior("transformer")
    codes = prior.sample(20, generator=torch.Generator().manual_seed(5)).numpy()
    files = CodeCoder(GRID.n_codes, GRID.tokens, tag, prior, "transformer").encode(codes)
    with torch.no_grad():  # another machine's last bits, exaggerated: every weight nudged by 1e-3
        for p in prior.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    shifted = CodeCoder(GRID.n_codes, GRID.tokens, tag, prior, "transformer")
    failed = 0
    for i, blob in enumerate(files):
        try:
            np.testing.assert_array_equal(shifted.decode([blob]), codes[i:i + 1])
        except GeovqError as e:
            assert "fail the file's check" in str(e) or "does not decode" in str(e)
            failed += 1
    assert failed > 0  # the nudge changed some files' decoding, and each such file was refused


def test_the_header_is_seven_bytes_and_names_its_unit():
    header = Header(unit_tag("unit-a"), 1, 0xBEEF)
    blob = header.pack()
    assert len(blob) == HEADER_BYTES == 7 and Header.parse(blob, "f") == header


# -- a real run: the main job's (conftest's quick_run) -------------------------------------------------------
@pytest.mark.parametrize("method", ["kmeans", "vqvae"])
def test_a_run_unit_compresses_its_test_images_to_its_own_codes_and_back(quick_run, method):
    """The unit's test images (the first 60) compress to the codes the sweep saved for them, at the prior's
    estimate plus at most one 32-bit flush each, and decompress to the unit's own reconstruction of them."""
    from geovq.codec import Codec
    from geovq.stages.common import load_splits
    from geovq.stages.plan import RunPlan
    from geovq.training.checkpoint import load_model

    plan = RunPlan.load(quick_run)
    unit = plan.select(method, None, 16, 0)
    images = load_splits(plan.cfg).test[:60]
    codec = Codec.from_run(quick_run, method, k=16)
    assert codec.coder.kind == 1  # the sweep trained a Transformer prior: range-coded
    files = codec.compress(images)
    saved = np.load(plan.run.codes(unit, "test"))[:60]
    np.testing.assert_array_equal(codec.coder.decode(files), saved)
    prior = load_model(plan.run.prior(unit, "transformer") / "prior.pt", "prior")
    with torch.no_grad():
        estimate = prior.token_nll(torch.as_tensor(saved, dtype=torch.long)).sum(1).numpy() / math.log(2)
    payload_bits = np.array([8 * (len(f) - HEADER_BYTES) for f in files])
    assert (payload_bits <= estimate + 33).all() and (payload_bits >= estimate - 1).all()
    np.testing.assert_array_equal(codec.decompress(files), codec.decode_codes(saved))


def test_compress_and_decompress_on_the_command_line(quick_run, tmp_path):
    from typer.testing import CliRunner

    from geovq.cli import app
    from geovq.codec import Codec
    from geovq.images import read_images, write_png
    from geovq.stages.common import load_splits
    from geovq.stages.plan import RunPlan

    runner = CliRunner()
    images = load_splits(RunPlan.load(quick_run).cfg).test[:5]
    pngs = []
    for i, image in enumerate(images):
        write_png(tmp_path / f"digit{i}.png", image)
        pngs.append(tmp_path / f"digit{i}.png")
    result = runner.invoke(app, ["compress", str(quick_run), *map(str, pngs), "--method", "gq", "--k", "16",
                                 "--out", str(tmp_path / "gvq")])
    assert result.exit_code == 0, result.output
    files = sorted((tmp_path / "gvq").glob("*.gvq"))
    assert [f.stem for f in files] == [f"digit{i}" for i in range(5)]
    result = runner.invoke(app, ["decompress", str(quick_run), *map(str, files), "--out", str(tmp_path / "png")])
    assert result.exit_code == 0, result.output
    _, decoded = read_images(sorted((tmp_path / "png").glob("*.png")), (1, 16, 16))
    codec = Codec.from_run(quick_run, "gq", k=16)
    _, read = read_images(pngs, (1, 16, 16))
    want = codec.decode_codes(codec.encode_images(read))
    assert np.abs(decoded - want).max() <= 0.5 / 255 + 1e-6  # the PNG's 8-bit rounding only
    # a wrongly sized image: one line naming the run's shape
    from PIL import Image

    Image.new("L", (28, 28)).save(tmp_path / "big.png")
    result = runner.invoke(app, ["compress", str(quick_run), str(tmp_path / "big.png"), "--method", "gq", "--k", "16",
                                 "--out", str(tmp_path / "no")])
    assert result.exit_code == 2 and "big.png is 1×28×28; this run's unit reads 1×16×16" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "no").exists()


def test_every_row_with_a_prior_carries_the_size_of_its_test_images_files(quick_run):
    """coded_bits_per_image is 8 × the mean size of the files `geovq compress` writes for the test images (the
    7-byte header included): recomputed here for one unit, and within one 32-bit flush of the prior's estimate
    plus the header for every row; the report draws it beside JPEG and WebP on the same images."""
    import json

    from geovq.codec import CodeCoder, unit_tag
    from geovq.stages.plan import RunPlan
    from geovq.training.checkpoint import load_model

    plan = RunPlan.load(quick_run)
    rows = [row.as_dict() for row in plan.run.rows()]
    assert rows and all(r["coded_bits_per_image"] is not None for r in rows)
    for r in rows:
        header_bits = 8 * HEADER_BYTES
        assert r["prior_bits_per_image"] + header_bits - 1 <= r["coded_bits_per_image"]
        assert r["coded_bits_per_image"] <= r["prior_bits_per_image"] + header_bits + 33
    unit = plan.select("kmeans", None, 16, 0)
    codes = np.load(plan.run.codes(unit, "test"))
    prior = load_model(plan.run.prior(unit, "transformer") / "prior.pt", "prior")
    coder = CodeCoder(16, codes.shape[1], unit_tag(unit.key), prior, "transformer")
    files = coder.encode(codes)
    row = next(r for r in rows if r["unit"] == unit.key)
    assert row["coded_bits_per_image"] == 8 * np.mean([len(f) for f in files])
    figure = json.loads((quick_run / "figures" / "rate_distortion.json").read_text())
    assert figure["panels"][-1] == "psnr_vs_coded_bpp" and len(figure["coded"]) == len({r["method"] for r in rows})
    assert [p["quality"] for p in figure["references"]["codecs"]["jpeg"]["points"]] == [5, 10, 20, 35, 50, 75, 90]
    assert "coded bits/image (files)" in (quick_run / "report.md").read_text()


def test_a_prior_scored_before_files_were_coded_gains_their_rate_when_read_again(quick_run, tmp_path):
    """A run from a geovq that did not code files yet: its prior.json gains the coded rate the next time the prior
    stage reads it (a re-run or an extended sweep), the same as a fresh run's."""
    import json
    import shutil

    from geovq.stages.common import no_progress
    from geovq.stages.plan import RunPlan
    from geovq.stages.prior import prior_stage
    from geovq.stages.rundir import RunDir

    plan = RunPlan.load(quick_run)
    unit = plan.select("gq", None, 16, 0)
    unit_dir = plan.run.unit(unit).relative_to(quick_run)
    shutil.copytree(quick_run / unit_dir, tmp_path / unit_dir, ignore=shutil.ignore_patterns("tb", "samples-*"))
    copy = RunDir(tmp_path)
    done = copy.prior(unit, "transformer") / "prior.json"
    fresh = json.loads(done.read_text())
    done.write_text(json.dumps({k: v for k, v in fresh.items() if not k.startswith("coded_")}))
    result = prior_stage(copy, plan.cfg, unit, torch.device("cpu"), no_progress, kind="transformer")
    assert result["coded_bits_per_image"] == fresh["coded_bits_per_image"]
    assert json.loads(done.read_text())["coded_round_trip_images"] == 16
