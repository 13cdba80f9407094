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
Both step the prior through blocks of BLOCK images (`Prior.next_logits`: the Transformer's cached keys and values,
the PixelCNN's stacks rerun on the partly filled grid), a block padded with zero codes to BLOCK rows, on the CPU
with one torch thread, and feed step t's code before step t + 1: the encoder the code it is coding, the decoder the
code it has just decoded. So an image's row sees the same inputs through the same shapes, hence the same kernels,
in both; and no layer mixes rows (each acts per image), so which row of which block an image lands in does not
matter (tested to the last bit for both priors). So on one machine, with one torch build, they agree bit for bit.
Another CPU kernel set (AVX2 against AVX-512), another torch build, or a GPU can change the last bits of a
probability and so the coder's integer model: the CRC catches that, and `decompress` refuses the file in one line.
Encoding and decoding cost the same: T steps per block of BLOCK images (on MNIST, 49 steps of a 4-layer
Transformer: about 200 images/s on one core either way; one file alone decodes in under 0.1 s).
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

#: 3: probabilities from the prior's steps over blocks of BLOCK images (2: one causal forward per image, T of them
#: to decode; 1: cached steps one image at a time)
MAGIC, VERSION = 0xA0, 3
#: images the prior steps through together, encoder and decoder alike (part of the format: see the module docstring)
BLOCK = 16
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
            for start in range(0, len(codes), BLOCK):
                block = codes[start:start + BLOCK]
                payloads = map(self._fixed_payload, block) if self.kind == FIXED else self._range_encode(block)
                files += [Header(self.tag, self.kind, codes_crc(row)).pack() + payload
                          for row, payload in zip(block, payloads)]
                bar.update(len(block))
        return files

    def _checked(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.tokens or (codes.size and (codes.min() < 0 or
                                                                               codes.max() >= self.n_codes)):
            raise GeovqError(f"codes must be (N, {self.tokens}) in [0, {self.n_codes}), got shape {codes.shape}")
        return codes

    def _fixed_payload(self, row: np.ndarray) -> bytes:
        value = 0
        for code in reversed(row.tolist()):
            value = value * self.n_codes + code
        return value.to_bytes(self.fixed_bytes, "big")

    def _range_encode(self, block: np.ndarray) -> list[bytes]:
        """Payloads of one block of at most BLOCK images' codes (n, T)."""
        import constriction

        probabilities = self.block_probabilities(block)  # (n, T, K)
        payloads = []
        for row, p in zip(block, probabilities):
            encoder = constriction.stream.queue.RangeEncoder()
            encoder.encode(row.astype(np.int32), constriction.stream.model.Categorical(perfect=False), p)
            payloads.append(encoder.get_compressed().astype("<u4").tobytes().rstrip(b"\0"))
        return payloads

    def block_probabilities(self, block: np.ndarray) -> np.ndarray:
        """(n, T, K) float64: the prior's distribution of each code of n <= BLOCK images given the codes before
        it, by the steps the decoder takes (see the module docstring)."""
        probabilities = np.zeros((len(block), self.tokens, self.n_codes))

        def code(t: int, p: np.ndarray) -> np.ndarray:
            probabilities[:, t] = p
            return block[:, t]

        self._step(len(block), code)
        return probabilities

    def _step(self, n: int, code: Callable[[int, np.ndarray], np.ndarray]) -> None:
        """Step the prior through one block of n <= BLOCK images, padded with zero codes to BLOCK rows, on the CPU
        with one torch thread: at step t, code(t, (n, K) float64 probabilities of code t) gives the n codes fed
        to step t + 1."""
        import torch

        codes = torch.zeros(BLOCK, self.tokens, dtype=torch.long)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                for t, logits in enumerate(self.prior.eval().next_logits(codes, None)):
                    p = torch.softmax(logits[:n].double(), -1).numpy()
                    codes[:n, t] = torch.as_tensor(code(t, p), dtype=torch.long)
        finally:
            torch.set_num_threads(threads)

    # -- decoding -------------------------------------------------------------------------------------------
    def decode(self, blobs: Sequence[bytes], names: Sequence[str] | None = None,
               progress: Callable[..., Any] | None = None) -> np.ndarray:
        """N files -> (N, T) int64 codes, BLOCK at a time; every file checked (header, unit, length, CRC) with a
        one-line error."""
        names = list(names or [f"file {i}" for i in range(len(blobs))])
        rows = []
        with _bar(progress, len(blobs), "decompress") as bar:
            for start in range(0, len(blobs), BLOCK):
                block, block_names = blobs[start:start + BLOCK], names[start:start + BLOCK]
                headers = [self._header_of(blob, name) for blob, name in zip(block, block_names)]
                payloads = [blob[HEADER_BYTES:] for blob in block]
                codes = (np.stack([self._fixed_codes(p, name) for p, name in zip(payloads, block_names)])
                         if self.kind == FIXED else self._range_decode(payloads, block_names))
                for row, header, name in zip(codes, headers, block_names):
                    if codes_crc(row) != header.crc:
                        raise GeovqError(f"{name}: the decoded codes fail the file's check (CRC-16): the file is "
                                         "damaged, or was compressed where the prior's arithmetic differs (another "
                                         "CPU kernel set, torch build or a GPU); decompress it where it was "
                                         "compressed")
                rows.append(codes)
                bar.update(len(block))
        return np.concatenate(rows) if rows else np.zeros((0, self.tokens), np.int64)

    def _header_of(self, blob: bytes, name: str) -> Header:
        """The header of a file this coder reads; a file of another unit, payload kind or format is refused."""
        header = Header.parse(blob, name)
        if header.tag != self.tag:
            raise GeovqError(f"{name} was written by another unit (tag {header.tag.hex()}, this one's is "
                             f"{self.tag.hex()}); decompress it with the run and unit that compressed it")
        if header.kind != self.kind:
            held, read = payload_prior(header.kind), payload_prior(self.kind)
            holds = f"the {held} prior" if held else "fixed-length codes"
            reads = f"the {read} prior's" if read else "fixed-length codes"
            raise GeovqError(f"{name} holds {holds}; this codec reads {reads}")
        return header

    def _fixed_codes(self, payload: bytes, name: str) -> np.ndarray:
        if len(payload) != self.fixed_bytes:
            raise GeovqError(f"{name} is truncated or padded: {len(payload)} payload bytes, a unit of "
                             f"{self.tokens} codes of K = {self.n_codes} stores {self.fixed_bytes}")
        value, row = int.from_bytes(payload, "big"), []
        for _ in range(self.tokens):
            value, code = divmod(value, self.n_codes)
            row.append(code)
        return np.array(row, np.int64)

    def _range_decode(self, payloads: list[bytes], names: list[str]) -> np.ndarray:
        """(n, T) codes of one block of n <= BLOCK range-coded payloads, decoded step by step together."""
        import constriction

        decoders = [constriction.stream.queue.RangeDecoder(
            np.frombuffer(p + b"\0" * (-len(p) % 4), dtype="<u4").astype(np.uint32)) for p in payloads]

        codes = np.zeros((len(payloads), self.tokens), np.int64)

        def decoded(t: int, p: np.ndarray) -> np.ndarray:
            for i, decoder in enumerate(decoders):
                try:
                    codes[i, t] = decoder.decode(constriction.stream.model.Categorical(p[i], perfect=False))
                except (ValueError, RuntimeError, AssertionError) as e:
                    raise GeovqError(f"{names[i]}: its payload does not decode ({e}); the file is damaged or "
                                     "truncated") from None
            return codes[:, t]

        self._step(len(payloads), decoded)
        return codes


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
