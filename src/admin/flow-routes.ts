import type { FastifyInstance, FastifyRequest } from 'fastify';
import type { FlowMap } from '../egress/flow-map.ts';

/**
 * The PHI flow map's admin API (docs/phi-boundary.md, "PHI flow map"), behind the same admin token
 * check as the rest of /admin: the map of the running server's own configuration, vendor registry
 * and projects, as JSON. `GET /admin/flows`, and `POST /admin/flows` `{}` (how the CLI calls the
 * admin API). Read-only; the map holds no PHI and no credentials.
 */
export function registerFlowRoutes(
  app: FastifyInstance,
  core: { flows(): Promise<FlowMap> },
  check: (req: FastifyRequest) => void,
): void {
  const handler = async (req: FastifyRequest) => {
    check(req);
    return core.flows();
  };
  app.get('/admin/flows', handler);
  app.post('/admin/flows', handler);
}
