"""The batched morph engine: codes → natural morphs → decode + classify → resistance, chunk by
chunk, resumable through safetensors chunks. Input labels C(x) are always float32."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmdefense.core.chunks import chunked
from fmdefense.core.fingerprints import fingerprint, fingerprint_tensor
from fmdefense.core.precision import resolve_precision
from fmdefense.defenses.fm.config import FMDefenseConfig, MorphableVAE
from fmdefense.defenses.fm.morphs import draw_table, natural_deltas, shuffled
from fmdefense.defenses.fm.ranges import code_values
from fmdefense.defenses.fm.resistance import resistance
from fmdefense.defenses.fm.sequential import SequentialConfig, sequential_actions

log = logging.getLogger(__name__)


class MorphEngine:
    """Resistance of input batches for one classifier, combo-VAE and config."""

    def __init__(self, classifier: nn.Module, vae: MorphableVAE, config: FMDefenseConfig) -> None:
        self.classifier = classifier
        self.vae = vae
        self.config = config
        self._compiled: tuple[Any, Any] | None = None  # (decode, classify) when compiling

    @property
    def device(self) -> torch.device:
        return next(self.classifier.parameters()).device

    @property
    def precision(self) -> str:
        """The morph precision in force: the config's, with "auto" resolved for this device."""
        if getattr(self, "_precision", None) is None:
            self._precision = resolve_precision(self.config.precision, self.device)
        return self._precision

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def labels(self, x: torch.Tensor) -> torch.Tensor:
        """C(x) for a batch of images, always in float32: adversarial inputs sit on the
        decision boundary, and a bf16 C(x) flips some of them back to their true label."""
        return self.classifier(x.to(self.device)).argmax(1).cpu()

    @torch.inference_mode()
    def morph_labels(self, x: torch.Tensor) -> torch.Tensor:
        """Labels of decoded morphs, at the configured precision (the engine's hot loop)."""
        with self.autocast():
            if self.config.compile:
                logits = static_pieces(
                    self.compiled()[1], self.config.batch_size, x.to(self.device)
                )
            else:
                logits = self.classifier(x.to(self.device))
        return logits.argmax(1).cpu()

    def compiled(self) -> tuple[Any, Any]:
        """The decoder and classifier under torch.compile (inductor, frozen weights on the CPU;
        an in-place change of the weights is followed, tested)."""
        if self._compiled is None:
            options: dict[str, Any] | None = None
            if self.device.type == "cpu":
                options = {"freezing": True}
            log.info("compiling the morph decoder and classifier (torch.compile, %s)", options)
            self._compiled = (
                torch.compile(self.vae.decode_codes, dynamic=False, options=options),
                torch.compile(self.classifier, dynamic=False, options=options),
            )
        return self._compiled

    @torch.inference_mode()
    def latents(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Manipulable codes (n, M[, h, w]) and z_u (n, K), on the CPU in float32."""
        xd = x.to(self.device)
        return self.vae.codes(xd).float().cpu(), self.vae.encode(xd)[1].float().cpu()

    def decode(self, codes: torch.Tensor, z_u: torch.Tensor) -> torch.Tensor:
        codes, z_u = codes.to(self.device), z_u.to(self.device)
        with self.autocast():
            if self.config.compile:
                images = static_pieces(self.compiled()[0], self.config.batch_size, codes, z_u)
            else:
                images = self.vae.decode_codes(codes, z_u)
        if self.config.channels_last:
            return images.contiguous(memory_format=torch.channels_last)
        return images

    def chunk_resistance(
        self,
        x: torch.Tensor,
        code_idx: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """Resistance (n, m) of a chunk against the given input labels C(x) (n,)."""
        codes, z_u = self.latents(x)
        deltas = self.morph_deltas(codes, code_idx, lo, hi)  # the order does not change r
        return resistance(
            codes,
            z_u,
            labels,
            code_idx,
            deltas,
            self.decode,
            self.morph_labels,
            self.config.batch_size,
        )

    def morph_deltas(
        self, codes: torch.Tensor, code_idx: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
    ) -> torch.Tensor:
        """The natural morphs' perturbations (n, m, N) of encoded inputs, in shuffled order."""
        values = code_values(codes)[:, code_idx]  # (n, m)
        table = self.table[:, code_idx]
        deltas = natural_deltas(values, lo[code_idx], hi[code_idx], table, self.config.morph)
        return shuffled(deltas, self.config.seed)

    def sequential(
        self,
        x: torch.Tensor,
        code_idx: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        theta: torch.Tensor,
        theta_d: float,
        cfg: SequentialConfig,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(actions, resistance estimates, morphs decoded, C(x)) with early stopping."""
        labels = self.labels(x)
        codes, z_u = self.latents(x)
        deltas = self.morph_deltas(codes, code_idx, lo, hi)
        action, r_hat, used = sequential_actions(
            codes,
            z_u,
            labels,
            code_idx,
            deltas,
            self.decode,
            self.morph_labels,
            theta,
            theta_d,
            cfg,
            self.config.batch_size,
        )
        return action, r_hat, used, labels

    def relabelled(
        self,
        x: torch.Tensor,
        saved: dict[str, torch.Tensor],
        code_idx: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
    ) -> dict[str, torch.Tensor] | None:
        """Upgrade a chunk from before fp32 input labels (no "label" tensor): older versions
        compared the morphs with C(x) at the morph precision. Rows whose label is the same are
        kept (an input's morphs depend only on the input and the seed); the others are redone.
        Assumes the chunk was written on this device kind (its bf16 labels are recomputed here)."""
        if "label" in saved:
            return None
        label = self.labels(x)
        changed = (label != self.morph_labels(x)).nonzero().flatten()
        r = saved["r"].clone()
        if len(changed):
            r[changed] = self.chunk_resistance(x[changed], code_idx, lo, hi, label[changed])
        level = logging.INFO if len(changed) else logging.DEBUG
        log.log(level, "relabelled a cached chunk: %d of %d inputs redone", len(changed), len(x))
        return {"r": r, "label": label}

    def resistance(
        self,
        x: torch.Tensor,
        code_idx: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        cache_dir: Path | None = None,
    ) -> torch.Tensor:
        """Resistance (n, m) chunk by chunk; with `cache_dir` finished chunks are kept/reused."""
        key: dict[str, Any] | None = None
        if cache_dir is not None:
            key = {
                "morph": asdict(self.config.morph),
                "codes": code_idx.tolist(),
                "lo": lo.tolist(),
                "hi": hi.tolist(),
                "input": fingerprint_tensor(x),
                "classifier": fingerprint(self.classifier),
                "vae": fingerprint(self.vae),
                "precision": self.precision,
            }
            if self.config.compile:  # compiled kernels round differently: their own chunks
                key["compile"] = True

        def compute(start: int, stop: int) -> dict[str, torch.Tensor]:
            label = self.labels(x[start:stop])
            return {
                "r": self.chunk_resistance(x[start:stop], code_idx, lo, hi, label),
                "label": label,
            }

        def upgrade(
            start: int, stop: int, saved: dict[str, torch.Tensor]
        ) -> dict[str, torch.Tensor] | None:
            return self.relabelled(x[start:stop], saved, code_idx, lo, hi)

        out = chunked(
            len(x),
            self.config.chunk_size,
            cache_dir,
            compute,
            config=key,
            desc="resistance",
            upgrade=upgrade,
        )
        return out["r"]

    @property
    def table(self) -> torch.Tensor:
        if getattr(self, "_table_cache", None) is None:
            self._table_cache = draw_table(self.config.morph, self.vae.num_codes)
        return self._table_cache


def static_pieces(fn: Any, size: int, *batch: torch.Tensor) -> torch.Tensor:
    """fn over `size`-row pieces of a batch, the last one padded with copies of its first row
    (in the piece's own memory format) and cut back: a compiled fn sees one static input, so
    it does not recompile. An empty batch goes to fn as it is."""
    n, outs = len(batch[0]), []
    if n == 0:
        return fn(*batch)
    for i in range(0, n, size):
        piece = [t[i : i + size] for t in batch]
        extra = size - len(piece[0])
        if extra:
            piece = [_pad(t, extra) for t in piece]
        outs.append(fn(*piece)[: size - extra])
    return torch.cat(outs)


def _pad(t: torch.Tensor, extra: int) -> torch.Tensor:
    """t with `extra` copies of its first row appended, channels_last kept where t had it."""
    out = torch.cat([t, t[:1].expand(extra, *t.shape[1:])])
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous(memory_format=torch.channels_last)
    return out
