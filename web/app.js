// popcon front end: one ES module, no build step, no dependencies.
//
// Pages (hash routing): #/ archive, #/new generate form, #/job/<id> job page.
// Every /api request carries `Authorization: Bearer <token>`; errors come back as
// {"error": "<message>", "code": "<code>"} (src/http/mod.rs, ApiError).

const TOKEN_KEY = 'popcon.token';
const CREDITS_KEY = 'popcon.credits';
const STORAGE_PREFIX = 'popcon.';
const PLACEHOLDER = '/static/placeholder.png';
// The last resort when even the server's placeholder fails: an inline image cannot fail.
const INLINE_PLACEHOLDER =
  'data:image/svg+xml,' +
  encodeURIComponent(
    '<svg xmlns="http://www.w3.org/2000/svg" width="128" height="128">' +
      '<rect width="128" height="128" fill="#e0e0e0"/></svg>',
  );
const PAGE_SIZE = 12;
const POLL_MS = 2000;
const SSE_MAX_FAILURES = 3;
const SSE_IDLE_MS = 45000; // no byte (not even a keep-alive comment) for this long: reconnect
const HOLD_MS = 60000; // how long a successful action's status is held against stale views

// What each action accepts (src/job.rs, EmojiStatus::allows) and what the UI shows at once.
const ALLOWS = {
  retry: ['failed'],
  regenerate: ['done', 'failed'],
  approve: ['done'],
};
const TARGET = { retry: 'pending', regenerate: 'pending', approve: 'approved' };
const ACTION_NAMES = { retry: 'Retry', regenerate: 'Regenerate', approve: 'Approve' };
const STATUS_TEXT = {
  pending: 'Queued',
  running: 'Generating…',
  done: 'Done',
  failed: 'Failed',
  approved: 'Approved',
  partial: 'Partly done',
};
const SETTLED = new Set(['done', 'failed', 'approved']);
const JOB_SETTLED = new Set(['done', 'partial', 'failed']);

// ---- small DOM helpers ---------------------------------------------------------------------

const $ = (sel, root = document) => root.querySelector(sel);

/** Builds an element; strings become text nodes (never HTML, so API text cannot inject). */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(el.dataset, v);
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

function setText(el, text) {
  if (el.textContent !== text) el.textContent = text;
}

/**
 * Points an <img> at `url` and makes sure it is never shown broken: on error it falls back
 * to the server's placeholder, then to an inline image (so a failing placeholder cannot
 * loop: each step happens once).
 */
function setImage(img, url) {
  if (!img.dataset.guarded) {
    img.dataset.guarded = '1';
    img.addEventListener('error', () => {
      if (img.dataset.fallback === 'inline') return;
      if (img.dataset.fallback === 'placeholder') {
        img.dataset.fallback = 'inline';
        img.src = INLINE_PLACEHOLDER;
      } else {
        img.dataset.fallback = 'placeholder';
        img.src = PLACEHOLDER;
      }
    });
  }
  const want = url || PLACEHOLDER;
  // Signed URLs change their query (expiry) on every view; the path names the object, so
  // only a new path is a new picture. Reloading on every event would flicker.
  if (img.dataset.want && samePath(img.dataset.want, want)) return;
  img.dataset.want = want;
  delete img.dataset.fallback;
  img.src = want;
}

function samePath(a, b) {
  try {
    const ua = new URL(a, location.href);
    const ub = new URL(b, location.href);
    return ua.origin === ub.origin && ua.pathname === ub.pathname;
  } catch {
    return a === b;
  }
}

function plural(n, one, many) {
  return `${n} ${n === 1 ? one : many}`;
}

// ---- token and the credits cache -------------------------------------------------------------

function getToken() {
  return localStorage.getItem(TOKEN_KEY) || '';
}

/**
 * A short fingerprint of the token, stored with the cached balance so that a cache written
 * under one token is never shown under another (two users on one browser). Not a secret
 * hash: the token itself sits next to it in localStorage. Two FNV-1a passes, synchronous,
 * so the cached value can be rendered before anything async happens.
 */
function fingerprint(token) {
  const fnv = (seed) => {
    let x = seed >>> 0;
    for (let i = 0; i < token.length; i++) {
      x ^= token.charCodeAt(i);
      x = Math.imul(x, 0x01000193) >>> 0;
    }
    return x.toString(16).padStart(8, '0');
  };
  return fnv(0x811c9dc5) + fnv(0x050c5d1f);
}

function readCachedBalance(token) {
  try {
    const c = JSON.parse(localStorage.getItem(CREDITS_KEY) || 'null');
    if (c && c.fp === fingerprint(token) && Number.isFinite(c.balance)) return c.balance;
  } catch {
    /* a corrupt cache is no cache */
  }
  return null;
}

function writeCachedBalance(token, balance) {
  localStorage.setItem(
    CREDITS_KEY,
    JSON.stringify({ fp: fingerprint(token), balance, at: Date.now() }),
  );
}

/** Forgets everything about the signed-in user: token, cached balance, any other cache. */
function clearUserData() {
  const keys = [];
  for (let i = 0; i < localStorage.length; i++) {
    const k = localStorage.key(i);
    if (k && k.startsWith(STORAGE_PREFIX)) keys.push(k);
  }
  for (const k of keys) localStorage.removeItem(k);
  draft = emptyDraft();
  optimistic.clear();
  holds.clear();
}

// ---- the API -----------------------------------------------------------------------------------

/**
 * One API call. Never throws (except when aborted): the result is
 * {ok, status, data, headers, message}, with status 0 for a network failure.
 */
async function api(path, { method = 'GET', body, headers = {}, signal, token } = {}) {
  const t = token ?? getToken();
  const h2 = { Accept: 'application/json', ...headers };
  if (t) h2.Authorization = `Bearer ${t}`;
  let res;
  try {
    res = await fetch(path, { method, body, headers: h2, signal, cache: 'no-store' });
  } catch (e) {
    if (e && e.name === 'AbortError') throw e;
    return {
      ok: false,
      status: 0,
      data: null,
      headers: new Headers(),
      message: 'Could not reach the server. Check your connection and try again.',
    };
  }
  let data = null;
  const text = await res.text().catch(() => '');
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  const out = { ok: res.ok, status: res.status, data, headers: res.headers, message: '' };
  if (!res.ok) out.message = errorText(data) || `The server answered ${res.status}.`;
  if (res.status === 401 && t && !token) onUnauthorized();
  return out;
}

/** The message of an error body; tolerates {"error": "..."} and {"error": {"message"}}. */
function errorText(data) {
  if (!data) return '';
  const e = data.error;
  if (typeof e === 'string') return e;
  if (e && typeof e.message === 'string') return e.message;
  if (typeof data.message === 'string') return data.message;
  return '';
}

const enc = encodeURIComponent;

// ---- header: sign-in and the credits pill --------------------------------------------------

/**
 * The pill has one fixed box (CSS) in every state, so the sign-out button beside it never
 * moves when the skeleton turns into a number.
 */
function renderCredits(state, balance) {
  const pill = $('#credits');
  pill.dataset.state = state;
  pill.setAttribute('aria-busy', state === 'skeleton' ? 'true' : 'false');
  if (balance === null || balance === undefined) {
    delete pill.dataset.balance;
    pill.removeAttribute('title');
    setText(pill, state === 'error' ? 'credits ?' : '');
    if (state === 'skeleton') pill.setAttribute('aria-label', 'Loading credits');
    else pill.removeAttribute('aria-label');
    return;
  }
  const text = plural(balance, 'credit', 'credits');
  pill.dataset.balance = String(balance);
  pill.removeAttribute('aria-label');
  pill.title = state === 'cached' ? `${text} (updating…)` : text;
  setText(pill, text);
}

function showBalance(balance) {
  const token = getToken();
  if (!token || !Number.isFinite(balance)) return;
  writeCachedBalance(token, balance);
  renderCredits('value', balance);
}

let creditsSeq = 0;

/** Fetches the balance and replaces whatever the pill shows (cached value or skeleton). */
async function refreshCredits() {
  const token = getToken();
  if (!token) return;
  const seq = ++creditsSeq;
  const r = await api('/api/credits');
  // A later refresh, or a sign-out, makes this answer stale.
  if (seq !== creditsSeq || getToken() !== token) return;
  if (r.ok && r.data && Number.isFinite(r.data.balance)) {
    showBalance(r.data.balance);
  } else if ($('#credits').dataset.state === 'skeleton') {
    renderCredits('error', null);
  }
}

/** The header as the token says: the cached balance at once, then the fresh one. */
function renderAccount() {
  const token = getToken();
  const form = $('#signin-form');
  const out = $('#signout');
  form.hidden = !!token;
  out.hidden = !token;
  if (!token) {
    renderCredits('signed-out', null);
    return;
  }
  const cached = readCachedBalance(token);
  if (cached === null) renderCredits('skeleton', null);
  else renderCredits('cached', cached);
  refreshCredits();
}

async function onSignIn(ev) {
  ev.preventDefault();
  const input = $('#token');
  const button = $('#signin');
  const alert = $('#signin-error');
  const token = input.value.trim();
  if (button.disabled) return;
  setText(alert, '');
  if (!token) {
    setText(alert, 'Paste your API token first.');
    input.focus();
    return;
  }
  button.disabled = true;
  const r = await api('/api/credits', { token });
  button.disabled = false;
  if (r.status === 401) {
    setText(alert, 'That token was not accepted.');
    input.focus();
    return;
  }
  if (!r.ok) {
    setText(alert, r.message);
    return;
  }
  // A different user may have used this browser: nothing of theirs survives.
  clearUserData();
  localStorage.setItem(TOKEN_KEY, token);
  input.value = '';
  if (r.data && Number.isFinite(r.data.balance)) writeCachedBalance(token, r.data.balance);
  renderAccount();
  route();
}

function signOut(message = '') {
  clearUserData();
  creditsSeq++;
  stopPage();
  renderAccount();
  setText($('#signin-error'), message);
  route();
}

let unauthorizedShown = false;

/** A stored token stopped working (revoked, expired): sign out and say so. */
function onUnauthorized() {
  if (unauthorizedShown || !getToken()) return;
  unauthorizedShown = true;
  queueMicrotask(() => {
    unauthorizedShown = false;
    signOut('Your token was not accepted any more. Sign in again.');
  });
}

// ---- routing ------------------------------------------------------------------------------------

let page = null; // the current page's teardown: {stop()}

function stopPage() {
  if (page && page.stop) page.stop();
  page = null;
}

function parseHash() {
  const raw = location.hash.replace(/^#/, '') || '/';
  const [path, query = ''] = raw.split('?');
  const params = new URLSearchParams(query);
  const m = path.match(/^\/job\/([^/]+)\/?$/);
  if (m) return { name: 'job', id: decodeURIComponent(m[1]) };
  if (path === '/new') return { name: 'new' };
  if (path === '/' || path === '') {
    const offset = Math.max(0, parseInt(params.get('offset') || '0', 10) || 0);
    return { name: 'archive', offset };
  }
  return { name: 'missing' };
}

function route() {
  stopPage();
  const view = $('#view');
  view.replaceChildren();
  const r = parseHash();
  for (const a of document.querySelectorAll('.nav a')) {
    const current =
      (r.name === 'archive' && a.getAttribute('href') === '#/') ||
      (r.name === 'new' && a.getAttribute('href') === '#/new');
    if (current) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  if (!getToken()) {
    document.title = 'Sign in · popcon';
    view.append(
      h('section', { class: 'panel' }, h('h1', {}, 'Sign in'),
        h('p', {}, 'Paste your API token in the box at the top to see your emoji sets.')),
    );
    return;
  }
  if (r.name === 'archive') page = archivePage(view, r.offset);
  else if (r.name === 'new') page = generatePage(view);
  else if (r.name === 'job') page = jobPage(view, r.id);
  else {
    document.title = 'Not found · popcon';
    view.append(h('section', { class: 'panel' }, h('h1', {}, 'Not found'),
      h('p', {}, h('a', { href: '#/' }, 'Back to the archive'))));
  }
}

// ---- archive ----------------------------------------------------------------------------------

function archivePage(view, offset) {
  document.title = 'Archive · popcon';
  let alive = true;
  const list = h('ul', { id: 'archive', class: 'cards', 'aria-busy': 'true' });
  const status = h('p', { class: 'alert', role: 'alert' });
  const prev = h('button', { id: 'prev', type: 'button', disabled: true }, '← Newer');
  const next = h('button', { id: 'next', type: 'button', disabled: true }, 'Older →');
  prev.addEventListener('click', () => {
    location.hash = `#/?offset=${Math.max(0, offset - PAGE_SIZE)}`;
  });
  next.addEventListener('click', () => {
    if (next.dataset.offset) location.hash = `#/?offset=${next.dataset.offset}`;
  });
  prev.disabled = offset <= 0;
  view.append(
    h('section', { class: 'archive' },
      h('div', { class: 'row' }, h('h1', {}, 'Your sets'), h('a', { class: 'button', href: '#/new' }, 'New set')),
      status, list,
      h('nav', { class: 'pager', 'aria-label': 'Pages' }, prev, next)),
  );

  (async () => {
    const r = await api(`/api/jobs?limit=${PAGE_SIZE}&offset=${offset}`);
    if (!alive) return;
    list.setAttribute('aria-busy', 'false');
    if (!r.ok) {
      setText(status, `Could not load your sets: ${r.message}`);
      return;
    }
    const jobs = (r.data && r.data.jobs) || [];
    if (jobs.length === 0) {
      list.append(h('li', { class: 'empty' }, offset > 0 ? 'No older sets.' : 'No sets yet. ',
        offset > 0 ? null : h('a', { href: '#/new' }, 'Make your first one.')));
    }
    for (const j of jobs) list.append(h('li', {}, card(j)));
    const no = r.data && r.data.next_offset;
    if (Number.isFinite(no)) {
      next.dataset.offset = String(no);
      next.disabled = false;
    }
  })();
  return { stop: () => { alive = false; } };
}

function card(j) {
  const subject = j.subject || 'Untitled set';
  const img = h('img', {
    class: 'thumb', alt: `Thumbnail of ${subject}`, width: 128, height: 128,
    loading: 'lazy', decoding: 'async',
  });
  setImage(img, j.thumbnail_url);
  const counts = Number.isFinite(j.emoji_total) ? ` · ${j.emoji_done ?? 0}/${j.emoji_total}` : '';
  return h('a', { class: 'card', href: `#/job/${enc(j.id)}`, dataset: { job: j.id, status: j.status } },
    img,
    h('span', { class: 'card-title' }, subject),
    h('span', { class: 'card-meta' }, `${STATUS_TEXT[j.status] || j.status}${counts}`),
    j.created_at ? h('time', { class: 'card-meta', datetime: j.created_at }, formatDate(j.created_at)) : null,
  );
}

function formatDate(s) {
  const d = new Date(s);
  if (Number.isNaN(d.getTime())) return s;
  return d.toLocaleString([], { dateStyle: 'medium', timeStyle: 'short' });
}

// ---- generate form ----------------------------------------------------------------------------

function emptyDraft() {
  return { subject: '', expressions: '', style: '', key: newKey() };
}

// The form's text survives leaving the page (not the photo: a file input cannot be refilled).
let draft = emptyDraft();

function newKey() {
  if (crypto.randomUUID) return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(b, (x) => x.toString(16).padStart(2, '0')).join('');
}

function parseExpressions(text) {
  return text.split(/[,\n]/).map((s) => s.trim()).filter(Boolean);
}

function generatePage(view) {
  document.title = 'New set · popcon';
  let alive = true;
  let busy = false;
  const error = h('p', { id: 'gen-error', class: 'alert', role: 'alert' });
  const subject = h('input', { id: 'subject', name: 'subject', required: true, maxlength: 500, autocomplete: 'off' });
  const expressions = h('textarea', { id: 'expressions', name: 'expressions', rows: 4,
    'aria-describedby': 'expressions-help' });
  const style = h('input', { id: 'style', name: 'style', autocomplete: 'off' });
  const photo = h('input', { id: 'photo', name: 'photo', type: 'file',
    accept: 'image/png,image/jpeg,image/webp', 'aria-describedby': 'photo-help' });
  const submit = h('button', { id: 'gen-submit', type: 'submit' }, 'Generate set');
  subject.value = draft.subject;
  expressions.value = draft.expressions;
  style.value = draft.style;

  const form = h('form', { id: 'gen-form', class: 'panel form', novalidate: true },
    h('h1', {}, 'New emoji set'),
    h('div', { class: 'field' }, h('label', { for: 'subject' }, 'Subject'), subject),
    h('div', { class: 'field' }, h('label', { for: 'expressions' }, 'Expressions'), expressions,
      h('small', { id: 'expressions-help' }, 'Comma separated or one per line. Leave empty for the default set.')),
    h('div', { class: 'field' }, h('label', { for: 'style' }, 'Style (optional)'), style),
    h('div', { class: 'field' }, h('label', { for: 'photo' }, 'Reference photo (optional)'), photo,
      h('small', { id: 'photo-help' }, 'PNG, JPEG or WebP.')),
    error,
    h('div', { class: 'row' }, submit),
  );

  // Same values → same Idempotency-Key: a resubmission after a lost answer cannot make a
  // second set (and charge twice); any edit makes it a new request.
  const edited = () => {
    draft = { subject: subject.value, expressions: expressions.value, style: style.value, key: newKey() };
  };
  for (const el of [subject, expressions, style, photo]) el.addEventListener('input', edited);
  photo.addEventListener('change', edited);

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    if (busy) return;
    busy = true;
    setText(error, '');
    const spec = { subject: subject.value.trim() };
    if (!spec.subject) {
      busy = false;
      setText(error, 'Say what the set is of: the subject is required.');
      subject.focus();
      return;
    }
    const list = parseExpressions(expressions.value);
    if (list.length) spec.expressions = list;
    if (style.value.trim()) spec.style = style.value.trim();
    const body = new FormData();
    body.append('spec', JSON.stringify(spec));
    if (photo.files && photo.files[0]) body.append('image', photo.files[0]);
    submit.disabled = true;
    form.setAttribute('aria-busy', 'true');
    setText(submit, 'Submitting…');
    const r = await api('/api/generate-set', {
      method: 'POST', body, headers: { 'Idempotency-Key': draft.key },
    });
    busy = false;
    if (!alive) return;
    submit.disabled = false;
    form.setAttribute('aria-busy', 'false');
    setText(submit, 'Generate set');
    if (r.ok && r.data && r.data.id) {
      if (Number.isFinite(r.data.balance)) showBalance(r.data.balance);
      refreshCredits();
      draft = emptyDraft();
      location.hash = `#/job/${enc(r.data.id)}`;
      return;
    }
    setText(error, generateError(r, !!(photo.files && photo.files[0])));
  });

  view.append(form);
  subject.focus();
  return { stop: () => { alive = false; } };
}

/** The API's refusal of a generate-set as a sentence. */
function generateError(r, hadPhoto) {
  const msg = r.message;
  switch (r.status) {
    case 0:
      return hadPhoto
        ? `${msg} If the photo is large, a smaller one may get through.`
        : msg;
    case 402: {
      const m = msg.match(/balance is (-?\d+), this costs (\d+)/);
      if (m) {
        return `Not enough credits: this set needs ${plural(+m[2], 'credit', 'credits')} and you have ${m[1]}.`;
      }
      return `Not enough credits. ${msg}`;
    }
    case 429:
      return `Generation is paused right now (off-hours). ${whenItLifts(r)}`;
    case 413:
      return `The photo is too large. ${msg}`;
    case 415:
      return `The server did not accept the upload format: ${msg}`;
    case 400:
      return `The request was refused: ${msg}`;
    case 401:
      return 'Your token was not accepted. Sign in again.';
    case 503:
      return `The service is unavailable right now: ${msg} Try again in a moment.`;
    default:
      return msg;
  }
}

/** "Try again after 14:05 (in about 20 minutes)." from Retry-After, or from the message. */
function whenItLifts(r) {
  let secs = parseInt(r.headers.get('Retry-After') || '', 10);
  if (!Number.isFinite(secs)) {
    const m = r.message.match(/in (\d+)s/);
    secs = m ? parseInt(m[1], 10) : NaN;
  }
  if (!Number.isFinite(secs)) return 'Try again later.';
  const at = new Date(Date.now() + secs * 1000);
  const time = at.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  const mins = Math.ceil(secs / 60);
  const inWords = secs < 90 ? plural(secs, 'second', 'seconds') : mins < 120
    ? plural(mins, 'minute', 'minutes') : plural(Math.round(mins / 60), 'hour', 'hours');
  return `Try again after ${time} (in about ${inWords}).`;
}

// ---- job page: layer 3 state -------------------------------------------------------------------
//
// Layer 3 of the action dedup (layers 1 and 2 are the server's claim and pre-flip):
// - `busy` holds one key per button (job:idx:action, job:approve-all). A click handler's
//   first line returns when its key is there, and the key is set before anything else, so a
//   double or triple click sends exactly one request.
// - `optimistic` is the status shown for an emoji while its request is in flight. Views
//   from the event stream or a poll keep updating `view`, but the shown status comes from
//   here until the request settles, so a stale event cannot undo the patch.
// - `holds` keep a successful action's status against views older than it (a poll answer
//   that left before the action, or for approve, the row that stays `done` until the worker
//   flips it to `approved`), for at most HOLD_MS.
// These live at module level, keyed by job id, so leaving and reopening a page mid-request
// still shows the truth.

const busy = new Set();
const optimistic = new Map(); // "job:idx" → status shown while a request is in flight
const holds = new Map(); // "job:idx" → {want, from, fence, keepsStatus, until}

const ekey = (job, idx) => `${job}:${idx}`;

function shownStatus(jobId, e) {
  const k = ekey(jobId, e.idx);
  if (optimistic.has(k)) return optimistic.get(k);
  const hold = holds.get(k);
  if (hold) {
    const older = hold.keepsStatus || hold.fence == null || (e.fence ?? 0) < hold.fence;
    if (Date.now() < hold.until && e.status === hold.from && older) return hold.want;
    holds.delete(k);
  }
  return e.status;
}

function hasPending(jobId) {
  const p = `${jobId}:`;
  for (const k of optimistic.keys()) if (k.startsWith(p)) return true;
  for (const k of holds.keys()) if (k.startsWith(p)) return true;
  return false;
}

function jobSettled(view) {
  return JOB_SETTLED.has(view.status) && (view.emoji || []).every((e) => SETTLED.has(e.status));
}

// ---- job page -------------------------------------------------------------------------------------

function jobPage(view, jobId) {
  document.title = 'Set · popcon';
  const st = { jobId, view: null, cells: new Map(), live: null, alive: true, holdTimer: null };

  const root = h('section', { id: 'job', class: 'job', dataset: { job: jobId, status: 'loading' }, 'aria-busy': 'true' });
  const title = h('h1', {}, 'Loading…');
  const meta = h('p', { class: 'muted' });
  const setProgress = h('progress', { id: 'job-progress', max: 1, 'aria-label': 'Set progress' });
  const pose = h('img', { id: 'pose', alt: 'Pose image of the set', width: 256, height: 256 });
  setImage(pose, null);
  const approveAll = h('button', { id: 'approve-all', type: 'button', disabled: true }, 'Approve all');
  const download = h('a', { id: 'download', class: 'button', href: `/api/job/${enc(jobId)}/download` }, 'Download zip');
  const error = h('p', { id: 'job-error', class: 'alert', role: 'alert' });
  const grid = h('ul', { class: 'grid', 'aria-label': 'Emoji' });

  approveAll.addEventListener('click', approveAllHandler(st, approveAll));
  download.addEventListener('click', downloadHandler(st, download));

  root.append(
    h('div', { class: 'job-head' },
      h('figure', { class: 'pose' }, pose, h('figcaption', { class: 'muted' }, 'Pose')),
      h('div', { class: 'job-info' }, title, meta, setProgress,
        h('div', { class: 'toolbar' }, approveAll, download))),
    error,
    grid,
  );
  view.append(root);
  st.root = root; st.title = title; st.meta = meta; st.setProgress = setProgress;
  st.pose = pose; st.grid = grid; st.error = error; st.approveAll = approveAll; st.download = download;

  st.render = () => renderJob(st);
  st.live = startLive(jobId, {
    onView: (v) => {
      if (!st.alive) return;
      st.view = v;
      st.render();
    },
    onMode: (mode) => {
      if (st.alive) root.dataset.live = mode;
    },
    onMissing: (msg) => {
      if (!st.alive) return;
      root.dataset.status = 'missing';
      setText(title, 'Set not found');
      setText(error, msg || `There is no set ${jobId} (or it is not yours).`);
      root.setAttribute('aria-busy', 'false');
    },
    onError: (msg) => {
      if (st.alive && !st.view) setText(error, msg);
    },
    isQuiet: () => !!st.view && jobSettled(st.view) && !hasPending(jobId),
  });

  return {
    stop: () => {
      st.alive = false;
      st.live.stop();
      clearTimeout(st.holdTimer);
    },
  };
}

function renderJob(st) {
  const v = st.view;
  if (!v || !st.alive) return;
  const { root, jobId } = st;
  root.dataset.status = v.status;
  root.setAttribute('aria-busy', 'false');
  const subject = v.subject || 'Untitled set';
  document.title = `${subject} · popcon`;
  setText(st.title, subject);
  setText(st.meta, [STATUS_TEXT[v.status] || v.status, v.style,
    Number.isFinite(v.emoji_total) ? `${v.emoji_done ?? 0} of ${v.emoji_total} done` : null]
    .filter(Boolean).join(' · '));
  setProgressBar(st.setProgress, v.progress, JOB_SETTLED.has(v.status));
  st.setProgress.hidden = JOB_SETTLED.has(v.status) && !v.progress;
  setImage(st.pose, v.pose_url);
  st.pose.alt = `Pose image of ${subject}`;
  if (v.download_url) st.download.href = v.download_url;

  const emoji = v.emoji || [];
  const seen = new Set();
  for (const e of emoji) {
    seen.add(e.idx);
    let cell = st.cells.get(e.idx);
    if (!cell) {
      cell = makeCell(st, e.idx);
      st.cells.set(e.idx, cell);
    }
    updateCell(st, cell, e);
  }
  // Keep the grid in index order; move nodes only when needed (focus survives updates).
  const ordered = [...st.cells.keys()].filter((i) => seen.has(i)).sort((a, b) => a - b);
  ordered.forEach((idx, pos) => {
    const li = st.cells.get(idx).li;
    if (st.grid.children[pos] !== li) st.grid.insertBefore(li, st.grid.children[pos] || null);
  });
  for (const [idx, cell] of st.cells) {
    if (!seen.has(idx)) {
      cell.li.remove();
      st.cells.delete(idx);
    }
  }

  const anyDone = emoji.some((e) => shownStatus(jobId, e) === 'done');
  st.approveAll.disabled = busy.has(`${jobId}:approve-all`) || !anyDone;

  // Re-render when the earliest hold expires, so a held status cannot outlive its limit.
  clearTimeout(st.holdTimer);
  let next = Infinity;
  for (const [k, hold] of holds) if (k.startsWith(`${jobId}:`)) next = Math.min(next, hold.until);
  if (next < Infinity) st.holdTimer = setTimeout(() => st.render(), Math.max(0, next - Date.now()) + 20);
}

function setProgressBar(bar, p, finished) {
  // A settled row's last progress report is stale (it names the stage that just ended).
  if (finished) {
    bar.max = 1;
    bar.value = 1;
    bar.removeAttribute('aria-valuetext');
    return;
  }
  if (p && Number.isFinite(p.total) && p.total > 0) {
    bar.max = p.total;
    bar.value = Math.min(p.step ?? 0, p.total);
    bar.setAttribute('aria-valuetext', `${p.stage ? `${p.stage}: ` : ''}step ${p.step ?? 0} of ${p.total}`);
  } else {
    bar.removeAttribute('value'); // indeterminate: work is queued or starting
    bar.removeAttribute('aria-valuetext');
  }
}

function makeCell(st, idx) {
  const img = h('img', { class: 'emoji-img', alt: '', width: 128, height: 128, decoding: 'async' });
  setImage(img, null);
  const anim = h('img', { class: 'anim', alt: '', hidden: true });
  const label = h('h2', { class: 'label' });
  const status = h('p', { class: 'status' });
  const progress = h('progress', { max: 1 });
  const stage = h('p', { class: 'stage muted' });
  const err = h('p', { class: 'error' });
  const buttons = {};
  for (const action of ['retry', 'regenerate', 'approve']) {
    const b = h('button', { type: 'button', dataset: { action } }, ACTION_NAMES[action]);
    b.addEventListener('click', emojiActionHandler(st, idx, action, b));
    buttons[action] = b;
  }
  const li = h('li', { class: 'emoji', dataset: { idx: String(idx) } },
    img, anim, label, status, progress, stage, err,
    h('div', { class: 'actions' }, buttons.retry, buttons.regenerate, buttons.approve));
  return { li, img, anim, label, status, progress, stage, err, buttons };
}

function updateCell(st, cell, e) {
  const shown = shownStatus(st.jobId, e);
  const name = e.label || `Emoji ${e.idx + 1}`;
  cell.li.dataset.status = shown;
  setText(cell.label, name);
  setText(cell.status, STATUS_TEXT[shown] || shown);
  setImage(cell.img, e.url);
  cell.img.alt = e.url ? `${name} emoji` : `${name} emoji (not generated yet)`;
  if (e.animation_url) {
    setImage(cell.anim, e.animation_url);
    cell.anim.alt = `${name} animation`;
    cell.anim.hidden = false;
  } else {
    cell.anim.hidden = true;
  }
  // A patched status means the old progress no longer applies.
  const progress = shown === e.status && !SETTLED.has(shown) ? e.progress : null;
  setProgressBar(cell.progress, progress, SETTLED.has(shown));
  if (shown === 'failed' && !progress) cell.progress.value = 0;
  cell.progress.setAttribute('aria-label', `Progress of ${name}`);
  setText(cell.stage, progress && progress.stage ? progress.stage : '');
  setText(cell.err, shown === 'failed' && e.error ? e.error : '');
  for (const [action, b] of Object.entries(cell.buttons)) {
    b.disabled = busy.has(`${st.jobId}:${e.idx}:${action}`) || !ALLOWS[action].includes(shown);
    b.setAttribute('aria-label', `${ACTION_NAMES[action]} ${name}`);
  }
}

function currentEmoji(st, idx) {
  return ((st.view && st.view.emoji) || []).find((e) => e.idx === idx);
}

/** Retry / Regenerate / Approve of one emoji, deduplicated by its busy key. */
function emojiActionHandler(st, idx, action, button) {
  const key = `${st.jobId}:${idx}:${action}`;
  return async () => {
    if (busy.has(key)) return;
    busy.add(key);
    button.disabled = true;
    try {
      const e = currentEmoji(st, idx);
      if (!e || !ALLOWS[action].includes(shownStatus(st.jobId, e))) return;
      await runEmojiAction(st, e, action);
    } finally {
      busy.delete(key);
      st.render();
    }
  };
}

async function runEmojiAction(st, e, action) {
  const { jobId } = st;
  const k = ekey(jobId, e.idx);
  const from = shownStatus(jobId, e);
  const name = e.label || `emoji ${e.idx + 1}`;
  // Patch first, then ask: the grid shows the outcome before the network answers.
  optimistic.set(k, TARGET[action]);
  setText(st.error, '');
  st.render();
  const r = await api(`/api/${action}/${enc(jobId)}?idx=${e.idx}`, { method: 'POST' });
  optimistic.delete(k);
  const reply = r.data || {};
  if (r.ok && reply.status === 'queued') {
    holds.set(k, {
      want: TARGET[action], from, fence: Number.isFinite(reply.fence) ? reply.fence : null,
      keepsStatus: action === 'approve', until: Date.now() + HOLD_MS,
    });
    afterCharge(reply);
    st.live.kick();
    return;
  }
  // Not taken: the status falls back to the server's (the roll-back), and the reason shows.
  setText(st.error, `${ACTION_NAMES[action]} of “${name}” did not go through: ${actionFailure(r)}`);
  if (r.ok) st.live.refresh();
}

/** Approve all: one busy key for the button; every shown-done emoji is patched to approved. */
function approveAllHandler(st, button) {
  const key = `${st.jobId}:approve-all`;
  return async () => {
    if (busy.has(key)) return;
    busy.add(key);
    button.disabled = true;
    try {
      await runApproveAll(st);
    } finally {
      busy.delete(key);
      st.render();
    }
  };
}

async function runApproveAll(st) {
  const { jobId } = st;
  const patched = [];
  for (const e of (st.view && st.view.emoji) || []) {
    const k = ekey(jobId, e.idx);
    if (optimistic.has(k) || shownStatus(jobId, e) !== 'done') continue;
    optimistic.set(k, 'approved');
    patched.push({ k, idx: e.idx, from: 'done' });
  }
  if (patched.length === 0) return;
  setText(st.error, '');
  st.render();
  const r = await api(`/api/approve-all/${enc(jobId)}`, { method: 'POST' });
  for (const p of patched) optimistic.delete(p.k);
  const reply = r.data || {};
  if (r.ok && reply.status === 'queued') {
    const bumped = new Set(Array.isArray(reply.idx) ? reply.idx : patched.map((p) => p.idx));
    for (const p of patched) {
      if (!bumped.has(p.idx)) continue;
      holds.set(p.k, { want: 'approved', from: p.from, fence: null, keepsStatus: true, until: Date.now() + HOLD_MS });
    }
    afterCharge(reply);
    st.live.kick();
    return;
  }
  setText(st.error, `Approve all did not go through: ${actionFailure(r)}`);
  if (r.ok) st.live.refresh();
}

/** Why an action did not take, from a 2xx ActionReply or an error response. */
function actionFailure(r) {
  const reply = r.data || {};
  if (r.ok) {
    if (reply.status === 'duplicate') {
      return 'it was already asked for and is still being handled.';
    }
    if (reply.status === 'wrong_state') {
      return reply.message || `it is ${reply.current} now.`;
    }
    return 'the server gave an answer this page does not understand.';
  }
  switch (r.status) {
    case 402: {
      const m = r.message.match(/balance is (-?\d+), this costs (\d+)/);
      return m ? `not enough credits (it costs ${m[2]}, you have ${m[1]}).` : r.message;
    }
    case 429:
      return `costly work is paused (off-hours). ${whenItLifts(r)}`;
    default:
      return r.message;
  }
}

function afterCharge(reply) {
  if (Number.isFinite(reply.balance)) showBalance(reply.balance);
  refreshCredits();
}

/** Download zip: the route needs the bearer header, so fetch a blob and save it. */
function downloadHandler(st, link) {
  const key = `${st.jobId}:download`;
  return async (ev) => {
    ev.preventDefault();
    if (busy.has(key)) return;
    busy.add(key);
    link.setAttribute('aria-disabled', 'true');
    setText(st.error, '');
    try {
      const res = await fetch(link.href, { headers: { Authorization: `Bearer ${getToken()}` } });
      if (!res.ok) {
        const data = await res.json().catch(() => null);
        if (res.status === 401) onUnauthorized();
        setText(st.error, `The download failed: ${errorText(data) || `the server answered ${res.status}.`}`);
        return;
      }
      const blob = await res.blob();
      const url = URL.createObjectURL(blob);
      const a = h('a', { href: url, download: zipName(res, st.jobId), hidden: true });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    } catch {
      setText(st.error, 'The download failed: could not reach the server.');
    } finally {
      busy.delete(key);
      link.removeAttribute('aria-disabled');
    }
  };
}

function zipName(res, jobId) {
  const cd = res.headers.get('Content-Disposition') || '';
  const m = cd.match(/filename\*?=(?:UTF-8'')?"?([^";]+)"?/i);
  if (m) {
    try {
      return decodeURIComponent(m[1]);
    } catch {
      return m[1];
    }
  }
  return `popcon-${jobId}.zip`;
}

// ---- live updates: the event stream, with polling as the fallback -----------------------------

/**
 * Keeps a job view fresh. First the event stream (GET /api/job/{id}/events), read with
 * fetch because EventSource cannot send the Authorization header; on a stream that fails or
 * ends without `end`, reconnect with a growing delay; after SSE_MAX_FAILURES failures in a
 * row, or when streaming is unavailable, poll GET /api/job/{id} every POLL_MS until the job
 * is quiet (settled, nothing pending on this page).
 *
 * kick(): an action made the job busy again: resume if stopped. refresh(): one GET now.
 */
function startLive(jobId, cb) {
  const ctl = { stopped: false, abort: null, timer: null, mode: 'off', failures: 0 };
  const path = `/api/job/${enc(jobId)}`;

  const setMode = (m) => {
    ctl.mode = m;
    cb.onMode(m);
  };
  const clear = () => {
    clearTimeout(ctl.timer);
    ctl.timer = null;
    if (ctl.abort) ctl.abort.abort();
    ctl.abort = null;
  };
  const streamable = () =>
    typeof ReadableStream !== 'undefined' && 'body' in Response.prototype && typeof TextDecoder !== 'undefined';

  async function stream() {
    if (ctl.stopped) return;
    if (!streamable()) return poll();
    const ac = new AbortController();
    ctl.abort = ac;
    let ended = false;
    let got = false;
    let fallback = false;
    setMode('connecting');
    try {
      const res = await fetch(`${path}/events`, {
        headers: { Authorization: `Bearer ${getToken()}`, Accept: 'text/event-stream' },
        signal: ac.signal,
        cache: 'no-store',
      });
      const type = res.headers.get('Content-Type') || '';
      if (res.status === 401) {
        onUnauthorized();
        return;
      }
      // No stream route here (an older server), or not a stream at all: polling will do,
      // and the GET reports a missing job properly.
      if (!res.ok || !type.includes('text/event-stream') || !res.body || !res.body.getReader) {
        fallback = res.status === 404 || res.status === 405 || (res.ok && !type.includes('text/event-stream')) || !res.body;
        throw new Error(`event stream: ${res.status}`);
      }
      setMode('sse');
      for await (const ev of readEvents(res.body, ac)) {
        if (ctl.stopped) return;
        if (ev.type !== 'job' && ev.type !== 'end') continue;
        let v;
        try {
          v = JSON.parse(ev.data);
        } catch {
          continue; // one garbled event is not a reason to drop the stream
        }
        got = true;
        cb.onView(v);
        if (ev.type === 'end') {
          ended = true;
          break;
        }
      }
    } catch {
      /* handled below: a failed or dropped stream */
    } finally {
      if (ctl.abort === ac) ctl.abort = null;
      ac.abort(); // closes the connection if we broke out of the loop
    }
    if (ctl.stopped) return;
    if (ended) {
      ctl.failures = 0;
      // The server says the job is settled; an action may still be landing (approve keeps
      // `done` until the worker flips it): poll until that shows, else rest.
      if (cb.isQuiet()) setMode('off');
      else poll();
      return;
    }
    ctl.failures = got ? 1 : ctl.failures + 1;
    if (fallback || ctl.failures >= SSE_MAX_FAILURES) return poll();
    setMode('connecting');
    ctl.timer = setTimeout(stream, 1000 * 2 ** (ctl.failures - 1));
  }

  async function fetchOnce() {
    const r = await api(path);
    if (ctl.stopped) return r;
    if (r.ok && r.data) cb.onView(r.data);
    else if (r.status === 404) cb.onMissing(r.message);
    else if (r.status !== 401) cb.onError(`Could not load the set: ${r.message}`);
    return r;
  }

  async function poll() {
    if (ctl.stopped) return;
    setMode('poll');
    const r = await fetchOnce();
    if (ctl.stopped) return;
    if (r.status === 404 || r.status === 401) {
      setMode('off');
      return;
    }
    if (r.ok && cb.isQuiet()) {
      setMode('off');
      return;
    }
    ctl.timer = setTimeout(poll, POLL_MS);
  }

  stream();

  return {
    stop() {
      ctl.stopped = true;
      clear();
    },
    kick() {
      if (ctl.stopped || ctl.mode !== 'off') return;
      ctl.failures = 0;
      stream();
    },
    refresh() {
      if (!ctl.stopped) fetchOnce();
    },
  };
}

/**
 * Parses text/event-stream from a ReadableStream (the WHATWG rules, minus `id`/`retry`):
 * lines end with CRLF, LF or CR; `field: value` (one space after the colon dropped); lines
 * starting with `:` are comments (keep-alives); a blank line ends an event, and an event
 * without data is not dispatched. A CR at the end of a chunk is held back: its LF may be the
 * first byte of the next chunk, and reading them apart would see a blank line that is not
 * there. Aborts `ac` when no byte arrives for SSE_IDLE_MS (a silently dead connection).
 */
async function* readEvents(body, ac) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = '';
  let type = '';
  let data = [];
  let idle = setTimeout(() => ac.abort(), SSE_IDLE_MS);
  try {
    for (;;) {
      const { value, done } = await reader.read();
      clearTimeout(idle);
      idle = setTimeout(() => ac.abort(), SSE_IDLE_MS);
      buf += done ? decoder.decode() : decoder.decode(value, { stream: true });
      let start = 0;
      for (;;) {
        const m = /\r\n|\r|\n/g;
        m.lastIndex = start;
        const hit = m.exec(buf);
        if (!hit) break;
        if (hit[0] === '\r' && hit.index === buf.length - 1 && !done) break; // wait for a LF
        const line = buf.slice(start, hit.index);
        start = hit.index + hit[0].length;
        if (line === '') {
          if (data.length) yield { type: type || 'message', data: data.join('\n') };
          type = '';
          data = [];
          continue;
        }
        if (line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let val = colon < 0 ? '' : line.slice(colon + 1);
        if (val.startsWith(' ')) val = val.slice(1);
        if (field === 'event') type = val;
        else if (field === 'data') data.push(val);
      }
      buf = buf.slice(start);
      if (done) return; // an unterminated last event is dropped, as the spec says
    }
  } finally {
    clearTimeout(idle);
    reader.cancel().catch(() => {});
  }
}

// ---- start -----------------------------------------------------------------------------------------

function start() {
  $('#signin-form').addEventListener('submit', onSignIn);
  $('#signout').addEventListener('click', () => signOut());
  // Another tab signed in or out: follow it, so this tab never shows the other user's data.
  window.addEventListener('storage', (ev) => {
    if (ev.key === null || ev.key === TOKEN_KEY) {
      stopPage();
      optimistic.clear();
      holds.clear();
      renderAccount();
      route();
    } else if (ev.key === CREDITS_KEY && getToken()) {
      const b = readCachedBalance(getToken());
      if (b !== null) renderCredits('value', b);
    }
  });
  window.addEventListener('hashchange', () => {
    route();
    // Move focus to the new page for keyboard and screen-reader users, unless the page
    // already focused one of its own controls (the form focuses its first field).
    const view = $('#view');
    if (!view.contains(document.activeElement)) view.focus({ preventScroll: true });
  });
  renderAccount();
  route();
}

start();
