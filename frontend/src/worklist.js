// Worklist: filters apply as they change; rows refresh live when a case of my cohorts changes.
import { websocketUrl } from './api.js';

const REFRESH_DEBOUNCE_MS = 300;

function rowsUrl(form) {
  const params = new URLSearchParams(new FormData(form));
  params.set('partial', 'rows');
  return `/?${params}`;
}

// The column the user sorted by ({ index, kind, direction }); null keeps the server's order
// (most urgent first, then the longest waiting).
let sortState = null;

function sortValue(row, index, kind) {
  const cell = row.cells[index];
  const raw = cell?.dataset.sort ?? cell?.textContent.trim() ?? '';
  return kind === 'number' ? Number(raw) : raw.toLowerCase();
}

function applySort() {
  const body = document.getElementById('worklist-rows');
  const headers = [...document.querySelectorAll('table.cases thead th')];
  headers.forEach((th, i) => {
    th.setAttribute('aria-sort', sortState && sortState.index === i ? sortState.direction : 'none');
  });
  if (!sortState) return;
  const { index, kind, direction } = sortState;
  const rows = [...body.querySelectorAll('tr.case-row')];
  const sign = direction === 'ascending' ? 1 : -1;
  rows.sort((a, b) => {
    const [x, y] = [sortValue(a, index, kind), sortValue(b, index, kind)];
    return (x < y ? -1 : x > y ? 1 : 0) * sign;
  });
  body.append(...rows); // a stable sort: ties keep the server's order
}

function wireSorting() {
  for (const button of document.querySelectorAll('table.cases th button.sort')) {
    button.addEventListener('click', () => {
      const index = Number(button.dataset.column);
      const same = sortState?.index === index;
      const direction = same && sortState.direction === 'ascending' ? 'descending' : 'ascending';
      sortState = { index, kind: button.dataset.kind, direction };
      applySort();
    });
  }
}

async function refreshRows(form) {
  const response = await fetch(rowsUrl(form), { credentials: 'same-origin' });
  if (response.ok) {
    document.getElementById('worklist-rows').innerHTML = await response.text();
    applySort();
    window.__lowmag = window.__lowmag || {};
    window.__lowmag.worklistRefreshes = (window.__lowmag.worklistRefreshes || 0) + 1;
  }
}

function connectLive(form, stateEl, attempt = 0) {
  const socket = new WebSocket(websocketUrl('/ws/worklist/'));
  let timer = null;
  socket.addEventListener('open', () => {
    stateEl.textContent = 'live';
    stateEl.classList.add('on');
    attempt = 0;
  });
  socket.addEventListener('message', (event) => {
    const message = JSON.parse(event.data);
    if (message.type !== 'worklist.update') return;
    clearTimeout(timer);
    timer = setTimeout(() => refreshRows(form), REFRESH_DEBOUNCE_MS);
  });
  socket.addEventListener('close', () => {
    stateEl.textContent = 'offline';
    stateEl.classList.remove('on');
    const delay = Math.min(30000, 1000 * 2 ** attempt);
    setTimeout(() => connectLive(form, stateEl, attempt + 1), delay);
  });
}

export function initWorklist() {
  const form = document.getElementById('worklist-filters');
  let typing = null;
  const apply = () => {
    const params = new URLSearchParams(new FormData(form));
    for (const [key, value] of [...params]) if (!value) params.delete(key);
    history.replaceState(null, '', params.toString() ? `/?${params}` : '/');
    refreshRows(form);
  };
  form.addEventListener('change', apply);
  form.addEventListener('input', (event) => {
    if (event.target.type !== 'search') return;
    clearTimeout(typing);
    typing = setTimeout(apply, 250);
  });
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    apply();
  });
  wireSorting();
  connectLive(form, document.getElementById('live-state'));
}
