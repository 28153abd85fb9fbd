// Worklist: filters apply as they change; rows refresh live when a case of my cohorts changes.
import { websocketUrl } from './api.js';

const REFRESH_DEBOUNCE_MS = 300;

function rowsUrl(form) {
  const params = new URLSearchParams(new FormData(form));
  params.set('partial', 'rows');
  return `/?${params}`;
}

async function refreshRows(form) {
  const response = await fetch(rowsUrl(form), { credentials: 'same-origin' });
  if (response.ok) document.getElementById('worklist-rows').innerHTML = await response.text();
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
  connectLive(form, document.getElementById('live-state'));
}
