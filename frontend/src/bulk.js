// Drawing of many annotations at once. Above a few hundred shapes, redrawing every shape as its
// own WebGL object on each pan frame costs far too much CPU; here all shapes of one colour are
// one cached Path2D in slide pixels, drawn with a single transform per frame.

const TWO_PI = 2 * Math.PI;

function addShape(path, selector) {
  const g = selector.geometry;
  const ring = (points) => {
    path.moveTo(points[0][0], points[0][1]);
    for (let i = 1; i < points.length; i++) path.lineTo(points[i][0], points[i][1]);
    path.closePath();
  };
  switch (selector.type) {
    case 'RECTANGLE':
      path.rect(g.x, g.y, g.w, g.h);
      break;
    case 'POLYGON':
      ring(g.points);
      break;
    case 'ELLIPSE':
      path.moveTo(g.cx + g.rx, g.cy);
      path.ellipse(g.cx, g.cy, g.rx, g.ry, 0, 0, TWO_PI);
      break;
    case 'MULTIPOLYGON':
      for (const polygon of g.polygons) for (const r of polygon.rings) ring(r.points);
      break;
    default:
      return false;
  }
  return true;
}

function addLine(path, selector) {
  const points = selector.type === 'POLYLINE' ? selector.geometry.points.map((p) => p.point) : selector.geometry.points;
  path.moveTo(points[0][0], points[0][1]);
  for (let i = 1; i < points.length; i++) path.lineTo(points[i][0], points[i][1]);
}

export class BulkOverlay {
  constructor(viewer, image, colorOf) {
    this.viewer = viewer;
    this.image = image; // the slide's TiledImage: shapes are in its pixel coordinates
    this.colorOf = colorOf; // annotation -> css colour
    this.canvas = document.createElement('canvas');
    this.canvas.className = 'bulk-annotations';
    viewer.canvas.appendChild(this.canvas);
    this.groups = null; // colour -> { areas: Path2D, lines: Path2D }
    this.visible = true;
    viewer.addHandler('update-viewport', () => this.draw());
    viewer.addHandler('resize', () => this.draw());
  }

  /** Rebuild the cached paths from ``annotations``, leaving out ``skipIds`` (being edited). */
  setAnnotations(annotations, skipIds = new Set()) {
    const groups = new Map();
    for (const annotation of annotations) {
      if (skipIds.has(annotation.id)) continue;
      const color = this.colorOf(annotation);
      if (!groups.has(color)) groups.set(color, { areas: new Path2D(), lines: new Path2D() });
      const group = groups.get(color);
      const selector = annotation.target.selector;
      if (!addShape(group.areas, selector)) addLine(group.lines, selector);
    }
    this.groups = groups;
    this.draw();
  }

  clear() {
    this.groups = null;
    this.draw();
  }

  setVisible(visible) {
    this.visible = visible;
    this.draw();
  }

  draw() {
    const { canvas, viewer } = this;
    const ratio = window.devicePixelRatio || 1;
    const width = viewer.canvas.clientWidth;
    const height = viewer.canvas.clientHeight;
    if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
      canvas.width = Math.round(width * ratio);
      canvas.height = Math.round(height * ratio);
    }
    const ctx = canvas.getContext('2d');
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    if (!this.groups || !this.visible) return;
    const scale = this.image.viewportToImageZoom(viewer.viewport.getZoom(true)); // screen px per slide px
    const origin = this.image.imageToViewerElementCoordinates(viewer.viewport.getCenter(true).times(0));
    ctx.setTransform(scale * ratio, 0, 0, scale * ratio, origin.x * ratio, origin.y * ratio);
    ctx.lineWidth = 1.5 / scale;
    for (const [color, group] of this.groups) {
      ctx.fillStyle = color;
      ctx.strokeStyle = color;
      ctx.globalAlpha = 0.12;
      ctx.fill(group.areas);
      ctx.globalAlpha = 1;
      ctx.stroke(group.areas);
      ctx.stroke(group.lines);
    }
  }
}
