import { createHash } from 'node:crypto';
import { newId } from '../kernel/ids.ts';
import { CustosError, type IssueDetail } from '../kernel/errors.ts';
import type { SqlDriver } from '../store/sql-driver.ts';
import type { AuditLog } from '../audit/audit-log.ts';
import { adminEvent } from '../audit/audit-event.ts';
import { fieldIssue, shortLabel } from '../kernel/validation.ts';

/**
 * Projects and their Business Associate Agreements (issue 7, docs/phi-boundary.md).
 *
 * Every project starts as a sandbox, which accepts only test data. A project becomes production
 * (real PHI) only when a BAA covering it is recorded: who the counterparty is, who signed and when,
 * the SHA-256 of the signed document (the document itself is not stored) and the Custos services
 * it covers. Recording a BAA promotes the project; both are audited as administrative actions, in
 * the same transaction as the rows (if the audit log cannot take them, nothing is written). A
 * database trigger (migration 7) refuses a production project without a BAA whatever writes it.
 *
 * @example
 * const p = await createProject(deps, { name: 'Clinic app', production: true });
 * // p.kind === 'sandbox', p.productionRequested === true
 * await recordProjectBaa(deps, {
 *   projectId: p.projectId, counterparty: 'Example Clinic LLC', signedBy: 'Dana Roe',
 *   signedAt: '2025-03-01', services: ['fhir'], documentSha256: sha256Hex(pdfBytes),
 * });
 * // → { kind: 'production', promoted: true, … }
 */

/**
 * The Custos services a BAA can cover: where PHI enters (fhir: the FHIR REST API; mllp: HL7v2
 * over MLLP; imports: bulk imports), where it rests besides the resource store (audit: the audit
 * log; backups) and the channels through which it leaves (subscriptions: FHIR rest-hook
 * notifications; email: notifications over SMTP).
 */
export const BAA_SERVICES = [
  'fhir',
  'mllp',
  'imports',
  'subscriptions',
  'email',
  'audit',
  'backups',
] as const;
export type BaaService = (typeof BAA_SERVICES)[number];

/** Earliest accepted signature date: HIPAA was enacted on 1996-08-21. */
export const EARLIEST_SIGNED_AT = '1996-08-21';

export interface ProjectDeps {
  db: SqlDriver;
  audit: AuditLog;
  now?: () => Date;
}

export interface CreateProjectRequest {
  name: string;
  /** Production is requested: the project is created as a sandbox and promoted when its BAA is recorded. */
  production?: boolean;
}

export interface ProjectInfo {
  projectId: string;
  name: string;
  kind: 'sandbox' | 'production';
  /** Created with `--production` and waiting for its BAA. */
  productionRequested: boolean;
}

export interface RecordBaaRequest {
  projectId: string;
  counterparty: string;
  signedBy: string;
  /** `YYYY-MM-DD`, or a date and time with a zone (`2025-03-01T14:30:00Z`, `…+01:00`). */
  signedAt: string;
  services: string[];
  /** SHA-256 of the signed document, 64 hex digits (the CLI computes it from `--document`). */
  documentSha256: string;
  /** Who recorded it (the CLI sends the operating-system account that ran it). */
  recordedBy?: string;
}

export interface BaaRecord {
  baaId: string;
  projectId: string;
  counterparty: string;
  signedBy: string;
  signedAt: string;
  documentSha256: string;
  services: BaaService[];
  recordedBy: string;
  recordedAt: string;
}

export interface RecordBaaResult extends BaaRecord {
  kind: 'production';
  /** True when this BAA turned a sandbox into a production project. */
  promoted: boolean;
}

export interface ProjectDetails extends ProjectInfo {
  baas: BaaRecord[];
}

/** SHA-256 (hex) of a signed document's bytes; an empty document is refused. */
export function documentSha256(bytes: Uint8Array): string {
  if (bytes.length === 0) {
    throw new CustosError('BAA_INVALID', [
      { severity: 'error', code: 'required', expression: 'document', diagnostics: 'The document is empty.' },
    ]);
  }
  return createHash('sha256').update(bytes).digest('hex');
}

/**
 * Parses a signature date: a calendar date (`YYYY-MM-DD`) or a date and time with a zone. Returns
 * the normalized form (the date, or the instant in UTC) or a reason. Not before 1996-08-21, not in
 * the future (a date may be "today" anywhere on Earth: up to UTC+14).
 */
export function parseSignedAt(v: unknown, now: Date): { value: string } | { reason: string } {
  if (typeof v !== 'string' || v.trim() === '') return { reason: 'The signature date is missing.' };
  const s = v.trim();
  const date = /^(\d{4})-(\d{2})-(\d{2})$/.exec(s);
  const dateTime = /^(\d{4})-(\d{2})-(\d{2})T\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?(?:Z|[+-]\d{2}:\d{2})$/.exec(
    s,
  );
  const m = date ?? dateTime;
  if (!m)
    return {
      reason: 'The signature date is not a date: use YYYY-MM-DD or an ISO 8601 date-time with a zone.',
    };
  const [y, mo, d] = [Number(m[1]), Number(m[2]), Number(m[3])];
  const calendar = new Date(Date.UTC(y, mo - 1, d));
  if (calendar.getUTCFullYear() !== y || calendar.getUTCMonth() !== mo - 1 || calendar.getUTCDate() !== d)
    return { reason: 'The signature date is not a calendar date.' };
  let value: string;
  if (date) {
    value = s;
    const latestToday = new Date(now.getTime() + 14 * 3600_000).toISOString().slice(0, 10);
    if (value > latestToday) return { reason: 'The signature date is in the future.' };
  } else {
    const t = Date.parse(s);
    if (Number.isNaN(t)) return { reason: 'The signature date is not a date.' };
    // Five minutes for clocks that disagree.
    if (t > now.getTime() + 5 * 60_000) return { reason: 'The signature date is in the future.' };
    value = new Date(t).toISOString();
  }
  if (value.slice(0, 10) < EARLIEST_SIGNED_AT)
    return { reason: `The signature date is before HIPAA (${EARLIEST_SIGNED_AT}).` };
  return { value };
}

/** Checks a BAA request; every problem is reported at once, each naming its field, none its value. */
export function validateBaa(
  req: Partial<Record<keyof RecordBaaRequest, unknown>>,
  now: Date,
): Omit<BaaRecord, 'baaId' | 'recordedAt'> {
  const issues: IssueDetail[] = [];
  const projectId = typeof req.projectId === 'string' && req.projectId !== '' ? req.projectId : undefined;
  if (!projectId) issues.push(fieldIssue('project', 'The project is missing.', 'required'));
  const counterparty = shortLabel(req.counterparty);
  if (!counterparty)
    issues.push(
      fieldIssue('counterparty', 'The counterparty is missing, longer than 200 characters or not text.'),
    );
  const signedBy = shortLabel(req.signedBy);
  if (!signedBy)
    issues.push(fieldIssue('signedBy', 'The signatory is missing, longer than 200 characters or not text.'));
  const signedAt = parseSignedAt(req.signedAt, now);
  if ('reason' in signedAt) issues.push(fieldIssue('signedAt', signedAt.reason));
  const services: BaaService[] = [];
  if (!Array.isArray(req.services) || req.services.length === 0) {
    issues.push(
      fieldIssue(
        'services',
        `No covered service: name at least one of ${BAA_SERVICES.join(', ')}.`,
        'required',
      ),
    );
  } else {
    for (const s of req.services) {
      const name = typeof s === 'string' ? s.trim().toLowerCase() : '';
      if (!(BAA_SERVICES as readonly string[]).includes(name)) {
        issues.push(
          fieldIssue(
            'services',
            `Unknown service: the services are ${BAA_SERVICES.join(', ')}.`,
            'code-invalid',
          ),
        );
        break;
      }
      if (!services.includes(name as BaaService)) services.push(name as BaaService);
    }
  }
  const sha = typeof req.documentSha256 === 'string' ? req.documentSha256.trim().toLowerCase() : '';
  if (!/^[0-9a-f]{64}$/.test(sha))
    issues.push(
      fieldIssue('documentSha256', 'The document hash is missing or not a SHA-256 (64 hex digits).'),
    );
  const recordedBy = req.recordedBy === undefined ? 'installation-admin' : shortLabel(req.recordedBy);
  if (!recordedBy) issues.push(fieldIssue('recordedBy', 'Who recorded the BAA is not a short text.'));
  if (issues.length > 0) throw new CustosError('BAA_INVALID', issues);
  return {
    projectId: projectId!,
    counterparty: counterparty!,
    signedBy: signedBy!,
    signedAt: (signedAt as { value: string }).value,
    services,
    documentSha256: sha,
    recordedBy: recordedBy!,
  };
}

/** Creates a project: always a sandbox; `production` records the request (see recordProjectBaa). */
export async function createProject(
  deps: ProjectDeps,
  req: CreateProjectRequest,
  requestId = newId(),
): Promise<ProjectInfo> {
  const name = shortLabel(req.name);
  if (!name)
    throw new CustosError('BAD_REQUEST', [
      fieldIssue('name', 'The project name is missing, longer than 200 characters or not text.'),
    ]);
  const projectId = newId();
  const productionRequested = req.production === true;
  await deps.db.transaction(async (tx) => {
    await tx.query(
      `INSERT INTO project (id, name, kind, production_requested) VALUES ($1, $2, 'sandbox', $3)`,
      [projectId, name, productionRequested],
    );
    // Inside the transaction: if the audit log cannot take it, the project is not created.
    await deps.audit.append(
      adminEvent('project.created', { requestId, projectId, resource: { type: 'Project', id: projectId } }),
    );
  });
  return { projectId, name, kind: 'sandbox', productionRequested };
}

/**
 * Records a BAA for a project and makes the project production (if it was a sandbox), in one
 * transaction with their audit events (`project.baa_recorded`, `project.promoted`). Bad input or
 * an unknown project: nothing is written.
 */
export async function recordProjectBaa(
  deps: ProjectDeps,
  req: Partial<Record<keyof RecordBaaRequest, unknown>>,
  requestId = newId(),
): Promise<RecordBaaResult> {
  const now = deps.now?.() ?? new Date();
  const baa = validateBaa(req, now);
  const baaId = newId();
  const recordedAt = now.toISOString();
  const promoted = await deps.db.transaction(async (tx) => {
    const p = await tx.query<{ kind: string }>('SELECT kind FROM project WHERE id = $1 FOR UPDATE', [
      baa.projectId,
    ]);
    const kind = p.rows[0]?.kind;
    if (!kind) throw new CustosError('PROJECT_NOT_FOUND');
    await tx.query(
      `INSERT INTO project_baa (id, project_id, counterparty, signed_by, signed_at, document_sha256, services,
         recorded_by, recorded_at)
       VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)`,
      [
        baaId,
        baa.projectId,
        baa.counterparty,
        baa.signedBy,
        baa.signedAt,
        baa.documentSha256,
        baa.services,
        baa.recordedBy,
        recordedAt,
      ],
    );
    const promote = kind !== 'production';
    if (promote) {
      await tx.query(`UPDATE project SET kind = 'production', production_requested = false WHERE id = $1`, [
        baa.projectId,
      ]);
    }
    // In the transaction: if the audit log cannot take the events, nothing is written.
    await deps.audit.append(
      adminEvent('project.baa_recorded', {
        requestId,
        projectId: baa.projectId,
        resource: { type: 'ProjectBaa', id: baaId },
      }),
    );
    if (promote) {
      await deps.audit.append(
        adminEvent('project.promoted', {
          requestId,
          projectId: baa.projectId,
          resource: { type: 'Project', id: baa.projectId },
        }),
      );
    }
    return promote;
  });
  return { baaId, ...baa, recordedAt, kind: 'production', promoted };
}

/** A project with its BAAs, oldest first. */
export async function showProject(deps: ProjectDeps, projectId: string): Promise<ProjectDetails> {
  const p = await deps.db.query<{
    id: string;
    name: string;
    kind: 'sandbox' | 'production';
    production_requested: boolean;
  }>('SELECT id, name, kind, production_requested FROM project WHERE id = $1', [projectId]);
  const row = p.rows[0];
  if (!row) throw new CustosError('PROJECT_NOT_FOUND');
  const b = await deps.db.query<{
    id: string;
    counterparty: string;
    signed_by: string;
    signed_at: string;
    document_sha256: string;
    services: BaaService[];
    recorded_by: string;
    recorded_at: Date | string;
  }>(
    `SELECT id, counterparty, signed_by, signed_at, document_sha256, services, recorded_by, recorded_at
       FROM project_baa WHERE project_id = $1 ORDER BY recorded_at, id`,
    [projectId],
  );
  return {
    projectId: row.id,
    name: row.name,
    kind: row.kind,
    productionRequested: row.production_requested,
    baas: b.rows.map((r) => ({
      baaId: r.id,
      projectId: row.id,
      counterparty: r.counterparty,
      signedBy: r.signed_by,
      signedAt: r.signed_at,
      documentSha256: r.document_sha256,
      services: r.services,
      recordedBy: r.recorded_by,
      recordedAt: new Date(r.recorded_at).toISOString(),
    })),
  };
}

/**
 * A project's kind and the services its recorded BAAs cover together (empty for a sandbox, or a
 * production project whose BAAs name none); undefined for an unknown project.
 */
export async function projectCoverage(
  db: SqlDriver,
  projectId: string,
): Promise<{ kind: 'sandbox' | 'production'; services: string[] } | undefined> {
  const p = await db.query<{ kind: 'sandbox' | 'production' }>('SELECT kind FROM project WHERE id = $1', [
    projectId,
  ]);
  if (!p.rows[0]) return undefined;
  const b = await db.query<{ services: string[] }>('SELECT services FROM project_baa WHERE project_id = $1', [
    projectId,
  ]);
  return { kind: p.rows[0].kind, services: [...new Set(b.rows.flatMap((r) => r.services))] };
}
