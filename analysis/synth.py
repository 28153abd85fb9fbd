"""Procedural H&E-like slides with known ground truth, deterministic for a seed.

A slide is white glass with irregular tissue islands: pink stroma with fibre texture and
purple nuclei on two staggered jittered lattices. Colour follows Beer-Lambert with a
hematoxylin and an eosin absorbance per channel.

Two classes that differ in fine-scale morphology only. Every nucleus carries fine chromatin
cords: streaks read from a unit-Gaussian texture, which also roughen the nuclear border by a
zero-mean amount. Under the default cue (``SynthDesign.cue = "period"``) normal nuclei's cords
have a period of 1.5-2.2 µm; in *lesion* regions (ground-truth mask at ``MASK_L0_PER_PX``) a
share ``morphology_strength`` (0..1) of the nuclei carry finer cords, 1.0-1.25 µm. The
other cue, ``"alignment"``, keeps one period and turns lesion cords along the nucleus's long
axis instead (a relation a randomly initialised encoder does not resolve).

Nucleus size, shape, density, stain, and the texture's per-pixel values are drawn from the same
distributions in both classes (texture clipped symmetrically, so zero-mean in density after
clipping): the classes differ in how the same values are arranged. A finer-frayed border leaves
5x nuclear pixels a trace darker (+0.002 red OD), so nuclei with the finer cords carry
``fine_cord_trim`` (0.4%) less density, which balances it. At 20x (0.5 µm/px) both periods are
resolved (2-4.4 pixels) and their difference is plain to measure
(``analysis.synthcheck.cord_fineness``); at 10x the lesion cords fall past the sampling limit
while normal ones only just survive; a 4x area-average (5x, 2 µm/px) leaves nothing a
first-order colour or optical-density statistic separates.

Everything is a function of level-0 coordinates (hashed lattices, periodic texture tiles,
smooth coarse fields), so any region renders on its own: slides stream strip by strip.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from analysis.tiffio import PyramidInfo, write_pyramidal_tiff

MASK_L0_PER_PX = 16  # level-0 pixels per pixel of the coarse fields and ground-truth masks
TEXTURE_PX = 512  # side of the periodic texture tiles
BLOCK_PX = 1024  # strips render in column blocks of this width (cache-sized work arrays)

# Beer-Lambert absorbance (natural log) per unit stain, (R, G, B)
HEMATOXYLIN_OD = np.log(10) * np.array([0.50, 0.70, 0.26], dtype=np.float32)
EOSIN_OD = np.log(10) * np.array([0.03, 0.27, 0.13], dtype=np.float32)
GLASS_RGB = np.array([242.0, 241.0, 244.0], dtype=np.float32)


@dataclass(frozen=True)
class SynthDesign:
    """Physical design of the synthetic tissue (µm); shared by both classes unless noted."""

    cell_um: float = 12.0  # spacing of each of the two nucleus lattices
    nucleus_radius_um: tuple[float, float] = (3.5, 4.8)  # semi-major axis range
    nucleus_aspect: tuple[float, float] = (0.6, 0.95)  # minor / major axis
    nucleus_density: float = 0.5  # mean chance a lattice cell in tissue holds a nucleus
    speckle_period_um: tuple[float, float] = (1.5, 2.2)  # fine chromatin cords, normal nuclei
    speckle_amplitude: float = 0.35  # fine chromatin std relative to nuclear density
    cord_angle_deg: float = 20.0  # cords: wave vectors within this of the cord normal
    lesion_alignment: float = 1.0  # lesion cords' alignment with the nucleus axis at strength 1
    cue: str = "period"  # "period": lesion cords are finer; "alignment": they follow the axis
    lesion_period_um: tuple[float, float] = (1.0, 1.25)  # lesion cords under cue "period"
    fine_cord_trim: float = 0.004  # density off nuclei with the finer cords (5x balance)
    membrane_fray: float = 0.25  # border roughness (fine chromatin moves the edge), both classes
    chromatin_period_um: tuple[float, float] = (3.0, 6.0)  # coarse chromatin, both classes
    fibre_period_um: tuple[float, float] = (4.0, 14.0)  # stroma fibres, both classes
    fibre_base: float = 0.7  # stroma eosin = base + contrast * fibre (0..1) + grain term
    fibre_contrast: float = 0.3
    grain_period_um: tuple[float, float] = (1.0, 2.5)  # fine stroma grain, both classes
    grain_contrast: float = 0.12
    tissue_fraction: float = 0.45  # share of the slide covered by tissue


@dataclass
class SynthSlide:
    """A written synthetic slide and its ground truth."""

    path: Path
    label: int
    seed: int
    width: int
    height: int
    mpp: float
    lesion_mask: np.ndarray  # (H/16, W/16) bool, lesion (label 1 only)
    tissue_mask: np.ndarray  # (H/16, W/16) bool
    mask_l0_per_px: int = MASK_L0_PER_PX
    bytes: int = 0
    pyramid: PyramidInfo | None = field(default=None, repr=False)

    @property
    def mask_path(self) -> Path:
        return mask_path_for(self.path)

    @property
    def lesion_area_fraction(self) -> float:
        """Lesion area as a fraction of tissue area."""
        tissue = int(self.tissue_mask.sum())
        return float(self.lesion_mask.sum() / tissue) if tissue else 0.0


def mask_path_for(slide_path: str | Path) -> Path:
    """Where the lesion mask of a synthetic slide lives: ``<slide>.mask.png``."""
    path = Path(slide_path)
    return path.with_name(path.name + ".mask.png")


# -- public API ----------------------------------------------------------------------------------


def write_synthetic_slide(
    path: str | Path,
    *,
    width: int,
    height: int,
    seed: int,
    label: int = 0,
    mpp: float = 0.5,
    quality: int = 90,
    lesion_fraction: float = 0.3,
    morphology_strength: float = 1.0,
    design: SynthDesign | None = None,
    workers: int = 2,
) -> SynthSlide:
    """Write a synthetic 20x (at mpp 0.5) Aperio-style slide and its lesion mask PNG."""
    if label not in (0, 1):
        raise ValueError(f"label must be 0 or 1, got {label}")
    if not 0.0 <= lesion_fraction <= 1.0:
        raise ValueError(f"lesion_fraction must be in [0, 1], got {lesion_fraction}")
    path = Path(path)
    model = SlideModel(
        width,
        height,
        seed=seed,
        label=label,
        mpp=mpp,
        lesion_fraction=lesion_fraction,
        morphology_strength=morphology_strength,
        design=design or SynthDesign(),
    )
    info = write_pyramidal_tiff(
        path,
        width,
        height,
        model.render_rows,
        mpp=mpp,
        app_mag=round(10.0 / mpp, 3),
        quality=quality,
        associated={"label": model.label_image(), "macro": model.macro_image()},
        properties={"Synthetic": f"seed {seed} label {label}"},
        workers=workers,
    )
    Image.fromarray(model.lesion_mask.astype(np.uint8) * 255).save(mask_path_for(path))
    return SynthSlide(
        path=path,
        label=label,
        seed=seed,
        width=width,
        height=height,
        mpp=mpp,
        lesion_mask=model.lesion_mask,
        tissue_mask=model.tissue_mask,
        bytes=info.bytes,
        pyramid=info,
    )


def write_cohort(
    out_dir: str | Path,
    *,
    n_patients: int,
    slides_per_patient: int,
    width: int,
    height: int,
    seed: int,
    positive_fraction: float = 0.5,
    lesion_fraction: float = 0.3,
    morphology_strength: float = 1.0,
    quality: int = 90,
    mpp: float = 0.5,
) -> Path:
    """Write ``n_patients`` x ``slides_per_patient`` slides and ``labels.csv``; returns its path.

    Patients' labels are drawn once (``round(n_patients * positive_fraction)`` positives); all
    slides of a patient share it. Slide files are ``<slide_id>.svs`` beside ``labels.csv``.
    """
    if n_patients < 1 or slides_per_patient < 1:
        raise ValueError("a cohort needs at least one patient with at least one slide")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 7])
    n_pos = int(round(n_patients * positive_fraction))
    labels = np.zeros(n_patients, dtype=int)
    labels[rng.permutation(n_patients)[:n_pos]] = 1
    rows = []
    for p in range(n_patients):
        patient_id = f"P{p + 1:03d}"
        for s in range(slides_per_patient):
            slide_id = f"{patient_id}-S{s + 1}"
            write_synthetic_slide(
                out_dir / f"{slide_id}.svs",
                width=width,
                height=height,
                seed=_slide_seed(seed, p, s),
                label=int(labels[p]),
                mpp=mpp,
                quality=quality,
                lesion_fraction=lesion_fraction,
                morphology_strength=morphology_strength,
            )
            rows.append((patient_id, slide_id, int(labels[p])))
    labels_path = out_dir / "labels.csv"
    with open(labels_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["patient_id", "slide_id", "label"])
        writer.writerows(rows)
    return labels_path


def _slide_seed(cohort_seed: int, patient: int, slide: int) -> int:
    return int(
        _hash64(np.array([cohort_seed]), np.array([patient]), np.array([slide]), 99)[0] >> 33
    )


# -- the slide model -----------------------------------------------------------------------------


class SlideModel:
    """All of a synthetic slide's content as functions of level-0 coordinates."""

    def __init__(
        self,
        width: int,
        height: int,
        *,
        seed: int,
        label: int,
        mpp: float,
        lesion_fraction: float,
        morphology_strength: float,
        design: SynthDesign,
    ) -> None:
        if width < 1 or height < 1:
            raise ValueError(f"slide size must be positive, got {width}x{height}")
        self.width, self.height, self.seed, self.label = width, height, seed, label
        self.mpp = mpp
        self.design = design
        self.strength = float(morphology_strength)
        self.cell_px = max(8, round(design.cell_um / mpp))
        self._coarse_fields(lesion_fraction)
        self.textures = _texture_tiles(seed, mpp, design)  # (T, T, 4)
        self.texture_offset = np.random.default_rng([seed, 3]).integers(0, TEXTURE_PX, 2)

    # -- coarse fields (one value per 16x16 level-0 pixels) -------------------------------------

    def _coarse_fields(self, lesion_fraction: float) -> None:
        ch, cw = -(-self.height // MASK_L0_PER_PX), -(-self.width // MASK_L0_PER_PX)
        rng = np.random.default_rng([self.seed, 1])
        island = max(min(self.width, self.height), 2000) / (2.5 * MASK_L0_PER_PX)
        tissue = _fbm((ch, cw), island, 4, rng) - _border_penalty(ch, cw)
        self.tissue_threshold = float(np.quantile(tissue, 1.0 - self.design.tissue_fraction))
        self.tissue_field = tissue.astype(np.float32)
        self.tissue_mask = tissue > self.tissue_threshold
        self.tissue_edge = _edge_width(tissue, self.tissue_threshold)

        lesion = _fbm((ch, cw), island / 1.5, 3, rng)
        if self.label == 1 and lesion_fraction > 0 and self.tissue_mask.any():
            cut = np.quantile(lesion[self.tissue_mask], 1.0 - lesion_fraction)
            self.lesion_mask = self.tissue_mask & (lesion > cut)
        else:
            self.lesion_mask = np.zeros((ch, cw), dtype=bool)
        density = self.design.nucleus_density + 0.15 * _fbm((ch, cw), island / 2, 2, rng)
        self.density = np.clip(density, 0.15, 0.85).astype(np.float32)
        self.eosin = (0.8 + 0.08 * _fbm((ch, cw), island / 2, 2, rng)).astype(np.float32)

    def _coarse_at(self, grid: np.ndarray, l0_y: np.ndarray, l0_x: np.ndarray) -> np.ndarray:
        """Nearest coarse value at level-0 points (clipped to the slide)."""
        r = np.clip(l0_y // MASK_L0_PER_PX, 0, grid.shape[0] - 1).astype(np.intp)
        c = np.clip(l0_x // MASK_L0_PER_PX, 0, grid.shape[1] - 1).astype(np.intp)
        return grid[r, c]

    def _upsample(self, grid: np.ndarray, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Bilinear (h, w) view of a coarse field over the level-0 block at (y0, x0)."""
        ry, r0 = _interp_matrix(y0, h, grid.shape[0])  # (h, kr)
        lo, hi, t, c0 = _interp_columns(x0, w, grid.shape[1])
        rows = ry @ grid[r0 : r0 + ry.shape[1], c0 : int(hi.max()) + c0 + 1]  # (h, kc)
        left, right = rows[:, lo], rows[:, hi]  # (h, w) each
        right -= left
        right *= t
        right += left
        return right

    def _has_tissue(self, y0: int, x0: int, h: int, w: int) -> bool:
        """Whether any pixel of the block can be tissue (bilinear values never exceed the max)."""
        m = MASK_L0_PER_PX
        r0, c0 = max(0, y0 // m - 1), max(0, x0 // m - 1)
        r1, c1 = (y0 + h) // m + 2, (x0 + w) // m + 2
        peak = self.tissue_field[r0:r1, c0:c1].max()
        return bool(peak > self.tissue_threshold - 0.5 * self.tissue_edge)

    # -- rendering ----------------------------------------------------------------------------

    def render_rows(self, y0: int, rows: int) -> np.ndarray:
        """(rows, width, 3) uint8 of level-0 rows [y0, y0 + rows)."""
        blocks = [
            self.render(y0, x0, rows, min(BLOCK_PX, self.width - x0))
            for x0 in range(0, self.width, BLOCK_PX)
        ]
        return np.concatenate(blocks, axis=1)

    def render(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """(h, w, 3) uint8 of the level-0 block at (y0, x0)."""
        if not self._has_tissue(y0, x0, h, w):
            return np.broadcast_to(GLASS_RGB.astype(np.uint8), (h, w, 3)).copy()
        alpha = self._tissue_alpha(y0, x0, h, w)  # (h, w)
        tex = self._textures(y0, x0, h, w)  # (h, w, 3): cords, chromatin, stroma
        nucleus = self._nuclei(y0, x0, h, w)  # (h, w) hematoxylin, fine chromatin included
        hema = alpha * (nucleus * (1.0 + 0.18 * tex[..., 1]) + 0.06)
        np.maximum(hema, 0.0, out=hema)
        eosin = alpha * self._upsample(self.eosin, y0, x0, h, w) * tex[..., 2]
        return _beer_lambert(hema, eosin)

    def _tissue_alpha(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        field_ = self._upsample(self.tissue_field, y0, x0, h, w)
        alpha = (field_ - self.tissue_threshold) / self.tissue_edge + 0.5
        return np.clip(alpha, 0.0, 1.0, out=alpha).astype(np.float32, copy=False)

    def _textures(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        oy, ox = self.texture_offset
        rows = (np.arange(y0, y0 + h) + oy) % TEXTURE_PX
        cols = (np.arange(x0, x0 + w) + ox) % TEXTURE_PX
        return self.textures.take(rows, axis=0).take(cols, axis=1)

    def _nuclei(self, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Nuclear hematoxylin density, (h, w), over both lattices."""
        half = self.cell_px // 2
        return np.maximum(self._lattice(0, 0, y0, x0, h, w), self._lattice(1, half, y0, x0, h, w))

    def _lattice(self, lattice: int, offset: int, y0: int, x0: int, h: int, w: int) -> np.ndarray:
        """Render one jittered lattice of nuclei, each confined to its cell.

        Fine chromatin is a cord texture (unit-Gaussian streaks) read nearest-pixel in a frame
        turned to each nucleus's own cord direction, at a per-nucleus place, so both classes draw
        every pixel from the same unit-Gaussian marginal. Under the "period" cue a lesion
        nucleus reads the finer cord tile (channel 3) with chance ``morphology_strength``, the
        others the normal tile (channel 0), all in random directions; under "alignment" lesion
        cords turn towards the nucleus's long axis instead. The same value
        moves the border by a zero-mean amount (fine membrane detail, both classes).
        """
        d = self.design
        c = self.cell_px
        r0, r1 = (y0 + offset) // c, (y0 + h - 1 + offset) // c + 1
        c0, c1 = (x0 + offset) // c, (x0 + w - 1 + offset) // c + 1
        cell_r, cell_c = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1), indexing="ij")
        p = self._nucleus_params(lattice, offset, cell_r, cell_c)  # each (nr, nc)
        local = np.arange(c, dtype=np.float32) + 0.5
        dy = local[None, :, None, None] - p["cy"][:, None, :, None]  # (nr, C, nc, 1)
        dx = local[None, None, None, :] - p["cx"][:, None, :, None]  # (nr, 1, nc, C)
        cos, sin = p["cos"][:, None, :, None], p["sin"][:, None, :, None]
        u = dx * cos + dy * sin  # (nr, C, nc, C)
        v = dy * cos - dx * sin
        d2 = u * u * p["inv_a2"][:, None, :, None] + v * v * p["inv_b2"][:, None, :, None]
        del u, v
        cos, sin = p["cord_cos"][:, None, :, None], p["cord_sin"][:, None, :, None]
        iu = np.floor(dx * cos + dy * sin).astype(np.intp)
        iv = np.floor(dy * cos - dx * sin).astype(np.intp)
        rows = (iv + p["off_y"][:, None, :, None]) % TEXTURE_PX
        cols = (iu + p["off_x"][:, None, :, None]) % TEXTURE_PX
        del iu, iv
        fine = self.textures[rows, cols, p["channel"][:, None, :, None]]
        del rows, cols
        edge = 1.0 - d2 + d.membrane_fray * fine
        cover = np.clip(edge * p["sharp"][:, None, :, None], 0.0, 1.0)
        # symmetric limits keep the fine chromatin zero-mean in density after clipping
        grain = np.clip(d.speckle_amplitude * fine, -0.9, 0.9)
        grain += 1.0
        density = cover * grain * p["dark"][:, None, :, None]
        nr, nc = cell_r.shape
        ys = y0 + offset - r0 * c
        xs = x0 + offset - c0 * c
        return density.reshape(nr * c, nc * c)[ys : ys + h, xs : xs + w]

    def _nucleus_params(
        self, lattice: int, offset: int, cell_r: np.ndarray, cell_c: np.ndarray
    ) -> dict[str, np.ndarray]:
        d = self.design
        c = self.cell_px
        u = _uniforms(self.seed, lattice, cell_r, cell_c, 11)  # (11, nr, nc)
        center_y = cell_r * c - offset + c // 2
        center_x = cell_c * c - offset + c // 2
        in_tissue = self._coarse_at(self.tissue_field, center_y, center_x) > self.tissue_threshold
        present = in_tissue & (u[0] < self._coarse_at(self.density, center_y, center_x))
        lesion = self._coarse_at(self.lesion_mask, center_y, center_x)
        r_lo, r_hi = (r / self.mpp for r in d.nucleus_radius_um)
        a = r_lo + (r_hi - r_lo) * u[1]
        b = a * (d.nucleus_aspect[0] + (d.nucleus_aspect[1] - d.nucleus_aspect[0]) * u[2])
        theta = np.pi * u[3]
        # cords: a random turn from the long axis (shrunk towards 0 in lesion nuclei under
        # the "alignment" cue) and which cord tile the nucleus reads
        if d.cue == "period":  # a share of lesion nuclei carry the finer cords
            aligned = 0.0
            channel = np.where(lesion & (u[10] < self.strength), 3, 0)
        elif d.cue == "alignment":  # lesion cords turn towards the long axis
            aligned = min(max(d.lesion_alignment * self.strength, 0.0), 1.0)
            channel = np.zeros(np.shape(lesion), dtype=np.intp)
        else:
            raise ValueError(f"unknown cue {d.cue!r}: expected 'period' or 'alignment'")
        turn = np.pi * (u[9] - 0.5) * np.where(lesion, 1.0 - aligned, 1.0)
        margin = min(r_hi + 1.0, c / 2)
        f32 = np.float32
        return {
            "cy": (margin + (c - 2 * margin) * u[4]).astype(f32),
            "cx": (margin + (c - 2 * margin) * u[5]).astype(f32),
            "cos": np.cos(theta).astype(f32),
            "sin": np.sin(theta).astype(f32),
            "inv_a2": np.where(present, 1.0 / (a * a), 1e6).astype(f32),
            "inv_b2": np.where(present, 1.0 / (b * b), 1e6).astype(f32),
            "sharp": (0.5 * b).astype(f32),  # edge about one pixel wide
            "dark": (
                (0.85 + 0.3 * u[6]) * np.where(channel == 3, 1.0 - d.fine_cord_trim, 1.0)
            ).astype(f32),
            "cord_cos": np.cos(theta + turn).astype(f32),
            "cord_sin": np.sin(theta + turn).astype(f32),
            "off_y": (u[7] * TEXTURE_PX).astype(np.intp),
            "off_x": (u[8] * TEXTURE_PX).astype(np.intp),
            "channel": channel.astype(np.intp),
        }

    # -- associated images --------------------------------------------------------------------

    def label_image(self) -> Image.Image:
        """A slide label: text and a barcode-like pattern, both deterministic."""
        image = Image.new("RGB", (400, 400), (250, 250, 245))
        draw = ImageDraw.Draw(image)
        draw.text((24, 24), "LowMag synthetic", fill=(0, 0, 0))
        draw.text((24, 56), f"seed {self.seed}", fill=(0, 0, 0))
        draw.text((24, 88), f"label {self.label}", fill=(0, 0, 0))
        bars = _uniforms(self.seed, 9, np.arange(48), np.zeros(48, dtype=np.int64), 1)[0]
        x = 24
        for value in bars:
            bar = 2 + int(value * 5)
            if value > 0.4:
                draw.rectangle([x, 200, x + bar - 1, 360], fill=(0, 0, 0))
            x += bar + 1
        return image

    def macro_image(self) -> Image.Image:
        """An overview photo of the glass: label on the left, tissue in average H&E colour."""
        height = 300
        scale = height / self.height
        width = max(1, round(self.width * scale))
        tissue = Image.fromarray(self.tissue_mask.astype(np.uint8) * 255).resize(
            (width, height), Image.Resampling.BILINEAR
        )
        weight = np.asarray(tissue, dtype=np.float32)[..., None] / 255.0  # (H, W, 1)
        stain = np.array([205, 140, 185], dtype=np.float32)
        glass = np.array([232, 232, 236], dtype=np.float32)
        body = (glass * (1 - weight) + stain * weight).astype(np.uint8)
        label = np.asarray(self.label_image().resize((height, height)))
        return Image.fromarray(np.concatenate([label, body], axis=1))


# -- colour --------------------------------------------------------------------------------------


def _beer_lambert(hema: np.ndarray, eosin: np.ndarray) -> np.ndarray:
    """(h, w) stain densities -> (h, w, 3) uint8 transmitted light on glass."""
    out = np.empty((*hema.shape, 3), dtype=np.uint8)
    for ch in range(3):
        od = hema * HEMATOXYLIN_OD[ch] + eosin * EOSIN_OD[ch]
        np.negative(od, out=od)
        np.exp(od, out=od)
        od *= GLASS_RGB[ch]
        od += 0.5
        out[..., ch] = od  # in [0.5, 242.5]: the cast truncates to the rounded value
    return out


# -- noise ---------------------------------------------------------------------------------------


def _hash64(a: np.ndarray | int, b: np.ndarray | int, c: np.ndarray | int, k: int) -> np.ndarray:
    """A splitmix64-style hash of integer coordinates, vectorised; uint64."""
    with np.errstate(over="ignore"):
        h = np.asarray(a, dtype=np.int64).astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        h ^= np.asarray(b, dtype=np.int64).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
        h ^= np.asarray(c, dtype=np.int64).astype(np.uint64) * np.uint64(0x165667B19E3779F9)
        h += np.uint64((k * 0x27D4EB2F165667C5) % 2**64)
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h


def _uniforms(seed: int, lattice: int, rows: np.ndarray, cols: np.ndarray, n: int) -> np.ndarray:
    """(n, *rows.shape) uniforms in [0, 1) fixed by (seed, lattice, row, col)."""
    base = _hash64(rows, cols, np.full_like(np.asarray(rows), seed), lattice)
    out = np.empty((n, *np.shape(rows)), dtype=np.float64)
    for i in range(n):
        h = _hash64(base, i, 0, 1 + i)
        out[i] = (h >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return out


def _bspline_matrix(n: int, lattice: float, phase: float, size: int) -> np.ndarray:
    """(n, size) cubic B-spline weights sampling a lattice of spacing ``lattice`` at 0..n-1."""
    u = np.arange(n) / lattice + phase + 1.0
    j = np.floor(u).astype(int)
    t = u - j
    weights = [
        (1 - t) ** 3 / 6,
        (3 * t**3 - 6 * t**2 + 4) / 6,
        (-3 * t**3 + 3 * t**2 + 3 * t + 1) / 6,
        t**3 / 6,
    ]
    m = np.zeros((n, size))
    for k, wk in enumerate(weights):
        m[np.arange(n), j - 1 + k] = wk
    return m


def _value_noise(shape: tuple[int, int], lattice: float, rng: np.random.Generator) -> np.ndarray:
    """Smooth zero-mean unit-std noise with feature size ``lattice`` (in grid pixels)."""
    lattice = max(lattice, 1.0)
    h, w = shape
    gh, gw = int(h / lattice) + 5, int(w / lattice) + 5
    grid = rng.standard_normal((gh, gw))
    phase_y, phase_x = rng.random(2)
    out = (
        _bspline_matrix(h, lattice, phase_y, gh) @ grid @ _bspline_matrix(w, lattice, phase_x, gw).T
    )
    return (out - out.mean()) / (out.std() + 1e-9)


def _fbm(
    shape: tuple[int, int], lattice: float, octaves: int, rng: np.random.Generator
) -> np.ndarray:
    """Fractal sum of value noise: octaves 2.2x finer, half the amplitude each."""
    total = np.zeros(shape)
    for octave in range(octaves):
        total += 0.5**octave * _value_noise(shape, lattice / 2.2**octave, rng)
    return (total - total.mean()) / (total.std() + 1e-9)


def _border_penalty(h: int, w: int) -> np.ndarray:
    """Pushes tissue away from the slide's edges (coarse grid)."""
    ry = np.minimum(np.arange(h), np.arange(h)[::-1]) / max(h, 1)
    rx = np.minimum(np.arange(w), np.arange(w)[::-1]) / max(w, 1)
    near = np.minimum(ry[:, None], rx[None, :])  # distance to the closest edge, fraction
    return 4.0 * np.clip(1.0 - near / 0.08, 0.0, 1.0)


def _edge_width(field_: np.ndarray, threshold: float) -> float:
    """Field change over ~3 level-0 pixels at the tissue border: a crisp, antialiased edge."""
    gy, gx = np.gradient(field_)
    grad = np.hypot(gy, gx)
    near = np.abs(field_ - threshold) < 0.1
    per_coarse_px = float(np.median(grad[near])) if near.any() else float(np.median(grad))
    return max(per_coarse_px * 3.0 / MASK_L0_PER_PX, 1e-6)


def _interp_columns(
    start: int, n: int, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Bilinear taps (lo, hi relative to the first coarse cell, weight of hi, first cell)."""
    pos = np.clip((np.arange(start, start + n) + 0.5) / MASK_L0_PER_PX - 0.5, 0, size - 1)
    lo = np.floor(pos).astype(np.intp)
    hi = np.minimum(lo + 1, size - 1)
    first = int(lo.min())
    return lo - first, hi - first, (pos - lo).astype(np.float32), first


def _interp_matrix(start: int, n: int, size: int) -> tuple[np.ndarray, int]:
    """(n, k) bilinear weights from coarse cells [first, first + k) to level-0 [start, start+n)."""
    pos = (np.arange(start, start + n) + 0.5) / MASK_L0_PER_PX - 0.5
    pos = np.clip(pos, 0, size - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, size - 1)
    t = (pos - lo).astype(np.float32)
    first = int(lo.min())
    k = int(hi.max()) - first + 1
    m = np.zeros((n, k), dtype=np.float32)
    m[np.arange(n), lo - first] += 1 - t
    m[np.arange(n), hi - first] += t
    return m, first


def _texture_tiles(seed: int, mpp: float, design: SynthDesign) -> np.ndarray:
    """(T, T, 4) float32 periodic textures: cords, chromatin, stroma, lesion cords.

    The cord tiles are unit-variance band-limited noise keeping only wave vectors within
    ``cord_angle_deg`` of the row axis: streaks along the columns; the lesion tile (drawn last,
    so the others do not depend on it) has the finer ``lesion_period_um``.
    """
    rng = np.random.default_rng([seed, 2])
    n = TEXTURE_PX
    fy = np.fft.fftfreq(n)[:, None]
    fx = np.fft.rfftfreq(n)[None, :]
    radius = np.hypot(fy, fx)  # cycles per pixel
    angle = np.arctan2(fy, fx)

    def band(period_um: tuple[float, float], extra: np.ndarray | float = 1.0) -> np.ndarray:
        lo, hi = mpp / period_um[1], mpp / period_um[0]  # cycles per pixel
        spectrum = np.fft.rfft2(rng.standard_normal((n, n)))
        out = np.fft.irfft2(spectrum * ((radius >= lo) & (radius <= hi)) * extra, s=(n, n))
        return (out - out.mean()) / (out.std() + 1e-9)

    chromatin = band(design.chromatin_period_um)
    grain = band(design.grain_period_um)
    fibre = _wavy_fibres(band, angle, rng, mpp, design)
    stroma = design.fibre_base + design.fibre_contrast * fibre + design.grain_contrast * grain
    along_rows = np.abs(np.sin(angle)) >= np.cos(np.deg2rad(design.cord_angle_deg))
    cords = band(design.speckle_period_um, along_rows)
    fine = band(design.lesion_period_um, along_rows)
    return np.stack([cords, chromatin, stroma, fine], axis=-1).astype(np.float32)


def _wavy_fibres(
    band, angle: np.ndarray, rng: np.random.Generator, mpp: float, design
) -> np.ndarray:
    """Streaks along two directions, blended smoothly and bent by a slow periodic warp."""
    n = TEXTURE_PX
    base = rng.random() * np.pi
    streaks = []
    for direction in (base, base + 1.2):
        oriented = np.cos(angle - direction) ** 2 > np.cos(np.deg2rad(7)) ** 2
        streaks.append(band(design.fibre_period_um, oriented))
    blend = 1.0 / (1.0 + np.exp(-2.0 * band((80.0, 250.0))))
    mixed = blend * streaks[0] + (1.0 - blend) * streaks[1]
    bend_px = 4.0 / mpp
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    coords = [yy + bend_px * band((60.0, 200.0)), xx + bend_px * band((60.0, 200.0))]
    warped = ndimage.map_coordinates(mixed, coords, order=1, mode="grid-wrap")
    return 0.5 + 0.5 * np.tanh(1.5 * warped / (warped.std() + 1e-9))


def lesion_mask_from_png(slide_path: str | Path) -> np.ndarray:
    """The (H/16, W/16) bool lesion mask written beside a synthetic slide."""
    return np.asarray(Image.open(mask_path_for(slide_path))) > 127
