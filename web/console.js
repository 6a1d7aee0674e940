/* agenthost console: polls this agent's HTTP API and sends cluster commands (docs/CONSOLE.md).
 *
 * Rules this file keeps: every value that comes from the API reaches the page through
 * textContent (or an attribute set with setAttribute/dataset), never parsed as HTML; the
 * page is updated in place (text changed only when it differs, table rows kept by key), so a
 * refresh never rebuilds it; the API token lives in sessionStorage and travels only in the
 * Authorization header. */
'use strict';

(function () {
  const REFRESH_MS = 1500;
  const PROGRESS_MS = 500;
  const HISTORY_PAGE = 20;
  const HISTORY_MAX = 1000;
  const WAIT_S = 30;
  const TOKEN_KEY = 'agenthost.token';
  const BADGES = ['running', 'pause', 'paused', 'starting', 'stopping', 'stopped', 'shutdown',
                  'connected', 'disconnected', 'lost'];
  const NAMES = { pause: 'Pause', resume: 'Resume', shutdown: 'Shutdown', running: 'Resume' };

  const $ = (id) => document.getElementById(id);

  const view = {
    control: null,   /* last /api/cluster/control-state body */
    fleet: null,     /* last /api/cluster/agents body, null when not available */
    fleetMissing: false, /* this agent has no /api/cluster/agents: not asked again */
    scopesMissing: false, /* this agent has no /api/cluster/scopes: not asked again */
    historyPage: 0,
    busy: false,
  };

  /* ---- writing to the page (text only) ------------------------------------------------ */

  function setText(node, value) {
    const text = value === null || value === undefined || value === '' ? '—' : String(value);
    if (node.textContent !== text) {
      node.textContent = text;
    }
  }

  function setHidden(node, hidden) {
    if (node.hidden !== hidden) {
      node.hidden = hidden;
    }
  }

  function setBadge(node, word) {
    setText(node, word);
    for (const b of BADGES) {
      node.classList.toggle(b, b === word);
    }
  }

  function setProblem(node, message) {
    setHidden(node, !message);
    if (message) {
      setText(node, message);
    }
  }

  /* Builds a row of `cells` empty cells; `numeric` lists the right-aligned ones. */
  function newRow(cells, numeric, classes) {
    const tr = document.createElement('tr');
    for (let i = 0; i < cells; i++) {
      const td = document.createElement('td');
      if (numeric.includes(i)) {
        td.className = 'num';
      }
      if (classes[i]) {
        td.classList.add(classes[i]);
      }
      tr.appendChild(td);
    }
    return tr;
  }

  /* Makes tbody hold one row per item, in order, reusing the row of the same key. */
  function syncRows(tbody, items, keyOf, build, update) {
    const existing = new Map();
    for (const tr of Array.from(tbody.rows)) {
      existing.set(tr.dataset.key, tr);
    }
    items.forEach((item, i) => {
      const key = String(keyOf(item));
      let tr = existing.get(key);
      if (tr) {
        existing.delete(key);
      } else {
        tr = build();
        tr.dataset.key = key;
      }
      update(tr, item);
      if (tbody.rows[i] !== tr) {
        tbody.insertBefore(tr, tbody.rows[i] || null);
      }
    });
    for (const tr of existing.values()) {
      tr.remove();
    }
  }

  /* ---- formatting ---------------------------------------------------------------------- */

  function duration(seconds) {
    const s = Math.round(seconds);
    if (s < 90) return s + ' s';
    if (s < 90 * 60) return Math.round(s / 60) + ' min';
    if (s < 48 * 3600) return Math.round(s / 3600) + ' h';
    return Math.round(s / 86400) + ' d';
  }

  function relative(iso) {
    const t = Date.parse(iso);
    if (Number.isNaN(t)) return '';
    const s = (Date.now() - t) / 1000;
    if (s < -1.5) return 'in ' + duration(-s);
    return s < 1.5 ? 'just now' : duration(s) + ' ago';
  }

  /* "2026-11-29 22:40:01Z (3 s ago)" from an ISO 8601 UTC timestamp; null stays null. */
  function when(iso) {
    if (typeof iso !== 'string' || iso === '') return null;
    const short = iso.replace('T', ' ').replace(/\.\d+Z$/, 'Z');
    const rel = relative(iso);
    return rel ? short + ' (' + rel + ')' : short;
  }

  function commandName(command) {
    return NAMES[command] || String(command);
  }

  function clock() {
    return new Date().toLocaleTimeString([], { hour12: false });
  }

  /* ---- the API ------------------------------------------------------------------------- */

  /* One request; never throws. {status, body, error, sentToken}: status 0 when the agent could
   * not be reached, error the API's message (or a description) when the status is not 2xx. */
  async function api(method, path) {
    const headers = { Accept: 'application/json' };
    const token = method === 'POST' ? sessionStorage.getItem(TOKEN_KEY) : null;
    if (token) {
      headers.Authorization = 'Bearer ' + token;
    }
    let res;
    try {
      res = await fetch(path, { method, headers, cache: 'no-store', credentials: 'omit' });
    } catch (e) {
      return { status: 0, body: null, error: 'cannot reach the agent', sentToken: !!token };
    }
    let body = null;
    try {
      body = await res.json();
    } catch (e) {
      body = null;
    }
    let error = null;
    if (!res.ok) {
      error = body && typeof body.error === 'string' ? body.error : 'HTTP ' + res.status;
    }
    return { status: res.status, body, error, sentToken: !!token };
  }

  /* ---- rendering each source ----------------------------------------------------------- */

  function renderControl(r, stats) {
    const problem = $('cluster-problem');
    if (r.error) {
      setProblem(problem, r.error);
      return;
    }
    setProblem(problem, null);
    const c = r.body;
    view.control = c;
    setBadge($('cluster-command'), c.command);
    setText($('cluster-version'), c.version);
    setText($('cluster-by'), c.updated_by);
    setText($('cluster-reason'), c.reason);
    setText($('cluster-when'), when(c.timestamp));
    const expires = c.expires_at || (stats.body && stats.body.expires_at) || null;
    setHidden($('cluster-expires-row'), !expires);
    if (expires) {
      setText($('cluster-expires'), when(expires));
    }
    const drain = typeof c.drain === 'number' ? c.drain : null;
    setHidden($('cluster-drain-row'), drain === null);
    if (drain !== null) {
      setText($('cluster-drain'), duration(drain) + ' after the command (then waits are cancelled)');
    }
    document.title = c.command + ' v' + c.version + ' · agenthost console';
  }

  function renderStore(mongo, stats) {
    if (mongo.error) {
      setBadge($('store-status'), 'unknown');
      setText($('store-error'), mongo.error);
      return;
    }
    const m = mongo.body;
    setBadge($('store-status'), m.status);
    setText($('store-backend'), m.database ? m.backend + ' (' + m.database + ')' : m.backend);
    setText($('store-topology'), m.topology);
    let watch = m.watch_mode;
    if (stats.body && typeof stats.body.polling_interval === 'number') {
      watch = (watch || 'polling') + ' (every ' + stats.body.polling_interval + ' s)';
    }
    setText($('store-watch'), watch);
    setText($('store-latency'),
            typeof m.latency_ms === 'number' ? m.latency_ms.toFixed(1) + ' ms' : null);
    setText($('store-error'),
            m.last_error ? m.last_error + (m.last_error_at ? ' — ' + when(m.last_error_at) : '')
                         : 'none');
  }

  function renderAgent(r) {
    if (r.error) {
      setBadge($('agent-state'), 'unknown');
      return;
    }
    const a = r.body;
    setText($('served-by'), a.agent_id);
    setText($('agent-id'), a.agent_id);
    setBadge($('agent-state'), a.state);
    setText($('agent-applied'), a.applied_version);
    setText($('agent-override'), a.local_override ? 'yes (a local command)' : 'no');
    setText($('agent-batches'), a.batches);
    setText($('agent-errors'), a.errors);
    setText($('agent-uptime'), typeof a.uptime_s === 'number' ? duration(a.uptime_s) : null);
  }

  function fleetSummary(f) {
    const s = f.summary || {};
    const states = s.states || {};
    const parts = [(s.total || 0) + (s.total === 1 ? ' agent' : ' agents')];
    for (const name of Object.keys(states).sort()) {
      parts.push(states[name] + ' ' + name);
    }
    parts.push((s.applied_current || 0) + ' of ' + (s.total || 0) + ' on version ' + f.version);
    parts.push((s.stale || 0) + ' stale');
    return parts.join(' · ');
  }

  function renderFleet(r) {
    const problem = $('fleet-problem');
    if (r.status === 404) {
      view.fleet = null;
      view.fleetMissing = true;
      setText($('fleet-summary'), 'This agent does not list the fleet.');
      setProblem(problem, null);
      syncRows($('fleet-rows'), [], null, null, null);
      return;
    }
    if (r.error) {
      setProblem(problem, r.error);
      return;
    }
    setProblem(problem, null);
    const f = r.body;
    view.fleet = f;
    setText($('fleet-summary'), fleetSummary(f));
    syncRows($('fleet-rows'), f.agents || [], (a) => a.agent_id,
             () => newRow(10, [5, 6], { 8: 'labels' }), (tr, a) => {
               const behind = typeof a.applied_version === 'number' &&
                              a.applied_version < f.version;
               tr.classList.toggle('stale', !!a.stale);
               tr.classList.toggle('behind', !a.stale && behind);
               const c = tr.cells;
               setText(c[0], a.agent_id);
               let badge = c[1].firstChild;
               if (!badge) {
                 badge = document.createElement('span');
                 badge.className = 'badge';
                 c[1].appendChild(badge);
               }
               /* A stale agent that did not stop is lost: what it last said, in grey. */
               const lost = !!a.stale && a.state !== 'stopped';
               setBadge(badge, lost ? 'lost' : a.state);
               let last = c[1].querySelector('.last-state');
               if (!last) {
                 last = document.createElement('span');
                 last.className = 'last-state';
                 c[1].appendChild(last);
               }
               setText(last, lost ? ' last: ' + a.state : '');
               setHidden(last, !lost);
               setText(c[2], behind ? a.applied_version + ' (behind ' + f.version + ')'
                                    : a.applied_version);
               setText(c[3], a.stale ? 'STALE' : 'no');
               c[3].classList.toggle('flag', !!a.stale);
               c[2].classList.toggle('lag', behind);
               setText(c[4], when(a.last_seen));
               setText(c[5], a.batches);
               setText(c[6], a.errors);
               setText(c[7], a.host ? a.host + (a.pid ? ' (pid ' + a.pid + ')' : '') : null);
               setText(c[8], Object.keys(a.labels || {}).filter((k) => k !== 'agent').sort()
                 .map((k) => k + '=' + a.labels[k]).join(', '));
               /* the leases it holds (agent.lease, agent.every): names, as text */
               setText(c[9], Array.isArray(a.leases) ? a.leases.join(', ') : '');
             });
  }

  function renderScopes(r) {
    const problem = $('scopes-problem');
    if (r.status === 404) {
      view.scopesMissing = true;
      setText($('scopes-summary'), 'This agent does not list scopes.');
      return;
    }
    if (r.error) {
      setProblem(problem, r.error);
      return;
    }
    setProblem(problem, null);
    const scopes = r.body.scopes || [];
    setText($('scopes-summary'), scopes.length === 0
      ? 'No scopes: pause part of the fleet with a selector above.'
      : scopes.length + (scopes.length === 1 ? ' scope' : ' scopes') + ', ' +
        (r.body.active || 0) + ' holding agents');
    syncRows($('scopes-rows'), scopes, (x) => x.selector,
             () => {
               const tr = newRow(7, [2, 3, 4], { 5: 'reason' });
               const button = document.createElement('button');
               button.type = 'button';
               button.textContent = 'Resume';
               button.addEventListener('click', () => runCommand('resume', tr.dataset.key));
               tr.cells[6].appendChild(button);
               return tr;
             },
             (tr, x) => {
               const c = tr.cells;
               setText(c[0], x.selector);
               let badge = c[1].firstChild;
               if (!badge) {
                 badge = document.createElement('span');
                 badge.className = 'badge';
                 c[1].appendChild(badge);
               }
               setBadge(badge, x.command);
               setText(c[2], x.version);
               setText(c[3], x.matched);
               setText(c[4], x.holds);
               setText(c[5], x.reason);
               const button = c[6].firstChild;
               button.setAttribute('aria-label', 'Resume ' + x.selector);
               setHidden(button, x.command === 'running');
             });
  }

  function renderHistory(r, limit) {
    const problem = $('history-problem');
    if (r.error) {
      setProblem(problem, r.error);
      return;
    }
    setProblem(problem, null);
    const entries = r.body.entries || [];
    const first = view.historyPage * HISTORY_PAGE;
    const page = entries.slice(first, first + HISTORY_PAGE);
    syncRows($('history-rows'), page, (e) => (e.selector || '') + ':' + e.version,
             () => newRow(6, [0], { 5: 'reason' }),
             (tr, e) => {
               const c = tr.cells;
               setText(c[0], e.version);
               let command = e.command;
               if (e.selector) command += ' (' + e.selector + ')';
               if (typeof e.drain === 'number') command += ' (drain ' + duration(e.drain) + ')';
               setText(c[1], command);
               setText(c[2], when(e.timestamp));
               setText(c[3], e.updated_by);
               setText(c[4], e.agent_id);
               setText(c[5], e.reason);
             });
    const more = entries.length >= limit && limit < HISTORY_MAX;
    $('history-older').setAttribute('aria-disabled', String(!more));
    $('history-newer').setAttribute('aria-disabled', String(view.historyPage === 0));
    setText($('history-page'), page.length === 0
      ? 'Page ' + (view.historyPage + 1) + ' (no entries)'
      : 'Page ' + (view.historyPage + 1) + ' (entries ' + (first + 1) + '–' +
        (first + page.length) + ')');
  }

  /* ---- the refresh loop ---------------------------------------------------------------- */

  let timer = null;
  let refreshing = false; /* one refresh at a time */
  let again = false;      /* loop() was called during a refresh: run another one right after */

  async function refresh() {
    const limit = Math.min((view.historyPage + 1) * HISTORY_PAGE, HISTORY_MAX);
    const [control, stats, mongo, agent, history, fleet, scopes] = await Promise.all([
      api('GET', '/api/cluster/control-state'),
      api('GET', '/api/cluster/stats'),
      api('GET', '/api/mongo/status'),
      api('GET', '/api/agent/state'),
      api('GET', '/api/cluster/history?limit=' + limit),
      view.fleetMissing ? { status: 404 } : api('GET', '/api/cluster/agents'),
      view.scopesMissing ? { status: 404 } : api('GET', '/api/cluster/scopes'),
    ]);
    renderControl(control, stats);
    renderStore(mongo, stats);
    renderAgent(agent);
    renderHistory(history, limit);
    renderFleet(fleet);
    renderScopes(scopes);
    const status = $('refresh-status');
    if (agent.status === 0) {
      setText(status, 'Cannot reach the agent (last try ' + clock() + ')');
      status.classList.add('failing');
    } else {
      setText(status, 'Updated ' + clock());
      status.classList.remove('failing');
    }
  }

  /* Refreshes now, then every REFRESH_MS; a call during a refresh asks for one more. */
  function loop() {
    clearTimeout(timer);
    if (refreshing) {
      again = true;
      return;
    }
    refreshing = true;
    refresh().catch(showBug).finally(() => {
      refreshing = false;
      if (again) {
        again = false;
        loop();
      } else {
        timer = setTimeout(loop, REFRESH_MS);
      }
    });
  }

  /* ---- messages ------------------------------------------------------------------------ */

  function showError(message) {
    setText($('error-text'), message);
    setHidden($('error'), false);
  }

  function hideError() {
    setHidden($('error'), true);
  }

  function showBug(e) {
    showError('Console error: ' + (e && e.message ? e.message : String(e)));
  }

  function setProgress(text, detail, fraction, outcome) {
    const box = $('progress');
    setHidden(box, false);
    setText($('progress-text'), text);
    $('progress-detail').textContent = detail || '';
    const bar = $('progress-bar');
    if (fraction === null) {
      bar.removeAttribute('value');
    } else {
      bar.value = fraction;
    }
    box.classList.toggle('done', outcome === 'done');
    box.classList.toggle('late', outcome === 'late');
  }

  /* ---- dialogs ------------------------------------------------------------------------- */

  /* Opens `dialog` modally; resolves with true when closed by its submit button. */
  function ask(dialog) {
    return new Promise((resolve) => {
      dialog.returnValue = '';
      dialog.addEventListener('close', () => resolve(dialog.returnValue === 'ok'),
                              { once: true });
      dialog.showModal();
    });
  }

  /* Asks for the token after a 401; stores and returns it, or null when cancelled. */
  async function askToken(rejected, error) {
    const input = $('token-input');
    input.value = '';
    setText($('token-message'), rejected
      ? 'The token was rejected (' + error + '). Enter the API token again.'
      : 'This agent requires an API token for commands (' + error + ').');
    const ok = await ask($('token-dialog'));
    const token = input.value;
    input.value = '';
    if (!ok || token === '') {
      return null;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    return token;
  }

  /* The fleet a shutdown stops: the last /api/cluster/agents body, or for a scoped shutdown
   * the agents its selector matches (read now: the agent matches labels as the command will).
   * { summary } | { summary: null } when the fleet is not known | { error } (a bad selector). */
  async function fleetToStop(selector) {
    if (!selector) {
      return { summary: view.fleet && view.fleet.summary ? view.fleet.summary : null };
    }
    if (view.fleetMissing) {
      return { summary: null };
    }
    const r = await api('GET', '/api/cluster/agents?selector=' + encodeURIComponent(selector));
    if (r.status === 400) {
      return { error: r.error };
    }
    return { summary: r.status === 200 && r.body && r.body.summary ? r.body.summary : null };
  }

  /* Asks before a shutdown, naming how many agents stop; false when the operator cancelled or
   * the selector is malformed (the error is shown, nothing is sent). */
  async function confirmShutdown(selector) {
    const fleet = await fleetToStop(selector);
    if (fleet.error) {
      showError('Shutdown not sent: ' + fleet.error + '.');
      $('selector').focus();
      return false;
    }
    const summary = fleet.summary;
    const ok = $('confirm-ok');
    const who = selector ? ' matching ' + selector : '';
    if (summary === null) {
      setText($('confirm-message'),
              (selector ? 'Every agent matching ' + selector : 'Every agent') +
              ' watching this control store will stop (this agent cannot list them). Agents ' +
              'do not restart by themselves.');
      setText(ok, selector ? 'Shut down agents' + who : 'Shut down all agents');
    } else {
      const n = (summary.total || 0) - ((summary.states || {}).stopped || 0);
      const stale = summary.stale || 0;
      setText($('confirm-message'),
              n + (n === 1 ? ' agent' : ' agents') + who + ' will stop' +
              (stale ? ' (' + stale + ' of them stale: not heard from lately, maybe gone)' : '') +
              '. Agents do not restart by themselves.');
      setText(ok, 'Shut down ' + n + (n === 1 ? ' agent' : ' agents') + who);
    }
    return ask($('confirm-dialog'));
  }

  /* ---- commands ------------------------------------------------------------------------ */

  /* Polls the agents that have not applied `version` while a command waits. */
  function trackProgress(label, version) {
    if (view.fleetMissing) {
      return () => {};
    }
    let stopped = false;
    let busy = false;
    const tick = async () => {
      if (stopped || busy) return;
      busy = true;
      const r = await api('GET', '/api/cluster/agents?version=' + version);
      busy = false;
      if (stopped || r.error || !r.body || !r.body.summary) return;
      const states = r.body.summary.states || {};
      /* Live agents only: a stopped or lost one is never waited for (nor counted). */
      const total = (r.body.summary.total || 0) - (states.stopped || 0) - (states.lost || 0);
      const behind = r.body.agents || [];
      const pending = behind.filter((a) => a.state !== 'stopped' && !a.stale);
      const lost = behind.filter((a) => a.state !== 'stopped' && a.stale);
      const applied = Math.max(0, total - pending.length);
      const detail = (pending.length ? 'Waiting for ' + pending.map((a) => a.agent_id).join(', ') +
                                       '. '
                                     : '') +
                     (lost.length ? 'Not waited for (lost): ' +
                                    lost.map((a) => a.agent_id).join(', ') + '.'
                                  : '');
      setProgress(label + ': ' + applied + ' of ' + total + ' live agents applied', detail.trim(),
                  total ? applied / total : null, null);
    };
    const id = setInterval(tick, PROGRESS_MS);
    tick();
    return () => {
      stopped = true;
      clearInterval(id);
    };
  }

  function conflictMessage(command, r) {
    let text = commandName(command) + ' not sent: someone else changed the cluster command (' +
               r.error + ').';
    const c = r.body && r.body.current;
    if (c && typeof c === 'object') {
      text += '\nNow: ' + c.command + ' (version ' + c.version + ') by ' + c.updated_by +
              (c.timestamp ? ', ' + when(c.timestamp) : '') +
              (c.reason ? ', reason: ' + c.reason : '') +
              '.\nCheck the new state, then try again.';
    }
    return text;
  }

  function finish(command, r) {
    const b = r.body || {};
    const label = commandName(command) + (b.selector ? ' ' + b.selector : '') +
                  ' (version ' + b.version + ')';
    const w = b.wait;
    if (!w) {
      setProgress(label + ' issued', b.propagation || '', 1, 'done');
      return;
    }
    if (b.selector && command === 'resume' && b.held === false) {
      setProgress(label + ': the scope held no agent', b.message || '', 1, 'done');
      return;
    }
    const acked = w.acknowledged || [];
    const pending = w.pending || [];
    const total = acked.length + pending.length;
    const secs = typeof w.waited_s === 'number' ? w.waited_s.toFixed(2) + ' s' : '';
    const excluded = w.excluded && w.excluded.length
      ? ' Not waited for (stale, stopping or stopped): ' + w.excluded.join(', ') + '.' : '';
    /* a shutdown counts the agents that stopped (or are stopping after applying it) */
    const done = acked.length + ' of ' + total +
                 (command === 'shutdown' ? ' stopped' : ' live agents applied');
    if (w.complete) {
      setProgress(label + ': ' + done, 'Complete in ' + secs + '.' + excluded, 1, 'done');
    } else {
      setProgress(label + ': ' + done + ' — timed out',
                  'Not applied after ' + secs + ': ' + pending.join(', ') + '.' + excluded,
                  total ? acked.length / total : 0, 'late');
    }
  }

  /* scope: the selector of a scope's Resume button; otherwise the selector field's. */
  async function runCommand(command, scope) {
    if (view.busy) return;
    hideError();
    const control = view.control;
    if (!control) {
      showError('The cluster state is not known yet: nothing was sent.');
      return;
    }
    const params = new URLSearchParams();
    const reason = $('reason').value.trim();
    if (reason) params.set('reason', reason);
    params.set('updated_by', 'console');
    if (command === 'pause' || command === 'shutdown') {
      const d = $('drain').value.trim();
      if (d) {
        if (!/^\d+(\.\d+)?[smh]?$/.test(d)) {
          showError('Drain within: expected a duration such as 30s or 2m (got "' + d + '").');
          $('drain').focus();
          return;
        }
        params.set('drain', d);
      }
    }
    if (command === 'pause') {
      const d = $('duration').value.trim();
      if (d) {
        if (!/^\d+(\.\d+)?[smh]?$/.test(d)) {
          showError('Pause for: expected a duration such as 90s, 15m or 2h (got "' + d + '").');
          $('duration').focus();
          return;
        }
        params.set('for', d);
      }
    }
    const selector = scope !== undefined ? scope : $('selector').value.trim();
    if (selector) {
      /* a scope has its own version: no if_version against the cluster's */
      params.set('selector', selector);
    } else {
      params.set('if_version', String(control.version));
    }
    params.set('wait', String(WAIT_S));
    if (command === 'shutdown' && !(await confirmShutdown(selector))) {
      return;
    }
    setBusy(true);
    const label = selector ? commandName(command) + ' ' + selector
                           : commandName(command) + ' (version ' + (control.version + 1) + ')';
    setProgress(label + ': sending…', '', null, null);
    const stopTracking = selector ? () => {} : trackProgress(label, control.version + 1);
    try {
      const path = '/api/cluster/' + command + '?' + params.toString();
      let r = await api('POST', path);
      while (r.status === 401) {
        sessionStorage.removeItem(TOKEN_KEY);
        showError(commandName(command) + ' not sent: ' + r.error + ' (401).');
        if ((await askToken(r.sentToken, r.error)) === null) {
          break;
        }
        hideError();
        r = await api('POST', path);
      }
      stopTracking();
      if (r.status === 401) {
        setHidden($('progress'), true);
      } else if (r.status === 409) {
        setHidden($('progress'), true);
        showError(conflictMessage(command, r));
        if (r.body && r.body.current) {
          renderControl({ body: r.body.current }, {});
        }
      } else if (command === 'shutdown' && (r.status === 0 || r.status === 503)) {
        setProgress(label + ': ' + (r.status === 0 ? 'no answer' : r.error),
                    'The agent serving this page stops with the fleet, so it may not report ' +
                    'the outcome. Check from another agent.', null, 'late');
      } else if (r.error) {
        setHidden($('progress'), true);
        showError(commandName(command) + ' failed (' + (r.status || 'no answer') + '): ' +
                  r.error);
      } else {
        finish(command, r);
        $('reason').value = '';
        $('duration').value = '';
        $('drain').value = '';
        if (scope === undefined) {
          $('selector').value = '';
        }
      }
    } finally {
      stopTracking();
      setBusy(false);
      loop();
    }
  }

  function setBusy(busy) {
    view.busy = busy;
    for (const id of ['pause-button', 'resume-button', 'shutdown-button']) {
      $(id).setAttribute('aria-disabled', String(busy));
    }
    for (const button of $('scopes-rows').querySelectorAll('button')) {
      button.setAttribute('aria-disabled', String(busy));
    }
  }

  /* ---- wiring -------------------------------------------------------------------------- */

  function start() {
    $('actions').addEventListener('submit', (ev) => {
      ev.preventDefault();
      runCommand('pause');
    });
    $('resume-button').addEventListener('click', () => runCommand('resume'));
    $('shutdown-button').addEventListener('click', () => runCommand('shutdown'));
    $('error-dismiss').addEventListener('click', hideError);
    $('token-cancel').addEventListener('click', () => $('token-dialog').close('cancel'));
    $('confirm-cancel').addEventListener('click', () => $('confirm-dialog').close('cancel'));
    $('history-older').addEventListener('click', () => {
      if ($('history-older').getAttribute('aria-disabled') === 'true') return;
      view.historyPage++;
      loop();
    });
    $('history-newer').addEventListener('click', () => {
      if (view.historyPage === 0) return;
      view.historyPage--;
      loop();
    });
    loop();
  }

  document.addEventListener('DOMContentLoaded', start);
})();
