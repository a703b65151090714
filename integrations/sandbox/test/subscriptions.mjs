// FHIR Subscriptions of the sandbox EHR (rest-hook, Subscriptions Backport IG on R4): a real server on a
// free port delivering to a real HTTP receiver in this process.
// Run: npm test --prefix integrations/sandbox

import assert from 'node:assert/strict';
import { once } from 'node:events';
import http from 'node:http';
import { after, before, beforeEach, describe, test } from 'node:test';
import { startServer, stopServer } from '../launch.mjs';

const BACKPORT = 'http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition';
const TOPIC = 'http://psych-cds.example.org/fhir/SubscriptionTopic/patient-input';
const FHIR_JSON = { 'Content-Type': 'application/fhir+json' };

let srv;
let receiver;

// The receiving end: records every POST; `failNext` answers that many with 503 first.
async function startReceiver() {
  const r = { received: [], failNext: 0, failures: 0 };
  r.server = http.createServer(async (req, res) => {
    const chunks = [];
    for await (const c of req) chunks.push(c);
    if (r.failNext > 0) {
      r.failNext--;
      r.failures++;
      res.writeHead(503).end();
      return;
    }
    r.received.push({ path: req.url, headers: req.headers, body: JSON.parse(Buffer.concat(chunks).toString()) });
    res.writeHead(200, { 'Content-Type': 'application/json' }).end('{}');
  });
  r.server.listen(0, '127.0.0.1');
  await once(r.server, 'listening');
  r.url = `http://127.0.0.1:${r.server.address().port}/fhir/notify`;
  return r;
}

const json = async (res) => ({ status: res.status, body: await res.json() });
const post = (path, body) =>
  fetch(`${srv.fhir}${path}`, { method: 'POST', headers: FHIR_JSON, body: JSON.stringify(body) }).then(json);
const put = (path, body) =>
  fetch(`${srv.fhir}${path}`, { method: 'PUT', headers: FHIR_JSON, body: JSON.stringify(body) }).then(json);
const get = (path) => fetch(`${srv.fhir}${path}`).then(json);
const admin = (method, path) => fetch(`${srv.root}${path}`, { method }).then(json);

async function until(check, what, timeoutMs = 5000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const got = await check();
    if (got) return got;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function subscription({ criteria = TOPIC, filters = [], content = 'full-resource', heartbeat, endpoint } = {}) {
  const topic = criteria.startsWith('http');
  return {
    resourceType: 'Subscription',
    status: 'requested',
    reason: 'test',
    criteria,
    ...(topic && filters.length
      ? { _criteria: { extension: filters.map((f) => ({ url: `${BACKPORT}/backport-filter-criteria`, valueString: f })) } }
      : {}),
    channel: {
      type: 'rest-hook',
      endpoint: endpoint ?? receiver.url,
      payload: 'application/fhir+json',
      header: ['Authorization: Bearer s3cret'],
      ...(topic
        ? {
            extension: heartbeat ? [{ url: `${BACKPORT}/backport-heartbeat-period`, valueUnsignedInt: heartbeat }] : [],
            _payload: { extension: [{ url: `${BACKPORT}/backport-payload-content`, valueCode: content }] },
          }
        : {}),
    },
  };
}

const chat = (text, category = 'counselling-chat', status = 'completed') => ({
  resourceType: 'Communication',
  status,
  category: [{ text: category }],
  subject: { reference: 'Patient/p-1' },
  payload: [{ contentString: text }],
});

const params = (bundle) => bundle.entry[0].resource.parameter;
const param = (bundle, name) => {
  const p = params(bundle).find((x) => x.name === name);
  return p && (p.valueCode ?? p.valueString ?? p.valueCanonical ?? p.valueReference?.reference);
};
const events = (bundle) =>
  params(bundle)
    .filter((p) => p.name === 'notification-event')
    .map((p) => Object.fromEntries(p.part.map((x) => [x.name, x.valueString ?? x.valueInstant ?? x.valueReference?.reference])));
const notifications = (type = 'event-notification') => receiver.received.filter((r) => param(r.body, 'type') === type);
const allEvents = () => notifications().flatMap((n) => events(n.body));

async function subscribe(options) {
  const created = await post('/Subscription', subscription(options));
  assert.equal(created.status, 201, JSON.stringify(created.body));
  assert.equal(created.body.status, 'requested');
  await until(async () => (await get(`/Subscription/${created.body.id}`)).body.status === 'active', 'active');
  return created.body.id;
}

before(async () => {
  [srv, receiver] = await Promise.all([startServer(), startReceiver()]);
});
after(async () => {
  await stopServer(srv);
  receiver.server.close();
});
beforeEach(async () => {
  await admin('POST', '/admin/reset');
  receiver.received.length = 0;
  receiver.failNext = 0;
  receiver.failures = 0;
});

describe('rest-hook subscriptions', () => {
  test('handshake with the channel headers, then active; $status and the admin view', async () => {
    const id = await subscribe();
    const [handshake] = receiver.received;
    assert.equal(handshake.headers.authorization, 'Bearer s3cret');
    assert.match(handshake.headers['content-type'], /^application\/fhir\+json/);
    assert.equal(handshake.body.type, 'history');
    assert.equal(param(handshake.body, 'type'), 'handshake');
    assert.equal(param(handshake.body, 'status'), 'requested');
    assert.equal(param(handshake.body, 'subscription'), `${srv.fhir}/Subscription/${id}`);
    assert.equal(param(handshake.body, 'topic'), TOPIC);
    assert.equal(param(handshake.body, 'events-since-subscription-start'), '0');
    assert.equal(handshake.body.entry[0].request.url, `${srv.fhir}/Subscription/${id}/$status`);
    const status = await get(`/Subscription/${id}/$status`);
    assert.equal(param(status.body, 'type'), 'query-status');
    assert.equal(param(status.body, 'status'), 'active');
    assert.equal((await get(`/Subscription?_id=${id}&status=active`)).body.total, 1);
    const state = (await admin('GET', '/admin/subscriptions')).body.subscriptions;
    assert.equal(state.length, 1);
    assert.equal(state[0].status, 'active');
  });

  test('full-resource events after each committed write, filter respected, numbers consecutive', async () => {
    await subscribe({ filters: ['Communication?category=counselling-chat'] });
    const a = (await post('/Communication', chat('one'))).body;
    await post('/Communication', chat('an alert', 'alert')); // filtered out
    const b = (await post('/Communication', chat('two'))).body;
    await put(`/Communication/${a.id}`, { ...a, status: 'stopped' }); // update: an event too
    const qr = (await post('/QuestionnaireResponse', { resourceType: 'QuestionnaireResponse', status: 'completed' })).body;
    await until(() => allEvents().length >= 4, '4 events');
    await new Promise((r) => setTimeout(r, 150));
    const got = allEvents();
    assert.deepEqual(got.map((e) => e.focus.split('/fhir/')[1].split('/_history')[0]), [
      `Communication/${a.id}`,
      `Communication/${b.id}`,
      `Communication/${a.id}`,
      `QuestionnaireResponse/${qr.id}`,
    ]);
    assert.deepEqual(got.map((e) => e['event-number']), ['1', '2', '3', '4']);
    const first = notifications()[0].body;
    const entry = first.entry[1];
    assert.equal(entry.fullUrl, `${srv.fhir}/Communication/${a.id}`);
    assert.equal(entry.resource.id, a.id);
    assert.deepEqual(entry.request, { method: 'POST', url: 'Communication' });
    assert.equal(entry.response.status, '201');
    assert.equal(events(first)[0].focus, `${srv.fhir}/Communication/${a.id}/_history/${a.meta.versionId}`);
    assert.equal(events(first)[0].timestamp, a.meta.lastUpdated);
  });

  test('id-only and classic R4 criteria', async () => {
    const idOnly = await subscribe({ content: 'id-only' });
    const classic = await subscribe({ criteria: 'Communication?category=alert' });
    const alert = (await post('/Communication', chat('alert', 'alert'))).body;
    await until(() => notifications().length >= 2, 'two notifications');
    const bySub = (id) => notifications().find((n) => param(n.body, 'subscription').endsWith(`/${id}`)).body;
    const a = bySub(idOnly);
    assert.equal(a.entry.length, 2);
    assert.equal(a.entry[1].resource, undefined);
    assert.equal(a.entry[1].fullUrl, `${srv.fhir}/Communication/${alert.id}`);
    const c = bySub(classic);
    assert.equal(param(c, 'topic'), undefined);
    assert.equal(c.entry[1].resource.id, alert.id); // classic with a payload MIME type: the resource
  });

  test('a transaction notifies after it commits; a rolled-back one notifies nothing', async () => {
    await subscribe();
    const failing = await post('/', {
      resourceType: 'Bundle',
      type: 'transaction',
      entry: [
        { resource: chat('never committed'), request: { method: 'POST', url: 'Communication' } },
        { resource: { resourceType: 'Patient', birthDate: 'not-a-date' }, request: { method: 'POST', url: 'Patient' } },
      ],
    });
    assert.equal(failing.status, 400);
    const ok = await post('/', {
      resourceType: 'Bundle',
      type: 'transaction',
      entry: [1, 2, 3].map((i) => ({ resource: chat(`t${i}`), request: { method: 'POST', url: 'Communication' } })),
    });
    assert.equal(ok.status, 200);
    await until(() => allEvents().length >= 3, 'three events');
    await new Promise((r) => setTimeout(r, 150));
    assert.deepEqual(allEvents().map((e) => e['event-number']), ['1', '2', '3']);
    const texts = notifications().flatMap((n) => n.body.entry.slice(1).map((e) => e.resource.payload[0].contentString));
    assert.deepEqual(texts, ['t1', 't2', 't3']);
  });

  test('batches of at most 100 events, in order', async () => {
    await subscribe();
    const entry = Array.from({ length: 250 }, (_, i) => ({ resource: chat(`m${i}`), request: { method: 'POST', url: 'Communication' } }));
    assert.equal((await post('/', { resourceType: 'Bundle', type: 'batch', entry })).status, 200);
    await until(() => allEvents().length >= 250, '250 events');
    assert.ok(notifications().every((n) => events(n.body).length <= 100));
    assert.ok(notifications().length >= 3);
    assert.deepEqual(allEvents().map((e) => Number(e['event-number'])), Array.from({ length: 250 }, (_, i) => i + 1));
    const last = notifications().at(-1).body;
    assert.equal(param(last, 'events-since-subscription-start'), '250');
  });

  test('a failing receiver: retried with backoff, status error, recovered, every event once in order', async () => {
    const id = await subscribe();
    receiver.failNext = 3;
    for (let i = 1; i <= 5; i++) await post('/Communication', chat(`r${i}`));
    await until(async () => (await get(`/Subscription/${id}`)).body.status === 'error', 'status error');
    assert.match((await get(`/Subscription/${id}`)).body.error, /503/);
    await until(() => allEvents().length >= 5, 'delivery after recovery');
    await until(async () => (await get(`/Subscription/${id}`)).body.status === 'active', 'active again');
    assert.equal(receiver.failures, 3);
    assert.deepEqual(allEvents().map((e) => e['event-number']), ['1', '2', '3', '4', '5']);
  });

  test('heartbeat when idle', async () => {
    await subscribe({ heartbeat: 1 });
    const beat = await until(() => notifications('heartbeat')[0], 'a heartbeat', 3000);
    assert.equal(param(beat.body, 'status'), 'active');
    assert.equal(param(beat.body, 'events-since-subscription-start'), '0');
  });

  test('an endpoint that never answers 2xx: handshake retried, then error; nothing is queued', async () => {
    const created = await post('/Subscription', subscription({ endpoint: 'http://127.0.0.1:9/nobody-listens' }));
    assert.equal(created.status, 201);
    await until(async () => (await get(`/Subscription/${created.body.id}`)).body.status === 'error', 'error', 5000);
    assert.match((await get(`/Subscription/${created.body.id}`)).body.error, /handshake failed/);
    await post('/Communication', chat('x'));
    assert.equal((await admin('GET', '/admin/subscriptions')).body.subscriptions[0].queued, 0);
  });

  test('what cannot be delivered is refused with 400', async () => {
    const bad = [
      subscription({ criteria: 'http://example.org/SubscriptionTopic/no-such-topic' }),
      subscription({ filters: ['Communication?no-such-param=1'] }),
      subscription({ filters: ['Patient?gender=female'] }), // not in the topic
      subscription({ criteria: 'Communication?nonsense=1' }),
      { ...subscription(), channel: { ...subscription().channel, type: 'websocket' } },
      { ...subscription(), channel: { ...subscription().channel, endpoint: 'ftp://x' } },
    ];
    for (const body of bad) assert.equal((await post('/Subscription', body)).status, 400, JSON.stringify(body));
    const off = await post('/Subscription', { ...subscription(), status: 'off' });
    assert.equal(off.status, 201);
    assert.equal(off.body.status, 'off');
  });

  test('switched off by the client, deleted, or reset: nothing more is sent', async () => {
    const id = await subscribe();
    const current = (await get(`/Subscription/${id}`)).body;
    assert.equal((await put(`/Subscription/${id}`, { ...current, status: 'off' })).status, 200);
    await post('/Communication', chat('after off'));
    const id2 = await subscribe();
    assert.equal((await fetch(`${srv.fhir}/Subscription/${id2}`, { method: 'DELETE' })).status, 200);
    await post('/Communication', chat('after delete'));
    await subscribe();
    await admin('POST', '/admin/reset');
    assert.deepEqual((await admin('GET', '/admin/subscriptions')).body.subscriptions, []);
    await post('/Communication', chat('after reset'));
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(notifications().length, 0);
  });
});
