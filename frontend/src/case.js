// The case page: slide viewer, heatmap layer, top regions, annotations, diagnosis, job progress.
import { api, websocketUrl } from './api.js';
import { DiagnosisPanel, renderAiSuggestion } from './diagnosis.js';
import { isTyping } from './shortcuts.js';
import {
  attachScaleBar,
  createViewer,
  goToRegion,
  HeatmapLayer,
  prefetchPyramid,
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
    link.textContent = `${s.name}${s.status === 'ready' ? '' : ` (${s.status})`}`;
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

function wireHeatmap(viewer, slide, legend) {
  el('legend-ramp').style.background = `linear-gradient(to right, ${legend.join(', ')})`;
  const toggle = el('layer-heatmap');
  const controls = document.querySelector('.heatmap-controls');
  if (!slide.prediction) {
    toggle.disabled = true;
    controls.hidden = true;
    el('no-prediction').hidden = false;
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
    layer.setTool(tool);
    buttons.forEach((b) => b.classList.toggle('active', b.dataset.tool === tool));
  };
  buttons.forEach((b) => {
    b.disabled = !canWrite && b.dataset.tool !== 'pan';
    b.addEventListener('click', () => setTool(b.dataset.tool));
  });
  const undo = el('undo');
  const refreshUndo = () => (undo.disabled = !layer.canUndo());
  undo.addEventListener('click', () => {
    layer.undo();
    refreshUndo();
  });
  el('delete-selected').addEventListener('click', () => layer.deleteSelected());
  layer.anno.on('selectionChanged', (selected) => (el('delete-selected').disabled = !canWrite || !selected.length));
  el('export-geojson').addEventListener('click', async () => {
    try {
      const n = await layer.exportGeoJSON();
      toast(`Exported ${n} annotation${n === 1 ? '' : 's'} as GeoJSON`);
    } catch (error) {
      toast(`Export failed: ${error.message}`, 'error');
    }
  });
  const input = el('import-geojson');
  input.disabled = !canWrite;
  input.addEventListener('change', async () => {
    const file = input.files[0];
    input.value = '';
    if (!file) return;
    try {
      const created = await layer.importGeoJSON(file);
      toast(`Imported ${created} annotation${created === 1 ? '' : 's'} from ${file.name}`);
    } catch (error) {
      toast(`Import failed: ${error.message}`, 'error');
    }
  });
  return { setTool, refreshUndo, select };
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

function wireKeys({ viewer, heatmap, regions, annotations }) {
  const toolKeys = { v: 'pan', r: 'rectangle', p: 'polygon', f: 'freehand', o: 'point' };
  document.addEventListener('keydown', (event) => {
    if (isTyping(event) || document.querySelector('dialog[open]')) return;
    const { layer, tools, CLASSES } = annotations;
    if (!layer) return;
    const key = event.key;
    if ((event.ctrlKey || event.metaKey) && key.toLowerCase() === 'z') {
      event.preventDefault();
      event.stopPropagation();
      layer.undo();
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
  const diagnosis = new DiagnosisPanel(config.case, classes, canWrite);
  renderAiSuggestion(el('ai-suggestion'), config.ai_call); // the case's call, chosen by the server
  diagnosis.load().catch((error) => toast(`Diagnosis not loaded: ${error.message}`, 'error'));
  if (!slide) {
    el('viewer').innerHTML = '<p class="empty-viewer">No slide of this case is ready to view yet.</p>';
    return;
  }
  renderAssociated(slide);

  const viewer = createViewer(el('viewer'), slide);
  window.__lowmag.viewer = viewer;
  const heatmap = wireHeatmap(viewer, slide, config.legend);
  el('layer-slide').addEventListener('change', (e) => viewer.world.getItemAt(0)?.setOpacity(e.target.checked ? 1 : 0));
  attachScaleBar(viewer, el('scalebar'), slide.mpp);
  const regions = new RegionNavigator(viewer, slide);
  el('next-region').addEventListener('click', () => regions.next(1));

  const annotations = {}; // filled once the slide is open: layer, tools, CLASSES
  wireKeys({ viewer, heatmap, regions, annotations });

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
    onCount: (n) => (el('layer-annotations').parentElement.dataset.count = n),
  });
  Object.assign(annotations, { layer, CLASSES, tools: wireAnnotationTools(layer, canWrite, CLASSES) });
  el('layer-annotations').addEventListener('change', (e) => layer.setVisible(e.target.checked));
  window.__lowmag.annotations = layer;
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
