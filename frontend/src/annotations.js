// Annotation layer: Annotorious on OpenSeadragon for rectangles and polygons, our own point and
// freehand tools, classes, autosave to /api/v1/annotations, undo, QuPath GeoJSON in and out.
import OpenSeadragon from 'openseadragon';
import { createOSDAnnotator } from '@annotorious/openseadragon';
import '@annotorious/openseadragon/annotorious-openseadragon.css';
import { api, allPages } from './api.js';
import { geometryFromSelector, selectorFromGeometry, simplify, POINT_RADIUS_PX } from './geojson.js';
import { BulkOverlay } from './bulk.js';
import { slideImage, timing } from './viewer.js';

// QuPath's default classes and colours, so exported files look the same in QuPath.
export const CLASSES = [
  { name: 'Tumor', color: [200, 0, 0] },
  { name: 'Stroma', color: [150, 200, 150] },
  { name: 'Immune cells', color: [160, 90, 160] },
  { name: 'Necrosis', color: [50, 50, 50] },
  { name: 'Other', color: [255, 200, 0] },
  { name: 'Region*', color: [0, 0, 180] },
  { name: 'Ignore*', color: [180, 180, 180] },
];
const DEFAULT_COLOR = [0, 150, 255];
// Annotations added per frame while a large set loads. Each addition re-tessellates the
// strokes already shown, so a few large chunks cost less in total than many small ones.
const LOAD_CHUNK = 1000;
const BULK_ABOVE = 500; // annotations on a slide from which the bulk overlay draws them
const FREEHAND_TOLERANCE_SCREEN_PX = 1.5;

const HIDDEN_STYLE = { fillOpacity: 0, strokeOpacity: 0, strokeWidth: 2 }; // drawn by the overlay
const hex = (rgb) => `#${rgb.map((v) => v.toString(16).padStart(2, '0')).join('')}`;
const classOf = (annotation) => annotation.bodies?.find((b) => b.purpose === 'classifying')?.value || '';
const colorOf = (name) => CLASSES.find((c) => c.name === name)?.color || DEFAULT_COLOR;

function classBodies(id, className) {
  return className ? [{ id: `${id}-class`, annotation: id, purpose: 'classifying', value: className }] : [];
}

function localAnnotation(id, selector, className) {
  return { id, bodies: classBodies(id, className), target: { annotation: id, selector } };
}

export class AnnotationLayer {
  constructor(viewer, slide, { canWrite, onStatus, onCount }) {
    this.viewer = viewer;
    this.slide = slide;
    this.canWrite = canWrite;
    this.onStatus = onStatus || (() => {});
    this.onCount = onCount || (() => {});
    this.server = new Map(); // local id -> { id, version } on the server
    this.undoStack = [];
    this.redoStack = [];
    this.queue = Promise.resolve();
    this.className = CLASSES[0].name;
    this.tool = 'pan';
    this.anno = createOSDAnnotator(viewer, {
      drawingEnabled: false,
      drawingMode: 'drag',
      userSelectAction: canWrite ? 'EDIT' : 'SELECT',
      style: (annotation, state) => {
        if (this.bulk && !state?.selected && !state?.hovered) return HIDDEN_STYLE;
        const color = hex(colorOf(classOf(annotation)));
        return {
          fill: color,
          fillOpacity: state?.selected ? 0.3 : 0.12,
          stroke: color,
          strokeOpacity: 1,
          // Width 2, not 1: 1-px lines are drawn natively, one draw call per shape, which
          // makes panning over thousands of shapes slow; wider strokes are batched.
          strokeWidth: state?.selected ? 3 : 2,
        };
      },
    });
    this.anno.setUser({ id: 'me', name: 'me' });
    this._wireEvents();
    this._wireCustomTools();
  }

  // ---------------------------------------------------------------- loading

  async load() {
    const started = performance.now();
    const rows = await allPages(`/api/v1/annotations?slide=${this.slide.id}`);
    const fetched = performance.now();
    this.store.clear('REMOTE');
    this.server.clear();
    this._useBulk(rows.length >= BULK_ABOVE);
    const annotations = [];
    this.names = new Map(); // local id -> the annotation's name (QuPath's comment line)
    for (const row of rows) {
      const id = `a${row.id}`;
      this.server.set(id, { id: row.id, version: row.version });
      if (row.name) this.names.set(id, row.name);
      try {
        annotations.push(localAnnotation(id, selectorFromGeometry(row.geometry), row.classification?.name));
      } catch (error) {
        console.warn(`annotation ${row.id} cannot be shown: ${error.message}`);
      }
    }
    await this._addInChunks(annotations);
    this._refreshBulk();
    timing.annotationLoad = {
      count: annotations.length,
      fetchMs: Math.round(fetched - started),
      renderMs: Math.round(performance.now() - fetched),
    };
    this.onCount(annotations.length);
    return annotations.length;
  }

  /** Add annotations a chunk per frame so that a large set never blocks the page. */
  _addInChunks(annotations) {
    return new Promise((resolve) => {
      let next = 0;
      const step = () => {
        this.anno.setAnnotations(annotations.slice(next, next + LOAD_CHUNK), false);
        next += LOAD_CHUNK;
        if (next < annotations.length) requestAnimationFrame(() => setTimeout(step, 0));
        else resolve();
      };
      step();
    });
  }

  setVisible(visible) {
    this.visible = visible;
    // With the bulk overlay drawing every shape, Annotorious's own WebGL layer only costs
    // frame time; selection and the shape editor work without it.
    this.anno.setVisible(visible && !this.bulk);
    this.bulk?.setVisible(visible);
  }

  _useBulk(on) {
    if (on && !this.bulk) {
      this.bulk = new BulkOverlay(this.viewer, slideImage(this.viewer), (a) => hex(colorOf(classOf(a))));
    } else if (!on && this.bulk) {
      this.bulk.clear();
      this.bulk = null;
    }
    this.setVisible(this.visible ?? true);
  }

  /** Redraw the bulk overlay (next frame) after annotations or the selection changed. */
  _refreshBulk() {
    if (!this.bulk || this.bulkPending) return;
    this.bulkPending = true;
    requestAnimationFrame(() => {
      this.bulkPending = false;
      const editing = new Set(this.anno.getSelected().map((a) => a.id));
      this.bulk?.setAnnotations(this.anno.getAnnotations(), editing);
    });
  }

  // ---------------------------------------------------------------- tools

  setClass(name) {
    this.className = name;
    if (!this.canWrite) return;
    for (const selected of this.anno.getSelected()) {
      if (classOf(selected) === name) continue;
      const updated = { ...selected, bodies: classBodies(selected.id, name) };
      this.store.updateAnnotation(updated, 'REMOTE');
      this._record({ kind: 'update', before: selected, after: updated });
      this._saveUpdate(updated);
    }
    this._refreshBulk();
  }

  setWritable(writable) {
    this.canWrite = writable;
    this.anno.cancelSelected();
    this.anno.setUserSelectAction(writable ? 'EDIT' : 'SELECT');
    if (!writable) this.setTool('pan');
  }

  setTool(tool) {
    if (!this.canWrite && tool !== 'pan' && tool !== 'measure') return;
    this.tool = tool;
    this.anno.cancelDrawing?.();
    if (tool === 'rectangle' || tool === 'polygon') {
      this.anno.setDrawingMode(tool === 'rectangle' ? 'drag' : 'click');
      this.anno.setDrawingTool(tool);
      this.anno.setDrawingEnabled(true);
    } else {
      this.anno.setDrawingEnabled(false);
    }
    this.viewer.setMouseNavEnabled(tool !== 'freehand' && tool !== 'measure');
    this.viewer.element.dataset.tool = tool;
  }

  _wireCustomTools() {
    this.viewer.addHandler('canvas-click', (event) => {
      if (this.tool !== 'point' || !event.quick || !this.canWrite) return;
      event.preventDefaultAction = true;
      const p = slideImage(this.viewer).viewerElementToImageCoordinates(event.position);
      const r = POINT_RADIUS_PX;
      const selector = {
        type: 'ELLIPSE',
        geometry: { cx: p.x, cy: p.y, rx: r, ry: r, bounds: { minX: p.x - r, minY: p.y - r, maxX: p.x + r, maxY: p.y + r } },
      };
      this._addDrawn(selector);
    });
    this._wireFreehand();
  }

  _wireFreehand() {
    const element = this.viewer.element;
    const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
    svg.classList.add('freehand-sketch');
    const line = document.createElementNS('http://www.w3.org/2000/svg', 'polyline');
    svg.appendChild(line);
    element.appendChild(svg);
    let screen = null;
    const local = (event) => {
      const box = element.getBoundingClientRect();
      return [event.clientX - box.left, event.clientY - box.top];
    };
    element.addEventListener('pointerdown', (event) => {
      if (this.tool !== 'freehand' || event.button !== 0 || !this.canWrite) return;
      screen = [local(event)];
      element.setPointerCapture(event.pointerId);
      event.stopPropagation();
    }, true);
    element.addEventListener('pointermove', (event) => {
      if (!screen) return;
      screen.push(local(event));
      line.setAttribute('points', screen.map((p) => p.join(',')).join(' '));
    }, true);
    element.addEventListener('pointerup', () => {
      if (!screen) return;
      const points = screen;
      screen = null;
      line.setAttribute('points', '');
      this._finishFreehand(points);
    }, true);
  }

  _finishFreehand(screenPoints) {
    if (screenPoints.length < 3) return;
    const image = slideImage(this.viewer);
    const toImage = ([x, y]) => {
      const p = image.viewerElementToImageCoordinates(new OpenSeadragon.Point(x, y));
      return [p.x, p.y];
    };
    // Split the loop at its farthest point from the start so that both halves simplify well.
    const start = screenPoints[0];
    let far = 1;
    screenPoints.forEach((p, i) => {
      if (Math.hypot(p[0] - start[0], p[1] - start[1]) > Math.hypot(screenPoints[far][0] - start[0], screenPoints[far][1] - start[1])) far = i;
    });
    const first = simplify(screenPoints.slice(0, far + 1), FREEHAND_TOLERANCE_SCREEN_PX);
    const second = simplify(screenPoints.slice(far), FREEHAND_TOLERANCE_SCREEN_PX);
    const outline = first.concat(second.slice(1)).map(toImage);
    if (outline.length < 3) return;
    const xs = outline.map((p) => p[0]);
    const ys = outline.map((p) => p[1]);
    const bounds = { minX: Math.min(...xs), minY: Math.min(...ys), maxX: Math.max(...xs), maxY: Math.max(...ys) };
    this._addDrawn({ type: 'POLYGON', geometry: { points: outline, bounds } });
  }

  _addDrawn(selector) {
    const id = crypto.randomUUID();
    const annotation = localAnnotation(id, selector, this.className);
    this._put(annotation);
    this._record({ kind: 'create', after: annotation });
    this._saveCreate(annotation);
  }

  // ---------------------------------------------------------------- autosave

  // Changes made here (class bodies, undo, redo, delete, reload) go to the store with origin
  // REMOTE, so that Annotorious does not report them back as user edits: only the user's own
  // drawing and shape editing arrive as lifecycle events.
  get store() {
    return this.anno.state.store;
  }

  _put(annotation) {
    if (this.store.getAnnotation(annotation.id)) this.store.updateAnnotation(annotation, 'REMOTE');
    else this.store.addAnnotation(annotation, 'REMOTE');
  }

  _remove(id) {
    if (this.store.getAnnotation(id)) this.store.deleteAnnotation(id, 'REMOTE');
  }

  _wireEvents() {
    this.anno.on('createAnnotation', (annotation) => {
      const classed = { ...annotation, bodies: classBodies(annotation.id, this.className) };
      this.store.updateAnnotation(classed, 'REMOTE');
      // Leave the new shape unselected: the tool stays armed for the next one, and a class key
      // pressed now picks the class of the next shape rather than recolouring this one.
      this.anno.cancelSelected();
      this._record({ kind: 'create', after: classed });
      this._saveCreate(classed);
    });
    this.anno.on('updateAnnotation', (annotation, previous) => {
      this._record({ kind: 'update', before: previous, after: annotation });
      this._saveUpdate(annotation);
    });
    this.anno.on('deleteAnnotation', (annotation) => {
      this._record({ kind: 'delete', before: annotation });
      this._saveDelete(annotation);
    });
    this.anno.on('selectionChanged', () => this._refreshBulk());
  }

  _payload(annotation) {
    const className = classOf(annotation);
    return {
      slide: this.slide.id,
      geometry: geometryFromSelector(annotation.target.selector, this.slide.width, this.slide.height),
      classification: className ? { name: className, color: colorOf(className) } : null,
    };
  }

  _enqueue(label, work) {
    this._refreshBulk();
    this.onStatus('saving');
    this.queue = this.queue
      .then(work)
      .then(() => this.onStatus('saved'))
      .catch((error) => {
        console.warn(`${label}: ${error.message}`);
        this.onStatus('error', `${label} failed: ${error.message}`);
      });
    return this.queue;
  }

  _saveCreate(annotation) {
    const payload = this._payload(annotation);
    return this._enqueue('saving the annotation', async () => {
      const { data } = await api('/api/v1/annotations', { method: 'POST', body: payload });
      this.server.set(annotation.id, { id: data.id, version: data.version });
      this.onCount(this.anno.getAnnotations().length);
    });
  }

  _saveUpdate(annotation) {
    const payload = this._payload(annotation);
    delete payload.slide;
    return this._enqueue('saving the change', async () => {
      const record = this.server.get(annotation.id);
      if (!record) return;
      const { data } = await api(`/api/v1/annotations/${record.id}`, {
        method: 'PATCH',
        body: payload,
        headers: { 'If-Match': `"${record.version}"` },
      });
      record.version = data.version;
    });
  }

  _saveDelete(annotation) {
    return this._enqueue('deleting the annotation', async () => {
      const record = this.server.get(annotation.id);
      if (!record) return;
      await api(`/api/v1/annotations/${record.id}`, {
        method: 'DELETE',
        headers: { 'If-Match': `"${record.version}"` },
      });
      this.server.delete(annotation.id);
      this.onCount(this.anno.getAnnotations().length);
    });
  }

  deleteSelected() {
    if (!this.canWrite) return;
    for (const annotation of this.anno.getSelected()) {
      this.anno.cancelSelected();
      this._remove(annotation.id);
      this._record({ kind: 'delete', before: annotation });
      this._saveDelete(annotation);
    }
  }

  // ---------------------------------------------------------------- undo / redo

  _record(step) {
    this.undoStack.push(step);
    if (this.undoStack.length > 200) this.undoStack.shift();
    this.redoStack = [];
    this.onStatus(null);
  }

  canUndo() {
    return this.undoStack.length > 0;
  }

  canRedo() {
    return (this.redoStack || []).length > 0;
  }

  /** Apply one step forwards (redo) or backwards (undo), in the viewer and on the server. */
  _apply(step, forwards) {
    this.anno.cancelSelected();
    const { kind } = step;
    if ((kind === 'create' && forwards) || (kind === 'delete' && !forwards)) {
      const annotation = forwards ? step.after : step.before;
      this._put(annotation);
      this._saveCreate(annotation);
    } else if (kind === 'create' || kind === 'delete') {
      const annotation = kind === 'create' ? step.after : step.before;
      this._remove(annotation.id);
      this._saveDelete(annotation);
    } else {
      const annotation = forwards ? step.after : step.before;
      this._put(annotation);
      this._saveUpdate(annotation);
    }
    this._refreshBulk();
    this.onCount(this.anno.getAnnotations().length);
  }

  undo() {
    if (!this.canWrite) return;
    const step = this.undoStack.pop();
    if (!step) return;
    this._apply(step, false);
    (this.redoStack ||= []).push(step);
    this.onStatus(null);
  }

  redo() {
    if (!this.canWrite) return;
    const step = this.redoStack?.pop();
    if (!step) return;
    this._apply(step, true);
    this.undoStack.push(step);
    this.onStatus(null);
  }

  // ---------------------------------------------------------------- GeoJSON

  /** Download the slide's annotations; ``frame`` 'source' maps them to the original scan. */
  async exportGeoJSON(frame = 'slide') {
    await this.queue;
    const { data } = await api(`/api/v1/annotations/export?slide=${this.slide.id}&frame=${frame}`);
    const blob = new Blob([JSON.stringify(data, null, 1)], { type: 'application/geo+json' });
    const link = document.createElement('a');
    link.href = URL.createObjectURL(blob);
    const base = frame === 'source' ? data.lowmag_frame?.source || this.slide.name : this.slide.name;
    link.download = `${base.replace(/\.[^.]+$/, '')}${frame === 'source' ? '' : '.lowmag'}.geojson`;
    document.body.appendChild(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 1000);
    return { count: data.features?.length ?? 0, frame: data.lowmag_frame };
  }

  /** Import a GeoJSON file: ``merge`` adds to the slide's annotations, ``replace`` swaps mine. */
  async importGeoJSON(file, mode = 'merge') {
    const text = await file.text();
    let collection;
    try {
      collection = JSON.parse(text);
    } catch {
      throw new Error(`${file.name} is not JSON`);
    }
    await this.queue;
    const { data } = await api(`/api/v1/annotations/import?slide=${this.slide.id}&mode=${mode}`, {
      method: 'POST',
      body: collection,
    });
    this.undoStack = [];
    await this.load();
    return data;
  }
}
