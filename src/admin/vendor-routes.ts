import type { FastifyInstance, FastifyRequest } from 'fastify';
import { CustosError } from '../kernel/errors.ts';
import { documentSha256 } from './project-baa.ts';
import type { VendorRegistry } from '../egress/vendor-registry.ts';

/**
 * The vendor registry's admin API (docs/phi-boundary.md), behind the same admin token check as the
 * rest of /admin. Every change is audited by the registry as an admin action.
 *
 * - `POST /admin/vendors` `{ name, services?: [...], phiClass }`
 * - `POST /admin/vendors/endpoints` `{ vendor, host, port, protocol, allowPrivate? }`
 * - `POST /admin/vendors/baa` `{ vendor, executed?, executedAt, expiresOn, documentSha256 | documentBase64 }`
 * - `POST /admin/vendors/list` `{}`; `POST /admin/vendors/show` `{ vendor }`
 *
 * `vendor` is a vendor's id or name.
 */
export function registerVendorRoutes(
  app: FastifyInstance,
  vendors: VendorRegistry,
  check: (req: FastifyRequest) => void,
): void {
  const body = (req: FastifyRequest) => (req.body ?? {}) as Record<string, unknown>;
  app.post('/admin/vendors', async (req) => {
    check(req);
    return vendors.addVendor(body(req), req.id);
  });
  app.post('/admin/vendors/endpoints', async (req) => {
    check(req);
    return vendors.addEndpoint(body(req), req.id);
  });
  app.post('/admin/vendors/baa', async (req) => {
    check(req);
    const { documentBase64, ...b } = body(req);
    if (typeof documentBase64 === 'string' && b.documentSha256 === undefined) {
      try {
        b.documentSha256 = documentSha256(Buffer.from(documentBase64, 'base64'));
      } catch {
        throw new CustosError('VENDOR_INVALID', [
          {
            severity: 'error',
            code: 'required',
            expression: 'document',
            diagnostics: 'The document is empty.',
          },
        ]);
      }
    }
    return vendors.recordBaa(b, req.id);
  });
  app.post('/admin/vendors/list', async (req) => {
    check(req);
    return { vendors: await vendors.list() };
  });
  app.post('/admin/vendors/show', async (req) => {
    check(req);
    const v = body(req).vendor;
    if (typeof v !== 'string' || v === '') throw new CustosError('VENDOR_NOT_FOUND');
    return vendors.show(v);
  });
}
