// Small fetch helpers: same-origin session auth, Django's CSRF token, errors as readable text.

function csrfToken() {
  const match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
  return match ? decodeURIComponent(match[1]) : '';
}

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

function messageOf(body, status) {
  if (!body) return `request failed (${status})`;
  if (typeof body === 'string') return body.slice(0, 300);
  if (body.detail) return String(body.detail);
  const first = Object.entries(body)[0];
  return first ? `${first[0]}: ${[].concat(first[1]).join(' ')}` : `request failed (${status})`;
}

export async function api(path, { method = 'GET', body, headers = {} } = {}) {
  const init = { method, headers: { Accept: 'application/json', ...headers }, credentials: 'same-origin' };
  if (method !== 'GET' && method !== 'HEAD') init.headers['X-CSRFToken'] = csrfToken();
  if (body !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 204) return { data: null, response };
  const type = response.headers.get('Content-Type') || '';
  const data = type.includes('json') ? await response.json() : await response.text();
  if (!response.ok) throw new ApiError(response.status, messageOf(data, response.status), data);
  return { data, response };
}

/** Every page of a paginated list endpoint, fetched concurrently after the first. */
export async function allPages(path, pageSize = 500) {
  const sep = path.includes('?') ? '&' : '?';
  const first = (await api(`${path}${sep}page_size=${pageSize}`)).data;
  if (!first || !Array.isArray(first.results)) return first || [];
  const pages = Math.ceil(first.count / pageSize);
  const rest = [];
  for (let page = 2; page <= pages; page++) {
    rest.push(api(`${path}${sep}page_size=${pageSize}&page=${page}`).then((r) => r.data.results));
  }
  return first.results.concat(...(await Promise.all(rest)));
}

export function websocketUrl(path) {
  const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
  return `${scheme}//${location.host}${path}`;
}
