/**
 * Reports over the audit log, for a compliance officer answering a patient or a regulator:
 *
 * - the **access report** ("who accessed my record"): every event naming the patient over a period
 *   (six years by default);
 * - the **accounting of disclosures** (45 CFR 164.528): over the last six years, each successful
 *   release of the patient's data for a purpose that 164.528(a)(1) does not exempt, with its date,
 *   recipient, a description of what was disclosed, and the purpose.
 *
 * Each comes as FHIR (a Bundle of AuditEvents) and as CSV (RFC 4180, a header row). Each run is itself
 * an audited read of the audit log (action `audit-read`, code `report.access` / `report.disclosures`),
 * appended durably before the report is handed out. Sealed fields are not opened in reports.
 * docs/audit.md.
 * @module
 */
import { CustosError, type IssueDetail } from '../kernel/errors.ts';
import { isFhirId, newId } from '../kernel/ids.ts';
import type { AuditEvent } from './audit-event.ts';
import { auditEventResource } from './audit-event-resource.ts';
import {
  AUDIT_MAX_COUNT,
  AUDIT_READ_PURPOSES,
  clientNames,
  dateRange,
  emptyCriteria,
  END_OF_TIME,
  findAuditEvents,
  type AuditQueryDeps,
} from './audit-query.ts';

/**
 * Purposes of use whose disclosures need no accounting (45 CFR 164.528(a)(1)), from the
 * v3-ActReason PurposeOfUse hierarchy:
 * - treatment: TREAT and its descendants (CLINTRL, COC, ETREAT, BTG, ERTREAT, POPHLTH);
 * - payment: HPAYMT and its descendants;
 * - health care operations: HOPERAT and its descendants, except those v3 files under operations that
 *   HIPAA makes accountable disclosures under 164.512: DONAT (organ procurement, (h)), FRAUD and GOV
 *   (oversight and law enforcement, (d), (f)), HDECD (decedents, (g)), HLEGAL (judicial
 *   proceedings, (e));
 * - to the individual or their personal representative (PATRQT, PWATRNY: (a)(1)(ii)), or to persons
 *   involved in their care (FAMRQT, SUPNWK: 164.510, (a)(1)(v)).
 * Everything else (research, public health, marketing, disaster relief, threat, the 164.512 codes
 * above, codes unknown to this list) is accounted: when unsure, the accounting lists it.
 */
export const NOT_ACCOUNTABLE_PURPOSES: ReadonlySet<string> = new Set([
  // treatment
  'TREAT',
  'CLINTRL',
  'COC',
  'ETREAT',
  'BTG',
  'ERTREAT',
  'POPHLTH',
  // payment
  'HPAYMT',
  'CLMATTCH',
  'COVAUTH',
  'COVERAGE',
  'ELIGDTRM',
  'ELIGVER',
  'ENROLLM',
  'MILDCRG',
  'REMITADV',
  // operations (without DONAT, FRAUD, GOV, HDECD, HLEGAL)
  'HOPERAT',
  'CAREMGT',
  'HACCRED',
  'HCOMPL',
  'HDIRECT',
  'HDM',
  'HOUTCOMS',
  'HPRGRP',
  'HQUALIMP',
  'HSYSADMIN',
  'LABELING',
  'METAMGT',
  'MEMADMIN',
  'PATADMIN',
  'PATSFTY',
  'PERFMSR',
  'RECORDMGT',
  'SYSDEV',
  'HTEST',
  'TRAIN',
  // the individual, their representative, persons involved in their care
  'PATRQT',
  'PWATRNY',
  'FAMRQT',
  'SUPNWK',
]);

/**
 * Actions that hand PHI out: reads, version reads, history and searches, and what the egress gateway
 * let out to a vendor (a subscription notification naming or carrying a patient's resource). Writes
 * return what the caller sent; refusals and failures disclose nothing; reads of the audit log are not
 * disclosures of the record. An egress event is written when the gateway allows the connection,
 * before the vendor has answered: a send that then fails is still listed (when unsure, list it).
 */
export const DISCLOSING_ACTIONS: ReadonlySet<string> = new Set([
  'read',
  'vread',
  'history',
  'search',
  'egress',
]);

/** Whether an event is a disclosure that the accounting of 164.528 lists. */
export function isAccountableDisclosure(e: AuditEvent): boolean {
  return (
    e.outcome === 'success' &&
    e.phase !== 'attempt' &&
    DISCLOSING_ACTIONS.has(e.action) &&
    !NOT_ACCOUNTABLE_PURPOSES.has(e.purpose ?? '')
  );
}

export type ReportKind = 'access' | 'disclosures';

export interface ReportRequest {
  patient: string;
  /** FHIR date or dateTime; default six years before now. (Disclosures: at most six years back.) */
  since?: string;
  /** FHIR date or dateTime (exclusive end of its precision); default now. */
  until?: string;
  /** Only this project's events (default: every project). */
  projectId?: string;
  /** Why the report is run (recorded); one of AUDIT_READ_PURPOSES, default PATRQT. */
  purpose?: string;
  /** Request id of the report run's own audit event. */
  requestId?: string;
}

export interface ReportRow {
  seq: number;
  time: string;
  action: string;
  outcome: string;
  purpose: string;
  projectId: string;
  clientId: string;
  clientName: string;
  userId: string;
  resourceType: string;
  resourceId: string;
  description: string;
  count: string;
  sourceIp: string;
  requestId: string;
  code: string;
}

export interface AuditReport {
  kind: ReportKind;
  patient: string;
  since: string;
  until: string;
  generatedAt: string;
  rows: ReportRow[];
  /** The AuditEvent resources of the rows, in the same order. */
  resources: Record<string, unknown>[];
}

function badField(field: string, diagnostics: string): CustosError {
  const issue: IssueDetail = { severity: 'error', code: 'invalid', expression: field, diagnostics };
  return new CustosError('BAD_REQUEST', [issue]);
}

function sixYearsBefore(now: Date): Date {
  const d = new Date(now);
  d.setUTCFullYear(d.getUTCFullYear() - 6);
  return d;
}

/** What was disclosed, in words, from identifiers only. */
export function describe(e: AuditEvent): string {
  const r = e.resource;
  const ref = r?.type ? `${r.type}${r.id ? `/${r.id}` : ''}` : 'all resource types';
  switch (e.action) {
    case 'read':
    case 'vread':
      return `${ref}${r?.version ? ` (version ${r.version})` : ''}`;
    case 'history':
      return `history of ${ref}: ${e.count ?? 0} versions`;
    case 'search':
      return `search of ${ref} returning ${e.count ?? 0} resources (their ids are not recorded)`;
    case 'egress': {
      const x = e.egress;
      return `sent to vendor ${x?.vendorId ?? '?'} at ${x?.host ?? '?'}:${x?.port ?? '?'} (data class ${x?.dataClass ?? '?'}, ${x?.purpose ?? '?'})`;
    }
    default:
      return `${e.action} of ${ref}`;
  }
}

/** Builds the two reports; each run is audited. */
export class AuditReports {
  constructor(
    private readonly deps: AuditQueryDeps,
    private readonly now: () => Date = () => new Date(),
  ) {}

  async run(kind: ReportKind, req: ReportRequest): Promise<AuditReport> {
    if (typeof req.patient !== 'string' || !isFhirId(req.patient))
      throw badField('patient', 'patient must be a Patient id.');
    const purpose = req.purpose ?? 'PATRQT';
    if (!AUDIT_READ_PURPOSES.has(purpose))
      throw badField('purpose', `purpose must be one of ${[...AUDIT_READ_PURPOSES].join(', ')}.`);
    if (req.projectId !== undefined && !isFhirId(req.projectId))
      throw badField('project', 'project must be a project id.');
    const now = this.now();
    const floor = sixYearsBefore(now);
    let since = floor;
    if (req.since !== undefined) {
      const r = dateRange(req.since);
      if (!r) throw badField('since', 'since must be a FHIR date or dateTime.');
      since = new Date(r.lo);
      // The accounting covers six years; the access report may go further back.
      if (kind === 'disclosures' && since < floor) since = floor;
    }
    let until = now;
    if (req.until !== undefined) {
      const r = dateRange(req.until);
      if (!r) throw badField('until', 'until must be a FHIR date or dateTime.');
      until = r.hi === END_OF_TIME ? new Date(Date.UTC(9999, 11, 31, 23, 59, 59, 999)) : new Date(r.hi);
    }
    const c = emptyCriteria();
    c.patients = [[req.patient]];
    c.dates = [[{ ge: since.toISOString(), lt: until.toISOString() }]];
    c.projectId = req.projectId;
    c.count = AUDIT_MAX_COUNT;
    const found: { seq: number; event: AuditEvent }[] = [];
    for (;;) {
      const page = await findAuditEvents(this.deps.audit, c, this.deps.log);
      for (const x of page.events) if (kind === 'access' || isAccountableDisclosure(x.event)) found.push(x);
      if (page.next === undefined) break;
      c.after = page.next;
    }
    const names = await clientNames(this.deps, found);
    const rows = found.map(({ seq, event: e }) => ({
      seq,
      time: e.time,
      action: e.action,
      outcome: e.outcome,
      purpose: e.purpose ?? '',
      projectId: e.projectId ?? '',
      clientId: e.actor?.clientId ?? '',
      clientName: (e.actor?.clientId && names.get(e.actor.clientId)) || '',
      userId: e.actor?.userId ?? '',
      resourceType: e.resource?.type ?? '',
      resourceId: e.resource?.id ?? '',
      description: describe(e),
      count: e.count === undefined ? '' : String(e.count),
      sourceIp: e.source?.ip ?? '',
      requestId: e.requestId,
      code: e.code ?? '',
    }));
    const resources = found.map(({ seq, event }) =>
      auditEventResource(seq, event, { observer: this.deps.fhirBaseUrl, clientNames: names }),
    );
    const report: AuditReport = {
      kind,
      patient: req.patient,
      since: since.toISOString(),
      until: until.toISOString(),
      generatedAt: now.toISOString(),
      rows,
      resources,
    };
    // The run is a read of the audit log about this patient: recorded before it is handed out.
    try {
      await this.deps.audit.append(
        {
          v: 1,
          id: newId(),
          time: new Date().toISOString(),
          phase: 'access',
          action: 'audit-read',
          outcome: 'success',
          code: kind === 'access' ? 'report.access' : 'report.disclosures',
          requestId: req.requestId ?? newId(),
          projectId: req.projectId,
          actor: { roles: ['installation-admin'] },
          purpose,
          resource: { type: 'AuditEvent' },
          patients: [req.patient],
          count: rows.length,
          source: {},
        },
        { query: JSON.stringify({ kind, patient: req.patient, since: report.since, until: report.until }) },
      );
    } catch {
      throw new CustosError('AUDIT_UNAVAILABLE');
    }
    return report;
  }
}

const ACCESS_COLUMNS: readonly [string, keyof ReportRow][] = [
  ['seq', 'seq'],
  ['time', 'time'],
  ['action', 'action'],
  ['outcome', 'outcome'],
  ['purpose', 'purpose'],
  ['project_id', 'projectId'],
  ['client_id', 'clientId'],
  ['client_name', 'clientName'],
  ['user_id', 'userId'],
  ['resource_type', 'resourceType'],
  ['resource_id', 'resourceId'],
  ['description', 'description'],
  ['count', 'count'],
  ['source_ip', 'sourceIp'],
  ['request_id', 'requestId'],
  ['code', 'code'],
];

const DISCLOSURE_COLUMNS: readonly [string, keyof ReportRow | null][] = [
  ['date', 'time'],
  ['recipient_client_id', 'clientId'],
  ['recipient_client_name', 'clientName'],
  ['recipient_user_id', 'userId'],
  // Client registrations hold no postal address yet: the column stays empty until they do.
  ['recipient_address', null],
  ['purpose', 'purpose'],
  ['description', 'description'],
  ['resource_type', 'resourceType'],
  ['resource_id', 'resourceId'],
  ['project_id', 'projectId'],
  ['seq', 'seq'],
];

/**
 * One CSV field (RFC 4180): quoted when it holds a comma, a quote, CR or LF, or surrounding spaces,
 * quotes doubled. A value that a spreadsheet would run as a formula (starting with = + - @, tab or
 * CR) gets a leading apostrophe (OWASP "CSV injection").
 */
export function csvField(value: string): string {
  const v = /^[=+\-@\t\r]/.test(value) ? `'${value}` : value;
  return /[",\r\n]|^\s|\s$/.test(v) ? `"${v.replace(/"/g, '""')}"` : v;
}

/** The report as CSV: a header row, then one row per event; CRLF line ends (RFC 4180). */
export function reportCsv(r: AuditReport): string {
  const columns = r.kind === 'access' ? ACCESS_COLUMNS : DISCLOSURE_COLUMNS;
  const lines = [columns.map(([h]) => h).join(',')];
  for (const row of r.rows)
    lines.push(columns.map(([, k]) => csvField(k === null ? '' : String(row[k]))).join(','));
  return `${lines.join('\r\n')}\r\n`;
}

/** The report as a FHIR Bundle (type collection) of AuditEvents. */
export function reportBundle(r: AuditReport, fhirBaseUrl: string): Record<string, unknown> {
  return {
    resourceType: 'Bundle',
    id: newId(),
    meta: {
      tag: [
        {
          system: 'urn:custos:audit-report',
          code: r.kind,
          display: r.kind === 'access' ? 'Access report' : 'Accounting of disclosures (45 CFR 164.528)',
        },
      ],
    },
    identifier: { system: 'urn:custos:audit-report:patient', value: r.patient },
    type: 'collection',
    timestamp: r.generatedAt,
    entry: r.resources.map((resource) => ({
      fullUrl: `${fhirBaseUrl}/AuditEvent/${resource.id as string}`,
      resource,
    })),
  };
}
