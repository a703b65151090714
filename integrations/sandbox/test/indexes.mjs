// The repository's indexes (identifier tokens, _lastUpdated write log) and its transaction journal,
// tested on the repository itself: every search must answer exactly what the linear scan answers, and
// a failed transaction must leave the store exactly as it was (contents, history, iteration order).
// Run: npm test --prefix integrations/sandbox

import assert from 'node:assert/strict';
import { afterEach, beforeEach, describe, test } from 'node:test';
import { parseSearchRequest } from '@medplum/core';
import { SandboxRepository } from '../repository.mjs';

const MSG = 'http://hospital.example.org/chat-message';
const SESSION = 'http://hospital.example.org/chat-session';
const MRN = 'http://hospital.example.org/mrn';

// A controllable wall clock: MemoryRepository stamps meta.lastUpdated with `new Date()`.
const RealDate = globalThis.Date;
let fakeNow = RealDate.parse('2026-11-20T03:00:00.000Z');
class FakeDate extends RealDate {
  constructor(...args) {
    if (args.length === 0) super(fakeNow);
    else super(...args);
  }
  static now() {
    return fakeNow;
  }
}

// Small deterministic PRNG (mulberry32) so a failure can be replayed.
function rng(seed) {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function communication(random, n) {
  const identifier = [];
  const k = Math.floor(random() * 4); // 0..3 identifiers
  for (let i = 0; i < k; i++) {
    const which = Math.floor(random() * 5);
    if (which === 0) identifier.push({ system: MSG, value: `M-${Math.floor(random() * 30)}` });
    else if (which === 1) identifier.push({ system: SESSION, value: `S-${Math.floor(random() * 6)}` });
    else if (which === 2) identifier.push({ value: `m-${Math.floor(random() * 30)}` }); // no system, other case
    else if (which === 3) identifier.push({ system: MSG.toUpperCase(), value: `M-${Math.floor(random() * 30)}` });
    else identifier.push({ system: SESSION, value: `S-${Math.floor(random() * 6)}`, type: { text: 'SESSION' } });
  }
  return {
    resourceType: 'Communication',
    status: random() < 0.8 ? 'completed' : 'in-progress',
    ...(identifier.length ? { identifier } : {}),
    category: [{ text: random() < 0.7 ? 'counselling-chat' : 'alert' }],
    subject: { reference: `Patient/p-${Math.floor(random() * 5)}` },
    payload: [{ contentString: `message ${n}` }],
  };
}

function dump(repo) {
  const out = {};
  for (const [type, byId] of repo.resources) {
    out[type] = [...byId].map(([id, r]) => [id, r.meta.versionId, repo.history.get(type)?.get(id)?.length]);
  }
  for (const [type, byId] of repo.history) {
    for (const [id, versions] of byId) {
      if (!repo.resources.get(type)?.has(id)) (out[`${type}:history`] ??= []).push([id, versions.length]);
    }
  }
  return out;
}

async function both(repo, query) {
  const run = async (indexed) => {
    repo.useIndexes = indexed;
    const bundle = await repo.search(parseSearchRequest(query));
    return { total: bundle.total, ids: (bundle.entry ?? []).map((e) => `${e.resource.id}@${e.resource.meta.versionId}`) };
  };
  const linear = await run(false);
  const indexed = await run(true);
  return { linear, indexed };
}

function queries(repo, random) {
  const stamps = [...new Set([...(repo.resources.get('Communication')?.values() ?? [])].map((r) => r.meta.lastUpdated))];
  const pick = (list) => list[Math.floor(random() * list.length)];
  const stamp = stamps.length ? pick(stamps) : '2026-11-20T03:00:00.000Z';
  const n = Math.floor(random() * 30);
  const ids = [...(repo.resources.get('Communication')?.keys() ?? []), 'no-such-id'];
  return [
    `Communication?identifier=${MSG}|M-${n}`,
    `Communication?identifier=${MSG.toUpperCase()}|m-${n}`,
    `Communication?identifier=M-${n}`,
    `Communication?identifier=|m-${n}`,
    `Communication?identifier=${SESSION}|S-${n % 6},${MSG}|M-${n}`,
    `Communication?identifier=${SESSION}|`, // not answerable by the index: linear
    `Communication?identifier=session`, // identifier.type.text token
    `Communication?identifier=${SESSION}|S-${n % 6}&status=completed&_count=3&_offset=1`,
    `Communication?identifier=${SESSION}|S-${n % 6}&_sort=-_lastUpdated,_id`,
    `Communication?_lastUpdated=ge${stamp}&_sort=_lastUpdated&_count=500`,
    `Communication?_lastUpdated=gt${stamp}&_sort=_lastUpdated`,
    `Communication?_lastUpdated=ge${stamp.slice(0, 19)}Z&_sort=_lastUpdated&_count=7&_offset=2`,
    `Communication?_lastUpdated=gt${stamp.slice(0, 16)}:00%2B08:00&_sort=_lastUpdated`,
    `Communication?_lastUpdated=ge${stamp}&_lastUpdated=lt2026-11-20T03:00:09Z&category=counselling-chat`,
    `Communication?_lastUpdated=ge${stamp}&_sort=-_lastUpdated`,
    `Communication?_lastUpdated=ge${stamp}`,
    `Communication?_lastUpdated=ge2000-01-01&_sort=_lastUpdated`,
    `Communication?_sort=_lastUpdated&subject=Patient/p-${n % 5}`,
    `Patient?identifier=${MRN}|MRN-${n % 8}`,
    `Communication?_id=${pick(ids)},${pick(ids)},no-such-id`,
    `Communication?_id=${pick(ids)}&status=completed&_count=1`,
    `Communication?_id=${pick(ids)},${pick(ids)}&_sort=-_lastUpdated`,
  ];
}

let repo;
beforeEach(() => {
  globalThis.Date = FakeDate;
  fakeNow = RealDate.parse('2026-11-20T03:00:00.000Z');
  repo = new SandboxRepository();
});
afterEach(() => {
  globalThis.Date = RealDate;
});

describe('indexed search answers exactly what the linear scan answers', () => {
  test('a random mix of creates, identifier-changing updates, deletes, conditional creates and failed transactions', async () => {
    const random = rng(20261120);
    const ids = [];
    const compare = async () => {
      for (const q of queries(repo, random)) {
        const { linear, indexed } = await both(repo, q);
        assert.deepEqual(indexed, linear, q);
      }
    };
    for (let step = 0; step < 600; step++) {
      // Mostly forward in small steps, often the same millisecond (a transaction's entries share one).
      fakeNow += random() < 0.4 ? 0 : Math.floor(random() * 40);
      const r = random();
      if (r < 0.35 || ids.length < 5) {
        ids.push((await repo.createResource(communication(random, step))).id);
      } else if (r < 0.55) {
        const id = ids[Math.floor(random() * ids.length)];
        const current = repo.resources.get('Communication').get(id);
        if (current) await repo.updateResource({ ...communication(random, step), id }); // identifiers change
      } else if (r < 0.65) {
        const id = ids[Math.floor(random() * ids.length)];
        if (repo.resources.get('Communication').has(id)) await repo.deleteResource('Communication', id);
      } else if (r < 0.75) {
        const value = `M-${Math.floor(random() * 30)}`;
        await repo.conditionalCreate(
          { ...communication(random, step), identifier: [{ system: MSG, value }] },
          parseSearchRequest(`Communication?identifier=${MSG}|${value}`)
        ).catch((err) => assert.match(String(err.message), /Multiple/i));
      } else if (r < 0.85) {
        const before = dump(repo);
        const failing = repo.withTransaction(async () => {
          const n = 1 + Math.floor(random() * 4);
          for (let i = 0; i < n; i++) {
            const id = ids[Math.floor(random() * ids.length)];
            const kind = random();
            if (kind < 0.3) await repo.createResource(communication(random, step));
            else if (kind < 0.6 && repo.resources.get('Communication').has(id)) {
              await repo.updateResource({ ...communication(random, step), id });
            } else if (kind < 0.8 && repo.resources.get('Communication').has(id)) {
              await repo.deleteResource('Communication', id);
              if (random() < 0.5) await repo.updateResource({ ...communication(random, step), id }); // re-create
            }
            fakeNow += Math.floor(random() * 3);
          }
          throw new Error('entry failed');
        });
        await assert.rejects(failing, /entry failed/);
        assert.deepEqual(dump(repo), before, 'a failed transaction leaves the store exactly as it was');
      } else {
        await repo.createResource({
          resourceType: 'Patient',
          identifier: [{ system: MRN, value: `MRN-${Math.floor(random() * 8)}` }],
        });
      }
      if (step % 10 === 0) await compare();
    }
    await compare();
    assert.ok(repo.stats.indexedIdentifier > 100, 'identifier index used');
    assert.ok(repo.stats.indexedLastUpdated > 100, '_lastUpdated log used');
    assert.ok(repo.stats.rollbacks > 20, 'failed transactions exercised');
  });

  test('a clock that goes backwards switches _lastUpdated search to the linear scan, with the same answers', async () => {
    for (let i = 0; i < 20; i++) {
      fakeNow += 5;
      await repo.createResource({ resourceType: 'Communication', status: 'completed', payload: [{ contentString: `${i}` }] });
    }
    const q = `Communication?_lastUpdated=ge${new RealDate(fakeNow - 40).toISOString()}&_sort=_lastUpdated`;
    const usedBefore = repo.stats.indexedLastUpdated;
    await both(repo, q);
    assert.equal(repo.stats.indexedLastUpdated, usedBefore + 1);
    fakeNow -= 1000; // NTP step
    await repo.createResource({ resourceType: 'Communication', status: 'completed', payload: [{ contentString: 'late' }] });
    const { linear, indexed } = await both(repo, q);
    assert.deepEqual(indexed, linear);
    assert.equal(repo.stats.indexedLastUpdated, usedBefore + 1, 'no longer indexed');
    repo.clear();
    await repo.createResource({ resourceType: 'Communication', status: 'completed', payload: [{ contentString: 'x' }] });
    await both(repo, q);
    assert.equal(repo.stats.indexedLastUpdated, usedBefore + 2, 'a reset starts a fresh, ordered log');
  });

  test('many updates compact the write log without changing answers', async () => {
    const ids = [];
    for (let i = 0; i < 50; i++) {
      ids.push((await repo.createResource({ resourceType: 'Communication', status: 'completed' })).id);
    }
    for (let i = 0; i < 3000; i++) {
      fakeNow += 1;
      await repo.updateResource({ resourceType: 'Communication', id: ids[i % 50], status: i % 2 ? 'completed' : 'stopped' });
    }
    assert.ok(repo.stats.compactions >= 1);
    for (const stamp of [fakeNow - 3000, fakeNow - 40, fakeNow]) {
      const q = `Communication?_lastUpdated=ge${new RealDate(stamp).toISOString()}&_sort=_lastUpdated&status=completed`;
      const { linear, indexed } = await both(repo, q);
      assert.deepEqual(indexed, linear, q);
    }
  });
});

describe('transaction journal', () => {
  test('commit announces the transaction once, after it commits; a rollback announces nothing', async () => {
    const announced = [];
    repo.onCommit = (changes) => announced.push(changes.map((c) => `${c.kind} ${c.resourceType}`));
    await repo.withTransaction(async () => {
      const a = await repo.createResource({ resourceType: 'Communication', status: 'completed' });
      assert.deepEqual(announced, [], 'nothing before the commit');
      await repo.updateResource({ ...a, status: 'stopped' });
    });
    assert.deepEqual(announced, [['write Communication', 'write Communication']]);
    await assert.rejects(
      repo.withTransaction(async () => {
        await repo.createResource({ resourceType: 'Communication', status: 'completed' });
        throw new Error('boom');
      })
    );
    await repo.createResource({ resourceType: 'Patient' });
    assert.deepEqual(announced, [['write Communication', 'write Communication'], ['write Patient']]);
  });

  test('a rolled-back delete puts the resource back in its place', async () => {
    const ids = [];
    for (let i = 0; i < 5; i++) ids.push((await repo.createResource({ resourceType: 'Patient', gender: 'female' })).id);
    const before = dump(repo);
    await assert.rejects(
      repo.withTransaction(async () => {
        await repo.deleteResource('Patient', ids[1]);
        await repo.deleteResource('Patient', ids[3]);
        await repo.updateResource({ resourceType: 'Patient', id: ids[3], gender: 'male' }); // re-created
        throw new Error('boom');
      })
    );
    assert.deepEqual(dump(repo), before);
    const found = await repo.search(parseSearchRequest('Patient?gender=female'));
    assert.deepEqual(found.entry.map((e) => e.resource.id), ids);
  });
});
