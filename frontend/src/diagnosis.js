// Diagnosis panel: the AI suggestion beside the pathologist's call, a draft autosaved with
// optimistic locking, signing with password re-entry, amendments with a reason.
import { api } from './api.js';

const SAVE_DEBOUNCE_MS = 700;
const STATUS_LABELS = { signed: 'Signed', in_review: 'In review', ready: 'Ready for review' };

const pct = (v) => `${Math.round(v * 100)}%`;
const el = (id) => document.getElementById(id);

function escapeText(text) {
  const span = document.createElement('span');
  span.textContent = text;
  return span.innerHTML;
}

export function renderAiSuggestion(container, prediction, failedJob = null) {
  if (!prediction && failedJob) {
    container.innerHTML = `<p class="failed-note"><strong>AI analysis failed</strong>${failedJob.stage ? ` at the ${escapeText(failedJob.stage)} stage` : ''}: ${escapeText(failedJob.error || 'no reason recorded')}</p>`;
    return;
  }
  if (!prediction) {
    container.innerHTML = '<p class="muted">No AI analysis yet.</p>';
    return;
  }
  const rows = Object.entries(prediction.probabilities || {})
    .sort((a, b) => b[1] - a[1])
    .map(
      ([name, p]) =>
        `<li><span class="name">${escapeText(name)}</span><span class="prob"><span class="fill" style="width:${pct(p)}"></span></span><span class="value">${pct(p)}</span></li>`,
    )
    .join('');
  container.innerHTML = `
    <p class="ai-call"><strong>${escapeText(prediction.predicted_class)}</strong>
      <span class="confidence-chip">${pct(prediction.confidence)} confidence</span></p>
    <ul class="probabilities">${rows}</ul>
    <p class="muted small">${escapeText(prediction.model)} · assistive only; the signed call is yours.</p>`;
}

/** The case's second-opinion requests and a form to ask a colleague. */
export class SecondOpinions {
  constructor(caseInfo, colleagues, canWrite) {
    this.caseInfo = caseInfo;
    this.form = el('second-opinion-form');
    for (const select of document.querySelectorAll('.colleague-select')) {
      for (const c of colleagues) select.add(new Option(c.username, c.id));
    }
    this.form.hidden = !canWrite;
    this.form.addEventListener('submit', (event) => this._request(event));
  }

  async load() {
    const { data } = await api(`/api/v1/second-opinions?case=${this.caseInfo.id}&page_size=50`);
    this.requests = data.results;
    el('second-opinion-list').innerHTML = this.requests.length
      ? this.requests
          .map((o) => `<li class="opinion ${escapeText(o.status)}">
            <p class="reason">${escapeText(o.reason)}</p>
            <p class="muted small">${o.requested_by ? `asked by ${escapeText(o.requested_by)}` : 'opened at sign-off'}${o.assigned_to ? ` · for #${o.assigned_to}` : ''} · ${escapeText(o.status)}</p>
            ${o.answer ? `<p class="answer"><strong>${escapeText(o.answered_by || '')}:</strong> ${escapeText(o.answer)}</p>` : ''}
          </li>`)
          .join('')
      : '<li class="muted">None requested.</li>';
    return this.requests;
  }

  /** After signing against the AI: route the automatic request to the chosen colleague. */
  async assignOpen(colleagueId) {
    const requests = await this.load();
    const open = requests.find((o) => o.status === 'open' && !o.requested_by);
    if (open && colleagueId) {
      await api(`/api/v1/second-opinions/${open.id}`, { method: 'PATCH', body: { assigned_to: Number(colleagueId) } });
      await this.load();
    }
    return open;
  }

  async _request(event) {
    event.preventDefault();
    const f = this.form.elements;
    const body = { case: this.caseInfo.id, reason: f.reason.value.trim() };
    if (f.assigned_to.value) body.assigned_to = Number(f.assigned_to.value);
    try {
      await api('/api/v1/second-opinions', { method: 'POST', body });
      f.reason.value = '';
      el('second-opinion-state').textContent = 'requested ✓';
      await this.load();
    } catch (error) {
      el('second-opinion-state').textContent = `not sent: ${error.message}`;
    }
  }
}

export class DiagnosisPanel {
  constructor(caseInfo, classes, canWrite, { aiCall = null, opinions = null } = {}) {
    this.aiCall = aiCall;
    this.opinions = opinions;
    this.caseInfo = caseInfo;
    this.canWrite = canWrite;
    this.form = el('diagnosis-form');
    this.versions = [];
    this.current = null; // the latest version (draft or signed)
    this.saveTimer = null;
    this.saving = Promise.resolve();
    this._fillCalls(this.form.elements.call, classes);
    this._fillCalls(el('amend-call'), classes);
    this._wire();
  }

  isSigned() {
    return this.versions.some((v) => v.status === 'signed');
  }

  _fillCalls(select, classes) {
    for (const name of [...classes, 'other (see text)']) {
      const option = document.createElement('option');
      option.value = option.textContent = name;
      select.appendChild(option);
    }
  }

  async load() {
    const { data } = await api(`/api/v1/diagnoses?case=${this.caseInfo.id}&ordering=version&page_size=100`);
    this.versions = data.results;
    this.current = this.versions[this.versions.length - 1] || null;
    this.render();
  }

  _values() {
    const f = this.form.elements;
    return { call: f.call.value, diagnosis_text: f.diagnosis_text.value, free_text: f.free_text.value };
  }

  render() {
    const d = this.current;
    const signed = d?.status === 'signed';
    const f = this.form.elements;
    if (d) {
      if (d.call && ![...f.call.options].some((o) => o.value === d.call)) {
        f.call.add(new Option(d.call, d.call));
      }
      f.call.value = d.call || '';
      f.diagnosis_text.value = d.diagnosis_text || '';
      f.free_text.value = d.free_text || '';
    }
    for (const input of this.form.querySelectorAll('select, textarea')) input.disabled = signed || !this.canWrite;
    el('sign-button').hidden = signed || !this.canWrite;
    el('amend-button').hidden = !signed || !this.canWrite;
    const state = el('diagnosis-state');
    state.textContent = signed ? `signed v${d.version}` : d ? `draft v${d.version}` : 'not started';
    state.className = `badge ${signed ? 'signed' : 'draft'}`;
    const banner = el('signed-banner');
    banner.hidden = !signed;
    if (signed) {
      const when = new Date(d.signed_at).toLocaleString();
      banner.innerHTML = `<strong>Signed</strong> by ${escapeText(d.signed_by || '')} on ${escapeText(when)}
        ${d.version > 1 ? ` · amendment v${d.version}: ${escapeText(d.amendment_reason)}` : ''}
        <span class="hash" title="content hash">${escapeText((d.content_hash || '').slice(0, 12))}</span>`;
    }
    el('diagnosis-panel').classList.toggle('is-signed', signed);
    if (signed) document.dispatchEvent(new CustomEvent('lowmag:signed'));
    if (signed) el('diagnosis-saved').textContent = '';
    this._renderCaseStatus(signed ? 'signed' : d ? 'in_review' : this.caseInfo.status);
    el('diagnosis-versions').innerHTML = this.versions.length > 1
      ? this.versions
          .map((v) => `<li>v${v.version} ${escapeText(v.status)} · ${escapeText(v.call || '—')}${v.amendment_reason ? ` · ${escapeText(v.amendment_reason)}` : ''}</li>`)
          .join('')
      : '';
  }

  _renderCaseStatus(status) {
    const badge = el('case-status');
    if (!badge) return;
    badge.className = `badge status ${status}`;
    badge.textContent = STATUS_LABELS[status] || status;
  }

  _wire() {
    this.form.addEventListener('input', () => this._scheduleSave());
    this.form.addEventListener('change', () => this._scheduleSave());
    el('sign-button').addEventListener('click', () => this._openSign());
    el('amend-button').addEventListener('click', () => this._openAmend());
    el('sign-form').addEventListener('submit', (event) => this._onSign(event));
    el('amend-form').addEventListener('submit', (event) => this._onAmend(event));
  }

  _scheduleSave() {
    if (this.current?.status === 'signed' || !this.canWrite) return;
    el('diagnosis-saved').textContent = 'editing…';
    clearTimeout(this.saveTimer);
    this.saveTimer = setTimeout(() => this.flush(), SAVE_DEBOUNCE_MS);
  }

  flush() {
    clearTimeout(this.saveTimer);
    this.saving = this.saving.then(() => this._save()).catch((error) => {
      el('diagnosis-saved').textContent = `not saved: ${error.message}`;
      throw error;
    });
    return this.saving;
  }

  async _save() {
    try {
      await this._write();
    } catch (error) {
      if (!(error.status === 409 || error.status === 412) || this.current?.status === 'signed') throw error;
      await this._resolveConflict();
    }
  }

  /** Another tab (or colleague) saved the draft first: keep what is typed here, show theirs,
   *  and save on top of their version only when this text is edited again. */
  async _resolveConflict() {
    const mine = this._values();
    const { data } = await api(`/api/v1/diagnoses?case=${this.caseInfo.id}&ordering=version&page_size=100`);
    this.versions = data.results;
    this.current = this.versions[this.versions.length - 1] || null;
    const theirs = this.current;
    const banner = el('draft-conflict');
    if (!theirs || theirs.status !== 'draft') {
      this.render();
      return;
    }
    const differs = Object.entries(mine).filter(([k, v]) => (theirs[k] || '') !== v);
    if (!differs.length) {
      banner.hidden = true;
      this.render();
      return;
    }
    banner.innerHTML = `<strong>This draft was also saved elsewhere</strong> (another tab or a colleague, version ${theirs.row_version}).
      Your text stays in the form; edit it (or press Save mine) to save it over theirs. Theirs:
      <dl>${differs.map(([k]) => `<dt>${escapeText(k.replace('_', ' '))}</dt><dd>${escapeText(theirs[k] || '—')}</dd>`).join('')}</dl>
      <button type="button" id="draft-keep-mine">Save mine</button>`;
    banner.hidden = false;
    el('draft-keep-mine').addEventListener('click', () => {
      banner.hidden = true;
      this.flush();
    });
    el('diagnosis-saved').textContent = 'not saved: conflict with another tab';
  }

  async _write() {
    const body = this._values();
    const d = this.current;
    let data;
    if (!d) {
      ({ data } = await api('/api/v1/diagnoses', { method: 'POST', body: { case: this.caseInfo.id, ...body } }));
      this.versions.push(data);
    } else if (d.status === 'draft') {
      const unchanged = Object.entries(body).every(([k, v]) => (d[k] || '') === v);
      if (unchanged) {
        el('diagnosis-saved').textContent = 'draft saved';
        return;
      }
      ({ data } = await api(`/api/v1/diagnoses/${d.id}`, {
        method: 'PATCH',
        body,
        headers: { 'If-Match': `"${d.row_version}"` },
      }));
      this.versions[this.versions.length - 1] = data;
    } else {
      return;
    }
    this.current = data;
    el('diagnosis-saved').textContent = `draft saved ${new Date().toLocaleTimeString()}`;
    this.render();
  }

  _openSign() {
    if (!this.form.elements.call.value) {
      el('diagnosis-saved').textContent = 'choose a call before signing';
      this.form.elements.call.focus();
      return;
    }
    el('sign-error').hidden = true;
    el('sign-password').value = '';
    const call = this.form.elements.call.value;
    const ai = this.aiCall;
    const disagrees = ai && call.trim().toLowerCase() !== String(ai.predicted_class).trim().toLowerCase();
    el('sign-disagreement').hidden = !disagrees;
    if (disagrees) {
      el('sign-disagreement-text').textContent = `Your call “${call}” disagrees with the AI call “${ai.predicted_class}” (${pct(ai.confidence)} confidence). Signing asks a colleague for a second opinion.`;
    }
    this.disagrees = Boolean(disagrees);
    el('sign-dialog').showModal();
  }

  async _onSign(event) {
    if (event.submitter?.value !== 'sign') return;
    event.preventDefault();
    const password = el('sign-password').value;
    try {
      await this.flush();
      const { data } = await api(`/api/v1/diagnoses/${this.current.id}/sign`, {
        method: 'POST',
        body: { password, row_version: this.current.row_version },
      });
      this.current = data;
      this.versions[this.versions.length - 1] = data;
      el('sign-dialog').close();
      this.render();
      if (this.disagrees && this.opinions) {
        const colleague = el('sign-colleague');
        const who = colleague.value ? colleague.selectedOptions[0].textContent : 'a colleague';
        await this.opinions.assignOpen(colleague.value);
        el('diagnosis-saved').textContent = `Second opinion requested from ${who}.`;
      }
    } catch (error) {
      el('sign-error').textContent = error.message;
      el('sign-error').hidden = false;
    }
  }

  _openAmend() {
    const f = el('amend-form').elements;
    f.call.value = this.current.call;
    f.diagnosis_text.value = this.current.diagnosis_text;
    f.free_text.value = this.current.free_text;
    f.reason.value = '';
    f.password.value = '';
    el('amend-error').hidden = true;
    el('amend-dialog').showModal();
  }

  async _onAmend(event) {
    if (event.submitter?.value !== 'amend') return;
    event.preventDefault();
    const f = el('amend-form').elements;
    const body = {
      password: f.password.value,
      reason: f.reason.value,
      call: f.call.value,
      diagnosis_text: f.diagnosis_text.value,
      free_text: f.free_text.value,
    };
    try {
      const { data } = await api(`/api/v1/diagnoses/${this.current.id}/amend`, { method: 'POST', body });
      this.versions.push(data);
      this.current = data;
      el('amend-dialog').close();
      this.render();
    } catch (error) {
      el('amend-error').textContent = error.message;
      el('amend-error').hidden = false;
    }
  }
}
