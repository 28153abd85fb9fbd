// The case page: slide viewer, heatmap layer, top regions, annotations, diagnosis, job progress.
import OpenSeadragon from 'openseadragon';
import { api, websocketUrl } from './api.js';
import { DiagnosisPanel, renderAiSuggestion, SecondOpinions } from './diagnosis.js';
import { isTyping, usesArrows } from './shortcuts.js';
import {
  attachScaleBar,
  attachZoomControls,
  createViewer,
  goToRegion,
  HeatmapLayer,
  prefetchPyramid,
  slideImage,
  timing,
  whenOpen,
} from './viewer.js';

const TOP_K = 12;
const el = (id) => document.getElementById(id);

function toast(message, kind = 'info') {
  const box = el('toast');
  box.textContent = message;
  box.className = `toast ${kind}`;
  box.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (box.hidden = true), kind === 'error' ? 8000 : 3000);
}

function currentSlide(config) {
  const wanted = Number(new URLSearchParams(location.search).get('slide'));
  const ready = config.slides.filter((s) => s.status === 'ready');
  return ready.find((s) => s.id === wanted) || ready[0] || null;
}

function renderSlideList(config, slide) {
  const list = el('slide-list');
  if (!list) return;
  list.innerHTML = '';
  for (const s of config.slides) {
    const link = document.createElement(s.status === 'ready' ? 'a' : 'span');
    link.className = `slide-link${s.id === slide?.id ? ' active' : ''}`;
    if (s.status === 'ready') {
      const thumb = document.createElement('img');
      Object.assign(thumb, { src: s.thumbnail, alt: '', loading: 'lazy', width: 48, height: 36 });
      thumb.addEventListener('error', () => thumb.remove());
      link.appendChild(thumb);
    }
    link.append(`${s.name}${s.status === 'ready' ? '' : ` (${s.status})`}`);
    if (s.status === 'ready') link.href = `?slide=${s.id}`;
    if (s.failure_reason) link.title = s.failure_reason;
    list.appendChild(link);
  }
}

function renderAssociated(slide) {
  const box = el('assoc-images');
  box.innerHTML = '';
  for (const [name, url] of [['label', slide.label], ['macro', slide.macro]]) {
    if (!url) continue;
    const link = document.createElement('a');
    link.href = url;
    link.target = '_blank';
    link.rel = 'noopener';
    link.innerHTML = `<img src="${url}" alt="${name} image" loading="lazy"><span>${name}</span>`;
    box.appendChild(link);
  }
  if (!box.children.length) box.innerHTML = '<p class="muted">No label or macro image.</p>';
}

// ------------------------------------------------------------------ heatmap controls

function showFailedAnalysis(job, isAdmin) {
  el('analysis-failed').hidden = false;
  el('analysis-failed-stage').textContent = job.stage ? `at the ${job.stage} stage` : '';
  el('analysis-failed-reason').textContent = job.error || 'No reason was recorded.';
  const retry = el('analysis-retry');
  retry.hidden = !isAdmin;
  retry.addEventListener('click', async () => {
    retry.disabled = true;
    try {
      await api(`/api/v1/jobs/${job.id}/retry`, { method: 'POST' });
      toast('Analysis queued again');
      el('analysis-failed-reason').textContent = 'Queued again…';
    } catch (error) {
      retry.disabled = false;
      toast(`Retry failed: ${error.message}`, 'error');
    }
  });
}

function wireHeatmap(viewer, slide, legend, isAdmin) {
  el('legend-ramp').style.background = `linear-gradient(to right, ${legend.join(', ')})`;
  const toggle = el('layer-heatmap');
  const controls = document.querySelector('.heatmap-controls');
  if (!slide.prediction) {
    toggle.disabled = true;
    controls.hidden = true;
    if (slide.job?.state === 'failed') showFailedAnalysis(slide.job, isAdmin);
    else el('no-prediction').hidden = false;
    return null;
  }
  const which = el('heatmap-layer');
  const evidenceClass = slide.prediction.evidence_class;
  // class evidence is the default overlay; models without it show attention only
  if (!evidenceClass) which.querySelector('option[value="evidence"]')?.remove();
  which.value = evidenceClass ? 'evidence' : 'score';
  const captions = {
    evidence: `evidence for ${evidenceClass} (none or against: clear)`,
    score: 'where the model looked (attention, any class; scaled per slide)',
  };
  const caption = () => (el('legend-caption').textContent = captions[which.value] || '');
  caption();
  const layer = new HeatmapLayer(viewer, slide.prediction.heatmap_dzi, which.value);
  const clusters = slide.prediction.clusters || [];
  el('cluster-legend-items').innerHTML = clusters
    .map((c) => `<li><span class="swatch" style="background:${c.color}"></span>cluster ${c.id + 1} <span class="muted">${c.cells} patches</span></li>`)
    .join('');
  if (!clusters.length) which.querySelector('option[value=clusters]').disabled = true;
  const opacity = el('heatmap-opacity');
  const threshold = el('heatmap-threshold');
  const show = () => {
    layer.setVisible(toggle.checked);
    controls.classList.toggle('off', !toggle.checked);
  };
  toggle.addEventListener('change', show);
  which.addEventListener('change', () => {
    layer.setLayer(which.value);
    caption();
    const clusters = which.value === 'clusters';
    threshold.disabled = clusters; // categories are not thresholded
    document.querySelector('.heatmap-controls .legend').hidden = clusters;
    el('cluster-legend').hidden = !clusters;
  });
  opacity.addEventListener('input', () => {
    layer.setOpacity(Number(opacity.value));
    el('heatmap-opacity-value').textContent = `${Math.round(opacity.value * 100)}%`;
  });
  let timer = null;
  threshold.addEventListener('input', () => {
    el('heatmap-threshold-value').textContent = Number(threshold.value).toFixed(2);
    clearTimeout(timer);
    timer = setTimeout(() => layer.setThreshold(Number(threshold.value)), 150);
  });
  show();
  return {
    layer,
    toggle: () => {
      toggle.checked = !toggle.checked;
      show();
    },
    nudgeOpacity: (delta) => {
      opacity.value = Math.min(1, Math.max(0, Number(opacity.value) + delta));
      opacity.dispatchEvent(new Event('input'));
    },
  };
}

// ------------------------------------------------------------------ top regions

class RegionNavigator {
  constructor(viewer, slide) {
    this.viewer = viewer;
    this.slide = slide;
    this.regions = [];
    this.index = -1;
    this.marker = document.createElement('div');
    this.marker.className = 'region-marker';
  }

  async load() {
    const gallery = el('gallery');
    if (!this.slide.prediction) {
      gallery.innerHTML = '<p class="muted">Appears once the AI analysis has run.</p>';
      el('next-region').disabled = true;
      return;
    }
    const { data } = await api(`/viewer/predictions/${this.slide.prediction.id}/top-regions.json?k=${TOP_K}`);
    this.regions = data.regions;
    gallery.innerHTML = '';
    this.regions.forEach((region, i) => {
      const [x, y] = region.l0_xy;
      const size = Math.round(region.l0_size);
      const button = document.createElement('button');
      button.type = 'button';
      button.className = 'patch';
      button.title = `region ${region.rank}: score ${region.score.toFixed(2)}`;
      button.innerHTML = `<img src="/slides/${this.slide.id}/region.jpeg?x=${x}&y=${y}&size=${size}&px=96" alt="high-score patch ${region.rank}" loading="lazy" width="72" height="72"><span>${region.score.toFixed(2)}</span>`;
      button.addEventListener('click', () => this.go(i));
      gallery.appendChild(button);
    });
  }

  go(i) {
    if (!this.regions.length) return;
    this.index = (i + this.regions.length) % this.regions.length;
    const region = this.regions[this.index];
    const [x, y] = region.l0_xy;
    const rect = { x, y, width: region.l0_size, height: region.l0_size };
    goToRegion(this.viewer, rect, region.l0_size * 2);
    const image = this.viewer.world.getItemAt(0);
    this.viewer.removeOverlay(this.marker);
    this.viewer.addOverlay(this.marker, image.imageToViewportRectangle(x, y, rect.width, rect.height));
    document.querySelectorAll('#gallery .patch').forEach((b, j) => b.classList.toggle('active', j === this.index));
  }

  next(step = 1) {
    this.go(this.index + step);
  }
}

// ------------------------------------------------------------------ job progress

function watchJob(slide, onDone) {
  const job = slide.job;
  if (!job || !['queued', 'running'].includes(job.state)) return;
  const box = el('job-progress');
  const render = (state, stage, progress) => {
    box.hidden = false;
    box.querySelector('.label').textContent = `AI analysis ${state}${stage ? `: ${stage}` : ''}`;
    box.querySelector('.fill').style.width = `${Math.round((progress || 0) * 100)}%`;
  };
  render(job.state, job.stage, job.progress);
  const socket = new WebSocket(websocketUrl(`/ws/jobs/${job.id}/`));
  socket.addEventListener('message', (event) => {
    const message = JSON.parse(event.data);
    const state = message.state || job.state;
    render(state, message.stage, message.progress);
    if (state === 'succeeded' || state === 'failed') {
      socket.close();
      setTimeout(() => (box.hidden = true), 1500);
      if (state === 'succeeded') onDone();
      else toast(`AI analysis failed${message.error ? `: ${message.error}` : ''}`, 'error');
    }
  });
}

// ------------------------------------------------------------------ annotations toolbar

function wireAnnotationTools(layer, canWrite, CLASSES) {
  const select = el('annotation-class');
  CLASSES.forEach((c, i) => select.add(new Option(`${i + 1} · ${c.name}`, c.name)));
  select.addEventListener('change', () => layer.setClass(select.value));
  const buttons = [...document.querySelectorAll('#tools [data-tool]')];
  const setTool = (tool) => {
    if (!layer.canWrite && tool !== 'pan' && tool !== 'measure') return;
    layer.setTool(tool);
    buttons.forEach((b) => b.classList.toggle('active', b.dataset.tool === tool));
  };
  buttons.forEach((b) => b.addEventListener('click', () => setTool(b.dataset.tool)));
  const undo = el('undo');
  const redo = el('redo');
  const refreshUndo = () => {
    undo.disabled = !layer.canWrite || !layer.canUndo();
    redo.disabled = !layer.canWrite || !layer.canRedo();
  };
  /** Editing on or off: off for readers, and for everyone once the case is signed. */
  const setWritable = (writable, reason = '') => {
    layer.setWritable(writable);
    if (!writable) setTool('pan');
    buttons.forEach((b) => (b.disabled = !writable && !['pan', 'measure'].includes(b.dataset.tool)));
    select.disabled = !writable;
    el('delete-selected').disabled = true;
    el('import-open').disabled = !writable;
    const notice = el('annotations-locked');
    notice.hidden = writable || !reason;
    notice.textContent = reason;
    refreshUndo();
  };
  undo.addEventListener('click', () => {
    layer.undo();
    refreshUndo();
  });
  redo.addEventListener('click', () => {
    layer.redo();
    refreshUndo();
  });
  el('delete-selected').addEventListener('click', () => layer.deleteSelected());
  layer.anno.on('selectionChanged', (selected) => (el('delete-selected').disabled = !layer.canWrite || !selected.length));
  el('export-geojson').addEventListener('click', async () => {
    try {
      const { count: n, frame } = await layer.exportGeoJSON(el('export-frame').value);
      const where = frame?.frame === 'source'
        ? `in the original scan's frame (${frame.width} × ${frame.height} px)`
        : `in this file's frame (${frame?.width} × ${frame?.height} px)`;
      toast(`Exported ${n} annotation${n === 1 ? '' : 's'} as GeoJSON ${where}`);
    } catch (error) {
      toast(`Export failed: ${error.message}`, 'error');
    }
  });
  wireImport(layer);
  return { setTool, refreshUndo, select, setWritable };
}

function wireImport(layer) {
  const dialog = el('import-dialog');
  const form = el('import-form');
  const input = el('import-geojson');
  const warning = el('import-replace-warning');
  const confirmBox = el('import-replace-confirm');
  const error = el('import-error');
  const opener = el('import-open');
  opener.addEventListener('click', () => {
    form.reset();
    warning.hidden = true;
    error.hidden = true;
    dialog.showModal();
  });
  form.addEventListener('change', () => (warning.hidden = form.elements.mode.value !== 'replace'));
  form.addEventListener('submit', async (event) => {
    if (event.submitter?.value !== 'import') return;
    event.preventDefault();
    const file = input.files[0];
    const mode = form.elements.mode.value;
    const fail = (message) => {
      error.textContent = message;
      error.hidden = false;
    };
    if (!file) return fail('Choose a GeoJSON file to import.');
    if (mode === 'replace' && !confirmBox.checked) return fail('Tick the box to confirm that your annotations on this slide are replaced.');
    try {
      const result = await layer.importGeoJSON(file, mode);
      dialog.close();
      const n = result.created;
      toast(`Imported ${n} annotation${n === 1 ? '' : 's'} from ${file.name}${result.replaced ? `, replacing ${result.replaced}` : ''}`);
    } catch (e) {
      fail(`Import failed: ${e.message}`);
    }
  });
}

// ------------------------------------------------------------------ ruler

/** The measure tool: drag a line, read its length in µm; nothing is saved. */
function wireRuler(viewer, slide, layer) {
  const element = viewer.element;
  const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
  svg.classList.add('ruler');
  svg.innerHTML = '<line></line><text></text>';
  element.appendChild(svg);
  const [line, label] = [svg.querySelector('line'), svg.querySelector('text')];
  let start = null;
  const local = (event) => {
    const box = element.getBoundingClientRect();
    return [event.clientX - box.left, event.clientY - box.top];
  };
  const draw = (a, b) => {
    line.setAttribute('x1', a[0]);
    line.setAttribute('y1', a[1]);
    line.setAttribute('x2', b[0]);
    line.setAttribute('y2', b[1]);
    const image = slideImage(viewer);
    const [p, q] = [a, b].map(([x, y]) => image.viewerElementToImageCoordinates(new OpenSeadragon.Point(x, y)));
    const px = Math.hypot(q.x - p.x, q.y - p.y);
    const text = formatLength(px, slide.mpp);
    label.textContent = text;
    label.setAttribute('x', (a[0] + b[0]) / 2 + 8);
    label.setAttribute('y', (a[1] + b[1]) / 2 - 8);
    el('ruler-length').textContent = text;
    timing.rulerUm = slide.mpp ? px * slide.mpp : null;
  };
  element.addEventListener('pointerdown', (event) => {
    if (layer.tool !== 'measure' || event.button !== 0) return;
    start = local(event);
    element.setPointerCapture(event.pointerId);
    event.stopPropagation();
  }, true);
  element.addEventListener('pointermove', (event) => {
    if (start) draw(start, local(event));
  }, true);
  element.addEventListener('pointerup', (event) => {
    if (!start) return;
    draw(start, local(event));
    start = null;
  }, true);
}

// ------------------------------------------------------------------ annotation list

const LIST_MAX = 200;
let listTimer = null;

function scheduleAnnotationList(viewer, slide, layer) {
  clearTimeout(listTimer);
  listTimer = setTimeout(() => renderAnnotationList(viewer, slide, layer), 150);
}

function ringArea(points) {
  let sum = 0;
  for (let i = 0; i < points.length; i++) {
    const [x1, y1] = points[i];
    const [x2, y2] = points[(i + 1) % points.length];
    sum += x1 * y2 - x2 * y1;
  }
  return Math.abs(sum) / 2;
}

/** (area in level-0 px², length in level-0 px) of an Annotorious selector. */
export function measure(selector) {
  const g = selector.geometry;
  switch (selector.type) {
    case 'RECTANGLE':
      return { area: g.w * g.h };
    case 'POLYGON':
      return { area: ringArea(g.points) };
    case 'MULTIPOLYGON':
      return { area: g.polygons.reduce((sum, p) => sum + ringArea(p.rings[0].points) - p.rings.slice(1).reduce((h, r) => h + ringArea(r.points), 0), 0) };
    case 'POLYLINE':
    case 'LINE': {
      const pts = selector.type === 'POLYLINE' ? g.points.map((p) => p.point) : g.points;
      let length = 0;
      for (let i = 1; i < pts.length; i++) length += Math.hypot(pts[i][0] - pts[i - 1][0], pts[i][1] - pts[i - 1][1]);
      return { length };
    }
    default:
      return {}; // a point
  }
}

function formatArea(px2, mpp) {
  if (!mpp) return `${Math.round(px2)} px²`;
  const mm2 = (px2 * mpp * mpp) / 1e6;
  return mm2 >= 0.01 ? `${mm2.toFixed(3)} mm²` : `${Math.round(px2 * mpp * mpp)} µm²`;
}

function formatLength(px, mpp) {
  if (!mpp) return `${Math.round(px)} px`;
  const um = px * mpp;
  return um >= 1000 ? `${(um / 1000).toFixed(2)} mm` : `${Math.round(um)} µm`;
}

function renderAnnotationList(viewer, slide, layer) {
  const list = el('annotation-list');
  const all = layer.anno.getAnnotations();
  el('annotation-list-count').textContent = String(all.length);
  list.innerHTML = '';
  for (const annotation of all.slice(0, LIST_MAX)) {
    const selector = annotation.target.selector;
    const { area, length } = measure(selector);
    const className = annotation.bodies?.find((b) => b.purpose === 'classifying')?.value || 'unclassified';
    const comment = layer.names?.get(annotation.id) || '';
    const size = area !== undefined ? formatArea(area, slide.mpp) : length !== undefined ? formatLength(length, slide.mpp) : 'point';
    const item = document.createElement('li');
    const button = document.createElement('button');
    button.type = 'button';
    button.className = 'annotation-item';
    button.dataset.annotation = annotation.id;
    button.innerHTML = '<span class="cls"></span> <span class="size"></span><span class="comment muted"></span>';
    button.querySelector('.cls').textContent = className;
    button.querySelector('.size').textContent = size;
    button.querySelector('.comment').textContent = comment ? ` · ${comment}` : '';
    button.addEventListener('click', () => {
      const b = selector.geometry.bounds;
      const margin = Math.max(b.maxX - b.minX, b.maxY - b.minY, 40);
      goToRegion(viewer, { x: b.minX, y: b.minY, width: b.maxX - b.minX, height: b.maxY - b.minY }, margin);
      layer.anno.setSelected(annotation.id);
    });
    item.appendChild(button);
    list.appendChild(item);
  }
  if (all.length > LIST_MAX) {
    list.insertAdjacentHTML('beforeend', `<li class="muted">and ${all.length - LIST_MAX} more</li>`);
  }
}

function saveStatus(state, message) {
  const box = el('save-state');
  if (state === 'saving') box.textContent = 'saving…';
  else if (state === 'saved') box.textContent = 'saved ✓';
  else if (state === 'error') {
    box.textContent = 'not saved';
    toast(message, 'error');
  }
  box.dataset.state = state || '';
}

// ------------------------------------------------------------------ keyboard

const ARROWS = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };
const PRESET_KEYS = { '!': 1, '@': 2, '%': 5 }; // Shift+1, Shift+2, Shift+5 on a US keyboard

function wireKeys({ viewer, heatmap, regions, annotations, zoom }) {
  const toolKeys = { v: 'pan', r: 'rectangle', p: 'polygon', f: 'freehand', o: 'point', m: 'measure' };
  document.addEventListener('keydown', (event) => {
    if (isTyping(event) || document.querySelector('dialog[open]')) return;
    const key = event.key;
    if (!(event.ctrlKey || event.metaKey || event.altKey)) {
      if (ARROWS[key] && !usesArrows(event)) {
        zoom.pan(...ARROWS[key]);
        event.preventDefault();
        return;
      }
      const digit = /^Digit[125]$/.test(event.code) && event.shiftKey ? Number(event.code.slice(5)) : PRESET_KEYS[key];
      if (digit) zoom.setMagnification(digit);
      else if (key === '+' || key === '=') zoom.zoomBy(zoom.step);
      else if (key === '-' || key === '_') zoom.zoomBy(1 / zoom.step);
      if (digit || ['+', '=', '-', '_'].includes(key)) {
        event.preventDefault();
        return;
      }
    }
    const { layer, tools, CLASSES } = annotations;
    if (!layer) return;
    const lower = key.toLowerCase();
    if ((event.ctrlKey || event.metaKey) && (lower === 'z' || lower === 'y')) {
      event.preventDefault();
      event.stopPropagation();
      if (lower === 'y' || event.shiftKey) layer.redo();
      else layer.undo();
      tools.refreshUndo();
      return;
    }
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    if (key === 'h' && heatmap) heatmap.toggle();
    else if (key === '[' && heatmap) heatmap.nudgeOpacity(-0.1);
    else if (key === ']' && heatmap) heatmap.nudgeOpacity(0.1);
    else if (key === 'n') regions.next(1);
    else if (key === 'N') regions.next(-1);
    else if (key === 'a') {
      const box = el('layer-annotations');
      box.checked = !box.checked;
      box.dispatchEvent(new Event('change'));
    } else if (key === '0') viewer.viewport.goHome();
    else if (key === 'Escape') tools.setTool('pan');
    else if (key === 'Delete' || key === 'Backspace') layer.deleteSelected();
    else if (toolKeys[key]) tools.setTool(toolKeys[key]);
    else if (/^[1-9]$/.test(key) && CLASSES[Number(key) - 1]) {
      tools.select.value = CLASSES[Number(key) - 1].name;
      tools.select.dispatchEvent(new Event('change'));
    } else return;
    event.preventDefault();
  }, true);
}

// ------------------------------------------------------------------ page

export async function initCase() {
  const config = JSON.parse(el('viewer-config').textContent);
  const slide = currentSlide(config);
  renderSlideList(config, slide);
  const canWrite = config.user.can_write;
  const classes = slide?.prediction?.classes || config.slides.find((s) => s.prediction)?.prediction.classes || [];
  const opinions = new SecondOpinions(config.case, config.colleagues || [], canWrite);
  opinions.load().catch((error) => toast(`Second opinions not loaded: ${error.message}`, 'error'));
  const diagnosis = new DiagnosisPanel(config.case, classes, canWrite, { aiCall: config.ai_call, opinions });
  const failedJob = config.slides.map((s) => s.job).find((j) => j?.state === 'failed');
  // the case's call, chosen by the server
  renderAiSuggestion(el('ai-suggestion'), config.ai_call, failedJob);
  diagnosis.load().catch((error) => toast(`Diagnosis not loaded: ${error.message}`, 'error'));
  if (!slide) {
    el('viewer').innerHTML = '<p class="empty-viewer">No slide of this case is ready to view yet.</p>';
    return;
  }
  renderAssociated(slide);

  const viewer = createViewer(el('viewer'), slide);
  window.__lowmag.viewer = viewer;
  const heatmap = wireHeatmap(viewer, slide, config.legend, config.user.is_admin);
  el('layer-slide').addEventListener('change', (e) => viewer.world.getItemAt(0)?.setOpacity(e.target.checked ? 1 : 0));
  attachScaleBar(viewer, el('scalebar'), slide.mpp);
  const regions = new RegionNavigator(viewer, slide);
  el('next-region').addEventListener('click', () => regions.next(1));

  const zoom = attachZoomControls(viewer, slide, {
    readout: el('magnification'),
    zoomIn: el('zoom-in'),
    zoomOut: el('zoom-out'),
    fit: el('zoom-fit'),
    presets: [...document.querySelectorAll('.zoombar [data-mag]')],
  });
  const annotations = {}; // filled once the slide is open: layer, tools, CLASSES
  wireKeys({ viewer, heatmap, regions, annotations, zoom });

  await whenOpen(viewer).catch((error) => toast(`Slide failed to open: ${error.message}`, 'error'));
  const image = viewer.world.getItemAt(0);
  // Annotation tools load after the slide so that they never delay its first tiles.
  const { AnnotationLayer, CLASSES } = await import('./annotations.js');
  const layer = new AnnotationLayer(viewer, slide, {
    canWrite,
    onStatus: (state, message) => {
      saveStatus(state, message);
      annotations.tools?.refreshUndo();
    },
    onCount: (n) => {
      el('layer-annotations').parentElement.dataset.count = n;
      scheduleAnnotationList(viewer, slide, layer);
    },
  });
  Object.assign(annotations, { layer, CLASSES, tools: wireAnnotationTools(layer, canWrite, CLASSES) });
  const signedLock = 'Annotations are read-only: the case is signed (an amendment does not reopen them).';
  const locked = () => config.case.annotations_locked || diagnosis.isSigned() || config.case.status === 'signed';
  annotations.tools.setWritable(canWrite && !locked(), canWrite ? signedLock : '');
  document.addEventListener('lowmag:signed', () => annotations.tools.setWritable(false, signedLock));
  el('layer-annotations').addEventListener('change', (e) => layer.setVisible(e.target.checked));
  window.__lowmag.annotations = layer;
  wireRuler(viewer, slide, layer);
  const afterFirstPaint = () => {
    layer.load().then(() => (timing.annotationsReady = performance.now()))
      .catch((error) => toast(`Annotations not loaded: ${error.message}`, 'error'));
    regions.load().catch((error) => toast(`Top regions not loaded: ${error.message}`, 'error'));
    prefetchPyramid(viewer);
  };
  if (image?.getFullyLoaded()) afterFirstPaint();
  else image?.addOnceHandler('fully-loaded-change', afterFirstPaint);
  watchJob(slide, async () => {
    const { data } = await api(`/api/v1/predictions?slide=${slide.id}&ordering=-created_at`);
    if (data.results?.length) {
      toast('AI analysis finished: reloading the case');
      setTimeout(() => location.reload(), 800);
    }
  });
}
