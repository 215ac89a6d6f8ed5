import type { FastifyInstance, FastifyRequest } from 'fastify';
import { CustosError } from '../kernel/errors.ts';
import { isResourceType } from '../fhir/resource-types.ts';
import { protectedCriteria } from '../phi/minimum-necessary.ts';
import type { AuditLog } from '../audit/audit-log.ts';
import type { SqlDriver } from '../store/sql-driver.ts';
import {
  listBreakGlass,
  listPolicies,
  reviewBreakGlass,
  setPolicy,
  showPolicy,
} from '../phi/access-policy.ts';

/**
 * Access policies and break-glass alerts through the admin API (docs/access-policies.md), behind the
 * same admin token check as the rest of /admin. Every change is audited (`policy.changed`,
 * `break_glass.reviewed`) in the transaction that makes it.
 *
 * - `POST /admin/policies/list` `{ projectId }`: the policy in force for each role
 * - `POST /admin/policies/show` `{ projectId, role, version? }`: one role's policy and its versions
 * - `POST /admin/policies/set` `{ projectId, role, policy, changedBy? }`: a new version
 * - `POST /admin/break-glass/list` `{ projectId?, pending? }`: alerts, unreviewed first
 * - `POST /admin/break-glass/review` `{ id, outcome: 'justified' | 'not-justified', reviewedBy? }`
 *
 * @example
 * ```sh
 * curl -s -X POST http://127.0.0.1:8080/admin/policies/set \
 *   -H "x-custos-admin-token: $(cat .custos/admin-token)" -H 'content-type: application/json' \
 *   -d '{"projectId":"…","role":"patient","policy":{"rules":[…],"purposes":["PATRQT"],"breakGlass":false}}'
 * ```
 */
export function registerPolicyRoutes(
  app: FastifyInstance,
  core: { resourceDb: SqlDriver; audit: AuditLog } & Parameters<typeof protectedCriteria>[0],
  check: (req: FastifyRequest) => void,
): void {
  const deps = { db: core.resourceDb, audit: core.audit, isResourceType, ...protectedCriteria(core) };
  const body = (req: FastifyRequest) => (req.body ?? {}) as Record<string, unknown>;
  const who = (v: unknown) => (typeof v === 'string' && v.trim() !== '' ? v.trim() : undefined);
  app.post('/admin/policies/list', async (req) => {
    check(req);
    return { policies: await listPolicies(deps, body(req).projectId) };
  });
  app.post('/admin/policies/show', async (req) => {
    check(req);
    const b = body(req);
    return showPolicy(deps, b.projectId, b.role, b.version);
  });
  app.post('/admin/policies/set', async (req) => {
    check(req);
    const b = body(req);
    if (b.policy === undefined)
      throw new CustosError('POLICY_INVALID', [
        { severity: 'error', code: 'required', expression: 'policy', diagnostics: 'The policy is missing.' },
      ]);
    return setPolicy(
      deps,
      { projectId: b.projectId, role: b.role, policy: b.policy, changedBy: who(b.changedBy) },
      req.id,
    );
  });
  app.post('/admin/break-glass/list', async (req) => {
    check(req);
    const b = body(req);
    if (b.projectId !== undefined && typeof b.projectId !== 'string') throw new CustosError('BAD_REQUEST');
    return {
      alerts: await listBreakGlass(deps, {
        projectId: (b.projectId as string | undefined) || undefined,
        pending: b.pending === true,
      }),
    };
  });
  app.post('/admin/break-glass/review', async (req) => {
    check(req);
    const b = body(req);
    return reviewBreakGlass(deps, { id: b.id, outcome: b.outcome, reviewedBy: who(b.reviewedBy) }, req.id);
  });
}
