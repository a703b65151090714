// Smoke tests for the sandbox EHR: start the real server on a free port and talk FHIR REST to it.
// Run: node --test integrations/sandbox/test/   (after npm ci --prefix integrations/sandbox)

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { after, before, beforeEach, describe, test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { startServer, stopServer } from '../launch.mjs';

const SEED = fileURLToPath(new URL('../seed/demo-patients.json', import.meta.url));
const MRN = 'http://hospital.example.org/mrn';
const FHIR_JSON = { 'Content-Type': 'application/fhir+json' };

let srv;
const fhir = (path, init = {}) => fetch(`${srv.fhir}${path}`, init);
const json = async (res) => ({ status: res.status, headers: res.headers, body: await res.json() });
const post = (path, body, headers = {}) =>
  fhir(path, { method: 'POST', headers: { ...FHIR_JSON, ...headers }, body: JSON.stringify(body) }).then(json);
const put = (path, body, headers = {}) =>
  fhir(path, { method: 'PUT', headers: { ...FHIR_JSON, ...headers }, body: JSON.stringify(body) }).then(json);
const get = (path) => fhir(path).then(json);
const admin = (method, path, body) =>
  fetch(`${srv.root}${path}`, {
    method,
    headers: { 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  }).then(json);
const count = async (type, query = '') => (await get(`/${type}?${query}${query ? '&' : ''}_summary=count`)).body.total;
const ids = (bundle) => (bundle.entry ?? []).map((e) => e.resource.id);

const patient = (mrn, family = 'Test') => ({
  resourceType: 'Patient',
  identifier: [{ system: MRN, value: mrn }],
  name: [{ family, given: ['Synthetic'] }],
  gender: 'female',
  birthDate: '2000-01-01',
});

before(async () => {
  srv = await startServer();
});
after(async () => {
  assert.equal(await stopServer(srv), 0, 'exits cleanly on SIGTERM');
});
beforeEach(async () => {
  assert.deepEqual((await admin('POST', '/admin/reset')).body, { reset: true });
});

describe('basics', () => {
  test('healthz and CORS preflight', async () => {
    assert.deepEqual((await admin('GET', '/healthz')).body, { status: 'ok', resources: 0 });
    const res = await fhir('/Patient', {
      method: 'OPTIONS',
      headers: { Origin: 'http://localhost:3000', 'Access-Control-Request-Method': 'POST' },
    });
    assert.equal(res.status, 204);
    assert.equal(res.headers.get('access-control-allow-origin'), '*');
    for (const h of ['Authorization', 'Content-Type', 'If-None-Exist', 'If-Match', 'Prefer']) {
      assert.match(res.headers.get('access-control-allow-headers'), new RegExp(h));
    }
  });

  test('create, read, vread, update with If-Match, history', async () => {
    const created = await post('/Patient', { ...patient('MRN-1'), id: 'ignored' });
    assert.equal(created.status, 201);
    const { id, meta } = created.body;
    assert.notEqual(id, 'ignored');
    assert.match(created.headers.get('content-type'), /^application\/fhir\+json/);
    assert.equal(created.headers.get('etag'), `W/"${meta.versionId}"`);
    assert.equal(created.headers.get('location'), `${srv.fhir}/Patient/${id}/_history/${meta.versionId}`);
    assert.ok(created.headers.get('last-modified'));
    assert.equal(created.headers.get('access-control-allow-origin'), '*');

    const read = await get(`/Patient/${id}`);
    assert.equal(read.status, 200);
    assert.equal(read.headers.get('etag'), `W/"${meta.versionId}"`);

    const stale = await put(`/Patient/${id}`, { ...read.body, gender: 'male' }, { 'If-Match': 'W/"not-the-version"' });
    assert.equal(stale.status, 412);
    const updated = await put(`/Patient/${id}`, { ...read.body, gender: 'male' }, { 'If-Match': `W/"${meta.versionId}"` });
    assert.equal(updated.status, 200);
    assert.notEqual(updated.body.meta.versionId, meta.versionId);

    assert.equal((await get(`/Patient/${id}/_history/${meta.versionId}`)).body.gender, 'female');
    for (let i = 0; i < 2; i++) {
      // Stable newest-first order, however often it is read.
      const history = (await get(`/Patient/${id}/_history`)).body;
      assert.deepEqual(history.entry.map((e) => e.resource.gender), ['male', 'female']);
    }
    assert.equal((await get('/Patient/does-not-exist')).status, 404);
  });

  test('invalid resources are rejected with 400 OperationOutcome', async () => {
    const bad = await post('/Patient', { resourceType: 'Patient', birthDate: '2000-13-45', colour: 'blue' });
    assert.equal(bad.status, 400);
    assert.equal(bad.body.resourceType, 'OperationOutcome');
    const texts = bad.body.issue.map((i) => `${i.details.text} @ ${i.expression}`);
    assert.ok(texts.some((t) => /Invalid date/.test(t) && /birthDate/.test(t)), texts.join('; '));
    assert.ok(texts.some((t) => /colour/.test(t)), texts.join('; '));

    const missing = await post('/Communication', { resourceType: 'Communication' });
    assert.equal(missing.status, 400, 'Communication.status is required');

    const ok = await post('/Patient', patient('MRN-2'));
    const badUpdate = await put(`/Patient/${ok.body.id}`, { ...ok.body, gender: 42 });
    assert.equal(badUpdate.status, 400);
    assert.equal(await count('Patient'), 1);
    assert.equal((await post('/Patient', { resourceType: 'Observation', status: 'final' })).status, 400);
    assert.equal((await get('/NotAType')).status, 404);
  });

  test('RiskAssessment without probability[x] is accepted (Medplum ras-2 false positive dropped); a bad one is not', async () => {
    const ra = (prediction) => ({ resourceType: 'RiskAssessment', status: 'final', subject: { reference: 'Patient/x' }, prediction: [prediction] });
    const without = await post('/RiskAssessment', ra({ qualitativeRisk: { text: 'high' } }));
    assert.equal(without.status, 201);
    assert.equal((await post('/RiskAssessment', ra({ probabilityDecimal: 101 }))).status, 400, 'a percentage, 0..100');
    assert.equal((await post('/RiskAssessment', ra({ probabilityDecimal: 72.5, qualitativeRisk: { text: 'high' } }))).status, 201);
  });

  test('Prefer: return=minimal', async () => {
    const res = await fhir('/Patient', {
      method: 'POST',
      headers: { ...FHIR_JSON, Prefer: 'return=minimal' },
      body: JSON.stringify(patient('MRN-3')),
    });
    assert.equal(res.status, 201);
    assert.equal(await res.text(), '');
    assert.match(res.headers.get('location'), /\/fhir\/Patient\/[^/]+\/_history\//);
  });
});

describe('conditional create', () => {
  test('If-None-Exist: 201 first, 200 with the same resource after, no duplicate', async () => {
    const ifNoneExist = { 'If-None-Exist': `identifier=${MRN}|MRN-7` };
    const first = await post('/Patient', patient('MRN-7'), ifNoneExist);
    assert.equal(first.status, 201);
    const second = await post('/Patient', patient('MRN-7', 'Changed'), ifNoneExist);
    assert.equal(second.status, 200);
    assert.equal(second.body.id, first.body.id);
    assert.equal(second.body.name[0].family, 'Test', 'existing resource returned unchanged');
    assert.equal(await count('Patient'), 1);
  });

  test('If-None-Exist with a misspelt parameter fails instead of matching nothing', async () => {
    const res = await post('/Patient', patient('MRN-8'), { 'If-None-Exist': `identifer=${MRN}|MRN-8` });
    assert.equal(res.status, 400);
    assert.equal(await count('Patient'), 0);
  });

  test('ifNoneExist inside a transaction', async () => {
    const bundle = () => ({
      resourceType: 'Bundle',
      type: 'transaction',
      entry: [
        {
          fullUrl: 'urn:uuid:6f1e7e3c-0d5a-4f7e-9d2b-8a1c2b3d4e5f',
          resource: patient('MRN-9'),
          request: { method: 'POST', url: 'Patient', ifNoneExist: `identifier=${MRN}|MRN-9` },
        },
        {
          resource: {
            resourceType: 'Flag',
            identifier: [{ system: 'urn:test:flag', value: 'F-1' }],
            status: 'active',
            code: { text: 'Suicide risk' },
            subject: { reference: 'urn:uuid:6f1e7e3c-0d5a-4f7e-9d2b-8a1c2b3d4e5f' },
          },
          request: { method: 'POST', url: 'Flag', ifNoneExist: 'identifier=urn:test:flag|F-1' },
        },
      ],
    });
    const first = await post('', bundle());
    assert.equal(first.status, 200);
    assert.deepEqual(first.body.entry.map((e) => e.response.status), ['201', '201']);
    const pid = first.body.entry[0].resource.id;
    assert.equal(first.body.entry[1].resource.subject.reference, `Patient/${pid}`);
    assert.equal(first.body.entry[0].fullUrl, `${srv.fhir}/Patient/${pid}`);

    const second = await post('', bundle());
    assert.equal(second.status, 200);
    assert.deepEqual(second.body.entry.map((e) => e.response.status), ['200', '200']);
    assert.equal(second.body.entry[0].resource.id, pid);
    assert.equal(await count('Patient'), 1);
    assert.equal(await count('Flag'), 1);
  });

  test('Medplum limit: a transaction with a conditional entry holds at most 8 entries', async () => {
    const entry = Array.from({ length: 9 }, (_, i) => ({
      resource: patient(`MRN-L${i}`),
      request: { method: 'POST', url: 'Patient', ifNoneExist: `identifier=${MRN}|MRN-L${i}` },
    }));
    const res = await post('', { resourceType: 'Bundle', type: 'transaction', entry });
    assert.equal(res.status, 400);
    assert.match(res.body.issue[0].details.text, /too many entries/);
    assert.equal(await count('Patient'), 0);
  });
});

describe('transactions and batches', () => {
  test('a failing transaction leaves nothing behind', async () => {
    await post('/Patient', patient('MRN-EXISTING'));
    const before = (await admin('GET', '/healthz')).body.resources;
    const res = await post('', {
      resourceType: 'Bundle',
      type: 'transaction',
      entry: [
        { fullUrl: 'urn:uuid:0b7a5f0e-1111-4222-8333-944455556666', resource: patient('MRN-T1'), request: { method: 'POST', url: 'Patient' } },
        { resource: patient('MRN-T2'), request: { method: 'PUT', url: 'Patient/fixed-id-1' } },
        {
          resource: { resourceType: 'Communication', status: 'not-a-status', subject: { reference: 'urn:uuid:0b7a5f0e-1111-4222-8333-944455556666' } },
          request: { method: 'POST', url: 'Communication' },
        },
      ],
    });
    assert.equal(res.status, 400);
    assert.equal(res.body.resourceType, 'OperationOutcome');
    assert.equal((await admin('GET', '/healthz')).body.resources, before);
    assert.equal(await count('Patient', `identifier=${MRN}|MRN-T1`), 0);
    assert.equal((await get('/Patient/fixed-id-1')).status, 404);
  });

  test('a batch keeps the good entries and reports the bad one', async () => {
    const res = await post('', {
      resourceType: 'Bundle',
      type: 'batch',
      entry: [
        { resource: patient('MRN-B1'), request: { method: 'POST', url: 'Patient' } },
        { resource: { resourceType: 'Patient', birthDate: 'yesterday' }, request: { method: 'POST', url: 'Patient' } },
      ],
    });
    assert.equal(res.status, 200);
    assert.equal(res.body.type, 'batch-response');
    assert.deepEqual(res.body.entry.map((e) => e.response.status), ['201', '400']);
    assert.equal(await count('Patient'), 1);
  });

  test('demo seed loads through a transaction without validation errors', async () => {
    const bundle = JSON.parse(readFileSync(SEED, 'utf8'));
    const res = await post('', bundle);
    assert.equal(res.status, 200, JSON.stringify(res.body.issue));
    assert.equal(res.body.entry.length, bundle.entry.length);
    assert.equal(await count('Patient'), 12);
    assert.equal((await get('/Patient/pt-0001')).body.name[0].text, '王秀英');
  });
});

describe('search', () => {
  const PT = 'Patient/p-search';
  const OTHER = 'Patient/p-other';
  const code = (c) => ({ coding: [{ system: 'http://example.org/codes', code: c }] });
  const ident = (v) => [{ system: 'urn:test:id', value: v }];
  // One resource per type the service writes or reads; `queries` are searches that must find it.
  const CASES = {
    QuestionnaireResponse: {
      make: (subject, v) => ({ resourceType: 'QuestionnaireResponse', identifier: ident(v)[0], status: 'completed', questionnaire: 'http://loinc.org/q/44249-1', subject: { reference: subject } }),
      queries: ['subject', 'patient', 'identifier', 'status=completed', 'questionnaire=http://loinc.org/q/44249-1'],
    },
    Communication: {
      make: (subject, v) => ({ resourceType: 'Communication', identifier: ident(v), status: 'completed', category: [code('counselling-chat')], subject: { reference: subject }, sent: '2026-11-03T21:10:00+08:00' }),
      queries: ['subject', 'patient', 'identifier', 'status=completed', 'category=counselling-chat', 'sent=ge2026-11-03'],
    },
    RiskAssessment: {
      make: (subject, v) => ({ resourceType: 'RiskAssessment', identifier: ident(v), status: 'final', method: code('psych-cds'), subject: { reference: subject }, prediction: [{ probabilityDecimal: 35, qualitativeRisk: code('high') }] }),
      queries: ['subject', 'patient', 'identifier', 'method=psych-cds', 'risk=http://example.org/codes|high'],
    },
    Flag: {
      make: (subject, v) => ({ resourceType: 'Flag', identifier: ident(v), status: 'active', category: [code('safety')], code: code('suicide-risk'), subject: { reference: subject } }),
      queries: ['subject', 'patient', 'identifier', 'status=active', 'category=safety'],
    },
    Task: {
      make: (subject, v) => ({ resourceType: 'Task', identifier: ident(v), status: 'requested', intent: 'order', code: code('callback'), for: { reference: subject } }),
      queries: ['subject', 'patient', 'identifier', 'status=requested', 'code=callback'],
    },
    ServiceRequest: {
      make: (subject, v) => ({ resourceType: 'ServiceRequest', identifier: ident(v), status: 'active', intent: 'order', code: code('psych-consult'), subject: { reference: subject } }),
      queries: ['subject', 'patient', 'identifier', 'status=active', 'code=http://example.org/codes|psych-consult'],
    },
    AuditEvent: {
      make: (subject, v) => ({
        resourceType: 'AuditEvent',
        type: { system: 'http://terminology.hl7.org/CodeSystem/audit-event-type', code: 'rest' },
        action: 'C',
        recorded: '2026-11-20T10:00:00Z',
        outcome: '0',
        agent: [{ who: { display: 'psych-cds' }, requestor: true }],
        source: { observer: { display: v } },
        entity: [{ what: { reference: subject } }],
      }),
      queries: ['patient', 'entity', 'type=rest', 'action=C', 'date=2026-11-20'],
    },
    Provenance: {
      make: (subject) => ({ resourceType: 'Provenance', target: [{ reference: subject }], recorded: '2026-11-20T10:00:00Z', agent: [{ who: { display: 'psych-cds' } }] }),
      queries: ['patient', 'target', 'recorded=ge2026-11-20'],
    },
  };

  for (const [type, { make, queries }] of Object.entries(CASES)) {
    test(`${type}: ${queries.join(', ')}`, async () => {
      const mine = await post(`/${type}`, make(PT, 'mine'));
      assert.equal(mine.status, 201, JSON.stringify(mine.body));
      const theirs = await post(`/${type}`, make(OTHER, 'theirs'));
      assert.equal(theirs.status, 201, JSON.stringify(theirs.body));
      for (const q of queries) {
        const query = q.includes('=')
          ? q
          : q === 'identifier'
            ? 'identifier=urn:test:id|mine'
            : `${q}=${PT}`;
        const res = await get(`/${type}?${query}`);
        assert.equal(res.status, 200, `${type}?${query}: ${JSON.stringify(res.body)}`);
        const found = ids(res.body);
        assert.ok(found.includes(mine.body.id), `${type}?${query} finds the resource`);
        if (!q.includes('=')) assert.deepEqual(found, [mine.body.id], `${type}?${query} excludes the other patient's`);
      }
    });
  }

  test('_lastUpdated=gt, _sort=_lastUpdated, -_lastUpdated', async () => {
    const a = await post('/Patient', patient('MRN-A'));
    await new Promise((r) => setTimeout(r, 5));
    const b = await post('/Patient', patient('MRN-B'));
    await new Promise((r) => setTimeout(r, 5));
    const c = await post('/Patient', patient('MRN-C'));
    const after = encodeURIComponent(a.body.meta.lastUpdated);
    assert.deepEqual(ids((await get(`/Patient?_lastUpdated=gt${after}&_sort=_lastUpdated`)).body), [b.body.id, c.body.id]);
    assert.deepEqual(ids((await get(`/Patient?_lastUpdated=ge${after}&_sort=-_lastUpdated`)).body), [c.body.id, b.body.id, a.body.id]);
    // Second precision means "after the end of that second".
    const secondOfA = a.body.meta.lastUpdated.slice(0, 19) + 'Z';
    const inThatSecond = ids((await get(`/Patient?_lastUpdated=gt${secondOfA}`)).body);
    assert.ok(!inThatSecond.includes(a.body.id));
    // An unencoded "+" offset arrives as a space: rejected, not silently misread.
    assert.equal((await get('/Patient?_lastUpdated=gt2026-11-20T10:00:00+08:00')).status, 400);
    assert.equal((await get('/Patient?_lastUpdated=gt2026-11-20T10:00:00%2B08:00')).status, 200);
  });

  test('_count, _offset and next links walk every page', async () => {
    for (let i = 0; i < 7; i++) await post('/Patient', patient(`MRN-P${i}`));
    let url = `${srv.fhir}/Patient?_count=3&_sort=_lastUpdated`;
    const seen = [];
    let pages = 0;
    while (url) {
      const page = await fetch(url).then((r) => r.json());
      assert.equal(page.total, 7);
      seen.push(...ids(page));
      url = page.link.find((l) => l.relation === 'next')?.url;
      pages++;
    }
    assert.equal(pages, 3);
    assert.equal(new Set(seen).size, 7);
  });

  test('default page size is 20', async () => {
    const entry = Array.from({ length: 25 }, (_, i) => ({ resource: patient(`MRN-D${i}`), request: { method: 'POST', url: 'Patient' } }));
    await post('', { resourceType: 'Bundle', type: 'transaction', entry });
    const page = (await get('/Patient')).body;
    assert.equal(page.total, 25);
    assert.equal(page.entry.length, 20);
    assert.ok(page.link.some((l) => l.relation === 'next'));
    assert.ok(page.entry.every((e) => e.fullUrl === `${srv.fhir}/Patient/${e.resource.id}`));
  });

  test('unsupported search features fail loudly', async () => {
    for (const q of [
      'Patient?identifer=x', // typo
      'Communication?subject=123', // reference without type
      'Communication?_include=Communication:subject',
      'Communication?subject.name=x', // chained
      'Communication?category:text=chat',
      'RiskAssessment?probability=gt50', // number parameters are not evaluated by the engine
      'Patient?_sort=nonsense',
      'Patient?_count=abc',
    ]) {
      const res = await get(`/${q}`);
      assert.equal(res.status, 400, q);
      assert.equal(res.body.resourceType, 'OperationOutcome');
    }
  });

  test('POST _search with a form body', async () => {
    const p = await post('/Patient', patient('MRN-F'));
    const res = await fhir('/Patient/_search', {
      method: 'POST',
      headers: { 'Content-Type': 'application/x-www-form-urlencoded' },
      body: `identifier=${encodeURIComponent(`${MRN}|MRN-F`)}`,
    }).then(json);
    assert.deepEqual(ids(res.body), [p.body.id]);
  });
});

describe('admin', () => {
  test('reset clears everything', async () => {
    await post('/Patient', patient('MRN-R'));
    assert.equal((await admin('GET', '/healthz')).body.resources, 1);
    await admin('POST', '/admin/reset');
    assert.equal((await admin('GET', '/healthz')).body.resources, 0);
  });

  test('fault "error" answers the status for the next N matching requests', async () => {
    const state = await admin('POST', '/admin/fault', { mode: 'error', status: 503, count: 2, methods: ['POST'] });
    assert.equal(state.body.active, true);
    assert.equal((await get('/Patient')).status, 200, 'GET is not a faulted method');
    const first = await post('/Patient', patient('MRN-E'));
    assert.equal(first.status, 503);
    assert.equal(first.body.resourceType, 'OperationOutcome');
    assert.equal((await post('/Patient', patient('MRN-E'))).status, 503);
    assert.equal((await post('/Patient', patient('MRN-E'))).status, 201, 'recovers after count');
    assert.equal((await admin('GET', '/admin/fault')).body.active, false);
    assert.equal(await count('Patient'), 1);
  });

  test('fault "down" drops the connection until cleared', async () => {
    await admin('POST', '/admin/fault', { mode: 'down', count: null });
    for (let i = 0; i < 2; i++) {
      await assert.rejects(fetch(`${srv.fhir}/Patient`), /fetch failed/);
    }
    assert.equal((await admin('GET', '/healthz')).status, 200, 'admin endpoints are never faulted');
    await admin('DELETE', '/admin/fault');
    assert.equal((await get('/Patient')).status, 200);
  });

  test('request log counts write-backs without bodies or query strings', async () => {
    const { last } = (await admin('GET', '/admin/requests')).body;
    await post('/Patient', patient('MRN-Q'));
    await get(`/Patient?identifier=${MRN}|MRN-Q`);
    const log = (await admin('GET', `/admin/requests?since=${last}`)).body.requests;
    assert.deepEqual(
      log.map((r) => [r.method, r.path, r.status]),
      [
        ['POST', '/fhir/Patient', 201],
        ['GET', '/fhir/Patient', 200],
      ]
    );
    assert.ok(!JSON.stringify(log).includes('MRN-Q'));
  });

  test('bad fault requests are rejected', async () => {
    assert.equal((await admin('POST', '/admin/fault', { mode: 'explode' })).status, 400);
    assert.equal((await admin('POST', '/admin/fault', { mode: 'error', count: 0 })).status, 400);
  });
});

describe('--seed', () => {
  test('seeds the demo bundle at start-up', async () => {
    const seeded = await startServer(['--seed', SEED]);
    try {
      assert.match(seeded.output(), /seeded 57 resources/);
      const res = await fetch(`${seeded.fhir}/Patient?identifier=${MRN}|MRN-0007`).then((r) => r.json());
      assert.equal(res.entry[0].resource.id, 'pt-0007');
      const chats = await fetch(`${seeded.fhir}/Communication?subject=Patient/pt-0004&_sort=sent`).then((r) => r.json());
      assert.equal(chats.total, 4);
      assert.match(chats.entry[2].resource.payload[0].contentString, /安眠药/);
    } finally {
      assert.equal(await stopServer(seeded), 0);
    }
  });
});
