"""Patch-mask generators for masked image modelling (BEiT block-wise, MAE random,
and the mixture BootMAE's released training recipe used).

Every generator returns a ``[h, w]`` boolean ``np.ndarray`` with True = masked,
and every mask it returns has exactly the requested number of masked cells, so
masks of one batch can be stacked and the visible tokens gathered into a dense
tensor without padding.

Randomness
----------
Masks are drawn inside DataLoader workers. A random generator created in the
main process would be copied into every (forked) worker and all workers would
then produce the same masks. So, unless an explicit ``rng`` is given, a
generator creates its own streams lazily, on its first call in each process,
seeded from the DataLoader worker seed (``torch.utils.data.get_worker_info().seed``),
or from ``torch.initial_seed()`` in the main process:

* the block-wise stage draws from a ``random.Random`` with that seed, in the
  release's order of calls. torch seeds Python's ``random`` of each worker with
  the same number, and the release's workers draw their masks (and nothing
  else) from it, so a worker here places the same blocks as the release's
  worker of the same seed;
* the random top-up, the swaps and the MAE masks draw from a
  ``numpy.random.Generator`` with that seed.

Consequences:

* ``torch.manual_seed(s)`` before building the DataLoader makes the masks
  reproducible (same seed + same worker id => same masks);
* different workers, and fresh workers of later epochs, get different masks;
* two mask generators in the same process share the same seed, hence the same
  stream; use one generator per dataset (the normal case);
* without torch installed, the seed comes from fresh OS entropy.

An explicit ``rng`` (constructor or call argument) is meant for tests and
analysis, since in forked workers it would be duplicated. It is a
``numpy.random.Generator`` (the block stage then uses a ``random.Random`` seeded
from one draw of it) or a ``random.Random`` (the block stage draws from it
directly, so for the same state the block stage gives the release's mask; the
numpy stages use a Generator seeded from it afterwards).
"""

import math
import os
import random
from collections import deque

import numpy as np

MASK_TYPES = ("block", "random", "release")


def _grid_shape(input_size):
    if isinstance(input_size, (tuple, list)):
        if len(input_size) != 2:
            raise ValueError(f"input_size must be an int or an (h, w) pair, got {input_size!r}")
        height, width = int(input_size[0]), int(input_size[1])
    else:
        height = width = int(input_size)
    if height <= 0 or width <= 0:
        raise ValueError(f"input_size must be positive, got {input_size!r}")
    return height, width


def _process_seed():
    try:
        import torch
        from torch.utils.data import get_worker_info
    except ImportError:
        return None
    info = get_worker_info()
    if info is not None:
        return info.seed
    return torch.initial_seed()


class _RngSource:
    """Hands out the explicit rng if one was given, otherwise streams that are
    (re)created whenever the process or its seed changes: once per worker, and in
    the main process after every ``torch.manual_seed`` (the training loop reseeds
    each epoch, so a resumed run draws the same masks as an uninterrupted one).

    ``get(rng, random.Random)`` gives the stream of the block stage,
    ``get(rng, np.random.Generator)`` the one of the other stages; an explicit rng
    of the other kind is converted by one draw from it."""

    def __init__(self, rng=None):
        self._fixed = _check_rng(rng)
        self._key = None
        self._lazy = {}

    def get(self, rng, kind):
        rng = _check_rng(rng) if rng is not None else self._fixed
        if rng is None:
            seed = _process_seed()
            key = (os.getpid(), seed)
            if self._key != key:
                self._lazy = {random.Random: random.Random(seed), np.random.Generator: np.random.default_rng(seed)}
                self._key = key
            return self._lazy[kind]
        if isinstance(rng, kind):
            return rng
        if kind is random.Random:
            return random.Random(int(rng.integers(2 ** 63)))
        return np.random.default_rng(rng.getrandbits(64))


def _check_rng(rng):
    if rng is not None and not isinstance(rng, (np.random.Generator, random.Random)):
        raise TypeError(f"rng must be a numpy.random.Generator or a random.Random, got {type(rng).__name__}")
    return rng


def _top_up(flat_mask, target, rng):
    """Mask uniformly chosen visible cells of ``flat_mask`` (in place) until
    exactly ``target`` cells are masked."""
    missing = target - int(flat_mask.sum())
    if missing > 0:
        visible = np.flatnonzero(~flat_mask)
        flat_mask[rng.choice(visible, size=missing, replace=False)] = True


# The release retries a placement until a rectangle adds something. Feasible settings need far fewer draws
# for one placement (most over 20,000 masks on 14x14 with blocks of 16..60: 232 for a budget of 120, 157 for
# 147, 1,267 for 195 of 196); this many only happens when no drawable rectangle can add what is missing,
# where the release's loop never ends.
MAX_PLACEMENT_ATTEMPTS = 100_000


class MaskingGenerator:
    """Block-wise masking as BootMAE's release ran it: rectangles of random area
    and aspect ratio are added until exactly ``num_masking_patches`` cells are
    masked.

    Each placement draws, in the release's order and with the release's calls on
    a ``random.Random``, an area uniform between ``min_num_patches`` and what may
    still be added, a log-uniform aspect ratio and, for a rectangle narrower and
    lower than the grid, its top and left corner; it is accepted when it adds at
    least one cell and no more than may still be added, and drawn again otherwise
    (BEiT's generator gives up after ten draws and can fall short of the budget;
    the release's never does). For the same ``random.Random`` state the mask is
    the release's.

    A budget whose placement draws ``MAX_PLACEMENT_ATTEMPTS`` rectangles without
    success raises ``ValueError``; the constructor draws one mask with a private
    stream so that settings that cannot be placed fail there.

    ``_place_one`` adds one rectangle and is the hook tests override to observe
    single placements.
    """

    def __init__(self, input_size, num_masking_patches, min_num_patches=16,
                 max_num_patches=None, min_aspect=0.3, max_aspect=None, rng=None):
        self.height, self.width = _grid_shape(input_size)
        self.num_patches = self.height * self.width
        self.num_masking_patches = int(num_masking_patches)
        if not 0 < self.num_masking_patches <= self.num_patches:
            raise ValueError(
                f"num_masking_patches {self.num_masking_patches} must be in 1..{self.num_patches} "
                f"for a {self.height}x{self.width} grid")
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = (self.num_masking_patches if max_num_patches is None
                                else int(max_num_patches))
        if self.min_num_patches > self.max_num_patches:
            raise ValueError(
                f"min_num_patches {self.min_num_patches} must not exceed max_num_patches "
                f"{self.max_num_patches}; lower the minimum or raise the maximum")
        if min_aspect <= 0:
            raise ValueError(f"min_aspect must be positive, got {min_aspect}")
        max_aspect = max_aspect if max_aspect is not None else 1.0 / min_aspect
        self.min_aspect = float(min_aspect)
        self.max_aspect = float(max_aspect)
        self._log_aspect = (math.log(self.min_aspect), math.log(self.max_aspect))
        self._rng = _RngSource(rng)
        self._generate(random.Random(0))

    def __repr__(self):
        return (f"{type(self).__name__}(grid={self.height}x{self.width}, "
                f"num_masking_patches={self.num_masking_patches}, "
                f"min_num_patches={self.min_num_patches}, max_num_patches={self.max_num_patches}, "
                f"aspect=[{self.min_aspect:.3f}, {self.max_aspect:.3f}])")

    def get_shape(self):
        return self.height, self.width

    def _place_one(self, mask, max_mask, prng):
        """Draw rectangles until one adds 1..max_mask cells; mask it and return
        how many cells it added."""
        # the release's draws, call for call, so that a random.Random state gives its masks
        uniform, randint = prng.uniform, prng.randint
        for _ in range(MAX_PLACEMENT_ATTEMPTS):
            area = uniform(self.min_num_patches, max_mask)
            aspect = math.exp(uniform(*self._log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            # strict inequalities as in the release: a rectangle never spans the grid
            if w >= self.width or h >= self.height:
                continue
            top = randint(0, self.height - h)
            left = randint(0, self.width - w)
            window = mask[top:top + h, left:left + w]
            added = h * w - int(window.sum())
            if 0 < added <= max_mask:
                window[...] = True
                return added
        raise ValueError(
            f"block-wise masking cannot reach its budget of {self.num_masking_patches} patches on the "
            f"{self.height}x{self.width} grid with blocks of {self.min_num_patches}..{self.max_num_patches} "
            f"patches (none of {MAX_PLACEMENT_ATTEMPTS} drawn blocks adds 1..{max_mask} more); lower "
            f"--min_mask_patches_per_block or the block budget (--num_mask_patches with --mask_type "
            f"release, --mask_num with block)")

    def _generate(self, prng):
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masking_patches:
            max_mask = min(self.num_masking_patches - count, self.max_num_patches)
            count += self._place_one(mask, max_mask, prng)
        return mask

    def __call__(self, rng=None):
        return self._generate(self._rng.get(rng, random.Random))


class RandomMaskingGenerator:
    """MAE masking: exactly ``num_masking_patches`` cells chosen uniformly."""

    def __init__(self, input_size, num_masking_patches, rng=None):
        self.height, self.width = _grid_shape(input_size)
        self.num_patches = self.height * self.width
        self.num_masking_patches = int(num_masking_patches)
        if not 0 <= self.num_masking_patches <= self.num_patches:
            raise ValueError(
                f"num_masking_patches {self.num_masking_patches} must be in 0..{self.num_patches} "
                f"for a {self.height}x{self.width} grid")
        self._rng = _RngSource(rng)

    def __repr__(self):
        return (f"{type(self).__name__}(grid={self.height}x{self.width}, "
                f"num_masking_patches={self.num_masking_patches})")

    def get_shape(self):
        return self.height, self.width

    def __call__(self, rng=None):
        rng = self._rng.get(rng, np.random.Generator)
        flat = np.zeros(self.num_patches, dtype=bool)
        flat[rng.choice(self.num_patches, size=self.num_masking_patches, replace=False)] = True
        return flat.reshape(self.height, self.width)


class ReleaseMaskingGenerator:
    """The masking of BootMAE's released training: a block-wise mask of exactly
    ``num_block_patches`` cells, topped up with uniformly chosen cells to exactly
    ``num_masking_patches``, then ``k`` in ``0..max_swap`` block-masked cells are
    swapped with visible ones (count unchanged).

    With ``num_block_patches == num_masking_patches`` and ``max_swap=0`` this is
    plain block-wise masking (the "block" type of the builder).
    """

    def __init__(self, input_size, num_masking_patches, num_block_patches, min_num_patches=16,
                 max_num_patches=60, min_aspect=0.3, max_aspect=None, max_swap=3, rng=None):
        self.block = MaskingGenerator(input_size, num_block_patches, min_num_patches=min_num_patches,
                                      max_num_patches=max_num_patches, min_aspect=min_aspect,
                                      max_aspect=max_aspect)
        self.height, self.width = self.block.get_shape()
        self.num_patches = self.height * self.width
        self.num_masking_patches = int(num_masking_patches)
        self.num_block_patches = self.block.num_masking_patches
        if not self.num_block_patches <= self.num_masking_patches < self.num_patches:
            raise ValueError(
                f"need num_block_patches {self.num_block_patches} <= num_masking_patches "
                f"{self.num_masking_patches} < {self.num_patches} patches")
        if max_swap < 0:
            raise ValueError(f"max_swap must be >= 0, got {max_swap}")
        self.max_swap = int(max_swap)
        self._rng = _RngSource(rng)

    def __repr__(self):
        return (f"{type(self).__name__}(grid={self.height}x{self.width}, "
                f"num_masking_patches={self.num_masking_patches}, "
                f"num_block_patches={self.num_block_patches}, "
                f"min_num_patches={self.block.min_num_patches}, "
                f"max_num_patches={self.block.max_num_patches}, "
                f"aspect=[{self.block.min_aspect:.3f}, {self.block.max_aspect:.3f}], "
                f"max_swap={self.max_swap})")

    def get_shape(self):
        return self.height, self.width

    def __call__(self, rng=None):
        block_flat = self.block._generate(self._rng.get(rng, random.Random)).reshape(-1)
        rng = self._rng.get(rng, np.random.Generator)
        flat = block_flat.copy()
        _top_up(flat, self.num_masking_patches, rng)
        if self.max_swap > 0:
            block_idx = np.flatnonzero(block_flat)
            visible_idx = np.flatnonzero(~flat)
            k = min(int(rng.integers(0, self.max_swap + 1)), block_idx.size, visible_idx.size)
            if k > 0:
                # both sets are taken from the pre-swap state so a cell that is
                # unmasked here cannot be picked again to be re-masked
                flat[rng.choice(block_idx, size=k, replace=False)] = False
                flat[rng.choice(visible_idx, size=k, replace=False)] = True
        return flat.reshape(self.height, self.width)


def build_masking_generator(mask_type, input_size, num_masking_patches, num_block_patches=None,
                            min_num_patches=16, max_num_patches=60, min_aspect=0.3, rng=None):
    """Validate the command-line settings and build the generator.

    ``input_size`` is the patch grid (image size / patch size), an int or (h, w).
    "block" masks are block-wise with exactly ``num_masking_patches`` cells (every
    generator gives every image of a batch the same count); "release" needs
    ``num_block_patches``.
    ``min_num_patches``/``max_num_patches``/``min_aspect`` are ignored by "random".
    """
    if mask_type not in MASK_TYPES:
        raise ValueError(f"unknown mask_type {mask_type!r}; use one of {', '.join(MASK_TYPES)}")
    height, width = _grid_shape(input_size)
    num_patches = height * width
    num_masking_patches = int(num_masking_patches)
    if num_masking_patches <= 0:
        raise ValueError(f"--mask_num {num_masking_patches} must be positive; "
                         f"pick a value in 1..{num_patches - 1}")
    if num_masking_patches >= num_patches:
        raise ValueError(
            f"--mask_num {num_masking_patches} must be below the number of patches {num_patches} "
            f"(input_size/patch_size squared, grid {height}x{width}); lower --mask_num")
    if mask_type == "random":
        return RandomMaskingGenerator((height, width), num_masking_patches, rng=rng)
    if max_num_patches is not None and min_num_patches > max_num_patches:
        raise ValueError(f"min_num_patches {min_num_patches} must not exceed max_num_patches "
                         f"{max_num_patches}; lower the minimum or raise the maximum")
    if mask_type == "block":
        return ReleaseMaskingGenerator((height, width), num_masking_patches, num_masking_patches,
                                       min_num_patches=min_num_patches,
                                       max_num_patches=max_num_patches, min_aspect=min_aspect,
                                       max_swap=0, rng=rng)
    if num_block_patches is None:
        raise ValueError("mask_type 'release' needs --num_mask_patches (the block budget), "
                         f"e.g. 120 with --mask_num {num_masking_patches} on a 14x14 grid")
    num_block_patches = int(num_block_patches)
    if num_block_patches > num_masking_patches:
        raise ValueError(f"--num_mask_patches (block budget) {num_block_patches} must not exceed "
                         f"--mask_num {num_masking_patches}; lower --num_mask_patches")
    if num_block_patches <= 0:
        raise ValueError(f"--num_mask_patches (block budget) {num_block_patches} must be positive")
    return ReleaseMaskingGenerator((height, width), num_masking_patches, num_block_patches,
                                   min_num_patches=min_num_patches, max_num_patches=max_num_patches,
                                   min_aspect=min_aspect, rng=rng)


def count_regions(mask2d):
    """Number of 4-connected regions of True cells."""
    mask = np.asarray(mask2d, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"count_regions expects a 2-D mask, got shape {mask.shape}")
    height, width = mask.shape
    seen = np.zeros_like(mask)
    regions = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        regions += 1
        seen[start] = True
        queue = deque([start])
        while queue:
            r, c = queue.popleft()
            for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= nr < height and 0 <= nc < width and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    queue.append((nr, nc))
    return regions
