import type { AuditLog } from '../audit/audit-log.ts';
import { adminEvent } from '../audit/audit-event.ts';
import { CustosError } from '../kernel/errors.ts';
import { newId } from '../kernel/ids.ts';
import { Envelope } from '../crypto/envelope.ts';
import type { ProtectedElement, SensitivityClass } from '../crypto/protection-policy.ts';
import type { SqlDriver } from '../store/sql-driver.ts';

/**
 * Key administration (issue 5): rotation, re-wrapping, re-encryption and crypto-shredding under
 * dual control. Every step is an audited administrative action. Re-wrapping and re-encryption work
 * in committed batches and select only what is still to do, so an interrupted run resumes.
 */
export interface KeyAdminDeps {
  db: SqlDriver;
  audit: AuditLog;
  envelope: Envelope;
}

export interface RotateResult {
  projects: { projectId: string; epoch: number }[];
}
export interface RewrapResult {
  rewrapped: number;
  reencrypted: number;
}
export interface DestroyRequest {
  requestId: string;
  projectId: string;
  requestedBy: string;
  state: 'pending' | 'done';
}

async function audited(
  deps: KeyAdminDeps,
  code: string,
  projectId: string | undefined,
  extra: { userId?: string; count?: number; id?: string } = {},
): Promise<void> {
  await deps.audit.append(
    adminEvent(code, {
      requestId: newId(),
      projectId,
      userId: extra.userId,
      resource: { type: 'DataKey', id: extra.id },
      count: extra.count,
    }),
  );
}

async function projectsOf(deps: KeyAdminDeps, projectId?: string): Promise<string[]> {
  const r = await deps.db.query<{ id: string }>(
    projectId ? 'SELECT id FROM project WHERE id = $1' : 'SELECT id FROM project ORDER BY id',
    projectId ? [projectId] : [],
  );
  if (projectId && r.rows.length === 0) throw new CustosError('NOT_FOUND');
  return r.rows.map((x) => x.id);
}

/** `custos keys rotate`: a new KEK and data-key epoch per project; new writes use it at once. */
export async function rotateKeys(
  deps: KeyAdminDeps,
  opts: { projectId?: string } = {},
): Promise<RotateResult> {
  const out: RotateResult = { projects: [] };
  for (const projectId of await projectsOf(deps, opts.projectId)) {
    const epoch = await deps.envelope.rotate(projectId);
    await audited(deps, 'key.rotated', projectId, { id: `data-${epoch}`, count: epoch });
    out.projects.push({ projectId, epoch });
  }
  deps.envelope.clearCache();
  return out;
}

/**
 * `custos keys rewrap [--reencrypt]`: wraps every stored data key of a project under the project's
 * newest KEK (so older KEKs can be retired), and with `reencrypt` re-seals every stored version
 * whose protected elements are under an older data-key epoch.
 */
export async function rewrapKeys(
  deps: KeyAdminDeps,
  opts: { projectId?: string; reencrypt?: boolean; batch?: number } = {},
): Promise<RewrapResult> {
  const batch = Math.min(Math.max(opts.batch ?? 200, 1), 5000);
  const result: RewrapResult = { rewrapped: 0, reencrypted: 0 };
  const provider = deps.envelope.provider;
  for (const projectId of await projectsOf(deps, opts.projectId)) {
    const newest = await deps.db.query<{ kek_handle: string; epoch: number }>(
      `SELECT kek_handle, epoch FROM data_key WHERE project_id = $1 AND kind = 'data' AND state = 'active'
        ORDER BY epoch DESC LIMIT 1`,
      [projectId],
    );
    const head = newest.rows[0];
    if (!head) continue;
    const stale = await deps.db.query<{
      kind: 'data' | 'blind';
      epoch: number;
      kek_handle: string;
      wrapped: Uint8Array;
    }>(
      `SELECT kind, epoch, kek_handle, wrapped FROM data_key WHERE project_id = $1 AND state = 'active' AND kek_handle <> $2`,
      [projectId, head.kek_handle],
    );
    for (const row of stale.rows) {
      const aad = Buffer.from(`custos:dek:v1|${row.kind}|${projectId}|${row.epoch}`, 'utf8');
      const key = await provider.unwrap(row.kek_handle, Buffer.from(row.wrapped), aad);
      const wrapped = await provider.wrap(head.kek_handle, key, aad);
      key.fill(0);
      // Compare-and-set: a concurrent rewrap of the same row changes nothing twice.
      await deps.db.query(
        `UPDATE data_key SET kek_handle = $4, wrapped = $5 WHERE project_id = $1 AND kind = $2 AND epoch = $3 AND kek_handle = $6`,
        [projectId, row.kind, row.epoch, head.kek_handle, wrapped, row.kek_handle],
      );
      await audited(deps, 'key.rewrapped', projectId, { id: `${row.kind}-${row.epoch}` });
      result.rewrapped++;
    }
    if (!opts.reencrypt) continue;
    const epoch = Number(head.epoch);
    const { dek } = await deps.envelope.prepareWrite(projectId);
    for (const table of ['resource', 'resource_version'] as const) {
      for (;;) {
        const done = await deps.db.transaction(async (q) => {
          const rows = await q.query<{
            resource_type: string;
            id: string;
            version_id: number;
            sealed: Record<string, string>;
          }>(
            `SELECT resource_type, id, version_id, sealed FROM ${table}
              WHERE project_id = $1 AND sealed IS NOT NULL
                AND EXISTS (SELECT 1 FROM jsonb_each_text(sealed) e WHERE split_part(e.value, '.', 2)::int < $2)
              LIMIT $3 FOR UPDATE SKIP LOCKED`,
            [projectId, epoch, batch],
          );
          for (const r of rows.rows) {
            const sealed: Record<string, string> = {};
            for (const [cls, blob] of Object.entries(r.sealed)) {
              const ctx = {
                projectId,
                type: r.resource_type,
                id: r.id,
                version: Number(r.version_id),
                cls: cls as SensitivityClass,
              };
              const plain = await deps.envelope.open(ctx, blob, q);
              // Parsed and re-serialized so a corrupted payload fails here, not on a later read.
              const elements = JSON.parse(plain.toString('utf8')) as ProtectedElement[];
              sealed[cls] = Envelope.seal(dek, epoch, ctx, Buffer.from(JSON.stringify(elements), 'utf8'));
            }
            await q.query(
              `UPDATE ${table} SET sealed = $5::jsonb WHERE project_id = $1 AND resource_type = $2 AND id = $3 AND version_id = $4`,
              [projectId, r.resource_type, r.id, r.version_id, JSON.stringify(sealed)],
            );
          }
          return rows.rows.length;
        });
        result.reencrypted += done;
        if (done < batch) break;
      }
    }
    await audited(deps, 'key.reencrypted', projectId, { count: result.reencrypted });
  }
  return result;
}

/**
 * Crypto-shredding, step 1 of 2 (dual control): an administrator asks for a project's keys to be
 * destroyed. Nothing is destroyed until a different administrator approves.
 */
export async function requestKeyDestruction(
  deps: KeyAdminDeps,
  opts: { projectId: string; adminUserId: string },
): Promise<DestroyRequest> {
  await assertAdmin(deps, opts.projectId, opts.adminUserId);
  const requestId = newId();
  await deps.db.query(
    `INSERT INTO key_destruction (id, project_id, requested_by, state) VALUES ($1, $2, $3, 'pending')`,
    [requestId, opts.projectId, opts.adminUserId],
  );
  await audited(deps, 'key.destruction_requested', opts.projectId, {
    userId: opts.adminUserId,
    id: requestId,
  });
  return { requestId, projectId: opts.projectId, requestedBy: opts.adminUserId, state: 'pending' };
}

/**
 * Step 2: a second administrator approves; every KEK of the project is destroyed in the provider
 * and its data keys are marked destroyed. Irreversible: protected elements of the project (in the
 * database and in every backup of it) can no longer be opened.
 */
export async function approveKeyDestruction(
  deps: KeyAdminDeps,
  opts: { requestId: string; adminUserId: string },
): Promise<DestroyRequest & { destroyedKeks: number }> {
  const r = await deps.db.query<{ project_id: string; requested_by: string; state: string }>(
    'SELECT project_id, requested_by, state FROM key_destruction WHERE id = $1',
    [opts.requestId],
  );
  const req = r.rows[0];
  if (!req || req.state !== 'pending') throw new CustosError('NOT_FOUND');
  if (req.requested_by === opts.adminUserId) throw new CustosError('DUAL_CONTROL_REQUIRED');
  await assertAdmin(deps, req.project_id, opts.adminUserId);
  const handles = await deps.db.query<{ kek_handle: string }>(
    `SELECT DISTINCT kek_handle FROM data_key WHERE project_id = $1 AND state = 'active'`,
    [req.project_id],
  );
  for (const h of handles.rows) await deps.envelope.provider.destroyKek(h.kek_handle);
  await deps.db.transaction(async (q) => {
    await q.query(`UPDATE data_key SET state = 'destroyed' WHERE project_id = $1`, [req.project_id]);
    await q.query(
      `UPDATE key_destruction SET state = 'done', approved_by = $2, approved_at = now() WHERE id = $1`,
      [opts.requestId, opts.adminUserId],
    );
  });
  deps.envelope.clearCache();
  await audited(deps, 'key.destroyed', req.project_id, {
    userId: opts.adminUserId,
    id: opts.requestId,
    count: handles.rows.length,
  });
  return {
    requestId: opts.requestId,
    projectId: req.project_id,
    requestedBy: req.requested_by,
    state: 'done',
    destroyedKeks: handles.rows.length,
  };
}

async function assertAdmin(deps: KeyAdminDeps, projectId: string, userId: string): Promise<void> {
  const r = await deps.db.query(
    `SELECT 1 FROM app_user WHERE id = $1 AND project_id = $2 AND role = 'admin' AND active`,
    [userId, projectId],
  );
  if (r.rows.length === 0) throw new CustosError('DUAL_CONTROL_REQUIRED');
}
