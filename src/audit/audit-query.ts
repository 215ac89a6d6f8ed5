/**
 * Queries of the audit log: `GET [base]/AuditEvent` (FHIR search over the entries, through the query
 * index of audit-index.ts), `GET [base]/AuditEvent/[seq]`, and the finder the reports of
 * audit-report.ts use. Read-only; every read is itself audited by the caller's {@link AuditReadAccess}
 * (action `audit-read`), failures included, and a success durably before anything is returned.
 *
 * Search parameters (docs/audit.md): `patient`, `agent` (client or user id), `date` (eq, ne, gt, lt,
 * ge, le, sa, eb on the event time), `action` (ours, or the FHIR codes C R U D E), `outcome` (ours, or
 * 0 4 8 12), `purpose`, `_count` (at most 1000), `_sort` (`date` or `-date`) and `_cursor` (paging,
 * keyset on the sequence number). A repeated parameter ANDs, a comma inside one ORs. Anything else
 * is a 400 OperationOutcome naming the parameter.
 * @module
 */
import { CustosError, isCustosError, type IssueDetail } from '../kernel/errors.ts';
import { isFhirId } from '../kernel/ids.ts';
import { shownName } from '../fhir/search-request.ts';
import type { Logger } from '../log/logger.ts';
import type { AuditAction, AuditEvent } from './audit-event.ts';
import { auditEventResource, FHIR_ACTION } from './audit-event-resource.ts';
import { indexRowsOf } from './audit-index.ts';
import type { AuditLog } from './audit-log.ts';
import type { SensitiveFields } from './audit-sealer.ts';

/**
 * Purposes of use under which the audit log may be read (with an `AuditEvent` read/search scope):
 * compliance (HCOMPL), legal (HLEGAL), system administration (HSYSADMIN), and a patient's request for
 * their own access report (PATRQT). docs/audit.md.
 */
export const AUDIT_READ_PURPOSES: ReadonlySet<string> = new Set(['HCOMPL', 'HLEGAL', 'HSYSADMIN', 'PATRQT']);

/**
 * Purposes under which sealed fields (query strings, break-glass reasons, user agents) are opened:
 * compliance and legal review only. A system administrator or a patient's request sees that an event
 * had them, not what they were (a query string may name other patients).
 */
export const AUDIT_UNSEAL_PURPOSES: ReadonlySet<string> = new Set(['HCOMPL', 'HLEGAL']);

/** Largest page of a search, and of each read a report makes. */
export const AUDIT_MAX_COUNT = 1000;
const DEFAULT_COUNT = 100;

/**
 * The authorization of one audit-log read, made by the PHI gateway (PhiSession.auditReader) from an
 * authenticated principal, or by the admin API for reports: who reads, why, and how to record it.
 */
export interface AuditReadAccess {
  /** Only events of this project are visible; undefined (installation administrators) sees all. */
  projectId: string | undefined;
  purpose: string;
  /** Open sealed fields for this reader. */
  unseal: boolean;
  /** Appends this read's own audit event durably (or throws AUDIT_UNAVAILABLE). */
  record(e: {
    outcome: 'success' | 'failed';
    code?: string;
    patients?: string[];
    count?: number;
    id?: string;
  }): Promise<void>;
}

/** One condition group: the values OR, the groups of a column AND. */
type Groups = string[][];

/** A time bound on the event time: `>=` or `<` an instant; a group ORs its alternatives, each an AND of bounds. */
type TimeRange = { ge?: string; lt?: string; not?: boolean };

export interface AuditCriteria {
  projectId?: string;
  patients: Groups;
  agents: Groups;
  actions: Groups;
  outcomes: Groups;
  purposes: Groups;
  dates: TimeRange[][];
  count: number;
  /** Keyset: the sequence number after (or, descending, before) which the page starts. */
  after?: number;
  descending: boolean;
}

export function emptyCriteria(): AuditCriteria {
  return {
    patients: [],
    agents: [],
    actions: [],
    outcomes: [],
    purposes: [],
    dates: [],
    count: DEFAULT_COUNT,
    descending: false,
  };
}

const ACTIONS: readonly AuditAction[] = Object.keys(FHIR_ACTION) as AuditAction[];
const OUTCOME_CODES: Record<string, string[]> = {
  success: ['success'],
  refused: ['refused'],
  failed: ['failed'],
  pending: ['pending'],
  '0': ['success'],
  '4': ['refused'],
  '8': ['failed'],
  '12': [],
};
const PURPOSE_SYSTEM = 'http://terminology.hl7.org/CodeSystem/v3-ActReason';

function bad(name: string, why: string, code = 'invalid'): IssueDetail {
  return {
    severity: 'error',
    code,
    expression: shownName(name),
    diagnostics: `Parameter '${shownName(name)}' ${why}.`,
  };
}

/** The end of the last day FHIR dates reach (year 9999), as an exclusive bound PostgreSQL reads. */
export const END_OF_TIME = 'infinity';

const FHIR_DATE =
  /^(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(\.\d{1,9})?)?(Z|[+-]\d{2}:\d{2}))?)?)?$/;

/**
 * The instants [lo, hi) a FHIR date, dateTime or instant covers at its precision
 * (https://hl7.org/fhir/R4/search.html#date). Dates without a zone are taken in UTC.
 */
export function dateRange(text: string): { lo: string; hi: string } | undefined {
  const m = FHIR_DATE.exec(text);
  if (!m) return undefined;
  const [, y, mo, d, h, mi, s, frac, zone] = m;
  const year = Number(y);
  const month = mo === undefined ? 1 : Number(mo);
  const day = d === undefined ? 1 : Number(d);
  if (year < 1 || month < 1 || month > 12 || day < 1 || day > 31) return undefined;
  const check = new Date(Date.UTC(year, month - 1, day));
  check.setUTCFullYear(year);
  if (check.getUTCMonth() !== month - 1 || check.getUTCDate() !== day) return undefined;
  if (h === undefined) {
    const hiDate = new Date(check);
    if (mo === undefined) hiDate.setUTCFullYear(year + 1);
    else if (d === undefined) hiDate.setUTCMonth(month);
    else hiDate.setUTCDate(day + 1);
    return {
      lo: check.toISOString(),
      hi: hiDate.getUTCFullYear() > 9999 ? END_OF_TIME : hiDate.toISOString(),
    };
  }
  if (Number(h) > 23 || Number(mi) > 59 || (s !== undefined && Number(s) > 59)) return undefined;
  const [zh, zm] = zone === 'Z' ? [0, 0] : [Number(zone!.slice(1, 3)), Number(zone!.slice(4, 6))];
  if (zh > 14 || zm > 59) return undefined;
  const offset = (zone === 'Z' ? 0 : zone!.startsWith('-') ? -1 : 1) * (zh * 60 + zm) * 60_000;
  const ms = frac === undefined ? 0 : Math.floor(Number(`0${frac}`) * 1000);
  const t = check.getTime() + ((Number(h) * 60 + Number(mi)) * 60 + Number(s ?? 0)) * 1000 + ms - offset;
  // Precision: a minute, a second, or a millisecond (finer fractions cannot be told apart here).
  const step = s === undefined ? 60_000 : frac === undefined ? 1000 : 1;
  const lo = new Date(t);
  const hi = new Date(t + step);
  if (lo.getUTCFullYear() < 1 || lo.getUTCFullYear() > 9999) return undefined;
  return { lo: lo.toISOString(), hi: hi.getUTCFullYear() > 9999 ? END_OF_TIME : hi.toISOString() };
}

function dateCondition(raw: string): TimeRange | undefined {
  const m = /^(eq|ne|gt|lt|ge|le|sa|eb|ap)?(.*)$/.exec(raw)!;
  const prefix = m[1] ?? 'eq';
  if (prefix === 'ap') return undefined;
  // An unencoded `+` of a zone arrives as a space.
  const r = dateRange(m[2]!.replace(/ (\d\d:\d\d)$/, '+$1'));
  if (!r) return undefined;
  switch (prefix) {
    case 'eq':
      return { ge: r.lo, lt: r.hi };
    case 'ne':
      return { ge: r.lo, lt: r.hi, not: true };
    case 'gt':
    case 'sa':
      return { ge: r.hi };
    case 'ge':
      return { ge: r.lo };
    case 'lt':
    case 'eb':
      return { lt: r.lo };
    default:
      return { lt: r.hi }; // le
  }
}

/**
 * Parses the parameters of `GET [base]/AuditEvent`. Throws SEARCH_INVALID, with one issue per bad or
 * unknown parameter (its name, never its value); returns the warnings to put in the Bundle.
 */
export function parseAuditQuery(query: URLSearchParams): {
  criteria: AuditCriteria;
  warnings: IssueDetail[];
} {
  const c = emptyCriteria();
  const errors: IssueDetail[] = [];
  const warnings: IssueDetail[] = [];
  const seen = new Map<string, number>();
  for (const [name, value] of query) {
    seen.set(name, (seen.get(name) ?? 0) + 1);
    const values = value.split(',').map((v) => v.trim());
    if (values.some((v) => v === '')) {
      errors.push(bad(name, 'has an empty value'));
      continue;
    }
    switch (name) {
      case 'patient': {
        const ids = values.map((v) => /^(?:.*\/)?Patient\/([^/]+)$/.exec(v)?.[1] ?? v);
        if (ids.some((id) => !isFhirId(id))) errors.push(bad(name, 'must be a Patient id or reference'));
        else c.patients.push(ids);
        break;
      }
      case 'agent': {
        const ids = values.map((v) => /^(?:.*\/)?(?:[A-Z][A-Za-z]+)\/([^/]+)$/.exec(v)?.[1] ?? v);
        // Client ids are base64url (with _), user ids UUIDs.
        if (ids.some((id) => !/^[A-Za-z0-9\-._~]{1,128}$/.test(id)))
          errors.push(bad(name, 'must be a client or user id'));
        else c.agents.push(ids);
        break;
      }
      case 'action': {
        const out = new Set<string>();
        let ok = true;
        for (const v of values) {
          if ((ACTIONS as readonly string[]).includes(v)) out.add(v);
          else if (/^[CRUDE]$/.test(v)) {
            for (const a of ACTIONS) if (FHIR_ACTION[a] === v) out.add(a);
          } else ok = false;
        }
        if (!ok) errors.push(bad(name, `must be C, R, U, D, E or one of ${ACTIONS.join(', ')}`));
        else c.actions.push([...out]);
        break;
      }
      case 'outcome': {
        if (values.some((v) => !(v in OUTCOME_CODES)))
          errors.push(bad(name, 'must be 0, 4, 8, 12, success, refused, failed or pending'));
        else c.outcomes.push([...new Set(values.flatMap((v) => OUTCOME_CODES[v]!))]);
        break;
      }
      case 'purpose': {
        const codes = values.map((v) => {
          const bar = v.lastIndexOf('|');
          if (bar < 0) return v;
          const system = v.slice(0, bar);
          return system === '' || system === PURPOSE_SYSTEM ? v.slice(bar + 1) : '';
        });
        if (codes.some((x) => !/^[A-Z]{2,12}$/.test(x)))
          errors.push(bad(name, 'must be a PurposeOfUse code (v3-ActReason)'));
        else c.purposes.push(codes);
        break;
      }
      case 'date': {
        const ranges = values.map(dateCondition);
        if (ranges.some((r) => r === undefined))
          errors.push(
            bad(
              name,
              'must be a FHIR date or dateTime with an optional prefix eq, ne, gt, lt, ge, le, sa or eb',
            ),
          );
        else c.dates.push(ranges as TimeRange[]);
        break;
      }
      case '_count': {
        if (!/^\d{1,9}$/.test(value) || Number(value) < 1)
          errors.push(bad(name, 'must be a positive integer'));
        else {
          if (Number(value) > AUDIT_MAX_COUNT)
            warnings.push({
              severity: 'warning',
              code: 'too-costly',
              expression: '_count',
              diagnostics: `_count is limited to ${AUDIT_MAX_COUNT}; pages hold at most that many.`,
            });
          c.count = Math.min(Number(value), AUDIT_MAX_COUNT);
        }
        break;
      }
      case '_sort':
        if (value === 'date' || value === '_lastUpdated') c.descending = false;
        else if (value === '-date' || value === '-_lastUpdated') c.descending = true;
        else errors.push(bad(name, "must be 'date' or '-date'", 'not-supported'));
        break;
      case '_cursor': {
        const seq = decodeCursor(value);
        if (seq === undefined) errors.push(bad(name, 'is not a cursor this server issued'));
        else c.after = seq;
        break;
      }
      case '_format':
      case '_pretty':
        break; // JSON is all there is
      default:
        errors.push(bad(name, 'is not supported for AuditEvent', 'not-supported'));
    }
  }
  for (const only of ['_count', '_sort', '_cursor'])
    if ((seen.get(only) ?? 0) > 1) errors.push(bad(only, 'may appear once'));
  if (errors.length > 0) throw new CustosError('SEARCH_INVALID', errors);
  return { criteria: c, warnings };
}

export function encodeCursor(seq: number): string {
  return Buffer.from(JSON.stringify({ s: seq }), 'utf8').toString('base64url');
}

function decodeCursor(text: string): number | undefined {
  try {
    const v = JSON.parse(Buffer.from(text, 'base64url').toString('utf8')) as { s?: unknown };
    return Number.isSafeInteger(v.s) && (v.s as number) >= 0 ? (v.s as number) : undefined;
  } catch {
    return undefined;
  }
}

function instantMs(t: string): number {
  return t === END_OF_TIME ? Infinity : Date.parse(t);
}

/** Whether decoded event `e` meets `c` (the same rules the SQL applies to its index rows). */
export function matchesCriteria(e: unknown, c: AuditCriteria): boolean {
  const rows = indexRowsOf(e);
  const first = rows[0];
  if (!first) return false;
  const patients = new Set(rows.map((r) => r.patient));
  if (c.projectId !== undefined && first.projectId !== c.projectId) return false;
  const time = first.time === null ? undefined : Date.parse(first.time);
  return (
    c.patients.every((g) => g.some((p) => patients.has(p))) &&
    c.agents.every((g) => g.some((a) => a === first.clientId || a === first.userId)) &&
    c.actions.every((g) => first.action !== null && g.includes(first.action)) &&
    c.outcomes.every((g) => first.outcome !== null && g.includes(first.outcome)) &&
    c.purposes.every((g) => first.purpose !== null && g.includes(first.purpose)) &&
    c.dates.every((g) =>
      g.some((r) => {
        if (time === undefined) return false;
        const inside =
          (r.ge === undefined || time >= instantMs(r.ge)) && (r.lt === undefined || time < instantMs(r.lt));
        return r.not ? !inside : inside;
      }),
    )
  );
}

/** The SQL of a criteria's page of sequence numbers (one more than asked, to know if another page follows). */
function pageSql(c: AuditCriteria): { sql: string; params: unknown[] } {
  const params: unknown[] = [];
  const p = (v: unknown) => {
    params.push(v);
    return `$${params.length}`;
  };
  const where: string[] = [];
  if (c.projectId !== undefined) where.push(`i.project_id = ${p(c.projectId)}`);
  c.patients.forEach((g, k) => {
    if (k === 0) where.push(`i.patient = ANY(${p(g)}::text[])`);
    else
      where.push(
        `EXISTS (SELECT 1 FROM audit_index x WHERE x.seq = i.seq AND x.patient = ANY(${p(g)}::text[]))`,
      );
  });
  for (const g of c.agents) {
    const ref = p(g);
    where.push(`(i.client_id = ANY(${ref}::text[]) OR i.user_id = ANY(${ref}::text[]))`);
  }
  for (const g of c.actions) where.push(`i.action = ANY(${p(g)}::text[])`);
  for (const g of c.outcomes) where.push(`i.outcome = ANY(${p(g)}::text[])`);
  for (const g of c.purposes) where.push(`i.purpose = ANY(${p(g)}::text[])`);
  for (const g of c.dates) {
    const alts = g.map((r) => {
      const parts: string[] = [];
      if (r.ge !== undefined) parts.push(`i.event_time >= ${p(r.ge)}::timestamptz`);
      if (r.lt !== undefined) parts.push(`i.event_time < ${p(r.lt)}::timestamptz`);
      const inside = parts.length > 0 ? parts.join(' AND ') : 'true';
      return r.not ? `NOT (${inside})` : `(${inside})`;
    });
    where.push(`(${alts.join(' OR ')})`);
  }
  if (c.after !== undefined) where.push(`i.seq ${c.descending ? '<' : '>'} ${p(c.after)}`);
  const dir = c.descending ? 'DESC' : 'ASC';
  const sql = `SELECT DISTINCT i.seq FROM audit_index i${where.length ? ` WHERE ${where.join(' AND ')}` : ''}
                ORDER BY i.seq ${dir} LIMIT ${p(c.count + 1)}`;
  return { sql, params };
}

/** One page of matching entries, decoded, in sequence order (or reversed). */
export interface AuditPage {
  events: { seq: number; event: AuditEvent }[];
  /** The sequence number to continue after, when there is more. */
  next: number | undefined;
}

/**
 * Finds the entries that meet `c`, one page: sequence numbers from the index, entries from the log,
 * each rechecked against the criteria (an index row that does not agree with its entry is skipped
 * and logged; `custos audit verify` names it).
 */
export async function findAuditEvents(log: AuditLog, c: AuditCriteria, logger?: Logger): Promise<AuditPage> {
  const db = log.database;
  const { sql, params } = pageSql(c);
  const seqs = (await db.query<{ seq: number | string }>(sql, params)).rows.map((r) => Number(r.seq));
  const more = seqs.length > c.count;
  const page = seqs.slice(0, c.count);
  if (page.length === 0) return { events: [], next: undefined };
  const rows = await db.query<{ seq: number | string; entry: Uint8Array }>(
    'SELECT seq, entry FROM audit_entry WHERE seq = ANY($1::bigint[])',
    [page],
  );
  const bySeq = new Map(rows.rows.map((r) => [Number(r.seq), r.entry]));
  const events: AuditPage['events'] = [];
  for (const seq of page) {
    const bytes = bySeq.get(seq);
    let event: unknown;
    try {
      event = bytes ? JSON.parse(Buffer.from(bytes).toString('utf8')) : undefined;
    } catch {
      event = undefined;
    }
    if (event !== undefined && matchesCriteria(event, c)) events.push({ seq, event: event as AuditEvent });
    else logger?.warn('audit.index_mismatch', { seq });
  }
  return { events, next: more ? page[page.length - 1] : undefined };
}

export interface AuditQueryDeps {
  audit: AuditLog;
  /** The FHIR base URL (the observer of every AuditEvent). */
  fhirBaseUrl: string;
  /** A client's registered name, if known. */
  clientName?: (clientId: string) => Promise<string | undefined>;
  log?: Logger;
}

/** Registered names of the clients named by `events` (one look-up per client). */
export async function clientNames(
  deps: Pick<AuditQueryDeps, 'clientName'>,
  events: readonly { event: AuditEvent }[],
): Promise<Map<string, string>> {
  const names = new Map<string, string>();
  if (!deps.clientName) return names;
  for (const id of new Set(events.map((e) => e.event.actor?.clientId).filter((x): x is string => !!x))) {
    const name = await deps.clientName(id).catch(() => undefined);
    if (name) names.set(id, name);
  }
  return names;
}

/** The sealed fields of `e`, opened, for a reader allowed to see them. */
function opened(deps: AuditQueryDeps, access: AuditReadAccess, e: AuditEvent): SensitiveFields | undefined {
  if (!access.unseal || !e.sealed || !deps.audit.sealer) return undefined;
  return deps.audit.sealer.open(e.id, e.sealed);
}

/**
 * Runs `work` as an audited read: a failure is recorded (outcome failed, its code) before it is
 * rethrown; the success is recorded by `work` itself before it returns.
 */
async function audited<T>(access: AuditReadAccess, work: () => Promise<T>): Promise<T> {
  try {
    return await work();
  } catch (e) {
    if (isCustosError(e) && e.code === 'AUDIT_UNAVAILABLE') throw e;
    await access.record({ outcome: 'failed', code: isCustosError(e) ? e.code : 'INTERNAL' });
    throw e;
  }
}

/** `GET [base]/AuditEvent?…`: a searchset Bundle of AuditEvents (JSON). */
export async function searchAuditEvents(
  deps: AuditQueryDeps,
  access: AuditReadAccess,
  query: URLSearchParams,
): Promise<string> {
  return audited(access, async () => {
    const { criteria, warnings } = parseAuditQuery(query);
    criteria.projectId = access.projectId;
    const page = await findAuditEvents(deps.audit, criteria, deps.log);
    const names = await clientNames(deps, page.events);
    const resources = page.events.map(({ seq, event }) =>
      auditEventResource(seq, event, {
        observer: deps.fhirBaseUrl,
        clientNames: names,
        opened: opened(deps, access, event),
      }),
    );
    const patients = [...new Set(page.events.flatMap((e) => e.event.patients ?? []))].sort();
    await access.record({ outcome: 'success', patients, count: resources.length });
    const link = (cursor: number | undefined) => {
      const qs = new URLSearchParams([...query].filter(([k]) => k !== '_cursor'));
      if (cursor !== undefined) qs.set('_cursor', encodeCursor(cursor));
      const s = qs.toString();
      return `${deps.fhirBaseUrl}/AuditEvent${s ? `?${s}` : ''}`;
    };
    const links = [{ relation: 'self', url: link(criteria.after) }];
    if (page.next !== undefined) links.push({ relation: 'next', url: link(page.next) });
    const entry: unknown[] = resources.map((r) => ({
      fullUrl: `${deps.fhirBaseUrl}/AuditEvent/${r.id as string}`,
      resource: r,
      search: { mode: 'match' },
    }));
    if (warnings.length > 0)
      entry.push({
        resource: { resourceType: 'OperationOutcome', issue: warnings },
        search: { mode: 'outcome' },
      });
    return JSON.stringify({ resourceType: 'Bundle', type: 'searchset', link: links, entry });
  });
}

/** `GET [base]/AuditEvent/[seq]`: one AuditEvent (JSON), or NOT_FOUND (also for another project's). */
export async function readAuditEvent(
  deps: AuditQueryDeps,
  access: AuditReadAccess,
  id: string,
): Promise<string> {
  return audited(access, async () => {
    const seq = /^\d{1,15}$/.test(id) ? Number(id) : undefined;
    const row = seq === undefined ? undefined : (await deps.audit.read(seq, 1))[0];
    let event: AuditEvent | undefined;
    try {
      event = row && row.seq === seq ? (JSON.parse(row.entry.toString('utf8')) as AuditEvent) : undefined;
    } catch {
      event = undefined;
    }
    if (!event || (access.projectId !== undefined && event.projectId !== access.projectId))
      throw new CustosError('NOT_FOUND');
    const names = await clientNames(deps, [{ event }]);
    const resource = auditEventResource(seq!, event, {
      observer: deps.fhirBaseUrl,
      clientNames: names,
      opened: opened(deps, access, event),
    });
    await access.record({ outcome: 'success', patients: [...(event.patients ?? [])].sort(), count: 1, id });
    return JSON.stringify(resource);
  });
}
