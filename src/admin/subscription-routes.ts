import type { FastifyInstance, FastifyRequest } from 'fastify';
import type { SqlDriver } from '../store/sql-driver.ts';
import type { AuditLog } from '../audit/audit-log.ts';
import { DeadLetters } from '../subscriptions/subscription-queue.ts';

/**
 * The dead letters of rest-hook subscriptions (docs/phi-boundary.md, "Subscriptions"), behind the
 * admin token check of the rest of /admin:
 * - `POST /admin/subscriptions/dead-letters` `{ projectId?, subscriptionId?, limit? }` (also `GET`,
 *   the same as query parameters): the notifications that ran out of attempts, newest first, each
 *   with its notification id, subscription, resource type, id and version, attempts and last error
 *   (a code such as `HTTP 503`, `ECONNREFUSED`, `EGRESS_BAA_INACTIVE`). Never resource content.
 * - `POST /admin/subscriptions/replay` `{ id }`: queues that notification again, due now, attempts
 *   reset, same notification id. 404 when there is no dead letter with that id.
 * Both are audited (`subscription.dead_letters_listed`, `subscription.replayed`).
 */
export function registerSubscriptionRoutes(
  app: FastifyInstance,
  core: { resourceDb: SqlDriver; audit: AuditLog },
  check: (req: FastifyRequest) => void,
): void {
  const dead = new DeadLetters({ db: core.resourceDb, audit: core.audit });
  const list = async (req: FastifyRequest) => {
    check(req);
    const b = {
      ...((req.query ?? {}) as Record<string, unknown>),
      ...((req.body ?? {}) as Record<string, unknown>),
    };
    const text = (k: string) => (typeof b[k] === 'string' && b[k] !== '' ? (b[k] as string) : undefined);
    const limit = Number(b.limit);
    return dead.list(
      {
        projectId: text('projectId'),
        subscriptionId: text('subscriptionId'),
        limit: Number.isFinite(limit) && limit > 0 ? limit : undefined,
      },
      req.id,
    );
  };
  app.get('/admin/subscriptions/dead-letters', list);
  app.post('/admin/subscriptions/dead-letters', list);
  app.post('/admin/subscriptions/replay', async (req) => {
    check(req);
    const b = (req.body ?? {}) as { id?: unknown };
    return { replayed: await dead.replay(b.id, req.id) };
  });
}
