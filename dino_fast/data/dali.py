"""The DINO multi-crop pipeline in NVIDIA DALI: decode on the GPU, every view in one pipeline.

One DALI pipeline reads the files of a batch, decodes each image once (``mixed``: nvJPEG /
the hardware decoder on a GPU; ``cpu`` without one) and emits all 2 + L views. The views of
one size (the globals, the locals) are cropped one by one, then stacked into one sequence that
the color and blur operators process at once (a launch per group, not per view); per view:

    resize(ROI = crop box, cubic, antialiased)            RandomResizedCrop, bicubic
    6 enhance slots around one HSV hue shift (pil_ops)    color jitter (p = 0.8), drawn order
    luma where chosen                                     grayscale
    3 + 3 box filter passes (pil_ops)                     PIL's GaussianBlur, per-sample sigma, p
    x ^ 255 where x >= 128 and chosen                     solarization (global view 2 only)
    crop_mirror_normalize(mirror, mean, std, CHW, fp16)   flip + ImageNet normalization

Every random decision is drawn on the host by ``augment.sample_view_params`` (numpy, seeded
by (seed, epoch, rank, step)) and fed to the operators as per-sample arguments, so a
per-sample conditional never costs a branch or a blend: an op that does not apply gets its
neutral argument (enhance factor 1, hue switch 0, an identity box tap, a zero solarization mask).
The crop sampler is torchvision's RandomResizedCrop algorithm; image sizes come from the
folder check (``folders.check_images``), and the decoder ignores EXIF orientation so that
the decoded size is the stored one, as with PIL.

Where this differs from the torchvision reference (``dino_fast.data.torchvision_pipeline``):
the color and blur steps redo PIL's 8-bit arithmetic (``pil_ops``), so fed the same
parameters the two agree but for the resize (DALI's cubic against PIL's bicubic, ~0.2 gray
levels on average) and float32 ties of one level (tests/test_dali_fidelity.py).
``color_ops="affine"`` trades the color fidelity for fewer operators (``affine_color``).
Statistics of the two pipelines (flip, grayscale and solarization rates, crop areas, output
mean and std) are compared in tests/data/test_data_agreement.py.

Bad input: the policy of ``dino_fast.data.folders`` (unusable files left out at
construction; a file that still fails to decode mid-epoch is found, the pipeline rebuilt, and
its batch slots refilled with the next usable image, counted in the once-per-epoch log).

Output: ``MultiCropBatch`` tensors in the requested dtype on the requested device (DALI
writes fp16 for bf16/fp16 and fp32 otherwise; bf16 is one cast on the device).
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from dino_fast.data import pil_ops
from dino_fast.data.affine_color import LUMA_WEIGHTS
from dino_fast.data.augment import MultiCropAugmentation, ViewParams, sample_view_params
from dino_fast.data.batch import FolderMultiCropLoader, MultiCropBatch, log_skipped
from dino_fast.data.dali_inputs import COLOR_INPUT_NDIMS, StepPlan, group_inputs
from dino_fast.data.folders import UnusableImageError, inspect_image
from dino_fast.optional import require

logger = logging.getLogger("dino_fast.data")


def _import_dali():
    needed_for = "the DALI data pipeline (--data dali)"
    fn = require("nvidia.dali.fn", needed_for)
    types = require("nvidia.dali.types", needed_for)
    pipeline = require("nvidia.dali.pipeline", needed_for)
    plugin = require("nvidia.dali.plugin.pytorch", needed_for)
    return fn, types, pipeline.Pipeline, plugin.feed_ndarray


def _default_threads(device: torch.device) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    share = max(1, cores // max(1, local_ranks))
    # On a GPU the CPU threads read files, parse JPEG headers and run the tiny argument ops.
    return max(2, min(8, share)) if device.type == "cuda" else share


class DALIMultiCropLoader(FolderMultiCropLoader):
    """Multi-crop batches from an image folder through one DALI pipeline.

    ``num_threads``: DALI CPU threads (default: this rank's share of the cores; 2-8 on a GPU).
    ``check``: the ``check_images`` mode run at construction. ``prefetch_queue_depth``: batches
    DALI prepares ahead of the one being consumed. ``hw_decoder_load``: the share of JPEGs the
    ``mixed`` decoder sends to the GPU's hardware JPEG engines. ``color_ops``: "pil" (PIL's
    8-bit color jitter, as the official pipeline) or "affine" (one color transform per view:
    fewer operators, hue and clamping approximate; see ``affine_color``).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        batch_size: int,
        augment: MultiCropAugmentation,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device,
        dtype: torch.dtype,
        num_threads: int | None = None,
        seed: int = 0,
        check: str = "header",
        prefetch_queue_depth: int = 2,
        hw_decoder_load: float = 0.65,
        color_ops: str = "pil",
    ) -> None:
        if color_ops not in COLOR_INPUT_NDIMS:
            raise ValueError(f"color_ops must be one of {', '.join(COLOR_INPUT_NDIMS)}, got {color_ops!r}")
        self._fn, self._types, self._Pipeline, self._feed_ndarray = _import_dali()
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(
                f"device {device} was requested but torch sees no CUDA device; use device='cpu'"
            )
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"the DALI pipeline outputs to 'cuda' or 'cpu', got device {device}")
        super().__init__(
            root,
            check=check,
            batch_size=batch_size,
            augment=augment,
            rank=rank,
            world_size=world_size,
            device=device,
            dtype=dtype,
            seed=seed,
        )
        self.num_threads = num_threads or _default_threads(device)
        self.prefetch_queue_depth = prefetch_queue_depth
        self.hw_decoder_load = hw_decoder_load
        self.color_ops = color_ops
        self.device_id = (
            (device.index if device.index is not None else torch.cuda.current_device())
            if (device.type == "cuda")
            else None
        )
        # One byte buffer for all paths: per-path numpy objects would cost ~200 B each per rank.
        encoded = [str(p).encode("utf-8") for p in self.index.paths]
        self._path_bytes = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._path_offsets = np.cumsum([0] + [len(e) for e in encoded])
        # Runtime-failed files are redirected to the next usable one.
        self._bad = np.zeros(self.dataset_size, dtype=bool)
        self._redirect = np.arange(self.dataset_size)
        self._pipe = None
        self._feed: _Feed | None = None
        self._pipe_dirty = False
        self._views = augment.views()
        # Views of one size go through the color and blur operators together.
        sizes = sorted({v.size for v in self._views}, reverse=True)
        self._groups = [[v.index for v in self._views if v.size == size] for size in sizes]

    # ----------------------------------------------------------------- planning (host side)
    def _path(self, i: int) -> str:
        return self._path_bytes[self._path_offsets[i] : self._path_offsets[i + 1]].tobytes().decode("utf-8")

    def _epoch_plan(self, epoch: int) -> np.ndarray:
        return self._redirect[self.epoch_indices(epoch).numpy().reshape(-1, self.batch_size)]

    def _step_params(self, epoch: int, step: int, indices: np.ndarray) -> list[ViewParams]:
        rng = np.random.default_rng([self.seed, epoch, self.rank, step])
        heights, widths = self.sizes[indices, 0], self.sizes[indices, 1]
        return [sample_view_params(rng, heights, widths, view, self.augment) for view in self._views]

    def plan_step(self, epoch: int, step: int) -> StepPlan:
        """The files and random parameters the pipeline gets for ``step`` of ``epoch``."""
        indices = self._epoch_plan(epoch)[step]
        return StepPlan(indices, [self._path(i) for i in indices], self._step_params(epoch, step, indices))

    def _step_inputs(self, epoch: int, step: int, indices: np.ndarray) -> tuple:
        offsets = self._path_offsets
        paths = [self._path_bytes[offsets[i] : offsets[i + 1]] for i in indices]
        inputs: list = [paths]
        params = self._step_params(epoch, step, indices)
        for p in params:
            top, left, h, w = (p.boxes[:, j].astype(np.float32) for j in range(4))
            inputs += [
                np.stack([top, left], axis=1),
                np.stack([top + h, left + w], axis=1),
                p.flip.astype(np.int32),
            ]
        for group in self._groups:
            inputs += group_inputs(
                [params[v] for v in group],
                [self._views[v] for v in group],
                self.color_ops,
                self.augment.blur_sigma[1],
            )
        return tuple(inputs)

    def _source(self) -> tuple:
        feed = self._feed
        if feed is None or feed.next_step >= len(feed.plan):
            raise StopIteration
        step = feed.next_step
        feed.next_step += 1
        return self._step_inputs(feed.epoch, step, feed.plan[step])

    # ----------------------------------------------------------------- the DALI graph
    def _group_input_count(self, group: list[int]) -> int:
        # The color inputs, the box blur's row and column taps, the solarization switch.
        solarize = any(self._views[v].solarize_p > 0 for v in group)
        return len(COLOR_INPUT_NDIMS[self.color_ops]) + 2 + solarize

    def _num_inputs(self) -> int:
        return 1 + 3 * len(self._views) + sum(self._group_input_count(g) for g in self._groups)

    def _build(self, decoder_check: bool = False):
        fn, types = self._fn, self._types
        on_gpu = self.device_id is not None
        pipe = self._Pipeline(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.device_id,
            seed=(self.seed * 1000003 + self.rank) % (2**31),
            prefetch_queue_depth=self.prefetch_queue_depth,
        )
        aug = self.augment
        dtypes = [types.UINT8]
        ndims = [1]
        for _ in self._views:
            dtypes += [types.FLOAT, types.FLOAT, types.INT32]
            ndims += [1, 1, 0]
        for group in self._groups:
            color = COLOR_INPUT_NDIMS[self.color_ops]
            dtypes += [types.FLOAT] * (len(color) + 2)
            ndims += [*color, 3, 3]
            if self._group_input_count(group) > len(color) + 2:
                dtypes.append(types.UINT8)
                ndims.append(4)
        out_type = types.FLOAT16 if self.dtype in (torch.float16, torch.bfloat16) else types.FLOAT
        norm_mean = [255.0 * m for m in aug.mean]
        norm_std = [255.0 * s for s in aug.std]

        # The pipeline reaches its loader through a weak reference: a bound method would make a
        # cycle that only the garbage collector frees, and a collection inside a forked DataLoader
        # worker runs the pipeline's destructor without its threads (a segfault).
        loader = weakref.ref(self)

        def source() -> tuple:
            owner = loader()
            if owner is None:
                raise StopIteration
            return owner._source()

        with pipe:
            inputs = fn.external_source(
                source=source, num_outputs=self._num_inputs(), batch=True, dtype=dtypes, ndim=ndims
            )
            encoded = fn.io.file.read(inputs[0])
            decoder_args = {"hw_decoder_load": self.hw_decoder_load} if on_gpu else {}
            images = fn.decoders.image(
                encoded,
                device="mixed" if on_gpu else "cpu",
                output_type=types.RGB,
                adjust_orientation=False,
                **decoder_args,
            )
            per_view = [inputs[1 + 3 * v : 4 + 3 * v] for v in range(len(self._views))]
            pos = 1 + 3 * len(self._views)
            outputs: list = [None] * len(self._views)
            for group in self._groups:
                count = self._group_input_count(group)
                group_inputs = inputs[pos : pos + count]
                pos += count
                n_color = len(COLOR_INPUT_NDIMS[self.color_ops])
                color_args = [self._on_device(x) for x in group_inputs[:n_color]]
                taps_row, taps_col = (fn.per_frame(t) for t in group_inputs[n_color : n_color + 2])
                crops = [
                    fn.resize(
                        images,
                        roi_start=per_view[v][0],
                        roi_end=per_view[v][1],
                        roi_relative=False,
                        size=(self._views[v].size, self._views[v].size),
                        interp_type=types.INTERP_CUBIC,
                        antialias=True,
                    )
                    for v in group
                ]
                # One sequence (F, H, W, C) per crop size: the color and blur operators run once
                # per group of views instead of once per view.
                x = fn.cast(fn.stack(*crops, axis=0), dtype=types.FLOAT)
                rgb = (x[:, :, :, 0], x[:, :, :, 1], x[:, :, :, 2])
                color = self._pil_color if self.color_ops == "pil" else self._affine_color
                rgb = color(rgb, *color_args)
                # cast rounds and saturates: the affine path's single clamp; exact for the PIL path.
                jittered = fn.reshape(fn.cast(fn.stack(*rgb, axis=3), dtype=types.UINT8), layout="FHWC")
                seq = pil_ops.box_blur(fn, jittered, taps_row, taps_col)
                if count > n_color + 2:
                    chosen = self._on_device(group_inputs[-1])
                    # For uint8, 255 - x == x ^ 255.
                    seq = seq ^ (chosen * (seq >= aug.solarize_threshold) * np.uint8(255))
                for frame, v in enumerate(group):
                    outputs[v] = fn.crop_mirror_normalize(
                        seq[frame],
                        mirror=per_view[v][2],
                        mean=norm_mean,
                        std=norm_std,
                        dtype=out_type,
                        output_layout="CHW",
                    )
            pipe.set_outputs(*outputs)
        pipe.build()
        return pipe

    def _on_device(self, node):
        """A CPU input as an operand of the crop's arithmetic (GPU data on a GPU)."""
        return node.gpu() if self.device_id is not None else node

    def _pil_color(self, rgb, alpha, contrast, saturation, hue_shift, hue_on, gray):
        fn = self._fn

        def mean(plane):
            return fn.reductions.mean(plane, axes=[1, 2], keep_dims=True)

        # ColorJitter's steps in their drawn order: up to three enhance steps before the hue
        # step and up to three after it (see jitter_slots), each 8-bit like PIL.
        for slot in range(6):
            if slot == 3:
                rgb = pil_ops.shift_hue(rgb, hue_shift, hue_on)
            rgb = pil_ops.enhance(rgb, alpha[slot], contrast[slot], saturation[slot], mean)
        luma = pil_ops.luma(*rgb)
        return tuple(c + gray * (luma - c) for c in rgb)

    def _affine_color(self, rgb, matrix, coefficient, truncations):
        fn = self._fn
        r, g, b = rgb
        # Contrast pivots on the crop's gray mean (PIL's ImageEnhance.Contrast).
        w = LUMA_WEIGHTS.tolist()
        gray_mean = fn.reductions.mean(r * w[0] + g * w[1] + b * w[2], axes=[1, 2], keep_dims=True)
        shift = coefficient * gray_mean - truncations
        return tuple(matrix[c][0] * r + matrix[c][1] * g + matrix[c][2] * b + shift for c in range(3))

    def _probe_decode(self, path: str) -> bool:
        """Whether this loader's decoder (mixed or cpu) decodes ``path`` on its own."""
        fn, types = self._fn, self._types
        on_gpu = self.device_id is not None
        pipe = self._Pipeline(batch_size=1, num_threads=1, device_id=self.device_id, prefetch_queue_depth=1)
        with pipe:
            name = fn.external_source(name="path", dtype=types.UINT8, ndim=1)
            image = fn.decoders.image(
                fn.io.file.read(name), device="mixed" if on_gpu else "cpu", output_type=types.RGB
            )
            pipe.set_outputs(image)
        pipe.build()
        try:
            pipe.feed_input("path", [np.frombuffer(path.encode("utf-8"), dtype=np.uint8)])
            pipe.run()
        except Exception:
            return False
        finally:
            del pipe
        return True

    # ----------------------------------------------------------------- iteration
    def _reset_pipeline(self) -> None:
        if self._pipe is None:
            self._pipe = self._build()
            return
        if self._pipe_dirty:
            # Finish what an abandoned epoch left in flight, then rewind the source.
            self._feed = None
            while True:
                try:
                    self._pipe.run()
                except StopIteration:
                    break
            self._pipe.reset()
        self._pipe_dirty = False

    def _recover(self, err: Exception, first_unconsumed: int) -> list[str]:
        """A batch in flight failed to decode: find the files, redirect them, rebuild."""
        feed = self._feed
        assert feed is not None
        in_flight = np.unique(feed.plan[first_unconsumed : max(feed.next_step, first_unconsumed + 1)])

        def pil_decodes(i: int) -> bool:
            try:
                inspect_image(self._path(i), mode="full")
            except UnusableImageError:
                return False
            return True

        bad = [i for i in in_flight.tolist() if not pil_decodes(i)]
        if not bad:
            # PIL decodes them all: ask this loader's own decoder, one file at a time (slow,
            # a pipeline per file, hence only when the cheap check finds nothing).
            bad = [i for i in in_flight.tolist() if not self._probe_decode(self._path(i))]
        if not bad:
            raise RuntimeError(
                f"the DALI pipeline failed on a batch whose files each decode on their own: {err}"
            ) from err
        if self._bad.sum() + len(bad) >= self.dataset_size:
            raise RuntimeError(f"no image under {self.root} decodes any more") from err
        self._bad[bad] = True
        good = np.flatnonzero(~self._bad)
        # Next usable index at or after i, wrapping around.
        nxt = np.searchsorted(good, np.arange(self.dataset_size))
        self._redirect = good[nxt % len(good)]
        logger.warning(
            "DALI failed to decode %d file(s) that passed the folder check (%s); they are replaced "
            "by the next usable image from now on",
            len(bad),
            ", ".join(self._path(i) for i in bad[:3]),
        )
        # A pipeline that raised is no longer valid.
        self._pipe = None
        self._pipe = self._build()
        plan = feed.plan.copy()
        replaced = np.isin(plan, bad)
        plan[first_unconsumed:] = self._redirect[plan[first_unconsumed:]]
        self._feed = _Feed(feed.epoch, plan, first_unconsumed)
        return [self._path(i) for i in feed.plan[first_unconsumed:][replaced[first_unconsumed:]]]

    def _to_batch(self, outputs: tuple, indices: np.ndarray) -> MultiCropBatch:
        B = self.batch_size
        staging = torch.float16 if self.dtype in (torch.float16, torch.bfloat16) else torch.float32
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        g, loc = self.augment.global_crop_size, self.augment.local_crop_size
        num_local = len(outputs) - 2
        global_crops = torch.empty((2 * B, 3, g, g), dtype=staging, device=self.device)
        local_crops = (
            torch.empty((num_local * B, 3, loc, loc), dtype=staging, device=self.device)
            if num_local
            else None
        )
        for v, out in enumerate(outputs):
            target = global_crops[v * B : (v + 1) * B] if v < 2 else local_crops[(v - 2) * B : (v - 1) * B]
            self._feed_ndarray(out.as_tensor(), target, cuda_stream=stream)
        if staging != self.dtype:
            global_crops = global_crops.to(self.dtype)
            local_crops = None if local_crops is None else local_crops.to(self.dtype)
        return MultiCropBatch(global_crops, local_crops, torch.from_numpy(indices.astype(np.int64)))

    def iter_from(self, start_batch: int) -> Iterator[MultiCropBatch]:
        # A step's augmentation depends on its position only, so the skipped ones are not read.
        self._reset_pipeline()
        epoch = self.epoch
        plan = self._epoch_plan(epoch)
        self._feed = _Feed(epoch, plan, start_batch)
        # Slots of files already known to fail are redirected by the plan; count them too.
        unread = self.epoch_indices(epoch).numpy()[start_batch * self.batch_size :]
        failed = [self._path(int(i)) for i in unread if self._bad[i]]
        consumed = start_batch
        self._pipe_dirty = True
        recoveries = 0
        try:
            while consumed < len(plan):
                stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
                try:
                    outputs = self._pipe.run(stream) if stream is not None else self._pipe.run()
                except StopIteration as err:
                    raise RuntimeError(
                        f"DALI ended epoch {epoch} after {consumed} of {len(plan)} steps"
                    ) from err
                except Exception as err:
                    recoveries += 1
                    if recoveries > self.dataset_size:
                        raise
                    failed += self._recover(err, consumed)
                    continue
                batch = self._to_batch(outputs, self._feed.plan[consumed])
                consumed += 1
                yield batch
        finally:  # also when the consumer stops early (--max_steps): the report is still owed
            log_skipped(epoch, self.root, len(self.rejected), failed)

    def close(self) -> None:
        self._pipe = None
        self._feed = None


@dataclass
class _Feed:
    epoch: int
    plan: np.ndarray  # (steps, batch_size) dataset indices
    next_step: int
