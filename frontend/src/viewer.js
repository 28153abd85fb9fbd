// The slide viewer: OpenSeadragon with the slide DZI, the AI heatmap as a second tiled image
// with the slide's exact geometry, a µm scale bar, and a background prefetch of the pyramid.
import OpenSeadragon from 'openseadragon';

const NICE_STEPS = [1, 2, 5];
const SCALEBAR_TARGET_PX = 120;
const PREFETCH_MAX_TILES = 1500; // a 5x slide's whole pyramid is a few hundred tiles
const PREFETCH_CONCURRENCY = 3;

export const timing = (window.__lowmag = window.__lowmag || {});

export function createViewer(element, slide) {
  const viewer = OpenSeadragon({
    element,
    tileSources: slide.dzi,
    drawer: 'canvas',
    showNavigationControl: false,
    showNavigator: true,
    navigatorPosition: 'BOTTOM_RIGHT',
    navigatorAutoFade: false,
    navigatorHeight: '110px',
    navigatorWidth: '150px',
    blendTime: 0,
    animationTime: 0.5,
    springStiffness: 9,
    imageLoaderLimit: 6,
    maxZoomPixelRatio: 2,
    minZoomImageRatio: 0.8,
    visibilityRatio: 0.3,
    zoomPerScroll: 1.5,
    gestureSettingsMouse: { clickToZoom: false, dblClickToZoom: false },
    keyboardNavEnabled: false,
  });
  pinImageCoordinatesToSlide(viewer);
  viewer.addHandler('tile-loaded', (event) => {
    if (timing.firstTileLoadedMs === undefined) timing.firstTileLoadedMs = performance.now();
    timing.tilesLoaded = (timing.tilesLoaded || 0) + 1;
    if (event.tiledImage !== viewer.world.getItemAt(0)) return;
    requestAnimationFrame(() => {
      if (timing.firstTilePaintMs === undefined) timing.firstTilePaintMs = performance.now();
    });
  });
  return viewer;
}

const IMAGE_CONVERSIONS = [
  'imageToViewportCoordinates',
  'imageToViewportRectangle',
  'imageToViewerElementCoordinates',
  'imageToWindowCoordinates',
  'imageToViewportZoom',
  'viewportToImageCoordinates',
  'viewportToImageRectangle',
  'viewerElementToImageCoordinates',
  'windowToImageCoordinates',
  'viewportToImageZoom',
];

/**
 * "Image coordinates" on this viewer always mean the slide's level-0 pixels (world item 0),
 * also once the heatmap is stacked on it. Annotation tools call the viewport's conversions,
 * which OpenSeadragon calls inaccurate (and logs an error for) as soon as a second image is open.
 */
function pinImageCoordinatesToSlide(viewer) {
  const viewport = () => viewer.viewport;
  viewer.addOnceHandler('open', () => {
    for (const name of IMAGE_CONVERSIONS) {
      const own = viewport()[name].bind(viewport());
      viewport()[name] = (...args) => {
        const slide = viewer.world.getItemAt(0);
        return slide && slide[name] ? slide[name](...args) : own(...args);
      };
    }
  });
}

export function slideImage(viewer) {
  return viewer.world.getItemAt(0);
}

export function whenOpen(viewer) {
  return new Promise((resolve, reject) => {
    if (viewer.world.getItemCount() > 0) return resolve(slideImage(viewer));
    viewer.addOnceHandler('open', () => resolve(slideImage(viewer)));
    viewer.addOnceHandler('open-failed', (event) => reject(new Error(event.message)));
  });
}

// ------------------------------------------------------------------ heatmap layer

export class HeatmapLayer {
  constructor(viewer, dziUrl, layer = 'score') {
    this.viewer = viewer;
    this.dziUrl = dziUrl;
    this.item = null;
    this.visible = false;
    this.opacity = 0.6;
    this.threshold = 0;
    this.layer = layer;
    this.pending = null;
  }

  _load() {
    const request = { threshold: this.threshold, layer: this.layer };
    this.pending = request;
    const url = `${this.dziUrl}?threshold=${this.threshold.toFixed(2)}&layer=${this.layer}`;
    this.viewer.addTiledImage({
      tileSource: url,
      index: 1,
      x: 0,
      width: 1,
      opacity: this.visible ? this.opacity : 0,
      success: (event) => {
        if (this.pending !== request) {
          this.viewer.world.removeItem(event.item);
          return;
        }
        if (this.item) this.viewer.world.removeItem(this.item);
        this.item = event.item;
        this.item.setOpacity(this.visible ? this.opacity : 0);
      },
    });
  }

  setVisible(visible) {
    this.visible = visible;
    if (visible && !this.item && !this.pending) this._load();
    this.item?.setOpacity(visible ? this.opacity : 0);
  }

  setOpacity(opacity) {
    this.opacity = opacity;
    if (this.visible) this.item?.setOpacity(opacity);
  }

  setThreshold(threshold) {
    if (Math.abs(threshold - this.threshold) < 1e-6) return;
    this.threshold = threshold;
    if (this.item || this.pending) this._load();
  }

  // 'evidence' (class evidence), 'score' (attention: where the model looked) or 'clusters'
  // (k-means clusters of the patch embeddings)
  setLayer(layer) {
    if (layer === this.layer) return;
    this.layer = layer;
    if (this.item || this.pending) this._load();
  }
}

// ------------------------------------------------------------------ scale bar

function niceLength(um) {
  const power = 10 ** Math.floor(Math.log10(um));
  let best = power;
  for (const step of NICE_STEPS) if (step * power <= um) best = step * power;
  return best;
}

function formatLength(um) {
  return um >= 1000 ? `${um / 1000} mm` : `${um} µm`;
}

export function attachScaleBar(viewer, element, mpp) {
  const bar = element.querySelector('.bar');
  const text = element.querySelector('.text');
  if (!mpp) {
    element.hidden = true;
    return;
  }
  const update = () => {
    const image = slideImage(viewer);
    if (!image) return;
    const screenPerImagePx = image.viewportToImageZoom(viewer.viewport.getZoom(true));
    const umPerScreenPx = mpp / screenPerImagePx;
    const um = niceLength(umPerScreenPx * SCALEBAR_TARGET_PX);
    bar.style.width = `${Math.round(um / umPerScreenPx)}px`;
    text.textContent = formatLength(um);
  };
  viewer.addHandler('animation', update);
  viewer.addHandler('open', update);
  viewer.addHandler('resize', update);
  update();
}

// ------------------------------------------------------------------ prefetch

/** Warm the browser cache with the slide's whole pyramid, lowest levels first, when it is small. */
export function prefetchPyramid(viewer) {
  const source = slideImage(viewer)?.source;
  if (!source) return Promise.resolve(0);
  const urls = [];
  for (let level = source.minLevel; level <= source.maxLevel; level++) {
    const tiles = source.getNumTiles(level);
    for (let y = 0; y < tiles.y; y++) for (let x = 0; x < tiles.x; x++) urls.push(source.getTileUrl(level, x, y));
  }
  if (urls.length > PREFETCH_MAX_TILES) return Promise.resolve(0);
  let next = 0;
  const worker = () =>
    new Promise((resolve) => {
      const step = () => {
        if (next >= urls.length) return resolve();
        const image = new Image();
        image.onload = image.onerror = step;
        image.src = urls[next++];
      };
      step();
    });
  const workers = Array.from({ length: PREFETCH_CONCURRENCY }, worker);
  return Promise.all(workers).then(() => {
    timing.prefetchedTiles = urls.length;
    return urls.length;
  });
}

/** Fit the viewport on a level-0 rectangle, with margin (in level-0 px) around it. */
export function goToRegion(viewer, l0Rect, margin = 0) {
  const image = slideImage(viewer);
  const rect = image.imageToViewportRectangle(
    l0Rect.x - margin,
    l0Rect.y - margin,
    l0Rect.width + 2 * margin,
    l0Rect.height + 2 * margin,
  );
  viewer.viewport.fitBounds(rect);
}

// ------------------------------------------------------------------ magnification

const ZOOM_STEP = 1.5;
const PAN_FRACTION = 0.15;

/** The slide's native objective magnification (from the scan, or ~10 µm/px ÷ mpp). */
export function nativeMagnification(slide) {
  if (slide.magnification) return slide.magnification;
  return slide.mpp ? 10 / slide.mpp : null;
}

/** Zoom buttons, presets and the magnification readout; returns keyboard actions. */
export function attachZoomControls(viewer, slide, { readout, zoomIn, zoomOut, fit, presets }) {
  const native = nativeMagnification(slide);
  const current = () => {
    const image = slideImage(viewer);
    return image && native ? native * image.viewportToImageZoom(viewer.viewport.getZoom(true)) : null;
  };
  const update = () => {
    const mag = current();
    readout.textContent = mag ? `${mag < 10 ? mag.toFixed(1) : Math.round(mag)}x` : '–';
    timing.magnification = mag;
  };
  const zoomBy = (factor) => {
    viewer.viewport.zoomBy(factor);
    viewer.viewport.applyConstraints();
  };
  const setMagnification = (mag) => {
    const image = slideImage(viewer);
    if (!image || !native) return;
    viewer.viewport.zoomTo(image.imageToViewportZoom(mag / native));
  };
  const pan = (dx, dy) => {
    const bounds = viewer.viewport.getBounds();
    viewer.viewport.panBy(new OpenSeadragon.Point(dx * bounds.width * PAN_FRACTION, dy * bounds.height * PAN_FRACTION));
    viewer.viewport.applyConstraints();
  };
  zoomIn.addEventListener('click', () => zoomBy(ZOOM_STEP));
  zoomOut.addEventListener('click', () => zoomBy(1 / ZOOM_STEP));
  fit.addEventListener('click', () => viewer.viewport.goHome());
  for (const button of presets) {
    button.disabled = !native;
    button.addEventListener('click', () => setMagnification(Number(button.dataset.mag)));
  }
  viewer.addHandler('animation', update);
  viewer.addHandler('open', update);
  viewer.addHandler('resize', update);
  update();
  return { zoomBy: (f) => zoomBy(f), pan, setMagnification, step: ZOOM_STEP };
}
