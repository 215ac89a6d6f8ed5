import { CustosError } from '../kernel/errors.ts';
import { newId } from '../kernel/ids.ts';
import type { SqlDriver, SqlQueryable } from '../store/sql-driver.ts';
import type { AuditLog } from '../audit/audit-log.ts';
import { adminEvent } from '../audit/audit-event.ts';

/**
 * The durable state of rest-hook subscriptions (resource migration 10): the change feed's cursor,
 * the delivery queue and its dead letters, each subscription's run of refusals. It holds which
 * resource version to notify, never the resource's content: the content is read through the PHI
 * gateway at delivery time (subscription-worker.ts), so no PHI rests here outside the
 * encrypted resource store.
 *
 * The change feed reads `resource_version` metadata only (project, type, id, version, deleted),
 * ordered by the writing transaction's id and a sequence (columns of migration 10). It returns
 * only versions written by transactions older than the oldest one still running
 * (`pg_snapshot_xmin`), so the cursor can never pass a version whose transaction commits later.
 */

/** One new resource version from the change feed. */
export interface Change {
  projectId: string;
  resourceType: string;
  id: string;
  versionId: number;
  deleted: boolean;
  xid: string;
  seq: string;
}

/** A queued notification. Its id is the notification id the receiver dedupes on. */
export interface Delivery {
  id: string;
  projectId: string;
  subscriptionId: string;
  resourceType: string;
  resourceId: string;
  versionId: number;
  /** Ids of the patients whose compartment the resource is in (the egress audit event names them). */
  patients: string[];
  status: 'pending' | 'delivered' | 'dead';
  attempts: number;
  nextAttemptAt: string;
  lastError?: string;
  createdAt: string;
  deliveredAt?: string;
  deadAt?: string;
  replays: number;
}

type DeliveryRow = {
  id: string;
  project_id: string;
  subscription_id: string;
  resource_type: string;
  resource_id: string;
  version_id: number;
  patients: string | null;
  status: Delivery['status'];
  attempts: number;
  next_attempt_at: Date | string;
  last_error: string | null;
  created_at: Date | string;
  delivered_at: Date | string | null;
  dead_at: Date | string | null;
  replays: number;
};

const CURSOR = 'rest-hook';
const DELIVERY_COLS = `id, project_id, subscription_id, resource_type, resource_id, version_id, patients, status, attempts,
  next_attempt_at, last_error, created_at, delivered_at, dead_at, replays`;
const iso = (v: Date | string) => new Date(v).toISOString();

function delivery(r: DeliveryRow): Delivery {
  return {
    id: r.id,
    projectId: r.project_id,
    subscriptionId: r.subscription_id,
    resourceType: r.resource_type,
    resourceId: r.resource_id,
    versionId: Number(r.version_id),
    patients: r.patients ? (JSON.parse(r.patients) as string[]) : [],
    status: r.status,
    attempts: Number(r.attempts),
    nextAttemptAt: iso(r.next_attempt_at),
    lastError: r.last_error ?? undefined,
    createdAt: iso(r.created_at),
    deliveredAt: r.delivered_at ? iso(r.delivered_at) : undefined,
    deadAt: r.dead_at ? iso(r.dead_at) : undefined,
    replays: Number(r.replays),
  };
}

/** The change feed's query ($1 the cursor's name, $2 the limit): see {@link SubscriptionQueue.changes}. */
export const CHANGES_SQL = `SELECT v.project_id, v.resource_type, v.id, v.version_id, v.deleted, v.change_xid::text AS xid, v.change_seq AS seq
         FROM resource_version v
        WHERE v.change_xid IS NOT NULL
          AND (v.change_xid, v.change_seq) >
              ((SELECT change_xid FROM subscription_cursor WHERE name = $1),
               (SELECT change_seq FROM subscription_cursor WHERE name = $1))
          AND v.change_xid < pg_snapshot_xmin(pg_current_snapshot())
        ORDER BY v.change_xid, v.change_seq
        LIMIT $2`;

export class SubscriptionQueue {
  constructor(private readonly db: SqlDriver) {}

  /**
   * Up to `limit` versions after the cursor whose transactions have all ended. The cursor is read by
   * two scalar subqueries, not a join: as parameters of the row comparison they make it a condition
   * of the index scan on resource_version_change, where a join left it a filter applied after
   * reading every version ever written (37 ms at 5,600 versions, four times a second, growing with
   * the history; CHANGES_SQL is exported for the plan test in test/query-plans.test.ts).
   */
  async changes(limit: number): Promise<Change[]> {
    const r = await this.db.query<{
      project_id: string;
      resource_type: string;
      id: string;
      version_id: number;
      deleted: boolean;
      xid: string;
      seq: string | number;
    }>(CHANGES_SQL, [CURSOR, limit]);
    return r.rows.map((x) => ({
      projectId: x.project_id,
      resourceType: x.resource_type,
      id: x.id,
      versionId: Number(x.version_id),
      deleted: x.deleted,
      xid: String(x.xid),
      seq: String(x.seq),
    }));
  }

  /**
   * Queues the matched notifications and moves the cursor past `last`, in one transaction: a crash
   * before it commits re-reads the same changes, after it none is lost. A notification already
   * queued (another worker, or a re-read) is not queued twice.
   */
  async enqueue(
    matches: {
      projectId: string;
      subscriptionId: string;
      resourceType: string;
      id: string;
      versionId: number;
      patients: string[];
    }[],
    last: Pick<Change, 'xid' | 'seq'>,
    now: Date,
  ): Promise<number> {
    let queued = 0;
    await this.db.transaction(async (tx) => {
      for (const m of matches) {
        const r = await tx.query(
          `INSERT INTO subscription_delivery (id, project_id, subscription_id, resource_type, resource_id, version_id,
             status, attempts, next_attempt_at, created_at, patients)
           VALUES ($1, $2, $3, $4, $5, $6, 'pending', 0, $7, $7, $8)
           ON CONFLICT (subscription_id, resource_type, resource_id, version_id) DO NOTHING RETURNING id`,
          [
            newId(),
            m.projectId,
            m.subscriptionId,
            m.resourceType,
            m.id,
            m.versionId,
            now.toISOString(),
            JSON.stringify(m.patients),
          ],
        );
        queued += r.rows.length;
      }
      await tx.query(
        `UPDATE subscription_cursor SET change_xid = $2::xid8, change_seq = $3::bigint, updated_at = $4
          WHERE name = $1 AND (change_xid, change_seq) < ($2::xid8, $3::bigint)`,
        [CURSOR, last.xid, last.seq, now.toISOString()],
      );
    });
    return queued;
  }

  /**
   * Claims up to `limit` due deliveries: each gets one more attempt counted and is hidden for
   * `leaseMs`. A worker that dies mid-send leaves the claim to expire and the delivery is sent again
   * (at least once); several workers never claim the same delivery (SKIP LOCKED).
   */
  async claim(limit: number, now: Date, leaseMs: number): Promise<Delivery[]> {
    return this.db.transaction(async (tx) => {
      const r = await tx.query<DeliveryRow>(
        `UPDATE subscription_delivery SET attempts = attempts + 1, next_attempt_at = $3
          WHERE id IN (SELECT id FROM subscription_delivery
                        WHERE status = 'pending' AND next_attempt_at <= $1
                        ORDER BY next_attempt_at, created_at LIMIT $2 FOR UPDATE SKIP LOCKED)
          RETURNING ${DELIVERY_COLS}`,
        [now.toISOString(), limit, new Date(now.getTime() + leaseMs).toISOString()],
      );
      return r.rows.map(delivery).sort((a, b) => a.createdAt.localeCompare(b.createdAt));
    });
  }

  /** The earliest time a pending delivery is due, if any (how long the worker may sleep). */
  async nextDue(): Promise<number | undefined> {
    const r = await this.db.query<{ t: Date | string | null }>(
      `SELECT min(next_attempt_at) AS t FROM subscription_delivery WHERE status = 'pending'`,
    );
    const t = r.rows[0]?.t;
    return t ? new Date(t).getTime() : undefined;
  }

  /** Gives a claimed delivery back uncounted (the worker is stopping). */
  async release(id: string, now: Date): Promise<void> {
    await this.db.query(
      `UPDATE subscription_delivery SET attempts = greatest(attempts - 1, 0), next_attempt_at = $2
        WHERE id = $1 AND status = 'pending'`,
      [id, now.toISOString()],
    );
  }

  async delivered(id: string, now: Date): Promise<void> {
    await this.db.query(
      `UPDATE subscription_delivery SET status = 'delivered', delivered_at = $2, last_error = NULL
        WHERE id = $1 AND status = 'pending'`,
      [id, now.toISOString()],
    );
  }

  /** A failed attempt: retried at `retryAt`, or dead when `retryAt` is undefined. */
  async failed(id: string, error: string, retryAt: Date | undefined, now: Date): Promise<void> {
    if (retryAt)
      await this.db.query(
        `UPDATE subscription_delivery SET next_attempt_at = $2, last_error = $3 WHERE id = $1 AND status = 'pending'`,
        [id, retryAt.toISOString(), error],
      );
    else
      await this.db.query(
        `UPDATE subscription_delivery SET status = 'dead', dead_at = $2, last_error = $3 WHERE id = $1 AND status = 'pending'`,
        [id, now.toISOString(), error],
      );
  }

  /** Moves every pending delivery of a subscription to the dead letters (it went to error or away). */
  async killPending(projectId: string, subscriptionId: string, error: string, now: Date): Promise<number> {
    const r = await this.db.query(
      `UPDATE subscription_delivery SET status = 'dead', dead_at = $3, last_error = $4
        WHERE project_id = $1 AND subscription_id = $2 AND status = 'pending' RETURNING id`,
      [projectId, subscriptionId, now.toISOString(), error],
    );
    return r.rows.length;
  }

  /** Counts a refusal by the egress gateway; returns the run of consecutive refusals. */
  async refused(projectId: string, subscriptionId: string, error: string, now: Date): Promise<number> {
    const r = await this.db.query<{ n: number }>(
      `INSERT INTO subscription_health (project_id, subscription_id, consecutive_refusals, last_error, updated_at)
       VALUES ($1, $2, 1, $3, $4)
       ON CONFLICT (project_id, subscription_id) DO UPDATE
         SET consecutive_refusals = subscription_health.consecutive_refusals + 1, last_error = $3, updated_at = $4
       RETURNING consecutive_refusals AS n`,
      [projectId, subscriptionId, error, now.toISOString()],
    );
    return Number(r.rows[0]?.n ?? 1);
  }

  /** A delivery got through (or the subscription was re-activated): the run of refusals ends. */
  async healthy(projectId: string, subscriptionId: string): Promise<void> {
    await this.db.query(
      `UPDATE subscription_health SET consecutive_refusals = 0 WHERE project_id = $1 AND subscription_id = $2 AND consecutive_refusals > 0`,
      [projectId, subscriptionId],
    );
  }

  /** Forgets delivered notifications older than `before` (kept a while so a second worker dedupes). */
  async prune(before: Date): Promise<void> {
    await this.db.query(
      `DELETE FROM subscription_delivery WHERE status = 'delivered' AND delivered_at < $1`,
      [before.toISOString()],
    );
  }

  async get(id: string): Promise<Delivery | undefined> {
    const r = await this.db.query<DeliveryRow>(
      `SELECT ${DELIVERY_COLS} FROM subscription_delivery WHERE id = $1`,
      [id],
    );
    return r.rows[0] && delivery(r.rows[0]);
  }

  /** Counts by status (the bench and `dead-letters` summary). */
  async counts(): Promise<Record<Delivery['status'], number>> {
    const r = await this.db.query<{ status: Delivery['status']; n: number | string }>(
      `SELECT status, count(*) AS n FROM subscription_delivery GROUP BY status`,
    );
    const out = { pending: 0, delivered: 0, dead: 0 };
    for (const x of r.rows) out[x.status] = Number(x.n);
    return out;
  }
}

/**
 * The administrator's side of the dead letters (admin API and `custos subscription …`): list and
 * replay, each audited as an admin action (`subscription.dead_letters_listed`,
 * `subscription.replayed`). The list names resource types and ids (record locators), never content.
 */
/**
 * A delivery as administrators see it (dead-letter list, replay): without the patients it concerns.
 * Those reads are audited as admin actions naming no patient, so they must not reveal whose data
 * each notification was about.
 */
export type AdminDelivery = Omit<Delivery, 'patients'>;

function forAdmin(d: Delivery): AdminDelivery {
  const { patients: _patients, ...rest } = d;
  return rest;
}

export class DeadLetters {
  constructor(private readonly deps: { db: SqlDriver; audit: AuditLog }) {}

  async list(
    opts: { projectId?: string; subscriptionId?: string; limit?: number } = {},
    requestId = newId(),
  ): Promise<{ deadLetters: AdminDelivery[] }> {
    const limit = Math.min(Math.max(Math.trunc(opts.limit ?? 100), 1), 1000);
    const where = [`status = 'dead'`];
    const args: unknown[] = [];
    if (opts.projectId) where.push(`project_id = $${args.push(opts.projectId)}`);
    if (opts.subscriptionId) where.push(`subscription_id = $${args.push(opts.subscriptionId)}`);
    const r = await this.deps.db.query<DeliveryRow>(
      `SELECT ${DELIVERY_COLS} FROM subscription_delivery WHERE ${where.join(' AND ')}
        ORDER BY dead_at DESC, id LIMIT $${args.push(limit)}`,
      args,
    );
    await this.deps.audit.append(
      adminEvent('subscription.dead_letters_listed', {
        requestId,
        projectId: opts.projectId,
        resource: { type: 'SubscriptionDelivery' },
        count: r.rows.length,
      }),
    );
    return { deadLetters: r.rows.map((x) => forAdmin(delivery(x))) };
  }

  /**
   * Puts a dead letter back in the queue, due now, with its attempts reset and the same
   * notification id (a receiver that did get an earlier attempt dedupes it). Audited in the same
   * transaction: if the audit log cannot take it, nothing changes.
   */
  async replay(id: unknown, requestId = newId(), now = new Date()): Promise<AdminDelivery> {
    if (typeof id !== 'string' || !/^[0-9a-f-]{36}$/i.test(id))
      throw new CustosError('BAD_REQUEST', [
        { severity: 'error', code: 'value', expression: 'id', diagnostics: 'id must be a dead letter id.' },
      ]);
    await this.deps.db.transaction(async (tx: SqlQueryable) => {
      const r = await tx.query<{ project_id: string }>(
        `UPDATE subscription_delivery
            SET status = 'pending', attempts = 0, next_attempt_at = $2, dead_at = NULL, replays = replays + 1
          WHERE id = $1 AND status = 'dead' RETURNING project_id`,
        [id, now.toISOString()],
      );
      const row = r.rows[0];
      if (!row)
        throw new CustosError('NOT_FOUND', [
          {
            severity: 'error',
            code: 'not-found',
            expression: 'id',
            diagnostics: 'No dead letter with that id.',
          },
        ]);
      await this.deps.audit.append(
        adminEvent('subscription.replayed', {
          requestId,
          projectId: row.project_id,
          resource: { type: 'SubscriptionDelivery', id },
        }),
      );
    });
    return forAdmin((await new SubscriptionQueue(this.deps.db).get(id))!);
  }
}
