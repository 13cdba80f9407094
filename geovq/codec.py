"""A run's unit as an image codec: images in, one file per image out, and back (DESIGN.md §2's rate, in bytes).

    images ─ the unit's encoder and codebook ─> (T,) codes ─ range coder driven by the unit's prior ─> bytes
    bytes ─ range decoder, the same prior step by step ─> codes ─ the unit's codebook and decoder ─> images

A file is a 7-byte header and a payload:

    byte 0      0xA0 | format version (2)
    bytes 1-3   the unit's tag: the first 3 bytes of SHA-256 of its key (which unit of a run decodes it; the
                unit's full identity lives in the run, not in every file)
    byte 4      the payload: 0 the codes at fixed length, 1 range-coded with the unit's Transformer prior,
                2 with its PixelCNN prior
    bytes 5-6   CRC-16 (CCITT) of the codes, big endian: a decoder whose arithmetic differs from the encoder's
                gets other codes, and the check says so instead of returning them
    payload     fixed length: the T codes as one base-K integer in ceil(T·log2 K / 8) bytes; coded: the range
                coder's 32-bit words, little endian, without their trailing zero bytes

Why a range coder: the prior is autoregressive (code t's distribution depends on the codes before it), and a
range coder (a queue) decodes in the order it encodes; ANS (a stack) would have to encode backwards.

What decoding relies on: the encoder and the decoder compute each code's probabilities by the same arithmetic.
Both run one causal forward of the prior over a whole image's (1, T) code sequence, on the CPU, with one torch
thread: the encoder once per image (all T distributions at once), the decoder once per code, with the codes
decoded so far and zeros after them. A causal prior's position t sees no later position, and the same shapes run
the same kernels, so position t's probabilities come out bit for bit the same (the prior's cached one-step
sampling path does not: it differs in the 7th digit). So on one machine, with one torch build, they agree bit for
bit. Another CPU kernel set (AVX2 against AVX-512), another torch build, or a GPU can change the last bits of a
probability and so the coder's integer model: the CRC catches that, and `decompress` refuses the file in one line.
Encoding costs one forward per image (a sweep codes every test image to measure its rate); decoding T forwards.
"""

from __future__ import annotations

import binascii
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from geovq.errors import GeovqError

#: 2: probabilities from one causal forward of the whole sequence (1: from the prior's cached steps)
MAGIC, VERSION = 0xA0, 2
HEADER_BYTES = 7
#: byte 4 of the header: how the payload holds the codes
FIXED, PRIOR_KINDS = 0, ("transformer", "pixelcnn")  # prior kind i is payload kind i + 1


def payload_prior(kind: int) -> str | None:
    """The prior a payload of this kind was coded with; None: fixed length."""
    return None if kind == FIXED else PRIOR_KINDS[kind - 1]


def unit_tag(key: str) -> bytes:
    """3 bytes naming a unit among a run's units (first bytes of SHA-256 of its key)."""
    return hashlib.sha256(key.encode()).digest()[:3]


def codes_crc(codes: np.ndarray) -> int:
    return binascii.crc_hqx(np.ascontiguousarray(codes, dtype="<i4").tobytes(), 0)


@dataclass(frozen=True)
class Header:
    tag: bytes
    kind: int  # FIXED, or 1 + index in PRIOR_KINDS
    crc: int
    version: int = VERSION

    def pack(self) -> bytes:
        return bytes([MAGIC | self.version]) + self.tag + bytes([self.kind]) + self.crc.to_bytes(2, "big")

    @classmethod
    def parse(cls, blob: bytes, name: str) -> Header:
        if len(blob) < HEADER_BYTES or blob[0] & 0xF0 != MAGIC:
            raise GeovqError(f"{name} is not a geovq compressed image (no geovq header)")
        version = blob[0] & 0x0F
        if version > VERSION:
            raise GeovqError(f"{name} is of format version {version}, newer than this geovq reads ({VERSION}); "
                             "decompress it with a newer geovq")
        if version < VERSION:
            raise GeovqError(f"{name} is of format version {version}, whose prior probabilities this geovq no longer "
                             f"computes (it reads {VERSION}); compress the image again")
        kind = blob[4]
        if kind > len(PRIOR_KINDS):
            raise GeovqError(f"{name}: unknown payload kind {kind} (valid: 0 fixed length, 1..{len(PRIOR_KINDS)} "
                             "range-coded)")
        return cls(blob[1:4], kind, int.from_bytes(blob[5:7], "big"), version)


class CodeCoder:
    """(N, T) codes of one unit <-> one file each: the entropy-coding layer alone, usable without images.

    `prior` (a geovq Prior of `prior_kind`, unconditional) codes them; without one they are stored at fixed
    length."""

    def __init__(self, n_codes: int, tokens: int, tag: bytes, prior=None, prior_kind: str | None = None) -> None:
        if prior is not None and prior_kind not in PRIOR_KINDS:
            raise GeovqError(f"prior kind {prior_kind!r} is unknown; valid: {', '.join(PRIOR_KINDS)}")
        if prior is not None and prior.n_classes:
            raise GeovqError("a class-conditional prior needs each image's label: the codec takes unconditional priors")
        self.n_codes, self.tokens, self.tag = n_codes, tokens, tag
        self.prior, self.kind = prior, (FIXED if prior is None else 1 + PRIOR_KINDS.index(prior_kind))
        self.fixed_bytes = math.ceil(tokens * math.log2(n_codes) / 8)

    # -- encoding -------------------------------------------------------------------------------------------
    def encode(self, codes: np.ndarray, progress: Callable[..., Any] | None = None) -> list[bytes]:
        """(N, T) ints in [0, K) -> N files; `progress` (a tqdm-like factory) draws a bar over the images."""
        codes = self._checked(codes)
        files = []
        with _bar(progress, len(codes), "compress") as bar:
            for row in codes:
                files.append(Header(self.tag, self.kind, codes_crc(row)).pack() + self._payload(row))
                bar.update(1)
        return files

    def _checked(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.tokens or (codes.size and (codes.min() < 0 or
                                                                               codes.max() >= self.n_codes)):
            raise GeovqError(f"codes must be (N, {self.tokens}) in [0, {self.n_codes}), got shape {codes.shape}")
        return codes

    def _payload(self, row: np.ndarray) -> bytes:
        if self.kind == FIXED:
            value = 0
            for code in reversed(row.tolist()):
                value = value * self.n_codes + code
            return value.to_bytes(self.fixed_bytes, "big")
        import constriction

        encoder = constriction.stream.queue.RangeEncoder()
        # all T codes at once: position t's probabilities depend on the codes before t only (bit for bit)
        encoder.encode(row.astype(np.int32), constriction.stream.model.Categorical(perfect=False),
                       self._probabilities(row))
        return encoder.get_compressed().astype("<u4").tobytes().rstrip(b"\0")

    def _probabilities(self, row: np.ndarray) -> np.ndarray:
        """(T, K) float64: the prior's distribution of each code of one image given the codes before it, from one
        causal forward of the whole (1, T) sequence on the CPU with one torch thread. The decoder calls it with the
        codes decoded so far and zeros after them: a causal prior's position t sees no later position, and with
        the same shapes the same kernels run, so position t comes out bit for bit as the encoder computed it
        (checked for both priors at T = 18, 49 and 64 in tests/test_codec.py)."""
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                logits = self.prior.eval().logits(torch.as_tensor(row, dtype=torch.long)[None])[0]
                return torch.softmax(logits.double(), -1).numpy()
        finally:
            torch.set_num_threads(threads)

    # -- decoding -------------------------------------------------------------------------------------------
    def decode(self, blobs: Sequence[bytes], names: Sequence[str] | None = None,
               progress: Callable[..., Any] | None = None) -> np.ndarray:
        """N files -> (N, T) int64 codes; every file checked (header, unit, length, CRC) with a one-line error."""
        names = names or [f"file {i}" for i in range(len(blobs))]
        rows = []
        with _bar(progress, len(blobs), "decompress") as bar:
            for blob, name in zip(blobs, names):
                rows.append(self._decode_one(blob, name))
                bar.update(1)
        return np.stack(rows) if rows else np.zeros((0, self.tokens), np.int64)

    def _decode_one(self, blob: bytes, name: str) -> np.ndarray:
        header = Header.parse(blob, name)
        if header.tag != self.tag:
            raise GeovqError(f"{name} was written by another unit (tag {header.tag.hex()}, this one's is "
                             f"{self.tag.hex()}); decompress it with the run and unit that compressed it")
        if header.kind != self.kind:
            held, read = payload_prior(header.kind), payload_prior(self.kind)
            holds = f"the {held} prior" if held else "fixed-length codes"
            reads = f"the {read} prior's" if read else "fixed-length codes"
            raise GeovqError(f"{name} holds {holds}; this codec reads {reads}")
        payload = blob[HEADER_BYTES:]
        if header.kind == FIXED:
            if len(payload) != self.fixed_bytes:
                raise GeovqError(f"{name} is truncated or padded: {len(payload)} payload bytes, a unit of "
                                 f"{self.tokens} codes of K = {self.n_codes} stores {self.fixed_bytes}")
            value, row = int.from_bytes(payload, "big"), []
            for _ in range(self.tokens):
                value, code = divmod(value, self.n_codes)
                row.append(code)
            codes = np.array(row, np.int64)
        else:
            codes = self._range_decode(payload, name)
        if codes_crc(codes) != header.crc:
            raise GeovqError(f"{name}: the decoded codes fail the file's check (CRC-16): the file is damaged, or "
                             "was compressed where the prior's arithmetic differs (another CPU kernel set, torch "
                             "build or a GPU); decompress it where it was compressed")
        return codes

    def _range_decode(self, payload: bytes, name: str) -> np.ndarray:
        import constriction

        padded = payload + b"\0" * (-len(payload) % 4)
        decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(padded, dtype="<u4").astype(np.uint32))
        row = np.zeros(self.tokens, np.int64)
        try:
            for t in range(self.tokens):  # one causal forward per code: T forwards per image
                model = constriction.stream.model.Categorical(self._probabilities(row)[t], perfect=False)
                row[t] = int(decoder.decode(model))
        except (ValueError, RuntimeError, AssertionError) as e:
            raise GeovqError(f"{name}: its payload does not decode ({e}); the file is damaged or truncated") from None
        return row


def _bar(progress: Callable[..., Any] | None, total: int, what: str):
    """A progress bar over `total` images from a tqdm-like factory, or one that draws nothing."""
    if progress is None:
        from geovq.stages.common import no_progress

        progress = no_progress
    return progress(total=total, desc=f"{what} (images)")


class Codec:
    """compress(images) -> one file (bytes) each; decompress(files) -> images, through one unit of a run."""

    def __init__(self, coder: CodeCoder, encode_images: Callable[[np.ndarray], np.ndarray],
                 decode_codes: Callable[[np.ndarray], np.ndarray], image_shape: tuple[int, int, int]) -> None:
        self.coder, self.encode_images, self.decode_codes = coder, encode_images, decode_codes
        self.image_shape = image_shape  # (channels, height, width) the unit's encoder reads

    @classmethod
    def from_run(cls, run_dir: str | Path, method: str, vae: str | None = None, k: int | None = None,
                 seed: int = 0, prior: str | None = "transformer", device=None) -> Codec:
        """The unit of `run_dir` named as `geovq sample` names it (method, VAE variant, K, seed). Its codes are
        range-coded with its trained `prior` (transformer or pixelcnn) where the sweep trained one, else (or
        with prior=None) stored at fixed length."""
        from geovq.stages.plan import RunPlan

        plan = RunPlan.load(Path(run_dir))
        return cls.for_unit(plan, plan.select(method, vae, k, seed), prior, device)

    @classmethod
    def for_unit(cls, plan, unit, prior: str | None = "transformer", device=None) -> Codec:
        import torch

        from geovq.stages.encode import unit_encoder
        from geovq.stages.fit import load_fitted
        from geovq.stages.prior import code_decoder, unit_grid
        from geovq.training.checkpoint import load_model

        device = device or torch.device("cpu")
        run, cfg = plan.run, plan.cfg
        path = run.prior(unit, prior) / "prior.pt" if prior is not None else None
        model = load_model(path, "prior", torch.device("cpu")) if path is not None and path.exists() else None
        coder = CodeCoder(unit.n_codes, unit_grid(cfg, unit).tokens, unit_tag(unit.key), model,
                          prior if model is not None else None)
        fitted = load_fitted(run, unit, device)  # once, for the encoder and the decoder alike
        decode, _ = code_decoder(run, cfg, unit, device, fitted)
        trunk = cfg.trunk
        return cls(coder, unit_encoder(run, cfg, unit, device, fitted),
                   lambda codes: decode(codes).clamp(0, 1).cpu().numpy(), (trunk.in_channels, *trunk.image_size))

    def check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise GeovqError(f"images must be (N, {', '.join(map(str, self.image_shape))}) (channels, height, "
                             f"width) for this run, got {tuple(images.shape)}")
        return images

    def compress(self, images: np.ndarray, progress: Callable[..., Any] | None = None) -> list[bytes]:
        """(N, C, H, W) float images in [0, 1] -> N files; `progress`: a tqdm-like bar factory."""
        return self.coder.encode(self.encode_images(self.check_images(images)), progress)

    def decompress(self, blobs: bytes | Sequence[bytes], names: Sequence[str] | None = None,
                   progress: Callable[..., Any] | None = None) -> np.ndarray:
        """One file or several -> (N, C, H, W) float32 images in [0, 1]."""
        blobs = [blobs] if isinstance(blobs, (bytes, bytearray)) else list(blobs)
        return self.decode_codes(self.coder.decode(blobs, names, progress))
