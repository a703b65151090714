#!/usr/bin/env node
// Load test of the sandbox EHR at hospital-day size: N Communications stored, then conditional creates,
// _lastUpdated polls and write-back transaction Bundles, each timed over HTTP against a real server.
//
//   node integrations/sandbox/bench/perf.mjs [--n 100000] [--creates 1000] [--polls 100] [--writebacks 100]
//                                            [--notify-rate 200 --notify-seconds 20] [--server path/to/server.mjs]
//
// With --notify-rate, a full-resource Subscription delivers to a receiver in this process while chat
// messages arrive at that rate (batch Bundles every 100 ms, as a chatbot gateway sends them): notification
// latency (commit -> received) and the batch POST latency are reported.
//
// Prints one JSON object. --server lets the same load run against another version of server.mjs (it must
// sit next to node_modules, e.g. a copy inside integrations/sandbox/).

import { once } from 'node:events';
import http from 'node:http';
import { parseArgs } from 'node:util';
import { SERVER, startServer, stopServer } from '../launch.mjs';

const { values: opts } = parseArgs({
  options: {
    server: { type: 'string', default: SERVER },
    n: { type: 'string', default: '100000' },
    creates: { type: 'string', default: '1000' },
    polls: { type: 'string', default: '100' },
    writebacks: { type: 'string', default: '100' },
    batch: { type: 'string', default: '1000' },
    'notify-rate': { type: 'string', default: '0' },
    'notify-seconds': { type: 'string', default: '20' },
  },
});
const N = Number(opts.n);
const CREATES = Number(opts.creates);
const POLLS = Number(opts.polls);
const WRITEBACKS = Number(opts.writebacks);
const BATCH = Number(opts.batch);

const MSG = 'http://hospital.example.org/chat-message';
const SESSION = 'http://hospital.example.org/chat-session';
const CDS = 'https://psych-cds.example.org/fhir';

function chat(i, prefix = 'M') {
  return {
    resourceType: 'Communication',
    status: 'completed',
    identifier: [
      { system: SESSION, value: `S-${i % 2000}` },
      { system: MSG, value: `${prefix}-${i}` },
    ],
    category: [{ text: 'counselling-chat' }],
    subject: { reference: `Patient/p-${i % 2000}` },
    sender: { reference: `Patient/p-${i % 2000}` },
    sent: '2026-11-20T03:00:00Z',
    payload: [{ contentString: `message ${i}: work was long today, I am tired but ok` }],
  };
}

function writeback(i) {
  const ident = (kind) => ({ system: `${CDS}/${kind}`, value: `wb-${i}` });
  const entry = (fullUrl, resource) => ({
    fullUrl,
    resource,
    request: {
      method: 'POST',
      url: resource.resourceType,
      ifNoneExist: `identifier=${resource.identifier[0].system}|${resource.identifier[0].value}`,
    },
  });
  const subject = { reference: `Patient/p-${i % 2000}` };
  return {
    resourceType: 'Bundle',
    type: 'transaction',
    entry: [
      entry(`urn:uuid:00000000-0000-4000-8000-${String(i).padStart(12, '0')}`, {
        resourceType: 'RiskAssessment',
        identifier: [ident('assessment')],
        status: 'final',
        subject,
        prediction: [{ outcome: { text: 'high' }, probabilityDecimal: 40 }],
      }),
      entry(`urn:uuid:00000000-0000-4000-9000-${String(i).padStart(12, '0')}`, {
        resourceType: 'Flag',
        identifier: [ident('alert')],
        status: 'active',
        code: { text: 'Suicide risk: high' },
        subject,
      }),
      entry(`urn:uuid:00000000-0000-4000-a000-${String(i).padStart(12, '0')}`, {
        resourceType: 'Communication',
        identifier: [ident('alert-communication')],
        status: 'completed',
        subject,
        payload: [{ contentString: 'High suicide risk: see psych-cds' }],
      }),
    ],
  };
}

async function request(url, init = {}) {
  const res = await fetch(url, init);
  const body = await res.json();
  if (!res.ok) throw new Error(`${init.method ?? 'GET'} ${url}: ${res.status} ${JSON.stringify(body).slice(0, 300)}`);
  return body;
}

const post = (url, body, headers = {}) =>
  request(url, {
    method: 'POST',
    headers: { 'Content-Type': 'application/fhir+json', ...headers },
    body: JSON.stringify(body),
  });

const pct = (values, p) => {
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.round((p / 100) * (sorted.length - 1)))];
};

// Subscription delivery under a steady stream: receiver here, latency from meta.lastUpdated to arrival.
async function notifyLoad(rate, seconds) {
  const BACKPORT = 'http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition';
  const seen = new Map(); // event number -> count
  const latencies = [];
  let notifications = 0;
  const receiver = http.createServer(async (req, res) => {
    const chunks = [];
    for await (const c of req) chunks.push(c);
    const arrived = Date.now();
    const bundle = JSON.parse(Buffer.concat(chunks).toString());
    notifications++;
    for (const p of bundle.entry[0].resource.parameter.filter((x) => x.name === 'notification-event')) {
      const n = p.part.find((x) => x.name === 'event-number').valueString;
      seen.set(n, (seen.get(n) ?? 0) + 1);
      latencies.push(arrived - Date.parse(p.part.find((x) => x.name === 'timestamp').valueInstant));
    }
    res.writeHead(200).end();
  });
  receiver.listen(0, '127.0.0.1');
  await once(receiver, 'listening');
  const sub = await post(`${srv.fhir}/Subscription`, {
    resourceType: 'Subscription',
    status: 'requested',
    reason: 'perf',
    criteria: 'http://psych-cds.example.org/fhir/SubscriptionTopic/patient-input',
    _criteria: { extension: [{ url: `${BACKPORT}/backport-filter-criteria`, valueString: 'Communication?status=completed' }] },
    channel: {
      type: 'rest-hook',
      endpoint: `http://127.0.0.1:${receiver.address().port}/notify`,
      payload: 'application/fhir+json',
      header: ['Authorization: Bearer perf'],
      _payload: { extension: [{ url: `${BACKPORT}/backport-payload-content`, valueCode: 'full-resource' }] },
    },
  });
  for (let i = 0; i < 200; i++) {
    if ((await request(`${srv.fhir}/Subscription/${sub.id}`)).status === 'active') break;
    await new Promise((r) => setTimeout(r, 20));
  }
  const perTick = Math.max(1, Math.round(rate / 10));
  const ticks = Math.round(seconds * 10);
  const postMs = [];
  const t0 = performance.now();
  for (let t = 0; t < ticks; t++) {
    const delay = t0 + t * 100 - performance.now();
    if (delay > 0) await new Promise((r) => setTimeout(r, delay));
    const entry = [];
    for (let i = 0; i < perTick; i++) {
      entry.push({ resource: chat(t * perTick + i, 'N'), request: { method: 'POST', url: 'Communication' } });
    }
    const s0 = performance.now();
    await post(srv.fhir, { resourceType: 'Bundle', type: 'batch', entry });
    postMs.push(performance.now() - s0);
  }
  const total = ticks * perTick;
  for (let i = 0; i < 500 && latencies.length < total; i++) await new Promise((r) => setTimeout(r, 20));
  receiver.close();
  return {
    offered_per_s: rate,
    seconds,
    events: total,
    received: latencies.length,
    duplicated: [...seen.values()].filter((n) => n > 1).length,
    notifications,
    events_per_notification: Math.round((latencies.length / notifications) * 10) / 10,
    latency_p50_ms: pct(latencies, 50),
    latency_p99_ms: pct(latencies, 99),
    batch_post_p50_ms: Math.round(pct(postMs, 50)),
    batch_post_p99_ms: Math.round(pct(postMs, 99)),
  };
}

async function timed(fn) {
  const t0 = performance.now();
  const extra = await fn();
  return { s: Math.round(performance.now() - t0) / 1000, ...(extra ?? {}) };
}

const srv = await startServer([], { server: opts.server, stderr: 'inherit' });
const results = { server: opts.server, communications: N };
try {
  let bound;
  results.load = await timed(async () => {
    for (let start = 0; start < N; start += BATCH) {
      const entry = [];
      for (let i = start; i < Math.min(N, start + BATCH); i++) {
        entry.push({ resource: chat(i), request: { method: 'POST', url: 'Communication' } });
      }
      const out = await post(srv.fhir, { resourceType: 'Bundle', type: 'batch', entry });
      const k = N - 500 - start;
      if (k >= 0 && k < entry.length) bound = out.entry[k].response.lastModified;
    }
  });
  bound ??= new Date(0).toISOString();

  results.conditional_creates = await timed(async () => {
    let created = 0;
    for (let i = 0; i < CREATES; i++) {
      // every 4th one repeats an earlier identifier: found, not created
      const id = i % 4 === 3 ? i - 1 : i;
      const res = await fetch(`${srv.fhir}/Communication`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/fhir+json', 'If-None-Exist': `identifier=${MSG}|W-${id}` },
        body: JSON.stringify(chat(id, 'W')),
      });
      await res.arrayBuffer();
      if (res.status === 201) created++;
      else if (res.status !== 200) throw new Error(`conditional create: ${res.status}`);
    }
    return { n: CREATES, created };
  });
  results.conditional_creates.per_s = Math.round(CREATES / results.conditional_creates.s);

  results.polls = await timed(async () => {
    let entries = 0;
    for (let i = 0; i < POLLS; i++) {
      const q = new URLSearchParams({ _lastUpdated: `ge${bound}`, _sort: '_lastUpdated', _count: '500' });
      const page = await request(`${srv.fhir}/Communication?${q}`);
      entries += page.entry?.length ?? 0;
      if (i === 0) results.poll_total = page.total;
    }
    return { n: POLLS, entries_per_poll: entries / POLLS };
  });
  results.polls.per_s = Math.round(POLLS / results.polls.s);

  results.writeback_transactions = await timed(async () => {
    for (let i = 0; i < WRITEBACKS; i++) await post(srv.fhir, writeback(i));
    return { n: WRITEBACKS, entries_each: 3 };
  });
  results.writeback_transactions.per_s = Math.round(WRITEBACKS / results.writeback_transactions.s);
  if (Number(opts['notify-rate']) > 0) results.notify = await notifyLoad(Number(opts['notify-rate']), Number(opts['notify-seconds']));
} finally {
  await stopServer(srv);
}
console.log(JSON.stringify(results, null, 2));
